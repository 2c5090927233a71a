//! Streams waiting for an identical call's answer. The root context's tick looks at
//! their cache slots: when the answer is in, it serves it on the waiting stream; when
//! the first call gave up or the wait ran out, it admits the stream (reserving as
//! usual) and lets it go upstream itself.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

use crate::core::cache::{self, Found};
use crate::core::compile::Config;
use crate::core::firewall::{Call, Caller};
use crate::host::http::{admit_stream, serve_hit, StreamState};
use crate::host::shared::HostStore;
use crate::host::{log, now_millis};

pub struct Waiter {
    pub context_id: u32,
    pub config: Rc<Config>,
    pub state: Rc<RefCell<StreamState>>,
    pub caller: Caller,
    pub call: Call,
    pub slot: u32,
    pub key: String,
    pub deadline_ms: u64,
}

/// How long a stream waits for its request body before going upstream uncached.
const BODY_WAIT_MS: u64 = 1000;

struct BodyWatch {
    context_id: u32,
    config: Rc<Config>,
    state: Rc<RefCell<StreamState>>,
    deadline_ms: u64,
}

thread_local! {
    static WAITING: RefCell<Vec<Waiter>> = const { RefCell::new(Vec::new()) };
    static BODIES: RefCell<Vec<BodyWatch>> = const { RefCell::new(Vec::new()) };
    static WARNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Watches a stream that waits for its request body.
pub fn watch_body(context_id: u32, config: Rc<Config>, state: Rc<RefCell<StreamState>>) {
    let deadline_ms = now_millis().saturating_add(BODY_WAIT_MS);
    BODIES.with(|b| {
        b.borrow_mut().push(BodyWatch {
            context_id,
            config,
            state,
            deadline_ms,
        })
    });
}

pub fn wait(waiter: Waiter) {
    WAITING.with(|w| w.borrow_mut().push(waiter));
}

/// The stream ended (client gone): stop waiting for it.
pub fn forget(context_id: u32) {
    WAITING.with(|w| {
        w.borrow_mut()
            .retain(|waiter| waiter.context_id != context_id)
    });
    BODIES.with(|b| {
        b.borrow_mut()
            .retain(|watch| watch.context_id != context_id)
    });
}

pub fn any() -> bool {
    WAITING.with(|w| !w.borrow().is_empty()) || BODIES.with(|b| !b.borrow().is_empty())
}

/// Streams whose body never came (Envoy without `allow_on_headers_stop_iteration`
/// holds it back): admit them and let them go upstream uncached.
fn release_stalled_bodies(root_context_id: u32, now: u64) {
    let (due, still): (Vec<BodyWatch>, Vec<BodyWatch>) = BODIES
        .with(|b| std::mem::take(&mut *b.borrow_mut()))
        .into_iter()
        .partition(|watch| now >= watch.deadline_ms);
    BODIES.with(|b| b.borrow_mut().extend(still));
    if due.is_empty() {
        return;
    }
    for watch in due {
        let deferred = watch.state.borrow_mut().deferred.take();
        let Some(deferred) = deferred else { continue };
        if !WARNED.with(|w| w.replace(true)) {
            log(
                LogLevel::Warn,
                "pag0: request bodies are not reaching the filter; set allow_on_headers_stop_iteration: true in the wasm filter config so POST answers can be cached",
            );
        }
        if hostcalls::set_effective_context(watch.context_id).is_err() {
            continue;
        }
        if matches!(
            admit_stream(
                &watch.config,
                &watch.state,
                &deferred.caller,
                &deferred.call
            ),
            proxy_wasm::types::Action::Continue
        ) {
            let _ = hostcalls::resume_http_request();
        }
    }
    let _ = hostcalls::set_effective_context(root_context_id);
}

/// Called on the root context's tick.
pub fn poll_all(root_context_id: u32) {
    release_stalled_bodies(root_context_id, now_millis());
    let waiting = WAITING.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if waiting.is_empty() {
        return;
    }
    let now = now_millis();
    let mut still = Vec::new();
    for waiter in waiting {
        let found = cache::poll(&HostStore, waiter.slot, &waiter.key, now);
        let outcome = match found {
            Ok(Found::Pending(_)) if now < waiter.deadline_ms => {
                still.push(waiter);
                continue;
            }
            Ok(found) => found,
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("pag0: cache poll failed: {}", e.message),
                );
                Found::Claimed(u32::MAX)
            }
        };
        // Act on the waiting stream; if it is gone, there is nothing to do.
        if hostcalls::set_effective_context(waiter.context_id).is_err() {
            continue;
        }
        match outcome {
            Found::Hit(entry) => serve_hit(
                &waiter.config,
                &waiter.state,
                &waiter.caller,
                &waiter.call,
                &entry,
            ),
            _ => {
                // Go upstream ourselves, reserving as any call does.
                if matches!(
                    admit_stream(&waiter.config, &waiter.state, &waiter.caller, &waiter.call),
                    proxy_wasm::types::Action::Continue
                ) {
                    let _ = hostcalls::resume_http_request();
                }
            }
        }
    }
    let _ = hostcalls::set_effective_context(root_context_id);
    WAITING.with(|w| w.borrow_mut().extend(still));
}
