//! The host layer: Envoy's proxy-wasm callbacks in, the core's decisions out.
//! Nothing here decides policy; everything here touches the host.

mod alerts;
mod callout;
mod http;
mod metrics;
mod props;
mod reply;
mod root;
mod shared;
mod waiters;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Pag0Root::new(context_id))
    });
}}

/// Logs through the host; a failed log call is not worth a panic.
pub(crate) fn log(level: proxy_wasm::types::LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}

/// Wall-clock unix seconds from the host.
pub(crate) fn now_secs() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Wall-clock unix milliseconds from the host.
pub(crate) fn now_millis() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}
