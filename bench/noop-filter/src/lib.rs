//! A do-nothing proxy-wasm HTTP filter: every callback continues at once. The benchmark
//! loads it where pag0 would go, to measure what any wasm filter costs in Envoy.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Noop) });
}}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}
