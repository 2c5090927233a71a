//! Configuration: every example under envoy/ is accepted by the real Envoy, the
//! reference session says exactly what PRODUCT.md says, and broken configurations make
//! Envoy refuse to start with a log line naming the field.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use pag0::core::compile::{compile_json, Config};
use support::envoy::{route, validate, EnvoyConfig};
use support::repo_root;

/// The JSON under `value: |` of the first wasm `configuration` in an Envoy YAML.
fn plugin_json_of_envoy_yaml(text: &str) -> String {
    let start = text.find("value: |").expect("no `value: |` block") + "value: |".len();
    let block: Vec<&str> = text[start..].lines().skip(1).collect();
    let indent = block[0].len() - block[0].trim_start().len();
    block
        .iter()
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The flow-style JSON after `pluginConfig:` in the Istio manifest.
fn plugin_json_of_istio(text: &str) -> String {
    let start = text.find("pluginConfig:").unwrap() + "pluginConfig:".len();
    text[start..].to_string()
}

fn compiled(path: &str) -> Config {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    let json = if path.contains("istio") {
        plugin_json_of_istio(&text)
    } else {
        plugin_json_of_envoy_yaml(&text)
    };
    compile_json(json.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_envoy_yaml_under_envoy_passes_envoy_validate() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("envoy")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if path.extension().is_some_and(|e| e == "yaml") && text.contains("static_resources:") {
            let (ok, log) = validate(&text);
            assert!(ok, "{} refused:\n{log}", path.display());
            assert!(
                log.contains("pag0: configuration loaded"),
                "{}: filter not configured",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected the reference and minimal configs");
}

#[test]
fn the_reference_session_is_exactly_the_product_one() {
    for path in ["envoy/reference.yaml", "envoy/istio-wasmplugin.yaml"] {
        let cfg = compiled(path);
        let p = cfg.policy(None).unwrap();
        assert_eq!(p.session_budget, Some(5_000_000), "{path}");
        assert_eq!(p.daily_budget, Some(20_000_000));
        assert_eq!(p.max_per_request, Some(500_000));
        assert_eq!(p.alert_ppm, Some(700_000));
        assert_eq!(p.kill_ppm, Some(900_000));
        let budgets: Vec<(String, Option<u64>)> = p
            .agents
            .iter()
            .map(|a| (a.pattern.source().to_string(), a.agent_budget))
            .collect();
        // PRODUCT.md's roles, the demo's x402 buyer, and two agents the session budget
        // alone stops: the autopilot loop (scenario 1) and the main agent (no header).
        let expected = [
            ("executor-*", Some(2_000_000)),
            ("researcher-*", Some(1_500_000)),
            ("debugger-*", Some(1_000_000)),
            ("reviewer-*", Some(500_000)),
            ("ralph-*", Some(3_000_000)),
            ("ultrawork-*", Some(1_000_000)),
            ("buyer-*", Some(1_000_000)),
            ("looper-*", Some(1_000_000)),
            ("autopilot-*", None),
            ("main", None),
        ];
        assert_eq!(
            budgets,
            expected
                .iter()
                .map(|(p, b)| (p.to_string(), *b))
                .collect::<Vec<_>>(),
            "{path}"
        );
        // The scenario's allow lists: the session's hosts, and each role's.
        let lists: Vec<(String, Vec<String>)> = p
            .agents
            .iter()
            .map(|a| {
                let list = a.allowed.as_ref().map_or_else(Vec::new, |l| {
                    l.iter().map(|g| g.source().to_string()).collect()
                });
                (a.pattern.source().to_string(), list)
            })
            .collect();
        let want: [(&str, &[&str]); 10] = [
            ("executor-*", &["api.openai.com/*", "api.anthropic.com/*"]),
            (
                "researcher-*",
                &["api.tavily.com/*", "api.exa.ai/*", "api.deepl.com/*"],
            ),
            ("debugger-*", &["api.openai.com/*"]),
            ("reviewer-*", &["api.openai.com/*"]),
            ("ralph-*", &["api.openai.com/*", "api.tavily.com/*"]),
            ("ultrawork-*", &["api.openai.com/*", "api.tavily.com/*"]),
            ("buyer-*", &["x402.local/*"]),
            ("looper-*", &["api.openai.com/*"]),
            ("autopilot-*", &[]),
            ("main", &[]),
        ];
        let want: Vec<(String, Vec<String>)> = want
            .iter()
            .map(|(p, l)| (p.to_string(), l.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(lists, want, "{path}");
        let session: Vec<&str> = p.allowed.iter().map(|g| g.source()).collect();
        assert_eq!(
            session,
            [
                "api.openai.com/*",
                "api.anthropic.com/*",
                "api.deepl.com/*",
                "api.tavily.com/*",
                "api.exa.ai/*",
                "x402.local/*"
            ],
            "{path}"
        );
        let looper = p
            .agents
            .iter()
            .find(|a| a.pattern.source() == "looper-*")
            .unwrap();
        assert_eq!(
            looper
                .repeat
                .map(|r| (r.calls, r.window_seconds, r.warn_at)),
            Some((5, 60, 3)),
            "{path}"
        );
        assert!(
            p.refuse_unpriced,
            "{path}: every path of a paid host is priced or refused"
        );
        match &p.unmatched {
            pag0::core::policy::Unmatched::Pool(rule) => {
                assert_eq!(rule.agent_budget, Some(500_000), "{path}")
            }
            other => panic!("{path}: unmatched agents must share a budget, not {other:?}"),
        }
        assert_eq!(cfg.tenant_for_key(b"demo-key"), Some(0));
        let cache = cfg
            .cache
            .as_ref()
            .unwrap_or_else(|| panic!("{path}: no cache"));
        assert_eq!(cache.scope, pag0::core::cache::CacheScope::Session);
        assert_eq!(cache.default_ttl, 1800);
        assert_eq!(cache.ttl_for("x.com/docs/a", None), 3600);
        assert_eq!(cache.ttl_for("api.tavily.com/search", None), 600);
        assert_eq!(
            cache.ttl_for("api.openai.com/v1/chat/completions", None),
            1800
        );
    }
}

#[test]
fn broken_configs_make_envoy_refuse_to_start_naming_the_field() {
    let cases: &[(&str, &str)] = &[
        ("", "configuration is empty"),
        ("{", "configuration is not valid"),
        (
            r#"{"policies": {"p": {"sessionBudgt": "1"}}}"#,
            "unknown field `sessionBudgt`",
        ),
        (
            r#"{"policies": {}}"#,
            "policies: at least one policy is needed",
        ),
        (
            r#"{"policies": {"p": {"x402": {"mode": "pay"}}}}"#,
            "policies.p.x402.mode: \"pay\" needs a signer",
        ),
        (
            r#"{"signer": {"cluster": "s", "maxBodyBytes": 0}, "policies": {"p": {}}}"#,
            "signer.maxBodyBytes: 0 must be between 1 and 16777216",
        ),
        (
            r#"{"signer": {"cluster": "s", "retryTimeoutMs": 900000}, "policies": {"p": {}}}"#,
            "signer.retryTimeoutMs: 900000 must be between 1 and 300000",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": 5000000}}}"#,
            "policies.p.sessionBudget: amounts are decimal strings",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "5.5"}}}"#,
            "policies.p.sessionBudget: \"5.5\" is not a decimal integer",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "0"}}}"#,
            "policies.p.sessionBudget: must be a positive amount",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "99999999999999999999"}}}"#,
            "amount too large",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "100", "maxPerRequest": "200"}}}"#,
            "policies.p.maxPerRequest: 200 is above sessionBudget 100",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "100", "dailyBudget": "50"}}}"#,
            "policies.p.sessionBudget: 100 is above dailyBudget 50",
        ),
        (
            r#"{"policies": {"p": {"dailyBudget": "100", "monthlyBudget": "50"}}}"#,
            "policies.p.dailyBudget: 100 is above monthlyBudget 50",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "100", "alertOnThreshold": 1.5}}}"#,
            "policies.p.alertOnThreshold: 1.5 must be a number in (0, 1]",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "100", "killSwitchThreshold": 0}}}"#,
            "policies.p.killSwitchThreshold: 0 must be a number in (0, 1]",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "100", "alertOnThreshold": 0.9, "killSwitchThreshold": 0.5}}}"#,
            "policies.p.alertOnThreshold: above killSwitchThreshold",
        ),
        (
            r#"{"policies": {"p": {"allowedEndpoints": ["api.x.com/a b"]}}}"#,
            "policies.p.allowedEndpoints[0]: pattern",
        ),
        (
            r#"{"policies": {"p": {"agents": {"exec/*": {}}}}}"#,
            "policies.p.agents.exec/*: agent pattern",
        ),
        (
            r#"{"policies": {"p": {"agents": {"a-*": {"agentBudget": "10", "maxPerRequest": "20"}}}}}"#,
            "agents.a-*.maxPerRequest: 20 is above agentBudget 10",
        ),
        (
            r#"{"policies": {"p": {}, "q": {}}}"#,
            "defaultPolicy: required when there is more than one policy",
        ),
        (
            r#"{"defaultPolicy": "z", "policies": {"p": {}}}"#,
            "defaultPolicy: no policy named \"z\"",
        ),
        (
            r#"{"tenants": [{"id": "t", "apiKeySha256": "abc"}], "policies": {"p": {}}}"#,
            "tenants[0].apiKeySha256: must be 64 hex digits",
        ),
        (
            r#"{"tenants": [], "policies": {"p": {}}}"#,
            "tenants: empty list",
        ),
        (
            r#"{"policies": {"p": {"chargeOn": "sometimes"}}}"#,
            "policies.p.chargeOn: \"sometimes\" must be",
        ),
        (
            r#"{"sessions": {"maxSessions": 0}, "policies": {"p": {}}}"#,
            "sessions.maxSessions: 0 must be between",
        ),
        (
            r#"{"ledger": {"store": "redis"}, "policies": {"p": {}}}"#,
            "ledger.cluster: ledger.store \"redis\" needs the Envoy cluster of its Webdis front",
        ),
        (
            r#"{"ledger": {"store": "redis", "cluster": "w", "timeoutMs": 5}, "policies": {"p": {}}}"#,
            "ledger.timeoutMs: 5 must be between 10 and 10000",
        ),
        (
            r#"{"ledger": {"cluster": "w"}, "policies": {"p": {}}}"#,
            "ledger.cluster, ledger.authority, ledger.timeoutMs and ledger.basicAuth apply only to ledger.store: \"redis\"",
        ),
        (
            r#"{"ledger": {"store": "redis", "cluster": "w", "basicAuth": "nocolon"}, "policies": {"p": {}}}"#,
            "ledger.basicAuth: must be \"user:password\" (a user before the first colon, no control characters, at most 1024 bytes)",
        ),
        (
            r#"{"ledger": {"store": "redis", "cluster": "w", "basicAuth": "pag0:pw\r\nx: y"}, "policies": {"p": {}}}"#,
            "ledger.basicAuth: must be \"user:password\" (a user before the first colon, no control characters, at most 1024 bytes)",
        ),
        (
            r#"{"ledger": {"store": "etcd"}, "policies": {"p": {}}}"#,
            "ledger.store: \"etcd\" must be \"shared-data\" or \"redis\"",
        ),
        (
            r#"{"identity": {"sessionHeader": "bad header"}, "policies": {"p": {}}}"#,
            "identity.sessionHeader: \"bad header\" is not a valid header name",
        ),
        (
            r#"{"policies": {"p": {}}, "endpoints": [{"pattern": "x.com/*", "price": "-1"}]}"#,
            "endpoints[0].price",
        ),
        (r#"{"policies": {"p": {}, "p": {}}}"#, "duplicate key \"p\""),
        (
            r#"{"identity": {"agentHeader": "x-pag0-session"}, "policies": {"p": {}}}"#,
            "identity.agentHeader: \"x-pag0-session\" is already used",
        ),
        (
            r#"{"policies": {"p": {"blockedEndpoints": ["api.openai.com:443/*"]}}}"#,
            "has a port",
        ),
        (
            r#"{"admin": {"pathPrefix": "/v1"}, "policies": {"p": {}}}"#,
            "admin.pathPrefix: \"/v1\" must start with /_",
        ),
        (
            r#"{"tenants": [{"id": "t", "apiKeySha256": "c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c"}], "admin": {"apiKeySha256": "c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c"}, "policies": {"p": {}}}"#,
            "admin key must differ",
        ),
        (
            r#"{"cache": {"ttlRules": [{"pattern": "(", "ttl": 5}]}, "policies": {"p": {}}}"#,
            "cache.ttlRules[0].pattern",
        ),
        (
            r#"{"cache": {"scope": "world"}, "policies": {"p": {}}}"#,
            "cache.scope",
        ),
    ];
    let handles: Vec<_> = cases
        .iter()
        .map(|(json, expected)| {
            let yaml = EnvoyConfig::new(&json.replace('\'', "''"), vec![route("h", "/", &[])])
                .render(1, 2, 3);
            let expected = expected.to_string();
            let json = json.to_string();
            std::thread::spawn(move || {
                let (ok, log) = validate(&yaml);
                assert!(!ok, "Envoy accepted {json}");
                let line = log
                    .lines()
                    .find(|l| l.contains("pag0: invalid configuration"))
                    .unwrap_or_else(|| panic!("no pag0 error for {json}:\n{log}"));
                let line = line.replace("\\\"", "\"");
                assert!(
                    line.contains(&expected),
                    "for {json}\nexpected {expected:?}\nin {line}"
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
