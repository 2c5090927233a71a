//! The dashboard in a real headless Chromium: after a scripted session it loads with no
//! console errors and shows each agent's bar with the right numbers. The screenshot is
//! saved as target/test-output/dashboard.png.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

use support::envoy::TempDir;
use support::{agent_headers, repo_root, unique, Client, Envoy, Upstream};

fn chromium() -> String {
    support::ensure("ensure-chromium.sh")
}

/// Runs headless Chromium on `url` with `extra` args: (stdout, stderr).
fn run_chromium(url: &str, extra: &[&str]) -> (String, String) {
    let profile = TempDir::new();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", profile.0.display()),
        ])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `data-*` attributes of the bar row whose label is `label`.
fn bar(dom: &str, label: &str) -> Option<(u64, u64)> {
    let marker = format!("data-label=\"{label}\"");
    let row_start = dom.find(&marker).map(|i| dom[..i].rfind("<div").unwrap())?;
    let row = &dom[row_start..row_start + dom[row_start..].find('>').unwrap()];
    let attr = |name: &str| -> u64 {
        let key = format!("data-{name}=\"");
        let at = row.find(&key).unwrap() + key.len();
        row[at..at + row[at..].find('"').unwrap()].parse().unwrap()
    };
    Some((attr("spent"), attr("limit")))
}

#[test]
fn the_dashboard_shows_the_agents_bars_without_console_errors() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("dash");
    for _ in 0..21 {
        c.post(
            "api.openai.com",
            "/v1/responses",
            &agent_headers("demo-key", &s, "ralph-1"),
            &support::fresh_body(),
        );
    }
    for _ in 0..3 {
        c.post(
            "api.tavily.com",
            "/search",
            &agent_headers("demo-key", &s, "researcher-1"),
            &support::fresh_body(),
        );
    }
    c.post(
        "api.openai.com",
        "/v1/chat/completions",
        &agent_headers("demo-key", &s, "reviewer-1"),
        &support::fresh_body(),
    );
    let url = format!(
        "http://127.0.0.1:{}/_pag0/dashboard#key=demo-admin&session={s}",
        envoy.port
    );

    let (dom, log) = run_chromium(&url, &["--dump-dom"]);
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            (l.contains("CONSOLE")
                && (l.contains("Uncaught") || l.contains("Error") || l.contains(":ERROR:")))
                || l.contains("Failed to load")
        })
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page never loaded its data:\n{dom}"
    );
    assert_eq!(bar(&dom, "ralph-1"), Some((3_000_000, 3_000_000)));
    assert_eq!(bar(&dom, "researcher-1"), Some((60_000, 1_500_000)));
    assert_eq!(bar(&dom, "reviewer-1"), Some((150_000, 500_000)));
    assert_eq!(bar(&dom, "session"), Some((3_210_000, 5_000_000)));
    assert!(dom.contains("AGENT_BUDGET_EXCEEDED"));
    assert!(dom.contains("$3.21"));
    // The spend-over-time chart: a line per agent and the session's, the budget and
    // its thresholds drawn; why ralph-1 stopped; the sessions overview.
    assert!(
        dom.contains("aria-label=\"spend over time\""),
        "no chart:\n{dom}"
    );
    for agent in ["ralph-1", "researcher-1", "reviewer-1", "(session)"] {
        assert!(
            dom.contains(&format!("data-agent=\"{agent}\"")),
            "no line for {agent}"
        );
    }
    for label in ["session budget $5.00", "alert 70%", "kill switch 90%"] {
        assert!(dom.contains(label), "chart without {label}");
    }
    let stops = &dom[dom.find("id=\"stops\"").unwrap()..];
    assert!(stops[..stops.find("</table>").unwrap()].contains("AGENT_BUDGET_EXCEEDED"));
    let overview = &dom[dom.find("id=\"overview\"").unwrap()..];
    assert!(
        overview[..overview.find("</table>").unwrap()].contains(&s),
        "{s} not in the sessions overview"
    );

    let shot = repo_root().join("target/test-output/dashboard.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&shot);
    run_chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "screenshot missing or empty"
    );
}
