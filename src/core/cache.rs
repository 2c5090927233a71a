//! The shared answer cache (level 1: Envoy shared data). A fixed table of `entries`
//! slots; a key may live in any of [`WAYS`] slots from its hash, and a new entry
//! replaces, in order: its own key's old entry, an empty slot, an expired entry or an
//! abandoned claim, then the oldest entry. So memory stays at most
//! `entries × maxEntryBytes` plus a small header per entry, whatever the traffic.
//!
//! Concurrent identical misses are coalesced: the first request claims the key (a
//! `Pending` entry, written with CAS), goes upstream and fills it; the others see the
//! claim and wait for the fill, up to `coalesceWaitMs`, then go upstream themselves.

use regex_lite::Regex;
use sha2::{Digest, Sha256};

use crate::core::config::RawCache;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::store::{read, update, SharedStore, Step, CREATE_CAS};

/// Slots a key may use.
pub const WAYS: u32 = 4;
const ENTRY_VERSION: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    /// Entries are shared by the agents of one session.
    Session,
    /// Entries are shared by every session of a tenant.
    Tenant,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub scope: CacheScope,
    pub default_ttl: u64,
    pub ttl_rules: Vec<(Regex, u64)>,
    pub methods: Vec<String>,
    pub max_entry_bytes: u32,
    pub entries: u32,
    pub coalesce_wait_ms: u64,
    pub level2: Option<Level2>,
}

/// The second level: Redis through Webdis, reached with dispatched HTTP calls.
#[derive(Debug, Clone)]
pub struct Level2 {
    pub cluster: String,
    pub timeout_ms: u64,
}

pub fn compile_cache(raw: RawCache) -> Result<Option<CacheConfig>, String> {
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    let scope = match raw.scope.as_deref() {
        None | Some("session") => CacheScope::Session,
        Some("tenant") => CacheScope::Tenant,
        Some(other) => {
            return Err(format!(
                "cache.scope: {other:?} must be \"session\" or \"tenant\""
            ))
        }
    };
    let default_ttl = raw.default_ttl.unwrap_or(300);
    if default_ttl == 0 || default_ttl > 31_536_000 {
        return Err("cache.defaultTTL: must be between 1 and 31536000 seconds".to_string());
    }
    let mut ttl_rules = Vec::new();
    for (i, rule) in raw.ttl_rules.into_iter().enumerate() {
        let regex = Regex::new(&rule.pattern).map_err(|e| {
            format!(
                "cache.ttlRules[{i}].pattern: {:?} is not a valid regex: {e}",
                rule.pattern
            )
        })?;
        if rule.ttl > 31_536_000 {
            return Err(format!("cache.ttlRules[{i}].ttl: at most 31536000 seconds"));
        }
        ttl_rules.push((regex, rule.ttl));
    }
    let methods = match raw.methods {
        None => vec!["GET".to_string()],
        Some(list) if list.is_empty() => return Err("cache.methods: empty list".to_string()),
        Some(list) => {
            let mut out = Vec::new();
            for m in list {
                let upper = m.to_ascii_uppercase();
                if !matches!(upper.as_str(), "GET" | "POST" | "HEAD" | "QUERY") {
                    return Err(format!(
                        "cache.methods: {m:?} is not cacheable (GET, HEAD, POST, QUERY)"
                    ));
                }
                out.push(upper);
            }
            out
        }
    };
    let max_entry_bytes = raw.max_entry_bytes.unwrap_or(256 * 1024);
    if !(1..=16 * 1024 * 1024).contains(&max_entry_bytes) {
        return Err("cache.maxEntryBytes: must be between 1 and 16777216".to_string());
    }
    let entries = raw.entries.unwrap_or(1024);
    if !(WAYS..=1_048_576).contains(&entries) {
        return Err(format!("cache.entries: must be between {WAYS} and 1048576"));
    }
    let coalesce_wait_ms = raw.coalesce_wait_ms.unwrap_or(5000);
    if coalesce_wait_ms > 60_000 {
        return Err("cache.coalesceWaitMs: at most 60000".to_string());
    }
    let level2 = match raw.cluster {
        None => None,
        Some(cluster) if cluster.is_empty() => {
            return Err("cache.cluster: must name an Envoy cluster".to_string())
        }
        Some(cluster) => {
            let timeout_ms = raw.cluster_timeout_ms.unwrap_or(200);
            if !(1..=10_000).contains(&timeout_ms) {
                return Err("cache.clusterTimeoutMs: must be between 1 and 10000".to_string());
            }
            Some(Level2 {
                cluster,
                timeout_ms,
            })
        }
    };
    Ok(Some(CacheConfig {
        scope,
        default_ttl,
        ttl_rules,
        methods,
        max_entry_bytes,
        entries,
        coalesce_wait_ms,
        level2,
    }))
}

impl CacheConfig {
    pub fn caches_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// TTL of an endpoint: the route's override, else the first matching rule, else
    /// the default. 0 means "do not cache".
    pub fn ttl_for(&self, endpoint: &str, route_ttl: Option<u64>) -> u64 {
        if let Some(ttl) = route_ttl {
            return ttl;
        }
        self.ttl_rules
            .iter()
            .find(|(regex, _)| regex.is_match(endpoint))
            .map_or(self.default_ttl, |(_, ttl)| *ttl)
    }

    /// The key's namespace: the session (or the tenant), and the agent when it keeps
    /// a private cache.
    pub fn namespace(&self, session: &str, agent: &str, private: bool) -> String {
        let base = match self.scope {
            CacheScope::Session => format!("s:{session}"),
            CacheScope::Tenant => "t".to_string(),
        };
        if private {
            format!("{base}/a:{agent}")
        } else {
            base
        }
    }
}

/// What a cache key is made of. Everything that can change an answer is in it: the
/// tenant and namespace, the method, the authority as sent (host and port), the
/// endpoint and raw query, and a SHA-256 over the request's `content-type`, `accept`,
/// `accept-encoding`, its credentials (`authorization`, `x-api-key`, `api-key`,
/// `cookie`: callers with other credentials never share an answer) and its body.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyParts<'a> {
    pub tenant: &'a str,
    pub namespace: &'a str,
    pub method: &'a str,
    pub authority: &'a [u8],
    pub endpoint: &'a str,
    pub query: &'a [u8],
    pub content_type: &'a [u8],
    pub accept: &'a [u8],
    pub accept_encoding: &'a [u8],
    pub credentials: &'a [&'a [u8]],
    pub body: &'a [u8],
}

/// Request headers whose values are hashed into the key as credentials.
pub const CREDENTIAL_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "cookie"];

/// The full cache key. It is stored in the entry and compared on every hit, so two
/// requests that hash alike can never see each other's answers.
pub fn cache_key(p: &KeyParts) -> String {
    let mut h = Sha256::new();
    for part in [p.content_type, p.accept, p.accept_encoding] {
        h.update((part.len() as u32).to_le_bytes());
        h.update(part);
    }
    h.update((p.credentials.len() as u32).to_le_bytes());
    for c in p.credentials {
        h.update((c.len() as u32).to_le_bytes());
        h.update(c);
    }
    h.update(p.body);
    let digest = h.finalize();
    let authority = String::from_utf8_lossy(p.authority).to_ascii_lowercase();
    let query = String::from_utf8_lossy(p.query);
    let mut key = String::with_capacity(
        p.tenant.len()
            + p.namespace.len()
            + p.method.len()
            + authority.len()
            + p.endpoint.len()
            + query.len()
            + 72,
    );
    for part in [
        p.tenant,
        p.namespace,
        p.method,
        &authority,
        p.endpoint,
        &query,
    ] {
        key.push_str(part);
        key.push('\n');
    }
    push_hex(&mut key, &digest);
    key
}

/// Lowercase hex, without `format!` per byte (keys are built on every cached call).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

/// Whether a request must skip the cache (neither read nor fill): it asks for a part
/// of the answer (`Range`), or its `Cache-Control` says `no-store` or `no-cache`.
pub fn request_bypasses(cache_control: Option<&[u8]>, range: bool) -> bool {
    range
        || cache_control.is_some_and(|cc| {
            directives(&String::from_utf8_lossy(cc))
                .any(|(name, _)| matches!(name.as_str(), "no-store" | "no-cache"))
        })
}

/// What decides whether an answer may be stored (RFC 9111, for a shared cache).
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerFacts<'a> {
    pub status: u32,
    pub cache_control: Option<&'a str>,
    pub has_set_cookie: bool,
    pub vary: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub has_content_range: bool,
}

fn directives(value: &str) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    value.split(',').filter_map(|d| {
        let d = d.trim();
        if d.is_empty() {
            return None;
        }
        let (name, arg) = match d.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"').to_string())),
            None => (d, None),
        };
        Some((name.to_ascii_lowercase(), arg))
    })
}

/// Whether an answer may be stored, and for how long at most (its `s-maxage` or
/// `max-age`); the reason when it may not: not 200/203/204, `no-store`, `no-cache`,
/// `private`, a zero max-age, `Set-Cookie`, `Vary` on anything but `Accept-Encoding`
/// (which is in the key), a partial answer, or a stream (`text/event-stream`, which
/// is never held back to be stored).
pub fn storable(facts: &AnswerFacts) -> Result<Option<u64>, &'static str> {
    if !matches!(facts.status, 200 | 203 | 204) {
        return Err("status is not 200, 203 or 204");
    }
    if facts.has_content_range {
        return Err("a partial answer");
    }
    if facts.has_set_cookie {
        return Err("Set-Cookie");
    }
    if facts.content_type.is_some_and(|ct| {
        ct.trim()
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
    }) {
        return Err("a stream");
    }
    if let Some(vary) = facts.vary {
        if vary
            .split(',')
            .map(|v| v.trim().to_ascii_lowercase())
            .any(|v| !v.is_empty() && v != "accept-encoding")
        {
            return Err("Vary on a request header not in the key");
        }
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for (name, arg) in directives(facts.cache_control.unwrap_or("")) {
        match name.as_str() {
            "no-store" => return Err("Cache-Control: no-store"),
            "no-cache" => return Err("Cache-Control: no-cache"),
            "private" => return Err("Cache-Control: private"),
            "max-age" => max_age = arg.and_then(|a| a.parse::<u64>().ok()).or(Some(0)),
            "s-maxage" => s_maxage = arg.and_then(|a| a.parse::<u64>().ok()).or(Some(0)),
            _ => {}
        }
    }
    match s_maxage.or(max_age) {
        Some(0) => Err("max-age=0"),
        other => Ok(other),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryState {
    /// A request went upstream for this key; others may wait for it until the lease.
    Pending {
        lease_until_ms: u64,
    },
    Filled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub state: EntryState,
    pub stored_ms: u64,
    pub ttl_secs: u64,
    pub status: u16,
    /// What the original call cost: each hit saves that much.
    pub cost: u64,
    pub content_type: String,
    /// The answer's `Content-Encoding` (replayed with it; the key holds the request's
    /// `Accept-Encoding`, so only clients that asked for it get it).
    pub content_encoding: String,
    pub body: Vec<u8>,
}

impl Entry {
    pub fn expired(&self, now_ms: u64) -> bool {
        match self.state {
            EntryState::Pending { lease_until_ms } => now_ms >= lease_until_ms,
            EntryState::Filled => {
                now_ms
                    >= self
                        .stored_ms
                        .saturating_add(self.ttl_secs.saturating_mul(1000))
            }
        }
    }

    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_ms) / 1000
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.key.len() + self.body.len());
        w.push(ENTRY_VERSION);
        match self.state {
            EntryState::Pending { lease_until_ms } => {
                w.push(0);
                w.extend_from_slice(&lease_until_ms.to_le_bytes());
            }
            EntryState::Filled => {
                w.push(1);
                w.extend_from_slice(&0u64.to_le_bytes());
            }
        }
        for v in [self.stored_ms, self.ttl_secs, self.cost] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        w.extend_from_slice(&self.status.to_le_bytes());
        for part in [
            self.key.as_bytes(),
            self.content_type.as_bytes(),
            self.content_encoding.as_bytes(),
            &self.body,
        ] {
            w.extend_from_slice(&(part.len() as u32).to_le_bytes());
            w.extend_from_slice(part);
        }
        w
    }

    /// `None` for an empty slot or bytes that are not an entry.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let slice = bytes.get(at..at.checked_add(n)?)?;
            at += n;
            Some(slice)
        };
        if take(1)?[0] != ENTRY_VERSION {
            return None;
        }
        let state_tag = take(1)?[0];
        let u64_at = |b: &[u8]| -> Option<u64> { Some(u64::from_le_bytes(b.try_into().ok()?)) };
        let lease = u64_at(take(8)?)?;
        let stored_ms = u64_at(take(8)?)?;
        let ttl_secs = u64_at(take(8)?)?;
        let cost = u64_at(take(8)?)?;
        let status = u16::from_le_bytes(take(2)?.try_into().ok()?);
        let mut part = || -> Option<Vec<u8>> {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            Some(take(len)?.to_vec())
        };
        let key = String::from_utf8(part()?).ok()?;
        let content_type = String::from_utf8(part()?).ok()?;
        let content_encoding = String::from_utf8(part()?).ok()?;
        let body = part()?;
        if at != bytes.len() {
            return None;
        }
        let state = match state_tag {
            0 => EntryState::Pending {
                lease_until_ms: lease,
            },
            1 => EntryState::Filled,
            _ => return None,
        };
        Some(Entry {
            key,
            state,
            stored_ms,
            ttl_secs,
            status,
            cost,
            content_type,
            content_encoding,
            body,
        })
    }
}

/// Shared-data key of a cache slot.
pub fn slot_key(slot: u32) -> String {
    crate::core::store::cache_slot_key(slot)
}

fn slots_for(key: &str, entries: u32) -> impl Iterator<Item = u32> {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let base = (u64::from_le_bytes(first) % u64::from(entries / WAYS).max(1)) as u32 * WAYS;
    (0..WAYS).map(move |i| (base + i) % entries)
}

/// What a request finds for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A fresh answer.
    Hit(Entry),
    /// Another request is fetching it; wait on this slot.
    Pending(u32),
    /// This request claimed the key: it goes upstream and fills this slot.
    Claimed(u32),
}

/// Finds the key's answer or claims the key. One CAS on the chosen slot decides who
/// goes upstream when identical requests race.
pub fn find_or_claim<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    key: &str,
    now_ms: u64,
) -> Result<Found, Refusal> {
    for _ in 0..16 {
        // (slot, rank, stored_ms, cas as scanned): lower rank, then older, wins.
        let mut victim: Option<(u32, u8, u64, u32)> = None;
        for slot in slots_for(key, cfg.entries) {
            let (bytes, cas) = store
                .get(&slot_key(slot))?
                .unwrap_or((Vec::new(), CREATE_CAS));
            let entry = Entry::decode(&bytes);
            let (rank, stored) = match &entry {
                Some(e) if e.key == key && !e.expired(now_ms) => {
                    return Ok(match e.state {
                        EntryState::Filled => Found::Hit(e.clone()),
                        EntryState::Pending { .. } => Found::Pending(slot),
                    });
                }
                Some(e) if e.key == key => (0, e.stored_ms),
                None => (1, 0),
                Some(e) if e.expired(now_ms) => (2, e.stored_ms),
                Some(e) if matches!(e.state, EntryState::Pending { .. }) => continue,
                Some(e) => (3, e.stored_ms),
            };
            if victim.is_none_or(|(_, r, s, _)| (rank, stored) < (r, s)) {
                victim = Some((slot, rank, stored, cas));
            }
        }
        let Some((slot, _, _, cas)) = victim else {
            // All ways hold live claims: go upstream without caching.
            return Ok(Found::Claimed(u32::MAX));
        };
        let claim = Entry {
            key: key.to_string(),
            state: EntryState::Pending {
                lease_until_ms: now_ms.saturating_add(cfg.coalesce_wait_ms.max(1000)),
            },
            stored_ms: now_ms,
            ttl_secs: 0,
            status: 0,
            cost: 0,
            content_type: String::new(),
            content_encoding: String::new(),
            body: Vec::new(),
        };
        // Claim with the CAS seen in the scan: if the slot changed since (another call
        // claimed or filled it), the write fails and the scan starts over.
        if store.set(&slot_key(slot), &claim.encode(), cas)? {
            return Ok(Found::Claimed(slot));
        }
    }
    Err(Refusal::new(
        ErrorCode::InternalError,
        "cache slots kept changing",
    ))
}

/// Looks at a slot a waiter is waiting on: the answer, still pending, or gone.
pub fn poll<S: SharedStore + ?Sized>(
    store: &S,
    slot: u32,
    key: &str,
    now_ms: u64,
) -> Result<Found, Refusal> {
    match Entry::decode(&read(store, &slot_key(slot))?) {
        Some(e) if e.key == key && !e.expired(now_ms) => Ok(match e.state {
            EntryState::Filled => Found::Hit(e),
            EntryState::Pending { .. } => Found::Pending(slot),
        }),
        // Abandoned, expired or replaced: the waiter goes upstream itself.
        _ => Ok(Found::Claimed(u32::MAX)),
    }
}

/// Fills a claimed slot with the answer, if the claim is still ours.
pub fn fill<S: SharedStore + ?Sized>(store: &S, slot: u32, entry: &Entry) -> Result<bool, Refusal> {
    if slot == u32::MAX {
        return Ok(false);
    }
    update(store, &slot_key(slot), |bytes| match Entry::decode(bytes) {
        Some(e) if e.key == entry.key && matches!(e.state, EntryState::Pending { .. }) => {
            Ok(Step::Write(entry.encode(), true))
        }
        _ => Ok(Step::Keep(false)),
    })
}

/// Gives up a claim (the answer is not cacheable): waiters stop waiting at once.
pub fn abandon<S: SharedStore + ?Sized>(store: &S, slot: u32, key: &str) -> Result<(), Refusal> {
    if slot == u32::MAX {
        return Ok(());
    }
    update(store, &slot_key(slot), |bytes| match Entry::decode(bytes) {
        Some(e) if e.key == key && matches!(e.state, EntryState::Pending { .. }) => {
            Ok(Step::Write(Vec::new(), ()))
        }
        _ => Ok(Step::Keep(())),
    })
}

/// The Redis key of a cache key: fixed length and URL-safe.
pub fn level2_key(key: &str) -> String {
    let mut out = String::with_capacity(69);
    out.push_str("pag0:");
    push_hex(&mut out, &Sha256::digest(key.as_bytes()));
    out
}

/// Webdis path that reads a key.
pub fn level2_get_path(key: &str) -> String {
    format!("/GET/{}", level2_key(key))
}

/// Webdis path (for a PUT whose body is the value) that stores a key with a TTL.
pub fn level2_set_path(key: &str, ttl_secs: u64) -> String {
    format!("/SETEX/{}/{}", level2_key(key), ttl_secs.max(1))
}

/// The value stored in Redis: the encoded entry, base64 (Webdis speaks text).
pub fn level2_value(entry: &Entry) -> String {
    crate::core::base64::encode(&entry.encode())
}

/// Reads Webdis's answer to a GET: the entry when it is there, for this exact key,
/// filled and fresh.
pub fn level2_entry(body: &[u8], key: &str, now_ms: u64) -> Option<Entry> {
    let answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = answer.get("GET")?.as_str()?;
    let entry = Entry::decode(&crate::core::base64::decode(text)?)?;
    (entry.key == key && entry.state == EntryState::Filled && !entry.expired(now_ms))
        .then_some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::RawTtlRule;
    use crate::core::store::MemoryStore;

    fn cfg(entries: u32) -> CacheConfig {
        compile_cache(RawCache {
            default_ttl: Some(1800),
            ttl_rules: vec![
                RawTtlRule {
                    pattern: ".*docs.*".into(),
                    ttl: 3600,
                },
                RawTtlRule {
                    pattern: ".*search.*".into(),
                    ttl: 600,
                },
                RawTtlRule {
                    pattern: ".*completions.*".into(),
                    ttl: 1800,
                },
            ],
            entries: Some(entries),
            max_entry_bytes: Some(1024),
            coalesce_wait_ms: Some(2000),
            ..RawCache::default()
        })
        .unwrap()
        .unwrap()
    }

    fn filled(key: &str, now: u64, ttl: u64) -> Entry {
        Entry {
            key: key.into(),
            state: EntryState::Filled,
            stored_ms: now,
            ttl_secs: ttl,
            status: 200,
            cost: 20_000,
            content_type: "application/json".into(),
            content_encoding: String::new(),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn ttl_rules_first_match_wins() {
        let c = cfg(64);
        assert_eq!(c.ttl_for("docs.example.com/search", None), 3600);
        assert_eq!(c.ttl_for("api.tavily.com/search", None), 600);
        assert_eq!(c.ttl_for("api.openai.com/v1/chat/completions", None), 1800);
        assert_eq!(c.ttl_for("api.deepl.com/v2/translate", None), 1800);
        assert_eq!(c.ttl_for("api.tavily.com/search", Some(5)), 5);
    }

    #[test]
    fn one_claim_then_waiters_then_a_hit() {
        let store = MemoryStore::new();
        let c = cfg(64);
        let key = key("t", "s:1", "POST", "", b"{\"q\":1}");
        let Found::Claimed(slot) = find_or_claim(&store, &c, &key, 1000).unwrap() else {
            panic!()
        };
        assert_eq!(
            find_or_claim(&store, &c, &key, 1001).unwrap(),
            Found::Pending(slot)
        );
        assert!(fill(&store, slot, &filled(&key, 1002, 600)).unwrap());
        let Found::Hit(e) = poll(&store, slot, &key, 1003).unwrap() else {
            panic!()
        };
        assert_eq!(e.cost, 20_000);
        // Expired after its TTL: the next request claims again.
        assert!(matches!(
            find_or_claim(&store, &c, &key, 1002 + 600_000).unwrap(),
            Found::Claimed(_)
        ));
    }

    fn key(tenant: &str, ns: &str, method: &str, query: &str, body: &[u8]) -> String {
        cache_key(&KeyParts {
            tenant,
            namespace: ns,
            method,
            authority: b"api.tavily.com",
            endpoint: "api.tavily.com/search",
            query: query.as_bytes(),
            body,
            ..KeyParts::default()
        })
    }

    #[test]
    fn keys_differ_by_everything_that_can_change_an_answer() {
        let a = key("t1", "s:1", "POST", "", b"x");
        assert_ne!(a, key("t2", "s:1", "POST", "", b"x"));
        assert_ne!(a, key("t1", "s:2", "POST", "", b"x"));
        assert_ne!(a, key("t1", "s:1", "POST", "", b"y"));
        assert_ne!(a, key("t1", "s:1", "POST", "q=1", b"x"));
        assert_ne!(a, key("t1", "s:1", "GET", "", b"x"));
        let base = KeyParts {
            tenant: "t",
            namespace: "t",
            method: "POST",
            authority: b"api.tavily.com",
            endpoint: "api.tavily.com/search",
            body: b"{}",
            ..KeyParts::default()
        };
        let k = cache_key(&base);
        let other_port = KeyParts {
            authority: b"api.tavily.com:8443",
            ..base
        };
        let gzip = KeyParts {
            accept_encoding: b"gzip",
            ..base
        };
        let xml = KeyParts {
            accept: b"application/xml",
            ..base
        };
        let form = KeyParts {
            content_type: b"application/x-www-form-urlencoded",
            ..base
        };
        let alice: &[&[u8]] = &[b"Bearer alice"];
        let bob: &[&[u8]] = &[b"Bearer bob"];
        let as_alice = KeyParts {
            credentials: alice,
            ..base
        };
        let as_bob = KeyParts {
            credentials: bob,
            ..base
        };
        for other in [other_port, gzip, xml, form, as_alice] {
            assert_ne!(k, cache_key(&other));
        }
        assert_ne!(cache_key(&as_alice), cache_key(&as_bob));
        assert_eq!(k, cache_key(&base));
        let mut hex = String::new();
        push_hex(&mut hex, &[0x00, 0xab, 0xff]);
        assert_eq!(hex, "00abff");
    }

    #[test]
    fn an_abandoned_claim_releases_the_waiters() {
        let store = MemoryStore::new();
        let c = cfg(64);
        let Found::Claimed(slot) = find_or_claim(&store, &c, "k", 0).unwrap() else {
            panic!()
        };
        abandon(&store, slot, "k").unwrap();
        assert_eq!(
            poll(&store, slot, "k", 1).unwrap(),
            Found::Claimed(u32::MAX)
        );
    }

    #[test]
    fn a_hundred_thousand_keys_stay_in_the_configured_slots() {
        let store = MemoryStore::new();
        let c = cfg(256);
        for i in 0..100_000u64 {
            let key = format!("key-{i}");
            if let Found::Claimed(slot) = find_or_claim(&store, &c, &key, i).unwrap() {
                fill(&store, slot, &filled(&key, i, 3600)).unwrap();
            }
        }
        assert!(store.key_count() <= 256);
        assert!(store.total_bytes() <= 256 * (1024 + 200));
        // The newest keys are there; the oldest were evicted.
        assert!(matches!(
            find_or_claim(&store, &c, "key-99999", 100_000).unwrap(),
            Found::Hit(_)
        ));
    }

    #[test]
    fn level2_values_round_trip_and_check_the_key() {
        let e = filled("k", 1000, 60);
        let body = serde_json::json!({"GET": level2_value(&e)}).to_string();
        assert_eq!(level2_entry(body.as_bytes(), "k", 2000), Some(e));
        assert_eq!(level2_entry(body.as_bytes(), "other", 2000), None);
        assert_eq!(level2_entry(body.as_bytes(), "k", 1000 + 60_000), None);
        assert_eq!(level2_entry(br#"{"GET": null}"#, "k", 0), None);
        assert_eq!(level2_entry(b"garbage", "k", 0), None);
        assert!(level2_set_path("k", 600).starts_with("/SETEX/pag0:"));
        assert_eq!(level2_key("k").len(), 5 + 64);
    }

    #[test]
    fn storable_answers_follow_rfc_9111_for_a_shared_cache() {
        let ok = AnswerFacts {
            status: 200,
            ..AnswerFacts::default()
        };
        assert_eq!(storable(&ok), Ok(None));
        assert_eq!(
            storable(&AnswerFacts {
                status: 204,
                cache_control: Some("public, max-age=60"),
                ..ok
            }),
            Ok(Some(60))
        );
        assert_eq!(
            storable(&AnswerFacts {
                cache_control: Some("max-age=60, s-maxage=5"),
                ..ok
            }),
            Ok(Some(5))
        );
        for bad in [
            AnswerFacts { status: 500, ..ok },
            AnswerFacts { status: 206, ..ok },
            AnswerFacts {
                cache_control: Some("no-store"),
                ..ok
            },
            AnswerFacts {
                cache_control: Some("No-Cache"),
                ..ok
            },
            AnswerFacts {
                cache_control: Some("max-age=0"),
                ..ok
            },
            AnswerFacts {
                cache_control: Some("max-age=60, private"),
                ..ok
            },
            AnswerFacts {
                has_set_cookie: true,
                ..ok
            },
            AnswerFacts {
                vary: Some("Authorization"),
                ..ok
            },
            AnswerFacts {
                vary: Some("*"),
                ..ok
            },
            AnswerFacts {
                has_content_range: true,
                ..ok
            },
            AnswerFacts {
                content_type: Some("text/event-stream; charset=utf-8"),
                ..ok
            },
        ] {
            assert!(storable(&bad).is_err(), "{bad:?}");
        }
        assert!(storable(&AnswerFacts {
            vary: Some("Accept-Encoding"),
            ..ok
        })
        .is_ok());
        assert!(request_bypasses(None, true));
        assert!(request_bypasses(Some(b"no-cache"), false));
        assert!(!request_bypasses(Some(b"max-age=5"), false));
    }

    #[test]
    fn entries_round_trip_and_garbage_is_no_entry() {
        let e = filled("k", 5, 6);
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        let bytes = e.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Entry::decode(&bytes[..cut]), None);
        }
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;
    use crate::core::store::MemoryStore;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn concurrent_fills_keep_the_newest_entries() {
        let store = Arc::new(MemoryStore::new());
        let cfg = Arc::new(
            compile_cache(RawCache {
                entries: Some(256),
                ..RawCache::default()
            })
            .unwrap()
            .unwrap(),
        );
        let clock = Arc::new(AtomicU64::new(1));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (store, cfg, clock) = (store.clone(), cfg.clone(), clock.clone());
                std::thread::spawn(move || {
                    let mut i = t;
                    while i < 2000 {
                        let key = format!("k{i}");
                        let now = clock.fetch_add(1, Ordering::Relaxed);
                        if let Found::Claimed(slot) =
                            find_or_claim(&*store, &cfg, &key, now).unwrap()
                        {
                            let e = Entry {
                                key: key.clone(),
                                state: EntryState::Filled,
                                stored_ms: clock.fetch_add(1, Ordering::Relaxed),
                                ttl_secs: 3600,
                                status: 200,
                                cost: 1,
                                content_type: String::new(),
                                content_encoding: String::new(),
                                body: vec![1; 800],
                            };
                            assert!(fill(&*store, slot, &e).unwrap(), "fill lost for {key}");
                        }
                        i += 8;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every fill stuck (asserted above) and the table stayed within its slots.
        assert!(store.key_count() <= 256);
        // Threads progress unevenly, so "newest" is by time: the next 20 keys, written
        // one after another, are all there.
        let mut now = clock.load(Ordering::Relaxed);
        for i in 0..20 {
            let key = format!("late{i}");
            now += 1;
            let Found::Claimed(slot) = find_or_claim(&*store, &cfg, &key, now).unwrap() else {
                panic!()
            };
            let e = Entry {
                key,
                state: EntryState::Filled,
                stored_ms: now,
                ttl_secs: 3600,
                status: 200,
                cost: 1,
                content_type: String::new(),
                content_encoding: String::new(),
                body: vec![],
            };
            assert!(fill(&*store, slot, &e).unwrap());
        }
        let hits = (0..20)
            .filter(|i| {
                matches!(
                    find_or_claim(&*store, &cfg, &format!("late{i}"), now + 1).unwrap(),
                    Found::Hit(_)
                )
            })
            .count();
        assert_eq!(hits, 20);
    }
}
