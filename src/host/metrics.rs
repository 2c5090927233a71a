//! Envoy counters through `define_metric`. Labels travel in the metric name
//! (`pag0.tenant.demo.role.executor.tool.search.endpoint.api_tavily_com_search.requests`)
//! and the bootstrap's `stats_tags` turn them into Prometheus labels. Label values come
//! from the configuration only (tenants, agent patterns' roles, tools, endpoint
//! patterns), never from session ids, so cardinality stays bounded. Metric ids are
//! looked up once per label set and kept (no name is built on a later call).

use std::cell::RefCell;

use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// (tenant, role, code) of a refusal counter.
type RefusalLabels = (String, String, &'static str);

thread_local! {
    static IDS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
    static REFUSALS: RefCell<HashMap<RefusalLabels, Option<u32>>> = RefCell::new(HashMap::new());
}

/// Keeps `[A-Za-z0-9_-]`; anything else (dots would split the name) becomes `_`.
pub fn label(value: &str) -> String {
    let cleaned: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "none".to_string()
    } else {
        cleaned
    }
}

fn id_of(name: &str) -> Option<u32> {
    IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if let Some(id) = ids.get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(MetricType::Counter, name).ok()?;
        ids.insert(name.to_string(), id);
        Some(id)
    })
}

fn bump(id: Option<u32>, delta: u64) {
    if let (Some(id), true) = (id, delta > 0) {
        let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
    }
}

pub fn add(name: &str, delta: u64) {
    if delta > 0 {
        bump(id_of(name), delta);
    }
}

/// The counter ids of one label set: (requests, cost, cache_hits, cache_savings).
pub type CallIds = [Option<u32>; 4];

thread_local! {
    /// Label parts as the configuration spells them (tenant index, role, tool,
    /// endpoint), by their hash → counter ids. Looked up without building a name or a
    /// string; a name is built once per label set.
    static CALL_IDS: RefCell<HashMap<u64, Vec<(RawLabels, CallIds)>>> = RefCell::new(HashMap::new());
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RawLabels {
    tenant: usize,
    role: String,
    tool: String,
    endpoint: String,
}

fn hash_parts(tenant: usize, parts: [&str; 3]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ tenant as u64;
    for part in parts {
        for byte in part.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The counters of a call's labels: `tenant_id` is the tenant's configured id (at
/// `tenant`), the rest as the configuration and the route spell them (sanitised here,
/// once).
pub fn call_ids(tenant: usize, tenant_id: &str, role: &str, tool: &str, endpoint: &str) -> CallIds {
    let hash = hash_parts(tenant, [role, tool, endpoint]);
    CALL_IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        let bucket = ids.entry(hash).or_default();
        if let Some((_, found)) = bucket.iter().find(|(k, _)| {
            k.tenant == tenant && k.role == role && k.tool == tool && k.endpoint == endpoint
        }) {
            return *found;
        }
        let base = format!(
            "pag0.tenant.{}.role.{}.tool.{}.endpoint.{}",
            label(tenant_id),
            label(role),
            label(tool),
            label(endpoint)
        );
        let found = ["requests", "cost", "cache_hits", "cache_savings"]
            .map(|suffix| id_of(&format!("{base}.{suffix}")));
        bucket.push((
            RawLabels {
                tenant,
                role: role.to_string(),
                tool: tool.to_string(),
                endpoint: endpoint.to_string(),
            },
            found,
        ));
        found
    })
}

/// A call that went upstream (or was served locally from the cache).
pub fn call(ids: &CallIds, cost: u64, cache_hit: bool, savings: u64) {
    bump(ids[0], 1);
    bump(ids[1], cost);
    if cache_hit {
        bump(ids[2], 1);
        bump(ids[3], savings);
    }
}

pub fn refusal(tenant: &str, role: &str, code: &'static str) {
    let key = (tenant.to_string(), role.to_string(), code);
    let id = REFUSALS.with(|r| {
        if let Some(id) = r.borrow().get(&key) {
            return *id;
        }
        let id = id_of(&format!(
            "pag0.tenant.{tenant}.role.{role}.code.{code}.refusals"
        ));
        r.borrow_mut().insert(key.clone(), id);
        id
    });
    bump(id, 1);
}

thread_local! {
    /// CAS figures already added to the counters by this worker.
    static CAS_SEEN: RefCell<(u64, u64)> = const { RefCell::new((0, 0)) };
}

/// Adds this worker's CAS writes and retries since the last flush to
/// `pag0.store.cas_writes` / `pag0.store.cas_retries` (their ratio is the retry rate).
pub fn flush_cas_stats() {
    let (writes, retries) = crate::core::store::cas_stats();
    let (seen_writes, seen_retries) = CAS_SEEN.with(|seen| seen.replace((writes, retries)));
    add("pag0.store.cas_writes", writes.saturating_sub(seen_writes));
    add(
        "pag0.store.cas_retries",
        retries.saturating_sub(seen_retries),
    );
}
