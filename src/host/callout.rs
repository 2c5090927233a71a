//! Every dispatched HTTP call goes through here: headers, timeout, and what counts as
//! failure (any non-2xx, Envoy's synthetic 503/504 included).

use std::time::Duration;

use proxy_wasm::traits::Context;
use proxy_wasm::types::Status;

/// Sends a call. The answer comes back to the caller's `on_http_call_response`.
pub fn send(
    ctx: &dyn Context,
    cluster: &str,
    method: &str,
    path: &str,
    authority: &str,
    body: Option<(&str, &[u8])>,
    timeout_ms: u64,
) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", authority),
    ];
    if let Some((content_type, _)) = body {
        headers.push(("content-type", content_type));
    }
    ctx.dispatch_http_call(
        cluster,
        headers,
        body.map(|(_, bytes)| bytes),
        vec![],
        Duration::from_millis(timeout_ms),
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
