//! The ledger: every budget scope's spend and reservations, kept in Envoy shared data
//! so that every worker sees the same numbers.
//!
//! - [`budget`]: a session's budget record (session, agent budgets, kill switch,
//!   reservations by owner VM). [`windows`]: a tenant's day and month.
//! - [`sessions`]: the fixed table of session slots per tenant.
//! - [`report`]: what reports count, in a record of its own.
//! - [`local`]: what one VM holds: its open reservations, commits and counts not yet
//!   written (written on its tick, one compare-and-swap per session).
//! - [`owners`]: the registry of VMs, so that a dead VM's reservations are settled.
//!
//! A priced call is one compare-and-swap on its session's budget record and one on its
//! tenant's windows to reserve; a call that ends exactly as reserved is committed on
//! the VM's next tick (a commit does not change `spent + reserved`, so no budget
//! check can tell the difference); a call that ends for less is settled at once.

pub mod budget;
pub mod codec;
pub mod local;
pub mod owners;
pub mod remote;
pub mod remote_report;
pub mod report;
pub mod sessions;
pub mod windows;

use crate::core::alerts::{after_spend, raise_once, Alert, AlertKind, ScopeAlert};
use crate::core::amount::Amount;
use crate::core::call::{Call, Caller};
use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal, Scope};
use crate::core::headers::{BudgetView, ScopeState};
use crate::core::ledger::budget::{BudgetRecord, Charge, Release};
use crate::core::ledger::local::LocalLedger;
use crate::core::ledger::report::{CallStats, Tokens};
use crate::core::ledger::windows::WindowsRecord;
use crate::core::policy::{check_priced, check_rules, per_request_cap, unmatched_agent, Policy};
use crate::core::store::{read, tenant_windows_key, update, SharedStore, Step};

/// Alert flags: each alert goes out once per scope (per window for day and month).
pub const ALERT_THRESHOLD: u8 = 1;
pub const ALERT_EXHAUSTED: u8 = 2;
pub const ALERT_KILL: u8 = 4;

/// An admitted call, held until it ends: its reservation (none when free) and what
/// the report will count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Unique within the VM that holds it.
    pub id: u64,
    pub owner: u16,
    pub tenant: usize,
    pub session: String,
    /// The session's slot, when the call reserved.
    pub slot: Option<u32>,
    pub agent: String,
    pub parent: Option<String>,
    /// The agent budget the call counts against (the agent id, or the pool).
    pub budget_agent: Option<String>,
    /// What is reserved.
    pub price: Amount,
    pub windows: bool,
    pub policy: usize,
    pub tool: Option<String>,
    pub endpoint_label: String,
    pub opened_ms: u64,
    /// `ledger.store: redis`: the reservation in Redis (settled there, not here).
    pub reservation: Option<Box<remote::Reservation>>,
}

/// The firewall let the call through.
#[derive(Debug, Clone)]
pub struct Admission {
    pub ticket: Ticket,
    pub view: BudgetView,
    /// Alerts raised by this VM's commits written with the reservation.
    pub alerts: Vec<Alert>,
}

/// A refusal, with the budgets as they stood, for the response headers.
#[derive(Debug, Clone)]
pub struct Refused {
    pub refusal: Refusal,
    pub view: BudgetView,
}

/// A refused admission, with the alerts the refusal raised (boxed: the happy path
/// stays small).
#[derive(Debug, Clone)]
pub struct Rejection {
    pub refused: Refused,
    pub alerts: Vec<Alert>,
}

fn reject(refused: Refused, alerts: Vec<Alert>) -> Box<Rejection> {
    Box::new(Rejection { refused, alerts })
}

impl Refused {
    pub fn plain(refusal: Refusal) -> Refused {
        Refused {
            refusal,
            view: BudgetView::default(),
        }
    }
}

/// How an admitted call ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// What it is charged (0: released).
    pub cost: Amount,
    /// The outcome is unknown (a payment without settlement, a call whose client went
    /// away): charged, and counted as unconfirmed.
    pub unconfirmed: bool,
    /// A metered call whose usage never came: charged its reservation.
    pub unmetered: bool,
    pub tokens: Option<Tokens>,
    pub model: Option<String>,
    /// Not counted as a call in the report (the call is refused after all, and the
    /// refusal is counted instead).
    pub uncounted: bool,
}

impl Outcome {
    pub fn commit(price: Amount) -> Outcome {
        Outcome {
            cost: price,
            ..Outcome::default()
        }
    }

    pub fn release() -> Outcome {
        Outcome::default()
    }

    /// Released, and counted as the refusal that follows rather than as a call.
    pub fn refused() -> Outcome {
        Outcome {
            uncounted: true,
            ..Outcome::default()
        }
    }
}

/// A settled call: the budgets after it when they changed (else the admission's view
/// still holds), and the alerts its spend raised.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    pub view: Option<BudgetView>,
    pub alerts: Vec<Alert>,
    /// The records as written (for the VM's view of them).
    pub session: Option<BudgetRecord>,
    pub windows: Option<WindowsRecord>,
    /// `ledger.store: redis`: the settlement to send to Redis.
    pub remote: Option<remote::Settlement>,
}

fn policy_of(cfg: &Config, index: usize) -> Result<&Policy, Refusal> {
    cfg.policies
        .get(index)
        .ok_or_else(|| Refusal::new(ErrorCode::InternalError, "policy index out of range"))
}

fn tenant_id(cfg: &Config, index: usize) -> Result<&str, Refusal> {
    cfg.tenants
        .get(index)
        .map(|t| t.id.as_str())
        .ok_or_else(|| Refusal::new(ErrorCode::InternalError, "tenant index out of range"))
}

fn decode_windows(bytes: &[u8]) -> Result<WindowsRecord, Refusal> {
    WindowsRecord::decode(bytes).map_err(|_| {
        Refusal::new(
            ErrorCode::InternalError,
            "corrupt tenant record in shared data",
        )
    })
}

fn read_windows<S: SharedStore + ?Sized>(
    store: &S,
    tenant: &str,
    now: u64,
) -> Result<WindowsRecord, Refusal> {
    let mut record = decode_windows(&read(store, &tenant_windows_key(tenant))?)?;
    record.roll(now);
    Ok(record)
}

/// What a refusal of a reservation, seen inside its compare-and-swap, does: refuse,
/// and raise the alert it means the first time (so the flag is written with it).
enum Reserve {
    /// Reserved (this much: a metered call may get less than its price).
    Done(Vec<ScopeAlert>, Amount),
    Refused(Refusal, Vec<ScopeAlert>),
}

/// Checks the call against policy and reserves its price in every scope: the session
/// record (session and agent budget, one CAS) first, then the tenant's windows (day
/// and month, one CAS); if the windows refuse, the session part is given back. No
/// scope can go past its limit, whatever the interleaving of workers. A free call is
/// only checked (lists, kill switch) and reserves nothing.
/// A call checked against its policy (lists, per-request cap), not yet reserved: its
/// ticket (with the price the cap leaves) and the least it may cost.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub ticket: Ticket,
    pub min_price: Amount,
}

/// Why [`prepare`] refused: with the budgets to show (`true`), or before the call's
/// budgets mean anything.
pub type NotPrepared = (Refusal, bool);

/// The policy's checks that need no ledger: the agent is allowed, the endpoint and
/// price pass the lists and the per-request cap (a metered call over the cap is
/// lowered to it when its least price fits).
pub fn prepare(
    cfg: &Config,
    caller: &Caller,
    call: &Call,
    now_ms: u64,
) -> Result<Prepared, NotPrepared> {
    let policy = policy_of(cfg, call.policy).map_err(|r| (r, false))?;
    tenant_id(cfg, caller.tenant).map_err(|r| (r, false))?;
    if policy.refuses_agent(&caller.agent) {
        return Err((unmatched_agent(&caller.agent), false));
    }
    let agent_rule = policy.agent_rule(&caller.agent);
    let budget = policy.agent_budget(&caller.agent);
    let min_price = call.min_price.unwrap_or(call.price).min(call.price);
    let (price, least) = match per_request_cap(policy, agent_rule) {
        Some((cap, _)) if call.price > cap && min_price <= cap => (cap, cap),
        // Refused either way: the refusal names the least the call could cost.
        Some((cap, _)) if call.price > cap => (call.price, min_price),
        _ => (call.price, call.price),
    };
    check_priced(policy, call)
        .and_then(|()| check_rules(policy, agent_rule, &call.endpoint, least))
        .map_err(|r| (r, true))?;
    Ok(Prepared {
        ticket: Ticket {
            id: 0,
            owner: 0,
            tenant: caller.tenant,
            session: caller.session.clone(),
            slot: None,
            agent: caller.agent.clone(),
            parent: caller.parent.clone(),
            budget_agent: budget.map(|(key, _)| key.to_string()),
            price,
            windows: cfg.track_windows && price > 0,
            policy: call.policy,
            tool: call.tool.clone(),
            endpoint_label: call.endpoint_label.clone(),
            opened_ms: now_ms,
            reservation: None,
        },
        min_price,
    })
}

/// Checks the call against policy and reserves its price in every scope: the session
/// record (session and agent budget, one CAS) first, then the tenant's windows (day
/// and month, one CAS); if the windows refuse, the session part is given back. No
/// scope can go past its limit, whatever the interleaving of workers. A free call is
/// only checked (lists, kill switch) and reserves nothing.
pub fn admit<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    local: &mut LocalLedger,
    caller: &Caller,
    call: &Call,
    now_ms: u64,
) -> Result<Admission, Box<Rejection>> {
    let now = now_ms / 1000;
    let no_alerts = |r: Refused| reject(r, Vec::new());
    let Prepared {
        mut ticket,
        min_price,
    } = match prepare(cfg, caller, call, now_ms) {
        Ok(prepared) => prepared,
        Err((refusal, false)) => return Err(no_alerts(Refused::plain(refusal))),
        Err((refusal, true)) => {
            let view = current_view(cfg, store, caller, call, now)
                .map(|(v, _)| v)
                .unwrap_or_default();
            return Err(no_alerts(Refused { refusal, view }));
        }
    };
    let policy = policy_of(cfg, call.policy).map_err(|r| no_alerts(Refused::plain(r)))?;
    let tenant = tenant_id(cfg, caller.tenant).map_err(|r| no_alerts(Refused::plain(r)))?;
    let budget = policy.agent_budget(&caller.agent);
    let price = ticket.price;
    if price == 0 {
        let (view, killed) = seen_view(cfg, store, local, caller, call, now_ms)
            .map_err(|r| no_alerts(Refused::plain(r)))?;
        if let Some(refusal) = killed {
            return Err(no_alerts(Refused { refusal, view }));
        }
        // Nothing reserved: nothing for the VM to hold open (id 0).
        return Ok(Admission {
            ticket,
            view,
            alerts: Vec::new(),
        });
    }
    let owner = local
        .vm(store, now_ms)
        .map_err(|r| no_alerts(Refused::plain(r)))?
        .slot;
    ticket.owner = owner;
    let charge = Charge {
        owner,
        budget_agent: budget.map(|(key, _)| key),
        agent_limit: budget.map(|(_, limit)| limit),
        price,
        session_limit: policy.session_budget,
        kill_ppm: policy.kill_ppm,
        max_agents: cfg.sessions.max_agents,
    };
    // This VM's unwritten commits of the session ride along with the reservation, so
    // the record (and a refusal's details) shows them without a write of its own.
    let commits = local.take_commits(caller.tenant, &caller.session);
    let hint = local.slot_hint(caller.tenant, &caller.session);
    let reserved = sessions::modify_hinted(
        store,
        tenant,
        &caller.session,
        &cfg.sessions,
        now,
        true,
        hint,
        &|r| {
            let mut raised = local::apply_commits(r, cfg, owner, &commits);
            match r.try_reserve_up_to(&charge, min_price) {
                Ok(reserved) => Ok(Reserve::Done(raised, reserved)),
                Err(refusal) => {
                    raised.extend(refusal_alert(r, policy, budget, &caller.agent, &refusal));
                    if raised.is_empty() && commits.is_empty() {
                        Err(refusal)
                    } else {
                        Ok(Reserve::Refused(refusal, raised))
                    }
                }
            }
        },
    );
    let alerts_for = |raised: Vec<ScopeAlert>| -> Vec<Alert> {
        raised
            .into_iter()
            .map(|alert| Alert {
                tenant: tenant.to_string(),
                session: caller.session.clone(),
                at: now,
                alert,
            })
            .collect()
    };
    let refused_with_view = |refusal: Refusal| Refused {
        refusal,
        view: current_view(cfg, store, caller, call, now)
            .map(|(v, _)| v)
            .unwrap_or_default(),
    };
    let mut alerts = Vec::new();
    let (slot, mut session_record, session_amount) = match reserved {
        Ok(Some((slot, record, Reserve::Done(raised, amount)))) => {
            alerts.extend(alerts_for(raised));
            (slot, record, amount)
        }
        Ok(Some((_, record, Reserve::Refused(refusal, raised)))) => {
            let windows = if cfg.track_windows {
                read_windows(store, tenant, now).ok()
            } else {
                None
            };
            let view = view_of(policy, budget, Some(&record), windows.as_ref());
            return Err(reject(Refused { refusal, view }, alerts_for(raised)));
        }
        Ok(None) => {
            local.return_commits(caller.tenant, &caller.session, commits);
            return Err(no_alerts(Refused::plain(Refusal::new(
                ErrorCode::InternalError,
                "session vanished",
            ))));
        }
        Err(refusal) => {
            // Nothing was written: the refusal came before any change (no commits rode
            // along, or the store failed), so the commits wait for the next write.
            local.return_commits(caller.tenant, &caller.session, commits);
            return Err(no_alerts(refused_with_view(refusal)));
        }
    };
    ticket.slot = Some(slot);
    ticket.price = session_amount;
    let mut windows_record = None;
    if ticket.windows {
        let pending = local.take_window_commits(caller.tenant);
        let result = update(store, &tenant_windows_key(tenant), |bytes| {
            let mut record = decode_windows(bytes)?;
            record.roll(now);
            let mut raised = match (&pending, cfg.policies.get(pending.map_or(0, |p| p.policy))) {
                (Some(w), Some(p)) => local::apply_window_commits(&mut record, p, owner, w),
                _ => Vec::new(),
            };
            match record.try_reserve_up_to(
                owner,
                session_amount,
                min_price.min(session_amount),
                policy.daily_budget,
                policy.monthly_budget,
            ) {
                Ok(amount) => Ok(Step::Write(record.encode(), Ok((record, raised, amount)))),
                Err(refusal) => {
                    raised.extend(window_refusal_alert(&mut record, policy, &refusal));
                    if raised.is_empty() && pending.is_none() {
                        Ok(Step::Keep(Err((refusal, raised, record))))
                    } else {
                        Ok(Step::Write(record.encode(), Err((refusal, raised, record))))
                    }
                }
            }
        });
        match result {
            Ok(Ok((record, raised, amount))) => {
                alerts.extend(alerts_for(raised));
                windows_record = Some(record);
                if amount < session_amount {
                    // The day or month leaves less than the session did: the session
                    // keeps only that much reserved (the reservation goes on).
                    let back = Release {
                        owner,
                        budget_agent: charge.budget_agent,
                        reserved: session_amount - amount,
                        count: 0,
                        cost: 0,
                    };
                    if let Ok(Some(record)) = sessions::settle(
                        store,
                        tenant,
                        &caller.session,
                        Some(slot),
                        &cfg.sessions,
                        now,
                        &back,
                    ) {
                        session_record = record;
                    }
                }
                ticket.price = amount;
            }
            Ok(Err((refusal, raised, record))) => {
                // Give back the session part, then refuse with the window's code.
                let back = Release {
                    owner,
                    budget_agent: charge.budget_agent,
                    reserved: session_amount,
                    count: 1,
                    cost: 0,
                };
                let given_back = sessions::settle(
                    store,
                    tenant,
                    &caller.session,
                    Some(slot),
                    &cfg.sessions,
                    now,
                    &back,
                )
                .map_err(|r| no_alerts(Refused::plain(r)))?;
                let view = view_of(policy, budget, given_back.as_ref(), Some(&record));
                alerts.extend(alerts_for(raised));
                return Err(reject(Refused { refusal, view }, alerts));
            }
            Err(refusal) => {
                local.return_window_commits(caller.tenant, pending);
                let back = Release {
                    owner,
                    budget_agent: charge.budget_agent,
                    reserved: session_amount,
                    count: 1,
                    cost: 0,
                };
                let _ = sessions::settle(
                    store,
                    tenant,
                    &caller.session,
                    Some(slot),
                    &cfg.sessions,
                    now,
                    &back,
                );
                return Err(no_alerts(Refused::plain(refusal)));
            }
        }
    } else if policy.daily_budget.is_some() || policy.monthly_budget.is_some() {
        windows_record = read_windows(store, tenant, now).ok();
    }
    let view = view_of(
        policy,
        budget,
        Some(&session_record),
        windows_record.as_ref(),
    );
    local.saw(
        caller.tenant,
        &caller.session,
        Some((slot, session_record)),
        now_ms,
    );
    if let Some(record) = windows_record {
        local.saw_windows(caller.tenant, record, now_ms);
    }
    ticket.id = local.open(&ticket);
    Ok(Admission {
        ticket,
        view,
        alerts,
    })
}

/// The alert a refused reservation means, raised once (its flag set in `r`).
fn refusal_alert(
    r: &mut BudgetRecord,
    policy: &Policy,
    budget: Option<(&str, Amount)>,
    agent: &str,
    refusal: &Refusal,
) -> Vec<ScopeAlert> {
    let mut raised = Vec::new();
    match refusal.code {
        ErrorCode::AgentBudgetExceeded => {
            if let Some((key, limit)) = budget {
                let spent = r.agent(key).map_or(0, |a| a.spent);
                if let Some(i) = r.agent_index(key) {
                    raised.extend(raise_once(
                        &mut r.agents[i].alerts,
                        AlertKind::BudgetExhausted,
                        Scope::Agent,
                        Some(agent),
                        spent,
                        limit,
                    ));
                }
            }
        }
        ErrorCode::SessionBudgetExceeded => {
            let spent = r.spent;
            raised.extend(raise_once(
                &mut r.alerts,
                AlertKind::BudgetExhausted,
                Scope::Session,
                None,
                spent,
                policy.session_budget.unwrap_or(0),
            ));
        }
        ErrorCode::KillSwitchActive if !r.killed => {
            let spent = r.spent;
            raised.extend(raise_once(
                &mut r.alerts,
                AlertKind::KillSwitch,
                Scope::Session,
                None,
                spent,
                policy.session_budget.unwrap_or(0),
            ));
        }
        _ => {}
    }
    raised
}

fn window_refusal_alert(
    record: &mut WindowsRecord,
    policy: &Policy,
    refusal: &Refusal,
) -> Option<ScopeAlert> {
    let (scope, limit, counter) = match refusal.code {
        ErrorCode::DailyBudgetExceeded => (Scope::Daily, policy.daily_budget?, &mut record.day),
        ErrorCode::MonthlyBudgetExceeded => {
            (Scope::Monthly, policy.monthly_budget?, &mut record.month)
        }
        _ => return None,
    };
    let spent = counter.spent;
    raise_once(
        &mut counter.alerts,
        AlertKind::BudgetExhausted,
        scope,
        None,
        spent,
        limit,
    )
}

/// Ends an admitted call. A call charged exactly what it reserved is committed on the
/// VM's next flush (nothing a budget check reads changes); any other outcome (a
/// release, a metered call's real cost) is settled in the records at once. Every call
/// is counted for its session's report.
pub fn settle<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    local: &mut LocalLedger,
    ticket: &Ticket,
    outcome: &Outcome,
    now_ms: u64,
) -> Result<Settled, Refusal> {
    if ticket.id != 0 && !local.close(ticket.id) {
        // Already settled: expired, or charged by a recovery while this VM was taken
        // for dead.
        return Ok(Settled::default());
    }
    let max_agents = cfg.sessions.max_agents;
    if !outcome.uncounted {
        local.record_call(
            ticket.tenant,
            &ticket.session,
            ticket.slot,
            &CallStats {
                agent: &ticket.agent,
                parent: ticket.parent.as_deref(),
                tool: ticket.tool.as_deref(),
                endpoint: &ticket.endpoint_label,
                model: outcome.model.as_deref(),
                cost: outcome.cost,
                cache_hit: false,
                savings: 0,
                tokens: outcome.tokens,
                unconfirmed: outcome.unconfirmed,
                unmetered: outcome.unmetered,
                at_ms: now_ms,
            },
            max_agents,
        );
    }
    if let Some(held) = &ticket.reservation {
        return Ok(Settled {
            remote: Some(remote::settlement(
                cfg,
                ticket,
                &held.id,
                outcome.cost,
                outcome.unconfirmed,
                held.plan.clone(),
            )),
            ..Settled::default()
        });
    }
    if ticket.price == 0 && outcome.cost == 0 {
        return Ok(Settled::default());
    }
    if outcome.cost == ticket.price {
        local.defer_commit(ticket);
        return Ok(Settled::default());
    }
    let mut settled = settle_now(cfg, store, ticket, outcome.cost, now_ms / 1000)?;
    if let (Some(slot), Some(record)) = (ticket.slot, settled.session.take()) {
        local.saw(ticket.tenant, &ticket.session, Some((slot, record)), now_ms);
    }
    if let Some(record) = settled.windows.take() {
        local.saw_windows(ticket.tenant, record, now_ms);
    }
    Ok(settled)
}

/// Settles a reservation in the records now: gives back what it reserved and charges
/// `cost`, raising the alerts the spend crossed.
pub fn settle_now<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    ticket: &Ticket,
    cost: Amount,
    now: u64,
) -> Result<Settled, Refusal> {
    let policy = policy_of(cfg, ticket.policy)?;
    let tenant = tenant_id(cfg, ticket.tenant)?;
    let budget = ticket
        .budget_agent
        .as_deref()
        .and_then(|key| policy.budget_limit(key).map(|limit| (key, limit)));
    let release = Release {
        owner: ticket.owner,
        budget_agent: ticket.budget_agent.as_deref(),
        reserved: ticket.price,
        count: u32::from(ticket.price > 0),
        cost,
    };
    let mut alerts = Vec::new();
    let agent = budget.map(|(key, limit)| (key, limit, ticket.agent.as_str()));
    let settled = sessions::with_session(
        store,
        tenant,
        &ticket.session,
        ticket.slot,
        &cfg.sessions,
        now,
        &|r| {
            r.settle(&release);
            if cost > 0 {
                session_alerts(r, policy, agent)
            } else {
                Vec::new()
            }
        },
    )?;
    let session_record = settled.map(|(record, raised)| {
        alerts.extend(raised.into_iter().map(|alert| Alert {
            tenant: tenant.to_string(),
            session: ticket.session.clone(),
            at: now,
            alert,
        }));
        record
    });
    let mut windows_record = None;
    if ticket.windows {
        let (record, raised) = update(store, &tenant_windows_key(tenant), |bytes| {
            let mut record = decode_windows(bytes)?;
            record.roll(now);
            record.settle(
                ticket.owner,
                ticket.price,
                u32::from(ticket.price > 0),
                cost,
            );
            let raised = window_alerts(&mut record, policy, cost > 0);
            Ok(Step::Write(record.encode(), (record, raised)))
        })?;
        windows_record = Some(record);
        alerts.extend(raised.into_iter().map(|alert| Alert {
            tenant: tenant.to_string(),
            session: ticket.session.clone(),
            at: now,
            alert,
        }));
    } else if policy.daily_budget.is_some() || policy.monthly_budget.is_some() {
        windows_record = read_windows(store, tenant, now).ok();
    }
    Ok(Settled {
        view: Some(view_of(
            policy,
            budget,
            session_record.as_ref(),
            windows_record.as_ref(),
        )),
        alerts,
        session: session_record,
        windows: windows_record,
        remote: None,
    })
}

/// The alerts due on a session's committed spend (session and one agent budget).
pub fn session_alerts(
    r: &mut BudgetRecord,
    policy: &Policy,
    agent: Option<(&str, Amount, &str)>,
) -> Vec<ScopeAlert> {
    let mut raised = Vec::new();
    if let Some(limit) = policy.session_budget {
        let spent = r.spent;
        raised.extend(after_spend(
            &mut r.alerts,
            Scope::Session,
            None,
            spent,
            limit,
            policy.alert_ppm,
            policy.kill_ppm,
        ));
    }
    if let Some((key, limit, agent_id)) = agent {
        if let Some(i) = r.agent_index(key) {
            let spent = r.agents[i].spent;
            raised.extend(after_spend(
                &mut r.agents[i].alerts,
                Scope::Agent,
                Some(agent_id),
                spent,
                limit,
                policy.alert_ppm,
                None,
            ));
        }
    }
    raised
}

/// The alerts due on a tenant's committed spend (day and month).
pub fn window_alerts(
    record: &mut WindowsRecord,
    policy: &Policy,
    spent_more: bool,
) -> Vec<ScopeAlert> {
    let mut raised = Vec::new();
    if !spent_more {
        return raised;
    }
    for (scope, limit, counter) in [
        (Scope::Daily, policy.daily_budget, &mut record.day),
        (Scope::Monthly, policy.monthly_budget, &mut record.month),
    ] {
        if let Some(limit) = limit {
            let spent = counter.spent;
            raised.extend(after_spend(
                &mut counter.alerts,
                scope,
                None,
                spent,
                limit,
                policy.alert_ppm,
                None,
            ));
        }
    }
    raised
}

/// The budgets that apply to this caller and call, read without changing anything,
/// and the kill switch's refusal when the session was killed (a manual kill stops every
/// call of the session: free ones and cache hits too).
pub fn current_view<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    caller: &Caller,
    call: &Call,
    now: u64,
) -> Result<(BudgetView, Option<Refusal>), Refusal> {
    let policy = policy_of(cfg, call.policy)?;
    let tenant = tenant_id(cfg, caller.tenant)?;
    let budget = policy.agent_budget(&caller.agent);
    let session = sessions::lookup(store, tenant, &caller.session, &cfg.sessions)?.map(|(_, r)| r);
    let windows = if policy.daily_budget.is_some() || policy.monthly_budget.is_some() {
        Some(read_windows(store, tenant, now)?)
    } else {
        None
    };
    // The manual kill switch stops everything; the threshold stops spending (priced
    // calls), not what is free.
    let killed = session
        .as_ref()
        .filter(|s| s.killed)
        .and_then(|s| s.kill_refusal(policy.session_budget, policy.kill_ppm, call.price));
    Ok((
        view_of(policy, budget, session.as_ref(), windows.as_ref()),
        killed,
    ))
}

/// [`current_view`] for a call that spends nothing (a free call, a cache hit): from
/// the records this VM saw at most `ledger.flushIntervalMs` ago, else read (and
/// remembered). The manual kill switch is in force on every VM before the kill API
/// answers (it waits for every VM to forget what it saw); budget figures can be that
/// much behind other workers' spending, which a call that spends nothing cannot use
/// to overspend.
pub fn seen_view<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    local: &mut LocalLedger,
    caller: &Caller,
    call: &Call,
    now_ms: u64,
) -> Result<(BudgetView, Option<Refusal>), Refusal> {
    let policy = policy_of(cfg, call.policy)?;
    let tenant = tenant_id(cfg, caller.tenant)?;
    let max_age = cfg.ledger.flush_interval_ms;
    if local
        .seen(caller.tenant, &caller.session, now_ms, max_age)
        .is_none()
    {
        let hint = local.slot_hint(caller.tenant, &caller.session);
        let found = sessions::lookup_hinted(store, tenant, &caller.session, &cfg.sessions, hint)?;
        local.saw(caller.tenant, &caller.session, found, now_ms);
    }
    let windowed = policy.daily_budget.is_some() || policy.monthly_budget.is_some();
    if windowed && local.seen_windows(caller.tenant, now_ms, max_age).is_none() {
        let record = read_windows(store, tenant, now_ms / 1000)?;
        local.saw_windows(caller.tenant, record, now_ms);
    }
    let session = local
        .seen(caller.tenant, &caller.session, now_ms, u64::MAX)
        .flatten()
        .map(|(_, r)| r);
    let windows = if windowed {
        local.seen_windows(caller.tenant, now_ms, u64::MAX)
    } else {
        None
    };
    let budget = policy.agent_budget(&caller.agent);
    let killed = session
        .filter(|s| s.killed)
        .and_then(|s| s.kill_refusal(policy.session_budget, policy.kill_ppm, call.price));
    Ok((view_of(policy, budget, session, windows), killed))
}

/// Whether a call of this price would be admitted now, without reserving anything
/// (relay mode asks before letting an x402 offer through to the agent, so that the
/// agent never signs a payment pag0 would then refuse).
pub fn dry_run<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    caller: &Caller,
    call: &Call,
    now: u64,
) -> Result<BudgetView, Box<Refused>> {
    let plain = |r: Refusal| Box::new(Refused::plain(r));
    let policy = policy_of(cfg, call.policy).map_err(plain)?;
    check_rules(
        policy,
        policy.agent_rule(&caller.agent),
        &call.endpoint,
        call.price,
    )
    .map_err(plain)?;
    let (view, killed) = current_view(cfg, store, caller, call, now).map_err(plain)?;
    // `current_view` reports only a manual kill (free calls go on past the threshold);
    // a priced call is refused at the threshold too, as `admit` would.
    let killed = match killed {
        Some(refusal) => Some(refusal),
        None if call.price > 0 => {
            let tenant = tenant_id(cfg, caller.tenant).map_err(plain)?;
            sessions::lookup(store, tenant, &caller.session, &cfg.sessions)
                .map_err(plain)?
                .and_then(|(_, r)| {
                    r.kill_refusal(policy.session_budget, policy.kill_ppm, call.price)
                })
        }
        None => None,
    };
    if let Some(refusal) = killed {
        return Err(Box::new(Refused { refusal, view }));
    }
    for scope in &view.scopes {
        if !budget::fits(scope.spent, scope.reserved, call.price, scope.limit) {
            let refusal = Refusal::budget(crate::core::errors::BudgetDetails {
                scope: scope.scope,
                limit: scope.limit,
                spent: scope.spent,
                reserved: scope.reserved,
                requested: call.price,
            });
            return Err(Box::new(Refused { refusal, view }));
        }
    }
    Ok(view)
}

pub fn view_of(
    policy: &Policy,
    budget: Option<(&str, Amount)>,
    session: Option<&BudgetRecord>,
    windows: Option<&WindowsRecord>,
) -> BudgetView {
    let mut scopes = Vec::with_capacity(4);
    if let Some((key, limit)) = budget {
        let (spent, reserved) = session.map_or((0, 0), |s| s.agent_totals(key));
        scopes.push(ScopeState {
            scope: Scope::Agent,
            limit,
            spent,
            reserved,
        });
    }
    if let Some(limit) = policy.session_budget {
        scopes.push(ScopeState {
            scope: Scope::Session,
            limit,
            spent: session.map_or(0, |s| s.spent),
            reserved: session.map_or(0, |s| s.reserved()),
        });
    }
    let (day, month, reserved) =
        windows.map_or((0, 0, 0), |w| (w.day.spent, w.month.spent, w.reserved()));
    if let Some(limit) = policy.daily_budget {
        scopes.push(ScopeState {
            scope: Scope::Daily,
            limit,
            spent: day,
            reserved,
        });
    }
    if let Some(limit) = policy.monthly_budget {
        scopes.push(ScopeState {
            scope: Scope::Monthly,
            limit,
            spent: month,
            reserved,
        });
    }
    BudgetView {
        scopes,
        alert_ppm: policy.alert_ppm,
    }
}

/// Counts a cache hit for the report (free, nothing reserved; the saving counted).
pub fn record_hit(
    local: &mut LocalLedger,
    cfg: &Config,
    caller: &Caller,
    call: &Call,
    savings: Amount,
    now_ms: u64,
) {
    local.record_call(
        caller.tenant,
        &caller.session,
        None,
        &CallStats {
            agent: &caller.agent,
            parent: caller.parent.as_deref(),
            tool: call.tool.as_deref(),
            endpoint: &call.endpoint_label,
            model: None,
            cost: 0,
            cache_hit: true,
            savings,
            tokens: None,
            unconfirmed: false,
            unmetered: false,
            at_ms: now_ms,
        },
        cfg.sessions.max_agents,
    );
}

/// Counts a refused call for the report (`now_ms`: Unix milliseconds).
pub fn record_refusal(
    local: &mut LocalLedger,
    cfg: &Config,
    caller: &Caller,
    refusal: &Refusal,
    now_ms: u64,
) {
    if matches!(
        refusal.code,
        ErrorCode::CapacityExceeded | ErrorCode::InternalError
    ) {
        return;
    }
    local.record_refusal(
        caller.tenant,
        &caller.session,
        &caller.agent,
        caller.parent.as_deref(),
        refusal.code.as_str(),
        now_ms,
        cfg.sessions.max_agents,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::call::RouteSettings;
    use crate::core::compile::compile_json;
    use crate::core::firewall::describe_call;
    use crate::core::store::MemoryStore;

    fn priced(cfg: &Config, price: &str) -> Call {
        let route = RouteSettings {
            price: Some(price.to_string()),
            ..RouteSettings::default()
        };
        describe_call(cfg, b"x402.example", b"/a", &route).unwrap()
    }

    #[test]
    fn a_dry_run_past_the_kill_switch_threshold_refuses_as_the_call_would_be() {
        let cfg = compile_json(
            br#"{"policies": {"p": {"sessionBudget": "1000000", "killSwitchThreshold": 0.9}}}"#,
        )
        .unwrap();
        let (store, mut local) = (MemoryStore::new(), LocalLedger::new());
        let caller = Caller {
            tenant: 0,
            session: "s-1".into(),
            agent: "buyer-1".into(),
            parent: None,
        };
        let now_ms = 1_773_100_800_000;
        let first = admit(
            &cfg,
            &store,
            &mut local,
            &caller,
            &priced(&cfg, "950000"),
            now_ms,
        )
        .unwrap()
        .ticket;
        settle(
            &cfg,
            &store,
            &mut local,
            &first,
            &Outcome::commit(950_000),
            now_ms,
        )
        .unwrap();
        // Relay mode's question before an x402 offer goes to the agent: would its paid
        // retry be admitted? Not past the threshold (the agent would sign for nothing).
        let retry = priced(&cfg, "10000");
        let refused = admit(&cfg, &store, &mut local, &caller, &retry, now_ms).unwrap_err();
        assert_eq!(refused.refused.refusal.code, ErrorCode::KillSwitchActive);
        let dry = dry_run(&cfg, &store, &caller, &retry, now_ms / 1000).unwrap_err();
        assert_eq!(dry.refusal.code, ErrorCode::KillSwitchActive);
        // A free call is not spending: the threshold does not stop it.
        assert!(dry_run(&cfg, &store, &caller, &priced(&cfg, "0"), now_ms / 1000).is_ok());
    }
}
