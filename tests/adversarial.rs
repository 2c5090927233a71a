//! What a careless or hostile agent and a misbehaving upstream do, through real Envoy
//! (issue 10): forged payment headers, requests that end with HTTP/2 trailers, paths
//! of a paid host the configuration forgot, agents that rename themselves, bytes that
//! are not UTF-8, floods of uploads, a VM that dies mid-call, sessions that never
//! spend, and answers a shared cache must not store or must store exactly.
//!
//! Each test failed against the module before its fix (`PAG0_WASM=<old build>
//! cargo test --test adversarial` runs them against another build).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::envoy::route;
use support::{agent_headers, fresh_body, unique, Client, Envoy, EnvoyConfig, Upstream};

const KEY: &str = "demo-key";
const ADMIN: [(&str, &str); 1] = [("authorization", "Bearer demo-admin")];
const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";

fn sha(key: &str) -> String {
    pag0::core::compile::sha256_hex(key.as_bytes())
}

fn report(c: &mut Client, session: &str) -> serde_json::Value {
    c.get("h", &format!("/_pag0/v1/sessions/{session}/report"), &ADMIN)
        .json()
}

fn budget(c: &mut Client, session: &str) -> serde_json::Value {
    c.get("h", &format!("/_pag0/v1/sessions/{session}/budget"), &ADMIN)
        .json()
}

/// A well-formed x402 payment header (v1 `X-PAYMENT` or v2 `PAYMENT-SIGNATURE`) of
/// `value`, as an agent would forge it.
fn payment(version: u8, value: &str) -> String {
    let valid_before = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600)
        .to_string();
    let authorization = json!({
        "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": PAY_TO, "value": value,
        "validAfter": "0", "validBefore": valid_before, "nonce": format!("0x{}", "ab".repeat(32)),
    });
    let mut v = json!({
        "x402Version": version,
        "payload": {"signature": format!("0x{}", "cd".repeat(65)), "authorization": authorization},
    });
    if version == 1 {
        v["scheme"] = json!("exact");
        v["network"] = json!("base-sepolia");
    } else {
        v["accepted"] = json!({"scheme": "exact", "network": "eip155:84532", "amount": value,
            "asset": USDC, "payTo": PAY_TO, "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}});
    }
    pag0::core::base64::encode(v.to_string().as_bytes())
}

// --- money ----------------------------------------------------------------------------

#[test]
fn a_forged_payment_header_never_lowers_what_a_call_costs() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("forged");
    let free_ride = payment(1, "0");
    let cheap = payment(2, "1");
    for (name, value) in [
        ("x-payment", free_ride.as_str()),
        ("payment-signature", cheap.as_str()),
    ] {
        let mut h = agent_headers(KEY, &s, "researcher-1");
        h.push((name, value));
        let r = c.post("api.tavily.com", "/search", &h, &fresh_body());
        assert_eq!(
            (r.status, r.error_code().as_deref(), r.cost()),
            (403, Some("PAYMENT_NOT_ALLOWED"), 0),
            "{name} on a priced route that is not an x402 route"
        );
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    // A session killed by its spend stays killed, forged header or not.
    let k = unique("forged-kill");
    let mut n = 0;
    while c
        .post(
            "api.openai.com",
            "/v1/chat/completions",
            &agent_headers(KEY, &k, "autopilot-1"),
            &fresh_body(),
        )
        .status
        == 200
    {
        n += 1;
    }
    assert_eq!(n, 30);
    let mut h = agent_headers(KEY, &k, "autopilot-1");
    h.push(("x-payment", &free_ride));
    let r = c.post("api.openai.com", "/v1/chat/completions", &h, &fresh_body());
    assert_eq!((r.status, r.cost()), (403, 0));
    // Pay mode (x402.local in the reference): pag0 pays; an agent's own payment is refused.
    let mut h = agent_headers(KEY, &s, "buyer-1");
    h.push(("payment-signature", &cheap));
    let r = c.get("x402.local", "/weather", &h);
    assert_eq!(r.error_code().as_deref(), Some("PAYMENT_NOT_ALLOWED"));
}

#[test]
fn on_a_relay_route_a_payment_adds_a_check_and_never_a_discount() {
    let up = Upstream::start();
    let plugin = format!(
        r#"{{"admin": {{"apiKeySha256": "{}"}}, "policies": {{"p": {{"sessionBudget": "100000",
        "x402": {{"networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}}}}}}"#,
        sha("demo-admin")
    );
    let config = EnvoyConfig::new(
        &plugin,
        vec![route(
            "paid.api",
            "/",
            &[("x402", "true"), ("price", "5000")],
        )],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("relay");
    let h = |p: &str| {
        vec![
            ("x-pag0-session", s.clone()),
            ("payment-signature", p.to_string()),
        ]
    };
    let zero = payment(2, "0");
    let r = c.get(
        "paid.api",
        "/x402/a",
        &h(&zero)
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        r.error_code().as_deref(),
        Some("INVALID_REQUEST"),
        "a payment of 0"
    );
    // A payment below the route's price: the route's price is what the call costs.
    let low = payment(2, "1");
    let r = c.get(
        "paid.api",
        "/x402/a",
        &h(&low)
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    assert_eq!((r.status, r.cost()), (200, 5000));
    assert!(r
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("settled; amount=1"));
    let high = payment(2, "10000");
    let r = c.get(
        "paid.api",
        "/x402/b",
        &h(&high)
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
    );
    assert_eq!((r.status, r.cost()), (200, 10_000));
    assert_eq!(report(&mut c, &s)["totalCost"], "15000");
}

#[test]
fn requests_that_end_with_trailers_pass_the_same_gate() {
    let up = Upstream::start();
    let plugin = format!(
        r#"{{"tenants": [{{"id": "demo", "apiKeySha256": "{}"}}],
            "admin": {{"apiKeySha256": "{}"}},
            "cache": {{"methods": ["GET", "POST"], "defaultTTL": 600}},
            "policies": {{"p": {{"sessionBudget": "1000000",
                "requireApproval": {{"threshold": "200000", "cluster": "upstream", "path": "/approve", "timeoutMs": 2000}}}}}}}}"#,
        sha(KEY),
        sha("demo-admin")
    );
    let config = EnvoyConfig::new(
        &plugin,
        vec![
            route("api.tavily.com", "/search", &[("price", "20000")]),
            route("api.tavily.com", "/big", &[("price", "300000")]),
        ],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let s = unique("trailers");
    let h = agent_headers(KEY, &s, "researcher-1");
    // A POST on a cached, priced route that ends with trailers is charged and counted.
    let r = support::h2::request(
        envoy.port,
        "POST",
        "api.tavily.com",
        "/search",
        &h,
        "{\"q\":1}",
        true,
    );
    assert_eq!(
        (r.status, r.header("x-pag0-cost")),
        (200, Some("20000")),
        "{}",
        r.body
    );
    assert_eq!(
        up.count(),
        1,
        "{:?}",
        up.seen()
            .iter()
            .map(|s| (s.method.clone(), s.path.clone(), s.body.len()))
            .collect::<Vec<_>>()
    );
    let mut c = Client::new(envoy.port);
    assert_eq!(report(&mut c, &s)["totalCost"], "20000");
    // A call the approval service denies does not go through.
    let denied = support::h2::request(
        envoy.port,
        "POST",
        "api.tavily.com",
        "/big",
        &h,
        "{\"q\":2}",
        true,
    );
    assert_eq!(
        (denied.status, denied.header("x-pag0-error")),
        (403, Some("APPROVAL_DENIED"))
    );
    assert_eq!(up.count(), 2, "only the approval service was asked");
    assert!(up.seen().iter().all(|seen| seen.path != "/big"));
    // A killed session is refused.
    assert_eq!(
        c.post("h", &format!("/_pag0/v1/sessions/{s}/kill"), &ADMIN, "")
            .status,
        200
    );
    let killed = support::h2::request(
        envoy.port,
        "POST",
        "api.tavily.com",
        "/search",
        &h,
        "{\"q\":3}",
        true,
    );
    assert_eq!(
        (killed.status, killed.header("x-pag0-error")),
        (403, Some("KILL_SWITCH_ACTIVE"))
    );
    assert_eq!(up.count(), 2);
    assert_eq!(report(&mut c, &s)["totalCost"], "20000");
}

#[test]
fn every_path_of_a_paid_host_in_the_reference_is_priced_or_refused() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("paths");
    for (host, path) in [
        ("api.openai.com", "/v1/embeddings"),
        ("api.openai.com", "/v1/images/generations"),
        ("api.openai.com", "/v1/audio/speech"),
        ("api.anthropic.com", "/v1/complete"),
        ("api.tavily.com", "/extract"),
        ("api.exa.ai", "/contents"),
        ("api.deepl.com", "/v2/document"),
    ] {
        let r = c.post(
            host,
            path,
            &agent_headers(KEY, &s, "executor-1"),
            &fresh_body(),
        );
        assert_eq!(
            (r.status, r.error_code().as_deref(), r.cost()),
            (403, Some("ENDPOINT_NOT_ALLOWED"), 0),
            "{host}{path}"
        );
    }
    assert_eq!(up.count(), 0);
    let responses = c.post(
        "api.openai.com",
        "/v1/responses",
        &agent_headers(KEY, &s, "executor-1"),
        &fresh_body(),
    );
    assert_eq!((responses.status, responses.cost()), (200, 150_000));
    let models = c.get(
        "api.openai.com",
        "/v1/models",
        &agent_headers(KEY, &s, "executor-1"),
    );
    assert_eq!((models.status, models.cost()), (200, 0));
}

#[test]
fn agents_that_name_themselves_anew_share_one_budget() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("names");
    // ralph-1 spends its $3, then calls under names no pattern matches.
    for _ in 0..20 {
        assert_eq!(
            c.post(
                "api.openai.com",
                "/v1/chat/completions",
                &agent_headers(KEY, &s, "ralph-1"),
                &fresh_body()
            )
            .status,
            200
        );
    }
    let mut spent = 0;
    for i in 0..10 {
        let r = c.post(
            "api.openai.com",
            "/v1/chat/completions",
            &agent_headers(KEY, &s, &format!("x{i}-1")),
            &fresh_body(),
        );
        if r.status == 200 {
            spent += r.cost();
            continue;
        }
        assert_eq!(r.error_code().as_deref(), Some("AGENT_BUDGET_EXCEEDED"));
        assert_eq!(r.json()["error"]["details"]["limit"], "500000");
        break;
    }
    // Unmatched agents share the reference's $0.50: three $0.15 calls, whatever the names.
    assert_eq!(spent, 450_000);
    assert_eq!(budget(&mut c, &s)["agents"]["unmatched"]["spent"], "450000");
}

#[test]
fn unmatched_agents_can_be_refused() {
    let up = Upstream::start();
    let plugin = r#"{"policies": {"p": {"sessionBudget": "1000000", "unmatchedAgents": "refuse",
        "agents": {"executor-*": {"agentBudget": "500000"}}}}}"#;
    let envoy = Envoy::with_config(
        &EnvoyConfig::new(plugin, vec![route("api", "/", &[("price", "1000")])]),
        up.port,
    );
    let mut c = Client::new(envoy.port);
    let h = |agent: &'static str| [("x-pag0-session", "s"), ("x-pag0-agent", agent)];
    assert_eq!(c.get("api", "/a", &h("executor-1")).status, 200);
    let r = c.get("api", "/a", &h("sneaky-1"));
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (403, Some("AGENT_NOT_ALLOWED"))
    );
    assert_eq!(up.count(), 1);
}

// --- crashes --------------------------------------------------------------------------

fn pay_plugin(extra_signer: &str) -> String {
    format!(
        r#"{{"admin": {{"apiKeySha256": "{}"}},
            "signer": {{"cluster": "upstream", "loopbackCluster": "loopback", "path": "/sign", "timeoutMs": 2000{extra_signer}}},
            "policies": {{"p": {{"sessionBudget": "1000000",
                "x402": {{"mode": "pay", "networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}},
                "relay": {{"sessionBudget": "1000000", "x402": {{"networks": ["eip155:84532"]}}}}}},
            "defaultPolicy": "p"}}"#,
        sha("demo-admin")
    )
}

#[test]
fn bytes_that_are_not_utf8_from_upstreams_never_crash_the_vm() {
    let up = Upstream::start();
    let config = EnvoyConfig::new(
        &pay_plugin(""),
        vec![
            route("paid.api", "/", &[("x402", "true")]),
            route("relay.api", "/", &[("x402", "true"), ("policy", "relay")]),
            route("free.api", "/", &[]),
        ],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("bytes");
    let h = [("x-pag0-session", s.as_str())];
    // Pay mode: the paid retry's answer carries bytes that are not UTF-8, in a header
    // and in its settlement: the answer goes through, the payment flagged unconfirmed.
    let r = c.get("paid.api", "/x402/badbytes/", &h);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("unconfirmed; amount=10000"));
    // Relay mode and a plain route: the same bytes pass.
    let paid = payment(2, "10000");
    let r = c.get(
        "relay.api",
        "/x402/badbytes/",
        &[("x-pag0-session", s.as_str()), ("payment-signature", &paid)],
    );
    assert_eq!(r.status, 200);
    let r = c.get("free.api", "/badbytes/", &h);
    assert_eq!(r.status, 200);
    // The VMs are alive: no panic, and calls go on on both workers.
    for _ in 0..8 {
        assert_eq!(
            Client::new(envoy.port).get("free.api", "/ok", &h).status,
            200
        );
    }
    let log = envoy.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("Function: proxy_on"), "{log}");
}

#[test]
fn uploads_to_routes_that_cannot_be_paid_are_not_kept_and_kept_bodies_are_bounded() {
    let up = Upstream::start();
    up.stop_recording();
    // 256 KiB of room for bodies kept for paid retries, 128 KiB per body.
    let config = EnvoyConfig::new(
        &pay_plugin(r#", "maxBodyBytes": 131072, "maxBufferedBytes": 262144"#),
        vec![
            route("paid.api", "/", &[("x402", "true")]),
            route("free.api", "/", &[]),
        ],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let before = envoy.rss_kib();
    // 64 concurrent 1 MiB uploads to a free route: passed on, never copied.
    let body = vec![b'x'; 1 << 20];
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let (port, body) = (envoy.port, body.clone());
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                let s = format!("up-{i}");
                c.send(
                    "POST",
                    "free.api",
                    "/delay/300/",
                    &[("x-pag0-session", &s)],
                    &body,
                )
                .status
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    let after = envoy.rss_kib();
    assert!(
        after < before + 48 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // Paid-retry bodies past the VM's room: refused at once with 503, nothing kept.
    let small = vec![b'y'; 100 * 1024];
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (port, small) = (envoy.port, small.clone());
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                let s = format!("paid-{i}");
                let r = c.send(
                    "POST",
                    "paid.api",
                    "/x402/delay/500/",
                    &[("x-pag0-session", &s)],
                    &small,
                );
                (r.status, r.header("x-pag0-error").map(str::to_string))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let paid = results.iter().filter(|(s, _)| *s == 200).count();
    let refused = results
        .iter()
        .filter(|r| **r == (503, Some("CAPACITY_EXCEEDED".to_string())))
        .count();
    assert_eq!(paid + refused, 8, "{results:?}");
    assert!(paid >= 2 && refused >= 1, "{results:?}");
}

#[test]
fn a_vm_that_dies_mid_call_leaves_nothing_reserved_and_its_call_charged() {
    let up = Upstream::start();
    let plugin = format!(
        r#"{{"tenants": [{{"id": "demo", "apiKeySha256": "{}"}}], "admin": {{"apiKeySha256": "{}"}},
            "ledger": {{"ownerLeaseSeconds": 3}},
            "faultInjection": {{"crashHeader": "x-test-crash"}},
            "policies": {{"p": {{"sessionBudget": "1000000", "dailyBudget": "5000000"}}}}}}"#,
        sha(KEY),
        sha("demo-admin")
    );
    let config = EnvoyConfig::new(&plugin, vec![route("api", "/", &[("price", "70000")])]);
    // One worker: the crash takes down the VM that holds the reservation.
    let envoy = Envoy::start_workers(|port, admin| config.render(port, admin, up.port), 1);
    let s = unique("crash");
    let port = envoy.port;
    let session = s.clone();
    let in_flight = std::thread::spawn(move || {
        let mut c = Client::new(port);
        c.get(
            "api",
            "/delay/2500/",
            &agent_headers(KEY, &session, "executor-1"),
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut c = Client::new(envoy.port);
    let held = budget(&mut c, &s);
    assert_eq!(held["session"]["reserved"], "70000", "{held}");
    // The VM dies mid-call (a trap, as a panic is); FAIL_RELOAD brings a fresh one.
    let crash = Client::new(envoy.port).get(
        "api",
        "/x",
        &[("x-test-crash", "1"), ("x-pag0-session", "other")],
    );
    assert!(crash.status >= 500);
    let _ = in_flight.join();
    // After the dead VM's lease, another VM charges its reservation as unconfirmed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = json!(null);
    while Instant::now() < deadline {
        let b = Client::new(envoy.port).get("h", &format!("/_pag0/v1/sessions/{s}/budget"), &ADMIN);
        if b.status == 200 {
            last = b.json();
            if last["session"]["reserved"] == "0" && last["daily"]["reserved"] == "0" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(last["session"]["reserved"], "0", "{last}\n{}", envoy.log());
    assert_eq!(last["session"]["spent"], "70000", "{last}");
    assert_eq!(last["daily"]["reserved"], "0", "{last}");
    assert_eq!(last["daily"]["spent"], "70000", "{last}");
    let r = report(&mut Client::new(envoy.port), &s);
    assert_eq!(r["unconfirmedPayments"]["count"], 1, "{r}");
    assert_eq!(r["totalCost"], "70000");
}

// --- availability ---------------------------------------------------------------------

#[test]
fn sessions_that_never_spent_do_not_fill_the_session_table() {
    let up = Upstream::start();
    up.stop_recording();
    let plugin =
        r#"{"sessions": {"maxSessions": 64}, "policies": {"p": {"sessionBudget": "1000000"}}}"#;
    let envoy = Envoy::with_config(
        &EnvoyConfig::new(plugin, vec![route("api", "/", &[("price", "1000")])]),
        up.port,
    );
    let mut c = Client::new(envoy.port);
    // 1,000 priced calls from new session ids whose upstream fails: released, $0.
    for i in 0..1000 {
        let r = c.get(
            "api",
            "/status/500/",
            &[("x-pag0-session", &format!("junk-{i}"))],
        );
        assert_eq!(r.status, 500);
    }
    // Real sessions still get slots.
    for i in 0..32 {
        let r = c.get("api", "/ok", &[("x-pag0-session", &format!("real-{i}"))]);
        assert_eq!(
            (r.status, r.cost()),
            (200, 1000),
            "session {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

// --- cache ----------------------------------------------------------------------------

fn cache_envoy(up: &Upstream, scope: &str) -> Envoy {
    let plugin = format!(
        r#"{{"admin": {{"apiKeySha256": "{}"}},
            "cache": {{"scope": "{scope}", "methods": ["GET", "POST"], "defaultTTL": 600}},
            "policies": {{"p": {{"sessionBudget": "100000000"}}}}}}"#,
        sha("demo-admin")
    );
    Envoy::with_config(
        &EnvoyConfig::new(&plugin, vec![route("api", "/", &[("price", "100")])]),
        up.port,
    )
}

#[test]
fn compressed_answers_are_stored_with_their_encoding_and_served_only_to_who_asked() {
    let up = Upstream::start();
    let envoy = cache_envoy(&up, "session");
    let mut c = Client::new(envoy.port);
    let s = unique("gzip");
    let gzip = [("x-pag0-session", s.as_str()), ("accept-encoding", "gzip")];
    let plain = [("x-pag0-session", s.as_str())];
    let first = c.get("api", "/gzip/a", &gzip);
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    let hit = c.get("api", "/gzip/a", &gzip);
    assert_eq!(hit.header("x-pag0-cached"), Some("true"));
    assert_eq!(hit.header("content-encoding"), Some("gzip"));
    assert_eq!(hit.body, first.body);
    // A client that did not ask for gzip never gets the gzip body.
    let other = c.get("api", "/gzip/a", &plain);
    assert_eq!(other.header("x-pag0-cached"), Some("false"));
    assert_eq!(other.header("content-encoding"), None);
    assert!(other.json()["ok"].as_bool().unwrap());
    assert_eq!(up.count(), 2);
}

#[test]
fn answers_a_shared_cache_must_not_store_are_not_stored() {
    let up = Upstream::start();
    let envoy = cache_envoy(&up, "tenant");
    let mut c = Client::new(envoy.port);
    let h = [("x-pag0-session", "s")];
    for path in [
        "/cc/no-cache/a",
        "/cc/max-age=0/a",
        "/cc/private/a",
        "/cookie/a",
        "/vary/authorization/a",
    ] {
        let before = up.count();
        c.get("api", path, &h);
        let again = c.get("api", path, &h);
        assert_eq!(again.header("x-pag0-cached"), Some("false"), "{path}");
        assert_eq!(up.count(), before + 2, "{path} was stored");
    }
    // A max-age below the configured TTL is honoured; an ordinary answer is stored.
    c.get("api", "/cc/max-age=1/b", &h);
    assert_eq!(
        c.get("api", "/cc/max-age=1/b", &h).header("x-pag0-cached"),
        Some("true")
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        c.get("api", "/cc/max-age=1/b", &h).header("x-pag0-cached"),
        Some("false")
    );
    // A partial answer to a Range request is neither stored nor served to others.
    let ranged = [("x-pag0-session", "s"), ("range", "bytes=0-3")];
    let part = c.get("api", "/range/c", &ranged);
    assert_eq!(part.status, 206);
    let whole = c.get("api", "/range/c", &h);
    assert_eq!(
        (whole.status, whole.header("x-pag0-cached")),
        (200, Some("false"))
    );
    assert_eq!(c.get("api", "/range/c", &ranged).status, 206);
}

#[test]
fn callers_with_other_credentials_or_ports_never_share_an_answer() {
    let up = Upstream::start();
    let envoy = cache_envoy(&up, "tenant");
    let mut c = Client::new(envoy.port);
    let alice = [("x-pag0-session", "a"), ("authorization", "Bearer alice")];
    let bob = [("x-pag0-session", "b"), ("authorization", "Bearer bob")];
    c.get("api", "/doc", &alice);
    assert_eq!(
        c.get("api", "/doc", &alice).header("x-pag0-cached"),
        Some("true")
    );
    assert_eq!(
        c.get("api", "/doc", &bob).header("x-pag0-cached"),
        Some("false")
    );
    let key_a = [("x-pag0-session", "a"), ("x-api-key", "k1")];
    let key_b = [("x-pag0-session", "a"), ("x-api-key", "k2")];
    c.get("api", "/doc2", &key_a);
    assert_eq!(
        c.get("api", "/doc2", &key_b).header("x-pag0-cached"),
        Some("false")
    );
    let xml = [("x-pag0-session", "a"), ("accept", "application/xml")];
    assert_eq!(
        c.get("api", "/doc2", &xml).header("x-pag0-cached"),
        Some("false")
    );
    c.get("api", "/doc3", &[("x-pag0-session", "a")]);
    assert_eq!(
        c.get("api:8443", "/doc3", &[("x-pag0-session", "a")])
            .header("x-pag0-cached"),
        Some("false")
    );
}

#[test]
fn a_stream_on_a_cached_route_is_never_held_back() {
    let up = Upstream::start();
    let envoy = cache_envoy(&up, "session");
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /sse/x HTTP/1.1\r\nhost: api\r\nx-pag0-session: sse\r\n\r\n"
    )
    .unwrap();
    // The first event (not just the headers) arrives as the upstream sends it.
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("data:") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed before its first event");
        seen.extend_from_slice(&buf[..n]);
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(900),
        "first event after {waited:?}"
    );
    drop(stream);
    // Not stored: the next one goes upstream too.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Client::new(envoy.port);
    let again = c.get("api", "/sse/x", &[("x-pag0-session", "sse")]);
    assert_eq!(again.header("x-pag0-cached"), Some("false"));
}

#[test]
fn a_killed_session_gets_no_cache_hits() {
    let up = Upstream::start();
    let envoy = cache_envoy(&up, "session");
    let mut c = Client::new(envoy.port);
    let s = unique("killhit");
    let h = [("x-pag0-session", s.as_str())];
    c.get("api", "/doc", &h);
    assert_eq!(
        c.get("api", "/doc", &h).header("x-pag0-cached"),
        Some("true")
    );
    assert_eq!(
        c.post("h", &format!("/_pag0/v1/sessions/{s}/kill"), &ADMIN, "")
            .status,
        200
    );
    let r = c.get("api", "/doc", &h);
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (403, Some("KILL_SWITCH_ACTIVE"))
    );
    assert_eq!(
        c.post("h", "/_pag0/v1/sessions/never-seen/kill", &ADMIN, "")
            .status,
        404
    );
}

// --- small ----------------------------------------------------------------------------

#[test]
fn preflights_are_free_head_is_charged_and_the_live_page_cannot_be_framed() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("methods");
    let h = agent_headers(KEY, &s, "executor-1");
    let options = c.send("OPTIONS", "api.openai.com", "/v1/chat/completions", &h, b"");
    assert_eq!(options.cost(), 0);
    // HEAD may run the paid handler: charged like GET (read by hand: no body follows).
    let head = {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
        write!(
            raw,
            "HEAD /search HTTP/1.1\r\nhost: api.tavily.com\r\nx-pag0-api-key: {KEY}\r\nx-pag0-session: {s}\r\nx-pag0-agent: researcher-1\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        raw.read_to_string(&mut text).unwrap();
        text
    };
    assert!(head.contains("x-pag0-cost: 20000"), "{head}");
    let page = c.get("h", "/_pag0/dashboard", &[]);
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'sha256-"),
        "{csp}"
    );
}
