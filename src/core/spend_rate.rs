//! The spend-rate breaker: spend per sliding window, per session (the policy's rule) and
//! per agent (an agent pattern's rule). A call's price is counted when it is admitted,
//! atomically with the check (compare-and-swap), so parallel calls cannot pass the
//! limit together; what the call did not cost is given back when it settles. The
//! window slides in six slices; the table of owners is a fixed set of shared-data
//! buckets, so memory is bounded whatever the number of sessions.

use crate::core::amount::Amount;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::ledger::codec::{put_u32, put_u64, Reader};
use crate::core::store::{self, SharedStore, Step};

/// Buckets of the table (keys `pag0.rate.{n}`).
pub const BUCKETS: u64 = 1024;
/// Owners kept per bucket; the one idle longest goes first.
pub const OWNERS_PER_BUCKET: usize = 16;
const SLICES: usize = 6;
const ENTRY_BYTES: usize = 8 + SLICES * 12 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule {
    /// The most that may be spent within any window.
    pub limit: Amount,
    pub window_seconds: u32,
    /// A trip also turns the session's kill switch on.
    pub kill_session: bool,
}

impl RateRule {
    pub fn slice_seconds(&self) -> u32 {
        (self.window_seconds / SLICES as u32).max(1)
    }
}

/// A count the call made: where to give back what it did not cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub owner: u64,
    pub slice_start: u32,
    pub amount: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    owner: u64,
    slices: [(u32, u64); SLICES],
    /// When the last trip alert for this owner went (one per window).
    alerted_at: u32,
}

/// A call the breaker refuses, and whether it is the first refusal of its window (the
/// one that raises the webhook alert).
#[derive(Debug, Clone, PartialEq)]
pub struct Tripped {
    pub refusal: Refusal,
    pub alert: bool,
    pub spent: Amount,
}

/// The bucket's entries: whole entries only (a torn or foreign value reads as fewer).
fn decode(bytes: &[u8]) -> Vec<Entry> {
    bytes
        .chunks_exact(ENTRY_BYTES)
        .filter_map(|c| {
            let mut r = Reader::new(c);
            let owner = r.u64().ok()?;
            let mut slices = [(0u32, 0u64); SLICES];
            for slice in slices.iter_mut() {
                *slice = (r.u32().ok()?, r.u64().ok()?);
            }
            let alerted_at = r.u32().ok()?;
            Some(Entry {
                owner,
                slices,
                alerted_at,
            })
        })
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_BYTES);
    for e in entries {
        put_u64(&mut out, e.owner);
        for (start, amount) in e.slices {
            put_u32(&mut out, start);
            put_u64(&mut out, amount);
        }
        put_u32(&mut out, e.alerted_at);
    }
    out
}

fn live(start: u32, amount: u64, now: u32, window: u32) -> bool {
    amount > 0 && now.saturating_sub(start) < window
}

fn last_active(e: &Entry) -> u32 {
    e.slices.iter().map(|s| s.0).max().unwrap_or(0)
}

/// Whose spend is counted: a session, or an agent of a session.
pub fn owner(tenant: &str, session: &str, agent: Option<&str>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(b"rate\0");
    eat(tenant.as_bytes());
    eat(&[0]);
    eat(session.as_bytes());
    if let Some(agent) = agent {
        eat(&[1]);
        eat(agent.as_bytes());
    }
    h
}

pub fn bucket_key(owner: u64) -> String {
    format!("pag0.rate.{}", owner % BUCKETS)
}

/// Counts `price` for `owner` if the window has room for it; else the refusal, with
/// the seconds after which it would have room (`Retry-After`).
pub fn count<S: SharedStore + ?Sized>(
    store: &S,
    rule: &RateRule,
    owner: u64,
    price: Amount,
    now_s: u64,
    scope: &'static str,
) -> Result<Counted, Tripped> {
    let now = u32::try_from(now_s).unwrap_or(u32::MAX);
    let window = rule.window_seconds.max(1);
    let slice_start = now - now % rule.slice_seconds();
    let counted = store::update(store, &bucket_key(owner), |bytes| {
        let mut entries = decode(bytes);
        entries.retain(|e| e.slices.iter().any(|s| live(s.0, s.1, now, window)));
        let at = match entries.iter().position(|e| e.owner == owner) {
            Some(at) => at,
            None => {
                if entries.len() >= OWNERS_PER_BUCKET {
                    if let Some(idle) = entries
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, e)| last_active(e))
                        .map(|(i, _)| i)
                    {
                        entries.swap_remove(idle);
                    }
                }
                entries.push(Entry {
                    owner,
                    slices: [(0, 0); SLICES],
                    alerted_at: 0,
                });
                entries.len() - 1
            }
        };
        let entry = &mut entries[at];
        for s in entry.slices.iter_mut() {
            if !live(s.0, s.1, now, window) {
                *s = (0, 0);
            }
        }
        let spent: u64 = entry
            .slices
            .iter()
            .map(|s| s.1)
            .fold(0, u64::saturating_add);
        if spent.saturating_add(price) > rule.limit {
            let refused = refusal(
                rule,
                spent,
                price,
                retry_after(entry, rule, price, now),
                scope,
            );
            if entry.alerted_at != 0 && now.saturating_sub(entry.alerted_at) < window {
                return Ok(Step::Keep(Err(Tripped {
                    refusal: refused,
                    alert: false,
                    spent,
                })));
            }
            entry.alerted_at = now.max(1);
            return Ok(Step::Write(
                encode(&entries),
                Err(Tripped {
                    refusal: refused,
                    alert: true,
                    spent,
                }),
            ));
        }
        // This slice's own slot, else a free one; else (six live slices, which slices of
        // window / 6 never give, but shared data is read as untrusted) the newest.
        let slot = entry
            .slices
            .iter()
            .position(|s| s.0 == slice_start && s.1 > 0)
            .or_else(|| entry.slices.iter().position(|s| s.1 == 0))
            .or_else(|| (0..SLICES).max_by_key(|&i| entry.slices[i].0))
            .unwrap_or(0);
        let s = &mut entry.slices[slot];
        *s = (s.0.max(slice_start), s.1.saturating_add(price));
        Ok(Step::Write(
            encode(&entries),
            Ok(Counted {
                owner,
                slice_start,
                amount: price,
            }),
        ))
    });
    match counted {
        Ok(result) => result,
        Err(refusal) => Err(Tripped {
            refusal,
            alert: false,
            spent: 0,
        }),
    }
}

/// The alert webhook's body for the first refusal of a window.
pub fn trip_alert(
    tenant: &str,
    session: &str,
    agent: Option<&str>,
    rule: &RateRule,
    spent: Amount,
    now_s: u64,
) -> String {
    serde_json::json!({
        "type": "breaker_tripped",
        "breaker": "spendRate",
        "code": "SPEND_RATE_EXCEEDED",
        "scope": if agent.is_some() { "agent" } else { "session" },
        "tenant": tenant,
        "session": session,
        "agent": agent,
        "spent": spent.to_string(),
        "limit": rule.limit.to_string(),
        "windowSeconds": rule.window_seconds,
        "timestamp": now_s,
    })
    .to_string()
}

/// Seconds until enough of the window has slid out for `price` to fit.
fn retry_after(entry: &Entry, rule: &RateRule, price: u64, now: u32) -> u64 {
    let window = rule.window_seconds.max(1);
    let mut live_slices: Vec<(u32, u64)> = entry
        .slices
        .iter()
        .copied()
        .filter(|s| live(s.0, s.1, now, window))
        .collect();
    live_slices.sort_unstable();
    let mut spent: u64 = live_slices.iter().map(|s| s.1).fold(0, u64::saturating_add);
    for (start, amount) in live_slices {
        spent = spent.saturating_sub(amount);
        if spent.saturating_add(price) <= rule.limit {
            return u64::from((start + window).saturating_sub(now).max(1));
        }
    }
    u64::from(window)
}

/// Gives back what a counted call did not cost (it cost `cost` of `counted.amount`).
pub fn give_back<S: SharedStore + ?Sized>(
    store: &S,
    counted: &Counted,
    cost: Amount,
) -> Result<(), Refusal> {
    let back = counted.amount.saturating_sub(cost);
    if back == 0 {
        return Ok(());
    }
    store::update(store, &bucket_key(counted.owner), |bytes| {
        let mut entries = decode(bytes);
        let Some(entry) = entries.iter_mut().find(|e| e.owner == counted.owner) else {
            return Ok(Step::Keep(()));
        };
        let Some(slice) = entry
            .slices
            .iter_mut()
            .find(|s| s.0 == counted.slice_start && s.1 > 0)
        else {
            return Ok(Step::Keep(()));
        };
        slice.1 = slice.1.saturating_sub(back);
        Ok(Step::Write(encode(&entries), ()))
    })
}

/// `SPEND_RATE_EXCEEDED`, with when to retry (the Redis ledger's refusals too).
pub fn refusal(
    rule: &RateRule,
    spent: u64,
    price: u64,
    retry: u64,
    scope: &'static str,
) -> Refusal {
    Refusal::new(
        ErrorCode::SpendRateExceeded,
        format!(
            "{scope} spend rate: {spent} spent in the last {} s, limit {}, requested {price}",
            rule.window_seconds, rule.limit
        ),
    )
    .with_retry_after(retry)
    .with_fields(vec![
        ("breaker", "spendRate".to_string()),
        ("scope", scope.to_string()),
        ("limit", rule.limit.to_string()),
        ("spent", spent.to_string()),
        ("requested", price.to_string()),
        ("windowSeconds", rule.window_seconds.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemoryStore;

    const RULE: RateRule = RateRule {
        limit: 1000,
        window_seconds: 60,
        kill_session: false,
    };

    #[test]
    fn spend_past_the_limit_within_the_window_is_refused_with_when_to_retry() {
        let store = MemoryStore::new();
        let who = owner("t", "s", None);
        assert!(count(&store, &RULE, who, 400, 1000, "session").is_ok());
        assert!(count(&store, &RULE, who, 400, 1015, "session").is_ok());
        let refused = count(&store, &RULE, who, 400, 1030, "session").unwrap_err();
        assert_eq!(refused.refusal.code, ErrorCode::SpendRateExceeded);
        // The first 400 (slice starting at 1000) leaves the window at 1060.
        assert_eq!(refused.refusal.retry_after, Some(30));
        // One alert per window: the first refusal raises it, the next does not.
        assert!(refused.alert);
        assert!(
            !count(&store, &RULE, who, 400, 1031, "session")
                .unwrap_err()
                .alert
        );
        assert!(count(&store, &RULE, who, 400, 1060, "session").is_ok());
    }

    #[test]
    fn what_a_call_did_not_cost_is_given_back() {
        let store = MemoryStore::new();
        let who = owner("t", "s", Some("a"));
        let c = count(&store, &RULE, who, 900, 10, "agent").unwrap();
        give_back(&store, &c, 100).unwrap();
        assert!(count(&store, &RULE, who, 900, 11, "agent").is_ok());
        assert!(count(&store, &RULE, who, 1, 12, "agent").is_err());
    }

    #[test]
    fn owners_are_counted_apart_and_buckets_stay_bounded() {
        let store = MemoryStore::new();
        for i in 0..100 {
            count(
                &store,
                &RULE,
                owner("t", &format!("s{i}"), None),
                1000,
                5,
                "session",
            )
            .unwrap();
        }
        let mut entries = Vec::new();
        for i in 0..50u64 {
            entries.push(Entry {
                owner: i,
                slices: [(5, 1); SLICES],
                alerted_at: 0,
            });
        }
        let key = bucket_key(7);
        store
            .set(&key, &encode(&entries), crate::core::store::CREATE_CAS)
            .unwrap();
        count(&store, &RULE, 7, 1, 5, "session").unwrap();
        let (bytes, _) = store.get(&key).unwrap().unwrap();
        assert!(decode(&bytes).len() <= 51);
        assert!(decode(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn parallel_counts_never_pass_the_limit() {
        use std::sync::Arc;
        let store = Arc::new(MemoryStore::new());
        let who = owner("t", "s", None);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| count(&*store, &RULE, who, 7, 100, "session").is_ok())
                        .count()
                })
            })
            .collect();
        let passed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(passed, 1000 / 7);
    }
}
