//! Envoy properties, read through `hostcalls::get_property` (the SDK's
//! `Context::get_property` panics on some properties).

use proxy_wasm::hostcalls;

use proxy_wasm::hostcalls::log;
use proxy_wasm::types::LogLevel;

use crate::core::firewall::RouteSettings;
use crate::core::route_meta;

fn string_property(path: Vec<&str>) -> Option<String> {
    match hostcalls::get_property(path) {
        // A value that is not text (a YAML number arrives as a binary double) is kept,
        // mangled, so that checking it fails closed instead of reading as "absent".
        Ok(Some(bytes)) => Some(
            String::from_utf8(bytes)
                .unwrap_or_else(|e| format!("<not text: {} bytes>", e.as_bytes().len())),
        ),
        _ => None,
    }
}

/// `filter_metadata.pag0` of the matched route, in one property call (see
/// `core::route_meta`). Metadata that cannot be decoded makes the policy and price unreadable
/// text, so the call fails closed with CONFIG_ERROR.
pub fn route_settings() -> RouteSettings {
    let path = vec!["xds", "route_metadata", "filter_metadata", "pag0"];
    match hostcalls::get_property(path) {
        Ok(Some(bytes)) => route_meta::decode(&bytes).unwrap_or_else(|e| {
            let _ = log(LogLevel::Error, &format!("pag0: route metadata: {e}"));
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
/// own 503 on a refused connection).
pub fn response_from_upstream() -> bool {
    string_property(vec!["response", "code_details"]).as_deref() == Some("via_upstream")
}

/// The upstream cluster the matched route sends to (to retry a call there).
pub fn cluster_name() -> Option<String> {
    match hostcalls::get_property(vec!["xds", "cluster_name"]) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    }
}
