//! The stream's side of the ledger: admit (reserve), refuse, settle. Every refusal a
//! stream sends after it knows its caller goes through [`refuse`], so that it is
//! counted in the session's report, in the metrics and, for budgets, raises its alert.

use crate::core::call::{Call, Caller};
use crate::core::errors::Refusal;
use crate::core::headers::BudgetView;
use crate::core::ledger::{self, Outcome};
use crate::host::metrics::{self, label};
use crate::host::outbox;
use crate::host::reply::send_refusal;
use crate::host::shared::HostStore;
use crate::host::stream::{breaker, Step, Stream};
use crate::host::{log, now_millis, vm};
use proxy_wasm::types::LogLevel;

/// Filter state for access logs (`%FILTER_STATE(wasm.pag0_cost:PLAIN)%`), when the
/// configuration asks for it (`filterState: true`): a host call each.
pub fn set_state(stream: &Stream, name: &str, value: &str) {
    if stream.config.filter_state {
        let _ = crate::host::abi::set_property(name, value.as_bytes());
    }
}

/// The counters a call counts in (tenant, the agent's role, tool, endpoint).
pub fn metric_ids(stream: &Stream, caller: &Caller, call: &Call) -> metrics::CallIds {
    let cfg = &stream.config;
    let tenant = cfg.tenant_id(caller.tenant);
    let role = cfg
        .policies
        .get(call.policy)
        .map_or("other", |p| p.metric_role(&caller.agent));
    metrics::call_ids(
        caller.tenant,
        tenant,
        role,
        call.tool.as_deref().unwrap_or("other"),
        &call.metric_endpoint,
    )
}

/// Checks and reserves; on success the stream may go upstream.
pub fn admit(stream: &Stream, caller: &Caller, call: &Call) -> Step {
    let cfg = &stream.config;
    if let Err(refusal) = breaker::count_spend(stream, caller, call) {
        refuse(stream, caller, call, &refusal, &BudgetView::default());
        return Step::Pause;
    }
    let admitted =
        vm::with(|vm| ledger::admit(cfg, &HostStore, &mut vm.ledger, caller, call, now_millis()));
    match admitted {
        Ok(admission) => {
            breaker::lower_spend(stream, admission.ticket.price);
            outbox::queue_alerts(cfg, admission.alerts);
            let ids = metric_ids(stream, caller, call);
            let mut s = stream.state.borrow_mut();
            s.metric_ids = Some(ids);
            s.ticket = Some(admission.ticket);
            s.view = admission.view;
            Step::Continue
        }
        Err(rejection) => {
            breaker::settle_spend(stream, 0);
            let ledger::Rejection { refused, alerts } = *rejection;
            outbox::queue_alerts(cfg, alerts);
            refuse(stream, caller, call, &refused.refusal, &refused.view);
            Step::Pause
        }
    }
}

/// A refusal after the caller is known: counted in the session and the metrics.
pub fn refuse(stream: &Stream, caller: &Caller, call: &Call, refusal: &Refusal, view: &BudgetView) {
    refuse_with(stream, caller, call, refusal, view, &[]);
}

/// [`refuse`], with more headers on the answer (`x-pag0-payment`).
pub fn refuse_with(
    stream: &Stream,
    caller: &Caller,
    call: &Call,
    refusal: &Refusal,
    view: &BudgetView,
    extra: &[(&str, &str)],
) {
    let cfg = &stream.config;
    let tenant = cfg.tenant_id(caller.tenant);
    let role = cfg
        .policies
        .get(call.policy)
        .map_or("other", |p| p.metric_role(&caller.agent));
    metrics::refusal(&label(tenant), &label(role), refusal.code.as_str());
    vm::with(|vm| ledger::record_refusal(&mut vm.ledger, cfg, caller, refusal, now_millis()));
    answer_refusal_with(stream, refusal, view, extra);
}

/// Sends a refusal as the stream's answer (nothing counted: the caller may be unknown).
pub fn answer_refusal(stream: &Stream, refusal: &Refusal, view: &BudgetView) {
    answer_refusal_with(stream, refusal, view, &[]);
}

pub fn answer_refusal_with(
    stream: &Stream,
    refusal: &Refusal,
    view: &BudgetView,
    extra: &[(&str, &str)],
) {
    log(
        LogLevel::Debug,
        &format!(
            "pag0: refused {}: {}",
            refusal.code.as_str(),
            refusal.message
        ),
    );
    let shape = {
        let mut s = stream.state.borrow_mut();
        s.answered = true;
        s.shape
    };
    set_state(stream, "pag0_cost", &refusal.charged.to_string());
    set_state(stream, "pag0_error", refusal.code.as_str());
    send_refusal(refusal, view, shape, extra);
}

/// Ends the stream's reservation (if it holds one) with this outcome; returns what the
/// call cost. The view the agent is told is the admission's unless settling changed it.
pub fn settle(stream: &Stream, outcome: &Outcome) -> u64 {
    let (ticket, ids) = {
        let mut s = stream.state.borrow_mut();
        s.settled = true;
        (s.ticket.take(), s.metric_ids.take())
    };
    let Some(ticket) = ticket else { return 0 };
    breaker::settle_spend(stream, outcome.cost);
    let cfg = &stream.config;
    let settled = vm::with(|vm| {
        ledger::settle(
            cfg,
            &HostStore,
            &mut vm.ledger,
            &ticket,
            outcome,
            now_millis(),
        )
    });
    match settled {
        Ok(settled) => {
            if let Some(view) = settled.view {
                stream.state.borrow_mut().view = view;
            }
            outbox::queue_alerts(cfg, settled.alerts);
        }
        Err(e) => log(
            LogLevel::Error,
            &format!(
                "pag0: could not settle {} for session {}: {}",
                ticket.price, ticket.session, e.message
            ),
        ),
    }
    if let Some(ids) = ids {
        metrics::call(&ids, outcome.cost, false, 0);
    }
    outcome.cost
}

/// Gives back the stream's reservation, then refuses: nothing was paid or forwarded.
pub fn release_and_refuse(stream: &Stream, refusal: &Refusal) {
    release_and_refuse_with(stream, refusal, &[]);
}

pub fn release_and_refuse_with(stream: &Stream, refusal: &Refusal, extra: &[(&str, &str)]) {
    settle(stream, &Outcome::refused());
    let (caller, call, view) = {
        let s = stream.state.borrow();
        (s.caller.clone(), s.call.clone(), s.view.clone())
    };
    match (caller, call) {
        (Some(caller), Some(call)) => refuse_with(stream, &caller, &call, refusal, &view, extra),
        _ => answer_refusal_with(stream, refusal, &view, extra),
    }
}
