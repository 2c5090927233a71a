//! A session's report record: the counts reports need (requests, cache hits and
//! savings, spend and tokens by agent, tool, endpoint and model, refusals, how each
//! agent stopped, spend over time). Nothing here is read by a budget check, so it is
//! written only when a VM flushes what it counted (see
//! [`crate::core::ledger::pending`]), one compare-and-swap per session per flush.
//!
//! A [`ReportRecord`] is also the shape of what a VM has counted and not yet flushed:
//! [`ReportRecord::merge`] adds one into another.

use crate::core::amount::Amount;
use crate::core::ledger::codec::{
    clamp_str, put_len, put_str, put_u64, DecodeError, Reader, MAX_STORED_STR,
};

const VERSION: u8 = 3;
/// Tools, endpoint labels and models kept per session; more fold into `other`.
pub const MAX_LABELS: usize = 32;
/// Recent refusals kept per session, newest last.
pub const MAX_RECENT_REFUSALS: usize = 10;
/// Points kept for the spend-over-time chart; older ones are thinned out.
pub const MAX_TIMELINE: usize = 240;

/// Token counts of metered LLM calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_write: u64,
    pub cache_read: u64,
}

impl Tokens {
    pub fn add(&mut self, other: &Tokens) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cache_write = self.cache_write.saturating_add(other.cache_write);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
    }

    fn encode(&self, w: &mut Vec<u8>) {
        for v in [self.input, self.output, self.cache_write, self.cache_read] {
            put_u64(w, v);
        }
    }

    fn decode(r: &mut Reader) -> Result<Tokens, DecodeError> {
        Ok(Tokens {
            input: r.u64()?,
            output: r.u64()?,
            cache_write: r.u64()?,
            cache_read: r.u64()?,
        })
    }
}

/// Requests, cost and cache use under one label (a tool, an endpoint, a model).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tally {
    pub name: String,
    pub requests: u64,
    pub cost: Amount,
    pub cache_hits: u64,
    pub savings: Amount,
    pub tokens: Tokens,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests = self.requests.saturating_add(other.requests);
        self.cost = self.cost.saturating_add(other.cost);
        self.cache_hits = self.cache_hits.saturating_add(other.cache_hits);
        self.savings = self.savings.saturating_add(other.savings);
        self.tokens.add(&other.tokens);
    }
}

/// How an agent stopped: its first refusal after its last successful call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stop {
    pub code: String,
    /// Unix milliseconds of that first refusal (the report shows seconds).
    pub at: u64,
    /// Successful calls before it.
    pub calls: u64,
    /// Calls refused since, the first one included.
    pub refused_since: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentStats {
    pub id: String,
    /// The agent that started this one (Claude Code's parent agent header), if known.
    pub parent: Option<String>,
    pub requests: u64,
    pub cache_hits: u64,
    pub savings: Amount,
    pub cost: Amount,
    pub tokens: Tokens,
    /// Calls that went through (upstream or from the cache).
    pub ok_calls: u64,
    /// Unix milliseconds of the last of them: workers' counts merge in any order, and
    /// only a refusal after it says how the agent stopped.
    pub last_ok_ms: u64,
    pub stop: Option<Stop>,
}

/// A refusal, for the dashboard's "recent refusals".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecentRefusal {
    pub at: u64,
    pub agent: String,
    pub code: String,
}

/// One point of the spend-over-time chart: an agent's cumulative cost at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimePoint {
    pub at: u64,
    /// Index into `agents`.
    pub agent: u8,
    pub cost: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReportRecord {
    pub session_id: String,
    /// Calls counted for the report: every identified call, refused ones included.
    pub requests: u64,
    pub cache_hits: u64,
    pub savings: Amount,
    pub cost: Amount,
    /// Payments (or reservations of a VM that died) whose outcome is unknown: charged.
    pub unconfirmed: u64,
    pub unconfirmed_amount: Amount,
    /// Metered calls whose usage never came (stream cut): charged their reservation.
    pub unmetered: u64,
    pub unmetered_amount: Amount,
    pub tokens: Tokens,
    pub agents: Vec<AgentStats>,
    pub tools: Vec<Tally>,
    pub endpoints: Vec<Tally>,
    pub models: Vec<Tally>,
    /// Refusals by code.
    pub refusals: Vec<(String, u64)>,
    pub recent_refusals: Vec<RecentRefusal>,
    pub timeline: Vec<TimePoint>,
}

/// What one finished call adds to its session's report.
#[derive(Debug, Clone, Copy)]
pub struct CallStats<'a> {
    pub agent: &'a str,
    pub parent: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub endpoint: &'a str,
    pub model: Option<&'a str>,
    pub cost: Amount,
    pub cache_hit: bool,
    pub savings: Amount,
    pub tokens: Option<Tokens>,
    pub unconfirmed: bool,
    pub unmetered: bool,
    /// Unix milliseconds when the call went through.
    pub at_ms: u64,
}

impl ReportRecord {
    pub fn new(session_id: &str) -> ReportRecord {
        ReportRecord {
            session_id: session_id.to_string(),
            ..ReportRecord::default()
        }
    }

    pub fn agent(&self, id: &str) -> Option<&AgentStats> {
        self.agents.iter().find(|a| a.id == id)
    }

    /// Counts a call that went through (upstream or from the cache).
    pub fn record_call(&mut self, call: &CallStats, max_agents: u16) {
        self.requests = self.requests.saturating_add(1);
        self.cost = self.cost.saturating_add(call.cost);
        if call.cache_hit {
            self.cache_hits = self.cache_hits.saturating_add(1);
            self.savings = self.savings.saturating_add(call.savings);
        }
        if call.unconfirmed {
            self.unconfirmed = self.unconfirmed.saturating_add(1);
            self.unconfirmed_amount = self.unconfirmed_amount.saturating_add(call.cost);
        }
        if call.unmetered {
            self.unmetered = self.unmetered.saturating_add(1);
            self.unmetered_amount = self.unmetered_amount.saturating_add(call.cost);
        }
        if let Some(t) = &call.tokens {
            self.tokens.add(t);
        }
        if let Some(agent) = agent_entry(&mut self.agents, call.agent, max_agents) {
            agent.requests = agent.requests.saturating_add(1);
            agent.cost = agent.cost.saturating_add(call.cost);
            agent.ok_calls = agent.ok_calls.saturating_add(1);
            agent.last_ok_ms = agent.last_ok_ms.max(call.at_ms);
            // A tie (same millisecond) goes to the refusal, as in `merge`.
            if agent.stop.as_ref().is_some_and(|s| s.at < call.at_ms) {
                agent.stop = None;
            }
            if agent.parent.is_none() {
                agent.parent = call.parent.map(str::to_string);
            }
            if call.cache_hit {
                agent.cache_hits = agent.cache_hits.saturating_add(1);
                agent.savings = agent.savings.saturating_add(call.savings);
            }
            if let Some(t) = &call.tokens {
                agent.tokens.add(t);
            }
        }
        let tally = Tally {
            name: String::new(),
            requests: 1,
            cost: call.cost,
            cache_hits: u64::from(call.cache_hit),
            savings: if call.cache_hit { call.savings } else { 0 },
            tokens: call.tokens.unwrap_or_default(),
        };
        label_entry(&mut self.tools, call.tool.unwrap_or("other")).add(&tally);
        label_entry(&mut self.endpoints, call.endpoint).add(&tally);
        if let Some(model) = call.model {
            label_entry(&mut self.models, model).add(&tally);
        }
    }

    /// Counts a refused call (`now_ms`: Unix milliseconds).
    pub fn record_refusal(
        &mut self,
        agent: &str,
        parent: Option<&str>,
        code: &str,
        now_ms: u64,
        max_agents: u16,
    ) {
        let now = now_ms / 1000;
        self.requests = self.requests.saturating_add(1);
        if let Some(entry) = agent_entry(&mut self.agents, agent, max_agents) {
            entry.requests = entry.requests.saturating_add(1);
            if entry.parent.is_none() {
                entry.parent = parent.map(str::to_string);
            }
            let calls = entry.ok_calls;
            match &mut entry.stop {
                Some(stop) => stop.refused_since = stop.refused_since.saturating_add(1),
                None => {
                    entry.stop = Some(Stop {
                        code: code.to_string(),
                        at: now_ms,
                        calls,
                        refused_since: 1,
                    })
                }
            }
        }
        match self.refusals.iter_mut().find(|(c, _)| c == code) {
            Some((_, n)) => *n = n.saturating_add(1),
            None => self.refusals.push((code.to_string(), 1)),
        }
        if self.recent_refusals.len() >= MAX_RECENT_REFUSALS {
            self.recent_refusals.remove(0);
        }
        self.recent_refusals.push(RecentRefusal {
            at: now,
            agent: agent.to_string(),
            code: code.to_string(),
        });
    }

    /// Adds a delta counted elsewhere (a VM's pending counts) into this record. The
    /// delta's agents' costs become a point of the spend-over-time chart at `now`.
    pub fn merge(&mut self, delta: &ReportRecord, max_agents: u16, now: u64) {
        self.requests = self.requests.saturating_add(delta.requests);
        self.cache_hits = self.cache_hits.saturating_add(delta.cache_hits);
        self.savings = self.savings.saturating_add(delta.savings);
        self.cost = self.cost.saturating_add(delta.cost);
        self.unconfirmed = self.unconfirmed.saturating_add(delta.unconfirmed);
        self.unconfirmed_amount = self
            .unconfirmed_amount
            .saturating_add(delta.unconfirmed_amount);
        self.unmetered = self.unmetered.saturating_add(delta.unmetered);
        self.unmetered_amount = self.unmetered_amount.saturating_add(delta.unmetered_amount);
        self.tokens.add(&delta.tokens);
        for d in &delta.agents {
            let Some(a) = agent_entry(&mut self.agents, &d.id, max_agents) else {
                continue;
            };
            a.requests = a.requests.saturating_add(d.requests);
            a.cache_hits = a.cache_hits.saturating_add(d.cache_hits);
            a.savings = a.savings.saturating_add(d.savings);
            a.cost = a.cost.saturating_add(d.cost);
            a.tokens.add(&d.tokens);
            if a.parent.is_none() {
                a.parent = d.parent.clone();
            }
            // Workers' counts come in any order: a stop holds only if its first
            // refusal came after the last call that went through, on any worker. Then
            // every call that went through came before it.
            a.ok_calls = a.ok_calls.saturating_add(d.ok_calls);
            a.last_ok_ms = a.last_ok_ms.max(d.last_ok_ms);
            let last_ok = a.last_ok_ms;
            let stops: Vec<Stop> = [a.stop.take(), d.stop.clone()]
                .into_iter()
                .flatten()
                .filter(|s| s.at >= last_ok)
                .collect();
            a.stop = stops.iter().min_by_key(|s| s.at).map(|first| Stop {
                calls: a.ok_calls,
                refused_since: stops
                    .iter()
                    .map(|s| s.refused_since)
                    .fold(0, u64::saturating_add),
                ..first.clone()
            });
        }
        for (mine, theirs) in [
            (&mut self.tools, &delta.tools),
            (&mut self.endpoints, &delta.endpoints),
            (&mut self.models, &delta.models),
        ] {
            for t in theirs {
                label_entry(mine, &t.name).add(t);
            }
        }
        for (code, n) in &delta.refusals {
            match self.refusals.iter_mut().find(|(c, _)| c == code) {
                Some((_, m)) => *m = m.saturating_add(*n),
                None => self.refusals.push((code.clone(), *n)),
            }
        }
        for r in &delta.recent_refusals {
            if self.recent_refusals.len() >= MAX_RECENT_REFUSALS {
                self.recent_refusals.remove(0);
            }
            self.recent_refusals.push(r.clone());
        }
        for d in delta.agents.iter().filter(|d| d.cost > 0) {
            if let Some(i) = self.agents.iter().position(|a| a.id == d.id) {
                let cost = self.agents[i].cost;
                self.push_point(TimePoint {
                    at: now,
                    agent: u8::try_from(i).unwrap_or(u8::MAX),
                    cost,
                });
            }
        }
    }

    /// Charges reservations of a VM that died (the rule for unknown outcomes).
    pub fn record_recovered(&mut self, amount: Amount, count: u32) {
        self.cost = self.cost.saturating_add(amount);
        self.unconfirmed = self.unconfirmed.saturating_add(u64::from(count));
        self.unconfirmed_amount = self.unconfirmed_amount.saturating_add(amount);
    }

    fn push_point(&mut self, point: TimePoint) {
        if let Some(last) = self.timeline.last_mut() {
            if last.at == point.at && last.agent == point.agent {
                last.cost = point.cost;
                return;
            }
        }
        if self.timeline.len() >= MAX_TIMELINE {
            // Thin the older half: keep every other point.
            let half = MAX_TIMELINE / 2;
            let mut kept: Vec<TimePoint> =
                self.timeline[..half].iter().step_by(2).copied().collect();
            kept.extend_from_slice(&self.timeline[half..]);
            self.timeline = kept;
        }
        self.timeline.push(point);
    }

    pub fn is_empty_delta(&self) -> bool {
        self.requests == 0 && self.cost == 0 && self.unconfirmed == 0 && self.agents.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(256 + self.agents.len() * 96);
        w.push(VERSION);
        put_str(&mut w, &self.session_id);
        for v in [
            self.requests,
            self.cache_hits,
            self.savings,
            self.cost,
            self.unconfirmed,
            self.unconfirmed_amount,
            self.unmetered,
            self.unmetered_amount,
        ] {
            put_u64(&mut w, v);
        }
        self.tokens.encode(&mut w);
        put_len(&mut w, self.agents.len());
        for a in self.agents.iter().take(255) {
            put_str(&mut w, &a.id);
            match &a.parent {
                Some(p) => {
                    w.push(1);
                    put_str(&mut w, p);
                }
                None => w.push(0),
            }
            for v in [
                a.requests,
                a.cache_hits,
                a.savings,
                a.cost,
                a.ok_calls,
                a.last_ok_ms,
            ] {
                put_u64(&mut w, v);
            }
            a.tokens.encode(&mut w);
            match &a.stop {
                Some(s) => {
                    w.push(1);
                    put_str(&mut w, &s.code);
                    put_u64(&mut w, s.at);
                    put_u64(&mut w, s.calls);
                    put_u64(&mut w, s.refused_since);
                }
                None => w.push(0),
            }
        }
        for list in [&self.tools, &self.endpoints, &self.models] {
            put_len(&mut w, list.len());
            for t in list.iter().take(255) {
                put_str(&mut w, &t.name);
                for v in [t.requests, t.cost, t.cache_hits, t.savings] {
                    put_u64(&mut w, v);
                }
                t.tokens.encode(&mut w);
            }
        }
        put_len(&mut w, self.refusals.len());
        for (code, n) in self.refusals.iter().take(255) {
            put_str(&mut w, code);
            put_u64(&mut w, *n);
        }
        put_len(&mut w, self.recent_refusals.len());
        for r in self.recent_refusals.iter().take(255) {
            put_u64(&mut w, r.at);
            put_str(&mut w, &r.agent);
            put_str(&mut w, &r.code);
        }
        put_len(&mut w, self.timeline.len());
        for p in self.timeline.iter().take(255) {
            put_u64(&mut w, p.at);
            w.push(p.agent);
            put_u64(&mut w, p.cost);
        }
        w
    }

    pub fn encoded_id_is(bytes: &[u8], session_id: &str) -> bool {
        bytes.first() == Some(&VERSION)
            && bytes.get(1).map(|len| usize::from(*len)) == Some(session_id.len())
            && bytes.get(2..2 + session_id.len()) == Some(session_id.as_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Result<ReportRecord, DecodeError> {
        if bytes.is_empty() {
            return Ok(ReportRecord::default());
        }
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return Err(DecodeError);
        }
        let mut rec = ReportRecord {
            session_id: r.string()?,
            requests: r.u64()?,
            cache_hits: r.u64()?,
            savings: r.u64()?,
            cost: r.u64()?,
            unconfirmed: r.u64()?,
            unconfirmed_amount: r.u64()?,
            unmetered: r.u64()?,
            unmetered_amount: r.u64()?,
            tokens: Tokens::decode(&mut r)?,
            ..ReportRecord::default()
        };
        for _ in 0..r.u8()? {
            let id = r.string()?;
            let parent = match r.u8()? {
                0 => None,
                1 => Some(r.string()?),
                _ => return Err(DecodeError),
            };
            let mut a = AgentStats {
                id,
                parent,
                requests: r.u64()?,
                cache_hits: r.u64()?,
                savings: r.u64()?,
                cost: r.u64()?,
                ok_calls: r.u64()?,
                last_ok_ms: r.u64()?,
                tokens: Tokens::decode(&mut r)?,
                ..AgentStats::default()
            };
            a.stop = match r.u8()? {
                0 => None,
                1 => Some(Stop {
                    code: r.string()?,
                    at: r.u64()?,
                    calls: r.u64()?,
                    refused_since: r.u64()?,
                }),
                _ => return Err(DecodeError),
            };
            rec.agents.push(a);
        }
        for which in 0..3 {
            let mut list = Vec::new();
            for _ in 0..r.u8()? {
                list.push(Tally {
                    name: r.string()?,
                    requests: r.u64()?,
                    cost: r.u64()?,
                    cache_hits: r.u64()?,
                    savings: r.u64()?,
                    tokens: Tokens::decode(&mut r)?,
                });
            }
            match which {
                0 => rec.tools = list,
                1 => rec.endpoints = list,
                _ => rec.models = list,
            }
        }
        for _ in 0..r.u8()? {
            rec.refusals.push((r.string()?, r.u64()?));
        }
        for _ in 0..r.u8()? {
            rec.recent_refusals.push(RecentRefusal {
                at: r.u64()?,
                agent: r.string()?,
                code: r.string()?,
            });
        }
        for _ in 0..r.u8()? {
            rec.timeline.push(TimePoint {
                at: r.u64()?,
                agent: r.u8()?,
                cost: r.u64()?,
            });
        }
        r.end()?;
        Ok(rec)
    }
}

fn agent_entry<'a>(
    agents: &'a mut Vec<AgentStats>,
    id: &str,
    max_agents: u16,
) -> Option<&'a mut AgentStats> {
    if let Some(i) = agents.iter().position(|a| a.id == id) {
        return agents.get_mut(i);
    }
    if agents.len() >= usize::from(max_agents).min(255) {
        return None;
    }
    agents.push(AgentStats {
        id: id.to_string(),
        ..AgentStats::default()
    });
    agents.last_mut()
}

/// The tally for a label, created if there is room; past [`MAX_LABELS`], `other`.
fn label_entry<'a>(list: &'a mut Vec<Tally>, name: &str) -> &'a mut Tally {
    // Compare as stored, so a long label stays one tally after a round trip.
    let name = clamp_str(name, MAX_STORED_STR);
    let wanted = if list.iter().any(|t| t.name == name) || list.len() < MAX_LABELS - 1 {
        name
    } else {
        "other"
    };
    let index = match list.iter().position(|t| t.name == wanted) {
        Some(i) => i,
        None => {
            list.push(Tally {
                name: wanted.to_string(),
                ..Tally::default()
            });
            list.len() - 1
        }
    };
    &mut list[index]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(agent: &'a str, cost: Amount) -> CallStats<'a> {
        CallStats {
            agent,
            parent: None,
            tool: Some("llm"),
            endpoint: "api.openai.com/v1/chat/completions",
            model: None,
            cost,
            cache_hit: false,
            savings: 0,
            tokens: None,
            unconfirmed: false,
            unmetered: false,
            at_ms: 1,
        }
    }

    fn call_at<'a>(agent: &'a str, cost: Amount, at_ms: u64) -> CallStats<'a> {
        CallStats {
            at_ms,
            ..call(agent, cost)
        }
    }

    #[test]
    fn ralph_stops_after_twenty_calls_and_two_refusals() {
        // Counted on two VMs, merged in flush order.
        let mut vm1 = ReportRecord::new("s");
        let mut vm2 = ReportRecord::new("s");
        for i in 0..20 {
            let vm = if i % 2 == 0 { &mut vm1 } else { &mut vm2 };
            vm.record_call(&call_at("ralph-1", 150_000, i + 1), 8);
        }
        vm2.record_refusal("ralph-1", None, "AGENT_BUDGET_EXCEEDED", 99, 8);
        let mut vm1b = ReportRecord::new("s");
        vm1b.record_refusal("ralph-1", None, "AGENT_BUDGET_EXCEEDED", 100, 8);
        let mut stored = ReportRecord::new("s");
        stored.merge(&vm1, 8, 1);
        stored.merge(&vm2, 8, 1);
        stored.merge(&vm1b, 8, 2);
        let ralph = stored.agent("ralph-1").unwrap();
        assert_eq!(ralph.cost, 3_000_000);
        assert_eq!(ralph.requests, 22);
        assert_eq!(
            ralph.stop,
            Some(Stop {
                code: "AGENT_BUDGET_EXCEEDED".into(),
                at: 99,
                calls: 20,
                refused_since: 2
            })
        );
        assert_eq!(stored.requests, 22);
        assert_eq!(
            stored.refusals,
            vec![("AGENT_BUDGET_EXCEEDED".to_string(), 2)]
        );
    }

    #[test]
    fn a_call_after_a_refusal_means_the_agent_did_not_stop() {
        let mut stored = ReportRecord::new("s");
        let mut d = ReportRecord::new("s");
        d.record_refusal("reviewer-1", None, "ENDPOINT_NOT_ALLOWED", 5, 8);
        stored.merge(&d, 8, 5);
        assert!(stored.agent("reviewer-1").unwrap().stop.is_some());
        let mut d = ReportRecord::new("s");
        d.record_call(&call_at("reviewer-1", 1, 6), 8);
        stored.merge(&d, 8, 6);
        assert!(stored.agent("reviewer-1").unwrap().stop.is_none());
    }

    #[test]
    fn workers_counts_merged_in_any_order_keep_the_stop_that_came_last() {
        // VM 1: four calls go through at 10..13 ms; VM 2: refusals at 20 and 21 ms.
        let mut vm1 = ReportRecord::new("s");
        for at in 10..14 {
            vm1.record_call(&call_at("looper-1", 1, at), 8);
        }
        let mut vm2 = ReportRecord::new("s");
        vm2.record_refusal("looper-1", None, "LOOP_DETECTED", 20, 8);
        vm2.record_refusal("looper-1", None, "LOOP_DETECTED", 21, 8);
        let want = Some(Stop {
            code: "LOOP_DETECTED".into(),
            at: 20,
            calls: 4,
            refused_since: 2,
        });
        for order in [[&vm1, &vm2], [&vm2, &vm1]] {
            let mut stored = ReportRecord::new("s");
            for d in order {
                stored.merge(d, 8, 1);
            }
            assert_eq!(stored.agent("looper-1").unwrap().stop, want);
        }
        // A call after the refusals, from either worker, means it did not stop there.
        let mut vm3 = ReportRecord::new("s");
        vm3.record_call(&call_at("looper-1", 1, 30), 8);
        let mut stored = ReportRecord::new("s");
        for d in [&vm2, &vm3, &vm1] {
            stored.merge(d, 8, 1);
        }
        assert_eq!(stored.agent("looper-1").unwrap().stop, None);
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let mut s = ReportRecord::new("sess");
        let mut c = call("executor-1", 7);
        c.model = Some("claude-sonnet-4-5");
        c.parent = Some("main");
        c.tokens = Some(Tokens {
            input: 1,
            output: 2,
            cache_write: 3,
            cache_read: 4,
        });
        s.record_call(&c, 8);
        s.record_refusal("x-1", None, "SESSION_BUDGET_EXCEEDED", 9, 8);
        let mut stored = ReportRecord::new("sess");
        stored.merge(&s, 8, 10);
        let bytes = stored.encode();
        assert_eq!(ReportRecord::decode(&bytes).unwrap(), stored);
        assert!(ReportRecord::encoded_id_is(&bytes, "sess"));
        for cut in 1..bytes.len() {
            assert!(ReportRecord::decode(&bytes[..cut]).is_err());
        }
        assert_eq!(stored.timeline.len(), 1);
    }

    #[test]
    fn labels_and_the_timeline_stay_bounded() {
        let mut s = ReportRecord::new("s");
        for i in 0..100 {
            let endpoint = format!("e{i}");
            let mut c = call("a-1", 1);
            c.endpoint = &endpoint;
            let mut d = ReportRecord::new("s");
            d.record_call(&c, 8);
            s.merge(&d, 8, i);
        }
        assert_eq!(s.endpoints.len(), MAX_LABELS);
        assert!(s.timeline.len() <= MAX_TIMELINE);
        assert_eq!(s.timeline.last().unwrap().cost, 100);
        let bytes = s.encode();
        assert_eq!(ReportRecord::decode(&bytes).unwrap(), s);
    }
}
