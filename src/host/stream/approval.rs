//! Approval for expensive calls: a call (or, in pay mode, a payment) priced above the
//! policy's threshold waits, reservation held, for the approval service.

use crate::core::errors::{ErrorCode, Refusal};
use crate::core::firewall;
use crate::host::callout;
use crate::host::stream::budget::release_and_refuse;
use crate::host::stream::state::{AfterApproval, Pending};
use crate::host::stream::{pay, Dispatch, Step, Stream};

/// Asks the approval service when the call's price is above the threshold; else goes
/// on as `then` says.
pub fn maybe_ask(d: &dyn Dispatch, stream: &Stream, then: AfterApproval) -> Step {
    let (caller, call) = {
        let s = stream.state.borrow();
        match (s.caller.clone(), s.call.clone()) {
            (Some(caller), Some(call)) => (caller, call),
            _ => return Step::Continue,
        }
    };
    let price = stream
        .state
        .borrow()
        .ticket
        .as_ref()
        .map_or(call.price, |t| t.price);
    let repriced;
    let priced: &crate::core::call::Call = if price == call.price {
        &call
    } else {
        repriced = crate::core::call::Call {
            price,
            ..crate::core::call::Call::clone(&call)
        };
        &repriced
    };
    let Some(approval) = firewall::approval_for(&stream.config, priced) else {
        return proceed(d, stream, then);
    };
    let service = approval.service.clone();
    let body = firewall::approval_request(&stream.config, &caller, priced);
    match callout::send(
        d,
        &service.cluster,
        "POST",
        &service.path,
        &service.authority,
        Some(("application/json", body.as_bytes())),
        service.timeout_ms,
    ) {
        Ok(token) => {
            d.wait_for(stream, token, Pending::Approval(then));
            Step::Pause
        }
        Err(_) => {
            let refusal = Refusal::new(
                ErrorCode::ApprovalTimeout,
                "the approval service cannot be reached",
            );
            release_and_refuse(stream, &refusal);
            Step::Pause
        }
    }
}

fn proceed(d: &dyn Dispatch, stream: &Stream, then: AfterApproval) -> Step {
    match then {
        AfterApproval::Resume => Step::Continue,
        AfterApproval::Sign(body) => pay::ask_signer(d, stream, &body),
    }
}

/// The approval service answered (or did not, in time).
pub fn on_answer(d: &dyn Dispatch, stream: &Stream, then: AfterApproval, body_size: usize) -> Step {
    let ok = callout::succeeded(callout::status());
    match firewall::approval_answer(ok, &callout::body(body_size)) {
        Some((true, _)) => proceed(d, stream, then),
        Some((false, reason)) => {
            let mut refusal = Refusal::new(
                ErrorCode::ApprovalDenied,
                "the approval service denied this call",
            );
            if let Some(reason) = reason {
                refusal = refusal.with_fields(vec![("reason", reason)]);
            }
            release_and_refuse(stream, &refusal);
            Step::Pause
        }
        None => {
            let refusal = Refusal::new(
                ErrorCode::ApprovalTimeout,
                "no answer from the approval service in time",
            );
            release_and_refuse(stream, &refusal);
            Step::Pause
        }
    }
}
