//! The root context: reads and compiles the plugin configuration once per VM, hands
//! each HTTP stream a shared handle to it, and on its tick: wakes waiting streams,
//! runs the VM's part of the ledger (writes counts and commits, says it is alive,
//! settles reservations left by a dead VM or open too long), and sends what waits in
//! the outbox (alerts, second-level cache writes).

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

use crate::core::compile::{compile_json, Config};
use crate::host::outbox::{self, Kind};
use crate::host::shared::HostStore;
use crate::host::stream::waiters::{self, RootDispatch};
use crate::host::stream::Pag0Http;
use crate::host::{callout, log, metrics, now_millis, remote_ledger, vm};

/// The tick: short, so that waiting streams and the report API's flush requests are
/// answered quickly; the ledger decides on each tick whether anything is due.
const TICK_MS: u64 = 20;

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
        body_size: usize,
        _trailers: usize,
    ) {
        crate::host::new_callback();
        if let Some(kind) = self.in_flight.remove(&token) {
            let ok = callout::succeeded(callout::status());
            let name = match (kind, ok) {
                (Kind::Alert, true) => "pag0.alerts.sent",
                (Kind::Alert, false) => "pag0.alerts.failed",
                (Kind::CacheWrite, true) => "pag0.cache.l2_writes",
                (Kind::CacheWrite, false) => "pag0.cache.l2_failures",
            };
            metrics::add(name, 1);
            return;
        }
        if let Some(config) = &self.config {
            if remote_ledger::on_answer(config, token, body_size) {
                return;
            }
        }
        waiters::route_answer(self, self.context_id, token, body_size);
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
                let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(TICK_MS));
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
        crate::host::new_callback();
        let Some(config) = self.config.clone() else {
            return;
        };
        if waiters::any() {
            waiters::poll_all(self, self.context_id);
        }
        let now = now_millis();
        let ticked = vm::with(|vm| vm.ledger.tick(&config, &HostStore, now));
        outbox::queue_alerts(&config, ticked.alerts);
        if ticked.expired > 0 {
            metrics::add("pag0.ledger.expired_reservations", ticked.expired as u64);
        }
        if ticked.recovered > 0 {
            metrics::add(
                "pag0.ledger.recovered_reservations",
                u64::from(ticked.recovered),
            );
        }
        if config.ledger_redis.is_some() {
            let reports = vm::with(|vm| vm.ledger.take_remote_reports());
            if !reports.is_empty() {
                remote_ledger::queue_reports(&config, reports, now / 1000);
            }
            // A flush the report API asked for is acknowledged once Redis has it.
            if let Some(epoch) = vm::with(|vm| vm.ledger.held_ack()) {
                remote_ledger::hold(epoch);
            }
        }
        remote_ledger::on_tick(&RootDispatch(self), &config);
        if let Some(epoch) = remote_ledger::confirmed_hold() {
            vm::with(|vm| vm.ledger.release_ack(&HostStore, epoch, now));
        }
        for call in outbox::take_all() {
            let body = Some((call.content_type, call.body.as_bytes()));
            match callout::send(
                &RootDispatch(self),
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
        metrics::flush_cas_stats();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Always a context: returning None would panic inside the SDK.
        Some(Box::new(Pag0Http::new(context_id, self.config.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
