//! The report API under `/_pag0/v1` and the dashboard page: routing, who may read
//! what, and the JSON they answer. Runs over the [`SharedStore`] like the firewall.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::core::alerts::{Alert, AlertKind, ScopeAlert};
use crate::core::amount::{utilization, Amount};
use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal, Scope};
use crate::core::identity::{role, valid_id};
use crate::core::ledger::{SessionRecord, Tally, TenantRecord};
use crate::core::sessions;
use crate::core::store::{read, session_slot_key, tenant_windows_key, SharedStore};

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
}

impl AdminResponse {
    fn json(status: u32, body: Value) -> AdminResponse {
        AdminResponse {
            status,
            content_type: "application/json",
            body: body.to_string(),
            alerts: Vec::new(),
        }
    }

    pub fn refusal(refusal: &Refusal) -> AdminResponse {
        AdminResponse {
            status: refusal.status(),
            content_type: "application/json",
            body: refusal.to_json(),
            alerts: Vec::new(),
        }
    }
}

/// The dashboard page (no data in it: it reads the JSON API with the user's key).
pub fn dashboard(cfg: &Config) -> AdminResponse {
    AdminResponse {
        status: 200,
        content_type: "text/html; charset=utf-8",
        body: DASHBOARD_HTML.replace("__PAG0_PREFIX__", &cfg.admin.path_prefix),
        alerts: Vec::new(),
    }
}

/// Answers an authorized report API call. `tenant_param` is `?tenant=` (the admin's
/// choice; a tenant key always reads its own tenant).
pub fn handle<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    access: Access,
    route: &AdminRoute,
    tenant_param: Option<&str>,
    now: u64,
) -> AdminResponse {
    match handle_inner(cfg, store, access, route, tenant_param, now) {
        Ok(response) => response,
        Err(refusal) => AdminResponse::refusal(&refusal),
    }
}

fn handle_inner<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    access: Access,
    route: &AdminRoute,
    tenant_param: Option<&str>,
    now: u64,
) -> Result<AdminResponse, Refusal> {
    let tenant_index = match (access, tenant_param) {
        (Access::Tenant(t), _) => t,
        (Access::Admin, None) => 0,
        (Access::Admin, Some(name)) => cfg
            .tenants
            .iter()
            .position(|t| t.id == name)
            .ok_or_else(|| Refusal::new(ErrorCode::NotFound, format!("no tenant {name:?}")))?,
    };
    let tenant = cfg
        .tenants
        .get(tenant_index)
        .map(|t| t.id.clone())
        .ok_or_else(|| Refusal::new(ErrorCode::InternalError, "tenant index out of range"))?;
    let find = |id: &str| -> Result<SessionRecord, Refusal> {
        sessions::lookup(store, &tenant, id, &cfg.sessions)?
            .map(|(_, record)| record)
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::NotFound,
                    format!("no session {id:?} for tenant {tenant}"),
                )
                .with_fields(vec![("sessionId", id.to_string())])
            })
    };
    let windows = || -> Result<TenantRecord, Refusal> {
        let mut record = TenantRecord::decode(&read(store, &tenant_windows_key(&tenant))?)
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
                if let Ok(record) = SessionRecord::decode(&bytes) {
                    if !record.session_id.is_empty() {
                        list.push(record);
                    }
                }
            }
            list.sort_by_key(|r| std::cmp::Reverse(r.last_active));
            let total = list.len();
            let sessions: Vec<Value> = list
                .iter()
                .take(SESSION_LIST_LIMIT)
                .map(|r| {
                    json!({
                        "sessionId": r.session_id,
                        "totalCost": r.spent.to_string(),
                        "reserved": r.reserved.to_string(),
                        "totalRequests": r.requests,
                        "cacheHits": r.cache_hits,
                        "cacheSavings": r.savings.to_string(),
                        "agents": r.agents.len(),
                        "killed": r.killed,
                        "lastActive": r.last_active,
                    })
                })
                .collect();
            Ok(AdminResponse::json(
                200,
                json!({"tenant": tenant, "sessions": sessions, "total": total}),
            ))
        }
        AdminRoute::Budget(id) => {
            let record = find(id)?;
            Ok(AdminResponse::json(
                200,
                budget_json(cfg, &tenant, &record, &windows()?),
            ))
        }
        AdminRoute::Report(id) => {
            let record = find(id)?;
            Ok(AdminResponse::json(
                200,
                report_json(cfg, &tenant, &record, &windows()?),
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
            let changed = sessions::set_killed(store, &tenant, id, &cfg.sessions, now, kill)?;
            let Some((record, was_killed)) = changed else {
                return Err(Refusal::new(
                    ErrorCode::NotFound,
                    format!("no session {id:?} for tenant {tenant}"),
                )
                .with_fields(vec![("sessionId", id.clone())]));
            };
            let mut response = AdminResponse::json(
                200,
                json!({"sessionId": id, "tenant": tenant, "killed": record.killed}),
            );
            if kill && !was_killed {
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

fn scope_json(limit: Amount, spent: Amount, reserved: Amount) -> Value {
    json!({
        "limit": limit.to_string(),
        "spent": spent.to_string(),
        "reserved": reserved.to_string(),
        "remaining": limit.saturating_sub(spent.saturating_add(reserved)).to_string(),
        "utilizationRate": utilization(spent.saturating_add(reserved), limit),
    })
}

/// Budgets of a session under the default policy: per scope and per agent.
pub fn budget_json(
    cfg: &Config,
    tenant: &str,
    record: &SessionRecord,
    windows: &TenantRecord,
) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("sessionId".into(), json!(record.session_id));
    out.insert("tenant".into(), json!(tenant));
    out.insert("killed".into(), json!(record.killed));
    let Some(policy) = cfg.policy(None) else {
        return Value::Object(out);
    };
    // Why priced calls are refused, if they are: the manual switch or the threshold.
    let tripped = match (policy.session_budget, policy.kill_ppm) {
        (Some(limit), Some(ppm)) => {
            crate::core::amount::reaches(record.spent.saturating_add(record.reserved), limit, ppm)
        }
        _ => false,
    };
    let kill_switch = if record.killed {
        json!("manual")
    } else if tripped {
        json!("threshold")
    } else {
        Value::Null
    };
    out.insert("killSwitch".into(), kill_switch.clone());
    out.insert("policy".into(), json!(policy.name));
    if let Some(limit) = policy.session_budget {
        out.insert(
            "session".into(),
            scope_json(limit, record.spent, record.reserved),
        );
    }
    if let Some(limit) = policy.daily_budget {
        out.insert(
            "daily".into(),
            scope_json(limit, windows.day.spent, windows.day.reserved),
        );
    }
    if let Some(limit) = policy.monthly_budget {
        out.insert(
            "monthly".into(),
            scope_json(limit, windows.month.spent, windows.month.reserved),
        );
    }
    let mut agents = serde_json::Map::new();
    for agent in &record.agents {
        if let Some(limit) = policy.agent_rule(&agent.id).and_then(|r| r.agent_budget) {
            agents.insert(
                agent.id.clone(),
                scope_json(limit, agent.spent, agent.reserved),
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

fn tally_json(key: &str, t: &Tally) -> Value {
    json!({
        key: t.name,
        "cost": t.cost.to_string(),
        "requests": t.requests,
        "cacheHits": t.cache_hits,
        "cacheSavings": t.savings.to_string(),
    })
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The session report: totals, by agent, by tool, by endpoint, refusals.
pub fn report_json(
    cfg: &Config,
    tenant: &str,
    record: &SessionRecord,
    windows: &TenantRecord,
) -> Value {
    let budget = budget_json(cfg, tenant, record, windows);
    let policy = cfg.policy(None);
    let by_agent: Vec<Value> = record
        .agents
        .iter()
        .map(|a| {
            let budget = policy
                .and_then(|p| p.agent_rule(&a.id))
                .and_then(|r| r.agent_budget);
            json!({
                "agentId": a.id,
                "role": role(&a.id),
                "cost": a.spent.to_string(),
                "reserved": a.reserved.to_string(),
                "requests": a.requests,
                "cacheHits": a.cache_hits,
                "cacheSavings": a.savings.to_string(),
                "budget": budget.map(|b| b.to_string()),
                "budgetUtilization": budget.map(|b| utilization(a.spent, b)),
            })
        })
        .collect();
    let refusals: serde_json::Map<String, Value> = record
        .refusals
        .iter()
        .map(|(code, n)| (code.clone(), json!(n)))
        .collect();
    let recent: Vec<Value> = record
        .recent_refusals
        .iter()
        .rev()
        .map(|r| json!({"at": r.at, "agentId": r.agent, "code": r.code}))
        .collect();
    json!({
        "sessionId": record.session_id,
        "tenant": tenant,
        "totalCost": record.spent.to_string(),
        "reserved": record.reserved.to_string(),
        "totalRequests": record.requests,
        "cacheHits": record.cache_hits,
        "cacheHitRate": rate(record.cache_hits, record.requests),
        "cacheSavings": record.savings.to_string(),
        "killed": record.killed,
        "killSwitch": budget["killSwitch"].clone(),
        "lastActive": record.last_active,
        "unconfirmedPayments": {"count": record.unconfirmed, "amount": record.unconfirmed_amount.to_string()},
        "byAgent": by_agent,
        "byTool": record.tools.iter().map(|t| tally_json("tool", t)).collect::<Vec<_>>(),
        "byEndpoint": record.endpoints.iter().map(|t| tally_json("endpoint", t)).collect::<Vec<_>>(),
        "refusals": refusals,
        "recentRefusals": recent,
        "budget": budget,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::compile::{compile_json, sha256_hex};
    use crate::core::firewall::{
        admit, describe_call, identify, settle, HeaderValue, RouteSettings,
    };
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
    fn ralph_stops_at_three_dollars_and_the_report_says_so() {
        let cfg = config();
        let store = MemoryStore::new();
        let headers = |agent: &'static str| {
            move |name: &str| match name {
                "x-pag0-api-key" => HeaderValue::One(b"demo-key".to_vec()),
                "x-pag0-session" => HeaderValue::One(b"s1".to_vec()),
                "x-pag0-agent" => HeaderValue::One(agent.as_bytes().to_vec()),
                _ => HeaderValue::Missing,
            }
        };
        let route_settings = RouteSettings {
            price: Some("150000".into()),
            tool: Some("llm".into()),
            ..RouteSettings::default()
        };
        let call =
            describe_call(&cfg, b"api.anthropic.com", b"/v1/messages", &route_settings).unwrap();
        let ralph = identify(&cfg, &headers("ralph-1")).unwrap();
        let mut alerts = Vec::new();
        let mut ok = 0;
        loop {
            match admit(&cfg, &store, &ralph, &call, 100) {
                Ok(admission) => {
                    let settled = settle(&cfg, &store, &admission.ticket, true, 100).unwrap();
                    assert_eq!(settled.cost, 150_000);
                    alerts.extend(settled.alerts);
                    ok += 1;
                }
                Err(refused) => {
                    assert_eq!(refused.refusal.code, ErrorCode::AgentBudgetExceeded);
                    alerts.extend(
                        crate::core::firewall::record_refusal(
                            &cfg,
                            &store,
                            &ralph,
                            &call,
                            &refused.refusal,
                            100,
                        )
                        .unwrap(),
                    );
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
        let executor = identify(&cfg, &headers("executor-1")).unwrap();
        let admission = admit(&cfg, &store, &executor, &call, 101).unwrap();
        settle(&cfg, &store, &admission.ticket, true, 101).unwrap();

        let response = handle(
            &cfg,
            &store,
            Access::Tenant(0),
            &AdminRoute::Report("s1".into()),
            None,
            102,
        );
        assert_eq!(response.status, 200);
        let report: Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(report["totalCost"], "3150000");
        assert_eq!(report["totalRequests"], 22);
        assert_eq!(report["refusals"]["AGENT_BUDGET_EXCEEDED"], 1);
        assert_eq!(report["byAgent"][0]["agentId"], "ralph-1");
        assert_eq!(report["byAgent"][0]["budgetUtilization"], 1.0);
        assert_eq!(report["byTool"][0]["requests"], 21);
        let missing = handle(
            &cfg,
            &store,
            Access::Admin,
            &AdminRoute::Budget("nope".into()),
            None,
            102,
        );
        assert_eq!(missing.status, 404);
    }
}
