//! Ledger records and their arithmetic: what a session, its agents and a tenant's day
//! and month windows have spent and hold reserved. Pure data: the CAS loop that stores
//! them lives in [`crate::core::store`], the slot table in [`crate::core::sessions`].
//!
//! Invariant kept by every operation: for each scope, `spent + reserved` equals the
//! prices of its committed calls plus those of its calls in flight.

use crate::core::amount::{reaches, Amount};
use crate::core::errors::{BudgetDetails, ErrorCode, Refusal, Scope};
use crate::core::window::{day_index, month_index};

const SESSION_VERSION: u8 = 1;
const TENANT_VERSION: u8 = 1;
const FLAG_KILLED: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentEntry {
    pub id: String,
    pub spent: Amount,
    pub reserved: Amount,
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
                    spent: 0,
                    reserved: 0,
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

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(32 + self.session_id.len() + self.agents.len() * 40);
        w.push(SESSION_VERSION);
        w.push(if self.killed { FLAG_KILLED } else { 0 });
        w.extend_from_slice(&self.last_active.to_le_bytes());
        w.extend_from_slice(&self.spent.to_le_bytes());
        w.extend_from_slice(&self.reserved.to_le_bytes());
        put_str(&mut w, &self.session_id);
        w.extend_from_slice(&(self.agents.len() as u16).to_le_bytes());
        for a in &self.agents {
            put_str(&mut w, &a.id);
            w.extend_from_slice(&a.spent.to_le_bytes());
            w.extend_from_slice(&a.reserved.to_le_bytes());
        }
        w
    }

    /// Empty bytes are a free slot. Anything malformed is an error, never a guess.
    pub fn decode(bytes: &[u8]) -> Result<SessionRecord, DecodeError> {
        if bytes.is_empty() {
            return Ok(SessionRecord::default());
        }
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != SESSION_VERSION {
            return Err(DecodeError);
        }
        let killed = r.u8()? & FLAG_KILLED != 0;
        let last_active = r.u64()?;
        let spent = r.u64()?;
        let reserved = r.u64()?;
        let session_id = r.string()?;
        let count = r.u16()?;
        let mut agents = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            agents.push(AgentEntry {
                id: r.string()?,
                spent: r.u64()?,
                reserved: r.u64()?,
            });
        }
        r.end()?;
        Ok(SessionRecord {
            session_id,
            last_active,
            spent,
            reserved,
            killed,
            agents,
        })
    }
}

/// Spent and reserved of one window (a UTC day or month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowCounter {
    pub index: u32,
    pub spent: Amount,
    pub reserved: Amount,
}

impl WindowCounter {
    /// A new window starts with nothing spent; reservations still in flight move into
    /// it and are charged there when they commit.
    fn roll(&mut self, index: u32) {
        if index > self.index {
            self.index = index;
            self.spent = 0;
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
        let mut w = Vec::with_capacity(41);
        w.push(TENANT_VERSION);
        for c in [self.day, self.month] {
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

fn put_str(w: &mut Vec<u8>, s: &str) {
    // Ids are at most 128 bytes (checked at the edge); clamp anyway so the length
    // byte can never lie.
    let bytes = &s.as_bytes()[..s.len().min(255)];
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
            },
            month: WindowCounter {
                index: 4,
                spent: 5,
                reserved: 6,
            },
        };
        assert_eq!(TenantRecord::decode(&t.encode()).unwrap(), t);
        assert!(TenantRecord::decode(&t.encode()[..40]).is_err());
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
