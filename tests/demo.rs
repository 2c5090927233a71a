//! `make demo` cannot rot: the scenario player runs against a real Envoy with the
//! reference configuration, with demo/upstream.py behind it as `make run` has (it
//! answers the Messages API in its wire format, so scenario 7's Claude Code calls are
//! token-metered), and must find every outcome it expects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::demo_api::DemoApi;
use support::envoy::{reference_yaml_with, with_ledger};
use support::ledger_redis::LedgerRedis;
use support::x402::Peers;
use support::{repo_root, Envoy};

#[test]
fn the_demo_scenarios_play_out_as_the_product_says() {
    let up = DemoApi::start("python3");
    // x402.local: the official SDK's paid API, paid through the reference signer.
    let peers = Peers::start();
    let envoy = Envoy::reference_with_x402(up.port, peers.v2, peers.signer);
    let text = play(envoy.port, None, &peers);
    assert_eq!(peers.settlements()["sdkVerified"], 100);

    // Scenario 7 played Claude Code: its calls reached the Messages API as the CLI sends
    // them, one JSON answer and streamed turns, each answered with its usage.
    assert!(text.contains("== 7. Claude Code session"), "{text}");
    assert!(text.contains("cost their tokens"), "{text}");
    let claude: Vec<_> = up
        .log()
        .into_iter()
        .filter(|r| r["endpoint"] == "api.anthropic.com/v1/messages")
        .collect();
    assert_eq!(claude.len(), 3, "{claude:?}");
    for r in &claude {
        assert_eq!(r["path"], "/v1/messages?beta=true", "{r}");
        assert_eq!(r["outcome"], "complete", "{r}");
        assert!(r["usage"].is_object(), "{r}");
    }
    let streamed = claude.iter().filter(|r| r["stream"] == true).count();
    assert_eq!(streamed, 2, "{claude:?}");
}

/// The same scenarios on two Envoys sharing the Redis ledger: the calls go to A, every
/// report is read from B, and every outcome is the same as on one Envoy.
#[test]
fn the_demo_scenarios_play_out_on_two_envoys_sharing_the_redis_ledger() {
    let redis = LedgerRedis::start();
    let up = DemoApi::start("python3");
    let peers = Peers::start();
    let ledger = r#"{"store": "redis", "cluster": "pag0_ledger", "timeoutMs": 2000}"#;
    let start = || {
        Envoy::start(|port, admin| {
            with_ledger(
                &reference_yaml_with(port, admin, up.port, Some((peers.v2, peers.signer))),
                redis.webdis_port(),
                ledger,
            )
        })
    };
    let (a, b) = (start(), start());
    play(a.port, Some(b.port), &peers);
}

/// Plays the scenarios through `listener` (reading reports from `reports` if given) and
/// checks they all match, and that buyer-1's $1 bought exactly 100 payments, each really
/// settled, the 101st refused before the signer was asked. Returns the player's output.
fn play(listener: u16, reports: Option<u16>, peers: &Peers) -> String {
    let mut args = vec![
        "--no-color".to_string(),
        "--listener".to_string(),
        format!("http://127.0.0.1:{listener}"),
    ];
    if let Some(port) = reports {
        args.extend(["--reports".to_string(), format!("http://127.0.0.1:{port}")]);
    }
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("demo/play.py"))
        .args(&args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("checks match the reference session"),
        "{text}"
    );
    assert_eq!(peers.settlements()["count"], 100);
    assert_eq!(peers.settled_total(), 1_000_000);
    assert_eq!(peers.signed(), 100);
    text
}
