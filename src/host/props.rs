//! Envoy properties, read through `hostcalls::get_property` (the SDK's
//! `Context::get_property` panics on some properties).

use proxy_wasm::hostcalls;

use std::cell::RefCell;
use std::rc::Rc;

use hashbrown::HashMap;

use crate::core::call::RouteSettings;
use crate::core::compile::Config;
use crate::core::errors::Refusal;
use crate::core::firewall::{self, RouteChecked};
use crate::core::route_meta;
use crate::host::log;
use proxy_wasm::types::LogLevel;

/// A route as pag0 reads it: its metadata and what checking it against the
/// configuration said.
#[derive(Debug)]
pub struct Route {
    pub settings: RouteSettings,
    pub checked: Result<RouteChecked, Refusal>,
}

/// Distinct route metadata a VM remembers (more: the memo starts over).
const MAX_ROUTES: usize = 1024;

/// (configuration address, raw metadata → route).
type RouteMemo = (usize, HashMap<Vec<u8>, Rc<Route>>);

thread_local! {
    /// Raw metadata → route, for the configuration at this address: a route is decoded
    /// and checked once, not on every request.
    static ROUTES: RefCell<RouteMemo> = RefCell::new((0, HashMap::new()));
}

/// `filter_metadata.pag0` of the matched route, in one property call (see
/// `core::route_meta`), decoded and checked once per distinct metadata. Metadata that
/// cannot be decoded makes the policy and price unreadable text, so the call fails
/// closed with CONFIG_ERROR.
pub fn route(cfg: &Rc<Config>) -> Rc<Route> {
    let path = vec!["xds", "route_metadata", "filter_metadata", "pag0"];
    let raw = match hostcalls::get_property(path) {
        Ok(Some(bytes)) => bytes,
        _ => Vec::new(),
    };
    let config = Rc::as_ptr(cfg) as usize;
    ROUTES.with(|routes| {
        let mut routes = routes.borrow_mut();
        if routes.0 != config || routes.1.len() >= MAX_ROUTES {
            routes.0 = config;
            routes.1.clear();
        }
        if let Some(route) = routes.1.get(&raw) {
            return route.clone();
        }
        let settings = decode(&raw);
        let checked = firewall::check_route(cfg, &settings);
        let route = Rc::new(Route { settings, checked });
        routes.1.insert(raw, route.clone());
        route
    })
}

fn decode(raw: &[u8]) -> RouteSettings {
    if raw.is_empty() {
        return RouteSettings::default();
    }
    route_meta::decode(raw).unwrap_or_else(|e| {
        log(LogLevel::Error, &format!("pag0: route metadata: {e}"));
        let bad = || Some(route_meta::NOT_TEXT.to_string());
        RouteSettings {
            policy: bad(),
            price: bad(),
            ..RouteSettings::default()
        }
    })
}

/// True when the response came from the upstream (not a local reply such as Envoy's
/// own 503 on a refused connection or 504 on a timeout).
pub fn response_from_upstream() -> bool {
    matches!(
        hostcalls::get_property(vec!["response", "code_details"]),
        Ok(Some(bytes)) if bytes == b"via_upstream"
    )
}
