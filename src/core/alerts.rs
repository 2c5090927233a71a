//! Alerts to the webhook: a budget's alert threshold crossed, a budget exhausted, a
//! kill switch thrown. Each goes out once per scope (per window for day and month):
//! the flag is set in the same CAS write that sees the crossing, so when two workers
//! cross at the same moment only the one whose write sticks sends it.

use crate::core::amount::{reaches, utilization, Amount};
use crate::core::errors::Scope;
use crate::core::ledger::{ALERT_EXHAUSTED, ALERT_KILL, ALERT_THRESHOLD};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    ThresholdCrossed,
    BudgetExhausted,
    KillSwitch,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::ThresholdCrossed => "threshold_crossed",
            AlertKind::BudgetExhausted => "budget_exhausted",
            AlertKind::KillSwitch => "kill_switch",
        }
    }

    fn flag(self) -> u8 {
        match self {
            AlertKind::ThresholdCrossed => ALERT_THRESHOLD,
            AlertKind::BudgetExhausted => ALERT_EXHAUSTED,
            AlertKind::KillSwitch => ALERT_KILL,
        }
    }
}

/// An alert about one scope; tenant and session are filled in by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeAlert {
    pub kind: AlertKind,
    pub scope: Scope,
    pub agent: Option<String>,
    pub spent: Amount,
    pub limit: Amount,
    /// `manual` for a kill switch thrown through the API.
    pub reason: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub tenant: String,
    pub session: String,
    pub at: u64,
    pub alert: ScopeAlert,
}

impl Alert {
    pub fn to_json(&self) -> String {
        let a = &self.alert;
        let mut body = serde_json::json!({
            "type": a.kind.as_str(),
            "tenant": self.tenant,
            "session": self.session,
            "agent": a.agent,
            "scope": a.scope.as_str(),
            "spent": a.spent.to_string(),
            "limit": a.limit.to_string(),
            "utilization": utilization(a.spent, a.limit),
            "timestamp": self.at,
        });
        if let (Some(reason), Some(map)) = (a.reason, body.as_object_mut()) {
            map.insert("reason".into(), serde_json::Value::String(reason.into()));
        }
        body.to_string()
    }
}

/// Raises `kind` once: returns the alert if its flag was not yet set, and sets it.
pub fn raise_once(
    flags: &mut u8,
    kind: AlertKind,
    scope: Scope,
    agent: Option<&str>,
    spent: Amount,
    limit: Amount,
) -> Option<ScopeAlert> {
    if *flags & kind.flag() != 0 {
        return None;
    }
    *flags |= kind.flag();
    Some(ScopeAlert {
        kind,
        scope,
        agent: agent.map(str::to_string),
        spent,
        limit,
        reason: None,
    })
}

/// Alerts due after a scope's spend changed: threshold crossed, exhausted, and (for
/// the session) the kill switch threshold reached.
pub fn after_spend(
    flags: &mut u8,
    scope: Scope,
    agent: Option<&str>,
    spent: Amount,
    limit: Amount,
    alert_ppm: Option<u64>,
    kill_ppm: Option<u64>,
) -> Vec<ScopeAlert> {
    let mut out = Vec::new();
    if alert_ppm.is_some_and(|ppm| reaches(spent, limit, ppm)) {
        out.extend(raise_once(
            flags,
            AlertKind::ThresholdCrossed,
            scope,
            agent,
            spent,
            limit,
        ));
    }
    if kill_ppm.is_some_and(|ppm| reaches(spent, limit, ppm)) {
        out.extend(raise_once(
            flags,
            AlertKind::KillSwitch,
            scope,
            agent,
            spent,
            limit,
        ));
    }
    if spent >= limit {
        out.extend(raise_once(
            flags,
            AlertKind::BudgetExhausted,
            scope,
            agent,
            spent,
            limit,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_alert_goes_out_once() {
        let mut flags = 0;
        let a = after_spend(
            &mut flags,
            Scope::Session,
            None,
            3_500_000,
            5_000_000,
            Some(700_000),
            Some(900_000),
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, AlertKind::ThresholdCrossed);
        assert!(after_spend(
            &mut flags,
            Scope::Session,
            None,
            3_600_000,
            5_000_000,
            Some(700_000),
            Some(900_000)
        )
        .is_empty());
        let k = after_spend(
            &mut flags,
            Scope::Session,
            None,
            4_500_000,
            5_000_000,
            Some(700_000),
            Some(900_000),
        );
        assert_eq!(
            k.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AlertKind::KillSwitch]
        );
        let e = after_spend(
            &mut flags,
            Scope::Session,
            None,
            5_000_000,
            5_000_000,
            Some(700_000),
            Some(900_000),
        );
        assert_eq!(
            e.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AlertKind::BudgetExhausted]
        );
    }

    #[test]
    fn json_has_the_contract_fields() {
        let alert = Alert {
            tenant: "demo".into(),
            session: "s".into(),
            at: 1,
            alert: ScopeAlert {
                kind: AlertKind::ThresholdCrossed,
                scope: Scope::Agent,
                agent: Some("ralph-1".into()),
                spent: 2_100_000,
                limit: 3_000_000,
                reason: None,
            },
        };
        let v: serde_json::Value = serde_json::from_str(&alert.to_json()).unwrap();
        assert_eq!(v["type"], "threshold_crossed");
        assert_eq!(v["scope"], "agent");
        assert_eq!(v["agent"], "ralph-1");
        assert_eq!(v["spent"], "2100000");
        assert_eq!(v["limit"], "3000000");
        assert!((v["utilization"].as_f64().unwrap() - 0.7).abs() < 1e-9);
    }
}
