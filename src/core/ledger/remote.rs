//! The ledger in Redis (`ledger.store: redis`): what pag0 asks of ledger.lua and how
//! it reads the answers. Pure: the host sends these bodies to Webdis
//! (`PUT /EVALSHA/<sha>/0`, the body being the script's one argument) and hands the
//! answers back here.
//!
//! Every scope of a priced call (agent, session, day, month, with the per-request cap
//! already applied to the price and the kill switch) is checked and reserved by one
//! script call; commits and releases name the reservation's id, so a retry after a
//! timeout never applies twice. Free calls and cache hits never reach Redis.

use serde_json::{json, Value};

use crate::core::alerts::{AlertKind, ScopeAlert};
use crate::core::amount::Amount;
use crate::core::call::Caller;
use crate::core::compile::Config;
use crate::core::errors::{BudgetDetails, ErrorCode, Refusal, Scope};
use crate::core::headers::{BudgetView, ScopeState};
use crate::core::ledger::Ticket;
use crate::core::policy::Policy;
use crate::core::spend_rate::{self, RateRule};
use crate::core::window::{day_index, month_index};

/// The script, loaded into Redis by `SCRIPT LOAD` when Redis says it does not know it.
pub const SCRIPT: &str = include_str!("ledger.lua");
/// SHA-1 of [`SCRIPT`], as EVALSHA names it (a test checks it against the script).
pub const SCRIPT_SHA1: &str = "86c24e53ebed965d0d3b47fd2b3069b542d3d5a4";

/// Amounts above this cannot be kept exactly by Lua's numbers (doubles).
pub const MAX_EXACT: Amount = 1 << 53;

/// How long Redis keeps a scope that nothing touches: a session a month, a day's
/// window 35 days, a month's 400 days.
const SESSION_EXPIRE_SECS: u64 = 30 * 86_400;
const DAY_EXPIRE_SECS: u64 = 35 * 86_400;
const MONTH_EXPIRE_SECS: u64 = 400 * 86_400;

/// The Webdis path of one script call (the body is the request).
pub fn eval_path(prefix: &str) -> String {
    format!("{prefix}/EVALSHA/{SCRIPT_SHA1}/0")
}

/// The Webdis path that loads the script (the body is the script).
pub fn load_path(prefix: &str) -> String {
    format!("{prefix}/SCRIPT/LOAD")
}

// Every key the Redis ledger uses is built here. A tenant id is written with its
// length first, so no tenant and session pair can run into another.

/// The keys of a tenant's session hashes: this, then the session id.
pub fn session_prefix(tenant: &str) -> String {
    format!("pag0:s:{}:{tenant}:", tenant.len())
}

pub fn session_key(tenant: &str, session: &str) -> String {
    session_prefix(tenant) + session
}

/// The keys of a tenant's report lists: this, then the session id.
pub fn report_prefix(tenant: &str) -> String {
    format!("pag0:rep:{}:{tenant}:", tenant.len())
}

pub fn report_key(tenant: &str, session: &str) -> String {
    report_prefix(tenant) + session
}

/// A tenant's sessions by last reservation (the report's session list).
pub fn index_key(tenant: &str) -> String {
    format!("pag0:ss:{}:{tenant}", tenant.len())
}

pub fn day_key(tenant: &str, now_secs: u64) -> String {
    format!("pag0:d:{}:{tenant}:{}", tenant.len(), day_index(now_secs))
}

pub fn month_key(tenant: &str, now_secs: u64) -> String {
    format!("pag0:m:{}:{tenant}:{}", tenant.len(), month_index(now_secs))
}

/// A spend-rate window in Redis: the session's, or an agent's within the session, per
/// window length (routes under policies with other windows count apart, so one
/// window's expiry never cuts another's slices short).
pub fn rate_key(tenant: &str, session: &str, agent: Option<&str>, window_secs: u32) -> String {
    let key = format!(
        "pag0:q:{window_secs}:{}:{tenant}:{}:{session}",
        tenant.len(),
        session.len()
    );
    match agent {
        Some(agent) => key + ":a:" + agent,
        None => key,
    }
}

/// The amount at which `reaches(used, limit, ppm)` starts to hold.
fn threshold(limit: Amount, ppm: u64) -> Amount {
    let product = u128::from(limit) * u128::from(ppm);
    let at = product.div_ceil(1_000_000);
    Amount::try_from(at).unwrap_or(Amount::MAX)
}

/// One scope a reservation counts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeSpec {
    pub scope: Scope,
    pub key: String,
    /// "" for the scope's own figures, "a:<agent>:" for an agent budget in a session.
    pub field: String,
    pub limit: Option<Amount>,
    pub alert_at: Option<Amount>,
    pub kill_at: Option<Amount>,
    pub expire_secs: u64,
}

impl ScopeSpec {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "k": self.key,
            "f": self.field,
            "c": self.scope.exceeded_code().as_str(),
            "x": self.expire_secs,
        });
        if let Some(map) = v.as_object_mut() {
            for (name, value) in [
                ("l", self.limit),
                ("al", self.alert_at),
                ("kl", self.kill_at),
            ] {
                if let Some(value) = value {
                    map.insert(name.into(), json!(value));
                }
            }
        }
        v
    }
}

/// A spend-rate breaker a reservation counts in, cluster-wide (`spendRate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateSpec {
    pub key: String,
    /// The agent whose rule it is; `None` for the session's.
    pub agent: Option<String>,
    pub rule: RateRule,
}

impl RateSpec {
    fn scope(&self) -> &'static str {
        if self.agent.is_some() {
            "agent"
        } else {
            "session"
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "k": self.key,
            "l": self.rule.limit,
            "w": self.rule.window_seconds.max(1),
            "s": self.rule.slice_seconds(),
            "kill": self.rule.kill_session,
        })
    }
}

/// The scopes of a call, most specific first (agent, session, day, month): the order
/// in which a refusal names the narrowest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub session_key: String,
    pub session_id: String,
    /// The tenant's session index (the report's session list).
    pub index_key: String,
    pub scopes: Vec<ScopeSpec>,
    /// Index of the session's own scope in `scopes`.
    pub session_index: usize,
    /// The session's use at which the kill switch threshold stops priced calls.
    pub kill_at: Option<Amount>,
    pub alert_ppm: Option<u64>,
    /// The spend-rate breakers (session's, then the agent's), counted in Redis.
    pub rates: Vec<RateSpec>,
    pub tenant: String,
}

/// Everything a priced call of `caller` counts against.
pub fn plan(cfg: &Config, policy: &Policy, caller: &Caller, now_secs: u64) -> Plan {
    let tenant = cfg.tenant_id(caller.tenant);
    let session_key = session_key(tenant, &caller.session);
    let alert = |limit: Option<Amount>| limit.zip(policy.alert_ppm).map(|(l, p)| threshold(l, p));
    let mut scopes = Vec::with_capacity(4);
    if let Some((key, limit)) = policy.agent_budget(&caller.agent) {
        scopes.push(ScopeSpec {
            scope: Scope::Agent,
            key: session_key.clone(),
            field: format!("a:{key}:"),
            limit: Some(limit),
            alert_at: alert(Some(limit)),
            kill_at: None,
            expire_secs: SESSION_EXPIRE_SECS,
        });
    }
    let kill_at = policy
        .session_budget
        .zip(policy.kill_ppm)
        .map(|(l, p)| threshold(l, p));
    let session_index = scopes.len();
    scopes.push(ScopeSpec {
        scope: Scope::Session,
        key: session_key.clone(),
        field: String::new(),
        limit: policy.session_budget,
        alert_at: alert(policy.session_budget),
        kill_at,
        expire_secs: SESSION_EXPIRE_SECS,
    });
    if cfg.track_windows {
        scopes.push(ScopeSpec {
            scope: Scope::Daily,
            key: day_key(tenant, now_secs),
            field: String::new(),
            limit: policy.daily_budget,
            alert_at: alert(policy.daily_budget),
            kill_at: None,
            expire_secs: DAY_EXPIRE_SECS,
        });
        scopes.push(ScopeSpec {
            scope: Scope::Monthly,
            key: month_key(tenant, now_secs),
            field: String::new(),
            limit: policy.monthly_budget,
            alert_at: alert(policy.monthly_budget),
            kill_at: None,
            expire_secs: MONTH_EXPIRE_SECS,
        });
    }
    let agent_rate = policy
        .agent_rule(&caller.agent)
        .and_then(|r| r.spend_rate)
        .map(|rule| (rule, Some(caller.agent.as_str())));
    let rates = policy
        .spend_rate
        .map(|rule| (rule, None))
        .into_iter()
        .chain(agent_rate)
        .map(|(rule, agent)| RateSpec {
            key: rate_key(tenant, &caller.session, agent, rule.window_seconds.max(1)),
            agent: agent.map(str::to_string),
            rule,
        })
        .collect();
    Plan {
        session_key,
        session_id: caller.session.clone(),
        index_key: index_key(tenant),
        scopes,
        session_index,
        kill_at,
        alert_ppm: policy.alert_ppm,
        rates,
        tenant: tenant.to_string(),
    }
}

/// The reserve request: `price`, or as much of it as every scope leaves down to
/// `min_price`, held under `id` for `ttl_ms` (then charged if nobody settled it).
pub fn reserve_body(
    plan: &Plan,
    id: &str,
    price: Amount,
    min_price: Amount,
    ttl_ms: u64,
    riders: &[Settlement],
) -> String {
    let mut v = json!({
        "op": "reserve",
        "id": id,
        "price": price,
        "min": min_price.min(price),
        "ttl": ttl_ms,
        "session": plan.session_key,
        "sid": plan.session_id,
        "index": plan.index_key,
        "x": SESSION_EXPIRE_SECS,
        "si": plan.session_index,
        "scopes": plan.scopes.iter().map(ScopeSpec::to_json).collect::<Vec<_>>(),
    });
    if let Some(map) = v.as_object_mut() {
        if let Some(at) = plan.kill_at {
            map.insert("killAt".into(), json!(at));
        }
        if !plan.rates.is_empty() {
            map.insert(
                "rates".into(),
                Value::Array(plan.rates.iter().map(RateSpec::to_json).collect()),
            );
            map.insert("tenant".into(), json!(plan.tenant));
        }
        if !riders.is_empty() {
            map.insert(
                "items".into(),
                Value::Array(riders.iter().map(settle_item).collect()),
            );
        }
    }
    v.to_string()
}

/// What is wrong with an answer from Webdis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Redis does not know the script (restarted, or flushed): load it, then retry.
    NoScript,
    /// Anything else: Redis or Webdis down, refused, or an answer pag0 cannot read.
    Unavailable(String),
}

/// A request with its tag, which the script's answer carries back.
pub fn tagged(body: &str, tag: &str) -> String {
    match body.strip_prefix('{') {
        Some(rest) => {
            let sep = if rest.trim_start().starts_with('}') {
                ""
            } else {
                ","
            };
            format!("{{\"tag\":{}{sep}{rest}", Value::String(tag.to_string()))
        }
        None => body.to_string(),
    }
}

/// The script's answer inside Webdis's `{"EVALSHA": ...}`, if it answers the request
/// tagged `tag` (after a Redis pause Webdis can hand a connection the answer meant for
/// one Envoy gave up on).
pub fn script_answer(status: Option<u32>, body: &[u8], tag: &str) -> Result<Value, Fault> {
    let answer = untagged_answer(status, body)?;
    if answer.get("tag").and_then(Value::as_str) != Some(tag) {
        return Err(Fault::Unavailable(
            "the ledger's Webdis answered another request".into(),
        ));
    }
    Ok(answer)
}

fn untagged_answer(status: Option<u32>, body: &[u8]) -> Result<Value, Fault> {
    let outer: Value = serde_json::from_slice(body).map_err(|_| {
        Fault::Unavailable(format!(
            "the ledger's Webdis answered {} with no JSON",
            status.map_or("nothing".to_string(), |s| s.to_string())
        ))
    })?;
    match outer.get("EVALSHA") {
        Some(Value::String(inner)) => serde_json::from_str(inner)
            .map_err(|_| Fault::Unavailable("the ledger script's answer is not JSON".into())),
        Some(Value::Array(parts)) => {
            let message = parts
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ");
            if message.contains("NOSCRIPT") {
                Err(Fault::NoScript)
            } else {
                Err(Fault::Unavailable(format!("Redis: {message}")))
            }
        }
        _ => Err(Fault::Unavailable(format!(
            "the ledger's Webdis answered {}: {}",
            status.map_or("nothing".to_string(), |s| s.to_string()),
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))),
    }
}

/// Whether Webdis loaded the script (`{"SCRIPT": "<sha>"}`).
pub fn loaded(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("SCRIPT").and_then(Value::as_str).map(str::to_string))
        .is_some_and(|sha| sha == SCRIPT_SHA1)
}

fn num(v: &Value) -> Amount {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

fn list(v: Option<&Value>) -> &[Value] {
    match v {
        Some(Value::Array(items)) => items,
        _ => &[],
    }
}

/// The view of the scopes that have limits, from the script's `[spent, reserved]`s.
fn view(plan: &Plan, figures: &[Value]) -> BudgetView {
    let scopes = plan
        .scopes
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| {
            let limit = spec.limit?;
            let pair = list(figures.get(i));
            Some(ScopeState {
                scope: spec.scope,
                limit,
                spent: pair.first().map_or(0, num),
                reserved: pair.get(1).map_or(0, num),
            })
        })
        .collect();
    BudgetView {
        scopes,
        alert_ppm: plan.alert_ppm,
    }
}

/// Alerts the script raised: `[tag, scope index, kind, spent, limit]` each.
fn alerts(plan: &Plan, agent: &str, raised: &[Value]) -> Vec<(usize, ScopeAlert)> {
    raised
        .iter()
        .filter_map(|a| {
            let a = list(Some(a));
            let tag = a.first().map_or(0, num) as usize;
            let spec = plan
                .scopes
                .get(a.get(1).map_or(usize::MAX, |v| num(v) as usize))?;
            let kind = match a.get(2).map_or(0, num) {
                1 => AlertKind::ThresholdCrossed,
                2 => AlertKind::BudgetExhausted,
                4 => AlertKind::KillSwitch,
                _ => return None,
            };
            Some((
                tag,
                ScopeAlert {
                    kind,
                    scope: spec.scope,
                    agent: (spec.scope == Scope::Agent).then(|| agent.to_string()),
                    spent: a.get(3).map_or(0, num),
                    limit: a.get(4).map_or(0, num),
                    reason: None,
                },
            ))
        })
        .collect()
}

/// A reservation a ticket holds in Redis: its id, and the scopes it counts in (which
/// name the alerts its settlement raises).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: String,
    pub plan: Plan,
}

/// A reservation Redis made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub amount: Amount,
    pub view: BudgetView,
}

/// A reservation Redis refused, with the budgets as they stood and the alerts raised.
#[derive(Debug, Clone)]
pub struct Denied {
    pub refusal: Refusal,
    pub view: BudgetView,
    pub alerts: Vec<ScopeAlert>,
    /// A spend-rate breaker's first refusal in its window: the one that sends its
    /// webhook alert (and whose `killSession` Redis has applied).
    pub rate_trip: Option<RateTrip>,
}

/// The first refusal of a spend-rate window, cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateTrip {
    pub rate: RateSpec,
    pub spent: Amount,
}

/// Reads the reserve script's answer.
pub fn read_reserve(
    plan: &Plan,
    agent: &str,
    price: Amount,
    answer: &Value,
) -> Result<Reserved, Box<Denied>> {
    let figures = list(answer.get("v"));
    let view = view(plan, figures);
    if answer.get("ok") == Some(&Value::Bool(true)) {
        return Ok(Reserved {
            amount: answer.get("amount").map_or(price, num),
            view,
        });
    }
    let raised = alerts(plan, agent, list(answer.get("alerts")))
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let code = answer.get("code").and_then(Value::as_str).unwrap_or("");
    let mut rate_trip = None;
    let refusal = match code {
        // The id was already used (released before this reserve arrived): not this
        // call's reservation, and not to be released by it.
        "DUPLICATE" => unavailable("the reservation id was already used")
            .with_fields(vec![("reason", "duplicate".to_string())]),
        "SPEND_RATE_EXCEEDED" => {
            let index = answer.get("ri").map_or(usize::MAX, |v| num(v) as usize);
            match plan.rates.get(index) {
                Some(rate) => {
                    let spent = answer.get("spent").map_or(0, num);
                    if answer.get("alert") == Some(&Value::Bool(true)) {
                        rate_trip = Some(RateTrip {
                            rate: rate.clone(),
                            spent,
                        });
                    }
                    spend_rate::refusal(
                        &rate.rule,
                        spent,
                        answer.get("requested").map_or(price, num),
                        answer.get("retry").map_or(1, num),
                        rate.scope(),
                    )
                }
                None => unavailable("the ledger refused with an unknown spend rate"),
            }
        }
        "KILL_SWITCH_ACTIVE" => {
            let reason = answer
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("manual");
            let session = view.scopes.iter().find(|s| s.scope == Scope::Session);
            let mut fields = vec![("reason", reason.to_string())];
            if reason == "threshold" {
                if let Some(s) = session {
                    fields.extend([
                        ("scope", "session".to_string()),
                        ("limit", s.limit.to_string()),
                        ("spent", s.spent.to_string()),
                        ("reserved", s.reserved.to_string()),
                        ("requested", price.to_string()),
                    ]);
                }
            }
            let message = if reason == "threshold" {
                "the session is at or past its kill switch threshold".to_string()
            } else {
                "the session's kill switch is on".to_string()
            };
            Refusal::new(ErrorCode::KillSwitchActive, message).with_fields(fields)
        }
        _ => {
            let index = answer.get("i").map_or(usize::MAX, |v| num(v) as usize);
            match plan.scopes.get(index) {
                Some(spec) => {
                    let pair = list(figures.get(index));
                    Refusal::budget(BudgetDetails {
                        scope: spec.scope,
                        limit: spec.limit.unwrap_or(0),
                        spent: pair.first().map_or(0, num),
                        reserved: pair.get(1).map_or(0, num),
                        requested: answer.get("requested").map_or(price, num),
                    })
                }
                None => unavailable(&format!("the ledger refused with {code:?}")),
            }
        }
    };
    Err(Box::new(Denied {
        refusal,
        view,
        alerts: raised,
        rate_trip,
    }))
}

/// `LEDGER_UNAVAILABLE`: the ledger cannot be asked; the call is refused, nothing paid.
pub fn unavailable(why: &str) -> Refusal {
    Refusal::new(
        ErrorCode::LedgerUnavailable,
        format!("the ledger cannot be reached: {why}; nothing was charged"),
    )
    .with_retry_after(1)
}

/// One reservation to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub id: String,
    /// Order of sending, set by the VM that queues it.
    pub seq: u64,
    pub cost: Amount,
    pub unconfirmed: bool,
    /// For the alerts its spend raises.
    pub tenant: String,
    pub session: String,
    pub agent: String,
    pub plan: Plan,
}

/// Commits (cost > 0) or releases (cost 0) reservations in one script call.
pub fn settle_body(items: &[Settlement]) -> String {
    json!({
        "op": "settle",
        "items": items.iter().map(settle_item).collect::<Vec<_>>(),
    })
    .to_string()
}

fn settle_item(s: &Settlement) -> Value {
    json!({
        "id": s.id,
        "cost": s.cost.min(MAX_EXACT),
        "u": s.unconfirmed,
    })
}

/// What ended: each item's status (`settled`, `late`, `duplicate`, `unknown`) and the
/// alerts their spend raised (tenant, session, alert).
pub fn read_settle(
    items: &[Settlement],
    answer: &Value,
) -> (Vec<String>, Vec<(usize, ScopeAlert)>) {
    let statuses = list(answer.get("r"))
        .iter()
        .map(|v| v.as_str().unwrap_or("").to_string())
        .collect();
    let mut raised = Vec::new();
    for a in list(answer.get("alerts")) {
        let parts = list(Some(a));
        let Some(index) = parts.first().map(|v| num(v) as usize) else {
            continue;
        };
        if let Some(item) = items.get(index) {
            for (_, alert) in alerts(&item.plan, &item.agent, std::slice::from_ref(a)) {
                raised.push((index, alert));
            }
        }
    }
    (statuses, raised)
}

/// Turns a session's kill switch on or off in Redis, and logs the change for every
/// Envoy's poll.
pub fn kill_body(tenant: &str, session: &str, on: bool, reason: &str) -> String {
    json!({
        "op": "kill",
        "session": session_key(tenant, session),
        "tenant": tenant,
        "sid": session,
        "on": on,
        "reason": reason,
        "x": SESSION_EXPIRE_SECS,
    })
    .to_string()
}

/// Claims the alert of a repeat breaker's trip for the cluster: each Envoy counts the
/// loop itself and trips at its own count, and only the first to claim the loop
/// (owner and fingerprint) within `window_secs` sends the alert.
pub fn alert_once_body(
    tenant: &str,
    session: &str,
    agent: &str,
    fingerprint: u64,
    window_secs: u32,
) -> String {
    json!({
        "op": "once",
        "k": format!(
            "pag0:al:{}:{tenant}:{}:{session}:{}:{agent}:{fingerprint:016x}",
            tenant.len(),
            session.len(),
            agent.len()
        ),
        "x": window_secs.max(1),
    })
    .to_string()
}

/// Whether this Envoy's claim of an alert was the first.
pub fn read_once(answer: &Value) -> bool {
    answer
        .get("first")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Kill switch changes after sequence number `since`; `None` (a VM's first poll): the
/// newest ones.
pub fn kills_body(since: Option<u64>) -> String {
    match since {
        Some(since) => json!({"op": "kills", "since": since.min(MAX_EXACT)}),
        None => json!({"op": "kills", "since": -1}),
    }
    .to_string()
}

/// One kill switch change another Envoy made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillChange {
    pub seq: u64,
    /// When it was made (Redis's clock, ms).
    pub at_ms: u64,
    pub tenant: String,
    pub session: String,
    pub on: bool,
}

/// The changes, and the newest sequence number.
pub fn read_kills(answer: &Value) -> (u64, Vec<KillChange>) {
    let seq = answer.get("seq").map_or(0, num);
    let changes = list(answer.get("k"))
        .iter()
        .filter_map(|m| {
            let v: Value = serde_json::from_str(m.as_str()?).ok()?;
            Some(KillChange {
                seq: v.get("n").map_or(0, num),
                at_ms: v.get("at").map_or(0, num),
                tenant: v.get("t")?.as_str()?.to_string(),
                session: v.get("s")?.as_str()?.to_string(),
                on: v.get("on").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect::<Vec<_>>();
    let mut changes = changes;
    changes.sort_by_key(|c| c.seq);
    (seq, changes)
}

/// A reservation id unique across Envoys and restarts: the VM's random nonce and its
/// counter.
pub fn reservation_id(nonce: u64, counter: u64) -> String {
    format!("{nonce:016x}-{counter:x}")
}

/// The settlement of an admitted ticket.
pub fn settlement(
    cfg: &Config,
    ticket: &Ticket,
    id: &str,
    cost: Amount,
    unconfirmed: bool,
    plan: Plan,
) -> Settlement {
    Settlement {
        id: id.to_string(),
        seq: 0,
        cost,
        unconfirmed,
        tenant: cfg.tenant_id(ticket.tenant).to_string(),
        session: ticket.session.clone(),
        agent: ticket.agent.clone(),
        plan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::compile::compile_json;

    fn cfg() -> Config {
        compile_json(
            br#"{"ledger": {"store": "redis", "cluster": "pag0_ledger"},
                 "policies": {"p": {"sessionBudget": "1000", "dailyBudget": "5000",
                   "alertOnThreshold": 0.8, "killSwitchThreshold": 0.9,
                   "agents": {"exec-*": {"agentBudget": "300"}}}}}"#,
        )
        .unwrap()
    }

    fn caller(agent: &str) -> Caller {
        Caller {
            tenant: 0,
            session: "s:1".into(),
            agent: agent.into(),
            parent: None,
        }
    }

    #[test]
    #[cfg(not(target_arch = "wasm32"))]
    fn the_script_sha_is_the_sha1_of_the_script_evalsha_names() {
        let out = std::process::Command::new("sha1sum")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/src/core/ledger/ledger.lua"
            ))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text.split_whitespace().next(),
            Some(SCRIPT_SHA1),
            "update SCRIPT_SHA1 after changing ledger.lua"
        );
    }

    #[test]
    fn a_plan_names_every_scope_most_specific_first_with_exact_thresholds() {
        let cfg = cfg();
        let plan = plan(&cfg, &cfg.policies[0], &caller("exec-1"), 86_400 * 3);
        let scopes: Vec<Scope> = plan.scopes.iter().map(|s| s.scope).collect();
        assert_eq!(
            scopes,
            [Scope::Agent, Scope::Session, Scope::Daily, Scope::Monthly]
        );
        assert_eq!(plan.session_index, 1);
        assert_eq!(plan.scopes[0].field, "a:exec-1:");
        assert_eq!(plan.scopes[0].key, plan.scopes[1].key);
        // 0.9 of 1000 and 0.8 of 300: reached at exactly these amounts.
        assert_eq!(plan.kill_at, Some(900));
        assert_eq!(plan.scopes[0].alert_at, Some(240));
        assert_eq!(plan.scopes[2].key, "pag0:d:7:default:3");
        // Tenant and session cannot run into each other in a key.
        assert_ne!(session_key("a:b", "c"), session_key("a", "b:c"));
        // An agent without a budget counts in the session only.
        let plan = plan_of("researcher-1");
        assert_eq!(plan.scopes[0].scope, Scope::Session);
    }

    fn plan_of(agent: &str) -> Plan {
        let cfg = cfg();
        plan(&cfg, &cfg.policies[0], &caller(agent), 0)
    }

    #[test]
    fn a_reserve_request_is_json_the_script_reads() {
        let plan = plan_of("exec-1");
        let body: Value = serde_json::from_str(&tagged(
            &reserve_body(&plan, "r-1", 500, 100, 60_000, &[]),
            "r-1",
        ))
        .unwrap();
        assert_eq!(body["op"], "reserve");
        assert_eq!(body["tag"], "r-1");
        assert_eq!(body["price"], 500);
        assert_eq!(body["min"], 100);
        assert_eq!(body["killAt"], 900);
        assert_eq!(body["scopes"][0]["l"], 300);
        assert_eq!(body["scopes"][0]["c"], "AGENT_BUDGET_EXCEEDED");
        assert!(body["scopes"][3].get("l").is_none(), "no monthly limit set");
    }

    #[test]
    fn spend_rates_ride_the_reserve_and_their_refusal_says_when_to_retry() {
        let cfg = compile_json(
            br#"{"ledger": {"store": "redis", "cluster": "pag0_ledger"},
                 "policies": {"p": {"spendRate": {"limit": "600", "windowSeconds": 60},
                   "agents": {"exec-*": {"spendRate": {"limit": "200", "windowSeconds": 30,
                                                       "killSession": true}}}}}}"#,
        )
        .unwrap();
        let plan = plan(&cfg, &cfg.policies[0], &caller("exec-1"), 0);
        assert_eq!(plan.rates.len(), 2);
        assert_eq!(plan.rates[0].agent, None);
        assert_eq!(plan.rates[1].agent.as_deref(), Some("exec-1"));
        // Tenant, session and agent cannot run into each other in a key.
        assert_ne!(
            rate_key("t", "a:b", None, 60),
            rate_key("t", "a", Some("b"), 60)
        );
        assert_ne!(
            rate_key("t", "a", Some("b"), 60),
            rate_key("t", "a:a:b", None, 60)
        );
        assert_ne!(rate_key("t", "a", None, 60), rate_key("t", "a", None, 30));
        let body: Value =
            serde_json::from_str(&reserve_body(&plan, "r-1", 100, 100, 1000, &[])).unwrap();
        assert_eq!(body["tenant"], "default");
        assert_eq!(body["rates"][1]["l"], 200);
        assert_eq!(body["rates"][1]["w"], 30);
        assert_eq!(body["rates"][1]["s"], 5);
        assert_eq!(body["rates"][1]["kill"], true);
        let answer = json!({"ok": false, "code": "SPEND_RATE_EXCEEDED", "ri": "1",
            "spent": "200", "requested": "100", "retry": "12", "alert": true, "v": []});
        let denied = read_reserve(&plan, "exec-1", 100, &answer).unwrap_err();
        assert_eq!(denied.refusal.code, ErrorCode::SpendRateExceeded);
        assert_eq!(denied.refusal.retry_after, Some(12));
        assert_eq!(denied.refusal.field("scope"), Some("agent"));
        let trip = denied.rate_trip.unwrap();
        assert_eq!((trip.spent, trip.rate.rule.kill_session), (200, true));
        // Only the window's first refusal alerts.
        let later = json!({"ok": false, "code": "SPEND_RATE_EXCEEDED", "ri": "0",
            "spent": "600", "requested": "100", "retry": "3", "alert": false});
        let denied = read_reserve(&plan, "exec-1", 100, &later).unwrap_err();
        assert!(denied.rate_trip.is_none());
        assert_eq!(denied.refusal.field("scope"), Some("session"));
        // A policy without rates sends none.
        let body = reserve_body(&plan_of("exec-1"), "r-2", 1, 1, 1, &[]);
        assert!(!body.contains("\"rates\""));
    }

    fn webdis(inner: &str) -> Vec<u8> {
        serde_json::json!({ "EVALSHA": inner })
            .to_string()
            .into_bytes()
    }

    #[test]
    fn only_an_answer_carrying_the_requests_tag_is_taken() {
        let ok = webdis(r#"{"tag":"t-1","ok":true,"amount":"5","v":[]}"#);
        assert!(script_answer(Some(200), &ok, "t-1").is_ok());
        assert!(matches!(
            script_answer(Some(200), &ok, "t-2"),
            Err(Fault::Unavailable(_))
        ));
        let noscript = br#"{"EVALSHA":[false,"NOSCRIPT No matching script. Please use EVAL."]}"#;
        assert_eq!(
            script_answer(Some(200), noscript, "t-1"),
            Err(Fault::NoScript)
        );
        for (status, body) in [(Some(503), &b""[..]), (None, b""), (Some(403), b"")] {
            assert!(matches!(
                script_answer(status, body, "t-1"),
                Err(Fault::Unavailable(_))
            ));
        }
        assert!(loaded(
            format!(r#"{{"SCRIPT":"{SCRIPT_SHA1}"}}"#).as_bytes()
        ));
        assert!(!loaded(br#"{"SCRIPT":[false,"ERR"]}"#));
        assert_eq!(tagged("{}", "x"), r#"{"tag":"x"}"#);
    }

    #[test]
    fn an_alert_claim_is_one_key_per_loop_that_ids_cannot_alias() {
        let claim = |t: &str, s: &str, a: &str, fp: u64, w: u32| -> Value {
            serde_json::from_str(&alert_once_body(t, s, a, fp, w)).unwrap()
        };
        let c = claim("acme", "s-1", "looper", 0xab, 60);
        assert_eq!(c["op"], "once");
        assert_eq!(c["k"], "pag0:al:4:acme:3:s-1:6:looper:00000000000000ab");
        assert_eq!(c["x"], 60);
        // Ids may hold the separator: the lengths keep ("a:b", "c") and ("a", "b:c") apart.
        assert_ne!(
            claim("t", "a:b", "c", 1, 60)["k"],
            claim("t", "a", "b:c", 1, 60)["k"]
        );
        assert_ne!(
            claim("t", "s", "a", 1, 60)["k"],
            claim("t", "s", "a", 2, 60)["k"]
        );
        // Redis refuses EX 0: a window of 0 s still claims for a second.
        assert_eq!(claim("t", "s", "a", 1, 0)["x"], 1);
        assert!(read_once(&serde_json::json!({"first": true})));
        assert!(!read_once(&serde_json::json!({"first": false})));
        assert!(!read_once(&serde_json::json!({})));
    }

    #[test]
    fn a_refusal_names_the_scope_with_its_figures_and_the_alerts_raised() {
        let plan = plan_of("exec-1");
        let answer: Value = serde_json::from_str(
            r#"{"ok":false,"code":"AGENT_BUDGET_EXCEEDED","i":"0","requested":"200",
                "v":[["250","0"],["400","100"],["400","100"],["400","100"]],
                "alerts":[["","0","2","250","300"]]}"#,
        )
        .unwrap();
        let denied = read_reserve(&plan, "exec-1", 200, &answer).unwrap_err();
        assert_eq!(denied.refusal.code, ErrorCode::AgentBudgetExceeded);
        assert_eq!(
            denied.refusal.message,
            "agent budget exceeded: limit 300, spent 250, reserved 0, requested 200"
        );
        assert_eq!(denied.alerts.len(), 1);
        assert_eq!(denied.alerts[0].kind, AlertKind::BudgetExhausted);
        assert_eq!(denied.alerts[0].agent.as_deref(), Some("exec-1"));
        // The view has the scopes with limits: agent, session, daily.
        assert_eq!(
            denied.view.remaining_header(),
            "session=500, agent=50, daily=4500"
        );
        let killed: Value = serde_json::from_str(
            r#"{"ok":false,"code":"KILL_SWITCH_ACTIVE","reason":"manual","v":{}}"#,
        )
        .unwrap();
        let denied = read_reserve(&plan, "exec-1", 200, &killed).unwrap_err();
        assert_eq!(denied.refusal.code, ErrorCode::KillSwitchActive);
        assert_eq!(denied.refusal.field("reason"), Some("manual"));
        // An answer that is not the script's: the ledger is unavailable.
        let odd: Value = serde_json::from_str(r#"{"r":[]}"#).unwrap();
        let denied = read_reserve(&plan, "exec-1", 200, &odd).unwrap_err();
        assert_eq!(denied.refusal.code, ErrorCode::LedgerUnavailable);
        assert_eq!(denied.refusal.status(), 503);
    }

    #[test]
    fn a_reservation_reads_the_amount_redis_held() {
        let plan = plan_of("exec-1");
        let answer: Value = serde_json::from_str(
            r#"{"ok":true,"amount":"120","v":[["180","120"],["180","120"],["180","120"],["0","0"]]}"#,
        )
        .unwrap();
        let reserved = read_reserve(&plan, "exec-1", 300, &answer).unwrap();
        assert_eq!(reserved.amount, 120);
        assert_eq!(
            reserved.view.remaining_header(),
            "session=700, agent=0, daily=4700"
        );
    }

    #[test]
    fn settlements_map_alerts_back_to_their_item_and_kills_come_in_order() {
        let plan = plan_of("exec-1");
        let items = vec![settlement_of("a", &plan), settlement_of("b", &plan)];
        let body: Value = serde_json::from_str(&settle_body(&items)).unwrap();
        assert_eq!(body["items"][1]["id"], "b");
        let answer: Value = serde_json::from_str(
            r#"{"r":["settled","duplicate"],"alerts":[["1","1","1","820","1000"]]}"#,
        )
        .unwrap();
        let (statuses, alerts) = read_settle(&items, &answer);
        assert_eq!(statuses, ["settled", "duplicate"]);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].0, 1);
        assert_eq!(alerts[0].1.scope, Scope::Session);
        assert_eq!(alerts[0].1.kind, AlertKind::ThresholdCrossed);
        let kills: Value = serde_json::from_str(
            r#"{"seq":"7","k":["{\"n\":\"7\",\"t\":\"acme\",\"s\":\"x\",\"on\":false,\"at\":\"5\"}",
                               "{\"n\":\"6\",\"t\":\"acme\",\"s\":\"x\",\"on\":true,\"at\":\"4\"}"]}"#,
        )
        .unwrap();
        let (seq, changes) = read_kills(&kills);
        assert_eq!(seq, 7);
        assert_eq!(
            changes.iter().map(|c| (c.seq, c.on)).collect::<Vec<_>>(),
            [(6, true), (7, false)]
        );
        assert_eq!(kills_body(None), r#"{"op":"kills","since":-1}"#);
    }

    fn settlement_of(id: &str, plan: &Plan) -> Settlement {
        Settlement {
            id: id.into(),
            seq: 0,
            cost: 10,
            unconfirmed: false,
            tenant: "default".into(),
            session: "s:1".into(),
            agent: "exec-1".into(),
            plan: plan.clone(),
        }
    }
}
