//! pag0: a spend firewall for AI agents calling paid APIs, as a proxy-wasm filter.
//!
//! `core` is plain Rust (no proxy-wasm import): configuration, policy, the ledger,
//! identity, endpoints, pricing, errors. It is tested natively and in wasm.
//! `host` turns Envoy callbacks into calls on the core and the core's decisions into
//! host calls; it is compiled only for the proxy-wasm target.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod core;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod host;
