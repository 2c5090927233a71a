//! The one place that owns shared-data keys, the compare-and-swap retry loop and the
//! claim lock. The host implements [`SharedStore`] over Envoy's shared data; tests use
//! [`MemoryStore`], which behaves like Envoy's (measured: see ENVOY-FACTS.md).
//!
//! Envoy's shared data does not check CAS when a key does not exist yet, so a plain
//! "create" could overwrite a record another worker created a moment before. Every
//! write here carries a CAS: the one read, or [`CREATE_CAS`] when the key was absent.
//! If the key appeared in between, it now exists with a real CAS that differs from
//! `CREATE_CAS`, the write fails, and the loop reads again. (Envoy hands out CAS values
//! from one counter; a clash needs that counter to sit on exactly `u32::MAX`.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hashbrown::HashMap;

use crate::core::errors::{ErrorCode, Refusal};

/// CAS sent when creating a key that was absent when read.
pub const CREATE_CAS: u32 = u32::MAX;
/// Attempts before a CAS loop gives up (it never has in tests: 1–2% retry).
const MAX_ATTEMPTS: u32 = 10_000;
/// A claim lock older than this is taken over: its holder's VM died mid-claim.
const LOCK_LEASE_MICROS: u64 = 200_000;

static CAS_RETRIES: AtomicU64 = AtomicU64::new(0);
static CAS_WRITES: AtomicU64 = AtomicU64::new(0);

/// (successful CAS writes, CAS mismatches retried) in this VM since it started.
pub fn cas_stats() -> (u64, u64) {
    (
        CAS_WRITES.load(Ordering::Relaxed),
        CAS_RETRIES.load(Ordering::Relaxed),
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Refusal {
        Refusal::new(ErrorCode::InternalError, format!("shared data: {}", e.0))
    }
}

/// Shared data with Envoy's semantics.
pub trait SharedStore {
    /// The value and its CAS, or `None` when the key was never written.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes if `cas` still matches (or the key is absent). `Ok(false)` on mismatch.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<bool, StoreError>;
    /// Wall clock in microseconds (for lock leases).
    fn now_micros(&self) -> u64;
}

/// What a CAS update decided after reading the current value.
pub enum Step<R> {
    /// Write this value; the update returns `R` once the write sticks.
    Write(Vec<u8>, R),
    /// Nothing to write: return `R` as it is.
    Keep(R),
}

/// Read-modify-write with CAS, retried until it sticks. `change` sees the current bytes
/// (empty when the key is absent) and may run several times: it must be pure.
pub fn update<S, R>(
    store: &S,
    key: &str,
    mut change: impl FnMut(&[u8]) -> Result<Step<R>, Refusal>,
) -> Result<R, Refusal>
where
    S: SharedStore + ?Sized,
{
    for _ in 0..MAX_ATTEMPTS {
        let (bytes, cas) = store.get(key)?.unwrap_or((Vec::new(), CREATE_CAS));
        match change(&bytes)? {
            Step::Keep(result) => return Ok(result),
            Step::Write(value, result) => {
                if store.set(key, &value, cas)? {
                    CAS_WRITES.fetch_add(1, Ordering::Relaxed);
                    return Ok(result);
                }
                CAS_RETRIES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Err(Refusal::new(
        ErrorCode::InternalError,
        format!("shared data key {key} stayed contended"),
    ))
}

/// Reads a key's bytes (empty when absent).
pub fn read<S: SharedStore + ?Sized>(store: &S, key: &str) -> Result<Vec<u8>, Refusal> {
    Ok(store.get(key)?.map(|(bytes, _)| bytes).unwrap_or_default())
}

/// Runs `work` while holding a lock key. Used only to claim session slots, so that two
/// workers can never give one session two slots. `work` runs synchronously inside one
/// host callback, so the lock is held for microseconds; a lock older than its lease
/// (a worker died holding it) is taken over.
pub fn with_lock<S, R>(
    store: &S,
    key: &str,
    work: impl FnOnce() -> Result<R, Refusal>,
) -> Result<R, Refusal>
where
    S: SharedStore + ?Sized,
{
    let mut acquired = None;
    for _ in 0..MAX_ATTEMPTS * 10 {
        let now = store.now_micros();
        let (bytes, cas) = store.get(key)?.unwrap_or((Vec::new(), CREATE_CAS));
        let held_since = decode_u64(&bytes);
        let free = match held_since {
            None => true,
            Some(since) => now.saturating_sub(since) > LOCK_LEASE_MICROS,
        };
        let stamp = now.max(1);
        if free && store.set(key, &stamp.to_le_bytes(), cas)? {
            acquired = Some(stamp);
            break;
        }
    }
    let Some(stamp) = acquired else {
        return Err(Refusal::new(
            ErrorCode::InternalError,
            format!("lock {key} stayed busy"),
        ));
    };
    let result = work();
    // Release only our own lock (if our lease ran out, another worker may hold it).
    if let Some((bytes, cas)) = store.get(key)? {
        if decode_u64(&bytes) == Some(stamp) {
            store.set(key, &[], cas)?;
        }
    }
    result
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    let array: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_le_bytes(array))
}

/// Every key pag0 writes starts with this. The version changes when a record's
/// format does, so a module upgrade never misreads an older format (it starts over).
const PREFIX: &str = "pag0/v3";

fn key(kind: &str, parts: &[&str], numbers: &[u64]) -> String {
    let mut k = String::with_capacity(PREFIX.len() + kind.len() + 32);
    k.push_str(PREFIX);
    k.push('/');
    k.push_str(kind);
    for p in parts {
        k.push('/');
        k.push_str(p);
    }
    for n in numbers {
        k.push('/');
        push_decimal(&mut k, *n);
    }
    k
}

/// Appends `n` in decimal without `format!` (keys are built on every request).
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        out.push(char::from(*d));
    }
}

/// Budget record in slot `slot` of a tenant's session table.
pub fn session_slot_key(tenant: &str, slot: u32) -> String {
    key("s", &[tenant], &[u64::from(slot)])
}

/// Report record of the session in slot `slot` (same slot as its budget record).
pub fn report_slot_key(tenant: &str, slot: u32) -> String {
    key("r", &[tenant], &[u64::from(slot)])
}

/// Key of a tenant's day and month windows.
pub fn tenant_windows_key(tenant: &str) -> String {
    key("w", &[tenant], &[])
}

/// Key of the lock serialising session-slot claims of one tenant.
pub fn claim_lock_key(tenant: &str) -> String {
    key("lock", &[tenant], &[])
}

/// The registry of Envoy VMs that may hold reservations.
pub fn vm_registry_key() -> String {
    key("vms", &[], &[])
}

/// The report API's flush request counter.
pub fn flush_epoch_key() -> String {
    key("flush", &[], &[])
}

/// The secret that marks pag0's own paid retries (pay mode through the loopback).
pub fn secret_key() -> String {
    key("secret", &[], &[])
}

/// Slot `slot` of the shared answer cache.
pub fn cache_slot_key(slot: u32) -> String {
    key("c", &[], &[u64::from(slot)])
}

/// Slot `slot` of the table of x402 offers seen (relay mode).
pub fn offer_slot_key(slot: u32) -> String {
    key("o", &[], &[u64::from(slot)])
}

/// Breaker state of the session in slot `slot`.
pub fn breaker_slot_key(tenant: &str, slot: u32) -> String {
    key("b", &[tenant], &[u64::from(slot)])
}

/// An in-memory store with Envoy's shared-data semantics (CAS counter shared by all
/// keys, no check on absent keys), safe to use from many threads.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
    clock: AtomicU64,
}

#[derive(Default)]
struct MemoryInner {
    map: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    pub fn key_count(&self) -> usize {
        self.inner.lock().map(|m| m.map.len()).unwrap_or(0)
    }

    pub fn total_bytes(&self) -> usize {
        self.inner
            .lock()
            .map(|m| m.map.iter().map(|(k, (v, _))| k.len() + v.len()).sum())
            .unwrap_or(0)
    }

    pub fn set_now_micros(&self, now: u64) {
        self.clock.store(now, Ordering::Relaxed);
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        Ok(inner.map.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<bool, StoreError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| StoreError("poisoned".into()))?;
        inner.next_cas = inner.next_cas.wrapping_add(1).max(1);
        let next = inner.next_cas;
        match inner.map.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Ok(false);
                }
                *entry = (value.to_vec(), next);
            }
            None => {
                inner.map.insert(key.to_string(), (value.to_vec(), next));
            }
        }
        Ok(true)
    }

    fn now_micros(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_with_sentinel_cas_cannot_overwrite_a_key_created_meanwhile() {
        let store = MemoryStore::new();
        // Two writers both read "absent"...
        assert!(store.get("k").unwrap().is_none());
        assert!(store.set("k", b"first", CREATE_CAS).unwrap());
        // ...the second create now fails instead of overwriting.
        assert!(!store.set("k", b"second", CREATE_CAS).unwrap());
        assert_eq!(store.get("k").unwrap().unwrap().0, b"first");
    }

    #[test]
    fn update_retries_until_it_sticks() {
        let store = MemoryStore::new();
        let mut interfered = false;
        let result = update(&store, "n", |bytes| {
            if !interfered {
                interfered = true;
                // Another worker writes between our read and our write.
                store.set("n", b"x", 0).unwrap();
            }
            Ok(Step::Write([bytes, b"!"].concat(), bytes.len()))
        })
        .unwrap();
        assert_eq!(result, 1);
        assert_eq!(store.get("n").unwrap().unwrap().0, b"x!");
        assert!(cas_stats().1 >= 1);
    }

    #[test]
    fn concurrent_increments_are_exact() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        update(&*store, "counter", |bytes| {
                            let n = decode_u64(bytes).unwrap_or(0) + 1;
                            Ok(Step::Write(n.to_le_bytes().to_vec(), ()))
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let bytes = read(&*store, "counter").unwrap();
        assert_eq!(decode_u64(&bytes), Some(16_000));
    }

    #[test]
    fn keys_are_built_without_format() {
        assert_eq!(session_slot_key("demo", 4095), "pag0/v3/s/demo/4095");
        assert_eq!(cache_slot_key(0), "pag0/v3/c/0");
        let mut s = String::new();
        push_decimal(&mut s, u64::MAX);
        assert_eq!(s, u64::MAX.to_string());
    }

    #[test]
    fn a_stale_lock_is_taken_over() {
        let store = MemoryStore::new();
        store.set_now_micros(1_000_000);
        store.set("l", &500_000u64.to_le_bytes(), 0).unwrap();
        assert_eq!(with_lock(&store, "l", || Ok(7)).unwrap(), 7);
        assert_eq!(read(&store, "l").unwrap(), Vec::<u8>::new());
    }
}
