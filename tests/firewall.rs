//! The spend firewall through a real Envoy: the reference session's scenarios, every
//! refusal code, identity and tenants, header stripping, charging rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::envoy::{route, validate, EnvoyConfig, RouteSpec};
use support::{agent_headers, unique, Client, Envoy, Upstream};

const DEMO_KEY: &str = "demo-key";
const LLM: (&str, &str) = ("api.openai.com", "/v1/responses");

fn call(
    client: &mut Client,
    session: &str,
    agent: &str,
    (host, path): (&str, &str),
) -> support::Response {
    client.post(
        host,
        path,
        &agent_headers(DEMO_KEY, session, agent),
        &support::fresh_body(),
    )
}

#[test]
fn ralph_stops_at_its_three_dollars_and_the_executor_goes_on() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let session = unique("ralph");
    for i in 1..=20u64 {
        let r = call(&mut c, &session, "ralph-1", LLM);
        assert_eq!(r.status, 200, "call {i}");
        assert_eq!(r.cost(), 150_000);
        assert_eq!(r.remaining("agent"), Some(3_000_000 - i * 150_000));
        assert_eq!(r.remaining("session"), Some(5_000_000 - i * 150_000));
        assert_eq!(r.remaining("daily"), Some(20_000_000 - i * 150_000));
    }
    let refused = call(&mut c, &session, "ralph-1", LLM);
    assert_eq!(refused.status, 403);
    assert_eq!(
        refused.error_code().as_deref(),
        Some("AGENT_BUDGET_EXCEEDED")
    );
    assert_eq!(refused.cost(), 0);
    let details = &refused.json()["error"]["details"];
    assert_eq!(details["scope"], "agent");
    assert_eq!(details["limit"], "3000000");
    assert_eq!(details["spent"], "3000000");
    assert_eq!(details["reserved"], "0");
    assert_eq!(details["requested"], "150000");
    assert_eq!(up.count(), 20);

    // The executor of the same session goes on, within its own $2.
    for i in 1..=5u64 {
        let r = call(&mut c, &session, "executor-1", LLM);
        assert_eq!(r.status, 200);
        assert_eq!(r.cost(), 150_000);
        assert_eq!(r.remaining("agent"), Some(2_000_000 - i * 150_000));
        assert_eq!(r.remaining("session"), Some(2_000_000 - i * 150_000));
    }
    assert_eq!(call(&mut c, &session, "executor-1", LLM).status, 200);
    assert_eq!(up.count(), 26);
}

#[test]
fn autopilot_loop_is_stopped_by_the_kill_switch_after_an_alert() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let session = unique("autopilot");
    let mut first_alert = None;
    let mut ok = 0;
    for i in 1..=50u64 {
        let r = call(
            &mut c,
            &session,
            "autopilot-1",
            ("api.openai.com", "/v1/chat/completions"),
        );
        if r.status != 200 {
            assert_eq!(r.status, 403);
            assert_eq!(r.error_code().as_deref(), Some("KILL_SWITCH_ACTIVE"));
            assert_eq!(r.json()["error"]["details"]["reason"], "threshold");
            break;
        }
        ok += 1;
        if first_alert.is_none() {
            if let Some(alert) = r.header("x-pag0-budget-alert") {
                first_alert = Some((i, alert.to_string()));
            }
        }
    }
    // 30 × $0.15 = $4.50 = 90% of $5; the alert comes at 70% ($3.60 after call 24).
    assert_eq!(ok, 30);
    assert_eq!(first_alert, Some((24, "session=0.72".to_string())));
    assert_eq!(up.count(), 30);
    // Free calls still pass; priced ones stay refused.
    let free = c.get(
        "api.openai.com",
        "/v1/models",
        &agent_headers(DEMO_KEY, &session, "autopilot-1"),
    );
    assert_eq!(free.status, 200);
    assert_eq!(free.cost(), 0);
    assert_eq!(free.remaining("session"), Some(500_000));
    let again = call(
        &mut c,
        &session,
        "researcher-1",
        ("api.tavily.com", "/search"),
    );
    assert_eq!(again.error_code().as_deref(), Some("KILL_SWITCH_ACTIVE"));
}

fn sha(key: &str) -> String {
    pag0::core::compile::sha256_hex(key.as_bytes())
}

/// A config exercising every rule: two tenants, lists, caps, all four budgets.
fn rules_config() -> EnvoyConfig {
    let plugin = format!(
        r#"{{
  "tenants": [
    {{"id": "acme", "apiKeySha256": "{}"}},
    {{"id": "globex", "apiKeySha256": "{}"}}
  ],
  "defaultPolicy": "main",
  "policies": {{
    "main": {{
      "sessionBudget": "1000000",
      "dailyBudget": "2500000",
      "monthlyBudget": "3000000",
      "maxPerRequest": "300000",
      "allowedEndpoints": ["api.openai.com/*", "api.tavily.com/*", "https://api.deepl.com/v2/*", "free.example/*"],
      "blockedEndpoints": ["api.openai.com/v1/images/*"],
      "agents": {{
        "reviewer-*": {{"agentBudget": "400000", "maxPerRequest": "100000", "allowedEndpoints": ["api.tavily.com/*"]}},
        "scout-*": {{"inheritParentPolicy": false, "allowedEndpoints": ["api.exa.ai/*"]}},
        "executor-*": {{"agentBudget": "900000", "blockedEndpoints": ["api.tavily.com/extract"]}}
      }}
    }},
    "monthly": {{"monthlyBudget": "3000000"}},
    "lenient": {{"sessionBudget": "1000000", "chargeOn": "always"}}
  }},
  "endpoints": [
    {{"pattern": "api.tavily.com/*", "price": "100000", "tool": "search"}},
    {{"pattern": "api.exa.ai/*", "price": "100000", "tool": "search"}}
  ]
}}"#,
        sha("acme-key"),
        sha("globex-key")
    );
    let routes: Vec<RouteSpec> = vec![
        route(
            "api.openai.com",
            "/v1/chat/completions",
            &[("price", "250000"), ("tool", "llm")],
        ),
        route("api.openai.com", "/v1/images/", &[("price", "250000")]),
        route("api.openai.com", "/v1/big", &[("price", "300001")]),
        route("api.openai.com", "/status/", &[("price", "100000")]),
        route(
            "api.openai.com",
            "/lenient/",
            &[("price", "100000"), ("policy", "lenient")],
        ),
        route(
            "api.openai.com",
            "/monthly/",
            &[("price", "1000000"), ("policy", "monthly")],
        ),
        route(
            "api.openai.com",
            "/nosuchpolicy",
            &[("price", "1"), ("policy", "nope")],
        ),
        route("api.openai.com", "/badprice", &[("price", "1.5")]),
        route("api.openai.com", "/numprice", &[("price", "=20000")]),
        route(
            "api.openai.com",
            "/badttl",
            &[("price", "1"), ("cacheTTL", "soon")],
        ),
        route("api.openai.com", "/", &[]),
        route("api.tavily.com", "/", &[]),
        route("api.exa.ai", "/", &[]),
        route("api.deepl.com", "/", &[("price", "1000")]),
        route("free.example", "/", &[]),
        RouteSpec {
            dead: true,
            ..route(
                "dead.example",
                "/",
                &[("price", "1000"), ("policy", "lenient")],
            )
        },
    ];
    EnvoyConfig::new(&plugin, routes)
}

#[test]
fn the_rules_config_is_valid_for_envoy() {
    let (ok, log) = validate(&rules_config().render(1, 2, 3));
    assert!(ok, "{log}");
}

#[test]
fn endpoint_lists_caps_and_inheritance() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&rules_config(), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("rules");
    let h = |agent: &'static str| {
        agent_headers("acme-key", Box::leak(s.clone().into_boxed_str()), agent)
    };
    let code = |r: support::Response| (r.status, r.error_code());

    // Session level: block wins over allow; off the allow list is refused.
    assert_eq!(
        code(c.post("api.openai.com", "/v1/images/gen", &h("main"), "")),
        (403, Some("ENDPOINT_BLOCKED".into()))
    );
    assert_eq!(
        code(c.post("api.openai.com", "/v1/%69mages/gen", &h("main"), "")),
        (403, Some("ENDPOINT_BLOCKED".into()))
    );
    assert_eq!(
        code(c.post("api.openai.com", "/v1/x/../images/gen", &h("main"), "")),
        (403, Some("ENDPOINT_BLOCKED".into()))
    );
    assert_eq!(
        code(c.post("api.exa.ai", "/search", &h("main"), "")),
        (403, Some("ENDPOINT_NOT_ALLOWED".into()))
    );
    assert_eq!(
        code(c.post("api.deepl.com", "/v2/translate", &h("main"), "")),
        (200, None)
    );
    assert_eq!(
        code(c.post("api.deepl.com", "/v1/translate", &h("main"), "")),
        (403, Some("ENDPOINT_NOT_ALLOWED".into()))
    );
    // Per-request cap.
    let big = c.post("api.openai.com", "/v1/big", &h("main"), "");
    assert_eq!(
        big.error_code().as_deref(),
        Some("PER_REQUEST_LIMIT_EXCEEDED")
    );
    assert_eq!(big.json()["error"]["details"]["requested"], "300001");
    assert_eq!(big.json()["error"]["details"]["limit"], "300000");

    // An inheriting agent only narrows: its own list, its own lower cap.
    assert_eq!(
        code(c.post("api.tavily.com", "/search", &h("reviewer-1"), "")),
        (200, None)
    );
    assert_eq!(
        code(c.post(
            "api.openai.com",
            "/v1/chat/completions",
            &h("reviewer-1"),
            ""
        )),
        (403, Some("ENDPOINT_NOT_ALLOWED".into()))
    );
    assert_eq!(
        code(c.post("api.openai.com", "/v1/images/x", &h("reviewer-1"), "")),
        (403, Some("ENDPOINT_BLOCKED".into()))
    );
    // Executor: parent's allow list plus its own block list.
    assert_eq!(
        code(c.post("api.tavily.com", "/extract", &h("executor-1"), "")),
        (403, Some("ENDPOINT_BLOCKED".into()))
    );
    assert_eq!(
        code(c.post("api.tavily.com", "/search", &h("executor-1"), "")),
        (200, None)
    );
    // A non-inheriting agent's list replaces the parent's...
    assert_eq!(
        code(c.post("api.exa.ai", "/search", &h("scout-1"), "")),
        (200, None)
    );
    assert_eq!(
        code(c.post("api.tavily.com", "/search", &h("scout-1"), "")),
        (403, Some("ENDPOINT_NOT_ALLOWED".into()))
    );
    // ...but never its budgets: scout spends from the same session.
    let r = c.post("api.exa.ai", "/search", &h("scout-1"), "");
    assert_eq!(r.status, 200);
    // deepl 1000 + reviewer 100000 + executor 100000 + scout 2 × 100000
    assert_eq!(r.remaining("session"), Some(1_000_000 - 401_000));
}

#[test]
fn session_daily_and_monthly_budgets_are_named_most_specific_first() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&rules_config(), up.port);
    let mut c = Client::new(envoy.port);
    let chat = ("api.openai.com", "/v1/chat/completions");
    let run = |c: &mut Client, session: &str, n: usize| -> Vec<(u16, Option<String>)> {
        (0..n)
            .map(|_| {
                let r = c.post(
                    chat.0,
                    chat.1,
                    &agent_headers("acme-key", session, "main"),
                    "",
                );
                (r.status, r.error_code())
            })
            .collect()
    };
    // $1 session at $0.25: four calls, then the session refuses.
    let s1 = unique("s");
    let first = run(&mut c, &s1, 5);
    assert!(first[..4].iter().all(|(s, _)| *s == 200));
    assert_eq!(first[4], (403, Some("SESSION_BUDGET_EXCEEDED".into())));
    // Day at $2.50: a second session gets 4 more, a third gets 2, then the day refuses.
    let s2 = unique("s");
    assert!(run(&mut c, &s2, 4).iter().all(|(s, _)| *s == 200));
    let s3 = unique("s");
    let third = run(&mut c, &s3, 3);
    assert_eq!(third[..2], [(200, None), (200, None)]);
    assert_eq!(third[2], (403, Some("DAILY_BUDGET_EXCEEDED".into())));
    let refused = c.post(chat.0, chat.1, &agent_headers("acme-key", &s3, "main"), "");
    let d = &refused.json()["error"]["details"];
    assert_eq!(
        (
            d["scope"].as_str(),
            d["limit"].as_str(),
            d["spent"].as_str()
        ),
        (Some("daily"), Some("2500000"), Some("2500000"))
    );
    // Globex is another tenant: its own windows, the same session id is another session.
    assert_eq!(run(&mut c, &s1, 1)[0].0, 403);
    let g = c.post(
        chat.0,
        chat.1,
        &agent_headers("globex-key", &s1, "main"),
        "",
    );
    assert_eq!(g.status, 200);
    assert_eq!(g.remaining("session"), Some(750_000));
    assert_eq!(g.remaining("daily"), Some(2_250_000));
    // The month: globex has spent 250000; a policy with only a $3 month lets it
    // spend 2 × $1 more, then refuses with the monthly scope.
    let s4 = unique("m");
    let monthly: Vec<_> = (0..3)
        .map(|_| {
            c.post(
                "api.openai.com",
                "/monthly/x",
                &agent_headers("globex-key", &s4, "main"),
                "",
            )
        })
        .collect();
    assert_eq!(monthly[0].status, 200);
    assert_eq!(monthly[1].status, 200);
    assert_eq!(
        monthly[2].error_code().as_deref(),
        Some("MONTHLY_BUDGET_EXCEEDED")
    );
}

#[test]
fn only_successful_upstream_answers_are_charged_unless_configured() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&rules_config(), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("charge");
    let h = agent_headers("acme-key", &s, "main");
    let failed = c.post("api.openai.com", "/status/500/x", &h, "");
    assert_eq!(failed.status, 500);
    assert_eq!(failed.cost(), 0);
    assert_eq!(failed.remaining("session"), Some(1_000_000));
    let ok = c.post("api.openai.com", "/status/201/x", &h, "");
    assert_eq!((ok.status, ok.cost()), (201, 100_000));
    // chargeOn: always charges an upstream 500...
    let lenient = c.post("api.openai.com", "/lenient/status/500/x", &h, "");
    assert_eq!((lenient.status, lenient.cost()), (500, 100_000));
    assert_eq!(lenient.remaining("session"), Some(800_000));
    // ...but never an answer the upstream did not give (connection refused).
    let dead = c.post("dead.example", "/x", &h, "");
    assert_eq!(dead.status, 503);
    assert_eq!(dead.cost(), 0);
    assert_eq!(dead.remaining("session"), Some(800_000));
}

#[test]
fn bad_route_metadata_fails_closed() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&rules_config(), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("meta");
    let h = agent_headers("acme-key", &s, "main");
    for path in ["/nosuchpolicy", "/badprice", "/numprice", "/badttl"] {
        let r = c.post("api.openai.com", path, &h, "");
        assert_eq!(r.status, 500, "{path}");
        assert_eq!(r.error_code().as_deref(), Some("CONFIG_ERROR"));
    }
    assert_eq!(up.count(), 0);
    assert!(
        envoy.log().contains("unknown policy \\\"nope\\\"")
            || envoy.log().contains("unknown policy")
    );
}

#[test]
fn identity_is_checked_and_never_a_way_around_a_budget() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let path = "/v1/chat/completions";
    let host = "api.openai.com";
    let expect = |r: support::Response, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.error_code().as_deref(), Some(code));
        assert_eq!(r.cost(), 0);
    };
    expect(
        c.post(host, path, &[("x-pag0-session", "s")], ""),
        401,
        "UNAUTHORIZED",
    );
    expect(
        c.post(
            host,
            path,
            &[("x-pag0-api-key", "wrong"), ("x-pag0-session", "s")],
            "",
        ),
        401,
        "UNAUTHORIZED",
    );
    expect(
        c.post(host, path, &[("x-pag0-api-key", DEMO_KEY)], ""),
        400,
        "INVALID_REQUEST",
    );
    let long = "s".repeat(129);
    for bad in ["a b", "a/b", "a,b", "", long.as_str(), "é"] {
        expect(
            c.post(host, path, &agent_headers(DEMO_KEY, bad, "main"), ""),
            400,
            "INVALID_REQUEST",
        );
        expect(
            c.post(host, path, &agent_headers(DEMO_KEY, "s", bad), ""),
            400,
            "INVALID_REQUEST",
        );
    }
    let ok_id = "s".repeat(128);
    assert_eq!(
        c.post(
            host,
            path,
            &agent_headers(DEMO_KEY, &ok_id, "a.b_c:d@e-f"),
            ""
        )
        .status,
        200
    );
    // A second session header could pick whichever budget suits: refused.
    let dup = [
        ("x-pag0-api-key", DEMO_KEY),
        ("x-pag0-session", "s1"),
        ("x-pag0-session", "s2"),
    ];
    expect(c.post(host, path, &dup, ""), 400, "INVALID_REQUEST");
    // Bytes that are not UTF-8 in an id header: a 400, not a panic.
    let raw = b"POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\nx-pag0-api-key: demo-key\r\nx-pag0-session: s\xff\xfe\r\ncontent-length: 0\r\n\r\n";
    let r = c.send_raw(raw);
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (400, Some("INVALID_REQUEST"))
    );
    // An oversized header is Envoy's 431, before anything is charged.
    let huge = "x".repeat(70 * 1024);
    let mut fresh = Client::new(envoy.port);
    let r = fresh.post(
        host,
        path,
        &[
            ("x-pag0-api-key", DEMO_KEY),
            ("x-pag0-session", "s"),
            ("x-big", huge.as_str()),
        ],
        "",
    );
    assert_eq!(r.status, 431);
    // The filter is still healthy after all that.
    assert_eq!(
        Client::new(envoy.port)
            .post(host, path, &agent_headers(DEMO_KEY, "s-after", "main"), "")
            .status,
        200
    );
    assert_eq!(up.count(), 2);
}

#[test]
fn pag0_headers_never_reach_the_upstream() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let headers = [
        ("x-pag0-api-key", DEMO_KEY),
        ("x-pag0-session", "strip-1"),
        ("x-pag0-agent", "researcher-1"),
        ("x-pag0-cache-bypass", "true"),
        ("X-Pag0-Anything", "secret"),
        ("authorization", "Bearer upstream-token"),
    ];
    let r = c.post("api.tavily.com", "/search", &headers, "{\"query\":\"q\"}");
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert!(
        seen.headers.iter().all(|(k, _)| !k.starts_with("x-pag0-")),
        "{:?}",
        seen.headers
    );
    assert!(seen
        .headers
        .iter()
        .any(|(k, v)| k == "authorization" && v == "Bearer upstream-token"));
    assert_eq!(seen.body, b"{\"query\":\"q\"}");
}

#[test]
fn endpoint_rules_price_calls_the_route_leaves_unpriced() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&rules_config(), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("price");
    let r = c.post(
        "api.tavily.com",
        "/search",
        &agent_headers("acme-key", &s, "main"),
        "",
    );
    assert_eq!((r.status, r.cost()), (200, 100_000));
    let free = c.get(
        "free.example",
        "/anything",
        &agent_headers("acme-key", &s, "main"),
    );
    assert_eq!((free.status, free.cost()), (200, 0));
    assert_eq!(free.remaining("session"), Some(900_000));
    assert_eq!(free.remaining("daily"), Some(2_400_000));
}

#[test]
fn a_forwarded_call_whose_client_goes_away_stays_charged() {
    use std::io::Write;
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let session = unique("gone");
    // The client sends a paid call and hangs up before the slow upstream answers.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    let body = support::fresh_body();
    write!(
        raw,
        "POST /v1/responses/delay/800/ HTTP/1.1\r\nhost: api.openai.com\r\nx-pag0-api-key: demo-key\r\nx-pag0-session: {session}\r\nx-pag0-agent: ralph-1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(raw);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(up.count(), 1, "the call reached the upstream");
    let report = Client::new(envoy.port)
        .get(
            "h",
            &format!("/_pag0/v1/sessions/{session}/report"),
            &[("authorization", "Bearer demo-admin")],
        )
        .json();
    assert_eq!(report["totalCost"], "150000", "{report}");
    assert_eq!(report["reserved"], "0");
}

#[test]
fn an_encoded_slash_cannot_reach_a_paid_path_for_free() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let r = Client::new(envoy.port).post(
        "api.openai.com",
        "/v1/chat%2Fcompletions",
        &agent_headers(DEMO_KEY, "s", "main"),
        "{}",
    );
    assert_eq!(r.status, 400);
    assert_eq!(up.count(), 0);
}

/// The reference session's allow lists (PRODUCT.md, issue 15): every role against every
/// host of the demo. An allowed call is answered by the upstream; any other is refused
/// ENDPOINT_NOT_ALLOWED before it reaches one.
#[test]
fn each_role_reaches_exactly_the_hosts_its_allow_list_names() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let hosts: [(&str, &str, &str); 6] = [
        ("api.openai.com", "/v1/chat/completions", "openai"),
        ("api.anthropic.com", "/v1/messages", "anthropic"),
        ("api.deepl.com", "/v2/translate", "deepl"),
        ("api.tavily.com", "/search", "tavily"),
        ("api.exa.ai", "/search", "exa"),
        ("x402.local", "/weather", "x402"),
    ];
    let allowed: [(&str, &[&str]); 10] = [
        ("executor-1", &["openai", "anthropic"]),
        ("researcher-1", &["tavily", "exa", "deepl"]),
        ("debugger-1", &["openai"]),
        ("reviewer-1", &["openai"]),
        ("ralph-1", &["openai", "tavily"]),
        ("ultrawork-1", &["openai", "tavily"]),
        ("buyer-1", &["x402"]),
        ("looper-1", &["openai"]),
        // No list of their own: the session's.
        (
            "autopilot-1",
            &["openai", "anthropic", "deepl", "tavily", "exa", "x402"],
        ),
        (
            "main",
            &["openai", "anthropic", "deepl", "tavily", "exa", "x402"],
        ),
    ];
    let mut c = Client::new(envoy.port);
    for (agent, list) in allowed {
        let session = unique("allow");
        for (host, path, name) in hosts {
            let body = if name == "anthropic" {
                format!(
                    r#"{{"model":"claude-haiku-4-5","max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}]}}"#,
                    unique("q")
                )
            } else {
                support::fresh_body()
            };
            let before = up.count();
            let r = c.post(host, path, &agent_headers(DEMO_KEY, &session, agent), &body);
            // Metered routes answer in the API's own error shape: read the header.
            let code = r.header("x-pag0-error").map(str::to_string);
            if list.contains(&name) {
                assert_ne!(
                    code.as_deref(),
                    Some("ENDPOINT_NOT_ALLOWED"),
                    "{agent} → {host}"
                );
                if name != "x402" {
                    assert_eq!(r.status, 200, "{agent} → {host}: {:?}", code);
                }
            } else {
                assert_eq!(
                    (r.status, code.as_deref()),
                    (403, Some("ENDPOINT_NOT_ALLOWED")),
                    "{agent} → {host}"
                );
                assert_eq!(up.count(), before, "{agent} → {host} reached the upstream");
            }
        }
    }
}
