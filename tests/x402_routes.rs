//! x402 in front of real servers (issue 11), against the stand-in x402 server of
//! `support::upstream`: pay mode on a rewritten route, a priced pay-mode route that
//! must not leak reservations, the server's reason for a failed settlement, unknown
//! outcomes answered in pag0's words in both modes, v1 relay payments checked against
//! the offer's asset, stock clients without pag0's headers, chain names of both
//! versions, assets without a conversion, and relay offers the budget cannot cover.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use pag0::core::base64;
use serde_json::json;
use support::envoy::route;
use support::{unique, Client, Envoy, EnvoyConfig, Upstream};

const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
const ADMIN: [(&str, &str); 1] = [("authorization", "Bearer demo-admin")];

fn sha(key: &str) -> String {
    pag0::core::compile::sha256_hex(key.as_bytes())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An agent's own v2 payment (`PAYMENT-SIGNATURE`).
fn v2_payment(value: &str, network: &str, asset: &str) -> String {
    let accepted = json!({"scheme": "exact", "network": network, "amount": value, "asset": asset, "payTo": PAY_TO,
                          "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}});
    let header = json!({"x402Version": 2, "accepted": accepted, "payload": {
        "signature": format!("0x{}", "cd".repeat(65)),
        "authorization": {"from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": PAY_TO, "value": value,
                          "validAfter": "0", "validBefore": (now() + 300).to_string(),
                          "nonce": format!("0x{}", "12".repeat(32))}}});
    base64::encode(header.to_string().as_bytes())
}

/// An agent's own v1 payment (`X-PAYMENT`): it does not name its asset.
fn v1_payment(value: &str) -> String {
    let header = json!({"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": {
        "signature": format!("0x{}", "cd".repeat(65)),
        "authorization": {"from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": PAY_TO, "value": value,
                          "validAfter": "0", "validBefore": (now() + 300).to_string(),
                          "nonce": format!("0x{}", "13".repeat(32))}}});
    base64::encode(header.to_string().as_bytes())
}

fn plugin(policies: &str, signer_extra: &str) -> String {
    format!(
        r#"{{"admin": {{"apiKeySha256": "{}"}},
            "signer": {{"cluster": "upstream", "loopbackCluster": "loopback", "path": "/sign", "timeoutMs": 2000{signer_extra}}},
            "policies": {policies}, "defaultPolicy": "pay"}}"#,
        sha("demo-admin")
    )
}

fn pay_policy(budget: &str) -> String {
    format!(
        r#""pay": {{"sessionBudget": "{budget}", "x402": {{"mode": "pay", "networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}}"#
    )
}

fn report(port: u16, session: &str) -> serde_json::Value {
    Client::new(port)
        .get("h", &format!("/_pag0/v1/sessions/{session}/report"), &ADMIN)
        .json()
}

#[test]
fn the_paid_retry_reaches_what_the_route_sent_the_first_time() {
    let up = Upstream::start();
    let config = EnvoyConfig::new(
        &plugin(&format!("{{{}}}", pay_policy("100000")), ""),
        vec![route("paid.api", "/api/", &[("x402", "true")])
            .rewrite("/")
            .add_header("x-route-added", "yes")],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let s = unique("rewrite");
    let r = Client::new(envoy.port).get(
        "paid.api",
        "/api/x402/weather?city=Paris",
        &[("x-pag0-session", &s)],
    );
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
    let seen = up.seen();
    let paid: Vec<_> = seen
        .iter()
        .filter(|s| s.headers.iter().any(|(k, _)| k == "payment-signature"))
        .collect();
    assert_eq!(paid.len(), 1, "one paid retry");
    // The same path and added header as the first try, and none of pag0's own headers.
    assert_eq!(paid[0].path, "/x402/weather?city=Paris");
    assert!(paid[0]
        .headers
        .iter()
        .any(|(k, v)| k == "x-route-added" && v == "yes"));
    assert!(paid[0]
        .headers
        .iter()
        .all(|(k, _)| !k.starts_with("x-pag0-")));
    let first = seen
        .iter()
        .find(|s| s.path.starts_with("/x402/weather"))
        .unwrap();
    assert_eq!(first.path, paid[0].path);
}

#[test]
fn a_priced_pay_mode_route_leaks_no_reservation() {
    let up = Upstream::start();
    let config = EnvoyConfig::new(
        &plugin(&format!("{{{}}}", pay_policy("30000")), ""),
        vec![route(
            "paid.api",
            "/",
            &[("x402", "true"), ("price", "5000")],
        )],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("leak");
    // The route's $0.005 is reserved for the first leg and given back at the 402; the
    // payment ($0.01) is reserved on its own: three calls fit a $0.03 session.
    for i in 0..3 {
        let r = c.get("paid.api", &format!("/x402/{i}"), &[("x-pag0-session", &s)]);
        assert_eq!(
            (r.status, r.cost()),
            (200, 10_000),
            "call {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let b = c
        .get("h", &format!("/_pag0/v1/sessions/{s}/budget"), &ADMIN)
        .json();
    assert_eq!(
        (
            b["session"]["spent"].as_str(),
            b["session"]["reserved"].as_str()
        ),
        (Some("30000"), Some("0"))
    );
}

#[test]
fn a_failed_settlement_carries_the_servers_reason_and_the_payment_header() {
    let up = Upstream::start();
    let config = EnvoyConfig::new(
        &plugin(&format!("{{{}}}", pay_policy("100000")), ""),
        vec![route("paid.api", "/", &[("x402", "true")])],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let s = unique("fail");
    let r = Client::new(envoy.port).get("paid.api", "/x402-fail/a", &[("x-pag0-session", &s)]);
    assert_eq!(
        (r.status, r.error_code().as_deref(), r.cost()),
        (502, Some("PAYMENT_FAILED"), 0)
    );
    let details = &r.json()["error"]["details"];
    assert!(
        details["reason"]
            .as_str()
            .unwrap()
            .contains("insufficient_funds"),
        "{details}"
    );
    assert!(r
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("failed; amount=10000"));
    assert_eq!(r.remaining("session"), Some(100_000));
}

#[test]
fn an_unknown_outcome_is_pag0s_refusal_with_what_was_charged_in_both_modes() {
    let up = Upstream::start();
    let policies = format!(
        r#"{{{}, "relay": {{"sessionBudget": "100000", "x402": {{"networks": ["eip155:84532"]}}}}}}"#,
        pay_policy("100000")
    );
    let config = EnvoyConfig::new(
        &plugin(&policies, r#", "retryTimeoutMs": 800"#),
        vec![
            route("paid.api", "/", &[("x402", "true")]),
            route("relay.api", "/", &[("x402", "true"), ("policy", "relay")]),
        ],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let s = unique("unknown");
    // Pay mode: the paid retry outlasts signer.retryTimeoutMs.
    let r = Client::new(envoy.port).get("paid.api", "/x402/delay/2000/", &[("x-pag0-session", &s)]);
    assert_eq!(
        (r.status, r.error_code().as_deref(), r.cost()),
        (502, Some("PAYMENT_UNCONFIRMED"), 10_000)
    );
    assert!(r
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("unconfirmed; amount=10000"));
    assert_eq!(r.json()["error"]["details"]["amount"], "10000");
    // Relay mode: the agent's own paid call outlasts the route's timeout (5 s).
    let paid = v2_payment("10000", "eip155:84532", USDC);
    let r = Client::new(envoy.port).get(
        "relay.api",
        "/x402/delay/6000/",
        &[("x-pag0-session", &s), ("payment-signature", &paid)],
    );
    assert_eq!(
        (r.status, r.error_code().as_deref(), r.cost()),
        (502, Some("PAYMENT_UNCONFIRMED"), 10_000)
    );
    assert!(r
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("unconfirmed; amount=10000"));
    let rep = report(envoy.port, &s);
    assert_eq!(rep["unconfirmedPayments"]["count"], 2, "{rep}");
    assert_eq!(rep["totalCost"], "20000");
}

#[test]
fn relay_mode_checks_a_v1_payment_against_the_asset_of_the_offer_it_answers() {
    let up = Upstream::start();
    let policies = format!(
        r#"{{"pay": {{"sessionBudget": "100000"}}, "relay": {{"sessionBudget": "100000",
            "x402": {{"networks": ["base-sepolia"], "assets": ["{USDC}"], "payees": ["{PAY_TO}"]}}}}}}"#
    );
    let config = EnvoyConfig::new(
        &plugin(&policies, ""),
        vec![route(
            "relay.api",
            "/",
            &[("x402", "true"), ("policy", "relay")],
        )],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("v1");
    let h = [("x-pag0-session", s.as_str())];
    // The agent's first call gets the server's v1 offer (through pag0, which remembers it).
    let offer = c.get("relay.api", "/x402v1/report", &h);
    assert_eq!(offer.status, 402);
    assert_eq!(offer.json()["accepts"][0]["asset"], USDC);
    // Its v1 payment names no asset: the offer's is checked against x402.assets.
    let pay = v1_payment("10000");
    let r = c.get(
        "relay.api",
        "/x402v1/report",
        &[("x-pag0-session", &s), ("x-payment", &pay)],
    );
    assert_eq!(
        (r.status, r.cost()),
        (200, 10_000),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // Without an offer seen for this session and endpoint, the asset is unknown: refused,
    // naming the field.
    let other = unique("v1-cold");
    let r = c.get(
        "relay.api",
        "/x402v1/other",
        &[("x-pag0-session", &other), ("x-payment", &pay)],
    );
    assert_eq!(r.error_code().as_deref(), Some("PAYMENT_NOT_ALLOWED"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("asset"));
}

#[test]
fn v1_and_v2_chain_names_are_one_chain_and_unknown_assets_never_count_as_usdc() {
    let up = Upstream::start();
    let policies = r#"{"pay": {"sessionBudget": "100000"}, "relay": {"sessionBudget": "100000",
        "x402": {"networks": ["base-sepolia"]}}}"#;
    let config = EnvoyConfig::new(
        &plugin(policies, ""),
        vec![route(
            "relay.api",
            "/",
            &[("x402", "true"), ("policy", "relay")],
        )],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("chains");
    let v2 = v2_payment("10000", "eip155:84532", USDC);
    let r = c.get(
        "relay.api",
        "/x402/a",
        &[("x-pag0-session", &s), ("payment-signature", &v2)],
    );
    assert_eq!(
        (r.status, r.cost()),
        (200, 10_000),
        "base-sepolia allows eip155:84532"
    );
    let fake = v2_payment(
        "10000",
        "eip155:84532",
        "0x0000000000000000000000000000000000000bad",
    );
    let r = c.get(
        "relay.api",
        "/x402/b",
        &[("x-pag0-session", &s), ("payment-signature", &fake)],
    );
    assert_eq!(r.error_code().as_deref(), Some("PAYMENT_NOT_ALLOWED"));
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("not a known USDC contract"), "{message}");
}

#[test]
fn relay_mode_answers_a_402_the_budget_cannot_cover_with_pag0s_refusal() {
    let up = Upstream::start();
    let policies = r#"{"pay": {"sessionBudget": "100000"}, "relay": {"sessionBudget": "5000",
        "x402": {"networks": ["eip155:84532"]}}}"#;
    let config = EnvoyConfig::new(
        &plugin(policies, ""),
        vec![route(
            "relay.api",
            "/",
            &[("x402", "true"), ("policy", "relay")],
        )],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let s = unique("cover");
    // The offer asks $0.01 of a $0.005 session: the agent gets the refusal, not the 402,
    // so it signs nothing.
    let r = Client::new(envoy.port).get("relay.api", "/x402/a", &[("x-pag0-session", &s)]);
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (403, Some("SESSION_BUDGET_EXCEEDED"))
    );
    assert_eq!(r.json()["error"]["details"]["requested"], "10000");
    assert!(r.header("payment-required").is_none());
}

#[test]
fn stock_clients_without_pag0_headers_get_a_default_session() {
    let up = Upstream::start();
    let plugin = format!(
        r#"{{"admin": {{"apiKeySha256": "{}"}}, "identity": {{"defaultSession": "shared-default"}},
            "policies": {{"p": {{"sessionBudget": "100000"}}}}}}"#,
        sha("demo-admin")
    );
    let config = EnvoyConfig::new(
        &plugin,
        vec![
            route("paid.api", "/", &[("price", "1000")]),
            route(
                "weather.api",
                "/",
                &[("price", "1000"), ("defaultSession", "weather-bot")],
            ),
        ],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let mut c = Client::new(envoy.port);
    assert_eq!(c.get("paid.api", "/a", &[]).cost(), 1000);
    assert_eq!(c.get("weather.api", "/a", &[]).cost(), 1000);
    assert_eq!(
        c.get("weather.api", "/a", &[("x-pag0-session", "mine")])
            .cost(),
        1000
    );
    assert_eq!(report(envoy.port, "shared-default")["totalCost"], "1000");
    assert_eq!(report(envoy.port, "weather-bot")["totalCost"], "1000");
    assert_eq!(report(envoy.port, "mine")["totalCost"], "1000");
}

/// `x402.repeatBreaker`: the same resource is paid at most `payments` times in the
/// window by a session, whichever agent asks; the next is refused before paying, and
/// another resource is still paid.
#[test]
fn the_same_resource_is_not_paid_more_than_the_breaker_allows() {
    let up = Upstream::start();
    let policy = format!(
        r#"{{"pay": {{"sessionBudget": "100000", "x402": {{"mode": "pay", "networks": ["eip155:84532"], "payees": ["{PAY_TO}"], "repeatBreaker": {{"payments": 2, "windowSeconds": 60}}}}}}}}"#
    );
    let config = EnvoyConfig::new(
        &plugin(&policy, ""),
        vec![route("paid.api", "/", &[("x402", "true")])],
    );
    let envoy = Envoy::with_config(&config, up.port);
    let s = unique("x402-repeat");
    let get = |agent: &str, path: &str| {
        Client::new(envoy.port).get(
            "paid.api",
            path,
            &[("x-pag0-session", s.as_str()), ("x-pag0-agent", agent)],
        )
    };
    let paid = |up: &Upstream| {
        up.seen()
            .iter()
            .filter(|r| r.headers.iter().any(|(k, _)| k == "payment-signature"))
            .count()
    };
    assert_eq!(get("buyer-1", "/x402/weather?city=Paris").status, 200);
    assert_eq!(get("buyer-2", "/x402/weather?city=Paris").status, 200);
    let third = get("buyer-1", "/x402/weather?city=Paris");
    assert_eq!(
        (third.status, third.error_code().as_deref(), third.cost()),
        (429, Some("LOOP_DETECTED"), 0),
        "{}",
        String::from_utf8_lossy(&third.body)
    );
    assert_eq!(third.json()["error"]["details"]["breaker"], "x402Repeat");
    assert_eq!(paid(&up), 2, "the third payment was never made");
    // Another resource (another query) is paid.
    assert_eq!(get("buyer-1", "/x402/weather?city=Rome").status, 200);
    assert_eq!(paid(&up), 3);
    let b = Client::new(envoy.port)
        .get("h", &format!("/_pag0/v1/sessions/{s}/budget"), &ADMIN)
        .json();
    assert_eq!(
        (
            b["session"]["spent"].as_str(),
            b["session"]["reserved"].as_str()
        ),
        (Some("30000"), Some("0"))
    );
}
