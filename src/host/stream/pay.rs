//! x402 pay mode: pag0 answers the upstream's 402 itself. It reads the offer, chooses
//! what policy allows, reserves the price, asks for approval when the price calls for
//! it, gets a payment from the signer, retries the original request once with it and
//! settles from the server's settlement. The agent sees only the paid answer (or
//! pag0's refusal); the 402 never reaches it.
//!
//! The paid retry must reach exactly what the route sent the first time. A filter
//! cannot see what the router sends (rewrites, added headers, the chosen host), so the
//! retry goes back through this listener (`signer.loopbackCluster`, required with pay
//! mode), marked with the VM's secret: the route applies all of it again, and pag0
//! lets its own retry through untouched.

use crate::core::call::{Call, Caller};
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::ledger::Outcome;
use crate::core::payments::{choose, payment_outcome, PaymentOutcome};
use crate::core::x402::{self, PaymentRequired};
use crate::host::abi;
use crate::host::callout;
use crate::host::reply::send_local;
use crate::host::stream::budget::{
    admit, answer_refusal_with, refuse, release_and_refuse, release_and_refuse_with, set_state,
    settle, Admit,
};
use crate::host::stream::identify::{INTERNAL_HEADER, OWN_HEADER_PREFIX};
use crate::host::stream::state::{AfterApproval, AfterReserve, PayStage, Pending};
use crate::host::stream::{approval, breaker, respond, Dispatch, Step, Stream};
use crate::host::vm;
use proxy_wasm::types::MapType;
use std::rc::Rc;

/// Largest 402 body read for a v1 offer (a real one is well under 8 KiB).
pub const MAX_OFFER_BODY: usize = 64 * 1024;

fn stage(stream: &Stream) -> Option<PayStage> {
    stream.state.borrow().pay.as_ref().map(|p| p.stage)
}

fn set_stage(stream: &Stream, stage: PayStage) {
    if let Some(pay) = stream.state.borrow_mut().pay.as_mut() {
        pay.stage = stage;
    }
}

/// Whether pay mode is armed for this stream (x402 route, pag0 pays).
pub fn armed(stream: &Stream) -> bool {
    stage(stream) == Some(PayStage::Armed)
}

/// Whether the stream is paying (the 402's body is held back meanwhile).
pub fn paying(stream: &Stream) -> bool {
    stage(stream).is_some_and(|s| s != PayStage::Armed)
}

pub fn reading_offer(stream: &Stream) -> bool {
    stage(stream) == Some(PayStage::ReadingOffer)
}

/// On an upstream 402's headers. A v2 offer is in `PAYMENT-REQUIRED`; without it the
/// offer may be a v1 body, read first (headers held). `None`: nothing to pay here.
pub fn on_402(d: &dyn Dispatch, stream: &Stream, end_of_stream: bool) -> Option<Step> {
    match abi::map_value(MapType::HttpResponseHeaders, x402::V2_REQUIRED_HEADER) {
        Some(h) => Some(pay_offer(d, stream, x402::parse_required_header(&h))),
        None if end_of_stream => None,
        None => {
            set_stage(stream, PayStage::ReadingOffer);
            Some(Step::Pause)
        }
    }
}

/// The whole body of a 402 without a v2 header: a v1 offer is paid; anything else (a
/// 402 that is not x402) goes to the agent as it is.
pub fn on_402_body(d: &dyn Dispatch, stream: &Stream, body: &[u8]) -> Step {
    let claims_x402 = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("x402Version").is_some());
    if !claims_x402 {
        set_stage(stream, PayStage::Armed);
        respond::answer_headers(stream, Some(402), true);
        return Step::Continue;
    }
    pay_offer(d, stream, x402::parse_required_body(body))
}

fn caller_call(stream: &Stream) -> Option<(Rc<Caller>, Call)> {
    let s = stream.state.borrow();
    Some((s.caller.clone()?, Call::clone(s.call.as_ref()?)))
}

/// Choose a requirement by policy, reserve its price, and ask for approval and the
/// signer's payment.
fn pay_offer(
    d: &dyn Dispatch,
    stream: &Stream,
    parsed: Result<PaymentRequired, x402::X402Error>,
) -> Step {
    let Some((caller, mut call)) = caller_call(stream) else {
        return Step::Continue;
    };
    // The first leg was answered 402: it is not charged. A static price it reserved
    // is given back; the payment is reserved on its own below.
    settle(stream, &Outcome::refused());
    let offer = match parsed {
        Ok(offer) => offer,
        Err(e) => {
            let refusal = Refusal::new(ErrorCode::PaymentFailed, format!("the server's 402: {e}"));
            refuse(stream, &caller, &call, &refusal, &Default::default());
            return Step::Pause;
        }
    };
    let cfg = stream.config.clone();
    let rules = cfg
        .policies
        .get(call.policy)
        .map(|p| p.payments.clone())
        .unwrap_or_default();
    let (chosen, price) = match choose(&offer, &rules) {
        Ok(found) => found,
        Err(why) => {
            let refusal = Refusal::new(
                ErrorCode::PaymentNotAllowed,
                format!("no payment requirement the policy allows: {why}"),
            );
            refuse(stream, &caller, &call, &refusal, &Default::default());
            return Step::Pause;
        }
    };
    let lost_body = stream.state.borrow().pay.as_ref().and_then(|p| p.lost_body);
    if let Some(why) = lost_body {
        let refusal = if why.contains("maxBufferedBytes") {
            Refusal::new(
                ErrorCode::CapacityExceeded,
                format!("the request body could not be kept to retry it with a payment: {why}"),
            )
            .with_retry_after(1)
        } else {
            Refusal::new(
                ErrorCode::InvalidRequest,
                format!("the request body is {why} ({}), so it cannot be retried with a payment; nothing was paid", cfg.pay_body_limit),
            )
            .with_status(413)
        };
        refuse(stream, &caller, &call, &refusal, &Default::default());
        return Step::Pause;
    }
    call.price = price;
    stream.state.borrow_mut().call = Some(Rc::new(call.clone()));
    if let Err(refusal) = breaker::check_payment(stream, &caller, &call) {
        refuse(stream, &caller, &call, &refusal, &Default::default());
        return Step::Pause;
    }
    let tenant = cfg.tenant_id(caller.tenant);
    let body = x402::signer_request(&offer, chosen, tenant, &caller.session, &caller.agent);
    if let Some(pay) = stream.state.borrow_mut().pay.as_mut() {
        pay.version = offer.version;
        pay.network = chosen.network.clone();
        pay.amount = price;
    }
    // Paying from here on: the 402's body is held back while the price is reserved
    // (with the Redis ledger, the reservation is a round trip).
    set_stage(stream, PayStage::Approving);
    match admit(d, stream, &caller, &call, AfterReserve::Sign(body.clone())) {
        Admit::Yes => after_admit(d, stream, body),
        Admit::No | Admit::Waiting => Step::Pause,
    }
}

/// The payment's price is reserved: approval, then the signer.
pub fn after_admit(d: &dyn Dispatch, stream: &Stream, body: String) -> Step {
    if stream.config.signer.is_none() {
        release_and_refuse(
            stream,
            &Refusal::new(ErrorCode::SignerUnavailable, "no signer is configured"),
        );
        return Step::Pause;
    }
    set_stage(stream, PayStage::Approving);
    approval::maybe_ask(d, stream, AfterApproval::Sign(body))
}

/// Asks the signer for a payment.
pub fn ask_signer(d: &dyn Dispatch, stream: &Stream, body: &str) -> Step {
    let Some(signer) = stream.config.signer.clone() else {
        release_and_refuse(
            stream,
            &Refusal::new(ErrorCode::SignerUnavailable, "no signer is configured"),
        );
        return Step::Pause;
    };
    match callout::send(
        d,
        &signer.cluster,
        "POST",
        &signer.path,
        &signer.authority,
        Some(("application/json", body.as_bytes())),
        signer.timeout_ms,
    ) {
        Ok(token) => {
            set_stage(stream, PayStage::Signing);
            d.wait_for(stream, token, Pending::Signer);
            Step::Pause
        }
        Err(_) => {
            release_and_refuse(
                stream,
                &Refusal::new(
                    ErrorCode::SignerUnavailable,
                    "the signer cluster cannot be reached",
                ),
            );
            Step::Pause
        }
    }
}

/// The signer answered: retry the original request once, with the payment.
pub fn on_signed(d: &dyn Dispatch, stream: &Stream, body_size: usize) -> Step {
    let status = callout::status();
    let version = stream.state.borrow().pay.as_ref().map_or(2, |p| p.version);
    let signed = if callout::succeeded(status) {
        x402::signer_answer(&callout::body(body_size), version).ok()
    } else {
        None
    };
    let Some((header, value)) = signed else {
        let refusal = Refusal::new(
            ErrorCode::SignerUnavailable,
            format!("the signer did not sign (status {status:?})"),
        );
        release_and_refuse(stream, &refusal);
        return Step::Pause;
    };
    let cfg = stream.config.clone();
    let (headers, body) = {
        let s = stream.state.borrow();
        let Some(pay) = s.pay.as_ref() else {
            return Step::Pause;
        };
        (pay.headers.clone(), pay.body.clone())
    };
    let (Some(cluster), Some(secret)) = (cfg.pay_loopback.clone(), vm::secret()) else {
        release_and_refuse(
            stream,
            &Refusal::new(
                ErrorCode::UpstreamError,
                "no loopback cluster to retry the call with its payment",
            ),
        );
        return Step::Pause;
    };
    let mut pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(OWN_HEADER_PREFIX)
                && !matches!(
                    k.as_str(),
                    "content-length"
                        | "transfer-encoding"
                        | "payment-signature"
                        | "x-payment"
                        | "connection"
                )
        })
        // The SDK's dispatch takes text; a request header that is not text is not resent.
        .filter_map(|(k, v)| std::str::from_utf8(v).ok().map(|v| (k.as_str(), v)))
        .collect();
    pairs.push((header.as_str(), value.as_str()));
    pairs.push((INTERNAL_HEADER, secret.as_str()));
    let sent = d.dispatch(
        &cluster,
        pairs,
        Some(&body),
        std::time::Duration::from_millis(cfg.pay_retry_timeout_ms),
    );
    match sent {
        Ok(token) => {
            set_stage(stream, PayStage::Retrying);
            d.wait_for(stream, token, Pending::PaidRetry);
            Step::Pause
        }
        Err(_) => {
            // Nothing was sent with the payment: nothing moved.
            release_and_refuse(
                stream,
                &Refusal::new(
                    ErrorCode::UpstreamError,
                    "cannot retry the call with its payment",
                ),
            );
            Step::Pause
        }
    }
}

/// The paid answer: settle from the settlement header, answer the agent with it.
pub fn on_paid_answer(stream: &Stream, body_size: usize) -> Step {
    let (version, network, amount) = {
        let s = stream.state.borrow();
        let Some(pay) = s.pay.as_ref() else {
            return Step::Pause;
        };
        (pay.version, pay.network.clone(), pay.amount)
    };
    let status = callout::status();
    let settlement = callout::header(x402::settlement_header(version));
    let body = callout::body(body_size);
    let outcome = payment_outcome(status, settlement.as_deref());
    let effect = outcome.effect(amount, &network);
    let note = effect.header.clone();
    match &outcome {
        PaymentOutcome::Failed(reason) => {
            let reason = if status == Some(402) && !reason.contains(": ") {
                let required = callout::header(x402::V2_REQUIRED_HEADER);
                x402::rejection_reason(required.as_deref(), &body)
                    .map_or_else(|| reason.clone(), |why| format!("{reason}: {why}"))
            } else {
                reason.clone()
            };
            let refusal = Refusal::new(
                ErrorCode::PaymentFailed,
                format!("the server refused the payment: {reason}"),
            )
            .with_fields(vec![
                ("reason", reason.clone()),
                ("amount", amount.to_string()),
                ("network", network.clone()),
            ]);
            release_and_refuse_with(stream, &refusal, &[("x-pag0-payment", &note)]);
            Step::Pause
        }
        PaymentOutcome::Unconfirmed if callout::envoy_local_reply(status, &body) => {
            // No answer from the server (timeout, reset): the payment may have moved.
            let charged = settle(
                stream,
                &Outcome {
                    cost: amount,
                    unconfirmed: true,
                    ..Outcome::default()
                },
            );
            let why = String::from_utf8_lossy(&body)
                .chars()
                .take(120)
                .collect::<String>();
            let refusal = Refusal::new(
                ErrorCode::PaymentUnconfirmed,
                format!(
                    "the paid retry got no answer within signer.retryTimeoutMs ({}): the payment may have been made, so it is charged and flagged unconfirmed",
                    stream.config.pay_retry_timeout_ms
                ),
            )
            .with_fields(vec![
                ("amount", amount.to_string()),
                ("network", network.clone()),
                ("reason", why),
                ("upstreamStatus", status.map_or_else(String::new, |s| s.to_string())),
            ])
            .with_charged(charged);
            let view = stream.state.borrow().view.clone();
            answer_refusal_with(stream, &refusal, &view, &[("x-pag0-payment", &note)]);
            Step::Pause
        }
        PaymentOutcome::Settled(_) | PaymentOutcome::Unconfirmed => {
            let cost = settle(
                stream,
                &Outcome {
                    cost: amount,
                    unconfirmed: effect.unconfirmed,
                    ..Outcome::default()
                },
            );
            answer_with_paid(stream, status, &body, cost, &note);
            Step::Pause
        }
    }
}

fn answer_with_paid(stream: &Stream, status: Option<u32>, body: &[u8], cost: u64, note: &str) {
    let headers = callout::headers();
    let (remaining, alert) = {
        let s = stream.state.borrow();
        (s.view.remaining_header(), s.view.alert_header())
    };
    let cost_text = cost.to_string();
    let mut out: Vec<(&str, &[u8])> = headers
        .iter()
        .filter_map(|(k, v)| Some((std::str::from_utf8(k).ok()?, v)))
        .filter(|(k, _)| {
            !k.starts_with(':')
                && !k.starts_with(OWN_HEADER_PREFIX)
                && !matches!(*k, "content-length" | "transfer-encoding" | "connection")
        })
        .collect();
    out.push(("x-pag0-cost", cost_text.as_bytes()));
    out.push(("x-pag0-cached", b"false"));
    out.push(("x-pag0-payment", note.as_bytes()));
    if !remaining.is_empty() {
        out.push(("x-pag0-budget-remaining", remaining.as_bytes()));
    }
    if let Some(alert) = &alert {
        out.push(("x-pag0-budget-alert", alert.as_bytes()));
    }
    set_state(stream, "pag0_cost", &cost_text);
    stream.state.borrow_mut().answered = true;
    send_local(status.unwrap_or(502), &out, body);
}
