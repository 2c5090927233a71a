//! The repeat breaker on the request path: counts the call in shared data (every worker
//! counts in the same bucket) before the cache and the budget see it, so a loop served
//! from the cache is a loop too.

use crate::core::breaker::{self, Verdict};
use crate::core::call::{Call, Caller};
use crate::core::errors::Refusal;
use crate::core::ledger::{remote, sessions};
use crate::core::spend_rate;
use crate::host::shared::HostStore;
use crate::host::stream::Stream;
use proxy_wasm::types::LogLevel;

use crate::host::{log, now_millis, outbox};

/// Whether the call's agent is under a repeat breaker (its body is then read).
pub fn applies(stream: &Stream, caller: &Caller, call: &Call) -> bool {
    stream
        .config
        .policies
        .get(call.policy)
        .and_then(|p| p.repeat_rule(&caller.agent))
        .is_some()
}

/// Counts the call; `Err` when the breaker trips. A warning is kept for the answer.
pub fn check(stream: &Stream, caller: &Caller, call: &Call) -> Result<(), Refusal> {
    let cfg = &stream.config;
    let Some(rule) = cfg
        .policies
        .get(call.policy)
        .and_then(|p| p.repeat_rule(&caller.agent))
        .copied()
    else {
        return Ok(());
    };
    let tenant = cfg.tenant_id(caller.tenant);
    let now_s = now_millis() / 1000;
    let (fingerprint, verdict) = {
        let s = stream.state.borrow();
        let fingerprint =
            breaker::fingerprint(s.method.as_bytes(), &call.endpoint, &s.deferred.body);
        let owner = breaker::owner(tenant, &caller.session, &caller.agent);
        (
            fingerprint,
            breaker::record(&HostStore, &rule, owner, fingerprint, now_s)?,
        )
    };
    match verdict {
        Verdict::Pass => Ok(()),
        Verdict::Warn { count, limit } => {
            stream.state.borrow_mut().loop_warning = Some((count, limit));
            Ok(())
        }
        Verdict::Trip { count, limit } => {
            if count == limit {
                // Once per loop: the call that trips it, not every one refused after.
                let alert = breaker::trip_alert(
                    tenant,
                    &caller.session,
                    &caller.agent,
                    &rule,
                    count,
                    now_s,
                );
                if cfg.ledger_redis.is_some() {
                    // Each Envoy counts the loop and trips on its own: the cluster
                    // alerts once.
                    let claim = remote::alert_once_body(
                        tenant,
                        &caller.session,
                        &caller.agent,
                        fingerprint,
                        rule.window_seconds,
                    );
                    crate::host::remote_ledger::queue_alert_once(cfg, claim, alert);
                } else {
                    outbox::queue_alert_json(cfg, alert);
                }
            }
            if rule.kill_session {
                kill(cfg, tenant, &caller.session, now_s);
            }
            Err(breaker::refusal(&rule, count))
        }
    }
}

/// The Redis ledger refused a call at a spend-rate window's first trip (cluster-wide):
/// its alert goes from here, and a `killSession` Redis already applied holds on this
/// Envoy's free calls and cache hits at once.
pub fn rate_tripped(
    cfg: &crate::core::compile::Config,
    tenant: &str,
    session: &str,
    trip: &crate::core::ledger::remote::RateTrip,
) {
    let now_s = now_millis() / 1000;
    let rule = &trip.rate.rule;
    outbox::queue_alert_json(
        cfg,
        spend_rate::trip_alert(
            tenant,
            session,
            trip.rate.agent.as_deref(),
            rule,
            trip.spent,
            now_s,
        ),
    );
    if rule.kill_session {
        // The session may have made no call on this Envoy yet: its record is created.
        kill_here(cfg, tenant, session, now_s, true);
    }
}

/// A breaker configured with `killSession` turns the session's kill switch on.
fn kill(cfg: &crate::core::compile::Config, tenant: &str, session: &str, now_s: u64) {
    if cfg.ledger_redis.is_some() {
        crate::host::remote_ledger::queue_kill(tenant, session, "breaker");
    }
    kill_here(cfg, tenant, session, now_s, false);
}

/// Turns the switch on in this Envoy's shared data (free calls and cache hits read it).
fn kill_here(
    cfg: &crate::core::compile::Config,
    tenant: &str,
    session: &str,
    now_s: u64,
    create: bool,
) {
    if let Err(e) = sessions::set_killed(
        &HostStore,
        tenant,
        session,
        &cfg.sessions,
        now_s,
        true,
        create,
    ) {
        log(
            LogLevel::Warn,
            &format!("pag0: breaker: could not kill the session: {}", e.message),
        );
    }
}

/// `x-pag0-loop-warning` for an answer whose call came close to the breaker.
pub fn warning_header(stream: &Stream) -> Option<String> {
    stream
        .state
        .borrow()
        .loop_warning
        .map(|(count, limit)| format!("count={count}, limit={limit}"))
}

/// The spend-rate breaker at admission: counts the call's price in the session's and
/// the agent's windows (where the policy sets a rate), or refuses it. What is counted is
/// kept in the stream to give back what the call does not cost.
pub fn count_spend(stream: &Stream, caller: &Caller, call: &Call) -> Result<(), Refusal> {
    let cfg = &stream.config;
    let Some(policy) = cfg.policies.get(call.policy) else {
        return Ok(());
    };
    let agent_rule = policy.agent_rule(&caller.agent).and_then(|r| r.spend_rate);
    if call.price == 0
        || (policy.spend_rate.is_none() && agent_rule.is_none())
        || cfg.ledger_redis.is_some()
    {
        // With the Redis ledger the reserve script counts the rate, for every Envoy.
        return Ok(());
    }
    let tenant = cfg.tenant_id(caller.tenant);
    let now_s = now_millis() / 1000;
    let mut counted = Vec::new();
    let scopes = [
        (policy.spend_rate, None, "session"),
        (agent_rule, Some(caller.agent.as_str()), "agent"),
    ];
    for (rule, agent, scope) in scopes {
        let Some(rule) = rule else { continue };
        let owner = spend_rate::owner(tenant, &caller.session, agent);
        match spend_rate::count(&HostStore, &rule, owner, call.price, now_s, scope) {
            Ok(c) => counted.push(c),
            Err(tripped) => {
                for c in &counted {
                    let _ = spend_rate::give_back(&HostStore, c, 0);
                }
                if tripped.alert && rule.kill_session {
                    kill(cfg, tenant, &caller.session, now_s);
                }
                if tripped.alert {
                    outbox::queue_alert_json(
                        cfg,
                        spend_rate::trip_alert(
                            tenant,
                            &caller.session,
                            agent,
                            &rule,
                            tripped.spent,
                            now_s,
                        ),
                    );
                }
                return Err(tripped.refusal);
            }
        }
    }
    stream.state.borrow_mut().spend_counted = counted;
    Ok(())
}

/// Gives back what was counted above `cost` (all of it for a call refused after).
pub fn settle_spend(stream: &Stream, cost: u64) {
    let counted = std::mem::take(&mut stream.state.borrow_mut().spend_counted);
    for c in &counted {
        if let Err(e) = spend_rate::give_back(&HostStore, c, cost) {
            log(
                LogLevel::Warn,
                &format!("pag0: spend rate: could not give back: {}", e.message),
            );
        }
    }
}

/// The reservation came out lower than the price counted (a metered call's lowered
/// bound): the counts shrink to it.
pub fn lower_spend(stream: &Stream, reserved: u64) {
    let counted = std::mem::take(&mut stream.state.borrow_mut().spend_counted);
    let lowered = counted
        .into_iter()
        .map(|mut c| {
            if reserved < c.amount {
                let _ = spend_rate::give_back(&HostStore, &c, reserved);
                c.amount = reserved;
            }
            c
        })
        .collect();
    stream.state.borrow_mut().spend_counted = lowered;
}

/// Pay mode, before paying: the same resource (method, host and path with its query)
/// paid `x402.repeatBreaker.payments` times in the window, by any agent of the session,
/// is not paid again. Counted in the repeat breaker's buckets.
pub fn check_payment(stream: &Stream, caller: &Caller, call: &Call) -> Result<(), Refusal> {
    let cfg = &stream.config;
    let Some(rule) = cfg.policies.get(call.policy).and_then(|p| p.x402_repeat) else {
        return Ok(());
    };
    let tenant = cfg.tenant_id(caller.tenant);
    let verdict = {
        let s = stream.state.borrow();
        let host = call.endpoint.split('/').next().unwrap_or("");
        let resource = format!("{host}{}", String::from_utf8_lossy(&s.path));
        let fingerprint = breaker::fingerprint(s.method.as_bytes(), &resource, b"");
        // The session as a whole: an agent id cannot hold a NUL byte.
        let owner = breaker::owner(tenant, &caller.session, "\u{0}x402");
        breaker::record(&HostStore, &rule, owner, fingerprint, now_millis() / 1000)?
    };
    match verdict {
        Verdict::Trip { count, .. } => Err(breaker::payment_refusal(&rule, count)),
        _ => Ok(()),
    }
}
