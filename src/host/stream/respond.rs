//! The upstream's answer: settle the call, tell the agent what it cost and what is
//! left, decide whether the answer fills the cache; and the end of the stream, which
//! settles what is still open (the client went away) and gives back what the stream
//! held.

use proxy_wasm::types::{BufferType, MapType};

use crate::core::cache::AnswerFacts;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::firewall::should_commit;
use crate::core::ledger::Outcome;
use crate::core::payments::{payment_outcome, PaymentOutcome};
use crate::core::x402;
use crate::host::stream::budget::{answer_refusal_with, set_state, settle};
use crate::host::stream::identify::OWN_HEADER_PREFIX;
use crate::host::stream::state::PayStage;
use crate::host::stream::{breaker, cache, meter, pay, relay, waiters, Dispatch, Step, Stream};
use crate::host::{abi, props, vm};

/// The answer's headers, read once.
struct Answer {
    headers: abi::HeaderMap,
}

impl Answer {
    fn read() -> Answer {
        Answer {
            headers: abi::HeaderMap::read(MapType::HttpResponseHeaders),
        }
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }

    fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn status(&self) -> Option<u32> {
        std::str::from_utf8(self.get(":status")?).ok()?.parse().ok()
    }

    /// Whether the answer came from the upstream rather than from Envoy itself (a
    /// refused connection, a timeout, a local reply of another filter): the router adds
    /// `x-envoy-upstream-service-time` to every upstream answer; without it (or with a
    /// router that suppresses Envoy's headers) the stream's `code_details` says.
    fn came_from_upstream(&self) -> bool {
        self.get("x-envoy-upstream-service-time").is_some() || props::response_from_upstream()
    }
}

fn set(name: &str, value: &str) {
    let _ = abi::set_header(MapType::HttpResponseHeaders, name, value.as_bytes());
}

/// Only pag0 speaks `x-pag0-*`: an upstream's own are dropped.
fn strip_own(answer: &Answer) {
    for (name, _) in answer.headers.iter() {
        if name.starts_with(OWN_HEADER_PREFIX.as_bytes()) {
            if let Ok(name) = std::str::from_utf8(name) {
                let _ = abi::remove_header(MapType::HttpResponseHeaders, name);
            }
        }
    }
}

pub fn on_response_headers(d: &dyn Dispatch, stream: &Stream, end_of_stream: bool) -> Step {
    {
        let s = stream.state.borrow();
        if s.internal || s.answered || s.ticket.is_none() {
            return Step::Continue;
        }
    }
    let answer = Answer::read();
    let status = answer.status();
    // A free call commits nothing: where its answer came from does not matter.
    let priced = stream
        .state
        .borrow()
        .ticket
        .as_ref()
        .is_some_and(|t| t.price > 0)
        || stream.state.borrow().call.as_ref().is_some_and(|c| c.x402);
    let came_from_upstream = !priced || answer.came_from_upstream();
    if stream.state.borrow().meter.is_some() {
        strip_own(&answer);
        return meter::on_response_headers(
            stream,
            status,
            answer.get("content-type"),
            came_from_upstream,
            end_of_stream,
        );
    }
    if status == Some(402) && came_from_upstream {
        if pay::armed(stream) {
            if let Some(step) = pay::on_402(d, stream, end_of_stream) {
                return step;
            }
        } else if relay::applies(stream) {
            if let Some(step) = relay::on_402(stream, end_of_stream) {
                return step;
            }
        }
    }
    if answer_headers_with(stream, &answer, status, came_from_upstream) && end_of_stream {
        cache::store(stream);
    }
    Step::Continue
}

/// Settles the call from the upstream's answer and sets pag0's headers. Returns
/// whether the answer goes on to the agent (false: pag0 answered in its place).
pub fn answer_headers(stream: &Stream, status: Option<u32>, came_from_upstream: bool) -> bool {
    answer_headers_with(stream, &Answer::read(), status, came_from_upstream)
}

/// `x-pag0-reservation`: the Redis ledger's id of the call's reservation, which its
/// settlement (or expiry) is recorded under: every charge can be traced to a call.
pub fn reservation_header(stream: &Stream, set: impl Fn(&str, &str)) {
    if let Some(id) = stream.state.borrow().reservation.as_deref() {
        set("x-pag0-reservation", id);
    }
}

fn answer_headers_with(
    stream: &Stream,
    answer: &Answer,
    status: Option<u32>,
    came_from_upstream: bool,
) -> bool {
    let upstream_status = if came_from_upstream { status } else { None };
    strip_own(answer);
    let (payment, charge_on, price) = {
        let s = stream.state.borrow();
        (
            s.call.as_ref().and_then(|c| c.payment.clone()),
            s.call.as_ref().map(|c| c.charge_on),
            s.ticket.as_ref().map_or(0, |t| t.price),
        )
    };
    let cost = match &payment {
        None => {
            let commit = charge_on.is_some_and(|c| should_commit(c, upstream_status));
            settle(
                stream,
                &if commit {
                    Outcome::commit(price)
                } else {
                    Outcome::release()
                },
            )
        }
        Some(paid) => {
            let settlement = answer.get(x402::settlement_header(paid.version));
            let outcome = payment_outcome(upstream_status, settlement);
            let effect = outcome.effect(paid.value, &paid.network);
            if !came_from_upstream && outcome == PaymentOutcome::Unconfirmed {
                // Envoy's own answer (a timeout, a reset): the agent's payment may have
                // been taken. Charged, flagged, and said in pag0's own words.
                let charged = settle(
                    stream,
                    &Outcome {
                        cost: price,
                        unconfirmed: true,
                        ..Outcome::default()
                    },
                );
                let refusal = Refusal::new(
                    ErrorCode::PaymentUnconfirmed,
                    "the paid call got no answer from the server (timeout or reset): the payment may have been made, so it is charged and flagged unconfirmed",
                )
                .with_fields(vec![
                    ("amount", paid.value.to_string()),
                    ("network", paid.network.clone()),
                    ("upstreamStatus", status.map_or_else(String::new, |s| s.to_string())),
                ])
                .with_charged(charged);
                let view = stream.state.borrow().view.clone();
                stream.state.borrow_mut().replaced = true;
                answer_refusal_with(
                    stream,
                    &refusal,
                    &view,
                    &[("x-pag0-payment", &effect.header)],
                );
                return false;
            }
            set("x-pag0-payment", &effect.header);
            let cost = if effect.commit { price } else { 0 };
            settle(
                stream,
                &Outcome {
                    cost,
                    unconfirmed: effect.unconfirmed,
                    ..Outcome::default()
                },
            )
        }
    };
    let cost_text = cost.to_string();
    set_state(stream, "pag0_cost", &cost_text);
    set("x-pag0-cost", &cost_text);
    set("x-pag0-cached", "false");
    reservation_header(stream, set);
    let (remaining, alert) = {
        let s = stream.state.borrow();
        (s.view.remaining_header(), s.view.alert_header())
    };
    if !remaining.is_empty() {
        set("x-pag0-budget-remaining", &remaining);
    }
    if let Some(alert) = alert {
        set("x-pag0-budget-alert", &alert);
    }
    if let Some(warning) = breaker::warning_header(stream) {
        set("x-pag0-loop-warning", &warning);
    }
    if stream.state.borrow().fill.is_some() {
        let cache_control = answer.text("cache-control");
        let vary = answer.text("vary");
        let content_type = answer.text("content-type");
        let facts = AnswerFacts {
            status: if came_from_upstream {
                status.unwrap_or(0)
            } else {
                0
            },
            cache_control: cache_control.as_deref(),
            has_set_cookie: answer.get("set-cookie").is_some(),
            vary: vary.as_deref(),
            content_type: content_type.as_deref(),
            has_content_range: answer.get("content-range").is_some(),
        };
        let length = answer
            .text("content-length")
            .and_then(|l| l.parse::<usize>().ok());
        let encoding = answer.text("content-encoding").unwrap_or_default();
        cache::decide(stream, &facts, length, encoding, cost);
    }
    true
}

pub fn on_response_body(
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
        if s.replaced {
            return Step::Pause;
        }
    }
    if stream
        .state
        .borrow()
        .meter
        .as_ref()
        .is_some_and(|f| f.answer.is_some())
    {
        return meter::on_response_body(stream, body_size, end_of_stream);
    }
    let reading_relay = stream.state.borrow().reading_relay_offer;
    if pay::reading_offer(stream) || reading_relay {
        // A 402 without a v2 header: its body may be a v1 offer.
        if !end_of_stream && body_size <= pay::MAX_OFFER_BODY {
            return Step::Pause;
        }
        let body = if body_size <= pay::MAX_OFFER_BODY {
            abi::buffer(BufferType::HttpResponseBody, 0, body_size)
        } else {
            Vec::new()
        };
        return if reading_relay {
            relay::on_402_body(stream, &body)
        } else {
            pay::on_402_body(d, stream, &body)
        };
    }
    // Paying for a 402: hold its body back (the paid answer replaces it).
    if pay::paying(stream) {
        return Step::Pause;
    }
    if stream.state.borrow().fill.is_some() {
        let chunk = abi::buffer(BufferType::HttpResponseBody, 0, body_size);
        cache::copy(stream, &chunk, end_of_stream);
    }
    Step::Continue
}

/// The answer's trailers: its end, when it ends with them (HTTP/2).
pub fn on_response_trailers(stream: &Stream) -> Step {
    if stream.state.borrow().internal {
        return Step::Continue;
    }
    meter::on_response_trailers(stream)
}

/// The stream ended: settle what is still open and give back what it held.
pub fn on_log(stream: &Stream) {
    let routed = waiters::forget(stream.id);
    super::budget::forget_reservation(stream, routed);
    let (internal, open, forwarded, stage, paid) = {
        let s = stream.state.borrow();
        (
            s.internal,
            s.ticket.as_ref().map(|t| t.price),
            s.forwarded,
            s.pay.as_ref().map(|p| p.stage),
            s.call.as_ref().is_some_and(|c| c.payment.is_some()),
        )
    };
    if internal {
        return;
    }
    if let Some(price) = open {
        // A call that went upstream and was never answered (the client went away, a
        // timeout): the upstream may have done, and billed, the work, so it stays
        // charged; a payment in flight is flagged unconfirmed. A call that never went
        // upstream (or a payment not yet sent) is given back.
        let sent_payment = stage == Some(PayStage::Retrying) || paid;
        let outcome = if stage == Some(PayStage::Retrying)
            || (forwarded && !matches!(stage, Some(PayStage::Approving | PayStage::Signing)))
        {
            // A metered call cut before its usage came: its reservation, unmetered.
            meter::outcome_if_cut(stream).unwrap_or(Outcome {
                cost: price,
                unconfirmed: sent_payment,
                ..Outcome::default()
            })
        } else {
            Outcome::release()
        };
        settle(stream, &outcome);
    }
    cache::abandon_fill(stream);
    if let Some(pay) = stream.state.borrow_mut().pay.as_mut() {
        vm::release_bytes(pay.held);
        pay.held = 0;
    }
}
