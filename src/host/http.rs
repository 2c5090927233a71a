//! One HTTP stream: answer the report API, or identify the caller, check and reserve on
//! request headers; settle, count and report on response headers; give back a
//! reservation the stream never settled.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::core::admin::{self, AdminResponse};
use crate::core::alerts::Alert;
use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::firewall::{self, Call, Caller, HeaderValue, Ticket};
use crate::core::headers::BudgetView;
use crate::core::identity::role;
use crate::core::policy::ChargeOn;
use crate::host::metrics::{self, label, Labels};
use crate::host::reply::{send_local, send_refusal};
use crate::host::shared::HostStore;
use crate::host::{alerts, log, now_secs, props};

/// Request headers with this prefix are pag0's own and never reach the upstream.
const OWN_HEADER_PREFIX: &str = "x-pag0-";

pub struct Pag0Http {
    config: Option<Rc<Config>>,
    /// The admitted call, until it is settled.
    ticket: Option<Ticket>,
    labels: Option<Labels>,
    charge_on: ChargeOn,
    view: BudgetView,
    /// This stream was answered locally (a refusal, the report API).
    answered_locally: bool,
}

impl Pag0Http {
    pub fn new(config: Option<Rc<Config>>) -> Pag0Http {
        Pag0Http {
            config,
            ticket: None,
            labels: None,
            charge_on: ChargeOn::Success,
            view: BudgetView::default(),
            answered_locally: false,
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
        set_state("pag0_cost", "0");
        set_state("pag0_error", refusal.code.as_str());
        send_refusal(refusal, view);
        Action::Pause
    }

    /// A refusal after the caller is known: counted in the session and the metrics.
    fn refuse_caller(
        &mut self,
        config: &Config,
        caller: &Caller,
        call: &Call,
        refusal: &Refusal,
        view: &BudgetView,
    ) -> Action {
        let tenant = config
            .tenants
            .get(caller.tenant)
            .map_or("default", |t| t.id.as_str());
        metrics::refusal(
            &label(tenant),
            &metric_role(config, call, caller),
            refusal.code.as_str(),
        );
        match firewall::record_refusal(config, &HostStore, caller, call, refusal, now_secs()) {
            Ok(raised) => queue_alerts(config, raised),
            Err(e) => log(
                LogLevel::Warn,
                &format!("pag0: could not count a refusal: {}", e.message),
            ),
        }
        self.refuse(refusal, view)
    }

    fn settle(&mut self, upstream_status: Option<u32>) -> u64 {
        let (Some(config), Some(ticket)) = (self.config.clone(), self.ticket.take()) else {
            return 0;
        };
        let commit = firewall::should_commit(self.charge_on, upstream_status);
        let cost = match firewall::settle(&config, &HostStore, &ticket, commit, now_secs()) {
            Ok(settled) => {
                self.view = settled.view;
                queue_alerts(&config, settled.alerts);
                settled.cost
            }
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!(
                        "pag0: could not settle {} for session {}: {}",
                        ticket.price, ticket.session, e.message
                    ),
                );
                if commit {
                    ticket.price
                } else {
                    0
                }
            }
        };
        if let Some(labels) = self.labels.take() {
            metrics::call(&labels, cost, false, 0);
        }
        cost
    }

    fn serve_admin(
        &mut self,
        config: &Config,
        route: Result<admin::AdminRoute, Refusal>,
        headers: &[(String, Vec<u8>)],
        path: &[u8],
    ) -> Action {
        self.answered_locally = true;
        let response = match route {
            Err(refusal) => AdminResponse::refusal(&refusal),
            Ok(admin::AdminRoute::Dashboard) => admin::dashboard(config),
            Ok(route) => {
                let mut keys = Vec::new();
                for (name, value) in headers {
                    if name == "x-pag0-admin-key" || name == &config.identity.api_key_header {
                        keys.push(value.clone());
                    } else if name == "authorization" {
                        keys.extend(admin::bearer(value));
                    }
                }
                match admin::authorize(config, &keys) {
                    Err(refusal) => AdminResponse::refusal(&refusal),
                    Ok(access) => {
                        let tenant = query_param(path, "tenant");
                        admin::handle(
                            config,
                            &HostStore,
                            access,
                            &route,
                            tenant.as_deref(),
                            now_secs(),
                        )
                    }
                }
            }
        };
        queue_alerts(config, response.alerts.clone());
        let mut out_headers = vec![
            ("content-type", response.content_type),
            ("cache-control", "no-store"),
        ];
        let code = if response.status >= 400 {
            serde_json::from_str::<serde_json::Value>(&response.body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        } else {
            None
        };
        if let Some(code) = &code {
            out_headers.push(("x-pag0-error", code));
        }
        send_local(response.status, out_headers, response.body.as_bytes());
        Action::Pause
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
        let pseudo = |name: &str| match lookup(name) {
            HeaderValue::One(v) => v,
            _ => Vec::new(),
        };
        let path = pseudo(":path");
        let method = String::from_utf8_lossy(&pseudo(":method")).into_owned();
        if let Some(route) = admin::route(&config, &method, &String::from_utf8_lossy(&path)) {
            return self.serve_admin(&config, route, &headers, &path);
        }
        let caller = match firewall::identify(&config, &lookup) {
            Ok(caller) => caller,
            Err(refusal) => return self.refuse(&refusal, &BudgetView::default()),
        };
        let call = match firewall::describe_call(
            &config,
            &pseudo(":authority"),
            &path,
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
        set_state("pag0_agent", &caller.agent);
        set_state("pag0_session", &caller.session);
        set_state("pag0_cached", "false");
        self.charge_on = call.charge_on;
        match firewall::admit(&config, &HostStore, &caller, &call, now_secs()) {
            Ok(admission) => {
                let tenant = config
                    .tenants
                    .get(caller.tenant)
                    .map_or("default", |t| t.id.as_str());
                self.labels = Some(Labels {
                    tenant: label(tenant),
                    role: metric_role(&config, &call, &caller),
                    tool: label(call.tool.as_deref().unwrap_or("other")),
                    endpoint: label(&call.metric_endpoint),
                });
                self.ticket = Some(admission.ticket);
                self.view = admission.view;
                Action::Continue
            }
            Err(refused) => {
                self.refuse_caller(&config, &caller, &call, &refused.refusal, &refused.view)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.answered_locally || self.ticket.is_none() {
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
        set_state("pag0_cost", &cost.to_string());
        let set = |name: &str, value: &str| {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        };
        set("x-pag0-cost", &cost.to_string());
        set("x-pag0-cached", "false");
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
        if self.ticket.is_some() {
            self.settle(None);
        }
    }
}

/// The role label for metrics: the agent's role when a configured agent pattern
/// matched it, else `other` (agent ids come from clients; roles in metrics must not).
fn metric_role(config: &Config, call: &Call, caller: &Caller) -> String {
    let known = config
        .policies
        .get(call.policy)
        .is_some_and(|p| p.agent_rule(&caller.agent).is_some());
    if known {
        label(role(&caller.agent))
    } else {
        "other".to_string()
    }
}

fn queue_alerts(config: &Config, raised: Vec<Alert>) {
    if config.alerts.is_none() {
        return;
    }
    for alert in raised {
        alerts::queue(alert.to_json());
    }
}

/// Filter state for access logs: `%FILTER_STATE(wasm.pag0_cost:PLAIN)%`.
fn set_state(name: &str, value: &str) {
    let _ = hostcalls::set_property(vec![name], Some(value.as_bytes()));
}

fn query_param(path: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(path).ok()?;
    let (_, query) = text.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}
