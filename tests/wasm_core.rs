//! The plain-Rust core, run in wasm32-unknown-unknown under Node by
//! wasm-bindgen-test (`scripts/wasm-test.sh`, `make test-wasm`). `usize` is 32 bits
//! here, as in the proxy-wasm filter, so these tests catch truncation, overflow and
//! wasm-only faults (clock, threads, hashing seeds) that the native tests cannot.
//!
//! Time is always passed in as a value: `SystemTime::now()` panics on this target. The
//! ledger's entry points (`admit`, `settle`, a VM's flush and tick, the VM registry)
//! take milliseconds; records, views and reports take seconds.
#![cfg(target_arch = "wasm32")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use wasm_bindgen_test::*;

use pag0::core::admin::{read_session, report_json, SessionRecords};
use pag0::core::alerts::{Alert, AlertKind};
use pag0::core::amount::{parse_amount, reaches, threshold_ppm, AmountError};
use pag0::core::cache::{cache_key, Entry, EntryState, KeyParts};
use pag0::core::call::{Caller, HeaderValue, RouteSettings};
use pag0::core::compile::{compile_json, sha256_hex, Config, SessionLimits};
use pag0::core::endpoint::{endpoint, EndpointError};
use pag0::core::errors::{Details, ErrorCode, Scope};
use pag0::core::firewall::{describe_call, identify, should_commit};
use pag0::core::glob::Glob;
use pag0::core::headers::{decimal, BudgetView, ScopeState};
use pag0::core::ledger::budget::{
    BudgetAgent, BudgetRecord, Charge, Owner, Release, MAX_BUDGET_AGENTS, NO_AGENT,
};
use pag0::core::ledger::local::LocalLedger;
use pag0::core::ledger::owners::{self, Recovery, Registry, VmState, MAX_VMS};
use pag0::core::ledger::report::{CallStats, ReportRecord, Stop, Tokens};
use pag0::core::ledger::sessions::{self, probe_slots, PROBE};
use pag0::core::ledger::windows::{WindowCounter, WindowOwner, WindowsRecord};
use pag0::core::ledger::{
    admit, current_view, record_refusal, settle, Admission, Outcome, Rejection, Ticket,
};
use pag0::core::payments::{AssetRule, PaymentRules};
use pag0::core::policy::ChargeOn;
use pag0::core::store::{
    read, report_slot_key, session_slot_key, tenant_windows_key, update, vm_registry_key,
    with_lock, MemoryStore, SharedStore, Step, CREATE_CAS,
};
use pag0::core::window::{day_index, month_index};

/// 2026-11-30 12:00:00 UTC: past 2^31 seconds would be 2038; past 2^32 is 2106.
const NOON: u64 = 1_796_040_000;
const DEMO_KEY: &str = "demo-key";
const TAVILY: (&[u8], &[u8]) = (b"api.tavily.com", b"/search");

/// Unix seconds as the milliseconds the ledger's entry points take (past 2^32 ms: an
/// hour and a quarter after the epoch).
fn ms(secs: u64) -> u64 {
    secs * 1000
}

// --- platform -----------------------------------------------------------------------

#[wasm_bindgen_test]
fn the_target_really_is_32_bit_wasm() {
    assert_eq!(usize::BITS, 32);
    assert_eq!(std::mem::size_of::<usize>(), 4);
    assert_eq!(std::mem::size_of::<u64>(), 8);
    assert!(ms(NOON) > u64::from(u32::MAX));
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

// --- ledger records -------------------------------------------------------------------

fn ralph_charge(price: u64) -> Charge<'static> {
    Charge {
        owner: 1,
        budget_agent: Some("ralph-1"),
        agent_limit: Some(3_000_000),
        price,
        session_limit: Some(5_000_000),
        kill_ppm: Some(900_000),
        max_agents: 64,
    }
}

/// Ends one of VM 1's reservations for ralph-1: gives back `price`, charges `cost`.
fn ralph_release(price: u64, cost: u64) -> Release<'static> {
    Release {
        owner: 1,
        budget_agent: Some("ralph-1"),
        reserved: price,
        count: 1,
        cost,
    }
}

// Records gain fields over time; `..Default::default()` keeps these literals compiling
// when they do, and is "needless" only while every field is named.
#[allow(clippy::needless_update)]
#[wasm_bindgen_test]
fn budget_records_round_trip_with_64_bit_values() {
    let record = BudgetRecord {
        session_id: "s".repeat(128),
        last_active: u64::MAX,
        spent: u64::MAX - 1,
        killed: true,
        alerts: 0xff,
        agents: vec![
            BudgetAgent {
                id: "ralph-1".into(),
                spent: u64::MAX,
                alerts: 3,
                ..BudgetAgent::default()
            },
            BudgetAgent {
                id: "a".repeat(128),
                spent: u64::from(u32::MAX) + 1,
                ..BudgetAgent::default()
            },
        ],
        // What is reserved is the owner entries: the highest VM number, the "no agent
        // budget" index, counts and amounts past 32 bits.
        owners: vec![
            Owner {
                vm: u16::MAX,
                agent: 0,
                amount: 1 << 40,
                count: u32::MAX,
            },
            Owner {
                vm: 0,
                agent: NO_AGENT,
                amount: (1 << 32) + 7,
                count: 1,
            },
            Owner {
                vm: 1,
                agent: 1,
                amount: u64::MAX,
                count: 1 << 31,
            },
        ],
        ..BudgetRecord::default()
    };
    // The session's reserved is the sum of its owner entries, saturating, never wrapping.
    assert_eq!(record.reserved(), u64::MAX);
    assert_eq!(record.agent_reserved("ralph-1"), 1 << 40);
    assert_eq!(record.agent_totals(&"a".repeat(128)), (1 << 32, u64::MAX));
    assert_eq!(record.held_by(u16::MAX), (1 << 40, u32::MAX));
    let bytes = record.encode();
    let decoded = BudgetRecord::decode(&bytes).unwrap();
    assert_eq!(decoded, record);
    assert_eq!(decoded.agent("ralph-1").unwrap().spent, u64::MAX);
    assert!(BudgetRecord::encoded_id_is(&bytes, &"s".repeat(128)));
    assert!(!BudgetRecord::encoded_id_is(&bytes, &"s".repeat(127)));
    for cut in 0..bytes.len() {
        // Empty bytes are a free slot; every other prefix is malformed.
        let decoded = BudgetRecord::decode(&bytes[..cut]);
        if cut == 0 {
            assert_eq!(decoded.unwrap(), BudgetRecord::default());
        } else {
            assert!(decoded.is_err(), "prefix of {cut} bytes decoded");
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(BudgetRecord::decode(&longer).is_err());
    assert!(BudgetRecord::decode(&[0xee]).is_err());
    assert!(BudgetRecord::decode(&[9, 9, 9]).is_err());
}

/// Was "a session with a thousand agents round trips". A budget record now counts its
/// agent budgets and owner entries in one byte each and bounds them
/// ([`MAX_BUDGET_AGENTS`] budgets, 255 owner entries), refusing past the bound rather
/// than writing a list that would not decode to itself: so the record is filled to
/// both bounds, with 64-bit amounts, and must still round-trip.
#[wasm_bindgen_test]
fn a_session_with_the_most_agent_budgets_and_owner_entries_round_trips() {
    let charge = |owner: u16, agent: Option<&'static str>, price: u64| Charge {
        owner,
        budget_agent: agent,
        agent_limit: Some(u64::MAX),
        price,
        session_limit: None,
        kill_ppm: None,
        // The configuration's largest maxAgentsPerSession: the record's bound wins.
        max_agents: 1024,
    };
    let ids: Vec<&'static str> = (0..MAX_BUDGET_AGENTS)
        .map(|i| &*Box::leak(format!("agent-{i}").into_boxed_str()))
        .collect();
    let mut s = BudgetRecord::new("big", NOON);
    let mut reserved = 0u64;
    for (i, id) in ids.iter().enumerate() {
        let price = (i as u64 + 1) << 33;
        s.try_reserve(&charge(3, Some(id), price)).unwrap();
        reserved += price;
    }
    assert_eq!(s.agents.len(), MAX_BUDGET_AGENTS);
    assert_eq!(s.owners.len(), MAX_BUDGET_AGENTS);
    let more = s.try_reserve(&charge(3, Some("agent-x"), 1)).unwrap_err();
    assert_eq!(more.code, ErrorCode::CapacityExceeded);
    // A call with no agent budget takes the last owner entry…
    s.try_reserve(&charge(3, None, 1 << 33)).unwrap();
    reserved += 1 << 33;
    assert_eq!(s.owners.len(), 255);
    assert_eq!(s.owners[254].agent, NO_AGENT);
    // …and another VM finds none left.
    let full = s.try_reserve(&charge(4, Some(ids[0]), 1)).unwrap_err();
    assert_eq!(full.code, ErrorCode::CapacityExceeded);
    for (i, a) in s.agents.iter_mut().enumerate() {
        a.spent = (i as u64) << 40;
    }
    assert_eq!(s.reserved(), reserved);
    assert_eq!(s.held_by(3), (reserved, 255));
    assert_eq!(s.agent_reserved(ids[253]), 254 << 33);
    let decoded = BudgetRecord::decode(&s.encode()).unwrap();
    assert_eq!(decoded.agents.len(), MAX_BUDGET_AGENTS);
    assert_eq!(decoded.owners.len(), 255);
    assert_eq!(decoded, s);
}

// Records gain fields over time; `..Default::default()` keeps these literals compiling
// when they do, and is "needless" only while every field is named.
#[allow(clippy::needless_update)]
#[wasm_bindgen_test]
fn windows_records_round_trip_with_64_bit_values() {
    let record = WindowsRecord {
        day: WindowCounter {
            index: u32::MAX,
            spent: u64::MAX,
            alerts: 7,
            ..WindowCounter::default()
        },
        month: WindowCounter {
            index: month_index(NOON),
            spent: (1 << 32) + 1,
            ..WindowCounter::default()
        },
        owners: vec![
            WindowOwner {
                vm: u16::MAX,
                amount: 1 << 63,
                count: u32::MAX,
            },
            WindowOwner {
                vm: 0,
                amount: u64::MAX - 5,
                count: 1,
            },
        ],
        ..WindowsRecord::default()
    };
    assert_eq!(record.reserved(), u64::MAX);
    let bytes = record.encode();
    assert_eq!(WindowsRecord::decode(&bytes).unwrap(), record);
    for cut in 1..bytes.len() {
        assert!(
            WindowsRecord::decode(&bytes[..cut]).is_err(),
            "prefix {cut}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(WindowsRecord::decode(&longer).is_err());
    assert_eq!(
        WindowsRecord::decode(&[]).unwrap(),
        WindowsRecord::default()
    );
}

#[wasm_bindgen_test]
fn ralph_gets_exactly_twenty_reservations_then_its_agent_budget_refuses() {
    let mut s = BudgetRecord::new("ralph-session", NOON);
    let mut ok = 0u32;
    let refusal = loop {
        match s.try_reserve(&ralph_charge(150_000)) {
            Ok(()) => {
                assert_eq!(s.reserved(), 150_000);
                assert_eq!(s.held_by(1), (150_000, 1));
                s.settle(&ralph_release(150_000, 150_000));
                assert!(s.owners.is_empty(), "a settled reservation leaves no entry");
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
    assert_eq!(s.agent_totals("ralph-1"), (3_000_000, 0));
    assert_eq!((s.spent, s.reserved()), (3_000_000, 0));
    let json: serde_json::Value = serde_json::from_str(&refusal.to_json()).unwrap();
    assert_eq!(json["error"]["code"], "AGENT_BUDGET_EXCEEDED");
    assert_eq!(json["error"]["details"]["limit"], "3000000");
    // The record as stored after all that still decodes to itself.
    assert_eq!(BudgetRecord::decode(&s.encode()).unwrap(), s);
}

#[wasm_bindgen_test]
fn reservations_in_flight_count_and_release_gives_them_back() {
    let mut s = BudgetRecord::new("s", NOON);
    for _ in 0..20 {
        s.try_reserve(&ralph_charge(150_000)).unwrap();
    }
    // Twenty reservations of one VM for one agent are one owner entry.
    assert_eq!(s.owners.len(), 1);
    assert_eq!(s.held_by(1), (3_000_000, 20));
    let refusal = s.try_reserve(&ralph_charge(150_000)).unwrap_err();
    assert_eq!(refusal.code, ErrorCode::AgentBudgetExceeded);
    match &refusal.details {
        Details::Budget(b) => assert_eq!((b.spent, b.reserved), (0, 3_000_000)),
        other => panic!("unexpected details {other:?}"),
    }
    for _ in 0..20 {
        s.settle(&ralph_release(150_000, 0));
    }
    assert_eq!((s.spent, s.reserved()), (0, 0));
    assert!(s.owners.is_empty());
    // Giving back more than is held (amount or count) never underflows.
    s.settle(&ralph_release(150_000, 0));
    assert_eq!((s.spent, s.reserved()), (0, 0));
    s.try_reserve(&ralph_charge(150_000)).unwrap();
    s.settle(&Release {
        reserved: u64::MAX,
        count: u32::MAX,
        ..ralph_release(0, 0)
    });
    assert_eq!((s.spent, s.reserved()), (0, 0));
    assert!(s.owners.is_empty());
    // Changed on purpose: the old record refused to charge a commit that held no
    // reservation. A release now charges its cost as given (a metered call costs what
    // it used, more or less than it reserved); the guard against settling twice is the
    // VM's ticket table (see `a_dead_vms_reservations_are_charged_by_another_vm`).
    s.settle(&ralph_release(0, 37_123));
    assert_eq!(s.agent_totals("ralph-1"), (37_123, 0));
}

#[wasm_bindgen_test]
fn the_kill_switch_refuses_manually_and_at_its_threshold() {
    let mut s = BudgetRecord::new("s", NOON);
    s.killed = true;
    let r = s.try_reserve(&ralph_charge(1)).unwrap_err();
    assert_eq!(r.code, ErrorCode::KillSwitchActive);
    assert!(
        r.to_json().contains("\"reason\":\"manual\""),
        "{}",
        r.to_json()
    );
    let s = BudgetRecord::decode(&s.encode()).unwrap();
    assert!(s.killed, "the kill switch survives encoding");

    let mut s = BudgetRecord::new("s", NOON);
    let c = Charge {
        agent_limit: None,
        ..ralph_charge(150_000)
    };
    let mut ok = 0;
    while s.try_reserve(&c).is_ok() {
        s.settle(&ralph_release(150_000, 150_000));
        ok += 1;
    }
    // 30 × 150000 = 4.5M = 90% of 5M.
    assert_eq!(ok, 30);
    let r = s.try_reserve(&c).unwrap_err();
    assert_eq!(r.code, ErrorCode::KillSwitchActive);
    assert!(r.to_json().contains("\"reason\":\"threshold\""));
    // Reservations in flight count toward the threshold as much as spend does.
    let mut s = BudgetRecord::new("s", NOON);
    for _ in 0..30 {
        s.try_reserve(&c).unwrap();
    }
    assert_eq!((s.spent, s.reserved()), (0, 4_500_000));
    assert_eq!(
        s.try_reserve(&c).unwrap_err().code,
        ErrorCode::KillSwitchActive
    );
}

#[wasm_bindgen_test]
fn budgets_past_32_bits_are_enforced_exactly() {
    let big = 10_000_000_000_000u64; // $10M in USDC units, far past u32
    let mut s = BudgetRecord::new("s", 0);
    let c = Charge {
        owner: 2,
        budget_agent: Some("a"),
        agent_limit: None,
        price: big / 4,
        session_limit: Some(big),
        kill_ppm: None,
        max_agents: 1,
    };
    for _ in 0..4 {
        s.try_reserve(&c).unwrap();
    }
    assert_eq!(s.reserved(), big);
    assert_eq!(s.held_by(2), (big, 4));
    assert_eq!(
        s.try_reserve(&Charge { price: 1, ..c }).unwrap_err().code,
        ErrorCode::SessionBudgetExceeded
    );
    // Near u64::MAX: refused, never wrapped.
    let mut s = BudgetRecord::new("s", 0);
    s.spent = u64::MAX - 1;
    let near = Charge {
        session_limit: Some(u64::MAX),
        price: 5,
        ..c
    };
    assert_eq!(
        s.try_reserve(&near).unwrap_err().code,
        ErrorCode::SessionBudgetExceeded
    );
    assert_eq!(s.reserved(), 0);
    assert!(s.owners.is_empty());
    // Without a limit, owner entries of two VMs that would sum past u64 are refused
    // too: the sum of the entries never wraps.
    let mut s = BudgetRecord::new("s", 0);
    let half = Charge {
        session_limit: None,
        price: 1 << 63,
        ..c
    };
    s.try_reserve(&half).unwrap();
    let r = s.try_reserve(&Charge { owner: 9, ..half }).unwrap_err();
    assert_eq!(r.code, ErrorCode::InternalError);
    assert_eq!(s.reserved(), 1 << 63);
    assert_eq!(s.owners.len(), 1);
}

#[wasm_bindgen_test]
fn budget_records_keep_reservations_by_owner_and_recover_a_dead_vms() {
    let charge = |owner: u16, agent: Option<&'static str>, price: u64| Charge {
        owner,
        budget_agent: agent,
        agent_limit: Some(20_000_000_000),
        price,
        session_limit: Some(50_000_000_000),
        kill_ppm: None,
        max_agents: 8,
    };
    let mut s = BudgetRecord::new("s", NOON);
    // VM 1: two calls of ralph-1 at $5000 each (past 32 bits). VM 700: one of ralph-1
    // and one with no agent budget.
    s.try_reserve(&charge(1, Some("ralph-1"), 5_000_000_000))
        .unwrap();
    s.try_reserve(&charge(1, Some("ralph-1"), 5_000_000_000))
        .unwrap();
    s.try_reserve(&charge(700, Some("ralph-1"), 3_000_000_000))
        .unwrap();
    s.try_reserve(&charge(700, None, 1_000_000_000)).unwrap();
    assert_eq!(
        s.owners,
        vec![
            Owner {
                vm: 1,
                agent: 0,
                amount: 10_000_000_000,
                count: 2
            },
            Owner {
                vm: 700,
                agent: 0,
                amount: 3_000_000_000,
                count: 1
            },
            Owner {
                vm: 700,
                agent: NO_AGENT,
                amount: 1_000_000_000,
                count: 1
            },
        ]
    );
    assert_eq!(s.reserved(), 14_000_000_000);
    assert_eq!(s.agent_totals("ralph-1"), (0, 13_000_000_000));
    assert_eq!(s.held_by(700), (4_000_000_000, 2));
    // The agent budget counts every VM's reservations: 20G - 13G leaves 7G.
    let r = s
        .try_reserve(&charge(2, Some("ralph-1"), 7_000_000_001))
        .unwrap_err();
    assert_eq!(r.code, ErrorCode::AgentBudgetExceeded);
    // VM 700 dies: what it held is charged (the rule for unknown outcomes), the
    // agent's part to the agent; VM 1's stays in flight.
    assert_eq!(s.recover(700), (4_000_000_000, 2));
    assert_eq!((s.spent, s.reserved()), (4_000_000_000, 10_000_000_000));
    assert_eq!(s.agent_totals("ralph-1"), (3_000_000_000, 10_000_000_000));
    assert_eq!(s.held_by(700), (0, 0));
    // Recovering it again charges nothing more.
    assert_eq!(s.recover(700), (0, 0));
    assert_eq!(s.spent, 4_000_000_000);
    assert_eq!(BudgetRecord::decode(&s.encode()).unwrap(), s);
    // A slot holding reservations is never given away, however long it is idle.
    assert!(!s.is_claimable(u64::MAX, 60));
    // VM 1 commits one call and releases the other.
    s.settle(&Release {
        owner: 1,
        budget_agent: Some("ralph-1"),
        reserved: 5_000_000_000,
        count: 1,
        cost: 5_000_000_000,
    });
    s.settle(&Release {
        owner: 1,
        budget_agent: Some("ralph-1"),
        reserved: 5_000_000_000,
        count: 1,
        cost: 0,
    });
    assert_eq!((s.spent, s.reserved()), (9_000_000_000, 0));
    assert_eq!(s.agent_totals("ralph-1"), (8_000_000_000, 0));
    assert!(s.owners.is_empty());
    assert!(s.is_claimable(NOON + 60, 60));
    assert!(!s.is_claimable(NOON + 59, 60));
}

#[wasm_bindgen_test]
fn windows_reserve_settle_and_roll() {
    let mut t = WindowsRecord::default();
    t.roll(NOON);
    assert_eq!(t.day.index, day_index(NOON));
    assert_eq!(t.month.index, month_index(NOON));
    t.try_reserve(1, 100, Some(1000), Some(5000)).unwrap();
    t.settle(1, 100, 1, 100);
    t.try_reserve(1, 50, Some(1000), Some(5000)).unwrap();
    // Reservations are one list of owner entries, counted in both windows.
    assert_eq!((t.day.spent, t.month.spent, t.reserved()), (100, 100, 50));
    let r = t.try_reserve(1, 851, Some(1000), Some(5000)).unwrap_err();
    assert_eq!(r.code, ErrorCode::DailyBudgetExceeded);
    match &r.details {
        Details::Budget(b) => assert_eq!((b.limit, b.spent, b.reserved), (1000, 100, 50)),
        other => panic!("unexpected details {other:?}"),
    }
    t.roll(NOON + 86_400); // 2026-12-01: next day and next month
    assert_eq!((t.day.spent, t.reserved()), (0, 50));
    assert_eq!(t.month.spent, 0);
    t.settle(1, 50, 1, 50);
    assert_eq!((t.day.spent, t.month.spent, t.reserved()), (50, 50, 0));
    assert!(t.owners.is_empty());
    t.roll(NOON); // a clock a moment behind never rolls back
    assert_eq!(t.day.spent, 50);
    // Windows far in the future (past 2106, when seconds leave u32) still roll.
    let far = u64::from(u32::MAX) * 4;
    t.roll(far);
    assert_eq!(t.day.index, day_index(far));
    assert_eq!(t.day.spent, 0);
    assert_eq!(WindowsRecord::decode(&t.encode()).unwrap(), t);
}

#[wasm_bindgen_test]
fn windows_records_keep_reservations_by_owner_and_recover_a_dead_vms() {
    let mut w = WindowsRecord::default();
    w.roll(NOON);
    let day = Some(u64::MAX);
    w.try_reserve(1, 1 << 40, day, None).unwrap();
    w.try_reserve(u16::MAX, 1 << 33, day, None).unwrap();
    w.try_reserve(u16::MAX, 1 << 33, day, None).unwrap();
    assert_eq!(
        w.owners,
        vec![
            WindowOwner {
                vm: 1,
                amount: 1 << 40,
                count: 1
            },
            WindowOwner {
                vm: u16::MAX,
                amount: 1 << 34,
                count: 2
            },
        ]
    );
    assert_eq!(w.reserved(), (1 << 40) + (1 << 34));
    // The dead VM's reservations are charged in both windows, once.
    assert_eq!(w.recover(u16::MAX), (1 << 34, 2));
    assert_eq!((w.day.spent, w.month.spent), (1 << 34, 1 << 34));
    assert_eq!(w.reserved(), 1 << 40);
    assert_eq!(w.recover(u16::MAX), (0, 0));
    assert_eq!(w.day.spent, 1 << 34);
    let bytes = w.encode();
    assert_eq!(WindowsRecord::decode(&bytes).unwrap(), w);
    for cut in 1..bytes.len() {
        assert!(
            WindowsRecord::decode(&bytes[..cut]).is_err(),
            "prefix {cut}"
        );
    }
    w.settle(1, 1 << 40, 1, 0);
    assert!(w.owners.is_empty());
    // Entries of different VMs never sum past u64, with or without a limit.
    w.try_reserve(2, u64::MAX, None, None).unwrap();
    assert_eq!(
        w.try_reserve(3, 1, None, None).unwrap_err().code,
        ErrorCode::InternalError
    );
    assert_eq!(
        w.try_reserve(3, 1, Some(u64::MAX), None).unwrap_err().code,
        ErrorCode::DailyBudgetExceeded
    );
    assert_eq!(w.owners.len(), 1);
    // At most 255 VMs hold reservations in one tenant's windows.
    let mut w = WindowsRecord::default();
    for vm in 0..255u16 {
        w.try_reserve(vm, 1, None, None).unwrap();
    }
    assert_eq!(
        w.try_reserve(255, 1, None, None).unwrap_err().code,
        ErrorCode::CapacityExceeded
    );
    w.try_reserve(254, 1, None, None).unwrap();
    assert_eq!(w.reserved(), 256);
    assert_eq!(WindowsRecord::decode(&w.encode()).unwrap(), w);
}

fn llm_call<'a>(agent: &'a str, cost: u64) -> CallStats<'a> {
    CallStats {
        agent,
        parent: Some("main"),
        tool: Some("llm"),
        endpoint: "api.anthropic.com/v1/messages",
        model: Some("claude-sonnet-4-5"),
        cost,
        cache_hit: false,
        savings: 0,
        tokens: Some(Tokens {
            input: u64::from(u32::MAX) + 1,
            output: 7,
            cache_write: 1 << 40,
            cache_read: u64::MAX,
        }),
        unconfirmed: false,
        unmetered: false,
        at_ms: ms(NOON) - 1,
    }
}

#[wasm_bindgen_test]
fn report_records_merge_what_each_vm_counted_and_round_trip() {
    // Ralph's twenty calls, counted on two VMs, at $1000 each (past 32 bits in total),
    // then two refusals on different VMs flushed at different times.
    let mut vm1 = ReportRecord::new("s");
    let mut vm2 = ReportRecord::new("s");
    for i in 0..20 {
        let vm = if i % 2 == 0 { &mut vm1 } else { &mut vm2 };
        vm.record_call(&llm_call("ralph-1", 1_000_000_000), 8);
    }
    vm2.record_refusal("ralph-1", None, "AGENT_BUDGET_EXCEEDED", ms(NOON), 8);
    let mut vm1_later = ReportRecord::new("s");
    vm1_later.record_refusal("ralph-1", None, "AGENT_BUDGET_EXCEEDED", ms(NOON + 1), 8);
    let mut stored = ReportRecord::new("s");
    stored.merge(&vm1, 8, NOON);
    stored.merge(&vm2, 8, NOON);
    stored.merge(&vm1_later, 8, NOON + 1);
    let ralph = stored.agent("ralph-1").unwrap();
    assert_eq!(ralph.cost, 20_000_000_000);
    assert_eq!((ralph.requests, ralph.ok_calls), (22, 20));
    assert_eq!(ralph.parent.as_deref(), Some("main"));
    // How ralph stopped: the first refusal after its last call, its calls before it,
    // and every refusal since (stoppedBy.calls and stoppedBy.refusedSince).
    assert_eq!(
        ralph.stop,
        Some(Stop {
            code: "AGENT_BUDGET_EXCEEDED".into(),
            at: ms(NOON),
            calls: 20,
            refused_since: 2
        })
    );
    // Tokens add up past 32 bits and saturate at u64::MAX.
    assert_eq!(stored.tokens.input, 20 * (u64::from(u32::MAX) + 1));
    assert_eq!(stored.tokens.cache_write, 20 << 40);
    assert_eq!(stored.tokens.cache_read, u64::MAX);
    assert_eq!((stored.requests, stored.cost), (22, 20_000_000_000));
    assert_eq!(
        stored.refusals,
        vec![("AGENT_BUDGET_EXCEEDED".to_string(), 2)]
    );
    assert_eq!(stored.models[0].name, "claude-sonnet-4-5");
    assert_eq!(stored.models[0].requests, 20);
    assert_eq!(stored.recent_refusals.len(), 2);
    assert_eq!(stored.timeline.last().unwrap().cost, 20_000_000_000);
    // A dead VM's reservations: charged and counted as unconfirmed.
    let mut recovered = ReportRecord::new("s");
    recovered.record_recovered(5_000_000_000, 3);
    stored.merge(&recovered, 8, NOON + 2);
    assert_eq!(
        (stored.unconfirmed, stored.unconfirmed_amount, stored.cost),
        (3, 5_000_000_000, 25_000_000_000)
    );
    let bytes = stored.encode();
    assert_eq!(ReportRecord::decode(&bytes).unwrap(), stored);
    assert!(ReportRecord::encoded_id_is(&bytes, "s"));
    assert!(!ReportRecord::encoded_id_is(&bytes, "t"));
    for cut in 1..bytes.len() {
        assert!(ReportRecord::decode(&bytes[..cut]).is_err(), "prefix {cut}");
    }
    assert_eq!(ReportRecord::decode(&[]).unwrap(), ReportRecord::default());
    // The report renders stoppedBy from it.
    let cfg = reference_config();
    let records = SessionRecords {
        budget: BudgetRecord::new("s", NOON),
        report: stored.clone(),
    };
    let report = report_json(&cfg, "demo", &records, &WindowsRecord::default());
    let stop = &report["byAgent"][0]["stoppedBy"];
    assert_eq!(stop["code"], "AGENT_BUDGET_EXCEEDED");
    assert_eq!(
        (stop["calls"].as_u64(), stop["at"].as_u64()),
        (Some(20), Some(NOON))
    );
    assert_eq!(stop["refusedSince"], 2);
    // A call that goes through after a refusal means the agent did not stop.
    let mut later = ReportRecord::new("s");
    later.record_call(
        &CallStats {
            at_ms: ms(NOON + 3),
            ..llm_call("ralph-1", 1)
        },
        8,
    );
    stored.merge(&later, 8, NOON + 3);
    assert_eq!(stored.agent("ralph-1").unwrap().stop, None);
    assert_eq!(stored.agent("ralph-1").unwrap().ok_calls, 21);
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
    assert_eq!(
        reference.agent_budget("ralph-7"),
        Some(("ralph-7", 3_000_000))
    );
    assert_eq!(reference.agent_budget("executor-1"), None);
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
    assert_eq!(cfg.identity.session_headers, ["x-pag0-session"]);
    assert_eq!(cfg.identity.agent_headers, vec!["x-pag0-agent".to_string()]);
    assert_eq!(cfg.identity.parent_agent_header, None);
    assert!(!cfg.track_windows);
    // The ledger's timings, in milliseconds past 32 bits of nothing: plain u64s.
    assert_eq!(cfg.ledger.owner_lease_ms, 15_000);
    assert_eq!(cfg.ledger.reservation_timeout_ms, 3_600_000);
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
            r#"{"sessions": {"maxAgentsPerSession": 1025}, "policies": {"p": {}}}"#,
            "sessions.maxAgentsPerSession",
        ),
        (
            r#"{"tenants": [{"id": "t", "apiKeySha256": "abc"}], "policies": {"p": {}}}"#,
            "tenants[0].apiKeySha256",
        ),
        (
            r#"{"policies": {"p": {}}, "endpoints": [{"pattern": "a.com/x?y", "price": "1"}]}"#,
            "endpoints[0].pattern",
        ),
        (
            r#"{"policies": {"p": {"x402": {"assets": [{"address": "0x6b175474e89094c44da98b954eedeac495271d0f", "decimals": 37}]}}}}"#,
            "policies.p.x402.assets[0].decimals",
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

fn session_charge(price: u64) -> Charge<'static> {
    Charge {
        owner: 1,
        budget_agent: Some("a-1"),
        agent_limit: None,
        price,
        session_limit: Some(1_000_000),
        kill_ppm: None,
        max_agents: 8,
    }
}

/// Ends one of VM 1's reservations for a-1 (commit: charged its price; else released).
fn done(price: u64, commit: bool) -> Release<'static> {
    Release {
        owner: 1,
        budget_agent: Some("a-1"),
        reserved: price,
        count: 1,
        cost: if commit { price } else { 0 },
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
fn store_keys_are_versioned_and_numbered_past_32_bits() {
    assert_eq!(session_slot_key("demo", 0), "pag0/v3/s/demo/0");
    assert_eq!(
        session_slot_key("demo", u32::MAX),
        "pag0/v3/s/demo/4294967295"
    );
    assert_eq!(report_slot_key("demo", 1_048_575), "pag0/v3/r/demo/1048575");
    assert_eq!(tenant_windows_key("demo"), "pag0/v3/w/demo");
    assert_eq!(vm_registry_key(), "pag0/v3/vms");
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
    assert_eq!((rec.spent, rec.reserved()), (0, 400_000));
    assert!(store.get(&session_slot_key("t", slot)).unwrap().is_some());
    let settled = sessions::settle(
        &store,
        "t",
        "s1",
        Some(slot),
        &l,
        NOON + 1,
        &done(400_000, true),
    )
    .unwrap()
    .unwrap();
    assert_eq!((settled.spent, settled.reserved()), (400_000, 0));
    assert_eq!(settled.last_active, NOON + 1);
    let (slot2, rec) =
        sessions::reserve(&store, "t", "s1", &l, NOON + 2, &session_charge(400_000)).unwrap();
    assert_eq!(slot, slot2);
    assert_eq!((rec.spent, rec.reserved()), (400_000, 400_000));
    let refused =
        sessions::reserve(&store, "t", "s1", &l, NOON + 3, &session_charge(400_000)).unwrap_err();
    assert_eq!(refused.code, ErrorCode::SessionBudgetExceeded);
    let (found_slot, found) = sessions::lookup(&store, "t", "s1", &l).unwrap().unwrap();
    assert_eq!(found_slot, slot);
    assert_eq!((found.spent, found.reserved()), (400_000, 400_000));
    assert_eq!(found.agent_totals("a-1"), (400_000, 400_000));
    assert_eq!(found.held_by(1), (400_000, 1));
    // Settling a session that has no slot changes nothing, found by probing or by a
    // slot number that holds another session.
    assert!(
        sessions::settle(&store, "t", "nobody", None, &l, NOON, &done(1, true))
            .unwrap()
            .is_none()
    );
    assert!(
        sessions::settle(&store, "t", "nobody", Some(slot), &l, NOON, &done(1, true))
            .unwrap()
            .is_none()
    );
    let (_, unchanged) = sessions::lookup(&store, "t", "s1", &l).unwrap().unwrap();
    assert_eq!(unchanged, found);
    // Another tenant's session of the same id is another record.
    assert!(sessions::lookup(&store, "t2", "s1", &l).unwrap().is_none());
    // The manual kill switch is set on a session that exists, never creates one.
    let (killed, was) = sessions::set_killed(&store, "t", "s1", &l, NOON + 4, true, false)
        .unwrap()
        .unwrap();
    assert!(killed.killed && !was);
    assert!(
        sessions::set_killed(&store, "t", "ghost", &l, NOON, true, false)
            .unwrap()
            .is_none()
    );
    assert!(sessions::lookup(&store, "t", "ghost", &l)
        .unwrap()
        .is_none());
}

#[wasm_bindgen_test]
fn a_full_table_fails_closed_and_idle_slots_are_reused() {
    let store = MemoryStore::new();
    let l = limits(4);
    for i in 0..4 {
        let id = format!("s{i}");
        let (slot, _) = sessions::reserve(&store, "t", &id, &l, NOON, &session_charge(1)).unwrap();
        sessions::settle(&store, "t", &id, Some(slot), &l, NOON, &done(1, true)).unwrap();
    }
    let full =
        sessions::reserve(&store, "t", "s-new", &l, NOON + 30, &session_charge(1)).unwrap_err();
    assert_eq!(full.code, ErrorCode::CapacityExceeded);
    assert_eq!(full.status(), 503);
    let (_, rec) =
        sessions::reserve(&store, "t", "s-new", &l, NOON + 61, &session_charge(1)).unwrap();
    assert_eq!((rec.spent, rec.reserved()), (0, 1));
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
            Ok((slot, _)) => {
                sessions::settle(&store, "t", &id, Some(slot), &l, now, &done(1, true)).unwrap();
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

// --- the VM registry -----------------------------------------------------------------

#[wasm_bindgen_test]
fn the_vm_registry_registers_beats_and_hands_out_recoveries() {
    let store = MemoryStore::new();
    // Milliseconds since the epoch are past 32 bits.
    let t0 = ms(NOON);
    let lease = 15_000;
    let a = owners::register(&store, t0).unwrap();
    let b = owners::register(&store, t0).unwrap();
    assert_eq!((a.slot, b.slot), (0, 1));
    assert_ne!(a.nonce, b.nonce);
    assert_eq!(owners::live_count(&store).unwrap(), 2);
    // b beats; a goes silent. Not dead until its heartbeat is older than the lease.
    assert!(owners::heartbeat(&store, b, t0 + 10_000, 0).unwrap());
    assert_eq!(
        owners::take_recovery(&store, b, t0 + lease, lease).unwrap(),
        None
    );
    let r = owners::take_recovery(&store, b, t0 + lease + 1, lease)
        .unwrap()
        .unwrap();
    assert_eq!(
        r,
        Recovery {
            slot: a.slot,
            cursor: 0
        }
    );
    assert_eq!(owners::live_count(&store).unwrap(), 1);
    // Nobody else takes it while it makes progress; a wakes to find its slot gone.
    assert_eq!(
        owners::take_recovery(&store, b, t0 + lease + 2, lease).unwrap(),
        None
    );
    assert!(!owners::heartbeat(&store, a, t0 + lease + 3, 0).unwrap());
    // b walks past 2^32 keys' worth of cursor, then stops making progress: after a
    // lease, another VM takes over where it stopped.
    let far = u64::from(u32::MAX) + 2;
    owners::recovery_progress(&store, Recovery { cursor: far, ..r }, t0 + 20_000, false).unwrap();
    let c = owners::register(&store, t0 + 20_000).unwrap();
    assert_eq!(c.slot, 2);
    assert!(owners::heartbeat(&store, c, t0 + 40_000, 0).unwrap());
    let taken = owners::take_recovery(&store, c, t0 + 40_000, lease)
        .unwrap()
        .unwrap();
    assert_eq!(
        taken,
        Recovery {
            slot: a.slot,
            cursor: far
        }
    );
    owners::recovery_progress(&store, taken, t0 + 40_001, true).unwrap();
    let reg = Registry::decode(&read(&store, &vm_registry_key()).unwrap()).unwrap();
    assert_eq!(reg.entries[usize::from(a.slot)].state, VmState::Free);
    // b went silent too: it is the next recovery.
    assert_eq!(
        owners::take_recovery(&store, c, t0 + 40_002, lease)
            .unwrap()
            .map(|r| r.slot),
        Some(b.slot)
    );
    // A freed slot is reused, with a new nonce.
    let d = owners::register(&store, t0 + 40_003).unwrap();
    assert_eq!(d.slot, a.slot);
    assert!(d.nonce > c.nonce);
    // Flush acknowledgements: live VMs only, and not one silent past the lease.
    assert!(owners::heartbeat(&store, c, t0 + 40_004, u64::MAX).unwrap());
    assert!(!owners::all_acked(&store, u64::MAX, t0 + 40_004, lease).unwrap());
    assert!(owners::all_acked(&store, u64::MAX, t0 + 40_004 + lease + 1, lease).unwrap());
    // The registry as stored round-trips, and every prefix of it is refused.
    let bytes = read(&store, &vm_registry_key()).unwrap();
    let reg = Registry::decode(&bytes).unwrap();
    assert_eq!(reg.entries.len(), 3);
    assert_eq!(reg.entries[usize::from(c.slot)].acked_epoch, u64::MAX);
    assert_eq!(Registry::decode(&reg.encode()).unwrap(), reg);
    for cut in 1..bytes.len() {
        assert!(Registry::decode(&bytes[..cut]).is_err(), "prefix {cut}");
    }
}

#[wasm_bindgen_test]
fn the_vm_registry_is_bounded() {
    let store = MemoryStore::new();
    let t0 = ms(NOON);
    for i in 0..MAX_VMS {
        let id = owners::register(&store, t0).unwrap();
        assert_eq!(usize::from(id.slot), i);
    }
    let full = owners::register(&store, t0).unwrap_err();
    assert_eq!(full.code, ErrorCode::CapacityExceeded);
    assert_eq!(owners::live_count(&store).unwrap(), MAX_VMS);
    let reg = Registry::decode(&read(&store, &vm_registry_key()).unwrap()).unwrap();
    assert_eq!(reg.entries.len(), MAX_VMS);
    assert_eq!(reg.next_nonce, MAX_VMS as u64);
}

// --- firewall and ledger, end to end ----------------------------------------------

// The admit → settle hand-over, in one place: these two helpers are the only lines
// that know how an admitted call is held and what settling returns.

/// The reservation an admitted priced call holds; `None` for a free call.
fn held(admission: &Admission) -> Option<Ticket> {
    (admission.ticket.price > 0).then(|| admission.ticket.clone())
}

/// Ends an admitted call at `now` (seconds): charged its price (commit) or released.
/// Returns the budgets when settling changed them: a commit of exactly what was
/// reserved waits for the VM's next flush and returns `None` (the admission's view
/// holds, since a commit does not change spent + reserved); a release is settled at
/// once and returns the budgets as they stand.
fn finish(
    cfg: &Config,
    store: &MemoryStore,
    local: &mut LocalLedger,
    held: &Ticket,
    commit: bool,
    now: u64,
) -> Option<BudgetView> {
    let outcome = if commit {
        Outcome::commit(held.price)
    } else {
        Outcome::release()
    };
    settle(cfg, store, local, held, &outcome, ms(now))
        .unwrap()
        .view
}

/// The refusal of an admission that must be refused.
fn refused(admitted: Result<Admission, Box<Rejection>>) -> Rejection {
    match admitted {
        Ok(a) => panic!("admitted: {:?}", a.ticket),
        Err(r) => *r,
    }
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

fn identify_with(cfg: &Config, pairs: &[(&str, &str)]) -> Result<Caller, ErrorCode> {
    identify(
        cfg,
        &headers(pairs),
        &mut |key: &[u8]| cfg.tenant_for_key(key),
        None,
    )
    .map_err(|r| r.code)
}

fn caller(cfg: &Config, session: &str, agent: &str) -> Caller {
    let pairs = [
        ("x-pag0-api-key", DEMO_KEY),
        ("x-pag0-session", session),
        ("x-pag0-agent", agent),
    ];
    identify_with(cfg, &pairs).unwrap()
}

fn kinds(alerts: &[Alert]) -> Vec<(AlertKind, Scope)> {
    alerts
        .iter()
        .map(|a| (a.alert.kind, a.alert.scope))
        .collect()
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
            agent: "ralph-1".into(),
            parent: None,
        }
    );
    let no_agent = identify_with(
        &cfg,
        &[("x-pag0-api-key", DEMO_KEY), ("x-pag0-session", "s")],
    )
    .unwrap();
    assert_eq!(no_agent.agent, "main");
    // The host memoizes key → tenant; identify asks once, with the key's bytes.
    let mut asked = Vec::new();
    let pairs = [("x-pag0-api-key", DEMO_KEY), ("x-pag0-session", "s")];
    let c = identify(
        &cfg,
        &headers(&pairs),
        &mut |key: &[u8]| {
            asked.push(key.to_vec());
            cfg.tenant_for_key(key)
        },
        None,
    )
    .unwrap();
    assert_eq!(c.tenant, 0);
    assert_eq!(asked, vec![DEMO_KEY.as_bytes().to_vec()]);
    // A route's default session stands in for a missing header, never for a bad one.
    let route_session = |pairs: &[(&str, &str)]| {
        identify(
            &cfg,
            &headers(pairs),
            &mut |key: &[u8]| cfg.tenant_for_key(key),
            Some("route-session"),
        )
    };
    assert_eq!(
        route_session(&[("x-pag0-api-key", DEMO_KEY)])
            .unwrap()
            .session,
        "route-session"
    );
    assert_eq!(
        route_session(&[("x-pag0-api-key", DEMO_KEY), ("x-pag0-session", "mine")])
            .unwrap()
            .session,
        "mine"
    );
    assert_eq!(
        route_session(&[("x-pag0-api-key", DEMO_KEY), ("x-pag0-session", "a b")])
            .unwrap_err()
            .code,
        ErrorCode::InvalidRequest
    );

    let code = |pairs: &[(&str, &str)]| identify_with(&cfg, pairs).unwrap_err();
    assert_eq!(code(&[("x-pag0-session", "s")]), ErrorCode::Unauthorized);
    assert_eq!(
        code(&[("x-pag0-api-key", "nope"), ("x-pag0-session", "s")]),
        ErrorCode::Unauthorized
    );
    assert_eq!(
        code(&[
            ("x-pag0-api-key", DEMO_KEY),
            ("x-pag0-api-key", DEMO_KEY),
            ("x-pag0-session", "s")
        ]),
        ErrorCode::InvalidRequest
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
    let longest = "x".repeat(128);
    assert_eq!(caller(&cfg, &longest, "a").session, longest);
    // Non-UTF-8 header bytes are a 400, not a panic.
    let raw = |name: &str| match name {
        "x-pag0-api-key" => HeaderValue::One(DEMO_KEY.as_bytes().to_vec()),
        "x-pag0-session" => HeaderValue::One(vec![0xff, 0xfe]),
        _ => HeaderValue::Missing,
    };
    assert_eq!(
        identify(&cfg, &raw, &mut |key: &[u8]| cfg.tenant_for_key(key), None)
            .unwrap_err()
            .code,
        ErrorCode::InvalidRequest
    );

    // Several agent headers (first present wins) and a parent agent header.
    let cfg = compile_json(
        br#"{"identity": {"agentHeader": ["x-pag0-agent", "x-claude-code-agent-id"],
                          "parentAgentHeader": "x-claude-code-parent-agent-id"},
             "policies": {"p": {}}}"#,
    )
    .unwrap();
    let c = identify_with(
        &cfg,
        &[
            ("x-pag0-session", "s"),
            ("x-claude-code-agent-id", "sub-1"),
            ("x-claude-code-parent-agent-id", "main-1"),
        ],
    )
    .unwrap();
    assert_eq!(
        (c.agent.as_str(), c.parent.as_deref()),
        ("sub-1", Some("main-1"))
    );
    let c = identify_with(
        &cfg,
        &[
            ("x-pag0-session", "s"),
            ("x-pag0-agent", "first"),
            ("x-claude-code-agent-id", "second"),
        ],
    )
    .unwrap();
    assert_eq!((c.agent.as_str(), c.parent), ("first", None));
    assert_eq!(
        identify_with(
            &cfg,
            &[
                ("x-pag0-session", "s"),
                ("x-claude-code-parent-agent-id", "p"),
                ("x-claude-code-parent-agent-id", "q"),
            ]
        )
        .unwrap_err(),
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
    assert!(call.priced);
    assert_eq!(call.tool.as_deref(), Some("search"));
    assert_eq!(call.policy, cfg.default_policy);
    assert_eq!(call.charge_on, ChargeOn::Success);
    // Reports and metrics group it under the rule's pattern.
    assert_eq!(call.endpoint_label, "api.tavily.com/*");
    assert_eq!(call.metric_endpoint, "api.tavily.com/*");
    assert!(!call.x402 && call.meter.is_none() && call.payment.is_none());

    let route = RouteSettings {
        policy: Some("big".into()),
        price: Some("18446744073709551615".into()),
        tool: Some("llm".into()),
        endpoint: Some("api.other.com/v1".into()),
        ..RouteSettings::default()
    };
    let call = describe_call(&cfg, b"api.other.com", b"/v1", &route).unwrap();
    assert_eq!(call.price, u64::MAX);
    assert_eq!(call.tool.as_deref(), Some("llm"));
    assert_eq!(cfg.policies[call.policy].name, "big");
    assert_eq!(call.charge_on, ChargeOn::Always);
    assert_eq!(call.endpoint_label, "api.other.com/v1");

    let free = describe_call(&cfg, b"api.other.com", b"/", &RouteSettings::default()).unwrap();
    assert_eq!((free.price, free.tool), (0, None));
    assert!(!free.priced);
    assert_eq!(
        (free.endpoint_label.as_str(), free.metric_endpoint.as_str()),
        ("api.other.com", "other")
    );

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
    // A misspelt key fails closed: it must not make a route free.
    let e = bad(RouteSettings {
        unknown: Some("prcie".into()),
        ..RouteSettings::default()
    });
    assert_eq!(e.code, ErrorCode::ConfigError);
    assert!(e.message.contains("prcie"), "{}", e.message);
    let e = bad(RouteSettings {
        cache_ttl: Some("18446744073709551616".into()),
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
    let mut local = LocalLedger::new();
    let mut alerts = Vec::new();
    let who = caller(&cfg, "ralph-session", "ralph-1");
    let call = describe_call(&cfg, TAVILY.0, TAVILY.1, &RouteSettings::default()).unwrap();
    for i in 1..=20u64 {
        let now = NOON + i;
        let admitted = admit(&cfg, &store, &mut local, &who, &call, ms(now)).unwrap();
        alerts.extend(admitted.alerts.iter().cloned());
        let ticket = held(&admitted).unwrap();
        assert_eq!(ticket.price, 150_000);
        assert!(ticket.windows);
        assert!(ticket.slot.is_some_and(|s| s < 64));
        assert_eq!(ticket.budget_agent.as_deref(), Some("ralph-1"));
        assert!(should_commit(call.charge_on, Some(200)));
        // Adapted: the budgets the agent is told are the admission's (they count this
        // call's reservation), since an exact commit waits for the VM's next flush and
        // settling it returns no new view. spent + reserved is the same either way, so
        // the numbers are those the old test read after settling.
        assert_eq!(finish(&cfg, &store, &mut local, &ticket, true, now), None);
        let view = &admitted.view;
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
    let rejection = refused(admit(&cfg, &store, &mut local, &who, &call, ms(NOON + 21)));
    alerts.extend(rejection.alerts.iter().cloned());
    let refused_at_21 = rejection.refused;
    assert_eq!(refused_at_21.refusal.code, ErrorCode::AgentBudgetExceeded);
    assert_eq!(refused_at_21.refusal.status(), 403);
    // The 20th call's deferred commit rode along with the refused reservation's
    // compare-and-swap: the refusal's details come from the record it wrote, whose
    // reserved (the sum of its owner entries) is 0.
    match &refused_at_21.refusal.details {
        Details::Budget(b) => {
            assert_eq!(b.scope, Scope::Agent);
            assert_eq!((b.limit, b.spent, b.reserved), (3_000_000, 3_000_000, 0));
        }
        other => panic!("unexpected details {other:?}"),
    }
    assert_eq!(
        refused_at_21.view.remaining_header(),
        "session=2000000, agent=0, daily=17000000"
    );
    assert_eq!(
        refused_at_21.view.alert_header().as_deref(),
        Some("agent=1.0")
    );
    record_refusal(
        &mut local,
        &cfg,
        &who,
        &refused_at_21.refusal,
        ms(NOON + 21),
    );
    // The refused call reserved nothing anywhere. Adapted: the day still shows the
    // 20th call as reserved until this VM flushes its deferred window commit; after
    // the flush nothing is reserved in any scope and the day has it all as spent.
    let (view, killed) = current_view(&cfg, &store, &who, &call, NOON + 22).unwrap();
    assert!(killed.is_none());
    for s in &view.scopes {
        let expected = if s.scope == Scope::Daily { 150_000 } else { 0 };
        assert_eq!(s.reserved, expected, "{:?}", s.scope);
    }
    alerts.extend(local.flush(&cfg, &store, ms(NOON + 22)));
    assert!(!local.dirty());
    let (view, _) = current_view(&cfg, &store, &who, &call, NOON + 22).unwrap();
    assert!(view.scopes.iter().all(|s| s.reserved == 0));
    assert_eq!(
        view.remaining_header(),
        "session=2000000, agent=0, daily=17000000"
    );
    let windows =
        WindowsRecord::decode(&store.get(&tenant_windows_key("demo")).unwrap().unwrap().0).unwrap();
    assert_eq!((windows.day.spent, windows.reserved()), (3_000_000, 0));
    assert!(windows.owners.is_empty());
    // Each alert went out once: ralph's 70%, then its budget exhausted.
    assert_eq!(
        kinds(&alerts),
        vec![
            (AlertKind::ThresholdCrossed, Scope::Agent),
            (AlertKind::BudgetExhausted, Scope::Agent)
        ]
    );
    // Ralph tries again; the report says how it stopped, over two flushes.
    let again = refused(admit(&cfg, &store, &mut local, &who, &call, ms(NOON + 23)));
    assert!(again.alerts.is_empty(), "an alert goes out once");
    record_refusal(
        &mut local,
        &cfg,
        &who,
        &again.refused.refusal,
        ms(NOON + 23),
    );
    local.flush(&cfg, &store, ms(NOON + 23));
    let records = read_session(&cfg, &store, "demo", "ralph-session")
        .unwrap()
        .unwrap();
    let ralph = records.report.agent("ralph-1").unwrap();
    assert_eq!(
        (ralph.cost, ralph.ok_calls, ralph.requests),
        (3_000_000, 20, 22)
    );
    assert_eq!(
        ralph.stop,
        Some(Stop {
            code: "AGENT_BUDGET_EXCEEDED".into(),
            at: ms(NOON + 21),
            calls: 20,
            refused_since: 2,
        })
    );
    assert_eq!(records.budget.spent, 3_000_000);

    // Another agent of the same session goes on, up to the session's kill switch.
    let exec = caller(&cfg, "ralph-session", "executor-1");
    let mut alerts = Vec::new();
    let mut ok = 0;
    let last = loop {
        match admit(&cfg, &store, &mut local, &exec, &call, ms(NOON + 30)) {
            Ok(a) => {
                alerts.extend(a.alerts.iter().cloned());
                assert_eq!(a.ticket.budget_agent, None);
                finish(
                    &cfg,
                    &store,
                    &mut local,
                    &held(&a).unwrap(),
                    true,
                    NOON + 30,
                );
                ok += 1;
            }
            Err(r) => break *r,
        }
    };
    // 3.0M spent; the kill switch trips once 4.5M (0.9 × 5M) is used: 10 more calls.
    assert_eq!(ok, 10);
    assert_eq!(last.refused.refusal.code, ErrorCode::KillSwitchActive);
    alerts.extend(last.alerts);
    // The session's 70% (3.5M) went out while the executor spent; the kill switch once.
    assert_eq!(
        kinds(&alerts),
        vec![
            (AlertKind::ThresholdCrossed, Scope::Session),
            (AlertKind::KillSwitch, Scope::Session)
        ]
    );
}

#[wasm_bindgen_test]
fn a_failed_upstream_releases_the_reservation() {
    let cfg = reference_config();
    let store = MemoryStore::new();
    let mut local = LocalLedger::new();
    let who = caller(&cfg, "s-fail", "ralph-2");
    let call = describe_call(&cfg, TAVILY.0, TAVILY.1, &RouteSettings::default()).unwrap();
    let admitted = admit(&cfg, &store, &mut local, &who, &call, ms(NOON)).unwrap();
    assert_eq!(local.open_count(), 1);
    let (during, _) = current_view(&cfg, &store, &who, &call, NOON).unwrap();
    assert!(during.scopes.iter().all(|s| s.reserved == 150_000));
    assert!(!should_commit(call.charge_on, Some(502)));
    assert!(!should_commit(call.charge_on, None));
    let commit = should_commit(call.charge_on, Some(502));
    let view = finish(
        &cfg,
        &store,
        &mut local,
        &held(&admitted).unwrap(),
        commit,
        NOON,
    )
    .expect("a release is settled at once");
    assert!(view.scopes.iter().all(|s| s.spent == 0 && s.reserved == 0));
    assert_eq!(
        view.remaining_header(),
        "session=5000000, agent=3000000, daily=20000000"
    );
    assert_eq!(local.open_count(), 0);
    // Settling the same ticket again changes nothing.
    let again = settle(
        &cfg,
        &store,
        &mut local,
        &admitted.ticket,
        &Outcome::commit(150_000),
        ms(NOON),
    )
    .unwrap();
    assert!(again.view.is_none() && again.alerts.is_empty());
    local.flush(&cfg, &store, ms(NOON + 1));
    let (after, _) = current_view(&cfg, &store, &who, &call, NOON + 1).unwrap();
    assert!(after.scopes.iter().all(|s| s.spent == 0 && s.reserved == 0));
    let (_, record) = sessions::lookup(&store, "demo", "s-fail", &cfg.sessions)
        .unwrap()
        .unwrap();
    assert!(record.owners.is_empty());
}

#[wasm_bindgen_test]
fn policy_refusals_and_free_calls() {
    let cfg = reference_config();
    let store = MemoryStore::new();
    let mut local = LocalLedger::new();
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
    let r = refused(admit(&cfg, &store, &mut local, &who, &blocked, ms(NOON)));
    assert_eq!(r.refused.refusal.code, ErrorCode::EndpointBlocked);
    let tavily = describe_call(&cfg, TAVILY.0, TAVILY.1, &RouteSettings::default()).unwrap();
    let r = refused(admit(&cfg, &store, &mut local, &who, &tavily, ms(NOON)));
    assert_eq!(r.refused.refusal.code, ErrorCode::PerRequestLimitExceeded);
    assert!(r.refused.refusal.to_json().contains("\"scope\":\"agent\""));
    let free = describe_call(&cfg, b"api.free.dev", b"/x", &RouteSettings::default()).unwrap();
    let a = admit(&cfg, &store, &mut local, &who, &free, ms(NOON)).unwrap();
    assert!(held(&a).is_none());
    assert_eq!(a.ticket.slot, None);
    assert_eq!(
        a.view.remaining_header(),
        "session=5000000, agent=500000, daily=20000000"
    );
    assert!(finish(&cfg, &store, &mut local, &a.ticket, true, NOON).is_none());
    // Nothing above claimed a session slot, nor registered this VM as an owner of
    // reservations.
    assert!(sessions::lookup(&store, "demo", "s-pol", &cfg.sessions)
        .unwrap()
        .is_none());
    assert!(local.registered().is_none());
    assert!(store.get(&vm_registry_key()).unwrap().is_none());
}

#[wasm_bindgen_test]
fn the_daily_window_refuses_across_sessions_and_gives_the_session_part_back() {
    let json = r#"{"policies": {"p": {"sessionBudget": "1000", "dailyBudget": "1500"}},
                   "endpoints": [{"pattern": "*", "price": "400"}]}"#;
    let cfg = compile_json(json.as_bytes()).unwrap();
    let store = MemoryStore::new();
    let mut local = LocalLedger::new();
    let call = describe_call(&cfg, b"h", b"/", &RouteSettings::default()).unwrap();
    let mut spent = 0;
    for s in ["s1", "s2", "s3"] {
        let who = identify_with(&cfg, &[("x-pag0-session", s)]).unwrap();
        loop {
            match admit(&cfg, &store, &mut local, &who, &call, ms(NOON)) {
                Ok(a) => {
                    finish(&cfg, &store, &mut local, &held(&a).unwrap(), true, NOON);
                    spent += 400;
                }
                Err(r) => {
                    let code = r.refused.refusal.code;
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
    let who = identify_with(&cfg, &[("x-pag0-session", "s3")]).unwrap();
    let r = refused(admit(&cfg, &store, &mut local, &who, &call, ms(NOON)));
    assert_eq!(r.refused.refusal.code, ErrorCode::DailyBudgetExceeded);
    match &r.refused.refusal.details {
        Details::Budget(b) => assert_eq!((b.limit, b.spent, b.reserved), (1500, 1200, 0)),
        other => panic!("unexpected details {other:?}"),
    }
    let (_, s3) = sessions::lookup(&store, "default", "s3", &cfg.sessions)
        .unwrap()
        .unwrap();
    assert_eq!(s3.reserved(), 0, "the session part was given back");
    assert!(s3.owners.is_empty());
    // The next UTC day starts afresh.
    let a = admit(&cfg, &store, &mut local, &who, &call, ms(NOON + 86_400)).unwrap();
    assert!(held(&a).is_some());
}

#[wasm_bindgen_test]
fn deferred_commits_are_written_by_the_vms_flush() {
    let json = r#"{"policies": {"p": {"sessionBudget": "18446744073709551615",
                                      "dailyBudget": "18446744073709551615",
                                      "agents": {"a-*": {"agentBudget": "18446744073709551615"}}}}}"#;
    let cfg = compile_json(json.as_bytes()).unwrap();
    let store = MemoryStore::new();
    let mut local = LocalLedger::new();
    let who = identify_with(&cfg, &[("x-pag0-session", "s"), ("x-pag0-agent", "a-1")]).unwrap();
    let priced = |price: u64| {
        let route = RouteSettings {
            price: Some(price.to_string()),
            ..RouteSettings::default()
        };
        describe_call(&cfg, b"api.example.com", b"/x", &route).unwrap()
    };
    // Prices about and past 32 bits; each is committed exactly (deferred).
    let prices = [1u64, u64::from(u32::MAX), 1 << 32, 1 << 40, 12_345];
    let total: u64 = prices.iter().sum();
    for (i, price) in prices.iter().enumerate() {
        let now = NOON + i as u64;
        let a = admit(&cfg, &store, &mut local, &who, &priced(*price), ms(now)).unwrap();
        assert!(finish(&cfg, &store, &mut local, &a.ticket, true, now).is_none());
    }
    assert!(local.dirty());
    // Written so far: every commit but the last rode along with the next reservation;
    // the last is still reserved in the records. spent + reserved is already exact.
    let call = priced(1);
    let (view, _) = current_view(&cfg, &store, &who, &call, NOON + 5).unwrap();
    for s in &view.scopes {
        assert_eq!(
            (s.spent, s.reserved),
            (total - 12_345, 12_345),
            "{:?}",
            s.scope
        );
    }
    // A call settled for less than it reserved (a metered call) is settled at once.
    let a = admit(
        &cfg,
        &store,
        &mut local,
        &who,
        &priced(1 << 33),
        ms(NOON + 6),
    )
    .unwrap();
    let metered = Outcome {
        cost: 1 << 32,
        ..Outcome::default()
    };
    let settled = settle(&cfg, &store, &mut local, &a.ticket, &metered, ms(NOON + 6)).unwrap();
    let view = settled.view.expect("settled at once");
    let total = total + (1 << 32);
    for s in &view.scopes {
        assert_eq!(s.spent + s.reserved, total, "{:?}", s.scope);
    }
    // The flush writes the rest: spent is the sum of the commits, nothing reserved.
    local.flush(&cfg, &store, ms(NOON + 7));
    assert!(!local.dirty());
    let (view, _) = current_view(&cfg, &store, &who, &call, NOON + 7).unwrap();
    assert_eq!(view.scopes.len(), 3);
    for s in &view.scopes {
        assert_eq!((s.spent, s.reserved), (total, 0), "{:?}", s.scope);
    }
    let (slot, record) = sessions::lookup(&store, "default", "s", &cfg.sessions)
        .unwrap()
        .unwrap();
    assert_eq!((record.spent, record.reserved()), (total, 0));
    assert_eq!(record.agent_totals("a-1"), (total, 0));
    assert!(record.owners.is_empty());
    let windows =
        WindowsRecord::decode(&read(&store, &tenant_windows_key("default")).unwrap()).unwrap();
    assert_eq!((windows.day.spent, windows.month.spent), (total, total));
    assert!(windows.owners.is_empty());
    // The report's counts came with the same flush.
    let report =
        ReportRecord::decode(&read(&store, &report_slot_key("default", slot)).unwrap()).unwrap();
    assert_eq!((report.requests, report.cost), (6, total));
    assert_eq!(report.agent("a-1").unwrap().ok_calls, 6);
    // A second flush has nothing to write and changes nothing.
    local.flush(&cfg, &store, ms(NOON + 8));
    let (_, again) = sessions::lookup(&store, "default", "s", &cfg.sessions)
        .unwrap()
        .unwrap();
    assert_eq!(again.spent, total);
}

#[wasm_bindgen_test]
fn a_dead_vms_reservations_are_charged_by_another_vm() {
    let cfg = reference_config();
    let store = MemoryStore::new();
    let lease = cfg.ledger.owner_lease_ms;
    let t0 = ms(NOON);
    let mut vm_a = LocalLedger::new();
    let mut vm_b = LocalLedger::new();
    vm_b.tick(&cfg, &store, t0);
    let who = caller(&cfg, "s-dead", "ralph-1");
    let call = describe_call(&cfg, TAVILY.0, TAVILY.1, &RouteSettings::default()).unwrap();
    let first = admit(&cfg, &store, &mut vm_a, &who, &call, t0).unwrap();
    let second = admit(&cfg, &store, &mut vm_a, &who, &call, t0).unwrap();
    let (a, b) = (vm_a.registered().unwrap(), vm_b.registered().unwrap());
    assert_ne!(a.slot, b.slot);
    assert_eq!(first.ticket.owner, a.slot);
    // VM A goes silent with both calls in flight. Within the lease nothing happens…
    assert_eq!(vm_b.tick(&cfg, &store, t0 + lease).recovered, 0);
    let (_, record) = sessions::lookup(&store, "demo", "s-dead", &cfg.sessions)
        .unwrap()
        .unwrap();
    assert_eq!(record.held_by(a.slot), (300_000, 2));
    // …after it, B settles them as unknown outcomes: charged, counted as unconfirmed
    // (a VM looks for dead ones once a second, with its heartbeat).
    let out = vm_b.tick(&cfg, &store, t0 + lease + 1001);
    assert_eq!(out.recovered, 2);
    let records = read_session(&cfg, &store, "demo", "s-dead")
        .unwrap()
        .unwrap();
    assert_eq!(
        (records.budget.spent, records.budget.reserved()),
        (300_000, 0)
    );
    assert_eq!(records.budget.agent_totals("ralph-1"), (300_000, 0));
    assert!(records.budget.owners.is_empty());
    assert_eq!(
        (
            records.report.unconfirmed,
            records.report.unconfirmed_amount
        ),
        (2, 300_000)
    );
    let windows =
        WindowsRecord::decode(&read(&store, &tenant_windows_key("demo")).unwrap()).unwrap();
    assert_eq!((windows.day.spent, windows.reserved()), (300_000, 0));
    // The walk is done: A's slot is free again, B the only live VM.
    assert_eq!(owners::live_count(&store).unwrap(), 1);
    // A wakes: its tick finds its slot gone, forgets what it held and registers anew;
    // its calls then end without charging anything a second time.
    vm_a.tick(&cfg, &store, t0 + lease + 2);
    assert_eq!(vm_a.open_count(), 0);
    assert!(vm_a.registered().is_some_and(|id| id.nonce != a.nonce));
    for admitted in [&first, &second] {
        let settled = settle(
            &cfg,
            &store,
            &mut vm_a,
            &admitted.ticket,
            &Outcome::commit(150_000),
            t0 + lease + 3,
        )
        .unwrap();
        assert!(settled.view.is_none());
    }
    vm_a.flush(&cfg, &store, t0 + lease + 4);
    let (_, record) = sessions::lookup(&store, "demo", "s-dead", &cfg.sessions)
        .unwrap()
        .unwrap();
    assert_eq!((record.spent, record.reserved()), (300_000, 0));
    let windows =
        WindowsRecord::decode(&read(&store, &tenant_windows_key("demo")).unwrap()).unwrap();
    assert_eq!(windows.day.spent, 300_000);
}

// --- cache keys and payments -------------------------------------------------------

#[wasm_bindgen_test]
fn cache_keys_are_the_same_as_natively() {
    let alice: &[&[u8]] = &[b"Bearer alice"];
    let parts = KeyParts {
        tenant: "demo",
        namespace: "s:sess-1",
        method: "POST",
        authority: b"API.Tavily.com:443",
        endpoint: "api.tavily.com/search",
        query: b"q=1",
        content_type: b"application/json",
        accept: b"*/*",
        accept_encoding: b"gzip",
        credentials: alice,
        body: br#"{"query":"x"}"#,
    };
    // Computed independently (Python's hashlib over the same framing: u32 LE lengths):
    // the key is the same in every VM, native or wasm, so a shared entry is found.
    assert_eq!(
        cache_key(&parts),
        "demo\ns:sess-1\nPOST\napi.tavily.com:443\napi.tavily.com/search\nq=1\n\
         4f7ce94cc8fc9a7f7e22456c905e5b5791cfc5560d947ca0049452d0b1d4e4f8"
    );
    let empty = KeyParts {
        tenant: "t",
        namespace: "t",
        method: "GET",
        authority: b"h",
        endpoint: "h/",
        ..KeyParts::default()
    };
    // SHA-256 of sixteen zero bytes: four zero u32 lengths and an empty body.
    assert_eq!(
        cache_key(&empty),
        "t\nt\nGET\nh\nh/\n\n374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb"
    );
    let body = vec![0xab; 1 << 20];
    let big = KeyParts {
        method: "POST",
        body: &body,
        ..empty
    };
    assert_eq!(
        cache_key(&big),
        "t\nt\nPOST\nh\nh/\n\ncee4f60614442cf78fab72240ae68b3401d3a64d2d96f60bd935d0f73c8f8bb3"
    );
    // Everything that can change an answer changes the key; moving bytes between
    // framed parts too.
    let bob: &[&[u8]] = &[b"Bearer bob"];
    let two: &[&[u8]] = &[b"Bearer ", b"alice"];
    let k = cache_key(&parts);
    for other in [
        KeyParts {
            credentials: bob,
            ..parts
        },
        KeyParts {
            credentials: two,
            ..parts
        },
        KeyParts {
            credentials: &[],
            ..parts
        },
        KeyParts {
            accept: b"*/*gzip",
            accept_encoding: b"",
            ..parts
        },
        KeyParts {
            authority: b"api.tavily.com",
            ..parts
        },
        KeyParts {
            namespace: "s:sess-1/a:ralph-1",
            ..parts
        },
        KeyParts {
            body: br#"{"query":"y"}"#,
            ..parts
        },
    ] {
        assert_ne!(k, cache_key(&other));
    }
    // Entries carry 64-bit times and costs and round-trip.
    let entry = Entry {
        key: k.clone(),
        state: EntryState::Filled,
        stored_ms: ms(NOON),
        ttl_secs: u64::from(u32::MAX) + 1,
        status: 200,
        cost: u64::MAX,
        content_type: "application/json".into(),
        content_encoding: String::new(),
        body: vec![7; 70_000],
    };
    let bytes = entry.encode();
    assert_eq!(Entry::decode(&bytes), Some(entry.clone()));
    assert!(!entry.expired(ms(NOON) + u64::from(u32::MAX) * 1000));
    assert_eq!(Entry::decode(&bytes[..bytes.len() - 1]), None);
    let pending = Entry {
        state: EntryState::Pending {
            lease_until_ms: u64::MAX,
        },
        ..entry
    };
    assert_eq!(Entry::decode(&pending.encode()), Some(pending));
}

#[wasm_bindgen_test]
fn payments_convert_18_decimal_assets_to_budget_units_within_u64() {
    const DAI: &str = "0x6b175474e89094c44da98b954eedeac495271d0f";
    const SEPOLIA_USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
    let asset = |address: &str, decimals: u8| AssetRule {
        address: address.to_ascii_lowercase(),
        network: Some("eip155:1".into()),
        decimals,
    };
    let rules = PaymentRules {
        assets: vec![asset(DAI, 18)],
        ..PaymentRules::default()
    };
    // 18 decimals to 6: divided by 10^12, rounded up (never undercounted).
    assert_eq!(
        rules.to_budget("eip155:1", DAI, 10_000_000_000_000_000),
        Ok(10_000)
    );
    assert_eq!(rules.to_budget("eip155:1", DAI, 1), Ok(1));
    assert_eq!(rules.to_budget("eip155:1", DAI, 0), Ok(0));
    assert_eq!(rules.to_budget("eip155:1", DAI, 1_000_000_000_000), Ok(1));
    assert_eq!(rules.to_budget("eip155:1", DAI, 1_000_000_000_001), Ok(2));
    // u64::MAX of an 18-decimal token is about 18.45 of it: 18446744.07… → 18446745.
    assert_eq!(rules.to_budget("eip155:1", DAI, u64::MAX), Ok(18_446_745));
    // A v1 network name is the same chain; the address is matched case-insensitively.
    assert_eq!(
        rules.to_budget("ethereum", &DAI.to_ascii_uppercase().replace("0X", "0x"), 1),
        Ok(1)
    );
    // Another chain, or an asset the policy does not list: refused, not counted as USDC.
    assert!(rules.to_budget("eip155:8453", DAI, 1).is_err());
    let err = rules.to_budget("eip155:1", SEPOLIA_USDC, 1).unwrap_err();
    assert!(err.contains("x402.assets"), "{err}");
    // With no asset list, the built-in USDC contracts count 1:1, up to u64::MAX.
    let usdc = PaymentRules::default();
    assert_eq!(
        usdc.to_budget("base-sepolia", SEPOLIA_USDC, u64::MAX),
        Ok(u64::MAX)
    );
    assert!(usdc.to_budget("eip155:1", DAI, 1).is_err());
    // Fewer decimals than USDC multiply: exact up to u64::MAX, refused past it.
    let few = PaymentRules {
        assets: vec![asset(DAI, 2), asset(SEPOLIA_USDC, 0)],
        ..PaymentRules::default()
    };
    let max_2 = u64::MAX / 10_000;
    assert_eq!(few.to_budget("eip155:1", DAI, max_2), Ok(max_2 * 10_000));
    let err = few.to_budget("eip155:1", DAI, max_2 + 1).unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
    let max_0 = u64::MAX / 1_000_000;
    assert_eq!(
        few.to_budget("eip155:1", SEPOLIA_USDC, max_0),
        Ok(max_0 * 1_000_000)
    );
    assert!(few.to_budget("eip155:1", SEPOLIA_USDC, max_0 + 1).is_err());
    // 25 decimals: the divisor 10^19 still fits in u64.
    let tiny = PaymentRules {
        assets: vec![asset(DAI, 25)],
        ..PaymentRules::default()
    };
    assert_eq!(tiny.to_budget("eip155:1", DAI, u64::MAX), Ok(2));
    assert_eq!(tiny.to_budget("eip155:1", DAI, 1), Ok(1));

    // The same from a compiled policy, choosing the cheapest requirement of an offer.
    let cfg = compile_json(
        format!(
            r#"{{"policies": {{"p": {{"x402": {{"assets": [
                {{"address": "{DAI}", "decimals": 18, "network": "ethereum"}},
                "{SEPOLIA_USDC}"]}}}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let policy_rules = &cfg.policies[0].payments;
    assert_eq!(
        policy_rules.to_budget("eip155:1", DAI, u64::MAX),
        Ok(18_446_745)
    );
    use pag0::core::base64;
    use pag0::core::payments::choose;
    use pag0::core::x402::parse_required_header;
    let entry = |network: &str, asset: &str, amount: &str| {
        serde_json::json!({"scheme": "exact", "network": network, "amount": amount, "asset": asset,
            "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"})
    };
    let offer = parse_required_header(
        base64::encode(
            serde_json::json!({"x402Version": 2, "accepts": [
                entry("eip155:84532", SEPOLIA_USDC, "18446745"),
                entry("eip155:1", DAI, "18446744073709551615"),
                entry("eip155:84532", SEPOLIA_USDC, "18446746"),
            ]})
            .to_string()
            .as_bytes(),
        )
        .as_bytes(),
    )
    .unwrap();
    let (chosen, price) = choose(&offer, policy_rules).unwrap();
    // The DAI entry costs 18446745 in budget units, as much as the first USDC one:
    // the first of equals is kept.
    assert_eq!((chosen.amount, price), (18_446_745, 18_446_745));
    assert_eq!(chosen.network, "eip155:84532");
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
    use pag0::core::pairs::{encode, pairs};
    use pag0::core::route_meta::{decode, NOT_TEXT};
    let pairs_in: [(&[u8], &[u8]); 2] = [
        (b"price", b"20000"),
        (b"cacheTTL", &[0, 0, 0, 0, 0, 0x88, 0xd3, 0x40]),
    ];
    let mut bytes = (pairs_in.len() as u32).to_le_bytes().to_vec();
    for (k, v) in &pairs_in {
        bytes.extend((k.len() as u32).to_le_bytes());
        bytes.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in &pairs_in {
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
    let mut two = 2u32.to_le_bytes().to_vec();
    two.extend(1u32.to_le_bytes());
    two.extend(1u32.to_le_bytes());
    two.extend(u32::MAX.to_le_bytes());
    two.extend(2u32.to_le_bytes());
    two.extend(b"k\0v\0");
    assert!(pairs(&two).is_err());
    for cut in 1..bytes.len() {
        assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // The shared pairs encoding is its own inverse, and every route key round-trips
    // into its setting (an unknown one is kept, so that the call fails closed).
    let encoded = encode(&[
        ("policy", b"big"),
        ("price", b"18446744073709551615"),
        ("tool", b"llm"),
        ("chargeOn", b"always"),
        ("endpoint", b"api.x.com/v1"),
        ("x402", b"true"),
        ("meter", b"anthropic"),
        ("defaultSession", b"stock-client"),
        ("prcie", b"1"),
    ]);
    assert_eq!(pairs(&encoded).unwrap().len(), 9);
    let s = decode(&encoded).unwrap();
    assert_eq!(
        s,
        RouteSettings {
            policy: Some("big".into()),
            price: Some("18446744073709551615".into()),
            tool: Some("llm".into()),
            charge_on: Some("always".into()),
            endpoint: Some("api.x.com/v1".into()),
            cache_ttl: None,
            x402: Some("true".into()),
            meter: Some("anthropic".into()),
            default_session: Some("stock-client".into()),
            unknown: Some("prcie".into()),
        }
    );
}
