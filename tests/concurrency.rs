//! Load: Envoy with 2 workers, 256 concurrent connections, 10,240 priced calls from 64
//! agents in 16 sessions of two tenants, against agent, session and daily budgets that
//! run out mid-way, with some upstream failures. The ledger must be exact: what the
//! agents were charged is what the ledger holds, no scope ever goes past its limit, and
//! the number of 2xx answers is the binding budget divided by the price.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pag0::core::compile::sha256_hex;
use support::envoy::{route, EnvoyConfig};
use support::{agent_headers, Client, Envoy, Upstream};

const PRICE: u64 = 100;
// Tenant "day": the daily budget binds (sessions could take 8 × 1000 calls).
const DAY_SESSION_BUDGET: u64 = 1000 * PRICE;
const DAILY_BUDGET: u64 = 4000 * PRICE;
// Tenant "sess": each session binds at 300 calls; agent-0 at 40 calls.
const SESSION_BUDGET: u64 = 300 * PRICE;
const AGENT0_BUDGET: u64 = 40 * PRICE;
const SESSIONS_PER_TENANT: usize = 8;
const AGENTS_PER_SESSION: usize = 4;
const CONNECTIONS_PER_AGENT: usize = 4;
const CALLS_PER_CONNECTION: usize = 40;

/// (tenant, session, agent) → (2xx answers, cost charged, refusals by code)
type Key = (&'static str, usize, usize);
type Tally = (u64, u64, HashMap<String, u64>);

#[test]
fn concurrent_agents_on_two_workers_never_overspend_and_the_ledger_is_exact() {
    let plugin = format!(
        r#"{{
  "tenants": [{{"id": "day", "apiKeySha256": "{}"}}, {{"id": "sess", "apiKeySha256": "{}"}}],
  "defaultPolicy": "day",
  "policies": {{
    "day": {{"sessionBudget": "{DAY_SESSION_BUDGET}", "dailyBudget": "{DAILY_BUDGET}"}},
    "sessions": {{"sessionBudget": "{SESSION_BUDGET}", "agents": {{"agent-0": {{"agentBudget": "{AGENT0_BUDGET}"}}}}}}
  }}
}}"#,
        sha256_hex(b"key-day"),
        sha256_hex(b"key-sess")
    );
    let config = EnvoyConfig::new(
        &plugin,
        vec![
            route(
                "api.load.test",
                "/day",
                &[("price", "100"), ("policy", "day")],
            ),
            route(
                "api.load.test",
                "/sess",
                &[("price", "100"), ("policy", "sessions")],
            ),
            route("api.load.test", "/free-sess", &[("policy", "sessions")]),
            route("api.load.test", "/", &[]),
        ],
    );
    let up = Upstream::start();
    up.stop_recording();
    let envoy = Envoy::with_config(&config, up.port);
    let port = envoy.port;

    let tallies: Arc<Mutex<HashMap<Key, Tally>>> = Arc::default();
    let mut threads = Vec::new();
    for tenant in ["day", "sess"] {
        for s in 0..SESSIONS_PER_TENANT {
            for a in 0..AGENTS_PER_SESSION {
                for _ in 0..CONNECTIONS_PER_AGENT {
                    let tallies = tallies.clone();
                    threads.push(std::thread::spawn(move || {
                        let key = format!("key-{tenant}");
                        let session = format!("load-{tenant}-{s}");
                        let agent = format!("agent-{a}");
                        let headers = agent_headers(&key, &session, &agent);
                        let mut client = Client::new(port);
                        let mut local: Tally = (0, 0, HashMap::new());
                        for i in 0..CALLS_PER_CONNECTION {
                            // One call in eight fails upstream: reserved, then released.
                            let fail = if i % 8 == 7 { "/status/503" } else { "" };
                            let path = format!("/{tenant}{fail}/x");
                            let r = client.post("api.load.test", &path, &headers, "{}");
                            local.1 += r.cost();
                            match r.status {
                                200 => local.0 += 1,
                                503 => assert_eq!(r.cost(), 0),
                                403 => *local.2.entry(r.error_code().unwrap()).or_default() += 1,
                                other => panic!(
                                    "unexpected {other}: {}",
                                    String::from_utf8_lossy(&r.body)
                                ),
                            }
                        }
                        let mut all = tallies.lock().unwrap();
                        let entry = all.entry((tenant, s, a)).or_insert((0, 0, HashMap::new()));
                        entry.0 += local.0;
                        entry.1 += local.1;
                        for (code, n) in local.2 {
                            *entry.2.entry(code).or_default() += n;
                        }
                    }));
                }
            }
        }
    }
    assert_eq!(threads.len(), 256);
    for t in threads {
        t.join().unwrap();
    }
    let tallies = tallies.lock().unwrap();
    let sum = |tenant: &str, f: &dyn Fn(&Tally) -> u64| -> u64 {
        tallies
            .iter()
            .filter(|(k, _)| k.0 == tenant)
            .map(|(_, t)| f(t))
            .sum()
    };
    let mut refusals: HashMap<String, u64> = HashMap::new();
    for t in tallies.values() {
        for (code, n) in &t.2 {
            *refusals.entry(code.clone()).or_default() += n;
        }
    }
    let calls = (2
        * SESSIONS_PER_TENANT
        * AGENTS_PER_SESSION
        * CONNECTIONS_PER_AGENT
        * CALLS_PER_CONNECTION) as u64;
    eprintln!(
        "{calls} calls: 2xx day {} sess {}; refusals {refusals:?}; upstream calls {}",
        sum("day", &|t| t.0),
        sum("sess", &|t| t.0),
        up.count()
    );
    assert!(calls >= 10_000);
    for code in [
        "DAILY_BUDGET_EXCEEDED",
        "SESSION_BUDGET_EXCEEDED",
        "AGENT_BUDGET_EXCEEDED",
    ] {
        assert!(refusals.contains_key(code), "no {code} in {refusals:?}");
    }
    // Every 2xx was charged its price, and only those.
    for tenant in ["day", "sess"] {
        assert_eq!(
            sum(tenant, &|t| t.1),
            sum(tenant, &|t| t.0) * PRICE,
            "{tenant}"
        );
    }
    // The binding budgets run out exactly: budget / price successful calls.
    assert_eq!(sum("day", &|t| t.0), DAILY_BUDGET / PRICE);
    assert_eq!(
        sum("sess", &|t| t.0),
        SESSIONS_PER_TENANT as u64 * SESSION_BUDGET / PRICE
    );

    // The ledger, read back through free calls, holds exactly what was charged. A free
    // call shows its VM's view of the records, which may be up to `flushIntervalMs`
    // (100 ms) old: wait that out so the view holds the other worker's last calls too.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut client = Client::new(port);
    let mut day_total = 0;
    for s in 0..SESSIONS_PER_TENANT {
        let session = format!("load-day-{s}");
        let r = client.get(
            "api.load.test",
            "/free",
            &agent_headers("key-day", &session, "agent-0"),
        );
        assert_eq!((r.status, r.cost()), (200, 0));
        let spent = DAY_SESSION_BUDGET - r.remaining("session").unwrap();
        let charged: u64 = (0..AGENTS_PER_SESSION)
            .map(|a| tallies[&("day", s, a)].1)
            .sum();
        assert_eq!(spent, charged, "day session {s}");
        assert_eq!(r.remaining("daily"), Some(0));
        day_total += spent;
    }
    assert_eq!(day_total, DAILY_BUDGET);
    for s in 0..SESSIONS_PER_TENANT {
        let session = format!("load-sess-{s}");
        let r = client.get(
            "api.load.test",
            "/free-sess/x",
            &agent_headers("key-sess", &session, "agent-0"),
        );
        assert_eq!(r.remaining("session"), Some(0), "sess session {s}");
        let agent0_spent = AGENT0_BUDGET - r.remaining("agent").unwrap();
        assert_eq!(agent0_spent, tallies[&("sess", s, 0)].1);
        assert!(agent0_spent <= AGENT0_BUDGET);
        let charged: u64 = (0..AGENTS_PER_SESSION)
            .map(|a| tallies[&("sess", s, a)].1)
            .sum();
        assert_eq!(charged, SESSION_BUDGET, "sess session {s}");
    }

    // Reports count every call exactly, whichever worker served it.
    let per_session = (AGENTS_PER_SESSION * CONNECTIONS_PER_AGENT * CALLS_PER_CONNECTION) as u64;
    for tenant in ["day", "sess"] {
        for s in 0..SESSIONS_PER_TENANT {
            let key = format!("Bearer key-{tenant}");
            let path = format!("/_pag0/v1/sessions/load-{tenant}-{s}/report");
            let report = client
                .get("api.load.test", &path, &[("authorization", key.as_str())])
                .json();
            // + the one free read-back call above
            assert_eq!(
                report["totalRequests"],
                per_session + 1,
                "{tenant} session {s}: {report}"
            );
            let charged: u64 = (0..AGENTS_PER_SESSION)
                .map(|a| tallies[&(tenant, s, a)].1)
                .sum();
            assert_eq!(report["totalCost"], charged.to_string());
            let refused: u64 = (0..AGENTS_PER_SESSION)
                .map(|a| tallies[&(tenant, s, a)].2.values().sum::<u64>())
                .sum();
            let counted: u64 = report["refusals"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            assert_eq!(counted, refused, "{tenant} session {s}");
        }
    }
}
