//! Checks the raw configuration and builds the structures the filter runs on. Every
//! error names the field and the reason, so that Envoy's log says what to fix.

use hashbrown::HashMap;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::core::amount::{parse_amount, threshold_ppm, Amount};
use crate::core::config::{RawAgentPolicy, RawConfig, RawPolicy};
use crate::core::glob::Glob;
use crate::core::identity::valid_id;
pub use crate::core::meter::LlmSettings;
use crate::core::payments::{canonical_network, AssetRule, PaymentRules, BUDGET_DECIMALS};
use crate::core::policy::{AgentRule, ChargeOn, IdPattern, Policy, Unmatched};
pub use crate::core::settings::{LedgerTimings, Service, SessionLimits};

pub const DEFAULT_SESSION_HEADER: &str = "x-pag0-session";
pub const DEFAULT_AGENT_HEADER: &str = "x-pag0-agent";
pub const DEFAULT_API_KEY_HEADER: &str = "x-pag0-api-key";
pub const DEFAULT_AGENT: &str = "main";
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone)]
pub struct Identity {
    /// Header names that may carry the session id, first present wins.
    pub session_headers: Vec<String>,
    /// Header names that may carry the agent id, first present wins.
    pub agent_headers: Vec<String>,
    pub parent_agent_header: Option<String>,
    pub api_key_header: String,
    pub default_agent: String,
    pub default_session: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct EndpointRule {
    pub glob: Glob,
    pub price: Option<Amount>,
    pub tool: Option<String>,
    pub x402: bool,
    pub meter: Option<crate::core::call::MeterKind>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub identity: Identity,
    pub tenants: Vec<Tenant>,
    /// SHA-256 of the key → tenant index. Empty: one open tenant, no key asked.
    pub tenant_by_key_hash: HashMap<[u8; 32], usize>,
    pub sessions: SessionLimits,
    pub policies: Vec<Policy>,
    pub policy_by_name: HashMap<String, usize>,
    pub default_policy: usize,
    pub endpoints: Vec<EndpointRule>,
    pub ledger: LedgerTimings,
    /// `ledger.store: redis`: the Webdis front of the Redis that is the ledger of
    /// record for priced calls (None: Envoy's shared data).
    pub ledger_redis: Option<Service>,
    /// Chaos testing: the header that crashes the VM (never set in production).
    pub crash_header: Option<String>,
    /// Leave `wasm.pag0_*` filter state for access logs.
    pub filter_state: bool,
    /// Some policy has a daily or monthly budget: every priced call counts in the
    /// tenant's windows.
    pub track_windows: bool,
    pub admin: Admin,
    pub alerts: Option<Service>,
    pub cache: Option<crate::core::cache::CacheConfig>,
    pub signer: Option<Service>,
    /// Pay mode: largest request body kept to retry a paid call.
    pub pay_body_limit: usize,
    /// Pay mode: request bodies kept for retries, in total per VM.
    pub pay_buffer_limit: usize,
    /// Pay mode: how long the paid retry may take (then its outcome is unknown).
    pub pay_retry_timeout_ms: u64,
    /// Pay mode: the cluster that leads back into this listener, for paid retries.
    pub pay_loopback: Option<String>,
    /// Token metering (`llm`): prices and limits. `None`: a metered route is a
    /// configuration error.
    pub llm: Option<LlmSettings>,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub key_hash: Option<[u8; 32]>,
    pub path_prefix: String,
    pub dashboard_path: String,
}

/// Pay mode keeps the request body to retry it with a payment: 1 MiB unless set.
const DEFAULT_PAY_BODY_LIMIT: usize = 1024 * 1024;
/// Bodies kept for paid retries, in total per VM, unless set.
const DEFAULT_PAY_BUFFER_LIMIT: usize = 64 * 1024 * 1024;
const MAX_PAY_BODY_LIMIT: u64 = 16 * 1024 * 1024;

impl Config {
    pub fn requires_api_key(&self) -> bool {
        !self.tenant_by_key_hash.is_empty()
    }

    /// The tenant that owns an API key, by its SHA-256.
    pub fn tenant_for_key(&self, key: &[u8]) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        self.tenant_by_key_hash.get(&digest).copied()
    }

    pub fn policy(&self, name: Option<&str>) -> Option<&Policy> {
        match name {
            None => self.policies.get(self.default_policy),
            Some(name) => self
                .policy_by_name
                .get(name)
                .and_then(|i| self.policies.get(*i)),
        }
    }

    /// A tenant's id by its index (the default tenant's for an index out of range).
    pub fn tenant_id(&self, tenant: usize) -> &str {
        self.tenants
            .get(tenant)
            .map_or(DEFAULT_TENANT, |t| t.id.as_str())
    }

    /// First endpoint rule whose pattern matches.
    pub fn endpoint_rule(&self, endpoint: &str) -> Option<&EndpointRule> {
        self.endpoints.iter().find(|r| r.glob.matches(endpoint))
    }
}

/// Parses and compiles the plugin configuration.
pub fn compile_json(bytes: &[u8]) -> Result<Config, String> {
    let raw: RawConfig = if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("configuration is empty: at least one policy is needed".to_string());
    } else {
        serde_json::from_slice(bytes).map_err(|e| format!("configuration is not valid: {e}"))?
    };
    compile(raw)
}

/// `identity.sessionHeader` / `agentHeader`: one name, or a list of 1 to 4.
fn header_list(
    raw: Option<crate::core::config::OneOrMany>,
    default: &str,
    field: &str,
) -> Result<Vec<String>, String> {
    use crate::core::config::OneOrMany;
    match raw {
        None => Ok(vec![default.to_string()]),
        Some(OneOrMany::One(h)) => Ok(vec![header_name(Some(h), default, field)?]),
        Some(OneOrMany::Many(list)) if list.is_empty() || list.len() > 4 => Err(format!(
            "{field}: give one header name, or a list of 1 to 4"
        )),
        Some(OneOrMany::Many(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, h)| header_name(Some(h), default, &format!("{field}[{i}]")))
            .collect(),
    }
}

pub fn compile(raw: RawConfig) -> Result<Config, String> {
    let agent_headers = header_list(
        raw.identity.agent_header,
        DEFAULT_AGENT_HEADER,
        "identity.agentHeader",
    )?;
    let identity = Identity {
        session_headers: header_list(raw.identity.session_header, DEFAULT_SESSION_HEADER, "identity.sessionHeader")?,
        agent_headers,
        parent_agent_header: match raw.identity.parent_agent_header {
            None => None,
            Some(h) => Some(header_name(Some(h), "", "identity.parentAgentHeader")?),
        },
        api_key_header: header_name(raw.identity.api_key_header, DEFAULT_API_KEY_HEADER, "identity.apiKeyHeader")?,
        default_agent: match raw.identity.default_agent {
            None => DEFAULT_AGENT.to_string(),
            Some(a) if valid_id(a.as_bytes()) => a,
            Some(a) => return Err(format!("identity.defaultAgent: {a:?} is not a valid agent id (1-128 of A-Z a-z 0-9 . _ : @ -)")),
        },
        default_session: match raw.identity.default_session {
            None => None,
            Some(s) if valid_id(s.as_bytes()) => Some(s),
            Some(s) => return Err(format!("identity.defaultSession: {s:?} is not a valid session id (1-128 of A-Z a-z 0-9 . _ : @ -)")),
        },
    };

    let mut names: Vec<(&str, &String)> = identity
        .session_headers
        .iter()
        .map(|h| ("identity.sessionHeader", h))
        .collect();
    for h in &identity.agent_headers {
        names.push(("identity.agentHeader", h));
    }
    if let Some(h) = &identity.parent_agent_header {
        names.push(("identity.parentAgentHeader", h));
    }
    names.push(("identity.apiKeyHeader", &identity.api_key_header));
    for (i, (field, name)) in names.iter().enumerate() {
        if names[..i].iter().any(|(_, other)| other == name) {
            return Err(format!(
                "{field}: {name:?} is already used for another identity header"
            ));
        }
    }
    let mut tenants = Vec::new();
    let mut tenant_by_key_hash = HashMap::new();
    match raw.tenants {
        None => tenants.push(Tenant {
            id: DEFAULT_TENANT.to_string(),
        }),
        Some(list) if list.is_empty() => {
            return Err("tenants: empty list (omit it for a single open tenant)".to_string())
        }
        Some(list) => {
            for (i, t) in list.into_iter().enumerate() {
                let field = format!("tenants[{i}]");
                if !valid_id(t.id.as_bytes()) || t.id.len() > 64 {
                    return Err(format!(
                        "{field}.id: {:?} must be 1-64 of A-Z a-z 0-9 . _ : @ -",
                        t.id
                    ));
                }
                if tenants.iter().any(|x: &Tenant| x.id == t.id) {
                    return Err(format!("{field}.id: duplicate tenant {:?}", t.id));
                }
                let hash = parse_sha256(&t.api_key_sha256).ok_or_else(|| {
                    format!("{field}.apiKeySha256: must be 64 hex digits (the SHA-256 of the key)")
                })?;
                if tenant_by_key_hash.insert(hash, tenants.len()).is_some() {
                    return Err(format!(
                        "{field}.apiKeySha256: the same key is given to two tenants"
                    ));
                }
                tenants.push(Tenant { id: t.id });
            }
        }
    }

    let sessions = SessionLimits {
        max_sessions: match raw.sessions.max_sessions {
            None => 4096,
            Some(n) if (1..=1_048_576).contains(&n) => n,
            Some(n) => {
                return Err(format!(
                    "sessions.maxSessions: {n} must be between 1 and 1048576"
                ))
            }
        },
        max_agents: match raw.sessions.max_agents_per_session {
            None => 64,
            Some(n) if (1..=254).contains(&n) => n,
            Some(n) => {
                return Err(format!(
                    "sessions.maxAgentsPerSession: {n} must be between 1 and 254"
                ))
            }
        },
        idle_timeout_secs: match raw.sessions.idle_timeout_seconds {
            None => 86_400,
            Some(n) if n >= 1 => n,
            Some(_) => return Err("sessions.idleTimeoutSeconds: must be at least 1".to_string()),
        },
    };

    if raw.policies.0.is_empty() {
        return Err("policies: at least one policy is needed".to_string());
    }
    let mut policies = Vec::new();
    let mut policy_by_name = HashMap::new();
    for (name, raw_policy) in raw.policies.0 {
        if name.is_empty() {
            return Err("policies: a policy name is empty".to_string());
        }
        let policy = compile_policy(&name, raw_policy)?;
        policy_by_name.insert(name, policies.len());
        policies.push(policy);
    }
    let default_policy = match raw.default_policy {
        Some(name) => *policy_by_name
            .get(&name)
            .ok_or_else(|| format!("defaultPolicy: no policy named {name:?}"))?,
        None if policies.len() == 1 => 0,
        None => {
            return Err("defaultPolicy: required when there is more than one policy".to_string())
        }
    };

    let mut endpoints = Vec::new();
    for (i, rule) in raw.endpoints.into_iter().enumerate() {
        let field = format!("endpoints[{i}]");
        if rule.pattern.len() > 200 {
            return Err(format!("{field}.pattern: longer than 200 characters"));
        }
        let glob = Glob::new(&rule.pattern).map_err(|e| format!("{field}.pattern: {e}"))?;
        let price = amount(rule.price.as_ref(), &format!("{field}.price"), true)?;
        if let Some(tool) = &rule.tool {
            check_label(tool, &format!("{field}.tool"))?;
        }
        let meter = match rule.meter.as_deref() {
            None => None,
            Some("anthropic") => Some(crate::core::call::MeterKind::Anthropic),
            Some("openai") => Some(crate::core::call::MeterKind::OpenAi),
            Some(other) => {
                return Err(format!(
                    "{field}.meter: {other:?} must be \"anthropic\" or \"openai\""
                ))
            }
        };
        if meter.is_some() && (price.is_some() || rule.x402 == Some(true)) {
            return Err(format!(
                "{field}.meter: a metered endpoint is priced by its tokens; drop price and x402"
            ));
        }
        if meter.is_some() && raw.llm.is_none() {
            return Err(format!(
                "{field}.meter: needs the llm block (llm.prices) in the plugin configuration"
            ));
        }
        endpoints.push(EndpointRule {
            glob,
            price,
            tool: rule.tool,
            x402: rule.x402.unwrap_or(false),
            meter,
        });
    }

    let admin_key_hash = match &raw.admin.api_key_sha256 {
        None => None,
        Some(hex) => {
            let hash = parse_sha256(hex).ok_or_else(|| {
                "admin.apiKeySha256: must be 64 hex digits (the SHA-256 of the key)".to_string()
            })?;
            if tenant_by_key_hash.contains_key(&hash) {
                return Err(
                    "admin.apiKeySha256: the admin key must differ from every tenant key"
                        .to_string(),
                );
            }
            Some(hash)
        }
    };
    let admin = Admin {
        key_hash: admin_key_hash,
        path_prefix: reserved_path(
            url_path(raw.admin.path_prefix, "/_pag0/v1", "admin.pathPrefix")?,
            "admin.pathPrefix",
        )?,
        dashboard_path: reserved_path(
            url_path(
                raw.admin.dashboard_path,
                "/_pag0/dashboard",
                "admin.dashboardPath",
            )?,
            "admin.dashboardPath",
        )?,
    };
    let alerts = match raw.alerts {
        None => None,
        Some(a) => {
            if a.cluster.is_empty() {
                return Err("alerts.cluster: must name an Envoy cluster".to_string());
            }
            let timeout_ms = a.timeout_ms.unwrap_or(2000);
            if !(1..=60_000).contains(&timeout_ms) {
                return Err(format!(
                    "alerts.timeoutMs: {timeout_ms} must be between 1 and 60000"
                ));
            }
            Some(Service {
                path: url_path(a.path, "/", "alerts.path")?,
                authority: a.authority.unwrap_or_else(|| a.cluster.clone()),
                cluster: a.cluster,
                timeout_ms,
                authorization: None,
            })
        }
    };
    let mut pay_body_limit = DEFAULT_PAY_BODY_LIMIT;
    let mut pay_buffer_limit = DEFAULT_PAY_BUFFER_LIMIT;
    let mut pay_retry_timeout_ms = 30_000;
    let mut pay_loopback = None;
    let signer = match raw.signer {
        None => None,
        Some(sg) => {
            let limit = sg.max_body_bytes.unwrap_or(DEFAULT_PAY_BODY_LIMIT as u64);
            if !(1..=MAX_PAY_BODY_LIMIT).contains(&limit) {
                return Err(format!(
                    "signer.maxBodyBytes: {limit} must be between 1 and {MAX_PAY_BODY_LIMIT}"
                ));
            }
            pay_body_limit = usize::try_from(limit).unwrap_or(DEFAULT_PAY_BODY_LIMIT);
            pay_retry_timeout_ms = sg.retry_timeout_ms.unwrap_or(30_000);
            if !(1..=300_000).contains(&pay_retry_timeout_ms) {
                return Err(format!(
                    "signer.retryTimeoutMs: {pay_retry_timeout_ms} must be between 1 and 300000"
                ));
            }
            if sg.cluster.is_empty() {
                return Err("signer.cluster: must name an Envoy cluster".to_string());
            }
            let buffered = sg
                .max_buffered_bytes
                .unwrap_or(DEFAULT_PAY_BUFFER_LIMIT as u64);
            if !(limit..=4 * 1024 * 1024 * 1024).contains(&buffered) {
                return Err(format!(
                    "signer.maxBufferedBytes: {buffered} must be at least signer.maxBodyBytes ({limit}) and at most 4 GiB"
                ));
            }
            pay_buffer_limit = usize::try_from(buffered).unwrap_or(usize::MAX);
            pay_loopback = match sg.loopback_cluster {
                None => None,
                Some(c) if c.is_empty() => {
                    return Err("signer.loopbackCluster: must name an Envoy cluster".to_string())
                }
                Some(c) => Some(c),
            };
            let timeout_ms = sg.timeout_ms.unwrap_or(2000);
            if !(1..=60_000).contains(&timeout_ms) {
                return Err(format!(
                    "signer.timeoutMs: {timeout_ms} must be between 1 and 60000"
                ));
            }
            Some(Service {
                path: url_path(sg.path, "/sign", "signer.path")?,
                authority: sg.authority.unwrap_or_else(|| sg.cluster.clone()),
                cluster: sg.cluster,
                timeout_ms,
                authorization: None,
            })
        }
    };
    if let Some(p) = policies.iter().find(|p| p.pay_x402) {
        if signer.is_none() {
            return Err(format!("policies.{}.x402.mode: \"pay\" needs a signer (top-level \"signer\": {{\"cluster\": …}})", p.name));
        }
        // A paid retry must reach what the route sent the first time (its rewrites and
        // added headers); only the route itself knows that.
        if pay_loopback.is_none() {
            return Err(format!("policies.{}.x402.mode: \"pay\" needs signer.loopbackCluster: a cluster that leads back into this listener, so that the paid retry goes through the route's rewrites and added headers again (see README, x402)", p.name));
        }
    }
    let cache = match raw.cache {
        None => None,
        Some(raw_cache) => crate::core::cache::compile_cache(raw_cache)?,
    };
    let track_windows = policies
        .iter()
        .any(|p| p.daily_budget.is_some() || p.monthly_budget.is_some());
    let (ledger, ledger_redis) = compile_ledger(&raw.ledger)?;
    let crash_header = match raw.fault_injection {
        None => None,
        Some(f) => Some(header_name(
            Some(f.crash_header),
            "",
            "faultInjection.crashHeader",
        )?),
    };
    Ok(Config {
        identity,
        tenants,
        tenant_by_key_hash,
        sessions,
        policies,
        policy_by_name,
        default_policy,
        endpoints,
        ledger,
        ledger_redis,
        crash_header,
        filter_state: raw.filter_state.unwrap_or(false),
        track_windows,
        admin,
        alerts,
        cache,
        signer,
        pay_body_limit,
        pay_buffer_limit,
        pay_retry_timeout_ms,
        pay_loopback,
        llm: raw.llm.map(compile_llm).transpose()?,
    })
}

fn compile_llm(raw: crate::core::config::RawLlm) -> Result<LlmSettings, String> {
    use crate::core::meter::{self, Rates, UnknownModels};
    let mut prices = Vec::new();
    for (pattern, rates) in raw.prices.0 {
        let field = format!("llm.prices.{pattern:?}");
        let glob = Glob::new(&pattern).map_err(|e| format!("{field}: {e}"))?;
        let rate = |v: Option<&Value>, name: &str| -> Result<Amount, String> {
            amount(v, &format!("{field}.{name}"), true)?
                .ok_or_else(|| format!("{field}.{name}: missing (every rate is required; OpenAI's cache writes cost its input rate)"))
        };
        prices.push((
            glob,
            Rates {
                input: rate(rates.input.as_ref(), "input")?,
                output: rate(rates.output.as_ref(), "output")?,
                cache_write_5m: rate(rates.cache_write_5m.as_ref(), "cacheWrite5m")?,
                cache_write_1h: rate(rates.cache_write_1h.as_ref(), "cacheWrite1h")?,
                cache_read: rate(rates.cache_read.as_ref(), "cacheRead")?,
            },
        ));
    }
    if prices.is_empty() {
        return Err("llm.prices: empty (price at least one model)".to_string());
    }
    let unknown_models = match raw.unknown_models.as_deref() {
        None | Some("refuse") => UnknownModels::Refuse,
        Some("highestRates") => UnknownModels::HighestRates,
        Some(other) => {
            return Err(format!(
                "llm.unknownModels: {other:?} must be \"refuse\" or \"highestRates\""
            ))
        }
    };
    let tokens = |v: Option<u64>, default: u64, field: &str, max: u64| -> Result<u64, String> {
        let v = v.unwrap_or(default);
        if v == 0 || v > max {
            return Err(format!("llm.{field}: {v} must be between 1 and {max}"));
        }
        Ok(v)
    };
    let default_max_tokens = tokens(
        raw.default_max_tokens,
        meter::DEFAULT_MAX_TOKENS,
        "defaultMaxTokens",
        meter::MAX_OUTPUT_TOKENS,
    )?;
    let min_output_tokens = tokens(
        raw.min_output_tokens,
        meter::DEFAULT_MIN_OUTPUT_TOKENS,
        "minOutputTokens",
        meter::MAX_OUTPUT_TOKENS,
    )?;
    if min_output_tokens > default_max_tokens {
        return Err(format!("llm.minOutputTokens: {min_output_tokens} is above llm.defaultMaxTokens ({default_max_tokens})"));
    }
    let max_body_bytes = tokens(
        raw.max_body_bytes,
        meter::DEFAULT_MAX_BODY_BYTES as u64,
        "maxBodyBytes",
        64 * 1024 * 1024,
    )?;
    Ok(LlmSettings {
        prices,
        unknown_models,
        default_max_tokens,
        min_output_tokens,
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(meter::DEFAULT_MAX_BODY_BYTES),
        image_tokens: tokens(
            raw.image_tokens,
            meter::DEFAULT_IMAGE_TOKENS,
            "imageTokens",
            10_000_000,
        )?,
        document_tokens: tokens(
            raw.document_tokens,
            meter::DEFAULT_DOCUMENT_TOKENS,
            "documentTokens",
            10_000_000,
        )?,
        server_tool_tokens: tokens(
            raw.server_tool_tokens,
            meter::DEFAULT_SERVER_TOOL_TOKENS,
            "serverToolTokens",
            10_000_000,
        )?,
    })
}

/// `user:password` as an HTTP Basic `authorization` header value.
fn basic_auth(credential: &str) -> Result<String, String> {
    let valid = credential
        .split_once(':')
        .is_some_and(|(user, _)| !user.is_empty())
        && credential.len() <= 1024
        && !credential.chars().any(char::is_control);
    if !valid {
        return Err(
            "ledger.basicAuth: must be \"user:password\" (a user before the first colon, no control characters, at most 1024 bytes)"
                .to_string(),
        );
    }
    Ok(format!(
        "Basic {}",
        crate::core::base64::encode(credential.as_bytes())
    ))
}

fn compile_ledger(
    raw: &crate::core::config::RawLedger,
) -> Result<(LedgerTimings, Option<Service>), String> {
    let redis = match raw.store.as_deref() {
        None | Some("shared-data") => {
            if raw.cluster.is_some()
                || raw.timeout_ms.is_some()
                || raw.authority.is_some()
                || raw.basic_auth.is_some()
            {
                return Err(
                    "ledger.cluster, ledger.authority, ledger.timeoutMs and ledger.basicAuth apply only to ledger.store: \"redis\""
                        .to_string(),
                );
            }
            None
        }
        Some("redis") => {
            let Some(cluster) = raw.cluster.clone().filter(|c| !c.is_empty()) else {
                return Err(
                    "ledger.cluster: ledger.store \"redis\" needs the Envoy cluster of its Webdis front"
                        .to_string(),
                );
            };
            let timeout_ms = raw.timeout_ms.unwrap_or(250);
            if !(10..=10_000).contains(&timeout_ms) {
                return Err(format!(
                    "ledger.timeoutMs: {timeout_ms} must be between 10 and 10000"
                ));
            }
            Some(Service {
                authority: raw.authority.clone().unwrap_or_else(|| cluster.clone()),
                cluster,
                path: String::new(),
                timeout_ms,
                authorization: raw.basic_auth.as_deref().map(basic_auth).transpose()?,
            })
        }
        Some(other) => {
            return Err(format!(
                "ledger.store: {other:?} must be \"shared-data\" or \"redis\""
            ))
        }
    };
    let defaults = LedgerTimings::default();
    let lease = raw
        .owner_lease_seconds
        .unwrap_or(defaults.owner_lease_ms / 1000);
    if !(3..=3600).contains(&lease) {
        return Err(format!(
            "ledger.ownerLeaseSeconds: {lease} must be between 3 and 3600"
        ));
    }
    let timeout = raw
        .reservation_timeout_seconds
        .unwrap_or(defaults.reservation_timeout_ms / 1000);
    if !(10..=604_800).contains(&timeout) {
        return Err(format!(
            "ledger.reservationTimeoutSeconds: {timeout} must be between 10 and 604800"
        ));
    }
    let flush = raw.flush_interval_ms.unwrap_or(defaults.flush_interval_ms);
    if !(10..=10_000).contains(&flush) {
        return Err(format!(
            "ledger.flushIntervalMs: {flush} must be between 10 and 10000"
        ));
    }
    Ok((
        LedgerTimings {
            owner_lease_ms: lease * 1000,
            reservation_timeout_ms: timeout * 1000,
            flush_interval_ms: flush,
        },
        redis,
    ))
}

/// pag0's own paths must start with `/_` so that they can never shadow an API path.
fn reserved_path(path: String, field: &str) -> Result<String, String> {
    if path.starts_with("/_") && path.len() > 2 {
        Ok(path)
    } else {
        Err(format!(
            "{field}: {path:?} must start with /_ (so it cannot shadow an API path)"
        ))
    }
}

fn url_path(value: Option<String>, default: &str, field: &str) -> Result<String, String> {
    let path = value.unwrap_or_else(|| default.to_string());
    let valid = path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
    if !valid {
        return Err(format!("{field}: {path:?} must be a path starting with /"));
    }
    Ok(if path.len() > 1 {
        path.trim_end_matches('/').to_string()
    } else {
        path
    })
}

fn compile_policy(name: &str, raw: RawPolicy) -> Result<Policy, String> {
    let f = |field: &str| format!("policies.{name}.{field}");
    let session_budget = amount(raw.session_budget.as_ref(), &f("sessionBudget"), false)?;
    let daily_budget = amount(raw.daily_budget.as_ref(), &f("dailyBudget"), false)?;
    let monthly_budget = amount(raw.monthly_budget.as_ref(), &f("monthlyBudget"), false)?;
    let max_per_request = amount(raw.max_per_request.as_ref(), &f("maxPerRequest"), false)?;
    // maxPerRequest <= sessionBudget <= dailyBudget <= monthlyBudget, where set.
    let chain = [
        ("maxPerRequest", max_per_request),
        ("sessionBudget", session_budget),
        ("dailyBudget", daily_budget),
        ("monthlyBudget", monthly_budget),
    ];
    for (i, (lower_name, lower)) in chain.iter().enumerate() {
        for (upper_name, upper) in &chain[i + 1..] {
            if let (Some(lo), Some(hi)) = (lower, upper) {
                if lo > hi {
                    return Err(format!(
                        "{}: {lo} is above {upper_name} {hi} (need maxPerRequest <= sessionBudget <= dailyBudget <= monthlyBudget)",
                        f(lower_name)
                    ));
                }
            }
        }
    }
    let alert_ppm = threshold(raw.alert_on_threshold.as_ref(), &f("alertOnThreshold"))?;
    let kill_ppm = threshold(
        raw.kill_switch_threshold.as_ref(),
        &f("killSwitchThreshold"),
    )?;
    if let (Some(a), Some(k)) = (alert_ppm, kill_ppm) {
        if a > k {
            return Err(format!(
                "{}: above killSwitchThreshold, so the alert would never come first",
                f("alertOnThreshold")
            ));
        }
    }
    if (alert_ppm.is_some() || kill_ppm.is_some()) && session_budget.is_none() {
        return Err(format!(
            "{}: thresholds need a sessionBudget to measure against",
            f("sessionBudget")
        ));
    }
    let charge_on = match raw.charge_on.as_deref() {
        None | Some("success") => ChargeOn::Success,
        Some("always") => ChargeOn::Always,
        Some(other) => {
            return Err(format!(
                "{}: {other:?} must be \"success\" or \"always\"",
                f("chargeOn")
            ))
        }
    };
    let allowed = globs(
        raw.allowed_endpoints.as_deref().unwrap_or(&[]),
        &f("allowedEndpoints"),
    )?;
    let blocked = globs(
        raw.blocked_endpoints.as_deref().unwrap_or(&[]),
        &f("blockedEndpoints"),
    )?;
    let payments = compile_payments(&raw.x402, &f)?;
    let approval = match raw.require_approval {
        None => None,
        Some(a) => {
            let threshold = amount(a.threshold.as_ref(), &f("requireApproval.threshold"), true)?
                .ok_or_else(|| format!("{}: required", f("requireApproval.threshold")))?;
            if a.cluster.is_empty() {
                return Err(format!(
                    "{}: must name an Envoy cluster",
                    f("requireApproval.cluster")
                ));
            }
            let timeout_ms = a.timeout_ms.unwrap_or(5000);
            if !(1..=300_000).contains(&timeout_ms) {
                return Err(format!(
                    "{}: {timeout_ms} must be between 1 and 300000",
                    f("requireApproval.timeoutMs")
                ));
            }
            Some(crate::core::policy::Approval {
                threshold,
                service: Service {
                    path: url_path(a.path, "/approve", &f("requireApproval.path"))?,
                    authority: a.authority.unwrap_or_else(|| a.cluster.clone()),
                    cluster: a.cluster,
                    timeout_ms,
                    authorization: None,
                },
            })
        }
    };
    let pay_x402 = match raw.x402.mode.as_deref() {
        None | Some("relay") => false,
        Some("pay") => true,
        Some(other) => {
            return Err(format!(
                "{}: {other:?} must be \"relay\" or \"pay\"",
                f("x402.mode")
            ))
        }
    };
    let mut agents = Vec::new();
    for (pattern, raw_agent) in raw.agents.0 {
        agents.push(compile_agent(
            &f(&format!("agents.{pattern}")),
            &pattern,
            raw_agent,
        )?);
    }
    let refuse_unpriced = match raw.unpriced_routes.as_deref() {
        None | Some("allow") => false,
        Some("refuse") => true,
        Some(other) => {
            return Err(format!(
                "{}: {other:?} must be \"allow\" or \"refuse\"",
                f("unpricedRoutes")
            ))
        }
    };
    let unmatched = match raw.unmatched_agents {
        None => Unmatched::Open,
        Some(Value::String(s)) if s == "refuse" => Unmatched::Refuse,
        Some(Value::Object(map)) => {
            let field = f("unmatchedAgents");
            let raw_rule: RawAgentPolicy = serde_json::from_value(Value::Object(map))
                .map_err(|e| format!("{field}: {e}"))?;
            Unmatched::Pool(compile_agent(&field, "*", raw_rule)?)
        }
        Some(other) => {
            return Err(format!(
                "{}: {other} must be \"refuse\" or a rule like an agents entry ({{\"agentBudget\": \"500000\"}})",
                f("unmatchedAgents")
            ))
        }
    };
    Ok(Policy {
        name: name.to_string(),
        session_budget,
        daily_budget,
        monthly_budget,
        max_per_request,
        allowed,
        blocked,
        alert_ppm,
        kill_ppm,
        charge_on,
        agents,
        unmatched,
        refuse_unpriced,
        payments,
        pay_x402,
        approval,
        repeat: repeat_rule(raw.repeat_breaker.as_ref(), &f("repeatBreaker"))?,
        spend_rate: rate_rule(raw.spend_rate.as_ref(), &f("spendRate"))?,
        x402_repeat: x402_repeat_rule(raw.x402.repeat_breaker.as_ref(), &f("x402.repeatBreaker"))?,
    })
}

/// `x402.repeatBreaker: {payments, windowSeconds}`: `payments` of one resource within the
/// window are paid; the next is refused before paying.
fn x402_repeat_rule(
    raw: Option<&crate::core::config::RawX402Repeat>,
    field: &str,
) -> Result<Option<crate::core::breaker::RepeatRule>, String> {
    let Some(raw) = raw else { return Ok(None) };
    let as_repeat = crate::core::config::RawRepeatBreaker {
        calls: match &raw.payments {
            Some(Value::Number(n)) => match n.as_u64() {
                Some(p) if (1..=1_000_000).contains(&p) => Some(Value::from(p + 1)),
                _ => {
                    return Err(format!(
                        "{field}.payments: {n} must be a whole number from 1 to 1000000"
                    ))
                }
            },
            None | Some(Value::Null) => return Err(format!("{field}.payments: required")),
            Some(other) => return Err(format!("{field}.payments: {other} must be a number")),
        },
        window_seconds: raw.window_seconds.clone(),
        warn_at: None,
        kill_session: None,
    };
    repeat_rule(Some(&as_repeat), field)
}

/// `spendRate: {limit, windowSeconds}`.
fn rate_rule(
    raw: Option<&crate::core::config::RawSpendRate>,
    field: &str,
) -> Result<Option<crate::core::spend_rate::RateRule>, String> {
    let Some(raw) = raw else { return Ok(None) };
    let limit = amount(raw.limit.as_ref(), &format!("{field}.limit"), false)?
        .ok_or_else(|| format!("{field}.limit: required (an amount, e.g. \"1000000\")"))?;
    let window_seconds = match raw.window_seconds.as_ref() {
        None | Some(Value::Null) => 60,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if (6..=86_400).contains(&x) => x as u32,
            _ => {
                return Err(format!(
                    "{field}.windowSeconds: {n} must be a whole number from 6 to 86400"
                ))
            }
        },
        Some(other) => return Err(format!("{field}.windowSeconds: {other} must be a number")),
    };
    Ok(Some(crate::core::spend_rate::RateRule {
        limit,
        window_seconds,
        kill_session: raw.kill_session.unwrap_or(false),
    }))
}

/// `repeatBreaker: {calls, windowSeconds, warnAt, killSession}`.
fn repeat_rule(
    raw: Option<&crate::core::config::RawRepeatBreaker>,
    field: &str,
) -> Result<Option<crate::core::breaker::RepeatRule>, String> {
    let Some(raw) = raw else { return Ok(None) };
    let number =
        |v: Option<&Value>, name: &str, default: Option<u64>, max: u64| -> Result<u64, String> {
            match v {
                None | Some(Value::Null) => {
                    default.ok_or_else(|| format!("{field}.{name}: required"))
                }
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(x) if (1..=max).contains(&x) => Ok(x),
                    _ => Err(format!(
                        "{field}.{name}: {n} must be a whole number from 1 to {max}"
                    )),
                },
                Some(other) => Err(format!("{field}.{name}: {other} must be a number")),
            }
        };
    let calls = number(raw.calls.as_ref(), "calls", None, 1_000_000)?;
    if calls < 2 {
        return Err(format!(
            "{field}.calls: must be at least 2 (the first call is never a repeat)"
        ));
    }
    let window = number(
        raw.window_seconds.as_ref(),
        "windowSeconds",
        Some(60),
        86_400,
    )?;
    let warn_at = match raw.warn_at.as_ref() {
        None | Some(Value::Null) => 0,
        v => number(v, "warnAt", None, 1_000_000)?,
    };
    if warn_at >= calls {
        return Err(format!(
            "{field}.warnAt: {warn_at} must be below calls ({calls})"
        ));
    }
    Ok(Some(crate::core::breaker::RepeatRule {
        calls: u32::try_from(calls).unwrap_or(u32::MAX),
        warn_at: u32::try_from(warn_at).unwrap_or(u32::MAX),
        window_seconds: u32::try_from(window).unwrap_or(u32::MAX),
        kill_session: raw.kill_session.unwrap_or(false),
    }))
}

fn compile_payments(
    raw: &crate::core::config::RawX402,
    f: &dyn Fn(&str) -> String,
) -> Result<PaymentRules, String> {
    let mut payments = PaymentRules::default();
    for (i, n) in raw.networks.iter().enumerate() {
        if !network_name(n) {
            return Err(format!(
                "{}[{i}]: {n:?} is not a network name (e.g. eip155:84532 or base-sepolia)",
                f("x402.networks")
            ));
        }
        let id = canonical_network(n);
        if !payments.networks.contains(&id) {
            payments.networks.push(id);
        }
    }
    for (i, a) in raw.assets.iter().enumerate() {
        let field = format!("{}[{i}]", f("x402.assets"));
        let rule = match a {
            Value::String(text) => {
                let address = crate::core::x402::evm_address(text).ok_or_else(|| {
                    format!("{field}: {text:?} is not an address (0x and 40 hex digits)")
                })?;
                if PaymentRules::default()
                    .to_budget_any_network(&address)
                    .is_none()
                {
                    return Err(format!(
                        "{field}: {text} is not a known USDC contract; give its decimals to count it: {{\"address\": \"{text}\", \"decimals\": 18, \"network\": \"eip155:1\"}} (a USD-pegged token only)"
                    ));
                }
                AssetRule {
                    address,
                    network: None,
                    decimals: BUDGET_DECIMALS,
                }
            }
            Value::Object(map) => {
                let text = map.get("address").and_then(Value::as_str).unwrap_or("");
                let address = crate::core::x402::evm_address(text).ok_or_else(|| {
                    format!("{field}.address: {text:?} is not an address (0x and 40 hex digits)")
                })?;
                let decimals = map
                    .get("decimals")
                    .and_then(Value::as_u64)
                    .filter(|d| *d <= 24)
                    .ok_or_else(|| format!("{field}.decimals: required, a number from 0 to 24"))?;
                let network = match map.get("network") {
                    None => None,
                    Some(Value::String(n)) if network_name(n) => Some(canonical_network(n)),
                    Some(other) => {
                        return Err(format!("{field}.network: {other} is not a network name"))
                    }
                };
                if let Some(k) = map
                    .keys()
                    .find(|k| !matches!(k.as_str(), "address" | "decimals" | "network"))
                {
                    return Err(format!(
                        "{field}: unknown field {k:?} (address, decimals, network)"
                    ));
                }
                AssetRule {
                    address,
                    network,
                    decimals: decimals as u8,
                }
            }
            other => {
                return Err(format!(
                    "{field}: {other} must be an address or {{address, decimals, network}}"
                ))
            }
        };
        payments.assets.push(rule);
    }
    for (i, a) in raw.payees.iter().enumerate() {
        let address = crate::core::x402::evm_address(a).ok_or_else(|| {
            format!(
                "{}[{i}]: {a:?} is not an address (0x and 40 hex digits)",
                f("x402.payees")
            )
        })?;
        payments.payees.push(address);
    }
    Ok(payments)
}

fn network_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_'))
}

fn compile_agent(field: &str, pattern: &str, raw: RawAgentPolicy) -> Result<AgentRule, String> {
    let pattern = IdPattern::new(pattern).map_err(|e| format!("{field}: {e}"))?;
    let agent_budget = amount(
        raw.agent_budget.as_ref(),
        &format!("{field}.agentBudget"),
        false,
    )?;
    let max_per_request = amount(
        raw.max_per_request.as_ref(),
        &format!("{field}.maxPerRequest"),
        false,
    )?;
    if let (Some(cap), Some(budget)) = (max_per_request, agent_budget) {
        if cap > budget {
            return Err(format!(
                "{field}.maxPerRequest: {cap} is above agentBudget {budget}"
            ));
        }
    }
    let allowed = match &raw.allowed_endpoints {
        Some(list) => Some(globs(list, &format!("{field}.allowedEndpoints"))?),
        None => None,
    };
    let blocked = match &raw.blocked_endpoints {
        Some(list) => Some(globs(list, &format!("{field}.blockedEndpoints"))?),
        None => None,
    };
    Ok(AgentRule {
        pattern,
        agent_budget,
        max_per_request,
        allowed,
        blocked,
        inherit_parent: raw.inherit_parent_policy.unwrap_or(true),
        inherit_cache: raw.inherit_parent_cache.unwrap_or(true),
        repeat: repeat_rule(
            raw.repeat_breaker.as_ref(),
            &format!("{field}.repeatBreaker"),
        )?,
        spend_rate: rate_rule(raw.spend_rate.as_ref(), &format!("{field}.spendRate"))?,
    })
}

/// An amount written as a decimal string. `allow_zero` for prices (a free endpoint).
fn amount(value: Option<&Value>, field: &str, allow_zero: bool) -> Result<Option<Amount>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let v = parse_amount(s).map_err(|e| format!("{field}: {s:?} is {e}"))?;
            if v == 0 && !allow_zero {
                return Err(format!("{field}: must be a positive amount"));
            }
            Ok(Some(v))
        }
        Some(Value::Number(n)) => Err(format!(
            "{field}: amounts are decimal strings in the token's smallest unit; write \"{n}\" instead of {n}"
        )),
        Some(other) => Err(format!("{field}: {other} is not an amount (a decimal string like \"5000000\")")),
    }
}

fn threshold(value: Option<&Value>, field: &str) -> Result<Option<u64>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .and_then(threshold_ppm)
            .map(Some)
            .ok_or_else(|| format!("{field}: {n} must be a number in (0, 1]")),
        Some(other) => Err(format!("{field}: {other} must be a number in (0, 1]")),
    }
}

fn globs(patterns: &[String], field: &str) -> Result<Vec<Glob>, String> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| Glob::new(p).map_err(|e| format!("{field}[{i}]: {e}")))
        .collect()
}

fn header_name(value: Option<String>, default: &str, field: &str) -> Result<String, String> {
    let name = value
        .unwrap_or_else(|| default.to_string())
        .to_ascii_lowercase();
    let valid = !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(name)
    } else {
        Err(format!("{field}: {name:?} is not a valid header name"))
    }
}

fn check_label(value: &str, field: &str) -> Result<(), String> {
    if valid_id(value.as_bytes()) && value.len() <= 64 {
        Ok(())
    } else {
        Err(format!(
            "{field}: {value:?} must be 1-64 of A-Z a-z 0-9 . _ : @ -"
        ))
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Hex SHA-256 of a key, as written in the configuration.
pub fn sha256_hex(key: &[u8]) -> String {
    Sha256::digest(key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Route settings read from route metadata (`filter_metadata.pag0`), checked at request
/// time because the filter cannot see the route table when it is configured.
pub fn check_route_price(text: &str) -> Result<Amount, String> {
    parse_amount(text).map_err(|e| format!("route metadata pag0.price {text:?} is {e}"))
}

pub fn check_route_tool(text: &str) -> Result<(), String> {
    check_label(text, "route metadata pag0.tool")
}

/// A route's `endpoint` label: 1-200 printable ASCII characters.
pub fn check_route_endpoint(text: &str) -> Result<(), String> {
    if !text.is_empty() && text.len() <= 200 && text.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "route metadata pag0.endpoint {text:?} must be 1-200 printable ASCII characters"
        ))
    }
}

pub fn parse_charge_on(text: &str) -> Result<ChargeOn, String> {
    match text {
        "success" => Ok(ChargeOn::Success),
        "always" => Ok(ChargeOn::Always),
        other => Err(format!(
            "route metadata pag0.chargeOn {other:?} must be \"success\" or \"always\""
        )),
    }
}
