#!/usr/bin/env python3
"""Instructions per request, case by case, counted by callgrind in the Envoy under test.

    python3 bench/callgrind.py [requests per case, default 500]

Starts the fast upstream (a plain Envoy) and the side-by-side Envoy of `make bench`
(bench/envoy/bench.yaml.in) under `valgrind --tool=callgrind` with one worker, sends each
case's requests one at a time, and zeroes and dumps callgrind's counters around each case.
`make bench` runs the same measurement (`measure()`, from bench/run.py) and reports the
instructions pag0 and the floor filter add per request over the do-nothing filter.
Counts are repeatable where timings on a shared machine are not. They are split by where
the instructions ran: the Envoy binary (the host side of every proxy-wasm call, HTTP,
routing), code that V8 generated at run time (the wasm filters themselves, plus V8's
trampolines), and shared libraries (libc: memcpy, malloc). Envoy from the wheel is
stripped, so the host side is not split by function. Each count also includes what
Envoy's timers (pag0's tick, Envoy's own) ran while the case ran; an idle window at the
end measures that rate.
Output: target/bench/callgrind/summary.json and a line per case on stdout.
"""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: when it imports this module, itself)

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
    ("floor_free", "floor", "/free", "bench-free"),
    ("floor_priced", "floor", "/priced", None),
    ("floor_hit", "floor", "/hit", "bench-cache"),
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


def new_dump(work: Path, before: set[Path], timeout: float = 60) -> Path:
    """The dump file callgrind wrote since `before`, once it has stopped growing."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        new = sorted(set(work.glob("cg.out.*")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            size = new[-1].stat().st_size
            if size and size == last:
                return new[-1]
            last = size
        time.sleep(0.25)
    raise bench.BenchError(f"callgrind wrote no dump in {work} within {timeout} s")


def measure(n: int, envoy_bin: str, work: Path) -> dict:
    """Instructions per request for every case of CASES, n requests each (after 3n to warm
    up): {"requests_per_case": n, "cases": {case: {"per_request", "by_object_per_request",
    "dump"}}}, also written to work/summary.json. Stops the Envoys it starts."""
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("cg.out*"):
        old.unlink()
    started = []
    try:
        up_port, up_admin = bench.free_port(), bench.free_port()
        body = "x" * 1024
        up_cfg = bench.render("upstream.yaml.in", work / "upstream.yaml", admin=up_admin, port=up_port,
                              body=body, big_body="y")
        started.append(bench.Envoy(envoy_bin, up_cfg, work, "upstream", up_admin, 1).proc)
        cfg, ports = bench.render_bench(work, up_port, body)
        bench.log(f"starting Envoy under callgrind (slow: about a minute), {n} requests per case")
        proc = bench.PROCS.start(
            "envoy under callgrind",
            # Instrumentation starts only once Envoy is ready: starting (V8 compiling every
            # module) is several times faster without it, and nothing before is counted.
            ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no",
             f"--callgrind-out-file={work}/cg.out.%p", envoy_bin, "-c", str(cfg), "--concurrency", "1",
             "--disable-hot-restart", "-l", "warning"],
            log_path=work / "valgrind.log", cwd=bench.ROOT)
        started.append(proc)
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/ready", timeout=5) as r:
                    if r.read().strip() == b"LIVE":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise bench.BenchError("Envoy under callgrind did not start; see " + str(work / "valgrind.log"))
            time.sleep(1)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        bench.log("ready; warming every case (V8 tiers wasm code up after enough calls)")
        send(ports["pag0"], "/priced", "bench-free", 1)  # case 3's session pays once
        send(ports["cache"], "/hit", "bench-cache", 1)
        for _, listener, path, session in CASES:
            send(ports[listener], path, session, 3 * n)
        def window(name: str, load) -> tuple[dict[str, int], float]:
            """Instructions by object between zeroing and dumping around `load`, and its seconds."""
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            t0 = time.monotonic()
            load()
            seconds = time.monotonic() - t0
            before = set(work.glob("cg.out.*"))
            subprocess.run(["callgrind_control", "-d", name, str(proc.pid)], check=True, capture_output=True)
            return by_object(new_dump(work, before)), seconds

        results = {}
        for case, listener, path, session in CASES:
            # Sessions the warm-up already made (case 4 in steady state, as under wrk,
            # where every session x agent recurs; new sessions are case free_new's).
            objs, seconds = window(case, lambda: send(ports[listener], path, session, n))
            total = sum(objs.values())
            results[case] = {"per_request": total / n,
                             "by_object_per_request": {k: v / n for k, v in sorted(objs.items())},
                             "seconds": seconds}
            bench.log(f"{case:12s} {total / n:12,.0f} instructions/request  "
                      + "  ".join(f"{k} {v / n:,.0f}" for k, v in sorted(objs.items(), key=lambda kv: -kv[1])[:4]))
        # What Envoy does with no request at all (timers: pag0's 20 ms tick in each of its
        # VMs, Envoy's own), per second: every case's count includes it for as long as the
        # case ran under callgrind, which is tens of times longer than outside it.
        objs, seconds = window("idle", lambda: time.sleep(3))
        idle = sum(objs.values()) / seconds
        bench.log(f"idle         {idle:12,.0f} instructions/second (included in every case for its duration)")
        summary = {"requests_per_case": n, "cases": results, "idle_per_second": idle}
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        for p in reversed(started):
            bench.PROCS.stop(p)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    try:
        bench.ensure_valgrind()
        envoy_bin = bench.run([str(bench.ROOT / "scripts/ensure-envoy.sh")])
        bench.build_noop()
        measure(n, envoy_bin, bench.ROOT / "target/bench/callgrind")
        return 0
    except bench.BenchError as e:
        print(f"callgrind: {e}", file=sys.stderr)
        return 1
    finally:
        bench.PROCS.stop_all()


if __name__ == "__main__":
    sys.exit(main())
