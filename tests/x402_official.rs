//! x402 through a real Envoy against the official x402 SDKs: the Python `x402`
//! FastAPI middleware (v2) and the npm `x402-express` (v1) as paid servers, the
//! Python `x402HttpxClient` and npm `x402-fetch` as agents paying for themselves,
//! with the reference signer (real EIP-712 / EIP-3009 signatures) and a local
//! facilitator that really verifies and settles them (demo/x402/).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::envoy::{route, EnvoyConfig};
use support::x402::{node, Peers};
use support::{free_port, repo_root, unique, Client, Envoy};

const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";

/// The tests here take turns: each starts Envoy and four x402 peers.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn pag0_pays_the_official_sdk_server_through_the_reference_signer() {
    let _turn = turn();
    let peers = Peers::start();
    let (fac_port, srv_port, sig_port) = (peers.facilitator, peers.v2, peers.signer);

    let plugin = format!(
        r#"{{"signer": {{"cluster": "signer", "loopbackCluster": "loopback", "path": "/sign", "timeoutMs": 3000}},
            "policies": {{"pay": {{"sessionBudget": "25000", "x402": {{"mode": "pay", "networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}},
                          "relay": {{"sessionBudget": "25000", "x402": {{"networks": ["eip155:84532"]}}}}}},
            "defaultPolicy": "pay"}}"#
    );
    let mut config = EnvoyConfig::new(
        &plugin,
        vec![
            route("paid.api", "/", &[("tool", "weather"), ("x402", "true")]),
            route(
                "relay.api",
                "/",
                &[("tool", "weather"), ("policy", "relay"), ("x402", "true")],
            ),
        ],
    );
    config.clusters.push(("signer".to_string(), sig_port));
    let envoy = Envoy::with_config(&config, srv_port);
    let mut c = Client::new(envoy.port);
    let s = unique("sdk");
    let h = [
        ("x-pag0-session", s.as_str()),
        ("x-pag0-agent", "researcher-1"),
    ];

    // Pay mode, GET: the agent never sees the 402.
    let r = c.get("paid.api", "/weather", &h);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.cost(), 10_000);
    let note = r.header("x-pag0-payment").unwrap().to_string();
    assert!(
        note.starts_with("settled; amount=10000; network=\"eip155:84532\"; tx=\"0x"),
        "{note}"
    );
    assert!(
        r.json()["paid"].as_bool().unwrap_or(false),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // Pay mode, POST with a body: the retry carries it.
    let r = c.post(
        "paid.api",
        "/echo",
        &[h[0], h[1], ("content-type", "application/json")],
        "{\"task\":\"summarise\"}",
    );
    assert_eq!(
        (r.status, r.cost()),
        (200, 10_000),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["echo"]["task"], "summarise");
    assert_eq!(r.remaining("session"), Some(5_000));
    // The budget cannot fund a third payment: refused before anything is signed.
    let r = c.get("paid.api", "/weather", &h);
    assert_eq!(r.error_code().as_deref(), Some("SESSION_BUDGET_EXCEEDED"));

    // Relay mode: the official 402 passes through; the agent's own signed payment
    // (from the signer, standing in for the agent's wallet) is budgeted and settled.
    let s2 = unique("sdk-relay");
    let h2 = [("x-pag0-session", s2.as_str())];
    let offer = c.get("relay.api", "/weather", &h2);
    assert_eq!(offer.status, 402);
    let required = offer.header("payment-required").unwrap().to_string();
    let decoded: serde_json::Value =
        serde_json::from_slice(&pag0::core::base64::decode(&required).unwrap()).unwrap();
    let sign_request = serde_json::json!({"x402Version": 2, "requirement": decoded["accepts"][0], "resource": decoded["resource"],
                                          "tenant": "t", "session": s2, "agent": "a"});
    let signed = Client::new(sig_port)
        .post(
            "signer",
            "/sign",
            &[("content-type", "application/json")],
            &sign_request.to_string(),
        )
        .json();
    let value = signed["value"].as_str().unwrap().to_string();
    let paid = c.get(
        "relay.api",
        "/weather",
        &[h2[0], ("payment-signature", value.as_str())],
    );
    assert_eq!(
        (paid.status, paid.cost()),
        (200, 10_000),
        "{}",
        String::from_utf8_lossy(&paid.body)
    );
    assert!(paid
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("settled"));
    // The same payment again: the facilitator refuses the used nonce, so it is released.
    let replay = c.get(
        "relay.api",
        "/weather",
        &[h2[0], ("payment-signature", value.as_str())],
    );
    assert_eq!((replay.status, replay.cost()), (402, 0));
    assert_eq!(replay.remaining("session"), Some(15_000));
    let settled = Client::new(fac_port)
        .get("facilitator", "/settlements", &[])
        .json();
    assert_eq!(settled["count"], 3, "{settled}");
}

const AGENT_KEY: &str = "0x5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const ADMIN_KEY: &str = "x402-admin";

/// Envoy with pag0 in front of both paid servers: hosts `v2.api` / `v1.api` in pay
/// mode, `relay-v2.api` / `127.0.0.1` in relay mode (x402-fetch cannot set Host).
fn envoy_for(peers: &Peers, plugin: &str, signer_port: u16) -> Envoy {
    let mut config = EnvoyConfig::new(
        plugin,
        vec![
            route("v2.api", "/", &[("tool", "weather"), ("x402", "true")]).to("x402_v2"),
            route("v1.api", "/", &[("tool", "weather"), ("x402", "true")]).to("x402_v1"),
            route(
                "relay-v2.api",
                "/",
                &[("policy", "relay"), ("x402", "true")],
            )
            .to("x402_v2"),
            route("127.0.0.1", "/", &[("policy", "relay"), ("x402", "true")]).to("x402_v1"),
            // The servers' own paths behind a prefix the route strips (issue 11).
            route("rewrite-v2.api", "/api/", &[("x402", "true")])
                .rewrite("/")
                .to("x402_v2"),
            route("rewrite-v1.api", "/api/", &[("x402", "true")])
                .rewrite("/")
                .to("x402_v1"),
        ],
    );
    config.clusters = vec![
        ("x402_v2".to_string(), peers.v2),
        ("x402_v1".to_string(), peers.v1),
        ("signer".to_string(), signer_port),
    ];
    Envoy::with_config(&config, peers.v2)
}

/// A plugin configuration: pay mode by default, `relay` for agents' own wallets.
fn plugin(session_budget: u64, signer_extra: &str) -> String {
    plugin_with(session_budget, 1000, signer_extra)
}

fn plugin_with(session_budget: u64, signer_timeout_ms: u64, signer_extra: &str) -> String {
    let admin = pag0::core::compile::sha256_hex(ADMIN_KEY.as_bytes());
    format!(
        r#"{{"signer": {{"cluster": "signer", "loopbackCluster": "loopback", "path": "/sign", "timeoutMs": {signer_timeout_ms}{signer_extra}}},
            "admin": {{"apiKeySha256": "{admin}"}},
            "policies": {{"pay": {{"sessionBudget": "{session_budget}", "x402": {{"mode": "pay", "networks": ["eip155:84532", "base-sepolia"], "payees": ["{PAY_TO}"]}}}},
                          "relay": {{"sessionBudget": "{session_budget}", "x402": {{"networks": ["eip155:84532", "base-sepolia"], "payees": ["{PAY_TO}"]}}}}}},
            "defaultPolicy": "pay"}}"#
    )
}

fn report(envoy: &Envoy, session: &str) -> serde_json::Value {
    let r = Client::new(envoy.port).get(
        "any",
        &format!("/_pag0/v1/sessions/{session}/report"),
        &[("x-pag0-admin-key", ADMIN_KEY)],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn total_cost(report: &serde_json::Value) -> u64 {
    report["totalCost"].as_str().unwrap().parse().unwrap()
}

#[test]
fn pag0_pays_the_official_servers_behind_a_rewritten_route() {
    let _turn = turn();
    let peers = Peers::start();
    let envoy = envoy_for(&peers, &plugin(100_000, ""), peers.signer);
    let mut c = Client::new(envoy.port);
    let s = unique("rewritten");
    let h = [("x-pag0-session", s.as_str())];
    // The route sends /api/weather to the server as /weather; the paid retry goes
    // through the route too, so it reaches /weather, the resource it paid for.
    for host in ["rewrite-v2.api", "rewrite-v1.api"] {
        let r = c.get(host, "/api/weather", &h);
        assert_eq!(
            (r.status, r.cost()),
            (200, 10_000),
            "{host}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.header("x-pag0-payment").unwrap().starts_with("settled"));
    }
    assert_eq!(total_cost(&report(&envoy, &s)), 20_000);
    assert_eq!(peers.settled_total(), 20_000);
}

#[test]
fn pag0_pays_the_official_v1_express_server_and_stops_at_the_budget() {
    let _turn = turn();
    let peers = Peers::start();
    let envoy = envoy_for(&peers, &plugin(25_000, ""), peers.signer);
    let mut c = Client::new(envoy.port);
    let s = unique("v1-pay");
    let h = [("x-pag0-session", s.as_str()), ("x-pag0-agent", "buyer-1")];

    // GET: the agent never sees the v1 402 (its offer is in the body).
    let r = c.get("v1.api", "/weather", &h);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.cost(), 10_000);
    assert!(
        r.header("x-pag0-payment")
            .unwrap()
            .starts_with("settled; amount=10000; network=\"base-sepolia\"; tx=\"0x"),
        "{:?}",
        r.header("x-pag0-payment")
    );
    assert!(r.header("x-payment-response").is_some());
    assert_eq!(r.json()["paid"], true);
    // POST with a body: the paid retry carries it.
    let r = c.post(
        "v1.api",
        "/echo",
        &[h[0], h[1], ("content-type", "application/json")],
        "{\"task\":\"translate\"}",
    );
    assert_eq!(
        (r.status, r.cost()),
        (200, 10_000),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["echo"]["task"], "translate");
    // A third payment does not fit: refused before anything is signed.
    let signed = peers.signed();
    let r = c.get("v1.api", "/weather", &h);
    assert_eq!(r.error_code().as_deref(), Some("SESSION_BUDGET_EXCEEDED"));
    assert_eq!(r.json()["error"]["details"]["requested"], "10000");
    assert_eq!(
        peers.signed(),
        signed,
        "no signature once the budget is out"
    );

    let settled = peers.settlements();
    assert_eq!(settled["count"], 2, "{settled}");
    assert_eq!(settled["settlements"][0]["x402Version"], 1);
    // The official SDK's own EIP-3009 check accepted the reference signer's v1 payments.
    assert_eq!(settled["sdkVerified"], 2, "{settled}");
    assert_eq!(total_cost(&report(&envoy, &s)), peers.settled_total());
}

/// Runs one of the official clients as the agent; returns its JSON lines.
fn run_agent(program: &str, args: &[String]) -> Vec<serde_json::Value> {
    let out = Command::new(program)
        .args(args)
        .env("PAG0_AGENT_KEY", AGENT_KEY)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn relay_mode_budgets_what_the_official_clients_pay_themselves() {
    let _turn = turn();
    let peers = Peers::start();
    let envoy = envoy_for(&peers, &plugin(25_000, ""), peers.signer);

    // v2: the Python SDK's x402HttpxClient pays the 402 that pag0 lets through.
    let s2 = unique("relay-v2");
    let lines = run_agent(
        &peers.py,
        &[
            "demo/x402/agent.py".into(),
            format!("http://127.0.0.1:{}/weather", envoy.port),
            "--host".into(),
            "relay-v2.api".into(),
            "--header".into(),
            format!("x-pag0-session:{s2}"),
            "--header".into(),
            "x-pag0-agent:researcher-1".into(),
            "--count".into(),
            "3".into(),
        ],
    );
    let paid: Vec<_> = lines.iter().filter(|l| l["status"] == 200).collect();
    assert_eq!(paid.len(), 2, "{lines:?}");
    for l in &paid {
        assert_eq!(l["headers"]["x-pag0-cost"], "10000", "{l}");
        assert_eq!(l["settlement"]["success"], true, "{l}");
    }
    // The third payment does not fit the session: pag0 refuses it, nothing settles.
    let refused: Vec<_> = lines.iter().filter(|l| l["status"] != 200).collect();
    assert_eq!(refused.len(), 1, "{lines:?}");
    assert_eq!(
        refused[0]["headers"]["x-pag0-error"], "SESSION_BUDGET_EXCEEDED",
        "{lines:?}"
    );
    assert_eq!(total_cost(&report(&envoy, &s2)), 20_000);
    // POST with a body, in a fresh session.
    let s3 = unique("relay-v2-post");
    let lines = run_agent(
        &peers.py,
        &[
            "demo/x402/agent.py".into(),
            format!("http://127.0.0.1:{}/echo", envoy.port),
            "--host".into(),
            "relay-v2.api".into(),
            "--method".into(),
            "POST".into(),
            "--body".into(),
            "{\"q\":2}".into(),
            "--header".into(),
            format!("x-pag0-session:{s3}"),
        ],
    );
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    assert_eq!(lines[0]["headers"]["x-pag0-cost"], "10000");
    assert!(lines[0]["body"].as_str().unwrap().contains("\"q\":2"));

    // v1: the npm x402-fetch pays x402-express's 402, GET and POST with a body.
    let node = node();
    let s1 = unique("relay-v1");
    let url = format!("http://127.0.0.1:{}", envoy.port);
    let common = [
        "--header".to_string(),
        format!("x-pag0-session:{s1}"),
        "--header".to_string(),
        "x-pag0-agent:executor-1".to_string(),
    ];
    let mut got = run_agent(
        &node,
        &[
            &[
                "demo/x402/v1/agent.mjs".to_string(),
                format!("{url}/weather"),
            ][..],
            &common[..],
        ]
        .concat(),
    );
    got.extend(run_agent(
        &node,
        &[
            &[
                "demo/x402/v1/agent.mjs".to_string(),
                format!("{url}/echo"),
                "--method".into(),
                "POST".into(),
                "--body".into(),
                "{\"q\":1}".into(),
            ][..],
            &common[..],
        ]
        .concat(),
    ));
    for l in &got {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["headers"]["x-pag0-cost"], "10000", "{l}");
        assert!(l["headers"]["x-pag0-payment"]
            .as_str()
            .unwrap()
            .starts_with("settled; amount=10000; network=\"base-sepolia\""));
    }
    assert!(got[1]["body"].as_str().unwrap().contains("\"q\":1"));
    assert_eq!(total_cost(&report(&envoy, &s1)), 20_000);
    // Every unit pag0 charged was settled by the facilitator, and no more; the official
    // SDK's own EIP-3009 check accepted every payment.
    assert_eq!(peers.settled_total(), 50_000);
    assert_eq!(peers.settlements()["sdkVerified"], 5);
}

#[test]
fn after_every_fault_the_ledger_is_settled_plus_unconfirmed() {
    let _turn = turn();
    let peers = Peers::start();
    // The paid retry gives up after 2 s: a settlement slower than that is unknown (2 s,
    // not less: on a loaded machine the Python facilitator's ordinary answers take 1 s).
    let envoy = envoy_for(
        &peers,
        &plugin(1_000_000, r#", "retryTimeoutMs": 2000"#),
        peers.signer,
    );
    let mut c = Client::new(envoy.port);
    let s = unique("faults");
    let h = [("x-pag0-session", s.as_str()), ("x-pag0-agent", "buyer-1")];
    let mut settled_by_pag0 = 0;

    // The facilitator rejects the signature: 502 with its reason, nothing charged.
    peers.control(peers.facilitator, r#"{"rejectVerify": true}"#);
    for host in ["v2.api", "v1.api"] {
        let r = c.get(host, "/weather", &h);
        assert_eq!(
            (r.status, r.error_code().as_deref(), r.cost()),
            (502, Some("PAYMENT_FAILED"), 0),
            "{host}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("rejected_by_facilitator"),
            "{host}: the server's reason travels: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // Settlement fails: released.
    peers.control(
        peers.facilitator,
        r#"{"rejectVerify": false, "failSettle": true}"#,
    );
    for host in ["v2.api", "v1.api"] {
        let r = c.get(host, "/weather", &h);
        assert_eq!(
            (r.status, r.error_code().as_deref(), r.cost()),
            (502, Some("PAYMENT_FAILED"), 0),
            "{host}"
        );
    }
    peers.control(peers.facilitator, r#"{"failSettle": false}"#);
    // A slow signer: 503, released, and the retry never happens.
    peers.control(peers.signer, r#"{"delayMs": 1500}"#);
    let r = c.get("v2.api", "/weather", &h);
    assert_eq!(
        (r.status, r.error_code().as_deref(), r.cost()),
        (503, Some("SIGNER_UNAVAILABLE"), 0)
    );
    peers.control(peers.signer, r#"{"delayMs": 0}"#);
    // Works again.
    for host in ["v2.api", "v1.api"] {
        let r = c.get(host, "/weather", &h);
        assert_eq!((r.status, r.cost()), (200, 10_000), "{host}");
        settled_by_pag0 += r.cost();
    }
    // The settlement outlasts the retry timeout: the money may have moved, so it
    // stays charged, marked unconfirmed.
    peers.control(peers.facilitator, r#"{"settleDelayMs": 4500}"#);
    let r = c.get("v2.api", "/weather", &h);
    assert_eq!(r.cost(), 10_000, "{}", String::from_utf8_lossy(&r.body));
    assert!(r
        .header("x-pag0-payment")
        .unwrap()
        .starts_with("unconfirmed"));
    peers.control(peers.facilitator, r#"{"settleDelayMs": 0}"#);
    std::thread::sleep(Duration::from_secs(5));

    let rep = report(&envoy, &s);
    let unconfirmed: u64 = rep["unconfirmedPayments"]["amount"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(rep["unconfirmedPayments"]["count"], 1);
    assert_eq!(total_cost(&rep), settled_by_pag0 + unconfirmed);
    // The unconfirmed payment did settle in the end: the ledger equals the facilitator.
    assert_eq!(total_cost(&rep), peers.settled_total());

    // The signer down: 503, released.
    let down = envoy_for(&peers, &plugin(1_000_000, ""), free_port());
    let r = Client::new(down.port).get("v1.api", "/weather", &h);
    assert_eq!(
        (r.status, r.error_code().as_deref(), r.cost()),
        (503, Some("SIGNER_UNAVAILABLE"), 0)
    );
    assert_eq!(total_cost(&report(&down, &s)), 0);
}

#[test]
fn two_hundred_concurrent_paid_calls_never_pay_past_the_budget() {
    let _turn = turn();
    let peers = Peers::start();
    // 50 payments fit the session budget; 200 agents call at once.
    // The signer signs one at a time (Python): give it time for the crowd.
    let envoy = envoy_for(&peers, &plugin_with(500_000, 10_000, ""), peers.signer);
    let s = unique("crowd");
    let port = envoy.port;
    let start = std::sync::Arc::new(std::sync::Barrier::new(200));
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let (s, start) = (s.clone(), start.clone());
            std::thread::spawn(move || {
                let agent = format!("buyer-{}", i % 16);
                let mut c = Client::new(port);
                start.wait();
                let r = c.get(
                    if i % 2 == 0 { "v2.api" } else { "v1.api" },
                    "/weather",
                    &[("x-pag0-session", s.as_str()), ("x-pag0-agent", &agent)],
                );
                (r.status, r.cost(), r.error_code())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let paid = results.iter().filter(|r| r.0 == 200).count() as u64;
    let charged: u64 = results.iter().map(|r| r.1).sum();
    for r in results.iter().filter(|r| r.0 != 200) {
        assert_eq!(r.2.as_deref(), Some("SESSION_BUDGET_EXCEEDED"), "{r:?}");
        assert_eq!(r.1, 0, "{r:?}");
    }
    let settled = peers.settlements();
    let count = settled["count"].as_u64().unwrap();
    assert!(count * 10_000 <= 500_000, "{count} payments settled");
    assert_eq!(count, paid, "every settled payment answered 200");
    assert_eq!(charged, count * 10_000);
    assert_eq!(total_cost(&report(&envoy, &s)), peers.settled_total());
    eprintln!(
        "200 concurrent paid calls: {paid} paid, {} refused",
        200 - paid
    );
}
