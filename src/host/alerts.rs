//! Alerts raised while handling requests wait here until the root context's next tick
//! sends them: a callout from an HTTP stream would be cancelled if the stream ended
//! first, while the root context lives as long as the VM.

use std::cell::RefCell;

thread_local! {
    static PENDING: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Most alerts held between two ticks; beyond, the oldest are dropped (and counted).
const MAX_PENDING: usize = 1024;

pub fn queue(body: String) {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() >= MAX_PENDING {
            p.remove(0);
            crate::host::metrics::add("pag0.alerts.dropped", 1);
        }
        p.push(body);
    });
}

pub fn take_all() -> Vec<String> {
    PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()))
}
