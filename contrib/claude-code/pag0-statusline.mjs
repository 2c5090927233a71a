#!/usr/bin/env node
// pag0 statusline for Claude Code: prints this session's pag0 spend and budget,
// e.g. `pag0 $1.23 / $5.00`.
//
// Claude Code runs the statusLine command with a JSON object on stdin whose
// `session_id` is the id it also sends as X-Claude-Code-Session-Id; with pag0's
// identity.sessionHeader set to x-claude-code-session-id that is the pag0 session.
// The script reads GET {PAG0_URL}{PAG0_PREFIX}/sessions/{id}/budget with the tenant
// key and prints one line. It never throws, never prints a stack trace, always exits
// 0 (a failing statusline command blanks the line) and gives up after
// PAG0_TIMEOUT_MS. No dependencies: Node 18 or later.
//
// Environment (see README.md):
//   PAG0_URL             where Envoy serves pag0 (default http://127.0.0.1:10000)
//   PAG0_API_KEY         the tenant's API key (a tenant key reads its own sessions)
//   PAG0_API_KEY_HEADER  header that carries it (default x-pag0-api-key)
//   PAG0_PREFIX          report API prefix (default /_pag0/v1)
//   PAG0_HOST            Host header to send, when Envoy needs a particular one
//   PAG0_DECIMALS        decimals of the budget's unit (default 6: USDC, 5000000 = $5)
//   PAG0_SYMBOL          currency symbol (default $)
//   PAG0_TIMEOUT_MS      give up after this long (default 1500)
//   PAG0_FLUSH           1: have every worker write its counts first (slower, exact)
//   PAG0_SESSION         session id to show instead of Claude Code's session_id

import http from "node:http";
import https from "node:https";

const env = process.env;
const TIMEOUT_MS = intEnv("PAG0_TIMEOUT_MS", 1500, 50, 60000);
const DECIMALS = intEnv("PAG0_DECIMALS", 6, 0, 36);
const SYMBOL = env.PAG0_SYMBOL ?? "$";
const SESSION_ID = /^[A-Za-z0-9._:@-]{1,128}$/;

let finished = false;

/** Prints the one line and exits 0; only the first call counts. */
function finish(line) {
  if (finished) return;
  finished = true;
  process.stdout.write(`${line}\n`, () => process.exit(0));
  // If stdout is gone, do not linger.
  setTimeout(() => process.exit(0), 200).unref();
}

process.on("uncaughtException", () => finish("pag0 error"));
process.on("unhandledRejection", () => finish("pag0 error"));
// The hard deadline: whatever is pending, answer in time.
setTimeout(() => finish("pag0 timeout"), TIMEOUT_MS + 250).unref();

function intEnv(name, fallback, min, max) {
  const text = (env[name] ?? "").trim();
  if (!/^\d+$/.test(text)) return fallback;
  const n = Number(text);
  return n >= min && n <= max ? n : fallback;
}

/**
 * Claude Code's JSON from stdin: parsed as soon as it is complete (no need to wait for
 * the end of input), null when stdin is a terminal, not JSON, or silent past `ms`.
 */
function readInput(ms) {
  return new Promise((resolve) => {
    if (process.stdin.isTTY) return resolve(null);
    let text = "";
    const timer = setTimeout(() => resolve(parseJson(text)), ms);
    timer.unref();
    const settle = () => {
      clearTimeout(timer);
      resolve(parseJson(text));
    };
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", (chunk) => {
      text += chunk;
      if (text.length > 1 << 20) return settle();
      const parsed = parseJson(text);
      if (parsed !== null) {
        clearTimeout(timer);
        resolve(parsed);
      }
    });
    process.stdin.on("end", settle);
    process.stdin.on("error", settle);
  });
}

/** A decimal string of digits as a BigInt, else null. */
function units(value) {
  return typeof value === "string" && /^\d{1,80}$/.test(value) ? BigInt(value) : null;
}

/** An amount in the smallest unit as money: 1234567 -> "$1.23" (6 decimals). */
function money(amount) {
  const shown = Math.min(2, DECIMALS);
  const step = 10n ** BigInt(DECIMALS - shown);
  const rounded = (amount + step / 2n) / step;
  if (amount > 0n && rounded === 0n) {
    return `<${SYMBOL}${shown ? `0.${"0".repeat(shown - 1)}1` : "1"}`;
  }
  const scale = 10n ** BigInt(shown);
  const whole = (rounded / scale).toString();
  const frac = (rounded % scale).toString().padStart(shown, "0");
  return `${SYMBOL}${whole}${shown ? `.${frac}` : ""}`;
}

/** GET url -> {status, body} or {failure: "unreachable" | "timeout"}. */
function get(url, headers, ms) {
  return new Promise((resolve) => {
    const client = url.protocol === "https:" ? https : http;
    let req;
    const timer = setTimeout(() => {
      resolve({ failure: "timeout" });
      req?.destroy();
    }, ms);
    timer.unref();
    const done = (result) => {
      clearTimeout(timer);
      resolve(result);
    };
    try {
      req = client.request(url, { method: "GET", headers, agent: false }, (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => {
          if (body.length < 1 << 20) body += chunk;
        });
        res.on("end", () => done({ status: res.statusCode, body }));
        res.on("error", () => done({ failure: "unreachable" }));
      });
      req.on("error", () => done({ failure: "unreachable" }));
      req.end();
    } catch {
      done({ failure: "unreachable" });
    }
  });
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** The line for a session's budget JSON (admin.rs budget_json). */
function budgetLine(budget, report) {
  const scope = budget.session;
  const spent = units(scope?.spent);
  const limit = units(scope?.limit);
  const reserved = units(scope?.reserved) ?? 0n;
  let line;
  if (spent !== null && limit !== null) {
    line = `pag0 ${money(spent)} / ${money(limit)}`;
  } else {
    // No session budget in the policy: the spend alone, from the report.
    const total = units(report?.totalCost);
    line = total === null ? "pag0 no session budget" : `pag0 ${money(total)}`;
  }
  if (reserved > 0n) line += ` (+${money(reserved)} reserved)`;
  if (budget.killed === true || budget.killSwitch === "manual") return `${line} ⛔ killed`;
  if (budget.killSwitch) {
    const at = budget.killSwitchThreshold;
    return `${line} ⛔ kill switch${typeof at === "number" ? ` ${Math.round(at * 100)}%` : ""}`;
  }
  const alert = budget.alertOnThreshold;
  if (limit !== null && limit > 0n && typeof alert === "number" && alert > 0) {
    const used = spent + reserved;
    const ppm = BigInt(Math.round(alert * 1e6));
    if (used * 1000000n >= limit * ppm) line += ` ⚠ ${(used * 100n) / limit}%`;
  }
  return line;
}

async function main() {
  const started = Date.now();
  const fixed = (env.PAG0_SESSION || "").trim();
  const id = fixed || (await readInput(TIMEOUT_MS))?.session_id;
  if (typeof id !== "string" || !SESSION_ID.test(id)) return finish("pag0 —");

  let base;
  try {
    base = new URL(env.PAG0_URL || "http://127.0.0.1:10000");
  } catch {
    return finish("pag0 bad PAG0_URL");
  }
  const prefix = `/${(env.PAG0_PREFIX || "/_pag0/v1").replace(/^\/+|\/+$/g, "")}`;
  const root = base.pathname.replace(/\/+$/, "");
  // `flush=false`: what the workers have written (each does within the ledger's
  // flushIntervalMs, 100 ms by default), at once. With PAG0_FLUSH=1 pag0 first asks
  // every worker to write its counts, which can take up to a second.
  const query = env.PAG0_FLUSH === "1" ? "" : "?flush=false";
  const url = (action) =>
    new URL(`${root}${prefix}/sessions/${encodeURIComponent(id)}/${action}${query}`, base);
  const headers = { accept: "application/json" };
  if (env.PAG0_API_KEY) {
    headers[(env.PAG0_API_KEY_HEADER || "x-pag0-api-key").toLowerCase()] = env.PAG0_API_KEY;
  }
  if (env.PAG0_HOST) headers.host = env.PAG0_HOST;
  const left = () => Math.max(50, TIMEOUT_MS - (Date.now() - started));

  const res = await get(url("budget"), headers, left());
  if (res.failure) return finish(`pag0 ${res.failure}`);
  const body = parseJson(res.body);
  const code = body?.error?.code;
  if (res.status === 200 && body && typeof body === "object") {
    let report = null;
    if (!body.session) {
      const more = await get(url("report"), headers, left());
      if (more.status === 200) report = parseJson(more.body);
    }
    return finish(budgetLine(body, report));
  }
  if (res.status === 404 && code === "NOT_FOUND" && body?.error?.details?.sessionId === id) {
    // pag0 has not seen a priced call of this session yet.
    return finish(`pag0 ${money(0n)} (no calls yet)`);
  }
  if (res.status === 401) return finish("pag0 key refused (PAG0_API_KEY)");
  // Not the report API: a 404, or pag0 took the path for an agent call (400 naming the
  // session header it misses).
  if (res.status === 404 || (res.status === 400 && body?.error?.details?.header)) {
    return finish("pag0 API not found (PAG0_URL, PAG0_PREFIX)");
  }
  return finish(`pag0 ${typeof code === "string" ? code : `HTTP ${res.status}`}`);
}

main().catch(() => finish("pag0 error"));
