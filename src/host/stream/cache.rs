//! The shared cache, on the stream: look the call up (serve a hit, wait for an
//! identical call in flight, or claim the key and go upstream, asking the second
//! level first), and on the way back decide whether the answer is stored, copy it as
//! it passes (never holding it back) and store it at its end.

use proxy_wasm::types::LogLevel;

use crate::core::cache::{self, AnswerFacts, Entry, EntryState, Found, KeyParts};
use crate::core::call::{Call, Caller};
use crate::core::firewall;
use crate::core::ledger;
use crate::host::metrics;
use crate::host::outbox::{self, Kind, Outgoing};
use crate::host::reply::send_local;
use crate::host::shared::HostStore;
use crate::host::stream::budget::{metric_ids, refuse, set_state};
use crate::host::stream::state::{CacheFill, Pending};
use crate::host::stream::{callout_failed, gate, waiters, Dispatch, Step, Stream};
use crate::host::{callout, log, now_millis, vm};

pub enum Lookup {
    /// Answered from the cache, or waiting: the gate is done for now.
    Done(Step),
    /// A miss: reserve and go upstream (this stream fills the entry if it claimed it).
    GoUpstream,
}

fn key_of(stream: &Stream, caller: &Caller, call: &Call) -> Option<String> {
    let cfg = stream.config.cache.as_ref()?;
    let s = stream.state.borrow();
    let req = s.cache.as_ref()?;
    let tenant = stream.config.tenant_id(caller.tenant);
    let private = firewall::private_cache(&stream.config, caller, call);
    let namespace = cfg.namespace(&caller.session, &caller.agent, private);
    let credentials: Vec<&[u8]> = req.credentials.iter().map(Vec::as_slice).collect();
    Some(cache::cache_key(&KeyParts {
        tenant,
        namespace: &namespace,
        method: &s.method,
        authority: &req.authority,
        endpoint: &call.endpoint,
        query: &req.query,
        content_type: &req.content_type,
        accept: &req.accept,
        accept_encoding: &req.accept_encoding,
        credentials: &credentials,
        body: &s.deferred.body,
    }))
}

pub fn lookup(d: &dyn Dispatch, stream: &Stream, caller: &Caller, call: &Call) -> Lookup {
    let (Some(cfg), Some(key)) = (stream.config.cache.as_ref(), key_of(stream, caller, call))
    else {
        return Lookup::GoUpstream;
    };
    let ttl = stream.state.borrow().cache.as_ref().map_or(0, |c| c.ttl);
    let now = now_millis();
    match cache::find_or_claim(&HostStore, cfg, &key, now) {
        Ok(Found::Hit(entry)) => Lookup::Done(serve_hit(stream, caller, call, &entry)),
        // A call that needs approval asks for it itself rather than wait.
        Ok(Found::Pending(_)) if firewall::approval_for(&stream.config, call).is_some() => {
            Lookup::GoUpstream
        }
        Ok(Found::Pending(slot)) => {
            waiters::wait_for_answer(
                stream.clone(),
                slot,
                key,
                now.saturating_add(cfg.coalesce_wait_ms),
            );
            Lookup::Done(Step::Pause)
        }
        Ok(Found::Claimed(slot)) => {
            let level2 = cfg.level2.clone();
            stream.state.borrow_mut().fill = Some(CacheFill {
                slot,
                key: key.clone(),
                ttl,
                storing: None,
                body: Vec::new(),
                cost: 0,
            });
            let Some(level2) = level2 else {
                return Lookup::GoUpstream;
            };
            let path = cache::level2_get_path(&key);
            match callout::send(
                d,
                &level2.cluster,
                "GET",
                &path,
                "pag0-cache",
                None,
                level2.timeout_ms,
            ) {
                Ok(token) => {
                    d.wait_for(stream, token, Pending::CacheLevel2);
                    Lookup::Done(Step::Pause)
                }
                Err(status) => {
                    metrics::add("pag0.cache.l2_failures", 1);
                    log(
                        LogLevel::Debug,
                        &format!("pag0: second-level cache unreachable: {status:?}"),
                    );
                    Lookup::GoUpstream
                }
            }
        }
        Err(e) => {
            // The cache is an optimisation: on trouble, go upstream uncached.
            log(
                LogLevel::Warn,
                &format!("pag0: cache lookup failed: {}", e.message),
            );
            Lookup::GoUpstream
        }
    }
}

/// Answers from the cache: free, nothing reserved, the saving counted; unless the
/// session's kill switch is on (a kill stops everything the session does).
pub fn serve_hit(stream: &Stream, caller: &Caller, call: &Call, entry: &Entry) -> Step {
    let cfg = &stream.config;
    let now_ms = now_millis();
    let seen =
        vm::with(|vm| ledger::seen_view(cfg, &HostStore, &mut vm.ledger, caller, call, now_ms));
    let (view, killed) = match seen {
        Ok(found) => found,
        Err(e) => {
            log(
                LogLevel::Warn,
                &format!("pag0: budgets unreadable for a cache hit: {}", e.message),
            );
            Default::default()
        }
    };
    if let Some(refusal) = killed {
        refuse(stream, caller, call, &refusal, &view);
        return Step::Pause;
    }
    vm::with(|vm| ledger::record_hit(&mut vm.ledger, cfg, caller, call, entry.cost, now_ms));
    metrics::call(&metric_ids(stream, caller, call), 0, true, entry.cost);
    stream.state.borrow_mut().answered = true;
    set_state(stream, "pag0_cost", "0");
    set_state(stream, "pag0_cached", "true");
    let age = entry.age_secs(now_ms).to_string();
    let remaining = view.remaining_header();
    let alert = view.alert_header();
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("x-pag0-cost", b"0"),
        ("x-pag0-cached", b"true"),
        ("x-pag0-cache-age", age.as_bytes()),
    ];
    if !entry.content_type.is_empty() {
        headers.push(("content-type", entry.content_type.as_bytes()));
    }
    if !entry.content_encoding.is_empty() {
        headers.push(("content-encoding", entry.content_encoding.as_bytes()));
    }
    if !remaining.is_empty() {
        headers.push(("x-pag0-budget-remaining", remaining.as_bytes()));
    }
    if let Some(alert) = &alert {
        headers.push(("x-pag0-budget-alert", alert.as_bytes()));
    }
    let warning = crate::host::stream::breaker::warning_header(stream);
    if let Some(warning) = &warning {
        headers.push(("x-pag0-loop-warning", warning.as_bytes()));
    }
    send_local(u32::from(entry.status), &headers, &entry.body);
    Step::Pause
}

/// The second level's answer to a lookup: serve it (filling level 1), or go upstream.
pub fn on_level2_answer(d: &dyn Dispatch, stream: &Stream, body_size: usize) -> Step {
    let status = callout::status();
    let slot_key = stream
        .state
        .borrow()
        .fill
        .as_ref()
        .map(|f| (f.slot, f.key.clone()));
    let mut found = None;
    if callout::succeeded(status) {
        if let Some((slot, key)) = &slot_key {
            found = cache::level2_entry(&callout::body(body_size), key, now_millis())
                .map(|e| (*slot, e));
        }
    } else {
        callout_failed("pag0.cache.l2_failures");
    }
    let (caller, call) = {
        let s = stream.state.borrow();
        (s.caller.clone(), s.call.clone())
    };
    match (found, caller, call) {
        (Some((slot, entry)), Some(caller), Some(call)) => {
            metrics::add("pag0.cache.l2_hits", 1);
            let _ = cache::fill(&HostStore, slot, &entry);
            stream.state.borrow_mut().fill = None;
            serve_hit(stream, &caller, &call, &entry)
        }
        _ => gate::go_upstream(d, stream),
    }
}

/// Gives up this stream's claim (the answer is not stored): waiters stop waiting.
pub fn abandon_fill(stream: &Stream) {
    if let Some(fill) = stream.state.borrow_mut().fill.take() {
        let _ = cache::abandon(&HostStore, fill.slot, &fill.key);
    }
}

/// On the answer's headers: whether it is stored (RFC 9111 rules, size), for how long.
pub fn decide(
    stream: &Stream,
    facts: &AnswerFacts,
    content_length: Option<usize>,
    encoding: String,
    cost: u64,
) {
    if stream.state.borrow().fill.is_none() {
        return;
    }
    let max = stream
        .config
        .cache
        .as_ref()
        .map_or(0, |c| c.max_entry_bytes as usize);
    let length_ok = content_length.is_none_or(|l| l <= max);
    match cache::storable(facts) {
        Ok(max_age) if length_ok => {
            let mut s = stream.state.borrow_mut();
            if let Some(fill) = s.fill.as_mut() {
                if let Some(age) = max_age {
                    fill.ttl = fill.ttl.min(age);
                }
                fill.cost = cost;
                fill.storing = Some((
                    facts.status as u16,
                    facts.content_type.unwrap_or("").to_string(),
                    encoding,
                ));
            }
        }
        _ => abandon_fill(stream),
    }
}

/// A chunk of an answer being stored, as it passes; stored at the end.
pub fn copy(stream: &Stream, chunk: &[u8], end_of_stream: bool) {
    let max = stream
        .config
        .cache
        .as_ref()
        .map_or(0, |c| c.max_entry_bytes as usize);
    let too_big = {
        let mut s = stream.state.borrow_mut();
        let Some(fill) = s.fill.as_mut() else { return };
        if fill.storing.is_none() {
            return;
        }
        fill.body.extend_from_slice(chunk);
        fill.body.len() > max
    };
    if too_big {
        abandon_fill(stream);
        return;
    }
    if end_of_stream {
        store(stream);
    }
}

/// Stores the answer this stream fetched (and queues it for the second level).
pub fn store(stream: &Stream) {
    let Some(fill) = stream.state.borrow_mut().fill.take() else {
        return;
    };
    let Some((status, content_type, content_encoding)) = fill.storing else {
        let _ = cache::abandon(&HostStore, fill.slot, &fill.key);
        return;
    };
    let entry = Entry {
        key: fill.key,
        state: EntryState::Filled,
        stored_ms: now_millis(),
        ttl_secs: fill.ttl,
        status,
        cost: fill.cost,
        content_type,
        content_encoding,
        body: fill.body,
    };
    if let Err(e) = cache::fill(&HostStore, fill.slot, &entry) {
        log(
            LogLevel::Warn,
            &format!("pag0: could not fill the cache: {}", e.message),
        );
    }
    if let Some(level2) = stream.config.cache.as_ref().and_then(|c| c.level2.as_ref()) {
        outbox::queue(Outgoing {
            kind: Kind::CacheWrite,
            cluster: level2.cluster.clone(),
            method: "PUT",
            path: cache::level2_set_path(&entry.key, entry.ttl_secs),
            authority: "pag0-cache".to_string(),
            content_type: "text/plain",
            body: cache::level2_value(&entry),
            timeout_ms: level2.timeout_ms,
        });
    }
}
