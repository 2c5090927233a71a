//! `make demo` cannot rot: the scenario player runs against a real Envoy with the
//! reference configuration and must find every outcome it expects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::{repo_root, Envoy, Upstream};

#[test]
fn the_demo_scenarios_play_out_as_the_product_says() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
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
}
