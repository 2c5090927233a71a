//! Calls that must outlive the request that caused them (alerts to the webhook, cache
//! entries written to the second level) wait here until the root context's next tick
//! sends them: a callout from an HTTP stream could be cancelled when the stream ends,
//! while the root context lives as long as the VM.

use std::cell::RefCell;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Alert,
    CacheWrite,
}

#[derive(Debug, Clone)]
pub struct Outgoing {
    pub kind: Kind,
    pub cluster: String,
    pub method: &'static str,
    pub path: String,
    pub authority: String,
    pub content_type: &'static str,
    pub body: String,
    pub timeout_ms: u64,
}

thread_local! {
    static PENDING: RefCell<Vec<Outgoing>> = const { RefCell::new(Vec::new()) };
}

/// Most calls held between two ticks; beyond, the oldest are dropped (and counted).
const MAX_PENDING: usize = 1024;

pub fn queue(call: Outgoing) {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() >= MAX_PENDING {
            let dropped = p.remove(0);
            let name = match dropped.kind {
                Kind::Alert => "pag0.alerts.dropped",
                Kind::CacheWrite => "pag0.cache.l2_dropped",
            };
            crate::host::metrics::add(name, 1);
        }
        p.push(call);
    });
}

pub fn take_all() -> Vec<Outgoing> {
    PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

/// Queues alerts for the webhook, if one is configured.
pub fn queue_alerts(cfg: &crate::core::compile::Config, raised: Vec<crate::core::alerts::Alert>) {
    for alert in raised {
        queue_alert_json(cfg, alert.to_json());
    }
}

/// Queues an alert body for the webhook, if one is configured.
pub fn queue_alert_json(cfg: &crate::core::compile::Config, body: String) {
    let Some(sink) = &cfg.alerts else {
        return;
    };
    queue(Outgoing {
        kind: Kind::Alert,
        cluster: sink.cluster.clone(),
        method: "POST",
        path: sink.path.clone(),
        authority: sink.authority.clone(),
        content_type: "application/json",
        body,
        timeout_ms: sink.timeout_ms,
    });
}
