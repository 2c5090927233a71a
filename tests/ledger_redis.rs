//! The ledger in Redis (`ledger.store: redis`, issue 14): several real Envoys share one
//! real Redis (append-only file on) through Webdis locked down to EVALSHA and SCRIPT.
//! Budgets hold across them, exactly; the kill switch, the day's spend and reservations
//! outlive an Envoy; a Redis that is down or paused fails priced calls closed with 503
//! `LEDGER_UNAVAILABLE` within `timeoutMs`, and nothing is charged twice or lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pag0::core::compile::sha256_hex;
use support::envoy::{route, with_ledger, EnvoyConfig};
use support::ledger_redis::LedgerRedis;
use support::{agent_headers, unique, Client, Envoy, Upstream};

const PRICE: u64 = 1000;
/// `ledger.timeoutMs` of the test that measures it; the others allow more, as Redis
/// fsyncs every write here (`appendfsync always`) and the tests run side by side on 2 CPUs.
const TIMEOUT_MS: u64 = 300;
const RELAXED_TIMEOUT_MS: u64 = 2000;

fn plugin(session_budget: u64, daily_budget: u64) -> String {
    plugin_with(session_budget, daily_budget, "")
}

/// `extra`: more top-level settings, each followed by a comma.
fn plugin_with(session_budget: u64, daily_budget: u64, extra: &str) -> String {
    plugin_json(
        extra,
        &format!(
            r#"{{"sessionBudget": "{session_budget}", "dailyBudget": "{daily_budget}",
    "agents": {{"capped-*": {{"agentBudget": "{}"}}}}}}"#,
            3 * PRICE
        ),
    )
}

/// Tenant `acme` (key "key"), the admin key "admin", and `policy` as its policy `p`.
fn plugin_json(extra: &str, policy: &str) -> String {
    format!(
        r#"{{{extra}"tenants": [{{"id": "acme", "apiKeySha256": "{}"}}], "defaultPolicy": "p",
  "admin": {{"apiKeySha256": "{}"}},
  "policies": {{"p": {policy}}}}}"#,
        sha256_hex(b"key"),
        sha256_hex(b"admin"),
    )
}

/// Alerts to the upstream's /_demo/alerts (see `alerts_of`), as a plugin's `extra`.
const ALERTS: &str = r#""alerts": {"cluster": "upstream", "path": "/_demo/alerts", "authority": "alerts.test", "timeoutMs": 2000},"#;

fn config(session_budget: u64, daily_budget: u64) -> EnvoyConfig {
    EnvoyConfig::new(
        &plugin(session_budget, daily_budget),
        vec![
            route("api.paid.test", "/slow", &[("price", "1000")]),
            route("api.paid.test", "/", &[("price", "1000")]),
            route("api.free.test", "/", &[]),
        ],
    )
}

fn ledger_json(reservation_secs: u64, timeout_ms: u64) -> String {
    format!(
        r#"{{"store": "redis", "cluster": "pag0_ledger", "timeoutMs": {timeout_ms}, "reservationTimeoutSeconds": {reservation_secs}}}"#
    )
}

fn start_envoys(
    n: usize,
    cfg: &EnvoyConfig,
    up: &Upstream,
    redis: &LedgerRedis,
    reservation_secs: u64,
) -> Vec<Envoy> {
    let webdis = redis.webdis_port();
    let timeout = if reservation_secs == 601 {
        TIMEOUT_MS
    } else {
        RELAXED_TIMEOUT_MS
    };
    let ledger = ledger_json(reservation_secs, timeout);
    (0..n)
        .map(|_| {
            Envoy::start(|listener, admin| {
                with_ledger(&cfg.render(listener, admin, up.port), webdis, &ledger)
            })
        })
        .collect()
}

/// A scope hash field in Redis, as a number (0 when absent).
fn field(redis: &LedgerRedis, key: &str, name: &str) -> u64 {
    redis.cli(&["HGET", key, name]).trim().parse().unwrap_or(0)
}

fn session_key(session: &str) -> String {
    format!("pag0:s:4:acme:{session}")
}

fn day_key() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!("pag0:d:4:acme:{}", now / 86_400)
}

/// Waits until nothing is reserved in `key` (every settlement reached Redis).
fn settled(redis: &LedgerRedis, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while field(redis, key, "reserved") != 0 {
        assert!(
            Instant::now() < deadline,
            "{key} still holds reservations: {}",
            redis.cli(&["HGETALL", key])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `calls` priced calls from `threads` threads, spread round-robin over the Envoys; the
/// session of each call from `session_of(i)`. Returns (2xx, Σ x-pag0-cost, refusals by
/// code).
fn storm(
    envoys: &[Envoy],
    threads: usize,
    calls: usize,
    session_of: impl Fn(usize) -> String + Send + Sync + 'static,
) -> (u64, u64, Vec<(String, u64)>) {
    let ports: Vec<u16> = envoys.iter().map(|e| e.port).collect();
    let ok = Arc::new(AtomicU64::new(0));
    let charged = Arc::new(AtomicU64::new(0));
    let codes: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let session_of = Arc::new(session_of);
    let per_thread = calls / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (ports, ok, charged, codes, session_of) = (
                ports.clone(),
                ok.clone(),
                charged.clone(),
                codes.clone(),
                session_of.clone(),
            );
            std::thread::spawn(move || {
                let mut clients: Vec<Client> = ports.iter().map(|p| Client::new(*p)).collect();
                for k in 0..per_thread {
                    let i = t * per_thread + k;
                    let session = session_of(i);
                    let agent = format!("agent-{}", i % 7);
                    let client = &mut clients[i % ports.len()];
                    let r = client.get(
                        "api.paid.test",
                        "/call",
                        &agent_headers("key", &session, &agent),
                    );
                    charged.fetch_add(r.cost(), Ordering::Relaxed);
                    if r.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let code = r
                            .error_code()
                            .unwrap_or_else(|| format!("status {}", r.status));
                        let mut codes = codes.lock().unwrap();
                        match codes.iter_mut().find(|(c, _)| *c == code) {
                            Some((_, n)) => *n += 1,
                            None => codes.push((code, 1)),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let codes = codes.lock().unwrap().clone();
    (
        ok.load(Ordering::Relaxed),
        charged.load(Ordering::Relaxed),
        codes,
    )
}

#[test]
fn three_envoys_share_one_session_budget_exactly() {
    let redis = LedgerRedis::start();
    let up = Upstream::start();
    up.stop_recording();
    let envoys = start_envoys(3, &config(50 * PRICE, 1_000_000 * PRICE), &up, &redis, 600);
    let session = unique("shared");
    let s = session.clone();
    let (ok, charged, codes) = storm(&envoys, 60, 600, move |_| s.clone());
    assert_eq!(ok, 50, "refusals: {codes:?}");
    assert_eq!(charged, 50 * PRICE);
    assert_eq!(codes, vec![("SESSION_BUDGET_EXCEEDED".to_string(), 550)]);
    settled(&redis, &session_key(&session));
    assert_eq!(field(&redis, &session_key(&session), "spent"), charged);
}

#[test]
fn three_envoys_share_one_tenants_daily_budget_exactly() {
    let redis = LedgerRedis::start();
    let up = Upstream::start();
    up.stop_recording();
    let envoys = start_envoys(3, &config(50 * PRICE, 50 * PRICE), &up, &redis, 600);
    let prefix = unique("day");
    let (ok, charged, codes) = storm(&envoys, 60, 600, move |i| format!("{prefix}-{}", i % 40));
    assert_eq!(ok, 50, "refusals: {codes:?}");
    assert_eq!(charged, 50 * PRICE);
    assert_eq!(codes, vec![("DAILY_BUDGET_EXCEEDED".to_string(), 550)]);
    settled(&redis, &day_key());
    assert_eq!(field(&redis, &day_key(), "spent"), charged);
}

#[test]
fn a_kill_on_one_envoy_refuses_the_sessions_next_call_on_another() {
    let redis = LedgerRedis::start();
    let up = Upstream::start();
    let cfg = EnvoyConfig::new(
        &plugin_with(100 * PRICE, 1_000 * PRICE, ALERTS),
        config(0, 0).routes,
    );
    let envoys = start_envoys(2, &cfg, &up, &redis, 600);
    let session = unique("killed");
    let headers = agent_headers("key", &session, "worker-1");
    let (mut a, mut b) = (Client::new(envoys[0].port), Client::new(envoys[1].port));
    assert_eq!(b.get("api.paid.test", "/x", &headers).status, 200);
    assert_eq!(b.get("api.free.test", "/x", &headers).status, 200);
    let kill = a.send(
        "POST",
        "api.free.test",
        &format!("/_pag0/v1/sessions/{session}/kill"),
        &[("x-pag0-admin-key", "admin")],
        b"",
    );
    assert_eq!(kill.status, 200, "{}", String::from_utf8_lossy(&kill.body));
    // The next priced call on B meets the switch in Redis, at once.
    let r = b.get("api.paid.test", "/x", &headers);
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code().as_deref(), Some("KILL_SWITCH_ACTIVE"));
    assert_eq!(r.cost(), 0);
    // Free calls on B stop too, once B's poll of the kill log brings it in.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = b.get("api.free.test", "/x", &headers);
        if r.error_code().as_deref() == Some("KILL_SWITCH_ACTIVE") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still lets free calls of a killed session through: {} {}",
            redis.cli(&["ZRANGE", "pag0:kills", "0", "-1"]),
            envoys[1]
                .log()
                .lines()
                .filter(|l| l.contains("kill poll"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Resume on B: A's priced calls go again.
    let resume = b.send(
        "POST",
        "api.free.test",
        &format!("/_pag0/v1/sessions/{session}/resume"),
        &[("x-pag0-admin-key", "admin")],
        b"",
    );
    assert_eq!(
        resume.status,
        200,
        "{}",
        String::from_utf8_lossy(&resume.body)
    );
    assert_eq!(a.get("api.paid.test", "/x", &headers).status, 200);
    // Two operators kill another session at the same moment, one through A and one
    // through B, before either Envoy's poll can have seen the other's: both answer 200,
    // and the cluster raises one kill alert, from whichever kill Redis applied first.
    let other = unique("killed-twice");
    assert_eq!(
        a.get("api.paid.test", "/x", &agent_headers("key", &other, "w"))
            .status,
        200
    );
    let kill_on = |port: u16| {
        let path = format!("/_pag0/v1/sessions/{other}/kill");
        std::thread::spawn(move || {
            Client::new(port).send(
                "POST",
                "api.free.test",
                &path,
                &[("x-pag0-admin-key", "admin")],
                b"",
            )
        })
    };
    let kills = [kill_on(envoys[0].port), kill_on(envoys[1].port)];
    for kill in kills {
        let kill = kill.join().unwrap();
        assert_eq!(kill.status, 200, "{}", String::from_utf8_lossy(&kill.body));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let mut kill_alerts: Vec<String> = alerts_of(&up, "kill_switch")
        .into_iter()
        .filter(|a| a["reason"] == "manual")
        .map(|a| a["session"].as_str().unwrap().to_string())
        .collect();
    kill_alerts.sort();
    let mut expected = vec![session.clone(), other.clone()];
    expected.sort();
    assert_eq!(kill_alerts, expected, "one kill alert per session");
}

/// The webhook alerts the upstream (as the alert endpoint) received, of one type.
fn alerts_of(up: &Upstream, kind: &str) -> Vec<serde_json::Value> {
    up.seen()
        .into_iter()
        .filter(|r| r.path == "/_demo/alerts")
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
        .filter(|a| a["type"] == kind)
        .collect()
}

#[test]
fn spend_rates_hold_across_envoys_and_trip_once_for_the_cluster() {
    let redis = LedgerRedis::start();
    let up = Upstream::start();
    // The session may spend 10 calls' worth a minute; hasty-* agents 2, and a hasty
    // agent's trip kills the session. Budgets alone would allow 1000.
    let policy = format!(
        r#"{{"sessionBudget": "{}",
    "spendRate": {{"limit": "{}", "windowSeconds": 60}},
    "agents": {{"hasty-*": {{"spendRate": {{"limit": "{}", "windowSeconds": 60, "killSession": true}}}}}}}}"#,
        1_000 * PRICE,
        10 * PRICE,
        2 * PRICE
    );
    let plugin = plugin_json(ALERTS, &policy);
    let cfg = EnvoyConfig::new(&plugin, config(0, 0).routes);
    let envoys = start_envoys(2, &cfg, &up, &redis, 600);
    let ports: Vec<u16> = envoys.iter().map(|e| e.port).collect();
    let session = unique("rate");
    // A failed call is not charged and gives its count back to the window.
    let failed = Client::new(ports[0]).get(
        "api.paid.test",
        "/status/500/x",
        &agent_headers("key", &session, "worker-0"),
    );
    assert_eq!((failed.status, failed.cost()), (500, 0));
    // Its release (which gives the count back) reaches Redis on the VM's next tick.
    settled(&redis, &session_key(&session));
    // 40 calls at once, half on each Envoy: exactly 10 fit the session's window.
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let (port, session) = (ports[i % 2], session.clone());
            std::thread::spawn(move || {
                let agent = format!("worker-{i}");
                let r = Client::new(port).get(
                    "api.paid.test",
                    "/x",
                    &agent_headers("key", &session, &agent),
                );
                let retry = r.header("retry-after").map(str::to_string);
                (r.status, r.error_code(), retry, r.cost())
            })
        })
        .collect();
    let results: Vec<_> = calls.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.0 == 200).count(), 10);
    for (status, code, retry, cost) in results.iter().filter(|r| r.0 != 200) {
        assert_eq!(
            (*status, code.as_deref(), *cost),
            (429, Some("SPEND_RATE_EXCEEDED"), 0)
        );
        let retry: u64 = retry.as_deref().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
    }
    let charged: u64 = results.iter().map(|r| r.3).sum();
    assert_eq!(charged, 10 * PRICE);
    settled(&redis, &session_key(&session));
    assert_eq!(field(&redis, &session_key(&session), "spent"), charged);

    // An agent's window, with killSession: its trip on one Envoy kills the session for
    // every Envoy (Redis applies it in the same script call).
    let other = unique("rate-kill");
    let hasty = agent_headers("key", &other, "hasty-1");
    let (mut a, mut b) = (Client::new(ports[0]), Client::new(ports[1]));
    assert_eq!(a.get("api.paid.test", "/x", &hasty).status, 200);
    assert_eq!(b.get("api.paid.test", "/x", &hasty).status, 200);
    let tripped = a.get("api.paid.test", "/x", &hasty);
    assert_eq!(tripped.status, 429);
    assert_eq!(tripped.error_code().as_deref(), Some("SPEND_RATE_EXCEEDED"));
    let calm = b.get(
        "api.paid.test",
        "/x",
        &agent_headers("key", &other, "calm-1"),
    );
    assert_eq!(calm.status, 403);
    assert_eq!(calm.error_code().as_deref(), Some("KILL_SWITCH_ACTIVE"));
    assert_eq!(
        redis.cli(&["HGET", &session_key(&other), "killed"]).trim(),
        "breaker"
    );
    // One alert per window for the cluster: the session's trip and the agent's.
    std::thread::sleep(Duration::from_millis(1500));
    let trips = alerts_of(&up, "breaker_tripped");
    let mut scopes: Vec<(String, String)> = trips
        .iter()
        .map(|t| {
            assert_eq!(t["breaker"], "spendRate");
            (
                t["session"].as_str().unwrap().to_string(),
                t["scope"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    scopes.sort();
    let mut expected = vec![
        (session.clone(), "session".to_string()),
        (other.clone(), "agent".to_string()),
    ];
    expected.sort();
    assert_eq!(scopes, expected, "{trips:?}");
}

#[test]
fn a_loop_spread_over_two_envoys_trips_each_and_alerts_once_for_the_cluster() {
    let mut redis = LedgerRedis::start();
    let up = Upstream::start();
    let policy = format!(
        r#"{{"sessionBudget": "{}",
    "repeatBreaker": {{"calls": 3, "windowSeconds": 60}}}}"#,
        1_000 * PRICE
    );
    let cfg = EnvoyConfig::new(&plugin_json(ALERTS, &policy), config(0, 0).routes);
    let envoys = start_envoys(2, &cfg, &up, &redis, 600);
    let session = unique("loop");
    let headers = agent_headers("key", &session, "looper-1");
    let body = r#"{"model":"m","messages":[{"role":"user","content":"fix the test"}]}"#;
    // The same request, three times on each Envoy: each counts it and trips at its
    // third (the breakers count per Envoy; docs/ledger.md "What stays per Envoy").
    for envoy in &envoys {
        let mut client = Client::new(envoy.port);
        for i in 1..=3 {
            let r = client.post("api.paid.test", "/v1/chat", &headers, body);
            if i < 3 {
                assert_eq!(r.status, 200, "call {i} on {}", envoy.port);
            } else {
                assert_eq!(r.error_code().as_deref(), Some("LOOP_DETECTED"));
                assert_eq!(r.cost(), 0);
            }
        }
    }
    // Another loop of the same agent (another request) is another alert.
    let other = r#"{"model":"m","messages":[{"role":"user","content":"again"}]}"#;
    for i in 1..=3 {
        let r = Client::new(envoys[1].port).post("api.paid.test", "/v1/chat", &headers, other);
        assert_eq!(r.status == 200, i < 3, "call {i} of the second loop");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let trips = alerts_of(&up, "breaker_tripped");
    assert_eq!(
        trips.len(),
        2,
        "one alert per loop for the cluster: {trips:?}"
    );
    for trip in &trips {
        assert_eq!(
            (trip["breaker"].as_str(), trip["session"].as_str()),
            (Some("repeat"), Some(session.as_str()))
        );
    }
    // A Redis that cannot answer does not lose the alert: each Envoy sends its own.
    redis.stop_redis();
    let down = unique("loop-down");
    let headers = agent_headers("key", &down, "looper-1");
    for envoy in &envoys {
        for _ in 1..=3 {
            // Free calls count too (a loop served for free is a loop), and never wait
            // for Redis.
            Client::new(envoy.port).post("api.free.test", "/v1/chat", &headers, body);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let sent = || {
        alerts_of(&up, "breaker_tripped")
            .into_iter()
            .filter(|a| a["session"] == down.as_str())
            .count()
    };
    while sent() < 2 {
        assert!(
            Instant::now() < deadline,
            "{} alerts with Redis down",
            sent()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_webdis_behind_basic_auth_serves_only_the_envoys_with_its_credential() {
    let redis = LedgerRedis::start_with(Some("pag0:s3cret"));
    let up = Upstream::start();
    let cfg = config(100 * PRICE, 1_000 * PRICE);
    let envoy = |auth: Option<&str>| {
        let ledger = match auth {
            Some(auth) => format!(
                r#"{{"store": "redis", "cluster": "pag0_ledger", "timeoutMs": {RELAXED_TIMEOUT_MS}, "basicAuth": "{auth}"}}"#
            ),
            None => ledger_json(600, RELAXED_TIMEOUT_MS),
        };
        Envoy::start(|listener, admin| {
            with_ledger(
                &cfg.render(listener, admin, up.port),
                redis.webdis_port(),
                &ledger,
            )
        })
    };
    let session = unique("auth");
    let headers = agent_headers("key", &session, "worker-1");
    let good = envoy(Some("pag0:s3cret"));
    let r = Client::new(good.port).get("api.paid.test", "/x", &headers);
    assert_eq!((r.status, r.cost()), (200, PRICE));
    let report = Client::new(good.port).get(
        "api.free.test",
        &format!("/_pag0/v1/sessions/{session}/report"),
        &[("x-pag0-api-key", "key")],
    );
    assert_eq!(report.status, 200);
    for auth in [Some("pag0:wrong"), None] {
        let other = envoy(auth);
        let mut c = Client::new(other.port);
        let r = c.get("api.paid.test", "/x", &headers);
        assert_eq!(r.status, 503, "{auth:?}");
        assert_eq!(r.error_code().as_deref(), Some("LEDGER_UNAVAILABLE"));
        assert_eq!(r.cost(), 0);
        assert_eq!(c.get("api.free.test", "/x", &headers).status, 200);
    }
    // Nobody without the credential can load a script, with or without Envoy.
    let mut webdis = Client::new(redis.webdis_port());
    let load = webdis.send("PUT", "webdis", "/SCRIPT/LOAD", &[], b"return 1");
    assert_eq!(load.status, 403);
    let load = webdis.send(
        "PUT",
        "webdis",
        "/SCRIPT/LOAD",
        &[("authorization", "Basic cGFnMDp3cm9uZw==")],
        b"return 1",
    );
    assert_eq!(load.status, 403);
    settled(&redis, &session_key(&session));
    assert_eq!(field(&redis, &session_key(&session), "spent"), PRICE);
}

#[test]
fn an_envoy_restart_keeps_the_days_spend_and_the_kill_switch_and_its_calls_in_flight_expire_charged(
) {
    let redis = LedgerRedis::start();
    let up = Upstream::start();
    let mut envoys = start_envoys(1, &config(20 * PRICE, 20 * PRICE), &up, &redis, 10);
    let session = unique("restart");
    let killed = unique("restart-killed");
    let mut c = Client::new(envoys[0].port);
    for _ in 0..5 {
        assert_eq!(
            c.get("api.paid.test", "/x", &agent_headers("key", &session, "w"))
                .status,
            200
        );
    }
    assert_eq!(
        c.get("api.paid.test", "/x", &agent_headers("key", &killed, "w"))
            .status,
        200
    );
    let kill = c.send(
        "POST",
        "api.free.test",
        &format!("/_pag0/v1/sessions/{killed}/kill"),
        &[("x-pag0-admin-key", "admin")],
        b"",
    );
    assert_eq!(kill.status, 200);
    settled(&redis, &day_key());
    // A call in flight when Envoy dies: its reservation is held in Redis.
    let port = envoys[0].port;
    let s = session.clone();
    let slow = std::thread::spawn(move || {
        let mut c = Client::new(port);
        c.get(
            "api.paid.test",
            "/slow/delay/5000/",
            &agent_headers("key", &s, "w"),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while field(&redis, &day_key(), "reserved") != PRICE {
        assert!(Instant::now() < deadline, "the slow call never reserved");
        std::thread::sleep(Duration::from_millis(20));
    }
    envoys[0].restart();
    let _ = slow.join();
    let mut c = Client::new(envoys[0].port);
    // The day's spend is still there: 6 spent + 1 held of 20.
    let r = c.get(
        "api.paid.test",
        "/x",
        &agent_headers("key", &unique("after"), "w"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.remaining("daily"), Some(20 * PRICE - 8 * PRICE));
    // The kill switch too.
    let r = c.get("api.paid.test", "/x", &agent_headers("key", &killed, "w"));
    assert_eq!(r.error_code().as_deref(), Some("KILL_SWITCH_ACTIVE"));
    // The dead Envoy's reservation expires charged (reservationTimeoutSeconds 10).
    std::thread::sleep(Duration::from_millis(10_500));
    let r = c.get(
        "api.paid.test",
        "/x",
        &agent_headers("key", &unique("later"), "w"),
    );
    assert_eq!(r.status, 200);
    settled(&redis, &day_key());
    assert_eq!(field(&redis, &day_key(), "spent"), 9 * PRICE);
    assert_eq!(field(&redis, &day_key(), "expired"), PRICE);
    assert_eq!(field(&redis, &session_key(&session), "expired"), PRICE);
}

#[test]
fn a_redis_restart_keeps_the_ledger_and_the_script_is_loaded_again() {
    let mut redis = LedgerRedis::start();
    let up = Upstream::start();
    let envoys = start_envoys(2, &config(10 * PRICE, 1_000 * PRICE), &up, &redis, 600);
    let session = unique("aof");
    let headers = agent_headers("key", &session, "w");
    let mut c = Client::new(envoys[0].port);
    for _ in 0..6 {
        assert_eq!(c.get("api.paid.test", "/x", &headers).status, 200);
    }
    settled(&redis, &session_key(&session));
    redis.stop_redis();
    redis.start_redis();
    assert_eq!(field(&redis, &session_key(&session), "spent"), 6 * PRICE);
    // Redis came back without the script (NOSCRIPT): pag0 loads it and goes on; the
    // other Envoy's budget view is the same ledger.
    let mut d = Client::new(envoys[1].port);
    let mut ok = 0;
    for _ in 0..6 {
        if d.get("api.paid.test", "/x", &headers).status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 4);
    settled(&redis, &session_key(&session));
    assert_eq!(field(&redis, &session_key(&session), "spent"), 10 * PRICE);
}

#[test]
fn redis_down_or_paused_fails_priced_calls_closed_within_the_timeout_and_nothing_is_lost() {
    let mut redis = LedgerRedis::start();
    let up = Upstream::start();
    let envoys = start_envoys(2, &config(1_000 * PRICE, 1_000 * PRICE), &up, &redis, 601);
    let session = unique("down");
    let headers = agent_headers("key", &session, "w");
    let mut c = Client::new(envoys[0].port);
    assert_eq!(c.get("api.paid.test", "/x", &headers).status, 200);
    for (what, stop) in [("stopped", true), ("paused", false)] {
        if stop {
            redis.stop_redis();
        } else {
            redis.pause_redis();
        }
        for _ in 0..3 {
            let started = Instant::now();
            let r = c.get("api.paid.test", "/x", &headers);
            let took = started.elapsed();
            assert_eq!(r.status, 503, "Redis {what}");
            assert_eq!(
                r.error_code().as_deref(),
                Some("LEDGER_UNAVAILABLE"),
                "Redis {what}"
            );
            assert_eq!(r.cost(), 0);
            assert!(
                took < Duration::from_millis(TIMEOUT_MS + 400),
                "Redis {what}: refused after {took:?}"
            );
            // Free routes go on.
            assert_eq!(
                c.get("api.free.test", "/x", &headers).status,
                200,
                "Redis {what}"
            );
        }
        if stop {
            redis.start_redis();
        } else {
            redis.resume_redis();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.get("api.paid.test", "/x", &headers).status != 200 {
            assert!(
                Instant::now() < deadline,
                "priced calls did not come back after Redis was {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Charged: the three calls that went through; the refused ones' reservations (if
    // Redis made them while paused) given back.
    settled(&redis, &session_key(&session));
    assert_eq!(field(&redis, &session_key(&session), "spent"), 3 * PRICE);
    assert_eq!(field(&redis, &session_key(&session), "expired"), 0);
}

#[test]
fn a_paused_redis_under_load_never_lets_a_session_overspend() {
    let mut redis = LedgerRedis::start();
    let up = Upstream::start();
    up.stop_recording();
    let envoys = start_envoys(2, &config(40 * PRICE, 1_000_000 * PRICE), &up, &redis, 600);
    let session = unique("pause-load");
    let s = session.clone();
    let ports: Vec<u16> = envoys.iter().map(|e| e.port).collect();
    let load = {
        let envoys_ports = ports.clone();
        std::thread::spawn(move || {
            let ok = Arc::new(AtomicU64::new(0));
            let charged = Arc::new(AtomicU64::new(0));
            let handles: Vec<_> = (0..16)
                .map(|t| {
                    let (ports, ok, charged, s) =
                        (envoys_ports.clone(), ok.clone(), charged.clone(), s.clone());
                    std::thread::spawn(move || {
                        let mut c = Client::new(ports[t % ports.len()]);
                        for _ in 0..25 {
                            let r = c.get("api.paid.test", "/x", &agent_headers("key", &s, "w"));
                            charged.fetch_add(r.cost(), Ordering::Relaxed);
                            if r.status == 200 {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            (ok.load(Ordering::Relaxed), charged.load(Ordering::Relaxed))
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    redis.pause_redis();
    std::thread::sleep(Duration::from_millis(700));
    redis.resume_redis();
    let (ok, charged) = load.join().unwrap();
    assert!(ok <= 40, "{ok} calls went through a budget of 40");
    assert_eq!(charged, ok * PRICE);
    settled(&redis, &session_key(&session));
    // The ledger is what the clients were charged: the reservations Redis made while
    // paused for calls Envoy had already refused were given back.
    assert_eq!(field(&redis, &session_key(&session), "spent"), charged);
}

fn get_json(port: u16, path: &str) -> serde_json::Value {
    let r = Client::new(port).get("api.free.test", path, &[("x-pag0-admin-key", "admin")]);
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

#[test]
fn the_report_on_any_envoy_shows_the_whole_clusters_figures() {
    let redis = LedgerRedis::start();
    let up = Upstream::start();
    let envoys = start_envoys(2, &config(100 * PRICE, 1_000 * PRICE), &up, &redis, 600);
    let session = unique("report");
    let (mut a, mut b) = (Client::new(envoys[0].port), Client::new(envoys[1].port));
    for _ in 0..3 {
        assert_eq!(
            a.get(
                "api.paid.test",
                "/x",
                &agent_headers("key", &session, "capped-1")
            )
            .status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            b.get(
                "api.paid.test",
                "/x",
                &agent_headers("key", &session, "researcher-1")
            )
            .status,
            200
        );
    }
    // capped-1's budget is 3 calls: the fourth is refused on B, and counted there.
    let r = b.get(
        "api.paid.test",
        "/x",
        &agent_headers("key", &session, "capped-1"),
    );
    assert_eq!(r.error_code().as_deref(), Some("AGENT_BUDGET_EXCEEDED"));
    assert_eq!(
        b.get(
            "api.free.test",
            "/x",
            &agent_headers("key", &session, "researcher-1")
        )
        .status,
        200
    );
    settled(&redis, &session_key(&session));
    let path = format!("/_pag0/v1/sessions/{session}/report");
    // Every VM pushes its counts at its next flush (100 ms): wait for all 7 calls.
    let deadline = Instant::now() + Duration::from_secs(5);
    let report = loop {
        let report = get_json(envoys[0].port, &path);
        if report["totalRequests"] == 7 {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "report never counted 7 calls: {report}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(report["totalCost"], (5 * PRICE).to_string(), "{report}");
    let agents = report["byAgent"].as_array().unwrap();
    let cost_of = |id: &str| {
        agents
            .iter()
            .find(|a| a["agentId"] == id)
            .map(|a| a["cost"].clone())
    };
    assert_eq!(
        cost_of("capped-1"),
        Some(serde_json::json!((3 * PRICE).to_string())),
        "{report}"
    );
    assert_eq!(
        cost_of("researcher-1"),
        Some(serde_json::json!((2 * PRICE).to_string())),
        "{report}"
    );
    // The other Envoy shows the same figures (chart points aside, which a reader's
    // merge may add).
    let other = get_json(envoys[1].port, &path);
    for field in [
        "totalCost",
        "totalRequests",
        "byAgent",
        "byEndpoint",
        "budget",
    ] {
        assert_eq!(
            other[field], report[field],
            "{field} differs between Envoys"
        );
    }
    // The session list on either Envoy has it, with the cluster's spend.
    let list = get_json(envoys[1].port, "/_pag0/v1/sessions");
    let listed = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sessionId"] == session.as_str())
        .cloned();
    assert_eq!(
        listed.map(|s| s["totalCost"].clone()),
        Some(serde_json::json!((5 * PRICE).to_string())),
        "{list}"
    );
    // Reading merged the list into one entry.
    let key = format!("pag0:rep:4:acme:{session}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while redis.cli(&["LLEN", &key]).trim() != "1" {
        assert!(
            Instant::now() < deadline,
            "report list never compacted: {}",
            redis.cli(&["LLEN", &key])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = get_json(envoys[0].port, &path);
    assert_eq!(again["totalRequests"], report["totalRequests"]);
    assert_eq!(again["byAgent"], report["byAgent"]);
}

/// What a client learned of one call.
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    cost: u64,
    reservation: Option<String>,
}

/// One call that may meet a dead Envoy: `None` when no answer came.
fn try_call(port: u16, path: &str, session: &str) -> Option<Seen> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: api.paid.test\r\nx-pag0-api-key: key\r\nx-pag0-session: {session}\r\nx-pag0-agent: chaos\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, _) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    Some(Seen {
        status,
        cost: header("x-pag0-cost")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        reservation: header("x-pag0-reservation"),
    })
}

/// 60 seconds of priced calls over three Envoys while Envoys are killed and restarted
/// and Redis is paused at random. Afterwards every scope is within its limit and every
/// unit the ledger charged is explained: by a reservation settled at what its client
/// was told, or by one that expired charged because its Envoy died mid-call.
#[test]
fn a_chaos_minute_ends_with_every_scope_in_its_limit_and_the_ledger_explained() {
    let seconds: u64 = std::env::var("PAG0_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut redis = LedgerRedis::start();
    let up = Upstream::start();
    up.stop_recording();
    const SESSIONS: usize = 8;
    let (session_budget, daily_budget) = (400 * PRICE, 3000 * PRICE);
    let envoys = Arc::new(Mutex::new(start_envoys(
        3,
        &config(session_budget, daily_budget),
        &up,
        &redis,
        10,
    )));
    let ports: Vec<u16> = envoys.lock().unwrap().iter().map(|e| e.port).collect();
    let prefix = unique("chaos");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Option<Seen>>>> = Arc::default();
    let load: Vec<_> = (0..12)
        .map(|t| {
            let (ports, stop, seen, prefix) =
                (ports.clone(), stop.clone(), seen.clone(), prefix.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    // Some calls are slow upstream, so that a killed Envoy has calls in flight.
                    let path = if i % 4 == 0 { "/slow/delay/300/" } else { "/x" };
                    let session = format!("{prefix}-{}", i % SESSIONS);
                    let r = try_call(ports[i % ports.len()], path, &session);
                    seen.lock().unwrap().push(r);
                    i += 7;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(2500));
        round += 1;
        match round % 3 {
            0 => {
                redis.pause_redis();
                std::thread::sleep(Duration::from_millis(400 + 100 * (round % 5)));
                redis.resume_redis();
            }
            k => {
                let index = ((round * 7 + k) % 3) as usize;
                envoys.lock().unwrap()[index].restart();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.join().unwrap();
    }
    // Reservations of calls cut by a kill expire (reservationTimeoutSeconds 10), charged;
    // a reservation sweeps them.
    std::thread::sleep(Duration::from_secs(11));
    let port = envoys.lock().unwrap()[0].port;
    let _ = try_call(port, "/x", &format!("{prefix}-sweep"));
    settled(&redis, &day_key());
    let seen = seen.lock().unwrap().clone();
    let answered: Vec<&Seen> = seen.iter().flatten().collect();
    let unanswered = seen.len() - answered.len();
    // Every scope within its limit.
    let day = field(&redis, &day_key(), "spent");
    assert!(day <= daily_budget, "day spent {day} of {daily_budget}");
    for s in 0..SESSIONS {
        let spent = field(&redis, &session_key(&format!("{prefix}-{s}")), "spent");
        assert!(
            spent <= session_budget,
            "session {s} spent {spent} of {session_budget}"
        );
    }
    // Every reservation, by state: what it was charged.
    let mut charged_by_id = std::collections::HashMap::new();
    let mut expired = 0u64;
    for key in redis.cli(&["--scan", "--pattern", "pag0:r:*"]).lines() {
        let fields: Vec<String> = redis
            .cli(&["HMGET", key, "st", "amount", "cost"])
            .lines()
            .map(str::to_string)
            .collect();
        let id = key.trim_start_matches("pag0:r:").to_string();
        let cost: u64 = fields.get(2).and_then(|c| c.parse().ok()).unwrap_or(0);
        match fields.first().map(String::as_str) {
            Some("settled") => {
                charged_by_id.insert(id, cost);
            }
            Some("expired") => {
                expired += cost;
                charged_by_id.insert(id, cost);
            }
            Some("released") => {}
            other => panic!("reservation {id} left {other:?}"),
        }
    }
    let ledger_total: u64 = charged_by_id.values().sum();
    assert_eq!(
        ledger_total, day,
        "the reservations add up to the day's spend"
    );
    // Every call a client was told it was charged for is a reservation charged exactly
    // that; what the ledger charged beyond that expired with its Envoy (or its
    // client's answer was lost with it).
    let mut told = 0u64;
    for s in &answered {
        if s.cost > 0 {
            let id = s
                .reservation
                .as_deref()
                .expect("a charged call names its reservation");
            assert_eq!(charged_by_id.get(id), Some(&s.cost), "reservation {id}");
            told += s.cost;
        }
    }
    // The rest: reservations no client heard of, each the call of a client that got
    // no answer (its Envoy was killed, or its connection refused while restarting).
    let told_ids: std::collections::HashSet<&str> = answered
        .iter()
        .filter_map(|s| s.reservation.as_deref())
        .collect();
    let untold: Vec<u64> = charged_by_id
        .iter()
        .filter(|(id, cost)| **cost > 0 && !told_ids.contains(id.as_str()))
        .map(|(_, cost)| *cost)
        .collect();
    assert_eq!(ledger_total, told + untold.iter().sum::<u64>());
    assert!(
        untold.len() <= unanswered,
        "{} charged reservations no client heard of, {unanswered} unanswered calls",
        untold.len()
    );
    // The sessions add up to the day.
    let sessions: u64 = (0..SESSIONS)
        .map(|s| field(&redis, &session_key(&format!("{prefix}-{s}")), "spent"))
        .sum::<u64>()
        + field(&redis, &session_key(&format!("{prefix}-sweep")), "spent");
    assert_eq!(sessions, day);
    eprintln!(
        "chaos: {} calls ({} answered, {} 200), ledger {ledger_total}, told {told}, expired {expired}",
        seen.len(),
        answered.len(),
        answered.iter().filter(|s| s.status == 200).count()
    );
}
