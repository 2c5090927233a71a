//! Compiled spend policy and the pure checks made before anything is reserved:
//! endpoint allow/block lists and per-request caps, at session and agent level.

use crate::core::amount::Amount;
use crate::core::errors::{BudgetDetails, ErrorCode, Refusal, Scope};
use crate::core::glob::{any_match, Glob};
use crate::core::ledger::budget::POOL;
use crate::core::settings::Service;

pub use crate::core::settings::ChargeOn;

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub session_budget: Option<Amount>,
    pub daily_budget: Option<Amount>,
    pub monthly_budget: Option<Amount>,
    pub max_per_request: Option<Amount>,
    pub allowed: Vec<Glob>,
    pub blocked: Vec<Glob>,
    pub alert_ppm: Option<u64>,
    pub kill_ppm: Option<u64>,
    pub charge_on: ChargeOn,
    pub agents: Vec<AgentRule>,
    /// Agents no pattern matches: refused, or held to one rule whose budget they
    /// share (so an agent cannot escape its budget by naming itself anew).
    pub unmatched: Unmatched,
    pub payments: crate::core::payments::PaymentRules,
    /// x402 pay mode: pag0 answers a 402 itself through the signer.
    pub pay_x402: bool,
    /// Calls priced above `threshold` wait for the approval service.
    pub approval: Option<Approval>,
    /// `unpricedRoutes: "refuse"`: a call no price applies to is refused.
    pub refuse_unpriced: bool,
    pub repeat: Option<crate::core::breaker::RepeatRule>,
    /// The session's spend-rate limit.
    pub spend_rate: Option<crate::core::spend_rate::RateRule>,
    /// Pay mode: the most payments for one resource within a window (as a repeat rule
    /// whose `calls` is that number plus one).
    pub x402_repeat: Option<crate::core::breaker::RepeatRule>,
}

#[derive(Debug, Clone)]
pub struct Approval {
    pub threshold: Amount,
    pub service: Service,
}

/// What applies to an agent that no pattern of the policy matches.
#[derive(Debug, Clone, Default)]
pub enum Unmatched {
    /// Nothing more than the policy's own rules (no agent budget).
    #[default]
    Open,
    /// 403 `AGENT_NOT_ALLOWED`.
    Refuse,
    /// This rule; its `agent_budget` is shared by every unmatched agent of a session.
    Pool(AgentRule),
}

#[derive(Debug, Clone)]
pub struct AgentRule {
    pub pattern: IdPattern,
    pub agent_budget: Option<Amount>,
    pub max_per_request: Option<Amount>,
    pub allowed: Option<Vec<Glob>>,
    pub blocked: Option<Vec<Glob>>,
    pub inherit_parent: bool,
    /// false: the agent reads and writes only its own cache entries.
    pub inherit_cache: bool,
    pub repeat: Option<crate::core::breaker::RepeatRule>,
    /// Each matching agent's spend-rate limit.
    pub spend_rate: Option<crate::core::spend_rate::RateRule>,
}

/// A glob over agent ids (`executor-*`), case-sensitive.
#[derive(Debug, Clone)]
pub struct IdPattern {
    source: String,
    prefix: String,
    rest: Option<Vec<String>>,
}

impl IdPattern {
    pub fn new(pattern: &str) -> Result<IdPattern, String> {
        if pattern.is_empty() {
            return Err("empty agent pattern".to_string());
        }
        let valid = pattern.bytes().all(|b| {
            b == b'*' || b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')
        });
        if !valid {
            return Err(format!(
                "agent pattern {pattern:?} has characters an agent id cannot have"
            ));
        }
        let mut parts = pattern.split('*');
        let prefix = parts.next().unwrap_or("").to_string();
        let rest: Vec<String> = parts.map(str::to_string).collect();
        Ok(IdPattern {
            source: pattern.to_string(),
            prefix,
            rest: if rest.is_empty() { None } else { Some(rest) },
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, id: &str) -> bool {
        let Some(rest_pieces) = &self.rest else {
            return id == self.prefix;
        };
        let Some(mut rest) = id.strip_prefix(self.prefix.as_str()) else {
            return false;
        };
        let last = rest_pieces.len() - 1;
        for (i, piece) in rest_pieces.iter().enumerate() {
            if i == last {
                return rest.ends_with(piece.as_str());
            }
            match rest.find(piece.as_str()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        true
    }
}

/// The refusal for an agent no pattern matches under `unmatchedAgents: "refuse"`.
pub fn unmatched_agent(agent: &str) -> Refusal {
    Refusal::new(
        ErrorCode::AgentNotAllowed,
        format!("agent {agent:?} matches no agent pattern of the policy, and unmatched agents are refused"),
    )
    .with_fields(vec![("agent", agent.to_string())])
}

/// Under `unpricedRoutes: "refuse"`, a call no price applies to is refused: a paid
/// API's path that the configuration forgot must not be free.
pub fn check_priced(policy: &Policy, call: &crate::core::call::Call) -> Result<(), Refusal> {
    if policy.refuse_unpriced && !call.priced {
        return Err(Refusal::new(
            ErrorCode::EndpointNotAllowed,
            format!(
                "no price is set for {} and the policy refuses unpriced routes (unpricedRoutes: \"refuse\"); give the route a price (\"0\" for a free one)",
                call.endpoint
            ),
        )
        .with_fields(vec![("endpoint", call.endpoint.clone()), ("level", "session".to_string())]));
    }
    Ok(())
}

impl Policy {
    /// The first agent rule (in file order) whose pattern matches the agent id.
    pub fn matched_rule(&self, agent_id: &str) -> Option<&AgentRule> {
        self.agents
            .iter()
            .find(|rule| rule.pattern.matches(agent_id))
    }

    /// The rule that applies to an agent: the first pattern that matches, else the
    /// rule for unmatched agents.
    pub fn agent_rule(&self, agent_id: &str) -> Option<&AgentRule> {
        self.matched_rule(agent_id).or(match &self.unmatched {
            Unmatched::Pool(rule) => Some(rule),
            _ => None,
        })
    }

    /// The repeat breaker over an agent: its rule's own, else the policy's.
    pub fn repeat_rule(&self, agent_id: &str) -> Option<&crate::core::breaker::RepeatRule> {
        self.agent_rule(agent_id)
            .and_then(|r| r.repeat.as_ref())
            .or(self.repeat.as_ref())
    }

    /// Whether the agent is refused: no pattern matches and unmatched agents are.
    pub fn refuses_agent(&self, agent_id: &str) -> bool {
        matches!(self.unmatched, Unmatched::Refuse) && self.matched_rule(agent_id).is_none()
    }

    /// The agent budget a call of this agent counts against: the agent's own (key: its
    /// id) or the pool of unmatched agents (key: [`POOL`]), with its limit.
    pub fn agent_budget<'a>(&self, agent_id: &'a str) -> Option<(&'a str, Amount)> {
        match self.matched_rule(agent_id) {
            Some(rule) => rule.agent_budget.map(|limit| (agent_id, limit)),
            None => match &self.unmatched {
                Unmatched::Pool(rule) => rule.agent_budget.map(|limit| (POOL, limit)),
                _ => None,
            },
        }
    }

    /// The limit of an agent budget by its key (see [`Policy::agent_budget`]).
    pub fn budget_limit(&self, key: &str) -> Option<Amount> {
        if key == POOL {
            return match &self.unmatched {
                Unmatched::Pool(rule) => rule.agent_budget,
                _ => None,
            };
        }
        self.matched_rule(key).and_then(|rule| rule.agent_budget)
    }

    /// The role label of an agent for metrics: its role when a pattern matched it,
    /// else `other` (agent ids come from clients; metric labels must not).
    pub fn metric_role<'a>(&self, agent_id: &'a str) -> &'a str {
        if self.matched_rule(agent_id).is_some() {
            crate::core::identity::role(agent_id)
        } else {
            "other"
        }
    }
}

/// The tightest per-request cap on a call of this agent, and whose it is (agent first
/// when equal).
pub fn per_request_cap(policy: &Policy, agent: Option<&AgentRule>) -> Option<(Amount, Scope)> {
    let inherit = agent.is_none_or(|a| a.inherit_parent);
    let session_cap = if inherit {
        policy.max_per_request
    } else {
        None
    };
    let agent_cap = agent.and_then(|a| a.max_per_request);
    [(agent_cap, Scope::Agent), (session_cap, Scope::Session)]
        .iter()
        .filter_map(|(cap, scope)| cap.map(|c| (c, *scope)))
        .min_by_key(|(cap, _)| *cap)
}

/// Endpoint lists and per-request caps for one call, before any budget is touched.
/// Blocked patterns win over allowed ones; an absent allow list allows everything.
pub fn check_rules(
    policy: &Policy,
    agent: Option<&AgentRule>,
    endpoint: &str,
    price: Amount,
) -> Result<(), Refusal> {
    let inherit = agent.is_none_or(|a| a.inherit_parent);
    // Session-level rules apply unless the agent replaces them.
    if inherit {
        check_lists(&policy.allowed, &policy.blocked, endpoint, "session")?;
    }
    if let Some(rule) = agent {
        let allowed = rule.allowed.as_deref().unwrap_or(&[]);
        let blocked = rule.blocked.as_deref().unwrap_or(&[]);
        check_lists(allowed, blocked, endpoint, "agent")?;
    }
    if let Some((cap, scope)) = per_request_cap(policy, agent) {
        if price > cap {
            let mut refusal = Refusal::budget(BudgetDetails {
                scope,
                limit: cap,
                spent: 0,
                reserved: 0,
                requested: price,
            });
            refusal.code = ErrorCode::PerRequestLimitExceeded;
            refusal.message = format!(
                "price {price} is above the {} per-request limit {cap}",
                scope.as_str()
            );
            return Err(refusal);
        }
    }
    Ok(())
}

fn check_lists(
    allowed: &[Glob],
    blocked: &[Glob],
    endpoint: &str,
    level: &'static str,
) -> Result<(), Refusal> {
    if let Some(pattern) = blocked.iter().find(|g| g.matches(endpoint)) {
        return Err(Refusal::new(
            ErrorCode::EndpointBlocked,
            format!("endpoint {endpoint} is blocked by the {level} policy"),
        )
        .with_fields(vec![
            ("endpoint", endpoint.to_string()),
            ("pattern", pattern.source().to_string()),
            ("level", level.to_string()),
        ]));
    }
    if !allowed.is_empty() && !any_match(allowed, endpoint) {
        return Err(Refusal::new(
            ErrorCode::EndpointNotAllowed,
            format!("endpoint {endpoint} is not on the {level} allow list"),
        )
        .with_fields(vec![
            ("endpoint", endpoint.to_string()),
            ("level", level.to_string()),
        ]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(list: &[&str]) -> Vec<Glob> {
        list.iter().map(|p| Glob::new(p).unwrap()).collect()
    }

    fn policy() -> Policy {
        Policy {
            name: "p".into(),
            session_budget: Some(5_000_000),
            daily_budget: None,
            monthly_budget: None,
            max_per_request: Some(500_000),
            allowed: globs(&["api.openai.com/*", "api.tavily.com/*", "api.exa.ai/*"]),
            blocked: globs(&["api.openai.com/v1/images/*"]),
            alert_ppm: None,
            kill_ppm: None,
            charge_on: ChargeOn::Success,
            unmatched: Unmatched::Open,
            refuse_unpriced: false,
            payments: crate::core::payments::PaymentRules::default(),
            pay_x402: false,
            approval: None,
            repeat: None,
            spend_rate: None,
            x402_repeat: None,
            agents: vec![
                AgentRule {
                    pattern: IdPattern::new("reviewer-*").unwrap(),
                    agent_budget: Some(500_000),
                    max_per_request: Some(100_000),
                    allowed: Some(globs(&["api.tavily.com/*"])),
                    blocked: None,
                    inherit_parent: true,
                    inherit_cache: true,
                    repeat: None,
                    spend_rate: None,
                },
                AgentRule {
                    pattern: IdPattern::new("scout-*").unwrap(),
                    agent_budget: None,
                    max_per_request: None,
                    allowed: Some(globs(&["api.deepl.com/*"])),
                    blocked: None,
                    inherit_parent: false,
                    inherit_cache: true,
                    repeat: None,
                    spend_rate: None,
                },
            ],
        }
    }

    fn code(r: Result<(), Refusal>) -> Option<&'static str> {
        r.err().map(|e| e.code.as_str())
    }

    #[test]
    fn id_patterns() {
        let p = IdPattern::new("executor-*").unwrap();
        assert!(p.matches("executor-1"));
        assert!(p.matches("executor-"));
        assert!(!p.matches("executor"));
        assert!(!p.matches("Executor-1"));
        assert!(IdPattern::new("main").unwrap().matches("main"));
        assert!(!IdPattern::new("main").unwrap().matches("main-2"));
        assert!(IdPattern::new("*-x-*").unwrap().matches("a-x-b"));
        assert!(IdPattern::new("a/b").is_err());
    }

    #[test]
    fn blocked_wins_over_allowed() {
        let p = policy();
        assert_eq!(
            code(check_rules(&p, None, "api.openai.com/v1/images/gen", 1)),
            Some("ENDPOINT_BLOCKED")
        );
        assert_eq!(
            code(check_rules(&p, None, "api.openai.com/v1/chat", 1)),
            None
        );
        assert_eq!(
            code(check_rules(&p, None, "api.deepl.com/v2/translate", 1)),
            Some("ENDPOINT_NOT_ALLOWED")
        );
    }

    #[test]
    fn inheriting_agent_only_narrows() {
        let p = policy();
        let reviewer = p.agent_rule("reviewer-1");
        assert_eq!(
            code(check_rules(&p, reviewer, "api.tavily.com/search", 1)),
            None
        );
        assert_eq!(
            code(check_rules(&p, reviewer, "api.openai.com/v1/chat", 1)),
            Some("ENDPOINT_NOT_ALLOWED")
        );
        let r = check_rules(&p, reviewer, "api.tavily.com/search", 150_000).unwrap_err();
        assert_eq!(r.code.as_str(), "PER_REQUEST_LIMIT_EXCEEDED");
        assert!(r.to_json().contains("\"scope\":\"agent\""));
    }

    #[test]
    fn non_inheriting_agent_replaces_the_lists_and_cap() {
        let p = policy();
        let scout = p.agent_rule("scout-1");
        assert_eq!(
            code(check_rules(
                &p,
                scout,
                "api.deepl.com/v2/translate",
                900_000
            )),
            None
        );
        assert_eq!(
            code(check_rules(&p, scout, "api.openai.com/v1/chat", 1)),
            Some("ENDPOINT_NOT_ALLOWED")
        );
    }

    #[test]
    fn session_cap_applies_to_unmatched_agents() {
        let p = policy();
        let r = check_rules(
            &p,
            p.agent_rule("executor-1"),
            "api.openai.com/v1/chat",
            500_001,
        )
        .unwrap_err();
        assert_eq!(r.code, ErrorCode::PerRequestLimitExceeded);
        assert!(r.to_json().contains("\"scope\":\"session\""));
        assert!(check_rules(&p, None, "api.openai.com/v1/chat", 500_000).is_ok());
    }
}
