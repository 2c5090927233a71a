//! Every dispatched HTTP call goes through here: headers, timeout, and what counts as
//! failure (any non-2xx, Envoy's synthetic 503/504 included). Answers are read as
//! bytes: the SDK's `String` getters panic on a byte that is not UTF-8, and a signer,
//! an approval service or a paid server may send one.

use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType, Status};

use crate::host::abi;

/// Where a call goes: the Envoy cluster, the `:authority`, and the `authorization`
/// header a service wants (the Redis ledger's Webdis behind HTTP Basic).
struct Target<'a> {
    cluster: &'a str,
    authority: &'a str,
    authorization: Option<&'a str>,
}

/// Sends a call. The answer comes back to the caller's `on_http_call_response`.
pub fn send(
    d: &dyn crate::host::stream::Dispatch,
    cluster: &str,
    method: &str,
    path: &str,
    authority: &str,
    body: Option<(&str, &[u8])>,
    timeout_ms: u64,
) -> Result<u32, Status> {
    let to = Target {
        cluster,
        authority,
        authorization: None,
    };
    dispatch(d, &to, method, path, body, timeout_ms)
}

/// [`send`] to a configured service, with its `authorization` header when it has one.
pub fn send_to(
    d: &dyn crate::host::stream::Dispatch,
    service: &crate::core::settings::Service,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout_ms: u64,
) -> Result<u32, Status> {
    let to = Target {
        cluster: &service.cluster,
        authority: &service.authority,
        authorization: service.authorization.as_deref(),
    };
    dispatch(d, &to, method, path, body, timeout_ms)
}

fn dispatch(
    d: &dyn crate::host::stream::Dispatch,
    to: &Target<'_>,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout_ms: u64,
) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", to.authority),
    ];
    if let Some((content_type, _)) = body {
        headers.push(("content-type", content_type));
    }
    if let Some(authorization) = to.authorization {
        headers.push(("authorization", authorization));
    }
    d.dispatch(
        to.cluster,
        headers,
        body.map(|(_, bytes)| bytes),
        Duration::from_millis(timeout_ms),
    )
}

/// A header of the callout answer being handled, as bytes.
pub fn header(name: &str) -> Option<Vec<u8>> {
    abi::map_value(MapType::HttpCallResponseHeaders, name)
}

/// Every header of the callout answer being handled, as bytes.
pub fn headers() -> abi::HeaderMap {
    abi::HeaderMap::read(MapType::HttpCallResponseHeaders)
}

/// The callout answer's body.
pub fn body(size: usize) -> Vec<u8> {
    abi::buffer(BufferType::HttpCallResponseBody, 0, size)
}

/// A callout answer's status, from its `:status` header; `None` when missing.
pub fn status() -> Option<u32> {
    header(":status").and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok())
}

pub fn succeeded(status: Option<u32>) -> bool {
    status.is_some_and(|s| (200..300).contains(&s))
}

/// Whether a callout answer is Envoy's own (a timeout, a refused or reset connection)
/// rather than the server's: nothing is known of what the server did.
pub fn envoy_local_reply(status: Option<u32>, body: &[u8]) -> bool {
    match status {
        None => true,
        Some(503 | 504) => {
            body.starts_with(b"upstream ")
                || body.starts_with(b"no healthy upstream")
                || body.is_empty()
        }
        _ => false,
    }
}
