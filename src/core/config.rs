//! The plugin configuration as users write it (JSON inside the Envoy YAML), parsed with
//! serde and nothing else. [`crate::core::compile`] checks it and builds what runs.
//!
//! Amounts and thresholds are kept as raw JSON values here so that the compiler can
//! name the field when one is written wrong (an integer instead of a string, say).

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub identity: RawIdentity,
    /// Absent: one open tenant named `default`, no API key asked.
    #[serde(default)]
    pub tenants: Option<Vec<RawTenant>>,
    #[serde(default)]
    pub sessions: RawSessions,
    #[serde(default)]
    pub default_policy: Option<String>,
    #[serde(default)]
    pub policies: OrderedMap<RawPolicy>,
    /// Prices and tool names by endpoint pattern, first match wins; route metadata wins
    /// over these.
    #[serde(default)]
    pub endpoints: Vec<RawEndpointRule>,
    /// Report API, dashboard and kill switch.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Webhook for alerts.
    #[serde(default)]
    pub alerts: Option<RawAlerts>,
    /// The signer service for x402 pay mode.
    #[serde(default)]
    pub signer: Option<RawSigner>,
    /// The shared answer cache.
    #[serde(default)]
    pub cache: Option<RawCache>,
    /// Where the ledger lives and how it treats dead VMs and endless calls.
    #[serde(default)]
    pub ledger: RawLedger,
    /// Chaos testing only: lets a request header crash the VM on purpose.
    #[serde(default)]
    pub fault_injection: Option<RawFaultInjection>,
    /// Leave `wasm.pag0_*` filter state for access logs (four host calls per request).
    pub filter_state: Option<bool>,
    /// Token metering of LLM routes (`meter` in route metadata): prices and limits.
    #[serde(default)]
    pub llm: Option<RawLlm>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawLlm {
    /// Model glob → rates per million tokens.
    pub prices: OrderedMap<RawRates>,
    /// `refuse` (default) or `highestRates`.
    pub unknown_models: Option<String>,
    pub default_max_tokens: Option<u64>,
    pub min_output_tokens: Option<u64>,
    pub max_body_bytes: Option<u64>,
    pub image_tokens: Option<u64>,
    pub document_tokens: Option<u64>,
    pub server_tool_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRates {
    pub input: Option<Value>,
    pub output: Option<Value>,
    #[serde(rename = "cacheWrite5m")]
    pub cache_write_5m: Option<Value>,
    #[serde(rename = "cacheWrite1h")]
    pub cache_write_1h: Option<Value>,
    #[serde(rename = "cacheRead")]
    pub cache_read: Option<Value>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawLedger {
    /// `shared-data` (default) or `redis`.
    pub store: Option<String>,
    /// `redis`: the Envoy cluster of the Webdis front of the ledger's Redis.
    pub cluster: Option<String>,
    /// `redis`: the `:authority` sent to it (default: the cluster name).
    pub authority: Option<String>,
    /// `redis`: how long a ledger call may take before a priced call is refused
    /// with `LEDGER_UNAVAILABLE`.
    pub timeout_ms: Option<u64>,
    /// `redis`: `user:password` for Webdis's HTTP Basic authentication.
    pub basic_auth: Option<String>,
    /// A VM silent this long is dead: its reservations are charged and released.
    pub owner_lease_seconds: Option<u64>,
    /// A reservation open this long is settled as an unknown outcome (charged).
    pub reservation_timeout_seconds: Option<u64>,
    /// How often each VM writes its counts and commits.
    pub flush_interval_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawFaultInjection {
    /// A request carrying this header crashes the VM that serves it (a trap, as a
    /// panic would). Never set it outside chaos tests.
    pub crash_header: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawCache {
    pub enabled: Option<bool>,
    /// `session` (default) or `tenant`.
    pub scope: Option<String>,
    #[serde(rename = "defaultTTL")]
    pub default_ttl: Option<u64>,
    #[serde(default)]
    pub ttl_rules: Vec<RawTtlRule>,
    /// Default `["GET"]`.
    pub methods: Option<Vec<String>>,
    pub max_entry_bytes: Option<u32>,
    /// Number of entries (slots); memory used is at most entries × maxEntryBytes.
    pub entries: Option<u32>,
    /// How long an identical request waits for the first one's answer.
    pub coalesce_wait_ms: Option<u64>,
    /// Envoy cluster of the second level (Redis behind Webdis).
    pub cluster: Option<String>,
    /// Timeout of a second-level call; past it, the cache is skipped.
    pub cluster_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawTtlRule {
    pub pattern: String,
    pub ttl: u64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawAdmin {
    /// Hex SHA-256 of the admin key (reads and controls every tenant's sessions).
    pub api_key_sha256: Option<String>,
    /// Default `/_pag0/v1`.
    pub path_prefix: Option<String>,
    /// Default `/_pag0/dashboard`.
    pub dashboard_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawAlerts {
    /// Envoy cluster of the webhook.
    pub cluster: String,
    /// Default `/`.
    pub path: Option<String>,
    /// Host header of the webhook call; default the cluster name.
    pub authority: Option<String>,
    /// Default 2000.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawIdentity {
    /// One header name, or several: the first one present names the session.
    pub session_header: Option<OneOrMany>,
    /// One header name, or several: the first one present names the agent.
    pub agent_header: Option<OneOrMany>,
    /// Header naming the agent that started this one (kept in reports).
    pub parent_agent_header: Option<String>,
    pub api_key_header: Option<String>,
    /// Agent id used when a request names none.
    pub default_agent: Option<String>,
    /// Session id used when a request names none (stock clients that cannot add a
    /// header). Absent: such requests are refused.
    pub default_session: Option<String>,
}

/// A string, or a list of strings.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    /// Hex SHA-256 of the tenant's API key.
    pub api_key_sha256: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawSessions {
    /// Session slots per tenant.
    pub max_sessions: Option<u32>,
    pub max_agents_per_session: Option<u16>,
    pub idle_timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPolicy {
    pub session_budget: Option<Value>,
    pub daily_budget: Option<Value>,
    pub monthly_budget: Option<Value>,
    pub max_per_request: Option<Value>,
    #[serde(default)]
    pub allowed_endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub blocked_endpoints: Option<Vec<String>>,
    pub alert_on_threshold: Option<Value>,
    pub kill_switch_threshold: Option<Value>,
    /// `success` (default): charge only 2xx answers; `always`: charge any upstream answer.
    pub charge_on: Option<String>,
    #[serde(default)]
    pub agents: OrderedMap<RawAgentPolicy>,
    /// Which x402 payments may be made: networks, assets and payees (empty = any).
    #[serde(default)]
    pub x402: RawX402,
    /// Calls priced above the threshold wait for an approval service.
    #[serde(default)]
    pub require_approval: Option<RawApproval>,
    /// Agents no pattern matches: `"refuse"`, or a rule (like an `agents` entry)
    /// whose `agentBudget` they all share.
    #[serde(default)]
    pub unmatched_agents: Option<Value>,
    /// `allow` (default) or `refuse`: what happens to a call no price applies to.
    pub unpriced_routes: Option<String>,
    /// The same request again and again from one agent: refused from the N-th.
    pub repeat_breaker: Option<RawRepeatBreaker>,
    /// The session's spend per sliding window.
    pub spend_rate: Option<RawSpendRate>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawSpendRate {
    pub limit: Option<Value>,
    pub window_seconds: Option<Value>,
    pub kill_session: Option<bool>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawRepeatBreaker {
    pub calls: Option<Value>,
    pub window_seconds: Option<Value>,
    pub warn_at: Option<Value>,
    pub kill_session: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawAgentPolicy {
    pub agent_budget: Option<Value>,
    pub max_per_request: Option<Value>,
    #[serde(default)]
    pub allowed_endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub blocked_endpoints: Option<Vec<String>>,
    pub inherit_parent_policy: Option<bool>,
    /// false: the agent's cache entries are its own (a private namespace).
    pub inherit_parent_cache: Option<bool>,
    /// This agent pattern's own repeat breaker (else the policy's).
    pub repeat_breaker: Option<RawRepeatBreaker>,
    /// Each matching agent's spend per sliding window.
    pub spend_rate: Option<RawSpendRate>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawEndpointRule {
    pub pattern: String,
    pub price: Option<Value>,
    pub tool: Option<String>,
    /// The endpoint's API charges through x402 (as route metadata `x402: "true"`).
    pub x402: Option<bool>,
    /// Token-metered (as route metadata `meter`): "anthropic" or "openai".
    pub meter: Option<String>,
}

/// A JSON object read in document order, so that "first match wins" means what the
/// user sees in the file. Duplicate keys are refused.
#[derive(Debug, Default)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    entries.push((key, value));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_map(OrderedVisitor(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawX402 {
    #[serde(default)]
    pub networks: Vec<String>,
    /// Assets that count toward budgets: a known USDC contract's address, or
    /// `{"address", "decimals", "network"}` for another USD-pegged token.
    #[serde(default)]
    pub assets: Vec<Value>,
    #[serde(default)]
    pub payees: Vec<String>,
    /// `relay` (default): agents pay themselves; `pay`: pag0 pays through the signer.
    pub mode: Option<String>,
    /// Pay mode: the same resource paid this many times in a window is not paid again.
    pub repeat_breaker: Option<RawX402Repeat>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawX402Repeat {
    pub payments: Option<Value>,
    pub window_seconds: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawSigner {
    pub cluster: String,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Largest request body kept to retry a paid call (bytes).
    pub max_body_bytes: Option<u64>,
    /// How long the paid retry may take before its outcome counts as unknown.
    pub retry_timeout_ms: Option<u64>,
    /// A cluster that leads back into this Envoy's listener: the paid retry goes
    /// through it, so the route applies its rewrites and added headers again.
    pub loopback_cluster: Option<String>,
    /// Request bodies kept for paid retries, in total per VM; past it a call that may
    /// need a retry is refused (503) instead of allocating more.
    pub max_buffered_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawApproval {
    pub threshold: Option<Value>,
    pub cluster: String,
    pub path: Option<String>,
    pub authority: Option<String>,
    pub timeout_ms: Option<u64>,
}
