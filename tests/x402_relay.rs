//! x402 relay mode through a real Envoy: the agent pays with its own wallet; pag0
//! decodes its payment, refuses what policy does not allow, reserves the value, and
//! settles or releases from the server's answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use pag0::core::base64;
use serde_json::json;
use support::envoy::{route, EnvoyConfig};
use support::{unique, Client, Envoy, Upstream};

const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const ASSET: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";

fn config() -> EnvoyConfig {
    let plugin = format!(
        r#"{{"policies": {{"p": {{"sessionBudget": "25000", "maxPerRequest": "20000",
            "x402": {{"networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}}}}}}"#
    );
    EnvoyConfig::new(
        &plugin,
        vec![route(
            "paid.api",
            "/",
            &[("tool", "search"), ("x402", "true")],
        )],
    )
}

fn payment(value: &str, pay_to: &str, network: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let accepted = json!({"scheme": "exact", "network": network, "amount": value, "asset": ASSET, "payTo": pay_to,
                          "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}});
    let header = json!({"x402Version": 2, "accepted": accepted, "payload": {
        "signature": format!("0x{}", "cd".repeat(65)),
        "authorization": {"from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": pay_to, "value": value,
                          "validAfter": (now - 60).to_string(), "validBefore": (now + 300).to_string(),
                          "nonce": format!("0x{}", "11".repeat(32))}}});
    base64::encode(header.to_string().as_bytes())
}

#[test]
fn relayed_payments_are_budgeted_settled_or_released() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&config(), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("relay");
    let call = |c: &mut Client, path: &str, pay: Option<String>| {
        let mut h = vec![("x-pag0-session", s.as_str()), ("x-pag0-agent", "agent-1")];
        let p;
        if let Some(v) = pay {
            p = v;
            h.push(("payment-signature", p.as_str()));
        }
        c.get("paid.api", path, &h)
    };
    // Without a payment the 402 passes through unchanged, for the agent to pay.
    let offer = call(&mut c, "/x402/search", None);
    assert_eq!(offer.status, 402);
    assert!(offer.header("payment-required").is_some());
    assert_eq!(offer.cost(), 0);
    // A settled payment is charged its value and reported.
    let paid = call(
        &mut c,
        "/x402/search",
        Some(payment("10000", PAY_TO, "eip155:84532")),
    );
    assert_eq!((paid.status, paid.cost()), (200, 10_000));
    let note = paid.header("x-pag0-payment").unwrap();
    assert!(
        note.starts_with("settled; amount=10000; network=\"eip155:84532\"; tx=\"0xabab"),
        "{note}"
    );
    assert_eq!(paid.remaining("session"), Some(15_000));
    assert!(
        up.last()
            .headers
            .iter()
            .any(|(k, _)| k == "payment-signature"),
        "the payment is relayed"
    );
    // A payment the server rejects is released.
    let rejected = call(
        &mut c,
        "/x402-reject/search",
        Some(payment("10000", PAY_TO, "eip155:84532")),
    );
    assert_eq!((rejected.status, rejected.cost()), (402, 0));
    assert!(rejected
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("failed"));
    assert_eq!(rejected.remaining("session"), Some(15_000));
    // No settlement: the money may have moved, so it stays charged, unconfirmed.
    let unknown = call(
        &mut c,
        "/x402-nosettle/search",
        Some(payment("5000", PAY_TO, "eip155:84532")),
    );
    assert_eq!((unknown.status, unknown.cost()), (200, 5000));
    assert!(unknown
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("unconfirmed"));
    // Policy: payee, network, per-request cap, budget; and garbage is a 400.
    let code = |r: support::Response| (r.status, r.error_code());
    assert_eq!(
        code(call(
            &mut c,
            "/x402/search",
            Some(payment(
                "100",
                "0x0000000000000000000000000000000000000001",
                "eip155:84532"
            ))
        )),
        (403, Some("PAYMENT_NOT_ALLOWED".into()))
    );
    assert_eq!(
        code(call(
            &mut c,
            "/x402/search",
            Some(payment("100", PAY_TO, "eip155:1"))
        )),
        (403, Some("PAYMENT_NOT_ALLOWED".into()))
    );
    assert_eq!(
        code(call(
            &mut c,
            "/x402/search",
            Some(payment("20001", PAY_TO, "eip155:84532"))
        )),
        (403, Some("PER_REQUEST_LIMIT_EXCEEDED".into()))
    );
    assert_eq!(
        code(call(
            &mut c,
            "/x402/search",
            Some(payment("15000", PAY_TO, "eip155:84532"))
        )),
        (403, Some("SESSION_BUDGET_EXCEEDED".into()))
    );
    assert_eq!(
        code(call(&mut c, "/x402/search", Some("not base64!".into()))),
        (400, Some("INVALID_REQUEST".into()))
    );
    let huge = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    assert_eq!(
        code(call(
            &mut c,
            "/x402/search",
            Some(payment(huge, PAY_TO, "eip155:84532"))
        )),
        (400, Some("INVALID_REQUEST".into()))
    );
    // The report counts the unconfirmed payment.
    let report = c
        .get("h", &format!("/_pag0/v1/sessions/{s}/report"), &[])
        .status;
    assert_eq!(
        report, 401,
        "no admin key configured: the report API stays closed"
    );
    let budget_left = call(&mut c, "/free", None).remaining("session");
    assert_eq!(budget_left, Some(10_000));
}

fn pay_config(signer_cluster: &str) -> EnvoyConfig {
    let plugin = format!(
        r#"{{"signer": {{"cluster": "{signer_cluster}", "loopbackCluster": "loopback", "path": "/sign", "timeoutMs": 500}},
            "policies": {{"p": {{"sessionBudget": "25000", "maxPerRequest": "20000",
            "x402": {{"mode": "pay", "networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}}}}}}"#
    );
    let mut config = EnvoyConfig::new(
        &plugin,
        vec![route(
            "paid.api",
            "/",
            &[("tool", "search"), ("x402", "true")],
        )],
    );
    config
        .clusters
        .push(("signer_dead".to_string(), support::free_port()));
    config
}

#[test]
fn pay_mode_pays_the_402_through_the_signer_and_retries_once() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&pay_config("upstream"), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("pay");
    let h = [("x-pag0-session", s.as_str()), ("x-pag0-agent", "agent-1")];
    // GET: the agent never sees the 402.
    let r = c.get("paid.api", "/x402/search?q=1", &h);
    assert_eq!(
        (r.status, r.cost()),
        (200, 10_000),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("settled; amount=10000"));
    assert_eq!(r.remaining("session"), Some(15_000));
    let retried = up.last();
    assert!(retried
        .headers
        .iter()
        .any(|(k, _)| k == "payment-signature"));
    assert_eq!(retried.path, "/x402/search?q=1");
    // POST: the retry carries the original body.
    let r = c.post("paid.api", "/x402/do", &h, "{\"task\":\"summarise\"}");
    assert_eq!((r.status, r.cost()), (200, 10_000));
    assert_eq!(up.last().body, b"{\"task\":\"summarise\"}");
    assert_eq!(up.last().method, "POST");
    // The budget now cannot fund another payment: refused before anything is signed.
    let refused = c.get("paid.api", "/x402/search?q=2", &h);
    assert_eq!(
        refused.error_code().as_deref(),
        Some("SESSION_BUDGET_EXCEEDED")
    );
    assert_eq!(refused.json()["error"]["details"]["requested"], "10000");
    // A server that rejects the payment: released, 502 PAYMENT_FAILED.
    let s2 = unique("pay");
    let h2 = [("x-pag0-session", s2.as_str())];
    let rejected = Client::new(envoy.port).get("paid.api", "/x402-reject/x", &h2);
    assert_eq!(
        (rejected.status, rejected.error_code().as_deref()),
        (502, Some("PAYMENT_FAILED"))
    );
    assert_eq!(rejected.remaining("session"), Some(25_000));
}

#[test]
fn pay_mode_reads_402_bodies_and_limits_what_it_keeps_to_retry() {
    let up = Upstream::start();
    let mut config = pay_config("upstream");
    config.plugin_json = config.plugin_json.replace(
        r#""timeoutMs": 500"#,
        r#""timeoutMs": 500, "maxBodyBytes": 64"#,
    );
    let envoy = Envoy::with_config(&config, up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("pay-body");
    let h = [("x-pag0-session", s.as_str())];
    // A 402 that is not an x402 offer (no header, a body without x402Version)
    // reaches the agent as it is, uncharged.
    let plain = c.get("paid.api", "/status/402/plain", &h);
    assert_eq!((plain.status, plain.cost()), (402, 0));
    assert!(String::from_utf8_lossy(&plain.body).contains("\"ok\":true"));
    // A 402 whose body claims v1 but is malformed: 502 naming the fault, released.
    let bad = c.get("paid.api", "/x402-v1bad/x", &h);
    assert_eq!(
        (bad.status, bad.error_code().as_deref(), bad.cost()),
        (502, Some("PAYMENT_FAILED"), 0),
        "{}",
        String::from_utf8_lossy(&bad.body)
    );
    assert!(String::from_utf8_lossy(&bad.body).contains("accepts"));
    // A body above signer.maxBodyBytes cannot be retried with a payment: 413.
    let big = c.post("paid.api", "/x402/upload", &h, &"y".repeat(100));
    assert_eq!(
        (big.status, big.error_code().as_deref(), big.cost()),
        (413, Some("INVALID_REQUEST"), 0),
        "{}",
        String::from_utf8_lossy(&big.body)
    );
    assert!(String::from_utf8_lossy(&big.body).contains("signer.maxBodyBytes (64)"));
    // Nothing was paid or held.
    let ok = c.post("paid.api", "/x402/small", &h, "{}");
    assert_eq!((ok.status, ok.cost()), (200, 10_000));
    assert_eq!(ok.remaining("session"), Some(15_000));
}

#[test]
fn pay_mode_with_the_signer_down_answers_503_and_releases() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&pay_config("signer_dead"), up.port);
    let s = unique("pay");
    let r = Client::new(envoy.port).get(
        "paid.api",
        "/x402/search",
        &[("x-pag0-session", s.as_str())],
    );
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (503, Some("SIGNER_UNAVAILABLE"))
    );
    let after = Client::new(envoy.port).get("paid.api", "/free", &[("x-pag0-session", s.as_str())]);
    assert_eq!(after.remaining("session"), Some(25_000));
}

#[test]
fn calls_above_the_approval_threshold_wait_for_the_approval_service() {
    let plugin = r#"{"policies": {
        "p": {"sessionBudget": "1000000", "requireApproval": {"threshold": "50000", "cluster": "upstream", "path": "/approve", "timeoutMs": 500}},
        "slow": {"sessionBudget": "1000000", "requireApproval": {"threshold": "50000", "cluster": "upstream", "path": "/approve/delay/1500/", "timeoutMs": 300}}
    }, "defaultPolicy": "p"}"#;
    let up = Upstream::start();
    let envoy = Envoy::with_config(
        &EnvoyConfig::new(
            plugin,
            vec![
                route("api", "/cheap", &[("price", "20000")]),
                route("api", "/mid", &[("price", "80000")]),
                route("api", "/big", &[("price", "150000")]),
                route("api", "/slow", &[("price", "80000"), ("policy", "slow")]),
            ],
        ),
        up.port,
    );
    let mut c = Client::new(envoy.port);
    let s = unique("approve");
    let h = [("x-pag0-session", s.as_str())];
    assert_eq!(c.get("api", "/cheap", &h).cost(), 20_000);
    let approved = c.post("api", "/mid", &h, "{\"body\":1}");
    assert_eq!((approved.status, approved.cost()), (200, 80_000));
    assert_eq!(
        up.last().body,
        b"{\"body\":1}",
        "the held request goes upstream intact"
    );
    // A POST above the limit is held, body and all, and never reaches the upstream.
    let before = up.count();
    let denied_post = c.post("api", "/big", &h, "{\"body\":2}");
    assert_eq!(denied_post.error_code().as_deref(), Some("APPROVAL_DENIED"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        up.seen().iter().filter(|r| r.path == "/big").count(),
        0,
        "denied POST leaked upstream"
    );
    let _ = before;
    let denied = c.get("api", "/big", &h);
    assert_eq!(
        (denied.status, denied.error_code().as_deref()),
        (403, Some("APPROVAL_DENIED"))
    );
    assert_eq!(denied.json()["error"]["details"]["reason"], "limit 100000");
    let timeout = Client::new(envoy.port).get("api", "/slow", &h);
    assert_eq!(
        (timeout.status, timeout.error_code().as_deref()),
        (504, Some("APPROVAL_TIMEOUT"))
    );
    // Denied and timed-out calls hold nothing: only the two paid calls are spent.
    assert_eq!(
        c.get("api", "/cheap", &h).remaining("session"),
        Some(1_000_000 - 20_000 - 80_000 - 20_000)
    );
    assert_eq!(
        up.seen()
            .iter()
            .filter(|r| !r.path.starts_with("/approve"))
            .count(),
        3
    );
    let approvals: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|r| r.path.starts_with("/approve"))
        .collect();
    let first: serde_json::Value = serde_json::from_slice(&approvals[0].body).unwrap();
    assert_eq!(
        (first["price"].as_str(), first["endpoint"].as_str()),
        (Some("80000"), Some("api/mid"))
    );
}

#[test]
fn pay_mode_asks_for_approval_before_signing() {
    let plugin = format!(
        r#"{{"signer": {{"cluster": "upstream", "loopbackCluster": "loopback", "path": "/sign", "timeoutMs": 500}},
            "policies": {{"p": {{"sessionBudget": "25000",
            "requireApproval": {{"threshold": "5000", "cluster": "upstream", "path": "/approve", "timeoutMs": 500}},
            "x402": {{"mode": "pay", "networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}}}}}}"#
    );
    let up = Upstream::start();
    let envoy = Envoy::with_config(
        &EnvoyConfig::new(&plugin, vec![route("paid.api", "/", &[("x402", "true")])]),
        up.port,
    );
    let s = unique("pay-approve");
    let r = Client::new(envoy.port).get(
        "paid.api",
        "/x402/search",
        &[("x-pag0-session", s.as_str())],
    );
    assert_eq!(
        (r.status, r.cost()),
        (200, 10_000),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let order: Vec<String> = up.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(order, ["/x402/search", "/approve", "/sign", "/x402/search"]);
}
