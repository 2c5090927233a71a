//! The gate: everything that decides whether a call goes upstream, run once the
//! request is complete. A request can end three ways (headers with end of stream, the
//! body's last chunk, or trailers); all three come here, so none of them skips the
//! charge, the kill switch or approval. A stream reset before that never reaches the
//! upstream.

use proxy_wasm::types::BufferType;

use crate::core::firewall;
use crate::core::headers::BudgetView;
use crate::host::abi;
use crate::host::stream::budget::{admit, refuse, Admit};
use crate::host::stream::state::{AfterApproval, AfterReserve};
use crate::host::stream::{approval, breaker, cache, meter, waiters, Dispatch, Step, Stream};
use crate::host::vm;

/// Runs the gate for a complete request (its body, if it was read, in the state).
pub fn run(d: &dyn Dispatch, stream: &Stream) -> Step {
    let unpriced_meter = {
        let s = stream.state.borrow();
        s.meter_api.is_some() && s.meter.is_none()
    };
    if unpriced_meter {
        if let Err(refusal) = meter::prepare(stream) {
            let (caller, call) = {
                let s = stream.state.borrow();
                (s.caller.clone(), s.call.clone())
            };
            match (caller, call) {
                (Some(caller), Some(call)) => {
                    refuse(stream, &caller, &call, &refusal, &BudgetView::default())
                }
                _ => crate::host::stream::budget::answer_refusal(
                    stream,
                    &refusal,
                    &BudgetView::default(),
                ),
            }
            return Step::Pause;
        }
    }
    let (caller, call) = {
        let s = stream.state.borrow();
        match (s.caller.clone(), s.call.clone()) {
            (Some(caller), Some(call)) => (caller, call),
            _ => return Step::Continue,
        }
    };
    if let Err(refusal) = firewall::check_lists(&stream.config, &caller, &call) {
        refuse(stream, &caller, &call, &refusal, &BudgetView::default());
        return Step::Pause;
    }
    if let Err(refusal) = breaker::check(stream, &caller, &call) {
        refuse(stream, &caller, &call, &refusal, &BudgetView::default());
        return Step::Pause;
    }
    if stream.state.borrow().cache.is_some() {
        match cache::lookup(d, stream, &caller, &call) {
            cache::Lookup::Done(step) => return step,
            cache::Lookup::GoUpstream => {}
        }
    }
    go_upstream(d, stream)
}

/// A miss (or no cache): reserve, then ask for approval when the price calls for it.
pub fn go_upstream(d: &dyn Dispatch, stream: &Stream) -> Step {
    let (caller, call) = {
        let s = stream.state.borrow();
        match (s.caller.clone(), s.call.clone()) {
            (Some(caller), Some(call)) => (caller, call),
            _ => return Step::Continue,
        }
    };
    match admit(d, stream, &caller, &call, AfterReserve::Gate) {
        Admit::Yes => after_admit(d, stream),
        Admit::Waiting => Step::Pause,
        Admit::No => {
            cache::abandon_fill(stream);
            Step::Pause
        }
    }
}

/// Reserved: metering's limits, then approval when the price calls for it.
pub fn after_admit(d: &dyn Dispatch, stream: &Stream) -> Step {
    if meter::apply(stream) != Step::Continue {
        return Step::Pause;
    }
    approval::maybe_ask(d, stream, AfterApproval::Resume)
}

/// The request body. Held while the gate waits for all of it or while a callout is
/// out; copied as it passes when pay mode may need to retry the call.
pub fn on_request_body(
    d: &dyn Dispatch,
    stream: &Stream,
    body_size: usize,
    end_of_stream: bool,
) -> Step {
    {
        let s = stream.state.borrow();
        if s.internal {
            return Step::Continue;
        }
        if s.answered || s.is_waiting_for_callout() {
            return Step::Pause;
        }
    }
    let waiting = stream.state.borrow().deferred.waiting;
    if waiting {
        // Envoy holds the body: each call sees all of it so far; read what is new.
        read_new_body(stream, body_size);
        if let Some(step) = over_meter_limit(stream) {
            return step;
        }
        if !end_of_stream {
            return Step::Pause;
        }
        return finish_body(d, stream);
    }
    // Going upstream as it comes: pay mode keeps a copy to retry with a payment.
    keep_for_retry(
        stream,
        &abi::buffer(BufferType::HttpRequestBody, 0, body_size),
    );
    Step::Continue
}

/// Request trailers end the request (HTTP/2): the gate runs now if it waits.
pub fn on_request_trailers(d: &dyn Dispatch, stream: &Stream) -> Step {
    {
        let s = stream.state.borrow();
        if s.internal {
            return Step::Continue;
        }
        if s.answered || s.is_waiting_for_callout() {
            return Step::Pause;
        }
    }
    if stream.state.borrow().deferred.waiting {
        let seen = stream.state.borrow().deferred.body.len();
        let rest = abi::buffer(BufferType::HttpRequestBody, seen, usize::MAX);
        stream
            .state
            .borrow_mut()
            .deferred
            .body
            .extend_from_slice(&rest);
        return finish_body(d, stream);
    }
    Step::Continue
}

/// A metered call's body past `llm.maxBodyBytes` (one sent without a length): refused
/// as soon as it is, not buffered on.
fn over_meter_limit(stream: &Stream) -> Option<Step> {
    let limit = stream.config.llm.as_ref()?.max_body_bytes;
    let (metered, len, caller, call) = {
        let s = stream.state.borrow();
        (
            s.meter_api.is_some(),
            s.deferred.body.len(),
            s.caller.clone(),
            s.call.clone(),
        )
    };
    if !metered || len <= limit {
        return None;
    }
    let refusal = crate::core::errors::Refusal::new(
        crate::core::errors::ErrorCode::InvalidRequest,
        format!("the request body is over llm.maxBodyBytes ({limit}), the most pag0 reads to meter a call"),
    )
    .with_status(413);
    waiters::forget_body(stream.id);
    stream.state.borrow_mut().deferred = Default::default();
    if let (Some(caller), Some(call)) = (caller, call) {
        refuse(stream, &caller, &call, &refusal, &BudgetView::default());
    }
    Some(Step::Pause)
}

fn read_new_body(stream: &Stream, body_size: usize) {
    let seen = stream.state.borrow().deferred.body.len();
    if body_size > seen {
        let part = abi::buffer(BufferType::HttpRequestBody, seen, body_size - seen);
        stream
            .state
            .borrow_mut()
            .deferred
            .body
            .extend_from_slice(&part);
    }
}

/// The whole body is in: the gate runs.
fn finish_body(d: &dyn Dispatch, stream: &Stream) -> Step {
    waiters::forget_body(stream.id);
    let body = {
        let mut s = stream.state.borrow_mut();
        s.deferred.waiting = false;
        s.deferred.body.clone()
    };
    keep_for_retry(stream, &body);
    run(d, stream)
}

/// Pay mode: keeps the body to retry the call with a payment, within the stream's
/// limit and the VM's budget for kept bodies.
fn keep_for_retry(stream: &Stream, chunk: &[u8]) {
    let (body_limit, buffer_limit) = (stream.config.pay_body_limit, stream.config.pay_buffer_limit);
    let mut s = stream.state.borrow_mut();
    let Some(pay) = s.pay.as_mut() else { return };
    if pay.lost_body.is_some() || chunk.is_empty() {
        return;
    }
    let total = pay.body.len() + chunk.len();
    if total > body_limit {
        pay.lost_body = Some("larger than signer.maxBodyBytes");
        vm::release_bytes(pay.held);
        pay.held = 0;
        pay.body = Vec::new();
        return;
    }
    if total > pay.held {
        if !vm::hold_bytes(total - pay.held, buffer_limit) {
            pay.lost_body =
                Some("the VM's bodies kept for paid retries are at signer.maxBufferedBytes");
            vm::release_bytes(pay.held);
            pay.held = 0;
            pay.body = Vec::new();
            return;
        }
        pay.held = total;
    }
    pay.body.extend_from_slice(chunk);
}
