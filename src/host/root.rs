//! The root context: reads and compiles the plugin configuration once per VM, and
//! hands each HTTP stream a shared handle to it.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

use crate::core::compile::{compile_json, Config};
use crate::host::alerts::{self, Kind};
use crate::host::http::Pag0Http;
use crate::host::{callout, log, metrics, waiters};

pub struct Pag0Root {
    context_id: u32,
    config: Option<Rc<Config>>,
    /// Calls sent from the outbox, by token, to count how they ended.
    in_flight: hashbrown::HashMap<u32, Kind>,
}

impl Pag0Root {
    pub fn new(context_id: u32) -> Pag0Root {
        Pag0Root {
            context_id,
            config: None,
            in_flight: hashbrown::HashMap::new(),
        }
    }
}

impl Context for Pag0Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let kind = self.in_flight.remove(&token);
        let ok = callout::succeeded(callout::response_status(self));
        let name = match (kind, ok) {
            (Some(Kind::Alert), true) => "pag0.alerts.sent",
            (Some(Kind::Alert), false) => "pag0.alerts.failed",
            (Some(Kind::CacheWrite), true) => "pag0.cache.l2_writes",
            (Some(Kind::CacheWrite), false) => "pag0.cache.l2_failures",
            (None, _) => return,
        };
        metrics::add(name, 1);
    }
}

impl RootContext for Pag0Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log(
                    LogLevel::Critical,
                    &format!("pag0: cannot read the plugin configuration: {status:?}"),
                );
                return false;
            }
        };
        match compile_json(&bytes) {
            Ok(config) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "pag0: configuration loaded: {} policies, {} tenants",
                        config.policies.len(),
                        config.tenants.len()
                    ),
                );
                if config.cache.is_some() || config.alerts.is_some() {
                    // Streams waiting for an identical call's answer are polled here, and
                    // alerts and second-level cache writes are sent from here.
                    let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(10));
                }
                self.config = Some(Rc::new(config));
                true
            }
            Err(reason) => {
                log(
                    LogLevel::Critical,
                    &format!("pag0: invalid configuration: {reason}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if waiters::any() {
            waiters::poll_all(self.context_id);
        }
        for call in alerts::take_all() {
            let body = Some((call.content_type, call.body.as_bytes()));
            match callout::send(
                self,
                &call.cluster,
                call.method,
                &call.path,
                &call.authority,
                body,
                call.timeout_ms,
            ) {
                Ok(token) => {
                    self.in_flight.insert(token, call.kind);
                }
                Err(status) => {
                    let name = match call.kind {
                        Kind::Alert => "pag0.alerts.failed",
                        Kind::CacheWrite => "pag0.cache.l2_failures",
                    };
                    metrics::add(name, 1);
                    log(
                        LogLevel::Warn,
                        &format!("pag0: cannot call cluster {}: {status:?}", call.cluster),
                    );
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Always a context: returning None would panic inside the SDK.
        Some(Box::new(Pag0Http::new(context_id, self.config.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
