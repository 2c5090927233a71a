//! One HTTP stream: identify the caller, check and reserve on request headers; settle
//! and report on response headers; give back a reservation the stream never settled.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::firewall::{self, HeaderValue, Reservation};
use crate::core::headers::BudgetView;
use crate::core::policy::ChargeOn;
use crate::host::reply::send_refusal;
use crate::host::shared::HostStore;
use crate::host::{log, now_secs, props};

/// Request headers with this prefix are pag0's own and never reach the upstream.
const OWN_HEADER_PREFIX: &str = "x-pag0-";

pub struct Pag0Http {
    config: Option<Rc<Config>>,
    reservation: Option<Reservation>,
    charge_on: ChargeOn,
    view: BudgetView,
    /// This stream was answered locally (a refusal): nothing to add on the way out.
    answered_locally: bool,
    /// The request went through the firewall (headers are ours to add on responses).
    admitted: bool,
}

impl Pag0Http {
    pub fn new(config: Option<Rc<Config>>) -> Pag0Http {
        Pag0Http {
            config,
            reservation: None,
            charge_on: ChargeOn::Success,
            view: BudgetView::default(),
            answered_locally: false,
            admitted: false,
        }
    }

    fn refuse(&mut self, refusal: &Refusal, view: &BudgetView) -> Action {
        log(
            LogLevel::Debug,
            &format!(
                "pag0: refused {}: {}",
                refusal.code.as_str(),
                refusal.message
            ),
        );
        self.answered_locally = true;
        send_refusal(refusal, view);
        Action::Pause
    }

    fn settle(&mut self, upstream_status: Option<u32>) -> u64 {
        let (Some(config), Some(reservation)) = (self.config.clone(), self.reservation.take())
        else {
            return 0;
        };
        let commit = firewall::should_commit(self.charge_on, upstream_status);
        match firewall::settle(&config, &HostStore, &reservation, commit, now_secs()) {
            Ok(view) => self.view = view,
            Err(e) => log(
                LogLevel::Error,
                &format!(
                    "pag0: could not settle {} for session {}: {}",
                    reservation.price, reservation.session, e.message
                ),
            ),
        }
        if commit {
            reservation.price
        } else {
            0
        }
    }
}

impl Context for Pag0Http {}

impl HttpContext for Pag0Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            let refusal = Refusal::new(ErrorCode::ConfigError, "pag0 has no valid configuration");
            return self.refuse(&refusal, &BudgetView::default());
        };
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        // Strip our own headers first, whatever happens next.
        let mut stripped: Vec<&str> = Vec::new();
        for (name, _) in &headers {
            if name.starts_with(OWN_HEADER_PREFIX) && !stripped.contains(&name.as_str()) {
                stripped.push(name);
                let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
            }
        }
        let lookup = |wanted: &str| -> HeaderValue {
            let mut found = headers.iter().filter(|(name, _)| name == wanted);
            match (found.next(), found.next()) {
                (None, _) => HeaderValue::Missing,
                (Some((_, value)), None) => HeaderValue::One(value.clone()),
                (Some(_), Some(_)) => HeaderValue::Many,
            }
        };
        let caller = match firewall::identify(&config, &lookup) {
            Ok(caller) => caller,
            Err(refusal) => return self.refuse(&refusal, &BudgetView::default()),
        };
        let pseudo = |name: &str| match lookup(name) {
            HeaderValue::One(v) => v,
            _ => Vec::new(),
        };
        let call = match firewall::describe_call(
            &config,
            &pseudo(":authority"),
            &pseudo(":path"),
            &props::route_settings(),
        ) {
            Ok(call) => call,
            Err(refusal) => {
                if refusal.code == ErrorCode::ConfigError {
                    log(LogLevel::Error, &format!("pag0: {}", refusal.message));
                }
                return self.refuse(&refusal, &BudgetView::default());
            }
        };
        self.charge_on = call.charge_on;
        match firewall::admit(&config, &HostStore, &caller, &call, now_secs()) {
            Ok(admission) => {
                self.reservation = admission.reservation;
                self.view = admission.view;
                self.admitted = true;
                Action::Continue
            }
            Err(refused) => self.refuse(&refused.refusal, &refused.view),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.answered_locally || !self.admitted {
            return Action::Continue;
        }
        let status = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
            });
        let upstream_status = if props::response_from_upstream() {
            status
        } else {
            None
        };
        let cost = self.settle(upstream_status);
        let set = |name: &str, value: &str| {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        };
        set("x-pag0-cost", &cost.to_string());
        let remaining = self.view.remaining_header();
        if !remaining.is_empty() {
            set("x-pag0-budget-remaining", &remaining);
        }
        if let Some(alert) = self.view.alert_header() {
            set("x-pag0-budget-alert", &alert);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // The stream ended without response headers (client gone, upstream reset):
        // nothing was answered, so nothing is charged.
        if self.reservation.is_some() {
            self.settle(None);
        }
    }
}
