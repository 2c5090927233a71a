//! Shared-data records decode anything without panicking (a corrupt record is an
//! error), and what decodes survives the trip back: `decode(encode(decode(x)))` is
//! `decode(x)`. Covers every record the core keeps in shared data (session budgets,
//! tenant windows, reports, the VM registry, cache entries, x402 offers) and the pairs
//! encoding Envoy uses for route metadata; then plants the same bytes in the store, as
//! a corrupt record left by another VM would be, and runs the ledger, the cache, the
//! offers and the report API over it: none may panic.
#![no_main]

use std::fmt::Debug;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pag0::core::admin::{self, Access, AdminRoute};
use pag0::core::cache::{self, Entry};
use pag0::core::call::{Call, Caller, RouteSettings};
use pag0::core::compile::{compile_json, Config};
use pag0::core::ledger::budget::{BudgetRecord, Charge, Release};
use pag0::core::ledger::local::LocalLedger;
use pag0::core::ledger::owners::Registry;
use pag0::core::ledger::report::ReportRecord;
use pag0::core::ledger::windows::WindowsRecord;
use pag0::core::ledger::{self, sessions, Outcome};
use pag0::core::offers;
use pag0::core::pairs;
use pag0::core::route_meta;
use pag0::core::store::{
    flush_epoch_key, offer_slot_key, read, report_slot_key, session_slot_key, tenant_windows_key,
    vm_registry_key, MemoryStore, SharedStore,
};
use pag0::core::x402;

const TENANT: &str = "default";
const SESSION: &str = "s-1";

fn check<T: PartialEq + Debug>(
    name: &str,
    decoded: &T,
    encode: impl Fn(&T) -> Vec<u8>,
    decode: impl Fn(&[u8]) -> Option<T>,
) {
    let bytes = encode(decoded);
    match decode(&bytes) {
        Some(again) => assert_eq!(
            &again, decoded,
            "{name}: decode(encode(record)) differs from the record"
        ),
        None => panic!("{name}: the encoding of a decoded record does not decode: {decoded:?}"),
    }
}

/// proxy-wasm's pairs encoding, over bytes (keys need not be text).
fn encode_pairs(list: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = (list.len() as u32).to_le_bytes().to_vec();
    for (k, v) in list {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in list {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn encode_route(s: &RouteSettings) -> Vec<u8> {
    let mut list: Vec<(&[u8], &[u8])> = Vec::new();
    for (name, value) in [
        ("policy", &s.policy),
        ("price", &s.price),
        ("tool", &s.tool),
        ("chargeOn", &s.charge_on),
        ("endpoint", &s.endpoint),
        ("cacheTTL", &s.cache_ttl),
        ("x402", &s.x402),
        ("meter", &s.meter),
        ("defaultSession", &s.default_session),
    ] {
        if let Some(v) = value {
            list.push((name.as_bytes(), v.as_bytes()));
        }
    }
    if let Some(unknown) = &s.unknown {
        list.push((unknown.as_bytes(), b"x"));
    }
    encode_pairs(&list)
}

fn decoders(data: &[u8]) {
    if let Ok(r) = BudgetRecord::decode(data) {
        check("BudgetRecord", &r, BudgetRecord::encode, |b| {
            BudgetRecord::decode(b).ok()
        });
        if !r.session_id.is_empty() {
            assert!(BudgetRecord::encoded_id_is(&r.encode(), &r.session_id));
        }
    }
    if let Ok(r) = WindowsRecord::decode(data) {
        check("WindowsRecord", &r, WindowsRecord::encode, |b| {
            WindowsRecord::decode(b).ok()
        });
    }
    if let Ok(r) = ReportRecord::decode(data) {
        check("ReportRecord", &r, ReportRecord::encode, |b| {
            ReportRecord::decode(b).ok()
        });
        if !r.session_id.is_empty() {
            assert!(ReportRecord::encoded_id_is(&r.encode(), &r.session_id));
        }
    }
    if let Ok(r) = Registry::decode(data) {
        check("Registry", &r, Registry::encode, |b| {
            Registry::decode(b).ok()
        });
    }
    if let Some(e) = Entry::decode(data) {
        check("cache Entry", &e, Entry::encode, Entry::decode);
        let _ = e.expired(u64::MAX);
        let _ = e.age_secs(0);
        let value = cache::level2_value(&e);
        let body = format!("{{\"GET\": \"{value}\"}}");
        let _ = cache::level2_entry(body.as_bytes(), &e.key, e.stored_ms);
    }
    if let Ok(list) = pairs::pairs(data) {
        let owned: Vec<(Vec<u8>, Vec<u8>)> =
            list.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        let bytes = encode_pairs(&list);
        let again = pairs::pairs(&bytes).expect("pairs: the encoding of decoded pairs");
        let again: Vec<(Vec<u8>, Vec<u8>)> = again
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(again, owned, "pairs: decode(encode(pairs)) differs");
        // The core's own encoder, where the keys are text, is the same encoding.
        let text: Option<Vec<(&str, &[u8])>> = list
            .iter()
            .map(|(k, v)| std::str::from_utf8(k).ok().map(|k| (k, *v)))
            .collect();
        if let Some(text) = text {
            assert_eq!(pairs::encode(&text), bytes, "pairs::encode differs");
        }
    }
    if let Ok(route) = route_meta::decode(data) {
        let again = route_meta::decode(&encode_route(&route))
            .expect("route metadata: the encoding of decoded settings");
        assert_eq!(
            again, route,
            "route metadata: decode(encode(settings)) differs"
        );
    }
    // x402 parsers see shared-data bytes too (offers are remembered from them).
    let _ = x402::parse_required_body(data);
}

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        compile_json(
            br#"{
              "sessions": {"maxSessions": 8, "maxAgentsPerSession": 3, "idleTimeoutSeconds": 60},
              "cache": {"methods": ["GET", "POST"], "entries": 8, "maxEntryBytes": 4096},
              "ledger": {"reservationTimeoutSeconds": 10, "ownerLeaseSeconds": 3},
              "policies": {"p": {"sessionBudget": "1000000", "dailyBudget": "2000000",
                "monthlyBudget": "4000000", "alertOnThreshold": 0.5, "killSwitchThreshold": 0.9,
                "agents": {"a-*": {"agentBudget": "500000"}},
                "unmatchedAgents": {"agentBudget": "300000"}}}
            }"#,
        )
        .expect("the records target's config compiles")
    })
}

/// The four slots the offer of (TENANT, SESSION, "e") may use.
fn offer_slots() -> [u32; 4] {
    static SLOTS: OnceLock<[u32; 4]> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        let store = MemoryStore::new();
        let offer = x402::parse_required_body(
            br#"{"x402Version":1,"accepts":[{"scheme":"exact","network":"base-sepolia","maxAmountRequired":"1",
            "asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C"}]}"#,
        )
        .expect("offer");
        offers::remember(&store, TENANT, SESSION, "e", &offer, 0);
        let first = (0..offers::ENTRIES)
            .find(|s| !read(&store, &offer_slot_key(*s)).unwrap_or_default().is_empty())
            .expect("the offer landed in a slot");
        [first, first + 1, first + 2, first + 3]
    })
}

/// A call as `describe_call` would make it.
fn call(price: u64) -> Call {
    Call {
        endpoint: "api.example/x".into(),
        policy: 0,
        price,
        priced: true,
        tool: None,
        charge_on: pag0::core::settings::ChargeOn::Success,
        endpoint_label: "api.example".into(),
        metric_endpoint: "other".into(),
        x402: false,
        meter: None,
        min_price: None,
        payment: None,
    }
}

/// Runs the ledger, cache, offers and report API over a store holding `bytes` at the
/// key `which` picks. Errors are fine; panics are not.
fn planted(which: u8, bytes: &[u8]) {
    let cfg = config();
    let store = MemoryStore::new();
    store.set_now_micros(1_000_000);
    let home = sessions::probe_slots(SESSION, cfg.sessions.max_sessions)
        .next()
        .unwrap_or(0);
    let put = |key: &str, value: &[u8]| {
        let _ = store.set(key, value, 0);
    };
    match which % 8 {
        0 => put(&session_slot_key(TENANT, home), bytes),
        1 => {
            put(
                &session_slot_key(TENANT, home),
                &BudgetRecord::new(SESSION, 1).encode(),
            );
            put(&report_slot_key(TENANT, home), bytes);
        }
        2 => put(&tenant_windows_key(TENANT), bytes),
        3 => put(&vm_registry_key(), bytes),
        4 => put(&flush_epoch_key(), bytes),
        5 => {
            for slot in 0..cfg.cache.as_ref().map_or(0, |c| c.entries) {
                put(&cache::slot_key(slot), bytes);
            }
        }
        6 => {
            for slot in offer_slots() {
                put(&offer_slot_key(slot), bytes);
            }
        }
        _ => {
            // Every session slot a session may probe, so claims walk corrupt records.
            for slot in sessions::probe_slots(SESSION, cfg.sessions.max_sessions) {
                put(&session_slot_key(TENANT, slot), bytes);
            }
        }
    }
    let now_ms = 1_000_000;
    let caller = Caller {
        tenant: 0,
        session: SESSION.into(),
        agent: "a-1".into(),
        parent: None,
    };
    let mut local = LocalLedger::new();
    let _ = sessions::lookup(&store, TENANT, SESSION, &cfg.sessions);
    for (price, outcome) in [
        (1000, Outcome::commit(1000)),
        (2000, Outcome::release()),
        (0, Outcome::release()),
    ] {
        if let Ok(admission) = ledger::admit(cfg, &store, &mut local, &caller, &call(price), now_ms)
        {
            let _ = ledger::settle(cfg, &store, &mut local, &admission.ticket, &outcome, now_ms);
        }
    }
    let _ = ledger::current_view(cfg, &store, &caller, &call(5), now_ms / 1000);
    let _ = ledger::dry_run(cfg, &store, &caller, &call(5), now_ms / 1000);
    let _ = local.flush(cfg, &store, now_ms);
    let _ = local.request_flush(cfg, &store, now_ms);
    let _ = local.tick(cfg, &store, now_ms + 60_000);
    let _ = local.flushed(cfg, &store, 1, now_ms);
    // A second VM finds the first one dead and recovers what it held.
    let mut other = LocalLedger::new();
    for step in 1..4u64 {
        let _ = other.tick(cfg, &store, now_ms + step * 120_000);
    }
    for route in [
        AdminRoute::Sessions,
        AdminRoute::Budget(SESSION.into()),
        AdminRoute::Report(SESSION.into()),
        AdminRoute::Kill(SESSION.into()),
        AdminRoute::Resume(SESSION.into()),
    ] {
        let _ = admin::handle(cfg, &store, Access::Admin, &route, None, now_ms / 1000);
    }
    if let Some(cache_cfg) = &cfg.cache {
        let key = "k";
        if let Ok(cache::Found::Claimed(slot)) =
            cache::find_or_claim(&store, cache_cfg, key, now_ms)
        {
            let _ = cache::poll(&store, slot, key, now_ms);
            let entry = Entry {
                key: key.into(),
                state: cache::EntryState::Filled,
                stored_ms: now_ms,
                ttl_secs: 1,
                status: 200,
                cost: 1,
                content_type: String::new(),
                content_encoding: String::new(),
                body: Vec::new(),
            };
            let _ = cache::fill(&store, slot, &entry);
            let _ = cache::abandon(&store, slot, key);
        }
    }
    let of = offers::OfferOf {
        tenant: TENANT,
        session: SESSION,
        endpoint: "e",
    };
    let _ = offers::asset_for(
        &store,
        of,
        "base-sepolia",
        "0x209693bc6afc0c5328ba36faf03c514ef312287c",
        1,
        now_ms,
    );
    if let Ok(offer) = x402::parse_required_body(
        br#"{"x402Version":1,"accepts":[{"scheme":"exact","network":"base","maxAmountRequired":"5",
        "asset":"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C"}]}"#,
    ) {
        offers::remember(&store, TENANT, SESSION, "e", &offer, now_ms);
    }
}

/// The operations a VM applies to a record it read: none may panic, whatever the
/// record holds (amounts near the top, owners naming agents that do not exist).
fn operations(data: &[u8]) {
    if let Ok(mut r) = BudgetRecord::decode(data) {
        let _ = r.kill_refusal(Some(1000), Some(900_000), 1);
        let _ = r.agent_totals("a-1");
        let _ = r.held_by(0);
        let _ = r.try_reserve(&Charge {
            owner: 0,
            budget_agent: Some("a-1"),
            agent_limit: Some(u64::MAX),
            price: 7,
            session_limit: Some(u64::MAX),
            kill_ppm: Some(1_000_000),
            max_agents: 254,
        });
        r.settle(&Release {
            owner: 0,
            budget_agent: Some("a-1"),
            reserved: 7,
            count: 1,
            cost: 9,
        });
        if let Some(o) = r.owners.first().copied() {
            let agent = r.agents.get(usize::from(o.agent)).map(|a| a.id.clone());
            r.settle(&Release {
                owner: o.vm,
                budget_agent: agent.as_deref(),
                reserved: o.amount,
                count: o.count,
                cost: o.amount,
            });
            let _ = r.recover(o.vm);
        }
        let _ = r.is_claimable(u64::MAX, 1);
        let _ = r.claim_rank();
        let _ = BudgetRecord::decode(&r.encode()).expect("an operated record still decodes");
    }
    if let Ok(mut w) = WindowsRecord::decode(data) {
        w.roll(u64::MAX / 2);
        let _ = w.try_reserve(0, 7, Some(u64::MAX), Some(u64::MAX));
        w.settle(0, 7, 1, 9);
        if let Some(o) = w.owners.first().copied() {
            w.settle(o.vm, o.amount, o.count, o.amount);
            let _ = w.recover(o.vm);
        }
        let _ = WindowsRecord::decode(&w.encode()).expect("operated windows still decode");
    }
    if let Ok(r) = ReportRecord::decode(data) {
        let mut merged = r.clone();
        merged.merge(&r, 64, u64::MAX);
        let mut total = ReportRecord::new(&r.session_id);
        total.merge(&r, 3, 0);
        total.record_recovered(u64::MAX, u32::MAX);
        let _ = ReportRecord::decode(&merged.encode()).expect("a merged report still decodes");
    }
}

fuzz_target!(|data: &[u8]| {
    decoders(data);
    operations(data);
    // Inputs whose first byte is below 16 are also planted in the store (running the
    // ledger over them costs a hundred times the decoding).
    if let Some((which, rest)) = data.split_first() {
        if *which < 16 {
            planted(*which, rest);
        }
    }
});
