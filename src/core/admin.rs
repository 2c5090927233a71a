//! The report API under `/_pag0/v1` and the dashboard page: routing, who may read
//! what, and the JSON they answer. Runs over the [`SharedStore`] like the firewall.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::core::alerts::{Alert, AlertKind, ScopeAlert};
use crate::core::amount::{reaches, utilization, Amount};
use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal, Scope};
use crate::core::identity::{role, valid_id};
use crate::core::ledger::budget::{BudgetRecord, POOL};
use crate::core::ledger::remote_report::{self, RemoteSession};
use crate::core::ledger::report::{ReportRecord, Tally, Tokens};
use crate::core::ledger::sessions;
use crate::core::ledger::windows::WindowsRecord;
use crate::core::store::{
    read, report_slot_key, session_slot_key, tenant_windows_key, SharedStore,
};

const DASHBOARD_HTML: &str = include_str!("dashboard.html");
/// Sessions listed by `GET …/sessions`, most recently active first.
const SESSION_LIST_LIMIT: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRoute {
    Dashboard,
    Sessions,
    Budget(String),
    Report(String),
    Kill(String),
    Resume(String),
}

/// Recognises an admin path. `None`: not ours, the request is an agent call.
pub fn route(cfg: &Config, method: &str, path: &str) -> Option<Result<AdminRoute, Refusal>> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if path == cfg.admin.dashboard_path {
        return Some(expect_method(method, "GET", AdminRoute::Dashboard));
    }
    let rest = path.strip_prefix(cfg.admin.path_prefix.as_str())?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let not_found = || {
        Some(Err(Refusal::new(
            ErrorCode::NotFound,
            format!("no report API at {path}"),
        )))
    };
    match parts.as_slice() {
        ["sessions"] => Some(expect_method(method, "GET", AdminRoute::Sessions)),
        ["sessions", id, action] => {
            if !valid_id(id.as_bytes()) {
                return Some(Err(Refusal::new(
                    ErrorCode::InvalidRequest,
                    "malformed session id",
                )));
            }
            let id = (*id).to_string();
            match *action {
                "budget" => Some(expect_method(method, "GET", AdminRoute::Budget(id))),
                "report" => Some(expect_method(method, "GET", AdminRoute::Report(id))),
                "kill" => Some(expect_method(method, "POST", AdminRoute::Kill(id))),
                "resume" => Some(expect_method(method, "POST", AdminRoute::Resume(id))),
                _ => not_found(),
            }
        }
        _ => not_found(),
    }
}

fn expect_method(method: &str, wanted: &str, route: AdminRoute) -> Result<AdminRoute, Refusal> {
    if method == wanted {
        Ok(route)
    } else {
        Err(Refusal::new(
            ErrorCode::MethodNotAllowed,
            format!("use {wanted}"),
        ))
    }
}

/// Who is asking: the admin (every tenant), or one tenant (its own sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Admin,
    Tenant(usize),
}

/// Checks the key from `x-pag0-admin-key`, `Authorization: Bearer`, or the tenant API
/// key header. A wrong or missing key is a 401.
pub fn authorize(cfg: &Config, keys: &[Vec<u8>]) -> Result<Access, Refusal> {
    for key in keys {
        let digest: [u8; 32] = Sha256::digest(key).into();
        if cfg.admin.key_hash == Some(digest) {
            return Ok(Access::Admin);
        }
        if let Some(tenant) = cfg.tenant_by_key_hash.get(&digest) {
            return Ok(Access::Tenant(*tenant));
        }
    }
    Err(Refusal::new(
        ErrorCode::Unauthorized,
        "the report API needs the admin key (x-pag0-admin-key or Authorization: Bearer) or a tenant's API key",
    ))
}

/// The key candidates a request carries, for [`authorize`].
pub fn bearer(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, key) = text.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim().as_bytes().to_vec())
}

#[derive(Debug, Clone)]
pub struct AdminResponse {
    pub status: u32,
    pub content_type: &'static str,
    pub body: String,
    pub alerts: Vec<Alert>,
    /// Headers beyond content type and caching (the page's security headers).
    pub headers: Vec<(&'static str, String)>,
    /// The error code, for `x-pag0-error`.
    pub code: Option<ErrorCode>,
}

impl AdminResponse {
    fn json(status: u32, body: Value) -> AdminResponse {
        AdminResponse {
            status,
            content_type: "application/json",
            body: body.to_string(),
            alerts: Vec::new(),
            headers: Vec::new(),
            code: None,
        }
    }

    pub fn refusal(refusal: &Refusal) -> AdminResponse {
        AdminResponse {
            status: refusal.status(),
            content_type: "application/json",
            body: refusal.to_json(),
            alerts: Vec::new(),
            headers: Vec::new(),
            code: Some(refusal.code),
        }
    }
}

/// The dashboard page (no data in it: it reads the JSON API with the user's key),
/// with a Content-Security-Policy that allows only its own inline script and style
/// (by hash) and calls to its own origin, and no framing.
pub fn dashboard(cfg: &Config) -> AdminResponse {
    let body = DASHBOARD_HTML.replace("__PAG0_PREFIX__", &cfg.admin.path_prefix);
    let hash = |tag: &str| -> String {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let inner = body
            .split_once(open.as_str())
            .and_then(|(_, rest)| rest.split_once(close.as_str()))
            .map_or("", |(inner, _)| inner);
        let digest = Sha256::digest(inner.as_bytes());
        format!("'sha256-{}'", crate::core::base64::encode(&digest))
    };
    let csp = format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    );
    AdminResponse {
        status: 200,
        content_type: "text/html; charset=utf-8",
        body,
        alerts: Vec::new(),
        headers: vec![
            ("content-security-policy", csp),
            ("x-frame-options", "DENY".to_string()),
            ("x-content-type-options", "nosniff".to_string()),
            ("referrer-policy", "no-referrer".to_string()),
        ],
        code: None,
    }
}

/// Answers an authorized report API call. `tenant_param` is `?tenant=` (the admin's
/// choice; a tenant key always reads its own tenant). The caller has asked every VM to
/// write what it counted first (see `LocalLedger::request_flush`). For a kill the Redis
/// ledger has already applied, `ledger_was_killed` is what Redis held before: the kill
/// alert is then raised once for the whole cluster (this Envoy's copy of the switch may
/// not have seen another replica's change yet).
pub fn handle<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    access: Access,
    route: &AdminRoute,
    tenant_param: Option<&str>,
    now: u64,
    ledger_was_killed: Option<bool>,
) -> AdminResponse {
    match handle_inner(
        cfg,
        store,
        access,
        route,
        tenant_param,
        now,
        ledger_was_killed,
    ) {
        Ok(response) => response,
        Err(refusal) => AdminResponse::refusal(&refusal),
    }
}

/// One line of the session list.
fn session_summary(
    cfg: &Config,
    policy: Option<&crate::core::policy::Policy>,
    r: &BudgetRecord,
    report: &ReportRecord,
) -> Value {
    let limit = policy.and_then(|p| p.session_budget);
    let used = r.spent.saturating_add(r.reserved());
    json!({
        "sessionId": r.session_id,
        "totalCost": r.spent.to_string(),
        "reserved": r.reserved().to_string(),
        "budget": limit.map(|l| l.to_string()),
        "budgetUtilization": limit.map(|l| utilization(used, l)),
        "state": session_state(cfg, r),
        "totalRequests": report.requests,
        "cacheHits": report.cache_hits,
        "cacheSavings": report.savings.to_string(),
        "agents": report.agents.len().max(r.agents.len()),
        "killed": r.killed,
        "lastActive": r.last_active,
    })
}

/// What the Redis ledger answered for a report API call (see [`remote_read`]).
pub enum RemoteData {
    Session(Option<Box<RemoteSession>>, WindowsRecord),
    List(Vec<RemoteSession>, usize, WindowsRecord),
}

/// With the Redis ledger, what a report route reads there (the script's request):
/// `None` for routes that read nothing there.
pub fn remote_read(
    cfg: &Config,
    access: Access,
    route: &AdminRoute,
    tenant_param: Option<&str>,
    now: u64,
) -> Result<Option<String>, Refusal> {
    let index = tenant_of(cfg, access, tenant_param)?;
    let tenant = cfg.tenant_id(index);
    Ok(match route {
        AdminRoute::Sessions => Some(remote_report::list_body(tenant, SESSION_LIST_LIMIT, now)),
        AdminRoute::Budget(id) | AdminRoute::Report(id) => {
            Some(remote_report::read_body(tenant, id, now))
        }
        _ => None,
    })
}

/// Answers a report route from what the Redis ledger answered: the whole cluster's
/// figures, in the same form as the shared-data ledger's.
pub fn handle_remote(
    cfg: &Config,
    access: Access,
    route: &AdminRoute,
    tenant_param: Option<&str>,
    data: &RemoteData,
) -> AdminResponse {
    let tenant = match tenant_of(cfg, access, tenant_param) {
        Ok(index) => cfg.tenant_id(index).to_string(),
        Err(refusal) => return AdminResponse::refusal(&refusal),
    };
    match (route, data) {
        (AdminRoute::Sessions, RemoteData::List(list, total, _)) => {
            let policy = cfg.policy(None);
            let sessions: Vec<Value> = list
                .iter()
                .map(|s| session_summary(cfg, policy, &s.budget, &s.report))
                .collect();
            AdminResponse::json(
                200,
                json!({"tenant": tenant, "sessions": sessions, "total": total}),
            )
        }
        (AdminRoute::Budget(_), RemoteData::Session(Some(s), windows)) => {
            AdminResponse::json(200, budget_json(cfg, &tenant, &s.budget, windows))
        }
        (AdminRoute::Report(_), RemoteData::Session(Some(s), windows)) => {
            let records = SessionRecords {
                budget: s.budget.clone(),
                report: s.report.clone(),
            };
            AdminResponse::json(200, report_json(cfg, &tenant, &records, windows))
        }
        (AdminRoute::Budget(id) | AdminRoute::Report(id), _) => AdminResponse::refusal(
            &Refusal::new(
                ErrorCode::NotFound,
                format!("no session {id:?} for tenant {tenant}"),
            )
            .with_fields(vec![("sessionId", id.to_string())]),
        ),
        _ => AdminResponse::refusal(&Refusal::new(
            ErrorCode::InternalError,
            "the Redis ledger's answer does not fit the route",
        )),
    }
}

/// The tenant an admin call reads: a tenant key's own, or the admin's `?tenant=`.
pub fn tenant_of(
    cfg: &Config,
    access: Access,
    tenant_param: Option<&str>,
) -> Result<usize, Refusal> {
    match (access, tenant_param) {
        (Access::Tenant(t), _) => Ok(t),
        (Access::Admin, None) => Ok(0),
        (Access::Admin, Some(name)) => cfg
            .tenants
            .iter()
            .position(|t| t.id == name)
            .ok_or_else(|| Refusal::new(ErrorCode::NotFound, format!("no tenant {name:?}"))),
    }
}

/// A session's records: budget (always) and report (when it counted anything).
pub struct SessionRecords {
    pub budget: BudgetRecord,
    pub report: ReportRecord,
}

pub fn read_session<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    tenant: &str,
    id: &str,
) -> Result<Option<SessionRecords>, Refusal> {
    let Some((slot, budget)) = sessions::lookup(store, tenant, id, &cfg.sessions)? else {
        return Ok(None);
    };
    let bytes = read(store, &report_slot_key(tenant, slot))?;
    let report = if ReportRecord::encoded_id_is(&bytes, id) {
        ReportRecord::decode(&bytes).unwrap_or_else(|_| ReportRecord::new(id))
    } else {
        ReportRecord::new(id)
    };
    Ok(Some(SessionRecords { budget, report }))
}

fn handle_inner<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    access: Access,
    route: &AdminRoute,
    tenant_param: Option<&str>,
    now: u64,
    ledger_was_killed: Option<bool>,
) -> Result<AdminResponse, Refusal> {
    let tenant_index = tenant_of(cfg, access, tenant_param)?;
    let tenant = cfg
        .tenants
        .get(tenant_index)
        .map(|t| t.id.clone())
        .ok_or_else(|| Refusal::new(ErrorCode::InternalError, "tenant index out of range"))?;
    let not_found = |id: &str| {
        Refusal::new(
            ErrorCode::NotFound,
            format!("no session {id:?} for tenant {tenant}"),
        )
        .with_fields(vec![("sessionId", id.to_string())])
    };
    let find = |id: &str| -> Result<SessionRecords, Refusal> {
        read_session(cfg, store, &tenant, id)?.ok_or_else(|| not_found(id))
    };
    let windows = || -> Result<WindowsRecord, Refusal> {
        let mut record = WindowsRecord::decode(&read(store, &tenant_windows_key(&tenant))?)
            .map_err(|_| Refusal::new(ErrorCode::InternalError, "corrupt tenant record"))?;
        record.roll(now);
        Ok(record)
    };
    match route {
        AdminRoute::Dashboard => Ok(dashboard(cfg)),
        AdminRoute::Sessions => {
            let mut list = Vec::new();
            for slot in 0..cfg.sessions.max_sessions {
                let bytes = read(store, &session_slot_key(&tenant, slot))?;
                if bytes.is_empty() {
                    continue;
                }
                if let Ok(record) = BudgetRecord::decode(&bytes) {
                    if !record.session_id.is_empty() {
                        list.push((slot, record));
                    }
                }
            }
            list.sort_by_key(|(_, r)| std::cmp::Reverse(r.last_active));
            let total = list.len();
            let policy = cfg.policy(None);
            let mut sessions = Vec::new();
            for (slot, r) in list.iter().take(SESSION_LIST_LIMIT) {
                let bytes = read(store, &report_slot_key(&tenant, *slot))?;
                let report = if ReportRecord::encoded_id_is(&bytes, &r.session_id) {
                    ReportRecord::decode(&bytes).unwrap_or_default()
                } else {
                    ReportRecord::default()
                };
                sessions.push(session_summary(cfg, policy, r, &report));
            }
            Ok(AdminResponse::json(
                200,
                json!({"tenant": tenant, "sessions": sessions, "total": total}),
            ))
        }
        AdminRoute::Budget(id) => {
            let records = find(id)?;
            Ok(AdminResponse::json(
                200,
                budget_json(cfg, &tenant, &records.budget, &windows()?),
            ))
        }
        AdminRoute::Report(id) => {
            let records = find(id)?;
            Ok(AdminResponse::json(
                200,
                report_json(cfg, &tenant, &records, &windows()?),
            ))
        }
        AdminRoute::Kill(id) | AdminRoute::Resume(id) => {
            // Agents hold their tenant's key: it reads, but only the admin controls.
            if access != Access::Admin {
                return Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    "kill and resume need the admin key; a tenant key only reads",
                ));
            }
            let kill = matches!(route, AdminRoute::Kill(_));
            let changed = sessions::set_killed(
                store,
                &tenant,
                id,
                &cfg.sessions,
                now,
                kill,
                cfg.ledger_redis.is_some(),
            )?;
            let Some((record, was_killed)) = changed else {
                return Err(not_found(id));
            };
            let mut response = AdminResponse::json(
                200,
                json!({"sessionId": id, "tenant": tenant, "killed": record.killed}),
            );
            if kill && !ledger_was_killed.unwrap_or(was_killed) {
                response.alerts.push(Alert {
                    tenant: tenant.clone(),
                    session: id.clone(),
                    at: now,
                    alert: ScopeAlert {
                        kind: AlertKind::KillSwitch,
                        scope: Scope::Session,
                        agent: None,
                        spent: record.spent,
                        limit: cfg.policy(None).and_then(|p| p.session_budget).unwrap_or(0),
                        reason: Some("manual"),
                    },
                });
            }
            Ok(response)
        }
    }
}

/// `killed` (manual), `stopped` (kill switch threshold), or `active`.
fn session_state(cfg: &Config, r: &BudgetRecord) -> &'static str {
    match kill_switch(cfg, r) {
        Some("manual") => "killed",
        Some(_) => "stopped",
        None => "active",
    }
}

/// Why priced calls are refused by the kill switch, if they are.
fn kill_switch(cfg: &Config, record: &BudgetRecord) -> Option<&'static str> {
    if record.killed {
        return Some("manual");
    }
    let policy = cfg.policy(None)?;
    let (limit, ppm) = (policy.session_budget?, policy.kill_ppm?);
    reaches(record.spent.saturating_add(record.reserved()), limit, ppm).then_some("threshold")
}

fn scope_json(limit: Amount, spent: Amount, reserved: Amount) -> Value {
    json!({
        "limit": limit.to_string(),
        "spent": spent.to_string(),
        "reserved": reserved.to_string(),
        "remaining": limit.saturating_sub(spent.saturating_add(reserved)).to_string(),
        "utilizationRate": utilization(spent.saturating_add(reserved), limit),
    })
}

/// Budgets of a session under the default policy: per scope and per agent budget.
pub fn budget_json(
    cfg: &Config,
    tenant: &str,
    record: &BudgetRecord,
    windows: &WindowsRecord,
) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("sessionId".into(), json!(record.session_id));
    out.insert("tenant".into(), json!(tenant));
    out.insert("killed".into(), json!(record.killed));
    out.insert("killSwitch".into(), json!(kill_switch(cfg, record)));
    let Some(policy) = cfg.policy(None) else {
        return Value::Object(out);
    };
    out.insert("policy".into(), json!(policy.name));
    let reserved = record.reserved();
    if let Some(limit) = policy.session_budget {
        out.insert("session".into(), scope_json(limit, record.spent, reserved));
    }
    let windows_reserved = windows.reserved();
    if let Some(limit) = policy.daily_budget {
        out.insert(
            "daily".into(),
            scope_json(limit, windows.day.spent, windows_reserved),
        );
    }
    if let Some(limit) = policy.monthly_budget {
        out.insert(
            "monthly".into(),
            scope_json(limit, windows.month.spent, windows_reserved),
        );
    }
    let mut agents = serde_json::Map::new();
    for agent in &record.agents {
        if let Some(limit) = policy.budget_limit(&agent.id) {
            let key = if agent.id == POOL {
                "unmatched"
            } else {
                agent.id.as_str()
            };
            agents.insert(
                key.to_string(),
                scope_json(limit, agent.spent, record.agent_reserved(&agent.id)),
            );
        }
    }
    out.insert("agents".into(), Value::Object(agents));
    out.insert(
        "alertOnThreshold".into(),
        json!(policy.alert_ppm.map(|p| p as f64 / 1e6)),
    );
    out.insert(
        "killSwitchThreshold".into(),
        json!(policy.kill_ppm.map(|p| p as f64 / 1e6)),
    );
    Value::Object(out)
}

fn tokens_json(t: &Tokens) -> Value {
    json!({"input": t.input, "output": t.output, "cacheWrite": t.cache_write, "cacheRead": t.cache_read})
}

fn tally_json(key: &str, t: &Tally) -> Value {
    let mut v = json!({
        key: t.name,
        "cost": t.cost.to_string(),
        "requests": t.requests,
        "cacheHits": t.cache_hits,
        "cacheSavings": t.savings.to_string(),
    });
    if t.tokens != Tokens::default() {
        if let Some(map) = v.as_object_mut() {
            map.insert("tokens".into(), tokens_json(&t.tokens));
        }
    }
    v
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The session report: totals, by agent, by tool, by endpoint, by model, refusals,
/// how each agent stopped, spend over time.
pub fn report_json(
    cfg: &Config,
    tenant: &str,
    records: &SessionRecords,
    windows: &WindowsRecord,
) -> Value {
    let (record, report) = (&records.budget, &records.report);
    let budget = budget_json(cfg, tenant, record, windows);
    let policy = cfg.policy(None);
    let mut by_agent: Vec<Value> = report
        .agents
        .iter()
        .map(|a| {
            let key = policy.and_then(|p| p.agent_budget(&a.id));
            let (spent, reserved) = key.map_or((a.cost, 0), |(k, _)| {
                let (s, r) = record.agent_totals(k);
                (if k == POOL { a.cost } else { s }, r)
            });
            let limit = key.map(|(_, l)| l);
            json!({
                "agentId": a.id,
                "role": role(&a.id),
                "parentAgentId": a.parent,
                "cost": a.cost.to_string(),
                "reserved": reserved.to_string(),
                "requests": a.requests,
                "cacheHits": a.cache_hits,
                "cacheSavings": a.savings.to_string(),
                "tokens": tokens_json(&a.tokens),
                "budget": limit.map(|b| b.to_string()),
                "budgetShared": key.is_some_and(|(k, _)| k == POOL),
                "budgetUtilization": limit.map(|b| utilization(spent.saturating_add(reserved), b)),
                "stoppedBy": a.stop.as_ref().map(|s| json!({
                    "code": s.code, "at": s.at / 1000, "calls": s.calls, "refusedSince": s.refused_since,
                })),
            })
        })
        .collect();
    // Agents that reserved but whose calls are not counted yet (in flight).
    for agent in &record.agents {
        if agent.id != POOL && report.agent(&agent.id).is_none() {
            by_agent.push(json!({
                "agentId": agent.id, "role": role(&agent.id), "parentAgentId": null,
                "cost": agent.spent.to_string(),
                "reserved": record.agent_reserved(&agent.id).to_string(),
                "requests": 0, "cacheHits": 0, "cacheSavings": "0",
                "tokens": tokens_json(&Tokens::default()),
                "budget": policy.and_then(|p| p.budget_limit(&agent.id)).map(|b| b.to_string()),
                "budgetShared": false,
                "budgetUtilization": policy.and_then(|p| p.budget_limit(&agent.id))
                    .map(|b| utilization(agent.spent.saturating_add(record.agent_reserved(&agent.id)), b)),
                "stoppedBy": null,
            }));
        }
    }
    let refusals: serde_json::Map<String, Value> = report
        .refusals
        .iter()
        .map(|(code, n)| (code.clone(), json!(n)))
        .collect();
    let recent: Vec<Value> = report
        .recent_refusals
        .iter()
        .rev()
        .map(|r| json!({"at": r.at, "agentId": r.agent, "code": r.code}))
        .collect();
    let timeline: Vec<Value> = report
        .timeline
        .iter()
        .filter_map(|p| {
            report
                .agents
                .get(usize::from(p.agent))
                .map(|a| json!({"at": p.at, "agentId": a.id, "cost": p.cost.to_string()}))
        })
        .collect();
    let stopped_by = session_stop(report, &budget["killSwitch"]);
    json!({
        "sessionId": record.session_id,
        "tenant": tenant,
        "stoppedBy": stopped_by,
        "totalCost": record.spent.to_string(),
        "reserved": record.reserved().to_string(),
        "totalRequests": report.requests,
        "cacheHits": report.cache_hits,
        "cacheHitRate": rate(report.cache_hits, report.requests),
        "cacheSavings": report.savings.to_string(),
        "killed": record.killed,
        "killSwitch": budget["killSwitch"].clone(),
        "lastActive": record.last_active,
        "unconfirmedPayments": {"count": report.unconfirmed, "amount": report.unconfirmed_amount.to_string()},
        "unmeteredCalls": {"count": report.unmetered, "amount": report.unmetered_amount.to_string()},
        "tokens": tokens_json(&report.tokens),
        "byAgent": by_agent,
        "byTool": report.tools.iter().map(|t| tally_json("tool", t)).collect::<Vec<_>>(),
        "byEndpoint": report.endpoints.iter().map(|t| tally_json("endpoint", t)).collect::<Vec<_>>(),
        "byModel": report.models.iter().map(|t| tally_json("model", t)).collect::<Vec<_>>(),
        "refusals": refusals,
        "recentRefusals": recent,
        "spendOverTime": timeline,
        "budget": budget,
    })
}

/// What stopped the session, if it is stopped: its kill switch (manual or threshold),
/// else the latest agent stop when nothing has gone through since it (every agent still
/// working would have cleared its own).
fn session_stop(report: &crate::core::ledger::report::ReportRecord, kill_switch: &Value) -> Value {
    if let Some(reason) = kill_switch.as_str() {
        return json!({"code": "KILL_SWITCH_ACTIVE", "reason": reason});
    }
    let last_ok = report
        .agents
        .iter()
        .map(|a| a.last_ok_ms)
        .max()
        .unwrap_or(0);
    report
        .agents
        .iter()
        .filter_map(|a| a.stop.as_ref().map(|s| (a, s)))
        .filter(|(_, s)| s.at >= last_ok)
        .max_by_key(|(_, s)| s.at)
        .map_or(
            Value::Null,
            |(a, s)| json!({"code": s.code, "agentId": a.id, "at": s.at / 1000}),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::call::{HeaderValue, RouteSettings};
    use crate::core::compile::{compile_json, sha256_hex};
    use crate::core::firewall::{describe_call, identify};
    use crate::core::ledger::local::LocalLedger;
    use crate::core::ledger::{admit, record_refusal, settle, Outcome};
    use crate::core::store::MemoryStore;

    fn config() -> Config {
        let json = format!(
            r#"{{"tenants": [{{"id": "demo", "apiKeySha256": "{}"}}],
                "admin": {{"apiKeySha256": "{}"}},
                "policies": {{"p": {{"sessionBudget": "5000000", "alertOnThreshold": 0.7,
                    "agents": {{"ralph-*": {{"agentBudget": "3000000"}}}}}}}}}}"#,
            sha256_hex(b"demo-key"),
            sha256_hex(b"root")
        );
        compile_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn routes() {
        let cfg = config();
        assert_eq!(route(&cfg, "GET", "/v1/chat"), None);
        assert_eq!(route(&cfg, "GET", "/_pag0/v1x"), None);
        assert_eq!(
            route(&cfg, "GET", "/_pag0/dashboard"),
            Some(Ok(AdminRoute::Dashboard))
        );
        assert_eq!(
            route(&cfg, "GET", "/_pag0/v1/sessions?tenant=x"),
            Some(Ok(AdminRoute::Sessions))
        );
        assert_eq!(
            route(&cfg, "POST", "/_pag0/v1/sessions/s-1/kill"),
            Some(Ok(AdminRoute::Kill("s-1".into())))
        );
        let wrong = route(&cfg, "GET", "/_pag0/v1/sessions/s-1/kill")
            .unwrap()
            .unwrap_err();
        assert_eq!(wrong.code, ErrorCode::MethodNotAllowed);
        let bad = route(&cfg, "GET", "/_pag0/v1/sessions/a%20b/report")
            .unwrap()
            .unwrap_err();
        assert_eq!(bad.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn keys() {
        let cfg = config();
        assert_eq!(authorize(&cfg, &[b"root".to_vec()]), Ok(Access::Admin));
        assert_eq!(
            authorize(&cfg, &[b"x".to_vec(), b"demo-key".to_vec()]),
            Ok(Access::Tenant(0))
        );
        assert_eq!(
            authorize(&cfg, &[]).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(bearer(b"Bearer root"), Some(b"root".to_vec()));
        assert_eq!(bearer(b"Basic root"), None);
    }

    #[test]
    fn the_dashboard_allows_only_its_own_script_and_no_framing() {
        let page = dashboard(&config());
        let csp = &page
            .headers
            .iter()
            .find(|(k, _)| *k == "content-security-policy")
            .unwrap()
            .1;
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(page
            .headers
            .iter()
            .any(|(k, v)| *k == "x-frame-options" && v == "DENY"));
    }

    #[test]
    fn ralph_stops_at_three_dollars_and_the_report_says_so() {
        let cfg = config();
        let store = MemoryStore::new();
        let mut local = LocalLedger::new();
        let headers = |agent: &'static str| {
            move |name: &str| match name {
                "x-pag0-api-key" => HeaderValue::One(b"demo-key".to_vec()),
                "x-pag0-session" => HeaderValue::One(b"s1".to_vec()),
                "x-pag0-agent" => HeaderValue::One(agent.as_bytes().to_vec()),
                _ => HeaderValue::Missing,
            }
        };
        let mut key = |k: &[u8]| cfg.tenant_for_key(k);
        let route_settings = RouteSettings {
            price: Some("150000".into()),
            tool: Some("llm".into()),
            ..RouteSettings::default()
        };
        let call =
            describe_call(&cfg, b"api.anthropic.com", b"/v1/messages", &route_settings).unwrap();
        let ralph = identify(&cfg, &headers("ralph-1"), &mut key, None).unwrap();
        let mut alerts = Vec::new();
        let mut ok = 0;
        loop {
            match admit(&cfg, &store, &mut local, &ralph, &call, 100_000) {
                Ok(admission) => {
                    let settled = settle(
                        &cfg,
                        &store,
                        &mut local,
                        &admission.ticket,
                        &Outcome::commit(150_000),
                        100_000,
                    )
                    .unwrap();
                    alerts.extend(settled.alerts);
                    alerts.extend(local.flush(&cfg, &store, 100_000));
                    ok += 1;
                }
                Err(rejection) => {
                    assert_eq!(
                        rejection.refused.refusal.code,
                        ErrorCode::AgentBudgetExceeded
                    );
                    alerts.extend(rejection.alerts);
                    let refused = rejection.refused;
                    record_refusal(&mut local, &cfg, &ralph, &refused.refusal, 100_000);
                    break;
                }
            }
        }
        assert_eq!(ok, 20);
        let kinds: Vec<_> = alerts
            .iter()
            .map(|a| (a.alert.kind, a.alert.scope))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (AlertKind::ThresholdCrossed, Scope::Agent),
                (AlertKind::BudgetExhausted, Scope::Agent)
            ]
        );
        // The executor goes on.
        let executor = identify(&cfg, &headers("executor-1"), &mut key, None).unwrap();
        let admission = admit(&cfg, &store, &mut local, &executor, &call, 101_000).unwrap();
        settle(
            &cfg,
            &store,
            &mut local,
            &admission.ticket,
            &Outcome::commit(150_000),
            101_000,
        )
        .unwrap();
        local.flush(&cfg, &store, 101_000);

        let response = handle(
            &cfg,
            &store,
            Access::Tenant(0),
            &AdminRoute::Report("s1".into()),
            None,
            102,
            None,
        );
        assert_eq!(response.status, 200);
        let report: Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(report["totalCost"], "3150000");
        assert_eq!(report["reserved"], "0");
        assert_eq!(report["totalRequests"], 22);
        assert_eq!(report["refusals"]["AGENT_BUDGET_EXCEEDED"], 1);
        assert_eq!(report["byAgent"][0]["agentId"], "ralph-1");
        assert_eq!(report["byAgent"][0]["budgetUtilization"], 1.0);
        assert_eq!(
            report["byAgent"][0]["stoppedBy"]["code"],
            "AGENT_BUDGET_EXCEEDED"
        );
        assert_eq!(report["byAgent"][0]["stoppedBy"]["calls"], 20);
        // The executor went on after ralph's refusal: the session is not stopped.
        assert_eq!(report["stoppedBy"], Value::Null);
        assert_eq!(report["byTool"][0]["requests"], 21);
        let missing = handle(
            &cfg,
            &store,
            Access::Admin,
            &AdminRoute::Budget("nope".into()),
            None,
            102,
            None,
        );
        assert_eq!(missing.status, 404);
        let kill_unknown = handle(
            &cfg,
            &store,
            Access::Admin,
            &AdminRoute::Kill("nope".into()),
            None,
            102,
            None,
        );
        assert_eq!(kill_unknown.status, 404);
    }
}
