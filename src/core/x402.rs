//! x402 (HTTP 402 payments) on the wire, both protocol versions, parsed without trust:
//! every field checked, amounts as decimal strings of up to 256 bits refused when they do
//! not fit the ledger, anything malformed an error value, never a panic.
//!
//! - v1: requirements in the 402 JSON body (`accepts[]` with `maxAmountRequired`), the
//!   payment in `X-PAYMENT`, the settlement in `X-PAYMENT-RESPONSE`.
//! - v2: requirements in the `PAYMENT-REQUIRED` header (base64 JSON, `accepts[]` with
//!   `amount`, top-level `resource`), the payment in `PAYMENT-SIGNATURE` (its `accepted`
//!   repeats the chosen entry), the settlement in `PAYMENT-RESPONSE`.

use serde_json::Value;

use crate::core::amount::{parse_amount, Amount, AmountError};
use crate::core::base64;

pub const V1_PAYMENT_HEADER: &str = "x-payment";
pub const V1_RESPONSE_HEADER: &str = "x-payment-response";
pub const V2_REQUIRED_HEADER: &str = "payment-required";
pub const V2_PAYMENT_HEADER: &str = "payment-signature";
pub const V2_RESPONSE_HEADER: &str = "payment-response";

/// Where a server of this protocol version puts its settlement.
pub fn settlement_header(version: u8) -> &'static str {
    if version == 1 {
        V1_RESPONSE_HEADER
    } else {
        V2_RESPONSE_HEADER
    }
}

/// Largest encoded header or body pag0 will parse (a real one is well under 8 KiB).
const MAX_ENCODED: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum X402Error {
    TooLarge,
    NotBase64,
    NotJson,
    UnsupportedVersion(i64),
    Missing(&'static str),
    Invalid(&'static str, String),
    /// An amount that does not fit the budget arithmetic (above 64 bits).
    AmountTooLarge(String),
    NoRequirements,
}

impl std::fmt::Display for X402Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            X402Error::TooLarge => f.write_str("x402 data larger than 64 KiB"),
            X402Error::NotBase64 => f.write_str("x402 header is not valid base64"),
            X402Error::NotJson => f.write_str("x402 data is not valid JSON"),
            X402Error::UnsupportedVersion(v) => write!(f, "unsupported x402Version {v}"),
            X402Error::Missing(field) => write!(f, "x402 field {field} is missing"),
            X402Error::Invalid(field, why) => write!(f, "x402 field {field} is invalid: {why}"),
            X402Error::AmountTooLarge(text) => {
                write!(f, "x402 amount {text} does not fit the budget arithmetic")
            }
            X402Error::NoRequirements => {
                f.write_str("x402 402 answer offers no payment requirement")
            }
        }
    }
}

/// One entry of `accepts[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub scheme: String,
    pub network: String,
    pub amount: Amount,
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_secs: u64,
    /// EIP-712 domain name and version of the token (`extra.name`, `extra.version`).
    pub domain_name: Option<String>,
    pub domain_version: Option<String>,
    /// The entry exactly as the server sent it (v2 payments must repeat it verbatim).
    pub raw: Value,
}

/// A 402 answer's offer.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRequired {
    pub version: u8,
    pub accepts: Vec<Requirement>,
    /// v2: the top-level `resource`; v1: the chosen entry's `resource`.
    pub resource: Option<Value>,
    pub error: Option<String>,
}

fn decode_json(encoded: &[u8], base64_wrapped: bool) -> Result<Value, X402Error> {
    if encoded.len() > MAX_ENCODED {
        return Err(X402Error::TooLarge);
    }
    let bytes = if base64_wrapped {
        let text = std::str::from_utf8(encoded).map_err(|_| X402Error::NotBase64)?;
        base64::decode(text.trim()).ok_or(X402Error::NotBase64)?
    } else {
        encoded.to_vec()
    };
    serde_json::from_slice(&bytes).map_err(|_| X402Error::NotJson)
}

fn version_of(v: &Value) -> Result<u8, X402Error> {
    match v.get("x402Version") {
        None => Err(X402Error::Missing("x402Version")),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(1) => Ok(1),
            Some(2) => Ok(2),
            Some(other) => Err(X402Error::UnsupportedVersion(other)),
            None => Err(X402Error::Invalid("x402Version", n.to_string())),
        },
        Some(other) => Err(X402Error::Invalid("x402Version", other.to_string())),
    }
}

fn text<'a>(v: &'a Value, field: &'static str) -> Result<&'a str, X402Error> {
    match v.get(field) {
        None | Some(Value::Null) => Err(X402Error::Missing(field)),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => Ok(s),
        Some(other) => Err(X402Error::Invalid(field, other.to_string())),
    }
}

/// A decimal amount string (numbers are accepted too, as some servers send them).
fn amount(v: &Value, field: &'static str) -> Result<Amount, X402Error> {
    let raw = match v.get(field) {
        None | Some(Value::Null) => return Err(X402Error::Missing(field)),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(other) => return Err(X402Error::Invalid(field, other.to_string())),
    };
    if raw.len() > 78 {
        return Err(X402Error::Invalid(
            field,
            "more than 78 digits (256 bits)".into(),
        ));
    }
    parse_amount(&raw).map_err(|e| match e {
        AmountError::TooLarge => X402Error::AmountTooLarge(raw.clone()),
        other => X402Error::Invalid(field, other.to_string()),
    })
}

/// `0x` and 40 hex digits, lowercased.
pub fn evm_address(text: &str) -> Option<String> {
    let hex = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))?;
    (hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("0x{}", hex.to_ascii_lowercase()))
}

fn address(v: &Value, field: &'static str) -> Result<String, X402Error> {
    let t = text(v, field)?;
    evm_address(t).ok_or_else(|| X402Error::Invalid(field, t.to_string()))
}

fn requirement(v: &Value, version: u8) -> Result<Requirement, X402Error> {
    let amount_field = if version == 1 {
        "maxAmountRequired"
    } else {
        "amount"
    };
    let extra = v.get("extra");
    let extra_text = |name: &str| {
        extra
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(Requirement {
        scheme: text(v, "scheme")?.to_string(),
        network: text(v, "network")?.to_string(),
        amount: amount(v, amount_field)?,
        asset: address(v, "asset")?,
        pay_to: address(v, "payTo")?,
        max_timeout_secs: v
            .get("maxTimeoutSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(60)
            .min(86_400),
        domain_name: extra_text("name"),
        domain_version: extra_text("version"),
        raw: v.clone(),
    })
}

fn offer(v: &Value) -> Result<PaymentRequired, X402Error> {
    let version = version_of(v)?;
    let accepts = match v.get("accepts") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => return Err(X402Error::NoRequirements),
        Some(other) => return Err(X402Error::Invalid("accepts", other.to_string())),
        None => return Err(X402Error::Missing("accepts")),
    };
    if accepts.len() > 32 {
        return Err(X402Error::Invalid("accepts", "more than 32 entries".into()));
    }
    // Entries pag0 cannot read are skipped, not fatal: another may be payable.
    let parsed: Vec<Requirement> = accepts
        .iter()
        .filter_map(|a| requirement(a, version).ok())
        .collect();
    if parsed.is_empty() {
        // Report why the first one failed.
        return Err(requirement(&accepts[0], version)
            .err()
            .unwrap_or(X402Error::NoRequirements));
    }
    let resource = match version {
        2 => v.get("resource").cloned(),
        _ => accepts[0].get("resource").cloned(),
    };
    Ok(PaymentRequired {
        version,
        accepts: parsed,
        resource,
        error: v.get("error").and_then(Value::as_str).map(str::to_string),
    })
}

/// v2: the `PAYMENT-REQUIRED` header.
pub fn parse_required_header(value: &[u8]) -> Result<PaymentRequired, X402Error> {
    let offer = offer(&decode_json(value, true)?)?;
    if offer.version != 2 {
        return Err(X402Error::UnsupportedVersion(i64::from(offer.version)));
    }
    Ok(offer)
}

/// v1: the 402 JSON body.
pub fn parse_required_body(body: &[u8]) -> Result<PaymentRequired, X402Error> {
    let offer = offer(&decode_json(body, false)?)?;
    if offer.version != 1 {
        return Err(X402Error::UnsupportedVersion(i64::from(offer.version)));
    }
    Ok(offer)
}

/// Why a server answered a payment with 402 again: the `error` of its v2
/// `PAYMENT-REQUIRED` header, else of its v1 JSON body.
pub fn rejection_reason(required_header: Option<&[u8]>, body: &[u8]) -> Option<String> {
    let from_header = required_header.and_then(|h| decode_json(h, true).ok());
    let from_body = || decode_json(body, false).ok();
    from_header
        .or_else(from_body)?
        .get("error")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
        .map(|e| e.chars().take(200).collect())
}

/// A payment an agent (relay mode) or the signer (pay mode) put in the payment header.
#[derive(Debug, Clone, PartialEq)]
pub struct Payment {
    pub version: u8,
    pub network: String,
    pub scheme: String,
    pub value: Amount,
    pub from: String,
    pub to: String,
    pub valid_after: u64,
    pub valid_before: u64,
    pub nonce: String,
    /// v2: the `accepted` requirement the payment repeats.
    pub accepted: Option<Requirement>,
}

fn unix_secs(v: &Value, field: &'static str) -> Result<u64, X402Error> {
    match v.get(field) {
        Some(Value::String(s)) => s.parse().map_err(|_| X402Error::Invalid(field, s.clone())),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| X402Error::Invalid(field, n.to_string())),
        None | Some(Value::Null) => Err(X402Error::Missing(field)),
        Some(other) => Err(X402Error::Invalid(field, other.to_string())),
    }
}

/// Decodes `X-PAYMENT` (v1) or `PAYMENT-SIGNATURE` (v2).
pub fn parse_payment_header(value: &[u8]) -> Result<Payment, X402Error> {
    let v = decode_json(value, true)?;
    let version = version_of(&v)?;
    let payload = v.get("payload").ok_or(X402Error::Missing("payload"))?;
    let auth = payload
        .get("authorization")
        .ok_or(X402Error::Missing("payload.authorization"))?;
    let signature = text(payload, "signature")?;
    if !signature.starts_with("0x") || signature.len() < 132 {
        return Err(X402Error::Invalid(
            "payload.signature",
            signature.to_string(),
        ));
    }
    let (scheme, network, accepted) = if version == 2 {
        let accepted = requirement(v.get("accepted").ok_or(X402Error::Missing("accepted"))?, 2)?;
        (
            accepted.scheme.clone(),
            accepted.network.clone(),
            Some(accepted),
        )
    } else {
        (
            text(&v, "scheme")?.to_string(),
            text(&v, "network")?.to_string(),
            None,
        )
    };
    let nonce = text(auth, "nonce")?;
    if !(nonce.starts_with("0x")
        && nonce.len() == 66
        && nonce[2..].bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(X402Error::Invalid("authorization.nonce", nonce.to_string()));
    }
    let payment = Payment {
        version,
        network,
        scheme,
        value: amount(auth, "value")?,
        from: address(auth, "from")?,
        to: address(auth, "to")?,
        valid_after: unix_secs(auth, "validAfter")?,
        valid_before: unix_secs(auth, "validBefore")?,
        nonce: nonce.to_ascii_lowercase(),
        accepted,
    };
    if let Some(acc) = &payment.accepted {
        if acc.pay_to != payment.to {
            return Err(X402Error::Invalid(
                "authorization.to",
                "differs from accepted.payTo".into(),
            ));
        }
    }
    Ok(payment)
}

/// The server's settlement header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub success: bool,
    pub transaction: Option<String>,
    pub network: Option<String>,
    pub payer: Option<String>,
    pub error_reason: Option<String>,
}

/// Decodes `X-PAYMENT-RESPONSE` (v1) or `PAYMENT-RESPONSE` (v2).
pub fn parse_settlement_header(value: &[u8]) -> Result<Settlement, X402Error> {
    let v = decode_json(value, true)?;
    let success = v
        .get("success")
        .and_then(Value::as_bool)
        .ok_or(X402Error::Missing("success"))?;
    let opt = |field: &str| {
        v.get(field)
            .and_then(Value::as_str)
            .filter(|s| s.len() <= 256)
            .map(str::to_string)
    };
    let transaction = opt("transaction");
    if let Some(tx) = &transaction {
        let hex_tx = tx
            .strip_prefix("0x")
            .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !tx.is_empty() && !hex_tx {
            return Err(X402Error::Invalid("transaction", tx.clone()));
        }
    }
    Ok(Settlement {
        success,
        transaction,
        network: opt("network"),
        payer: opt("payer"),
        error_reason: opt("errorReason"),
    })
}

/// `x-pag0-payment`: `settled; amount=1000; network="eip155:84532"; tx="0x…"`.
pub fn payment_header(status: &str, amount: Amount, network: &str, tx: Option<&str>) -> String {
    let quote = |s: &str| {
        s.chars()
            .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
            .collect::<String>()
    };
    let mut out = format!("{status}; amount={amount}; network=\"{}\"", quote(network));
    if let Some(tx) = tx {
        out.push_str(&format!("; tx=\"{}\"", quote(tx)));
    }
    out
}

/// The signer service's contract (pay mode). Request: what to pay and for whom.
pub fn signer_request(
    offer: &PaymentRequired,
    chosen: &Requirement,
    tenant: &str,
    session: &str,
    agent: &str,
) -> String {
    serde_json::json!({
        "x402Version": offer.version,
        "requirement": chosen.raw,
        "resource": offer.resource,
        "tenant": tenant,
        "session": session,
        "agent": agent,
    })
    .to_string()
}

/// The signer's answer: `{"header": "PAYMENT-SIGNATURE", "value": "<base64>"}`.
pub fn signer_answer(body: &[u8], version: u8) -> Result<(String, String), X402Error> {
    let v = decode_json(body, false)?;
    let header = text(&v, "header")?.to_ascii_lowercase();
    let expected = if version == 1 {
        V1_PAYMENT_HEADER
    } else {
        V2_PAYMENT_HEADER
    };
    if header != expected {
        return Err(X402Error::Invalid("header", header));
    }
    let value = match v.get("value") {
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= 16 * 1024 && s.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            s.clone()
        }
        _ => return Err(X402Error::Invalid("value", "not a header value".into())),
    };
    Ok((header, value))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rejection_reason_reads_the_v2_header_then_the_v1_body() {
        let header = crate::core::base64::encode(
            br#"{"x402Version":2,"error":"invalid_exact_evm_nonce_already_used","accepts":[]}"#,
        );
        assert_eq!(
            rejection_reason(Some(header.as_bytes()), b"{}").as_deref(),
            Some("invalid_exact_evm_nonce_already_used")
        );
        assert_eq!(
            rejection_reason(None, br#"{"x402Version":1,"error":"insufficient_funds"}"#).as_deref(),
            Some("insufficient_funds")
        );
        assert_eq!(rejection_reason(Some(b"%%%"), b"not json"), None);
        assert_eq!(rejection_reason(None, br#"{"error":""}"#), None);
    }

    use super::*;
    use serde_json::json;

    const ASSET: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
    const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
    const FROM: &str = "0x857b06519E91e3A54538791bDbb0E22373e36b66";

    fn entry(amount: &str, network: &str) -> Value {
        json!({"scheme": "exact", "network": network, "amount": amount, "asset": ASSET, "payTo": PAY_TO,
               "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}})
    }

    fn b64(v: &Value) -> Vec<u8> {
        base64::encode(v.to_string().as_bytes()).into_bytes()
    }

    #[test]
    fn v2_offers_are_read_and_the_cheapest_allowed_is_chosen() {
        let offer = json!({"x402Version": 2, "resource": {"url": "https://api.example/x"},
                           "accepts": [entry("20000", "eip155:84532"), entry("10000", "eip155:1"), entry("15000", "eip155:84532")]});
        let parsed = parse_required_header(&b64(&offer)).unwrap();
        assert_eq!(parsed.accepts.len(), 3);
        assert_eq!(parsed.accepts[0].asset, ASSET.to_ascii_lowercase());
        assert_eq!(parsed.accepts[0].domain_name.as_deref(), Some("USDC"));
    }

    #[test]
    fn v1_bodies_use_max_amount_required() {
        let body = json!({"x402Version": 1, "error": "X-PAYMENT header is required", "accepts": [{
            "scheme": "exact", "network": "base-sepolia", "maxAmountRequired": "1000", "resource": "http://h/x",
            "description": "", "mimeType": "", "payTo": PAY_TO, "maxTimeoutSeconds": 60, "asset": ASSET,
            "extra": {"name": "USDC", "version": "2"}}]});
        let parsed = parse_required_body(body.to_string().as_bytes()).unwrap();
        assert_eq!((parsed.version, parsed.accepts[0].amount), (1, 1000));
        assert_eq!(parsed.resource, Some(json!("http://h/x")));
    }

    #[test]
    fn amounts_beyond_64_bits_are_refused_not_wrapped() {
        let huge = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        let offer = json!({"x402Version": 2, "accepts": [entry(huge, "eip155:1")]});
        assert_eq!(
            parse_required_header(&b64(&offer)),
            Err(X402Error::AmountTooLarge(huge.into()))
        );
        let too_long = "1".repeat(79);
        let offer = json!({"x402Version": 2, "accepts": [entry(&too_long, "eip155:1")]});
        assert!(matches!(
            parse_required_header(&b64(&offer)),
            Err(X402Error::Invalid("amount", _))
        ));
    }

    #[test]
    fn garbage_is_an_error_value() {
        assert_eq!(parse_required_header(b"!!!"), Err(X402Error::NotBase64));
        assert_eq!(
            parse_required_header(base64::encode(b"{").as_bytes()),
            Err(X402Error::NotJson)
        );
        assert_eq!(
            parse_required_header(&b64(&json!({"x402Version": 3, "accepts": []}))),
            Err(X402Error::UnsupportedVersion(3))
        );
        assert_eq!(
            parse_required_header(&b64(&json!({"x402Version": 2, "accepts": []}))),
            Err(X402Error::NoRequirements)
        );
        assert!(parse_required_header(&b64(
            &json!({"x402Version": 2, "accepts": [{"scheme": "exact"}]})
        ))
        .is_err());
        assert!(parse_required_header(&b64(&json!({"x402Version": "2"}))).is_err());
        assert!(parse_payment_header(b"").is_err());
        assert_eq!(
            parse_required_header(&vec![b'A'; 70_000]),
            Err(X402Error::TooLarge)
        );
        for bytes in [&b"\xff\xfe"[..], b"null", b"[]", b"{\"x402Version\": null}"] {
            assert!(parse_required_body(bytes).is_err());
        }
    }

    fn payment_v2(value: &str, to: &str) -> Value {
        json!({"x402Version": 2, "accepted": entry("10000", "eip155:84532"), "payload": {
            "signature": format!("0x{}", "ab".repeat(65)),
            "authorization": {"from": FROM, "to": to, "value": value, "validAfter": "1700000000",
                              "validBefore": "1700000600", "nonce": format!("0x{}", "11".repeat(32))}}})
    }

    #[test]
    fn payments_are_decoded_and_checked_against_what_they_accept() {
        let p = parse_payment_header(&b64(&payment_v2("10000", PAY_TO))).unwrap();
        assert_eq!(
            (p.version, p.value, p.network.as_str()),
            (2, 10_000, "eip155:84532")
        );
        assert_eq!(p.from, FROM.to_ascii_lowercase());
        assert_eq!(p.valid_before, 1_700_000_600);
        let wrong_payee = parse_payment_header(&b64(&payment_v2("10000", FROM)));
        assert!(matches!(
            wrong_payee,
            Err(X402Error::Invalid("authorization.to", _))
        ));
        let mut bad_nonce = payment_v2("10000", PAY_TO);
        bad_nonce["payload"]["authorization"]["nonce"] = json!("0x12");
        assert!(parse_payment_header(&b64(&bad_nonce)).is_err());
        let v1 = json!({"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": payment_v2("5", PAY_TO)["payload"].clone()});
        let p1 = parse_payment_header(&b64(&v1)).unwrap();
        assert_eq!(
            (p1.version, p1.value, p1.network.as_str()),
            (1, 5, "base-sepolia")
        );
    }

    #[test]
    fn settlements() {
        let ok = json!({"success": true, "transaction": format!("0x{}", "ab".repeat(32)), "network": "eip155:84532", "payer": FROM});
        let s = parse_settlement_header(&b64(&ok)).unwrap();
        assert!(s.success);
        let failed =
            json!({"success": false, "errorReason": "insufficient_funds", "transaction": ""});
        assert_eq!(
            parse_settlement_header(&b64(&failed))
                .unwrap()
                .error_reason
                .as_deref(),
            Some("insufficient_funds")
        );
        assert!(parse_settlement_header(&b64(&json!({"transaction": "0x1"}))).is_err());
        assert_eq!(
            payment_header("settled", 1000, "eip155:84532", Some("0xab\"cd")),
            "settled; amount=1000; network=\"eip155:84532\"; tx=\"0xabcd\""
        );
    }
}
