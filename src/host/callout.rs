//! Every dispatched HTTP call goes through here: headers, timeout, and what counts as
//! failure (any non-2xx, Envoy's synthetic 503/504 included).

use std::time::Duration;

use proxy_wasm::traits::Context;
use proxy_wasm::types::Status;

use crate::core::compile::AlertSink;

/// POSTs a JSON body. The answer comes back to the caller's `on_http_call_response`.
pub fn post_json(ctx: &dyn Context, sink: &AlertSink, body: &str) -> Result<u32, Status> {
    ctx.dispatch_http_call(
        &sink.cluster,
        vec![
            (":method", "POST"),
            (":path", &sink.path),
            (":authority", &sink.authority),
            ("content-type", "application/json"),
        ],
        Some(body.as_bytes()),
        vec![],
        Duration::from_millis(sink.timeout_ms),
    )
}

/// A callout answer's status, from its `:status` header; `None` when missing.
pub fn response_status(ctx: &dyn Context) -> Option<u32> {
    ctx.get_http_call_response_header(":status")
        .and_then(|s| s.parse().ok())
}

pub fn succeeded(status: Option<u32>) -> bool {
    status.is_some_and(|s| (200..300).contains(&s))
}
