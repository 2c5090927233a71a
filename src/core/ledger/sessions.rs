//! Each tenant has a fixed table of session slots in shared data, so that an endless
//! stream of session ids uses a bounded set of keys (shared data has no delete).
//!
//! A session hashes to a home slot and may live in any of the [`PROBE`] slots from
//! there. Finding it is lock-free; claiming a slot for a new session happens under the
//! tenant's claim lock, so one session can never hold two slots. A slot is reused when
//! its session holds nothing in flight and either never spent anything or has been
//! idle for `idleTimeoutSeconds` (slots never used go first, then sessions that never
//! spent, then the longest idle). When all the slots a new session can use are held
//! by live sessions, the call is refused with 503 `CAPACITY_EXCEEDED`: the firewall
//! fails closed.

use crate::core::errors::{ErrorCode, Refusal};
use crate::core::ledger::budget::{BudgetRecord, Charge, Release};
use crate::core::settings::SessionLimits;
use crate::core::store::{
    claim_lock_key, read, session_slot_key, update, with_lock, SharedStore, Step,
};

/// Slots a session may occupy, starting from its home slot.
pub const PROBE: u32 = 16;

/// FNV-1a: stable across workers and restarts (no per-process seed).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The slots a session may live in, home slot first.
pub fn probe_slots(session_id: &str, max_sessions: u32) -> impl Iterator<Item = u32> {
    let max = max_sessions.max(1);
    let home = (fnv1a(&[session_id.as_bytes()]) % u64::from(max)) as u32;
    (0..PROBE.min(max)).map(move |i| (home + i) % max)
}

fn decode(bytes: &[u8]) -> Result<BudgetRecord, Refusal> {
    BudgetRecord::decode(bytes).map_err(|_| {
        Refusal::new(
            ErrorCode::InternalError,
            "corrupt session record in shared data",
        )
    })
}

/// Finds a session's slot and record without changing anything.
pub fn lookup<S: SharedStore + ?Sized>(
    store: &S,
    tenant: &str,
    session_id: &str,
    limits: &SessionLimits,
) -> Result<Option<(u32, BudgetRecord)>, Refusal> {
    for slot in probe_slots(session_id, limits.max_sessions) {
        let bytes = read(store, &session_slot_key(tenant, slot))?;
        if bytes.is_empty() {
            // A claim takes the first free slot of the probe order and slots are never
            // emptied again, so the session cannot be further along.
            return Ok(None);
        }
        if BudgetRecord::encoded_id_is(&bytes, session_id) {
            return Ok(Some((slot, decode(&bytes)?)));
        }
    }
    Ok(None)
}

#[allow(clippy::large_enum_variant)] // short-lived, never stored
enum Attempt<T> {
    Done(BudgetRecord, T),
    /// The slot changed hands between lookup and update: look again.
    Moved,
}

/// Finds a session's record, trying `hint` (where this VM last saw it) first: one
/// read when the session is still there.
pub fn lookup_hinted<S: SharedStore + ?Sized>(
    store: &S,
    tenant: &str,
    session_id: &str,
    limits: &SessionLimits,
    hint: Option<u32>,
) -> Result<Option<(u32, BudgetRecord)>, Refusal> {
    if let Some(slot) = hint {
        let bytes = read(store, &session_slot_key(tenant, slot))?;
        if BudgetRecord::encoded_id_is(&bytes, session_id) {
            return Ok(Some((slot, decode(&bytes)?)));
        }
    }
    lookup(store, tenant, session_id, limits)
}

/// Applies `change` to the session's record, claiming a slot for a new session when
/// `create` is set. Returns the slot and the record as written, or `None` when the
/// session has no slot and `create` is false.
pub fn modify<S: SharedStore + ?Sized, T>(
    store: &S,
    tenant: &str,
    session_id: &str,
    limits: &SessionLimits,
    now: u64,
    create: bool,
    change: &dyn Fn(&mut BudgetRecord) -> Result<T, Refusal>,
) -> Result<Option<(u32, BudgetRecord, T)>, Refusal> {
    modify_hinted(store, tenant, session_id, limits, now, create, None, change)
}

/// [`modify`], trying `hint` first: a session found where it was last seen costs one
/// read and one write instead of a lookup first.
#[allow(clippy::too_many_arguments)]
pub fn modify_hinted<S: SharedStore + ?Sized, T>(
    store: &S,
    tenant: &str,
    session_id: &str,
    limits: &SessionLimits,
    now: u64,
    create: bool,
    hint: Option<u32>,
    change: &dyn Fn(&mut BudgetRecord) -> Result<T, Refusal>,
) -> Result<Option<(u32, BudgetRecord, T)>, Refusal> {
    let mut hint = hint;
    for _ in 0..64 {
        let slot = match hint.take() {
            Some(slot) => slot,
            None => match lookup(store, tenant, session_id, limits)? {
                Some((slot, _)) => slot,
                None if !create => return Ok(None),
                None => match claim(store, tenant, session_id, limits, now, change)? {
                    Claim::Claimed(slot, record, out) => return Ok(Some((slot, record, out))),
                    Claim::Exists => continue,
                },
            },
        };
        let outcome = update(store, &session_slot_key(tenant, slot), |bytes| {
            if !BudgetRecord::encoded_id_is(bytes, session_id) {
                return Ok(Step::Keep(Attempt::Moved));
            }
            let mut record = decode(bytes)?;
            let out = change(&mut record)?;
            record.last_active = record.last_active.max(now);
            Ok(Step::Write(record.encode(), Attempt::Done(record, out)))
        })?;
        match outcome {
            Attempt::Done(record, out) => return Ok(Some((slot, record, out))),
            Attempt::Moved => continue,
        }
    }
    Err(Refusal::new(
        ErrorCode::InternalError,
        "session slot kept moving",
    ))
}

#[allow(clippy::large_enum_variant)] // short-lived, never stored
enum Claim<T> {
    Claimed(u32, BudgetRecord, T),
    /// Another worker claimed a slot for this session first.
    Exists,
}

fn claim<S: SharedStore + ?Sized, T>(
    store: &S,
    tenant: &str,
    session_id: &str,
    limits: &SessionLimits,
    now: u64,
    change: &dyn Fn(&mut BudgetRecord) -> Result<T, Refusal>,
) -> Result<Claim<T>, Refusal> {
    // Build the new record first: a call the fresh session refuses claims nothing.
    let mut fresh = BudgetRecord::new(session_id, now);
    let out = change(&mut fresh)?;
    let mut out = Some(out);
    with_lock(store, &claim_lock_key(tenant), || {
        // (slot, rank): never used first, then sessions that never spent, then the
        // longest idle; the first in probe order among equals.
        let mut best: Option<(u32, (u8, u64))> = None;
        for slot in probe_slots(session_id, limits.max_sessions) {
            let record = decode(&read(store, &session_slot_key(tenant, slot))?)?;
            if record.session_id == session_id {
                return Ok(Claim::Exists);
            }
            if record.is_claimable(now, limits.idle_timeout_secs) {
                let rank = record.claim_rank();
                if best.is_none_or(|(_, r)| rank < r) {
                    best = Some((slot, rank));
                }
            }
        }
        let Some((slot, _)) = best else {
            return Err(Refusal::new(
                ErrorCode::CapacityExceeded,
                "no free session slot: every slot this session can use holds a live session",
            )
            .with_fields(vec![("limit", "sessions.maxSessions".to_string())]));
        };
        let written = update(store, &session_slot_key(tenant, slot), |bytes| {
            let current = decode(bytes)?;
            if !current.is_claimable(now, limits.idle_timeout_secs) {
                // A live session's update landed between scan and claim.
                return Ok(Step::Keep(false));
            }
            Ok(Step::Write(fresh.encode(), true))
        })?;
        Ok(match (written, out.take()) {
            (true, Some(out)) => Claim::Claimed(slot, fresh.clone(), out),
            _ => Claim::Exists,
        })
    })
}

/// Reserves a priced call for the session and its agent.
pub fn reserve<S: SharedStore + ?Sized>(
    store: &S,
    tenant: &str,
    session_id: &str,
    limits: &SessionLimits,
    now: u64,
    charge: &Charge,
) -> Result<(u32, BudgetRecord), Refusal> {
    modify(store, tenant, session_id, limits, now, true, &|r| {
        r.try_reserve(charge)
    })?
    .map(|(slot, record, ())| (slot, record))
    .ok_or_else(|| Refusal::new(ErrorCode::InternalError, "session vanished"))
}

/// Applies `change` to the record in a known slot, if the slot still holds the
/// session (a slot with reservations in flight is never given away, so a caller
/// holding one finds its session where it reserved). `None` when it does not.
pub fn update_at<S: SharedStore + ?Sized, T>(
    store: &S,
    tenant: &str,
    slot: u32,
    session_id: &str,
    now: u64,
    change: &dyn Fn(&mut BudgetRecord) -> T,
) -> Result<Option<(BudgetRecord, T)>, Refusal> {
    update(store, &session_slot_key(tenant, slot), |bytes| {
        if !BudgetRecord::encoded_id_is(bytes, session_id) {
            return Ok(Step::Keep(None));
        }
        let mut record = decode(bytes)?;
        let out = change(&mut record);
        record.last_active = record.last_active.max(now);
        Ok(Step::Write(record.encode(), Some((record, out))))
    })
}

/// Applies `change` to a session's record: in its known slot when given (the slot of
/// a reservation in flight), else wherever it lives. `None` when the session has no
/// record.
pub fn with_session<S: SharedStore + ?Sized, T>(
    store: &S,
    tenant: &str,
    session_id: &str,
    slot: Option<u32>,
    limits: &SessionLimits,
    now: u64,
    change: &dyn Fn(&mut BudgetRecord) -> T,
) -> Result<Option<(BudgetRecord, T)>, Refusal> {
    if let Some(slot) = slot {
        if let Some(done) = update_at(store, tenant, slot, session_id, now, change)? {
            return Ok(Some(done));
        }
    }
    let changed = modify(store, tenant, session_id, limits, now, false, &|r| {
        Ok(change(r))
    })?;
    Ok(changed.map(|(_, record, out)| (record, out)))
}

/// Ends reservations made by [`reserve`] (see [`BudgetRecord::settle`]).
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    tenant: &str,
    session_id: &str,
    slot: Option<u32>,
    limits: &SessionLimits,
    now: u64,
    release: &Release,
) -> Result<Option<BudgetRecord>, Refusal> {
    Ok(
        with_session(store, tenant, session_id, slot, limits, now, &|r| {
            r.settle(release)
        })?
        .map(|(r, ())| r),
    )
}

/// Sets or clears the manual kill switch of a session that exists. Returns the record
/// and whether the switch was on before; `None` for an unknown session.
pub fn set_killed<S: SharedStore + ?Sized>(
    store: &S,
    tenant: &str,
    session_id: &str,
    limits: &SessionLimits,
    now: u64,
    killed: bool,
    create: bool,
) -> Result<Option<(BudgetRecord, bool)>, Refusal> {
    let changed = modify(store, tenant, session_id, limits, now, create, &|r| {
        let was = r.killed;
        r.killed = killed;
        Ok(was)
    })?;
    Ok(changed.map(|(_, record, was)| (record, was)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemoryStore;
    use std::sync::Arc;

    fn limits(max_sessions: u32) -> SessionLimits {
        SessionLimits {
            max_sessions,
            max_agents: 8,
            idle_timeout_secs: 60,
        }
    }

    fn charge(agent: &str, price: u64) -> Charge<'_> {
        Charge {
            owner: 1,
            budget_agent: Some(agent),
            price,
            session_limit: Some(1_000_000),
            agent_limit: None,
            kill_ppm: None,
            max_agents: 8,
        }
    }

    fn commit<'a>(agent: &'a str, price: u64) -> Release<'a> {
        Release {
            owner: 1,
            budget_agent: Some(agent),
            reserved: price,
            count: 1,
            cost: price,
        }
    }

    #[test]
    fn a_session_keeps_its_slot_and_its_budget() {
        let store = MemoryStore::new();
        let l = limits(64);
        let (slot, _) = reserve(&store, "t", "s1", &l, 10, &charge("a-1", 400_000)).unwrap();
        settle(
            &store,
            "t",
            "s1",
            Some(slot),
            &l,
            11,
            &commit("a-1", 400_000),
        )
        .unwrap();
        let (slot2, rec) = reserve(&store, "t", "s1", &l, 12, &charge("a-1", 400_000)).unwrap();
        assert_eq!(slot, slot2);
        assert_eq!((rec.spent, rec.reserved()), (400_000, 400_000));
        let refused = reserve(&store, "t", "s1", &l, 13, &charge("a-1", 400_000)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::SessionBudgetExceeded);
    }

    #[test]
    fn tenants_never_share_slots() {
        let store = MemoryStore::new();
        let l = limits(64);
        reserve(&store, "t1", "s", &l, 0, &charge("a-1", 1_000_000)).unwrap();
        assert!(reserve(&store, "t2", "s", &l, 0, &charge("a-1", 1_000_000)).is_ok());
    }

    #[test]
    fn a_full_table_fails_closed_and_idle_slots_are_reused() {
        let store = MemoryStore::new();
        let l = limits(4);
        for i in 0..4 {
            let id = format!("s{i}");
            reserve(&store, "t", &id, &l, 0, &charge("a-1", 1)).unwrap();
            settle(&store, "t", &id, None, &l, 0, &commit("a-1", 1)).unwrap();
        }
        let full = reserve(&store, "t", "s-new", &l, 30, &charge("a-1", 1)).unwrap_err();
        assert_eq!(full.code, ErrorCode::CapacityExceeded);
        // After the idle timeout, the new session takes an old one's slot, fresh.
        let (_, rec) = reserve(&store, "t", "s-new", &l, 61, &charge("a-1", 1)).unwrap();
        assert_eq!((rec.spent, rec.reserved()), (0, 1));
        assert_eq!(store.key_count(), 4 + 1); // 4 slots + the claim lock
    }

    #[test]
    fn sessions_that_never_spent_do_not_hold_slots_against_real_ones() {
        let store = MemoryStore::new();
        let l = limits(4);
        // Four sessions whose calls all failed upstream: released, nothing spent.
        for i in 0..4 {
            let id = format!("failed-{i}");
            let (slot, _) = reserve(&store, "t", &id, &l, 0, &charge("a-1", 5)).unwrap();
            let release = Release {
                cost: 0,
                ..commit("a-1", 5)
            };
            settle(&store, "t", &id, Some(slot), &l, 0, &release).unwrap();
        }
        // A real session still gets a slot at once, long before the idle timeout.
        assert!(reserve(&store, "t", "real", &l, 1, &charge("a-1", 5)).is_ok());
    }

    #[test]
    fn a_refused_first_call_claims_no_slot() {
        let store = MemoryStore::new();
        let l = limits(4);
        let err = reserve(&store, "t", "s", &l, 0, &charge("a-1", 2_000_000)).unwrap_err();
        assert_eq!(err.code, ErrorCode::SessionBudgetExceeded);
        assert!(lookup(&store, "t", "s", &l).unwrap().is_none());
    }

    #[test]
    fn killing_an_unknown_session_creates_nothing() {
        let store = MemoryStore::new();
        let l = limits(4);
        assert!(set_killed(&store, "t", "nobody", &l, 0, true, false)
            .unwrap()
            .is_none());
        assert_eq!(store.key_count(), 0);
    }

    #[test]
    fn a_million_sessions_stay_in_a_fixed_number_of_keys() {
        let store = MemoryStore::new();
        let l = SessionLimits {
            max_sessions: 256,
            max_agents: 4,
            idle_timeout_secs: 1,
        };
        let mut refused = 0;
        for i in 0..1_000_000u64 {
            let id = format!("session-{i}");
            // 64 new sessions per second of simulated time: slots turn over.
            match reserve(&store, "t", &id, &l, i / 64, &charge("a-1", 1)) {
                Ok((slot, _)) => {
                    settle(&store, "t", &id, Some(slot), &l, i / 64, &commit("a-1", 1)).unwrap();
                }
                Err(e) => {
                    assert_eq!(e.code, ErrorCode::CapacityExceeded);
                    refused += 1;
                }
            }
        }
        assert!(store.key_count() <= 256 + 1);
        assert!(store.total_bytes() < 256 * 200);
        assert!(refused < 1_000_000 / 100, "{refused} refused");
    }

    #[test]
    fn concurrent_first_calls_of_one_session_share_one_slot_and_stay_exact() {
        let store = Arc::new(MemoryStore::new());
        let l = limits(32);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut ok = 0u64;
                    for i in 0..500u64 {
                        let session = format!("s{}", i % 5);
                        let agent = format!("a-{t}");
                        let c = Charge {
                            owner: t,
                            budget_agent: Some(&agent),
                            price: 1000,
                            session_limit: Some(200_000),
                            agent_limit: Some(30_000),
                            kill_ppm: None,
                            max_agents: 8,
                        };
                        if let Ok((slot, _)) = reserve(&*store, "t", &session, &l, 0, &c) {
                            let release = Release {
                                owner: t,
                                budget_agent: Some(&agent),
                                reserved: 1000,
                                count: 1,
                                cost: 1000,
                            };
                            settle(&*store, "t", &session, Some(slot), &l, 0, &release).unwrap();
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let mut spent = 0;
        for s in 0..5 {
            let (_, rec) = lookup(&*store, "t", &format!("s{s}"), &l).unwrap().unwrap();
            assert_eq!(rec.reserved(), 0);
            assert!(rec.owners.is_empty());
            assert!(rec.spent <= 200_000);
            for a in &rec.agents {
                assert!(a.spent <= 30_000);
            }
            assert_eq!(rec.spent, rec.agents.iter().map(|a| a.spent).sum::<u64>());
            spent += rec.spent;
        }
        assert_eq!(spent, total * 1000);
        // 8 agents × 30 calls each fit in each session's agent budgets, and every
        // session sees every agent: 8 × 5 × 30 = 1200 > 5 × 200 = 1000 → session-bound.
        assert_eq!(total, 5 * 200);
    }
}
