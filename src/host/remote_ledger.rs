//! The VM's side of the Redis ledger (`ledger.store: redis`) that outlives a stream:
//! reservation ids, the settlements waiting to be sent (a stream may end before its
//! settlement is answered, so the root context sends them on its tick and resends
//! them until Redis says they are applied: they are idempotent by id), and the poll
//! that brings kill switch changes made on other Envoys into this one.

use std::cell::RefCell;
use std::collections::VecDeque;

use hashbrown::HashMap;
use proxy_wasm::types::LogLevel;

use crate::core::alerts::Alert;
use crate::core::compile::Config;
use crate::core::ledger::remote::{self, Fault, Settlement};
use crate::core::ledger::remote_report::{self, Compaction, Push};
use crate::core::ledger::report::ReportRecord;
use crate::core::ledger::sessions;
use crate::host::shared::HostStore;
use crate::host::stream::Dispatch;
use crate::host::{callout, log, metrics, now_millis, outbox};

/// Settlements sent in one script call.
const BATCH: usize = 128;
/// Batches out at once.
const MAX_IN_FLIGHT: usize = 4;
/// How often each VM asks for kill switch changes.
const KILL_POLL_MS: u64 = 200;
/// How far back a VM's first poll applies kill switch changes.
const KILL_MEMORY_MS: u64 = 86_400_000;
/// Settlements held while Redis cannot be reached; beyond, the oldest wait for their
/// reservation's expiry (charged) and are counted as dropped.
const MAX_QUEUED: usize = 100_000;

enum Flight {
    Settle(Vec<Settlement>),
    Report(Vec<Push>),
    /// A long report list read to be compacted: (tenant, session).
    CompactRead(String, String),
    /// A compaction of this list.
    Compact(String),
    Kill(String),
    Kills,
    Load,
    /// A claim of an alert for the cluster (see [`queue_alert_once`]): the alert's body.
    Alert(String),
}

impl Flight {
    /// The report list this flight reads or compacts (one of each at a time per list).
    fn compacting(&self) -> Option<String> {
        match self {
            Flight::CompactRead(tenant, session) => Some(remote::report_key(tenant, session)),
            Flight::Compact(key) => Some(key.clone()),
            _ => None,
        }
    }
}

#[derive(Default)]
struct State {
    nonce: u64,
    counter: u64,
    queue: VecDeque<Settlement>,
    /// Kill switch changes to write (a breaker's `killSession`), as request bodies.
    kills: Vec<String>,
    reports: VecDeque<Push>,
    /// Script requests sent once (compactions, alert claims).
    once: Vec<(String, Flight)>,
    /// Report lists being compacted (one read and one compaction at a time each).
    compacting: hashbrown::HashSet<String>,
    in_flight: HashMap<u32, (String, Flight)>,
    kill_seq: Option<u64>,
    last_poll_ms: u64,
    /// Redis said NOSCRIPT: the next tick loads the script first.
    needs_load: bool,
    /// Sequence numbers of settlements and pushes not yet confirmed by Redis.
    outstanding: std::collections::BTreeSet<u64>,
    last_seq: u64,
    /// A flush request held until everything queued up to `.1` is confirmed.
    hold: Option<(u64, u64)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|s| f(&mut s.borrow_mut()))
}

/// A new reservation id: unique across Envoys, VMs and restarts.
pub fn next_id() -> String {
    with(|s| {
        if s.nonce == 0 {
            let mut raw = [0u8; 8];
            if getrandom::getrandom(&mut raw).is_err() {
                // No randomness: the clock, which still differs between VMs started
                // apart.
                raw = (now_millis() ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes();
            }
            s.nonce = u64::from_le_bytes(raw) | 1;
        }
        s.counter += 1;
        remote::reservation_id(s.nonce, s.counter)
    })
}

/// Queues a settlement (commit or release) for the next tick.
pub fn queue(mut settlement: Settlement) {
    with(|s| {
        if s.queue.len() >= MAX_QUEUED {
            if let Some(dropped) = s.queue.pop_front() {
                s.outstanding.remove(&dropped.seq);
            }
            metrics::add("pag0.ledger.redis_settlements_dropped", 1);
        }
        settlement.seq = s.next_seq();
        s.queue.push_back(settlement);
    });
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.outstanding.insert(self.last_seq);
        self.last_seq
    }
}

/// Settlements to send with a reservation (applied first, in the same script call):
/// one round trip fewer, and the reservation sees this VM's spend. Still outstanding
/// until [`riders_applied`] (or back in the queue by [`requeue`]).
pub fn take_riders(max: usize) -> Vec<Settlement> {
    with(|s| {
        let n = s.queue.len().min(max);
        s.queue.drain(..n).collect()
    })
}

/// Redis applied the riders of a reservation: their alerts go out.
pub fn riders_applied(cfg: &Config, riders: &[Settlement], settled: Option<&serde_json::Value>) {
    if riders.is_empty() {
        return;
    }
    if let Some(answer) = settled {
        settled_alerts(cfg, riders, answer);
    }
    metrics::add("pag0.ledger.redis_settlements", riders.len() as u64);
    confirm(riders.iter().map(|r| r.seq));
}

fn settled_alerts(cfg: &Config, batch: &[Settlement], answer: &serde_json::Value) {
    let (statuses, raised) = remote::read_settle(batch, answer);
    let late = statuses.iter().filter(|s| *s == "late").count();
    if late > 0 {
        metrics::add("pag0.ledger.redis_late_settlements", late as u64);
    }
    let now = now_millis() / 1000;
    let alerts = raised
        .into_iter()
        .filter_map(|(i, alert)| {
            let item = batch.get(i)?;
            Some(Alert {
                tenant: item.tenant.clone(),
                session: item.session.clone(),
                at: now,
                alert,
            })
        })
        .collect();
    outbox::queue_alerts(cfg, alerts);
}

/// A flush request this VM holds: acknowledged once Redis confirms everything queued
/// until now (see [`confirmed_hold`]).
pub fn hold(epoch: u64) {
    with(|s| {
        let upto = s.last_seq;
        s.hold = Some(match s.hold {
            Some((e, u)) if e >= epoch => (e, u),
            _ => (epoch, upto),
        });
    });
}

/// The held flush request whose settlements and counts Redis now has.
pub fn confirmed_hold() -> Option<u64> {
    with(|s| {
        let (epoch, upto) = s.hold?;
        let done = s.outstanding.first().is_none_or(|first| *first > upto);
        if done {
            s.hold = None;
        }
        done.then_some(epoch)
    })
}

fn confirm(seqs: impl Iterator<Item = u64>) {
    with(|s| {
        for seq in seqs {
            s.outstanding.remove(&seq);
        }
    });
}

/// Queues a VM's report counts (from its flush) for Redis's report lists.
pub fn queue_reports(cfg: &Config, reports: Vec<(usize, String, ReportRecord)>, now_secs: u64) {
    for (tenant, session, delta) in reports {
        let tenant = cfg.tenant_id(tenant).to_string();
        let push = Push {
            id: next_id(),
            seq: 0,
            key: remote::report_key(&tenant, &session),
            entry: remote_report::entry(now_secs, &delta),
            tenant,
            session,
        };
        with(|s| {
            if s.reports.len() >= MAX_QUEUED {
                if let Some(dropped) = s.reports.pop_front() {
                    s.outstanding.remove(&dropped.seq);
                }
                metrics::add("pag0.ledger.redis_reports_dropped", 1);
            }
            let mut push = push;
            push.seq = s.next_seq();
            s.reports.push_back(push);
        });
    }
}

/// Requests sent once (compactions, alert claims) held at most; more compactions wait
/// for a later read, more alerts are sent unclaimed.
const MAX_ONCE: usize = 64;

/// Queues a compaction of a report list a reader merged (unless one is under way).
pub fn queue_compaction(c: Compaction) {
    let body = remote_report::compact_body(&c.key, c.n, &c.head, &c.merged);
    queue_once(body, Flight::Compact(c.key));
}

/// Queues a read or compaction of a report list, unless one of its kind is under way
/// or too many wait already.
fn queue_once(body: String, flight: Flight) {
    let Some(key) = flight.compacting() else {
        return;
    };
    with(|s| {
        if s.once.len() < MAX_ONCE && s.compacting.insert(key) {
            s.once.push((body, flight));
        }
    });
}

/// A list's read or compaction is over (answered, or never sent).
fn done_compacting(flight: &Flight) {
    if let Some(key) = flight.compacting() {
        with(|s| s.compacting.remove(&key));
    }
}

/// Queues an alert counted per Envoy (a repeat breaker's trip) to be claimed in Redis
/// first (`claim`, from [`remote::alert_once_body`]): sent if this Envoy's claim is the
/// first, or if Redis cannot say (an alert twice beats an alert lost).
pub fn queue_alert_once(cfg: &Config, claim: String, alert: String) {
    let unqueued = with(|s| {
        if s.once.len() < MAX_ONCE {
            s.once.push((claim, Flight::Alert(alert)));
            None
        } else {
            Some(alert)
        }
    });
    if let Some(alert) = unqueued {
        outbox::queue_alert_json(cfg, alert);
    }
}

/// Queues a kill switch thrown by this VM (a breaker) for Redis, so that every Envoy
/// refuses the session.
pub fn queue_kill(tenant: &str, session: &str, reason: &str) {
    let body = remote::kill_body(tenant, session, true, reason);
    with(|s| s.kills.push(body));
}

/// Gives back a reservation whose outcome pag0 never learned (the reserve timed out,
/// or its stream ended while waiting): Redis ignores it if nothing was reserved, and
/// refuses the reservation if it arrives later.
pub fn release(cfg: &Config, id: &str, tenant: usize, session: &str, agent: &str) {
    queue(Settlement {
        id: id.to_string(),
        seq: 0,
        cost: 0,
        unconfirmed: false,
        tenant: cfg.tenant_id(tenant).to_string(),
        session: session.to_string(),
        agent: agent.to_string(),
        // A release raises no alert: no scopes needed.
        plan: remote::Plan::default(),
    });
}

/// The root context's tick: sends queued settlements and polls kill switch changes.
pub fn on_tick(d: &dyn Dispatch, cfg: &Config) {
    let Some(service) = &cfg.ledger_redis else {
        return;
    };
    let now = now_millis();
    let needs_load =
        with(|s| s.needs_load && !s.in_flight.values().any(|(_, f)| matches!(f, Flight::Load)));
    if needs_load {
        let sent = callout::send_to(
            d,
            service,
            "PUT",
            &remote::load_path(&service.path),
            Some(("text/plain", remote::SCRIPT.as_bytes())),
            service.timeout_ms.max(1000),
        );
        if let Ok(token) = sent {
            with(|s| s.in_flight.insert(token, (String::new(), Flight::Load)));
        }
        return;
    }
    loop {
        let batch = with(|s| {
            let settling = s
                .in_flight
                .values()
                .filter(|(_, f)| matches!(f, Flight::Settle(_)))
                .count();
            if s.queue.is_empty() || settling >= MAX_IN_FLIGHT {
                return None;
            }
            let n = s.queue.len().min(BATCH);
            Some(s.queue.drain(..n).collect::<Vec<_>>())
        });
        let Some(batch) = batch else { break };
        let body = remote::settle_body(&batch);
        match send_script(d, service, &body) {
            Ok((token, tag)) => with(|s| {
                s.in_flight.insert(token, (tag, Flight::Settle(batch)));
            }),
            Err(()) => {
                requeue(batch);
                break;
            }
        }
    }
    loop {
        let batch = with(|s| {
            let out = s
                .in_flight
                .values()
                .filter(|(_, f)| matches!(f, Flight::Report(_)))
                .count();
            if s.reports.is_empty() || out >= MAX_IN_FLIGHT {
                return None;
            }
            let n = s.reports.len().min(BATCH);
            Some(s.reports.drain(..n).collect::<Vec<_>>())
        });
        let Some(batch) = batch else { break };
        match send_script(d, service, &remote_report::report_body(&batch)) {
            Ok((token, tag)) => with(|s| {
                s.in_flight.insert(token, (tag, Flight::Report(batch)));
            }),
            Err(()) => {
                with(|s| {
                    for p in batch.into_iter().rev() {
                        s.reports.push_front(p);
                    }
                });
                break;
            }
        }
    }
    for (body, flight) in with(|s| std::mem::take(&mut s.once)) {
        match send_script(d, service, &body) {
            Ok((token, tag)) => {
                with(|s| s.in_flight.insert(token, (tag, flight)));
            }
            Err(()) => match flight {
                Flight::Alert(alert) => outbox::queue_alert_json(cfg, alert),
                flight => done_compacting(&flight),
            },
        }
    }
    for body in with(|s| std::mem::take(&mut s.kills)) {
        match send_script(d, service, &body) {
            Ok((token, tag)) => with(|s| {
                s.in_flight.insert(token, (tag, Flight::Kill(body)));
            }),
            Err(()) => with(|s| s.kills.push(body)),
        }
    }
    let poll = with(|s| {
        let due = now.saturating_sub(s.last_poll_ms) >= KILL_POLL_MS
            && !s
                .in_flight
                .values()
                .any(|(_, f)| matches!(f, Flight::Kills));
        if due {
            s.last_poll_ms = now;
        }
        due.then_some(s.kill_seq)
    });
    if let Some(since) = poll {
        let body = remote::kills_body(since);
        if let Ok((token, tag)) = send_script(d, service, &body) {
            with(|s| s.in_flight.insert(token, (tag, Flight::Kills)));
        }
    }
}

/// Sends a script request under a new tag; the answer must carry it back.
fn send_script(
    d: &dyn Dispatch,
    service: &crate::core::compile::Service,
    body: &str,
) -> Result<(u32, String), ()> {
    let tag = next_id();
    let body = remote::tagged(body, &tag);
    callout::send_to(
        d,
        service,
        "PUT",
        &remote::eval_path(&service.path),
        Some(("application/json", body.as_bytes())),
        service.timeout_ms,
    )
    .map(|token| (token, tag))
    .map_err(|_| ())
}

/// Puts settlements back at the front of the queue (a failed send).
pub fn requeue(batch: Vec<Settlement>) {
    with(|s| {
        for item in batch.into_iter().rev() {
            s.queue.push_front(item);
        }
    });
}

/// Marks the script as missing (a NOSCRIPT answer): loaded again on the next tick.
pub fn script_missing() {
    with(|s| s.needs_load = true);
}

/// The script's answer to one of this module's calls; a NOSCRIPT answer also marks the
/// script to be loaded again.
fn script_answer(status: Option<u32>, body: &[u8], tag: &str) -> Result<serde_json::Value, Fault> {
    let answer = remote::script_answer(status, body, tag);
    if let Err(Fault::NoScript) = answer {
        script_missing();
    }
    answer
}

/// An answer to a call this module sent; false when the token is not its own.
pub fn on_answer(cfg: &Config, token: u32, body_size: usize) -> bool {
    let Some((tag, flight)) = with(|s| s.in_flight.remove(&token)) else {
        return false;
    };
    let status = callout::status();
    let body = callout::body(body_size);
    done_compacting(&flight);
    match flight {
        Flight::Load => {
            let ok = remote::loaded(&body);
            with(|s| s.needs_load = !ok);
            if !ok {
                log(
                    LogLevel::Warn,
                    "pag0: could not load the ledger script into Redis",
                );
            }
        }
        Flight::Settle(batch) => match script_answer(status, &body, &tag) {
            Ok(answer) => {
                settled_alerts(cfg, &batch, &answer);
                metrics::add("pag0.ledger.redis_settlements", batch.len() as u64);
                confirm(batch.iter().map(|b| b.seq));
            }
            Err(_) => {
                metrics::add("pag0.ledger.redis_failures", 1);
                requeue(batch);
            }
        },
        Flight::Report(batch) => match script_answer(status, &body, &tag) {
            Ok(answer) => {
                confirm(batch.iter().map(|p| p.seq));
                let lengths = remote_report::read_lengths(&answer);
                let now = now_millis() / 1000;
                for (push, n) in batch.iter().zip(lengths) {
                    if n > remote_report::COMPACT_AT {
                        let request = remote_report::read_body(&push.tenant, &push.session, now);
                        queue_once(
                            request,
                            Flight::CompactRead(push.tenant.clone(), push.session.clone()),
                        );
                    }
                }
            }
            Err(_) => {
                metrics::add("pag0.ledger.redis_failures", 1);
                with(|s| {
                    for p in batch.into_iter().rev() {
                        s.reports.push_front(p);
                    }
                });
            }
        },
        Flight::CompactRead(tenant, session) => {
            if let Ok(answer) = remote::script_answer(status, &body, &tag) {
                let now = now_millis() / 1000;
                let (read, _) = remote_report::read_answer(
                    &tenant,
                    &session,
                    &answer,
                    now,
                    cfg.sessions.max_agents,
                );
                if let Some(c) = read.and_then(|r| r.compaction) {
                    queue_compaction(c);
                }
            }
        }
        Flight::Compact(_) => {}
        Flight::Alert(alert) => {
            // Sent when the claim is first, or when Redis cannot say.
            let first = script_answer(status, &body, &tag).map_or(true, |a| remote::read_once(&a));
            if first {
                outbox::queue_alert_json(cfg, alert);
            }
        }
        Flight::Kill(request) => {
            if script_answer(status, &body, &tag).is_err() {
                with(|s| s.kills.push(request));
            }
        }
        Flight::Kills => match script_answer(status, &body, &tag) {
            Err(_) => metrics::add("pag0.ledger.redis_kill_poll_failures", 1),
            Ok(answer) => {
                let (seq, changes) = remote::read_kills(&answer);
                let known = with(|s| s.kill_seq);
                let now_ms = now_millis();
                metrics::add("pag0.ledger.redis_kill_polls", 1);
                // A VM's first poll takes the newest changes of the last day (a kill
                // made while it started, or before a restart); later polls, every
                // change since the last.
                let recent = now_ms.saturating_sub(KILL_MEMORY_MS);
                for change in changes
                    .iter()
                    .filter(|c| known.is_some() || c.at_ms >= recent)
                {
                    apply_kill(
                        cfg,
                        &change.tenant,
                        &change.session,
                        change.on,
                        now_ms / 1000,
                    );
                    metrics::add("pag0.ledger.redis_kills_applied", 1);
                }
                let newest = changes.iter().map(|c| c.seq).max().unwrap_or(0);
                with(|s| {
                    s.kill_seq = Some(match known {
                        // A Redis that lost its data starts the log over.
                        Some(known) if seq < known => seq,
                        Some(known) => newest.max(known),
                        None => seq,
                    });
                });
            }
        },
    }
    true
}

/// A kill switch change made on another Envoy, in force here for free calls and cache
/// hits too (priced calls meet it in Redis).
fn apply_kill(cfg: &Config, tenant: &str, session: &str, on: bool, now: u64) {
    if let Err(e) = sessions::set_killed(&HostStore, tenant, session, &cfg.sessions, now, on, true)
    {
        log(
            LogLevel::Warn,
            &format!(
                "pag0: cannot apply a kill switch change from Redis: {}",
                e.message
            ),
        );
    }
}
