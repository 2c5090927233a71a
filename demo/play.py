#!/usr/bin/env python3
"""The pag0 demo: plays the scenarios of PRODUCT.md against a running Envoy with pag0.

It talks to the real listener (default http://127.0.0.1:10000, started by `make run`,
with the demo APIs of demo/upstream.py behind it) and tells what each agent spent and
why each refusal happened:

  1. autopilot loop          an agent loops on an LLM; the session's kill switch stops it
  2. ralph loop              a runaway agent hits its own budget; the others go on
  3. researcher and friends  three subagents in parallel, each within its budget
  4. the contract            requests pag0 refuses before any budget is looked at
  5. ultrawork               five agents ask the same search; the shared cache pays once
  6. x402                    pag0 pays a paid API for buyer-1 until its budget stops it
  7. Claude Code session     Claude Code's Messages API calls, each costing its tokens

Every outcome is also checked against what the reference config (envoy/reference.yaml)
must produce, so `make demo` doubles as a smoke test: the exit status is 0 when all
checks pass, 1 when an outcome differs, 2 when the listener cannot be used at all.

Usage: play.py [--listener URL] [--wait SECONDS] [--verbose] [--no-color]
Python 3.11, standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import socket
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal

# --- the reference session (envoy/reference.yaml, PRODUCT.md) -------------------------

API_KEY = "demo-key"
SESSION_BUDGET = 5_000_000
DAILY_BUDGET = 20_000_000
ALERT_PPM = 700_000
KILL_PPM = 900_000
AGENT_BUDGETS = {  # by role, the part of the agent id before the first "-"
    "executor": 2_000_000,
    "researcher": 1_500_000,
    "debugger": 1_000_000,
    "reviewer": 500_000,
    "ralph": 3_000_000,
    "ultrawork": 1_000_000,
}
LLM_PRICE = 150_000
SEARCH_PRICE = 20_000
TRANSLATE_PRICE = 50_000

EXIT_OK, EXIT_MISMATCH, EXIT_UNUSABLE = 0, 1, 2

# What a full run spends (all in fresh sessions, all against the tenant's day):
# autopilot 30 x LLM; ralph 20 x LLM + executor 5 x LLM;
# researcher 5 x search, reviewer 3 x LLM, debugger 2 x LLM; looper 1 x LLM.
RUN_COST = (30 * LLM_PRICE) + (20 * LLM_PRICE + 5 * LLM_PRICE) + (
    5 * SEARCH_PRICE + 3 * LLM_PRICE + 2 * LLM_PRICE
) + LLM_PRICE

# --- presentation ----------------------------------------------------------------------

COLOR = {"red": "31", "green": "32", "yellow": "33", "bold": "1", "dim": "2", "cyan": "36"}
_use_color = False


def paint(text: str, *styles: str) -> str:
    if not _use_color or not styles:
        return text
    codes = ";".join(COLOR[s] for s in styles)
    return f"\033[{codes}m{text}\033[0m"


def usd(amount: int | None) -> str:
    """6-decimal USDC as dollars: 150000 -> $0.15, 1000 -> $0.001."""
    if amount is None:
        return "-"
    text = f"{Decimal(amount) / Decimal(1_000_000):.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    frac = frac.ljust(2, "0")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}${whole.lstrip('-')}.{frac}"


def amount(value: int) -> str:
    """Both spellings: 150000 ($0.15)."""
    return f"{value} ({usd(value)})"


def percent(used: int, limit: int) -> str:
    return f"{used * 100 / limit:.0f}%" if limit else "-"


def out(line: str = "") -> None:
    print(line, flush=True)


# --- HTTP --------------------------------------------------------------------------------


class Unreachable(Exception):
    pass


@dataclass
class Reply:
    method: str
    host: str
    path: str
    request_headers: dict[str, str]
    status: int
    headers: dict[str, str]  # lowercased names
    body: bytes

    @property
    def endpoint(self) -> str:
        return f"{self.host}{self.path}"

    @property
    def cost(self) -> int | None:
        value = self.headers.get("x-pag0-cost")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    @property
    def remaining(self) -> dict[str, int]:
        return parse_dictionary(self.headers.get("x-pag0-budget-remaining", ""), int)

    @property
    def alert(self) -> dict[str, str]:
        return parse_dictionary(self.headers.get("x-pag0-budget-alert", ""), str)

    @property
    def error_header(self) -> str | None:
        return self.headers.get("x-pag0-error")

    @property
    def error(self) -> dict:
        try:
            doc = json.loads(self.body)
        except ValueError:
            return {}
        err = doc.get("error") if isinstance(doc, dict) else None
        return err if isinstance(err, dict) else {}

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def code(self) -> str | None:
        """The pag0 refusal code, or None for an answer pag0 let through."""
        return self.error_header or self.error.get("code")

    def describe(self) -> str:
        """The exact request and response, for a report of a mismatch."""
        sent = {k: v for k, v in self.request_headers.items() if k.lower() != "content-type"}
        got = {k: v for k, v in self.headers.items() if k.startswith("x-pag0-")}
        body = self.body.decode("utf-8", "replace")
        if len(body) > 400:
            body = body[:400] + "..."
        return (
            f"request: {self.method} {self.path} host={self.host} headers={sent}\n"
            f"          response: {self.status} {got} body={body}"
        )


def parse_dictionary(text: str, kind):
    """An RFC 8941 dictionary of plain values: `session=4850000, agent=2850000`."""
    result = {}
    for member in text.split(","):
        name, sep, value = member.strip().partition("=")
        if not sep or not name:
            continue
        try:
            result[name.strip()] = kind(value.strip())
        except ValueError:
            continue
    return result


# How long a report read on another Envoy of a Redis-ledger cluster waits for this
# Envoy's latest counts (its VMs' flushIntervalMs, 100 ms, and their tick, with margin).
REPORT_LAG_SECONDS = 0.3


class Client:
    """Keep-alive HTTP/1.1 connections to the listener, one per thread."""

    def __init__(self, listener: str, timeout: float = 10.0, reports: "Client | None" = None):
        # `reports`: another Envoy that answers the report API (the Redis ledger: any
        # Envoy of the cluster shows every Envoy's figures).
        self.reports = reports
        parsed = urllib.parse.urlsplit(listener if "://" in listener else f"http://{listener}")
        if parsed.scheme != "http":
            raise SystemExit(f"play.py: --listener must be an http:// URL, not {listener!r}")
        self.listener = f"http://{parsed.hostname}:{parsed.port or 80}"
        self.address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.timeout = timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def request(self, method: str, host: str, path: str, headers: dict[str, str],
                body: dict | None = None) -> Reply:
        if self.reports is not None and path.startswith("/_pag0/"):
            # The other Envoy's VMs send their counts to Redis every flushIntervalMs
            # (100 ms) and the report reader waits only for its own Envoy's: give the
            # calls just made on this one that long to arrive.
            time.sleep(REPORT_LAG_SECONDS)
            return self.reports.request(method, host, path, headers, body)
        data = json.dumps(body).encode() if body is not None else None
        sent = {"Host": host, **headers}
        if data is not None:
            sent["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=sent)
                resp = conn.getresponse()
                payload = resp.read()
                reply = Reply(method, host, path, sent, resp.status,
                              {k.lower(): v for k, v in resp.getheaders()}, payload)
                if resp.will_close:
                    self._drop()
                return reply
            except (ConnectionRefusedError, socket.gaierror) as exc:
                self._drop()
                raise Unreachable(str(exc)) from exc
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                # A keep-alive connection the server closed between two calls: retry once
                # on a new connection. (A refused or reset connection twice is fatal.)
                self._drop()
                if attempt == 2:
                    raise Unreachable(str(exc)) from exc
            except (socket.timeout, OSError) as exc:
                self._drop()
                raise Unreachable(str(exc)) from exc
        raise Unreachable("no answer")

    def port_open(self) -> bool:
        try:
            with socket.create_connection(self.address, timeout=1.0):
                return True
        except OSError:
            return False


# --- the calls agents make -----------------------------------------------------------


@dataclass(frozen=True)
class Api:
    label: str
    method: str
    host: str
    path: str
    price: int

    def body(self, i: int, topic: str) -> dict | None:
        # Each call asks something new: a loop's iterations are different prompts, and
        # a cache (keyed on the request) must not turn them into free repeats.
        if self.host == "api.openai.com" and self.path.startswith("/v1/chat"):
            return {"model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"{topic} (step {i})"}]}
        if self.host == "api.openai.com" and self.path.startswith("/v1/responses"):
            return {"model": "gpt-4o-mini", "input": f"{topic} (step {i})"}
        if self.host == "api.anthropic.com":
            return {"model": "claude-sonnet-4-5", "max_tokens": 512,
                    "messages": [{"role": "user", "content": f"{topic} (attempt {i})"}]}
        if self.host in ("api.tavily.com", "api.exa.ai"):
            return {"query": f"{topic} #{i}", "max_results": 5}
        if self.host == "api.deepl.com":
            return {"text": [f"{topic}, paragraph {i}"], "target_lang": "DE"}
        return None


OPENAI = Api("OpenAI chat", "POST", "api.openai.com", "/v1/chat/completions", LLM_PRICE)
RESPONSES = Api("OpenAI responses", "POST", "api.openai.com", "/v1/responses", LLM_PRICE)
ANTHROPIC = Api("Anthropic messages", "POST", "api.anthropic.com", "/v1/messages", LLM_PRICE)
TAVILY = Api("Tavily search", "POST", "api.tavily.com", "/search", SEARCH_PRICE)
EXA = Api("Exa search", "POST", "api.exa.ai", "/search", SEARCH_PRICE)
DEEPL = Api("DeepL translate", "POST", "api.deepl.com", "/v2/translate", TRANSLATE_PRICE)
FREE = Api("OpenAI models (free)", "GET", "api.openai.com", "/v1/models", 0)


def new_session_id(name: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"demo-{name}-{stamp}-{secrets.token_hex(3)}"


def role_of(agent: str) -> str:
    return agent.split("-", 1)[0]


def alert_decimal(used: int, limit: int) -> str:
    """What pag0 writes in x-pag0-budget-alert: used/limit, 3 digits, rounded down."""
    thousandths = used * 1000 // limit
    text = f"{thousandths // 1000}.{thousandths % 1000:03d}"
    while text.endswith("0") and not text.endswith(".0"):
        text = text[:-1]
    return text


def reaches(used: int, limit: int, ppm: int) -> bool:
    return used * 1_000_000 >= limit * ppm


# --- checks --------------------------------------------------------------------------


class Checks:
    def __init__(self):
        self.passed = 0
        self.failures: list[tuple[str, Reply | None, bool]] = []
        self._lock = threading.Lock()

    def expect(self, condition: bool, what: str, reply: Reply | None = None,
               major: bool = False) -> bool:
        """Counts a check; `major` ones (a scenario's outcome) are reported first."""
        with self._lock:
            if condition:
                self.passed += 1
            elif major:
                self.failures.insert(sum(1 for f in self.failures if f[2]), (what, reply, True))
            else:
                self.failures.append((what, reply, False))
        return condition

    def report(self, detailed: int = 5, listed: int = 25) -> None:
        """The first failures with the exact request and response, then one line each."""
        for i, (what, reply, _) in enumerate(self.failures):
            if i == listed:
                out(paint(f"  ... and {len(self.failures) - listed} more", "red"))
                break
            out(paint(f"  - {what}", "red"))
            if reply is not None and i < detailed:
                out(f"          {reply.describe()}")


# --- sessions, agents, narrative -------------------------------------------------------


@dataclass
class Event:
    n: int  # the agent's call number, from 1
    api: Api
    reply: Reply
    new_alerts: list[str] = field(default_factory=list)  # scopes alerting for the first time


@dataclass
class AgentTally:
    ok: int = 0
    refused: Counter = field(default_factory=Counter)
    other: Counter = field(default_factory=Counter)  # non-pag0 failures, by status
    spent: int = 0


class Session:
    """One scenario's session: sends the calls, keeps the expected ledger, checks replies.

    `sequential` means one call at a time, so every reply's session numbers can be
    predicted exactly; in parallel play only per-agent numbers are (each agent is one
    thread), and the session's are checked at the end.
    """

    def __init__(self, title: str, client: Client, checks: Checks, sequential: bool = True):
        self.title = title
        self.id = new_session_id(title.split()[0].lower())
        self.client = client
        self.checks = checks
        self.sequential = sequential
        self.spent = 0
        self.agent_spent: Counter = Counter()
        self.tallies: dict[str, AgentTally] = {}
        self.min_session_remaining: int | None = None
        self.seen_alert: set[tuple[str, str]] = set()  # (agent, scope)
        self._lock = threading.Lock()

    def tally(self, agent: str) -> AgentTally:
        with self._lock:
            return self.tallies.setdefault(agent, AgentTally())

    def call(self, agent: str, api: Api, n: int, topic: str) -> Event:
        headers = {"x-pag0-api-key": API_KEY, "x-pag0-session": self.id, "x-pag0-agent": agent}
        reply = self.client.request(api.method, api.host, api.path, headers, api.body(n, topic))
        event = Event(n, api, reply)
        self._account(agent, event)
        return event

    def _account(self, agent: str, event: Event) -> None:
        reply, api, checks = event.reply, event.api, self.checks
        tally = self.tally(agent)
        label = f"{self.title}: {agent} call #{event.n} ({api.host}{api.path})"
        if reply.ok and reply.code is None:
            cost = reply.cost
            checks.expect(cost == api.price,
                          f"{label}: x-pag0-cost {cost}, expected the route price {api.price}",
                          reply)
            charged = cost or 0
            with self._lock:
                tally.ok += 1
                tally.spent += charged
                self.spent += charged
                self.agent_spent[agent] += charged
                session_used = self.spent
                agent_used = self.agent_spent[agent]
            remaining = reply.remaining
            budget = AGENT_BUDGETS.get(role_of(agent))
            if budget is None:
                checks.expect("agent" not in remaining,
                              f"{label}: agent {agent} has no budget in the config, but "
                              f"x-pag0-budget-remaining names one", reply)
            else:
                checks.expect(remaining.get("agent") == budget - agent_used,
                              f"{label}: agent remaining {remaining.get('agent')}, expected "
                              f"{budget - agent_used}", reply)
            if "session" in remaining:
                with self._lock:
                    low = self.min_session_remaining
                    self.min_session_remaining = (remaining["session"] if low is None
                                                  else min(low, remaining["session"]))
            if self.sequential:
                checks.expect(remaining.get("session") == SESSION_BUDGET - session_used,
                              f"{label}: session remaining {remaining.get('session')}, "
                              f"expected {SESSION_BUDGET - session_used}", reply)
            # The alert: a scope is named once its use reaches 70% of its limit.
            alert = reply.alert
            scopes = [("agent", agent_used, budget)] if budget else []
            if self.sequential:
                scopes.append(("session", session_used, SESSION_BUDGET))
            for scope, used, limit in scopes:
                want = alert_decimal(used, limit) if reaches(used, limit, ALERT_PPM) else None
                checks.expect(alert.get(scope) == want,
                              f"{label}: x-pag0-budget-alert {scope}={alert.get(scope)}, "
                              f"expected {want or 'no ' + scope + ' alert'} "
                              f"({used} of {limit} used)", reply)
            with self._lock:
                for scope in alert:
                    key = (agent if scope == "agent" else "", scope)
                    if key not in self.seen_alert:
                        self.seen_alert.add(key)
                        event.new_alerts.append(scope)
        elif reply.code is not None:
            with self._lock:
                tally.refused[reply.code] += 1
            checks.expect(reply.cost == 0, f"{label}: a refusal must cost 0, x-pag0-cost is "
                                           f"{reply.headers.get('x-pag0-cost')}", reply)
            contract_shape(checks, label, reply)
        else:
            with self._lock:
                tally.other[reply.status] += 1

    # -- narrative --

    def show(self, events: list[Event], agent: str, verbose: bool) -> None:
        """Prints an agent's calls: all with --verbose, else the first ones, the ones
        where something changes (first alert, a refusal) and the last ones."""
        keep = set(range(min(3, len(events))))
        for i, e in enumerate(events):
            if e.new_alerts or not e.reply.ok or e.reply.code:
                keep.update({i - 1, i})
        ok_idx = [i for i, e in enumerate(events) if e.reply.ok and not e.reply.code]
        keep.update(ok_idx[-2:])
        keep = {i for i in keep if 0 <= i < len(events)}
        i = 0
        while i < len(events):
            if verbose or i in keep:
                for line in render(agent, events[i]):
                    out(line)
                i += 1
                continue
            j = i
            while j < len(events) and j not in keep:
                j += 1
            if j - i == 1:
                keep.add(i)
                continue
            gap = events[i:j]
            cost = sum(e.reply.cost or 0 for e in gap)
            each = {e.reply.cost for e in gap}
            each_text = f", {usd(each.pop())} each" if len(each) == 1 else ""
            out(paint(f"      ... calls {gap[0].n}-{gap[-1].n}: {len(gap)} more ok{each_text}, "
                      f"{usd(cost)} in all ...", "dim"))
            i = j


def contract_shape(checks: Checks, label: str, reply: Reply) -> None:
    """Every refusal: JSON {"error": {code, message, details}}, same code in x-pag0-error."""
    err = reply.error
    checks.expect(bool(err) and {"code", "message"} <= set(err),
                  f"{label}: refusal body is not {{\"error\": {{\"code\", \"message\", ...}}}}",
                  reply)
    checks.expect(reply.error_header is not None and err.get("code") == reply.error_header,
                  f"{label}: x-pag0-error {reply.error_header!r} and body code "
                  f"{err.get('code')!r} differ", reply)


def left_text(remaining: dict[str, int]) -> str:
    order = ["session", "agent", "daily", "monthly"]
    parts = [f"{k} {usd(remaining[k])}" for k in order if k in remaining]
    return "left: " + ", ".join(parts) if parts else ""


def why(reply: Reply, agent: str) -> str:
    """A sentence a person reads, from the refusal's code and details."""
    err = reply.error
    code = reply.code or "?"
    d = err.get("details") or {}

    def num(key):
        try:
            return int(d.get(key))
        except (TypeError, ValueError):
            return None

    limit, spent = num("limit"), num("spent")
    reserved, requested = num("reserved"), num("requested")
    used = (spent or 0) + (reserved or 0)
    if code == "KILL_SWITCH_ACTIVE":
        if d.get("reason") == "manual":
            return "the session's kill switch was turned on by hand: no more paid calls"
        if limit:
            return (f"the session has used {usd(used)} of its {usd(limit)} budget "
                    f"({percent(used, limit)}), the kill switch threshold is "
                    f"{KILL_PPM // 10_000}%: the session makes no more paid calls")
    if code.endswith("_BUDGET_EXCEEDED") and limit is not None:
        scope = d.get("scope") or code.split("_")[0].lower()
        who = {"agent": f"agent {agent}", "session": "the session",
               "daily": "the tenant today", "monthly": "the tenant this month"}.get(scope, scope)
        return (f"{who} has used {usd(used)} of its {usd(limit)} {scope} budget; this call "
                f"({usd(requested)}) would take it to {usd(used + (requested or 0))}")
    return err.get("message") or f"HTTP {reply.status}"


def render(agent: str, e: Event) -> list[str]:
    r = e.reply
    head = f"    {agent:<13} #{e.n:<3} {r.method:<4} {r.endpoint:<36}"
    if r.ok and not r.code:
        lines = [f"{head} {paint(str(r.status), 'green')}  cost {usd(r.cost):<6} "
                 f"{paint(left_text(r.remaining), 'dim')}"]
        if e.new_alerts:
            who = {"agent": f"agent {agent}", "session": "the session",
                   "daily": "the tenant's day", "monthly": "the tenant's month"}
            crossed = " and ".join(who.get(scope, scope) for scope in e.new_alerts)
            lines.append(paint(f"{'':>20}! x-pag0-budget-alert: "
                               f"{r.headers.get('x-pag0-budget-alert')}  ({crossed} passed "
                               f"the {ALERT_PPM // 10_000}% alert threshold)", "yellow"))
        return lines
    if r.code:
        return [f"{head} {paint(f'{r.status} {r.code}', 'red', 'bold')}  cost {usd(r.cost)}",
                paint(f"{'':>20}why: {why(r, agent)}", "red")]
    return [f"{head} {paint(str(r.status), 'red')}  (not a pag0 refusal: "
            f"{r.body[:120].decode('utf-8', 'replace')!r})"]


def loop(session: Session, agent: str, api: Api, topic: str, max_calls: int) -> list[Event]:
    """Calls `api` until the first answer that is not a success, or max_calls."""
    events = []
    for n in range(1, max_calls + 1):
        event = session.call(agent, api, n, topic)
        events.append(event)
        if not event.reply.ok or event.reply.code:
            break
    return events


def run_calls(session: Session, agent: str, plan: list[tuple[Api, str]]) -> list[Event]:
    return [session.call(agent, api, n, topic) for n, (api, topic) in enumerate(plan, 1)]


def expect_stop(checks: Checks, session: Session, agent: str, events: list[Event],
                ok: int, code: str, status: int = 403) -> None:
    """The loop made exactly `ok` paid calls, then the next one was refused with `code`."""
    oks = sum(1 for e in events if e.reply.ok and not e.reply.code)
    last = events[-1].reply
    where = f"{session.title}: {agent}"
    checks.expect(oks == ok, f"{where}: {oks} calls succeeded, expected {ok}", last,
                  major=True)
    checks.expect(len(events) == ok + 1 and last.status == status and last.code == code,
                  f"{where}: call #{len(events)} answered {last.status} {last.code}, expected "
                  f"call #{ok + 1} to be refused {status} {code}", last, major=True)


def expect_all_ok(checks: Checks, session: Session, agent: str, events: list[Event]) -> None:
    for e in events:
        checks.expect(e.reply.ok and not e.reply.code,
                      f"{session.title}: {agent} call #{e.n} answered {e.reply.status} "
                      f"{e.reply.code or ''}, expected a paid success", e.reply, major=True)


# --- the scenarios ---------------------------------------------------------------------


def banner(number: int, title: str, story: str, session: Session | None) -> None:
    out()
    out(paint(f"== {number}. {title} " + "=" * max(3, 70 - len(title)), "bold", "cyan"))
    text = " ".join(line.strip() for line in story.strip().splitlines())
    for line in textwrap.wrap(text, 86):
        out(f"   {line}")
    if session is not None:
        out(paint(f"   session {session.id}", "dim"))
    out()


def scenario_autopilot(client: Client, checks: Checks, verbose: bool) -> Session:
    s = Session("autopilot loop", client, checks)
    banner(1, "autopilot loop", f"""
        autopilot-1 calls OpenAI in a loop (up to 50 iterations, {usd(LLM_PRICE)} each:
        {usd(50 * LLM_PRICE)} without pag0). Session budget {usd(SESSION_BUDGET)}: alert at 70%,
        kill switch at 90%.""", s)
    events = loop(s, "autopilot-1", OPENAI, "make the failing test pass", 50)
    s.show(events, "autopilot-1", verbose)
    expect_stop(checks, s, "autopilot-1", events, 30, "KILL_SWITCH_ACTIVE")
    first = next((e for e in events if "session" in e.reply.alert), None)
    checks.expect(first is not None and first.n == 24,
                  f"{s.title}: the session alert first appeared on call "
                  f"#{first.n if first else None}, expected #24 (3600000 of 5000000 = 72%)",
                  first.reply if first else events[-1].reply, major=True)
    last = events[-1].reply
    if last.code == "KILL_SWITCH_ACTIVE":
        d = last.error.get("details") or {}
        checks.expect(d.get("scope") == "session" and str(d.get("limit")) == str(SESSION_BUDGET),
                      f"{s.title}: kill switch details should name scope session, limit "
                      f"{SESSION_BUDGET}", last)
    out()
    if first:
        out(f"   The alert came with call #{first.n} "
            f"({first.reply.headers.get('x-pag0-budget-alert')}); the loop kept going.")
    out(f"   The kill switch stopped it after {sum(1 for e in events if e.reply.ok)} calls: "
        f"{usd(s.spent)} spent instead of {usd(50 * LLM_PRICE)}.")
    return s


def scenario_ralph(client: Client, checks: Checks, verbose: bool) -> Session:
    s = Session("ralph loop", client, checks)
    ralph_budget = AGENT_BUDGETS["ralph"]
    banner(2, "ralph loop", f"""
        ralph-1 retries OpenAI until the goal is met (it never is). Its own budget is
        {usd(ralph_budget)}; the session's is {usd(SESSION_BUDGET)}. Then executor-1 works in the
        same session: a runaway agent does not take the others down with it.""", s)
    events = loop(s, "ralph-1", RESPONSES, "retry until all tests are green", 40)
    s.show(events, "ralph-1", verbose)
    expect_stop(checks, s, "ralph-1", events, 20, "AGENT_BUDGET_EXCEEDED")
    last = events[-1].reply
    if last.code == "AGENT_BUDGET_EXCEEDED":
        d = last.error.get("details") or {}
        want = {"scope": "agent", "limit": str(ralph_budget), "spent": str(ralph_budget),
                "requested": str(LLM_PRICE)}
        got = {k: str(d.get(k)) for k in want}
        checks.expect(got == want, f"{s.title}: refusal details {got}, expected {want}", last,
                      major=True)
    out()
    # The executor's allow list is the LLM APIs (OpenAI, Anthropic): it plans and writes
    # with them; searching is the researcher's job.
    plan = [(OPENAI, "plan the fix"), (RESPONSES, "read the failing test"),
            (OPENAI, "write the patch"), (RESPONSES, "explain the diff"),
            (OPENAI, "review the patch")]
    ex = run_calls(s, "executor-1", plan)
    s.show(ex, "executor-1", verbose)
    expect_all_ok(checks, s, "executor-1", ex)
    out()
    out(f"   ralph-1 was stopped at {usd(s.agent_spent['ralph-1'])}; executor-1 went on: "
        f"{len([e for e in ex if e.reply.ok])} calls, {usd(s.agent_spent['executor-1'])}.")
    return s


def scenario_friends(client: Client, checks: Checks, verbose: bool) -> Session:
    s = Session("researcher and friends", client, checks, sequential=False)
    banner(3, "researcher and friends", f"""
        Three subagents work in parallel in one session: researcher-1 searches (Tavily, Exa;
        budget {usd(AGENT_BUDGETS['researcher'])}), reviewer-1 reviews the patch with an LLM until
        its {usd(AGENT_BUDGETS['reviewer'])} budget stops it, debugger-1 asks two LLMs
        ({usd(AGENT_BUDGETS['debugger'])}).""", s)

    for name in ("researcher-1", "reviewer-1", "debugger-1"):
        s.tally(name)

    def researcher():
        return run_calls(s, "researcher-1", [
            (TAVILY, "spend limits for ai agents"), (EXA, "agent payment firewall"),
            (TAVILY, "x402 payment protocol"), (EXA, "eip-3009 transferWithAuthorization"),
            (TAVILY, "envoy proxy-wasm filters")])

    def reviewer():
        return loop(s, "reviewer-1", OPENAI, "review the patch, section", 20)

    def debugger():
        return run_calls(s, "debugger-1", [(OPENAI, "why does the test hang"),
                                           (RESPONSES, "explain this stack trace")])

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(fn) for name, fn in
                   [("researcher-1", researcher), ("reviewer-1", reviewer),
                    ("debugger-1", debugger)]}
        results = {name: f.result() for name, f in futures.items()}
    for name, events in results.items():
        s.show(events, name, verbose)
    expect_all_ok(checks, s, "researcher-1", results["researcher-1"])
    expect_all_ok(checks, s, "debugger-1", results["debugger-1"])
    expect_stop(checks, s, "reviewer-1", results["reviewer-1"], 3, "AGENT_BUDGET_EXCEEDED")
    total = 5 * SEARCH_PRICE + 3 * LLM_PRICE + 2 * LLM_PRICE
    checks.expect(s.spent == total, f"{s.title}: the session spent {s.spent}, expected {total}",
                  major=True)
    checks.expect(s.min_session_remaining == SESSION_BUDGET - total,
                  f"{s.title}: after the last call the session had "
                  f"{s.min_session_remaining} left, expected {SESSION_BUDGET - total}", major=True)
    out()
    out(f"   reviewer-1 stopped at its budget; the others finished. The session spent "
        f"{usd(s.spent)} of {usd(SESSION_BUDGET)}.")
    return s


def scenario_contract(client: Client, checks: Checks, verbose: bool) -> Session:
    s = Session("contract refusals", client, checks)
    banner(4, "the contract", """
        Who a request belongs to is checked before any budget: no key, no way in; a
        malformed session id is a 400, never a way around a budget. (A price above the
        $0.50 per-request cap cannot be reached with the demo prices, so it is not shown.)""",
        None)
    good = {"x-pag0-api-key": API_KEY, "x-pag0-session": new_session_id("contract"),
            "x-pag0-agent": "intruder-1"}
    long_ok = ("demo-contract-" + secrets.token_hex(64))[:128]
    cases = [
        ("no API key", {k: v for k, v in good.items() if k != "x-pag0-api-key"},
         OPENAI, 401, "UNAUTHORIZED"),
        ("unknown API key", {**good, "x-pag0-api-key": "not-a-key"}, OPENAI, 401, "UNAUTHORIZED"),
        ("session id with a space", {**good, "x-pag0-session": "my session"},
         OPENAI, 400, "INVALID_REQUEST"),
        ("session id of 129 chars", {**good, "x-pag0-session": "s" * 129},
         OPENAI, 400, "INVALID_REQUEST"),
        ("session id of 128 chars (the limit; a free call)",
         {**good, "x-pag0-session": long_ok}, FREE, 200, None),
    ]
    for n, (what, headers, api, status, code) in enumerate(cases, 1):
        reply = client.request(api.method, api.host, api.path, headers, api.body(n, "contract"))
        tally = s.tally(what)
        label = f"{s.title}: {what}"
        if reply.code:
            tally.refused[reply.code] += 1
            contract_shape(checks, label, reply)
        elif reply.ok:
            tally.ok += 1
            tally.spent += reply.cost or 0
        else:
            tally.other[reply.status] += 1
        checks.expect(reply.status == status and reply.code == code,
                      f"{label}: answered {reply.status} {reply.code}, expected {status} "
                      f"{code or '(no refusal)'}", reply, major=True)
        checks.expect(reply.cost == 0, f"{label}: x-pag0-cost {reply.cost}, expected 0", reply)
        outcome = (paint(f"{reply.status} {reply.code}", "red", "bold") if reply.code
                   else paint(str(reply.status), "green" if reply.ok else "red"))
        out(f"    {what:<50} {outcome}  cost {usd(reply.cost)}")
        if reply.code:
            out(paint(f"{'':>20}{reply.error.get('message', '')}", "dim"))
    return s


# --- summary ---------------------------------------------------------------------------


def summary(sessions: list[Session]) -> None:
    out()
    out(paint("== summary " + "=" * 70, "bold", "cyan"))
    for s in sessions:
        out()
        out(paint(f"  {s.title}", "bold") + paint(f"   {s.id}" if s.title != "contract refusals"
                                                  else "", "dim"))
        first = "agent" if s.title != "contract refusals" else "request"
        w = max([len(first), len("session total")] + [len(a) for a in s.tallies])
        out(f"    {first:<{w}} {'calls ok':>8}  {'refused (by code)':<28} {'spent':>8}")
        for agent, t in s.tallies.items():
            refused = ", ".join(f"{n} {c}" for c, n in sorted(t.refused.items())) or "-"
            if t.other:
                refused += "; " + ", ".join(f"{n} x HTTP {c}" for c, n in t.other.items())
            out(f"    {agent:<{w}} {t.ok:>8}  {refused:<28} {usd(t.spent):>8}")
        total = sum(t.spent for t in s.tallies.values())
        if s.title != "contract refusals":
            out(paint(f"    {'session total':<{w}} {sum(t.ok for t in s.tallies.values()):>8}  "
                      f"{'':<28} {usd(total):>8}  of {usd(SESSION_BUDGET)}", "bold"))


# --- start-up ---------------------------------------------------------------------------


def wait_for(client: Client, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    said = False
    while True:
        if client.port_open():
            return True
        if time.monotonic() >= deadline:
            return False
        if not said:
            out(f"waiting up to {seconds:g}s for the listener at {client.listener} ...")
            said = True
        time.sleep(0.25)


def preflight(client: Client, wait: float) -> int | None:
    """Checks that the listener answers, that pag0 is in its chain and that the demo
    APIs are behind it, and that the tenant's day has room for a full run. Returns an
    exit status to stop with, or None to go on."""
    not_running = (f"play.py: nothing answers at {client.listener}.\n"
                   f"  Start Envoy with pag0 first: `make run` (and the demo APIs, "
                   f"demo/upstream.py),\n  or pass --wait SECONDS to wait for it, or "
                   f"--listener URL if it listens elsewhere.")
    if wait > 0 and not wait_for(client, wait):
        out(not_running + f"\n  (waited {wait:g}s)")
        return EXIT_UNUSABLE
    headers = {"x-pag0-api-key": API_KEY, "x-pag0-session": new_session_id("preflight"),
               "x-pag0-agent": "demo-preflight"}
    deadline = time.monotonic() + max(wait, 0)
    while True:
        try:
            reply = client.request(FREE.method, FREE.host, FREE.path, headers)
        except Unreachable as exc:
            if time.monotonic() < deadline:
                time.sleep(0.25)
                continue
            out(not_running + f"\n  ({exc})")
            return EXIT_UNUSABLE
        # Right after start-up Envoy may answer before the upstream is reachable.
        if reply.status == 503 and reply.code is None and time.monotonic() < deadline:
            time.sleep(0.25)
            continue
        break
    if "x-pag0-cost" not in reply.headers:
        out(f"play.py: {client.listener} answered {reply.status} without pag0's headers: "
            f"is this Envoy running envoy/reference.yaml (`make run`)?")
        return EXIT_UNUSABLE
    if reply.code is not None:
        out(f"play.py: pag0 refused the demo's first, free call: {reply.status} {reply.code}: "
            f"{reply.error.get('message')}\n  Is Envoy running envoy/reference.yaml "
            f"(`make run`)? The demo uses the API key {API_KEY!r}.")
        return EXIT_UNUSABLE
    if not reply.ok:
        out(f"play.py: the demo APIs behind Envoy did not answer (HTTP {reply.status}: "
            f"{reply.body[:100].decode('utf-8', 'replace')!r}).\n  Start them: "
            f"`python3 demo/upstream.py` (127.0.0.1:18080), or `make run`.")
        return EXIT_UNUSABLE
    daily = reply.remaining.get("daily")
    if daily is not None and daily < RUN_COST:
        out(f"play.py: the demo tenant has {usd(daily)} left of its {usd(DAILY_BUDGET)} daily "
            f"budget, and a full run spends {usd(RUN_COST)}:\n  the scenarios would end in "
            f"DAILY_BUDGET_EXCEEDED. Budgets live in Envoy's memory: restart it (`make run`)"
            f"\n  to start afresh, or wait for the next UTC day.")
        return EXIT_UNUSABLE
    out(f"pag0 at {client.listener}: the demo tenant has {usd(daily)} of its "
        f"{usd(DAILY_BUDGET)} daily budget left; this run spends {usd(RUN_COST)}.")
    return None


ADMIN_KEY = "demo-admin"


def scenario_ultrawork(client: Client, checks: Checks) -> None:
    """Five agents of one session ask the same search at the same moment: one call goes
    upstream and is paid, the other four are served from the shared cache, free."""
    out()
    out(paint("== 5. ultrawork: five agents, one search " + "=" * 41, "bold", "cyan"))
    session = new_session_id("ultrawork")
    body = {"query": "how do I budget AI agents?", "session": session}
    results: list[Reply] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        headers = {"x-pag0-api-key": API_KEY, "x-pag0-session": session,
                   "x-pag0-agent": f"ultrawork-{i}"}
        reply = Client(client.listener).request("POST", TAVILY.host, TAVILY.path, headers, body)
        with lock:
            results.append(reply)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(1, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paid = [r for r in results if r.headers.get("x-pag0-cached") == "false"]
    hits = [r for r in results if r.headers.get("x-pag0-cached") == "true"]
    for r in sorted(results, key=lambda r: r.headers.get("x-pag0-cached", "")):
        age = r.headers.get("x-pag0-cache-age")
        out(f"    {r.status}  cost {usd(int(r.headers.get('x-pag0-cost', '0')))}  cached={r.headers.get('x-pag0-cached')}"
            + (f" (age {age}s)" if age else ""))
    checks.expect(len(paid) == 1 and len(hits) == 4,
                  f"ultrawork: 1 paid call and 4 cache hits (got {len(paid)} and {len(hits)})", major=True)
    checks.expect(all(r.headers.get("x-pag0-cost") == "0" for r in hits), "ultrawork: hits are free")
    reply = client.request("GET", "pag0", f"/_pag0/v1/sessions/{session}/report",
                           {"authorization": f"Bearer {ADMIN_KEY}"})
    if checks.expect(reply.status == 200, "ultrawork: report readable", reply):
        report = json.loads(reply.body)
        out(f"  paid {usd(int(report['totalCost']))} once; the cache saved {usd(int(report['cacheSavings']))} "
            f"({report['cacheHits']} hits, hit rate {report['cacheHitRate']:.0%})")
        checks.expect(report["cacheSavings"] == str(4 * SEARCH_PRICE),
                      "ultrawork: report savings = 4 x price", reply, major=True)


X402_PRICE = 10_000
BUYER_BUDGET = 1_000_000


def scenario_x402(client: Client, checks: Checks) -> None:
    """A buyer agent calls a paid x402 API (the official x402 SDK's middleware on
    x402.local). pag0 answers each 402 itself: it checks the price against the session's
    policy, reserves it, has the reference signer sign the payment, retries, and settles.
    The agent's budget of $1 buys exactly 100 calls; the 101st is refused before anything
    is signed. The same agent may not call anything but x402.local."""
    out()
    out(paint("== 6. x402: pag0 pays a paid API for buyer-1 " + "=" * 36, "bold", "cyan"))
    session = new_session_id("x402")
    headers = {"x-pag0-api-key": API_KEY, "x-pag0-session": session, "x-pag0-agent": "buyer-1"}
    paid: list[Reply] = []
    refused: Reply | None = None
    for n in range(1, BUYER_BUDGET // X402_PRICE + 2):
        reply = client.request("GET", "x402.local", "/weather", headers)
        if reply.status != 200:
            refused = reply
            break
        paid.append(reply)
        if n <= 2:
            out(f"    buyer-1 #{n:<3} GET x402.local/weather  {paint('200', 'green')}  cost "
                f"{usd(int(reply.headers.get('x-pag0-cost', '0')))}  "
                f"{paint(reply.headers.get('x-pag0-payment', ''), 'dim')}")
    if len(paid) > 2:
        out(f"    ... {len(paid) - 2} more paid calls ...")
    settled = [r for r in paid if r.headers.get("x-pag0-payment", "").startswith("settled")]
    checks.expect(len(paid) == BUYER_BUDGET // X402_PRICE,
                  f"x402: buyer-1's budget buys exactly {BUYER_BUDGET // X402_PRICE} payments "
                  f"(got {len(paid)})", refused, major=True)
    checks.expect(len(settled) == len(paid), "x402: every paid call reports a settled payment")
    checks.expect(all(r.headers.get("x-pag0-cost") == str(X402_PRICE) for r in paid),
                  "x402: each paid call costs the price the server asked")
    if refused is not None:
        out(f"    buyer-1 #{len(paid) + 1:<3} GET x402.local/weather  "
            f"{paint(f'{refused.status} {refused.code}', 'red', 'bold')}")
        out(paint(f"{'':>20}why: {why(refused, 'buyer-1')}", "red"))
        checks.expect(refused.code == "AGENT_BUDGET_EXCEEDED",
                      "x402: the next payment is refused: AGENT_BUDGET_EXCEEDED", refused, major=True)
    other = client.request("POST", TAVILY.host, TAVILY.path, headers, {"query": "x402"})
    out(f"    buyer-1      GET api.tavily.com/search  {paint(f'{other.status} {other.code}', 'red', 'bold')}"
        f"  (buyers may call x402.local only)")
    checks.expect(other.code == "ENDPOINT_NOT_ALLOWED", "x402: buyer-1 may not call Tavily", other)
    reply = client.request("GET", "pag0", f"/_pag0/v1/sessions/{session}/report",
                           {"authorization": f"Bearer {ADMIN_KEY}"})
    if checks.expect(reply.status == 200, "x402: report readable", reply):
        report = json.loads(reply.body)
        out(f"  paid {usd(int(report['totalCost']))} in {len(settled)} settled x402 payments; "
            f"unconfirmed: {report['unconfirmedPayments']['count']}")
        checks.expect(report["totalCost"] == str(len(paid) * X402_PRICE),
                      "x402: report totalCost = payments x price", reply, major=True)


# --- 7. a Claude Code session, token-metered ------------------------------------------

PRICES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "envoy",
                           "llm-prices.json")
MAX_PER_REQUEST = 500_000
CLAUDE_CODE_AGENT = "executor-1"
SONNET, HAIKU = "claude-sonnet-4-5", "claude-haiku-4-5"
# The CLI asks for 128000 output tokens on every request (PRODUCT.md); pag0 lowers that to
# what the tightest budget (here maxPerRequest) affords and says so in x-pag0-max-tokens.
CLAUDE_CODE_MAX_TOKENS = 128_000


def load_prices(path: str = PRICES_FILE) -> list[tuple[str, dict[str, int]]]:
    """envoy/llm-prices.json: [(model glob, {input, output, cacheWrite5m, cacheWrite1h,
    cacheRead} per million tokens)]."""
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    kinds = ("input", "output", "cacheWrite5m", "cacheWrite1h", "cacheRead")
    return [(row["model"], {k: int(row[k]) for k in kinds}) for row in table["prices"]]


def rates_for(prices: list[tuple[str, dict[str, int]]], model: str) -> dict[str, int] | None:
    """The most specific matching glob's rates: the one with the most literal characters
    (`*` matches any run of characters)."""
    best = None
    for glob, rates in prices:
        pattern = "^" + ".*".join(re.escape(p) for p in glob.split("*")) + "$"
        if re.match(pattern, model):
            literal = len(glob.replace("*", ""))
            if best is None or literal > best[0]:
                best = (literal, rates)
    return best[1] if best else None


def anthropic_tokens(usage: dict) -> dict[str, int]:
    """A Messages API usage as billed: input, output, cache writes by TTL (without the
    split, all at the 5-minute rate), cache reads."""
    written = int(usage.get("cache_creation_input_tokens") or 0)
    split = usage.get("cache_creation")
    if isinstance(split, dict):
        w5 = int(split.get("ephemeral_5m_input_tokens") or 0)
        w1 = int(split.get("ephemeral_1h_input_tokens") or 0)
    else:
        w5, w1 = written, 0
    return {"input": int(usage.get("input_tokens") or 0),
            "output": int(usage.get("output_tokens") or 0),
            "cacheWrite5m": w5, "cacheWrite1h": w1,
            "cacheRead": int(usage.get("cache_read_input_tokens") or 0)}


def token_cost(tokens: dict[str, int], rates: dict[str, int]) -> int:
    """ceil(sum(tokens x rate per million) / 1e6), in the budget's unit (docs/llm.md)."""
    micro = sum(tokens[k] * rates[k] for k in tokens)
    return -(-micro // 1_000_000)


def sse_usage(body: bytes) -> tuple[dict | None, bool]:
    """The usage a Messages API stream adds up to: message_start's, then each
    message_delta's fields overwrite (they are cumulative). And whether it ended
    (message_stop)."""
    usage, stopped = None, False
    for raw in body.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in raw.split("\n")
                         if line.startswith("data:"))
        if not data:
            continue
        try:
            event = json.loads(data)
        except ValueError:
            continue
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "message_start":
            usage = dict((event.get("message") or {}).get("usage") or {})
        elif kind == "message_delta" and usage is not None:
            usage.update(event.get("usage") or {})
        elif kind == "message_stop":
            stopped = True
    return usage, stopped


def claude_code_tools() -> list[dict]:
    """A few of the tool definitions Claude Code sends with every main-agent request."""
    def tool(name: str, description: str, props: dict, required: list[str]) -> dict:
        return {"name": name, "description": description,
                "input_schema": {"type": "object", "properties": props, "required": required,
                                 "additionalProperties": False,
                                 "$schema": "http://json-schema.org/draft-07/schema#"}}
    s = {"type": "string"}
    return [
        tool("Bash", "Executes a given bash command in a persistent shell session with "
             "optional timeout, ensuring proper handling and security measures.",
             {"command": {**s, "description": "The command to execute"},
              "description": {**s, "description": "Clear, concise description of what this "
                              "command does in 5-10 words"}}, ["command"]),
        tool("Read", "Reads a file from the local filesystem. You can access any file "
             "directly by using this tool.",
             {"file_path": {**s, "description": "The absolute path to the file to read"}},
             ["file_path"]),
        tool("Edit", "Performs exact string replacements in files.",
             {"file_path": {**s, "description": "The absolute path to the file to modify"},
              "old_string": {**s, "description": "The text to replace"},
              "new_string": {**s, "description": "The text to replace it with"}},
             ["file_path", "old_string", "new_string"]),
        tool("Grep", "A powerful search tool built on ripgrep.",
             {"pattern": {**s, "description": "The regular expression pattern to search for"},
              "path": {**s, "description": "File or directory to search in"}}, ["pattern"]),
        tool("Task", "Launch a new agent to handle complex, multi-step tasks autonomously.",
             {"description": {**s, "description": "A short (3-5 word) description of the task"},
              "prompt": {**s, "description": "The task for the agent to perform"},
              "subagent_type": {**s, "description": "The type of specialized agent to use"}},
             ["description", "prompt", "subagent_type"]),
    ]


def claude_code_system(session: str) -> list[dict]:
    """Claude Code's system prompt: its identity line, then the long instructions with the
    environment, cached (cache_control) so that every later turn reads it."""
    instructions = " ".join([
        "You are an interactive CLI tool that helps users with software engineering tasks.",
        "Use the instructions below and the tools available to you to assist the user.",
        "IMPORTANT: Assist with defensive security tasks only.",
        "# Tone and style: be concise, direct, and to the point.",
        "# Doing tasks: use the TodoWrite tool to plan the task if required; use the",
        "available search tools to understand the codebase; implement the solution using",
        "all tools available to you; verify the solution if possible with tests.",
        "# Tool usage policy: when doing file search, prefer to use the Task tool;",
        "you have the capability to call multiple tools in a single response.",
    ] * 6)
    env = (f"<env>\nWorking directory: /work/main\nIs directory a git repo: Yes\n"
           f"Platform: linux\nOS Version: Linux 6.8\nToday's date: 2026-11-29\n"
           f"Session: {session}\n</env>\nYou are powered by the model named Sonnet 4.5. "
           f"The exact model ID is {SONNET}.")
    return [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": f"{instructions}\n\n{env}",
             "cache_control": {"type": "ephemeral"}}]


def scenario_looper(client: Client, checks: Checks) -> None:
    """looper-1 sends the same request again and again. Its repeat breaker (5 identical
    calls within 60 s) stops it at the 5th, long before its budget would: the first call
    is paid, the next three are cache hits (free, but a loop all the same) and warned."""
    session = new_session_id("looper")
    banner(8, "looper: stopped by behaviour, not by budget", f"""
        looper-1 asks OpenAI the same thing in a loop. Its budget ({usd(1_000_000)}) would
        let it go on; its repeat breaker (5 identical calls within 60 s, warning from the
        3rd) stops it at the 5th call. Calls 2-4 come from the cache and cost nothing: a loop
        served from the cache is still a loop.""", None)
    out(paint(f"   session {session}", "dim"))
    headers = {"x-pag0-api-key": API_KEY, "x-pag0-session": session, "x-pag0-agent": "looper-1"}
    body = {"model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"are all tests green yet? ({session})"}]}
    replies = []
    for n in range(1, 6):
        reply = client.request("POST", OPENAI.host, OPENAI.path, headers, body)
        replies.append(reply)
        warning = reply.headers.get("x-pag0-loop-warning")
        cached = reply.headers.get("x-pag0-cached")
        what = (paint(f"{reply.status} {reply.code}", "red", "bold") if reply.code
                else f"{reply.status}  cost {usd(reply.cost)}  cached={cached}")
        out(f"    looper-1 #{n:<2} {what}" + (f"  x-pag0-loop-warning: {warning}" if warning else ""))
    statuses = [r.status for r in replies]
    checks.expect(statuses == [200, 200, 200, 200, 429],
                  f"looper: statuses {statuses}, expected 4 x 200 then 429", replies[-1], major=True)
    checks.expect(replies[-1].code == "LOOP_DETECTED",
                  f"looper: the 5th call was refused {replies[-1].code}, expected LOOP_DETECTED",
                  replies[-1], major=True)
    cached = [r.headers.get("x-pag0-cached") for r in replies[:4]]
    checks.expect(cached == ["false", "true", "true", "true"],
                  f"looper: cached {cached}, expected one paid call then three hits", replies[3])
    warnings = [r.headers.get("x-pag0-loop-warning") for r in replies[:4]]
    checks.expect(warnings == [None, None, "count=3, limit=5", "count=4, limit=5"],
                  f"looper: warnings {warnings}", replies[3])
    reply = client.request("GET", "pag0", f"/_pag0/v1/sessions/{session}/report",
                           {"authorization": f"Bearer {ADMIN_KEY}"})
    if checks.expect(reply.status == 200, "looper: report readable", reply):
        report = json.loads(reply.body)
        agent = next((a for a in report["byAgent"] if a["agentId"] == "looper-1"), {})
        stopped = agent.get("stoppedBy") or {}
        checks.expect(stopped.get("code") == "LOOP_DETECTED" and stopped.get("calls") == 4,
                      f"looper: stoppedBy {stopped}, expected LOOP_DETECTED after 4 calls", reply,
                      major=True)
        checks.expect(report["totalCost"] == str(LLM_PRICE),
                      f"looper: the session spent {report['totalCost']}, expected {LLM_PRICE}", reply)
        out(f"   stopped at call 5 by LOOP_DETECTED after spending {usd(int(report['totalCost']))}; "
            f"the budget alone would have let it make {1_000_000 // LLM_PRICE} paid calls.")


def scenario_claude_code(client: Client, checks: Checks) -> None:
    """What the Claude Code CLI sends, with ANTHROPIC_BASE_URL pointed at Envoy and the
    pag0 headers added by ANTHROPIC_CUSTOM_HEADERS: POST /v1/messages?beta=true, a small
    non-streamed Haiku call for the conversation's title, then the main agent's streamed
    Sonnet turns with tools and a cached system prompt. Each call costs its tokens."""
    label = "Claude Code session"
    session = new_session_id("claude")
    banner(7, label, f"""
        {CLAUDE_CODE_AGENT} runs the Claude Code CLI: Haiku 4.5 names the conversation (one
        JSON answer), Sonnet 4.5 works in streamed turns with tools and a cached system
        prompt. The reference identity reads X-Claude-Code-Session-Id after x-pag0-session;
        here ANTHROPIC_CUSTOM_HEADERS adds the pag0 headers, which come first, to name the
        session and the agent (executor-1, whose allow list has Anthropic). The Messages API is
        token-metered: a JSON answer's x-pag0-cost is its token cost, a stream's is what
        was reserved, and the ledger gets the token cost when the stream ends.""", None)
    out(paint(f"   session {session}", "dim"))
    out()
    prices = load_prices()
    headers = {
        # What Claude Code sends on every request...
        "x-api-key": "sk-ant-demo-not-a-real-key",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                          "fine-grained-tool-streaming-2025-05-14",
        "anthropic-dangerous-direct-browser-access": "true",
        "user-agent": "claude-cli/2.1.332 (external, cli)",
        "x-app": "cli",
        "X-Claude-Code-Session-Id": str(uuid.uuid4()),
        # ... and what ANTHROPIC_CUSTOM_HEADERS adds for pag0.
        "x-pag0-api-key": API_KEY,
        "x-pag0-session": session,
        "x-pag0-agent": CLAUDE_CODE_AGENT,
    }
    metadata = {"user_id": f"user_{secrets.token_hex(32)}_account__session_"
                           f"{headers['X-Claude-Code-Session-Id']}"}
    tools, system = claude_code_tools(), claude_code_system(session)
    ask = "The demo test in tests/demo.rs fails after the last change. Find out why and fix it."
    tool_id = f"toolu_{secrets.token_hex(12)}"
    turn1 = [{"role": "user", "content": [{"type": "text", "text": ask}]}]
    turn2 = turn1 + [
        {"role": "assistant", "content": [
            {"type": "text", "text": "I'll run the demo test to see the failure."},
            {"type": "tool_use", "id": tool_id, "name": "Bash",
             "input": {"command": "cargo test --test demo", "description": "Run the demo test"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id,
             "content": "test the_demo_scenarios_play_out_as_the_product_says ... FAILED\n"
                        "  - ralph loop: report totalCost 3000000 = 3150000 charged"}]}]

    def sonnet(messages: list[dict]) -> dict:
        return {"model": SONNET, "max_tokens": CLAUDE_CODE_MAX_TOKENS, "messages": messages,
                "system": system, "tools": tools, "metadata": metadata,
                "thinking": {"type": "adaptive"}, "stream": True}

    calls = [
        ("title", {"model": HAIKU, "max_tokens": CLAUDE_CODE_MAX_TOKENS,
                   "system": [{"type": "text", "text": "Analyze if this message indicates a new "
                               "conversation topic. If it does, extract a 2-3 word title. Format "
                               "your response as a JSON object with two fields: 'isNewTopic' "
                               "(boolean) and 'title' (string or null)."}],
                   "messages": [{"role": "user", "content": ask}], "metadata": metadata,
                   "temperature": 0}),
        ("turn 1", sonnet(turn1)),
        ("turn 2", sonnet(turn2)),
    ]
    path = "/v1/messages?beta=true"
    results = []  # (what, model, streamed, reply, tokens or None, real cost or None)
    for n, (what, body) in enumerate(calls, 1):
        reply = client.request("POST", "api.anthropic.com", path, headers, body)
        model, streamed = body["model"], bool(body.get("stream"))
        where = f"{label}: #{n} {what} ({model}, {'stream' if streamed else 'JSON'})"
        rates = rates_for(prices, model)
        checks.expect(rates is not None, f"{where}: no row of envoy/llm-prices.json prices "
                                         f"{model}", major=True)
        ok = checks.expect(reply.ok and reply.code is None,
                           f"{where}: answered {reply.status} {reply.code or ''}, expected a "
                           f"paid success", reply, major=True)
        usage, ended = None, True
        if ok and streamed:
            checks.expect(reply.headers.get("content-type", "").startswith("text/event-stream"),
                          f"{where}: not an event stream", reply)
            usage, ended = sse_usage(reply.body)
            checks.expect(ended, f"{where}: the stream has no message_stop", reply)
        elif ok:
            try:
                usage = json.loads(reply.body).get("usage")
            except (ValueError, AttributeError):
                usage = None
        checks.expect(isinstance(usage, dict), f"{where}: the answer carries no usage", reply,
                      major=True)
        tokens = anthropic_tokens(usage) if isinstance(usage, dict) else None
        if tokens is not None:
            checks.expect(tokens["cacheWrite5m"] + tokens["cacheWrite1h"]
                          == int(usage.get("cache_creation_input_tokens") or 0),
                          f"{where}: cache_creation split disagrees with its total", reply)
        real = token_cost(tokens, rates) if tokens is not None and rates is not None else None
        header = reply.cost
        if real is not None:
            if streamed:
                checks.expect(header is not None and real <= header,
                              f"{where}: token cost {real} is above the reservation "
                              f"x-pag0-cost {header}", reply, major=True)
            else:
                checks.expect(header == real, f"{where}: x-pag0-cost {header}, expected the "
                                              f"token cost {real}", reply, major=True)
        checks.expect(header is not None and header <= MAX_PER_REQUEST,
                      f"{where}: x-pag0-cost {header} is above maxPerRequest {MAX_PER_REQUEST}",
                      reply)
        results.append((what, model, streamed, reply, tokens, real))
        status = (paint(str(reply.status), "green") if ok
                  else paint(f"{reply.status} {reply.code or ''}", "red", "bold"))
        line = (f"    {CLAUDE_CODE_AGENT} #{n} {what:<6} {model:<17} "
                f"{'stream' if streamed else 'JSON':<6} {status}  ")
        if streamed:
            line += f"reserved {usd(header)}, tokens {usd(real)}"
        else:
            line += f"cost {usd(header)} = tokens {usd(real)}"
        out(line)
        if tokens is not None:
            lowered = reply.headers.get("x-pag0-max-tokens")
            out(paint(f"{'':>20}in {tokens['input']}, cache write "
                      f"{tokens['cacheWrite5m'] + tokens['cacheWrite1h']}, cache read "
                      f"{tokens['cacheRead']}, out {tokens['output']}"
                      + (f"; max_tokens {body['max_tokens']} lowered to {lowered} "
                         f"(x-pag0-max-tokens)" if lowered else ""), "dim"))

    # The system prompt's cache: written by the first Sonnet turn, read by the second.
    turns = [r for r in results if r[0].startswith("turn")]
    written = turns[0][4]["cacheWrite5m"] if turns[0][4] else 0
    read = turns[1][4]["cacheRead"] if turns[1][4] else 0
    checks.expect(written > 0, f"{label}: turn 1 wrote no prompt cache", turns[0][3], major=True)
    checks.expect(read == written and read > 0,
                  f"{label}: turn 2 read {read} cached tokens, expected the {written} turn 1 "
                  f"wrote", turns[1][3], major=True)

    real_total = sum(r[5] or 0 for r in results)
    totals = Counter()
    by_model: dict[str, int] = Counter()
    for _, model, _, _, tokens, real in results:
        for k, v in (tokens or {}).items():
            totals[k] += v
        by_model[model] += real or 0
    reply = client.request("GET", "pag0", f"/_pag0/v1/sessions/{session}/report",
                           {"authorization": f"Bearer {ADMIN_KEY}"})
    if checks.expect(reply.status == 200, f"{label}: report readable", reply, major=True):
        report = json.loads(reply.body)
        checks.expect(report["totalCost"] == str(real_total),
                      f"{label}: report totalCost {report['totalCost']}, expected the token "
                      f"costs' sum {real_total}", reply, major=True)
        checks.expect(report["unmeteredCalls"]["count"] == 0,
                      f"{label}: {report['unmeteredCalls']['count']} unmetered calls", reply)
        checks.expect(report["reserved"] == "0",
                      f"{label}: {report['reserved']} still reserved", reply)
        want_tokens = {"input": totals["input"], "output": totals["output"],
                       "cacheWrite": totals["cacheWrite5m"] + totals["cacheWrite1h"],
                       "cacheRead": totals["cacheRead"]}
        checks.expect(report["tokens"] == want_tokens,
                      f"{label}: report tokens {report['tokens']}, expected {want_tokens}", reply)
        models = {m["model"]: m for m in report["byModel"]}
        checks.expect(set(models) == set(by_model),
                      f"{label}: byModel lists {sorted(models)}, expected {sorted(by_model)}",
                      reply, major=True)
        for model, cost in by_model.items():
            got = models.get(model, {}).get("cost")
            checks.expect(got == str(cost), f"{label}: byModel {model} cost {got}, expected "
                                            f"{cost}", reply)
        agent = next((a for a in report["byAgent"] if a["agentId"] == CLAUDE_CODE_AGENT), {})
        checks.expect(agent.get("cost") == str(real_total),
                      f"{label}: {CLAUDE_CODE_AGENT} cost {agent.get('cost')} in the report, "
                      f"expected {real_total}", reply)
        out()
        for m in report["byModel"]:
            out(f"    {m['model']:<17} {usd(int(m['cost'])):>10}  {m['requests']} "
                f"request{'s' if m['requests'] != 1 else ''}")
    flat = len(results) * LLM_PRICE
    all_in = totals["input"] + totals["cacheWrite5m"] + totals["cacheWrite1h"] + totals["cacheRead"]
    out()
    out(f"   Claude Code's {len(results)} calls cost their tokens: {usd(real_total)} for {all_in} "
        f"input ({totals['cacheRead']} read from the prompt cache),")
    out(f"   {totals['output']} output tokens; a flat price of {usd(LLM_PRICE)} a call would "
        f"have charged {usd(flat)}.")


def show_reports(client: Client, checks: Checks, sessions: list[Session]) -> None:
    """Reads each session's report from the report API and checks it against what the
    agents were charged, call by call."""
    out()
    out(paint("== the report API " + "=" * 63, "bold", "cyan"))
    for s in sessions:
        if s.title == "contract refusals":
            continue
        path = f"/_pag0/v1/sessions/{s.id}/report"
        reply = client.request("GET", "pag0", path, {"authorization": f"Bearer {ADMIN_KEY}"})
        if not checks.expect(reply.status == 200, f"GET {path} answers 200", reply, major=True):
            continue
        report = json.loads(reply.body)
        charged = sum(t.spent for t in s.tallies.values())
        checks.expect(report["totalCost"] == str(charged),
                      f"{s.title}: report totalCost {report['totalCost']} = {charged} charged", reply, major=True)
        out(f"  {s.title}: {usd(int(report['totalCost']))} in {report['totalRequests']} requests")
        for a in report["byAgent"]:
            util = a["budgetUtilization"]
            budget = f" of {usd(int(a['budget']))} ({util:.0%})" if a["budget"] else ""
            out(f"    {a['agentId']:<14} {usd(int(a['cost'])):>8}{budget}  {a['requests']} requests")
            t = s.tallies.get(a["agentId"])
            if t is not None:
                checks.expect(a["cost"] == str(t.spent), f"{s.title}: {a['agentId']} cost in report", reply)
        for code, n in sorted(report["refusals"].items()):
            out(f"    refused: {n} x {code}")
    out()
    out(f"  live page: {client.listener}/_pag0/dashboard#key={ADMIN_KEY}")
    out(f"  JSON:      curl -s -H 'authorization: Bearer {ADMIN_KEY}' {client.listener}/_pag0/v1/sessions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Plays the pag0 demo scenarios against a running Envoy (`make run`).")
    parser.add_argument("--listener", default="http://127.0.0.1:10000",
                        help="Envoy's listener (default %(default)s)")
    parser.add_argument("--reports", default=None, metavar="URL",
                        help="read the report API from this listener instead (another Envoy "
                             "sharing the Redis ledger)")
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="wait up to SECONDS for the listener to come up (default: don't)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print every call, not only the telling ones")
    parser.add_argument("--no-color", action="store_true", help="plain text output")
    args = parser.parse_args(argv)

    global _use_color
    _use_color = (not args.no_color and sys.stdout.isatty()
                  and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb")

    client = Client(args.listener, reports=Client(args.reports) if args.reports else None)
    stop = preflight(client, args.wait)
    if stop is not None:
        return stop

    checks = Checks()
    sessions = []
    try:
        for scenario in (scenario_autopilot, scenario_ralph, scenario_friends, scenario_contract):
            sessions.append(scenario(client, checks, args.verbose))
    except Unreachable as exc:
        out()
        out(f"play.py: lost the listener at {client.listener} in the middle of the demo "
            f"({exc}).\n  Is Envoy still running? Start it with `make run`.")
        return EXIT_UNUSABLE

    summary(sessions)
    try:
        show_reports(client, checks, sessions)
        scenario_ultrawork(client, checks)
        scenario_x402(client, checks)
        scenario_claude_code(client, checks)
        scenario_looper(client, checks)
    except Unreachable as exc:
        out(f"play.py: lost the listener while reading reports ({exc}).")
        return EXIT_UNUSABLE
    out()
    if checks.failures:
        out(paint(f"FAILED: {len(checks.failures)} of {checks.passed + len(checks.failures)} "
                  f"checks differ from the reference session:", "red", "bold"))
        checks.report()
        return EXIT_MISMATCH
    out(paint(f"OK: all {checks.passed} checks match the reference session of PRODUCT.md.",
              "green", "bold"))
    return EXIT_OK


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
