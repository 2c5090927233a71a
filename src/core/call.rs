//! What one request is, as the core sees it: who is calling ([`Caller`]), what the
//! route says ([`RouteSettings`]), and what the call is ([`Call`]). Plain data, shared
//! by the firewall, the ledger, the cache and the meter.

use crate::core::amount::Amount;
use crate::core::settings::ChargeOn;

/// A request header as the host found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Missing,
    One(Vec<u8>),
    /// Sent more than once: ambiguous, so refused.
    Many,
}

/// Who the request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: usize,
    pub session: String,
    pub agent: String,
    /// The agent that started this one, when the client says (Claude Code's
    /// `x-claude-code-parent-agent-id`).
    pub parent: Option<String>,
}

/// Per-route settings from route metadata (`filter_metadata.pag0`), as raw strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    pub policy: Option<String>,
    pub price: Option<String>,
    pub tool: Option<String>,
    pub charge_on: Option<String>,
    /// Label for reports and metrics (`api.tavily.com/search`).
    pub endpoint: Option<String>,
    /// Cache TTL override for the route, seconds ("0": never cache).
    pub cache_ttl: Option<String>,
    /// `"true"`: the route's API charges through x402 (pay or relay, by policy).
    pub x402: Option<String>,
    /// `anthropic` or `openai`: calls are metered by their tokens.
    pub meter: Option<String>,
    /// Session id for requests that send none (stock clients).
    pub default_session: Option<String>,
    /// A metadata key pag0 does not know (a typo must not make a route free).
    pub unknown: Option<String>,
}

/// Which LLM API a metered route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterKind {
    Anthropic,
    OpenAi,
}

/// What this call is: where it goes, its policy, price and tool.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub endpoint: String,
    pub policy: usize,
    pub price: Amount,
    /// A metered call may reserve less than `price` (its output limit is then lowered
    /// to fit), down to this; `None`: it reserves `price` or is refused.
    pub min_price: Option<Amount>,
    /// A price was set for the call (route `price`, an `endpoints` rule's price, a
    /// token meter, or x402), even if it is 0; else the route is unpriced.
    pub priced: bool,
    pub tool: Option<String>,
    pub charge_on: ChargeOn,
    /// The endpoint as reports group it: the matching `endpoints` rule's pattern, else
    /// the route's `endpoint` label, else the host.
    pub endpoint_label: String,
    /// The same for metrics, where an unlabelled endpoint is `other` (bounded).
    pub metric_endpoint: String,
    /// The route's API charges through x402.
    pub x402: bool,
    /// The route is token-metered.
    pub meter: Option<MeterKind>,
    /// The agent's own x402 payment, relayed (its value is reserved, never less than
    /// the route's price).
    pub payment: Option<RelayedPayment>,
}

/// An x402 payment the agent made itself, that pag0 budgets and relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedPayment {
    pub version: u8,
    pub network: String,
    pub value: Amount,
}
