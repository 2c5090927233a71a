//! The shared cache through a real Envoy with 2 workers: one answer per session paid
//! once, hits free and counted as savings, TTLs, bypass, keys, isolation, limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use pag0::core::compile::sha256_hex;
use support::envoy::{route, EnvoyConfig};
use support::{agent_headers, unique, Client, Envoy, Upstream};

fn config(entries: u32, max_entry_bytes: u32) -> EnvoyConfig {
    let plugin = format!(
        r#"{{
  "tenants": [{{"id": "acme", "apiKeySha256": "{}"}}, {{"id": "globex", "apiKeySha256": "{}"}}],
  "admin": {{"apiKeySha256": "{}"}},
  "cache": {{"scope": "session", "defaultTTL": 1800, "methods": ["GET", "POST"],
            "ttlRules": [{{"pattern": ".*docs.*", "ttl": 3600}}, {{"pattern": ".*search.*", "ttl": 600}}, {{"pattern": ".*completions.*", "ttl": 1800}}],
            "entries": {entries}, "maxEntryBytes": {max_entry_bytes}, "coalesceWaitMs": 3000}},
  "policies": {{"p": {{"sessionBudget": "5000000",
      "agents": {{"loner-*": {{"inheritParentCache": false}}, "ultrawork-*": {{"agentBudget": "1000000"}}}}}}}}
}}"#,
        sha256_hex(b"acme-key"),
        sha256_hex(b"globex-key"),
        sha256_hex(b"root")
    );
    EnvoyConfig::new(
        &plugin,
        vec![
            route(
                "api.tavily.com",
                "/search",
                &[("price", "20000"), ("tool", "search")],
            ),
            route(
                "api.tavily.com",
                "/short",
                &[("price", "20000"), ("cacheTTL", "1")],
            ),
            route(
                "api.tavily.com",
                "/never",
                &[("price", "20000"), ("cacheTTL", "0")],
            ),
            route("api.tavily.com", "/free", &[]),
            route("api.tavily.com", "/", &[("price", "20000")]),
        ],
    )
}

fn h<'a>(key: &'a str, session: &'a str, agent: &'a str) -> Vec<(&'a str, &'a str)> {
    agent_headers(key, session, agent)
}

#[test]
fn five_parallel_agents_asking_the_same_search_pay_once() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&config(1024, 65536), up.port);
    let s = unique("ultrawork");
    let handles: Vec<_> = (1..=5)
        .map(|i| {
            let (port, s) = (envoy.port, s.clone());
            std::thread::spawn(move || {
                // Each agent on its own connection: both workers take part.
                let mut c = Client::new(port);
                let agent = format!("ultrawork-{i}");
                c.post(
                    "api.tavily.com",
                    "/search/delay/300/",
                    &h("acme-key", &s, &agent),
                    "{\"query\":\"pag0\"}",
                )
            })
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(answers.iter().all(|r| r.status == 200));
    let hits: Vec<_> = answers
        .iter()
        .filter(|r| r.header("x-pag0-cached") == Some("true"))
        .collect();
    let misses: Vec<_> = answers
        .iter()
        .filter(|r| r.header("x-pag0-cached") == Some("false"))
        .collect();
    assert_eq!((misses.len(), hits.len()), (1, 4));
    assert_eq!(misses[0].cost(), 20_000);
    assert!(hits
        .iter()
        .all(|r| r.cost() == 0 && r.header("x-pag0-cache-age").is_some()));
    assert!(
        hits.iter().all(|r| r.body == misses[0].body),
        "hits serve the paid answer"
    );
    assert_eq!(up.count(), 1);
    let report = Client::new(envoy.port)
        .get(
            "h",
            &format!("/_pag0/v1/sessions/{s}/report?tenant=acme"),
            &[("authorization", "Bearer root")],
        )
        .json();
    assert_eq!(report["totalCost"], "20000");
    assert_eq!(report["cacheHits"], 4);
    assert_eq!(report["cacheSavings"], "80000");
    assert_eq!(report["cacheHitRate"], 0.8);
    assert_eq!(report["byTool"][0]["cacheSavings"], "80000");
    let saved: u64 = report["byAgent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["cacheSavings"].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(saved, 80_000);
}

#[test]
fn a_hit_is_free_reserves_nothing_and_is_shared_across_the_session() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&config(1024, 65536), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("share");
    let body = "{\"query\":\"docs\"}";
    let first = c.post(
        "api.tavily.com",
        "/search",
        &h("acme-key", &s, "researcher-1"),
        body,
    );
    assert_eq!(
        (first.status, first.cost(), first.header("x-pag0-cached")),
        (200, 20_000, Some("false"))
    );
    assert_eq!(first.remaining("session"), Some(4_980_000));
    // The executor gets the researcher's answer later in the session, for nothing.
    let hit = c.post(
        "api.tavily.com",
        "/search",
        &h("acme-key", &s, "executor-1"),
        body,
    );
    assert_eq!(
        (hit.status, hit.cost(), hit.header("x-pag0-cached")),
        (200, 0, Some("true"))
    );
    assert_eq!(
        hit.remaining("session"),
        Some(4_980_000),
        "a hit reserves and charges nothing"
    );
    assert_eq!(hit.body, first.body);
    assert_eq!(up.count(), 1);
    // A different body, a different query, or a bypass goes upstream.
    assert_eq!(
        c.post(
            "api.tavily.com",
            "/search",
            &h("acme-key", &s, "executor-1"),
            "{\"query\":\"other\"}"
        )
        .header("x-pag0-cached"),
        Some("false")
    );
    assert_eq!(
        c.post(
            "api.tavily.com",
            "/search?page=2",
            &h("acme-key", &s, "executor-1"),
            body
        )
        .header("x-pag0-cached"),
        Some("false")
    );
    let mut bypass = h("acme-key", &s, "executor-1");
    bypass.push(("x-pag0-cache-bypass", "true"));
    let fresh = c.post("api.tavily.com", "/search", &bypass, body);
    assert_eq!(
        (fresh.header("x-pag0-cached"), fresh.cost()),
        (Some("false"), 20_000)
    );
    assert_eq!(up.count(), 4);
    assert!(up
        .seen()
        .iter()
        .all(|r| r.headers.iter().all(|(k, _)| !k.starts_with("x-pag0-"))));
}

#[test]
fn sessions_tenants_and_private_agents_never_see_each_others_answers() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&config(1024, 65536), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("iso");
    let body = "{\"query\":\"secret\"}";
    c.post("api.tavily.com", "/search", &h("acme-key", &s, "a-1"), body);
    let other_session = unique("iso");
    for (key, session, agent) in [
        ("acme-key", other_session.as_str(), "a-1"),
        ("globex-key", s.as_str(), "a-1"),
        ("acme-key", s.as_str(), "loner-1"),
    ] {
        let r = c.post("api.tavily.com", "/search", &h(key, session, agent), body);
        assert_eq!(
            r.header("x-pag0-cached"),
            Some("false"),
            "{key} {session} {agent}"
        );
    }
    // The private agent's own entry is its own: it hits it, the session does not.
    assert_eq!(
        c.post(
            "api.tavily.com",
            "/search",
            &h("acme-key", &s, "loner-1"),
            body
        )
        .header("x-pag0-cached"),
        Some("true")
    );
    assert_eq!(up.count(), 4);
}

#[test]
fn ttls_failures_and_big_answers() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&config(1024, 1000), up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("ttl");
    let hh = h("acme-key", &s, "a-1");
    // Route override: 1 second.
    c.get("api.tavily.com", "/short/x", &hh);
    assert_eq!(
        c.get("api.tavily.com", "/short/x", &hh)
            .header("x-pag0-cached"),
        Some("true")
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        c.get("api.tavily.com", "/short/x", &hh)
            .header("x-pag0-cached"),
        Some("false"),
        "expired entries are never served"
    );
    // cacheTTL "0": never cached.
    c.get("api.tavily.com", "/never/x", &hh);
    assert_eq!(
        c.get("api.tavily.com", "/never/x", &hh)
            .header("x-pag0-cached"),
        Some("false")
    );
    // Non-2xx answers are not stored.
    assert_eq!(c.get("api.tavily.com", "/x/status/500/", &hh).status, 500);
    assert_eq!(
        c.get("api.tavily.com", "/x/status/500/", &hh)
            .header("x-pag0-cached"),
        Some("false")
    );
    // Answers above maxEntryBytes (1000 here) are not stored; smaller ones are.
    assert_eq!(
        c.get("api.tavily.com", "/x/size/2000/", &hh).body.len(),
        2000
    );
    assert_eq!(
        c.get("api.tavily.com", "/x/size/2000/", &hh)
            .header("x-pag0-cached"),
        Some("false")
    );
    c.get("api.tavily.com", "/x/size/900/", &hh);
    let small = c.get("api.tavily.com", "/x/size/900/", &hh);
    assert_eq!(
        (small.header("x-pag0-cached"), small.body.len()),
        (Some("true"), 900)
    );
    assert_eq!(up.count(), 2 + 2 + 2 + 2 + 1);
}

#[test]
fn waiters_go_upstream_themselves_when_the_first_answer_is_not_cacheable() {
    let up = Upstream::start();
    let envoy = Envoy::with_config(&config(1024, 65536), up.port);
    let s = unique("fail");
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let (port, s) = (envoy.port, s.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(i * 50));
                Client::new(port).get(
                    "api.tavily.com",
                    "/x/delay/200/status/502/",
                    &h("acme-key", &s, "a-1"),
                )
            })
        })
        .collect();
    for t in handles {
        let r = t.join().unwrap();
        assert_eq!(
            (r.status, r.header("x-pag0-cached"), r.cost()),
            (502, Some("false"), 0)
        );
    }
    assert_eq!(up.count(), 3);
}

#[test]
fn many_distinct_keys_keep_memory_where_the_configuration_says() {
    let up = Upstream::start();
    up.stop_recording();
    let envoy = Envoy::with_config(&config(256, 1024), up.port);
    let send = |from: u64, to: u64| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let port = envoy.port;
                std::thread::spawn(move || {
                    let mut c = Client::new(port);
                    let mut i = from + t;
                    while i < to {
                        let r = c.get(
                            "api.tavily.com",
                            &format!("/free/docs/{i}/size/800/"),
                            &[("x-pag0-api-key", "acme-key"), ("x-pag0-session", "mem")],
                        );
                        assert_eq!(r.status, 200);
                        i += 8;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    };
    send(0, 10_000);
    let rss_early = envoy.rss_kib();
    send(10_000, 100_000);
    let rss_late = envoy.rss_kib();
    eprintln!(
        "100000 distinct keys: Envoy RSS {rss_early} KiB after 10000, {rss_late} KiB after 100000"
    );
    assert!(
        rss_late <= rss_early + rss_early / 10 + 4096,
        "RSS grew from {rss_early} to {rss_late} KiB"
    );
    // The table still works: 20 new answers, fetched one after another, are all served
    // from it the second time.
    let mut c = Client::new(envoy.port);
    let h = [("x-pag0-api-key", "acme-key"), ("x-pag0-session", "mem")];
    for i in 0..20 {
        c.get(
            "api.tavily.com",
            &format!("/free/docs/late-{i}/size/800/"),
            &h,
        );
    }
    let hits = (0..20)
        .filter(|i| {
            c.get(
                "api.tavily.com",
                &format!("/free/docs/late-{i}/size/800/"),
                &h,
            )
            .header("x-pag0-cached")
                == Some("true")
        })
        .count();
    assert_eq!(hits, 20);
}

#[test]
fn without_the_stop_iteration_knob_posts_go_upstream_uncached_instead_of_hanging() {
    let up = Upstream::start();
    let render = config(1024, 65536);
    let envoy = Envoy::start(|port, admin| {
        render.render(port, admin, up.port).replace(
            "allow_on_headers_stop_iteration: true",
            "allow_on_headers_stop_iteration: false",
        )
    });
    let mut c = Client::new(envoy.port);
    let s = unique("knob");
    let started = std::time::Instant::now();
    let r = c.post(
        "api.tavily.com",
        "/search",
        &h("acme-key", &s, "a-1"),
        "{\"query\":\"x\"}",
    );
    assert_eq!(
        (r.status, r.header("x-pag0-cached"), r.cost()),
        (200, Some("false"), 20_000)
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        up.last().body,
        b"{\"query\":\"x\"}",
        "the body reaches the upstream intact"
    );
    assert!(envoy.log().contains("allow_on_headers_stop_iteration"));
}

fn two_level_config(webdis_port: u16) -> EnvoyConfig {
    let plugin = r#"{"cache": {"scope": "tenant", "methods": ["GET", "POST"], "cluster": "cache_l2", "clusterTimeoutMs": 300},
            "policies": {"p": {"sessionBudget": "5000000"}}}"#;
    let mut config = EnvoyConfig::new(
        plugin,
        vec![route(
            "api.exa.ai",
            "/",
            &[("price", "20000"), ("tool", "search")],
        )],
    );
    config.clusters.push(("cache_l2".to_string(), webdis_port));
    config
}

#[test]
fn two_envoys_share_answers_through_redis_and_go_on_when_it_is_down() {
    let mut webdis = support::redis::Webdis::start();
    let up = Upstream::start();
    let first = Envoy::with_config(&two_level_config(webdis.port), up.port);
    let second = Envoy::with_config(&two_level_config(webdis.port), up.port);
    let body = "{\"query\":\"shared\"}";
    let filled =
        Client::new(first.port).post("api.exa.ai", "/search", &[("x-pag0-session", "s-1")], body);
    assert_eq!(
        (filled.status, filled.header("x-pag0-cached")),
        (200, Some("false"))
    );
    // The write to level 2 goes out on the next tick.
    std::thread::sleep(Duration::from_millis(300));
    let hit =
        Client::new(second.port).post("api.exa.ai", "/search", &[("x-pag0-session", "s-2")], body);
    assert_eq!(
        (hit.status, hit.header("x-pag0-cached"), hit.cost()),
        (200, Some("true"), 0)
    );
    assert_eq!(hit.body, filled.body);
    assert_eq!(up.count(), 1);
    // The level-2 hit filled the second Envoy's level 1.
    let again =
        Client::new(second.port).post("api.exa.ai", "/search", &[("x-pag0-session", "s-3")], body);
    assert_eq!(again.header("x-pag0-cached"), Some("true"));
    assert!(second
        .admin_get("/stats?filter=pag0.cache")
        .contains("pag0.cache.l2_hits: 1"));

    // Level 2 down: requests go on without it, and the failures are counted.
    webdis.stop_front();
    for i in 0..3 {
        let r = Client::new(second.port).post(
            "api.exa.ai",
            "/search",
            &[("x-pag0-session", "s-4")],
            &format!("{{\"q\":{i}}}"),
        );
        assert_eq!((r.status, r.header("x-pag0-cached")), (200, Some("false")));
    }
    assert_eq!(up.count(), 4);
    std::thread::sleep(Duration::from_millis(300));
    let stats = second.admin_get("/stats?filter=pag0.cache.l2_failures");
    let failures: u64 = stats
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    assert!(failures >= 3, "{stats}");
}

#[test]
fn large_or_unsized_request_bodies_skip_the_cache_instead_of_failing() {
    let up = Upstream::start();
    let envoy = Envoy::reference(up.port);
    let mut c = Client::new(envoy.port);
    let s = unique("big");
    // 3 MB: above Envoy's 1 MiB buffer; pag0 must not try to buffer it for a cache key.
    let big = format!("{{\"prompt\":\"{}\"}}", "x".repeat(3_000_000));
    for _ in 0..2 {
        let r = c.post(
            "api.openai.com",
            "/v1/responses",
            &h("demo-key", &s, "executor-1"),
            &big,
        );
        assert_eq!(
            (r.status, r.header("x-pag0-cached"), r.cost()),
            (200, Some("false"), 150_000)
        );
    }
    assert_eq!(up.count(), 2);
}
