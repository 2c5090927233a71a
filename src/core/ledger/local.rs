//! What one Envoy VM holds of the ledger: its registration, its open reservations,
//! and what it counted but has not written yet. The host keeps one per VM (a worker
//! runs one VM on one thread, so nothing here is shared).
//!
//! Writing reports and commits on a tick instead of on every call is what keeps a
//! priced call at one compare-and-swap per record: a commit moves an amount from
//! `reserved` to `spent`, which no budget check can tell apart, and report counts are
//! read only by the report API, which asks every VM to flush first (see [`flush
//! requests`](LocalLedger::request_flush)). A VM that dies loses only counts: its
//! reservations stay in the records under its owner number and are charged by the
//! recovery (see [`crate::core::ledger::owners`]).

use hashbrown::HashMap;

use crate::core::alerts::Alert;
use crate::core::amount::Amount;
use crate::core::compile::Config;
use crate::core::errors::{ErrorCode, Refusal};
use crate::core::ledger::budget::{BudgetRecord, Release};
use crate::core::ledger::owners::{self, Recovery, VmId};
use crate::core::ledger::report::{CallStats, ReportRecord};
use crate::core::ledger::windows::WindowsRecord;
use crate::core::ledger::{
    decode_windows, session_alerts, sessions, settle_now, window_alerts, Ticket,
};
use crate::core::store::{
    flush_epoch_key, read, report_slot_key, session_slot_key, tenant_windows_key, update,
    SharedStore, Step,
};

/// `(tenant, session)` borrowed, to look up a session's pending counts without
/// building its key (hashes as `(usize, String)` does).
#[derive(Hash)]
struct SessionRef<'a>(usize, &'a str);

impl hashbrown::Equivalent<(usize, String)> for SessionRef<'_> {
    fn equivalent(&self, key: &(usize, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

impl From<&SessionRef<'_>> for (usize, String) {
    fn from(key: &SessionRef<'_>) -> (usize, String) {
        (key.0, key.1.to_string())
    }
}

/// Sessions with unwritten counts past which a VM writes at once, not on its tick.
const MAX_PENDING_SESSIONS: usize = 4096;
/// How often a VM says it is alive.
const HEARTBEAT_MS: u64 = 1000;
/// Keys a recovery walks per tick.
const RECOVERY_KEYS_PER_TICK: u64 = 256;

#[derive(Debug, Default)]
struct SessionPending {
    slot: Option<u32>,
    /// Exact commits of this VM's reservations: (policy, budget agent, agent id) →
    /// (reserved, count).
    commits: Vec<Commit>,
    stats: Option<ReportRecord>,
}

/// Exact commits of this VM's reservations, not yet written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub policy: usize,
    pub budget_agent: Option<String>,
    pub agent: String,
    pub amount: Amount,
    pub count: u32,
}

/// The same for a tenant's windows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowPending {
    pub policy: usize,
    pub amount: Amount,
    pub count: u32,
}

/// This VM's part of the ledger.
#[derive(Debug, Default)]
pub struct LocalLedger {
    id: Option<VmId>,
    next_ticket: u64,
    /// Reservations in flight: ticket id → the ticket.
    open: HashMap<u64, Ticket>,
    sessions: HashMap<(usize, String), SessionPending>,
    windows: HashMap<usize, WindowPending>,
    acked_epoch: u64,
    last_flush_ms: u64,
    last_beat_ms: u64,
    last_tick_ms: u64,
    recovery: Option<Recovery>,
    /// Budget records as this VM last read or wrote them (see [`LocalLedger::seen`]).
    seen: HashMap<usize, HashMap<String, SeenSession>>,
    seen_windows: HashMap<usize, Seen<WindowsRecord>>,
    /// `ledger.store: redis`: report counts flushed, waiting for the host to send.
    remote_reports: Vec<(usize, String, ReportRecord)>,
    /// `ledger.store: redis`: a flush request this VM has flushed for, acknowledged
    /// only once Redis has what it flushed (see [`LocalLedger::release_ack`]).
    held_ack: Option<u64>,
}

/// A session's record (and slot) as last seen; `None`: it had none.
type SeenSession = Seen<Option<(u32, BudgetRecord)>>;

/// A record as this VM last read or wrote it, and when.
#[derive(Debug, Clone)]
pub struct Seen<T> {
    pub at_ms: u64,
    pub value: T,
}

/// Sessions whose records a VM remembers; past this, the ones not seen lately go.
const MAX_SEEN_SESSIONS: usize = 4096;
/// Under a flood of new sessions, records older than this go first.
const SEEN_FLOOD_MS: u64 = 50;

/// What a tick did that the host must act on.
#[derive(Debug, Default)]
pub struct TickOutcome {
    pub alerts: Vec<Alert>,
    /// Reservations settled because they stayed open past the reservation timeout.
    pub expired: usize,
    /// Reservations of a dead VM settled by this one.
    pub recovered: u32,
}

impl LocalLedger {
    pub fn new() -> LocalLedger {
        LocalLedger::default()
    }

    /// This VM's owner number, registering it first if needed.
    pub fn vm<S: SharedStore + ?Sized>(&mut self, store: &S, now_ms: u64) -> Result<VmId, Refusal> {
        if let Some(id) = self.id {
            return Ok(id);
        }
        let id = owners::register(store, now_ms)?;
        self.id = Some(id);
        self.last_beat_ms = now_ms;
        Ok(id)
    }

    pub fn registered(&self) -> Option<VmId> {
        self.id
    }

    /// Keeps a copy of an admitted call's ticket; returns its id.
    pub fn open(&mut self, ticket: &Ticket) -> u64 {
        self.next_ticket = self.next_ticket.wrapping_add(1);
        let id = self.next_ticket;
        let mut kept = ticket.clone();
        kept.id = id;
        self.open.insert(id, kept);
        id
    }

    /// Forgets an open ticket; `false` when it is no longer open (it expired, or the
    /// VM was taken for dead and its reservations charged by a recovery).
    pub fn close(&mut self, id: u64) -> bool {
        self.open.remove(&id).is_some()
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    fn session(&mut self, tenant: usize, session: &str) -> &mut SessionPending {
        self.sessions
            .entry_ref(&SessionRef(tenant, session))
            .or_default()
    }

    /// A call charged exactly what it reserved: written on the next flush.
    pub fn defer_commit(&mut self, ticket: &Ticket) {
        let pending = self.session(ticket.tenant, &ticket.session);
        if pending.slot.is_none() {
            pending.slot = ticket.slot;
        }
        match pending.commits.iter_mut().find(|c| {
            c.policy == ticket.policy
                && c.budget_agent == ticket.budget_agent
                && c.agent == ticket.agent
        }) {
            Some(c) => {
                c.amount = c.amount.saturating_add(ticket.price);
                c.count = c.count.saturating_add(1);
            }
            None => pending.commits.push(Commit {
                policy: ticket.policy,
                budget_agent: ticket.budget_agent.clone(),
                agent: ticket.agent.clone(),
                amount: ticket.price,
                count: 1,
            }),
        }
        if ticket.windows {
            let w = self.windows.entry(ticket.tenant).or_default();
            w.policy = ticket.policy;
            w.amount = w.amount.saturating_add(ticket.price);
            w.count = w.count.saturating_add(1);
        }
    }

    pub fn record_call(
        &mut self,
        tenant: usize,
        session: &str,
        slot: Option<u32>,
        call: &CallStats,
        max_agents: u16,
    ) {
        let pending = self.session(tenant, session);
        if pending.slot.is_none() {
            pending.slot = slot;
        }
        pending
            .stats
            .get_or_insert_with(|| ReportRecord::new(session))
            .record_call(call, max_agents);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_refusal(
        &mut self,
        tenant: usize,
        session: &str,
        agent: &str,
        parent: Option<&str>,
        code: &str,
        now: u64,
        max_agents: u16,
    ) {
        self.session(tenant, session)
            .stats
            .get_or_insert_with(|| ReportRecord::new(session))
            .record_refusal(agent, parent, code, now, max_agents);
    }

    /// A session's record as this VM last saw it, when that was at most `max_age_ms`
    /// ago: what free calls and cache hits take their view and the manual kill switch
    /// from, instead of a shared-data read each (neither spends, so a view a moment old
    /// cannot let money through; priced calls always read and write the record itself).
    /// `Some(None)`: the session had no record. A flush request (the kill and resume
    /// API raise one, and wait for every VM to acknowledge it) forgets them all.
    pub fn seen(
        &self,
        tenant: usize,
        session: &str,
        now_ms: u64,
        max_age_ms: u64,
    ) -> Option<Option<&(u32, BudgetRecord)>> {
        let seen = self.seen.get(&tenant)?.get(session)?;
        (now_ms.saturating_sub(seen.at_ms) <= max_age_ms).then_some(seen.value.as_ref())
    }

    /// Where the session's record was last seen, however long ago (a slot changes
    /// hands only when its session is idle; whoever uses the hint checks the id).
    pub fn slot_hint(&self, tenant: usize, session: &str) -> Option<u32> {
        self.seen
            .get(&tenant)?
            .get(session)?
            .value
            .as_ref()
            .map(|(slot, _)| *slot)
    }

    /// Remembers a session's record as just read or written (`None`: it has none).
    pub fn saw(
        &mut self,
        tenant: usize,
        session: &str,
        record: Option<(u32, BudgetRecord)>,
        now_ms: u64,
    ) {
        let sessions = self.seen.entry(tenant).or_default();
        if sessions.len() >= MAX_SEEN_SESSIONS && !sessions.contains_key(session) {
            // Bounded between ticks too: a flood of new sessions must not grow the VM.
            sessions.retain(|_, s| now_ms.saturating_sub(s.at_ms) < SEEN_FLOOD_MS);
            if sessions.len() >= MAX_SEEN_SESSIONS {
                *sessions = HashMap::new();
            }
        }
        let seen = Seen {
            at_ms: now_ms,
            value: record,
        };
        match sessions.get_mut(session) {
            Some(entry) => *entry = seen,
            None => {
                sessions.insert(session.to_string(), seen);
            }
        }
    }

    /// The tenant's windows as this VM last saw them, at most `max_age_ms` ago.
    pub fn seen_windows(
        &self,
        tenant: usize,
        now_ms: u64,
        max_age_ms: u64,
    ) -> Option<&WindowsRecord> {
        let seen = self.seen_windows.get(&tenant)?;
        (now_ms.saturating_sub(seen.at_ms) <= max_age_ms).then_some(&seen.value)
    }

    pub fn saw_windows(&mut self, tenant: usize, record: WindowsRecord, now_ms: u64) {
        self.seen_windows.insert(
            tenant,
            Seen {
                at_ms: now_ms,
                value: record,
            },
        );
    }

    /// Forgets every record seen (the manual kill switch changed somewhere).
    fn forget_seen(&mut self) {
        self.seen.clear();
        self.seen_windows.clear();
    }

    /// Keeps the remembered records bounded: past [`MAX_SEEN_SESSIONS`], those older
    /// than `max_age_ms` go (their slot hints with them).
    fn trim_seen(&mut self, now_ms: u64, max_age_ms: u64) {
        let total: usize = self.seen.values().map(HashMap::len).sum();
        if total > MAX_SEEN_SESSIONS {
            for sessions in self.seen.values_mut() {
                sessions.retain(|_, s| now_ms.saturating_sub(s.at_ms) <= max_age_ms);
            }
        }
    }

    /// Takes this VM's unwritten commits of a session, to write them with the next
    /// compare-and-swap of its record (a reservation, a settlement): the record then
    /// shows them without a write of its own. Give them back with
    /// [`LocalLedger::return_commits`] if that write does not happen.
    pub fn take_commits(&mut self, tenant: usize, session: &str) -> Vec<Commit> {
        match self.sessions.get_mut(&SessionRef(tenant, session)) {
            Some(p) => std::mem::take(&mut p.commits),
            None => Vec::new(),
        }
    }

    pub fn return_commits(&mut self, tenant: usize, session: &str, commits: Vec<Commit>) {
        if !commits.is_empty() {
            self.session(tenant, session).commits.extend(commits);
        }
    }

    /// The same for a tenant's windows.
    pub fn take_window_commits(&mut self, tenant: usize) -> Option<WindowPending> {
        self.windows.remove(&tenant)
    }

    pub fn return_window_commits(&mut self, tenant: usize, w: Option<WindowPending>) {
        if let Some(w) = w {
            let e = self.windows.entry(tenant).or_default();
            e.policy = w.policy;
            e.amount = e.amount.saturating_add(w.amount);
            e.count = e.count.saturating_add(w.count);
        }
    }

    /// Whether counts wait to be written.
    pub fn dirty(&self) -> bool {
        !self.sessions.is_empty() || !self.windows.is_empty()
    }

    /// Whether so much waits that it should be written now rather than on the tick.
    pub fn overfull(&self) -> bool {
        self.sessions.len() > MAX_PENDING_SESSIONS
    }

    /// Writes every commit and count this VM holds: one compare-and-swap per session's
    /// budget record (commits), per session's report record (counts) and per tenant's
    /// windows. Returns the alerts the committed spend raised.
    pub fn flush<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        now_ms: u64,
    ) -> Vec<Alert> {
        self.last_flush_ms = now_ms;
        let now = now_ms / 1000;
        let mut alerts = Vec::new();
        let Some(vm) =
            self.id
                .map(|id| id.slot)
                .or(if self.dirty_commits() { None } else { Some(0) })
        else {
            // Commits without a registration cannot happen; drop them rather than guess.
            self.sessions.clear();
            self.windows.clear();
            return alerts;
        };
        let sessions = std::mem::take(&mut self.sessions);
        for ((tenant_index, session), pending) in sessions {
            let Some(tenant) = cfg.tenants.get(tenant_index).map(|t| t.id.as_str()) else {
                continue;
            };
            let mut slot = pending.slot.or_else(|| {
                self.seen
                    .get(&tenant_index)
                    .and_then(|m| m.get(session.as_str()))
                    .and_then(|s| s.value.as_ref().map(|(slot, _)| *slot))
            });
            if !pending.commits.is_empty() {
                let commits = &pending.commits;
                let applied = sessions::with_session(
                    store,
                    tenant,
                    &session,
                    slot,
                    &cfg.sessions,
                    now,
                    &|r| apply_commits(r, cfg, vm, commits),
                );
                match applied {
                    Ok(Some((_, raised))) => alerts.extend(raised.into_iter().map(|alert| Alert {
                        tenant: tenant.to_string(),
                        session: session.clone(),
                        at: now,
                        alert,
                    })),
                    // The session is gone: its reservations were charged by a recovery.
                    Ok(None) => {}
                    Err(_) => {}
                }
            }
            let Some(stats) = pending.stats else { continue };
            if cfg.ledger_redis.is_some() {
                // The Redis ledger: the counts go to the session's report list there.
                self.remote_reports.push((tenant_index, session, stats));
                continue;
            }
            if slot.is_none() {
                slot = sessions::lookup(store, tenant, &session, &cfg.sessions)
                    .ok()
                    .flatten()
                    .map(|(s, _)| s);
            }
            // Calls of a session without a record (free or refused calls only) are
            // not kept: such sessions never take a slot.
            let Some(slot) = slot else { continue };
            let max_agents = cfg.sessions.max_agents;
            let _ = update(store, &report_slot_key(tenant, slot), |bytes| {
                // The slot must still hold the session's budget record: a slot given to
                // another session starts a fresh report.
                let owner = read(store, &session_slot_key(tenant, slot))?;
                if !BudgetRecord::encoded_id_is(&owner, &session) {
                    return Ok(Step::Keep(()));
                }
                let mut record = if ReportRecord::encoded_id_is(bytes, &session) {
                    ReportRecord::decode(bytes).unwrap_or_else(|_| ReportRecord::new(&session))
                } else {
                    ReportRecord::new(&session)
                };
                record.merge(&stats, max_agents, now);
                Ok(Step::Write(record.encode(), ()))
            });
        }
        let windows = std::mem::take(&mut self.windows);
        for (tenant_index, w) in windows {
            let (Some(tenant), Some(policy)) = (
                cfg.tenants.get(tenant_index).map(|t| t.id.as_str()),
                cfg.policies.get(w.policy),
            ) else {
                continue;
            };
            let done = update(store, &tenant_windows_key(tenant), |bytes| {
                let mut record = decode_windows(bytes)?;
                record.roll(now);
                let raised = apply_window_commits(&mut record, policy, vm, &w);
                Ok(Step::Write(record.encode(), raised))
            });
            if let Ok(raised) = done {
                alerts.extend(raised.into_iter().map(|alert| Alert {
                    tenant: tenant.to_string(),
                    session: String::new(),
                    at: now,
                    alert,
                }));
            }
        }
        alerts
    }

    fn dirty_commits(&self) -> bool {
        !self.windows.is_empty() || self.sessions.values().any(|s| !s.commits.is_empty())
    }

    /// Acknowledges flush request `epoch`, or (Redis ledger) holds it until Redis has
    /// what was flushed.
    fn ack<S: SharedStore + ?Sized>(&mut self, cfg: &Config, store: &S, epoch: u64, now_ms: u64) {
        if cfg.ledger_redis.is_some() {
            self.held_ack = Some(self.held_ack.map_or(epoch, |e| e.max(epoch)));
            return;
        }
        self.acked_epoch = epoch;
        if let Some(id) = self.id {
            let _ = owners::heartbeat(store, id, now_ms, epoch);
        }
    }

    /// The flush request held for Redis, if any.
    pub fn held_ack(&self) -> Option<u64> {
        self.held_ack
    }

    /// Redis has everything flushed for `epoch`: acknowledged now.
    pub fn release_ack<S: SharedStore + ?Sized>(&mut self, store: &S, epoch: u64, now_ms: u64) {
        if self.held_ack.is_some_and(|e| e <= epoch) {
            self.held_ack = None;
        }
        if epoch > self.acked_epoch {
            self.acked_epoch = epoch;
            if let Some(id) = self.id {
                let _ = owners::heartbeat(store, id, now_ms, epoch);
            }
        }
    }

    /// Report counts for the Redis ledger, taken by the host to send.
    pub fn take_remote_reports(&mut self) -> Vec<(usize, String, ReportRecord)> {
        std::mem::take(&mut self.remote_reports)
    }

    /// The report API wants every VM's counts written: raises the flush epoch and
    /// writes this VM's own at once. Returns the epoch to wait for.
    pub fn request_flush<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        now_ms: u64,
    ) -> Result<(u64, Vec<Alert>), Refusal> {
        let epoch = update(store, &flush_epoch_key(), |bytes| {
            let next = decode_u64(bytes).saturating_add(1);
            Ok(Step::Write(next.to_le_bytes().to_vec(), next))
        })?;
        self.forget_seen();
        if let Some(id) = self.id {
            if owners::heartbeat(store, id, now_ms, self.acked_epoch) == Ok(false) {
                self.forget_reservations(store, now_ms);
            }
        }
        let alerts = self.flush(cfg, store, now_ms);
        self.ack(cfg, store, epoch, now_ms);
        Ok((epoch, alerts))
    }

    /// Whether every live VM has written its counts since flush request `epoch`.
    pub fn flushed<S: SharedStore + ?Sized>(
        &self,
        cfg: &Config,
        store: &S,
        epoch: u64,
        now_ms: u64,
    ) -> bool {
        owners::all_acked(store, epoch, now_ms, cfg.ledger.owner_lease_ms).unwrap_or(true)
    }

    /// The VM's tick: flush when due or asked, say it is alive, settle reservations
    /// open too long, and walk a dead VM's keys a little further.
    pub fn tick<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        now_ms: u64,
    ) -> TickOutcome {
        let mut out = TickOutcome::default();
        let timings = cfg.ledger;
        // The host ticks every 20 ms (for streams that wait) and once per root context
        // of the VM; the ledger's work (a read of the flush epoch at least) is done once
        // per flush interval.
        if self.last_tick_ms != 0
            && now_ms.saturating_sub(self.last_tick_ms) < timings.flush_interval_ms
        {
            return out;
        }
        self.last_tick_ms = now_ms;
        let requested = decode_u64(&read(store, &flush_epoch_key()).unwrap_or_default());
        let asked = requested > self.acked_epoch;
        if asked {
            self.forget_seen();
        }
        let flush_due = asked
            || (self.dirty()
                && now_ms.saturating_sub(self.last_flush_ms) >= timings.flush_interval_ms);
        let beat_due = now_ms.saturating_sub(self.last_beat_ms) >= HEARTBEAT_MS;
        // Every VM takes part in recoveries and flush requests, registered or not.
        let id = match self.vm(store, now_ms) {
            Ok(id) => id,
            Err(_) => return out,
        };
        // Whether this VM still owns its slot, before it writes anything: a VM taken
        // for dead (its reservations charged by a recovery) must not write commits.
        if beat_due || flush_due {
            match owners::heartbeat(store, id, now_ms, self.acked_epoch) {
                Ok(true) => self.last_beat_ms = now_ms,
                Ok(false) => self.forget_reservations(store, now_ms),
                Err(_) => return out,
            }
        }
        if flush_due {
            out.alerts.extend(self.flush(cfg, store, now_ms));
            if asked {
                // Acknowledged only once written: the report API reads right after.
                self.ack(cfg, store, requested, now_ms);
            }
        }
        out.expired = self.expire(cfg, store, now_ms, &mut out.alerts);
        if beat_due {
            self.trim_seen(now_ms, timings.flush_interval_ms);
        }
        // Looking for a dead VM costs a read of the registry: once a second, unless a
        // recovery is under way.
        if beat_due || self.recovery.is_some() {
            out.recovered = self.recover_step(cfg, store, id, now_ms);
        }
        out
    }

    /// This VM was taken for dead and a recovery charged its reservations: forget them
    /// (settling them again would charge twice; the records would not double-charge,
    /// but a new VM may already use the slot number) and register anew.
    fn forget_reservations<S: SharedStore + ?Sized>(&mut self, store: &S, now_ms: u64) {
        self.open.clear();
        self.sessions.values_mut().for_each(|s| s.commits.clear());
        self.windows.clear();
        self.id = None;
        let _ = self.vm(store, now_ms);
    }

    /// Settles reservations open longer than the reservation timeout as unknown
    /// outcomes (charged, unconfirmed).
    fn expire<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        now_ms: u64,
        alerts: &mut Vec<Alert>,
    ) -> usize {
        let timeout = cfg.ledger.reservation_timeout_ms;
        let due: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, t)| t.price > 0 && now_ms.saturating_sub(t.opened_ms) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            if let Some(ticket) = self.open.remove(id) {
                if let Ok(settled) = settle_now(cfg, store, &ticket, ticket.price, now_ms / 1000) {
                    alerts.extend(settled.alerts);
                }
                let pending = self.session(ticket.tenant, &ticket.session);
                pending
                    .stats
                    .get_or_insert_with(|| ReportRecord::new(&ticket.session))
                    .record_recovered(ticket.price, 1);
            }
        }
        due.len()
    }

    /// One step of recovering a dead VM's reservations (if one is dead).
    fn recover_step<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        me: VmId,
        now_ms: u64,
    ) -> u32 {
        let lease = cfg.ledger.owner_lease_ms;
        if self.recovery.is_none() {
            self.recovery = owners::take_recovery(store, me, now_ms, lease)
                .ok()
                .flatten();
        }
        let Some(mut recovery) = self.recovery else {
            return 0;
        };
        let now = now_ms / 1000;
        let per_tenant = u64::from(cfg.sessions.max_sessions) + 1;
        let total = per_tenant.saturating_mul(cfg.tenants.len() as u64);
        let end = recovery
            .cursor
            .saturating_add(RECOVERY_KEYS_PER_TICK)
            .min(total);
        let mut recovered = 0u32;
        for position in recovery.cursor..end {
            let tenant_index = (position / per_tenant) as usize;
            let Some(tenant) = cfg.tenants.get(tenant_index).map(|t| t.id.as_str()) else {
                break;
            };
            let within = position % per_tenant;
            if within == u64::from(cfg.sessions.max_sessions) {
                let _ = update(store, &tenant_windows_key(tenant), |bytes| {
                    let mut record = decode_windows(bytes)?;
                    if !record.owners.iter().any(|o| o.vm == recovery.slot) {
                        return Ok(Step::Keep(()));
                    }
                    record.roll(now);
                    record.recover(recovery.slot);
                    Ok(Step::Write(record.encode(), ()))
                });
                continue;
            }
            let slot = within as u32;
            recovered = recovered.saturating_add(recover_session(
                cfg,
                store,
                tenant,
                slot,
                recovery.slot,
                now,
            ));
        }
        recovery.cursor = end;
        let done = end >= total;
        if owners::recovery_progress(store, recovery, now_ms, done).is_ok() {
            self.recovery = if done { None } else { Some(recovery) };
        }
        recovered
    }
}

/// Charges what a dead VM held in one session slot, and counts it as unconfirmed.
fn recover_session<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    tenant: &str,
    slot: u32,
    dead: u16,
    now: u64,
) -> u32 {
    let key = session_slot_key(tenant, slot);
    let policy = cfg.policies.get(cfg.default_policy);
    let charged = update(store, &key, |bytes| {
        if bytes.is_empty() {
            return Ok(Step::Keep(None));
        }
        let Ok(mut record) = BudgetRecord::decode(bytes) else {
            return Ok(Step::Keep(None));
        };
        if !record.owners.iter().any(|o| o.vm == dead) {
            return Ok(Step::Keep(None));
        }
        let (amount, count) = record.recover(dead);
        if let Some(policy) = policy {
            let _ = session_alerts(&mut record, policy, None);
        }
        let id = record.session_id.clone();
        Ok(Step::Write(record.encode(), Some((id, amount, count))))
    });
    let Ok(Some((session, amount, count))) = charged else {
        return 0;
    };
    let max_agents = cfg.sessions.max_agents;
    let _ = update(store, &report_slot_key(tenant, slot), |bytes| {
        let mut record = if ReportRecord::encoded_id_is(bytes, &session) {
            ReportRecord::decode(bytes).unwrap_or_else(|_| ReportRecord::new(&session))
        } else {
            ReportRecord::new(&session)
        };
        let mut delta = ReportRecord::new(&session);
        delta.record_recovered(amount, count);
        record.merge(&delta, max_agents, now);
        Ok(Step::Write(record.encode(), ()))
    });
    count
}

/// Applies a VM's exact commits to a session's record; returns the alerts they raise.
pub fn apply_commits(
    r: &mut BudgetRecord,
    cfg: &Config,
    vm: u16,
    commits: &[Commit],
) -> Vec<crate::core::alerts::ScopeAlert> {
    let mut raised = Vec::new();
    for c in commits {
        r.settle(&Release {
            owner: vm,
            budget_agent: c.budget_agent.as_deref(),
            reserved: c.amount,
            count: c.count,
            cost: c.amount,
        });
    }
    for c in commits {
        let Some(policy) = cfg.policies.get(c.policy) else {
            continue;
        };
        let agent = c.budget_agent.as_deref().and_then(|key| {
            policy
                .budget_limit(key)
                .map(|limit| (key, limit, c.agent.as_str()))
        });
        raised.extend(session_alerts(r, policy, agent));
    }
    raised
}

/// Applies a VM's exact commits to a tenant's windows; returns the alerts they raise.
pub fn apply_window_commits(
    record: &mut crate::core::ledger::windows::WindowsRecord,
    policy: &crate::core::policy::Policy,
    vm: u16,
    w: &WindowPending,
) -> Vec<crate::core::alerts::ScopeAlert> {
    record.settle(vm, w.amount, w.count, w.amount);
    window_alerts(record, policy, w.amount > 0)
}

fn decode_u64(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map_or(0, u64::from_le_bytes)
}

/// The error a VM that cannot register gives a priced call.
pub fn unregistered() -> Refusal {
    Refusal::new(
        ErrorCode::InternalError,
        "this VM could not register in the ledger",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_new_sessions_keeps_the_remembered_records_bounded() {
        let mut ledger = LocalLedger::new();
        // 100,000 sessions, 20 a millisecond, with no tick in between.
        for i in 0..100_000u64 {
            ledger.saw(0, &format!("flood-{i}"), None, 1_000 + i / 20);
        }
        let kept: usize = ledger.seen.values().map(HashMap::len).sum();
        assert!(kept <= MAX_SEEN_SESSIONS, "{kept} records kept");
        // The latest ones are still there (the view cache keeps working).
        assert!(ledger
            .seen(0, "flood-99999", 1_000 + 99_999 / 20, 100)
            .is_some());
    }
}
