//! The floor of a priced firewall, for `make bench`: what any filter that reserves and
//! settles a price per call in Envoy shared data must do, and nothing more. Route
//! metadata `floor: {price: "N"}` prices a route; `floor: {hit: "1"}` answers from a
//! 1 KiB shared-data entry (a cache hit). Amounts are kept as one u64 per session.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Floor { key: None, price: 0 }) });
}}

struct Floor {
    key: Option<String>,
    price: u64,
}

impl Context for Floor {}

/// `key`'s value as a u64 and its CAS (0 when absent).
fn read(key: &str) -> (u64, Option<u32>) {
    match hostcalls::get_shared_data(key) {
        Ok((Some(bytes), cas)) => {
            let mut a = [0u8; 8];
            let n = bytes.len().min(8);
            a[..n].copy_from_slice(&bytes[..n]);
            (u64::from_le_bytes(a), cas)
        }
        Ok((None, cas)) => (0, cas),
        Err(_) => (0, None),
    }
}

/// Adds `delta` (reserve) or settles it, with compare-and-swap.
fn add(key: &str, delta: u64) {
    loop {
        let (value, cas) = read(key);
        let next = value.wrapping_add(delta);
        match hostcalls::set_shared_data(key, Some(&next.to_le_bytes()), cas) {
            Err(Status::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// The route's `floor` metadata, as proxy-wasm pairs: (price, hit).
fn route() -> (u64, bool) {
    let Ok(Some(bytes)) = hostcalls::get_property(vec!["xds", "route_metadata", "filter_metadata", "floor"]) else {
        return (0, false);
    };
    let text = String::from_utf8_lossy(&bytes);
    let price = text
        .split_once("price\u{0}")
        .and_then(|(_, rest)| rest.split('\u{0}').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    (price, text.contains("hit\u{0}"))
}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        let session = headers
            .iter()
            .find(|(k, _)| k == "x-pag0-session")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let (price, hit) = route();
        if hit {
            let mut body = hostcalls::get_shared_data("floor/hit").ok().and_then(|(b, _)| b).unwrap_or_default();
            if body.is_empty() {
                body = vec![b'x'; 1024];
                let _ = hostcalls::set_shared_data("floor/hit", Some(&body), None);
            }
            let _ = hostcalls::send_http_response(200, vec![("x-pag0-cost", "0")], Some(&body));
            return Action::Pause;
        }
        if price > 0 {
            let key = format!("floor/{session}");
            add(&key, price);
            self.key = Some(key);
            self.price = price;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some(key) = &self.key {
            // Settle: another compare-and-swap on the same record.
            add(key, 0);
        }
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "x-pag0-cost", Some(&self.price.to_string()));
        Action::Continue
    }
}
