//! The repeat breaker: the same agent sending the same request again and again is a
//! loop that a budget would stop only once it has spent the budget. Each agent's recent
//! requests are counted by fingerprint (method, endpoint, body with volatile fields
//! left out) in a fixed table of shared-data buckets, so every worker sees every call
//! and the memory is bounded whatever the number of sessions and agents.

use serde_json::Value;

use crate::core::errors::{ErrorCode, Refusal};
use crate::core::ledger::codec::{put_u32, put_u64, Reader};
use crate::core::store::{self, SharedStore, Step};

/// Buckets of the table (keys `pag0.brk.{n}`); with [`ENTRIES_PER_BUCKET`] this bounds
/// the breaker's memory at about 1.5 MiB of shared data.
pub const BUCKETS: u64 = 2048;
/// Fingerprints kept per bucket; the one seen longest ago goes first.
pub const ENTRIES_PER_BUCKET: usize = 32;
const ENTRY_BYTES: usize = 24;

/// Top-level JSON fields that differ between two sendings of the same request and are
/// left out of its fingerprint: ids, timestamps, nonces, seeds, the client's metadata,
/// and how the answer is delivered (`stream`, `stream_options`).
pub const VOLATILE_FIELDS: [&str; 10] = [
    "id",
    "request_id",
    "requestId",
    "timestamp",
    "nonce",
    "seed",
    "user",
    "metadata",
    "stream",
    "stream_options",
];

/// A policy's (or agent pattern's) repeat breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepeatRule {
    /// The call that makes this many identical calls in the window is refused, and
    /// every one after it while the window lasts.
    pub calls: u32,
    /// From this count on, answers carry `x-pag0-loop-warning` (0: never).
    pub warn_at: u32,
    pub window_seconds: u32,
    /// A trip also sets the session's kill switch.
    pub kill_session: bool,
}

/// What the breaker says about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Passes; the answer says how close the loop is to the limit.
    Warn {
        count: u32,
        limit: u32,
    },
    /// Refused: the `count`-th identical call within the window.
    Trip {
        count: u32,
        limit: u32,
    },
}

/// FNV-1a, 64 bits: stable across workers and builds (the fingerprint is shared).
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Whose calls are counted together: the agent of a session of a tenant.
pub fn owner(tenant: &str, session: &str, agent: &str) -> u64 {
    let h = fnv(FNV_OFFSET, tenant.as_bytes());
    let h = fnv(h, &[0]);
    let h = fnv(h, session.as_bytes());
    let h = fnv(h, &[0]);
    fnv(h, agent.as_bytes())
}

/// The request's fingerprint. A JSON object body is compared without its
/// [`VOLATILE_FIELDS`] and whatever the order of its keys or its whitespace; any
/// other body byte for byte.
pub fn fingerprint(method: &[u8], endpoint: &str, body: &[u8]) -> u64 {
    let h = fnv(FNV_OFFSET, method);
    let h = fnv(h, &[0]);
    let h = fnv(h, endpoint.as_bytes());
    let h = fnv(h, &[0]);
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut map)) => {
            for field in VOLATILE_FIELDS {
                map.remove(field);
            }
            // serde_json's map is ordered by key: the same fields give the same text.
            let canonical = Value::Object(map).to_string();
            fnv(fnv(h, b"json"), canonical.as_bytes())
        }
        _ => fnv(fnv(h, b"raw"), body),
    }
}

/// The bucket key of an owner.
pub fn bucket_key(owner: u64) -> String {
    format!("pag0.brk.{}", owner % BUCKETS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    owner: u64,
    fingerprint: u64,
    count: u32,
    window_start: u32,
}

/// The bucket's entries: whole entries only (a torn or foreign value reads as fewer).
fn decode(bytes: &[u8]) -> Vec<Entry> {
    bytes
        .chunks_exact(ENTRY_BYTES)
        .filter_map(|c| {
            let mut r = Reader::new(c);
            Some(Entry {
                owner: r.u64().ok()?,
                fingerprint: r.u64().ok()?,
                count: r.u32().ok()?,
                window_start: r.u32().ok()?,
            })
        })
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_BYTES);
    for e in entries {
        put_u64(&mut out, e.owner);
        put_u64(&mut out, e.fingerprint);
        put_u32(&mut out, e.count);
        put_u32(&mut out, e.window_start);
    }
    out
}

/// Counts one call in a bucket's entries; returns the call's count within its window.
fn count_in(entries: &mut Vec<Entry>, owner: u64, fingerprint: u64, now: u32, window: u32) -> u32 {
    // Entries whose window is over count for nothing: drop them first.
    entries.retain(|e| now.saturating_sub(e.window_start) < window);
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.owner == owner && e.fingerprint == fingerprint)
    {
        e.count = e.count.saturating_add(1);
        return e.count;
    }
    if entries.len() >= ENTRIES_PER_BUCKET {
        // The oldest window goes; a loop keeps its own entry fresh.
        if let Some(oldest) = entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.window_start)
            .map(|(i, _)| i)
        {
            entries.swap_remove(oldest);
        }
    }
    entries.push(Entry {
        owner,
        fingerprint,
        count: 1,
        window_start: now,
    });
    1
}

/// The verdict for a count under a rule.
pub fn verdict(rule: &RepeatRule, count: u32) -> Verdict {
    if rule.calls > 0 && count >= rule.calls {
        Verdict::Trip {
            count,
            limit: rule.calls,
        }
    } else if rule.warn_at > 0 && count >= rule.warn_at {
        Verdict::Warn {
            count,
            limit: rule.calls,
        }
    } else {
        Verdict::Pass
    }
}

/// Counts one call of `owner` with `fingerprint` at `now_s` (seconds) in shared data,
/// with compare-and-swap (every worker counts in the same bucket), and judges it.
pub fn record<S: SharedStore + ?Sized>(
    store: &S,
    rule: &RepeatRule,
    owner: u64,
    fingerprint: u64,
    now_s: u64,
) -> Result<Verdict, Refusal> {
    let now = u32::try_from(now_s).unwrap_or(u32::MAX);
    let key = bucket_key(owner);
    let count = store::update(store, &key, |bytes| {
        let mut entries = decode(bytes);
        let count = count_in(
            &mut entries,
            owner,
            fingerprint,
            now,
            rule.window_seconds.max(1),
        );
        Ok(Step::Write(encode(&entries), count))
    })?;
    Ok(verdict(rule, count))
}

/// The refusal of a payment the x402 repeat breaker stops (`count`: this payment's
/// number within the window).
pub fn payment_refusal(rule: &RepeatRule, count: u32) -> Refusal {
    let paid = rule.calls.saturating_sub(1);
    Refusal::new(
        ErrorCode::LoopDetected,
        format!(
            "this resource was paid {paid} times within {} s (x402.repeatBreaker allows {paid}): not paid again",
            rule.window_seconds
        ),
    )
    .with_fields(vec![
        ("breaker", "x402Repeat".to_string()),
        ("count", count.to_string()),
        ("limit", paid.to_string()),
        ("windowSeconds", rule.window_seconds.to_string()),
    ])
}

/// The alert webhook's body for a trip.
pub fn trip_alert(
    tenant: &str,
    session: &str,
    agent: &str,
    rule: &RepeatRule,
    count: u32,
    now_s: u64,
) -> String {
    serde_json::json!({
        "type": "breaker_tripped",
        "breaker": "repeat",
        "code": "LOOP_DETECTED",
        "tenant": tenant,
        "session": session,
        "agent": agent,
        "count": count,
        "limit": rule.calls,
        "windowSeconds": rule.window_seconds,
        "killSession": rule.kill_session,
        "timestamp": now_s,
    })
    .to_string()
}

/// The refusal of a tripped breaker.
pub fn refusal(rule: &RepeatRule, count: u32) -> Refusal {
    Refusal::new(
        ErrorCode::LoopDetected,
        format!(
            "the same request {count} times within {} s (the repeat breaker allows {})",
            rule.window_seconds,
            rule.calls.saturating_sub(1)
        ),
    )
    .with_fields(vec![
        ("breaker", "repeat".to_string()),
        ("count", count.to_string()),
        ("limit", rule.calls.to_string()),
        ("windowSeconds", rule.window_seconds.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemoryStore;

    fn rule() -> RepeatRule {
        RepeatRule {
            calls: 5,
            warn_at: 3,
            window_seconds: 60,
            kill_session: false,
        }
    }

    #[test]
    fn the_fifth_identical_call_trips_and_the_third_warns() {
        let store = MemoryStore::new();
        let who = owner("t", "s", "looper-1");
        let fp = fingerprint(b"POST", "api.openai.com/v1/chat/completions", b"{\"a\":1}");
        let verdicts: Vec<Verdict> = (0..6)
            .map(|_| record(&store, &rule(), who, fp, 1000).unwrap())
            .collect();
        assert_eq!(verdicts[0], Verdict::Pass);
        assert_eq!(verdicts[1], Verdict::Pass);
        assert_eq!(verdicts[2], Verdict::Warn { count: 3, limit: 5 });
        assert_eq!(verdicts[3], Verdict::Warn { count: 4, limit: 5 });
        assert_eq!(verdicts[4], Verdict::Trip { count: 5, limit: 5 });
        assert_eq!(verdicts[5], Verdict::Trip { count: 6, limit: 5 });
    }

    #[test]
    fn volatile_fields_key_order_and_whitespace_do_not_make_a_new_request() {
        let a = fingerprint(
            b"POST",
            "e",
            br#"{"model":"m","messages":[1],"user":"u1","stream":true}"#,
        );
        let b = fingerprint(
            b"POST",
            "e",
            br#"{ "messages": [1], "model": "m", "seed": 7 }"#,
        );
        let c = fingerprint(b"POST", "e", br#"{"model":"m","messages":[2]}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(
            fingerprint(b"GET", "e", b""),
            fingerprint(b"POST", "e", b"")
        );
        assert_ne!(
            fingerprint(b"POST", "e", b"x"),
            fingerprint(b"POST", "f", b"x")
        );
    }

    #[test]
    fn a_ping_pong_loop_counts_both_requests() {
        let store = MemoryStore::new();
        let who = owner("t", "s", "a");
        let (ping, pong) = (
            fingerprint(b"POST", "e", b"1"),
            fingerprint(b"POST", "e", b"2"),
        );
        let mut last = Verdict::Pass;
        for i in 0..10 {
            let fp = if i % 2 == 0 { ping } else { pong };
            last = record(&store, &rule(), who, fp, 10).unwrap();
        }
        assert_eq!(last, Verdict::Trip { count: 5, limit: 5 });
    }

    #[test]
    fn a_window_that_is_over_starts_the_count_again() {
        let store = MemoryStore::new();
        let who = owner("t", "s", "a");
        let fp = fingerprint(b"GET", "e", b"");
        for _ in 0..4 {
            record(&store, &rule(), who, fp, 100).unwrap();
        }
        assert_eq!(
            record(&store, &rule(), who, fp, 160).unwrap(),
            Verdict::Pass
        );
    }

    #[test]
    fn agents_and_sessions_are_counted_apart_and_buckets_stay_bounded() {
        let store = MemoryStore::new();
        let fp = fingerprint(b"GET", "e", b"");
        for i in 0..4 {
            record(&store, &rule(), owner("t", "s", "a"), fp, 5).unwrap();
            record(&store, &rule(), owner("t", &format!("s{i}"), "a"), fp, 5).unwrap();
        }
        assert_eq!(
            record(&store, &rule(), owner("t", "s", "a"), fp, 5).unwrap(),
            Verdict::Trip { count: 5, limit: 5 }
        );
        // Many owners in one bucket: it never holds more than its entries.
        let mut entries = Vec::new();
        for i in 0..1000u64 {
            count_in(&mut entries, i, 1, 7, 60);
        }
        assert_eq!(entries.len(), ENTRIES_PER_BUCKET);
        assert!(encode(&entries).len() <= ENTRIES_PER_BUCKET * ENTRY_BYTES);
    }

    #[test]
    fn garbage_in_a_bucket_is_read_as_whole_entries_and_never_panics() {
        assert!(decode(&[1, 2, 3]).is_empty());
        assert_eq!(decode(&[0u8; 50]).len(), 2);
    }
}
