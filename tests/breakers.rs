//! The repeat breaker through a real Envoy with 2 workers: a loop of identical calls
//! stopped at exactly N whichever worker takes each call, volatile fields that do not
//! make a request new, ping-pong loops, cache hits counted, the session's kill switch
//! on a trip, and nothing stopped where no breaker is set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::envoy::{route, EnvoyConfig};
use support::{agent_headers, unique, Client, Envoy, Upstream};

const KEY: &str = "demo-key";
const KEY_SHA256: &str = "c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c";
const HOST: &str = "api.example";

fn envoy(up: &Upstream, policy: &str, cached: bool) -> Envoy {
    let cache = if cached {
        r#""cache": {"scope": "session", "defaultTTL": 600, "methods": ["GET", "POST"]},"#
    } else {
        ""
    };
    let plugin = format!(
        r#"{{"tenants": [{{"id": "demo", "apiKeySha256": "{KEY_SHA256}"}}], {cache}
            "policies": {{"p": {policy}}}}}"#
    );
    let cfg = EnvoyConfig::new(
        &plugin,
        vec![route(HOST, "/", &[("price", "1000"), ("tool", "llm")])],
    );
    Envoy::with_config(&cfg, up.port)
}

/// One call on a connection of its own, so Envoy spreads the calls over its workers.
fn call(port: u16, session: &str, agent: &str, body: &str) -> support::Response {
    Client::new(port).post(HOST, "/v1/chat", &agent_headers(KEY, session, agent), body)
}

/// The `breaker_tripped` alerts the webhook (the upstream's /_demo/alerts) received.
fn breaker_alerts(up: &Upstream) -> Vec<serde_json::Value> {
    up.seen()
        .into_iter()
        .filter(|r| r.path == "/_demo/alerts")
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
        .filter(|a| a["type"] == "breaker_tripped")
        .collect()
}

const LOOPER: &str = r#"{"sessionBudget": "1000000",
    "agents": {"looper-*": {"agentBudget": "1000000",
                            "repeatBreaker": {"calls": 5, "windowSeconds": 60, "warnAt": 3}}}}"#;

#[test]
fn the_fifth_identical_call_is_refused_whichever_worker_takes_it() {
    let up = Upstream::start();
    let envoy = envoy(&up, LOOPER, false);
    let s = unique("loop");
    let body = r#"{"model":"m","messages":[{"role":"user","content":"fix the test"}]}"#;
    for i in 1..=4 {
        let r = call(envoy.port, &s, "looper-1", body);
        assert_eq!(r.status, 200, "call {i}");
        let warning = r.header("x-pag0-loop-warning");
        if i >= 3 {
            assert_eq!(
                warning,
                Some(format!("count={i}, limit=5").as_str()),
                "call {i}"
            );
        } else {
            assert_eq!(warning, None, "call {i}");
        }
    }
    for _ in 0..3 {
        let r = call(envoy.port, &s, "looper-1", body);
        assert_eq!(r.status, 429);
        assert_eq!(r.error_code().as_deref(), Some("LOOP_DETECTED"));
        assert_eq!(r.cost(), 0);
        let details = &r.json()["error"]["details"];
        assert_eq!(details["breaker"], "repeat");
        assert_eq!(details["limit"], "5");
    }
    assert_eq!(up.count(), 4, "refused calls never reach the upstream");
    // The report says why the agent stopped.
    let report = Client::new(envoy.port)
        .get(
            HOST,
            &format!("/_pag0/v1/sessions/{s}/report"),
            &[("x-pag0-api-key", KEY)],
        )
        .json();
    let looper = report["byAgent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agentId"] == "looper-1")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(looper["stoppedBy"]["code"], "LOOP_DETECTED", "{looper}");
    assert_eq!(looper["stoppedBy"]["calls"], 4, "{looper}");
    assert_eq!(looper["stoppedBy"]["refusedSince"], 3, "{looper}");
    // Nothing went through since: the session says what stopped it.
    assert_eq!(report["stoppedBy"]["code"], "LOOP_DETECTED", "{report}");
    assert_eq!(report["stoppedBy"]["agentId"], "looper-1");
    // Another request of the same agent, and the same request of another agent, go on.
    let other = r#"{"model":"m","messages":[{"role":"user","content":"read the log"}]}"#;
    assert_eq!(call(envoy.port, &s, "looper-1", other).status, 200);
    assert_eq!(call(envoy.port, &s, "looper-2", body).status, 200);
}

#[test]
fn bodies_that_differ_only_in_volatile_fields_are_the_same_request() {
    let up = Upstream::start();
    let envoy = envoy(&up, LOOPER, false);
    let s = unique("volatile");
    let bodies = [
        r#"{"model":"m","messages":[1],"user":"a","metadata":{"run":1}}"#,
        r#"{"messages":[1],"model":"m","user":"b","stream":true}"#,
        r#"{ "model": "m", "messages": [1], "seed": 42 }"#,
        r#"{"model":"m","messages":[1],"request_id":"r-4","timestamp":1764400000}"#,
        r#"{"model":"m","messages":[1],"nonce":"x"}"#,
    ];
    let codes: Vec<u16> = bodies
        .iter()
        .map(|b| call(envoy.port, &s, "looper-1", b).status)
        .collect();
    assert_eq!(codes, vec![200, 200, 200, 200, 429]);
}

#[test]
fn a_ping_pong_loop_is_a_loop_and_different_requests_are_not() {
    let up = Upstream::start();
    let envoy = envoy(&up, LOOPER, false);
    let s = unique("pingpong");
    let (ping, pong) = (r#"{"q":"ping"}"#, r#"{"q":"pong"}"#);
    let mut codes = Vec::new();
    for i in 0..10 {
        codes.push(
            call(
                envoy.port,
                &s,
                "looper-1",
                if i % 2 == 0 { ping } else { pong },
            )
            .status,
        );
    }
    // ping is sent 5th at call 9, pong at call 10.
    assert_eq!(
        codes,
        vec![200, 200, 200, 200, 200, 200, 200, 200, 429, 429]
    );
    let t = unique("progress");
    for i in 0..12 {
        let r = call(
            envoy.port,
            &t,
            "looper-1",
            &format!(r#"{{"q":"step {i}"}}"#),
        );
        assert_eq!(r.status, 200, "call {i}");
        assert_eq!(r.header("x-pag0-loop-warning"), None);
    }
}

#[test]
fn cache_hits_count_toward_the_breaker() {
    let up = Upstream::start();
    let envoy = envoy(&up, LOOPER, true);
    let s = unique("cached-loop");
    let body = r#"{"q":"same"}"#;
    let mut cached = Vec::new();
    for _ in 1..=4 {
        let r = call(envoy.port, &s, "looper-1", body);
        assert_eq!(r.status, 200);
        cached.push(r.header("x-pag0-cached").unwrap_or("").to_string());
    }
    assert_eq!(cached, vec!["false", "true", "true", "true"]);
    let fifth = call(envoy.port, &s, "looper-1", body);
    assert_eq!(fifth.error_code().as_deref(), Some("LOOP_DETECTED"));
    assert_eq!(up.count(), 1);
}

#[test]
fn a_trip_can_kill_the_session() {
    let up = Upstream::start();
    let policy = r#"{"sessionBudget": "1000000",
        "repeatBreaker": {"calls": 3, "windowSeconds": 60, "killSession": true}}"#;
    let envoy = envoy(&up, policy, false);
    let s = unique("kill");
    for _ in 0..2 {
        assert_eq!(call(envoy.port, &s, "main", r#"{"q":1}"#).status, 200);
    }
    let r = call(envoy.port, &s, "main", r#"{"q":1}"#);
    assert_eq!(r.error_code().as_deref(), Some("LOOP_DETECTED"));
    // Any call of the session, by any agent, is now refused by the kill switch.
    // The session's kill switch is on (priced calls meet the spend rate first).
    let budget = Client::new(envoy.port)
        .get(
            HOST,
            &format!("/_pag0/v1/sessions/{s}/budget"),
            &[("x-pag0-api-key", KEY)],
        )
        .json();
    assert_eq!(budget["killed"], true, "{budget}");
    assert_eq!(budget["killSwitch"], "manual", "{budget}");
}

#[test]
fn without_a_breaker_identical_calls_all_go() {
    let up = Upstream::start();
    let envoy = envoy(&up, r#"{"sessionBudget": "1000000"}"#, false);
    let s = unique("free-loop");
    for i in 0..12 {
        let r = call(envoy.port, &s, "looper-1", r#"{"q":"same"}"#);
        assert_eq!(r.status, 200, "call {i}");
        assert_eq!(r.header("x-pag0-loop-warning"), None);
    }
    assert_eq!(up.count(), 12);
}

#[test]
fn a_bad_breaker_setting_is_a_clear_configuration_error() {
    let up = Upstream::start();
    for (policy, message) in [
        (r#"{"repeatBreaker": {"calls": 1}}"#, "at least 2"),
        (
            r#"{"repeatBreaker": {"calls": 5, "warnAt": 5}}"#,
            "below calls",
        ),
        (
            r#"{"repeatBreaker": {"windowSeconds": 60}}"#,
            "calls: required",
        ),
        (r#"{"repeatBreaker": {"calls": "5"}}"#, "must be a number"),
    ] {
        let plugin = format!(r#"{{"policies": {{"p": {policy}}}}}"#);
        let err = pag0::core::compile::compile_json(plugin.as_bytes()).unwrap_err();
        assert!(err.contains(message), "{policy}: {err}");
    }
    drop(up);
}

#[test]
fn a_session_spend_rate_holds_under_64_parallel_connections() {
    let up = Upstream::start();
    // 50 calls of 1000 a minute; the session budget alone would allow 1000.
    let policy = r#"{"sessionBudget": "1000000",
        "spendRate": {"limit": "50000", "windowSeconds": 60}}"#;
    let envoy = envoy(&up, policy, false);
    let s = unique("rate");
    let port = envoy.port;
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                (0..2)
                    .map(|j| {
                        let agent = format!("worker-{i}");
                        let r = c.post(
                            HOST,
                            "/v1/chat",
                            &agent_headers(KEY, &s, &agent),
                            &format!(r#"{{"q":"{i}-{j}"}}"#),
                        );
                        (
                            r.status,
                            r.error_code(),
                            r.header("retry-after").map(str::to_string),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let passed = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(passed, 50);
    for (status, code, retry) in results.iter().filter(|r| r.0 != 200) {
        assert_eq!(
            (*status, code.as_deref()),
            (429, Some("SPEND_RATE_EXCEEDED"))
        );
        let retry: u64 = retry.as_deref().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
    }
    assert_eq!(up.count(), 50);
    let report = Client::new(port)
        .get(
            HOST,
            &format!("/_pag0/v1/sessions/{s}/report"),
            &[("x-pag0-api-key", KEY)],
        )
        .json();
    assert_eq!(report["totalCost"], "50000", "{report}");
}

#[test]
fn an_agent_spend_rate_stops_that_agent_only() {
    let up = Upstream::start();
    let policy = r#"{"sessionBudget": "1000000",
        "agents": {"hasty-*": {"spendRate": {"limit": "3000", "windowSeconds": 60}}}}"#;
    let envoy = envoy(&up, policy, false);
    let s = unique("agent-rate");
    let codes: Vec<u16> = (0..4)
        .map(|i| call(envoy.port, &s, "hasty-1", &format!(r#"{{"q":{i}}}"#)).status)
        .collect();
    assert_eq!(codes, vec![200, 200, 200, 429]);
    assert_eq!(call(envoy.port, &s, "hasty-2", r#"{"q":0}"#).status, 200);
    assert_eq!(call(envoy.port, &s, "calm-1", r#"{"q":0}"#).status, 200);
    // A failed call costs nothing and gives its count back: the upstream's /status/500
    // is not charged (chargeOn success), so hasty-3 can still make three calls after it.
    let r = Client::new(envoy.port).post(
        HOST,
        "/status/500/x",
        &agent_headers(KEY, &s, "hasty-3"),
        "{}",
    );
    assert_eq!(r.status, 500);
    let codes: Vec<u16> = (0..3)
        .map(|i| call(envoy.port, &s, "hasty-3", &format!(r#"{{"q":{i}}}"#)).status)
        .collect();
    assert_eq!(codes, vec![200, 200, 200]);
}

/// The reference policy's `looper-*` (PRODUCT.md, issue 15): five identical calls within
/// 60 s, the first paid and the next three from the cache, and the fifth refused; the
/// trip goes to the alert webhook once.
#[test]
fn the_reference_looper_is_stopped_at_its_fifth_identical_call() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let s = unique("looper");
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"green yet? {s}"}}]}}"#
    );
    let mut seen = Vec::new();
    for _ in 0..6 {
        let r = Client::new(envoy.port).post(
            "api.openai.com",
            "/v1/chat/completions",
            &agent_headers(KEY, &s, "looper-1"),
            &body,
        );
        seen.push((
            r.status,
            r.header("x-pag0-cached").map(str::to_string),
            r.header("x-pag0-error").map(str::to_string),
        ));
    }
    let statuses: Vec<u16> = seen.iter().map(|s| s.0).collect();
    assert_eq!(statuses, vec![200, 200, 200, 200, 429, 429], "{seen:?}");
    let cached: Vec<Option<&str>> = seen[..4].iter().map(|s| s.1.as_deref()).collect();
    assert_eq!(
        cached,
        vec![Some("false"), Some("true"), Some("true"), Some("true")]
    );
    assert_eq!(seen[4].2.as_deref(), Some("LOOP_DETECTED"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let trips = loop {
        let trips = breaker_alerts(&up);
        if !trips.is_empty() || std::time::Instant::now() > deadline {
            break trips;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(trips.len(), 1, "{trips:?}");
    assert_eq!(trips[0]["agent"], "looper-1");
    assert_eq!(trips[0]["session"], s.as_str());
    assert_eq!(trips[0]["count"], 5);
}

/// A spend-rate trip goes to the alert webhook once per window, not once per refusal.
#[test]
fn a_spend_rate_trip_is_one_alert_per_window() {
    let up = Upstream::start();
    let plugin = format!(
        r#"{{"tenants": [{{"id": "demo", "apiKeySha256": "{KEY_SHA256}"}}],
            "alerts": {{"cluster": "upstream", "path": "/_demo/alerts", "authority": "alerts.test", "timeoutMs": 2000}},
            "policies": {{"p": {{"sessionBudget": "1000000",
                "spendRate": {{"limit": "3000", "windowSeconds": 60}}}}}}}}"#
    );
    let cfg = EnvoyConfig::new(
        &plugin,
        vec![route(HOST, "/", &[("price", "1000"), ("tool", "llm")])],
    );
    let envoy = Envoy::with_config(&cfg, up.port);
    let s = unique("rate-alert");
    let codes: Vec<u16> = (0..6)
        .map(|i| call(envoy.port, &s, "main", &format!(r#"{{"q":{i}}}"#)).status)
        .collect();
    assert_eq!(codes, vec![200, 200, 200, 429, 429, 429]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let trips = breaker_alerts(&up);
    assert_eq!(trips.len(), 1, "{trips:?}");
    assert_eq!(trips[0]["breaker"], "spendRate");
    assert_eq!(trips[0]["scope"], "session");
    assert_eq!(trips[0]["spent"], "3000");
}

#[test]
fn a_spend_rate_trip_can_kill_the_session() {
    let up = Upstream::start();
    let policy = r#"{"sessionBudget": "1000000",
        "spendRate": {"limit": "2000", "windowSeconds": 60, "killSession": true}}"#;
    let envoy = envoy(&up, policy, false);
    let s = unique("rate-kill");
    let codes: Vec<u16> = (0..3)
        .map(|i| call(envoy.port, &s, "main", &format!(r#"{{"q":{i}}}"#)).status)
        .collect();
    assert_eq!(codes, vec![200, 200, 429]);
    // The session's kill switch is on (priced calls meet the spend rate first).
    let budget = Client::new(envoy.port)
        .get(
            HOST,
            &format!("/_pag0/v1/sessions/{s}/budget"),
            &[("x-pag0-api-key", KEY)],
        )
        .json();
    assert_eq!(budget["killed"], true, "{budget}");
    assert_eq!(budget["killSwitch"], "manual", "{budget}");
}
