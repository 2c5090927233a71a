//! x402 relay mode: the agent pays with its own wallet. pag0 lets the server's 402
//! through only when the policy allows one of its offers and the budget can cover it
//! (otherwise the agent gets pag0's refusal instead, and signs nothing); it remembers
//! the offer (a v1 payment does not name its asset; the offer does); the agent's
//! payment itself is checked and reserved on its retry (see `firewall::relay_payment`)
//! and settled from the server's answer (see `respond`).

use proxy_wasm::types::MapType;

use crate::core::errors::{ErrorCode, Refusal};
use crate::core::ledger;
use crate::core::offers;
use crate::core::payments::choose;
use crate::core::x402::{self, PaymentRequired};
use crate::host::abi;
use crate::host::now_millis;
use crate::host::shared::HostStore;
use crate::host::stream::budget::refuse;
use crate::host::stream::{respond, Step, Stream};

/// Whether a 402 on this stream is one relay mode looks at: an x402 route whose
/// policy relays, and a request that carried no payment yet.
pub fn applies(stream: &Stream) -> bool {
    let s = stream.state.borrow();
    let Some(call) = s.call.as_ref() else {
        return false;
    };
    call.x402
        && call.payment.is_none()
        && s.pay.is_none()
        && stream
            .config
            .policies
            .get(call.policy)
            .is_some_and(|p| !p.pay_x402)
}

/// On an upstream 402's headers: a v2 offer is checked now; a v1 offer is in the
/// body, read first (headers held).
pub fn on_402(stream: &Stream, end_of_stream: bool) -> Option<Step> {
    match abi::map_value(MapType::HttpResponseHeaders, x402::V2_REQUIRED_HEADER) {
        Some(h) => x402::parse_required_header(&h)
            .ok()
            .map(|offer| check_offer(stream, &offer)),
        None if end_of_stream => None,
        None => {
            stream.state.borrow_mut().reading_relay_offer = true;
            Some(Step::Pause)
        }
    }
}

/// The whole body of a 402 without a v2 header.
pub fn on_402_body(stream: &Stream, body: &[u8]) -> Step {
    stream.state.borrow_mut().reading_relay_offer = false;
    match x402::parse_required_body(body) {
        Ok(offer) => check_offer(stream, &offer),
        Err(_) => {
            respond::answer_headers(stream, Some(402), true);
            Step::Continue
        }
    }
}

/// Lets the offer through to the agent, or answers pag0's refusal in its place.
fn check_offer(stream: &Stream, offer: &PaymentRequired) -> Step {
    let (caller, call) = {
        let s = stream.state.borrow();
        match (s.caller.clone(), s.call.clone()) {
            (Some(caller), Some(call)) => (caller, call),
            _ => return Step::Continue,
        }
    };
    let cfg = &stream.config;
    let tenant = cfg.tenant_id(caller.tenant);
    offers::remember(
        &HostStore,
        tenant,
        &caller.session,
        &call.endpoint,
        offer,
        now_millis(),
    );
    let rules = cfg
        .policies
        .get(call.policy)
        .map(|p| p.payments.clone())
        .unwrap_or_default();
    let refusal = match choose(offer, &rules) {
        Err(why) => Some((
            Refusal::new(
                ErrorCode::PaymentNotAllowed,
                format!("the server asks for a payment the policy does not allow: {why}"),
            ),
            Default::default(),
        )),
        Ok((_, price)) => {
            let mut priced = crate::core::call::Call::clone(&call);
            priced.price = call.price.max(price);
            match ledger::dry_run(cfg, &HostStore, &caller, &priced, now_millis() / 1000) {
                Ok(_) => None,
                Err(refused) => Some((refused.refusal.clone(), refused.view.clone())),
            }
        }
    };
    match refusal {
        None => {
            respond::answer_headers(stream, Some(402), true);
            Step::Continue
        }
        Some((refusal, view)) => {
            // The 402 was not a paid call: its reservation (if any) is given back.
            crate::host::stream::budget::settle(stream, &ledger::Outcome::refused());
            stream.state.borrow_mut().replaced = true;
            refuse(stream, &caller, &call, &refusal, &view);
            Step::Pause
        }
    }
}
