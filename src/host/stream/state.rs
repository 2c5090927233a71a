//! What one stream knows, shared with the root context while the stream waits (for an
//! identical call's answer, for its body, for the report API's flush). A leaf: it
//! imports no stage.

use std::rc::Rc;

use crate::core::call::{Call, Caller};
use crate::core::headers::BudgetView;
use crate::core::ledger::Ticket;
use crate::core::meter::request::{Api, LlmRequest, Plan};
use crate::core::meter::usage::AnswerMeter;
use crate::host::metrics::CallIds;
use crate::host::reply::Shape;

/// Which way the stream is going: a stage that resumes it resumes that direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Request,
    Response,
}

/// A dispatched call the stream waits for, by token. Matched exhaustively when the
/// answer comes, so an answer can never reach the wrong handler.
#[derive(Debug)]
pub enum Pending {
    /// The second-level cache's answer to a lookup.
    CacheLevel2,
    /// The approval service's answer; then go on as said.
    Approval(AfterApproval),
    /// The signer's payment (pay mode).
    Signer,
    /// The paid retry's answer (pay mode).
    PaidRetry,
    /// The Redis ledger's answer to a reservation (`ledger.store: redis`).
    Reserve(Box<ReserveWait>),
    /// Redis had no ledger script: its loading, then the reservation again.
    ReserveLoad(Box<ReserveWait>),
    /// The Redis ledger's answer to the admin API (a kill, a resume, a report read).
    AdminRemote(Box<crate::host::stream::admin::RemoteWait>),
}

/// A reservation sent to the Redis ledger, and what the stream does once it is made.
#[derive(Debug)]
pub struct ReserveWait {
    pub id: String,
    pub ticket: Ticket,
    pub plan: crate::core::ledger::remote::Plan,
    /// The script's request, sent again after a NOSCRIPT.
    pub request: String,
    /// This VM's settlements sent along (see `remote_ledger::take_riders`).
    pub riders: Vec<crate::core::ledger::remote::Settlement>,
    /// The script was loaded once for it (a second NOSCRIPT fails the call).
    pub loaded: bool,
    pub then: AfterReserve,
}

/// What a call does once its price is reserved.
#[derive(Debug)]
pub enum AfterReserve {
    /// The gate goes on (metering, approval, upstream).
    Gate,
    /// Pay mode: approval, then the signer with this request body.
    Sign(String),
}

/// What an approved call does next.
#[derive(Debug)]
pub enum AfterApproval {
    /// Go upstream (the request was paused for approval).
    Resume,
    /// Pay mode: ask the signer, with this request body.
    Sign(String),
}

/// A call held back until its request body is in (to key the cache on it, or to
/// meter it).
#[derive(Debug, Default)]
pub struct Deferred {
    /// Whether the gate waits for the body at all.
    pub waiting: bool,
    /// The body read so far (read incrementally: Envoy buffers it meanwhile).
    pub body: Vec<u8>,
}

/// This stream's claim on a cache key: it goes upstream and fills the entry.
#[derive(Debug)]
pub struct CacheFill {
    pub slot: u32,
    pub key: String,
    pub ttl: u64,
    /// Set once the answer is known to be storable: (status, content type, encoding).
    pub storing: Option<(u16, String, String)>,
    /// The answer's body, copied as it passes (never held back).
    pub body: Vec<u8>,
    pub cost: u64,
}

/// What the cache stage needs to key a call.
#[derive(Debug, Default, Clone)]
pub struct CacheRequest {
    pub ttl: u64,
    pub authority: Vec<u8>,
    pub query: Vec<u8>,
    pub content_type: Vec<u8>,
    pub accept: Vec<u8>,
    pub accept_encoding: Vec<u8>,
    pub credentials: Vec<Vec<u8>>,
}

/// A metered call (route metadata `meter`), from its request to its settlement.
#[derive(Debug)]
pub struct MeterFlow {
    pub request: LlmRequest,
    /// What the reservation pays for (set once admitted).
    pub plan: Option<Plan>,
    /// The answer, read as it passes.
    pub answer: Option<AnswerMeter>,
    /// A non-streamed answer: its headers wait for its body.
    pub holding: bool,
}

/// x402 pay mode for one stream: what it takes to answer a 402 by paying and
/// retrying the original request.
#[derive(Debug)]
pub struct PayFlow {
    /// The request as it came, without pag0's own headers.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Bytes of the VM's retry-body budget this stream holds.
    pub held: usize,
    /// The body could not be kept whole (too big, or the VM's budget ran out).
    pub lost_body: Option<&'static str>,
    pub stage: PayStage,
    pub version: u8,
    pub network: String,
    /// What the chosen requirement costs, in the budget's unit.
    pub amount: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayStage {
    Armed,
    /// A 402 without a v2 header: reading its body for a v1 offer.
    ReadingOffer,
    Approving,
    Signing,
    Retrying,
}

#[derive(Debug, Default)]
pub struct StreamState {
    pub phase: Phase,
    /// pag0's own paid retry, back through the listener: passed through untouched.
    pub internal: bool,
    /// A local answer was sent (refusal, hit, report, paid answer).
    pub answered: bool,
    /// The request went upstream (so a call never answered may have been done).
    pub forwarded: bool,
    pub method: String,
    pub path: Vec<u8>,
    pub caller: Option<Rc<Caller>>,
    pub call: Option<Rc<Call>>,
    pub ticket: Option<Ticket>,
    pub view: BudgetView,
    pub metric_ids: Option<CallIds>,
    pub shape: Shape,
    pub deferred: Deferred,
    pub cache: Option<CacheRequest>,
    pub fill: Option<CacheFill>,
    pub pay: Option<PayFlow>,
    pub pending: Option<(u32, Pending)>,
    /// Relay mode: the upstream's 402 is being read for its offer (headers held).
    pub reading_relay_offer: bool,
    /// The upstream answered and the ledger was settled.
    pub settled: bool,
    /// `ledger.store: redis`: the settled call's reservation id (`x-pag0-reservation`).
    pub reservation: Option<String>,
    /// An answer already replaced by a refusal: its body is dropped.
    pub replaced: bool,
    /// The call is token-metered, in this API (its body is read before the gate).
    pub meter_api: Option<Api>,
    /// The repeat breaker's count and limit, when the call came close to it.
    pub loop_warning: Option<(u32, u32)>,
    /// What the spend-rate breaker counted for this call, to give back at settle.
    pub spend_counted: Vec<crate::core::spend_rate::Counted>,
    pub meter: Option<Box<MeterFlow>>,
}

impl StreamState {
    pub fn is_waiting_for_callout(&self) -> bool {
        self.pending.is_some()
    }
}
