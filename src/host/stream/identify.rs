//! Request headers: pag0's own headers are removed first, whatever happens next; then
//! the request is pag0's own paid retry coming back (passed through), the report API,
//! or an agent's call: who is calling, what the call is, what the gate will need.

use proxy_wasm::types::MapType;

use crate::core::admin;
use crate::core::cache::{request_bypasses, CREDENTIAL_HEADERS};
use crate::core::call::{Call, HeaderValue};
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::firewall;
use crate::core::headers::BudgetView;
use crate::core::offers;
use crate::core::x402;
use crate::host::reply::Shape;
use crate::host::shared::HostStore;
use crate::host::stream::budget::{answer_refusal, refuse, set_state};
use crate::host::stream::state::{CacheRequest, PayFlow, PayStage};
use crate::host::stream::{
    admin as admin_stage, breaker, gate, meter, waiters, Dispatch, Step, Stream,
};
use crate::host::{abi, log, now_millis, props, vm};

/// Request headers with this prefix are pag0's own and never reach the upstream.
pub const OWN_HEADER_PREFIX: &str = "x-pag0-";
/// Marks pag0's own paid retry when it comes back through the listener (the value is
/// the VM's secret; anything else is stripped like any `x-pag0-*` header).
pub const INTERNAL_HEADER: &str = "x-pag0-internal";
/// Largest request body read to key the cache; bigger or unsized bodies skip it.
pub const MAX_KEYED_BODY: usize = 256 * 1024;

pub fn on_request_headers(d: &dyn Dispatch, stream: &Stream, end_of_stream: bool) -> Step {
    let cfg = stream.config.clone();
    let headers = abi::HeaderMap::read(MapType::HttpRequestHeaders);
    if let Some(name) = &cfg.crash_header {
        if headers.get(name).is_some() {
            // Chaos testing only (faultInjection.crashHeader): a trap, as a panic is.
            log(
                proxy_wasm::types::LogLevel::Warn,
                "pag0: crashing this VM on request (faultInjection)",
            );
            std::process::abort();
        }
    }
    let mut internal = None;
    let mut stripped: Vec<&[u8]> = Vec::new();
    for (name, value) in headers.iter() {
        if name.starts_with(OWN_HEADER_PREFIX.as_bytes()) && !stripped.contains(&name) {
            if name == INTERNAL_HEADER.as_bytes() {
                internal = Some(value);
            }
            stripped.push(name);
            if let Ok(name) = std::str::from_utf8(name) {
                let _ = abi::remove_header(MapType::HttpRequestHeaders, name);
            }
        }
    }
    if let Some(marker) = internal {
        if vm::secret().is_some_and(|secret| secret.as_bytes() == marker) {
            stream.state.borrow_mut().internal = true;
            return Step::Continue;
        }
    }
    let lookup = |wanted: &str| -> HeaderValue { headers.lookup(wanted) };
    let one = |name: &str| headers.get(name).unwrap_or_default();
    let path = one(":path").to_vec();
    let method = String::from_utf8_lossy(one(":method")).into_owned();
    if let Some(route) = admin::route(&cfg, &method, &String::from_utf8_lossy(&path)) {
        return admin_stage::serve(d, stream, route, &headers, &path);
    }
    let route = props::route(&cfg);
    let mut key_memo = |key: &[u8]| vm::tenant_for_key(&cfg, key);
    let caller = match firewall::identify(
        &cfg,
        &lookup,
        &mut key_memo,
        route.settings.default_session.as_deref(),
    ) {
        Ok(caller) => caller,
        Err(refusal) => {
            answer_refusal(stream, &refusal, &BudgetView::default());
            return Step::Pause;
        }
    };
    let described = match &route.checked {
        Ok(checked) => {
            firewall::describe_checked(&cfg, one(":authority"), &path, &route.settings, checked)
        }
        Err(refusal) => Err(refusal.clone()),
    };
    let mut call = match described {
        Ok(call) => call,
        Err(refusal) => {
            if refusal.code == ErrorCode::ConfigError {
                log(
                    proxy_wasm::types::LogLevel::Error,
                    &format!("pag0: {}", refusal.message),
                );
            }
            answer_refusal(stream, &refusal, &BudgetView::default());
            return Step::Pause;
        }
    };
    // A CORS preflight never reaches a paid handler: checked, never charged.
    if method == "OPTIONS" {
        call.price = 0;
        call.meter = None;
    }
    set_state(stream, "pag0_agent", &caller.agent);
    set_state(stream, "pag0_session", &caller.session);
    set_state(stream, "pag0_cached", "false");
    {
        let mut s = stream.state.borrow_mut();
        s.method = method.clone();
        s.path = path.clone();
        s.shape = match call.meter {
            Some(crate::core::call::MeterKind::Anthropic) => Shape::Anthropic,
            Some(crate::core::call::MeterKind::OpenAi) => Shape::OpenAi,
            None => Shape::Pag0,
        };
    }
    // x402 relay: the agent's own payment only ever adds a check.
    let tenant = cfg.tenant_id(caller.tenant);
    let offered = |p: &x402::Payment| {
        let of = offers::OfferOf {
            tenant,
            session: &caller.session,
            endpoint: &call.endpoint,
        };
        offers::asset_for(&HostStore, of, &p.network, &p.to, p.value, now_millis())
    };
    let (v1, v2) = (
        lookup(x402::V1_PAYMENT_HEADER),
        lookup(x402::V2_PAYMENT_HEADER),
    );
    let call = if v1 == HeaderValue::Missing && v2 == HeaderValue::Missing {
        call
    } else {
        let mut relayed = call.clone();
        if let Err(refusal) =
            firewall::relay_payment(&cfg, &mut relayed, v1, v2, now_millis() / 1000, &offered)
        {
            refuse(stream, &caller, &call, &refusal, &BudgetView::default());
            return Step::Pause;
        }
        relayed
    };
    let pays = call.x402
        && call.payment.is_none()
        && cfg.signer.is_some()
        && cfg.policies.get(call.policy).is_some_and(|p| p.pay_x402);
    if pays {
        if let Some(step) = arm_pay(stream, &caller, &call, &headers, &lookup) {
            return step;
        }
    }
    let route_ttl = route.checked.as_ref().ok().and_then(|c| c.cache_ttl);
    let cache = cache_request(
        stream,
        &call,
        &method,
        &path,
        &lookup,
        end_of_stream,
        route_ttl,
    );
    let meter_api = meter::api_of(&call, &path);
    if let (Some(_), Some(settings)) = (meter_api, cfg.llm.as_ref()) {
        let length = headers
            .get("content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<usize>().ok());
        if length.is_some_and(|len| len > settings.max_body_bytes) {
            let refusal = Refusal::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the request body is over llm.maxBodyBytes ({}), the most pag0 reads to meter a call",
                    settings.max_body_bytes
                ),
            )
            .with_status(413);
            refuse(stream, &caller, &call, &refusal, &BudgetView::default());
            return Step::Pause;
        }
    }
    // The repeat breaker tells requests apart by their bodies.
    let needs_body = (cache.as_ref().is_some_and(|c| c.1)
        || meter_api.is_some()
        || breaker::applies(stream, &caller, &call))
        && !end_of_stream;
    {
        let mut s = stream.state.borrow_mut();
        s.cache = cache.map(|(c, _)| c);
        s.meter_api = meter_api;
        s.caller = Some(std::rc::Rc::new(caller));
        s.call = Some(std::rc::Rc::new(call));
    }
    if needs_body {
        // Key the cache on the body: the gate runs when all of it is in (Envoy
        // buffers it meanwhile). Without `allow_on_headers_stop_iteration` Envoy
        // never hands the body over; the watchdog then lets the call go on uncached.
        stream.state.borrow_mut().deferred.waiting = true;
        waiters::watch_body(stream.clone());
        return Step::Pause;
    }
    gate::run(d, stream)
}

/// Pay mode on an x402 route: keep what a paid retry needs (headers, and the
/// body as it passes), within the VM's budget for kept bodies.
fn arm_pay(
    stream: &Stream,
    caller: &crate::core::call::Caller,
    call: &Call,
    headers: &abi::HeaderMap,
    lookup: &dyn Fn(&str) -> HeaderValue,
) -> Option<Step> {
    let cfg = &stream.config;
    let length = match lookup("content-length") {
        HeaderValue::One(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|t| t.parse::<usize>().ok()),
        _ => None,
    };
    let mut lost_body = None;
    let mut held = 0;
    if let Some(len) = length {
        if len > cfg.pay_body_limit {
            lost_body = Some("larger than signer.maxBodyBytes");
        } else if !vm::hold_bytes(len, cfg.pay_buffer_limit) {
            let refusal = Refusal::new(
                ErrorCode::CapacityExceeded,
                "request bodies kept for paid retries are at signer.maxBufferedBytes; try again shortly",
            )
            .with_retry_after(1);
            refuse(stream, caller, call, &refusal, &BudgetView::default());
            return Some(Step::Pause);
        } else {
            held = len;
        }
    }
    let kept = headers
        .iter()
        .filter(|(name, _)| !name.starts_with(OWN_HEADER_PREFIX.as_bytes()))
        .map(|(name, value)| (String::from_utf8_lossy(name).into_owned(), value.to_vec()))
        .collect();
    stream.state.borrow_mut().pay = Some(PayFlow {
        headers: kept,
        body: Vec::with_capacity(held),
        held,
        lost_body,
        stage: PayStage::Armed,
        version: 0,
        network: String::new(),
        amount: 0,
    });
    None
}

/// What the cache stage needs, when the call may be cached; and whether the gate must
/// wait for the body to key it.
fn cache_request(
    stream: &Stream,
    call: &Call,
    method: &str,
    path: &[u8],
    lookup: &dyn Fn(&str) -> HeaderValue,
    end_of_stream: bool,
    route_ttl: Option<u64>,
) -> Option<(CacheRequest, bool)> {
    let cfg = stream.config.cache.as_ref()?;
    let one = |name: &str| match lookup(name) {
        HeaderValue::One(v) => v,
        _ => Vec::new(),
    };
    let bypass = matches!(lookup("x-pag0-cache-bypass"), HeaderValue::One(v) if v.eq_ignore_ascii_case(b"true"));
    let cache_control = match lookup("cache-control") {
        HeaderValue::One(v) => Some(v),
        _ => None,
    };
    let range = !matches!(lookup("range"), HeaderValue::Missing);
    // Metered calls are never served from the cache: a cached answer's tokens were
    // paid once, and a stream cannot be stored.
    if bypass
        || !cfg.caches_method(method)
        || request_bypasses(cache_control.as_deref(), range)
        || call.x402
        || call.meter.is_some()
    {
        return None;
    }
    let ttl = cfg.ttl_for(&call.endpoint, route_ttl);
    if ttl == 0 {
        return None;
    }
    // Only bodies of known, modest size are read to key the cache: buffering a large
    // upload would hit Envoy's buffer limit (413).
    let body_len = match lookup("content-length") {
        HeaderValue::One(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|t| t.parse::<usize>().ok()),
        _ => None,
    };
    if !end_of_stream && body_len.is_none_or(|len| len > MAX_KEYED_BODY) {
        return None;
    }
    let query = path
        .iter()
        .position(|b| *b == b'?')
        .map_or(Vec::new(), |at| path[at + 1..].to_vec());
    let credentials = CREDENTIAL_HEADERS
        .iter()
        .map(|h| one(h))
        .collect::<Vec<_>>();
    Some((
        CacheRequest {
            ttl,
            authority: one(":authority"),
            query,
            content_type: one("content-type"),
            accept: one("accept"),
            accept_encoding: one("accept-encoding"),
            credentials,
        },
        !end_of_stream,
    ))
}
