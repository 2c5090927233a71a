//! The plain-Rust core of pag0. Nothing here calls the proxy-wasm host: time, shared
//! data and headers come in as values or through the [`store::SharedStore`] trait.

pub mod admin;
pub mod alerts;
pub mod amount;
pub mod base64;
pub mod breaker;
pub mod cache;
pub mod call;
pub mod compile;
pub mod config;
pub mod endpoint;
pub mod errors;
pub mod firewall;
pub mod glob;
pub mod headers;
pub mod identity;
pub mod ledger;
pub mod meter;
pub mod offers;
pub mod pairs;
pub mod payments;
pub mod policy;
pub mod route_meta;
pub mod settings;
pub mod spend_rate;
pub mod store;
pub mod window;
pub mod x402;
