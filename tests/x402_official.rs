//! x402 through a real Envoy against the official x402 SDK's server middleware (v2),
//! with the reference signer (real EIP-712 / EIP-3009 signatures) and a local
//! facilitator that really verifies them (demo/x402/).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::envoy::{route, EnvoyConfig};
use support::{free_port, repo_root, unique, Client, Envoy};

const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";

struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> String {
    let out = Command::new(repo_root().join("scripts/ensure-x402-venv.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "x402 venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn start(py: &str, script: &str, args: &[&str], env: &[(&str, &str)]) -> Python {
    let mut cmd = Command::new(py);
    cmd.arg(repo_root().join("demo/x402").join(script))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Python(cmd.spawn().unwrap())
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pag0_pays_the_official_sdk_server_through_the_reference_signer() {
    let py = python();
    let (fac_port, srv_port, sig_port) = (free_port(), free_port(), free_port());
    let key = format!("0x{}", "7c".repeat(32));
    let _facilitator = start(
        &py,
        "facilitator.py",
        &["--port", &fac_port.to_string()],
        &[],
    );
    wait_port(fac_port);
    let _server = start(
        &py,
        "server.py",
        &[
            "--port",
            &srv_port.to_string(),
            "--facilitator",
            &format!("http://127.0.0.1:{fac_port}"),
        ],
        &[],
    );
    let _signer = start(
        &py,
        "signer.py",
        &["--port", &sig_port.to_string()],
        &[("PAG0_SIGNER_KEY", key.as_str())],
    );
    wait_port(srv_port);
    wait_port(sig_port);

    let plugin = format!(
        r#"{{"signer": {{"cluster": "signer", "path": "/sign", "timeoutMs": 3000}},
            "policies": {{"pay": {{"sessionBudget": "25000", "x402": {{"mode": "pay", "networks": ["eip155:84532"], "payees": ["{PAY_TO}"]}}}},
                          "relay": {{"sessionBudget": "25000", "x402": {{"networks": ["eip155:84532"]}}}}}},
            "defaultPolicy": "pay"}}"#
    );
    let mut config = EnvoyConfig::new(
        &plugin,
        vec![
            route("paid.api", "/", &[("tool", "weather")]),
            route(
                "relay.api",
                "/",
                &[("tool", "weather"), ("policy", "relay")],
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
