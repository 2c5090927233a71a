//! Envoy properties, read through `hostcalls::get_property` (the SDK's
//! `Context::get_property` panics on some properties).

use proxy_wasm::hostcalls;

use crate::core::call::RouteSettings;
use crate::core::route_meta;
use crate::host::log;
use proxy_wasm::types::LogLevel;

/// `filter_metadata.pag0` of the matched route, in one property call (see
/// `core::route_meta`). Metadata that cannot be decoded makes the policy and price
/// unreadable text, so the call fails closed with CONFIG_ERROR.
pub fn route_settings() -> RouteSettings {
    let path = vec!["xds", "route_metadata", "filter_metadata", "pag0"];
    match hostcalls::get_property(path) {
        Ok(Some(bytes)) => route_meta::decode(&bytes).unwrap_or_else(|e| {
            log(LogLevel::Error, &format!("pag0: route metadata: {e}"));
            let bad = || Some(route_meta::NOT_TEXT.to_string());
            RouteSettings {
                policy: bad(),
                price: bad(),
                ..RouteSettings::default()
            }
        }),
        _ => RouteSettings::default(),
    }
}

/// True when the response came from the upstream (not a local reply such as Envoy's
/// own 503 on a refused connection or 504 on a timeout).
pub fn response_from_upstream() -> bool {
    matches!(
        hostcalls::get_property(vec!["response", "code_details"]),
        Ok(Some(bytes)) if bytes == b"via_upstream"
    )
}
