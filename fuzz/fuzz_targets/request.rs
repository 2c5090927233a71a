//! The request path as a whole, through the core's entry points, the way the host
//! drives them (src/host/stream/): a few requests, each built from the fuzz input
//! (request headers with pag0's identity, x402 and cache headers, route metadata in
//! Envoy's pairs encoding, the body, the upstream's status, headers and body, the
//! clock), against one fixed, rich configuration and one store.
//!
//! Nothing may panic, and after every step the money adds up:
//! - a session's budget record and its tenant's windows hold reserved exactly the
//!   prices of the tickets admitted and not yet settled (plus the commits this VM has
//!   not written yet, which only move an amount from reserved to spent);
//! - spent is the sum of the costs settled;
//! - no scope's spent + reserved is above its limit, except by what metered calls
//!   cost beyond their reservation (the one overrun the ledger allows);
//! - once everything is settled and flushed, nothing is reserved and the report API
//!   and `current_view` tell the same totals.
//!
//! And what the firewall promises on the way: a killed session, an agent a policy
//! refuses and a price above `maxPerRequest` are never admitted; a relayed x402 payment
//! reserves at least its worth in the budget's unit; pay mode reserves the cheapest
//! requirement policy allows; when relay mode lets a 402 offer through (its dry run
//! said the payment fits), the agent's paid retry is not refused by a budget or the
//! kill switch; a cache slot holds exactly the entry filled. A token-metered call
//! (src/core/meter) reserves between its least price and the bound of its body, never
//! carries a relayed payment, goes upstream asking for the output limit its reservation
//! pays for, and, when its usage stays within the limits pag0 set, costs no more than
//! that bound. "Spent" is compared as the ledger keeps it: saturated at u64::MAX.
//!
//! `PAG0_FUZZ_TRACE=1` prints each input's steps.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

use pag0::core::admin::{self, Access, AdminRoute};
use pag0::core::base64;
use pag0::core::cache::{self, AnswerFacts, Entry, EntryState, Found, KeyParts};
use pag0::core::call::{Call, Caller, HeaderValue, RouteSettings};
use pag0::core::compile::{compile_json, sha256_hex, Config};
use pag0::core::errors::{ErrorCode, Refusal};
use pag0::core::firewall;
use pag0::core::ledger::local::LocalLedger;
use pag0::core::ledger::windows::WindowsRecord;
use pag0::core::ledger::{self, sessions, Outcome, Ticket};
use pag0::core::meter::request::{self as llm_request, Api, LlmRequest, Plan};
use pag0::core::meter::usage::{AnswerMeter, Metered as MeterResult};
use pag0::core::offers;
use pag0::core::payments::{self, PaymentOutcome};
use pag0::core::route_meta;
use pag0::core::store::{read, tenant_windows_key, MemoryStore};
use pag0::core::x402;

/// 2026-03-10 00:00:00 UTC: every request of an input falls on this day, so that the
/// day and month windows hold everything the input spent.
const DAY_START_MS: u64 = 1_773_100_800_000;
const DAY_MS: u64 = 86_400_000;
const MAX_REQUESTS: usize = 12;
/// Largest 402 body the host reads for a v1 offer.
const MAX_OFFER_BODY: usize = 64 * 1024;

const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const FROM: &str = "0x857b06519E91e3A54538791bDbb0E22373e36b66";
const USDC_SEPOLIA: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
const USDC_BASE: &str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";
/// A USD token of 2 decimals and one of 18 (listed with their decimals in `relay`).
const TOKEN2: &str = "0x00000000000000000000000000000000000000d2";
const TOKEN18: &str = "0x6b175474e89094c44da98b954eedeac495271d0f";

fn config_json() -> String {
    format!(
        r#"{{
  "tenants": [
    {{"id": "acme", "apiKeySha256": "{acme}"}},
    {{"id": "beta", "apiKeySha256": "{beta}"}}
  ],
  "identity": {{"agentHeader": ["x-pag0-agent", "x-claude-code-agent-id"],
                "parentAgentHeader": "x-claude-code-parent-agent-id"}},
  "sessions": {{"maxSessions": 4, "maxAgentsPerSession": 3, "idleTimeoutSeconds": 60}},
  "admin": {{"apiKeySha256": "{admin}"}},
  "signer": {{"cluster": "signer", "loopbackCluster": "loopback", "maxBodyBytes": 4096,
              "maxBufferedBytes": 65536}},
  "cache": {{"scope": "session", "defaultTTL": 600, "methods": ["GET", "POST"],
             "ttlRules": [{{"pattern": ".*nocache.*", "ttl": 0}}, {{"pattern": ".*search.*", "ttl": 30}}],
             "maxEntryBytes": 512, "entries": 8, "coalesceWaitMs": 1000}},
  "defaultPolicy": "main",
  "llm": {{"prices": {{
      "claude-*": {{"input": "3000000", "output": "15000000", "cacheWrite5m": "3750000",
                    "cacheWrite1h": "6000000", "cacheRead": "300000"}},
      "gpt-*": {{"input": "1250000", "output": "10000000", "cacheWrite5m": "1250000",
                 "cacheWrite1h": "1250000", "cacheRead": "125000"}},
      "pricey-*": {{"input": "50000000", "output": "250000000", "cacheWrite5m": "60000000",
                    "cacheWrite1h": "100000000", "cacheRead": "5000000"}},
      "free-*": {{"input": "0", "output": "0", "cacheWrite5m": "0", "cacheWrite1h": "0",
                  "cacheRead": "0"}}}},
          "defaultMaxTokens": 4096, "minOutputTokens": 256, "maxBodyBytes": 4096}},
  "endpoints": [
    {{"pattern": "api.anthropic.example/*", "meter": "anthropic", "tool": "llm"}},
    {{"pattern": "api.openai.example/*", "meter": "openai"}},
    {{"pattern": "api.search.example/*", "price": "20000", "tool": "search"}},
    {{"pattern": "x402.pay.example/*", "x402": true}},
    {{"pattern": "x402.relay.example/*", "x402": true, "price": "1000"}},
    {{"pattern": "blocked.example/*", "price": "5"}}
  ],
  "policies": {{
    "main": {{
      "sessionBudget": "1000000", "dailyBudget": "3000000", "monthlyBudget": "5000000",
      "maxPerRequest": "400000", "alertOnThreshold": 0.5, "killSwitchThreshold": 0.9,
      "blockedEndpoints": ["blocked.example/*"],
      "agents": {{
        "exec-*": {{"agentBudget": "300000"}},
        "research-*": {{"agentBudget": "200000", "maxPerRequest": "100000", "inheritParentCache": false}},
        "main": {{}}
      }},
      "unmatchedAgents": {{"agentBudget": "150000"}},
      "x402": {{"mode": "relay"}}
    }},
    "strict": {{
      "sessionBudget": "300000", "chargeOn": "always", "unpricedRoutes": "refuse",
      "unmatchedAgents": "refuse",
      "agents": {{
        "exec-*": {{"agentBudget": "100000", "allowedEndpoints": ["api.*"], "inheritParentPolicy": false}},
        "buyer-*": {{}}
      }}
    }},
    "payer": {{
      "sessionBudget": "2000000", "dailyBudget": "2500000",
      "requireApproval": {{"threshold": "500000", "cluster": "approvals"}},
      "x402": {{"mode": "pay", "networks": ["base-sepolia", "eip155:8453"], "payees": ["{PAY_TO}"]}},
      "agents": {{"buyer-*": {{"agentBudget": "800000"}}}}
    }},
    "relay": {{
      "sessionBudget": "900000", "monthlyBudget": "4000000",
      "x402": {{"mode": "relay", "networks": ["eip155:84532", "eip155:1", "base"], "payees": ["{PAY_TO}"],
               "assets": ["{USDC_SEPOLIA}", "{USDC_BASE}",
                          {{"address": "{TOKEN2}", "decimals": 2}},
                          {{"address": "{TOKEN18}", "decimals": 18, "network": "eip155:1"}}]}},
      "unmatchedAgents": {{"agentBudget": "250000", "maxPerRequest": "200000"}}
    }},
    "open": {{}}
  }}
}}"#,
        acme = sha256_hex(b"key-acme"),
        beta = sha256_hex(b"key-beta"),
        admin = sha256_hex(b"key-admin"),
    )
}

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| compile_json(config_json().as_bytes()).expect("the request target's config"))
}

// --- the input ------------------------------------------------------------------------

/// A value from a list of meaningful ones (mostly), or any bytes.
#[derive(Debug, Clone)]
enum Text {
    Pick(u8),
    Raw(Vec<u8>),
}

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let tag: u8 = u.arbitrary()?;
        Ok(if tag < 232 {
            Text::Pick(tag)
        } else {
            Text::Raw(u.arbitrary()?)
        })
    }
}

/// `weighted!(u, [(weight, expr), ...])`: one of the expressions, by weight out of 256.
macro_rules! weighted {
    ($u:expr, [$(($w:expr, $e:expr)),+ $(,)?]) => {{
        let roll = u32::from($u.arbitrary::<u8>()?);
        let mut at = 0u32;
        let mut chosen = None;
        $(
            at += $w;
            if chosen.is_none() && roll < at {
                chosen = Some(1);
            }
            if chosen == Some(1) {
                return Ok($e);
            }
        )+
        unreachable!("weights add up to 256")
    }};
}

fn pick(t: &Text, list: &[&str]) -> Vec<u8> {
    match t {
        Text::Pick(i) => list[usize::from(*i) % list.len()].as_bytes().to_vec(),
        Text::Raw(bytes) => bytes.clone(),
    }
}

fn pick_str(t: &Text, list: &[&str]) -> String {
    String::from_utf8_lossy(&pick(t, list)).to_ascii_lowercase()
}

/// A request header: absent, once, or sent twice.
#[derive(Debug)]
enum Hdr {
    Missing,
    One(Text),
    Twice(Text, Text),
}

impl<'a> Arbitrary<'a> for Hdr {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        weighted!(
            u,
            [
                (200, Hdr::One(u.arbitrary()?)),
                (40, Hdr::Missing),
                (16, Hdr::Twice(u.arbitrary()?, u.arbitrary()?)),
            ]
        )
    }
}

#[derive(Arbitrary, Debug)]
struct PaymentSpec {
    v2: bool,
    exact: bool,
    network: u8,
    asset: u8,
    payee: u8,
    value: u64,
    small: bool,
    /// v2: the `accepted` amount (the offer the payment answers).
    accepted: u64,
    /// Seconds from now until `validBefore`, minus a little so it may have expired.
    valid_for: u16,
    nonce_ok: bool,
    signature_ok: bool,
}

#[derive(Debug)]
enum Payment {
    None,
    /// A well-formed payment of this value in USDC on Base Sepolia to the payee.
    Good {
        v2: bool,
        value: u32,
    },
    Spec(PaymentSpec),
    /// A v1 and a v2 header at once.
    Both(PaymentSpec),
    Raw {
        v2: bool,
        bytes: Vec<u8>,
    },
}

impl<'a> Arbitrary<'a> for Payment {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        weighted!(
            u,
            [
                (140, Payment::None),
                (
                    40,
                    Payment::Good {
                        v2: u.arbitrary()?,
                        value: u.arbitrary()?
                    }
                ),
                (56, Payment::Spec(u.arbitrary()?)),
                (8, Payment::Both(u.arbitrary()?)),
                (
                    12,
                    Payment::Raw {
                        v2: u.arbitrary()?,
                        bytes: u.arbitrary()?
                    }
                ),
            ]
        )
    }
}

#[derive(Arbitrary, Debug)]
struct RequirementSpec {
    exact: bool,
    network: u8,
    asset: u8,
    payee: u8,
    amount: u64,
    small: bool,
}

#[derive(Debug)]
enum Offer {
    None,
    /// One requirement: this amount of USDC on Base Sepolia, to the payee (v2 header).
    Good(u32),
    V2Header(Vec<RequirementSpec>),
    V1Body(Vec<RequirementSpec>),
    RawHeader(Vec<u8>),
    RawBody(Vec<u8>),
}

impl<'a> Arbitrary<'a> for Offer {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        weighted!(
            u,
            [
                (24, Offer::None),
                (104, Offer::Good(u.arbitrary()?)),
                (56, Offer::V2Header(u.arbitrary()?)),
                (48, Offer::V1Body(u.arbitrary()?)),
                (12, Offer::RawHeader(u.arbitrary()?)),
                (12, Offer::RawBody(u.arbitrary()?)),
            ]
        )
    }
}

#[derive(Arbitrary, Debug)]
enum Settlement {
    None,
    Spec {
        success: bool,
        tx_ok: bool,
        reason: bool,
        /// Under the other version's header name.
        swapped: bool,
    },
    Raw(Vec<u8>),
}

/// The usage a metered call's answer reports, as JSON or an SSE stream of the API.
#[derive(Arbitrary, Debug)]
struct Metered {
    input: u32,
    output: u32,
    cache_write: u16,
    cache_read: u16,
    /// Small counts (within what pag0 bounded the call to, mostly).
    small: bool,
    sse: bool,
    /// The answer is cut halfway (the usage may never come: charged the reservation).
    cut: bool,
    /// The answer arrives in chunks of this many bytes (0: whole).
    chunk: u8,
}

/// A metered LLM request's body.
#[derive(Arbitrary, Debug)]
struct LlmSpec {
    /// Which API, and whether route metadata or an endpoint rule meters it.
    api: u8,
    model: u8,
    max_tokens: Option<u32>,
    /// Chat Completions: the limit under its older name `max_tokens`.
    old_name: bool,
    n: Option<u8>,
    stream: bool,
    prompt: u16,
    thinking: Option<u32>,
    /// Images by URL (each counts `imageTokens` of input).
    images: u8,
}

#[derive(Debug)]
enum Status {
    Pick(u8),
    Any(u16),
}

impl<'a> Arbitrary<'a> for Status {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        weighted!(
            u,
            [
                (240, Status::Pick(u.arbitrary()?)),
                (16, Status::Any(u.arbitrary()?)),
            ]
        )
    }
}

#[derive(Arbitrary, Debug)]
struct Upstream {
    /// The answer came from the upstream (else: Envoy's own, a timeout or a reset).
    reached: bool,
    /// `None`: the kind's usual answer (402 on an x402 route without a payment, 200).
    status: Option<Status>,
    headers: Vec<(Text, Text)>,
    offer: Offer,
    settlement: Settlement,
    body: Vec<u8>,
    metered: Option<Metered>,
    approval_ok: bool,
    approval: Text,
    signer_ok: bool,
    signer: Text,
    retry_status: Option<Status>,
    retry_settlement: Settlement,
    retry_body: Text,
}

/// When the call's outcome reaches the ledger.
#[derive(Debug, Clone, Copy)]
enum End {
    Now,
    /// The answer comes back while later requests run.
    Later(u8),
    /// The client went away before the answer (the stream's log settles it).
    Gone,
}

impl<'a> Arbitrary<'a> for End {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        weighted!(
            u,
            [
                (160, End::Now),
                (64, End::Later(u.arbitrary()?)),
                (32, End::Gone),
            ]
        )
    }
}

/// What a request is, before the input changes parts of it: a coherent call of one
/// kind (so that most inputs reach the ledger), which the overrides then bend.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `api.search.example/search`, priced by its endpoint rule.
    Search,
    /// A token-metered LLM call (route metadata or an endpoint rule's `meter`), priced
    /// by the bound of its body.
    Llm,
    /// An x402 route whose policy relays (the agent pays).
    Relay,
    /// An x402 route whose policy pays (pag0 pays through the signer).
    Pay,
    /// A route priced by its metadata, under any policy.
    Priced,
    /// The report API.
    Admin,
}

impl<'a> Arbitrary<'a> for Kind {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        weighted!(
            u,
            [
                (48, Kind::Search),
                (48, Kind::Llm),
                (48, Kind::Relay),
                (40, Kind::Pay),
                (48, Kind::Priced),
                (24, Kind::Admin),
            ]
        )
    }
}

/// A change to the request its kind makes.
#[derive(Arbitrary, Debug)]
enum Override {
    Method(Text),
    Authority(Text),
    Path(Text),
    Query(Text),
    ApiKey(Hdr),
    Session(Hdr),
    Agent(Hdr),
    SecondAgent(Hdr),
    Parent(Hdr),
    Header(Text, Text),
    RoutePair(Text, Text),
    /// Route metadata replaced by these bytes (as Envoy would hand them over).
    RouteRaw(Vec<u8>),
    /// No route metadata at all.
    NoRoute,
    Body(Vec<u8>),
    /// The body of a metered request (for the final path), whatever the kind.
    LlmBody,
}

#[derive(Arbitrary, Debug)]
struct Request {
    at_ms: u32,
    kind: Kind,
    tenant: u8,
    session: u8,
    agent: u8,
    /// Route metadata `policy` and `price`, from lists.
    policy: Option<u8>,
    price: Option<u8>,
    overrides: Vec<Override>,
    payment: Payment,
    upstream: Upstream,
    end: End,
    flush_after: bool,
    llm: LlmSpec,
}

#[derive(Debug)]
struct Input {
    requests: Vec<Request>,
}

impl<'a> Arbitrary<'a> for Input {
    /// Requests one after the other while bytes last (a short input is still a few
    /// whole requests, their missing fields zero).
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut requests = Vec::new();
        while !u.is_empty() && requests.len() < MAX_REQUESTS {
            requests.push(u.arbitrary()?);
        }
        Ok(Input { requests })
    }
}

const METHODS: &[&str] = &["GET", "POST", "HEAD", "OPTIONS", "PUT", "QUERY"];
const HOSTS: &[&str] = &[
    "api.search.example",
    "x402.pay.example",
    "x402.relay.example",
    "blocked.example",
    "api.llm.example",
    "free.example",
    "API.Search.Example:443",
    "api.anthropic.example",
    "api.openai.example",
];
const PATHS: &[&str] = &[
    "/search",
    "/v1/messages",
    "/nocache/x",
    "/x402/a",
    "/",
    "/search/../x402/a",
    "/_pag0/v1/sessions",
    "/_pag0/v1/sessions/s-1/report",
    "/_pag0/v1/sessions/s-2/budget",
    "/_pag0/v1/sessions/s-1/kill",
    "/_pag0/v1/sessions/s-1/resume",
    "/_pag0/dashboard",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/messages/count_tokens",
];
const QUERIES: &[&str] = &[
    "q=1",
    "tenant=acme",
    "tenant=beta",
    "a=b&tenant=nope",
    "q=2",
];
const KEYS: &[&str] = &["key-acme", "key-beta", "key-admin", "nope"];
const SESSIONS: &[&str] = &["s-1", "s-2", "s-3", "s-4", "s-5", "bad id"];
const AGENTS: &[&str] = &[
    "main",
    "exec-1",
    "exec-2",
    "research-1",
    "buyer-1",
    "rogue-1",
    "rogue-2",
    "*",
];
const ROUTE_KEYS: &[&str] = &[
    "policy",
    "price",
    "tool",
    "chargeOn",
    "endpoint",
    "cacheTTL",
    "x402",
    "meter",
    "defaultSession",
    "prcie",
];
const ROUTE_VALUES: &[&str] = &[
    "main",
    "strict",
    "payer",
    "relay",
    "open",
    "0",
    "1",
    "999",
    "20000",
    "150000",
    "400000",
    "2000000",
    "18446744073709551615",
    "true",
    "false",
    "always",
    "success",
    "anthropic",
    "openai",
    "search",
    "api.example/x",
    "s-1",
    "s-9",
    "60",
    "bogus",
];
const EXTRA_NAMES: &[&str] = &[
    "content-type",
    "accept",
    "accept-encoding",
    "authorization",
    "x-api-key",
    "cookie",
    "cache-control",
    "range",
    "x-pag0-cache-bypass",
    "content-length",
    "x-pag0-admin-key",
    "x-pag0-session",
    "x-pag0-agent",
];
const EXTRA_VALUES: &[&str] = &[
    "application/json",
    "*/*",
    "gzip",
    "Bearer key-admin",
    "Bearer key-acme",
    "no-cache",
    "no-store",
    "max-age=60",
    "bytes=0-1",
    "true",
    "16",
    "100000000",
    "key-admin",
    "key-beta",
    "s-2",
    "exec-1",
];
const STATUSES: &[u16] = &[
    200, 201, 203, 204, 206, 301, 400, 402, 404, 429, 500, 502, 503, 504,
];
const RESPONSE_NAMES: &[&str] = &[
    "cache-control",
    "vary",
    "set-cookie",
    "content-type",
    "content-range",
    "content-length",
    "content-encoding",
    "x-payment-response",
    "payment-response",
    "payment-required",
];
const RESPONSE_VALUES: &[&str] = &[
    "max-age=60",
    "s-maxage=0",
    "no-store",
    "private",
    "public, max-age=5",
    "accept-encoding",
    "cookie",
    "a=b",
    "application/json",
    "text/event-stream",
    "bytes 0-1/2",
    "10",
    "100000",
    "gzip",
];
const NETWORKS: &[&str] = &[
    "base-sepolia",
    "eip155:84532",
    "base",
    "eip155:8453",
    "eip155:1",
    "ethereum",
    "solana",
];
const ASSETS: &[&str] = &[
    USDC_SEPOLIA,
    USDC_BASE,
    TOKEN2,
    TOKEN18,
    "0x1111111111111111111111111111111111111111",
    "not-an-address",
];
const PAYEES: &[&str] = &[
    PAY_TO,
    "0x209693bc6afc0c5328ba36faf03c514ef312287c",
    "0x0000000000000000000000000000000000000001",
];
const APPROVALS: &[&str] = &[
    r#"{"approved": true}"#,
    r#"{"approved": false, "reason": "too much"}"#,
    "",
];
const SIGNER_ANSWERS: &[&str] = &[
    r#"{"header": "PAYMENT-SIGNATURE", "value": "c2lnbmVk"}"#,
    r#"{"header": "X-PAYMENT", "value": "c2lnbmVk"}"#,
    r#"{"header": "payment-signature", "value": ""}"#,
];
const RETRY_BODIES: &[&str] = &["upstream request timeout", "", "{\"ok\": true}"];

fn nth<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

fn amount(value: u64, small: bool) -> u64 {
    if small {
        value % 500_000
    } else {
        value
    }
}

fn status(s: &Status) -> u32 {
    match s {
        Status::Pick(i) => u32::from(STATUSES[usize::from(*i) % STATUSES.len()]),
        Status::Any(n) => u32::from(*n),
    }
}

fn payment_header(spec: &PaymentSpec, now_s: u64, v2: bool) -> Vec<u8> {
    let value = amount(spec.value, spec.small).to_string();
    let payee = nth(PAYEES, spec.payee);
    let nonce = if spec.nonce_ok {
        format!("0x{}", "ab".repeat(32))
    } else {
        "0x12".to_string()
    };
    let signature = if spec.signature_ok {
        format!("0x{}", "cd".repeat(65))
    } else {
        "0x00".to_string()
    };
    let valid_before = (now_s + u64::from(spec.valid_for)).saturating_sub(30);
    let mut v = json!({
        "x402Version": if v2 { 2 } else { 1 },
        "payload": {"signature": signature, "authorization": {
            "from": FROM, "to": payee, "value": value, "validAfter": "0",
            "validBefore": valid_before.to_string(), "nonce": nonce,
        }},
    });
    let scheme = if spec.exact { "exact" } else { "upto" };
    if v2 {
        v["accepted"] = json!({
            "scheme": scheme, "network": nth(NETWORKS, spec.network),
            "amount": amount(spec.accepted, spec.small).to_string(),
            "asset": nth(ASSETS, spec.asset), "payTo": payee, "maxTimeoutSeconds": 60,
            "extra": {"name": "USDC", "version": "2"},
        });
    } else {
        v["scheme"] = json!(scheme);
        v["network"] = json!(nth(NETWORKS, spec.network));
    }
    base64::encode(v.to_string().as_bytes()).into_bytes()
}

fn requirement(r: &RequirementSpec, v2: bool) -> Value {
    let amount_field = if v2 { "amount" } else { "maxAmountRequired" };
    let mut v = json!({
        "scheme": if r.exact { "exact" } else { "upto" },
        "network": nth(NETWORKS, r.network),
        "asset": nth(ASSETS, r.asset),
        "payTo": nth(PAYEES, r.payee),
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    });
    v[amount_field] = json!(amount(r.amount, r.small).to_string());
    if !v2 {
        v["resource"] = json!("http://x402.example/a");
    }
    v
}

fn settlement_value(s: &Settlement) -> Option<Vec<u8>> {
    match s {
        Settlement::None => None,
        Settlement::Spec {
            success,
            tx_ok,
            reason,
            ..
        } => {
            let mut v = json!({"success": success, "network": "eip155:84532"});
            v["transaction"] = json!(if *tx_ok { "0xabc123" } else { "zz" });
            if *reason {
                v["errorReason"] = json!("insufficient_funds");
            }
            Some(base64::encode(v.to_string().as_bytes()).into_bytes())
        }
        Settlement::Raw(bytes) => Some(bytes.clone()),
    }
}

fn lookup_in(headers: &[(String, Vec<u8>)], wanted: &str) -> HeaderValue {
    let mut found = headers.iter().filter(|(name, _)| name == wanted);
    match (found.next(), found.next()) {
        (None, _) => HeaderValue::Missing,
        (Some((_, value)), None) => HeaderValue::One(value.clone()),
        (Some(_), Some(_)) => HeaderValue::Many,
    }
}

fn one_of(headers: &[(String, Vec<u8>)], name: &str) -> Vec<u8> {
    match lookup_in(headers, name) {
        HeaderValue::One(v) => v,
        _ => Vec::new(),
    }
}

fn first_of(headers: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

fn query_param(path: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(path).ok()?;
    let (_, query) = text.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

const MODELS: &[&str] = &[
    "claude-sonnet-4-5",
    "gpt-5",
    "pricey-1",
    "free-1",
    "unknown-model",
    "",
];

/// A metered request's body for the API its path speaks.
fn llm_body(spec: &LlmSpec, path: &str) -> Vec<u8> {
    let model = nth(MODELS, spec.model);
    let prompt = "x".repeat(usize::from(spec.prompt % 2048));
    let images: Vec<Value> = (0..spec.images % 3)
        .map(|_| json!({"type": "image", "source": {"type": "url", "url": "https://img.example/a.png"}}))
        .collect();
    let mut content = vec![json!({"type": "text", "text": prompt})];
    content.extend(images);
    let mut v = json!({"model": model});
    if path.ends_with("/messages") {
        v["messages"] = json!([{"role": "user", "content": content}]);
        if let Some(m) = spec.max_tokens {
            v["max_tokens"] = json!(m % 20_000);
        }
        if let Some(t) = spec.thinking {
            v["thinking"] = json!({"type": "enabled", "budget_tokens": t % 20_000});
        }
    } else if path.ends_with("/chat/completions") {
        v["messages"] = json!([{"role": "user", "content": prompt}]);
        if let Some(m) = spec.max_tokens {
            let name = if spec.old_name {
                "max_tokens"
            } else {
                "max_completion_tokens"
            };
            v[name] = json!(m % 20_000);
        }
        if let Some(n) = spec.n {
            v["n"] = json!(n % 5);
        }
    } else {
        v["input"] = json!(prompt);
        if let Some(m) = spec.max_tokens {
            v["max_output_tokens"] = json!(m % 20_000);
        }
    }
    if spec.stream {
        v["stream"] = json!(true);
    }
    v.to_string().into_bytes()
}

/// A metered answer carrying this usage, as the API writes it (JSON or SSE).
fn llm_answer(api: Api, m: &Metered) -> Vec<u8> {
    let (input, output) = if m.small {
        (u64::from(m.input % 4096), u64::from(m.output % 4096))
    } else {
        (u64::from(m.input), u64::from(m.output))
    };
    let (write, read) = (u64::from(m.cache_write), u64::from(m.cache_read));
    let body = match (api, m.sse) {
        (Api::Messages, false) => json!({"type": "message", "usage": {
            "input_tokens": input, "output_tokens": output,
            "cache_creation_input_tokens": write, "cache_read_input_tokens": read}})
        .to_string(),
        (Api::Messages, true) => format!(
            "event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {{\"delta\": \"hi\"}}\n\nevent: message_delta\ndata: {}\n\n",
            json!({"type": "message_start", "message": {"usage": {"input_tokens": input,
                "output_tokens": 1, "cache_creation_input_tokens": write,
                "cache_read_input_tokens": read}}}),
            json!({"type": "message_delta", "usage": {"output_tokens": output}}),
        ),
        (Api::Chat, false) => json!({"usage": {"prompt_tokens": input + read,
            "completion_tokens": output, "prompt_tokens_details": {"cached_tokens": read}}})
        .to_string(),
        (Api::Chat, true) => format!(
            "data: {{\"choices\": []}}\n\ndata: {}\n\ndata: [DONE]\n\n",
            json!({"choices": [], "usage": {"prompt_tokens": input + read,
                "completion_tokens": output, "prompt_tokens_details": {"cached_tokens": read}}}),
        ),
        (Api::Responses, false) => json!({"usage": {"input_tokens": input + read,
            "output_tokens": output, "input_tokens_details": {"cached_tokens": read}}})
        .to_string(),
        (Api::Responses, true) => format!(
            "event: response.created\ndata: {{}}\n\nevent: response.completed\ndata: {}\n\n",
            json!({"response": {"usage": {"input_tokens": input + read,
                "output_tokens": output, "input_tokens_details": {"cached_tokens": read}}}}),
        ),
    };
    let mut bytes = body.into_bytes();
    if m.cut {
        bytes.truncate(bytes.len() / 2);
    }
    bytes
}

/// A metered call, between the gate and its answer (src/host/stream/meter.rs).
struct MeterFlow {
    request: LlmRequest,
    plan: Option<Plan>,
}

/// A request as the host sees it.
struct Built {
    method: Vec<u8>,
    path: Vec<u8>,
    authority: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    route_bytes: Vec<u8>,
    body: Vec<u8>,
}

const POLICIES: &[&str] = &["main", "strict", "payer", "relay", "open", "nope"];
const PRICES: &[&str] = &[
    "0",
    "1",
    "999",
    "20000",
    "150000",
    "400000",
    "2000000",
    "18446744073709551615",
    "1.5",
];
const ADMIN_KEYS: &[&str] = &["key-admin", "key-acme", "key-beta"];

fn build(cfg: &Config, req: &Request, now_s: u64) -> Built {
    let session = SESSIONS[usize::from(req.session) % 5];
    let one = |list: &[&str], i: u8| Hdr::One(Text::Pick(i % list.len() as u8));
    let (method, authority, path, mut route): (&str, &str, String, Vec<(&str, String)>) =
        match req.kind {
            Kind::Search => ("GET", "api.search.example", "/search".into(), vec![]),
            // A metered route is priced by its tokens: no `price` with `meter`.
            Kind::Llm => match req.llm.api % 4 {
                0 => (
                    "POST",
                    "api.llm.example",
                    "/v1/messages".into(),
                    vec![("meter", "anthropic".into()), ("tool", "llm".into())],
                ),
                1 => (
                    "POST",
                    "api.anthropic.example",
                    "/v1/messages".into(),
                    vec![],
                ),
                2 => (
                    "POST",
                    "api.llm.example",
                    "/v1/chat/completions".into(),
                    vec![("meter", "openai".into())],
                ),
                _ => ("POST", "api.openai.example", "/v1/responses".into(), vec![]),
            },
            Kind::Relay => (
                "GET",
                "x402.relay.example",
                "/x402/a".into(),
                vec![("policy", "relay".into())],
            ),
            Kind::Pay => (
                "GET",
                "x402.pay.example",
                "/x402/a".into(),
                vec![("policy", "payer".into())],
            ),
            Kind::Priced => (
                "POST",
                "free.example",
                "/v1/x".into(),
                vec![("price", "20000".into())],
            ),
            Kind::Admin => {
                let (m, p) = match req.agent % 5 {
                    0 => ("GET", "/_pag0/v1/sessions".to_string()),
                    1 => ("GET", format!("/_pag0/v1/sessions/{session}/report")),
                    2 => ("GET", format!("/_pag0/v1/sessions/{session}/budget")),
                    3 => ("POST", format!("/_pag0/v1/sessions/{session}/kill")),
                    _ => ("POST", format!("/_pag0/v1/sessions/{session}/resume")),
                };
                (m, "h", p, vec![])
            }
        };
    let set = |route: &mut Vec<(&str, String)>, key: &'static str, value: &str| {
        route.retain(|(k, _)| *k != key);
        route.push((key, value.to_string()));
    };
    if let Some(p) = req.policy {
        set(&mut route, "policy", nth(POLICIES, p));
    }
    match (req.price, req.kind) {
        // Mostly leave a metered route unpriced (a price there is a config error).
        (Some(p), Kind::Llm) if p % 8 != 0 => {}
        (Some(p), _) => set(&mut route, "price", nth(PRICES, p)),
        (None, _) => {}
    }
    let mut api_key = match req.kind {
        Kind::Admin => Hdr::One(Text::Raw(nth(ADMIN_KEYS, req.tenant).as_bytes().to_vec())),
        _ => one(KEYS, req.tenant % 2),
    };
    let mut session_h = Hdr::One(Text::Raw(session.as_bytes().to_vec()));
    let mut agent = one(AGENTS, req.agent);
    let (mut agent2, mut parent) = (Hdr::Missing, Hdr::Missing);
    let mut extra: Vec<(String, Vec<u8>)> = Vec::new();
    let mut route_raw: Option<Vec<u8>> = None;
    let mut route_extra: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut body = match req.kind {
        Kind::Llm => llm_body(&req.llm, &path),
        _ => Vec::new(),
    };
    let (mut method_o, mut authority_o, mut path_o) = (None, None, None);
    let mut llm_path = false;
    for o in req.overrides.iter().take(8) {
        match o {
            Override::Method(t) => method_o = Some(pick(t, METHODS)),
            Override::Authority(t) => authority_o = Some(pick(t, HOSTS)),
            Override::Path(t) => path_o = Some(pick(t, PATHS)),
            Override::Query(t) => {
                let mut p = path_o.take().unwrap_or_else(|| path.clone().into_bytes());
                p.push(b'?');
                p.extend(pick(t, QUERIES));
                path_o = Some(p);
            }
            Override::ApiKey(h) => api_key = clone_hdr(h),
            Override::Session(h) => session_h = clone_hdr(h),
            Override::Agent(h) => agent = clone_hdr(h),
            Override::SecondAgent(h) => agent2 = clone_hdr(h),
            Override::Parent(h) => parent = clone_hdr(h),
            Override::Header(n, v) => extra.push((pick_str(n, EXTRA_NAMES), pick(v, EXTRA_VALUES))),
            Override::RoutePair(k, v) => {
                route_extra.push((pick(k, ROUTE_KEYS), pick(v, ROUTE_VALUES)))
            }
            Override::RouteRaw(bytes) => route_raw = Some(bytes.clone()),
            Override::NoRoute => route_raw = Some(Vec::new()),
            Override::Body(b) => body = b.clone(),
            Override::LlmBody => llm_path = true,
        }
    }
    let method = method_o.unwrap_or_else(|| method.as_bytes().to_vec());
    let authority = authority_o.unwrap_or_else(|| authority.as_bytes().to_vec());
    let path = path_o.unwrap_or_else(|| path.into_bytes());
    if llm_path {
        let text = String::from_utf8_lossy(&path);
        body = llm_body(&req.llm, text.split('?').next().unwrap_or(""));
    }
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), method.clone()),
        (":path".into(), path.clone()),
        (":authority".into(), authority.clone()),
    ];
    let id = &cfg.identity;
    let mut push = |name: &str, h: &Hdr, list: &[&str]| match h {
        Hdr::Missing => {}
        Hdr::One(v) => headers.push((name.to_string(), pick(v, list))),
        Hdr::Twice(a, b) => {
            headers.push((name.to_string(), pick(a, list)));
            headers.push((name.to_string(), pick(b, list)));
        }
    };
    push(&id.api_key_header, &api_key, KEYS);
    push(&id.session_headers[0], &session_h, SESSIONS);
    push(&id.agent_headers[0], &agent, AGENTS);
    if let Some(second) = id.agent_headers.get(1) {
        push(second, &agent2, AGENTS);
    }
    if let Some(name) = &id.parent_agent_header {
        push(name, &parent, AGENTS);
    }
    headers.extend(extra);
    match &req.payment {
        Payment::None => {}
        Payment::Good { v2, value } => {
            let spec = PaymentSpec {
                v2: *v2,
                exact: true,
                network: if *v2 { 1 } else { 0 },
                asset: 0,
                payee: 0,
                value: u64::from(*value),
                small: false,
                accepted: u64::from(*value),
                valid_for: 600,
                nonce_ok: true,
                signature_ok: true,
            };
            let name = if *v2 {
                x402::V2_PAYMENT_HEADER
            } else {
                x402::V1_PAYMENT_HEADER
            };
            headers.push((name.into(), payment_header(&spec, now_s, *v2)));
        }
        Payment::Spec(spec) => {
            let name = if spec.v2 {
                x402::V2_PAYMENT_HEADER
            } else {
                x402::V1_PAYMENT_HEADER
            };
            headers.push((name.into(), payment_header(spec, now_s, spec.v2)));
        }
        Payment::Both(spec) => {
            headers.push((
                x402::V1_PAYMENT_HEADER.into(),
                payment_header(spec, now_s, false),
            ));
            headers.push((
                x402::V2_PAYMENT_HEADER.into(),
                payment_header(spec, now_s, true),
            ));
        }
        Payment::Raw { v2, bytes } => {
            let name = if *v2 {
                x402::V2_PAYMENT_HEADER
            } else {
                x402::V1_PAYMENT_HEADER
            };
            headers.push((name.into(), bytes.clone()));
        }
    }
    let route_bytes = route_raw.unwrap_or_else(|| {
        let mut list: Vec<(&[u8], &[u8])> = route
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        list.extend(
            route_extra
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice())),
        );
        if list.is_empty() {
            // Envoy hands over nothing for a route without pag0 metadata.
            Vec::new()
        } else {
            encode_pairs(&list)
        }
    });
    Built {
        method,
        path,
        authority,
        headers,
        route_bytes,
        body,
    }
}

fn clone_hdr(h: &Hdr) -> Hdr {
    match h {
        Hdr::Missing => Hdr::Missing,
        Hdr::One(v) => Hdr::One(v.clone()),
        Hdr::Twice(a, b) => Hdr::Twice(a.clone(), b.clone()),
    }
}

// --- the model --------------------------------------------------------------------------

/// A budget scope: what the harness saw settled, and the limit it must stay within.
#[derive(Debug, Default, Clone, Copy)]
struct ScopeModel {
    spent: u128,
    /// The limit of the policy of the last admission that reserved in this scope, plus
    /// what metered calls cost beyond their reservation since (`None`: no limit).
    bound: Option<u128>,
}

impl ScopeModel {
    fn overrun(&mut self, cost: u128, over: u128) {
        self.spent += cost;
        if let Some(b) = self.bound.as_mut() {
            *b += over;
        }
    }
}

#[derive(Debug, Default)]
struct SessionModel {
    scope: ScopeModel,
    agents: HashMap<String, ScopeModel>,
    /// Whether the session's record was ever found (a record evicted from its slot
    /// when idle starts over; one that never existed must not have been charged).
    seen: bool,
}

#[derive(Debug, Default)]
struct WindowModel {
    spent: u128,
    day: Option<u128>,
    month: Option<u128>,
}

/// A settlement still to come: the ticket and how its call ended.
struct Due {
    at_step: usize,
    ticket: Ticket,
    outcome: Outcome,
}

/// Something the relay path promised: after this 402, a retry that pays this much
/// would be admitted.
struct Promise {
    caller: Caller,
    call: Call,
}

struct Harness {
    cfg: &'static Config,
    store: MemoryStore,
    local: LocalLedger,
    open: Vec<Ticket>,
    due: Vec<Due>,
    sessions: HashMap<(usize, String), SessionModel>,
    windows: HashMap<usize, WindowModel>,
    now_ms: u64,
    step: usize,
    log: Vec<String>,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            cfg: config(),
            store: MemoryStore::new(),
            local: LocalLedger::new(),
            open: Vec::new(),
            due: Vec::new(),
            sessions: HashMap::new(),
            windows: HashMap::new(),
            now_ms: DAY_START_MS,
            step: 0,
            log: Vec::new(),
        }
    }

    fn now_s(&self) -> u64 {
        self.now_ms / 1000
    }

    fn note(&mut self, what: String) {
        self.log.push(format!(
            "[{} t={}] {what}",
            self.step,
            self.now_ms - DAY_START_MS
        ));
    }

    /// Panics with the story so far.
    fn fail(&self, what: String) -> ! {
        panic!(
            "INVARIANT BROKEN: {what}\n--- steps:\n{}",
            self.log.join("\n")
        );
    }

    fn tenant_id(&self, tenant: usize) -> &'static str {
        self.cfg
            .tenants
            .get(tenant)
            .map_or("default", |t| t.id.as_str())
    }

    fn refused(&mut self, caller: &Caller, refusal: &Refusal) {
        self.note(format!(
            "refused {} {}: {}",
            caller.session,
            refusal.code.as_str(),
            refusal.message
        ));
        let now_ms = self.now_s() * 1000;
        ledger::record_refusal(&mut self.local, self.cfg, caller, refusal, now_ms);
    }

    // --- admit and settle, with the model ------------------------------------------------

    fn admit(&mut self, caller: &Caller, call: &Call) -> Option<Ticket> {
        let cfg = self.cfg;
        let tenant = self.tenant_id(caller.tenant);
        let killed = match sessions::lookup(&self.store, tenant, &caller.session, &cfg.sessions) {
            Ok(found) => found.is_some_and(|(_, r)| r.killed),
            Err(e) => self.fail(format!("session lookup failed: {}", e.message)),
        };
        let now_ms = self.now_ms;
        let result = ledger::admit(cfg, &self.store, &mut self.local, caller, call, now_ms);
        let admission = match result {
            Ok(a) => a,
            Err(rejection) => {
                let refusal = rejection.refused.refusal.clone();
                self.refused(caller, &refusal);
                return None;
            }
        };
        let t = admission.ticket;
        self.note(format!(
            "admitted #{} {}/{}/{} price {} policy {} agent budget {:?}",
            t.id, tenant, t.session, t.agent, t.price, cfg.policies[t.policy].name, t.budget_agent
        ));
        let policy = &cfg.policies[call.policy];
        if killed {
            self.fail(format!(
                "session {} is killed, yet a call was admitted",
                t.session
            ));
        }
        if policy.refuses_agent(&caller.agent) {
            self.fail(format!(
                "policy {} refuses agent {}, yet it was admitted",
                policy.name, caller.agent
            ));
        }
        let rule = policy.agent_rule(&caller.agent);
        let mut caps = Vec::new();
        if let Some(cap) = rule.and_then(|r| r.max_per_request) {
            caps.push(cap);
        }
        if rule.is_none_or(|r| r.inherit_parent) {
            caps.extend(policy.max_per_request);
        }
        if let Some(cap) = caps.iter().min() {
            if t.price > *cap {
                self.fail(format!(
                    "admitted a price of {} above maxPerRequest {cap}",
                    t.price
                ));
            }
        }
        let least = call.min_price.unwrap_or(call.price).min(call.price);
        if t.price > call.price || t.price < least || t.policy != call.policy {
            self.fail(format!("ticket {t:?} does not reserve the call {call:?}"));
        }
        self.open.push(t.clone());
        if t.price > 0 {
            let model = self
                .sessions
                .entry((t.tenant, t.session.clone()))
                .or_default();
            model.scope.bound = policy.session_budget.map(u128::from);
            if let Some(key) = &t.budget_agent {
                model.agents.entry(key.clone()).or_default().bound =
                    policy.budget_limit(key).map(u128::from);
            }
            if t.windows {
                let w = self.windows.entry(t.tenant).or_default();
                w.day = policy.daily_budget.map(u128::from);
                w.month = policy.monthly_budget.map(u128::from);
            } else if cfg.track_windows {
                self.fail(format!(
                    "a priced call reserved nothing in its tenant's windows: {t:?}"
                ));
            }
        }
        Some(t)
    }

    fn settle(&mut self, ticket: &Ticket, outcome: &Outcome) {
        // Tickets that reserve nothing all have id 0: the first equal one is as good.
        let Some(index) = self.open.iter().position(|t| t == ticket) else {
            self.fail(format!("settling ticket #{} twice", ticket.id));
        };
        self.open.remove(index);
        let now_ms = self.now_ms;
        let result = ledger::settle(
            self.cfg,
            &self.store,
            &mut self.local,
            ticket,
            outcome,
            now_ms,
        );
        self.note(format!(
            "settled #{} {} price {} cost {}{}",
            ticket.id,
            ticket.session,
            ticket.price,
            outcome.cost,
            if outcome.unconfirmed {
                " (unconfirmed)"
            } else {
                ""
            }
        ));
        if let Err(e) = result {
            self.fail(format!("settling #{} failed: {}", ticket.id, e.message));
        }
        let cost = u128::from(outcome.cost);
        let over = cost.saturating_sub(u128::from(ticket.price));
        if cost == 0 {
            return;
        }
        let model = self
            .sessions
            .entry((ticket.tenant, ticket.session.clone()))
            .or_default();
        model.scope.overrun(cost, over);
        if let Some(key) = &ticket.budget_agent {
            model
                .agents
                .entry(key.clone())
                .or_default()
                .overrun(cost, over);
        }
        if self.cfg.track_windows {
            let w = self.windows.entry(ticket.tenant).or_default();
            w.spent += cost;
            for bound in [&mut w.day, &mut w.month] {
                if let Some(b) = bound.as_mut() {
                    *b += over;
                }
            }
        }
    }

    /// Settles now, later, or when the stream ends, as the input says.
    fn finish(&mut self, ticket: Ticket, outcome: Outcome, end: End, forwarded: bool, paid: bool) {
        match end {
            End::Now => self.settle(&ticket, &outcome),
            End::Later(k) => self.due.push(Due {
                at_step: self.step + 1 + usize::from(k % 4),
                ticket,
                outcome,
            }),
            End::Gone => {
                // The stream's log: a call that went upstream stays charged (a payment
                // in flight is flagged unconfirmed); one that never did is given back.
                let outcome = if forwarded {
                    Outcome {
                        cost: ticket.price,
                        unconfirmed: paid,
                        ..Outcome::default()
                    }
                } else {
                    Outcome::release()
                };
                self.due.push(Due {
                    at_step: usize::MAX,
                    ticket,
                    outcome,
                });
            }
        }
    }

    fn settle_due(&mut self, all: bool) {
        let step = self.step;
        let (now, later): (Vec<Due>, Vec<Due>) = std::mem::take(&mut self.due)
            .into_iter()
            .partition(|d| all || d.at_step <= step);
        self.due = later;
        for d in now {
            self.settle(&d.ticket, &d.outcome);
        }
    }

    // --- the invariants ----------------------------------------------------------------

    fn check(&mut self, when: &str, final_check: bool) {
        let cfg = self.cfg;
        let keys: Vec<(usize, String)> = self.sessions.keys().cloned().collect();
        for (tenant, session) in keys {
            let tenant_id = self.tenant_id(tenant);
            let found = match sessions::lookup(&self.store, tenant_id, &session, &cfg.sessions) {
                Ok(found) => found,
                Err(e) => self.fail(format!("{when}: lookup of {session}: {}", e.message)),
            };
            let mine: Vec<&Ticket> = self
                .open
                .iter()
                .filter(|t| t.tenant == tenant && t.session == session)
                .collect();
            let open: u128 = mine.iter().map(|t| u128::from(t.price)).sum();
            let mut open_by_agent: HashMap<String, u128> = HashMap::new();
            for t in &mine {
                if let Some(k) = &t.budget_agent {
                    *open_by_agent.entry(k.clone()).or_default() += u128::from(t.price);
                }
            }
            let commits = self.local.take_commits(tenant, &session);
            let pending: u128 = commits.iter().map(|c| u128::from(c.amount)).sum();
            let mut pending_by_agent: HashMap<String, u128> = HashMap::new();
            for c in &commits {
                if let Some(k) = &c.budget_agent {
                    *pending_by_agent.entry(k.clone()).or_default() += u128::from(c.amount);
                }
            }
            self.local.return_commits(tenant, &session, commits);
            if final_check && pending > 0 {
                self.fail(format!(
                    "{when}: {session} still has {pending} of commits after the flush"
                ));
            }
            let model = &self.sessions[&(tenant, session.clone())];
            let Some((_, record)) = found else {
                if open > 0 || pending > 0 {
                    self.fail(format!(
                        "{when}: {tenant_id}/{session} has no record, yet {open} is reserved by open tickets and {pending} waits to be committed"
                    ));
                }
                if !model.seen && model.scope.spent > 0 {
                    self.fail(format!(
                        "{when}: {tenant_id}/{session} was charged {} but has no budget record: the charge is lost",
                        model.scope.spent
                    ));
                }
                // Evicted (idle) or never created: it starts over.
                self.sessions
                    .insert((tenant, session), SessionModel::default());
                continue;
            };
            let reserved = u128::from(record.reserved());
            let spent = u128::from(record.spent);
            if reserved != open + pending {
                self.fail(format!(
                    "{when}: {tenant_id}/{session} reserves {reserved}, but the open tickets hold {open} and the unwritten commits {pending}\nrecord: {record:?}"
                ));
            }
            if kept(spent + pending) != kept(model.scope.spent) {
                self.fail(format!(
                    "{when}: {tenant_id}/{session} spent {spent} (+{pending} to commit), but the calls settled cost {}\nrecord: {record:?}",
                    model.scope.spent
                ));
            }
            if let Some(bound) = model.scope.bound {
                if spent + reserved > bound {
                    self.fail(format!(
                        "{when}: {tenant_id}/{session} uses {} of a session budget of {bound} (metered overruns included)",
                        spent + reserved
                    ));
                }
            }
            let mut agent_keys: Vec<String> = model.agents.keys().cloned().collect();
            agent_keys.extend(record.agents.iter().map(|a| a.id.clone()));
            agent_keys.sort();
            agent_keys.dedup();
            for key in agent_keys {
                let (a_spent, a_reserved) = record.agent_totals(&key);
                let (a_spent, a_reserved) = (u128::from(a_spent), u128::from(a_reserved));
                let a_open = open_by_agent.get(&key).copied().unwrap_or(0);
                let a_pending = pending_by_agent.get(&key).copied().unwrap_or(0);
                let a_model = model.agents.get(&key).copied().unwrap_or_default();
                if a_reserved != a_open + a_pending {
                    self.fail(format!(
                        "{when}: agent budget {key} of {session} reserves {a_reserved}, open tickets hold {a_open}, unwritten commits {a_pending}\nrecord: {record:?}"
                    ));
                }
                if kept(a_spent + a_pending) != kept(a_model.spent) {
                    self.fail(format!(
                        "{when}: agent budget {key} of {session} spent {a_spent} (+{a_pending} to commit), but its calls settled cost {}\nrecord: {record:?}",
                        a_model.spent
                    ));
                }
                if let Some(bound) = a_model.bound {
                    if a_spent + a_reserved > bound {
                        self.fail(format!(
                            "{when}: agent budget {key} of {session} uses {} of {bound}",
                            a_spent + a_reserved
                        ));
                    }
                }
            }
            if let Some(m) = self.sessions.get_mut(&(tenant, session)) {
                m.seen = true;
            }
        }
        let tenants: Vec<usize> = self.windows.keys().copied().collect();
        for tenant in tenants {
            let tenant_id = self.tenant_id(tenant);
            let bytes = match read(&self.store, &tenant_windows_key(tenant_id)) {
                Ok(b) => b,
                Err(e) => self.fail(format!("{when}: windows of {tenant_id}: {}", e.message)),
            };
            let Ok(mut w) = WindowsRecord::decode(&bytes) else {
                self.fail(format!(
                    "{when}: the windows record of {tenant_id} does not decode"
                ));
            };
            w.roll(self.now_s());
            let open: u128 = self
                .open
                .iter()
                .filter(|t| t.tenant == tenant && t.windows)
                .map(|t| u128::from(t.price))
                .sum();
            let pending_w = self.local.take_window_commits(tenant);
            let pending = pending_w.map_or(0, |p| u128::from(p.amount));
            self.local.return_window_commits(tenant, pending_w);
            if final_check && pending > 0 {
                self.fail(format!(
                    "{when}: {tenant_id}'s windows keep {pending} of commits after the flush"
                ));
            }
            let model = &self.windows[&tenant];
            let reserved = u128::from(w.reserved());
            if reserved != open + pending {
                self.fail(format!(
                    "{when}: {tenant_id}'s windows reserve {reserved}, open tickets hold {open}, unwritten commits {pending}\nrecord: {w:?}"
                ));
            }
            for (name, spent, bound) in [
                ("day", u128::from(w.day.spent), model.day),
                ("month", u128::from(w.month.spent), model.month),
            ] {
                if kept(spent + pending) != kept(model.spent) {
                    self.fail(format!(
                        "{when}: {tenant_id}'s {name} spent {spent} (+{pending} to commit), but the calls settled cost {}\nrecord: {w:?}",
                        model.spent
                    ));
                }
                if let Some(bound) = bound {
                    if spent + reserved > bound {
                        self.fail(format!(
                            "{when}: {tenant_id}'s {name} uses {} of its budget {bound}",
                            spent + reserved
                        ));
                    }
                }
            }
        }
    }

    // --- one request -------------------------------------------------------------------

    fn run(&mut self, req: &Request) {
        let cfg = self.cfg;
        self.now_ms = DAY_START_MS + u64::from(req.at_ms) % DAY_MS;
        self.store.set_now_micros(self.now_ms * 1000);
        self.settle_due(false);
        let now_ms = self.now_ms;
        let now_s = self.now_s();

        let Built {
            method,
            path,
            authority,
            headers,
            route_bytes,
            body,
        } = build(cfg, req, now_s);
        let lookup = |wanted: &str| lookup_in(&headers, wanted);
        let method_text = String::from_utf8_lossy(&method).into_owned();

        // The report API.
        if let Some(route) = admin::route(cfg, &method_text, &String::from_utf8_lossy(&path)) {
            self.admin(route, &headers, &path);
            return;
        }

        // Who, and what the call is.
        let route = route_meta::decode(&route_bytes).unwrap_or_else(|_| {
            let bad = || Some(route_meta::NOT_TEXT.to_string());
            RouteSettings {
                policy: bad(),
                price: bad(),
                ..RouteSettings::default()
            }
        });
        let mut key_memo = |key: &[u8]| cfg.tenant_for_key(key);
        let caller = match firewall::identify(
            cfg,
            &lookup,
            &mut key_memo,
            route.default_session.as_deref(),
        ) {
            Ok(caller) => caller,
            Err(_) => return,
        };
        let mut call = match firewall::describe_call(cfg, &authority, &path, &route) {
            Ok(call) => call,
            Err(refusal) => {
                if refusal.code != ErrorCode::ConfigError
                    && refusal.code != ErrorCode::InvalidRequest
                {
                    self.fail(format!(
                        "describe_call refused with {}",
                        refusal.code.as_str()
                    ));
                }
                return;
            }
        };
        if method_text == "OPTIONS" {
            call.price = 0;
        }
        let tenant = self.tenant_id(caller.tenant);

        // x402 relay: the agent's own payment only ever adds a check.
        let v1 = lookup(x402::V1_PAYMENT_HEADER);
        let v2 = lookup(x402::V2_PAYMENT_HEADER);
        let store = &self.store;
        let endpoint = call.endpoint.clone();
        let offered = |p: &x402::Payment| {
            let of = offers::OfferOf {
                tenant,
                session: &caller.session,
                endpoint: &endpoint,
            };
            offers::asset_for(store, of, &p.network, &p.to, p.value, now_ms)
        };
        let mut relayed = call.clone();
        if let Err(refusal) =
            firewall::relay_payment(cfg, &mut relayed, v1.clone(), v2.clone(), now_s, &offered)
        {
            self.refused(&caller, &refusal);
            return;
        }
        if relayed.payment.is_some() {
            // The payment's value is reserved, in the budget's unit, and never less
            // than the route's price.
            let header = match (&v1, &v2) {
                (HeaderValue::One(v), _) | (_, HeaderValue::One(v)) => v.clone(),
                _ => self.fail("a payment was relayed without its header".into()),
            };
            let payment = match x402::parse_payment_header(&header) {
                Ok(p) => p,
                Err(e) => self.fail(format!("a relayed payment does not parse: {e}")),
            };
            let asset = payment
                .accepted
                .as_ref()
                .map(|a| a.asset.clone())
                .or_else(|| offered(&payment));
            let rules = &cfg.policies[call.policy].payments;
            let worth = asset
                .as_deref()
                .map(|a| rules.to_budget(&payment.network, a, payment.value));
            match worth {
                Some(Ok(worth)) if relayed.price >= worth && relayed.price >= call.price => {}
                other => self.fail(format!(
                    "relay mode reserves {} for a payment of {} of asset {:?} on {} (worth {:?} in the budget's unit; the route's price is {})",
                    relayed.price, payment.value, asset, payment.network, other, call.price
                )),
            }
        }
        let mut call = relayed;
        if let Some(p) = &call.payment {
            self.note(format!(
                "relayed payment v{} of {} on {}: price {}",
                p.version, p.value, p.network, call.price
            ));
        }
        let policy = &cfg.policies[call.policy];
        let pays = call.x402 && call.payment.is_none() && cfg.signer.is_some() && policy.pay_x402;
        let content_length = match lookup("content-length") {
            HeaderValue::One(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|t| t.parse::<usize>().ok()),
            _ => None,
        };
        let lost_body = pays
            && (content_length.is_some_and(|l| l > cfg.pay_body_limit)
                || body.len() > cfg.pay_body_limit);

        // The cache: what the key is made of, if the call may be cached.
        let end_of_stream = body.is_empty();
        let route_ttl = route
            .cache_ttl
            .as_deref()
            .and_then(|t| t.parse::<u64>().ok());
        let cache_ttl = cfg.cache.as_ref().and_then(|cc| {
            let bypass = matches!(lookup("x-pag0-cache-bypass"), HeaderValue::One(v) if v.eq_ignore_ascii_case(b"true"));
            let cache_control = match lookup("cache-control") {
                HeaderValue::One(v) => Some(v),
                _ => None,
            };
            let range = !matches!(lookup("range"), HeaderValue::Missing);
            if bypass
                || !cc.caches_method(&method_text)
                || cache::request_bypasses(cache_control.as_deref(), range)
                || call.x402
                || call.meter.is_some()
            {
                return None;
            }
            let ttl = cc.ttl_for(&call.endpoint, route_ttl);
            if ttl == 0 || (!end_of_stream && content_length.is_none_or(|l| l > 256 * 1024)) {
                return None;
            }
            Some(ttl)
        });

        // Token metering (src/host/stream/meter.rs): a body over llm.maxBodyBytes is
        // refused before the gate; at the gate the body prices the call by its bound.
        let meter_api = call
            .meter
            .and_then(|kind| Api::for_path(kind, &String::from_utf8_lossy(&path)));
        let mut meter: Option<MeterFlow> = None;
        if let Some(api) = meter_api {
            let Some(settings) = cfg.llm.as_ref() else {
                self.fail("a metered call, and no llm block".into());
            };
            if content_length.is_some_and(|l| l > settings.max_body_bytes) {
                let refusal = Refusal::new(ErrorCode::InvalidRequest, "over llm.maxBodyBytes")
                    .with_status(413);
                self.refused(&caller, &refusal);
                return;
            }
            let request = match llm_request::read(api, &body, settings) {
                Ok(r) => r,
                Err(refusal) => {
                    self.refused(&caller, &refusal);
                    return;
                }
            };
            if call.payment.is_some() {
                // The bound would take the place of the payment's worth.
                self.fail(format!(
                    "a call carrying a relayed x402 payment (reserving {}) is metered by its tokens",
                    call.price
                ));
            }
            call.price = request.bound(request.asked_output(settings));
            // (Above the bound when thinking's least limit is above what was asked:
            // admission then takes the bound as the least.)
            call.min_price = Some(request.bound(request.min_output(settings)));
            self.note(format!(
                "metered {api:?} {:?}: bound {}, least {:?}",
                request.model, call.price, call.min_price
            ));
            meter = Some(MeterFlow {
                request,
                plan: None,
            });
        }

        // The gate.
        if let Err(refusal) = firewall::check_lists(cfg, &caller, &call) {
            self.refused(&caller, &refusal);
            return;
        }
        let mut fill: Option<(u32, String, u64)> = None;
        if let (Some(cc), Some(ttl)) = (cfg.cache.as_ref(), cache_ttl) {
            let private = firewall::private_cache(cfg, &caller, &call);
            let namespace = cc.namespace(&caller.session, &caller.agent, private);
            let credentials: Vec<Vec<u8>> = cache::CREDENTIAL_HEADERS
                .iter()
                .map(|h| one_of(&headers, h))
                .collect();
            let credentials: Vec<&[u8]> = credentials.iter().map(Vec::as_slice).collect();
            let query = path
                .iter()
                .position(|b| *b == b'?')
                .map_or(Vec::new(), |at| path[at + 1..].to_vec());
            let (content_type, accept, accept_encoding) = (
                one_of(&headers, "content-type"),
                one_of(&headers, "accept"),
                one_of(&headers, "accept-encoding"),
            );
            let key = cache::cache_key(&KeyParts {
                tenant,
                namespace: &namespace,
                method: &method_text,
                authority: &authority,
                endpoint: &call.endpoint,
                query: &query,
                content_type: &content_type,
                accept: &accept,
                accept_encoding: &accept_encoding,
                credentials: &credentials,
                body: &body,
            });
            match cache::find_or_claim(&self.store, cc, &key, now_ms) {
                Ok(Found::Hit(entry)) => {
                    if entry.key != key
                        || entry.state != EntryState::Filled
                        || entry.expired(now_ms)
                    {
                        self.fail(format!(
                            "a cache hit for another key or a stale entry: {entry:?}"
                        ));
                    }
                    let view = ledger::current_view(cfg, &self.store, &caller, &call, now_s);
                    match view {
                        Ok((_, Some(refusal))) => self.refused(&caller, &refusal),
                        _ => {
                            self.note(format!("cache hit for {}", caller.session));
                            {
                                let now_ms = self.now_s() * 1000;
                                ledger::record_hit(
                                    &mut self.local,
                                    cfg,
                                    &caller,
                                    &call,
                                    entry.cost,
                                    now_ms,
                                );
                            }
                        }
                    }
                    return;
                }
                Ok(Found::Pending(slot)) => {
                    // A waiter whose wait ran out goes upstream uncached.
                    let _ = cache::poll(&self.store, slot, &key, now_ms + cc.coalesce_wait_ms);
                }
                Ok(Found::Claimed(slot)) => fill = Some((slot, key, ttl)),
                Err(_) => {}
            }
        }
        let abandon = |h: &Harness, fill: &Option<(u32, String, u64)>| {
            if let Some((slot, key, _)) = fill {
                let _ = cache::abandon(&h.store, *slot, key);
            }
        };

        // Reserve, and ask for approval when the price calls for it.
        let Some(ticket) = self.admit(&caller, &call) else {
            abandon(self, &fill);
            return;
        };
        if let Some(flow) = meter.as_mut() {
            self.plan(flow, &call, &ticket, &body);
        }
        let up = &req.upstream;
        if !self.approved(&caller, &call, &ticket, up) {
            abandon(self, &fill);
            return;
        }

        // The upstream's answer.
        let answer = match &up.status {
            Some(s) => status(s),
            None if matches!(req.kind, Kind::Relay | Kind::Pay) && call.payment.is_none() => 402,
            None => 200,
        };
        let reached = up.reached;
        if matches!(req.end, End::Gone) && !(answer == 402 && reached && pays) {
            // The client left before any answer: the stream's log settles.
            abandon(self, &fill);
            if let Some(flow) = &meter {
                // A metered call cut before its usage came: the bound it went with.
                let cost = flow
                    .plan
                    .map_or(ticket.price, |p| p.bound.min(ticket.price));
                let model = Some(flow.request.model.clone());
                self.due.push(Due {
                    at_step: usize::MAX,
                    ticket,
                    outcome: Outcome {
                        cost,
                        unmetered: true,
                        model,
                        ..Outcome::default()
                    },
                });
                return;
            }
            let paid = call.payment.is_some();
            self.finish(ticket, Outcome::release(), End::Gone, true, paid);
            return;
        }
        let mut response: Vec<(String, Vec<u8>)> = up
            .headers
            .iter()
            .take(8)
            .map(|(n, v)| (pick_str(n, RESPONSE_NAMES), pick(v, RESPONSE_VALUES)))
            .collect();
        let mut answer_body = up.body.clone();
        match &up.offer {
            Offer::None => {}
            Offer::Good(amount) => {
                let v = json!({"x402Version": 2, "resource": {"url": "http://x402.example/a"}, "accepts": [{
                    "scheme": "exact", "network": "eip155:84532", "amount": amount.to_string(),
                    "asset": USDC_SEPOLIA, "payTo": PAY_TO, "maxTimeoutSeconds": 60,
                    "extra": {"name": "USDC", "version": "2"}}]});
                response.push((
                    x402::V2_REQUIRED_HEADER.into(),
                    base64::encode(v.to_string().as_bytes()).into_bytes(),
                ));
            }
            Offer::V2Header(list) => {
                let accepts: Vec<Value> =
                    list.iter().take(4).map(|r| requirement(r, true)).collect();
                let v = json!({"x402Version": 2, "resource": {"url": "http://x402.example/a"}, "accepts": accepts});
                response.push((
                    x402::V2_REQUIRED_HEADER.into(),
                    base64::encode(v.to_string().as_bytes()).into_bytes(),
                ));
            }
            Offer::V1Body(list) => {
                let accepts: Vec<Value> =
                    list.iter().take(4).map(|r| requirement(r, false)).collect();
                answer_body =
                    json!({"x402Version": 1, "accepts": accepts, "error": "payment required"})
                        .to_string()
                        .into_bytes();
            }
            Offer::RawHeader(bytes) => {
                response.push((x402::V2_REQUIRED_HEADER.into(), bytes.clone()))
            }
            Offer::RawBody(bytes) => answer_body = bytes.clone(),
        }
        if let (Some(flow), Some(m)) = (&meter, &up.metered) {
            answer_body = llm_answer(flow.request.api, m);
            let kind = if m.sse {
                "text/event-stream"
            } else {
                "application/json"
            };
            response.insert(0, ("content-type".into(), kind.as_bytes().to_vec()));
        }
        if let Some(value) = settlement_value(&up.settlement) {
            let version = call.payment.as_ref().map_or(2, |p| p.version);
            let swapped = matches!(up.settlement, Settlement::Spec { swapped: true, .. });
            let version = if swapped { 3 - version } else { version };
            response.push((x402::settlement_header(version).into(), value));
        }
        if answer == 402 && reached && meter.is_none() {
            if pays {
                if self.pay(
                    &caller,
                    &call,
                    ticket.clone(),
                    &response,
                    &answer_body,
                    up,
                    lost_body,
                    req.end,
                ) {
                    abandon(self, &fill);
                    return;
                }
            } else if call.x402 && call.payment.is_none() && !policy.pay_x402 {
                match self.relay_offer(&caller, &call, &ticket, &response, &answer_body) {
                    RelayOffer::Refused => {
                        abandon(self, &fill);
                        return;
                    }
                    RelayOffer::Passed(promise) => {
                        let outcome = self.answer_outcome(
                            &call,
                            &ticket,
                            answer,
                            reached,
                            &response,
                            up,
                            None,
                            &answer_body,
                        );
                        abandon(self, &fill);
                        self.settle(&ticket, &outcome);
                        if let Some(promise) = promise {
                            self.keep_promise(*promise);
                        }
                        return;
                    }
                    RelayOffer::NotAnOffer => {}
                }
            }
        }
        let outcome = self.answer_outcome(
            &call,
            &ticket,
            answer,
            reached,
            &response,
            up,
            meter.as_ref(),
            &answer_body,
        );
        if let Some((slot, key, ttl)) = fill.take() {
            self.store_answer(
                slot,
                key,
                ttl,
                answer,
                reached,
                &response,
                &answer_body,
                outcome.cost,
            );
        }
        let paid = call.payment.is_some();
        self.finish(ticket, outcome, req.end, true, paid);
    }

    /// A metered call was admitted with `ticket.price` (its bound, or less down to its
    /// least price): the output limit that pays for, written into the body the upstream
    /// gets (src/host/stream/meter.rs `apply`).
    fn plan(&mut self, flow: &mut MeterFlow, call: &Call, ticket: &Ticket, body: &[u8]) {
        let Some(settings) = self.cfg.llm.as_ref() else {
            return;
        };
        let request = &flow.request;
        let least = call.min_price.unwrap_or(call.price);
        let Some(plan) = request.plan(settings, ticket.price) else {
            self.fail(format!(
                "a metered call reserved {} (bound {}, least {least}), which pays for no output limit",
                ticket.price, call.price
            ));
        };
        let asked = request.asked_output(settings);
        if plan.bound > ticket.price
            || plan.max_output > asked
            || plan.max_output < request.min_output(settings).min(asked)
            || plan.lowered != (plan.max_output < asked)
        {
            self.fail(format!(
                "the plan {plan:?} for a reservation of {} (asked {asked}, least output {})",
                ticket.price,
                request.min_output(settings)
            ));
        }
        // The body goes upstream with that limit (and a thinking budget below it).
        let sent = request
            .rewrite(body, &plan)
            .unwrap_or_else(|| body.to_vec());
        let unbounded = pag0::core::meter::LlmSettings {
            max_body_bytes: usize::MAX,
            ..settings.clone()
        };
        match llm_request::read(request.api, &sent, &unbounded) {
            Ok(again) => {
                let thinking_ok = again.thinking_budget.is_none_or(|b| b < plan.max_output);
                if again.asked_max != Some(plan.max_output) || !thinking_ok {
                    self.fail(format!(
                        "the body sent upstream asks {:?} tokens (thinking {:?}), the reservation pays for {}: {}",
                        again.asked_max,
                        again.thinking_budget,
                        plan.max_output,
                        String::from_utf8_lossy(&sent)
                    ));
                }
                if request.api == Api::Chat && request.stream {
                    let asks_usage = serde_json::from_slice::<Value>(&sent)
                        .ok()
                        .is_some_and(|v| v["stream_options"]["include_usage"] == json!(true));
                    if !asks_usage {
                        self.fail(format!(
                            "a streamed chat call goes without include_usage: {}",
                            String::from_utf8_lossy(&sent)
                        ));
                    }
                }
            }
            Err(e) => self.fail(format!(
                "the body sent upstream does not read back: {} ({})",
                e.message,
                String::from_utf8_lossy(&sent)
            )),
        }
        self.note(format!(
            "planned {} output tokens for {}",
            plan.max_output, ticket.price
        ));
        flow.plan = Some(plan);
    }

    /// A metered call's end: its usage's cost, or, without usage, the bound it went with.
    #[allow(clippy::too_many_arguments)]
    fn metered_outcome(
        &self,
        call: &Call,
        ticket: &Ticket,
        flow: &MeterFlow,
        upstream_status: Option<u32>,
        response: &[(String, Vec<u8>)],
        up: &Upstream,
        body: &[u8],
    ) -> Outcome {
        if !firewall::should_commit(call.charge_on, upstream_status) {
            // An error answer (the APIs do not bill those) or Envoy's own.
            return Outcome::release();
        }
        let streaming =
            first_of(response, "content-type").is_some_and(|t| t.starts_with(b"text/event-stream"));
        let mut answer = AnswerMeter::new(flow.request.api, streaming);
        match up.metered.as_ref().map_or(0, |m| usize::from(m.chunk)) {
            0 => answer.feed(body),
            n => body.chunks(n).for_each(|c| answer.feed(c)),
        }
        let Some(plan) = flow.plan else {
            self.fail("a metered call answered without a plan".into());
        };
        let model = Some(flow.request.model.clone());
        match answer.finish() {
            MeterResult::Usage(usage) => {
                let cost = usage.cost(&flow.request.rates);
                let input = usage
                    .input
                    .saturating_add(usage.cache_write_5m)
                    .saturating_add(usage.cache_write_1h)
                    .saturating_add(usage.cache_read);
                let within = input <= flow.request.input_bound
                    && usage.output <= plan.max_output.saturating_mul(flow.request.n);
                if within && cost > plan.bound {
                    self.fail(format!(
                        "a call within the limits pag0 set ({usage:?}, input bound {}, output {}) costs {cost}, above its bound {}",
                        flow.request.input_bound, plan.max_output, plan.bound
                    ));
                }
                Outcome {
                    cost,
                    tokens: Some(usage.tokens()),
                    model,
                    ..Outcome::default()
                }
            }
            MeterResult::Unmetered => Outcome {
                cost: plan.bound.min(ticket.price),
                unmetered: true,
                model,
                ..Outcome::default()
            },
        }
    }

    /// The approval service, when the call's price is above the policy's threshold; a
    /// denial (or no answer) gives the reservation back.
    fn approved(&mut self, caller: &Caller, call: &Call, ticket: &Ticket, up: &Upstream) -> bool {
        let mut priced = call.clone();
        priced.price = ticket.price;
        if firewall::approval_for(self.cfg, &priced).is_none() {
            return true;
        }
        let _ = firewall::approval_request(self.cfg, caller, &priced);
        match firewall::approval_answer(up.approval_ok, &pick(&up.approval, APPROVALS)) {
            Some((true, _)) => true,
            _ => {
                self.settle(ticket, &Outcome::refused());
                self.refused(caller, &Refusal::new(ErrorCode::ApprovalDenied, "denied"));
                false
            }
        }
    }

    /// How the call ends, from the upstream's answer (src/host/stream/respond.rs, and
    /// src/host/stream/meter.rs for a metered call).
    #[allow(clippy::too_many_arguments)]
    fn answer_outcome(
        &self,
        call: &Call,
        ticket: &Ticket,
        answer: u32,
        reached: bool,
        response: &[(String, Vec<u8>)],
        up: &Upstream,
        meter: Option<&MeterFlow>,
        body: &[u8],
    ) -> Outcome {
        let upstream_status = reached.then_some(answer);
        if let Some(flow) = meter {
            return self.metered_outcome(call, ticket, flow, upstream_status, response, up, body);
        }
        match &call.payment {
            None => {
                if firewall::should_commit(call.charge_on, upstream_status) {
                    Outcome::commit(ticket.price)
                } else {
                    Outcome::release()
                }
            }
            Some(paid) => {
                let settlement = first_of(response, x402::settlement_header(paid.version));
                let outcome = payments::payment_outcome(upstream_status, settlement.as_deref());
                let effect = outcome.effect(paid.value, &paid.network);
                if !reached && outcome == PaymentOutcome::Unconfirmed {
                    Outcome {
                        cost: ticket.price,
                        unconfirmed: true,
                        ..Outcome::default()
                    }
                } else {
                    Outcome {
                        cost: if effect.commit { ticket.price } else { 0 },
                        unconfirmed: effect.unconfirmed,
                        ..Outcome::default()
                    }
                }
            }
        }
    }

    /// Stores the answer in the claimed slot when it may be stored.
    #[allow(clippy::too_many_arguments)]
    fn store_answer(
        &mut self,
        slot: u32,
        key: String,
        ttl: u64,
        answer: u32,
        reached: bool,
        response: &[(String, Vec<u8>)],
        body: &[u8],
        cost: u64,
    ) {
        let cfg = self.cfg;
        let Some(cc) = cfg.cache.as_ref() else { return };
        let text =
            |name: &str| first_of(response, name).map(|v| String::from_utf8_lossy(&v).into_owned());
        let (cache_control, vary, content_type) =
            (text("cache-control"), text("vary"), text("content-type"));
        let facts = AnswerFacts {
            status: if reached { answer } else { 0 },
            cache_control: cache_control.as_deref(),
            has_set_cookie: first_of(response, "set-cookie").is_some(),
            vary: vary.as_deref(),
            content_type: content_type.as_deref(),
            has_content_range: first_of(response, "content-range").is_some(),
        };
        let length = text("content-length").and_then(|l| l.parse::<usize>().ok());
        let max = cc.max_entry_bytes as usize;
        let storable = cache::storable(&facts);
        if let Ok(Some(0)) = storable {
            self.fail("storable answered a max-age of 0 as storable".into());
        }
        match storable {
            Ok(max_age) if length.is_none_or(|l| l <= max) && body.len() <= max => {
                if !matches!(facts.status, 200 | 203 | 204) {
                    self.fail(format!(
                        "an answer of status {} was found storable",
                        facts.status
                    ));
                }
                let entry = Entry {
                    key,
                    state: EntryState::Filled,
                    stored_ms: self.now_ms,
                    ttl_secs: max_age.map_or(ttl, |age| ttl.min(age)),
                    status: facts.status as u16,
                    cost,
                    content_type: content_type.unwrap_or_default(),
                    content_encoding: text("content-encoding").unwrap_or_default(),
                    body: body.to_vec(),
                };
                match cache::fill(&self.store, slot, &entry) {
                    Ok(true) => {
                        let stored = Entry::decode(
                            &read(&self.store, &cache::slot_key(slot)).unwrap_or_default(),
                        );
                        if stored.as_ref() != Some(&entry) {
                            self.fail(format!(
                                "the cache slot holds {stored:?}, not the entry filled"
                            ));
                        }
                    }
                    Ok(false) => {}
                    Err(e) => self.fail(format!("cache fill failed: {}", e.message)),
                }
            }
            _ => {
                let _ = cache::abandon(&self.store, slot, &key);
            }
        }
    }

    /// Pay mode's answer to a 402 (src/host/stream/pay.rs). `false`: the 402 is not an
    /// offer and goes to the agent as it is.
    #[allow(clippy::too_many_arguments)]
    fn pay(
        &mut self,
        caller: &Caller,
        call: &Call,
        first: Ticket,
        response: &[(String, Vec<u8>)],
        body: &[u8],
        up: &Upstream,
        lost_body: bool,
        end: End,
    ) -> bool {
        let cfg = self.cfg;
        let parsed = match first_of(response, x402::V2_REQUIRED_HEADER) {
            Some(h) => x402::parse_required_header(&h),
            None => {
                let body: &[u8] = if body.len() <= MAX_OFFER_BODY {
                    body
                } else {
                    &[]
                };
                let claims = serde_json::from_slice::<Value>(body)
                    .ok()
                    .is_some_and(|v| v.get("x402Version").is_some());
                if !claims {
                    return false;
                }
                x402::parse_required_body(body)
            }
        };
        // The first leg was answered 402: it is not charged.
        self.settle(&first, &Outcome::refused());
        let offer = match parsed {
            Ok(offer) => offer,
            Err(e) => {
                self.refused(
                    caller,
                    &Refusal::new(ErrorCode::PaymentFailed, e.to_string()),
                );
                return true;
            }
        };
        self.note(format!(
            "pay mode: offer of {} requirements",
            offer.accepts.len()
        ));
        let rules = cfg.policies[call.policy].payments.clone();
        let (chosen, price) = match payments::choose(&offer, &rules) {
            Ok(found) => found,
            Err(why) => {
                self.refused(caller, &Refusal::new(ErrorCode::PaymentNotAllowed, why));
                return true;
            }
        };
        // What is reserved is what policy counts the chosen requirement as, and no
        // allowed requirement is cheaper.
        if rules.check(chosen) != Ok(price) {
            self.fail(format!(
                "choose priced {chosen:?} at {price}, check says {:?}",
                rules.check(chosen)
            ));
        }
        if let Some(cheaper) = offer
            .accepts
            .iter()
            .find(|r| rules.check(r).is_ok_and(|p| p < price))
        {
            self.fail(format!("choose took {price} when {cheaper:?} is cheaper"));
        }
        if lost_body {
            self.refused(
                caller,
                &Refusal::new(ErrorCode::InvalidRequest, "body too large"),
            );
            return true;
        }
        let mut paid = call.clone();
        paid.price = price;
        let Some(ticket) = self.admit(caller, &paid) else {
            return true;
        };
        if !self.approved(caller, &paid, &ticket, up) {
            return true;
        }
        let tenant = self.tenant_id(caller.tenant);
        let _ = x402::signer_request(&offer, chosen, tenant, &caller.session, &caller.agent);
        let signed = if up.signer_ok {
            x402::signer_answer(&pick(&up.signer, SIGNER_ANSWERS), offer.version).ok()
        } else {
            None
        };
        if signed.is_none() {
            self.settle(&ticket, &Outcome::refused());
            self.refused(
                caller,
                &Refusal::new(ErrorCode::SignerUnavailable, "no signature"),
            );
            return true;
        }
        if let End::Gone = end {
            // The client left while the paid retry was out: the payment may have moved.
            let cost = ticket.price;
            self.due.push(Due {
                at_step: usize::MAX,
                ticket,
                outcome: Outcome {
                    cost,
                    unconfirmed: true,
                    ..Outcome::default()
                },
            });
            return true;
        }
        // The paid retry's answer.
        let retry_status = up.retry_status.as_ref().map(status);
        let settlement = settlement_value(&up.retry_settlement);
        let retry_body = pick(&up.retry_body, RETRY_BODIES);
        let outcome = payments::payment_outcome(retry_status, settlement.as_deref());
        let effect = outcome.effect(price, &chosen.network);
        let local_reply = match retry_status {
            None => true,
            Some(503 | 504) => {
                retry_body.starts_with(b"upstream ")
                    || retry_body.starts_with(b"no healthy upstream")
                    || retry_body.is_empty()
            }
            _ => false,
        };
        let ended = match &outcome {
            PaymentOutcome::Failed(_) => Outcome::refused(),
            PaymentOutcome::Unconfirmed if local_reply => Outcome {
                cost: price,
                unconfirmed: true,
                ..Outcome::default()
            },
            PaymentOutcome::Settled(_) | PaymentOutcome::Unconfirmed => Outcome {
                cost: price,
                unconfirmed: effect.unconfirmed,
                ..Outcome::default()
            },
        };
        let failed = matches!(outcome, PaymentOutcome::Failed(_));
        self.finish(ticket, ended, end, true, true);
        if failed {
            self.refused(
                caller,
                &Refusal::new(ErrorCode::PaymentFailed, "refused by the server"),
            );
        }
        true
    }

    /// Relay mode's look at a 402 (src/host/stream/relay.rs).
    fn relay_offer(
        &mut self,
        caller: &Caller,
        call: &Call,
        ticket: &Ticket,
        response: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> RelayOffer {
        let cfg = self.cfg;
        let offer = match first_of(response, x402::V2_REQUIRED_HEADER) {
            Some(h) => match x402::parse_required_header(&h) {
                Ok(offer) => offer,
                Err(_) => return RelayOffer::NotAnOffer,
            },
            None => {
                let body: &[u8] = if body.len() <= MAX_OFFER_BODY {
                    body
                } else {
                    &[]
                };
                match x402::parse_required_body(body) {
                    Ok(offer) => offer,
                    Err(_) => return RelayOffer::NotAnOffer,
                }
            }
        };
        let tenant = self.tenant_id(caller.tenant);
        offers::remember(
            &self.store,
            tenant,
            &caller.session,
            &call.endpoint,
            &offer,
            self.now_ms,
        );
        let rules = cfg.policies[call.policy].payments.clone();
        match payments::choose(&offer, &rules) {
            Err(why) => {
                self.settle(ticket, &Outcome::refused());
                self.refused(caller, &Refusal::new(ErrorCode::PaymentNotAllowed, why));
                RelayOffer::Refused
            }
            Ok((_, price)) => {
                let mut priced = call.clone();
                priced.price = call.price.max(price);
                self.note(format!("relay mode: offer priced {price}"));
                match ledger::dry_run(cfg, &self.store, caller, &priced, self.now_s()) {
                    Ok(_) => RelayOffer::Passed(Some(Box::new(Promise {
                        caller: caller.clone(),
                        call: priced,
                    }))),
                    Err(refused) => {
                        self.settle(ticket, &Outcome::refused());
                        let refusal = refused.refusal.clone();
                        self.refused(caller, &refusal);
                        RelayOffer::Refused
                    }
                }
            }
        }
    }

    /// Relay mode let an offer through to the agent because a call of that price would
    /// be admitted: the agent's paid retry, right after, must not be refused by a
    /// budget or the kill switch (it would have signed a payment for nothing).
    fn keep_promise(&mut self, promise: Promise) {
        let cfg = self.cfg;
        let now_ms = self.now_ms;
        let result = ledger::admit(
            cfg,
            &self.store,
            &mut self.local,
            &promise.caller,
            &promise.call,
            now_ms,
        );
        match result {
            Ok(admission) => {
                // Only a probe: the retry's answer is a failure, nothing is charged.
                let t = admission.ticket;
                self.open.push(t.clone());
                let policy = &cfg.policies[t.policy];
                if t.price > 0 {
                    let model = self
                        .sessions
                        .entry((t.tenant, t.session.clone()))
                        .or_default();
                    model.scope.bound = policy.session_budget.map(u128::from);
                    if let Some(key) = &t.budget_agent {
                        model.agents.entry(key.clone()).or_default().bound =
                            policy.budget_limit(key).map(u128::from);
                    }
                    let w = self.windows.entry(t.tenant).or_default();
                    w.day = policy.daily_budget.map(u128::from);
                    w.month = policy.monthly_budget.map(u128::from);
                }
                self.settle(&t, &Outcome::release());
            }
            Err(rejection) => {
                let refusal = &rejection.refused.refusal;
                if !matches!(
                    refusal.code,
                    ErrorCode::CapacityExceeded | ErrorCode::InternalError
                ) {
                    self.fail(format!(
                        "relay mode let a 402 offer through (dry run: a payment of {} fits), but the agent's paid retry is refused: {} {}",
                        promise.call.price,
                        refusal.code.as_str(),
                        refusal.message
                    ));
                }
            }
        }
    }

    fn admin(
        &mut self,
        route: Result<AdminRoute, Refusal>,
        headers: &[(String, Vec<u8>)],
        path: &[u8],
    ) {
        let cfg = self.cfg;
        let route = match route {
            Err(_) => return,
            Ok(AdminRoute::Dashboard) => {
                let _ = admin::dashboard(cfg);
                return;
            }
            Ok(route) => route,
        };
        let mut keys = Vec::new();
        for (name, value) in headers {
            if name == "x-pag0-admin-key" || name == &cfg.identity.api_key_header {
                keys.push(value.clone());
            } else if name == "authorization" {
                keys.extend(admin::bearer(value));
            }
        }
        let Ok(access) = admin::authorize(cfg, &keys) else {
            return;
        };
        let tenant = query_param(path, "tenant");
        let now_ms = self.now_ms;
        // As src/host/stream/admin.rs: kill and resume change the switch, then raise a
        // flush request (every VM forgets the records it saw); reports flush first.
        let response = if matches!(route, AdminRoute::Kill(_) | AdminRoute::Resume(_)) {
            let response = admin::handle(
                cfg,
                &self.store,
                access,
                &route,
                tenant.as_deref(),
                self.now_s(),
            );
            if response.status == 200 {
                let _ = self.local.request_flush(cfg, &self.store, now_ms);
            }
            response
        } else {
            let _ = self.local.request_flush(cfg, &self.store, now_ms);
            admin::handle(
                cfg,
                &self.store,
                access,
                &route,
                tenant.as_deref(),
                self.now_s(),
            )
        };
        self.note(format!(
            "admin {route:?} as {access:?}: {}",
            response.status
        ));
        if serde_json::from_str::<Value>(&response.body).is_err() {
            self.fail(format!(
                "the report API answered {} with a body that is not JSON",
                response.status
            ));
        }
    }

    /// Everything settled and flushed: nothing reserved, spent what was settled, and the
    /// report API says so.
    fn close(&mut self) {
        let cfg = self.cfg;
        self.settle_due(true);
        let open = std::mem::take(&mut self.open);
        if !open.is_empty() {
            self.fail(format!("tickets left open by the harness: {open:?}"));
        }
        let now_ms = self.now_ms;
        let _ = self.local.flush(cfg, &self.store, now_ms);
        self.note("flushed".into());
        self.check("after settling everything and flushing", true);
        let keys: Vec<(usize, String)> = self.sessions.keys().cloned().collect();
        for (tenant, session) in keys {
            let tenant_id = self.tenant_id(tenant);
            let Ok(Some((_, record))) =
                sessions::lookup(&self.store, tenant_id, &session, &cfg.sessions)
            else {
                continue;
            };
            let response = admin::handle(
                cfg,
                &self.store,
                Access::Admin,
                &AdminRoute::Report(session.clone()),
                Some(tenant_id),
                self.now_s(),
            );
            let report: Value = match serde_json::from_str(&response.body) {
                Ok(v) if response.status == 200 => v,
                _ => self.fail(format!(
                    "the report of {tenant_id}/{session} answers {}: {}",
                    response.status, response.body
                )),
            };
            let spent = self.sessions[&(tenant, session.clone())].scope.spent;
            if report["totalCost"] != json!(kept(spent).to_string())
                || report["reserved"] != json!("0")
            {
                self.fail(format!(
                    "the report of {tenant_id}/{session} says totalCost {} reserved {}, the calls settled cost {spent} (record {record:?})",
                    report["totalCost"], report["reserved"]
                ));
            }
            // The view a call is told agrees with the record.
            let caller = Caller {
                tenant,
                session: session.clone(),
                agent: "main".into(),
                parent: None,
            };
            let call = Call {
                endpoint: "free.example/v1/x".into(),
                policy: cfg.default_policy,
                price: 0,
                priced: true,
                tool: None,
                charge_on: pag0::core::settings::ChargeOn::Success,
                endpoint_label: "free.example".into(),
                metric_endpoint: "other".into(),
                x402: false,
                meter: None,
                min_price: None,
                payment: None,
            };
            match ledger::current_view(cfg, &self.store, &caller, &call, self.now_s()) {
                Ok((view, _)) => {
                    let scope = view
                        .scopes
                        .iter()
                        .find(|s| s.scope == pag0::core::errors::Scope::Session);
                    if scope
                        .is_none_or(|s| s.spent != record.spent || s.reserved != record.reserved())
                    {
                        self.fail(format!(
                            "current_view of {session} says {scope:?}, the record {record:?}"
                        ));
                    }
                }
                Err(e) => self.fail(format!("current_view of {session}: {}", e.message)),
            }
            let budget = admin::handle(
                cfg,
                &self.store,
                Access::Tenant(tenant),
                &AdminRoute::Budget(session.clone()),
                None,
                self.now_s(),
            );
            if budget.status != 200 || serde_json::from_str::<Value>(&budget.body).is_err() {
                self.fail(format!(
                    "the budget of {tenant_id}/{session} answers {}",
                    budget.status
                ));
            }
        }
    }
}

enum RelayOffer {
    /// Not an x402 offer: the 402 goes to the agent like any answer.
    NotAnOffer,
    /// pag0 refused in the offer's place (the reservation was given back).
    Refused,
    /// The offer goes to the agent; its paid retry was promised admission.
    Passed(Option<Box<Promise>>),
}

/// proxy-wasm's pairs encoding, as Envoy hands route metadata over.
fn encode_pairs(list: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = (list.len() as u32).to_le_bytes().to_vec();
    for (k, v) in list {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in list {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// What the ledger keeps of an amount: it saturates at u64::MAX (no scope can hold
/// more than that, and a sum past it must neither wrap nor panic), so amounts past it
/// are compared as it keeps them.
fn kept(v: u128) -> u128 {
    v.min(u128::from(u64::MAX))
}

/// `PAG0_FUZZ_TRACE=1`: print each input's steps (to see what the corpus reaches).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("PAG0_FUZZ_TRACE").is_some())
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new();
    for req in input.requests.iter().take(MAX_REQUESTS) {
        h.run(req);
        if req.flush_after {
            let now_ms = h.now_ms;
            let _ = h.local.flush(h.cfg, &h.store, now_ms);
            h.note("flushed".into());
        }
        h.check("after a request", false);
        h.step += 1;
    }
    h.close();
    if trace() {
        eprintln!("--- input\n{}", h.log.join("\n"));
    }
});
