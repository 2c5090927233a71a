//! Before anything is reserved: who is calling ([`identify`]), what the call is and
//! costs ([`describe_call`]), and, on x402 relay routes, the agent's own payment
//! ([`relay_payment`]). The budgets themselves are the ledger's
//! ([`crate::core::ledger`]).

use crate::core::amount::Amount;
use crate::core::call::{Call, Caller, HeaderValue, MeterKind, RelayedPayment, RouteSettings};
use crate::core::compile::{
    check_route_endpoint, check_route_price, check_route_tool, parse_charge_on, Config,
};
use crate::core::endpoint::endpoint;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::identity::valid_id;
use crate::core::policy::ChargeOn;
use crate::core::x402;

/// Identifies the caller from its headers: tenant by API key (401 when the config
/// lists tenants and the key is missing or unknown), session and agent ids (400 when
/// malformed). `header` looks a header up by lowercase name; `tenant_for_key` maps an
/// API key to its tenant (memoized by the host); `route_session` is the route's
/// default session, if it names one.
pub fn identify(
    cfg: &Config,
    header: &dyn Fn(&str) -> HeaderValue,
    tenant_for_key: &mut dyn FnMut(&[u8]) -> Option<usize>,
    route_session: Option<&str>,
) -> Result<Caller, Refusal> {
    let id = &cfg.identity;
    let tenant = if cfg.requires_api_key() {
        match header(&id.api_key_header) {
            HeaderValue::One(key) => tenant_for_key(&key).ok_or_else(|| {
                Refusal::new(ErrorCode::Unauthorized, "unknown API key")
                    .with_fields(vec![("header", id.api_key_header.clone())])
            })?,
            HeaderValue::Missing => {
                return Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    format!("missing API key header {}", id.api_key_header),
                )
                .with_fields(vec![("header", id.api_key_header.clone())]))
            }
            HeaderValue::Many => return Err(duplicate(&id.api_key_header)),
        }
    } else {
        0
    };
    let mut session = None;
    for name in &id.session_headers {
        match header(name) {
            HeaderValue::One(v) => {
                session = Some(checked_id(v, name)?);
                break;
            }
            HeaderValue::Missing => {}
            HeaderValue::Many => return Err(duplicate(name)),
        }
    }
    let session = match session {
        Some(s) => s,
        None => match route_session.or(id.default_session.as_deref()) {
            Some(default) => default.to_string(),
            None => {
                let names = id.session_headers.join(" or ");
                return Err(Refusal::new(
                    ErrorCode::InvalidRequest,
                    format!("missing session header {names}"),
                )
                .with_fields(vec![("header", names)]));
            }
        },
    };
    let mut agent = None;
    for name in &id.agent_headers {
        match header(name) {
            HeaderValue::One(v) => {
                agent = Some(checked_id(v, name)?);
                break;
            }
            HeaderValue::Missing => {}
            HeaderValue::Many => return Err(duplicate(name)),
        }
    }
    let parent = match &id.parent_agent_header {
        None => None,
        Some(name) => match header(name) {
            HeaderValue::One(v) => Some(checked_id(v, name)?),
            HeaderValue::Missing => None,
            HeaderValue::Many => return Err(duplicate(name)),
        },
    };
    Ok(Caller {
        tenant,
        session,
        agent: agent.unwrap_or_else(|| id.default_agent.clone()),
        parent,
    })
}

fn duplicate(name: &str) -> Refusal {
    Refusal::new(
        ErrorCode::InvalidRequest,
        format!("header {name} is sent more than once"),
    )
    .with_fields(vec![("header", name.to_string())])
}

fn checked_id(value: Vec<u8>, name: &str) -> Result<String, Refusal> {
    if !valid_id(&value) {
        return Err(Refusal::new(
            ErrorCode::InvalidRequest,
            format!("header {name} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -"),
        )
        .with_fields(vec![("header", name.to_string())]));
    }
    String::from_utf8(value).map_err(|_| {
        Refusal::new(
            ErrorCode::InvalidRequest,
            format!("header {name} is not text"),
        )
    })
}

/// A boolean route setting written as a string (`"true"` / `"false"`).
fn route_flag(value: &Option<String>, field: &str) -> Result<Option<bool>, Refusal> {
    match value.as_deref() {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(Refusal::new(
            ErrorCode::ConfigError,
            format!("route metadata pag0.{field} {other:?} must be \"true\" or \"false\""),
        )),
    }
}

/// What a route's metadata says, checked: the same for every request of the route,
/// so the host checks each distinct metadata once (see [`check_route`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteChecked {
    pub policy: usize,
    pub price: Option<Amount>,
    pub tool: Option<String>,
    pub charge_on: ChargeOn,
    pub x402: Option<bool>,
    pub meter: Option<MeterKind>,
    pub cache_ttl: Option<u64>,
}

/// Checks a route's metadata against the configuration. Bad metadata fails closed
/// (500 CONFIG_ERROR): a misspelt key or price must never make a route free.
pub fn check_route(cfg: &Config, route: &RouteSettings) -> Result<RouteChecked, Refusal> {
    let config_error = |m: String| Refusal::new(ErrorCode::ConfigError, m);
    if let Some(key) = &route.unknown {
        return Err(config_error(format!(
            "route metadata pag0.{key} is not a pag0 setting (a misspelt price must not make a route free)"
        )));
    }
    let policy = match &route.policy {
        None => cfg.default_policy,
        Some(name) => *cfg.policy_by_name.get(name.as_str()).ok_or_else(|| {
            config_error(format!(
                "route metadata pag0.policy names unknown policy {name:?}"
            ))
        })?,
    };
    let price = match &route.price {
        Some(text) => Some(check_route_price(text).map_err(config_error)?),
        None => None,
    };
    if let Some(t) = &route.tool {
        check_route_tool(t).map_err(config_error)?;
    }
    let charge_on = match &route.charge_on {
        Some(text) => parse_charge_on(text).map_err(config_error)?,
        None => cfg
            .policies
            .get(policy)
            .map_or(ChargeOn::Success, |p| p.charge_on),
    };
    if let Some(label) = &route.endpoint {
        check_route_endpoint(label).map_err(config_error)?;
    }
    let cache_ttl = match &route.cache_ttl {
        None => None,
        Some(ttl) => Some(ttl.parse::<u64>().map_err(|_| {
            config_error(format!(
                "route metadata pag0.cacheTTL {ttl:?} must be a number of seconds, as a string"
            ))
        })?),
    };
    if let Some(session) = &route.default_session {
        if !valid_id(session.as_bytes()) {
            return Err(config_error(format!(
                "route metadata pag0.defaultSession {session:?} is not a valid session id"
            )));
        }
    }
    let x402 = route_flag(&route.x402, "x402")?;
    let meter = match route.meter.as_deref() {
        None => None,
        Some("anthropic") => Some(MeterKind::Anthropic),
        Some("openai") => Some(MeterKind::OpenAi),
        Some(other) => {
            return Err(config_error(format!(
                "route metadata pag0.meter {other:?} must be \"anthropic\" or \"openai\""
            )))
        }
    };
    if meter.is_some() {
        if cfg.llm.is_none() {
            return Err(config_error(
                "route metadata pag0.meter needs the llm block (llm.prices) in the plugin configuration".to_string(),
            ));
        }
        if price.is_some() || x402 == Some(true) {
            return Err(config_error(
                "route metadata pag0.meter prices calls by their tokens: drop pag0.price and pag0.x402 on this route".to_string(),
            ));
        }
    }
    Ok(RouteChecked {
        policy,
        price,
        tool: route.tool.clone(),
        charge_on,
        x402,
        meter,
        cache_ttl,
    })
}

/// Resolves endpoint, policy, price and tool. A price comes from the route, else the
/// first matching endpoint rule, else 0. Bad route metadata fails closed (500).
pub fn describe_call(
    cfg: &Config,
    authority: &[u8],
    path: &[u8],
    route: &RouteSettings,
) -> Result<Call, Refusal> {
    let checked = check_route(cfg, route)?;
    describe_checked(cfg, authority, path, route, &checked)
}

/// [`describe_call`] for a route already checked.
pub fn describe_checked(
    cfg: &Config,
    authority: &[u8],
    path: &[u8],
    route: &RouteSettings,
    checked: &RouteChecked,
) -> Result<Call, Refusal> {
    let endpoint = endpoint(authority, path)
        .map_err(|e| Refusal::new(ErrorCode::InvalidRequest, e.to_string()))?;
    let rule = cfg.endpoint_rule(&endpoint);
    let price = checked.price.or_else(|| rule.and_then(|r| r.price));
    let tool = match &checked.tool {
        Some(t) => Some(t.clone()),
        None => rule.and_then(|r| r.tool.clone()),
    };
    // The meter prices the API's calls (messages, completions, responses); any other
    // path of a metered route (token counting, model lists) is priced as the route
    // would be without it.
    // A route's own price or x402 flag wins over an endpoint rule's meter.
    let rule_meter = match (checked.price, checked.x402) {
        (None, None | Some(false)) => rule.and_then(|r| r.meter),
        _ => None,
    };
    let meter = checked.meter.or(rule_meter).filter(|kind| {
        crate::core::meter::request::Api::for_path(*kind, &String::from_utf8_lossy(path)).is_some()
    });
    // And a route's meter wins over an endpoint rule's x402 flag, as over its price: a
    // metered call is priced by its tokens, so an agent's own payment on it is refused
    // rather than budgeted as tokens.
    let x402 = checked
        .x402
        .unwrap_or_else(|| meter.is_none() && rule.is_some_and(|r| r.x402));
    let labelled = rule
        .map(|r| r.glob.source().to_string())
        .or_else(|| route.endpoint.clone());
    let host = endpoint.split('/').next().unwrap_or("").to_string();
    Ok(Call {
        endpoint_label: labelled.clone().unwrap_or(host),
        metric_endpoint: labelled.unwrap_or_else(|| "other".to_string()),
        endpoint,
        policy: checked.policy,
        priced: price.is_some() || meter.is_some() || x402,
        price: price.unwrap_or(0),
        min_price: None,
        tool,
        charge_on: checked.charge_on,
        x402,
        meter,
        payment: None,
    })
}

/// An agent's x402 payment header, when it sends one. Relay mode only ever adds a
/// check: on an x402 route whose policy relays, the payment is decoded and checked
/// against the policy's x402 rules, and its worth in the budget's unit is reserved
/// when it is more than the route's price (it never lowers what a call costs).
/// Anywhere else (a route that is not an x402 route, or one where pag0 pays itself) a
/// payment header is refused: pag0 cannot budget a payment it does not expect.
pub fn relay_payment(
    cfg: &Config,
    call: &mut Call,
    v1: HeaderValue,
    v2: HeaderValue,
    now: u64,
    offered_asset: &dyn Fn(&x402::Payment) -> Option<String>,
) -> Result<(), Refusal> {
    let bad = |m: String| Refusal::new(ErrorCode::InvalidRequest, m);
    let (version, value) = match (v1, v2) {
        (HeaderValue::Missing, HeaderValue::Missing) => return Ok(()),
        (HeaderValue::One(v), HeaderValue::Missing) => (1, v),
        (HeaderValue::Missing, HeaderValue::One(v)) => (2, v),
        _ => return Err(bad("send one payment header, once".into())),
    };
    let policy = cfg
        .policies
        .get(call.policy)
        .ok_or_else(|| Refusal::new(ErrorCode::InternalError, "policy index out of range"))?;
    if !call.x402 || policy.pay_x402 {
        let why = if call.x402 {
            "pag0 pays this route's x402 payments itself (pay mode); send the request without a payment header"
        } else {
            "this route is not an x402 route (route metadata x402: \"true\"), so pag0 does not relay payments on it"
        };
        return Err(Refusal::new(ErrorCode::PaymentNotAllowed, why)
            .with_fields(vec![("endpoint", call.endpoint.clone())]));
    }
    let payment =
        x402::parse_payment_header(&value).map_err(|e| bad(format!("payment header: {e}")))?;
    if payment.version != version {
        return Err(bad(format!(
            "payment header carries x402Version {}, but its header is for version {version}",
            payment.version
        )));
    }
    if payment.value == 0 {
        return Err(bad("payment value must be positive".into()));
    }
    if payment.valid_before <= now {
        return Err(bad("payment authorization has expired (validBefore)".into()));
    }
    let asset = payment
        .accepted
        .as_ref()
        .map(|a| a.asset.clone())
        .or_else(|| offered_asset(&payment));
    let rules = &policy.payments;
    let worth = rules
        .check_payment(
            &payment.scheme,
            &payment.network,
            asset.as_deref(),
            &payment.to,
        )
        .and_then(|()| {
            // What the payment spends in the budget's unit (an asset of other than 6
            // decimals is scaled), not its raw value.
            rules.to_budget(
                &payment.network,
                asset.as_deref().unwrap_or_default(),
                payment.value,
            )
        })
        .map_err(|why| {
            Refusal::new(
                ErrorCode::PaymentNotAllowed,
                format!("the payment is not allowed by policy: {why}"),
            )
            .with_fields(vec![
                ("network", payment.network.clone()),
                ("payTo", payment.to.clone()),
                ("asset", asset.clone().unwrap_or_default()),
                ("requested", payment.value.to_string()),
            ])
        })?;
    call.price = call.price.max(worth);
    call.payment = Some(RelayedPayment {
        version,
        network: payment.network,
        value: payment.value,
    });
    Ok(())
}

/// The approval service, when this call's price is above the policy's threshold.
pub fn approval_for<'a>(cfg: &'a Config, call: &Call) -> Option<&'a crate::core::policy::Approval> {
    cfg.policies
        .get(call.policy)
        .and_then(|p| p.approval.as_ref())
        .filter(|a| call.price > a.threshold)
}

/// What the approval service is asked.
pub fn approval_request(cfg: &Config, caller: &Caller, call: &Call) -> String {
    let tenant = cfg.tenant_id(caller.tenant);
    serde_json::json!({
        "tenant": tenant,
        "session": caller.session,
        "agent": caller.agent,
        "endpoint": call.endpoint,
        "tool": call.tool,
        "price": call.price.to_string(),
    })
    .to_string()
}

/// The approval service's answer: `{"approved": true|false, "reason": "…"}`. `None`:
/// no usable answer (treated as no answer in time).
pub fn approval_answer(ok_status: bool, body: &[u8]) -> Option<(bool, Option<String>)> {
    if !ok_status {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let approved = v.get("approved")?.as_bool()?;
    let reason = v
        .get("reason")
        .and_then(|r| r.as_str())
        .map(|r| r.chars().take(200).collect());
    Some((approved, reason))
}

/// The endpoint lists of the call's policy, for calls that will be answered from the
/// cache (a blocked endpoint is blocked even when its answer is cached).
pub fn check_lists(cfg: &Config, caller: &Caller, call: &Call) -> Result<(), Refusal> {
    let policy = cfg
        .policies
        .get(call.policy)
        .ok_or_else(|| Refusal::new(ErrorCode::InternalError, "policy index out of range"))?;
    if policy.refuses_agent(&caller.agent) {
        return Err(crate::core::policy::unmatched_agent(&caller.agent));
    }
    crate::core::policy::check_priced(policy, call)?;
    crate::core::policy::check_rules(policy, policy.agent_rule(&caller.agent), &call.endpoint, 0)
}

/// Whether the caller's agent keeps a private cache (`inheritParentCache: false`).
pub fn private_cache(cfg: &Config, caller: &Caller, call: &Call) -> bool {
    cfg.policies
        .get(call.policy)
        .and_then(|p| p.agent_rule(&caller.agent))
        .is_some_and(|rule| !rule.inherit_cache)
}

/// Whether a response commits the reservation.
pub fn should_commit(charge_on: ChargeOn, upstream_status: Option<u32>) -> bool {
    match (charge_on, upstream_status) {
        (_, None) => false,
        (ChargeOn::Success, Some(status)) => (200..300).contains(&status),
        (ChargeOn::Always, Some(_)) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::base64;
    use crate::core::compile::compile_json;
    use serde_json::json;

    const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
    /// A USD token of 2 decimals: 1 of its units is 10000 in the budget's unit.
    const CENTS: &str = "0x00000000000000000000000000000000000000d2";

    fn config() -> Config {
        let json = format!(
            r#"{{"endpoints": [{{"pattern": "x402.example/*", "x402": true, "price": "1000"}}],
                "policies": {{"p": {{"sessionBudget": "3000000",
                    "x402": {{"mode": "relay", "assets": [{{"address": "{CENTS}", "decimals": 2}}]}}}}}}}}"#
        );
        compile_json(json.as_bytes()).unwrap()
    }

    fn payment(value: u64) -> HeaderValue {
        let v = json!({
            "x402Version": 2,
            "payload": {"signature": format!("0x{}", "cd".repeat(65)), "authorization": {
                "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": PAY_TO,
                "value": value.to_string(), "validAfter": "0", "validBefore": "2000000000",
                "nonce": format!("0x{}", "ab".repeat(32))}},
            "accepted": {"scheme": "exact", "network": "eip155:8453", "amount": value.to_string(),
                "asset": CENTS, "payTo": PAY_TO, "maxTimeoutSeconds": 60},
        });
        HeaderValue::One(base64::encode(v.to_string().as_bytes()).into_bytes())
    }

    fn relay(cfg: &Config, value: u64) -> Result<Call, Refusal> {
        let mut call = describe_call(cfg, b"x402.example", b"/a", &RouteSettings::default())?;
        relay_payment(
            cfg,
            &mut call,
            HeaderValue::Missing,
            payment(value),
            1_000_000_000,
            &|_| None,
        )?;
        Ok(call)
    }

    #[test]
    fn a_relayed_payment_in_a_two_decimal_token_reserves_its_worth_in_usdc_units() {
        let cfg = config();
        // 250 cents are $2.50: 2500000 in the budget's unit, not 250.
        let call = relay(&cfg, 250).unwrap();
        assert_eq!(call.price, 2_500_000);
        assert_eq!(call.payment.map(|p| p.value), Some(250));
        // A payment worth more than any amount the ledger can hold is refused.
        let refused = relay(&cfg, u64::MAX).unwrap_err();
        assert_eq!(refused.code, ErrorCode::PaymentNotAllowed);
    }

    #[test]
    fn a_metered_route_on_an_x402_endpoint_refuses_the_agents_payment() {
        let json = format!(
            r#"{{"endpoints": [{{"pattern": "x402.example/*", "x402": true, "price": "1000"}}],
                "llm": {{"prices": {{"claude-*": {{"input": "3000000", "output": "15000000",
                    "cacheWrite5m": "3750000", "cacheWrite1h": "6000000", "cacheRead": "300000"}}}}}},
                "policies": {{"p": {{"sessionBudget": "3000000", "x402": {{"mode": "relay",
                    "assets": [{{"address": "{CENTS}", "decimals": 2}}]}}}}}}}}"#
        );
        let cfg = compile_json(json.as_bytes()).unwrap();
        let route = RouteSettings {
            meter: Some("anthropic".into()),
            ..RouteSettings::default()
        };
        // The call is priced by its tokens: a payment of $2.50 cannot ride on it, where
        // the token bound would take the place of the payment's worth.
        let mut call = describe_call(&cfg, b"x402.example", b"/v1/messages", &route).unwrap();
        assert_eq!((call.meter, call.x402), (Some(MeterKind::Anthropic), false));
        let refused = relay_payment(
            &cfg,
            &mut call,
            HeaderValue::Missing,
            payment(250),
            1_000_000_000,
            &|_| None,
        )
        .unwrap_err();
        assert_eq!(refused.code, ErrorCode::PaymentNotAllowed);
        // A path the meter does not price is the x402 route it was.
        let other = describe_call(&cfg, b"x402.example", b"/v1/models", &route).unwrap();
        assert_eq!((other.meter, other.x402), (None, true));
    }
}
