//! Envoy counters through `define_metric`. Labels travel in the metric name
//! (`pag0.tenant.demo.role.executor.tool.search.endpoint.api_tavily_com_search.requests`)
//! and the bootstrap's `stats_tags` turn them into Prometheus labels. Label values come
//! from the configuration only (tenants, agent patterns' roles, tools, endpoint
//! patterns), never from session ids, so cardinality stays bounded.

use std::cell::RefCell;

use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

thread_local! {
    static IDS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

/// Labels of one call, already bounded and sanitised.
pub struct Labels {
    pub tenant: String,
    pub role: String,
    pub tool: String,
    pub endpoint: String,
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

pub fn add(name: &str, delta: u64) {
    if delta == 0 {
        return;
    }
    let id = IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if let Some(id) = ids.get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(MetricType::Counter, name).ok()?;
        ids.insert(name.to_string(), id);
        Some(id)
    });
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
    }
}

/// A call that went upstream (or was served locally from the cache).
pub fn call(labels: &Labels, cost: u64, cache_hit: bool, savings: u64) {
    let base = format!(
        "pag0.tenant.{}.role.{}.tool.{}.endpoint.{}",
        labels.tenant, labels.role, labels.tool, labels.endpoint
    );
    add(&format!("{base}.requests"), 1);
    add(&format!("{base}.cost"), cost);
    if cache_hit {
        add(&format!("{base}.cache_hits"), 1);
        add(&format!("{base}.cache_savings"), savings);
    }
}

pub fn refusal(tenant: &str, role: &str, code: &str) {
    add(
        &format!("pag0.tenant.{tenant}.role.{role}.code.{code}.refusals"),
        1,
    );
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
