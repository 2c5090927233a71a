//! Envoy properties, read through `hostcalls::get_property` (the SDK's
//! `Context::get_property` panics on some properties).

use proxy_wasm::hostcalls;

use crate::core::firewall::RouteSettings;

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

fn route_field(field: &str) -> Option<String> {
    string_property(vec![
        "xds",
        "route_metadata",
        "filter_metadata",
        "pag0",
        field,
    ])
}

/// `filter_metadata.pag0` of the matched route.
pub fn route_settings() -> RouteSettings {
    RouteSettings {
        policy: route_field("policy"),
        price: route_field("price"),
        tool: route_field("tool"),
        charge_on: route_field("chargeOn"),
        endpoint: route_field("endpoint"),
        cache_ttl: route_field("cacheTTL"),
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
