#!/usr/bin/env python3
"""`make bench`: what pag0 costs per request, side by side with bare Envoy, and how it scales.

    python3 bench/run.py            # the full run (about 15-20 minutes), writes bench/RESULTS.md,
                                    # bench/results.json and the README's benchmark block
    python3 bench/run.py --smoke    # a minute or two: every part briefly, results in
                                    # target/bench-smoke/, checked for form (never for speed)
    python3 bench/run.py --only stream [--smoke]   # the streamed case alone: printed and
                                    # written to target/bench[-smoke]/stream.json only
    python3 bench/run.py --only priced_redis [--smoke]   # the priced route with the Redis
                                    # ledger (4r), its shared-data twin (4) and the do-nothing
                                    # filter (2), in the same rotated rounds: printed and written
                                    # to target/bench[-smoke]/priced_redis.json only

Everything listens on 127.0.0.1. Every process this script starts is stopped when it ends,
on failure and on Ctrl-C too. Settings come from the environment (defaults in brackets):

    BENCH_DURATION [6]        seconds of each measured wrk run
    BENCH_ROUNDS [5]          rounds; each round runs every case once, in a rotated order
    BENCH_WARMUP [2]          seconds of unmeasured load per case before the first round
    BENCH_CONNECTIONS [50]    wrk connections        BENCH_THREADS [2]  wrk threads
    BENCH_CONCURRENCY [2]     Envoy workers (--concurrency), for every Envoy started
    BENCH_PRICED_SESSIONS [1000], BENCH_PRICED_AGENTS [8]   cases 4 and 4r's sessions x agents
    BENCH_REDIS [1]           case 4r: the priced route with pag0's ledger in Redis (redis-server,
                              append-only file fsynced every second, behind Webdis with the
                              ledger's locked-down ACL; installed by scripts/ensure-redis.sh);
                              0 skips it
    BENCH_REDIS_IDLE [3]      seconds with no call on 4r's listener, to count the script calls
                              its VMs make by themselves (the kill-log poll)
    BENCH_SESSIONS [1000000]  distinct sessions of the memory stream (0 skips it)
    BENCH_SESSIONS_FIRST [100000]  where the stream's first memory reading is taken
    BENCH_CACHE_ENTRIES [4096], BENCH_CACHE_BODY [4096]   cache memory: slots, answer bytes
    BENCH_X402_CALLS [100]    sequential x402 pay-path calls, each way (0 skips it)
    BENCH_CALLGRIND [500]     requests per case counted by callgrind (bench/callgrind.py; 0 skips it)
    BENCH_STREAM_CALLS [200]  streamed LLM answers per path: upstream alone, do-nothing filter,
                              pag0 metering (0 skips it)
    BENCH_STREAM_BYTES [1048576], BENCH_STREAM_WRITE [4096]   the SSE answer's size, the
                              upstream's chunk (one write each)
    BENCH_OUT [bench]         where RESULTS.md and results.json go
    BENCH_README [1]          rewrite README.md's block between the bench markers (0: leave it)
"""
from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PAG0_WASM = ROOT / "target/wasm32-wasip1/release/pag0.wasm"
NOOP_MANIFEST = BENCH / "noop-filter/Cargo.toml"
NOOP_WASM = BENCH / "noop-filter/target/wasm32-wasip1/release/pag0_bench_noop.wasm"
FLOOR_MANIFEST = BENCH / "floor-filter/Cargo.toml"
FLOOR_WASM = BENCH / "floor-filter/target/wasm32-wasip1/release/pag0_bench_floor.wasm"
LUA = BENCH / "wrk/bench.lua"
API_KEY = "bench-key"  # bench/envoy/*.json hold its SHA-256
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
# Issue 12: the module may grow to 1 MiB where that buys instructions per request.
WASM_SIZE_TARGET = 1024 * 1024

# The side-by-side cases: (id, label, listener, wrk arguments). Each pag0 case is followed
# by the same case on the floor filter (bench/floor-filter: the cheapest possible priced
# firewall, one header read, one property read, a compare-and-swap to reserve and one to
# settle), so the table reads pag0 next to the cheapest possible firewall.
FLOOR = "cheapest possible firewall (bench/floor-filter)"
CASES = [
    ("proxy", "1. proxy to a fast upstream, no wasm", "proxy", {"path": "/bench"}),
    ("proxy_noop", "2. proxy + do-nothing wasm filter", "proxy_noop", {"path": "/bench"}),
    ("free", "3. pag0, free route", "pag0", {"path": "/free", "session": "bench-free"}),
    ("floor_free", f"3f. {FLOOR}, free route", "floor", {"path": "/free", "session": "bench-free"}),
    ("free_new", "3b. pag0, free route, a session that never paid", "pag0",
     {"path": "/free", "session": "bench-never-paid"}),
    ("priced", "4. pag0, priced route, {sessions} sessions x {agents} agents", "pag0",
     {"path": "/priced", "mode": "many", "session": "bench-many"}),
    # Case 4 with pag0's ledger in Redis (issue 14): the same route, calls and plugin
    # configuration, plus `ledger: {store: redis}` (bench/envoy/ledger-listener.yaml.in).
    ("priced_redis", "4r. pag0, priced route, Redis ledger, {sessions} sessions x {agents} agents",
     "pag0_redis", {"path": "/priced", "mode": "many", "session": "bench-many"}),
    ("floor_priced", f"4f. {FLOOR}, priced route, {{sessions}} sessions x {{agents}} agents", "floor",
     {"path": "/priced", "mode": "many", "session": "bench-many"}),
    ("hot", "5. pag0, priced route, one session", "pag0", {"path": "/priced", "session": "bench-hot"}),
    ("direct", "6a. direct_response, no wasm", "direct", {"path": "/bench"}),
    ("direct_noop", "6b. direct_response + do-nothing wasm", "direct_noop", {"path": "/bench"}),
    ("cache_hit", "6c. pag0 serving cache hits", "cache", {"path": "/hit", "session": "bench-cache"}),
    ("floor_hit", f"6d. {FLOOR} serving cache hits", "floor", {"path": "/hit", "session": "bench-cache"}),
]
# Cases on the Redis ledger's listener: run only when Redis does (BENCH_REDIS=1).
REDIS_CASES = {"priced_redis"}
# The Redis ledger's case, its shared-data twin, and what latency is added over.
LEDGER_CASE, LEDGER_TWIN, LEDGER_BASE = "priced_redis", "priced", "proxy_noop"
# Also measured at one connection, for latency without queueing.
QUIET_CASES = ["direct_noop", "cache_hit", "proxy_noop", "priced", "priced_redis"]
# (name, numerator, denominator, target ratio; None: a reference, no goal). Goals of issue 12
# (issue 6 asked 0.95 / 0.90 / 0.80 / 0.85); the floor's own ratios, measured in the same
# run, show what any priced firewall costs here, and pag0 / floor how far pag0 is above it.
RATIOS = [
    ("free / proxy+wasm (3/2)", "free", "proxy_noop", 0.85),
    ("priced / proxy+wasm (4/2)", "priced", "proxy_noop", 0.80),
    ("one hot session / proxy+wasm (5/2)", "hot", "proxy_noop", 0.80),
    ("cache hit / direct_response+wasm (6c/6b)", "cache_hit", "direct_noop", 0.75),
    ("floor: free / proxy+wasm (3f/2)", "floor_free", "proxy_noop", None),
    ("floor: priced / proxy+wasm (4f/2)", "floor_priced", "proxy_noop", None),
    ("floor: cache hit / direct_response+wasm (6d/6b)", "floor_hit", "direct_noop", None),
    ("pag0 / floor, free route (3/3f)", "free", "floor_free", None),
    ("pag0 / floor, priced route (4/4f)", "priced", "floor_priced", None),
    ("pag0 / floor, cache hit (6c/6d)", "cache_hit", "floor_hit", None),
    ("Redis ledger / shared-data ledger, priced route (4r/4)", "priced_redis", "priced", None),
    ("priced, Redis ledger / proxy+wasm (4r/2)", "priced_redis", "proxy_noop", None),
]
# Instructions added per request over the do-nothing filter (callgrind): (key, case,
# baseline case, goal of issue 12 or None).
CALLGRIND_ADDED = [
    ("free", "free", "proxy_noop", 90_000),
    ("priced", "priced", "proxy_noop", 120_000),
    ("cache_hit", "cache_hit", "direct_noop", 80_000),
    ("floor_free", "floor_free", "proxy_noop", None),
    ("floor_priced", "floor_priced", "proxy_noop", None),
    ("floor_hit", "floor_hit", "direct_noop", None),
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- settings

def env_num(name: str, default, kind=int):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise BenchError(f"{name}={raw!r} is not a number")


def settings(smoke: bool) -> dict:
    if smoke:
        # Every part runs, briefly. Durations are whole seconds for wrk.
        defaults = dict(duration=1, rounds=1, warmup=0, connections=8, threads=2, concurrency=2,
                        priced_sessions=50, priced_agents=4, sessions=3000, sessions_first=1000,
                        cache_entries=64, cache_body=1024, x402_calls=3, callgrind=20,
                        stream_calls=3, stream_bytes=1024 * 1024, stream_write=4096,
                        redis=1, redis_idle=1, out=str(ROOT / "target/bench-smoke"), readme=0)
    else:
        defaults = dict(duration=6, rounds=5, warmup=2, connections=50, threads=2, concurrency=2,
                        priced_sessions=1000, priced_agents=8, sessions=1_000_000,
                        sessions_first=100_000, cache_entries=4096, cache_body=4096,
                        x402_calls=100, callgrind=500, stream_calls=200, stream_bytes=1024 * 1024,
                        stream_write=4096, redis=1, redis_idle=3, out=str(BENCH), readme=1)
    s = {}
    for key, default in defaults.items():
        name = "BENCH_" + key.upper()
        if key == "out":
            s[key] = os.environ.get(name) or default
        else:
            s[key] = env_num(name, default)
    if s["threads"] < 1 or s["connections"] < s["threads"]:
        raise BenchError("need BENCH_THREADS >= 1 and BENCH_CONNECTIONS >= BENCH_THREADS")
    if s["duration"] < 1 or s["rounds"] < 1:
        raise BenchError("need BENCH_DURATION >= 1 and BENCH_ROUNDS >= 1")
    if s["stream_bytes"] < 1 or s["stream_write"] < 1:
        raise BenchError("need BENCH_STREAM_BYTES >= 1 and BENCH_STREAM_WRITE >= 1")
    if s["redis_idle"] < 1:
        raise BenchError("need BENCH_REDIS_IDLE >= 1")
    if s["sessions"] and not 0 < s["sessions_first"] < s["sessions"]:
        raise BenchError("need 0 < BENCH_SESSIONS_FIRST < BENCH_SESSIONS")
    s["smoke"] = smoke
    return s


# ---------------------------------------------------------------- processes

class Processes:
    """Everything started here, stopped in reverse order by PID."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], log_path: Path | None = None, **kw) -> subprocess.Popen:
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            p = subprocess.Popen(args, stdout=kw.pop("stdout", out), stderr=kw.pop("stderr", out),
                                 stdin=subprocess.DEVNULL, **kw)
        finally:
            if log_path:
                out.close()
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.procs)):
            try:
                self.stop(p)
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass


PROCS = Processes()


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


HZ = os.sysconf("SC_CLK_TCK")
# A round's ratio counts as quiet when other processes used less than this many CPUs
# during both of its runs.
QUIET_CPUS = 0.15


def cpu_snapshot(pids: list[int]) -> tuple[float, float]:
    """(wall seconds, CPU seconds used by processes other than this run's), cumulative:
    every CPU's busy time minus what this script, its finished children (wrk) and the
    running Envoys `pids` used. The difference of two snapshots over their wall time is
    how many CPUs others (parallel test runs, say) took while a case was measured."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / HZ
    ours = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            rest = stat[stat.rindex(")") + 2:].split()
            ours += (int(rest[11]) + int(rest[12])) / HZ
        except (OSError, ValueError, IndexError):
            pass
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        ours += r.ru_utime + r.ru_stime
    return time.monotonic(), busy - ours


def foreign_cpus(before: tuple[float, float], after: tuple[float, float]) -> float:
    return max(0.0, (after[1] - before[1]) / max(1e-9, after[0] - before[0]))


_PORT_LOW, _PORT_SPAN = 20000, 12000
_port_next = (os.getpid() * 7919) % _PORT_SPAN


def free_port() -> int:
    """A free loopback port for a server started next: below Linux's ephemeral range
    (32768-60999), so no outbound connection (Webdis to Redis, wrk, Envoy to an upstream)
    takes it before the server binds it (CI saw Envoy fail with "Address already in use"
    that way); never the same port twice in one run (tests/support/mod.rs does the same)."""
    global _port_next
    for _ in range(_PORT_SPAN):
        port = _PORT_LOW + _port_next % _PORT_SPAN
        _port_next += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BenchError("no free loopback port")


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{what} did not open port {port} in {timeout} s")


# ---------------------------------------------------------------- tools

def run(args: list[str], **kw) -> str:
    out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=ROOT, **kw)
    return out.stdout.strip()


def ensure_apt(package: str, tools: list[str]) -> str:
    """The path of tools[0], installing the Debian package `package` first when any of
    `tools` is missing."""
    if all(shutil.which(t) for t in tools):
        return shutil.which(tools[0])
    log(f"installing {package} from Debian (apt-get install -y {package})")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(sudo + ["apt-get", "install", "-y", package], env=env)
    if r.returncode != 0:
        subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", package], env=env, check=True)
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise BenchError(f"{', '.join(missing)} still missing after apt-get install {package}")
    return shutil.which(tools[0])


def ensure_wrk() -> str:
    return ensure_apt("wrk", ["wrk"])


def ensure_valgrind() -> str:
    return ensure_apt("valgrind", ["valgrind", "callgrind_control"])


def build_filter(what: str, manifest: Path, wasm: Path) -> None:
    log(f"building {what} ({manifest.parent.relative_to(ROOT)})")
    subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1",
                    "--manifest-path", str(manifest)], check=True, cwd=ROOT)
    if not wasm.exists():
        raise BenchError(f"{wasm} was not built")


def build_noop() -> None:
    """The do-nothing filter and the floor filter, the two references pag0 is measured against."""
    build_filter("the do-nothing filter", NOOP_MANIFEST, NOOP_WASM)
    build_filter("the floor filter", FLOOR_MANIFEST, FLOOR_WASM)


def machine_info(envoy_bin: str, wrk: str) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = run([envoy_bin, "--version"])
    full = re.search(r"version: (\S+)", version)
    m = re.search(r"/(\d+\.\d+\.\d+)/", version)
    commit = run(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "Cargo.toml", "Cargo.lock"],
                           cwd=ROOT).returncode != 0
    wrk_version = [re.sub(r"\s*Copyright.*", "", line) for line in
                   subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines()]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": int(run(["nproc"])),
        "cpu": cpu,
        "memory_kib": _meminfo_total(),
        "kernel": os.uname().release,
        "envoy": m.group(1) if m else version,
        "envoy_build": full.group(1) if full else version,
        "envoy_bin": envoy_bin,
        "commit": commit + ("-dirty (uncommitted changes in src/)" if dirty else ""),
        "wrk": wrk_version[0].strip() if wrk_version else "wrk",
    }


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- Envoy

def one_line_json(path: Path, **values) -> str:
    """A plugin configuration file as one line, for a single-quoted YAML scalar."""
    text = string.Template(path.read_text()).substitute(values)
    compact = json.dumps(json.loads(text), separators=(",", ":"))
    if "'" in compact:
        raise BenchError(f"{path}: a single quote would break the YAML")
    return compact


def render(template: str, dest: Path, **values) -> Path:
    text = string.Template((BENCH / "envoy" / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    dest.write_text(text)
    return dest


# The listeners of bench/envoy/bench.yaml.in, one per side-by-side case (and admin).
BENCH_LISTENERS = ["proxy", "proxy_noop", "pag0", "floor", "direct", "direct_noop", "cache", "admin"]


def render_bench(work: Path, upstream: int, body: str, webdis: int | None = None) -> tuple[Path, dict[str, int]]:
    """bench/envoy/bench.yaml.in rendered with a free port per listener: (config, ports).
    With `webdis` (the port of the Redis ledger's Webdis), also case 4r's listener
    `pag0_redis` and the cluster `pag0_ledger`."""
    names = BENCH_LISTENERS + (["pag0_redis"] if webdis else [])
    ports = {name: free_port() for name in names}
    ledger_listener = ledger_cluster = ""
    if webdis:
        fragment = lambda name, **v: string.Template((BENCH / "envoy" / name).read_text()).substitute(  # noqa: E731
            {k: str(x) for k, x in v.items()}).rstrip("\n")
        ledger_listener = fragment("ledger-listener.yaml.in", pag0_redis_port=ports["pag0_redis"],
                                   pag0_wasm=PAG0_WASM, pag0_redis_config=redis_plugin_config())
        ledger_cluster = fragment("ledger-cluster.yaml.in", webdis=webdis)
    config = render(
        "bench.yaml.in", work / "bench.yaml",
        admin=ports["admin"], upstream=upstream, body=body,
        **{f"{name}_port": port for name, port in ports.items() if name not in ("admin", "pag0_redis")},
        noop_wasm=NOOP_WASM, pag0_wasm=PAG0_WASM, floor_wasm=FLOOR_WASM, noop_config="",
        pag0_config=one_line_json(BENCH / "envoy/pag0.json"),
        pag0_cache_config=one_line_json(BENCH / "envoy/pag0-cache.json"),
        ledger_listener=ledger_listener, ledger_cluster=ledger_cluster)
    return config, ports


# ---------------------------------------------------------------- the Redis ledger (case 4r)

# The Webdis ACL pag0's ledger runs behind (EVALSHA and SCRIPT only), as the tests use it
# (tests/support/ledger_redis.rs).
WEBDIS_ACL = ROOT / "scripts/lib/webdis-ledger-acl.json"
LEDGER_TIMEOUT_MS = 250
WEBDIS_THREADS = 2
# The tests run Redis with `appendfsync always` (every write fsynced before it is
# answered); a production Redis usually runs `everysec`, and so does the bench.
REDIS_APPENDFSYNC = "everysec"
TESTS_APPENDFSYNC = "always"


def redis_plugin_config() -> str:
    """bench/envoy/pag0.json (cases 3-5) with `ledger: {store: redis}` at its top level."""
    cfg = json.loads(one_line_json(BENCH / "envoy/pag0.json"))
    if "ledger" in cfg:
        raise BenchError("bench/envoy/pag0.json already has a ledger")
    cfg["ledger"] = {"store": "redis", "cluster": "pag0_ledger", "timeoutMs": LEDGER_TIMEOUT_MS}
    compact = json.dumps(cfg, separators=(",", ":"))
    if "'" in compact:
        raise BenchError("the Redis ledger's plugin configuration: a single quote would break the YAML")
    return compact


class LedgerRedis:
    """Redis (append-only file on, fsynced every second) and Webdis in front of it with
    the ledger's locked-down ACL, on free loopback ports, as tests/support/ledger_redis.rs
    starts them (but for `appendfsync`). Both are in the process registry."""

    def __init__(self, work: Path):
        try:
            run([str(ROOT / "scripts/ensure-redis.sh")])
        except subprocess.CalledProcessError as e:
            raise BenchError(f"scripts/ensure-redis.sh failed:\n{e.stderr[-2000:]}")
        missing = [tool for tool in ("redis-server", "redis-cli", "webdis") if not shutil.which(tool)]
        if missing:
            raise BenchError(f"{', '.join(missing)} missing after scripts/ensure-redis.sh")
        if not WEBDIS_ACL.exists():
            raise BenchError(f"{WEBDIS_ACL.relative_to(ROOT)} is missing (the Webdis ACL of the Redis ledger)")
        self.version = run(["redis-server", "--version"])
        m = re.search(r"v=(\S+)", self.version)
        self.version = m.group(1) if m else self.version
        self.dir = work / "redis"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.redis_port, self.webdis_port = free_port(), free_port()
        self.redis = PROCS.start(
            "redis-server",
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
             "--appendfsync", REDIS_APPENDFSYNC, "--daemonize", "no", "--logfile", "redis.log"],
            cwd=self.dir)
        self.webdis = None
        self._wait("redis-server to answer PING", lambda: self.try_cli("PING") == "PONG")
        config = self.dir / "webdis.json"
        config.write_text(json.dumps({
            "redis_host": "127.0.0.1", "redis_port": self.redis_port,
            "http_host": "127.0.0.1", "http_port": self.webdis_port,
            "threads": WEBDIS_THREADS, "daemonize": False, "database": 0, "verbosity": 1,
            "logfile": str(self.dir / "webdis.log"),
            "acl": json.loads(WEBDIS_ACL.read_text()),
        }))
        self.webdis = PROCS.start("webdis", ["webdis", str(config)], log_path=self.dir / "webdis.out")
        self._wait("webdis to reach redis", self._webdis_reaches_redis)
        log(f"Redis ledger: redis-server {self.version} on {self.redis_port} (appendonly yes, appendfsync "
            f"{REDIS_APPENDFSYNC}), Webdis on {self.webdis_port}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self.redis, self.webdis) if p is not None]

    def try_cli(self, *args: str) -> str | None:
        r = subprocess.run(["redis-cli", "-p", str(self.redis_port), *args], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    def _webdis_reaches_redis(self) -> bool:
        """SCRIPT EXISTS (allowed by the ACL, changes nothing) answers 200 once Webdis is
        connected to Redis."""
        try:
            return request(self.webdis_port, "GET", "/SCRIPT/EXISTS/0", {}, timeout=2)[0] == 200
        except OSError:
            return False

    def _wait(self, what: str, ready) -> None:
        deadline = time.time() + 20
        while not ready():
            for p in (self.redis, self.webdis):
                if p is not None and p.poll() is not None:
                    raise BenchError(f"waiting for {what}: {p.args[0]} exited with {p.returncode}\n"
                                     f"{self.log_tail()}")
            if time.time() > deadline:
                raise BenchError(f"waited 20 s for {what}\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def commandstats(self) -> dict[str, int]:
        """Calls per command since Redis started (`INFO commandstats`; commands the ledger's
        scripts run count too)."""
        text = self.try_cli("INFO", "commandstats")
        if text is None:
            raise BenchError(f"redis-cli INFO commandstats failed\n{self.log_tail()}")
        out = {}
        for line in text.splitlines():
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line.strip())
            if m:
                out[m.group(1)] = int(m.group(2))
        return out

    def cpu_seconds(self) -> float:
        """CPU time Redis and Webdis have used."""
        total = 0.0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                rest = stat[stat.rindex(")") + 2:].split()
                total += (int(rest[11]) + int(rest[12])) / HZ
            except (OSError, ValueError, IndexError):
                pass
        return total

    def stop(self) -> None:
        for p in (self.webdis, self.redis):
            if p is not None:
                PROCS.stop(p)


def commands_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands Redis ran between two `INFO commandstats`, but for the INFO calls themselves."""
    out = {k: v - before.get(k, 0) for k, v in after.items() if k != "info"}
    return {k: v for k, v in sorted(out.items()) if v > 0}


class Envoy:
    def __init__(self, envoy_bin: str, config: Path, work: Path, name: str, admin: int, concurrency: int):
        self.name, self.admin = name, admin
        self.log_path = work / f"{name}.log"
        self.proc = PROCS.start(
            f"envoy {name}",
            [envoy_bin, "-c", str(config), "--concurrency", str(concurrency),
             "--disable-hot-restart", "-l", "warning"],
            log_path=self.log_path, cwd=ROOT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"Envoy ({name}) exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.admin_get("/ready").strip() == "LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError(f"Envoy ({name}) not ready after 30 s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=10) as r:
            return r.read().decode()

    def stats(self, pattern: str) -> dict[str, int]:
        """Counters and gauges whose name matches the regex `pattern`."""
        text = self.admin_get("/stats?filter=" + urllib.request.quote(pattern))
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            try:
                out[name.strip()] = int(value)
            except ValueError:
                pass  # histograms
        return out

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError("no VmRSS")

    def stop(self) -> None:
        PROCS.stop(self.proc)


def request(port: int, method: str, path: str, headers: dict, body: bytes | None = None,
            timeout: float = 10) -> tuple[int, dict, bytes, float]:
    """One request on a new connection: (status, headers lowercased, body, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.perf_counter() - t0
    finally:
        conn.close()


def ident(session: str) -> dict:
    return {"x-pag0-api-key": API_KEY, "x-pag0-session": session, "x-pag0-agent": "executor-1"}


# ---------------------------------------------------------------- wrk

def wrk_run(wrk: str, s: dict, port: int, seconds: int, args: dict, connections: int | None = None,
            background: bool = False, threads: int | None = None):
    base = {"apikey": API_KEY, "agent": "executor-1", "session": "bench-static"}
    base.update(args)
    if base.get("mode") == "many":
        base.setdefault("sessions", str(s["priced_sessions"]))
        base.setdefault("agents", str(s["priced_agents"]))
    cmd = [wrk, f"-t{threads or s['threads']}", f"-c{connections or s['connections']}", f"-d{seconds}s",
           "--timeout", "5s", "-s", str(LUA), f"http://127.0.0.1:{port}", "--"]
    cmd += [f"{k}={v}" for k, v in base.items()]
    if background:
        return PROCS.start("wrk", cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p = PROCS.start("wrk", cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=seconds + 60)
    finally:
        PROCS.stop(p)
    return parse_wrk(p.returncode, out, err)


def parse_wrk(rc: int, out: bytes, err: bytes) -> dict:
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON "):])
    raise BenchError(f"wrk gave no result (rc {rc}):\n{text}\n{err.decode(errors='replace')}")


# ---------------------------------------------------------------- side-by-side cases

STAT_PATTERN = (r"^(http\.[a-z0-9_]+\.downstream_rq_(completed|2xx)"
                r"|wasmcustom\.pag0\.store\..*|wasmcustom\.pag0\.ledger\..*|wasmcustom\..*\.cache_hits)$")
# pag0's counters of the Redis ledger: settlements Redis applied, script calls that
# failed, priced calls refused LEDGER_UNAVAILABLE.
REDIS_SETTLED = "wasmcustom.pag0.ledger.redis_settlements"
REDIS_FAILURES = "wasmcustom.pag0.ledger.redis_failures"
REDIS_UNAVAILABLE = "wasmcustom.pag0.ledger.redis_unavailable"


def snapshot(envoy: Envoy) -> dict[str, int]:
    return envoy.stats(STAT_PATTERN)


def delta(before: dict, after: dict, name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def cache_hits(stats: dict) -> int:
    return sum(v for k, v in stats.items() if k.endswith(".cache_hits"))


def sanity(ports: dict) -> None:
    """One request per case: each answers what it should, or the figures would mean nothing."""
    checks = [
        ("proxy", "/bench", ident("bench-static"), lambda h: True),
        ("proxy_noop", "/bench", ident("bench-static"), lambda h: True),
        # Case 3's session has paid once (as an agent's session would have); 3b's never has.
        ("pag0", "/priced", ident("bench-free"), lambda h: h.get("x-pag0-cost") == "20000"),
        ("pag0", "/free", ident("bench-free"), lambda h: h.get("x-pag0-cost") == "0"),
        ("pag0", "/free", ident("bench-never-paid"), lambda h: h.get("x-pag0-cost") == "0"),
        ("direct", "/bench", ident("bench-static"), lambda h: True),
        ("direct_noop", "/bench", ident("bench-static"), lambda h: True),
        # The floor filter: a free route, a priced one, and a hit answered from shared data
        # (the first call fills the entry).
        ("floor", "/free", ident("bench-free"), lambda h: h.get("x-pag0-cost") == "0"),
        ("floor", "/priced", ident("bench-free"), lambda h: h.get("x-pag0-cost") == "20000"),
        ("floor", "/hit", ident("bench-cache"), lambda h: h.get("x-pag0-cost") == "0"),
        ("floor", "/hit", ident("bench-cache"), lambda h: h.get("x-pag0-cost") == "0"),
    ]
    for listener, path, headers, ok in checks:
        status, h, body, _ = request(ports[listener], "GET", path, headers)
        if status != 200 or not ok(h) or len(body) != 1024:
            raise BenchError(f"sanity: {listener} {path} answered {status} {h} {body[:300]!r}")
    # The cache: the first call fills the entry, the next ones are hits.
    port = ports["cache"]
    status, h, body, _ = request(port, "GET", "/hit", ident("bench-cache"))
    if status != 200:
        raise BenchError(f"sanity: cache fill answered {status} {body[:300]!r}")
    for _ in range(50):
        status, h, body, _ = request(port, "GET", "/hit", ident("bench-cache"))
        if status == 200 and h.get("x-pag0-cached") == "true":
            return
        time.sleep(0.05)
    raise BenchError(f"sanity: the cache never served a hit (last: {status} {h})")


def active_cases(s: dict, only: set[str] | None = None) -> list[tuple]:
    """CASES that run: the Redis ledger's only when Redis does; with `only`, those alone."""
    return [c for c in CASES if (s["redis"] or c[0] not in REDIS_CASES) and (only is None or c[0] in only)]


def active_quiet(cases: list[tuple]) -> list[str]:
    ids = {c[0] for c in cases}
    return [cid for cid in QUIET_CASES if cid in ids]


def sanity_redis(port: int, ledger: LedgerRedis) -> None:
    """Case 4r's listener charges a priced call through Redis (the first call also loads
    the ledger's script) and lets a free one through without it."""
    before = ledger.commandstats()
    deadline, last = time.time() + 10, None
    while True:
        status, h, body, _ = request(port, "GET", "/priced", ident("bench-redis-sanity"))
        last = (status, h, body[:300])
        if status == 200 and h.get("x-pag0-cost") == "20000" and len(body) == 1024:
            break
        if time.time() > deadline:
            raise BenchError(f"sanity: pag0_redis /priced answered {last}")
        time.sleep(0.1)
    if commands_between(before, ledger.commandstats()).get("evalsha", 0) < 1:
        raise BenchError("sanity: a priced call on pag0_redis sent no EVALSHA to Redis")
    status, h, body, _ = request(port, "GET", "/free", ident("bench-redis-sanity"))
    if status != 200 or h.get("x-pag0-cost") != "0":
        raise BenchError(f"sanity: pag0_redis /free answered {status} {h} {body[:300]!r}")


def wait_settled(envoy: Envoy, before: dict, listener: str, timeout: float = 5.0) -> dict:
    """Envoy's counters once Redis has applied a settlement for every call the listener
    completed since `before` (they go in batches on the VMs' 20 ms tick), or after `timeout`."""
    deadline = time.time() + timeout
    while True:
        now = snapshot(envoy)
        done = delta(before, now, f"http.{listener}.downstream_rq_completed")
        if delta(before, now, REDIS_SETTLED) >= done or time.time() > deadline:
            return now
        time.sleep(0.02)


def ledger_idle(ledger: LedgerRedis, seconds: int) -> dict:
    """Script calls and commands the Redis ledger's VMs send with no call at all."""
    time.sleep(0.2)  # the warm-up's last settlements
    before, t0 = ledger.commandstats(), time.monotonic()
    time.sleep(seconds)
    cmds = commands_between(before, ledger.commandstats())
    dt = time.monotonic() - t0
    return {"seconds": round(dt, 3), "evalsha_per_s": cmds.get("evalsha", 0) / dt,
            "commands_per_s": sum(cmds.values()) / dt, "by_command": cmds}


def side_by_side(s: dict, envoy_bin: str, wrk: str, work: Path, upstream_port: int,
                 upstream_pid: int, cases: list[tuple], quiet_cases: list[str],
                 ledger: LedgerRedis | None = None) -> dict:
    config, ports = render_bench(work, upstream_port, s["body"], webdis=ledger.webdis_port if ledger else None)
    envoy = Envoy(envoy_bin, config, work, "bench", ports["admin"], s["concurrency"])
    # Processes of this run: their CPU time is not "other processes".
    ours = [envoy.proc.pid, upstream_pid] + (ledger.pids if ledger else [])
    idle = None
    try:
        sanity(ports)
        if ledger:
            sanity_redis(ports["pag0_redis"], ledger)
        if s["warmup"]:
            log(f"warm-up: {s['warmup']} s per case")
            for cid, _, listener, args in cases:
                wrk_run(wrk, s, ports[listener], s["warmup"], args)
        if ledger:
            idle = ledger_idle(ledger, s["redis_idle"])
            log(f"Redis ledger, no calls: {idle['evalsha_per_s']:.1f} script calls/s "
                f"({idle['commands_per_s']:.1f} commands/s)")
        runs: dict[str, list[dict]] = {c[0]: [] for c in cases}
        # Latency without queueing: one connection, one request at a time.
        quiet: dict[str, list[dict]] = {cid: [] for cid in quiet_cases}
        for rnd in range(s["rounds"]):
            shift = rnd % len(cases)
            order = cases[shift:] + cases[:shift]
            log(f"round {rnd + 1}/{s['rounds']}: {', '.join(c[0] for c in order)}")
            for cid, _, listener, args in order:
                redis_case = cid in REDIS_CASES
                before = snapshot(envoy)
                if redis_case:
                    redis0, ledger_cpu0 = ledger.commandstats(), ledger.cpu_seconds()
                cpu0 = cpu_snapshot(ours)
                res = wrk_run(wrk, s, ports[listener], s["duration"], args)
                cpu1 = cpu_snapshot(ours)
                after = wait_settled(envoy, before, listener) if redis_case else snapshot(envoy)
                completed = delta(before, after, f"http.{listener}.downstream_rq_completed")
                ok2xx = delta(before, after, f"http.{listener}.downstream_rq_2xx")
                run_ = {
                    "round": rnd + 1,
                    "requests": res["requests"],
                    "rps": res["requests"] / (res["duration_us"] / 1e6),
                    "p50_ms": res["latency_us"]["p50"] / 1000,
                    "p99_ms": res["latency_us"]["p99"] / 1000,
                    "wrk_errors": res["errors"],
                    "envoy_completed": completed,
                    "non_2xx": completed - ok2xx,
                    "cas_writes": delta(before, after, "wasmcustom.pag0.store.cas_writes"),
                    "cas_retries": delta(before, after, "wasmcustom.pag0.store.cas_retries"),
                    "cache_hits": cache_hits(after) - cache_hits(before),
                    "other_cpus": foreign_cpus(cpu0, cpu1),
                }
                extra = ""
                if redis_case:
                    cmds = commands_between(redis0, ledger.commandstats())
                    settled = delta(before, after, REDIS_SETTLED)
                    run_["redis"] = {
                        "commands": cmds,
                        "settlements": settled,
                        "unsettled": max(0, completed - settled),
                        "failures": delta(before, after, REDIS_FAILURES),
                        "unavailable": delta(before, after, REDIS_UNAVAILABLE),
                        "cpu_seconds": ledger.cpu_seconds() - ledger_cpu0,
                    }
                    n = max(1, res["requests"])
                    extra = (f"  EVALSHA/call {cmds.get('evalsha', 0) / n:.3f}  "
                             f"commands/call {sum(cmds.values()) / n:.2f}")
                runs[cid].append(run_)
                log(f"  {cid:12s} {run_['rps']:9.0f} req/s  p50 {run_['p50_ms']:.3f} ms  "
                    f"p99 {run_['p99_ms']:.3f} ms  non-2xx {run_['non_2xx']}  "
                    f"other processes {run_['other_cpus']:.2f} CPUs{extra}")
            for cid in quiet_cases:
                listener, args = next((c[2], c[3]) for c in cases if c[0] == cid)
                before = snapshot(envoy) if cid in REDIS_CASES else None
                cpu0 = cpu_snapshot(ours)
                res = wrk_run(wrk, s, ports[listener], s["duration"], args, connections=1, threads=1)
                cpu1 = cpu_snapshot(ours)
                if before is not None:
                    # Its last settlements applied before the next case's Redis counts start.
                    wait_settled(envoy, before, listener)
                quiet[cid].append({"round": rnd + 1, "rps": res["requests"] / (res["duration_us"] / 1e6),
                                   "other_cpus": foreign_cpus(cpu0, cpu1),
                                   "p50_ms": res["latency_us"]["p50"] / 1000,
                                   "p99_ms": res["latency_us"]["p99"] / 1000})
                log(f"  {cid:12s} one connection: p50 {quiet[cid][-1]['p50_ms']:.3f} ms  "
                    f"p99 {quiet[cid][-1]['p99_ms']:.3f} ms")
        stat_names = sorted(envoy.stats(r"^wasmcustom\.pag0\.store\."))
    finally:
        envoy.stop()
    return {"runs": runs, "quiet": quiet, "cas_stat_names": stat_names, "redis_idle": idle}


def summarise_cases(s: dict, runs: dict) -> dict:
    cases = {}
    for cid, label, listener, _ in CASES:
        if cid not in runs:
            continue
        rs = runs[cid]
        completed = sum(r["envoy_completed"] for r in rs)
        writes = sum(r["cas_writes"] for r in rs)
        retries = sum(r["cas_retries"] for r in rs)
        hits = sum(r["cache_hits"] for r in rs)
        cases[cid] = {
            "label": label.format(sessions=s["priced_sessions"], agents=s["priced_agents"]),
            "listener": listener,
            "rps": statistics.median(r["rps"] for r in rs),
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "envoy_completed": completed,
            "non_2xx": sum(r["non_2xx"] for r in rs),
            "wrk_errors": sum(sum(r["wrk_errors"].values()) for r in rs),
            "cas_writes": writes,
            "cas_retries": retries,
            "cas_writes_per_request": writes / completed if completed else None,
            "cas_retry_rate": retries / writes if writes else None,
            "cache_hits": hits,
            "cache_hit_ratio": hits / completed if completed else None,
            "other_cpus": statistics.median(r["other_cpus"] for r in rs),
            "other_cpus_max": max(r["other_cpus"] for r in rs),
        }
        if cid in REDIS_CASES:
            cases[cid]["redis"] = redis_totals(rs)
    return cases


def redis_totals(rs: list[dict]) -> dict:
    """A Redis ledger case's Redis use over its measured runs, per priced call wrk completed."""
    requests = sum(r["requests"] for r in rs)
    by_command: dict[str, int] = {}
    for r in rs:
        for k, v in r["redis"]["commands"].items():
            by_command[k] = by_command.get(k, 0) + v
    evalsha, commands = by_command.get("evalsha", 0), sum(by_command.values())
    per = lambda v: v / requests if requests else None  # noqa: E731
    cpu = sum(r["redis"]["cpu_seconds"] for r in rs)
    return {
        "requests": requests,
        "evalsha": evalsha,
        "commands": commands,
        "evalsha_per_call": per(evalsha),
        "commands_per_call": per(commands),
        "by_command": dict(sorted(by_command.items(), key=lambda kv: -kv[1])),
        "settlements": sum(r["redis"]["settlements"] for r in rs),
        "unsettled": sum(r["redis"]["unsettled"] for r in rs),
        "failures": sum(r["redis"]["failures"] for r in rs),
        "unavailable": sum(r["redis"]["unavailable"] for r in rs),
        "cpu_seconds": cpu,
        "cpu_us_per_call": per(cpu * 1e6),
    }


def ratios(runs: dict, cases: dict) -> list[dict]:
    out = []
    for name, num, den, target in RATIOS:
        if num not in runs or den not in runs:
            continue
        pairs = [(a, b) for a, b in zip(runs[num], runs[den]) if b["rps"]]
        per_round = [a["rps"] / b["rps"] for a, b in pairs]
        quiet = [a["rps"] / b["rps"] for a, b in pairs
                 if a["other_cpus"] < QUIET_CPUS and b["other_cpus"] < QUIET_CPUS]
        # Rounds where other processes took CPU say more about them than about pag0: judge on
        # the quiet rounds when there are any.
        value = statistics.median(quiet or per_round) if per_round else None
        out.append({
            "name": name, "numerator": num, "denominator": den,
            "value": value,
            "quiet_rounds": len(quiet),
            "all_rounds_median": statistics.median(per_round) if per_round else None,
            "of_medians": cases[num]["rps"] / cases[den]["rps"] if cases[den]["rps"] else None,
            "per_round": per_round,
            "target": target,
            "met": None if target is None else (value is not None and value >= target),
        })
    return out


def ledger_comparison(runs: dict, quiet: dict, cases: dict, rats: list[dict], idle: dict | None,
                      ledger: LedgerRedis | None) -> dict | None:
    """Case 4r (Redis ledger) next to case 4 (shared-data ledger): requests/s and their
    ratio, latency added over the do-nothing filter, Redis's work per priced call."""
    if LEDGER_CASE not in runs or ledger is None:
        return None
    pair = (LEDGER_TWIN, LEDGER_CASE)

    def added(source: dict) -> dict | None:
        """Per round, the case's percentile minus the do-nothing filter's of the same round;
        the median over rounds."""
        if LEDGER_BASE not in source:
            return None
        out = {}
        for cid in pair:
            if cid in source:
                out[cid] = {k: statistics.median(a[k] - b[k] for a, b in zip(source[cid], source[LEDGER_BASE]))
                            for k in ("p50_ms", "p99_ms")}
        return out

    ratio = next((q for q in rats if q["numerator"] == LEDGER_CASE and q["denominator"] == LEDGER_TWIN), None)
    rd = cases[LEDGER_CASE]["redis"]
    return {
        "case": LEDGER_CASE, "twin": LEDGER_TWIN, "baseline": LEDGER_BASE,
        "store": {"redis": ledger.version, "appendonly": "yes", "appendfsync": REDIS_APPENDFSYNC,
                  "tests_appendfsync": TESTS_APPENDFSYNC, "webdis_threads": WEBDIS_THREADS,
                  "timeout_ms": LEDGER_TIMEOUT_MS, "webdis_acl": str(WEBDIS_ACL.relative_to(ROOT))},
        "rps": {cid: cases[cid]["rps"] for cid in pair if cid in cases},
        "rps_ratio": ratio["value"] if ratio else None,
        "rps_ratio_quiet_rounds": ratio["quiet_rounds"] if ratio else None,
        "rps_ratio_per_round": ratio["per_round"] if ratio else None,
        "added_ms": added(runs),
        "added_ms_one_connection": added(quiet),
        "requests": rd["requests"],
        "evalsha": rd["evalsha"],
        "commands": rd["commands"],
        "evalsha_per_call": rd["evalsha_per_call"],
        "commands_per_call": rd["commands_per_call"],
        "by_command": rd["by_command"],
        "cpu_us_per_call": rd["cpu_us_per_call"],
        "unsettled": rd["unsettled"],
        "idle": idle,
        "non_2xx": {cid: cases[cid]["non_2xx"] for cid in pair if cid in cases},
    }


def ledger_lines(r: dict, brief: bool = False) -> list[str]:
    """Cases 4 and 4r side by side (RESULTS.md; `brief`: the README's block, with a one-line
    explanation)."""
    rl = r.get("redis_ledger")
    if not rl:
        return []
    s = r["settings"]
    twin, case = rl["twin"], rl["case"]
    add, add1 = rl["added_ms"] or {}, rl["added_ms_one_connection"] or {}

    def lat(d: dict, cid: str) -> str:
        v = d.get(cid)
        return "n/a" if not v else f"{v['p50_ms']:+.3f} / {v['p99_ms']:+.3f}"

    rps = rl["rps"]
    ratio = rl["rps_ratio"]
    st = rl["store"]
    L = [f"| priced route, {s['priced_sessions']} sessions x {s['priced_agents']} agents "
         "| shared-data ledger (4) | Redis ledger (4r) |", "|---|---:|---:|",
         f"| requests/s, {s['connections']} connections | {fmt_int(rps.get(twin))} | {fmt_int(rps.get(case))} |",
         f"| requests/s, Redis / shared-data (median of the rounds' ratios) | | **{fmt(ratio)}** |",
         f"| added latency p50 / p99 over the do-nothing filter (2), {s['connections']} connections, ms "
         f"| {lat(add, twin)} | {lat(add, case)} |",
         f"| added latency p50 / p99 over the do-nothing filter (2), one connection, ms "
         f"| {lat(add1, twin)} | {lat(add1, case)} |",
         f"| Redis script calls (`EVALSHA`) per priced call | - | {fmt(rl['evalsha_per_call'], 3)} |",
         f"| Redis commands per priced call (the scripts' own included) | - | {fmt(rl['commands_per_call'], 2)} |",
         f"| non-2xx | {rl['non_2xx'].get(twin, 0)} | {rl['non_2xx'].get(case, 0)} |",
         ""]
    if brief:
        return L + [
            "4r is 4 with `ledger: {store: redis}` (one Webdis round trip to reserve each priced call, "
            "settlements batched on the 20 ms tick); added latency: the case's wrk percentile minus the "
            "do-nothing filter's in the same round; Redis commands: `INFO commandstats` around 4r's runs "
            f"over the calls wrk completed, the scripts' own included. Redis {st['redis']}, `appendonly yes`, "
            f"`appendfsync {st['appendfsync']}` (the tests: `{st['tests_appendfsync']}`), behind Webdis with "
            "the ledger's ACL, on the same CPUs (bench/RESULTS.md)."]
    L += ["Case 4r is case 4 on a listener whose pag0 has `ledger: {store: redis, timeoutMs: "
         f"{st['timeout_ms']}}}`: each priced call waits for one Webdis round trip (one `EVALSHA`) to "
         "reserve before it goes upstream, and settlements go to Redis in batches on each VM's 20 ms "
         "tick. Added latency: the case's wrk percentile minus the do-nothing filter's in the same "
         f"round, median over rounds (at {s['connections']} connections mostly queueing; at one connection, one call "
         "at a time, the round trip itself). Redis commands: `INFO commandstats` read before and after "
         "4r's measured runs (its Redis serves that listener alone), divided by the calls wrk completed "
         f"in them; the scripts' own commands count, and so do the kill-log polls meanwhile. Redis "
         f"{st['redis']} with `appendonly yes`, **`appendfsync {st['appendfsync']}`** (the tests run "
         f"`{st['tests_appendfsync']}`), behind Webdis ({st['webdis_threads']} threads, the ledger's "
         f"ACL: `EVALSHA` and `SCRIPT` only), on the same {r['machine']['nproc']} CPUs as everything else"
         + (f"; Redis and Webdis used {fmt(rl['cpu_us_per_call'], 1)} µs of CPU per priced call"
            if rl.get("cpu_us_per_call") is not None else "")
         + (f"; with no calls, 4r's VMs send {fmt(rl['idle']['evalsha_per_s'], 1)} script calls a second "
            "(the kill-log poll)" if rl.get("idle") else "") + "."]
    return L


# ---------------------------------------------------------------- memory

def stream_until(envoy: Envoy, wrk_proc: subprocess.Popen, marks: list[int], what: str) -> list[dict]:
    """Polls Envoy's completed-request counter; reads RSS as each mark is passed."""
    readings = []
    counter = "http.pag0.downstream_rq_completed"
    last, last_change = -1, time.time()
    for mark in marks:
        while True:
            done = envoy.stats(r"^http\.pag0\.downstream_rq_completed$").get(counter, 0)
            if done >= mark:
                readings.append({"requests": done, "rss_kib": envoy.rss_kib()})
                log(f"  {what}: {done} requests, Envoy RSS {readings[-1]['rss_kib']} KiB")
                break
            if done != last:
                last, last_change = done, time.time()
            elif time.time() - last_change > 30:
                raise BenchError(f"{what}: stuck at {done} requests")
            if wrk_proc.poll() is not None:
                raise BenchError(f"{what}: wrk stopped early at {done} requests")
            time.sleep(0.2)
    return readings


def stop_wrk(p: subprocess.Popen) -> dict | None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        PROCS.stop(p)
        return None
    PROCS.stop(p)
    try:
        return parse_wrk(p.returncode, out, err)
    except BenchError:
        return None


def single_envoy(s: dict, envoy_bin: str, work: Path, name: str, plugin: str, upstream: int,
                 route_metadata: str, signer: int | None = None, **plugin_values) -> tuple[Envoy, int]:
    port, admin = free_port(), free_port()
    config = render("pag0-single.yaml.in", work / f"{name}.yaml", admin=admin, port=port,
                    upstream=upstream, signer=signer or free_port(), route_metadata=route_metadata,
                    pag0_wasm=PAG0_WASM,
                    pag0_config=one_line_json(BENCH / "envoy" / plugin, **plugin_values))
    return Envoy(envoy_bin, config, work, name, admin, s["concurrency"]), port


def session_memory(s: dict, envoy_bin: str, wrk: str, work: Path, upstream_port: int) -> dict:
    total, first = s["sessions"], s["sessions_first"]
    log(f"memory: {total} calls on a priced route, each from a new session")
    envoy, port = single_envoy(s, envoy_bin, work, "sessions", "sessions.json", upstream_port,
                               'price: "1", tool: bench')
    try:
        status, h, body, _ = request(port, "GET", "/x", ident("sessions-sanity"))
        if status != 200 or h.get("x-pag0-cost") != "1":
            raise BenchError(f"sessions: sanity call answered {status} {body[:200]!r}")
        rss_start = envoy.rss_kib()
        before = envoy.stats(r"^http\.pag0\.downstream_rq_(completed|2xx|5xx)$")
        p = wrk_run(wrk, s, port, 36000, {"path": "/x", "mode": "unique-session", "session": "m"},
                    background=True)
        t0 = time.time()
        try:
            readings = stream_until(envoy, p, [first + 1, total + 1], "sessions")
        finally:
            res = stop_wrk(p)
        seconds = time.time() - t0
        after = envoy.stats(r"^http\.pag0\.downstream_rq_(completed|2xx|5xx)$")
        refused = delta(before, after, "http.pag0.downstream_rq_5xx")
        completed = delta(before, after, "http.pag0.downstream_rq_completed")
        rss_first, rss_end = readings[0]["rss_kib"], readings[1]["rss_kib"]
        growth = (rss_end - rss_first) / rss_first
        return {
            "sessions": total, "first_mark": first,
            "rss_start_kib": rss_start,
            "rss_first_kib": rss_first, "requests_at_first": readings[0]["requests"],
            "rss_end_kib": rss_end, "requests_at_end": readings[1]["requests"],
            "requests": completed, "refused_503": refused,
            "non_2xx": completed - delta(before, after, "http.pag0.downstream_rq_2xx"),
            "seconds": seconds,
            "rps": res["requests"] / (res["duration_us"] / 1e6) if res else None,
            "growth": growth,
            "target": 0.10,
            "met": growth <= 0.10,
        }
    finally:
        envoy.stop()


def cache_memory(s: dict, envoy_bin: str, wrk: str, work: Path, upstream_port: int) -> dict:
    entries = s["cache_entries"]
    log(f"memory: filling a {entries}-entry cache with {s['cache_body']}-byte answers, then 4x over")
    envoy, port = single_envoy(s, envoy_bin, work, "cache-fill", "cache-fill.json", upstream_port,
                               'price: "1", tool: bench', cache_entries=entries)
    try:
        status, h, body, _ = request(port, "GET", "/big?k=sanity", ident("fill"))
        if status != 200 or len(body) != s["cache_body"]:
            raise BenchError(f"cache fill: sanity call answered {status}, {len(body)} bytes")
        rss_start = envoy.rss_kib()
        before = envoy.stats(r"^http\.pag0\.downstream_rq_(completed|2xx)$")
        p = wrk_run(wrk, s, port, 36000, {"path": "/big", "mode": "unique-query", "session": "fill"},
                    background=True)
        try:
            readings = stream_until(envoy, p, [entries + 1, 4 * entries + 1], "cache fill")
        finally:
            stop_wrk(p)
        after = envoy.stats(r"^http\.pag0\.downstream_rq_(completed|2xx)$")
        completed = delta(before, after, "http.pag0.downstream_rq_completed")
        status, h, _, _ = request(port, "GET", "/big?k=sanity-2", ident("fill"))
        status, h, _, _ = request(port, "GET", "/big?k=sanity-2", ident("fill"))
        return {
            "entries": entries, "body_bytes": s["cache_body"],
            "rss_start_kib": rss_start,
            "rss_full_kib": readings[0]["rss_kib"], "keys_at_full": readings[0]["requests"],
            "rss_end_kib": readings[1]["rss_kib"], "keys_at_end": readings[1]["requests"],
            "requests": completed,
            "non_2xx": completed - delta(before, after, "http.pag0.downstream_rq_2xx"),
            "still_caching": h.get("x-pag0-cached") == "true",
        }
    finally:
        envoy.stop()


# ---------------------------------------------------------------- x402 pay path

class Conn:
    """A keep-alive client connection that reopens when the server closes it."""

    def __init__(self, port: int):
        self.port = port
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, headers: dict, body: bytes | None = None):
        for attempt in (0, 1):
            try:
                t0 = time.perf_counter()
                self.c.request(method, path, body=body, headers=headers)
                r = self.c.getresponse()
                data = r.read()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.perf_counter() - t0
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.c.close()
                if attempt:
                    raise
        raise AssertionError

    def close(self):
        self.c.close()


class TimingShim:
    """An HTTP/1.1 keep-alive relay in front of one backend, run in this process. It
    records how long the backend took for each request (request sent to whole answer
    read), so that the backend's own time, which varies by milliseconds from call to call
    in these Python services, can be taken out of both sides of the comparison."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
           "proxy-connection", "content-length"}

    def __init__(self, backend: int):
        # (request line, arrived, sent to the backend, backend answered, answer sent back),
        # perf_counter() seconds (the same clock as the client in this process).
        self.times: list[tuple[str, float, float, float, float]] = []
        self.lock = threading.Lock()
        shim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes: without TCP_NODELAY the second waits
            # for the peer's delayed ACK (40 ms).
            disable_nagle_algorithm = True

            def log_message(self, *_args):
                pass

            def relay(self):
                arrived = time.perf_counter()
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in shim.HOP}
                for attempt in (0, 1):
                    conn = getattr(self, "backend", None)
                    if conn is None:
                        conn = self.backend = http.client.HTTPConnection("127.0.0.1", backend, timeout=30)
                    try:
                        t0 = time.perf_counter()
                        conn.request(self.command, self.path, body=body, headers=headers)
                        r = conn.getresponse()
                        data = r.read()
                        t1 = time.perf_counter()
                        break
                    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                        conn.close()
                        self.backend = None
                        if attempt:
                            raise
                self.send_response_only(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in shim.HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                departed = time.perf_counter()
                self.end_headers()
                self.wfile.write(data)
                with shim.lock:
                    shim.times.append((f"{self.command} {self.path}", arrived, t0, t1, departed))

            do_GET = do_POST = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self) -> list[tuple[str, float, float, float, float]]:
        with self.lock:
            out, self.times = self.times, []
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def x402_pay_path(s: dict, envoy_bin: str, work: Path) -> dict:
    n = s["x402_calls"]
    log(f"x402 pay path: {n} sequential calls through pag0, and {n} paid directly")
    py = run([str(ROOT / "scripts/ensure-x402-venv.sh")])
    fac, srv, sig = free_port(), free_port(), free_port()
    demo = ROOT / "demo/x402"
    procs = [
        (PROCS.start("facilitator", [py, str(demo / "facilitator.py"), "--port", str(fac)],
                     log_path=work / "facilitator.log"), fac, "facilitator"),
    ]
    wait_port(fac, procs[0][0], "facilitator")
    procs.append((PROCS.start("x402 server", [py, str(demo / "server.py"), "--port", str(srv),
                                              "--facilitator", f"http://127.0.0.1:{fac}"],
                              log_path=work / "x402-server.log"), srv, "x402 server"))
    procs.append((PROCS.start("signer", [py, str(demo / "signer.py"), "--port", str(sig)],
                              log_path=work / "signer.log",
                              env=dict(os.environ, PAG0_SIGNER_KEY="0x" + "7c" * 32)), sig, "signer"))
    envoy = None
    shims: list[TimingShim] = []
    try:
        for p, port, what in procs:
            wait_port(port, p, what)
        # Both ways reach the server and the signer through the same timing relays.
        shim_srv, shim_sig = TimingShim(srv), TimingShim(sig)
        shims = [shim_srv, shim_sig]
        envoy, port = single_envoy(s, envoy_bin, work, "x402", "x402-pay.json", shim_srv.port,
                                   'tool: weather, x402: "true"', signer=shim_sig.port)
        via = Conn(port)
        server, signer = Conn(shim_srv.port), Conn(shim_sig.port)

        def backend_calls() -> list[tuple[str, float, float, float, float]]:
            seen: list = []
            deadline = time.time() + 2
            while len(seen) < 3 and time.time() < deadline:
                # The relay's thread records a call just after answering it.
                seen += shim_srv.take() + shim_sig.take()
                if len(seen) < 3:
                    time.sleep(0.0005)
            seen.sort(key=lambda c: c[1])
            if len(seen) != 3:
                raise BenchError(f"x402: expected 3 backend calls, saw {seen}")
            return seen

        def one_through(i: int) -> tuple[float, float]:
            shim_srv.take(), shim_sig.take()
            t_start = time.perf_counter()
            status, h, body, dt = via.call("GET", "/weather", ident(f"x402-{i % 16}"))
            t_end = t_start + dt
            pay = h.get("x-pag0-payment", "")
            if status != 200 or not pay.startswith("settled"):
                raise BenchError(f"x402 through pag0: {status} {pay!r} {body[:300]!r}")
            (_, a1, s1, b1, d1), (_, a2, s2, b2, d2), (_, a3, s3, b3, d3) = backend_calls()
            # Where the time between the backends' answers goes (all in this process's clock).
            for k, v in (("to_offer", a1 - t_start), ("offer_to_signer", a2 - d1),
                         ("signer_to_paid", a3 - d2), ("paid_to_client", t_end - d3),
                         ("relays", (s1 - a1) + (d1 - b1) + (s2 - a2) + (d2 - b2) + (s3 - a3) + (d3 - b3))):
                gaps[k].append(v)
            return dt, (b1 - s1) + (b2 - s2) + (b3 - s3)

        def one_direct(i: int) -> tuple[tuple[float, float, float], float]:
            shim_srv.take(), shim_sig.take()
            status, h, body, t_offer = server.call("GET", "/weather", {})
            if status != 402 or "payment-required" not in h:
                raise BenchError(f"x402 direct: expected a 402 offer, got {status}")
            offer = json.loads(base64.b64decode(h["payment-required"]))
            sign_body = json.dumps({"x402Version": 2, "requirement": offer["accepts"][0],
                                    "resource": offer["resource"], "tenant": "bench",
                                    "session": f"x402-{i % 16}", "agent": "executor-1"}).encode()
            status, h, body, t_sign = signer.call("POST", "/sign", {"content-type": "application/json"},
                                                  sign_body)
            if status != 200:
                raise BenchError(f"x402 direct: signer answered {status} {body[:300]!r}")
            signed = json.loads(body)
            status, h, body, t_paid = server.call("GET", "/weather", {signed["header"]: signed["value"]})
            if status != 200 or "payment-response" not in h:
                raise BenchError(f"x402 direct: paid call answered {status} {body[:300]!r}")
            return (t_offer, t_sign, t_paid), sum(b - s for _, _, s, b, _ in backend_calls())

        gaps: dict[str, list[float]] = {k: [] for k in ("to_offer", "offer_to_signer", "signer_to_paid",
                                                         "paid_to_client", "relays")}
        for i in range(min(5, n)):
            one_through(i)
            one_direct(i)
        for v in gaps.values():
            v.clear()
        through, through_backend, direct, direct_backend = [], [], [], []
        legs = {"offer": [], "sign": [], "paid": []}
        for i in range(n):
            # Alternate which goes first, so both ways see the same drift.
            pair = [lambda: one_through(i), lambda: one_direct(i)]
            for f in (pair if i % 2 == 0 else pair[::-1]):
                a, b = f()
                if isinstance(a, tuple):
                    direct.append(sum(a))
                    direct_backend.append(b)
                    for k, v in zip(("offer", "sign", "paid"), a):
                        legs[k].append(v)
                else:
                    through.append(a)
                    through_backend.append(b)
        for c in (via, server, signer):
            c.close()
        ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
        over_through = [t - b for t, b in zip(through, through_backend)]
        over_direct = [t - b for t, b in zip(direct, direct_backend)]
        added_net = ms(over_through) - ms(over_direct)
        return {
            "calls": n,
            "through_pag0_ms": ms(through),
            "direct_ms": ms(direct),
            "direct_legs_ms": {k: ms(v) for k, v in legs.items()},
            "backend_through_ms": ms(through_backend),
            "backend_direct_ms": ms(direct_backend),
            "added_ms": ms(through) - ms(direct),
            "overhead_through_ms": ms(over_through),
            "overhead_direct_ms": ms(over_direct),
            "added_net_ms": added_net,
            "through_gaps_ms": {k: ms(v) for k, v in gaps.items()},
            "target_ms": 1.0,
            "met": added_net < 1.0,
        }
    finally:
        for shim in shims:
            shim.close()
        if envoy:
            envoy.stop()
        for p, _, _ in reversed(procs):
            PROCS.stop(p)


# ---------------------------------------------------------------- streamed LLM answer

SSE_UPSTREAM = BENCH / "sse_upstream.py"
STREAM_MODEL = "claude-sonnet-4-5"
STREAM_CONFIG = BENCH / "envoy/pag0-llm.json"
# Through pag0, a streamed answer's throughput over the do-nothing filter's (issue 13).
STREAM_TARGET = 0.90


def sse_upstream_module():
    """bench/sse_upstream.py, which builds the answer: imported to know what must arrive."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import sse_upstream  # noqa: E402
    return sse_upstream


def stream_request(session: str) -> bytes:
    """POST /v1/messages as an SDK sends it, with the bench's identity headers."""
    body = json.dumps({"model": STREAM_MODEL, "max_tokens": 4096, "stream": True,
                       "messages": [{"role": "user", "content": "Tell me a long story about a fox."}]},
                      separators=(",", ":")).encode()
    headers = {"host": "api.anthropic.com", "content-type": "application/json",
               "anthropic-version": "2023-06-01", "accept": "text/event-stream",
               "content-length": str(len(body)), **ident(session)}
    return (b"POST /v1/messages HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
            + b"\r\n" + body)


class StreamConn:
    """A keep-alive HTTP/1.1 client on a raw socket, for the streamed case: the time to the
    answer's first byte and to its last. Per arrival it does one recv_into() into a buffer
    allocated once and a look at the answer's last bytes, so that its own work is small
    next to the 1 MB it reads."""

    def __init__(self, port: int, size: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = bytearray(size + (1 << 20))

    def _open(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, req: bytes) -> tuple[float, float, bytes]:
        """(seconds to the first byte, seconds to the last, the raw answer)."""
        for attempt in (0, 1):
            if self.sock is None:
                self._open()
            try:
                return self._call(req)
            except (ConnectionError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError

    def _call(self, req: bytes) -> tuple[float, float, bytes]:
        buf, sock = self.buf, self.sock
        view = memoryview(buf)
        n, head, end, first, close = 0, -1, None, None, False
        t0 = time.perf_counter()
        sock.sendall(req)
        while True:
            if n == len(buf):
                raise BenchError(f"stream: an answer over {len(buf):,} bytes")
            got = sock.recv_into(view[n:])
            if not got:
                raise ConnectionResetError("the server closed the connection")
            if first is None:
                first = time.perf_counter()
            n += got
            if head < 0:
                head = buf.find(b"\r\n\r\n", 0, n)
                if head < 0:
                    continue
                h = bytes(buf[:head]).lower()
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", h)
                if m:
                    end = head + 4 + int(m.group(1))
                elif b"chunked" not in h:
                    raise BenchError(f"stream: an answer neither chunked nor sized: {h[:300]!r}")
                close = b"\r\nconnection: close" in h
            if end is not None:
                if n >= end:
                    break
            elif buf[n - 7:n] == b"\r\n0\r\n\r\n":
                break
        t1 = time.perf_counter()
        raw = bytes(view[:n])
        view.release()
        if close:
            self.close()
        return first - t0, t1 - t0, raw

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def parse_answer(raw: bytes) -> tuple[int, dict, bytes]:
    """(status, headers lowercased, body with the chunked encoding taken off)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        return status, headers, rest
    body, i = bytearray(), 0
    while True:
        eol = rest.index(b"\r\n", i)
        size = int(rest[i:eol].split(b";")[0], 16)
        if size == 0:
            return status, headers, bytes(body)
        body += rest[eol + 2:eol + 2 + size]
        i = eol + 2 + size + 2


def pct(xs: list[float], q: float) -> float:
    """The q-quantile by nearest rank (q = 0.95: the value 95 % of the samples are at or under)."""
    ys = sorted(xs)
    rank = -(-len(ys) * round(q * 100) // 100)
    return ys[max(0, min(len(ys), rank) - 1)]


def stream_case(s: dict, envoy_bin: str, work: Path) -> dict:
    """An Anthropic Messages SSE answer of about 1 MB, one call at a time on a keep-alive
    connection per path, the three paths in turn (order rotated each call): the upstream
    alone, Envoy with the do-nothing filter, Envoy with pag0 metering the call. Every answer
    is checked byte for byte, and pag0's report must show every call metered at its usage."""
    n = s["stream_calls"]
    sse = sse_upstream_module()
    _, writes, expected, events = sse.answer(s["stream_bytes"], s["stream_write"])
    # What the stream's usage costs at the price row of the plugin configuration.
    cost = sse.cost(json.loads(STREAM_CONFIG.read_text())["llm"]["prices"]["claude-sonnet-4-5*"])
    log(f"streamed LLM answer: {len(expected):,} bytes of SSE ({events:,} events, {len(writes):,} "
        f"chunks of {s['stream_write']:,} bytes), {n} calls per path, alternating")
    up_port, admin, pag0_port, noop_port = free_port(), free_port(), free_port(), free_port()
    upstream = PROCS.start("sse upstream", [sys.executable, str(SSE_UPSTREAM), "--port", str(up_port),
                                            "--bytes", str(s["stream_bytes"]), "--write", str(s["stream_write"])],
                           log_path=work / "sse-upstream.log")
    envoy = None
    conns: list[StreamConn] = []
    try:
        wait_port(up_port, upstream, "the SSE upstream")
        config = render("stream.yaml.in", work / "stream.yaml", admin=admin, upstream=up_port,
                        pag0_port=pag0_port, noop_port=noop_port, pag0_wasm=PAG0_WASM, noop_wasm=NOOP_WASM,
                        pag0_config=one_line_json(STREAM_CONFIG))
        envoy = Envoy(envoy_bin, config, work, "stream", admin, s["concurrency"])
        paths = {"upstream": up_port, "noop": noop_port, "pag0": pag0_port}
        conns = [StreamConn(port, len(expected) + 65536) for port in paths.values()]
        by_path = dict(zip(paths, conns))

        def report(session: str) -> dict:
            status, _, body, _ = request(pag0_port, "GET", f"/_pag0/v1/sessions/{session}/report",
                                         {"x-pag0-api-key": API_KEY})
            if status != 200:
                raise BenchError(f"stream: the report of {session} answered {status} {body[:300]!r}")
            return json.loads(body)

        def check_metered(session: str, calls: int) -> dict:
            """pag0 settled every call at the stream's usage: none unmetered, none at its reservation."""
            r = report(session)
            got = {"requests": r["totalRequests"], "total_cost": int(r["totalCost"]),
                   "unmetered": r["unmeteredCalls"]["count"], "reserved": int(r["reserved"]),
                   "input_tokens": r["tokens"]["input"], "output_tokens": r["tokens"]["output"]}
            want = {"requests": calls, "total_cost": calls * cost, "unmetered": 0, "reserved": 0,
                    "input_tokens": calls * sse.USAGE["input_tokens"],
                    "output_tokens": calls * sse.USAGE["output_tokens"]}
            if got != want:
                raise BenchError(f"stream: pag0 did not meter the streamed calls of {session}: "
                                 f"report {got}, want {want}")
            return got

        reserved_header: list[int] = []

        def one(path: str, session: str) -> tuple[float, float]:
            ttfb, total, raw = by_path[path].call(stream_request(session))
            status, h, body = parse_answer(raw)
            if status != 200 or body != expected:
                raise BenchError(f"stream: {path} answered {status}, {len(body):,} bytes "
                                 f"({'the same' if body == expected else 'not the'} bytes the upstream sent) "
                                 f"{h} {body[:300]!r}")
            if path == "pag0":
                # Streamed, x-pag0-cost is what was reserved; the report has the real cost.
                if not h.get("x-pag0-cost", "").isdigit() or int(h["x-pag0-cost"]) < cost:
                    raise BenchError(f"stream: pag0's answer says x-pag0-cost {h.get('x-pag0-cost')!r}")
                reserved_header.append(int(h["x-pag0-cost"]))
            return ttfb, total

        # One call first, on its own session: through pag0 the same bytes as through the
        # do-nothing filter, and metered.
        one("noop", "bench-stream-check")
        one("pag0", "bench-stream-check")
        check = check_metered("bench-stream-check", 1)
        for _ in range(2 if s["smoke"] else 20):
            for path in paths:
                one(path, "bench-stream-warm")
        times = {p: {"ttfb": [], "total": []} for p in paths}
        order = list(paths)
        cpu0 = cpu_snapshot([envoy.proc.pid, upstream.pid])
        for i in range(n):
            for path in order[i % 3:] + order[:i % 3]:
                ttfb, total = one(path, "bench-stream")
                times[path]["ttfb"].append(ttfb)
                times[path]["total"].append(total)
        cpu1 = cpu_snapshot([envoy.proc.pid, upstream.pid])
        measured = check_metered("bench-stream", n)
    finally:
        for c in conns:
            c.close()
        if envoy:
            envoy.stop()
        PROCS.stop(upstream)
    mb = len(expected) / 1e6
    legs = {}
    for path, t in times.items():
        legs[path] = {"ttfb_ms_p50": statistics.median(t["ttfb"]) * 1000, "ttfb_ms_p95": pct(t["ttfb"], 0.95) * 1000,
                      "total_ms_p50": statistics.median(t["total"]) * 1000, "total_ms_p95": pct(t["total"], 0.95) * 1000,
                      "mb_per_s": mb / statistics.median(t["total"])}
    pag0, noop = times["pag0"]["total"], times["noop"]["total"]
    # Each call through pag0 next to the call through the do-nothing filter of the same turn.
    per_pair = [b / a for a, b in zip(pag0, noop)]
    added = statistics.median(a - b for a, b in zip(pag0, noop))
    ratio = statistics.median(per_pair)
    return {
        "calls": n, "bytes": len(expected), "events": events, "content_deltas": events - 6,
        "chunks": len(writes), "write_bytes": s["stream_write"], "model": STREAM_MODEL,
        "legs": legs,
        "ratio": ratio,
        "ratio_of_medians": legs["pag0"]["mb_per_s"] / legs["noop"]["mb_per_s"],
        "per_pair_ratios": [round(x, 4) for x in per_pair],
        "added_ms": added * 1000,
        "per_chunk_us": added / len(writes) * 1e6,
        "per_event_us": added / events * 1e6,
        "upstream_over_noop": legs["upstream"]["mb_per_s"] / legs["noop"]["mb_per_s"],
        "cost_per_call": cost, "reserved_per_call": statistics.median(reserved_header),
        "check": check, "report": measured,
        "other_cpus": foreign_cpus(cpu0, cpu1),
        "target": STREAM_TARGET, "met": ratio >= STREAM_TARGET,
        "total_ms": {p: [round(x * 1000, 3) for x in t["total"]] for p, t in times.items()},
    }


def stream_lines(st: dict) -> list[str]:
    """The streamed case's table (RESULTS.md and the README's block)."""
    names = {"upstream": "the upstream alone (bench/sse_upstream.py)",
             "noop": "Envoy + do-nothing wasm filter", "pag0": "Envoy + pag0, metered (`meter: anthropic`)"}
    L = ["| path | TTFB p50 ms | TTFB p95 ms | whole answer p50 ms | p95 ms | MB/s |",
         "|---|---:|---:|---:|---:|---:|"]
    for path, leg in st["legs"].items():
        L.append(f"| {names[path]} | {fmt(leg['ttfb_ms_p50'])} | {fmt(leg['ttfb_ms_p95'])} | "
                 f"{fmt(leg['total_ms_p50'])} | {fmt(leg['total_ms_p95'])} | {fmt(leg['mb_per_s'], 1)} |")
    L += ["", f"Throughput pag0 / do-nothing filter: **{fmt(st['ratio'])}** (goal >= {st['target']:.2f}: "
          f"{yes(st['met'])}); metering adds {fmt(st['added_ms'])} ms per answer, "
          f"**{fmt(st['per_chunk_us'], 2)} µs wall-clock per {st['write_bytes']:,}-byte chunk** "
          f"({st['chunks']:,} chunks; {fmt(st['per_event_us'], 3)} µs per SSE event, {st['events']:,} events)."]
    return L


# ---------------------------------------------------------------- host calls

def host_calls() -> dict | None:
    """Per request: the host calls pag0 makes and the bytes it moves, case by case
    (bench/hostcalls.mjs: the module in Node's V8 behind a counting proxy-wasm host).
    Exact counts, unlike timings: they change only when pag0's code does."""
    node = shutil.which("node")
    if not node:
        log("node not found: host-call counts skipped")
        return None
    log("counting pag0's host calls per request (bench/hostcalls.mjs)")
    try:
        out = run([node, str(BENCH / "hostcalls.mjs"), f"--wasm={PAG0_WASM}", f"--noop={NOOP_WASM}", "--n=2000"])
    except subprocess.CalledProcessError as e:
        # The counting host checks that each case really is what it claims (charged, hit).
        raise BenchError(f"bench/hostcalls.mjs failed:\n{e.stderr[-2000:]}")
    rows = {}
    for c in json.loads(out)["results"]:
        calls = c["host_calls"]
        rows[c["case"]] = {
            "host_calls": c["host_calls_per_request"],
            "shared_data_reads": calls.get("proxy_get_shared_data", 0),
            "shared_data_writes": calls.get("proxy_set_shared_data", 0),
            "shared_data_bytes_read": c["shared_data_bytes_read_per_request"],
            "properties_read": calls.get("proxy_get_property", 0),
            "properties_written": calls.get("proxy_set_property", 0),
            "header_calls": sum(v for k, v in calls.items() if "header_map" in k),
            "metric_calls": sum(v for k, v in calls.items() if "metric" in k),
            "clock_reads": calls.get("proxy_get_current_time_nanoseconds", 0),
            "bytes_into_wasm": c["bytes_into_wasm_per_request"],
            "by_call": calls,
        }
    return rows


# ---------------------------------------------------------------- instructions

def callgrind_counts(s: dict, envoy_bin: str, work: Path) -> tuple[dict, dict]:
    """Instructions per request under callgrind (bench/callgrind.py's measurement, repeatable
    where timings are not): ({key: instructions added over the do-nothing filter}, the raw
    per-case counts)."""
    # bench/callgrind.py imports this script as `run`: let it find this very module (and
    # its process list) rather than load a second copy.
    sys.modules.setdefault("run", sys.modules[__name__])
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import callgrind  # noqa: E402

    n = s["callgrind"]
    summary = callgrind.measure(n, envoy_bin, work / "callgrind")
    per = {cid: c["per_request"] for cid, c in summary["cases"].items()}
    added = {key: round(per[case] - per[base]) for key, case, base, _ in CALLGRIND_ADDED}
    raw = {"requests_per_case": n,
           "per_request": {cid: round(v) for cid, v in per.items()},
           "by_object_per_request": {cid: {k: round(v) for k, v in c["by_object_per_request"].items()}
                                     for cid, c in summary["cases"].items()},
           # Timers run whether or not requests come (pag0's 20 ms tick in each of its VMs,
           # Envoy's own): each case's count includes them for as long as it ran under
           # callgrind, tens of times longer than without it.
           "seconds": {cid: round(c["seconds"], 3) for cid, c in summary["cases"].items()},
           "idle_per_second": round(summary["idle_per_second"]),
           "timers_per_request": {cid: round(summary["idle_per_second"] * c["seconds"] / n)
                                  for cid, c in summary["cases"].items()},
           "goals_added": {key: goal for key, _, _, goal in CALLGRIND_ADDED if goal is not None}}
    log("callgrind, instructions added per request over the do-nothing filter: "
        + ", ".join(f"{k} {v:,}" for k, v in added.items()))
    return added, raw


# ---------------------------------------------------------------- report

def fmt_int(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def yes(met) -> str:
    return "n/a" if met is None else ("**yes**" if met else "**no**")


def reproduce_command(s: dict) -> str:
    envs = [f"{k}={v}" for k, v in sorted(os.environ.items())
            if k.startswith("BENCH_") and k not in ("BENCH_OUT", "BENCH_README")]
    return " ".join(envs + ["make bench-smoke" if s["smoke"] else "make bench"])


CALLGRIND_ROWS = [  # (label, pag0's key, the floor's key, baseline case)
    ("free route (3, 3f)", "free", "floor_free", "2"),
    ("priced route (4, 4f)", "priced", "floor_priced", "2"),
    ("cache hit (6c, 6d)", "cache_hit", "floor_hit", "6b"),
]


def callgrind_table(r: dict) -> list[str]:
    """Instructions pag0 and the floor filter add per request over the do-nothing filter."""
    cg = r.get("callgrind")
    if not cg:
        return []
    goals = {key: goal for key, _, _, goal in CALLGRIND_ADDED}
    L = ["| instructions added per request over the do-nothing filter | pag0 | cheapest possible "
         "firewall | pag0 / floor | goal (pag0) | met |", "|---|---:|---:|---:|---:|---|"]
    for label, ours, floor, base in CALLGRIND_ROWS:
        goal = goals[ours]
        times = f"{cg[ours] / cg[floor]:.1f}x" if cg[floor] > 0 else "n/a"
        L.append(f"| {label}, over {base} | {cg[ours]:,} | {cg[floor]:,} | {times} | "
                 f"<= {goal:,} | {yes(cg[ours] <= goal)} |")
    raw = r["callgrind_raw"]
    per = raw["per_request"]
    L += ["", f"Counted by callgrind in the Envoy under test (`--concurrency 1`, {raw['requests_per_case']:,} "
          f"requests per case, one at a time, after {3 * raw['requests_per_case']:,} to warm up); "
          f"repeatable where timings are not, but for the timers that ran meanwhile (bench/RESULTS.md). The baselines: {per['proxy_noop']:,} instructions per proxied "
          f"request with the do-nothing filter (2), {per['direct_noop']:,} per `direct_response` with it (6b)."]
    return L


def summary_tables(r: dict) -> str:
    """The tables README.md quotes."""
    s, m = r["settings"], r["machine"]
    lines = [
        f"Measured {m['date']} on {m['nproc']} CPUs ({m['cpu']}), Envoy {m['envoy']}, "
        f"commit {m['commit']}; wrk {s['threads']} threads, {s['connections']} connections, "
        f"{s['rounds']} rounds x {s['duration']} s per case, Envoy `--concurrency {s['concurrency']}`; "
        "medians over rounds. Reproduce: `" + r["command"] + "`.",
        "",
        "| case | requests/s | p50 ms | p99 ms | non-2xx |",
        "|---|---:|---:|---:|---:|",
    ]
    for cid, c in r["cases"].items():
        lines.append(f"| {c['label']} | {fmt_int(c['rps'])} | {fmt(c['p50_ms'])} | "
                     f"{fmt(c['p99_ms'])} | {c['non_2xx']} |")
    lines += ["", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in r["targets"]:
        lines.append(f"| {t['name']} | {t['measured']} | {t['goal']} | {yes(t['met'])} |")
    ll = ledger_lines(r, brief=True)
    if ll:
        lines += ["", "Priced calls with pag0's ledger in Redis (issue 14) next to the shared-data ledger, "
                  "in the same rounds:", ""] + ll
    st = r.get("stream")
    if st:
        lines += ["", f"Streamed LLM answer: an Anthropic Messages SSE answer of {st['bytes']:,} bytes "
                  f"({st['content_deltas']:,} `content_block_delta` events) from a fast upstream in "
                  f"{st['write_bytes']:,}-byte chunks, {st['calls']} calls per path, one at a time, "
                  "alternating; medians:", ""] + stream_lines(st)
    cg = callgrind_table(r)
    if cg:
        lines += ["", "Instructions per request (callgrind):", ""] + cg
    return "\n".join(lines)


def targets(r: dict) -> list[dict]:
    out = []
    for q in r["ratios"]:
        rounds = (f"{q['quiet_rounds']} quiet rounds" if q["quiet_rounds"]
                  else f"all {len(q['per_round'])} rounds, none quiet")
        out.append({"name": q["name"], "measured": f"{fmt(q['value'], 3)} ({rounds})",
                    "goal": "reference" if q["target"] is None else f">= {q['target']:.2f}",
                    "met": q["met"]})
    hit = r["one_connection"]["cache_hit"]
    out.append({"name": "cache hit p99, one connection", "measured": f"{fmt(hit['p99_ms'])} ms",
                "goal": "< 2 ms", "met": hit["p99_ms"] < 2.0})
    x = r.get("x402")
    out.append({"name": "x402 pay path, added over signer + upstream",
                "measured": f"{fmt(x['added_net_ms'], 3)} ms" if x else "skipped", "goal": "< 1 ms",
                "met": x["met"] if x else None})
    st = r.get("stream")
    out.append({"name": "streamed LLM answer (~1 MB SSE), throughput pag0 metering / do-nothing filter",
                "measured": f"{fmt(st['ratio'], 3)} ({st['calls']} pairs)" if st else "skipped",
                "goal": f">= {STREAM_TARGET:.2f}", "met": st["met"] if st else None})
    w = r["wasm"]
    out.append({"name": "pag0.wasm size", "measured": f"{w['pag0_bytes']:,} B",
                "goal": f"<= {WASM_SIZE_TARGET:,} B", "met": w["pag0_bytes"] <= WASM_SIZE_TARGET})
    sm = r.get("session_memory")
    out.append({"name": (f"Envoy RSS growth, {sm['first_mark']:,} -> {sm['sessions']:,} sessions"
                         if sm else "Envoy RSS growth over the session stream"),
                "measured": f"{sm['growth'] * 100:+.1f} %" if sm else "skipped",
                "goal": "<= +10 %", "met": sm["met"] if sm else None})
    return out


HISTORY = BENCH / "history.jsonl"
HISTORY_CASES = ["free", "priced", "hot", "cache_hit"]


def history_row(r: dict) -> dict:
    """The headline figures of one full run, kept to show before/after across runs."""
    ratio = {t["name"]: t["measured"] for t in r.get("targets", [])}
    calls = r.get("host_calls") or {}
    return {"commit": r["machine"]["commit"], "date": r["machine"]["date"],
            "rps": {cid: (r["cases"].get(cid) or {}).get("rps") for cid in
                    ["proxy_noop", "free", "priced", "priced_redis", "hot", "direct_noop", "cache_hit"]},
            "ratios": ratio,
            "host_calls": {cid: (calls.get(cid) or {}).get("host_calls") for cid in HISTORY_CASES},
            "callgrind": r.get("callgrind"),
            "wasm_bytes": r["wasm"]["pag0_bytes"]}


def remember_previous(out: Path) -> list[dict]:
    """Adds the run about to be replaced (bench/results.json) to bench/history.jsonl."""
    rows = [json.loads(line) for line in HISTORY.read_text().splitlines() if line.strip()] \
        if HISTORY.exists() else []
    previous = out / "results.json"
    if previous.exists():
        try:
            row = history_row(json.loads(previous.read_text()))
        except (ValueError, KeyError, TypeError):
            row = None
        if row and not any(x["commit"] == row["commit"] and x["date"] == row["date"] for x in rows):
            rows.append(row)
            HISTORY.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return rows


def history_md(rows: list[dict], current: dict) -> list[str]:
    if not rows:
        return []
    names = ["free / proxy+wasm (3/2)", "priced / proxy+wasm (4/2)", "one hot session / proxy+wasm (5/2)",
             "cache hit / direct_response+wasm (6c/6b)"]
    L = ["## Before and after", "",
         "Earlier full runs of this script (bench/history.jsonl; each `make bench` adds the run it "
         "replaces), then this one: what changes to the hot path did. Ratios from different runs "
         "were measured on a shared machine at different times; host calls per request are exact.", "",
         "| run | commit | 3/2 | 4/2 | 5/2 | 6c/6b | host calls free / priced / hot / hit "
         "| instructions added free / priced / hit | .wasm bytes |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in [(x["date"], x) for x in rows] + [("this run", current)]:
        hc = " / ".join(str(row["host_calls"].get(c)) for c in HISTORY_CASES)
        ratios = " | ".join(str(row["ratios"].get(n, "")).split(" (")[0] for n in names)
        cg = row.get("callgrind") or {}
        ins = " / ".join(fmt_int(cg.get(c)) for c in ("free", "priced", "cache_hit")) if cg else ""
        L.append(f"| {label} | {row['commit']} | {ratios} | {hc} | {ins} | {fmt_int(row['wasm_bytes'])} |")
    return L + [""]


def results_md(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    L = [
        "# pag0 benchmark results",
        "",
        "Written by `bench/run.py` (`make bench`); every figure below comes from that run. "
        "Do not edit by hand: run it again.",
        "",
        "| | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| machine | {m['nproc']} CPUs (`nproc`), {m['cpu']}, {fmt_int((m['memory_kib'] or 0) / 1024)} MiB, "
        f"Linux {m['kernel']} |",
        f"| Envoy | {m['envoy']} (`{m['envoy_bin']}`) |",
        f"| commit | {m['commit']} |",
        f"| load | {m['wrk']}: {s['threads']} threads, {s['connections']} connections, {s['rounds']} rounds "
        f"x {s['duration']} s per case (cases interleaved, order rotated each round), "
        f"{s['warmup']} s warm-up per case |",
        f"| Envoy | `--concurrency {s['concurrency']}`, one process for all side-by-side cases "
        f"(one listener each), upstream: a second Envoy answering {s['body_bytes']} bytes "
        "with `direct_response` |",
        f"| reproduce | `{r['command']}` |",
        "",
        "## Requests per second and latency",
        "",
        "Medians over the rounds (latency percentiles as wrk measures them, per run, then the median).",
        "Non-2xx counts every answer Envoy gave in the measured runs that was not a 2xx.",
        "",
        "| case | requests/s | p50 ms | p99 ms | non-2xx | requests | other processes, CPUs (median / max) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cid, c in r["cases"].items():
        L.append(f"| {c['label']} | {fmt_int(c['rps'])} | {fmt(c['p50_ms'])} | {fmt(c['p99_ms'])} | "
                 f"{c['non_2xx']} | {c['envoy_completed']:,} | {c['other_cpus']:.2f} / {c['other_cpus_max']:.2f} |")
    L += ["", f"The same {s['rounds']} rounds, at one connection (one request at a time: latency "
          "without queueing; the runs above keep both CPUs saturated, so their latency is mostly "
          "waiting in line):", "",
          "| case | requests/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for cid, q in r["one_connection"].items():
        L.append(f"| {r['cases'][cid]['label']} | {fmt_int(q['rps'])} | {fmt(q['p50_ms'])} | {fmt(q['p99_ms'])} |")
    L += ["", "## Targets (issues 6 and 12)", "",
          "Ratios are the median of the per-round ratios (both cases of a round ran within seconds "
          f"of each other), over the quiet rounds: those where other processes on the machine used "
          f"less than {QUIET_CPUS} CPUs during both runs (measured from /proc: all CPU time minus this "
          "run's Envoys, wrk and driver). Every round's ratio and the ratio of the medians above are "
          "in `results.json`.", "",
          "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in r["targets"]:
        L.append(f"| {t['name']} | {t['measured']} | {t['goal']} | {yes(t['met'])} |")
    L += ["", "The goals are issue 12's. The rows marked *reference* have none: the floor filter's "
          "own ratios (3f, 4f, 6d: the cheapest possible priced firewall, bench/floor-filter) show "
          "what any filter that reserves and settles a price per call in shared data costs on this "
          "machine, and pag0 / floor how far pag0's throughput is from that."]
    L += ["", "## Priced calls with the Redis ledger (issue 14)", ""]
    ll = ledger_lines(r)
    if ll:
        rl = r["redis_ledger"]
        L += ll + ["", "Redis commands over 4r's measured runs, by command (`INFO commandstats`; "
                   f"{rl['requests']:,} priced calls completed by wrk"
                   + (f"; {rl['unsettled']:,} calls not yet settled when counted" if rl["unsettled"] else "")
                   + "):", "",
                   "| command | calls | per priced call |", "|---|---:|---:|"]
        for cmd, n in rl["by_command"].items():
            L.append(f"| `{cmd}` | {n:,} | {fmt(n / rl['requests'] if rl['requests'] else None, 3)} |")
        idle = rl.get("idle")
        if idle:
            L += ["", f"With no calls on 4r's listener ({fmt(idle['seconds'], 1)} s before the rounds), Redis "
                  f"ran {fmt(idle['commands_per_s'], 1)} commands a second, {fmt(idle['evalsha_per_s'], 1)} "
                  "of them script calls: each of the listener's VMs polls the kill log every 200 ms."]
    else:
        L += ["Skipped (`BENCH_REDIS=0`)."]
    L += ["", "## Instructions per request (callgrind)", ""]
    cg = callgrind_table(r)
    if cg:
        raw = r["callgrind_raw"]
        L += cg + ["", "Per case, where the instructions ran (the Envoy binary: the host side of every "
                   "proxy-wasm call, HTTP, routing; code V8 generated at run time: the wasm filters "
                   "and V8's trampolines; shared libraries: libc's memcpy, malloc):", "",
                   "| case | instructions per request | Envoy | V8-generated | libraries "
                   "| of which timers (idle rate x time) |",
                   "|---|---:|---:|---:|---:|---:|"]
        labels = {cid: label.split(", {sessions}")[0] for cid, label, _, _ in CASES}
        for cid, total in raw["per_request"].items():
            objs = raw["by_object_per_request"].get(cid, {})
            envoy = objs.get("envoy", 0)
            gen = sum(v for k, v in objs.items() if k.startswith("generated"))
            L.append(f"| {labels.get(cid, cid)} | {total:,} | {envoy:,} | {gen:,} | "
                     f"{total - envoy - gen:,} | {raw['timers_per_request'][cid]:,} |")
        L += ["", f"Every count includes what Envoy's timers ran while the case ran: pag0's 20 ms tick "
              f"in each of its VMs and Envoy's own, {raw['idle_per_second']:,} instructions a second "
              "with no request at all. Under callgrind a request takes tens of times longer than "
              "without it, so this part is inflated, and grows when other processes slow the run: "
              "the last column is the idle rate times the case's duration (an overestimate when other "
              "processes slowed the run: a timer that falls due while Envoy waits for a CPU runs once). "
              "Under callgrind, cases 4 and 4f send sessions `bench-many-0` to `-999` in turn, the "
              "agent changing every 1000 calls (as `python3 bench/callgrind.py` does)."]
    else:
        L += ["Skipped (`BENCH_CALLGRIND=0`)."]
    hit = r["cases"]["cache_hit"]
    L += ["", "## Shared-data compare-and-swap", "",
          "From Envoy's counters `wasmcustom.pag0.store.cas_writes` and `wasmcustom.pag0.store.cas_retries` "
          "(a retry is a write that lost to another worker and read again), over the measured runs.", "",
          "| case | CAS writes | writes per request | retries | retry rate |", "|---|---:|---:|---:|---:|"]
    for cid in ("free", "free_new", "priced", "priced_redis", "hot", "cache_hit"):
        c = r["cases"].get(cid)
        if not c:
            continue
        rate = "n/a" if c["cas_retry_rate"] is None else f"{c['cas_retry_rate'] * 100:.2f} %"
        L.append(f"| {c['label']} | {c['cas_writes']:,} | {fmt(c['cas_writes_per_request'], 2)} | "
                 f"{c['cas_retries']:,} | {rate} |")
    if not r["cas_stat_names"]:
        L += ["", "(The CAS counters were not in Envoy's `/stats`: this build of pag0 does not define them.)"]
    L += ["", f"Cache hits: {hit['cache_hits']:,} of {hit['envoy_completed']:,} requests in case 6c "
          f"({fmt((hit['cache_hit_ratio'] or 0) * 100, 2)} %, from pag0's `cache_hits` counters).", ""]
    L += ["## Memory", ""]
    sm = r.get("session_memory")
    if sm:
        L += [f"A fresh Envoy with pag0 (`maxSessions` 16384, `idleTimeoutSeconds` 1, "
              f"bench/envoy/sessions.json); wrk sends calls to a priced route, each from a new session id, "
              f"at {fmt_int(sm['rps'])} requests/s. Resident memory (`VmRSS`):", "",
              "| point | requests | Envoy RSS KiB |", "|---|---:|---:|",
              f"| started | 1 | {sm['rss_start_kib']:,} |",
              f"| after {sm['first_mark']:,} sessions | {sm['requests_at_first']:,} | {sm['rss_first_kib']:,} |",
              f"| after {sm['sessions']:,} sessions | {sm['requests_at_end']:,} | {sm['rss_end_kib']:,} |",
              "",
              f"Growth {sm['growth'] * 100:+.1f} % ({'within' if sm['met'] else 'above'} the 10 % target); "
              f"{sm['refused_503']:,} calls refused 503 (full session table), {sm['non_2xx']:,} non-2xx in all.",
              ""]
    else:
        L += ["Session stream skipped (`BENCH_SESSIONS=0`).", ""]
    cm = r["cache_memory"]
    L += [f"Cache: a fresh Envoy with pag0's cache at {cm['entries']:,} entries (bench/envoy/cache-fill.json), "
          f"filled with distinct keys whose answers are {cm['body_bytes']:,} bytes:", "",
          "| point | keys | Envoy RSS KiB |", "|---|---:|---:|",
          f"| started | 1 | {cm['rss_start_kib']:,} |",
          f"| cache full | {cm['keys_at_full']:,} | {cm['rss_full_kib']:,} |",
          f"| 4x the entries | {cm['keys_at_end']:,} | {cm['rss_end_kib']:,} |", "",
          f"{cm['non_2xx']:,} non-2xx; after the fill a repeated key was "
          f"{'served from the cache' if cm['still_caching'] else 'NOT served from the cache'}.", ""]
    hc = r.get("host_calls")
    if hc:
        L += ["## Inside pag0, per request", "",
              "Host calls pag0 makes per request (each crosses from wasm into Envoy; the ones that "
              "return data also call back into the module to allocate), counted by `bench/hostcalls.mjs` "
              "(the same `.wasm` in Node's V8 behind a counting proxy-wasm host that plays each case's "
              "callbacks). These are exact and change only with pag0's code: compare them before and "
              "after a change to the hot path.", "",
              "| case | host calls | shared-data reads / writes | bytes read from shared data | "
              "properties read / written | header-map calls | metric calls | clock reads |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        labels = {cid: label for cid, label, _, _ in CASES}
        labels["noop"] = "do-nothing filter"
        for cid, h in hc.items():
            label = labels.get(cid, cid).format(sessions=1000, agents=8)  # hostcalls.mjs's case 4
            L.append(f"| {label} | {h['host_calls']:g} | {h['shared_data_reads']:g} / {h['shared_data_writes']:g} | "
                     f"{h['shared_data_bytes_read']:,} | {h['properties_read']:g} / {h['properties_written']:g} | "
                     f"{h['header_calls']:g} | {h['metric_calls']:g} | {h['clock_reads']:g} |")
        L += [""]
    w = r["wasm"]
    L += ["## Module size", "",
          f"`target/wasm32-wasip1/release/pag0.wasm`: {w['pag0_bytes']:,} bytes (target {WASM_SIZE_TARGET:,}); "
          f"the do-nothing filter: {w['noop_bytes']:,} bytes; the floor filter: {w['floor_bytes']:,} bytes.", ""]
    L += ["## x402 pay path", ""]
    x = r.get("x402")
    if x:
        legs = x["direct_legs_ms"]
        L += [f"Sequential calls (one at a time, keep-alive), {x['calls']} each way, alternating. "
              "Through pag0: `GET /weather` to Envoy with pag0 in pay mode; pag0 gets the 402, asks the "
              "reference signer, retries with the payment, and the official x402 middleware verifies and "
              "settles with the local facilitator. Directly: the client makes the same three calls "
              "itself (offer, signer, paid call). Both ways reach the server and the signer through "
              "the same in-process timing relays, which record each backend's own time: the paid call "
              "takes about a hundred milliseconds in these Python services and varies by several "
              "from call to call, so the comparison that decides the target takes each call's "
              "backend time out first (what is left is loopback, relays and, through pag0, Envoy "
              "and pag0).", "",
              "| | median ms |", "|---|---:|",
              f"| through pag0, one paid call | {fmt(x['through_pag0_ms'], 2)} |",
              f"| directly: 402 offer | {fmt(legs['offer'], 2)} |",
              f"| directly: signer | {fmt(legs['sign'], 2)} |",
              f"| directly: paid call | {fmt(legs['paid'], 2)} |",
              f"| directly: the three | {fmt(x['direct_ms'], 2)} |",
              f"| difference of the two medians above (backend noise included) | {fmt(x['added_ms'], 2)} |",
              f"| through pag0 minus its backend time | {fmt(x['overhead_through_ms'], 3)} |",
              f"| directly minus its backend time | {fmt(x['overhead_direct_ms'], 3)} |",
              f"| **added by the pay path through pag0** (difference of the two above) "
              f"| **{fmt(x['added_net_ms'], 3)}** |", "",
              "Where the time outside the backends goes on the way through pag0 (medians; the relays' "
              "own time is listed apart):", "",
              "| stretch | median ms |", "|---|---:|",
              f"| client sends -> the offer request reaches the server's relay (Envoy, pag0 on the request) "
              f"| {fmt(x['through_gaps_ms']['to_offer'], 3)} |",
              f"| the 402 leaves the relay -> the signer request reaches its relay (pag0 reads the offer, "
              f"reserves, asks the signer) | {fmt(x['through_gaps_ms']['offer_to_signer'], 3)} |",
              f"| the signature leaves the relay -> the paid retry reaches the server's relay (back "
              f"through the listener, `signer.loopbackCluster`) "
              f"| {fmt(x['through_gaps_ms']['signer_to_paid'], 3)} |",
              f"| the paid answer leaves the relay -> the client has it (pag0 settles and answers) "
              f"| {fmt(x['through_gaps_ms']['paid_to_client'], 3)} |",
              f"| the relays themselves (3 calls) | {fmt(x['through_gaps_ms']['relays'], 3)} |", ""]
    else:
        L += ["Skipped (`BENCH_X402_CALLS=0`).", ""]
    L += stream_md(r.get("stream"))
    L += ["## Notes", "",
          "- The machine is shared and the load generator, the upstream Envoy and the Envoy under test "
          "share its CPUs: compare figures of one run with each other (the ratios), not across runs.",
          "- Cases 3-5 use bench/envoy/pag0.json (one tenant with an API key, so every call also hashes "
          "its key; session, agent, daily and monthly budgets large enough never to refuse; cache off). "
          "Case 3's session made one priced call before the runs, as an agent's session would have; "
          "case 3b's session never paid, so pag0 has no record of it. "
          "Case 4 cycles through every session x agent pair; case 5 sends every call as one session "
          "and one agent. Case 4r is case 4 on a listener of its own whose pag0 (a VM of its own, the "
          "same plugin configuration) keeps its ledger in Redis (bench/envoy/ledger-listener.yaml.in); "
          "Redis, fresh for each run, keeps what every round charged. Case 6c uses bench/envoy/pag0-cache.json (cache on, scope session): one key, "
          "warmed before the runs, so every measured call is a hit.",
          "- Cases 3f, 4f and 6d run the floor filter (bench/floor-filter, its own VM): one "
          "request-header map read, the route's `floor` metadata in one property call, a shared-data "
          "read and compare-and-swap to reserve and another to settle (priced route), one response "
          "header; a hit answers a 1 KiB shared-data entry. No policy, reports, identity checks or "
          "header removal: the floor under any priced firewall in proxy-wasm, not a competitor.",
          "- Every case sends the same identity headers, and wrk builds every request in its Lua "
          "`request()` (bench/wrk/bench.lua), so the load generator's work is the same for all.",
          ""]
    return "\n".join(L)


def stream_md(st: dict | None) -> list[str]:
    L = ["## Streamed LLM answer (token-metered route)", ""]
    if not st:
        return L + ["Skipped (`BENCH_STREAM_CALLS=0`).", ""]
    up, noop = st["legs"]["upstream"], st["legs"]["noop"]
    L += [f"`POST /v1/messages` (`{st['model']}`, `max_tokens` 4096, `stream: true`, the bench's identity "
          f"headers) answered by `bench/sse_upstream.py`: the Anthropic Messages wire format, "
          f"{st['bytes']:,} bytes in {st['events']:,} events (`message_start` with the input usage, "
          f"{st['content_deltas']:,} `content_block_delta` events of 100-200 bytes, `message_delta` with "
          f"the output usage at the end), pre-built, written in {st['chunks']:,} chunks of "
          f"{st['write_bytes']:,} bytes (HTTP/1.1 chunked, one write each, events cut at any byte). "
          "One Envoy (bench/envoy/stream.yaml.in), two listeners with the same route: pag0 metering "
          "it (`meter: anthropic`, bench/envoy/pag0-llm.json: the claude-sonnet-4-5* price row) and the "
          "do-nothing filter. A Python client on a raw keep-alive socket per path makes the calls one at "
          f"a time, {st['calls']} per path, the three paths in turn (order rotated each call), after a "
          "warm-up. TTFB: the request sent -> the first byte of the answer; whole answer: -> its last "
          "byte. MB = 10^6 bytes.", ""]
    L += stream_lines(st)
    L += ["", f"The ratio is the median over the {st['calls']} pairs (the calls through pag0 and "
          f"through the do-nothing filter of the same turn) of the do-nothing call's time over pag0's "
          f"(the ratio of the medians above: {fmt(st['ratio_of_medians'])}). The added time is the median "
          "of the pairs' differences, wall-clock (the client's clock, not CPU time), divided by the chunks "
          "the upstream wrote, and by the SSE events. Envoy reads a fast upstream in large reads (up to "
          "128 KiB each; Envoy's trace log shows about ten for this answer), so pag0 sees fewer, larger body chunks than the "
          "upstream wrote, and Envoy sends the answer's headers with the first read's data: TTFB through "
          "Envoy includes what the filter does with that first read. "
          f"The upstream alone serves the answer {fmt(st['upstream_over_noop'], 1)}x as fast as it arrives "
          f"through Envoy with the do-nothing filter ({fmt(up['mb_per_s'], 1)} vs {fmt(noop['mb_per_s'], 1)} "
          "MB/s)" + (": it is not what limits the two Envoy paths" if st["upstream_over_noop"] >= 1.5 else
                     ": too close to say it never limits the two Envoy paths") +
          f". Other processes used {st['other_cpus']:.2f} CPUs meanwhile.", "",
          f"Checked: every answer on every path arrived whole, byte for byte what the upstream sent; "
          f"pag0's session report shows all {st['report']['requests']} measured calls metered at the "
          f"stream's usage ({st['report']['input_tokens']:,} input and {st['report']['output_tokens']:,} "
          f"output tokens, {st['report']['total_cost']:,} charged, {st['cost_per_call']:,} a call, none "
          f"unmetered, nothing left reserved; each answer's `x-pag0-cost` said "
          f"{st['reserved_per_call']:,.0f}, the reservation, as a streamed answer's does).", ""]
    return L


def update_readme(r: dict) -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in text or end not in text:
        log("README.md has no bench markers; left as it is")
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + "\n" + summary_tables(r) + "\n" + end + tail)
    log("README.md: benchmark block rewritten")


def stream_problems(st: dict | None) -> list[str]:
    """The streamed case's figures are there (that it was metered, stream_case checked)."""
    if not isinstance(st, dict):
        return [f"stream = {st!r}"]
    problems = []
    for path in ("upstream", "noop", "pag0"):
        for k in ("ttfb_ms_p50", "ttfb_ms_p95", "total_ms_p50", "total_ms_p95", "mb_per_s"):
            v = (st.get("legs") or {}).get(path, {}).get(k)
            if not isinstance(v, (int, float)) or not v > 0:
                problems.append(f"stream.legs.{path}.{k} = {v!r}")
    for k in ("ratio", "chunks", "events", "bytes", "calls", "cost_per_call"):
        if not isinstance(st.get(k), (int, float)) or not st[k] > 0:
            problems.append(f"stream.{k} = {st.get(k)!r}")
    for k in ("added_ms", "per_chunk_us", "per_event_us"):
        if not isinstance(st.get(k), (int, float)):
            problems.append(f"stream.{k} = {st.get(k)!r}")
    rep = st.get("report") or {}
    if rep.get("unmetered") != 0 or rep.get("requests") != st.get("calls"):
        problems.append(f"stream.report = {rep!r}")
    return problems


def ledger_problems(rl: dict | None) -> list[str]:
    """Cases 4 and 4r's comparison is all there, and 4r really reserved every call in Redis."""
    if not isinstance(rl, dict):
        return [f"redis_ledger = {rl!r}"]
    problems = []

    def num(path: str, v, positive=True):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (positive and not v > 0):
            problems.append(f"redis_ledger.{path} = {v!r}")

    for cid in (rl.get("twin"), rl.get("case")):
        num(f"rps.{cid}", (rl.get("rps") or {}).get(cid))
        for where in ("added_ms", "added_ms_one_connection"):
            for k in ("p50_ms", "p99_ms"):
                # Latency added over the do-nothing filter: a number, not necessarily > 0.
                num(f"{where}.{cid}.{k}", ((rl.get(where) or {}).get(cid) or {}).get(k), positive=False)
    for k in ("rps_ratio", "requests", "evalsha", "commands", "evalsha_per_call", "commands_per_call",
              "cpu_us_per_call"):
        num(k, rl.get(k))
    num("idle.evalsha_per_s", (rl.get("idle") or {}).get("evalsha_per_s"))
    # Every priced call wrk completed reserved by one script call (more: settlements, polls).
    if isinstance(rl.get("evalsha"), int) and isinstance(rl.get("requests"), int) and rl["evalsha"] < rl["requests"]:
        problems.append(f"redis_ledger: {rl['evalsha']} EVALSHA for {rl['requests']} priced calls")
    if rl.get("store", {}).get("appendfsync") != REDIS_APPENDFSYNC:
        problems.append(f"redis_ledger.store = {rl.get('store')!r}")
    return problems


def check_well_formed(r: dict, out: Path) -> list[str]:
    """The smoke run's check: every figure is there and has the right type (not its value)."""
    problems = []

    def num(path: str, v, positive=True):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (positive and not v > 0):
            problems.append(f"{path} = {v!r}")

    for cid, *_ in active_cases(r["settings"]):
        c = r["cases"].get(cid)
        if not c:
            problems.append(f"case {cid} missing")
            continue
        for k in ("rps", "p50_ms", "p99_ms", "envoy_completed"):
            num(f"cases.{cid}.{k}", c[k])
        num(f"cases.{cid}.non_2xx", c["non_2xx"], positive=False)
    for q in r["ratios"]:
        num(f"ratios.{q['name']}", q["value"])
    if r["settings"]["redis"]:
        problems += ledger_problems(r.get("redis_ledger"))
    for k in ("priced", "hot"):
        if r["cas_stat_names"]:
            num(f"cases.{k}.cas_writes", r["cases"][k]["cas_writes"])
    num("cases.cache_hit.cache_hits", r["cases"]["cache_hit"]["cache_hits"])
    for cid in active_quiet(active_cases(r["settings"])):
        num(f"one_connection.{cid}.p99_ms", (r["one_connection"].get(cid) or {}).get("p99_ms"))
    num("wasm.pag0_bytes", r["wasm"]["pag0_bytes"])
    if shutil.which("node"):
        for cid in ("free", "priced", "hot", "cache_hit"):
            num(f"host_calls.{cid}.host_calls", (r.get("host_calls") or {}).get(cid, {}).get("host_calls"))
    if r.get("session_memory"):
        for k in ("rss_start_kib", "rss_first_kib", "rss_end_kib"):
            num(f"session_memory.{k}", r["session_memory"][k])
    for k in ("rss_start_kib", "rss_full_kib", "rss_end_kib"):
        num(f"cache_memory.{k}", r["cache_memory"][k])
    if r.get("x402"):
        for k in ("through_pag0_ms", "direct_ms", "overhead_through_ms", "overhead_direct_ms"):
            num(f"x402.{k}", r["x402"][k])
    if r["settings"]["stream_calls"]:
        problems += stream_problems(r.get("stream"))
    if r["settings"]["callgrind"]:
        cg = r.get("callgrind")
        keys = [key for key, *_ in CALLGRIND_ADDED]
        if not isinstance(cg, dict) or list(cg) != keys:
            problems.append(f"callgrind = {cg!r}, want exactly the keys {keys}")
        else:
            for k in keys:
                # Instructions added over the do-nothing filter: integers, not necessarily > 0.
                num(f"callgrind.{k}", cg[k], positive=False)
                if not isinstance(cg[k], int):
                    problems.append(f"callgrind.{k} = {cg[k]!r} is not an integer")
        per = (r.get("callgrind_raw") or {}).get("per_request") or {}
        for cid, *_ in CASES:
            if cid not in REDIS_CASES:  # bench/callgrind.py runs without Redis
                num(f"callgrind_raw.per_request.{cid}", per.get(cid))
    try:
        again = json.loads((out / "results.json").read_text())
        if again.get("cases", {}).keys() != r["cases"].keys():
            problems.append("results.json does not round-trip")
    except (OSError, ValueError) as e:
        problems.append(f"results.json: {e}")
    md = (out / "RESULTS.md").read_text() if (out / "RESULTS.md").exists() else ""
    needles = ["| case | requests/s", "| target |", "## Memory", "## x402 pay path",
               "## Priced calls with the Redis ledger"]
    if r["settings"]["redis"]:
        needles += ["| Redis script calls (`EVALSHA`) per priced call", "| command | calls | per priced call |"]
    if r["settings"]["stream_calls"]:
        needles += ["## Streamed LLM answer", "| path | TTFB p50 ms"]
    if r["settings"]["callgrind"]:
        needles += ["## Instructions per request (callgrind)", "| instructions added per request"]
    for needle in needles:
        if needle not in md:
            problems.append(f"RESULTS.md lacks {needle!r}")
    return problems


# ---------------------------------------------------------------- main

def side_by_side_results(s: dict, envoy_bin: str, wrk: str, work: Path, up_port: int, up_pid: int,
                         cases: list[tuple], ledger: LedgerRedis | None) -> dict:
    """The side-by-side cases `cases` in rotated rounds, summed up: what results.json keeps."""
    side = side_by_side(s, envoy_bin, wrk, work, up_port, up_pid, cases, active_quiet(cases), ledger)
    runs = side["runs"]
    summary = summarise_cases(s, runs)
    quiet = {cid: {"p50_ms": statistics.median(r["p50_ms"] for r in rs),
                   "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                   "rps": statistics.median(r["rps"] for r in rs), "runs": rs}
             for cid, rs in side["quiet"].items()}
    rats = ratios(runs, summary)
    return {"cases": summary, "ratios": rats, "runs": runs, "one_connection": quiet,
            "cas_stat_names": side["cas_stat_names"],
            "redis_ledger": ledger_comparison(runs, side["quiet"], summary, rats, side["redis_idle"], ledger)}


def only_priced_redis(s: dict, work: Path) -> int:
    """`--only priced_redis`: cases 2, 4 and 4r in rotated rounds (at 50 connections and at
    one), printed and kept in the work directory's parent, never in RESULTS.md."""
    if not s["redis"]:
        raise BenchError("--only priced_redis with BENCH_REDIS=0 runs nothing")
    wrk = ensure_wrk()
    envoy_bin = run([str(ROOT / "scripts/ensure-envoy.sh")])
    build_noop()
    machine = machine_info(envoy_bin, wrk)
    s["body_bytes"] = 1024
    s["body"] = "x" * s["body_bytes"]
    up_port, up_admin = free_port(), free_port()
    up_cfg = render("upstream.yaml.in", work / "upstream.yaml", admin=up_admin, port=up_port,
                    body=s["body"], big_body="y" * s["cache_body"])
    upstream = Envoy(envoy_bin, up_cfg, work, "upstream", up_admin, s["concurrency"])
    ledger = LedgerRedis(work)
    cases = active_cases(s, {LEDGER_BASE, LEDGER_TWIN, LEDGER_CASE})
    result = {"machine": machine, "command": "python3 bench/run.py --only priced_redis"
              + (" --smoke" if s["smoke"] else ""),
              "settings": {k: v for k, v in s.items() if k != "body"}}
    result.update(side_by_side_results(s, envoy_bin, wrk, work, up_port, upstream.proc.pid, cases, ledger))
    ledger.stop()
    upstream.stop()
    dest = work.parent / "priced_redis.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print("| case | requests/s | p50 ms | p99 ms | non-2xx |\n|---|---:|---:|---:|---:|")
    for c in result["cases"].values():
        print(f"| {c['label']} | {fmt_int(c['rps'])} | {fmt(c['p50_ms'])} | {fmt(c['p99_ms'])} | {c['non_2xx']} |")
    print()
    print("\n".join(ledger_lines(result)))
    log(f"wrote {dest}")
    problems = ledger_problems(result["redis_ledger"])
    if problems:
        print("bench: malformed priced_redis results:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


def only_stream(s: dict, work: Path) -> int:
    """`--only stream`: the streamed case alone, printed and kept in the work directory's parent."""
    if not s["stream_calls"]:
        raise BenchError("--only stream with BENCH_STREAM_CALLS=0 runs nothing")
    envoy_bin = run([str(ROOT / "scripts/ensure-envoy.sh")])
    build_filter("the do-nothing filter", NOOP_MANIFEST, NOOP_WASM)
    st = stream_case(s, envoy_bin, work)
    dest = work.parent / "stream.json"
    dest.write_text(json.dumps(st, indent=2) + "\n")
    print("\n".join(stream_md(st)))
    log(f"wrote {dest}")
    problems = stream_problems(st)
    if problems:
        print("bench: malformed stream results:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="pag0 benchmark (make bench)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run, checked for form only")
    ap.add_argument("--only", choices=["stream", "priced_redis"],
                    help="run one part alone (stream: the streamed LLM answer; priced_redis: the "
                         "priced route with the Redis ledger next to the shared-data ledger and the "
                         "do-nothing filter); its result goes to target/bench[-smoke]/<part>.json and "
                         "the terminal, never to RESULTS.md, results.json or README.md")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    s = settings(a.smoke)
    out = Path(s["out"])
    if not out.is_absolute():
        out = ROOT / out
    work = ROOT / ("target/bench-smoke/work" if a.smoke else "target/bench/work")
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        if not PAG0_WASM.exists():
            raise BenchError(f"{PAG0_WASM} is missing: run `make build`")
        if a.only == "stream":
            return only_stream(s, work)
        if a.only == "priced_redis":
            return only_priced_redis(s, work)
        wrk = ensure_wrk()
        if s["callgrind"]:
            ensure_valgrind()
        envoy_bin = run([str(ROOT / "scripts/ensure-envoy.sh")])
        build_noop()
        machine = machine_info(envoy_bin, wrk)
        log(f"{machine['nproc']} CPUs ({machine['cpu']}), Envoy {machine['envoy']}, commit {machine['commit']}")
        # Every answer (upstream and direct_response) is the same 1 KiB body.
        s["body_bytes"] = 1024
        s["body"] = "x" * s["body_bytes"]
        up_port, up_admin = free_port(), free_port()
        up_cfg = render("upstream.yaml.in", work / "upstream.yaml", admin=up_admin, port=up_port,
                        body=s["body"], big_body="y" * s["cache_body"])
        upstream = Envoy(envoy_bin, up_cfg, work, "upstream", up_admin, s["concurrency"])

        result: dict = {"machine": machine}
        ledger = LedgerRedis(work) if s["redis"] else None
        result.update(side_by_side_results(s, envoy_bin, wrk, work, up_port, upstream.proc.pid,
                                           active_cases(s), ledger))
        if ledger:
            ledger.stop()
        result["session_memory"] = (session_memory(s, envoy_bin, wrk, work, up_port)
                                    if s["sessions"] else None)
        result["cache_memory"] = cache_memory(s, envoy_bin, wrk, work, up_port)
        upstream.stop()
        result["x402"] = x402_pay_path(s, envoy_bin, work) if s["x402_calls"] else None
        result["stream"] = stream_case(s, envoy_bin, work) if s["stream_calls"] else None
        result["host_calls"] = host_calls()
        if s["callgrind"]:
            result["callgrind"], result["callgrind_raw"] = callgrind_counts(s, envoy_bin, work)
        else:
            result["callgrind"] = result["callgrind_raw"] = None
        result["wasm"] = {"pag0_bytes": PAG0_WASM.stat().st_size, "noop_bytes": NOOP_WASM.stat().st_size,
                          "floor_bytes": FLOOR_WASM.stat().st_size, "target_bytes": WASM_SIZE_TARGET}
        result["command"] = reproduce_command(s)
        result["settings"] = {k: v for k, v in s.items() if k not in ("body",)}
        result["seconds"] = round(time.time() - started, 1)
        result["targets"] = targets(result)

        history = [] if a.smoke else remember_previous(out)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        md = results_md(result)
        extra = history_md(history, history_row(result))
        if extra:
            md = md.rstrip("\n") + "\n\n" + "\n".join(extra)
        (out / "RESULTS.md").write_text(md)
        log(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'} ({result['seconds']} s)")
        print(summary_tables(result))
        if s["readme"]:
            update_readme(result)
        if a.smoke:
            problems = check_well_formed(result, out)
            if problems:
                print("bench-smoke: malformed results:\n  " + "\n  ".join(problems), file=sys.stderr)
                return 1
            log("bench-smoke: results are well formed")
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        PROCS.stop_all()


if __name__ == "__main__":
    sys.exit(main())
