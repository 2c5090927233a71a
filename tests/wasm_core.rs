//! The plain-Rust core, run in wasm32-unknown-unknown under Node by
//! wasm-bindgen-test (`scripts/wasm-test.sh`, `make test-wasm`). `usize` is 32 bits
//! here, as in the proxy-wasm filter, so these tests catch truncation, overflow and
//! wasm-only faults (clock, threads, hashing seeds) that the native tests cannot.
//!
//! Time is always passed in as a value: `SystemTime::now()` panics on this target.
#![cfg(target_arch = "wasm32")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use wasm_bindgen_test::*;

use pag0::core::amount::{parse_amount, reaches, threshold_ppm, AmountError};
use pag0::core::compile::{compile_json, sha256_hex, Config, SessionLimits};
use pag0::core::endpoint::{endpoint, EndpointError};
use pag0::core::errors::{Details, ErrorCode, Scope};
use pag0::core::firewall::{
    admit, current_view, describe_call, identify, settle as settle_call, should_commit, Admission,
    Caller, HeaderValue, RouteSettings, Ticket,
};
use pag0::core::glob::Glob;
use pag0::core::headers::{decimal, BudgetView, ScopeState};
use pag0::core::ledger::{AgentEntry, Charge, SessionRecord, TenantRecord, WindowCounter};
use pag0::core::policy::ChargeOn;
use pag0::core::sessions::{self, probe_slots, Settlement, PROBE};
use pag0::core::store::{
    session_slot_key, tenant_windows_key, update, with_lock, MemoryStore, SharedStore, Step,
    CREATE_CAS,
};
use pag0::core::window::{day_index, month_index};

/// 2026-11-30 12:00:00 UTC: past 2^31 seconds would be 2038; past 2^32 is 2106.
const NOON: u64 = 1_796_040_000;
const DEMO_KEY: &str = "demo-key";
const TAVILY: (&[u8], &[u8]) = (b"api.tavily.com", b"/search");

// --- platform -----------------------------------------------------------------------

#[wasm_bindgen_test]
fn the_target_really_is_32_bit_wasm() {
    assert_eq!(usize::BITS, 32);
    assert_eq!(std::mem::size_of::<usize>(), 4);
    assert_eq!(std::mem::size_of::<u64>(), 8);
}

// --- amount -------------------------------------------------------------------------

#[wasm_bindgen_test]
fn amounts_reach_u64_max_without_truncation() {
    assert_eq!(parse_amount("18446744073709551615"), Ok(u64::MAX));
    assert_eq!(parse_amount("018446744073709551615"), Ok(u64::MAX));
    assert_eq!(parse_amount("18446744073709551614"), Ok(u64::MAX - 1));
    // Just past 32 bits: a usize-based parser would wrap or refuse here.
    assert_eq!(parse_amount("4294967295"), Ok(u64::from(u32::MAX)));
    assert_eq!(parse_amount("4294967296"), Ok(1 << 32));
    assert_eq!(parse_amount("9007199254740993"), Ok((1 << 53) + 1)); // not an f64
    assert_eq!(parse_amount("0"), Ok(0));
    assert_eq!(
        parse_amount("00000000000000000000000000000000000007"),
        Ok(7)
    );
}

#[wasm_bindgen_test]
fn amounts_past_u64_are_refused_up_to_256_bits() {
    assert_eq!(
        parse_amount("18446744073709551616"),
        Err(AmountError::TooLarge)
    );
    assert_eq!(
        parse_amount("99999999999999999999"),
        Err(AmountError::TooLarge)
    );
    let max_u256 = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    assert_eq!(max_u256.len(), 78);
    assert_eq!(parse_amount(max_u256), Err(AmountError::TooLarge));
    let past_u256 = format!("{max_u256}0");
    assert_eq!(parse_amount(&past_u256), Err(AmountError::TooLarge));
    assert_eq!(parse_amount(""), Err(AmountError::Empty));
    for bad in ["-1", "+1", "1.5", "1e6", " 1", "0x10", "１"] {
        assert_eq!(parse_amount(bad), Err(AmountError::NotDecimal), "{bad:?}");
    }
}

#[wasm_bindgen_test]
fn thresholds_and_reach_are_exact_at_the_limits() {
    assert_eq!(threshold_ppm(0.7), Some(700_000));
    assert_eq!(threshold_ppm(1.0), Some(1_000_000));
    assert_eq!(threshold_ppm(0.0), None);
    assert_eq!(threshold_ppm(f64::INFINITY), None);
    assert!(reaches(u64::MAX, u64::MAX, 1_000_000));
    assert!(!reaches(u64::MAX - 1, u64::MAX, 1_000_000));
    assert!(reaches(4_500_000, 5_000_000, 900_000));
    assert!(!reaches(4_499_999, 5_000_000, 900_000));
}

// --- ledger -------------------------------------------------------------------------

fn ralph_charge(price: u64) -> Charge<'static> {
    Charge {
        agent: "ralph-1",
        price,
        session_limit: Some(5_000_000),
        agent_limit: Some(3_000_000),
        kill_ppm: Some(900_000),
        max_agents: 64,
    }
}

// Records gain fields over time; `..Default::default()` keeps these literals compiling
// when they do, and is "needless" only while every field is named.
#[allow(clippy::needless_update)]
#[wasm_bindgen_test]
fn session_records_round_trip_with_64_bit_values() {
    let record = SessionRecord {
        session_id: "s".repeat(128),
        last_active: u64::MAX,
        spent: u64::MAX - 1,
        reserved: (1 << 32) + 7,
        killed: true,
        agents: vec![
            AgentEntry {
                id: "ralph-1".into(),
                spent: u64::MAX,
                reserved: 1 << 40,
                ..AgentEntry::default()
            },
            AgentEntry {
                id: "a".repeat(128),
                spent: u64::from(u32::MAX) + 1,
                reserved: 0,
                ..AgentEntry::default()
            },
        ],
        ..SessionRecord::default()
    };
    let bytes = record.encode();
    let decoded = SessionRecord::decode(&bytes).unwrap();
    assert_eq!(decoded, record);
    assert_eq!(decoded.agent("ralph-1").unwrap().spent, u64::MAX);
    for cut in 0..bytes.len() {
        // Empty bytes are a free slot; every other prefix is malformed.
        let decoded = SessionRecord::decode(&bytes[..cut]);
        if cut == 0 {
            assert_eq!(decoded.unwrap(), SessionRecord::default());
        } else {
            assert!(decoded.is_err(), "prefix of {cut} bytes decoded");
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(SessionRecord::decode(&longer).is_err());
    assert!(SessionRecord::decode(&[0xee]).is_err());
    assert!(SessionRecord::decode(&[9, 9, 9]).is_err());
}

// Records gain fields over time; `..Default::default()` keeps these literals compiling
// when they do, and is "needless" only while every field is named.
#[allow(clippy::needless_update)]
#[wasm_bindgen_test]
fn a_session_with_a_thousand_agents_round_trips() {
    let mut record = SessionRecord::new("big", NOON);
    for i in 0..1024u64 {
        record.agents.push(AgentEntry {
            id: format!("agent-{i}"),
            spent: i << 33,
            reserved: i,
            ..AgentEntry::default()
        });
    }
    let decoded = SessionRecord::decode(&record.encode()).unwrap();
    assert_eq!(decoded.agents.len(), 1024);
    assert_eq!(decoded, record);
}

// Records gain fields over time; `..Default::default()` keeps these literals compiling
// when they do, and is "needless" only while every field is named.
#[allow(clippy::needless_update)]
#[wasm_bindgen_test]
fn tenant_records_round_trip_with_64_bit_values() {
    let record = TenantRecord {
        day: WindowCounter {
            index: u32::MAX,
            spent: u64::MAX,
            reserved: 1 << 63,
            ..WindowCounter::default()
        },
        month: WindowCounter {
            index: month_index(NOON),
            spent: (1 << 32) + 1,
            reserved: u64::MAX - 5,
            ..WindowCounter::default()
        },
    };
    let bytes = record.encode();
    assert_eq!(TenantRecord::decode(&bytes).unwrap(), record);
    for cut in 1..bytes.len() {
        assert!(TenantRecord::decode(&bytes[..cut]).is_err(), "prefix {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(TenantRecord::decode(&longer).is_err());
    assert_eq!(TenantRecord::decode(&[]).unwrap(), TenantRecord::default());
}

#[wasm_bindgen_test]
fn ralph_gets_exactly_twenty_reservations_then_its_agent_budget_refuses() {
    let mut s = SessionRecord::new("ralph-session", NOON);
    let mut ok = 0u32;
    let refusal = loop {
        match s.try_reserve(&ralph_charge(150_000)) {
            Ok(()) => {
                assert_eq!(s.reserved, 150_000);
                s.settle("ralph-1", 150_000, true);
                ok += 1;
                assert!(ok <= 20, "more than 20 reservations");
            }
            Err(r) => break r,
        }
    };
    assert_eq!(ok, 20);
    assert_eq!(refusal.code, ErrorCode::AgentBudgetExceeded);
    assert_eq!(refusal.status(), 403);
    match &refusal.details {
        Details::Budget(b) => {
            assert_eq!(b.scope, Scope::Agent);
            assert_eq!((b.limit, b.spent, b.reserved), (3_000_000, 3_000_000, 0));
            assert_eq!(b.requested, 150_000);
        }
        other => panic!("unexpected details {other:?}"),
    }
    let agent = s.agent("ralph-1").unwrap();
    assert_eq!((agent.spent, agent.reserved), (3_000_000, 0));
    assert_eq!((s.spent, s.reserved), (3_000_000, 0));
    let json: serde_json::Value = serde_json::from_str(&refusal.to_json()).unwrap();
    assert_eq!(json["error"]["code"], "AGENT_BUDGET_EXCEEDED");
    assert_eq!(json["error"]["details"]["limit"], "3000000");
    // The record as stored after all that still decodes to itself.
    assert_eq!(SessionRecord::decode(&s.encode()).unwrap(), s);
}

#[wasm_bindgen_test]
fn reservations_in_flight_count_and_release_gives_them_back() {
    let mut s = SessionRecord::new("s", NOON);
    for _ in 0..20 {
        s.try_reserve(&ralph_charge(150_000)).unwrap();
    }
    assert_eq!(
        s.try_reserve(&ralph_charge(150_000)).unwrap_err().code,
        ErrorCode::AgentBudgetExceeded
    );
    for _ in 0..20 {
        s.settle("ralph-1", 150_000, false);
    }
    assert_eq!((s.spent, s.reserved), (0, 0));
    // Settling more than was reserved never underflows.
    s.settle("ralph-1", 150_000, true);
    assert_eq!((s.spent, s.reserved), (0, 0));
}

#[wasm_bindgen_test]
fn the_kill_switch_refuses_manually_and_at_its_threshold() {
    let mut s = SessionRecord::new("s", NOON);
    s.killed = true;
    let r = s.try_reserve(&ralph_charge(1)).unwrap_err();
    assert_eq!(r.code, ErrorCode::KillSwitchActive);
    assert!(
        r.to_json().contains("\"reason\":\"manual\""),
        "{}",
        r.to_json()
    );
    let s = SessionRecord::decode(&s.encode()).unwrap();
    assert!(s.killed, "the kill switch survives encoding");

    let mut s = SessionRecord::new("s", NOON);
    let c = Charge {
        agent_limit: None,
        ..ralph_charge(150_000)
    };
    let mut ok = 0;
    while s.try_reserve(&c).is_ok() {
        s.settle("ralph-1", 150_000, true);
        ok += 1;
    }
    // 30 × 150000 = 4.5M = 90% of 5M.
    assert_eq!(ok, 30);
    assert_eq!(
        s.try_reserve(&c).unwrap_err().code,
        ErrorCode::KillSwitchActive
    );
}

#[wasm_bindgen_test]
fn budgets_past_32_bits_are_enforced_exactly() {
    let big = 10_000_000_000_000u64; // $10M in USDC units, far past u32
    let mut s = SessionRecord::new("s", 0);
    let c = Charge {
        agent: "a",
        price: big / 4,
        session_limit: Some(big),
        agent_limit: None,
        kill_ppm: None,
        max_agents: 1,
    };
    for _ in 0..4 {
        s.try_reserve(&c).unwrap();
    }
    assert_eq!(s.reserved, big);
    assert_eq!(
        s.try_reserve(&Charge { price: 1, ..c }).unwrap_err().code,
        ErrorCode::SessionBudgetExceeded
    );
    // Near u64::MAX: refused, never wrapped.
    let mut s = SessionRecord::new("s", 0);
    s.spent = u64::MAX - 1;
    let c = Charge {
        session_limit: Some(u64::MAX),
        price: 5,
        ..c
    };
    assert_eq!(
        s.try_reserve(&c).unwrap_err().code,
        ErrorCode::SessionBudgetExceeded
    );
    assert_eq!(s.reserved, 0);
}

#[wasm_bindgen_test]
fn tenant_windows_reserve_settle_and_roll() {
    let mut t = TenantRecord::default();
    t.roll(NOON);
    assert_eq!(t.day.index, day_index(NOON));
    assert_eq!(t.month.index, month_index(NOON));
    t.try_reserve(100, Some(1000), Some(5000)).unwrap();
    t.settle(100, true);
    t.try_reserve(50, Some(1000), Some(5000)).unwrap();
    assert_eq!((t.day.spent, t.day.reserved), (100, 50));
    assert_eq!(
        t.try_reserve(851, Some(1000), Some(5000)).unwrap_err().code,
        ErrorCode::DailyBudgetExceeded
    );
    t.roll(NOON + 86_400); // 2026-12-01: next day and next month
    assert_eq!((t.day.spent, t.day.reserved), (0, 50));
    assert_eq!((t.month.spent, t.month.reserved), (0, 50));
    t.settle(50, true);
    assert_eq!((t.day.spent, t.month.spent), (50, 50));
    t.roll(NOON); // a clock a moment behind never rolls back
    assert_eq!(t.day.spent, 50);
    // Windows far in the future (past 2106, when seconds leave u32) still roll.
    let far = u64::from(u32::MAX) * 4;
    t.roll(far);
    assert_eq!(t.day.index, day_index(far));
    assert_eq!(t.day.spent, 0);
    assert_eq!(TenantRecord::decode(&t.encode()).unwrap(), t);
}

// --- compile ------------------------------------------------------------------------

fn reference_config_json() -> String {
    format!(
        r#"{{
          "tenants": [{{"id": "demo", "apiKeySha256": "{}"}}],
          "sessions": {{"maxSessions": 64, "maxAgentsPerSession": 8, "idleTimeoutSeconds": 60}},
          "defaultPolicy": "reference",
          "policies": {{
            "reference": {{
              "sessionBudget": "5000000",
              "dailyBudget": "20000000",
              "maxPerRequest": "500000",
              "alertOnThreshold": 0.7,
              "killSwitchThreshold": 0.9,
              "blockedEndpoints": ["api.openai.com/v1/images/*"],
              "agents": {{
                "ralph-*": {{"agentBudget": "3000000"}},
                "reviewer-*": {{"agentBudget": "500000", "maxPerRequest": "100000"}}
              }}
            }},
            "big": {{"sessionBudget": "18446744073709551615", "chargeOn": "always"}}
          }},
          "endpoints": [
            {{"pattern": "api.tavily.com/*", "price": "150000", "tool": "search"}},
            {{"pattern": "api.free.dev/*", "price": "0"}}
          ]
        }}"#,
        sha256_hex(DEMO_KEY.as_bytes())
    )
}

fn reference_config() -> Config {
    compile_json(reference_config_json().as_bytes()).unwrap()
}

#[wasm_bindgen_test]
fn a_valid_config_compiles_in_wasm() {
    let cfg = reference_config();
    assert_eq!(cfg.tenants.len(), 1);
    assert_eq!(cfg.tenants[0].id, "demo");
    assert!(cfg.requires_api_key());
    // SHA-256 and the hash map's hasher both work on this target.
    assert_eq!(cfg.tenant_for_key(DEMO_KEY.as_bytes()), Some(0));
    assert_eq!(cfg.tenant_for_key(b"wrong-key"), None);
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(cfg.sessions.max_sessions, 64);
    assert_eq!(cfg.sessions.max_agents, 8);
    assert_eq!(cfg.sessions.idle_timeout_secs, 60);
    assert_eq!(cfg.policies.len(), 2);
    let reference = cfg.policy(None).unwrap();
    assert_eq!(reference.name, "reference");
    assert_eq!(reference.session_budget, Some(5_000_000));
    assert_eq!(reference.kill_ppm, Some(900_000));
    assert_eq!(reference.alert_ppm, Some(700_000));
    assert_eq!(
        reference.agent_rule("ralph-7").unwrap().agent_budget,
        Some(3_000_000)
    );
    let big = cfg.policy(Some("big")).unwrap();
    assert_eq!(big.session_budget, Some(u64::MAX));
    assert_eq!(big.charge_on, ChargeOn::Always);
    assert!(cfg.track_windows);
    let rule = cfg.endpoint_rule("api.tavily.com/search").unwrap();
    assert_eq!(rule.price, Some(150_000));
    assert_eq!(rule.tool.as_deref(), Some("search"));
    assert_eq!(cfg.endpoint_rule("api.free.dev/x").unwrap().price, Some(0));
    assert!(cfg.endpoint_rule("api.other.com/x").is_none());
}

#[wasm_bindgen_test]
fn the_minimal_config_compiles_with_defaults() {
    let cfg = compile_json(br#"{"policies": {"default": {"sessionBudget": "5000000"}}}"#).unwrap();
    assert!(!cfg.requires_api_key());
    assert_eq!(cfg.tenants[0].id, "default");
    assert_eq!(cfg.sessions.max_sessions, 4096);
    assert_eq!(cfg.identity.session_header, "x-pag0-session");
    assert!(!cfg.track_windows);
}

#[wasm_bindgen_test]
fn broken_configs_are_refused_naming_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"policies": {"p": {"sessionBudget": 5000000}}}"#,
            "policies.p.sessionBudget",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "18446744073709551616"}}}"#,
            "policies.p.sessionBudget",
        ),
        (
            r#"{"policies": {"p": {"sessionBudget": "100", "maxPerRequest": "200"}}}"#,
            "policies.p.maxPerRequest",
        ),
        (
            r#"{"policies": {"p": {"agents": {"ralph-*": {"agentBudget": "-1"}}}}}"#,
            "policies.p.agents.ralph-*.agentBudget",
        ),
        (
            r#"{"policies": {"p": {"killSwitchThreshold": 0.9}}}"#,
            "policies.p.sessionBudget",
        ),
        (
            r#"{"sessions": {"maxSessions": 0}, "policies": {"p": {}}}"#,
            "sessions.maxSessions",
        ),
        (
            r#"{"tenants": [{"id": "t", "apiKeySha256": "abc"}], "policies": {"p": {}}}"#,
            "tenants[0].apiKeySha256",
        ),
        (
            r#"{"policies": {"p": {}}, "endpoints": [{"pattern": "a.com/x?y", "price": "1"}]}"#,
            "endpoints[0].pattern",
        ),
        (r#"{"policies": {"a": {}, "b": {}}}"#, "defaultPolicy"),
        (r#"{"policies": {}}"#, "policies"),
    ];
    for (json, field) in cases {
        let err = compile_json(json.as_bytes()).unwrap_err();
        assert!(
            err.contains(field),
            "{json}: error {err:?} does not name {field}"
        );
    }
    let err = compile_json(b"  ").unwrap_err();
    assert!(err.contains("empty"), "{err}");
    let err = compile_json(br#"{"policies": {"p": {"sessionBudjet": "1"}}}"#).unwrap_err();
    assert!(err.contains("sessionBudjet"), "{err}");
    let err = compile_json(b"{not json").unwrap_err();
    assert!(err.starts_with("configuration is not valid"), "{err}");
}

// --- store and sessions -------------------------------------------------------------

fn limits(max_sessions: u32) -> SessionLimits {
    SessionLimits {
        max_sessions,
        max_agents: 8,
        idle_timeout_secs: 60,
    }
}

fn done(agent: &str, price: u64, commit: bool) -> Settlement<'_> {
    Settlement {
        agent,
        price,
        commit,
    }
}

fn session_charge(price: u64) -> Charge<'static> {
    Charge {
        agent: "a-1",
        price,
        session_limit: Some(1_000_000),
        agent_limit: None,
        kill_ppm: None,
        max_agents: 8,
    }
}

#[wasm_bindgen_test]
fn memory_store_cas_and_lock_work_single_threaded() {
    let store = MemoryStore::new();
    assert!(store.get("k").unwrap().is_none());
    assert!(store.set("k", b"first", CREATE_CAS).unwrap());
    assert!(!store.set("k", b"second", CREATE_CAS).unwrap());
    let (value, cas) = store.get("k").unwrap().unwrap();
    assert_eq!(value, b"first");
    assert!(!store.set("k", b"stale", cas.wrapping_add(1)).unwrap());
    assert!(store.set("k", b"third", cas).unwrap());
    let n = update(&store, "n", |bytes| {
        Ok(Step::Write([bytes, b"!"].concat(), bytes.len()))
    })
    .unwrap();
    assert_eq!(n, 0);
    store.set_now_micros(u64::from(u32::MAX) * 1000); // past 32 bits of micros
    assert_eq!(with_lock(&store, "lock", || Ok(42)).unwrap(), 42);
    assert_eq!(store.get("lock").unwrap().unwrap().0, Vec::<u8>::new());
    assert_eq!(store.key_count(), 3);
}

#[wasm_bindgen_test]
fn probe_slots_stay_in_range_for_the_largest_table() {
    for max in [1u32, 2, 16, 17, 4096, 1_048_576] {
        let slots: Vec<u32> = probe_slots("session-x", max).collect();
        assert_eq!(slots.len() as u32, PROBE.min(max));
        assert!(slots.iter().all(|s| *s < max));
        let mut unique = slots.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), slots.len());
    }
    // The hash is the same on every target (64-bit FNV-1a, computed independently):
    // a session lands in the same home slot natively and in Envoy's wasm VM.
    assert_eq!(probe_slots("abc", 1_048_576).next(), Some(526_044));
    assert_eq!(probe_slots("abc", 4096).next(), Some(1756));
    // Home slot 150 of 153: the probe wraps round to slot 0.
    let wrapped: Vec<u32> = probe_slots("abc", 153).collect();
    assert_eq!(wrapped[..4], [150, 151, 152, 0]);
    assert_eq!(wrapped.len(), 16);
}

#[wasm_bindgen_test]
fn sessions_reserve_settle_and_lookup_over_the_slot_table() {
    let store = MemoryStore::new();
    let l = limits(64);
    assert!(sessions::lookup(&store, "t", "s1", &l).unwrap().is_none());
    let (slot, rec) =
        sessions::reserve(&store, "t", "s1", &l, NOON, &session_charge(400_000)).unwrap();
    assert!(slot < 64);
    assert_eq!((rec.spent, rec.reserved), (0, 400_000));
    assert!(store.get(&session_slot_key("t", slot)).unwrap().is_some());
    let settled = sessions::settle(&store, "t", "s1", &l, NOON + 1, done("a-1", 400_000, true))
        .unwrap()
        .unwrap();
    assert_eq!((settled.spent, settled.reserved), (400_000, 0));
    assert_eq!(settled.last_active, NOON + 1);
    let (slot2, rec) =
        sessions::reserve(&store, "t", "s1", &l, NOON + 2, &session_charge(400_000)).unwrap();
    assert_eq!(slot, slot2);
    assert_eq!((rec.spent, rec.reserved), (400_000, 400_000));
    let refused =
        sessions::reserve(&store, "t", "s1", &l, NOON + 3, &session_charge(400_000)).unwrap_err();
    assert_eq!(refused.code, ErrorCode::SessionBudgetExceeded);
    let (found_slot, found) = sessions::lookup(&store, "t", "s1", &l).unwrap().unwrap();
    assert_eq!(found_slot, slot);
    assert_eq!((found.spent, found.reserved), (400_000, 400_000));
    assert_eq!(found.agent("a-1").unwrap().reserved, 400_000);
    // Settling a session that has no slot changes nothing.
    assert!(
        sessions::settle(&store, "t", "nobody", &l, NOON, done("a-1", 1, true))
            .unwrap()
            .is_none()
    );
    // Another tenant's session of the same id is another record.
    assert!(sessions::lookup(&store, "t2", "s1", &l).unwrap().is_none());
}

#[wasm_bindgen_test]
fn a_full_table_fails_closed_and_idle_slots_are_reused() {
    let store = MemoryStore::new();
    let l = limits(4);
    for i in 0..4 {
        let id = format!("s{i}");
        sessions::reserve(&store, "t", &id, &l, NOON, &session_charge(1)).unwrap();
        sessions::settle(&store, "t", &id, &l, NOON, done("a-1", 1, true)).unwrap();
    }
    let full =
        sessions::reserve(&store, "t", "s-new", &l, NOON + 30, &session_charge(1)).unwrap_err();
    assert_eq!(full.code, ErrorCode::CapacityExceeded);
    assert_eq!(full.status(), 503);
    let (_, rec) =
        sessions::reserve(&store, "t", "s-new", &l, NOON + 61, &session_charge(1)).unwrap();
    assert_eq!((rec.spent, rec.reserved), (0, 1));
    assert_eq!(store.key_count(), 4 + 1); // 4 slots + the claim lock
}

#[wasm_bindgen_test]
fn session_churn_stays_in_a_fixed_number_of_keys() {
    let store = MemoryStore::new();
    let l = SessionLimits {
        max_sessions: 256,
        max_agents: 4,
        idle_timeout_secs: 1,
    };
    let mut refused = 0;
    for i in 0..20_000u64 {
        let id = format!("session-{i}");
        let now = NOON + i / 64;
        match sessions::reserve(&store, "t", &id, &l, now, &session_charge(1)) {
            Ok(_) => {
                sessions::settle(&store, "t", &id, &l, now, done("a-1", 1, true)).unwrap();
            }
            Err(e) => {
                assert_eq!(e.code, ErrorCode::CapacityExceeded);
                refused += 1;
            }
        }
    }
    assert!(store.key_count() <= 256 + 1);
    assert!(refused < 20_000 / 100, "{refused} refused");
}

// --- firewall -----------------------------------------------------------------------

// The firewall's admit → settle hand-over, in one place: these two helpers are the
// only lines that know how an admitted call is held and what settling returns.

/// The reservation an admitted priced call holds; `None` for a free call.
fn held(admission: &Admission) -> Option<Ticket> {
    (admission.ticket.price > 0).then(|| admission.ticket.clone())
}

/// Ends an admitted call (commit or release) and returns the budgets as they stand.
fn finish(cfg: &Config, store: &MemoryStore, held: &Ticket, commit: bool, now: u64) -> BudgetView {
    settle_call(cfg, store, held, commit, now).unwrap().view
}

fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> HeaderValue + 'a {
    move |name: &str| {
        let found: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .collect();
        match found.as_slice() {
            [] => HeaderValue::Missing,
            [one] => HeaderValue::One(one.as_bytes().to_vec()),
            _ => HeaderValue::Many,
        }
    }
}

fn caller(cfg: &Config, session: &str, agent: &str) -> Caller {
    let pairs = [
        ("x-pag0-api-key", DEMO_KEY),
        ("x-pag0-session", session),
        ("x-pag0-agent", agent),
    ];
    let lookup = headers(&pairs);
    identify(cfg, &lookup).unwrap()
}

#[wasm_bindgen_test]
fn identify_finds_tenant_session_and_agent() {
    let cfg = reference_config();
    let c = caller(&cfg, "sess-1", "ralph-1");
    assert_eq!(
        c,
        Caller {
            tenant: 0,
            session: "sess-1".into(),
            agent: "ralph-1".into()
        }
    );
    let no_agent = identify(
        &cfg,
        &headers(&[("x-pag0-api-key", DEMO_KEY), ("x-pag0-session", "s")]),
    )
    .unwrap();
    assert_eq!(no_agent.agent, "main");

    let code = |pairs: &[(&str, &str)]| identify(&cfg, &headers(pairs)).unwrap_err().code;
    assert_eq!(code(&[("x-pag0-session", "s")]), ErrorCode::Unauthorized);
    assert_eq!(
        code(&[("x-pag0-api-key", "nope"), ("x-pag0-session", "s")]),
        ErrorCode::Unauthorized
    );
    assert_eq!(
        code(&[("x-pag0-api-key", DEMO_KEY)]),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(&[
            ("x-pag0-api-key", DEMO_KEY),
            ("x-pag0-session", "a"),
            ("x-pag0-session", "b"),
        ]),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(&[("x-pag0-api-key", DEMO_KEY), ("x-pag0-session", "a b")]),
        ErrorCode::InvalidRequest
    );
    let too_long = "x".repeat(129);
    assert_eq!(
        code(&[("x-pag0-api-key", DEMO_KEY), ("x-pag0-session", &too_long)]),
        ErrorCode::InvalidRequest
    );
    // Non-UTF-8 header bytes are a 400, not a panic.
    let raw = |name: &str| match name {
        "x-pag0-api-key" => HeaderValue::One(DEMO_KEY.as_bytes().to_vec()),
        "x-pag0-session" => HeaderValue::One(vec![0xff, 0xfe]),
        _ => HeaderValue::Missing,
    };
    assert_eq!(
        identify(&cfg, &raw).unwrap_err().code,
        ErrorCode::InvalidRequest
    );
}

#[wasm_bindgen_test]
fn describe_call_resolves_endpoint_price_tool_and_policy() {
    let cfg = reference_config();
    let call = describe_call(
        &cfg,
        b"API.Tavily.com:443",
        b"/%73earch?q=1",
        &RouteSettings::default(),
    )
    .unwrap();
    assert_eq!(call.endpoint, "api.tavily.com/search");
    assert_eq!(call.price, 150_000);
    assert_eq!(call.tool.as_deref(), Some("search"));
    assert_eq!(call.policy, cfg.default_policy);
    assert_eq!(call.charge_on, ChargeOn::Success);

    let route = RouteSettings {
        policy: Some("big".into()),
        price: Some("18446744073709551615".into()),
        tool: Some("llm".into()),
        ..RouteSettings::default()
    };
    let call = describe_call(&cfg, b"api.other.com", b"/v1", &route).unwrap();
    assert_eq!(call.price, u64::MAX);
    assert_eq!(call.tool.as_deref(), Some("llm"));
    assert_eq!(cfg.policies[call.policy].name, "big");
    assert_eq!(call.charge_on, ChargeOn::Always);

    let free = describe_call(&cfg, b"api.other.com", b"/", &RouteSettings::default()).unwrap();
    assert_eq!((free.price, free.tool), (0, None));

    let bad = |route: RouteSettings| describe_call(&cfg, b"h", b"/", &route).unwrap_err();
    let e = bad(RouteSettings {
        price: Some("18446744073709551616".into()),
        ..RouteSettings::default()
    });
    assert_eq!((e.code, e.status()), (ErrorCode::ConfigError, 500));
    assert!(e.message.contains("pag0.price"), "{}", e.message);
    let e = bad(RouteSettings {
        policy: Some("nope".into()),
        ..RouteSettings::default()
    });
    assert_eq!(e.code, ErrorCode::ConfigError);
    let e = bad(RouteSettings {
        charge_on: Some("sometimes".into()),
        ..RouteSettings::default()
    });
    assert_eq!(e.code, ErrorCode::ConfigError);
    let e = describe_call(&cfg, b"", b"/", &RouteSettings::default()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
}

#[wasm_bindgen_test]
fn ralph_end_to_end_twenty_calls_then_refused_with_budgets_in_headers() {
    let cfg = reference_config();
    let store = MemoryStore::new();
    let who = caller(&cfg, "ralph-session", "ralph-1");
    let call = describe_call(&cfg, TAVILY.0, TAVILY.1, &RouteSettings::default()).unwrap();
    for i in 1..=20u64 {
        let now = NOON + i;
        let admitted = admit(&cfg, &store, &who, &call, now).unwrap();
        let reservation = held(&admitted).unwrap();
        assert_eq!(reservation.price, 150_000);
        assert!(reservation.windows);
        assert!(should_commit(call.charge_on, Some(200)));
        let view = finish(&cfg, &store, &reservation, true, now);
        assert_eq!(
            view.remaining_header(),
            format!(
                "session={}, agent={}, daily={}",
                5_000_000 - i * 150_000,
                3_000_000 - i * 150_000,
                20_000_000 - i * 150_000
            ),
            "call {i}"
        );
        // 0.7 of the session is 3.5M, never reached; 0.7 of ralph's 3M is 2.1M = 14 calls.
        let alert = view.alert_header();
        if i >= 14 {
            let expected = decimal(i * 150_000, 3_000_000);
            assert_eq!(alert, Some(format!("agent={expected}")), "call {i}");
        } else {
            assert_eq!(alert, None, "call {i}");
        }
    }
    let refused = admit(&cfg, &store, &who, &call, NOON + 21).unwrap_err();
    assert_eq!(refused.refusal.code, ErrorCode::AgentBudgetExceeded);
    assert_eq!(refused.refusal.status(), 403);
    assert_eq!(
        refused.view.remaining_header(),
        "session=2000000, agent=0, daily=17000000"
    );
    assert_eq!(refused.view.alert_header().as_deref(), Some("agent=1.0"));
    // The refused call reserved nothing anywhere.
    let view = current_view(&cfg, &store, &who, &call, NOON + 22).unwrap();
    assert!(view.scopes.iter().all(|s| s.reserved == 0));
    let windows =
        TenantRecord::decode(&store.get(&tenant_windows_key("demo")).unwrap().unwrap().0).unwrap();
    assert_eq!((windows.day.spent, windows.day.reserved), (3_000_000, 0));

    // Another agent of the same session goes on, up to the session's kill switch.
    let exec = caller(&cfg, "ralph-session", "executor-1");
    let mut ok = 0;
    let last = loop {
        match admit(&cfg, &store, &exec, &call, NOON + 30) {
            Ok(a) => {
                finish(&cfg, &store, &held(&a).unwrap(), true, NOON + 30);
                ok += 1;
            }
            Err(r) => break r,
        }
    };
    // 3.0M spent; the kill switch trips once 4.5M (0.9 × 5M) is used: 10 more calls.
    assert_eq!(ok, 10);
    assert_eq!(last.refusal.code, ErrorCode::KillSwitchActive);
}

#[wasm_bindgen_test]
fn a_failed_upstream_releases_the_reservation() {
    let cfg = reference_config();
    let store = MemoryStore::new();
    let who = caller(&cfg, "s-fail", "ralph-2");
    let call = describe_call(&cfg, TAVILY.0, TAVILY.1, &RouteSettings::default()).unwrap();
    let admitted = admit(&cfg, &store, &who, &call, NOON).unwrap();
    let during = current_view(&cfg, &store, &who, &call, NOON).unwrap();
    assert!(during.scopes.iter().all(|s| s.reserved == 150_000));
    assert!(!should_commit(call.charge_on, Some(502)));
    assert!(!should_commit(call.charge_on, None));
    let commit = should_commit(call.charge_on, Some(502));
    let view = finish(&cfg, &store, &held(&admitted).unwrap(), commit, NOON);
    assert!(view.scopes.iter().all(|s| s.spent == 0 && s.reserved == 0));
    assert_eq!(
        view.remaining_header(),
        "session=5000000, agent=3000000, daily=20000000"
    );
}

#[wasm_bindgen_test]
fn policy_refusals_and_free_calls() {
    let cfg = reference_config();
    let store = MemoryStore::new();
    let who = caller(&cfg, "s-pol", "reviewer-1");
    let blocked = describe_call(
        &cfg,
        b"api.openai.com",
        b"/v1/images/generations",
        &RouteSettings {
            price: Some("1".into()),
            ..RouteSettings::default()
        },
    )
    .unwrap();
    let r = admit(&cfg, &store, &who, &blocked, NOON).unwrap_err();
    assert_eq!(r.refusal.code, ErrorCode::EndpointBlocked);
    let tavily = describe_call(&cfg, TAVILY.0, TAVILY.1, &RouteSettings::default()).unwrap();
    let r = admit(&cfg, &store, &who, &tavily, NOON).unwrap_err();
    assert_eq!(r.refusal.code, ErrorCode::PerRequestLimitExceeded);
    assert!(r.refusal.to_json().contains("\"scope\":\"agent\""));
    let free = describe_call(&cfg, b"api.free.dev", b"/x", &RouteSettings::default()).unwrap();
    let a = admit(&cfg, &store, &who, &free, NOON).unwrap();
    assert!(held(&a).is_none());
    assert_eq!(
        a.view.remaining_header(),
        "session=5000000, agent=500000, daily=20000000"
    );
    // Nothing above claimed a session slot.
    assert!(sessions::lookup(&store, "demo", "s-pol", &cfg.sessions)
        .unwrap()
        .is_none());
}

#[wasm_bindgen_test]
fn the_daily_window_refuses_across_sessions_and_gives_the_session_part_back() {
    let json = r#"{"policies": {"p": {"sessionBudget": "1000", "dailyBudget": "1500"}},
                   "endpoints": [{"pattern": "*", "price": "400"}]}"#;
    let cfg = compile_json(json.as_bytes()).unwrap();
    let store = MemoryStore::new();
    let call = describe_call(&cfg, b"h", b"/", &RouteSettings::default()).unwrap();
    let mut spent = 0;
    for s in ["s1", "s2", "s3"] {
        let who = identify(&cfg, &headers(&[("x-pag0-session", s)])).unwrap();
        loop {
            match admit(&cfg, &store, &who, &call, NOON) {
                Ok(a) => {
                    finish(&cfg, &store, &held(&a).unwrap(), true, NOON);
                    spent += 400;
                }
                Err(r) => {
                    let code = r.refusal.code;
                    assert!(
                        code == ErrorCode::SessionBudgetExceeded
                            || code == ErrorCode::DailyBudgetExceeded,
                        "{code:?}"
                    );
                    break;
                }
            }
        }
    }
    assert_eq!(spent, 1200);
    let who = identify(&cfg, &headers(&[("x-pag0-session", "s3")])).unwrap();
    let r = admit(&cfg, &store, &who, &call, NOON).unwrap_err();
    assert_eq!(r.refusal.code, ErrorCode::DailyBudgetExceeded);
    let (_, s3) = sessions::lookup(&store, "default", "s3", &cfg.sessions)
        .unwrap()
        .unwrap();
    assert_eq!(s3.reserved, 0, "the session part was given back");
    // The next UTC day starts afresh.
    let a = admit(&cfg, &store, &who, &call, NOON + 86_400).unwrap();
    assert!(held(&a).is_some());
}

// --- endpoint, glob, headers --------------------------------------------------------

#[wasm_bindgen_test]
fn endpoints_are_normalised() {
    let ep = |a: &str, p: &str| endpoint(a.as_bytes(), p.as_bytes()).unwrap();
    assert_eq!(
        ep("API.Tavily.com:443", "/search?q=x#f"),
        "api.tavily.com/search"
    );
    assert_eq!(ep("[::1]:8080", "/a"), "[::1]/a");
    assert_eq!(ep("example.com.", "/"), "example.com/");
    assert_eq!(ep("h", "/v1/%63hat/completions"), "h/v1/chat/completions");
    assert_eq!(ep("h", "//v1///chat"), "h/v1/chat");
    assert_eq!(ep("h", "/v1/x/../chat"), "h/v1/chat");
    assert_eq!(ep("h", "/v1/./chat/"), "h/v1/chat/");
    assert_eq!(ep("h", "/../../etc"), "h/etc");
    assert_eq!(ep("h", "/a%2fb"), "h/a%2Fb");
    assert_eq!(ep("h", ""), "h/");
    let long = format!("/{}", "a/".repeat(10_000));
    assert_eq!(ep("h", &long).len(), 1 + long.len());
    assert_eq!(endpoint(b"", b"/"), Err(EndpointError::MissingHost));
    assert_eq!(endpoint(b"a b", b"/"), Err(EndpointError::BadHost));
    assert_eq!(endpoint(b"\xff", b"/"), Err(EndpointError::BadHost));
    assert_eq!(endpoint(b"[::1", b"/"), Err(EndpointError::BadHost));
    assert_eq!(endpoint(b"h", b"/%zz"), Err(EndpointError::BadPath));
    assert_eq!(endpoint(b"h", b"/%4"), Err(EndpointError::BadPath));
    assert_eq!(endpoint(b"h", b"/%"), Err(EndpointError::BadPath));
    assert_eq!(endpoint(b"h", b"/a\x01"), Err(EndpointError::BadPath));
    assert_eq!(endpoint(b"h", b"/\xc3\xa9"), Err(EndpointError::BadPath));
}

#[wasm_bindgen_test]
fn globs_match_like_natively() {
    let m = |p: &str, t: &str| Glob::new(p).unwrap().matches(t);
    assert!(m("api.openai.com/*", "api.openai.com/v1/chat/completions"));
    assert!(m("api.openai.com/*", "api.openai.com/"));
    assert!(!m("api.openai.com/*", "api.openai.com.evil.io/x"));
    assert!(m("*.tavily.com/search", "api.tavily.com/search"));
    assert!(!m("*.tavily.com/search", "api.tavily.com/search/x"));
    assert!(m("*", "anything/at/all"));
    assert!(m("api.*.com/*search*", "api.exa.ai.com/v1/search/x"));
    assert!(m("a*a", "aa"));
    assert!(!m("a*a", "a"));
    assert!(m("exact.com/path", "exact.com/path"));
    assert!(!m("exact.com/path", "exact.com/path2"));
    assert!(m("https://API.OpenAI.com/*", "api.openai.com/v1/x"));
    assert!(!m("api.x.com/V1", "api.x.com/v1"));
    let g = Glob::new("https://API.x.com/*/y*").unwrap();
    assert_eq!(g.source(), "https://API.x.com/*/y*");
    assert_eq!(g.literal_len(), "api.x.com/".len() + "/y".len());
    let long = format!("h/{}", "x".repeat(100_000));
    assert!(m("h/*x", &long));
    assert!(!m("h/*y", &long));
    for bad in ["", "https://", "a b", "a.com/x?y=1", "é.com"] {
        assert!(Glob::new(bad).is_err(), "{bad:?} accepted");
    }
}

#[wasm_bindgen_test]
fn budget_views_render_the_headers() {
    let state = |scope, limit, spent, reserved| ScopeState {
        scope,
        limit,
        spent,
        reserved,
    };
    let view = BudgetView {
        scopes: vec![
            state(Scope::Agent, 2_000_000, 200_000, 0),
            state(Scope::Session, 5_000_000, 700_000, 100_000),
            state(Scope::Daily, 20_000_000, 1_000_000, 0),
        ],
        alert_ppm: Some(700_000),
    };
    assert_eq!(
        view.remaining_header(),
        "session=4200000, agent=1800000, daily=19000000"
    );
    assert_eq!(view.alert_header(), None);

    let view = BudgetView {
        scopes: vec![
            state(Scope::Monthly, u64::MAX, u64::MAX - 10, 0),
            state(Scope::Session, 5_000_000, 3_600_000, 0),
            state(Scope::Agent, 1_000_000, 100, 0),
            state(Scope::Daily, 1 << 40, u64::MAX, u64::MAX),
        ],
        alert_ppm: Some(700_000),
    };
    assert_eq!(
        view.remaining_header(),
        "session=1400000, agent=999900, daily=0, monthly=10"
    );
    assert_eq!(
        view.alert_header().as_deref(),
        Some("session=0.72, daily=999999.999, monthly=0.999")
    );
    assert_eq!(BudgetView::default().remaining_header(), "");
    assert_eq!(BudgetView::default().alert_header(), None);

    assert_eq!(decimal(0, 10), "0.0");
    assert_eq!(decimal(7, 10), "0.7");
    assert_eq!(decimal(10, 10), "1.0");
    assert_eq!(decimal(2, 3), "0.666");
    assert_eq!(decimal(5, 0), "1.0");
    assert_eq!(decimal(u64::MAX, 1), "999999.999");
    assert_eq!(decimal(u64::MAX, u64::MAX), "1.0");
}

#[wasm_bindgen_test]
fn windows_index_days_and_months() {
    let nov_30_2359 = 1_796_083_199; // 2026-11-30T23:59:59Z
    assert_eq!(day_index(nov_30_2359) + 1, day_index(nov_30_2359 + 1));
    assert_eq!(month_index(nov_30_2359) + 1, month_index(nov_30_2359 + 1));
    assert_eq!(month_index(nov_30_2359), (2026 - 1970) * 12 + 10);
    assert_eq!(day_index(0), 0);
    assert_eq!(month_index(0), 0);
}

#[wasm_bindgen_test]
fn x402_amounts_and_headers_parse_the_same_in_32_bit_wasm() {
    use pag0::core::base64;
    use pag0::core::x402::{parse_payment_header, parse_required_header, X402Error};
    let entry = |amount: &str| {
        serde_json::json!({"scheme": "exact", "network": "eip155:84532", "amount": amount,
            "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"})
    };
    let encode = |v: serde_json::Value| base64::encode(v.to_string().as_bytes()).into_bytes();
    // Above u32::MAX, within u64: exact.
    let offer = parse_required_header(&encode(
        serde_json::json!({"x402Version": 2, "accepts": [entry("18446744073709551615")]}),
    ))
    .unwrap();
    assert_eq!(offer.accepts[0].amount, u64::MAX);
    let huge = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
    assert_eq!(
        parse_required_header(&encode(
            serde_json::json!({"x402Version": 2, "accepts": [entry(huge)]})
        )),
        Err(X402Error::AmountTooLarge(huge.to_string()))
    );
    assert!(parse_payment_header(b"%%%").is_err());
    assert_eq!(
        base64::decode(&base64::encode(&[0u8, 255, 7])).unwrap(),
        vec![0u8, 255, 7]
    );
}

#[wasm_bindgen_test]
fn route_metadata_pairs_decode_with_32_bit_lengths() {
    use pag0::core::route_meta::{decode, NOT_TEXT};
    let pairs: [(&[u8], &[u8]); 2] = [
        (b"price", b"20000"),
        (b"cacheTTL", &[0, 0, 0, 0, 0, 0x88, 0xd3, 0x40]),
    ];
    let mut bytes = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in &pairs {
        bytes.extend((k.len() as u32).to_le_bytes());
        bytes.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in &pairs {
        bytes.extend_from_slice(k);
        bytes.push(0);
        bytes.extend_from_slice(v);
        bytes.push(0);
    }
    let s = decode(&bytes).unwrap();
    assert_eq!(s.price.as_deref(), Some("20000"));
    assert_eq!(s.cache_ttl.as_deref(), Some(NOT_TEXT));
    // A count or a length near u32::MAX must not overflow 32-bit arithmetic.
    assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
    let mut huge = 1u32.to_le_bytes().to_vec();
    huge.extend(u32::MAX.to_le_bytes());
    huge.extend(u32::MAX.to_le_bytes());
    huge.extend(b"k\0v\0");
    assert!(decode(&huge).is_err());
}
