//! The host layer: Envoy's proxy-wasm callbacks in, the core's decisions out.
//! Nothing here decides policy; everything here touches the host.
//!
//! - [`root`]: configuration, the tick (ledger flush, recovery, waiting streams,
//!   outgoing calls).
//! - [`stream`]: one HTTP stream, a stage per file.
//! - [`vm`]: what one VM keeps between streams (its part of the ledger, memos).
//! - [`shared`] (the only caller of shared data), [`props`], [`callout`], [`reply`],
//!   [`metrics`], [`outbox`].

mod abi;
mod callout;
mod metrics;
mod outbox;
mod props;
mod reply;
mod root;
mod shared;
mod stream;
mod vm;

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

/// Wall-clock unix milliseconds from the host.
pub(crate) fn now_millis() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}
