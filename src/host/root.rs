//! The root context: reads and compiles the plugin configuration once per VM, and
//! hands each HTTP stream a shared handle to it.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

use crate::core::compile::{compile_json, Config};
use crate::host::http::Pag0Http;
use crate::host::{alerts, callout, log, metrics, waiters};

pub struct Pag0Root {
    context_id: u32,
    config: Option<Rc<Config>>,
}

impl Pag0Root {
    pub fn new(context_id: u32) -> Pag0Root {
        Pag0Root {
            context_id,
            config: None,
        }
    }
}

impl Context for Pag0Root {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let status = callout::response_status(self);
        if callout::succeeded(status) {
            metrics::add("pag0.alerts.sent", 1);
        } else {
            metrics::add("pag0.alerts.failed", 1);
            log(
                LogLevel::Warn,
                &format!("pag0: alert webhook answered {status:?}"),
            );
        }
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
                if config.cache.is_some() {
                    // Streams waiting for an identical call's answer are polled here.
                    let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(10));
                } else if config.alerts.is_some() {
                    // Alerts queued by streams are sent from here, five times a second.
                    let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(200));
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
        let Some(sink) = self.config.as_ref().and_then(|c| c.alerts.clone()) else {
            return;
        };
        for body in alerts::take_all() {
            if let Err(status) = callout::post_json(self, &sink, &body) {
                metrics::add("pag0.alerts.failed", 1);
                log(
                    LogLevel::Warn,
                    &format!(
                        "pag0: cannot send alert to cluster {}: {status:?}",
                        sink.cluster
                    ),
                );
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
