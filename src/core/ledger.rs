//! Ledger records and their arithmetic: what a session, its agents and a tenant's day
//! and month windows have spent and hold reserved. Pure data: the CAS loop that stores
//! them lives in [`crate::core::store`], the slot table in [`crate::core::sessions`].
//!
//! Invariant kept by every operation: for each scope, `spent + reserved` equals the
//! prices of its committed calls plus those of its calls in flight.

use crate::core::amount::{reaches, Amount};
use crate::core::errors::{BudgetDetails, ErrorCode, Refusal, Scope};
use crate::core::window::{day_index, month_index};

const SESSION_VERSION: u8 = 2;
/// Tools and endpoint labels kept per session; more fold into `other`.
pub const MAX_LABELS: usize = 32;
/// Recent refusals kept per session, newest last.
pub const MAX_RECENT_REFUSALS: usize = 10;
/// Alert flags: each alert goes out once per scope (per window for day and month).
pub const ALERT_THRESHOLD: u8 = 1;
pub const ALERT_EXHAUSTED: u8 = 2;
pub const ALERT_KILL: u8 = 4;
const TENANT_VERSION: u8 = 2;
const FLAG_KILLED: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentEntry {
    pub id: String,
    pub spent: Amount,
    pub reserved: Amount,
    pub requests: u64,
    pub cache_hits: u64,
    pub savings: Amount,
    /// `ALERT_*` flags already sent for this agent's budget.
    pub alerts: u8,
}

/// Requests, cost and cache use under one label (a tool or an endpoint pattern).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tally {
    pub name: String,
    pub requests: u64,
    pub cost: Amount,
    pub cache_hits: u64,
    pub savings: Amount,
}

/// A refusal, for the dashboard's "recent refusals".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecentRefusal {
    pub at: u64,
    pub agent: String,
    pub code: String,
}

/// What one finished call adds to the session's report.
#[derive(Debug, Clone, Copy)]
pub struct CallStats<'a> {
    pub agent: &'a str,
    pub tool: Option<&'a str>,
    pub endpoint: &'a str,
    pub cost: Amount,
    pub cache_hit: bool,
    pub savings: Amount,
}

/// One session's ledger, stored in one slot of its tenant's session table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    pub session_id: String,
    /// Unix seconds of the last reservation or settlement.
    pub last_active: u64,
    pub spent: Amount,
    pub reserved: Amount,
    /// Manual kill switch (`POST …/kill`).
    pub killed: bool,
    pub agents: Vec<AgentEntry>,
    /// Calls counted for the report: every identified call, refused ones included.
    pub requests: u64,
    pub cache_hits: u64,
    pub savings: Amount,
    /// `ALERT_*` flags already sent for the session budget.
    pub alerts: u8,
    /// Payments whose outcome is unknown (sent, no answer): kept charged.
    pub unconfirmed: u64,
    pub unconfirmed_amount: Amount,
    pub tools: Vec<Tally>,
    pub endpoints: Vec<Tally>,
    /// Refusals by code.
    pub refusals: Vec<(String, u64)>,
    pub recent_refusals: Vec<RecentRefusal>,
}

/// What one priced call asks of its session.
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    pub agent: &'a str,
    pub price: Amount,
    pub session_limit: Option<Amount>,
    pub agent_limit: Option<Amount>,
    pub kill_ppm: Option<u64>,
    pub max_agents: u16,
}

impl SessionRecord {
    pub fn new(session_id: &str, now: u64) -> SessionRecord {
        SessionRecord {
            session_id: session_id.to_string(),
            last_active: now,
            ..SessionRecord::default()
        }
    }

    pub fn agent(&self, id: &str) -> Option<&AgentEntry> {
        self.agents.iter().find(|a| a.id == id)
    }

    /// Reserves the price for the session and the agent, or says which rule refuses.
    /// Order: kill switch, then agent budget, then session budget (most specific first).
    pub fn try_reserve(&mut self, charge: &Charge) -> Result<(), Refusal> {
        if self.killed {
            return Err(Refusal::new(
                ErrorCode::KillSwitchActive,
                "the session's kill switch is on",
            )
            .with_fields(vec![("reason", "manual".to_string())]));
        }
        if let (Some(limit), Some(ppm)) = (charge.session_limit, charge.kill_ppm) {
            let used = self.spent.saturating_add(self.reserved);
            if reaches(used, limit, ppm) {
                return Err(Refusal::new(
                    ErrorCode::KillSwitchActive,
                    format!(
                        "session has used {used} of {limit}, at or past its kill switch threshold {}",
                        ppm as f64 / 1_000_000.0
                    ),
                )
                .with_fields(vec![
                    ("reason", "threshold".to_string()),
                    ("scope", "session".to_string()),
                    ("limit", limit.to_string()),
                    ("spent", self.spent.to_string()),
                    ("reserved", self.reserved.to_string()),
                    ("requested", charge.price.to_string()),
                ]));
            }
        }
        let index = self.agents.iter().position(|a| a.id == charge.agent);
        if let Some(limit) = charge.agent_limit {
            let (spent, reserved) = index
                .and_then(|i| self.agents.get(i))
                .map_or((0, 0), |a| (a.spent, a.reserved));
            if !fits(spent, reserved, charge.price, limit) {
                return Err(Refusal::budget(BudgetDetails {
                    scope: Scope::Agent,
                    limit,
                    spent,
                    reserved,
                    requested: charge.price,
                }));
            }
        }
        if let Some(limit) = charge.session_limit {
            if !fits(self.spent, self.reserved, charge.price, limit) {
                return Err(Refusal::budget(BudgetDetails {
                    scope: Scope::Session,
                    limit,
                    spent: self.spent,
                    reserved: self.reserved,
                    requested: charge.price,
                }));
            }
        }
        let over = |_| Refusal::new(ErrorCode::InternalError, "ledger amount overflow");
        let session_reserved = self
            .reserved
            .checked_add(charge.price)
            .ok_or(())
            .map_err(over)?;
        let agent = match index {
            Some(i) => self.agents.get_mut(i),
            None => {
                if self.agents.len() >= usize::from(charge.max_agents) {
                    return Err(Refusal::new(
                        ErrorCode::CapacityExceeded,
                        format!(
                            "session already has {} agents, the most sessions.maxAgentsPerSession allows",
                            self.agents.len()
                        ),
                    )
                    .with_fields(vec![("limit", "maxAgentsPerSession".to_string())]));
                }
                self.agents.push(AgentEntry {
                    id: charge.agent.to_string(),
                    ..AgentEntry::default()
                });
                self.agents.last_mut()
            }
        };
        let Some(agent) = agent else {
            return Err(Refusal::new(
                ErrorCode::InternalError,
                "agent entry vanished",
            ));
        };
        agent.reserved = agent
            .reserved
            .checked_add(charge.price)
            .ok_or(())
            .map_err(over)?;
        self.reserved = session_reserved;
        Ok(())
    }

    /// Turns a reservation into spend (`commit`) or gives it back.
    pub fn settle(&mut self, agent: &str, price: Amount, commit: bool) {
        settle_pair(&mut self.spent, &mut self.reserved, price, commit);
        if let Some(a) = self.agents.iter_mut().find(|a| a.id == agent) {
            settle_pair(&mut a.spent, &mut a.reserved, price, commit);
        }
    }

    /// A slot may be given to another session once this one has been idle for the
    /// timeout and holds no reservation. A reservation left behind by a crashed worker
    /// stops holding the slot after another hour.
    pub fn is_claimable(&self, now: u64, idle_timeout: u64) -> bool {
        if self.session_id.is_empty() {
            return true;
        }
        let idle = now.saturating_sub(self.last_active);
        idle >= idle_timeout && (self.reserved == 0 || idle >= idle_timeout.saturating_add(3600))
    }

    /// Counts a finished call: totals, its agent, tool and endpoint. The agent entry is
    /// created if needed (up to `max_agents`; beyond, only the totals count).
    pub fn record_call(&mut self, call: &CallStats, max_agents: u16) {
        self.requests = self.requests.saturating_add(1);
        if call.cache_hit {
            self.cache_hits = self.cache_hits.saturating_add(1);
            self.savings = self.savings.saturating_add(call.savings);
        }
        if let Some(agent) = self.agent_entry(call.agent, max_agents) {
            agent.requests = agent.requests.saturating_add(1);
            if call.cache_hit {
                agent.cache_hits = agent.cache_hits.saturating_add(1);
                agent.savings = agent.savings.saturating_add(call.savings);
            }
        }
        for (list, name) in [
            (&mut self.tools, call.tool.unwrap_or("other")),
            (&mut self.endpoints, call.endpoint),
        ] {
            let tally = label_entry(list, name);
            tally.requests = tally.requests.saturating_add(1);
            tally.cost = tally.cost.saturating_add(call.cost);
            if call.cache_hit {
                tally.cache_hits = tally.cache_hits.saturating_add(1);
                tally.savings = tally.savings.saturating_add(call.savings);
            }
        }
    }

    /// Counts a refused call.
    pub fn record_refusal(&mut self, agent: &str, code: &str, now: u64) {
        self.requests = self.requests.saturating_add(1);
        if let Some(entry) = self.agents.iter_mut().find(|a| a.id == agent) {
            entry.requests = entry.requests.saturating_add(1);
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

    fn agent_entry(&mut self, id: &str, max_agents: u16) -> Option<&mut AgentEntry> {
        if let Some(i) = self.agents.iter().position(|a| a.id == id) {
            return self.agents.get_mut(i);
        }
        if self.agents.len() >= usize::from(max_agents) {
            return None;
        }
        self.agents.push(AgentEntry {
            id: id.to_string(),
            ..AgentEntry::default()
        });
        self.agents.last_mut()
    }

    pub fn agent_mut(&mut self, id: &str) -> Option<&mut AgentEntry> {
        self.agents.iter_mut().find(|a| a.id == id)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(96 + self.session_id.len() + self.agents.len() * 64);
        w.push(SESSION_VERSION);
        w.push(if self.killed { FLAG_KILLED } else { 0 });
        w.push(self.alerts);
        for v in [
            self.last_active,
            self.spent,
            self.reserved,
            self.requests,
            self.cache_hits,
            self.savings,
            self.unconfirmed,
            self.unconfirmed_amount,
        ] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        put_str(&mut w, &self.session_id);
        w.extend_from_slice(&(self.agents.len() as u16).to_le_bytes());
        for a in &self.agents {
            put_str(&mut w, &a.id);
            w.push(a.alerts);
            for v in [a.spent, a.reserved, a.requests, a.cache_hits, a.savings] {
                w.extend_from_slice(&v.to_le_bytes());
            }
        }
        for list in [&self.tools, &self.endpoints] {
            w.push(list.len() as u8);
            for t in list {
                put_str(&mut w, &t.name);
                for v in [t.requests, t.cost, t.cache_hits, t.savings] {
                    w.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        w.push(self.refusals.len() as u8);
        for (code, n) in &self.refusals {
            put_str(&mut w, code);
            w.extend_from_slice(&n.to_le_bytes());
        }
        w.push(self.recent_refusals.len() as u8);
        for r in &self.recent_refusals {
            w.extend_from_slice(&r.at.to_le_bytes());
            put_str(&mut w, &r.agent);
            put_str(&mut w, &r.code);
        }
        w
    }

    /// Empty bytes are a free slot. Anything malformed is an error, never a guess.
    /// Whether encoded record bytes belong to `session_id`, without decoding the rest
    /// (a lookup probes several slots per call).
    pub fn encoded_id_is(bytes: &[u8], session_id: &str) -> bool {
        // version, flags, alerts, then eight u64 counters, then the id (u8 length).
        const ID_AT: usize = 3 + 8 * 8;
        bytes.first() == Some(&SESSION_VERSION)
            && bytes.get(ID_AT).map(|len| usize::from(*len)) == Some(session_id.len())
            && bytes.get(ID_AT + 1..ID_AT + 1 + session_id.len()) == Some(session_id.as_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Result<SessionRecord, DecodeError> {
        if bytes.is_empty() {
            return Ok(SessionRecord::default());
        }
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != SESSION_VERSION {
            return Err(DecodeError);
        }
        let killed = r.u8()? & FLAG_KILLED != 0;
        let alerts = r.u8()?;
        let mut rec = SessionRecord {
            killed,
            alerts,
            last_active: r.u64()?,
            spent: r.u64()?,
            reserved: r.u64()?,
            requests: r.u64()?,
            cache_hits: r.u64()?,
            savings: r.u64()?,
            unconfirmed: r.u64()?,
            unconfirmed_amount: r.u64()?,
            session_id: r.string()?,
            ..SessionRecord::default()
        };
        for _ in 0..r.u16()? {
            rec.agents.push(AgentEntry {
                id: r.string()?,
                alerts: r.u8()?,
                spent: r.u64()?,
                reserved: r.u64()?,
                requests: r.u64()?,
                cache_hits: r.u64()?,
                savings: r.u64()?,
            });
        }
        for which in 0..2 {
            let mut list = Vec::new();
            for _ in 0..r.u8()? {
                list.push(Tally {
                    name: r.string()?,
                    requests: r.u64()?,
                    cost: r.u64()?,
                    cache_hits: r.u64()?,
                    savings: r.u64()?,
                });
            }
            if which == 0 {
                rec.tools = list;
            } else {
                rec.endpoints = list;
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
        r.end()?;
        Ok(rec)
    }
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

/// Spent and reserved of one window (a UTC day or month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowCounter {
    pub index: u32,
    pub spent: Amount,
    pub reserved: Amount,
    /// `ALERT_*` flags already sent in this window.
    pub alerts: u8,
}

impl WindowCounter {
    /// A new window starts with nothing spent; reservations still in flight move into
    /// it and are charged there when they commit.
    fn roll(&mut self, index: u32) {
        if index > self.index {
            self.index = index;
            self.spent = 0;
            self.alerts = 0;
        }
    }
}

/// A tenant's day and month windows, in one record so both are reserved at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantRecord {
    pub day: WindowCounter,
    pub month: WindowCounter,
}

impl TenantRecord {
    pub fn roll(&mut self, now: u64) {
        self.day.roll(day_index(now));
        self.month.roll(month_index(now));
    }

    /// Reserves in both windows, or names the narrower one that refuses.
    pub fn try_reserve(
        &mut self,
        price: Amount,
        daily: Option<Amount>,
        monthly: Option<Amount>,
    ) -> Result<(), Refusal> {
        for (scope, limit, counter) in [
            (Scope::Daily, daily, self.day),
            (Scope::Monthly, monthly, self.month),
        ] {
            if let Some(limit) = limit {
                if !fits(counter.spent, counter.reserved, price, limit) {
                    return Err(Refusal::budget(BudgetDetails {
                        scope,
                        limit,
                        spent: counter.spent,
                        reserved: counter.reserved,
                        requested: price,
                    }));
                }
            }
        }
        let day = self.day.reserved.checked_add(price);
        let month = self.month.reserved.checked_add(price);
        match (day, month) {
            (Some(d), Some(m)) => {
                self.day.reserved = d;
                self.month.reserved = m;
                Ok(())
            }
            _ => Err(Refusal::new(
                ErrorCode::InternalError,
                "ledger amount overflow",
            )),
        }
    }

    pub fn settle(&mut self, price: Amount, commit: bool) {
        settle_pair(&mut self.day.spent, &mut self.day.reserved, price, commit);
        settle_pair(
            &mut self.month.spent,
            &mut self.month.reserved,
            price,
            commit,
        );
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(43);
        w.push(TENANT_VERSION);
        for c in [self.day, self.month] {
            w.push(c.alerts);
            w.extend_from_slice(&c.index.to_le_bytes());
            w.extend_from_slice(&c.spent.to_le_bytes());
            w.extend_from_slice(&c.reserved.to_le_bytes());
        }
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<TenantRecord, DecodeError> {
        if bytes.is_empty() {
            return Ok(TenantRecord::default());
        }
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != TENANT_VERSION {
            return Err(DecodeError);
        }
        let mut counter = || -> Result<WindowCounter, DecodeError> {
            Ok(WindowCounter {
                alerts: r.u8()?,
                index: r.u32()?,
                spent: r.u64()?,
                reserved: r.u64()?,
            })
        };
        let day = counter()?;
        let month = counter()?;
        r.end()?;
        Ok(TenantRecord { day, month })
    }
}

/// `spent + reserved + price <= limit`, without overflow.
fn fits(spent: Amount, reserved: Amount, price: Amount, limit: Amount) -> bool {
    spent
        .checked_add(reserved)
        .and_then(|v| v.checked_add(price))
        .is_some_and(|total| total <= limit)
}

fn settle_pair(spent: &mut Amount, reserved: &mut Amount, price: Amount, commit: bool) {
    // A settlement never exceeds what was reserved: the caller holds the reservation.
    let amount = price.min(*reserved);
    *reserved -= amount;
    if commit {
        *spent = spent.saturating_add(amount);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

/// The longest string a record stores; longer labels are cut (on a character boundary).
pub const MAX_STORED_STR: usize = 255;

/// `s` cut to at most `max` bytes without splitting a character.
pub fn clamp_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    let bytes = clamp_str(s, MAX_STORED_STR).as_bytes();
    w.push(bytes.len() as u8);
    w.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError)?;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError)?;
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError)
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(DecodeError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(agent: &str, price: Amount) -> Charge<'_> {
        Charge {
            agent,
            price,
            session_limit: Some(5_000_000),
            agent_limit: Some(3_000_000),
            kill_ppm: Some(900_000),
            max_agents: 4,
        }
    }

    #[test]
    fn ralph_stops_at_its_own_budget_after_twenty_calls() {
        let mut s = SessionRecord::new("s1", 0);
        let mut ok = 0;
        loop {
            match s.try_reserve(&charge("ralph-1", 150_000)) {
                Ok(()) => {
                    s.settle("ralph-1", 150_000, true);
                    ok += 1;
                }
                Err(r) => {
                    assert_eq!(r.code, ErrorCode::AgentBudgetExceeded);
                    break;
                }
            }
        }
        assert_eq!(ok, 20);
        assert_eq!(s.agent("ralph-1").unwrap().spent, 3_000_000);
        assert_eq!(s.spent, 3_000_000);
    }

    #[test]
    fn kill_switch_trips_at_the_threshold() {
        let mut s = SessionRecord::new("s1", 0);
        let c = Charge {
            agent_limit: None,
            ..charge("auto-1", 150_000)
        };
        let mut ok = 0;
        while s.try_reserve(&c).is_ok() {
            s.settle("auto-1", 150_000, true);
            ok += 1;
        }
        // 30 × 150000 = 4.5M = 90% of 5M.
        assert_eq!(ok, 30);
        assert_eq!(
            s.try_reserve(&c).unwrap_err().code,
            ErrorCode::KillSwitchActive
        );
    }

    #[test]
    fn session_budget_counts_reservations_in_flight() {
        let mut s = SessionRecord::new("s1", 0);
        let c = Charge {
            agent_limit: None,
            kill_ppm: None,
            ..charge("a", 2_000_000)
        };
        assert!(s.try_reserve(&c).is_ok());
        assert!(s.try_reserve(&c).is_ok());
        let r = s.try_reserve(&c).unwrap_err();
        assert_eq!(r.code, ErrorCode::SessionBudgetExceeded);
        assert_eq!(s.reserved, 4_000_000);
        s.settle("a", 2_000_000, false);
        assert_eq!((s.spent, s.reserved), (0, 2_000_000));
        assert!(s.try_reserve(&c).is_ok());
    }

    #[test]
    fn agent_refusal_is_named_before_session_refusal() {
        let mut s = SessionRecord::new("s1", 0);
        s.spent = 5_000_000;
        s.agents.push(AgentEntry {
            id: "a".into(),
            spent: 3_000_000,
            reserved: 0,
            ..AgentEntry::default()
        });
        let c = Charge {
            kill_ppm: None,
            ..charge("a", 1)
        };
        assert_eq!(
            s.try_reserve(&c).unwrap_err().code,
            ErrorCode::AgentBudgetExceeded
        );
    }

    #[test]
    fn agents_per_session_are_bounded() {
        let mut s = SessionRecord::new("s1", 0);
        for i in 0..4 {
            s.try_reserve(&charge(&format!("a-{i}"), 1)).unwrap();
        }
        assert_eq!(
            s.try_reserve(&charge("a-9", 1)).unwrap_err().code,
            ErrorCode::CapacityExceeded
        );
        assert!(s.try_reserve(&charge("a-1", 1)).is_ok());
    }

    #[test]
    fn overflow_is_a_refusal_not_a_wrap() {
        let mut s = SessionRecord::new("s1", 0);
        s.spent = u64::MAX - 1;
        let c = Charge {
            session_limit: Some(u64::MAX),
            agent_limit: None,
            kill_ppm: None,
            ..charge("a", 5)
        };
        assert_eq!(
            s.try_reserve(&c).unwrap_err().code,
            ErrorCode::SessionBudgetExceeded
        );
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let mut s = SessionRecord::new("sess-1", 42);
        s.killed = true;
        s.try_reserve(&Charge {
            kill_ppm: None,
            ..charge("executor-1", 7)
        })
        .ok();
        s.killed = true;
        let bytes = s.encode();
        assert_eq!(SessionRecord::decode(&bytes).unwrap(), s);
        for cut in 1..bytes.len() {
            assert!(SessionRecord::decode(&bytes[..cut]).is_err());
        }
        assert!(SessionRecord::decode(&[9, 9, 9]).is_err());
        let t = TenantRecord {
            day: WindowCounter {
                index: 1,
                spent: 2,
                reserved: 3,
                alerts: 1,
            },
            month: WindowCounter {
                index: 4,
                spent: 5,
                reserved: 6,
                alerts: 0,
            },
        };
        assert_eq!(TenantRecord::decode(&t.encode()).unwrap(), t);
        assert!(TenantRecord::decode(&t.encode()[..40]).is_err());
        let mut s = SessionRecord::new("s", 1);
        s.record_call(
            &CallStats {
                agent: "a",
                tool: Some("search"),
                endpoint: "e/x",
                cost: 5,
                cache_hit: true,
                savings: 5,
            },
            4,
        );
        s.record_refusal("a", "AGENT_BUDGET_EXCEEDED", 9);
        let bytes = s.encode();
        assert_eq!(SessionRecord::decode(&bytes).unwrap(), s);
        for cut in 1..bytes.len() {
            assert!(SessionRecord::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn long_labels_are_cut_on_a_character_boundary_and_counted_once() {
        let label = format!("{}é", "a".repeat(254));
        let long_ascii = "x".repeat(300);
        let mut s = SessionRecord::new("s", 1);
        for _ in 0..3 {
            for endpoint in [label.as_str(), long_ascii.as_str()] {
                let call = CallStats {
                    agent: "a",
                    tool: None,
                    endpoint,
                    cost: 1,
                    cache_hit: false,
                    savings: 0,
                };
                s.record_call(&call, 4);
                s = SessionRecord::decode(&s.encode()).unwrap();
            }
        }
        assert_eq!(s.endpoints.len(), 2);
        assert!(s.endpoints.iter().all(|t| t.requests == 3));
    }

    #[test]
    fn day_window_rolls_over_keeping_reservations_in_flight() {
        let mut t = TenantRecord::default();
        let day1 = 1_796_040_000; // 2026-11-30 12:00 UTC
        t.roll(day1);
        t.try_reserve(100, Some(1000), Some(5000)).unwrap();
        t.settle(100, true);
        t.try_reserve(50, Some(1000), Some(5000)).unwrap();
        assert_eq!((t.day.spent, t.day.reserved), (100, 50));
        t.roll(day1 + 86_400); // next day, next month
        assert_eq!((t.day.spent, t.day.reserved), (0, 50));
        assert_eq!((t.month.spent, t.month.reserved), (0, 50));
        t.settle(50, true);
        assert_eq!(t.day.spent, 50);
        // A worker whose clock is a moment behind never rolls a window back.
        t.roll(day1);
        assert_eq!(t.day.spent, 50);
    }

    #[test]
    fn daily_is_named_before_monthly() {
        let mut t = TenantRecord::default();
        t.day.spent = 1000;
        t.month.spent = 5000;
        assert_eq!(
            t.try_reserve(1, Some(1000), Some(5000)).unwrap_err().code,
            ErrorCode::DailyBudgetExceeded
        );
        assert_eq!(
            t.try_reserve(1, None, Some(5000)).unwrap_err().code,
            ErrorCode::MonthlyBudgetExceeded
        );
    }

    #[test]
    fn claimable_after_idle_and_without_reservations() {
        let mut s = SessionRecord::new("s", 100);
        assert!(!s.is_claimable(150, 60));
        assert!(s.is_claimable(160, 60));
        s.reserved = 1;
        assert!(!s.is_claimable(160, 60));
        assert!(s.is_claimable(160 + 3600, 60));
        assert!(SessionRecord::default().is_claimable(0, 60));
    }
}
