//! Bounded state: an endless stream of new session ids through a real Envoy uses a
//! fixed session table, so Envoy's memory stays flat; a full table fails closed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use support::envoy::{route, EnvoyConfig};
use support::{Client, Envoy, Upstream};

fn config(max_sessions: u32, idle: u64) -> EnvoyConfig {
    let plugin = format!(
        r#"{{"sessions": {{"maxSessions": {max_sessions}, "idleTimeoutSeconds": {idle}}},
            "policies": {{"p": {{"sessionBudget": "1000", "dailyBudget": "1000000000000"}}}}}}"#
    );
    EnvoyConfig::new(
        &plugin,
        vec![route("api.stream.test", "/", &[("price", "1")])],
    )
}

/// Sends `count` calls, each from a new session, over `connections` connections.
/// Returns (2xx, 503 CAPACITY_EXCEEDED).
fn stream(port: u16, start: u64, count: u64, connections: u64) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let full = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..connections)
        .map(|c| {
            let (ok, full) = (ok.clone(), full.clone());
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                let mut i = start + c;
                while i < start + count {
                    let session = format!("stream-{i}");
                    let r = client.post(
                        "api.stream.test",
                        "/x",
                        &[("x-pag0-session", session.as_str())],
                        "",
                    );
                    match (r.status, r.error_code().as_deref()) {
                        (200, None) => ok.fetch_add(1, Ordering::Relaxed),
                        (503, Some("CAPACITY_EXCEEDED")) => full.fetch_add(1, Ordering::Relaxed),
                        other => panic!("unexpected {other:?}"),
                    };
                    i += connections;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (ok.load(Ordering::Relaxed), full.load(Ordering::Relaxed))
}

#[test]
fn a_stream_of_new_sessions_keeps_envoy_memory_flat() {
    let total: u64 = std::env::var("PAG0_SESSION_STREAM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let up = Upstream::start();
    up.stop_recording();
    // Slots free up one second after their session's last call.
    let envoy = Envoy::with_config(&config(16_384, 1), up.port);
    let warmup = total / 10;
    let (ok1, _) = stream(envoy.port, 0, warmup, 32);
    let rss_warm = envoy.rss_kib();
    let (ok2, full2) = stream(envoy.port, warmup, total - warmup, 32);
    let rss_end = envoy.rss_kib();
    eprintln!(
        "{total} sessions: {} served, {full2} refused as full; Envoy RSS {rss_warm} KiB after {warmup}, {rss_end} KiB after {total}",
        ok1 + ok2
    );
    assert!(ok1 + ok2 > total * 9 / 10);
    // Flat: within 10% (plus 4 MiB of allocator noise) from 10% to 100% of the stream.
    assert!(
        rss_end <= rss_warm + rss_warm / 10 + 4096,
        "RSS grew from {rss_warm} to {rss_end} KiB"
    );
}

#[test]
fn a_full_session_table_fails_closed_and_reuses_idle_slots() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&config(8, 2), up.port);
    let mut c = Client::new(envoy.port);
    let mut ok = 0;
    let mut refused = None;
    for i in 0..9 {
        let r = c.post(
            "api.stream.test",
            "/x",
            &[("x-pag0-session", format!("full-{i}").as_str())],
            "",
        );
        if r.status == 200 {
            ok += 1;
        } else {
            refused = Some((r.status, r.error_code(), r.cost()));
        }
    }
    assert_eq!(ok, 8);
    assert_eq!(
        refused,
        Some((503, Some("CAPACITY_EXCEEDED".to_string()), 0))
    );
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let r = c.post(
        "api.stream.test",
        "/x",
        &[("x-pag0-session", "full-late")],
        "",
    );
    assert_eq!(r.status, 200, "an idle slot is reused");
    assert_eq!(r.remaining("session"), Some(999));
}

#[test]
fn free_calls_from_endless_session_ids_take_no_session_slots() {
    let plugin = r#"{"sessions": {"maxSessions": 8, "idleTimeoutSeconds": 86400},
        "policies": {"p": {"sessionBudget": "1000"}}}"#;
    let up = Upstream::start();
    let envoy = Envoy::with_config(
        &EnvoyConfig::new(
            plugin,
            vec![
                route("api.stream.test", "/paid", &[("price", "1")]),
                route("api.stream.test", "/", &[]),
            ],
        ),
        up.port,
    );
    let mut c = Client::new(envoy.port);
    for i in 0..200 {
        let r = c.get(
            "api.stream.test",
            "/free",
            &[("x-pag0-session", format!("junk-{i}").as_str())],
        );
        assert_eq!((r.status, r.cost()), (200, 0));
    }
    let r = c.post(
        "api.stream.test",
        "/paid",
        &[("x-pag0-session", "real-session")],
        "",
    );
    assert_eq!(
        (r.status, r.cost()),
        (200, 1),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}
