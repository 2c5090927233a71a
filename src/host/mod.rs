//! The host layer: Envoy's proxy-wasm callbacks in, the core's decisions out.
//! Nothing here decides policy; everything here touches the host.
//!
//! - [`root`]: configuration, the tick (ledger flush, recovery, waiting streams,
//!   outgoing calls).
//! - [`stream`]: one HTTP stream, a stage per file.
//! - [`vm`]: what one VM keeps between streams (its part of the ledger, memos).
//! - [`shared`] (the only caller of shared data), [`props`], [`callout`], [`reply`],
//!   [`metrics`], [`outbox`].
//! - [`remote_ledger`]: the Redis ledger's settlements and kill switch poll.

mod abi;
mod callout;
mod metrics;
mod outbox;
mod props;
mod remote_ledger;
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

thread_local! {
    /// The clock, read once per callback (each read is a host call).
    static CLOCK: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Starts a callback: the next clock read asks the host again. Every callback pag0
/// implements (root and stream) calls this first; a callback that did not would see
/// the time an earlier callback read.
pub(crate) fn new_callback() {
    CLOCK.with(|c| c.set(None));
}

/// Wall-clock unix milliseconds from the host, read once per callback.
pub(crate) fn now_millis() -> u64 {
    CLOCK.with(|c| {
        if let Some(now) = c.get() {
            return now;
        }
        let now = proxy_wasm::hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        c.set(Some(now));
        now
    })
}
