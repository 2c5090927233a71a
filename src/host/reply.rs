//! Local replies: every refusal is rendered here, with the contract's body and headers.

use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

use crate::core::errors::Refusal;
use crate::core::headers::BudgetView;
use crate::host::log;

/// Sends the refusal: status, JSON body, `x-pag0-error`, cost 0 and the budgets.
pub fn send_refusal(refusal: &Refusal, view: &BudgetView) {
    let body = refusal.to_json();
    let remaining = view.remaining_header();
    let alert = view.alert_header();
    let mut headers: Vec<(&str, &str)> = vec![
        ("content-type", "application/json"),
        ("x-pag0-error", refusal.code.as_str()),
        ("x-pag0-cost", "0"),
    ];
    if !remaining.is_empty() {
        headers.push(("x-pag0-budget-remaining", &remaining));
    }
    if let Some(alert) = &alert {
        headers.push(("x-pag0-budget-alert", alert));
    }
    if let Err(status) =
        hostcalls::send_http_response(refusal.status(), headers, Some(body.as_bytes()))
    {
        log(
            LogLevel::Error,
            &format!("pag0: cannot send refusal: {status:?}"),
        );
    }
}

/// Sends a local answer (the report API, the dashboard).
pub fn send_local(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
    if let Err(e) = hostcalls::send_http_response(status, headers, Some(body)) {
        log(LogLevel::Error, &format!("pag0: cannot send answer: {e:?}"));
    }
}
