//! Local replies: every refusal is rendered here, with the contract's body and headers
//! (or, on a metered LLM route, the API's own error shape), and the budgets.

use proxy_wasm::types::LogLevel;

use crate::core::errors::Refusal;
use crate::core::headers::BudgetView;
use crate::host::{abi, log};

/// The body shape of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    #[default]
    Pag0,
    Anthropic,
    OpenAi,
}

/// Sends the refusal: status, JSON body, `x-pag0-error`, cost 0 and the budgets.
pub fn send_refusal(refusal: &Refusal, view: &BudgetView, shape: Shape, extra: &[(&str, &str)]) {
    let body = match shape {
        Shape::Pag0 => refusal.to_json(),
        Shape::Anthropic => refusal.to_anthropic_json(),
        Shape::OpenAi => refusal.to_openai_json(),
    };
    let remaining = view.remaining_header();
    let alert = view.alert_header();
    let retry_after = refusal.retry_after.map(|s| s.to_string());
    let charged = refusal.charged.to_string();
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("content-type", b"application/json"),
        ("x-pag0-error", refusal.code.as_str().as_bytes()),
        ("x-pag0-cost", charged.as_bytes()),
    ];
    if !remaining.is_empty() {
        headers.push(("x-pag0-budget-remaining", remaining.as_bytes()));
    }
    if let Some(alert) = &alert {
        headers.push(("x-pag0-budget-alert", alert.as_bytes()));
    }
    if let Some(seconds) = &retry_after {
        headers.push(("retry-after", seconds.as_bytes()));
    }
    for (k, v) in extra {
        headers.push((k, v.as_bytes()));
    }
    send_local(refusal.status(), &headers, body.as_bytes());
}

/// Sends a local answer (the report API, the dashboard, a cache hit, a paid answer).
pub fn send_local(status: u32, headers: &[(&str, &[u8])], body: &[u8]) {
    if let Err(e) = abi::send_local(status, headers, body) {
        log(LogLevel::Error, &format!("pag0: cannot send answer: {e:?}"));
    }
}
