//! Token metering on the stream (route metadata `meter`). Before the gate: the
//! request body is read, its upper bound becomes the call's price (and the least it
//! may be lowered to). After the reservation: the output limit the reservation pays
//! for is written into the body. On the way back: the usage is read from the JSON
//! answer (its headers held until then, so `x-pag0-cost` is the real cost) or from the
//! SSE stream as it passes (never held), and the call settled at its real cost.

use std::rc::Rc;

use proxy_wasm::types::{BufferType, MapType};

use crate::core::call::{Call, MeterKind};
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::firewall::should_commit;
use crate::core::ledger::Outcome;
use crate::core::meter::request::{self, Api};
use crate::core::meter::usage::{AnswerMeter, Metered};
use crate::host::abi;
use crate::host::stream::budget::{release_and_refuse, settle};
use crate::host::stream::state::MeterFlow;
use crate::host::stream::{Step, Stream};

/// The API a call on a metered route speaks, when the meter prices its path.
pub fn api_of(call: &Call, path: &[u8]) -> Option<Api> {
    let kind: MeterKind = call.meter?;
    Api::for_path(kind, &String::from_utf8_lossy(path))
}

/// The request body is complete: read it and price the call by its upper bound.
/// Returns the refusal for a body that cannot be metered (nothing reserved yet).
pub fn prepare(stream: &Stream) -> Result<(), Refusal> {
    let cfg = &stream.config;
    let Some(settings) = cfg.llm.as_ref() else {
        return Err(Refusal::new(
            ErrorCode::ConfigError,
            "a metered route needs the llm block in the plugin configuration",
        ));
    };
    let (api, body, call) = {
        let s = stream.state.borrow();
        match (s.meter_api, s.call.clone()) {
            (Some(api), Some(call)) => (api, s.deferred.body.clone(), call),
            _ => return Ok(()),
        }
    };
    let request = request::read(api, &body, settings)?;
    let asked = request.asked_output(settings);
    let priced = Call {
        price: request.bound(asked),
        min_price: Some(request.bound(request.min_output(settings))),
        ..Call::clone(&call)
    };
    let mut s = stream.state.borrow_mut();
    s.call = Some(Rc::new(priced));
    s.meter = Some(Box::new(MeterFlow {
        request,
        plan: None,
        answer: None,
        holding: false,
    }));
    Ok(())
}

/// The call is admitted with `reserved` (its bound, or less when the budget is short):
/// writes the output limit that pays for into the body, and asks for an answer pag0
/// can read. Runs in the request body's callback, where the body can still change.
/// Returns `Step::Pause` when it refused the call instead.
pub fn apply(stream: &Stream) -> Step {
    let cfg = &stream.config;
    let reserved = stream.state.borrow().ticket.as_ref().map_or(0, |t| t.price);
    let (planned, held) = {
        let s = stream.state.borrow();
        match (s.meter.as_ref(), cfg.llm.as_ref()) {
            (Some(flow), Some(settings)) => (
                flow.request
                    .plan(settings, reserved)
                    .map(|plan| (plan, flow.request.rewrite(&s.deferred.body, &plan))),
                s.deferred.body.len(),
            ),
            _ => return Step::Continue,
        }
    };
    let Some((plan, body)) = planned else {
        // Cannot happen: the reservation is at least the bound of the least limit.
        release_and_refuse(
            stream,
            &Refusal::new(
                ErrorCode::InternalError,
                "the reservation does not cover the least output limit",
            ),
        );
        return Step::Pause;
    };
    if let Some(body) = body {
        // Replaces the whole body Envoy holds (all of it was read to meter the call).
        let _ = abi::set_buffer(BufferType::HttpRequestBody, 0, held, &body);
        if abi::map_value(MapType::HttpRequestHeaders, "content-length").is_some() {
            let _ = abi::set_header(
                MapType::HttpRequestHeaders,
                "content-length",
                body.len().to_string().as_bytes(),
            );
        }
    }
    // The usage is read from the answer: it must come uncompressed.
    let _ = abi::set_header(MapType::HttpRequestHeaders, "accept-encoding", b"identity");
    if let Some(flow) = stream.state.borrow_mut().meter.as_mut() {
        flow.plan = Some(plan);
    }
    Step::Continue
}

fn set(name: &str, value: &str) {
    let _ = abi::set_header(MapType::HttpResponseHeaders, name, value.as_bytes());
}

/// The answer's headers on a metered call. A streamed answer goes on at once, saying
/// what was reserved; a JSON answer's headers wait for its body (`Step::Pause`).
pub fn on_response_headers(
    stream: &Stream,
    status: Option<u32>,
    content_type: Option<&[u8]>,
    came_from_upstream: bool,
    end_of_stream: bool,
) -> Step {
    let upstream_status = if came_from_upstream { status } else { None };
    let charge_on = stream.state.borrow().call.as_ref().map(|c| c.charge_on);
    let billed = charge_on.is_some_and(|c| should_commit(c, upstream_status));
    if !billed {
        // An error answer (the APIs do not bill those) or Envoy's own: released.
        let cost = settle(stream, &Outcome::release());
        answer_headers(stream, cost);
        return Step::Continue;
    }
    let streaming = content_type.is_some_and(|t| t.starts_with(b"text/event-stream"));
    let api = match stream.state.borrow().meter.as_ref() {
        Some(flow) => flow.request.api,
        None => return Step::Continue,
    };
    if let Some(flow) = stream.state.borrow_mut().meter.as_mut() {
        flow.answer = Some(AnswerMeter::new(api, streaming));
        flow.holding = !streaming && !end_of_stream;
    }
    if end_of_stream {
        let cost = finish(stream);
        answer_headers(stream, cost);
        return Step::Continue;
    }
    if streaming {
        answer_headers(stream, charged_if_unmetered(stream));
        return Step::Continue;
    }
    Step::Pause
}

/// A chunk of a metered answer.
pub fn on_response_body(stream: &Stream, body_size: usize, end_of_stream: bool) -> Step {
    let holding = match stream.state.borrow().meter.as_ref() {
        Some(flow) if flow.answer.is_some() => flow.holding,
        _ => return Step::Continue,
    };
    if holding && !end_of_stream {
        // Envoy keeps the body; all of it is read at its end.
        return Step::Pause;
    }
    let chunk = abi::buffer(BufferType::HttpResponseBody, 0, body_size);
    if let Some(answer) = stream
        .state
        .borrow_mut()
        .meter
        .as_mut()
        .and_then(|f| f.answer.as_mut())
    {
        answer.feed(&chunk);
    }
    if end_of_stream {
        let cost = finish(stream);
        if holding {
            answer_headers(stream, cost);
        }
    }
    Step::Continue
}

/// The answer ended with trailers: settle, as at the body's end.
pub fn on_response_trailers(stream: &Stream) -> Step {
    let holding = match stream.state.borrow().meter.as_ref() {
        Some(flow) if flow.answer.is_some() => flow.holding,
        _ => return Step::Continue,
    };
    if holding {
        let body = abi::buffer(BufferType::HttpResponseBody, 0, usize::MAX);
        if let Some(answer) = stream
            .state
            .borrow_mut()
            .meter
            .as_mut()
            .and_then(|f| f.answer.as_mut())
        {
            answer.feed(&body);
        }
    }
    let cost = finish(stream);
    if holding {
        answer_headers(stream, cost);
    }
    Step::Continue
}

/// Reads the usage the answer gave and settles: its real cost, or, without usage, the
/// reservation (counted unmetered). Returns what the call cost.
fn finish(stream: &Stream) -> u64 {
    let (metered, model, rates) = {
        let mut s = stream.state.borrow_mut();
        let Some(flow) = s.meter.as_mut() else {
            return 0;
        };
        let metered = flow
            .answer
            .as_mut()
            .map_or(Metered::Unmetered, AnswerMeter::finish);
        (metered, flow.request.model.clone(), flow.request.rates)
    };
    if stream.state.borrow().ticket.is_none() {
        return 0;
    }
    let reserved = charged_if_unmetered(stream);
    let outcome = match metered {
        Metered::Usage(usage) => Outcome {
            cost: usage.cost(&rates),
            tokens: Some(usage.tokens()),
            model: Some(model),
            ..Outcome::default()
        },
        Metered::Unmetered => Outcome {
            cost: reserved,
            unmetered: true,
            model: Some(model),
            ..Outcome::default()
        },
    };
    settle(stream, &outcome)
}

/// The call's end when the stream ends first (the client went away, the upstream cut
/// the answer before its end): its usage if the stream's last word already passed (a
/// client that stops reading at `message_stop` or the usage chunk may close before
/// Envoy sees the end of the stream), else the reservation, unmetered.
pub fn outcome_if_cut(stream: &Stream) -> Option<Outcome> {
    let cost = charged_if_unmetered(stream);
    let mut s = stream.state.borrow_mut();
    let flow = s.meter.as_mut()?;
    let model = flow.request.model.clone();
    if let Some(Metered::Usage(usage)) = flow.answer.as_mut().map(AnswerMeter::finish_cut) {
        return Some(Outcome {
            cost: usage.cost(&flow.request.rates),
            tokens: Some(usage.tokens()),
            model: Some(model),
            ..Outcome::default()
        });
    }
    Some(Outcome {
        cost,
        unmetered: true,
        model: Some(model),
        ..Outcome::default()
    })
}

/// What a call whose usage never comes is charged: the bound of the output limit it
/// went with. The reservation may hold a little more (a lowered limit leaves less than
/// one output token's price of the remainder reserved); settling releases that.
fn charged_if_unmetered(stream: &Stream) -> u64 {
    let s = stream.state.borrow();
    let reserved = s.ticket.as_ref().map_or(0, |t| t.price);
    s.meter
        .as_ref()
        .and_then(|f| f.plan)
        .map_or(reserved, |p| p.bound.min(reserved))
}

/// pag0's headers on a metered answer.
fn answer_headers(stream: &Stream, cost: u64) {
    set("x-pag0-cost", &cost.to_string());
    set("x-pag0-cached", "false");
    super::respond::reservation_header(stream, set);
    let (remaining, alert, lowered) = {
        let s = stream.state.borrow();
        let lowered = s
            .meter
            .as_ref()
            .and_then(|f| f.plan)
            .filter(|p| p.lowered)
            .map(|p| p.max_output);
        (s.view.remaining_header(), s.view.alert_header(), lowered)
    };
    if !remaining.is_empty() {
        set("x-pag0-budget-remaining", &remaining);
    }
    if let Some(alert) = alert {
        set("x-pag0-budget-alert", &alert);
    }
    if let Some(max) = lowered {
        set("x-pag0-max-tokens", &max.to_string());
    }
}
