//! Response headers that tell the agent where it stands, as RFC 8941 dictionaries.

use crate::core::amount::{reaches, Amount};
use crate::core::errors::Scope;

/// One budget scope as seen after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeState {
    pub scope: Scope,
    pub limit: Amount,
    pub spent: Amount,
    pub reserved: Amount,
}

impl ScopeState {
    pub fn remaining(&self) -> Amount {
        self.limit
            .saturating_sub(self.spent.saturating_add(self.reserved))
    }

    pub fn used(&self) -> Amount {
        self.spent.saturating_add(self.reserved)
    }
}

/// The budgets that apply to a call, most specific first, and the alert threshold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetView {
    pub scopes: Vec<ScopeState>,
    pub alert_ppm: Option<u64>,
}

impl BudgetView {
    /// `x-pag0-budget-remaining`: `session=4200000, agent=1800000, daily=19000000`.
    /// Session first, as in the contract's example; then agent, daily, monthly.
    pub fn remaining_header(&self) -> String {
        let order = [Scope::Session, Scope::Agent, Scope::Daily, Scope::Monthly];
        let mut out = String::with_capacity(24 * self.scopes.len());
        for scope in order {
            if let Some(s) = self.scopes.iter().find(|s| s.scope == scope) {
                if !out.is_empty() {
                    out.push_str(", ");
                }
                out.push_str(scope.as_str());
                out.push('=');
                crate::core::store::push_decimal(&mut out, s.remaining());
            }
        }
        out
    }

    /// `x-pag0-budget-alert`: the scopes whose utilization (spent + reserved over limit)
    /// has reached the alert threshold, e.g. `session=0.72`. `None` when none has.
    pub fn alert_header(&self) -> Option<String> {
        let ppm = self.alert_ppm?;
        if !self.scopes.iter().any(|s| reaches(s.used(), s.limit, ppm)) {
            return None;
        }
        let order = [Scope::Session, Scope::Agent, Scope::Daily, Scope::Monthly];
        let mut parts = Vec::new();
        for scope in order {
            if let Some(s) = self.scopes.iter().find(|s| s.scope == scope) {
                if reaches(s.used(), s.limit, ppm) {
                    parts.push(format!("{}={}", scope.as_str(), decimal(s.used(), s.limit)));
                }
            }
        }
        if parts.is_empty() {
            None
        } else {
            Some(parts.join(", "))
        }
    }
}

/// `used / limit` as an RFC 8941 decimal with up to 3 fractional digits, rounded down
/// so that an alert never shows more than was used.
pub fn decimal(used: Amount, limit: Amount) -> String {
    if limit == 0 {
        return "1.0".to_string();
    }
    let thousandths = (u128::from(used) * 1000 / u128::from(limit)).min(999_999_999) as u64;
    let whole = thousandths / 1000;
    let frac = thousandths % 1000;
    let mut text = format!("{whole}.{frac:03}");
    while text.ends_with('0') && !text.ends_with(".0") {
        text.pop();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(scope: Scope, limit: u64, spent: u64, reserved: u64) -> ScopeState {
        ScopeState {
            scope,
            limit,
            spent,
            reserved,
        }
    }

    #[test]
    fn remaining_is_a_dictionary_session_first() {
        let view = BudgetView {
            scopes: vec![
                state(Scope::Agent, 2_000_000, 200_000, 0),
                state(Scope::Session, 5_000_000, 700_000, 100_000),
                state(Scope::Daily, 20_000_000, 1_000_000, 0),
            ],
            alert_ppm: Some(700_000),
        };
        assert_eq!(
            view.remaining_header(),
            "session=4200000, agent=1800000, daily=19000000"
        );
        assert_eq!(view.alert_header(), None);
    }

    #[test]
    fn alert_names_scopes_past_the_threshold() {
        let view = BudgetView {
            scopes: vec![
                state(Scope::Session, 5_000_000, 3_600_000, 0),
                state(Scope::Agent, 1_000_000, 100, 0),
            ],
            alert_ppm: Some(700_000),
        };
        assert_eq!(view.alert_header().as_deref(), Some("session=0.72"));
    }

    #[test]
    fn decimals() {
        assert_eq!(decimal(0, 10), "0.0");
        assert_eq!(decimal(7, 10), "0.7");
        assert_eq!(decimal(10, 10), "1.0");
        assert_eq!(decimal(2, 3), "0.666");
        assert_eq!(decimal(u64::MAX, 1), "999999.999");
    }
}
