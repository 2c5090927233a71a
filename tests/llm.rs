//! Token-metered LLM routes (docs/llm.md) through a real Envoy with the built pag0.wasm,
//! with the official `anthropic` and `openai` Python SDKs as the clients
//! (tests/llm/driver.py, in the venv of scripts/ensure-llm-venv.sh) and demo/upstream.py
//! as api.anthropic.com and api.openai.com, answering in their wire formats.
//!
//! The expected cost of every call is computed here, on its own: from the usage the SDK
//! reported to its caller, times the rates of envoy/llm-prices.json, rounded up per call
//! (`ceil(sum(tokens × rate per million) / 1e6)`). A call whose usage never came (an
//! error event, a cut stream, an answer cut short) is expected to cost its reservation,
//! the bound of docs/llm.md: `ceil(((body bytes + 1000 + images × imageTokens + documents
//! × documentTokens + server tools × serverToolTokens) × the highest input-side rate +
//! output limit × n × output rate) / 1e6)`. The ledger (the session report) must equal the
//! sum to the unit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::demo_api::DemoApi;
use support::envoy::{route, EnvoyConfig, RouteSpec};
use support::{ensure, repo_root, unique, Client, Envoy};

const KEY: &str = "demo-key";
const ADMIN: [(&str, &str); 1] = [("authorization", "Bearer demo-admin")];
/// sha256("demo-key") and sha256("demo-admin"), as in envoy/reference.yaml.
const KEY_SHA256: &str = "c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c";
const ADMIN_SHA256: &str = "cce7a2cf1ae045989cfc914fb95a41526f167a838b3c7d33745143614abace7c";
const ANTHROPIC: &str = "api.anthropic.com";
const OPENAI: &str = "api.openai.com";
/// docs/llm.md defaults.
const DEFAULT_MAX_TOKENS: u64 = 4096;
const MIN_OUTPUT_TOKENS: u64 = 1024;
const IMAGE_TOKENS: u64 = 2000;
const SERVER_TOOL_TOKENS: u64 = 100_000;

// --- demo/upstream.py, the stand-in for the providers ------------------------------------

/// demo/upstream.py run by the SDKs' venv python.
fn demo_api() -> DemoApi {
    DemoApi::start(&ensure("ensure-llm-venv.sh"))
}

/// The upstream's record of the request whose body holds `tag`.
fn record_for<'a>(log: &'a [Value], tag: &str) -> Option<&'a Value> {
    log.iter()
        .find(|r| r["body"].as_str().is_some_and(|b| b.contains(tag)))
}

// --- the SDK driver ----------------------------------------------------------------------

/// Runs tests/llm/driver.py on `calls` against `port`; what each client saw, in order.
fn drive(port: u16, parallel: bool, calls: &[Value]) -> Vec<Value> {
    let python = ensure("ensure-llm-venv.sh");
    let plan = json!({
        "base_url": format!("http://127.0.0.1:{port}"),
        "parallel": parallel,
        "calls": calls,
    });
    let mut child = Command::new(python)
        .arg(repo_root().join("tests/llm/driver.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(plan.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "driver output is not JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(results.len(), calls.len());
    results
}

/// One SDK call for the driver. `tag` must appear in the body (it finds the upstream's
/// record of the call).
fn sdk(id: &str, api: &str, kind: &str, headers: Value, body: Value) -> Value {
    let host = if api == "anthropic" {
        ANTHROPIC
    } else {
        OPENAI
    };
    json!({"id": id, "api": api, "kind": kind, "host": host, "headers": headers, "body": body})
}

/// pag0's identity headers (reference names), plus `extra` (demo knobs).
fn ids(session: &str, agent: &str, extra: &[(&str, &str)]) -> Value {
    let mut h = json!({"x-pag0-api-key": KEY, "x-pag0-session": session, "x-pag0-agent": agent});
    for (k, v) in extra {
        h[*k] = json!(v);
    }
    h
}

fn by_id<'a>(results: &'a [Value], id: &str) -> &'a Value {
    results
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no result {id}"))
}

fn header<'a>(r: &'a Value, name: &str) -> Option<&'a str> {
    r["headers"][name].as_str()
}

fn header_u64(r: &Value, name: &str) -> u64 {
    header(r, name)
        .unwrap_or_else(|| panic!("{}: no {name} header: {}", r["id"], r["headers"]))
        .parse()
        .unwrap_or_else(|_| panic!("{}: {name} is not an integer", r["id"]))
}

fn assert_ok(r: &Value) {
    assert!(
        r["ok"] == true && r["status"] == 200,
        "{} failed: status {} error {}",
        r["id"],
        r["status"],
        r["error"]
    );
}

// --- prices and the expected costs -------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Rates {
    input: u128,
    output: u128,
    cache_write_5m: u128,
    cache_write_1h: u128,
    cache_read: u128,
}

impl Rates {
    fn highest_input(&self) -> u128 {
        self.input
            .max(self.cache_write_5m)
            .max(self.cache_write_1h)
            .max(self.cache_read)
    }
}

/// A part of envoy/llm-prices.json: the test's own price table.
struct Table(Vec<(String, Rates)>);

impl Table {
    fn of(globs: &[&str]) -> Table {
        let text = std::fs::read_to_string(repo_root().join("envoy/llm-prices.json")).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let rate = |e: &Value, k: &str| -> u128 { e[k].as_str().unwrap().parse().unwrap() };
        Table(
            globs
                .iter()
                .map(|g| {
                    let e = doc["prices"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|e| e["model"] == *g)
                        .unwrap_or_else(|| panic!("{g} is not in envoy/llm-prices.json"));
                    let rates = Rates {
                        input: rate(e, "input"),
                        output: rate(e, "output"),
                        cache_write_5m: rate(e, "cacheWrite5m"),
                        cache_write_1h: rate(e, "cacheWrite1h"),
                        cache_read: rate(e, "cacheRead"),
                    };
                    (g.to_string(), rates)
                })
                .collect(),
        )
    }

    /// `llm.prices` of a plugin configuration.
    fn json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (g, r) in &self.0 {
            out.insert(
                g.clone(),
                json!({"input": r.input.to_string(), "output": r.output.to_string(),
                       "cacheWrite5m": r.cache_write_5m.to_string(),
                       "cacheWrite1h": r.cache_write_1h.to_string(),
                       "cacheRead": r.cache_read.to_string()}),
            );
        }
        Value::Object(out)
    }

    /// The rates of the most specific matching pattern (most literal characters).
    fn rates(&self, model: &str) -> Rates {
        self.0
            .iter()
            .filter(|(g, _)| glob(g, model))
            .max_by_key(|(g, _)| g.chars().filter(|c| *c != '*').count())
            .unwrap_or_else(|| panic!("no price for {model}"))
            .1
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob(rest, &tail[i..]))
        }
    }
}

fn ceil_units(micro: u128) -> u64 {
    u64::try_from(micro.div_ceil(1_000_000)).unwrap()
}

fn num(v: &Value, key: &str) -> u128 {
    u128::from(v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}")))
}

/// The cost of an Anthropic call from the usage its client saw (driver's shape).
fn anthropic_cost(r: &Rates, u: &Value) -> u64 {
    let write = num(u, "cache_write");
    let (w5, w1) = match (u["cache_5m"].as_u64(), u["cache_1h"].as_u64()) {
        (Some(a), Some(b)) => {
            assert_eq!(u128::from(a + b), write, "cache split disagrees: {u}");
            (u128::from(a), u128::from(b))
        }
        _ => (write, 0),
    };
    ceil_units(
        num(u, "input") * r.input
            + w5 * r.cache_write_5m
            + w1 * r.cache_write_1h
            + num(u, "cache_read") * r.cache_read
            + num(u, "output") * r.output,
    )
}

/// The cost of an OpenAI call (Chat or Responses) from the usage its client saw.
fn openai_cost(r: &Rates, u: &Value) -> u64 {
    let (prompt, cached) = (num(u, "prompt"), num(u, "cached"));
    ceil_units((prompt - cached) * r.input + cached * r.cache_read + num(u, "output") * r.output)
}

/// The reservation of docs/llm.md.
fn bound(r: &Rates, body_bytes: u64, extra_tokens: u64, limit: u64, n: u64) -> u64 {
    let input = u128::from(body_bytes + 1000 + extra_tokens);
    ceil_units(input * r.highest_input() + u128::from(limit) * u128::from(n) * r.output)
}

/// The largest output limit whose bound fits in `remaining`.
fn affordable(r: &Rates, body_bytes: u64, extra_tokens: u64, n: u64, remaining: u64) -> u64 {
    let input = u128::from(body_bytes + 1000 + extra_tokens) * r.highest_input();
    let room = u128::from(remaining) * 1_000_000 - input;
    u64::try_from(room / (u128::from(n) * r.output)).unwrap()
}

/// The output limit a call asked for (None: it set none).
fn limit_of(spec: &Value) -> Option<u64> {
    let b = &spec["body"];
    match spec["api"].as_str().unwrap() {
        "anthropic" => b["max_tokens"].as_u64(),
        "chat" => b["max_completion_tokens"]
            .as_u64()
            .or_else(|| b["max_tokens"].as_u64()),
        _ => b["max_output_tokens"].as_u64(),
    }
}

/// The test's view of a metered configuration.
struct Meter {
    table: Table,
    default_max_tokens: u64,
}

impl Meter {
    fn rates(&self, spec: &Value) -> Rates {
        self.table.rates(spec["body"]["model"].as_str().unwrap())
    }

    /// The token cost of a call whose client saw its usage.
    fn cost(&self, spec: &Value, result: &Value) -> u64 {
        let usage = &result["usage"];
        assert!(usage.is_object(), "{}: the SDK saw no usage", spec["id"]);
        if spec["api"] == "anthropic" {
            anthropic_cost(&self.rates(spec), usage)
        } else {
            openai_cost(&self.rates(spec), usage)
        }
    }

    /// The bound of a call with `limit`, over `body_bytes`.
    fn bound_with(&self, spec: &Value, body_bytes: u64, limit: u64) -> u64 {
        let extra = spec["extraInputTokens"].as_u64().unwrap_or(0);
        let n = spec["body"]["n"].as_u64().unwrap_or(1);
        bound(&self.rates(spec), body_bytes, extra, limit, n)
    }

    /// The bound of a call as the client sent it (its limit, or defaultMaxTokens).
    fn bound(&self, spec: &Value, result: &Value) -> u64 {
        let limit = limit_of(spec).unwrap_or(self.default_max_tokens);
        self.bound_with(spec, sent_bytes(result), limit)
    }

    /// The bounds a reservation may be: over the bytes the client sent, or over the body
    /// pag0 passed on when it rewrote it (docs/llm.md does not say which length counts
    /// once a field is written).
    fn bounds(&self, spec: &Value, result: &Value, record: Option<&Value>, limit: u64) -> Vec<u64> {
        let mut out = vec![self.bound_with(spec, sent_bytes(result), limit)];
        if let Some(bytes) = record.and_then(|r| r["bodyBytes"].as_u64()) {
            out.push(self.bound_with(spec, bytes, limit));
        }
        out
    }
}

fn sent_bytes(result: &Value) -> u64 {
    result["sent"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: the driver saw no request", result["id"]))
}

// --- configurations and the report API ---------------------------------------------------

/// A plugin configuration with the reference tenant and admin keys, one policy and an
/// `llm` block.
fn plugin(policy: Value, llm: Value, identity: Option<Value>) -> String {
    let mut cfg = json!({
        "tenants": [{"id": "demo", "apiKeySha256": KEY_SHA256}],
        "admin": {"apiKeySha256": ADMIN_SHA256},
        "policies": {"p": policy},
        "llm": llm,
    });
    if let Some(identity) = identity {
        cfg["identity"] = identity;
    }
    cfg.to_string()
}

fn anthropic_route() -> RouteSpec {
    route(
        ANTHROPIC,
        "/v1/messages",
        &[("meter", "anthropic"), ("tool", "llm")],
    )
}

fn openai_routes() -> Vec<RouteSpec> {
    vec![
        route(
            OPENAI,
            "/v1/chat/completions",
            &[("meter", "openai"), ("tool", "llm")],
        ),
        route(
            OPENAI,
            "/v1/responses",
            &[("meter", "openai"), ("tool", "llm")],
        ),
    ]
}

fn admin(port: u16, path: &str) -> support::Response {
    Client::new(port).get("admin.local", path, &ADMIN)
}

/// The session report once nothing is reserved any more (the last settles may follow
/// the end of the answer by a moment).
fn settled_report(port: u16, session: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin(port, &format!("/_pag0/v1/sessions/{session}/report"));
        let body = String::from_utf8_lossy(&r.body).into_owned();
        if r.status == 200 {
            let report = r.json();
            if report["reserved"].as_str().is_none_or(|v| v == "0") {
                return report;
            }
        }
        assert!(
            Instant::now() < deadline,
            "report of {session} not settled: {} {body}",
            r.status
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn budget(port: u16, session: &str) -> Value {
    let r = admin(port, &format!("/_pag0/v1/sessions/{session}/budget"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn total_cost(report: &Value) -> u64 {
    report["totalCost"]
        .as_str()
        .unwrap_or_else(|| panic!("no totalCost: {report}"))
        .parse()
        .unwrap()
}

/// The report's count of unmetered calls: a top-level `unmetered` integer, or
/// `unmeteredCalls.count` (the shape src/core/admin.rs has).
fn unmetered(report: &Value) -> u64 {
    report["unmetered"]
        .as_u64()
        .or_else(|| report["unmeteredCalls"]["count"].as_u64())
        .unwrap_or_else(|| panic!("the report counts no unmetered calls: {report}"))
}

fn by_model(report: &Value, model: &str, glob: &str) -> Value {
    report["byModel"]
        .as_array()
        .unwrap_or_else(|| panic!("no byModel: {report}"))
        .iter()
        .find(|m| m["model"] == model || m["model"] == glob)
        .cloned()
        .unwrap_or_else(|| panic!("no {model} in byModel: {}", report["byModel"]))
}

fn by_agent(report: &Value, agent: &str) -> Value {
    report["byAgent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agentId"] == agent)
        .cloned()
        .unwrap_or_else(|| panic!("no {agent} in byAgent: {}", report["byAgent"]))
}

/// Token totals a report entry must show: (input, output, cacheWrite, cacheRead).
#[derive(Default, Debug, PartialEq, Clone, Copy)]
struct Tokens(u64, u64, u64, u64);

impl Tokens {
    /// The tokens of a call by their rate: OpenAI's cached tokens are a part of its
    /// prompt, counted at the cache-read rate, so not as input.
    fn of(spec: &Value, usage: &Value) -> Tokens {
        let g = |k: &str| usage[k].as_u64().unwrap();
        if spec["api"] == "anthropic" {
            Tokens(g("input"), g("output"), g("cache_write"), g("cache_read"))
        } else {
            Tokens(g("prompt") - g("cached"), g("output"), 0, g("cached"))
        }
    }

    fn add(&mut self, o: Tokens) {
        self.0 += o.0;
        self.1 += o.1;
        self.2 += o.2;
        self.3 += o.3;
    }

    fn assert_in(&self, entry: &Value, what: &str) {
        let t = &entry["tokens"];
        let got = Tokens(
            t["input"].as_u64().unwrap_or(0),
            t["output"].as_u64().unwrap_or(0),
            t["cacheWrite"].as_u64().unwrap_or(0),
            t["cacheRead"].as_u64().unwrap_or(0),
        );
        assert_eq!(
            got, *self,
            "{what}: tokens (input, output, cacheWrite, cacheRead) in {entry}"
        );
    }
}

/// Per model: (cost, requests, tokens) of the metered calls.
fn model_totals(meter: &Meter, calls: &[(&Value, &Value)]) -> HashMap<String, (u64, u64, Tokens)> {
    let mut out: HashMap<String, (u64, u64, Tokens)> = HashMap::new();
    for (spec, result) in calls {
        let model = spec["body"]["model"].as_str().unwrap().to_string();
        let e = out.entry(model).or_default();
        e.0 += meter.cost(spec, result);
        e.1 += 1;
        e.2.add(Tokens::of(spec, &result["usage"]));
    }
    out
}

fn assert_by_model(report: &Value, meter: &Meter, calls: &[(&Value, &Value)]) {
    for (model, (cost, requests, tokens)) in model_totals(meter, calls) {
        let glob = meter
            .table
            .0
            .iter()
            .filter(|(g, _)| glob(g, &model))
            .max_by_key(|(g, _)| g.chars().filter(|c| *c != '*').count())
            .map(|(g, _)| g.clone())
            .unwrap();
        let entry = by_model(report, &model, &glob);
        assert_eq!(entry["cost"], cost.to_string(), "byModel {model}: {entry}");
        assert_eq!(entry["requests"], requests, "byModel {model}: {entry}");
        tokens.assert_in(&entry, &format!("byModel {model}"));
    }
}

/// The session's spend never above its budget, nothing left reserved.
fn assert_budget_settled(port: u16, session: &str, spent: u64) {
    let b = budget(port, session);
    let s = &b["session"];
    assert_eq!(s["spent"], spent.to_string(), "{b}");
    assert_eq!(s["reserved"], "0", "{b}");
    let limit: u64 = s["limit"].as_str().unwrap().parse().unwrap();
    assert!(spent <= limit, "spent {spent} above the budget {limit}");
}

/// The refusal of a metered Anthropic route: pag0's code in Anthropic's error shape.
fn assert_anthropic_refusal(r: &Value, status: u16, code: &str) {
    assert_eq!(r["ok"], false, "{} was not refused", r["id"]);
    assert_eq!(r["status"], status, "{}: {}", r["id"], r["error"]);
    assert_eq!(header(r, "x-pag0-error"), Some(code), "{}", r["id"]);
    let raw = r["error"]["raw"].as_str().unwrap_or("");
    let body: Value = serde_json::from_str(raw)
        .unwrap_or_else(|_| panic!("{}: refusal body is not JSON: {raw}", r["id"]));
    assert_anthropic_error_shape(&body, status, code);
}

fn assert_anthropic_error_shape(body: &Value, status: u16, code: &str) {
    assert_eq!(body["type"], "error", "{body}");
    let kind = body["error"]["type"].as_str().unwrap_or("");
    let want: &[&str] = match status {
        400 => &["invalid_request_error"],
        403 => &["permission_error"],
        413 => &["request_too_large", "invalid_request_error"],
        _ => &[],
    };
    assert!(
        want.is_empty() || want.contains(&kind),
        "error.type {kind:?} for {status}: {body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("pag0") && message.contains(code),
        "message: {body}"
    );
}

fn assert_openai_error_shape(body: &Value, status: u16, code: &str) {
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| m.starts_with("pag0")),
        "{body}"
    );
    let kind = e["type"].as_str().unwrap_or("");
    match status {
        400 | 413 => assert_eq!(kind, "invalid_request_error", "{body}"),
        403 if code.ends_with("_BUDGET_EXCEEDED") => {
            assert_eq!(kind, "insufficient_quota", "{body}")
        }
        _ => assert!(!kind.is_empty(), "{body}"),
    }
}

fn tag(id: &str, nonce: &str) -> String {
    format!("<call {id} {nonce}>")
}

/// A system prompt of about `n` × 75 bytes.
fn long_text(nonce: &str, n: usize) -> String {
    format!("[{nonce}] You are a careful coding agent working in a large repository. ").repeat(n)
}

// --- the oracle: the drivers against the upstream alone ----------------------------------

/// Before pag0 is in the path: demo/upstream.py's own self-test passes, and the usage the
/// driver reports for every kind of call is the usage the upstream answered.
#[test]
fn the_sdk_drivers_read_the_usage_the_upstream_answered() {
    let api = demo_api();
    let python = ensure("ensure-llm-venv.sh");
    let out = Command::new(python)
        .arg(repo_root().join("demo/llm_selftest.py"))
        .args(["--upstream", &format!("http://127.0.0.1:{}", api.port)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llm_selftest: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let nonce = unique("oracle");
    let system = long_text(&nonce, 20);
    let a = |id: &str, kind: &str, knobs: &[(&str, &str)]| {
        sdk(
            id,
            "anthropic",
            kind,
            ids("s", "a", knobs),
            json!({"model": "claude-haiku-4-5", "max_tokens": 1024,
                   "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                   "messages": [{"role": "user", "content": tag(id, &nonce)}]}),
        )
    };
    let calls = vec![
        a("a1", "create", &[]),
        a("a2", "stream", &[("x-demo-deltas", "3")]),
        a("a3", "raw_stream", &[("x-demo-chunk-bytes", "7")]),
        a("a4", "raw_stream", &[("x-demo-delta-usage", "full")]),
        sdk(
            "c1",
            "chat",
            "stream",
            ids("s", "a", &[]),
            json!({"model": "o4-mini", "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": tag("c1", &nonce)}]}),
        ),
        sdk(
            "r1",
            "responses",
            "stream",
            ids("s", "a", &[]),
            json!({"model": "gpt-4o-mini", "input": tag("r1", &nonce)}),
        ),
        sdk(
            "r2",
            "responses",
            "create",
            ids("s", "a", &[]),
            json!({"model": "o4-mini", "input": tag("r2", &nonce)}),
        ),
    ];
    let results = drive(api.port, false, &calls);
    let log = api.log();
    for (spec, r) in calls.iter().zip(&results) {
        assert_ok(r);
        let id = r["id"].as_str().unwrap();
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        let u = &record["usage"];
        assert_eq!(
            record["bodyBytes"].as_u64(),
            r["sent"]["bytes"].as_u64(),
            "{id}"
        );
        let seen = &r["usage"];
        let want = match spec["api"].as_str().unwrap() {
            "anthropic" => json!({
                "input": u["input_tokens"], "output": u["output_tokens"],
                "cache_write": u["cache_creation_input_tokens"],
                "cache_read": u["cache_read_input_tokens"],
                "cache_5m": u["cache_creation"]["ephemeral_5m_input_tokens"],
                "cache_1h": u["cache_creation"]["ephemeral_1h_input_tokens"]}),
            "chat" => json!({
                "prompt": u["prompt_tokens"], "cached": u["prompt_tokens_details"]["cached_tokens"],
                "output": u["completion_tokens"],
                "reasoning": u["completion_tokens_details"]["reasoning_tokens"]}),
            _ => json!({
                "prompt": u["input_tokens"], "cached": u["input_tokens_details"]["cached_tokens"],
                "output": u["output_tokens"],
                "reasoning": u["output_tokens_details"]["reasoning_tokens"]}),
        };
        assert_eq!(seen, &want, "{id}: the SDK's usage against the upstream's");
    }
    assert!(by_id(&results, "a1")["usage"]["cache_5m"].as_u64() > Some(0));
    assert!(by_id(&results, "a2")["usage"]["cache_read"].as_u64() > Some(0));
    assert_eq!(by_id(&results, "a2")["deltas"].as_array().unwrap().len(), 3);
    assert!(by_id(&results, "c1")["usage"]["reasoning"].as_u64() > Some(0));
}

// --- 1. Anthropic through the reference configuration ------------------------------------

fn reference_meter() -> Meter {
    Meter {
        table: Table::of(&[
            "claude-opus-5-5*",
            "claude-sonnet-4-5*",
            "claude-haiku-4-5*",
            "claude-opus-4-1*",
        ]),
        default_max_tokens: DEFAULT_MAX_TOKENS,
    }
}

/// Non-streamed and streamed calls of the anthropic SDK through envoy/reference.yaml:
/// prompt caching (5m and 1h writes, reads), several cumulative message_delta events,
/// events split at odd byte offsets, the beta path Claude Code uses, server tools and
/// images in the bound. Each non-streamed answer says its token cost, each streamed one
/// its reservation; the ledger is the sum of the token costs to the unit.
#[test]
fn anthropic_sdk_calls_through_the_reference_config_cost_their_tokens() {
    let api = demo_api();
    let envoy = Envoy::reference(api.port);
    let meter = reference_meter();
    let s = unique("llm-anthropic");
    let nonce = unique("n");
    let system = long_text(&nonce, 40);
    let cached_system =
        json!([{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]);
    let h = |knobs: &[(&str, &str)]| ids(&s, "autopilot-llm", knobs);
    let user = |id: &str| json!([{"role": "user", "content": tag(id, &nonce)}]);
    let tool = json!({"name": "read_file", "description": format!("Read a file of the repository ({nonce})"),
                      "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                                       "required": ["path"]},
                      "cache_control": {"type": "ephemeral", "ttl": "1h"}});
    let mut a3 = sdk(
        "a3",
        "anthropic",
        "raw_stream",
        h(&[]),
        json!({"model": "claude-opus-5-5", "max_tokens": 2048, "tools": [tool],
               "system": cached_system,
               "messages": [{"role": "user", "content": [{"type": "text", "text": tag("a3", &nonce)}]}]}),
    );
    a3["beta"] = json!(true);
    a3["query"] = json!({"beta": "true"});
    let mut a8 = sdk(
        "a8",
        "anthropic",
        "stream",
        h(&[]),
        json!({"model": "claude-haiku-4-5", "max_tokens": 1024,
               "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
               "messages": [{"role": "user", "content": [
                   {"type": "image", "source": {"type": "url", "url": "https://example.com/diagram.png"}},
                   {"type": "text", "text": tag("a8", &nonce)}]}]}),
    );
    a8["extraInputTokens"] = json!(SERVER_TOOL_TOKENS + IMAGE_TOKENS);
    let calls = vec![
        // A 5m cache write, then reads of it.
        sdk(
            "a1",
            "anthropic",
            "create",
            h(&[]),
            json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": cached_system, "messages": user("a1")}),
        ),
        sdk(
            "a2",
            "anthropic",
            "stream",
            h(&[]),
            json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": cached_system, "messages": user("a2")}),
        ),
        // 1h (tools) and 5m (system) writes on the path Claude Code calls.
        a3,
        // Four cumulative message_delta events: input and cache counts change after
        // message_start.
        sdk(
            "a4",
            "anthropic",
            "stream",
            h(&[("x-demo-deltas", "4")]),
            json!({"model": "claude-haiku-4-5", "max_tokens": 1024, "messages": user("a4")}),
        ),
        // Every event split at odd byte offsets across chunks, a cache read.
        sdk(
            "a5",
            "anthropic",
            "stream",
            h(&[("x-demo-chunk-bytes", "7"), ("x-demo-output-tokens", "300")]),
            json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": cached_system, "messages": user("a5")}),
        ),
        // The last message_delta repeats input and cache counts.
        sdk(
            "a6",
            "anthropic",
            "raw_stream",
            h(&[("x-demo-delta-usage", "full")]),
            json!({"model": "claude-haiku-4-5", "max_tokens": 1024, "system": cached_system, "messages": user("a6")}),
        ),
        // A JSON answer in 5-byte pieces, the costliest model.
        sdk(
            "a7",
            "anthropic",
            "create",
            h(&[("x-demo-chunk-bytes", "5")]),
            json!({"model": "claude-opus-4-1", "max_tokens": 2000, "messages": user("a7")}),
        ),
        // A server tool and an image by URL: their allowances are in the bound.
        a8,
    ];
    let results = drive(envoy.port, false, &calls);
    let log = api.log();
    let mut expected = 0;
    for (spec, r) in calls.iter().zip(&results) {
        assert_ok(r);
        let id = r["id"].as_str().unwrap();
        let cost = meter.cost(spec, r);
        expected += cost;
        let streamed = spec["kind"] != "create";
        let want = if streamed { meter.bound(spec, r) } else { cost };
        assert_eq!(
            header_u64(r, "x-pag0-cost"),
            want,
            "{id}: x-pag0-cost ({})",
            if streamed {
                "streamed: the reservation"
            } else {
                "the token cost"
            }
        );
        assert_eq!(
            header(r, "x-pag0-max-tokens"),
            None,
            "{id}: nothing lowered"
        );
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        assert_eq!(
            record["body"].as_str(),
            r["sent"]["body"].as_str(),
            "{id}: the body passed byte for byte"
        );
        assert_eq!(
            record["headers"]["accept-encoding"], "identity",
            "{id}: pag0 asks for an uncompressed answer"
        );
        assert!(
            record["headers"]
                .as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("x-pag0-")),
            "{id}: {}",
            record["headers"]
        );
    }
    // The cases are what they claim to be.
    let u = |id: &str, k: &str| by_id(&results, id)["usage"][k].as_u64().unwrap();
    assert!(u("a1", "cache_5m") > 0 && u("a2", "cache_read") > 0);
    assert!(u("a3", "cache_1h") > 0 && u("a3", "cache_5m") > 0);
    assert_eq!(
        by_id(&results, "a3")["sent"]["path"],
        "/v1/messages?beta=true"
    );
    assert_eq!(by_id(&results, "a4")["deltas"].as_array().unwrap().len(), 4);
    assert!(u("a5", "cache_read") > 0 && u("a5", "output") == 300);
    let report = settled_report(envoy.port, &s);
    assert_eq!(total_cost(&report), expected, "the ledger: {report}");
    assert_eq!(report["totalRequests"], calls.len() as u64);
    assert_eq!(unmetered(&report), 0);
    let agent = by_agent(&report, "autopilot-llm");
    assert_eq!(agent["cost"], expected.to_string());
    let pairs: Vec<(&Value, &Value)> = calls.iter().zip(&results).collect();
    assert_by_model(&report, &meter, &pairs);
    assert_budget_settled(envoy.port, &s, expected);
}

/// A request with no max_tokens gets defaultMaxTokens (4096 by default) written into it.
#[test]
fn an_anthropic_request_without_max_tokens_gets_the_default_limit() {
    let api = demo_api();
    let envoy = Envoy::reference(api.port);
    let meter = reference_meter();
    let s = unique("llm-default");
    let nonce = unique("n");
    let body = json!({"model": "claude-haiku-4-5",
                      "messages": [{"role": "user", "content": tag("d1", &nonce)}]})
    .to_string();
    let mut headers = support::agent_headers(KEY, &s, "autopilot-llm");
    headers.push(("content-type", "application/json"));
    let r = Client::new(envoy.port).post(ANTHROPIC, "/v1/messages", &headers, &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let record = record_for(&api.log(), &tag("d1", &nonce)).cloned().unwrap();
    assert_eq!(record["request"]["max_tokens"], DEFAULT_MAX_TOKENS);
    let usage = &r.json()["usage"];
    let cost = anthropic_cost(
        &meter.table.rates("claude-haiku-4-5"),
        &json!({"input": usage["input_tokens"], "output": usage["output_tokens"],
                "cache_write": usage["cache_creation_input_tokens"],
                "cache_read": usage["cache_read_input_tokens"],
                "cache_5m": usage["cache_creation"]["ephemeral_5m_input_tokens"],
                "cache_1h": usage["cache_creation"]["ephemeral_1h_input_tokens"]}),
    );
    assert_eq!(r.cost(), cost);
    assert_eq!(total_cost(&settled_report(envoy.port, &s)), cost);
}

/// Calls whose usage never comes: an error event mid-stream, a stream the upstream cuts,
/// a JSON answer cut short. Each is charged exactly its reservation and counted
/// unmetered; a normal call beside them costs its tokens.
#[test]
fn anthropic_calls_without_usage_are_charged_their_reservation() {
    let api = demo_api();
    let envoy = Envoy::reference(api.port);
    let meter = reference_meter();
    let s = unique("llm-unmetered");
    let nonce = unique("n");
    let h = |knobs: &[(&str, &str)]| ids(&s, "autopilot-llm", knobs);
    let body = |id: &str, model: &str, max: u64| {
        json!({"model": model, "max_tokens": max,
               "messages": [{"role": "user", "content": tag(id, &nonce)}]})
    };
    let calls = vec![
        sdk(
            "u1",
            "anthropic",
            "stream",
            h(&[("x-demo-error-event", "1")]),
            body("u1", "claude-sonnet-4-5", 3000),
        ),
        // Cut after message_start and a few text deltas, before any message_delta.
        sdk(
            "u2",
            "anthropic",
            "raw_stream",
            h(&[
                ("x-demo-output-tokens", "200"),
                ("x-demo-cut-after-bytes", "2000"),
            ]),
            body("u2", "claude-opus-5-5", 5000),
        ),
        // A JSON answer cut after 100 bytes: pag0 cannot read its usage.
        sdk(
            "u3",
            "anthropic",
            "create",
            h(&[("x-demo-cut-after-bytes", "100")]),
            body("u3", "claude-haiku-4-5", 1500),
        ),
        sdk(
            "u4",
            "anthropic",
            "stream",
            h(&[]),
            body("u4", "claude-haiku-4-5", 1024),
        ),
    ];
    let results = drive(envoy.port, false, &calls);
    let log = api.log();
    // u1: the SDK raised the error event, after headers that said the reservation.
    let u1 = &results[0];
    assert_eq!(u1["ok"], false);
    assert_eq!(u1["error"]["class"], "APIStatusError", "{u1}");
    assert!(u1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("overloaded_error"));
    assert_eq!(header_u64(u1, "x-pag0-cost"), meter.bound(&calls[0], u1));
    // u2: message_start arrived, no message_delta, then the connection broke.
    let u2 = &results[1];
    assert_eq!(u2["ok"], false, "{u2}");
    let events: Vec<&str> = u2["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(events.contains(&"message_start") && !events.contains(&"message_delta"));
    assert_eq!(header_u64(u2, "x-pag0-cost"), meter.bound(&calls[1], u2));
    assert_eq!(
        record_for(&log, &tag("u2", &nonce)).unwrap()["outcome"],
        "cut"
    );
    // u3: the client got no answer it could read.
    assert_eq!(results[2]["ok"], false, "{}", results[2]);
    assert_eq!(
        record_for(&log, &tag("u3", &nonce)).unwrap()["outcome"],
        "cut"
    );
    assert_ok(&results[3]);
    let reservations: u64 = (0..3).map(|i| meter.bound(&calls[i], &results[i])).sum();
    let cost = meter.cost(&calls[3], &results[3]);
    let report = settled_report(envoy.port, &s);
    assert_eq!(unmetered(&report), 3, "{report}");
    if let Some(amount) = report["unmeteredCalls"]["amount"].as_str() {
        assert_eq!(amount, reservations.to_string());
    }
    assert_eq!(total_cost(&report), reservations + cost, "{report}");
    assert_budget_settled(envoy.port, &s, reservations + cost);
}

// --- 2. OpenAI ---------------------------------------------------------------------------

fn openai_meter(default_max_tokens: u64) -> Meter {
    Meter {
        table: Table::of(&["gpt-4o-mini", "o4-mini"]),
        default_max_tokens,
    }
}

fn openai_envoy(api: &DemoApi, meter: &Meter, policy: Value) -> Envoy {
    let llm = json!({"prices": meter.table.json(), "defaultMaxTokens": meter.default_max_tokens});
    let cfg = EnvoyConfig::new(&plugin(policy, llm, None), openai_routes());
    Envoy::with_config(&cfg, api.port)
}

/// Chat Completions (non-streamed, streamed with and without include_usage, n = 2) and
/// the Responses API (non-streamed, streamed, cut short by max_output_tokens), gpt-4o-mini
/// with automatic prompt caching and o4-mini with reasoning tokens. pag0 asks for the
/// usage chunk a client did not ask for, and the SDK sees it.
#[test]
fn openai_sdk_chat_and_responses_cost_their_tokens() {
    let api = demo_api();
    let meter = openai_meter(DEFAULT_MAX_TOKENS);
    let envoy = openai_envoy(&api, &meter, json!({"sessionBudget": "5000000"}));
    let s = unique("llm-openai");
    let nonce = unique("n");
    let h = |knobs: &[(&str, &str)]| ids(&s, "coder-1", knobs);
    // Over 1024 tokens: the upstream caches its prefix.
    let system = json!({"role": "system", "content": long_text(&nonce, 70)});
    let chat = |id: &str, model: &str, extra: Value| {
        let mut b = json!({"model": model, "messages": [system, {"role": "user", "content": tag(id, &nonce)}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let instructions = long_text(&nonce, 71);
    let calls = vec![
        sdk(
            "c1",
            "chat",
            "create",
            h(&[]),
            chat("c1", "gpt-4o-mini", json!({"max_completion_tokens": 800})),
        ),
        sdk(
            "c2",
            "chat",
            "stream",
            h(&[]),
            chat(
                "c2",
                "gpt-4o-mini",
                json!({"max_tokens": 600, "stream_options": {"include_usage": true}}),
            ),
        ),
        // No stream_options: pag0 adds include_usage.
        sdk(
            "c3",
            "chat",
            "stream",
            h(&[]),
            chat("c3", "gpt-4o-mini", json!({"max_completion_tokens": 700})),
        ),
        // Two choices: the bound counts the output limit twice.
        sdk(
            "c4",
            "chat",
            "stream",
            h(&[]),
            chat(
                "c4",
                "gpt-4o-mini",
                json!({"max_completion_tokens": 500, "n": 2, "stream_options": {"include_usage": true}}),
            ),
        ),
        sdk(
            "c5",
            "chat",
            "create",
            h(&[]),
            chat("c5", "o4-mini", json!({"max_completion_tokens": 3000})),
        ),
        // A reasoning model streamed in 5-byte pieces, usage asked for by pag0.
        sdk(
            "c6",
            "chat",
            "stream",
            h(&[("x-demo-chunk-bytes", "5")]),
            chat("c6", "o4-mini", json!({"max_completion_tokens": 2000})),
        ),
        sdk(
            "r1",
            "responses",
            "create",
            h(&[]),
            json!({"model": "gpt-4o-mini", "instructions": instructions, "input": tag("r1", &nonce),
                   "max_output_tokens": 900}),
        ),
        sdk(
            "r2",
            "responses",
            "stream",
            h(&[]),
            json!({"model": "gpt-4o-mini", "instructions": instructions,
                   "input": [{"role": "user", "content": tag("r2", &nonce)}], "max_output_tokens": 900}),
        ),
        // Cut short by max_output_tokens: the usage comes in response.incomplete.
        sdk(
            "r3",
            "responses",
            "stream",
            h(&[]),
            json!({"model": "o4-mini", "input": tag("r3", &nonce), "max_output_tokens": 6}),
        ),
        sdk(
            "r4",
            "responses",
            "create",
            h(&[("x-demo-chunk-bytes", "3")]),
            json!({"model": "o4-mini", "input": tag("r4", &nonce), "max_output_tokens": 5000}),
        ),
    ];
    let results = drive(envoy.port, false, &calls);
    let log = api.log();
    let mut expected = 0;
    for (spec, r) in calls.iter().zip(&results) {
        assert_ok(r);
        let id = r["id"].as_str().unwrap();
        let cost = meter.cost(spec, r);
        expected += cost;
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        if spec["kind"] == "create" {
            assert_eq!(header_u64(r, "x-pag0-cost"), cost, "{id}: the token cost");
        } else {
            let limit = limit_of(spec).unwrap();
            let bounds = meter.bounds(spec, r, Some(record), limit);
            let got = header_u64(r, "x-pag0-cost");
            assert!(
                bounds.contains(&got),
                "{id}: x-pag0-cost {got}, the reservation is {bounds:?}"
            );
        }
        assert_eq!(header(r, "x-pag0-max-tokens"), None, "{id}");
        assert_eq!(record["headers"]["accept-encoding"], "identity", "{id}");
    }
    let get = |id: &str| by_id(&results, id);
    // Prompt caching and reasoning are in play.
    assert!(get("c2")["usage"]["cached"].as_u64() >= Some(1024));
    assert!(get("r2")["usage"]["cached"].as_u64() >= Some(1024));
    assert!(get("c5")["usage"]["reasoning"].as_u64() > Some(0));
    assert_eq!(get("r3")["stopReason"], "incomplete");
    assert_eq!(get("r3")["usage"]["output"], 6);
    // The usage chunks pag0 asked for reached the SDK, as the last chunk.
    for id in ["c3", "c6"] {
        let r = get(id);
        assert_eq!(r["usageChunks"], 1, "{id}: {r}");
        assert_eq!(r["lastChunkChoices"], 0, "{id}");
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        assert_eq!(
            record["request"]["stream_options"]["include_usage"], true,
            "{id}: {}",
            record["request"]
        );
        assert!(!r["sent"]["body"]
            .as_str()
            .unwrap()
            .contains("stream_options"));
    }
    let report = settled_report(envoy.port, &s);
    assert_eq!(total_cost(&report), expected, "the ledger: {report}");
    assert_eq!(unmetered(&report), 0);
    let pairs: Vec<(&Value, &Value)> = calls.iter().zip(&results).collect();
    assert_by_model(&report, &meter, &pairs);
    assert_budget_settled(envoy.port, &s, expected);
}

/// OpenAI streams whose usage never comes (an error chunk in Chat, an error event in the
/// Responses API, a Chat stream cut before its usage chunk) cost their reservation.
#[test]
fn openai_streams_without_usage_are_charged_their_reservation() {
    let api = demo_api();
    let meter = openai_meter(DEFAULT_MAX_TOKENS);
    let envoy = openai_envoy(&api, &meter, json!({"sessionBudget": "5000000"}));
    let s = unique("llm-openai-unmetered");
    let nonce = unique("n");
    let h = |knobs: &[(&str, &str)]| ids(&s, "coder-1", knobs);
    let messages = |id: &str| json!([{"role": "user", "content": tag(id, &nonce)}]);
    let calls = vec![
        sdk(
            "e1",
            "chat",
            "stream",
            h(&[("x-demo-error-event", "1")]),
            json!({"model": "gpt-4o-mini", "messages": messages("e1"), "max_completion_tokens": 4000,
                   "stream_options": {"include_usage": true}}),
        ),
        sdk(
            "e2",
            "responses",
            "stream",
            h(&[("x-demo-error-event", "1")]),
            json!({"model": "o4-mini", "input": tag("e2", &nonce), "max_output_tokens": 1000}),
        ),
        sdk(
            "e3",
            "chat",
            "stream",
            h(&[
                ("x-demo-output-tokens", "400"),
                ("x-demo-cut-after-bytes", "1500"),
            ]),
            json!({"model": "o4-mini", "messages": messages("e3"), "max_completion_tokens": 3000,
                   "stream_options": {"include_usage": true}}),
        ),
        sdk(
            "ok",
            "chat",
            "stream",
            h(&[]),
            json!({"model": "gpt-4o-mini", "messages": messages("ok"), "max_completion_tokens": 100,
                   "stream_options": {"include_usage": true}}),
        ),
    ];
    let results = drive(envoy.port, false, &calls);
    let mut reservations = 0;
    for (spec, r) in calls.iter().zip(&results).take(3) {
        // The SDKs raise on an error chunk or a cut stream; the Responses stream helper
        // hands an `error` event to its caller instead.
        let saw_error = r["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e == "error"));
        assert!(
            r["ok"] == false || saw_error,
            "{} should fail on the client: {r}",
            r["id"]
        );
        let want = meter.bound(spec, r);
        assert_eq!(header_u64(r, "x-pag0-cost"), want, "{}", r["id"]);
        reservations += want;
    }
    assert_ok(&results[3]);
    let cost = meter.cost(&calls[3], &results[3]);
    let report = settled_report(envoy.port, &s);
    assert_eq!(unmetered(&report), 3, "{report}");
    assert_eq!(total_cost(&report), reservations + cost, "{report}");
    assert_budget_settled(envoy.port, &s, reservations + cost);
}

// --- 3. many streams against one session budget -----------------------------------------

/// 100 streamed calls at once in one session whose budget holds 20.5 of their bounds:
/// 20 go with their own max_tokens, one with max_tokens lowered to what is left (the
/// upstream sees exactly that), and the 79 left, which cannot afford minOutputTokens, are
/// refused SESSION_BUDGET_EXCEEDED in Anthropic's error shape. The session never goes
/// over its budget and the ledger is the sum of the real costs.
#[test]
fn a_hundred_parallel_streams_never_overspend_the_session() {
    const CALLS: usize = 100;
    const MAX: u64 = 8000;
    let api = demo_api();
    let meter = Meter {
        table: Table::of(&["claude-haiku-4-5*"]),
        default_max_tokens: DEFAULT_MAX_TOKENS,
    };
    let nonce = unique("n");
    let s = unique("llm-parallel");
    // Every body has the same length (ids of 3 digits), so every bound is the same.
    let spec = |i: usize| {
        let id = format!("p{i:03}");
        sdk(
            &id,
            "anthropic",
            "stream",
            ids(
                &s,
                &format!("worker-{}", i % 4),
                &[
                    ("x-demo-delay-ms", "1500"),
                    ("x-demo-output-tokens", "100000"),
                ],
            ),
            json!({"model": "claude-haiku-4-5", "max_tokens": MAX,
                   "messages": [{"role": "user", "content": tag(&id, &nonce)}]}),
        )
    };
    // The body length, measured on the upstream alone.
    let probe = drive(api.port, false, &[spec(0)]);
    assert_ok(&probe[0]);
    let bytes = sent_bytes(&probe[0]);
    let rates = meter.table.rates("claude-haiku-4-5");
    let full = bound(&rates, bytes, 0, MAX, 1);
    let floor = bound(&rates, bytes, 0, MIN_OUTPUT_TOKENS, 1);
    let session_budget = 20 * full + full / 2;
    api.reset();
    assert!(full / 2 > floor, "the remainder must afford a lowered call");
    let llm = json!({"prices": meter.table.json()});
    let cfg = EnvoyConfig::new(
        &plugin(
            json!({"sessionBudget": session_budget.to_string()}),
            llm,
            None,
        ),
        vec![anthropic_route()],
    );
    let envoy = Envoy::with_config(&cfg, api.port);
    let calls: Vec<Value> = (0..CALLS).map(spec).collect();
    let results = drive(envoy.port, true, &calls);
    let log = api.log();
    let mut expected = 0;
    let (mut whole, mut lowered, mut refused) = (0, Vec::new(), 0);
    for (spec, r) in calls.iter().zip(&results) {
        let id = r["id"].as_str().unwrap();
        if let Some(v) = header(r, "x-pag0-budget-remaining") {
            for item in v.split(',') {
                let (k, n) = item.trim().split_once('=').unwrap();
                let n: i128 = n.parse().unwrap_or_else(|_| panic!("{id}: {v}"));
                assert!(n >= 0, "{id}: {k} remaining {n}");
            }
        }
        if r["ok"] == false {
            assert_anthropic_refusal(r, 403, "SESSION_BUDGET_EXCEEDED");
            assert!(
                record_for(&log, &tag(id, &nonce)).is_none(),
                "{id} reached the upstream"
            );
            refused += 1;
            continue;
        }
        assert_ok(r);
        let cost = meter.cost(spec, r);
        expected += cost;
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        let seen = record["request"]["max_tokens"].as_u64().unwrap();
        // Forced output: the SDK saw as many output tokens as the upstream's limit.
        assert_eq!(r["usage"]["output"], seen, "{id}");
        match header(r, "x-pag0-max-tokens") {
            None => {
                assert_eq!(seen, MAX, "{id}");
                assert_eq!(header_u64(r, "x-pag0-cost"), full, "{id}");
                whole += 1;
            }
            Some(n) => {
                let n: u64 = n.parse().unwrap();
                assert_eq!(seen, n, "{id}: the upstream saw the lowered max_tokens");
                assert!((MIN_OUTPUT_TOKENS..MAX).contains(&n), "{id}: {n}");
                let got = header_u64(r, "x-pag0-cost");
                assert!(
                    meter.bounds(spec, r, Some(record), n).contains(&got),
                    "{id}: reserved {got} for {n} tokens"
                );
                // Lowered to all that was left: less than one output token's price remains.
                let left: u64 = support::client::dict_value(
                    header(r, "x-pag0-budget-remaining").unwrap(),
                    "session",
                )
                .unwrap()
                .parse()
                .unwrap();
                assert!(
                    u128::from(left) * 1_000_000 < rates.output,
                    "{id}: {left} left"
                );
                lowered.push(n);
            }
        }
    }
    assert_eq!(
        (whole, lowered.len(), refused),
        (20, 1, 79),
        "whole, lowered, refused"
    );
    assert_eq!(log.len(), 21, "calls that reached the upstream");
    let report = settled_report(envoy.port, &s);
    assert_eq!(total_cost(&report), expected, "the ledger: {report}");
    assert_eq!(unmetered(&report), 0);
    assert!(expected <= session_budget);
    assert_budget_settled(envoy.port, &s, expected);
}

// --- 4. what pag0 writes into a request --------------------------------------------------

/// Replaces the first `"key":value` of `text` by `"key":to`.
fn swap_number(text: &str, key: &str, to: u64) -> String {
    let pat = format!("\"{key}\":");
    let at = text
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        + pat.len();
    let end = at
        + text[at..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len() - at);
    format!("{}{to}{}", &text[..at], &text[end..])
}

/// A lowered max_tokens lowers thinking.budget_tokens below it (the API requires it),
/// and leaves a thinking budget already below it as it was. Only those numbers change:
/// the rest of the body reaches the upstream byte for byte.
#[test]
fn lowering_max_tokens_lowers_the_thinking_budget_and_nothing_else() {
    let api = demo_api();
    let meter = Meter {
        table: Table::of(&["claude-sonnet-4-5*"]),
        default_max_tokens: DEFAULT_MAX_TOKENS,
    };
    let rates = meter.table.rates("claude-sonnet-4-5");
    let nonce = unique("n");
    let s1 = unique("llm-think");
    let s2 = unique("llm-think");
    let spec = |id: &str, session: &str, budget_tokens: u64| {
        sdk(
            id,
            "anthropic",
            "create",
            ids(session, "thinker-1", &[]),
            json!({"model": "claude-sonnet-4-5", "max_tokens": 32000,
                   "thinking": {"type": "enabled", "budget_tokens": budget_tokens},
                   "messages": [{"role": "user", "content": tag(id, &nonce)}]}),
        )
    };
    let calls = vec![spec("t1", &s1, 30000), spec("t2", &s2, 2000)];
    let probe = drive(api.port, false, &calls[..1]);
    assert_ok(&probe[0]);
    let bytes = sent_bytes(&probe[0]);
    // Affords about 5000 output tokens.
    let session_budget = bound(&rates, bytes, 0, 5000, 1) + 7;
    api.reset();
    let cfg = EnvoyConfig::new(
        &plugin(
            json!({"sessionBudget": session_budget.to_string()}),
            json!({"prices": meter.table.json()}),
            None,
        ),
        vec![anthropic_route()],
    );
    let envoy = Envoy::with_config(&cfg, api.port);
    let results = drive(envoy.port, false, &calls);
    let log = api.log();
    for ((spec, r), session) in calls.iter().zip(&results).zip([&s1, &s2]) {
        assert_ok(r);
        let id = r["id"].as_str().unwrap();
        let n: u64 = header(r, "x-pag0-max-tokens")
            .unwrap_or_else(|| panic!("{id}: max_tokens not lowered"))
            .parse()
            .unwrap();
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        let body_bytes = record["bodyBytes"].as_u64().unwrap();
        assert!(
            [sent_bytes(r), body_bytes].iter().any(|b| affordable(
                &rates,
                *b,
                0,
                1,
                session_budget
            ) == n),
            "{id}: lowered to {n}, not to all the budget affords"
        );
        assert_eq!(record["request"]["max_tokens"], n, "{id}");
        let thinking = record["request"]["thinking"]["budget_tokens"]
            .as_u64()
            .unwrap();
        let asked = spec["body"]["thinking"]["budget_tokens"].as_u64().unwrap();
        if asked < n {
            assert_eq!(thinking, asked, "{id}: a budget already below stays");
        } else {
            assert!(
                thinking > 0 && thinking < n,
                "{id}: budget_tokens {thinking}"
            );
        }
        // Byte for byte, but for the two numbers.
        let restored = swap_number(
            &swap_number(record["body"].as_str().unwrap(), "max_tokens", 32000),
            "budget_tokens",
            asked,
        );
        assert_eq!(restored, r["sent"]["body"].as_str().unwrap(), "{id}");
        let cost = meter.cost(spec, r);
        assert_eq!(header_u64(r, "x-pag0-cost"), cost, "{id}");
        let report = settled_report(envoy.port, session);
        assert_eq!(total_cost(&report), cost, "{id}");
    }
}

/// A Chat or Responses request without an output limit gets the configured
/// defaultMaxTokens, and is reserved with it.
#[test]
fn openai_requests_without_a_limit_get_default_max_tokens() {
    const DEFAULT: u64 = 2048;
    let api = demo_api();
    let meter = openai_meter(DEFAULT);
    let envoy = openai_envoy(&api, &meter, json!({"sessionBudget": "5000000"}));
    let s = unique("llm-openai-default");
    let nonce = unique("n");
    let h = ids(&s, "coder-1", &[]);
    let calls = vec![
        sdk(
            "d1",
            "chat",
            "create",
            h.clone(),
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": tag("d1", &nonce)}]}),
        ),
        sdk(
            "d2",
            "chat",
            "stream",
            h.clone(),
            json!({"model": "o4-mini", "messages": [{"role": "user", "content": tag("d2", &nonce)}],
                   "stream_options": {"include_usage": true}}),
        ),
        sdk(
            "d3",
            "responses",
            "create",
            h.clone(),
            json!({"model": "gpt-4o-mini", "input": tag("d3", &nonce)}),
        ),
        sdk(
            "d4",
            "responses",
            "stream",
            h,
            json!({"model": "o4-mini", "input": tag("d4", &nonce)}),
        ),
    ];
    let results = drive(envoy.port, false, &calls);
    let log = api.log();
    let mut expected = 0;
    for (spec, r) in calls.iter().zip(&results) {
        assert_ok(r);
        let id = r["id"].as_str().unwrap();
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        let req = &record["request"];
        // The limit the upstream applied (Chat: max_completion_tokens, else max_tokens).
        let limit = if spec["api"] == "chat" {
            req["max_completion_tokens"]
                .as_u64()
                .or_else(|| req["max_tokens"].as_u64())
        } else {
            req["max_output_tokens"].as_u64()
        };
        assert_eq!(limit, Some(DEFAULT), "{id}: {req}");
        let cost = meter.cost(spec, r);
        expected += cost;
        if spec["kind"] == "create" {
            assert_eq!(header_u64(r, "x-pag0-cost"), cost, "{id}");
        } else {
            let got = header_u64(r, "x-pag0-cost");
            let bounds = meter.bounds(spec, r, Some(record), DEFAULT);
            assert!(bounds.contains(&got), "{id}: {got} not in {bounds:?}");
        }
    }
    assert_eq!(total_cost(&settled_report(envoy.port, &s)), expected);
}

// --- 5. bad input ------------------------------------------------------------------------

/// Each malformed request is a clear error in the API's own shape, never reaches the
/// upstream, and costs nothing.
#[test]
fn bad_llm_requests_are_clear_errors_that_cost_nothing() {
    let api = demo_api();
    let meter = Meter {
        table: Table::of(&["claude-haiku-4-5*", "gpt-4o-mini"]),
        default_max_tokens: DEFAULT_MAX_TOKENS,
    };
    let llm = json!({"prices": meter.table.json(), "maxBodyBytes": 100000});
    let mut routes = vec![anthropic_route()];
    routes.extend(openai_routes());
    let cfg = EnvoyConfig::new(
        &plugin(json!({"sessionBudget": "5000000"}), llm, None),
        routes,
    );
    let envoy = Envoy::with_config(&cfg, api.port);
    let s = unique("llm-bad");
    let nonce = unique("n");
    let mut headers = support::agent_headers(KEY, &s, "coder-1");
    headers.push(("content-type", "application/json"));
    let mut c = Client::new(envoy.port);
    // One good call first: the session exists, with a known cost.
    let good = json!({"model": "claude-haiku-4-5", "max_tokens": 100,
                      "messages": [{"role": "user", "content": tag("good", &nonce)}]});
    let r = c.post(ANTHROPIC, "/v1/messages", &headers, &good.to_string());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let cost = r.cost();
    let seen = api.log().len();
    let msgs = r#"[{"role":"user","content":"hi"}]"#;
    let anthropic_cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "not JSON",
            "{\"model\": \"claude-haiku-4-5\", ".into(),
            400,
            "INVALID_REQUEST",
        ),
        ("an array", "[1,2]".into(), 400, "INVALID_REQUEST"),
        (
            "no model",
            format!(r#"{{"max_tokens":100,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "model not a string",
            format!(r#"{{"model":42,"max_tokens":100,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "model not priced",
            format!(r#"{{"model":"claude-unknown-9","max_tokens":100,"messages":{msgs}}}"#),
            403,
            "MODEL_NOT_PRICED",
        ),
        (
            "negative max_tokens",
            format!(r#"{{"model":"claude-haiku-4-5","max_tokens":-1,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "zero max_tokens",
            format!(r#"{{"model":"claude-haiku-4-5","max_tokens":0,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "huge max_tokens",
            format!(r#"{{"model":"claude-haiku-4-5","max_tokens":1000001,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "very huge max_tokens",
            format!(
                r#"{{"model":"claude-haiku-4-5","max_tokens":184467440737095516160,"messages":{msgs}}}"#
            ),
            400,
            "INVALID_REQUEST",
        ),
        (
            "fractional max_tokens",
            format!(r#"{{"model":"claude-haiku-4-5","max_tokens":1.5,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "string max_tokens",
            format!(r#"{{"model":"claude-haiku-4-5","max_tokens":"100","messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "duplicate max_tokens",
            format!(
                r#"{{"max_tokens":10,"max_tokens":100000,"model":"claude-haiku-4-5","messages":{msgs}}}"#
            ),
            400,
            "INVALID_REQUEST",
        ),
        (
            "duplicate model",
            format!(
                r#"{{"model":"claude-haiku-4-5","max_tokens":10,"model":"claude-opus-4-1","messages":{msgs}}}"#
            ),
            400,
            "INVALID_REQUEST",
        ),
        (
            "body over maxBodyBytes",
            format!(
                r#"{{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(150_000)
            ),
            413,
            "INVALID_REQUEST",
        ),
    ];
    for (what, body, status, code) in &anthropic_cases {
        let r = c.post(ANTHROPIC, "/v1/messages", &headers, body);
        assert_eq!(
            r.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("x-pag0-error"), Some(*code), "{what}");
        assert_anthropic_error_shape(&r.json(), *status, code);
    }
    let openai_cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "chat not JSON",
            "/v1/chat/completions",
            "model=gpt-4o-mini".into(),
            400,
            "INVALID_REQUEST",
        ),
        (
            "chat no model",
            "/v1/chat/completions",
            format!(r#"{{"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "chat model not priced",
            "/v1/chat/completions",
            format!(r#"{{"model":"gpt-9-ultra","messages":{msgs}}}"#),
            403,
            "MODEL_NOT_PRICED",
        ),
        (
            "chat zero max_completion_tokens",
            "/v1/chat/completions",
            format!(r#"{{"model":"gpt-4o-mini","max_completion_tokens":0,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "chat fractional max_tokens",
            "/v1/chat/completions",
            format!(r#"{{"model":"gpt-4o-mini","max_tokens":2.5,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "chat duplicate stream",
            "/v1/chat/completions",
            format!(r#"{{"model":"gpt-4o-mini","stream":false,"stream":true,"messages":{msgs}}}"#),
            400,
            "INVALID_REQUEST",
        ),
        (
            "responses negative max_output_tokens",
            "/v1/responses",
            r#"{"model":"gpt-4o-mini","max_output_tokens":-5,"input":"hi"}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
        (
            "responses model not a string",
            "/v1/responses",
            r#"{"model":["gpt-4o-mini"],"input":"hi"}"#.into(),
            400,
            "INVALID_REQUEST",
        ),
    ];
    for (what, path, body, status, code) in &openai_cases {
        let r = c.post(OPENAI, path, &headers, body);
        assert_eq!(
            r.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("x-pag0-error"), Some(*code), "{what}");
        assert_openai_error_shape(&r.json(), *status, code);
    }
    assert_eq!(api.log().len(), seen, "a bad request reached the upstream");
    let report = settled_report(envoy.port, &s);
    assert_eq!(
        total_cost(&report),
        cost,
        "bad requests were charged: {report}"
    );
    assert_budget_settled(envoy.port, &s, cost);
}

/// A budget refusal on a metered OpenAI route comes in OpenAI's error shape, so the SDK
/// raises it with pag0's code.
#[test]
fn openai_budget_refusals_come_in_openai_error_shape() {
    let api = demo_api();
    let meter = openai_meter(DEFAULT_MAX_TOKENS);
    let policy = json!({"sessionBudget": "5000000",
                        "agents": {"tiny-*": {"agentBudget": "100"}}});
    let envoy = openai_envoy(&api, &meter, policy);
    let s = unique("llm-openai-refused");
    let call = sdk(
        "x1",
        "chat",
        "create",
        ids(&s, "tiny-1", &[]),
        json!({"model": "o4-mini", "max_completion_tokens": 100000,
               "messages": [{"role": "user", "content": "hi"}]}),
    );
    let r = &drive(envoy.port, false, &[call])[0];
    assert_eq!(r["status"], 403, "{r}");
    assert_eq!(r["error"]["class"], "PermissionDeniedError", "{r}");
    assert_eq!(header(r, "x-pag0-error"), Some("AGENT_BUDGET_EXCEEDED"));
    let body: Value = serde_json::from_str(r["error"]["raw"].as_str().unwrap()).unwrap();
    assert_openai_error_shape(&body, 403, "AGENT_BUDGET_EXCEEDED");
    assert!(api.log().is_empty());
}

// --- 6. Claude Code ----------------------------------------------------------------------

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn random_uuid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// A request body shaped as Claude Code's (PRODUCT.md): tool definitions and a long
/// system prompt (about 30 KB), adaptive thinking, max_tokens 128000, streamed.
fn claude_code_body(session: &str, id: &str, nonce: &str) -> Value {
    let tools: Vec<Value> = [
        "Bash", "Read", "Edit", "Write", "Glob", "Grep", "Task", "TodoWrite", "WebFetch",
        "WebSearch", "NotebookEdit", "BashOutput", "KillShell", "ExitPlanMode",
    ]
    .iter()
    .map(|name| {
        json!({"name": name,
               "description": format!("{name}: {}", "Use this tool when the task needs it; read its rules first. ".repeat(14)),
               "input_schema": {"type": "object", "$schema": "http://json-schema.org/draft-07/schema#",
                   "additionalProperties": false, "required": ["input"],
                   "properties": {"input": {"type": "string", "description": "What to do, precisely."},
                                  "timeout": {"type": "number", "description": "Milliseconds, at most 600000."}}}})
    })
    .collect();
    let mut last_tool = tools.last().cloned().unwrap();
    last_tool["cache_control"] = json!({"type": "ephemeral"});
    let mut tools = tools;
    *tools.last_mut().unwrap() = last_tool;
    json!({
        "model": "claude-opus-5-5",
        "max_tokens": 128000,
        "stream": true,
        "thinking": {"type": "adaptive"},
        "metadata": {"user_id": format!("user_{:016x}_account__session_{session}", random_u64())},
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": long_text(nonce, 150), "cache_control": {"type": "ephemeral"}}
        ],
        "tools": tools,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>As you answer the user's questions, you can use the following context.</system-reminder>"},
            {"type": "text", "text": tag(id, nonce), "cache_control": {"type": "ephemeral"}}
        ]}]
    })
}

/// Claude Code through pag0 with no client change: its session header names the
/// session, subagents (random 16-hex agent ids) are held to the shared budget of
/// unmatched agents with max_tokens lowered to fit, the main agent (no agent header) is
/// not, and the report shows each agent with its parent.
#[test]
fn claude_code_sessions_are_metered_per_subagent_with_their_parent() {
    let api = demo_api();
    let meter = Meter {
        table: Table::of(&["claude-opus-5-5*"]),
        default_max_tokens: DEFAULT_MAX_TOKENS,
    };
    let rates = meter.table.rates("claude-opus-5-5");
    const POOL: u64 = 1_000_000;
    let identity = json!({
        "sessionHeader": "x-claude-code-session-id",
        "agentHeader": ["x-claude-code-agent-id", "x-pag0-agent"],
        "parentAgentHeader": "x-claude-code-parent-agent-id",
        "defaultAgent": "main"
    });
    let policy = json!({"sessionBudget": "5000000",
                        "agents": {"main": {}},
                        "unmatchedAgents": {"agentBudget": POOL.to_string()}});
    let cfg = EnvoyConfig::new(
        &plugin(
            policy,
            json!({"prices": meter.table.json()}),
            Some(identity),
        ),
        vec![anthropic_route()],
    );
    let envoy = Envoy::with_config(&cfg, api.port);
    let session = random_uuid();
    let nonce = unique("n");
    let sub_a = format!("{:016x}", random_u64());
    let sub_b = format!("{:016x}", random_u64());
    let sub_c = format!("{:016x}", random_u64());
    // (call id, agent header, parent header)
    let plan: Vec<(&str, Option<&str>, Option<&str>)> = vec![
        ("m1", None, None),
        ("s1", Some(&sub_a), Some("main")),
        ("s2", Some(&sub_b), Some("main")),
        ("s3", Some(&sub_c), Some(&sub_a)),
        ("s4", Some(&sub_a), Some("main")),
        ("m2", None, None),
    ];
    let calls: Vec<Value> = plan
        .iter()
        .map(|(id, agent, parent)| {
            let mut h = json!({
                "x-claude-code-session-id": session,
                "x-api-key": "sk-ant-api03-claude-code-test",
                "x-app": "cli",
                "user-agent": "claude-cli/2.1.332 (external, cli)",
                "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
                "x-pag0-api-key": KEY
            });
            if let Some(a) = agent {
                h["x-claude-code-agent-id"] = json!(a);
            }
            if let Some(p) = parent {
                h["x-claude-code-parent-agent-id"] = json!(p);
            }
            let mut body = claude_code_body(&session, id, &nonce);
            body.as_object_mut().unwrap().remove("stream");
            let mut c = sdk(id, "anthropic", "raw_stream", h, body);
            c["beta"] = json!(true);
            c["query"] = json!({"beta": "true"});
            c
        })
        .collect();
    let results = drive(envoy.port, false, &calls);
    let log = api.log();
    let mut pool_spent = 0;
    let mut per_agent: HashMap<String, (u64, u64, Option<String>)> = HashMap::new();
    let mut expected = 0;
    for ((spec, r), (id, agent, parent)) in calls.iter().zip(&results).zip(&plan) {
        assert_ok(r);
        let bytes = sent_bytes(r);
        assert!(
            (28_000..=52_000).contains(&bytes),
            "{id}: a {bytes}-byte body is not Claude Code's size"
        );
        assert_eq!(r["sent"]["path"], "/v1/messages?beta=true");
        let record = record_for(&log, &tag(id, &nonce)).unwrap();
        assert_eq!(record["path"], "/v1/messages?beta=true");
        assert_eq!(record["request"]["thinking"], json!({"type": "adaptive"}));
        let cost = meter.cost(spec, r);
        let got = header_u64(r, "x-pag0-cost");
        match agent {
            None => {
                // The main agent: only the session budget, which holds its bound.
                assert_eq!(header(r, "x-pag0-max-tokens"), None, "{id}");
                assert_eq!(record["request"]["max_tokens"], 128000, "{id}");
                assert_eq!(got, meter.bound_with(spec, bytes, 128000), "{id}");
            }
            Some(_) => {
                let n: u64 = header(r, "x-pag0-max-tokens")
                    .unwrap_or_else(|| panic!("{id}: a subagent's 128000 fits no $1 budget"))
                    .parse()
                    .unwrap();
                assert_eq!(record["request"]["max_tokens"], n, "{id}");
                let upstream_bytes = record["bodyBytes"].as_u64().unwrap();
                assert!(
                    [bytes, upstream_bytes].iter().any(|b| affordable(
                        &rates,
                        *b,
                        0,
                        1,
                        POOL - pool_spent
                    ) == n),
                    "{id}: lowered to {n} with {} left in the pool",
                    POOL - pool_spent
                );
                assert!(
                    meter.bounds(spec, r, Some(record), n).contains(&got),
                    "{id}"
                );
                pool_spent += cost;
            }
        }
        expected += cost;
        let e = per_agent
            .entry(agent.unwrap_or("main").to_string())
            .or_insert((0, 0, parent.map(str::to_string)));
        e.0 += cost;
        e.1 += 1;
    }
    let report = settled_report(envoy.port, &session);
    assert_eq!(report["sessionId"], session.as_str());
    assert_eq!(total_cost(&report), expected, "the ledger: {report}");
    assert_eq!(
        report["byAgent"].as_array().unwrap().len(),
        per_agent.len(),
        "{}",
        report["byAgent"]
    );
    for (agent, (cost, requests, parent)) in &per_agent {
        let a = by_agent(&report, agent);
        assert_eq!(a["cost"], cost.to_string(), "{agent}: {a}");
        assert_eq!(a["requests"], *requests, "{agent}: {a}");
        assert_eq!(
            a["parentAgentId"].as_str(),
            parent.as_deref(),
            "{agent}: {a}"
        );
    }
    let pairs: Vec<(&Value, &Value)> = calls.iter().zip(&results).collect();
    assert_by_model(&report, &meter, &pairs);
    let b = budget(envoy.port, &session);
    assert_eq!(
        b["agents"]["unmatched"]["spent"],
        pool_spent.to_string(),
        "{b}"
    );
    assert_budget_settled(envoy.port, &session, expected);
}
