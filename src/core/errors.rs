//! Refusals as values, with the codes of the contract, rendered to HTTP in one place.

use crate::core::amount::Amount;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    EndpointBlocked,
    EndpointNotAllowed,
    PerRequestLimitExceeded,
    AgentBudgetExceeded,
    SessionBudgetExceeded,
    DailyBudgetExceeded,
    MonthlyBudgetExceeded,
    KillSwitchActive,
    ApprovalDenied,
    PaymentNotAllowed,
    PaymentFailed,
    UpstreamError,
    SignerUnavailable,
    ApprovalTimeout,
    /// The fixed session table (or an agent list) is full: fail closed.
    CapacityExceeded,
    /// Route metadata names an unknown policy or a bad price: fail closed.
    ConfigError,
    /// The ledger could not be updated (corrupt record, endless contention).
    InternalError,
    /// Report API: no such session (or not this tenant's).
    NotFound,
    /// Report API: wrong method for the path.
    MethodNotAllowed,
    /// An agent no pattern matches, under `unmatchedAgents: "refuse"`.
    AgentNotAllowed,
    /// A payment whose outcome is unknown (sent, no settlement): charged, flagged.
    PaymentUnconfirmed,
    /// A metered LLM route, a model the price table does not price.
    ModelNotPriced,
    /// The same request again and again (the repeat breaker).
    LoopDetected,
    /// Spend per minute above the policy's rate limit.
    SpendRateExceeded,
    /// The external ledger cannot be reached in time: priced calls fail closed.
    LedgerUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::EndpointBlocked => "ENDPOINT_BLOCKED",
            ErrorCode::EndpointNotAllowed => "ENDPOINT_NOT_ALLOWED",
            ErrorCode::PerRequestLimitExceeded => "PER_REQUEST_LIMIT_EXCEEDED",
            ErrorCode::AgentBudgetExceeded => "AGENT_BUDGET_EXCEEDED",
            ErrorCode::SessionBudgetExceeded => "SESSION_BUDGET_EXCEEDED",
            ErrorCode::DailyBudgetExceeded => "DAILY_BUDGET_EXCEEDED",
            ErrorCode::MonthlyBudgetExceeded => "MONTHLY_BUDGET_EXCEEDED",
            ErrorCode::KillSwitchActive => "KILL_SWITCH_ACTIVE",
            ErrorCode::ApprovalDenied => "APPROVAL_DENIED",
            ErrorCode::PaymentNotAllowed => "PAYMENT_NOT_ALLOWED",
            ErrorCode::PaymentFailed => "PAYMENT_FAILED",
            ErrorCode::UpstreamError => "UPSTREAM_ERROR",
            ErrorCode::SignerUnavailable => "SIGNER_UNAVAILABLE",
            ErrorCode::ApprovalTimeout => "APPROVAL_TIMEOUT",
            ErrorCode::CapacityExceeded => "CAPACITY_EXCEEDED",
            ErrorCode::ConfigError => "CONFIG_ERROR",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::AgentNotAllowed => "AGENT_NOT_ALLOWED",
            ErrorCode::PaymentUnconfirmed => "PAYMENT_UNCONFIRMED",
            ErrorCode::ModelNotPriced => "MODEL_NOT_PRICED",
            ErrorCode::LoopDetected => "LOOP_DETECTED",
            ErrorCode::SpendRateExceeded => "SPEND_RATE_EXCEEDED",
            ErrorCode::LedgerUnavailable => "LEDGER_UNAVAILABLE",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::EndpointBlocked
            | ErrorCode::EndpointNotAllowed
            | ErrorCode::PerRequestLimitExceeded
            | ErrorCode::AgentBudgetExceeded
            | ErrorCode::SessionBudgetExceeded
            | ErrorCode::DailyBudgetExceeded
            | ErrorCode::MonthlyBudgetExceeded
            | ErrorCode::KillSwitchActive
            | ErrorCode::ApprovalDenied
            | ErrorCode::PaymentNotAllowed
            | ErrorCode::AgentNotAllowed
            | ErrorCode::ModelNotPriced => 403,
            ErrorCode::LoopDetected | ErrorCode::SpendRateExceeded => 429,
            ErrorCode::PaymentFailed | ErrorCode::UpstreamError | ErrorCode::PaymentUnconfirmed => {
                502
            }
            ErrorCode::SignerUnavailable
            | ErrorCode::CapacityExceeded
            | ErrorCode::LedgerUnavailable => 503,
            ErrorCode::ApprovalTimeout => 504,
            ErrorCode::ConfigError | ErrorCode::InternalError => 500,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
        }
    }
}

/// A budget scope, most specific first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Agent,
    Session,
    Daily,
    Monthly,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Agent => "agent",
            Scope::Session => "session",
            Scope::Daily => "daily",
            Scope::Monthly => "monthly",
        }
    }

    pub fn exceeded_code(self) -> ErrorCode {
        match self {
            Scope::Agent => ErrorCode::AgentBudgetExceeded,
            Scope::Session => ErrorCode::SessionBudgetExceeded,
            Scope::Daily => ErrorCode::DailyBudgetExceeded,
            Scope::Monthly => ErrorCode::MonthlyBudgetExceeded,
        }
    }
}

/// `details` of a budget refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetDetails {
    pub scope: Scope,
    pub limit: Amount,
    pub spent: Amount,
    pub reserved: Amount,
    pub requested: Amount,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Details {
    None,
    Budget(BudgetDetails),
    /// Free-form string fields, e.g. `endpoint`, `pattern`, `header`.
    Fields(Vec<(&'static str, String)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    pub details: Details,
    /// A status other than the code's own (413 for a body too large to keep).
    pub status: Option<u32>,
    /// Seconds after which trying again can help (`Retry-After`).
    pub retry_after: Option<u64>,
    /// What the call was charged although it is answered with this error (an unknown
    /// payment outcome stays charged): `x-pag0-cost`.
    pub charged: Amount,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            details: Details::None,
            status: None,
            retry_after: None,
            charged: 0,
        }
    }

    pub fn with_charged(mut self, amount: Amount) -> Refusal {
        self.charged = amount;
        self
    }

    pub fn with_status(mut self, status: u32) -> Refusal {
        self.status = Some(status);
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Refusal {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with_fields(mut self, fields: Vec<(&'static str, String)>) -> Refusal {
        self.details = Details::Fields(fields);
        self
    }

    /// A free-form detail field, when the refusal has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        match &self.details {
            Details::Fields(fields) => fields
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    pub fn budget(details: BudgetDetails) -> Refusal {
        let message = format!(
            "{} budget exceeded: limit {}, spent {}, reserved {}, requested {}",
            details.scope.as_str(),
            details.limit,
            details.spent,
            details.reserved,
            details.requested
        );
        Refusal {
            code: details.scope.exceeded_code(),
            message,
            details: Details::Budget(details),
            status: None,
            retry_after: None,
            charged: 0,
        }
    }

    pub fn status(&self) -> u32 {
        self.status.unwrap_or_else(|| self.code.status())
    }

    /// The message a client of an LLM API shows: pag0's reason and its code.
    fn api_message(&self) -> String {
        format!("pag0: {} ({})", self.message, self.code.as_str())
    }

    fn is_budget(&self) -> bool {
        matches!(self.details, Details::Budget(_))
            || matches!(
                self.code,
                ErrorCode::KillSwitchActive | ErrorCode::SpendRateExceeded
            )
    }

    /// The refusal in the Anthropic Messages API's error shape (metered routes), so
    /// the agent's client shows pag0's reason; pag0's own body rides along in `pag0`.
    pub fn to_anthropic_json(&self) -> String {
        let kind = match self.status() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        };
        let own: serde_json::Value = serde_json::from_str(&self.to_json()).unwrap_or_default();
        serde_json::json!({
            "type": "error",
            "error": {"type": kind, "message": self.api_message()},
            "pag0": own["error"],
        })
        .to_string()
    }

    /// The refusal in the OpenAI API's error shape (metered routes).
    pub fn to_openai_json(&self) -> String {
        let kind = match self.status() {
            400 | 413 => "invalid_request_error",
            401 => "authentication_error",
            403 if self.is_budget() => "insufficient_quota",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "server_error",
        };
        let own: serde_json::Value = serde_json::from_str(&self.to_json()).unwrap_or_default();
        serde_json::json!({
            "error": {"message": self.api_message(), "type": kind, "param": null, "code": self.code.as_str()},
            "pag0": own["error"],
        })
        .to_string()
    }

    /// The JSON body: `{"error": {"code", "message", "details"}}`, amounts as strings.
    pub fn to_json(&self) -> String {
        let details = match &self.details {
            Details::None => serde_json::Value::Object(serde_json::Map::new()),
            Details::Budget(b) => serde_json::json!({
                "scope": b.scope.as_str(),
                "limit": b.limit.to_string(),
                "spent": b.spent.to_string(),
                "reserved": b.reserved.to_string(),
                "requested": b.requested.to_string(),
            }),
            Details::Fields(fields) => {
                let mut map = serde_json::Map::new();
                for (k, v) in fields {
                    map.insert((*k).to_string(), serde_json::Value::String(v.clone()));
                }
                serde_json::Value::Object(map)
            }
        };
        serde_json::json!({
            "error": {"code": self.code.as_str(), "message": self.message, "details": details}
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refusal_renders_the_contract_body() {
        let r = Refusal::budget(BudgetDetails {
            scope: Scope::Agent,
            limit: 3_000_000,
            spent: 3_000_000,
            reserved: 0,
            requested: 150_000,
        });
        assert_eq!(r.status(), 403);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "AGENT_BUDGET_EXCEEDED");
        assert_eq!(v["error"]["details"]["scope"], "agent");
        assert_eq!(v["error"]["details"]["limit"], "3000000");
        assert_eq!(v["error"]["details"]["requested"], "150000");
    }

    #[test]
    fn metered_routes_answer_in_the_apis_own_error_shape() {
        let r = Refusal::budget(BudgetDetails {
            scope: Scope::Agent,
            limit: 3,
            spent: 3,
            reserved: 0,
            requested: 1,
        });
        let a: serde_json::Value = serde_json::from_str(&r.to_anthropic_json()).unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "permission_error");
        assert!(a["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("(AGENT_BUDGET_EXCEEDED)"));
        let o: serde_json::Value = serde_json::from_str(&r.to_openai_json()).unwrap();
        assert_eq!(o["error"]["code"], "AGENT_BUDGET_EXCEEDED");
        assert_eq!(o["error"]["type"], "insufficient_quota");
        assert_eq!(o["pag0"]["details"]["limit"], "3");
    }

    #[test]
    fn every_code_has_its_contract_status() {
        assert_eq!(ErrorCode::InvalidRequest.status(), 400);
        assert_eq!(ErrorCode::Unauthorized.status(), 401);
        assert_eq!(ErrorCode::KillSwitchActive.status(), 403);
        assert_eq!(ErrorCode::PaymentFailed.status(), 502);
        assert_eq!(ErrorCode::SignerUnavailable.status(), 503);
        assert_eq!(ErrorCode::ApprovalTimeout.status(), 504);
    }
}
