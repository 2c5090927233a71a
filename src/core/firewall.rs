//! The spend firewall, end to end, over a [`SharedStore`]: who is calling, what the
//! call costs, whether policy lets it through, reserving it in every scope, and
//! settling it when the upstream answers. The host layer only gathers facts and applies
//! the decisions.

use crate::core::alerts::{after_spend, raise_once, Alert, AlertKind};
use crate::core::amount::Amount;
use crate::core::compile::{
    check_route_endpoint, check_route_price, check_route_tool, parse_charge_on, Config,
};
use crate::core::endpoint::endpoint;
use crate::core::errors::{ErrorCode, Refusal, Scope};
use crate::core::headers::{BudgetView, ScopeState};
use crate::core::identity::valid_id;
use crate::core::ledger::{CallStats, Charge, SessionRecord, TenantRecord};
use crate::core::policy::{check_rules, ChargeOn, Policy};
use crate::core::sessions::{self, Settlement};
use crate::core::store::{read, tenant_windows_key, update, SharedStore, Step};
use crate::core::x402;

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
    /// Label for reports and metrics (`api.tavily.com/search`).
    pub endpoint: Option<String>,
    /// Cache TTL override for the route, seconds ("0": never cache).
    pub cache_ttl: Option<String>,
}

/// What this call is: where it goes, its policy, price and tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub endpoint: String,
    pub policy: usize,
    pub price: Amount,
    pub tool: Option<String>,
    pub charge_on: ChargeOn,
    /// The endpoint as reports group it: the matching `endpoints` rule's pattern, else
    /// the route's `endpoint` label, else the host.
    pub endpoint_label: String,
    /// The same for metrics, where an unlabelled endpoint is `other` (bounded).
    pub metric_endpoint: String,
    /// The agent's own x402 payment, relayed (its value is the price).
    pub payment: Option<RelayedPayment>,
}

/// An x402 payment the agent made itself, that pag0 budgets and relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedPayment {
    pub version: u8,
    pub network: String,
    pub value: Amount,
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
    if let Some(label) = &route.endpoint {
        check_route_endpoint(label).map_err(config_error)?;
    }
    if let Some(ttl) = &route.cache_ttl {
        if ttl.parse::<u64>().is_err() {
            return Err(config_error(format!(
                "route metadata pag0.cacheTTL {ttl:?} must be a number of seconds, as a string"
            )));
        }
    }
    let labelled = rule
        .map(|r| r.glob.source().to_string())
        .or_else(|| route.endpoint.clone());
    let host = endpoint.split('/').next().unwrap_or("").to_string();
    Ok(Call {
        endpoint_label: labelled.clone().unwrap_or(host),
        metric_endpoint: labelled.unwrap_or_else(|| "other".to_string()),
        endpoint,
        policy,
        price,
        tool,
        charge_on,
        payment: None,
    })
}

/// Relay mode: the agent pays with its own wallet. Its payment header is decoded and
/// checked against the policy's x402 rules, and its value becomes the call's price, so
/// that it is reserved like any price. A header that cannot be decoded is a 400.
pub fn relay_payment(
    cfg: &Config,
    call: &mut Call,
    v1: HeaderValue,
    v2: HeaderValue,
    now: u64,
) -> Result<(), Refusal> {
    let bad = |m: String| Refusal::new(ErrorCode::InvalidRequest, m);
    let (version, value) = match (v1, v2) {
        (HeaderValue::Missing, HeaderValue::Missing) => return Ok(()),
        (HeaderValue::One(v), HeaderValue::Missing) => (1, v),
        (HeaderValue::Missing, HeaderValue::One(v)) => (2, v),
        _ => return Err(bad("send one payment header, once".into())),
    };
    let payment =
        x402::parse_payment_header(&value).map_err(|e| bad(format!("payment header: {e}")))?;
    if payment.version != version {
        return Err(bad(format!(
            "payment header carries x402Version {}, but its header is for version {version}",
            payment.version
        )));
    }
    if payment.valid_before <= now {
        return Err(bad("payment authorization has expired (validBefore)".into()));
    }
    let policy = policy_of(cfg, call.policy)?;
    let rules = &policy.payments;
    let asset = payment.accepted.as_ref().map(|a| a.asset.as_str());
    if !rules.allows_payment(&payment.scheme, &payment.network, asset, &payment.to) {
        return Err(Refusal::new(
            ErrorCode::PaymentNotAllowed,
            "the payment's scheme, network, asset or payee is not allowed by policy",
        )
        .with_fields(vec![
            ("network", payment.network.clone()),
            ("payTo", payment.to.clone()),
            ("requested", payment.value.to_string()),
        ]));
    }
    call.price = payment.value;
    call.payment = Some(RelayedPayment {
        version,
        network: payment.network,
        value: payment.value,
    });
    Ok(())
}

/// The approval service, when this call's price is above the policy's threshold.
pub fn approval_for<'a>(cfg: &'a Config, call: &Call) -> Option<&'a crate::core::policy::Approval> {
    cfg.policies
        .get(call.policy)
        .and_then(|p| p.approval.as_ref())
        .filter(|a| call.price > a.threshold)
}

/// What the approval service is asked.
pub fn approval_request(cfg: &Config, caller: &Caller, call: &Call) -> String {
    let tenant = cfg
        .tenants
        .get(caller.tenant)
        .map_or("default", |t| t.id.as_str());
    serde_json::json!({
        "tenant": tenant,
        "session": caller.session,
        "agent": caller.agent,
        "endpoint": call.endpoint,
        "tool": call.tool,
        "price": call.price.to_string(),
    })
    .to_string()
}

/// The approval service's answer: `{"approved": true|false, "reason": "…"}`. `None`:
/// no usable answer (treated as no answer in time).
pub fn approval_answer(ok_status: bool, body: &[u8]) -> Option<(bool, Option<String>)> {
    if !ok_status {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let approved = v.get("approved")?.as_bool()?;
    let reason = v
        .get("reason")
        .and_then(|r| r.as_str())
        .map(|r| r.chars().take(200).collect());
    Some((approved, reason))
}

/// How a relayed payment ended, read from the server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// The server settled it: charge, with the transaction.
    Settled(Option<String>),
    /// The server refused it (402 again, or a failed settlement): release.
    Failed(String),
    /// No settlement came back: the money may have moved, so it stays charged and is
    /// marked unconfirmed.
    Unconfirmed,
}

/// What the ledger does with a payment's outcome, and what the agent is told.
pub struct PaymentEffect {
    /// Keep the reservation as spent (else release it).
    pub commit: bool,
    /// Count it in the report's unconfirmed payments.
    pub unconfirmed: bool,
    /// The `x-pag0-payment` header.
    pub header: String,
}

impl PaymentOutcome {
    pub fn effect(&self, amount: Amount, network: &str) -> PaymentEffect {
        let (commit, unconfirmed, status, tx) = match self {
            PaymentOutcome::Settled(tx) => (true, false, "settled", tx.as_deref()),
            PaymentOutcome::Failed(_) => (false, false, "failed", None),
            PaymentOutcome::Unconfirmed => (true, true, "unconfirmed", None),
        };
        PaymentEffect {
            commit,
            unconfirmed,
            header: x402::payment_header(status, amount, network, tx),
        }
    }
}

pub fn payment_outcome(status: Option<u32>, settlement: Option<&[u8]>) -> PaymentOutcome {
    if status == Some(402) {
        return PaymentOutcome::Failed("the server answered 402 again".into());
    }
    match settlement.map(x402::parse_settlement_header) {
        Some(Ok(s)) if s.success => PaymentOutcome::Settled(s.transaction),
        Some(Ok(s)) => {
            PaymentOutcome::Failed(s.error_reason.unwrap_or_else(|| "settlement failed".into()))
        }
        Some(Err(_)) | None => PaymentOutcome::Unconfirmed,
    }
}

/// An admitted call, held until it ends: its reservation (none when free) and what
/// the report will count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub tenant: usize,
    pub session: String,
    pub agent: String,
    pub price: Amount,
    pub windows: bool,
    pub policy: usize,
    pub tool: Option<String>,
    pub endpoint_label: String,
}

/// The firewall let the call through.
#[derive(Debug, Clone)]
pub struct Admission {
    pub ticket: Ticket,
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
    let ticket = Ticket {
        tenant: caller.tenant,
        session: caller.session.clone(),
        agent: caller.agent.clone(),
        price: call.price,
        windows: cfg.track_windows && call.price > 0,
        policy: call.policy,
        tool: call.tool.clone(),
        endpoint_label: call.endpoint_label.clone(),
    };
    if call.price == 0 {
        let view = current_view(cfg, store, caller, call, now).map_err(plain)?;
        return Ok(Admission { ticket, view });
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
    if ticket.windows {
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
                let how = Settlement {
                    agent: &caller.agent,
                    price: call.price,
                    commit: false,
                };
                if let Err(e) =
                    sessions::settle(store, tenant, &caller.session, &cfg.sessions, now, how)
                {
                    return Err(plain(e));
                }
                return Err(refuse_with_view(refusal));
            }
        }
    }
    let agent_budget = agent_rule.and_then(|a| a.agent_budget);
    let view = view_of(
        policy,
        agent_budget,
        &caller.agent,
        Some(&session_record),
        tenant_record.as_ref(),
    );
    Ok(Admission { ticket, view })
}

/// Whether a response commits the reservation.
pub fn should_commit(charge_on: ChargeOn, upstream_status: Option<u32>) -> bool {
    match (charge_on, upstream_status) {
        (_, None) => false,
        (ChargeOn::Success, Some(status)) => (200..300).contains(&status),
        (ChargeOn::Always, Some(_)) => true,
    }
}

/// How an admitted call ended.
#[derive(Debug, Clone)]
pub struct Settled {
    pub view: BudgetView,
    pub cost: Amount,
    pub alerts: Vec<Alert>,
}

/// Ends an admitted call: commits or releases its reservation in the windows and the
/// session, counts it in the session's report, and raises the alerts this spend
/// crossed. One CAS per record.
pub fn settle<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    ticket: &Ticket,
    commit: bool,
    now: u64,
) -> Result<Settled, Refusal> {
    settle_payment(cfg, store, ticket, commit, false, now)
}

/// [`settle`], and when `unconfirmed`, counts the call's payment as unconfirmed.
pub fn settle_payment<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    ticket: &Ticket,
    commit: bool,
    unconfirmed: bool,
    now: u64,
) -> Result<Settled, Refusal> {
    let tenant = tenant_id(cfg, ticket.tenant)?;
    let policy = policy_of(cfg, ticket.policy)?;
    let cost = if commit { ticket.price } else { 0 };
    let mut alerts = Vec::new();
    let mut tenant_record = None;
    if ticket.windows {
        let (record, window_alerts) = update(store, &tenant_windows_key(tenant), |bytes| {
            let mut record = decode_tenant(bytes)?;
            record.roll(now);
            record.settle(ticket.price, commit);
            let mut raised = Vec::new();
            for (scope, limit, counter) in [
                (Scope::Daily, policy.daily_budget, &mut record.day),
                (Scope::Monthly, policy.monthly_budget, &mut record.month),
            ] {
                if let (Some(limit), true) = (limit, commit) {
                    raised.extend(after_spend(
                        &mut counter.alerts,
                        scope,
                        None,
                        counter.spent,
                        limit,
                        policy.alert_ppm,
                        None,
                    ));
                }
            }
            Ok(Step::Write(record.encode(), (record, raised)))
        })?;
        tenant_record = Some(record);
        alerts.extend(window_alerts);
    } else if policy.daily_budget.is_some() || policy.monthly_budget.is_some() {
        let mut record = decode_tenant(&read(store, &tenant_windows_key(tenant))?)?;
        record.roll(now);
        tenant_record = Some(record);
    }
    let agent_budget = policy
        .agent_rule(&ticket.agent)
        .and_then(|a| a.agent_budget);
    let stats = CallStats {
        agent: &ticket.agent,
        tool: ticket.tool.as_deref(),
        endpoint: &ticket.endpoint_label,
        cost,
        cache_hit: false,
        savings: 0,
    };
    let max_agents = cfg.sessions.max_agents;
    let changed = sessions::modify(
        store,
        tenant,
        &ticket.session,
        &cfg.sessions,
        now,
        ticket.price > 0,
        &|r| {
            let mut raised = Vec::new();
            if ticket.price > 0 {
                r.settle(&ticket.agent, ticket.price, commit);
            }
            r.record_call(&stats, max_agents);
            if unconfirmed {
                r.unconfirmed = r.unconfirmed.saturating_add(1);
                r.unconfirmed_amount = r.unconfirmed_amount.saturating_add(ticket.price);
            }
            if commit && ticket.price > 0 {
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
                if let (Some(limit), Some(agent)) = (agent_budget, r.agent_mut(&ticket.agent)) {
                    let spent = agent.spent;
                    raised.extend(after_spend(
                        &mut agent.alerts,
                        Scope::Agent,
                        Some(&ticket.agent),
                        spent,
                        limit,
                        policy.alert_ppm,
                        None,
                    ));
                }
            }
            Ok(raised)
        },
    );
    // A free call that finds the session table full is still answered; it just
    // is not counted in a session report.
    let session_record = match changed {
        Ok(Some((_, record, raised))) => {
            alerts.extend(raised);
            Some(record)
        }
        Ok(None) => None,
        Err(e) if ticket.price == 0 && e.code == ErrorCode::CapacityExceeded => None,
        Err(e) => return Err(e),
    };
    let view = view_of(
        policy,
        agent_budget,
        &ticket.agent,
        session_record.as_ref(),
        tenant_record.as_ref(),
    );
    let alerts = alerts
        .into_iter()
        .map(|alert| Alert {
            tenant: tenant.to_string(),
            session: ticket.session.clone(),
            at: now,
            alert,
        })
        .collect();
    Ok(Settled { view, cost, alerts })
}

/// The endpoint lists of the call's policy, for calls that will be answered from the
/// cache (a blocked endpoint is blocked even when its answer is cached).
pub fn check_lists(cfg: &Config, caller: &Caller, call: &Call) -> Result<(), Refusal> {
    let policy = policy_of(cfg, call.policy)?;
    check_rules(policy, policy.agent_rule(&caller.agent), &call.endpoint, 0)
}

/// Whether the caller's agent keeps a private cache (`inheritParentCache: false`).
pub fn private_cache(cfg: &Config, caller: &Caller, call: &Call) -> bool {
    cfg.policies
        .get(call.policy)
        .and_then(|p| p.agent_rule(&caller.agent))
        .is_some_and(|rule| !rule.inherit_cache)
}

/// Counts a cache hit in the session's report: free, nothing reserved, and what the
/// original call cost is saved.
pub fn record_hit<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    caller: &Caller,
    call: &Call,
    savings: Amount,
    now: u64,
) -> Result<BudgetView, Refusal> {
    let tenant = tenant_id(cfg, caller.tenant)?;
    let stats = CallStats {
        agent: &caller.agent,
        tool: call.tool.as_deref(),
        endpoint: &call.endpoint_label,
        cost: 0,
        cache_hit: true,
        savings,
    };
    let max_agents = cfg.sessions.max_agents;
    match sessions::modify(
        store,
        tenant,
        &caller.session,
        &cfg.sessions,
        now,
        false,
        &|r| {
            r.record_call(&stats, max_agents);
            Ok(())
        },
    ) {
        Ok(_) => {}
        Err(e) if e.code == ErrorCode::CapacityExceeded => {}
        Err(e) => return Err(e),
    }
    current_view(cfg, store, caller, call, now)
}

/// Counts a refusal in the session's report (when the session has a record: free and
/// refused calls never take a session slot, so they cannot crowd out real sessions),
/// and raises the alert the refusal means: a budget exhausted, or the kill
/// switch thrown by its threshold.
pub fn record_refusal<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    caller: &Caller,
    call: &Call,
    refusal: &Refusal,
    now: u64,
) -> Result<Vec<Alert>, Refusal> {
    if matches!(
        refusal.code,
        ErrorCode::CapacityExceeded | ErrorCode::InternalError
    ) {
        return Ok(Vec::new());
    }
    let tenant = tenant_id(cfg, caller.tenant)?;
    let policy = policy_of(cfg, call.policy)?;
    let code = refusal.code;
    let budget_of = |scope: Scope| match scope {
        Scope::Agent => policy
            .agent_rule(&caller.agent)
            .and_then(|a| a.agent_budget),
        Scope::Session => policy.session_budget,
        Scope::Daily => policy.daily_budget,
        Scope::Monthly => policy.monthly_budget,
    };
    let changed = sessions::modify(
        store,
        tenant,
        &caller.session,
        &cfg.sessions,
        now,
        false,
        &|r| {
            r.record_refusal(&caller.agent, code.as_str(), now);
            let mut raised = Vec::new();
            match code {
                ErrorCode::AgentBudgetExceeded => {
                    let limit = budget_of(Scope::Agent).unwrap_or(0);
                    if let Some(agent) = r.agent_mut(&caller.agent) {
                        let spent = agent.spent;
                        raised.extend(raise_once(
                            &mut agent.alerts,
                            AlertKind::BudgetExhausted,
                            Scope::Agent,
                            Some(&caller.agent),
                            spent,
                            limit,
                        ));
                    }
                }
                ErrorCode::SessionBudgetExceeded => {
                    let (spent, limit) = (r.spent, budget_of(Scope::Session).unwrap_or(0));
                    raised.extend(raise_once(
                        &mut r.alerts,
                        AlertKind::BudgetExhausted,
                        Scope::Session,
                        None,
                        spent,
                        limit,
                    ));
                }
                ErrorCode::KillSwitchActive if !r.killed => {
                    let (spent, limit) = (r.spent, budget_of(Scope::Session).unwrap_or(0));
                    raised.extend(raise_once(
                        &mut r.alerts,
                        AlertKind::KillSwitch,
                        Scope::Session,
                        None,
                        spent,
                        limit,
                    ));
                }
                _ => {}
            }
            Ok(raised)
        },
    );
    let mut alerts = match changed {
        Ok(Some((_, _, raised))) => raised,
        Ok(None) => Vec::new(),
        Err(e) if e.code == ErrorCode::CapacityExceeded => Vec::new(),
        Err(e) => return Err(e),
    };
    let window = match code {
        ErrorCode::DailyBudgetExceeded => Some(Scope::Daily),
        ErrorCode::MonthlyBudgetExceeded => Some(Scope::Monthly),
        _ => None,
    };
    if let (Some(scope), Some(limit)) = (window, window.and_then(budget_of)) {
        let raised = update(store, &tenant_windows_key(tenant), |bytes| {
            let mut record = decode_tenant(bytes)?;
            record.roll(now);
            let counter = if scope == Scope::Daily {
                &mut record.day
            } else {
                &mut record.month
            };
            let spent = counter.spent;
            match raise_once(
                &mut counter.alerts,
                AlertKind::BudgetExhausted,
                scope,
                None,
                spent,
                limit,
            ) {
                Some(alert) => Ok(Step::Write(record.encode(), Some(alert))),
                None => Ok(Step::Keep(None)),
            }
        })?;
        alerts.extend(raised);
    }
    Ok(alerts
        .into_iter()
        .map(|alert| Alert {
            tenant: tenant.to_string(),
            session: caller.session.clone(),
            at: now,
            alert,
        })
        .collect())
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

pub fn view_of(
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
