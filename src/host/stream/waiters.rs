//! Streams waiting outside their own callbacks, woken by the root context's tick:
//! for an identical call's answer (served as a hit, or the stream goes upstream
//! itself), for their request body (without `allow_on_headers_stop_iteration` Envoy
//! never hands it over: the stream then goes on uncached), and for every VM to write
//! its report counts (the report API). Calls a stream dispatches from here are sent by
//! the root context and their answers routed back to the stream.

use std::cell::RefCell;

use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::Context;
use proxy_wasm::types::LogLevel;

use crate::core::cache::{self, Found};
use crate::host::shared::HostStore;
use crate::host::stream::admin::AfterFlush;
use crate::host::stream::state::Pending;
use crate::host::stream::{admin, answer_callout, cache as cache_stage, gate, Dispatch, Stream};
use crate::host::{log, now_millis, vm};

/// How long a stream waits for its request body before going upstream uncached.
const BODY_WAIT_MS: u64 = 1000;
/// How long the report API waits for every VM to write its counts.
pub const FLUSH_WAIT_MS: u64 = 1000;

enum Wait {
    Answer {
        stream: Stream,
        slot: u32,
        key: String,
        deadline_ms: u64,
    },
    Body {
        stream: Stream,
        deadline_ms: u64,
    },
    Flush {
        stream: Stream,
        epoch: u64,
        deadline_ms: u64,
        then: AfterFlush,
    },
}

impl Wait {
    fn id(&self) -> u32 {
        match self {
            Wait::Answer { stream, .. }
            | Wait::Body { stream, .. }
            | Wait::Flush { stream, .. } => stream.id,
        }
    }
}

thread_local! {
    static WAITING: RefCell<Vec<Wait>> = const { RefCell::new(Vec::new()) };
    static ROUTED: RefCell<HashMap<u32, (Stream, Pending)>> = RefCell::new(HashMap::new());
    static WARNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn push(wait: Wait) {
    WAITING.with(|w| w.borrow_mut().push(wait));
}

pub fn wait_for_answer(stream: Stream, slot: u32, key: String, deadline_ms: u64) {
    push(Wait::Answer {
        stream,
        slot,
        key,
        deadline_ms,
    });
}

pub fn watch_body(stream: Stream) {
    push(Wait::Body {
        stream,
        deadline_ms: now_millis().saturating_add(BODY_WAIT_MS),
    });
}

/// Waits until every VM has acknowledged flush request `epoch` (or
/// [`FLUSH_WAIT_MS`]), then answers as `then` says.
pub fn wait_for_flush(stream: Stream, epoch: u64, then: AfterFlush) {
    push(Wait::Flush {
        stream,
        epoch,
        deadline_ms: now_millis().saturating_add(FLUSH_WAIT_MS),
        then,
    });
}

/// The stream ended: stop waiting for it. Returns the calls the root context had sent
/// for it that are still out (their answers will find no stream), for the stream to
/// give back what they hold.
pub fn forget(context_id: u32) -> Vec<Pending> {
    WAITING.with(|w| w.borrow_mut().retain(|wait| wait.id() != context_id));
    ROUTED.with(|r| {
        let mut r = r.borrow_mut();
        let tokens: Vec<u32> = r
            .iter()
            .filter(|(_, (stream, _))| stream.id == context_id)
            .map(|(token, _)| *token)
            .collect();
        tokens
            .into_iter()
            .filter_map(|token| r.remove(&token).map(|(_, pending)| pending))
            .collect()
    })
}

/// The stream's body came: stop watching for it.
pub fn forget_body(context_id: u32) {
    WAITING.with(|w| {
        w.borrow_mut()
            .retain(|wait| !matches!(wait, Wait::Body { stream, .. } if stream.id == context_id))
    });
}

pub fn any() -> bool {
    WAITING.with(|w| !w.borrow().is_empty())
}

/// Dispatches calls for a stream from the root context.
pub struct RootDispatch<'a>(pub &'a dyn Context);

impl Dispatch for RootDispatch<'_> {
    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        timeout: std::time::Duration,
    ) -> Result<u32, proxy_wasm::types::Status> {
        self.0
            .dispatch_http_call(cluster, headers, body, vec![], timeout)
    }

    fn wait_for(&self, stream: &Stream, token: u32, pending: Pending) {
        ROUTED.with(|r| r.borrow_mut().insert(token, (stream.clone(), pending)));
    }
}

/// An answer to a call the root context sent for a stream; `false` if it is not one.
pub fn route_answer(root: &dyn Context, root_id: u32, token: u32, body_size: usize) -> bool {
    let Some((stream, pending)) = ROUTED.with(|r| r.borrow_mut().remove(&token)) else {
        return false;
    };
    if hostcalls::set_effective_context(stream.id).is_ok() {
        let step = answer_callout(&RootDispatch(root), &stream, pending, body_size);
        stream.resume(step);
    }
    let _ = hostcalls::set_effective_context(root_id);
    true
}

/// Called on the root context's tick: acts on the waits that are due.
pub fn poll_all(root: &dyn Context, root_id: u32) {
    let waiting = WAITING.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if waiting.is_empty() {
        return;
    }
    let now = now_millis();
    let mut still = Vec::new();
    for wait in waiting {
        match wait {
            Wait::Answer {
                stream,
                slot,
                key,
                deadline_ms,
            } => {
                let found = match cache::poll(&HostStore, slot, &key, now) {
                    Ok(Found::Pending(_)) if now < deadline_ms => {
                        still.push(Wait::Answer {
                            stream,
                            slot,
                            key,
                            deadline_ms,
                        });
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
                if hostcalls::set_effective_context(stream.id).is_err() {
                    continue;
                }
                let (caller, call) = {
                    let s = stream.state.borrow();
                    (s.caller.clone(), s.call.clone())
                };
                let step = match (found, caller, call) {
                    (Found::Hit(entry), Some(caller), Some(call)) => {
                        cache_stage::serve_hit(&stream, &caller, &call, &entry)
                    }
                    // The first call gave up or the wait ran out: go upstream, reserving as any call does.
                    _ => gate::go_upstream(&RootDispatch(root), &stream),
                };
                stream.resume(step);
            }
            Wait::Body {
                stream,
                deadline_ms,
            } => {
                if now < deadline_ms {
                    still.push(Wait::Body {
                        stream,
                        deadline_ms,
                    });
                    continue;
                }
                if !stream.state.borrow().deferred.waiting {
                    continue;
                }
                if !WARNED.with(|w| w.replace(true)) {
                    log(
                        LogLevel::Warn,
                        "pag0: request bodies are not reaching the filter; set allow_on_headers_stop_iteration: true in the wasm filter config so POST answers can be cached",
                    );
                }
                if hostcalls::set_effective_context(stream.id).is_err() {
                    continue;
                }
                let metered = stream.state.borrow().meter_api.is_some();
                {
                    let mut s = stream.state.borrow_mut();
                    s.deferred.waiting = false;
                    s.cache = None;
                }
                if metered {
                    // A metered call cannot be priced without its body: it fails closed.
                    let refusal = crate::core::errors::Refusal::new(
                        crate::core::errors::ErrorCode::ConfigError,
                        "pag0 needs the request body of a metered call: set allow_on_headers_stop_iteration: true in the wasm filter config",
                    );
                    crate::host::stream::budget::answer_refusal(
                        &stream,
                        &refusal,
                        &Default::default(),
                    );
                    continue;
                }
                let step = gate::run(&RootDispatch(root), &stream);
                stream.resume(step);
            }
            Wait::Flush {
                stream,
                epoch,
                deadline_ms,
                then,
            } => {
                let done = vm::with(|vm| vm.ledger.flushed(&stream.config, &HostStore, epoch, now));
                if !done && now < deadline_ms {
                    still.push(Wait::Flush {
                        stream,
                        epoch,
                        deadline_ms,
                        then,
                    });
                    continue;
                }
                if hostcalls::set_effective_context(stream.id).is_err() {
                    continue;
                }
                admin::after_flush(&RootDispatch(root), &stream, then, done);
            }
        }
    }
    let _ = hostcalls::set_effective_context(root_id);
    WAITING.with(|w| w.borrow_mut().extend(still));
}
