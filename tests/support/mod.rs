//! Test harness: a real Envoy with the built pag0.wasm on free loopback ports, an
//! in-process upstream that records what reaches it, and a small HTTP/1.1 client.
//! Everything a test starts is stopped when its handle drops.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod client;
pub mod demo_api;
pub mod envoy;
pub mod h2;
pub mod ledger_redis;
pub mod redis;
pub mod upstream;
pub mod x402;

pub use client::{Client, Response};
pub use envoy::{Envoy, EnvoyConfig};
pub use upstream::Upstream;

use std::path::PathBuf;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs one of the `scripts/ensure-*.sh` installers; returns what it printed (a path).
pub fn ensure(script: &str) -> String {
    let out = std::process::Command::new(repo_root().join("scripts").join(script))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A free TCP port on loopback, for a server a test starts next.
///
/// Picked below Linux's ephemeral range (32768-60999): a port the kernel hands out
/// for `bind(0)` is also one it hands to outbound connections (Webdis to Redis,
/// Envoy to an upstream), which can take it before the server binds it; CI saw
/// Envoy fail with "Address already in use" that way. Each pick in a process is
/// a new port (a counter from a start drawn from the pid), and a port something
/// already listens on is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// Headers of a pag0 call: API key, session, agent.
pub fn agent_headers<'a>(
    key: &'a str,
    session: &'a str,
    agent: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("x-pag0-api-key", key),
        ("x-pag0-session", session),
        ("x-pag0-agent", agent),
    ]
}

/// A session id unique to this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A request body no other call of this test run sends (so the cache cannot answer it).
pub fn fresh_body() -> String {
    format!("{{\"call\":\"{}\"}}", unique("body"))
}
