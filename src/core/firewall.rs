//! The spend firewall, end to end, over a [`SharedStore`]: who is calling, what the
//! call costs, whether policy lets it through, reserving it in every scope, and
//! settling it when the upstream answers. The host layer only gathers facts and applies
//! the decisions.

use crate::core::amount::Amount;
use crate::core::compile::{check_route_price, check_route_tool, parse_charge_on, Config};
use crate::core::endpoint::endpoint;
use crate::core::errors::{ErrorCode, Refusal, Scope};
use crate::core::headers::{BudgetView, ScopeState};
use crate::core::identity::valid_id;
use crate::core::ledger::{Charge, SessionRecord, TenantRecord};
use crate::core::policy::{check_rules, ChargeOn, Policy};
use crate::core::sessions::{self, Settlement};
use crate::core::store::{read, tenant_windows_key, update, SharedStore, Step};

/// A request header as the host found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Missing,
    One(Vec<u8>),
    /// Sent more than once: ambiguous, so refused.
    Many,
}

/// Who the request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: usize,
    pub session: String,
    pub agent: String,
}

/// Identifies the caller from its headers: tenant by API key (401 when the config
/// lists tenants and the key is missing or unknown), session and agent ids (400 when
/// malformed). `header` looks a header up by lowercase name.
pub fn identify(cfg: &Config, header: &dyn Fn(&str) -> HeaderValue) -> Result<Caller, Refusal> {
    let id = &cfg.identity;
    let tenant = if cfg.requires_api_key() {
        match header(&id.api_key_header) {
            HeaderValue::One(key) => cfg.tenant_for_key(&key).ok_or_else(|| {
                Refusal::new(ErrorCode::Unauthorized, "unknown API key")
                    .with_fields(vec![("header", id.api_key_header.clone())])
            })?,
            HeaderValue::Missing => {
                return Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    format!("missing API key header {}", id.api_key_header),
                )
                .with_fields(vec![("header", id.api_key_header.clone())]))
            }
            HeaderValue::Many => return Err(duplicate(&id.api_key_header)),
        }
    } else {
        0
    };
    let session = match header(&id.session_header) {
        HeaderValue::One(v) => checked_id(v, &id.session_header)?,
        HeaderValue::Missing => {
            return Err(Refusal::new(
                ErrorCode::InvalidRequest,
                format!("missing session header {}", id.session_header),
            )
            .with_fields(vec![("header", id.session_header.clone())]))
        }
        HeaderValue::Many => return Err(duplicate(&id.session_header)),
    };
    let agent = match header(&id.agent_header) {
        HeaderValue::One(v) => checked_id(v, &id.agent_header)?,
        HeaderValue::Missing => id.default_agent.clone(),
        HeaderValue::Many => return Err(duplicate(&id.agent_header)),
    };
    Ok(Caller {
        tenant,
        session,
        agent,
    })
}

fn duplicate(name: &str) -> Refusal {
    Refusal::new(
        ErrorCode::InvalidRequest,
        format!("header {name} is sent more than once"),
    )
    .with_fields(vec![("header", name.to_string())])
}

fn checked_id(value: Vec<u8>, name: &str) -> Result<String, Refusal> {
    if !valid_id(&value) {
        return Err(Refusal::new(
            ErrorCode::InvalidRequest,
            format!("header {name} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -"),
        )
        .with_fields(vec![("header", name.to_string())]));
    }
    String::from_utf8(value).map_err(|_| {
        Refusal::new(
            ErrorCode::InvalidRequest,
            format!("header {name} is not text"),
        )
    })
}

/// Per-route settings from route metadata (`filter_metadata.pag0`), as raw strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    pub policy: Option<String>,
    pub price: Option<String>,
    pub tool: Option<String>,
    pub charge_on: Option<String>,
}

/// What this call is: where it goes, its policy, price and tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub endpoint: String,
    pub policy: usize,
    pub price: Amount,
    pub tool: Option<String>,
    pub charge_on: ChargeOn,
}

/// Resolves endpoint, policy, price and tool. A price comes from the route, else the
/// first matching endpoint rule, else 0. Bad route metadata fails closed (500).
pub fn describe_call(
    cfg: &Config,
    authority: &[u8],
    path: &[u8],
    route: &RouteSettings,
) -> Result<Call, Refusal> {
    let endpoint = endpoint(authority, path)
        .map_err(|e| Refusal::new(ErrorCode::InvalidRequest, e.to_string()))?;
    let config_error = |m: String| Refusal::new(ErrorCode::ConfigError, m);
    let policy = match &route.policy {
        None => cfg.default_policy,
        Some(name) => *cfg.policy_by_name.get(name.as_str()).ok_or_else(|| {
            config_error(format!(
                "route metadata pag0.policy names unknown policy {name:?}"
            ))
        })?,
    };
    let rule = cfg.endpoint_rule(&endpoint);
    let price = match &route.price {
        Some(text) => check_route_price(text).map_err(config_error)?,
        None => rule.and_then(|r| r.price).unwrap_or(0),
    };
    let tool = match &route.tool {
        Some(t) => {
            check_route_tool(t).map_err(config_error)?;
            Some(t.clone())
        }
        None => rule.and_then(|r| r.tool.clone()),
    };
    let charge_on = match &route.charge_on {
        Some(text) => parse_charge_on(text).map_err(config_error)?,
        None => cfg
            .policies
            .get(policy)
            .map_or(ChargeOn::Success, |p| p.charge_on),
    };
    Ok(Call {
        endpoint,
        policy,
        price,
        tool,
        charge_on,
    })
}

/// A reservation held while the call is upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub tenant: usize,
    pub session: String,
    pub agent: String,
    pub price: Amount,
    pub windows: bool,
    pub policy: usize,
}

/// The firewall let the call through.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Held for priced calls; `None` for free ones.
    pub reservation: Option<Reservation>,
    pub view: BudgetView,
}

/// A refusal, with the budgets as they stood, for the response headers.
#[derive(Debug, Clone)]
pub struct Refused {
    pub refusal: Refusal,
    pub view: BudgetView,
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

/// Checks the call against policy and, when it is priced, reserves its price in every
/// scope: the session record (session and agent, one CAS) first, then the tenant's
/// windows (day and month, one CAS); if the windows refuse, the session part is given
/// back. No scope can go past its limit, whatever the interleaving.
pub fn admit<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    caller: &Caller,
    call: &Call,
    now: u64,
) -> Result<Admission, Refused> {
    let plain = |refusal: Refusal| Refused {
        refusal,
        view: BudgetView::default(),
    };
    let policy = policy_of(cfg, call.policy).map_err(plain)?;
    let tenant = tenant_id(cfg, caller.tenant).map_err(plain)?;
    let agent_rule = policy.agent_rule(&caller.agent);
    let refuse_with_view = |refusal: Refusal| {
        let view = current_view(cfg, store, caller, call, now).unwrap_or_default();
        Refused { refusal, view }
    };
    check_rules(policy, agent_rule, &call.endpoint, call.price).map_err(refuse_with_view)?;
    if call.price == 0 {
        let view = current_view(cfg, store, caller, call, now).map_err(plain)?;
        return Ok(Admission {
            reservation: None,
            view,
        });
    }
    let charge = Charge {
        agent: &caller.agent,
        price: call.price,
        session_limit: policy.session_budget,
        agent_limit: agent_rule.and_then(|a| a.agent_budget),
        kill_ppm: policy.kill_ppm,
        max_agents: cfg.sessions.max_agents,
    };
    let (_, session_record) =
        sessions::reserve(store, tenant, &caller.session, &cfg.sessions, now, &charge)
            .map_err(refuse_with_view)?;
    let mut tenant_record = None;
    if cfg.track_windows {
        let reserved = update(store, &tenant_windows_key(tenant), |bytes| {
            let mut record = decode_tenant(bytes)?;
            record.roll(now);
            record.try_reserve(call.price, policy.daily_budget, policy.monthly_budget)?;
            Ok(Step::Write(record.encode(), record))
        });
        match reserved {
            Ok(record) => tenant_record = Some(record),
            Err(refusal) => {
                // Give back the session part, then refuse with the window's code.
                let released = sessions::settle(
                    store,
                    tenant,
                    &caller.session,
                    &cfg.sessions,
                    now,
                    Settlement {
                        agent: &caller.agent,
                        price: call.price,
                        commit: false,
                    },
                );
                if let Err(e) = released {
                    return Err(plain(e));
                }
                return Err(refuse_with_view(refusal));
            }
        }
    }
    let view = view_of(
        policy,
        agent_rule.and_then(|a| a.agent_budget),
        &caller.agent,
        Some(&session_record),
        tenant_record.as_ref(),
    );
    Ok(Admission {
        reservation: Some(Reservation {
            tenant: caller.tenant,
            session: caller.session.clone(),
            agent: caller.agent.clone(),
            price: call.price,
            windows: cfg.track_windows,
            policy: call.policy,
        }),
        view,
    })
}

/// Whether a response commits the reservation.
pub fn should_commit(charge_on: ChargeOn, upstream_status: Option<u32>) -> bool {
    match (charge_on, upstream_status) {
        (_, None) => false,
        (ChargeOn::Success, Some(status)) => (200..300).contains(&status),
        (ChargeOn::Always, Some(_)) => true,
    }
}

/// Commits or releases a reservation, in the windows and in the session, and returns
/// the budgets as they now stand.
pub fn settle<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    reservation: &Reservation,
    commit: bool,
    now: u64,
) -> Result<BudgetView, Refusal> {
    let tenant = tenant_id(cfg, reservation.tenant)?;
    let policy = policy_of(cfg, reservation.policy)?;
    let mut tenant_record = None;
    if reservation.windows {
        tenant_record = Some(update(store, &tenant_windows_key(tenant), |bytes| {
            let mut record = decode_tenant(bytes)?;
            record.roll(now);
            record.settle(reservation.price, commit);
            Ok(Step::Write(record.encode(), record))
        })?);
    }
    let session_record = sessions::settle(
        store,
        tenant,
        &reservation.session,
        &cfg.sessions,
        now,
        Settlement {
            agent: &reservation.agent,
            price: reservation.price,
            commit,
        },
    )?;
    let agent_budget = policy
        .agent_rule(&reservation.agent)
        .and_then(|a| a.agent_budget);
    Ok(view_of(
        policy,
        agent_budget,
        &reservation.agent,
        session_record.as_ref(),
        tenant_record.as_ref(),
    ))
}

/// The budgets that apply to this caller and call, read without changing anything.
pub fn current_view<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    caller: &Caller,
    call: &Call,
    now: u64,
) -> Result<BudgetView, Refusal> {
    let policy = policy_of(cfg, call.policy)?;
    let tenant = tenant_id(cfg, caller.tenant)?;
    let agent_budget = policy
        .agent_rule(&caller.agent)
        .and_then(|a| a.agent_budget);
    let needs_session = policy.session_budget.is_some() || agent_budget.is_some();
    let session = if needs_session {
        sessions::lookup(store, tenant, &caller.session, &cfg.sessions)?.map(|(_, r)| r)
    } else {
        None
    };
    let needs_windows = policy.daily_budget.is_some() || policy.monthly_budget.is_some();
    let windows = if needs_windows {
        let mut record = decode_tenant(&read(store, &tenant_windows_key(tenant))?)?;
        record.roll(now);
        Some(record)
    } else {
        None
    };
    Ok(view_of(
        policy,
        agent_budget,
        &caller.agent,
        session.as_ref(),
        windows.as_ref(),
    ))
}

fn view_of(
    policy: &Policy,
    agent_budget: Option<Amount>,
    agent: &str,
    session: Option<&SessionRecord>,
    windows: Option<&TenantRecord>,
) -> BudgetView {
    let mut scopes = Vec::with_capacity(4);
    if let Some(limit) = agent_budget {
        let entry = session.and_then(|s| s.agent(agent));
        scopes.push(ScopeState {
            scope: Scope::Agent,
            limit,
            spent: entry.map_or(0, |a| a.spent),
            reserved: entry.map_or(0, |a| a.reserved),
        });
    }
    if let Some(limit) = policy.session_budget {
        scopes.push(ScopeState {
            scope: Scope::Session,
            limit,
            spent: session.map_or(0, |s| s.spent),
            reserved: session.map_or(0, |s| s.reserved),
        });
    }
    let windows = windows.copied().unwrap_or_default();
    if let Some(limit) = policy.daily_budget {
        scopes.push(ScopeState {
            scope: Scope::Daily,
            limit,
            spent: windows.day.spent,
            reserved: windows.day.reserved,
        });
    }
    if let Some(limit) = policy.monthly_budget {
        scopes.push(ScopeState {
            scope: Scope::Monthly,
            limit,
            spent: windows.month.spent,
            reserved: windows.month.reserved,
        });
    }
    BudgetView {
        scopes,
        alert_ppm: policy.alert_ppm,
    }
}

fn decode_tenant(bytes: &[u8]) -> Result<TenantRecord, Refusal> {
    TenantRecord::decode(bytes).map_err(|_| {
        Refusal::new(
            ErrorCode::InternalError,
            "corrupt tenant record in shared data",
        )
    })
}
