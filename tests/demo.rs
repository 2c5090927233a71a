//! `make demo` cannot rot: the scenario player runs against a real Envoy with the
//! reference configuration and must find every outcome it expects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::x402::Peers;
use support::{repo_root, Envoy, Upstream};

#[test]
fn the_demo_scenarios_play_out_as_the_product_says() {
    let up = Upstream::start();
    // x402.local: the official SDK's paid API, paid through the reference signer.
    let peers = Peers::start();
    let envoy = Envoy::reference_with_x402(up.port, peers.v2, peers.signer);
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("demo/play.py"))
        .args([
            "--no-color",
            "--listener",
            &format!("http://127.0.0.1:{}", envoy.port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("checks match the reference session"),
        "{text}"
    );
    // buyer-1's $1 bought exactly 100 payments, each really settled.
    assert_eq!(peers.settlements()["count"], 100);
    assert_eq!(peers.settled_total(), 1_000_000);
    assert_eq!(peers.settlements()["sdkVerified"], 100);
    // The 101st call was refused before the signer was asked.
    assert_eq!(peers.signed(), 100);
}
