#!/usr/bin/env python3
"""Where pag0's time goes per request, case by case, outside Envoy.

    python3 bench/profile.py [requests per case, default 20000]

Builds pag0 with its function names kept (target/bench-prof, same release profile
otherwise), runs bench/hostcalls.mjs once per case under `node --cpu-prof` (V8, as in
Envoy), and splits the sampled time by origin: pag0's own wasm code, the wasm-to-host
call wrappers, the host (bench/hostcalls.mjs, deliberately cheap), garbage collection.
Prints the top wasm functions by self time and writes target/bench/profile/summary.json.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target/bench/profile"
CASES = ["noop", "free", "free_new", "priced", "hot", "cache_hit"]


def demangle(name: str) -> str:
    """Enough of Rust's legacy (_ZN) and v0 (_R) mangling to read a profile."""
    m = re.match(r"_ZN(.*)17h[0-9a-f]{16}E$", name)
    if m:
        parts, s = [], m.group(1)
        while s and s[0].isdigit():
            n = re.match(r"\d+", s).group(0)
            parts.append(s[len(n):len(n) + int(n)])
            s = s[len(n) + int(n):]
        text = "::".join(parts)
        for a, b in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$RF$", "&"), ("$C$", ","),
                     ("..", "::"), ("$u7b$", "{"), ("$u7d$", "}"), ("$BP$", "*")):
            text = text.replace(a, b)
        return text
    if name.startswith("_R"):
        words = re.findall(r"\d+_?([A-Za-z_][A-Za-z0-9_]*)", name)
        words = [w for w in words if not re.match(r"^Cs[0-9A-Za-z_]+$", w)]
        return "~" + "::".join(words[-3:]) if words else name
    return name


def origin(frame: dict) -> str:
    url, name = frame.get("url", ""), frame.get("functionName", "")
    if name.startswith("wasm-to-js") or name.startswith("js-to-wasm"):
        return "boundary"
    if url.startswith("wasm://"):
        return "wasm"
    if name in ("(garbage collector)",):
        return "gc"
    if name in ("(idle)", "(program)", "(root)"):
        return "other"
    return "host (JS)"


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CARGO_PROFILE_RELEASE_STRIP="false")
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1",
                    "--target-dir", str(ROOT / "target/bench-prof")], check=True, cwd=ROOT, env=env)
    wasm = ROOT / "target/bench-prof/wasm32-wasip1/release/pag0.wasm"
    summary = {}
    for case in CASES:
        d = OUT / case
        shutil.rmtree(d, ignore_errors=True)
        out = subprocess.run(["node", "--cpu-prof", f"--cpu-prof-dir={d}", "--cpu-prof-interval", "50",
                              str(ROOT / "bench/hostcalls.mjs"), f"--wasm={wasm}", f"--n={n}", f"--case={case}"],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
        result = json.loads(out)["results"][0]
        prof = json.load(open(glob.glob(str(d / "*.cpuprofile"))[0]))
        by_origin, by_fn = collections.Counter(), collections.Counter()
        for node in prof["nodes"]:
            hits = node.get("hitCount", 0)
            o = origin(node["callFrame"])
            by_origin[o] += hits
            if o == "wasm":
                by_fn[demangle(node["callFrame"]["functionName"])] += hits
        measured = sum(v for k, v in by_origin.items() if k != "other")
        share = {k: by_origin[k] / measured for k in ("wasm", "boundary", "host (JS)", "gc")}
        us = result["us_per_request"]
        summary[case] = {**result, "share": share,
                         "wasm_us_per_request_estimate": us * share["wasm"],
                         "top_wasm_functions": [(f, v / max(1, by_origin["wasm"])) for f, v in by_fn.most_common(25)]}
        print(f"== {case}: {us:.1f} µs/request in this host, {result['host_calls_per_request']} host calls; "
              + ", ".join(f"{k} {v * 100:.0f}%" for k, v in share.items())
              + f" -> pag0's own code ~{us * share['wasm']:.1f} µs")
        for f, v in by_fn.most_common(12):
            print(f"   {v * 100 / max(1, by_origin['wasm']):5.1f}%  {f[:110]}")
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
