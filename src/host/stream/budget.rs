//! The stream's side of the ledger: admit (reserve), refuse, settle. Every refusal a
//! stream sends after it knows its caller goes through [`refuse`], so that it is
//! counted in the session's report, in the metrics and, for budgets, raises its alert.

use crate::core::alerts::Alert;
use crate::core::call::{Call, Caller};
use crate::core::compile::Service;
use crate::core::errors::Refusal;
use crate::core::headers::BudgetView;
use crate::core::ledger::remote;
use crate::core::ledger::Ticket;
use crate::core::ledger::{self, Outcome};
use crate::host::callout;
use crate::host::metrics::{self, label};
use crate::host::outbox;
use crate::host::remote_ledger;
use crate::host::reply::send_refusal;
use crate::host::shared::HostStore;
use crate::host::stream::state::{AfterReserve, Pending, ReserveWait};
use crate::host::stream::{breaker, Dispatch, Step, Stream};
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

/// How an admission went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Reserved (or free): the stream goes on.
    Yes,
    /// Refused: the stream was answered.
    No,
    /// Sent to the Redis ledger: [`on_reserved`] goes on with what was to follow.
    Waiting,
}

/// Checks and reserves; on success the stream may go upstream. With the Redis ledger a
/// priced call waits for Redis's reservation.
pub fn admit(
    d: &dyn Dispatch,
    stream: &Stream,
    caller: &Caller,
    call: &Call,
    then: AfterReserve,
) -> Admit {
    let cfg = &stream.config;
    if let Err(refusal) = breaker::count_spend(stream, caller, call) {
        refuse(stream, caller, call, &refusal, &BudgetView::default());
        return Admit::No;
    }
    if let Some(service) = &cfg.ledger_redis {
        if call.price > 0 {
            return reserve_remote(d, stream, service, caller, call, then);
        }
    }
    let admitted =
        vm::with(|vm| ledger::admit(cfg, &HostStore, &mut vm.ledger, caller, call, now_millis()));
    match admitted {
        Ok(admission) => {
            admitted_with(stream, caller, call, admission.ticket, admission.view);
            outbox::queue_alerts(cfg, admission.alerts);
            Admit::Yes
        }
        Err(rejection) => {
            breaker::settle_spend(stream, 0);
            let ledger::Rejection { refused, alerts } = *rejection;
            outbox::queue_alerts(cfg, alerts);
            refuse(stream, caller, call, &refused.refusal, &refused.view);
            Admit::No
        }
    }
}

fn admitted_with(stream: &Stream, caller: &Caller, call: &Call, ticket: Ticket, view: BudgetView) {
    breaker::lower_spend(stream, ticket.price);
    let ids = metric_ids(stream, caller, call);
    let mut s = stream.state.borrow_mut();
    s.metric_ids = Some(ids);
    s.ticket = Some(ticket);
    s.view = view;
}

/// Asks Redis to check and reserve the call in every scope at once.
fn reserve_remote(
    d: &dyn Dispatch,
    stream: &Stream,
    service: &Service,
    caller: &Caller,
    call: &Call,
    then: AfterReserve,
) -> Admit {
    let cfg = &stream.config;
    let now = now_millis();
    let prepared = match ledger::prepare(cfg, caller, call, now) {
        Ok(prepared) => prepared,
        Err((refusal, _)) => {
            refuse(stream, caller, call, &refusal, &BudgetView::default());
            return Admit::No;
        }
    };
    let Some(policy) = cfg.policies.get(call.policy) else {
        return Admit::No;
    };
    let ticket = prepared.ticket;
    if ticket.price > remote::MAX_EXACT {
        let refusal = Refusal::new(
            crate::core::errors::ErrorCode::InvalidRequest,
            "the price is above what the Redis ledger keeps exactly (2^53 units)",
        );
        refuse(stream, caller, call, &refusal, &BudgetView::default());
        return Admit::No;
    }
    let plan = remote::plan(cfg, policy, caller, now / 1000);
    let id = remote_ledger::next_id();
    let riders = remote_ledger::take_riders(RIDERS);
    let request = remote::tagged(
        &remote::reserve_body(
            &plan,
            &id,
            ticket.price,
            prepared.min_price,
            cfg.ledger.reservation_timeout_ms,
            &riders,
        ),
        &id,
    );
    let wait = Box::new(ReserveWait {
        id,
        ticket,
        plan,
        request,
        riders,
        loaded: false,
        then,
    });
    send_reserve(d, stream, service, wait, false)
}

fn send_reserve(
    d: &dyn Dispatch,
    stream: &Stream,
    service: &Service,
    wait: Box<ReserveWait>,
    load_first: bool,
) -> Admit {
    let sent = if load_first {
        callout::send_to(
            d,
            service,
            "PUT",
            &remote::load_path(&service.path),
            Some(("text/plain", remote::SCRIPT.as_bytes())),
            service.timeout_ms,
        )
    } else {
        callout::send_to(
            d,
            service,
            "PUT",
            &remote::eval_path(&service.path),
            Some(("application/json", wait.request.as_bytes())),
            service.timeout_ms,
        )
    };
    match sent {
        Ok(token) => {
            let pending = if load_first {
                Pending::ReserveLoad(wait)
            } else {
                Pending::Reserve(wait)
            };
            d.wait_for(stream, token, pending);
            Admit::Waiting
        }
        Err(status) => {
            unavailable(
                stream,
                wait,
                &format!("cannot call cluster {}: {status:?}", service.cluster),
            );
            Admit::No
        }
    }
}

/// Settlements a reservation carries along, at most.
const RIDERS: usize = 32;

/// Refuses with `LEDGER_UNAVAILABLE`; the reservation, if Redis made it after all, is
/// given back (and the settlements it carried go back to the queue).
fn unavailable(stream: &Stream, wait: Box<ReserveWait>, why: &str) {
    give_back(stream, wait);
    metrics::add("pag0.ledger.redis_unavailable", 1);
    let (caller, call) = {
        let s = stream.state.borrow();
        (s.caller.clone(), s.call.clone())
    };
    let refusal = remote::unavailable(why);
    super::cache::abandon_fill(stream);
    match (caller, call) {
        (Some(caller), Some(call)) => {
            refuse(stream, &caller, &call, &refusal, &BudgetView::default())
        }
        _ => answer_refusal(stream, &refusal, &BudgetView::default()),
    }
}

/// Redis answered a reservation (or loading its script), or did not in time.
pub fn on_reserved(
    d: &dyn Dispatch,
    stream: &Stream,
    wait: Box<ReserveWait>,
    loading: bool,
    body_size: usize,
) -> Step {
    let cfg = stream.config.clone();
    let Some(service) = cfg.ledger_redis.clone() else {
        return Step::Pause;
    };
    let status = callout::status();
    let body = callout::body(body_size);
    if loading {
        if !remote::loaded(&body) {
            unavailable(stream, wait, "Redis did not load the ledger script");
            return Step::Pause;
        }
        return match send_reserve(d, stream, &service, wait, false) {
            Admit::Waiting => Step::Pause,
            _ => Step::Pause,
        };
    }
    let answer = match remote::script_answer(status, &body, &wait.id) {
        Ok(answer) => answer,
        Err(remote::Fault::NoScript) if wait.loaded => {
            unavailable(
                stream,
                wait,
                "Redis lost the ledger script again right after loading it",
            );
            return Step::Pause;
        }
        Err(remote::Fault::NoScript) => {
            remote_ledger::script_missing();
            let mut wait = wait;
            wait.loaded = true;
            return match send_reserve(d, stream, &service, wait, true) {
                Admit::Waiting => Step::Pause,
                _ => Step::Pause,
            };
        }
        Err(remote::Fault::Unavailable(why)) => {
            unavailable(stream, wait, &why);
            return Step::Pause;
        }
    };
    let (caller, call) = {
        let s = stream.state.borrow();
        match (s.caller.clone(), s.call.clone()) {
            (Some(caller), Some(call)) => (caller, call),
            _ => {
                drop(s);
                give_back(stream, wait);
                return Step::Pause;
            }
        }
    };
    let ReserveWait {
        id,
        mut ticket,
        plan,
        then,
        riders,
        ..
    } = *wait;
    remote_ledger::riders_applied(&cfg, &riders, answer.get("settled"));
    match remote::read_reserve(&plan, &caller.agent, ticket.price, &answer) {
        Ok(reserved) => {
            ticket.price = reserved.amount;
            ticket.reservation = Some(Box::new(remote::Reservation { id, plan }));
            admitted_with(stream, &caller, &call, ticket, reserved.view);
            match then {
                AfterReserve::Gate => super::gate::after_admit(d, stream),
                AfterReserve::Sign(body) => super::pay::after_admit(d, stream, body),
            }
        }
        Err(denied) => {
            if denied.refusal.code == crate::core::errors::ErrorCode::LedgerUnavailable
                && denied.refusal.field("reason") != Some("duplicate")
            {
                // An answer pag0 cannot read: whatever Redis did is given back.
                remote_ledger::release(&cfg, &id, caller.tenant, &caller.session, &caller.agent);
            }
            let tenant = cfg.tenant_id(caller.tenant).to_string();
            let now = now_millis() / 1000;
            let alerts = denied
                .alerts
                .into_iter()
                .map(|alert| Alert {
                    tenant: tenant.clone(),
                    session: caller.session.clone(),
                    at: now,
                    alert,
                })
                .collect();
            outbox::queue_alerts(&cfg, alerts);
            if let Some(trip) = &denied.rate_trip {
                breaker::rate_tripped(&cfg, &tenant, &caller.session, trip);
            }
            if denied.refusal.code == crate::core::errors::ErrorCode::KillSwitchActive
                && denied.refusal.field("reason") != Some("threshold")
            {
                // Killed in Redis: this Envoy's free calls and cache hits follow at once.
                let _ = crate::core::ledger::sessions::set_killed(
                    &HostStore,
                    &tenant,
                    &caller.session,
                    &cfg.sessions,
                    now,
                    true,
                    true,
                );
            }
            super::cache::abandon_fill(stream);
            refuse(stream, &caller, &call, &denied.refusal, &denied.view);
            Step::Pause
        }
    }
}

/// A stream that ends while Redis has its reservation request (sent by the stream, or
/// by the root context for it: `routed`): given back, with what rode along.
pub fn forget_reservation(stream: &Stream, routed: Vec<Pending>) {
    let own = stream.state.borrow_mut().pending.take().map(|(_, p)| p);
    for pending in own.into_iter().chain(routed) {
        if let Pending::Reserve(wait) | Pending::ReserveLoad(wait) = pending {
            give_back(stream, wait);
        }
    }
}

/// A reservation whose answer the stream will not act on: released in Redis (if made,
/// which gives back its spend-rate counts there too), its riders back in the queue.
fn give_back(stream: &Stream, mut wait: Box<ReserveWait>) {
    remote_ledger::requeue(std::mem::take(&mut wait.riders));
    let t = &wait.ticket;
    remote_ledger::release(&stream.config, &wait.id, t.tenant, &t.session, &t.agent);
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
    stream.state.borrow_mut().reservation = ticket.reservation.as_ref().map(|r| r.id.clone());
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
        Ok(mut settled) => {
            if let Some(remote) = settled.remote.take() {
                remote_ledger::queue(remote);
            }
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
