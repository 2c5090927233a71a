//! One HTTP stream, a stage per file, in the order a request meets them:
//!
//! - [`identify`]: request headers → who is calling and what the call is (or the
//!   report API, or pag0's own paid retry coming back).
//! - [`gate`]: everything that decides whether the call goes upstream, at the
//!   moment the request is complete (headers, body end, or trailers): lists, the
//!   cache, the reservation, approval.
//! - [`cache`], [`approval`], [`budget`]: the gate's steps.
//! - [`respond`]: the upstream's answer: settle, tell the agent, fill the cache.
//! - [`pay`], [`relay`]: x402, when pag0 pays a 402 and when the agent pays.
//! - [`admin`]: the report API and the live page.
//! - [`waiters`]: streams waiting for an identical call's answer, for their body, or
//!   for every VM's report counts.
//!
//! A stage returns a [`Step`]; only [`Stream::resume`] turns a step taken outside the
//! stream's own callback into a host call. Dispatched calls are kept by token in
//! [`state::Pending`] and answered in `on_http_call_response` by an exhaustive match.

mod admin;
mod approval;
mod breaker;
mod budget;
mod cache;
mod gate;
mod identify;
mod meter;
mod pay;
mod relay;
mod respond;
pub mod state;
pub mod waiters;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::headers::BudgetView;
use crate::host::reply::{send_refusal, Shape};
use state::{Pending, Phase, StreamState};

/// What a stage decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The stream goes on.
    Continue,
    /// The stream waits (a callout, a body, a wait) or was answered locally.
    Pause,
}

impl Step {
    pub fn action(self) -> Action {
        match self {
            Step::Continue => Action::Continue,
            Step::Pause => Action::Pause,
        }
    }
}

/// A handle on one stream: its context id, the configuration, its state. Cloned into
/// waiters so that the root context can act on the stream later.
#[derive(Clone)]
pub struct Stream {
    pub id: u32,
    pub config: Rc<Config>,
    pub state: Rc<RefCell<StreamState>>,
}

impl Stream {
    /// Acts on a step taken outside the stream's own callback (a callout answer, a
    /// waiter): a `Continue` resumes the direction the stream is in.
    pub fn resume(&self, step: Step) {
        if step == Step::Pause || self.state.borrow().answered {
            return;
        }
        let request = self.state.borrow().phase == Phase::Request;
        if request {
            self.state.borrow_mut().forwarded = true;
        }
        let _ = crate::host::abi::resume(request);
    }
}

/// Who sends a stream's dispatched calls and gets their answers: the stream itself
/// (inside its own callbacks), or the root context on its behalf (when the stream
/// goes on from a waiter, outside its callbacks: the SDK routes an answer to the
/// context whose callback dispatched the call).
pub trait Dispatch {
    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        timeout: std::time::Duration,
    ) -> Result<u32, proxy_wasm::types::Status>;
    /// Remembers what waits for the answer to `token`.
    fn wait_for(&self, stream: &Stream, token: u32, pending: Pending);
}

pub struct Pag0Http {
    stream: Option<Stream>,
}

impl Dispatch for Pag0Http {
    fn dispatch(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        timeout: std::time::Duration,
    ) -> Result<u32, proxy_wasm::types::Status> {
        self.dispatch_http_call(cluster, headers, body, vec![], timeout)
    }

    fn wait_for(&self, stream: &Stream, token: u32, pending: Pending) {
        stream.state.borrow_mut().pending = Some((token, pending));
    }
}

/// Answers a dispatched call the stream waits for, through whoever dispatched it.
pub fn answer_callout(
    d: &dyn Dispatch,
    stream: &Stream,
    pending: Pending,
    body_size: usize,
) -> Step {
    match pending {
        Pending::CacheLevel2 => cache::on_level2_answer(d, stream, body_size),
        Pending::Approval(then) => approval::on_answer(d, stream, then, body_size),
        Pending::Signer => pay::on_signed(d, stream, body_size),
        Pending::PaidRetry => pay::on_paid_answer(stream, body_size),
        Pending::Reserve(wait) => budget::on_reserved(d, stream, wait, false, body_size),
        Pending::ReserveLoad(wait) => budget::on_reserved(d, stream, wait, true, body_size),
        Pending::AdminRemote(wait) => admin::on_remote_answer(d, stream, *wait, body_size),
    }
}

impl Pag0Http {
    pub fn new(context_id: u32, config: Option<Rc<Config>>) -> Pag0Http {
        Pag0Http {
            stream: config.map(|config| Stream {
                id: context_id,
                config,
                state: Rc::default(),
            }),
        }
    }
}

impl Context for Pag0Http {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        crate::host::new_callback();
        let Some(stream) = self.stream.clone() else {
            return;
        };
        let pending = {
            let mut s = stream.state.borrow_mut();
            match s.pending.take() {
                Some((t, p)) if t == token => Some(p),
                other => {
                    s.pending = other;
                    None
                }
            }
        };
        let Some(pending) = pending else { return };
        let step = answer_callout(self, &stream, pending, body_size);
        stream.resume(step);
    }
}

/// Counts a dispatched call that failed.
pub fn callout_failed(metric: &str) {
    crate::host::metrics::add(metric, 1);
}

/// The request goes upstream when a request callback says `Continue`.
fn forwarded_if(stream: &Stream, step: Step) -> Action {
    if step == Step::Continue {
        stream.state.borrow_mut().forwarded = true;
    }
    step.action()
}

impl HttpContext for Pag0Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        crate::host::new_callback();
        let Some(stream) = self.stream.clone() else {
            let refusal = Refusal::new(ErrorCode::ConfigError, "pag0 has no valid configuration");
            send_refusal(&refusal, &BudgetView::default(), Shape::Pag0, &[]);
            return Action::Pause;
        };
        // The kill and report APIs wait for every registered VM to forget its views and
        // write its counts: a VM joins before its first call, since Envoy may hand a
        // worker calls before its first tick (a free call there kept a view the kill API
        // did not wait for). After the first call this is one check. Not in
        // `on_configure`: Envoy also configures a VM that never ticks nor takes calls,
        // and every flush would wait for it (report API: 1 s, then stale).
        let _ = crate::host::vm::with(|vm| {
            vm.ledger
                .vm(&crate::host::shared::HostStore, crate::host::now_millis())
        });
        let step = identify::on_request_headers(self, &stream, end_of_stream);
        forwarded_if(&stream, step)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        crate::host::new_callback();
        let Some(stream) = self.stream.clone() else {
            return Action::Continue;
        };
        let step = gate::on_request_body(self, &stream, body_size, end_of_stream);
        forwarded_if(&stream, step)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        crate::host::new_callback();
        let Some(stream) = self.stream.clone() else {
            return Action::Continue;
        };
        let step = gate::on_request_trailers(self, &stream);
        forwarded_if(&stream, step)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        crate::host::new_callback();
        let Some(stream) = self.stream.clone() else {
            return Action::Continue;
        };
        stream.state.borrow_mut().phase = Phase::Response;
        respond::on_response_headers(self, &stream, end_of_stream).action()
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        crate::host::new_callback();
        let Some(stream) = self.stream.clone() else {
            return Action::Continue;
        };
        respond::on_response_body(self, &stream, body_size, end_of_stream).action()
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        crate::host::new_callback();
        let Some(stream) = self.stream.clone() else {
            return Action::Continue;
        };
        respond::on_response_trailers(&stream).action()
    }

    fn on_log(&mut self) {
        crate::host::new_callback();
        if let Some(stream) = self.stream.clone() {
            respond::on_log(&stream);
        }
    }
}
