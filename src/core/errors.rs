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
            | ErrorCode::PaymentNotAllowed => 403,
            ErrorCode::PaymentFailed | ErrorCode::UpstreamError => 502,
            ErrorCode::SignerUnavailable | ErrorCode::CapacityExceeded => 503,
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
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            details: Details::None,
        }
    }

    pub fn with_fields(mut self, fields: Vec<(&'static str, String)>) -> Refusal {
        self.details = Details::Fields(fields);
        self
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
        }
    }

    pub fn status(&self) -> u32 {
        self.code.status()
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
    fn every_code_has_its_contract_status() {
        assert_eq!(ErrorCode::InvalidRequest.status(), 400);
        assert_eq!(ErrorCode::Unauthorized.status(), 401);
        assert_eq!(ErrorCode::KillSwitchActive.status(), 403);
        assert_eq!(ErrorCode::PaymentFailed.status(), 502);
        assert_eq!(ErrorCode::SignerUnavailable.status(), 503);
        assert_eq!(ErrorCode::ApprovalTimeout.status(), 504);
    }
}
