//! Compiled settings shared by several parts of the core (so that the compiler and
//! the policy never import each other): session table limits, a dispatched service,
//! the ledger's timings.

/// The fixed table of session slots per tenant.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Slots in each tenant's session table.
    pub max_sessions: u32,
    pub max_agents: u16,
    pub idle_timeout_secs: u64,
}

/// A service pag0 calls with a dispatched HTTP call: an Envoy cluster, a path, the
/// `:authority` to send, and how long to wait.
#[derive(Clone, PartialEq, Eq)]
pub struct Service {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub timeout_ms: u64,
    /// The `authorization` header every call carries, if the service wants one.
    pub authorization: Option<String>,
}

/// Never prints the credential (a config error or a log line might show a service).
impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("cluster", &self.cluster)
            .field("path", &self.path)
            .field("authority", &self.authority)
            .field("timeout_ms", &self.timeout_ms)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How the ledger keeps reservations honest when a VM dies or a call never ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerTimings {
    /// A VM that has not shown a sign of life for this long is dead: another VM
    /// settles its reservations (charged, counted as unconfirmed).
    pub owner_lease_ms: u64,
    /// A reservation still open after this long is settled as an unknown outcome
    /// (charged, unconfirmed) by the VM that holds it.
    pub reservation_timeout_ms: u64,
    /// How often a VM writes what it counted (reports, deferred commits).
    pub flush_interval_ms: u64,
}

impl Default for LedgerTimings {
    fn default() -> LedgerTimings {
        LedgerTimings {
            owner_lease_ms: 15_000,
            reservation_timeout_ms: 3_600_000,
            flush_interval_ms: 100,
        }
    }
}

/// When a call's reservation is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeOn {
    /// Charge only when the upstream answers 2xx (the default).
    Success,
    /// Charge any answer that came from the upstream.
    Always,
}
