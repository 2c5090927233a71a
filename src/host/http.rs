//! One HTTP stream: answer the report API, or identify the caller, serve a cached
//! answer or wait for an identical call in flight, check and reserve; settle, count,
//! fill the cache and report on the way back; give back a reservation the stream never
//! settled.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

use crate::core::admin::{self, AdminResponse};
use crate::core::alerts::Alert;
use crate::core::cache::{self, Entry, EntryState, Found};
use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::firewall::{self, Call, Caller, HeaderValue, Ticket};
use crate::core::headers::BudgetView;
use crate::core::identity::role;
use crate::core::policy::ChargeOn;
use crate::core::x402;
use crate::host::alerts::{self, Kind, Outgoing};
use crate::host::metrics::{self, label, Labels};
use crate::host::reply::{send_local, send_refusal};
use crate::host::shared::HostStore;
use crate::host::{callout, log, now_millis, now_secs, props, waiters};

/// Request headers with this prefix are pag0's own and never reach the upstream.
const OWN_HEADER_PREFIX: &str = "x-pag0-";
/// Largest request body read to key the cache; bigger or unsized bodies skip the cache.
const MAX_KEYED_BODY: usize = 256 * 1024;
/// Largest 402 body read for a v1 offer (a real one is well under 8 KiB).
const MAX_OFFER_BODY: usize = 64 * 1024;

/// This stream's claim on a cache key: it goes upstream and fills the entry.
pub struct CacheFill {
    pub slot: u32,
    pub key: String,
    pub ttl: u64,
    /// Set once the answer is known to be storable; the body is then buffered.
    pub storing: Option<(u16, String)>,
}

/// What the stream knows, shared with the root context while the stream waits for an
/// identical call's answer (the root then serves it, or admits it and resumes it).
#[derive(Default)]
pub struct StreamState {
    pub ticket: Option<Ticket>,
    pub labels: Option<Labels>,
    pub charge_on: Option<ChargeOn>,
    pub view: BudgetView,
    pub answered_locally: bool,
    pub cost: u64,
    pub fill: Option<CacheFill>,
    /// The agent's own x402 payment, relayed.
    pub payment: Option<firewall::RelayedPayment>,
    /// x402 pay mode: what it takes to answer a 402 by paying and retrying.
    pub pay: Option<PayFlow>,
    /// Waiting for the approval service; what to do once approved.
    pub approval: Option<AfterApproval>,
    /// A call held back until its request body is in (to key the cache on it).
    pub deferred: Option<Deferred>,
}

/// x402 pay mode for one stream: the original request, kept to retry it with a payment.
pub struct PayFlow {
    caller: Caller,
    call: Call,
    cluster: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    too_big: bool,
    stage: PayStage,
    version: u8,
    network: String,
    amount: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayStage {
    Armed,
    /// A 402 without a v2 header: reading its body for a v1 offer.
    ReadingOffer,
    Approving,
    Signing,
    Retrying,
}

/// What an approved call does next.
pub enum AfterApproval {
    /// Go upstream (the request was paused for approval).
    Resume,
    /// Pay mode: ask the signer, with this request body.
    Sign(String),
}

/// A call held back until its request body is in (to key the cache on it).
pub struct Deferred {
    pub caller: Caller,
    pub call: Call,
    method: String,
    query: String,
    ttl: u64,
}

pub struct Pag0Http {
    context_id: u32,
    config: Option<Rc<Config>>,
    state: Rc<RefCell<StreamState>>,
}

impl Pag0Http {
    pub fn new(context_id: u32, config: Option<Rc<Config>>) -> Pag0Http {
        Pag0Http {
            context_id,
            config,
            state: Rc::default(),
        }
    }

    fn refuse(&mut self, refusal: &Refusal, view: &BudgetView) -> Action {
        refuse_stream(&self.state, refusal, view);
        Action::Pause
    }

    fn serve_admin(
        &mut self,
        config: &Config,
        route: Result<admin::AdminRoute, Refusal>,
        headers: &[(String, Vec<u8>)],
        path: &[u8],
    ) -> Action {
        self.state.borrow_mut().answered_locally = true;
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

    /// Looks the call up in the cache: serve a hit, wait for an identical call in
    /// flight, or claim the key and go upstream.
    fn through_cache(&mut self, config: &Rc<Config>, d: Deferred, body: &[u8]) -> Action {
        let Some(cache_cfg) = &config.cache else {
            return admit_stream(config, &self.state, &d.caller, &d.call);
        };
        if let Err(refusal) = firewall::check_lists(config, &d.caller, &d.call) {
            refuse_caller(
                config,
                &self.state,
                &d.caller,
                &d.call,
                &refusal,
                &BudgetView::default(),
            );
            return Action::Pause;
        }
        let tenant = config
            .tenants
            .get(d.caller.tenant)
            .map_or("default", |t| t.id.as_str());
        let private = firewall::private_cache(config, &d.caller, &d.call);
        let namespace = cache_cfg.namespace(&d.caller.session, &d.caller.agent, private);
        let key = cache::cache_key(
            tenant,
            &namespace,
            &d.method,
            &d.call.endpoint,
            &d.query,
            body,
        );
        match cache::find_or_claim(&HostStore, cache_cfg, &key, now_millis()) {
            Ok(Found::Hit(entry)) => {
                serve_hit(config, &self.state, &d.caller, &d.call, &entry);
                Action::Pause
            }
            Ok(Found::Pending(_)) if firewall::approval_for(config, &d.call).is_some() => {
                // A call that needs approval asks for it itself rather than wait.
                self.go_upstream(config, &d)
            }
            Ok(Found::Pending(slot)) => {
                let deadline = now_millis().saturating_add(cache_cfg.coalesce_wait_ms);
                waiters::wait(waiters::Waiter {
                    context_id: self.context_id,
                    config: config.clone(),
                    state: self.state.clone(),
                    caller: d.caller,
                    call: d.call,
                    slot,
                    key,
                    deadline_ms: deadline,
                });
                Action::Pause
            }
            Ok(Found::Claimed(slot)) => {
                self.state.borrow_mut().fill = Some(CacheFill {
                    slot,
                    key,
                    ttl: d.ttl,
                    storing: None,
                });
                // Ask the second level first, if there is one.
                if let Some(level2) = &cache_cfg.level2 {
                    let path = cache::level2_get_path(
                        &self
                            .state
                            .borrow()
                            .fill
                            .as_ref()
                            .map_or(String::new(), |f| f.key.clone()),
                    );
                    match callout::send(
                        self,
                        &level2.cluster,
                        "GET",
                        &path,
                        "pag0-cache",
                        None,
                        level2.timeout_ms,
                    ) {
                        Ok(_) => {
                            self.state.borrow_mut().deferred = Some(d);
                            return Action::Pause;
                        }
                        Err(status) => {
                            metrics::add("pag0.cache.l2_failures", 1);
                            log(
                                LogLevel::Debug,
                                &format!("pag0: second-level cache unreachable: {status:?}"),
                            );
                        }
                    }
                }
                self.go_upstream(config, &d)
            }
            Err(e) => {
                // The cache is an optimisation: on trouble, go upstream uncached.
                log(
                    LogLevel::Warn,
                    &format!("pag0: cache lookup failed: {}", e.message),
                );
                admit_stream(config, &self.state, &d.caller, &d.call)
            }
        }
    }

    /// After admission: a call priced above the policy's approval threshold waits for the
    /// approval service, holding its reservation.
    fn approve_or_go(
        &mut self,
        config: &Config,
        caller: &Caller,
        call: &Call,
        admitted: Action,
        then: AfterApproval,
    ) -> Action {
        if admitted != Action::Continue {
            return admitted;
        }
        let Some(approval) = firewall::approval_for(config, call) else {
            if let AfterApproval::Sign(body) = then {
                self.ask_signer(config, &body);
                return Action::Pause;
            }
            return Action::Continue;
        };
        let service = approval.service.clone();
        let body = firewall::approval_request(config, caller, call);
        let sent = callout::send(
            self,
            &service.cluster,
            "POST",
            &service.path,
            &service.authority,
            Some(("application/json", body.as_bytes())),
            service.timeout_ms,
        );
        match sent {
            Ok(_) => {
                self.state.borrow_mut().approval = Some(then);
                Action::Pause
            }
            Err(_) => {
                let refusal = Refusal::new(
                    ErrorCode::ApprovalTimeout,
                    "the approval service cannot be reached",
                );
                release_and_refuse(config, &self.state, &refusal);
                Action::Pause
            }
        }
    }

    /// The approval service answered (or did not, in time).
    fn on_approval(&mut self, body_size: usize) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let Some(then) = self.state.borrow_mut().approval.take() else {
            return;
        };
        let ok = callout::succeeded(callout::response_status(self));
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        match firewall::approval_answer(ok, &body) {
            Some((true, _)) => match then {
                AfterApproval::Resume => {
                    let _ = hostcalls::resume_http_request();
                }
                AfterApproval::Sign(request) => self.ask_signer(&config, &request),
            },
            Some((false, reason)) => {
                let mut refusal = Refusal::new(
                    ErrorCode::ApprovalDenied,
                    "the approval service denied this call",
                );
                if let Some(reason) = reason {
                    refusal = refusal.with_fields(vec![("reason", reason)]);
                }
                release_and_refuse(&config, &self.state, &refusal);
            }
            None => {
                let refusal = Refusal::new(
                    ErrorCode::ApprovalTimeout,
                    "no answer from the approval service in time",
                );
                release_and_refuse(&config, &self.state, &refusal);
            }
        }
    }

    /// Pay mode: ask the signer for a payment.
    fn ask_signer(&mut self, config: &Config, body: &str) {
        let Some(signer) = config.signer.clone() else {
            return;
        };
        let sent = callout::send(
            self,
            &signer.cluster,
            "POST",
            &signer.path,
            &signer.authority,
            Some(("application/json", body.as_bytes())),
            signer.timeout_ms,
        );
        if sent.is_err() {
            let refusal = Refusal::new(
                ErrorCode::SignerUnavailable,
                "the signer cluster cannot be reached",
            );
            release_and_refuse(config, &self.state, &refusal);
            return;
        }
        if let Some(pay) = self.state.borrow_mut().pay.as_mut() {
            pay.stage = PayStage::Signing;
        }
    }

    /// Pay mode, on the upstream's 402 headers. A v2 offer is in `PAYMENT-REQUIRED`;
    /// without it the offer may be a v1 body, which is read first (headers held).
    /// `None`: nothing to pay here; the 402 goes to the agent as it is.
    fn pay_the_402(&mut self, config: &Rc<Config>, end_of_stream: bool) -> Option<Action> {
        let header =
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, x402::V2_REQUIRED_HEADER)
                .ok()
                .flatten();
        match header {
            Some(h) => Some(self.pay_offer(config, x402::parse_required_header(&h))),
            None if end_of_stream => None,
            None => {
                if let Some(pay) = self.state.borrow_mut().pay.as_mut() {
                    pay.stage = PayStage::ReadingOffer;
                }
                Some(Action::Pause)
            }
        }
    }

    /// Pay mode, the whole body of a 402 without a v2 header: a v1 offer is paid;
    /// anything else (a 402 that is not x402) goes to the agent as it is.
    fn pay_the_402_body(&mut self, config: &Rc<Config>, body: &[u8]) -> Action {
        let claims_x402 = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .is_some_and(|v| v.get("x402Version").is_some());
        if !claims_x402 {
            if let Some(pay) = self.state.borrow_mut().pay.as_mut() {
                pay.stage = PayStage::Armed;
            }
            self.answer_upstream_headers(config, Some(402), true, false);
            return Action::Continue;
        }
        self.pay_offer(config, x402::parse_required_body(body))
    }

    /// Choose a requirement by policy, reserve its price, and ask for approval and
    /// the signer's payment.
    fn pay_offer(
        &mut self,
        config: &Rc<Config>,
        parsed: Result<x402::PaymentRequired, x402::X402Error>,
    ) -> Action {
        let Some((caller, mut call, too_big)) = self
            .state
            .borrow()
            .pay
            .as_ref()
            .map(|pay| (pay.caller.clone(), pay.call.clone(), pay.too_big))
        else {
            return Action::Continue;
        };
        // Whatever happens now, the original call is settled (it was answered 402).
        let offer = match parsed {
            Ok(offer) => offer,
            Err(e) => {
                let refusal =
                    Refusal::new(ErrorCode::PaymentFailed, format!("the server's 402: {e}"));
                release_and_refuse(config, &self.state, &refusal);
                return Action::Pause;
            }
        };
        if too_big {
            let limit = config.pay_body_limit;
            let refusal = Refusal::new(
                ErrorCode::InvalidRequest,
                format!("the request body is larger than signer.maxBodyBytes ({limit}) and cannot be retried with a payment"),
            );
            settle_stream_as(config, &self.state, false);
            self.state.borrow_mut().answered_locally = true;
            send_local(
                413,
                vec![
                    ("content-type", "application/json"),
                    ("x-pag0-error", "INVALID_REQUEST"),
                    ("x-pag0-cost", "0"),
                ],
                refusal.to_json().as_bytes(),
            );
            return Action::Pause;
        }
        let rules = config
            .policies
            .get(call.policy)
            .map(|p| p.payments.clone())
            .unwrap_or_default();
        let Some(chosen) = x402::choose(&offer, &rules) else {
            let refusal = Refusal::new(
                ErrorCode::PaymentNotAllowed,
                "no payment requirement the policy allows (scheme, network, asset, payee)",
            );
            refuse_caller(
                config,
                &self.state,
                &caller,
                &call,
                &refusal,
                &BudgetView::default(),
            );
            return Action::Pause;
        };
        call.price = chosen.amount;
        if admit_stream(config, &self.state, &caller, &call) != Action::Continue {
            return Action::Pause;
        }
        if config.signer.is_none() {
            let refusal = Refusal::new(ErrorCode::SignerUnavailable, "no signer is configured");
            release_and_refuse(config, &self.state, &refusal);
            return Action::Pause;
        }
        let tenant = config
            .tenants
            .get(caller.tenant)
            .map_or("default", |t| t.id.as_str());
        let body = x402::signer_request(&offer, chosen, tenant, &caller.session, &caller.agent);
        if let Some(pay) = self.state.borrow_mut().pay.as_mut() {
            pay.stage = PayStage::Approving;
            pay.version = offer.version;
            pay.network = chosen.network.clone();
            pay.amount = chosen.amount;
        }
        // Approval first when the price calls for it; then the signer.
        self.approve_or_go(
            config,
            &caller,
            &call,
            Action::Continue,
            AfterApproval::Sign(body),
        );
        Action::Pause
    }

    /// The signer answered: retry the original request once, with the payment.
    fn on_signed(&mut self, body_size: usize) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let status = callout::response_status(self);
        let answer = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let version = self.state.borrow().pay.as_ref().map_or(2, |p| p.version);
        let signed = if callout::succeeded(status) {
            x402::signer_answer(&answer, version).ok()
        } else {
            None
        };
        let Some((header, value)) = signed else {
            let refusal = Refusal::new(
                ErrorCode::SignerUnavailable,
                format!("the signer did not sign (status {status:?})"),
            );
            release_and_refuse(&config, &self.state, &refusal);
            return;
        };
        let (cluster, headers, body) = {
            let state = self.state.borrow();
            let Some(pay) = state.pay.as_ref() else {
                return;
            };
            (pay.cluster.clone(), pay.headers.clone(), pay.body.clone())
        };
        let mut pairs: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "content-length" | "transfer-encoding" | "payment-signature" | "x-payment"
                )
            })
            .filter_map(|(k, v)| std::str::from_utf8(v).ok().map(|v| (k.as_str(), v)))
            .collect();
        pairs.push((header.as_str(), value.as_str()));
        let sent = self.dispatch_http_call(
            &cluster,
            pairs,
            Some(&body),
            vec![],
            std::time::Duration::from_millis(config.pay_retry_timeout_ms),
        );
        match sent {
            Ok(_) => {
                if let Some(pay) = self.state.borrow_mut().pay.as_mut() {
                    pay.stage = PayStage::Retrying;
                }
            }
            Err(_) => {
                // Nothing was sent with the payment: nothing moved.
                let refusal = Refusal::new(
                    ErrorCode::UpstreamError,
                    "cannot retry the call with its payment",
                );
                release_and_refuse(&config, &self.state, &refusal);
            }
        }
    }

    /// The paid answer: settle from the settlement header, answer the agent with it.
    fn on_paid_answer(&mut self, body_size: usize) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let (version, network, amount) = {
            let state = self.state.borrow();
            let Some(pay) = state.pay.as_ref() else {
                return;
            };
            (pay.version, pay.network.clone(), pay.amount)
        };
        let status = callout::response_status(self);
        let settlement = self.get_http_call_response_header(x402::settlement_header(version));
        let outcome = firewall::payment_outcome(status, settlement.as_deref().map(str::as_bytes));
        let effect = outcome.effect(amount, &network);
        let note = effect.header;
        let cost = settle_stream_payment(&config, &self.state, effect.commit, effect.unconfirmed);
        if let firewall::PaymentOutcome::Failed(reason) = &outcome {
            let reason = if status == Some(402) {
                let required = self.get_http_call_response_header(x402::V2_REQUIRED_HEADER);
                let body = self
                    .get_http_call_response_body(0, body_size)
                    .unwrap_or_default();
                x402::rejection_reason(required.as_deref().map(str::as_bytes), &body)
                    .map_or_else(|| reason.clone(), |why| format!("{reason}: {why}"))
            } else {
                reason.clone()
            };
            let reason = &reason;
            let refusal = Refusal::new(
                ErrorCode::PaymentFailed,
                format!("the server refused the payment: {reason}"),
            )
            .with_fields(vec![("reason", reason.clone())]);
            let view = self.state.borrow().view.clone();
            refuse_stream(&self.state, &refusal, &view);
            return;
        }
        let headers = self.get_http_call_response_headers();
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let (remaining, alert) = {
            let state = self.state.borrow();
            (state.view.remaining_header(), state.view.alert_header())
        };
        let cost_text = cost.to_string();
        let mut out: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(k, _)| {
                !k.starts_with(':')
                    && !k.starts_with(OWN_HEADER_PREFIX)
                    && !matches!(
                        k.as_str(),
                        "content-length" | "transfer-encoding" | "connection"
                    )
            })
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        out.push(("x-pag0-cost", &cost_text));
        out.push(("x-pag0-cached", "false"));
        out.push(("x-pag0-payment", &note));
        if !remaining.is_empty() {
            out.push(("x-pag0-budget-remaining", &remaining));
        }
        if let Some(alert) = &alert {
            out.push(("x-pag0-budget-alert", alert));
        }
        set_state("pag0_cost", &cost_text);
        self.state.borrow_mut().answered_locally = true;
        send_local(status.unwrap_or(502), out, &body);
    }

    /// The upstream's answer headers: settle the call, set pag0's headers, and decide
    /// whether the answer fills the cache.
    fn answer_upstream_headers(
        &mut self,
        config: &Rc<Config>,
        status: Option<u32>,
        from_upstream: bool,
        end_of_stream: bool,
    ) -> Action {
        let config = config.clone();
        let header = response_header;
        let upstream_status = if from_upstream { status } else { None };
        // Only pag0 speaks x-pag0-*: an upstream's own are dropped.
        for (name, _) in hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default()
        {
            if name.starts_with(OWN_HEADER_PREFIX) {
                let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, &name);
            }
        }
        let payment = self.state.borrow_mut().payment.take();
        let cost = match &payment {
            None => settle_stream(&config, &self.state, upstream_status),
            Some(paid) => {
                let settlement = hostcalls::get_map_value_bytes(
                    MapType::HttpResponseHeaders,
                    x402::settlement_header(paid.version),
                )
                .ok()
                .flatten();
                let outcome = firewall::payment_outcome(upstream_status, settlement.as_deref());
                if let firewall::PaymentOutcome::Failed(reason) = &outcome {
                    log(
                        LogLevel::Info,
                        &format!("pag0: relayed payment refused: {reason}"),
                    );
                }
                let effect = outcome.effect(paid.value, &paid.network);
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    "x-pag0-payment",
                    Some(&effect.header),
                );
                settle_stream_payment(&config, &self.state, effect.commit, effect.unconfirmed)
            }
        };
        set_state("pag0_cost", &cost.to_string());
        let set = |name: &str, value: &str| {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        };
        set("x-pag0-cost", &cost.to_string());
        set("x-pag0-cached", "false");
        let (remaining, alert) = {
            let state = self.state.borrow();
            (state.view.remaining_header(), state.view.alert_header())
        };
        if !remaining.is_empty() {
            set("x-pag0-budget-remaining", &remaining);
        }
        if let Some(alert) = alert {
            set("x-pag0-budget-alert", &alert);
        }
        // Decide whether this answer fills the cache.
        let has_fill = self.state.borrow().fill.is_some();
        if has_fill {
            let max = config
                .cache
                .as_ref()
                .map_or(0, |c| c.max_entry_bytes as usize);
            let length_ok = header("content-length")
                .and_then(|l| l.parse::<usize>().ok())
                .is_none_or(|l| l <= max);
            let storable = from_upstream
                && length_ok
                && status.is_some_and(|s| cache::storable(s, header("cache-control").as_deref()));
            if !storable {
                self.abandon_fill();
            } else {
                let content_type = header("content-type").unwrap_or_default();
                let code = status.map_or(200, |s| s as u16);
                {
                    let mut state = self.state.borrow_mut();
                    if let Some(fill) = state.fill.as_mut() {
                        fill.storing = Some((code, content_type));
                    }
                    state.cost = cost;
                }
                if end_of_stream {
                    store_fill(&config, &self.state, b"");
                }
            }
        }
        Action::Continue
    }

    /// A miss at every level: reserve and go upstream (this stream fills the cache).
    fn go_upstream(&mut self, config: &Config, d: &Deferred) -> Action {
        let admitted = admit_stream(config, &self.state, &d.caller, &d.call);
        let action =
            self.approve_or_go(config, &d.caller, &d.call, admitted, AfterApproval::Resume);
        if self.state.borrow().answered_locally {
            self.abandon_fill();
        }
        action
    }

    fn abandon_fill(&self) {
        if let Some(fill) = self.state.borrow_mut().fill.take() {
            let _ = cache::abandon(&HostStore, fill.slot, &fill.key);
        }
    }
}

impl Context for Pag0Http {
    /// The second level's answer to a lookup: serve it, or go upstream.
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        if self.state.borrow().approval.is_some() {
            return self.on_approval(body_size);
        }
        let stage = self.state.borrow().pay.as_ref().map(|p| p.stage);
        match stage {
            Some(PayStage::Signing) => return self.on_signed(body_size),
            Some(PayStage::Retrying) => return self.on_paid_answer(body_size),
            _ => {}
        }
        let deferred = self.state.borrow_mut().deferred.take();
        let (Some(config), Some(d)) = (self.config.clone(), deferred) else {
            return;
        };
        let status = callout::response_status(self);
        let key = self
            .state
            .borrow()
            .fill
            .as_ref()
            .map(|f| (f.slot, f.key.clone()));
        let mut found = None;
        if callout::succeeded(status) {
            let body = self
                .get_http_call_response_body(0, body_size)
                .unwrap_or_default();
            if let Some((slot, key)) = &key {
                found = cache::level2_entry(&body, key, now_millis()).map(|entry| (*slot, entry));
            }
        } else {
            metrics::add("pag0.cache.l2_failures", 1);
        }
        match found {
            Some((slot, entry)) => {
                metrics::add("pag0.cache.l2_hits", 1);
                // Fill level 1 for the next caller, then answer.
                let _ = cache::fill(&HostStore, slot, &entry);
                self.state.borrow_mut().fill = None;
                serve_hit(&config, &self.state, &d.caller, &d.call, &entry);
            }
            None => {
                if matches!(self.go_upstream(&config, &d), Action::Continue) {
                    let _ = hostcalls::resume_http_request();
                }
            }
        }
    }
}

impl HttpContext for Pag0Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
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
        let route = props::route_settings();
        let mut call = match firewall::describe_call(&config, &pseudo(":authority"), &path, &route)
        {
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
        self.state.borrow_mut().charge_on = Some(call.charge_on);
        // Relay mode: an agent that pays with its own wallet pays what its header says.
        let relayed = firewall::relay_payment(
            &config,
            &mut call,
            lookup(x402::V1_PAYMENT_HEADER),
            lookup(x402::V2_PAYMENT_HEADER),
            now_secs(),
        );
        if let Err(refusal) = relayed {
            refuse_caller(
                &config,
                &self.state,
                &caller,
                &call,
                &refusal,
                &BudgetView::default(),
            );
            return Action::Pause;
        }
        let pays = call.payment.is_none()
            && config.signer.is_some()
            && config.policies.get(call.policy).is_some_and(|p| p.pay_x402);
        if pays {
            if let Some(cluster) = props::cluster_name() {
                // The request as it goes upstream: without pag0's own headers.
                let kept = headers
                    .iter()
                    .filter(|(name, _)| !name.starts_with(OWN_HEADER_PREFIX))
                    .cloned()
                    .collect();
                self.state.borrow_mut().pay = Some(PayFlow {
                    caller: caller.clone(),
                    call: call.clone(),
                    cluster,
                    headers: kept,
                    body: Vec::new(),
                    too_big: false,
                    stage: PayStage::Armed,
                    version: 0,
                    network: String::new(),
                    amount: 0,
                });
            }
        }

        let bypass = matches!(lookup("x-pag0-cache-bypass"), HeaderValue::One(v) if v.eq_ignore_ascii_case(b"true"));
        let ttl = config.cache.as_ref().and_then(|c| {
            if bypass || !c.caches_method(&method) {
                return None;
            }
            let route_ttl = route
                .cache_ttl
                .as_deref()
                .and_then(|t| t.parse::<u64>().ok());
            Some(c.ttl_for(&call.endpoint, route_ttl)).filter(|ttl| *ttl > 0)
        });
        let Some(ttl) = ttl else {
            let admitted = admit_stream(&config, &self.state, &caller, &call);
            return self.approve_or_go(&config, &caller, &call, admitted, AfterApproval::Resume);
        };
        let query = String::from_utf8_lossy(&path)
            .split_once('?')
            .map(|(_, q)| q.to_string())
            .unwrap_or_default();
        // Only bodies of known, modest size are read to key the cache: buffering a
        // large upload would hit Envoy's buffer limit (413).
        let body_len = match lookup("content-length") {
            HeaderValue::One(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|t| t.parse::<usize>().ok()),
            _ => None,
        };
        if !end_of_stream && body_len.is_none_or(|len| len > MAX_KEYED_BODY) {
            let admitted = admit_stream(&config, &self.state, &caller, &call);
            return self.approve_or_go(&config, &caller, &call, admitted, AfterApproval::Resume);
        }
        let deferred = Deferred {
            caller,
            call,
            method,
            query,
            ttl,
        };
        if end_of_stream {
            return self.through_cache(&config, deferred, b"");
        }
        // Key the cache on the body: wait for all of it (Envoy buffers it meanwhile).
        // Without `allow_on_headers_stop_iteration` Envoy never hands the body over;
        // the watchdog then lets the call go upstream uncached instead of hanging.
        self.state.borrow_mut().deferred = Some(deferred);
        waiters::watch_body(self.context_id, config.clone(), self.state.clone());
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Waiting for approval: hold the body back with the headers (Envoy would
        // otherwise send both on when this callback says Continue).
        if self.state.borrow().approval.is_some() {
            return Action::Pause;
        }
        if self.state.borrow().deferred.is_none() {
            // Pay mode keeps a copy of the body, to retry the call with a payment.
            let mut state = self.state.borrow_mut();
            if let Some(pay) = state.pay.as_mut() {
                let chunk = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let limit = self.config.as_ref().map_or(0, |c| c.pay_body_limit);
                if pay.body.len() + chunk.len() > limit {
                    pay.too_big = true;
                } else {
                    pay.body.extend_from_slice(&chunk);
                }
            }
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        waiters::forget(self.context_id);
        if let Some(pay) = self.state.borrow_mut().pay.as_mut() {
            let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            pay.too_big = body.len() > self.config.as_ref().map_or(0, |c| c.pay_body_limit);
            pay.body = body;
        }
        let deferred = self.state.borrow_mut().deferred.take();
        let (Some(config), Some(deferred)) = (self.config.clone(), deferred) else {
            return Action::Continue;
        };
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.through_cache(&config, deferred, &body)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let config = self.config.clone();
        {
            let state = self.state.borrow();
            if state.answered_locally || state.ticket.is_none() {
                return Action::Continue;
            }
        }
        let status = response_header(":status").and_then(|s| s.parse::<u32>().ok());
        let from_upstream = props::response_from_upstream();
        let Some(config) = config else {
            return Action::Continue;
        };
        let armed = self
            .state
            .borrow()
            .pay
            .as_ref()
            .is_some_and(|p| p.stage == PayStage::Armed);
        if status == Some(402) && from_upstream && armed {
            if let Some(action) = self.pay_the_402(&config, end_of_stream) {
                return action;
            }
        }
        self.answer_upstream_headers(&config, status, from_upstream, end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let stage = self.state.borrow().pay.as_ref().map(|p| p.stage);
        if stage == Some(PayStage::ReadingOffer) {
            // A 402 without a v2 header: its body may be a v1 offer.
            if !end_of_stream && body_size <= MAX_OFFER_BODY {
                return Action::Pause;
            }
            let Some(config) = self.config.clone() else {
                return Action::Continue;
            };
            let body = if body_size <= MAX_OFFER_BODY {
                hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            return self.pay_the_402_body(&config, &body);
        }
        // Paying for a 402: hold the 402's body back (the paid answer replaces it).
        if stage.is_some_and(|s| s != PayStage::Armed) {
            return Action::Pause;
        }
        let storing = self
            .state
            .borrow()
            .fill
            .as_ref()
            .is_some_and(|f| f.storing.is_some());
        if !storing {
            return Action::Continue;
        }
        let max = self
            .config
            .as_ref()
            .and_then(|c| c.cache.as_ref())
            .map_or(0, |c| c.max_entry_bytes as usize);
        if body_size > max {
            self.abandon_fill();
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        if let Some(config) = self.config.clone() {
            store_fill(&config, &self.state, &body);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        waiters::forget(self.context_id);
        // A call that was forwarded and never answered (the client went away, a
        // timeout): the upstream may have done, and billed, the work, so it stays
        // charged. (An upstream that fails to connect or resets gets a local reply,
        // settled above as not charged.)
        let held = self.state.borrow().ticket.is_some();
        if let (true, Some(config)) = (held, self.config.clone()) {
            settle_stream_as(&config, &self.state, true);
        }
        self.abandon_fill();
        metrics::flush_cas_stats();
    }
}

/// Checks and reserves; on success the stream goes upstream.
#[must_use]
pub fn admit_stream(
    config: &Config,
    state: &Rc<RefCell<StreamState>>,
    caller: &Caller,
    call: &Call,
) -> Action {
    match firewall::admit(config, &HostStore, caller, call, now_secs()) {
        Ok(admission) => {
            let tenant = config
                .tenants
                .get(caller.tenant)
                .map_or("default", |t| t.id.as_str());
            let mut s = state.borrow_mut();
            s.labels = Some(Labels {
                tenant: label(tenant),
                role: metric_role(config, call, caller),
                tool: label(call.tool.as_deref().unwrap_or("other")),
                endpoint: label(&call.metric_endpoint),
            });
            s.ticket = Some(admission.ticket);
            s.payment = call.payment.clone();
            s.view = admission.view;
            Action::Continue
        }
        Err(refused) => {
            refuse_caller(config, state, caller, call, &refused.refusal, &refused.view);
            Action::Pause
        }
    }
}

/// Answers from the cache: free, nothing reserved, the saving counted.
pub fn serve_hit(
    config: &Config,
    state: &Rc<RefCell<StreamState>>,
    caller: &Caller,
    call: &Call,
    entry: &Entry,
) {
    let now_ms = now_millis();
    let view =
        match firewall::record_hit(config, &HostStore, caller, call, entry.cost, now_ms / 1000) {
            Ok(view) => view,
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("pag0: could not count a cache hit: {}", e.message),
                );
                BudgetView::default()
            }
        };
    let tenant = config
        .tenants
        .get(caller.tenant)
        .map_or("default", |t| t.id.as_str());
    metrics::call(
        &Labels {
            tenant: label(tenant),
            role: metric_role(config, call, caller),
            tool: label(call.tool.as_deref().unwrap_or("other")),
            endpoint: label(&call.metric_endpoint),
        },
        0,
        true,
        entry.cost,
    );
    state.borrow_mut().answered_locally = true;
    set_state("pag0_cost", "0");
    set_state("pag0_cached", "true");
    let age = entry.age_secs(now_ms).to_string();
    let remaining = view.remaining_header();
    let alert = view.alert_header();
    let mut headers: Vec<(&str, &str)> = vec![
        ("x-pag0-cost", "0"),
        ("x-pag0-cached", "true"),
        ("x-pag0-cache-age", &age),
    ];
    if !entry.content_type.is_empty() {
        headers.push(("content-type", &entry.content_type));
    }
    if !remaining.is_empty() {
        headers.push(("x-pag0-budget-remaining", &remaining));
    }
    if let Some(alert) = &alert {
        headers.push(("x-pag0-budget-alert", alert));
    }
    send_local(u32::from(entry.status), headers, &entry.body);
}

fn store_fill(config: &Config, state: &Rc<RefCell<StreamState>>, body: &[u8]) {
    let mut s = state.borrow_mut();
    let cost = s.cost;
    let Some(fill) = s.fill.take() else { return };
    let Some((status, content_type)) = fill.storing else {
        let _ = cache::abandon(&HostStore, fill.slot, &fill.key);
        return;
    };
    let entry = Entry {
        key: fill.key.clone(),
        state: EntryState::Filled,
        stored_ms: now_millis(),
        ttl_secs: fill.ttl,
        status,
        cost,
        content_type,
        body: body.to_vec(),
    };
    if let Err(e) = cache::fill(&HostStore, fill.slot, &entry) {
        log(
            LogLevel::Warn,
            &format!("pag0: could not fill the cache: {}", e.message),
        );
    }
    if let Some(level2) = config.cache.as_ref().and_then(|c| c.level2.as_ref()) {
        alerts::queue(Outgoing {
            kind: Kind::CacheWrite,
            cluster: level2.cluster.clone(),
            method: "PUT",
            path: cache::level2_set_path(&entry.key, entry.ttl_secs),
            authority: "pag0-cache".to_string(),
            content_type: "text/plain",
            body: cache::level2_value(&entry),
            timeout_ms: level2.timeout_ms,
        });
    }
}

/// Gives back the stream's reservation, then refuses: nothing was paid or forwarded.
fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn release_and_refuse(config: &Config, state: &Rc<RefCell<StreamState>>, refusal: &Refusal) {
    settle_stream_payment(config, state, false, false);
    refuse_stream(state, refusal, &BudgetView::default());
}

fn refuse_stream(state: &Rc<RefCell<StreamState>>, refusal: &Refusal, view: &BudgetView) {
    log(
        LogLevel::Debug,
        &format!(
            "pag0: refused {}: {}",
            refusal.code.as_str(),
            refusal.message
        ),
    );
    state.borrow_mut().answered_locally = true;
    set_state("pag0_cost", "0");
    set_state("pag0_error", refusal.code.as_str());
    send_refusal(refusal, view);
}

/// A refusal after the caller is known: counted in the session and the metrics.
pub fn refuse_caller(
    config: &Config,
    state: &Rc<RefCell<StreamState>>,
    caller: &Caller,
    call: &Call,
    refusal: &Refusal,
    view: &BudgetView,
) {
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
    refuse_stream(state, refusal, view);
}

fn settle_stream(
    config: &Config,
    state: &Rc<RefCell<StreamState>>,
    upstream_status: Option<u32>,
) -> u64 {
    let charge_on = state.borrow().charge_on.unwrap_or(ChargeOn::Success);
    settle_stream_as(
        config,
        state,
        firewall::should_commit(charge_on, upstream_status),
    )
}

fn settle_stream_as(config: &Config, state: &Rc<RefCell<StreamState>>, commit: bool) -> u64 {
    settle_stream_payment(config, state, commit, false)
}

fn settle_stream_payment(
    config: &Config,
    state: &Rc<RefCell<StreamState>>,
    commit: bool,
    unconfirmed: bool,
) -> u64 {
    let (ticket, labels) = {
        let mut s = state.borrow_mut();
        (s.ticket.take(), s.labels.take())
    };
    let Some(ticket) = ticket else { return 0 };
    let cost = match firewall::settle_payment(
        config,
        &HostStore,
        &ticket,
        commit,
        unconfirmed,
        now_secs(),
    ) {
        Ok(settled) => {
            state.borrow_mut().view = settled.view;
            queue_alerts(config, settled.alerts);
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
    if let Some(labels) = labels {
        metrics::call(&labels, cost, false, 0);
    }
    cost
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

pub fn queue_alerts(config: &Config, raised: Vec<Alert>) {
    let Some(sink) = &config.alerts else {
        return;
    };
    for alert in raised {
        alerts::queue(Outgoing {
            kind: Kind::Alert,
            cluster: sink.cluster.clone(),
            method: "POST",
            path: sink.path.clone(),
            authority: sink.authority.clone(),
            content_type: "application/json",
            body: alert.to_json(),
            timeout_ms: sink.timeout_ms,
        });
    }
}

/// Filter state for access logs: `%FILTER_STATE(wasm.pag0_cost:PLAIN)%`.
pub fn set_state(name: &str, value: &str) {
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
