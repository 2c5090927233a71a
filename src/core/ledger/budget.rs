//! A session's budget record: what a budget check needs and nothing else, so that a
//! priced call reads and writes a few dozen bytes. Reports live in their own record
//! ([`crate::core::ledger::report`]).
//!
//! What is reserved is not a number but a list of **owner entries**: `(vm, agent,
//! amount, count)` for each Envoy VM that holds reservations in flight. The session's
//! `reserved` is their sum. When a VM dies mid-call, another VM finds its entries
//! (see [`crate::core::ledger::owners`]) and settles them by the rule for unknown
//! outcomes: charged, counted as unconfirmed, then no longer reserved.
//!
//! Invariant kept by every operation: for each scope, `spent + reserved` equals the
//! cost of its committed calls plus the reservations of its calls in flight.

use crate::core::amount::{reaches, Amount};
use crate::core::errors::{BudgetDetails, ErrorCode, Refusal, Scope};
use crate::core::ledger::codec::{
    put_len, put_str, put_u16, put_u32, put_u64, DecodeError, Reader,
};

const VERSION: u8 = 3;
const FLAG_KILLED: u8 = 1;
/// Agent index of an owner entry whose call has no agent budget.
pub const NO_AGENT: u8 = u8::MAX;
/// Most agent budgets one record keeps (ids and pooled budgets).
pub const MAX_BUDGET_AGENTS: usize = 254;
/// Most owner entries (VMs × agents with calls in flight).
const MAX_OWNERS: usize = 255;

/// An agent's budget inside the session. `id` is the agent id, or [`POOL`] for the
/// budget all unmatched agents share.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BudgetAgent {
    pub id: String,
    pub spent: Amount,
    /// `ALERT_*` flags already sent for this agent's budget.
    pub alerts: u8,
}

/// The id of the budget shared by agents no pattern matches (`*` is not a valid
/// agent id, so no agent can name itself into it).
pub const POOL: &str = "*";

/// Reservations one VM holds in flight, for one agent budget (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub vm: u16,
    pub agent: u8,
    pub amount: Amount,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BudgetRecord {
    pub session_id: String,
    /// Manual kill switch (`POST …/kill`).
    pub killed: bool,
    /// `ALERT_*` flags already sent for the session budget.
    pub alerts: u8,
    /// Unix seconds of the last reservation or settlement.
    pub last_active: u64,
    pub spent: Amount,
    pub agents: Vec<BudgetAgent>,
    pub owners: Vec<Owner>,
}

/// What one priced call asks of its session.
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    /// The VM that holds the reservation.
    pub owner: u16,
    /// The agent budget this call counts against: its id, [`POOL`], or none.
    pub budget_agent: Option<&'a str>,
    pub agent_limit: Option<Amount>,
    pub price: Amount,
    pub session_limit: Option<Amount>,
    pub kill_ppm: Option<u64>,
    pub max_agents: u16,
}

/// How one reservation (or a batch of them) ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release<'a> {
    pub owner: u16,
    pub budget_agent: Option<&'a str>,
    /// What was reserved, given back in full.
    pub reserved: Amount,
    /// Reservations this settles.
    pub count: u32,
    /// What is charged (may differ from `reserved`: a metered call costs its tokens).
    pub cost: Amount,
}

impl BudgetRecord {
    pub fn new(session_id: &str, now: u64) -> BudgetRecord {
        BudgetRecord {
            session_id: session_id.to_string(),
            last_active: now,
            ..BudgetRecord::default()
        }
    }

    pub fn reserved(&self) -> Amount {
        self.owners
            .iter()
            .fold(0, |sum: Amount, o| sum.saturating_add(o.amount))
    }

    pub fn agent_index(&self, id: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.id == id)
    }

    pub fn agent(&self, id: &str) -> Option<&BudgetAgent> {
        self.agents.iter().find(|a| a.id == id)
    }

    /// What an agent budget holds reserved, over every VM.
    pub fn agent_reserved(&self, id: &str) -> Amount {
        match self.agent_index(id) {
            Some(i) => self
                .owners
                .iter()
                .filter(|o| usize::from(o.agent) == i)
                .fold(0, |sum: Amount, o| sum.saturating_add(o.amount)),
            None => 0,
        }
    }

    /// (spent, reserved) of an agent budget.
    pub fn agent_totals(&self, id: &str) -> (Amount, Amount) {
        (
            self.agent(id).map_or(0, |a| a.spent),
            self.agent_reserved(id),
        )
    }

    /// Reservations held by a VM (every agent).
    pub fn held_by(&self, vm: u16) -> (Amount, u32) {
        self.owners
            .iter()
            .filter(|o| o.vm == vm)
            .fold((0, 0), |(a, c): (Amount, u32), o| {
                (a.saturating_add(o.amount), c.saturating_add(o.count))
            })
    }

    /// The kill switch refuses: manually thrown, or the session's use reached the
    /// threshold.
    pub fn kill_refusal(
        &self,
        session_limit: Option<Amount>,
        kill_ppm: Option<u64>,
        requested: Amount,
    ) -> Option<Refusal> {
        if self.killed {
            return Some(
                Refusal::new(
                    ErrorCode::KillSwitchActive,
                    "the session's kill switch is on",
                )
                .with_fields(vec![("reason", "manual".to_string())]),
            );
        }
        let (limit, ppm) = (session_limit?, kill_ppm?);
        let reserved = self.reserved();
        let used = self.spent.saturating_add(reserved);
        if !reaches(used, limit, ppm) {
            return None;
        }
        Some(
            Refusal::new(
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
                ("reserved", reserved.to_string()),
                ("requested", requested.to_string()),
            ]),
        )
    }

    /// [`BudgetRecord::try_reserve`] for a call that may reserve less than its price,
    /// down to `min_price` (a metered call whose output limit is lowered to fit):
    /// reserves as much of the price as the agent and session budgets leave, and
    /// returns it; refused when not even `min_price` fits.
    pub fn try_reserve_up_to(
        &mut self,
        charge: &Charge,
        min_price: Amount,
    ) -> Result<Amount, Refusal> {
        let room = |limit: Amount, spent: Amount, reserved: Amount| {
            limit.saturating_sub(spent.saturating_add(reserved))
        };
        let mut price = charge.price;
        if let (Some(id), Some(limit)) = (charge.budget_agent, charge.agent_limit) {
            let (spent, reserved) = self.agent_totals(id);
            price = price.min(room(limit, spent, reserved).max(min_price));
        }
        if let Some(limit) = charge.session_limit {
            price = price.min(room(limit, self.spent, self.reserved()).max(min_price));
        }
        self.try_reserve(&Charge {
            price,
            ..charge.clone()
        })?;
        Ok(price)
    }

    /// Reserves the price for the session and the agent budget, or says which rule
    /// refuses. Order: kill switch, agent budget, session budget (most specific first).
    pub fn try_reserve(&mut self, charge: &Charge) -> Result<(), Refusal> {
        if let Some(refusal) =
            self.kill_refusal(charge.session_limit, charge.kill_ppm, charge.price)
        {
            return Err(refusal);
        }
        let agent_index = match charge.budget_agent {
            Some(id) => {
                let index = self.agent_index(id);
                if let Some(limit) = charge.agent_limit {
                    let (spent, reserved) = self.agent_totals(id);
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
                Some(index)
            }
            None => None,
        };
        let reserved = self.reserved();
        if let Some(limit) = charge.session_limit {
            if !fits(self.spent, reserved, charge.price, limit) {
                return Err(Refusal::budget(BudgetDetails {
                    scope: Scope::Session,
                    limit,
                    spent: self.spent,
                    reserved,
                    requested: charge.price,
                }));
            }
        }
        if reserved.checked_add(charge.price).is_none() {
            return Err(Refusal::new(
                ErrorCode::InternalError,
                "ledger amount overflow",
            ));
        }
        let agent = match (agent_index, charge.budget_agent) {
            (Some(Some(i)), _) => i,
            (Some(None), Some(id)) => self.add_agent(id, charge.max_agents)?,
            _ => usize::from(NO_AGENT),
        };
        let agent = u8::try_from(agent).unwrap_or(NO_AGENT);
        match self
            .owners
            .iter_mut()
            .find(|o| o.vm == charge.owner && o.agent == agent)
        {
            Some(o) => {
                o.amount = o.amount.saturating_add(charge.price);
                o.count = o.count.saturating_add(1);
            }
            None => {
                if self.owners.len() >= MAX_OWNERS {
                    return Err(Refusal::new(
                        ErrorCode::CapacityExceeded,
                        "too many Envoy VMs hold reservations in this session",
                    ));
                }
                self.owners.push(Owner {
                    vm: charge.owner,
                    agent,
                    amount: charge.price,
                    count: 1,
                });
            }
        }
        Ok(())
    }

    /// A new agent budget, taking the place of one that never spent and holds nothing
    /// when the list is full.
    fn add_agent(&mut self, id: &str, max_agents: u16) -> Result<usize, Refusal> {
        let limit = usize::from(max_agents).min(MAX_BUDGET_AGENTS);
        if self.agents.len() < limit {
            self.agents.push(BudgetAgent {
                id: id.to_string(),
                ..BudgetAgent::default()
            });
            return Ok(self.agents.len() - 1);
        }
        let idle = (0..self.agents.len()).find(|&i| {
            self.agents[i].spent == 0 && !self.owners.iter().any(|o| usize::from(o.agent) == i)
        });
        match idle {
            Some(i) => {
                self.agents[i] = BudgetAgent {
                    id: id.to_string(),
                    ..BudgetAgent::default()
                };
                Ok(i)
            }
            None => Err(Refusal::new(
                ErrorCode::CapacityExceeded,
                format!(
                    "session already has {} agent budgets, the most sessions.maxAgentsPerSession allows",
                    self.agents.len()
                ),
            )
            .with_fields(vec![("limit", "maxAgentsPerSession".to_string())])),
        }
    }

    /// Ends reservations: gives back what they reserved and charges their cost (which
    /// may be more than was reserved: a metered call is charged what it really cost).
    /// A part of the reservation that is no longer held was charged in full by a
    /// recovery (its VM was taken for dead): that part is not charged again.
    pub fn settle(&mut self, release: &Release) {
        let agent = release
            .budget_agent
            .and_then(|id| self.agent_index(id))
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(NO_AGENT);
        let mut held = 0;
        if let Some(o) = self
            .owners
            .iter_mut()
            .find(|o| o.vm == release.owner && o.agent == agent)
        {
            held = release.reserved.min(o.amount);
            o.amount -= held;
            o.count -= release.count.min(o.count);
        }
        self.owners.retain(|o| o.amount > 0 || o.count > 0);
        let already_charged = release.reserved - held;
        self.charge(agent, release.cost.saturating_sub(already_charged));
    }

    fn charge(&mut self, agent: u8, cost: Amount) {
        self.spent = self.spent.saturating_add(cost);
        if let Some(a) = self.agents.get_mut(usize::from(agent)) {
            a.spent = a.spent.saturating_add(cost);
        }
    }

    /// Settles every reservation a dead VM held, by the rule for unknown outcomes:
    /// charged. Returns what was charged and how many reservations it was.
    pub fn recover(&mut self, vm: u16) -> (Amount, u32) {
        let (dead, live): (Vec<Owner>, Vec<Owner>) = self.owners.iter().partition(|o| o.vm == vm);
        self.owners = live;
        let mut total = (0 as Amount, 0u32);
        for o in dead {
            self.charge(o.agent, o.amount);
            total = (
                total.0.saturating_add(o.amount),
                total.1.saturating_add(o.count),
            );
        }
        total
    }

    /// A slot may be given to another session when this one holds nothing in flight
    /// and either never spent anything (a session whose calls all failed must not
    /// hold a slot against real ones) or has been idle for the timeout.
    pub fn is_claimable(&self, now: u64, idle_timeout: u64) -> bool {
        if self.session_id.is_empty() {
            return true;
        }
        if !self.owners.is_empty() {
            return false;
        }
        let idle = now.saturating_sub(self.last_active) >= idle_timeout;
        idle || (self.spent == 0 && !self.killed)
    }

    /// Rank of a claimable slot: lower is taken first (never used, then sessions that
    /// never spent, then idle ones, oldest first).
    pub fn claim_rank(&self) -> (u8, u64) {
        if self.session_id.is_empty() {
            (0, 0)
        } else if self.spent == 0 && !self.killed {
            (1, self.last_active)
        } else {
            (2, self.last_active)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(
            32 + self.session_id.len() + self.agents.len() * 24 + self.owners.len() * 15,
        );
        w.push(VERSION);
        put_str(&mut w, &self.session_id);
        w.push(if self.killed { FLAG_KILLED } else { 0 });
        w.push(self.alerts);
        put_u64(&mut w, self.last_active);
        put_u64(&mut w, self.spent);
        put_len(&mut w, self.agents.len());
        for a in self.agents.iter().take(255) {
            put_str(&mut w, &a.id);
            w.push(a.alerts);
            put_u64(&mut w, a.spent);
        }
        put_len(&mut w, self.owners.len());
        for o in self.owners.iter().take(255) {
            put_u16(&mut w, o.vm);
            w.push(o.agent);
            put_u64(&mut w, o.amount);
            put_u32(&mut w, o.count);
        }
        w
    }

    /// Whether encoded bytes belong to `session_id`, without decoding the rest (a
    /// lookup probes several slots per call).
    pub fn encoded_id_is(bytes: &[u8], session_id: &str) -> bool {
        bytes.first() == Some(&VERSION)
            && bytes.get(1).map(|len| usize::from(*len)) == Some(session_id.len())
            && bytes.get(2..2 + session_id.len()) == Some(session_id.as_bytes())
    }

    /// Empty bytes are a free slot. Anything malformed is an error, never a guess.
    pub fn decode(bytes: &[u8]) -> Result<BudgetRecord, DecodeError> {
        if bytes.is_empty() {
            return Ok(BudgetRecord::default());
        }
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return Err(DecodeError);
        }
        let session_id = r.string()?;
        let killed = r.u8()? & FLAG_KILLED != 0;
        let alerts = r.u8()?;
        let last_active = r.u64()?;
        let spent = r.u64()?;
        let n = usize::from(r.u8()?);
        let mut agents = Vec::with_capacity(n);
        for _ in 0..n {
            agents.push(BudgetAgent {
                id: r.string()?,
                alerts: r.u8()?,
                spent: r.u64()?,
            });
        }
        let n = usize::from(r.u8()?);
        let mut owners = Vec::with_capacity(n);
        for _ in 0..n {
            owners.push(Owner {
                vm: r.u16()?,
                agent: r.u8()?,
                amount: r.u64()?,
                count: r.u32()?,
            });
        }
        r.end()?;
        Ok(BudgetRecord {
            session_id,
            killed,
            alerts,
            last_active,
            spent,
            agents,
            owners,
        })
    }
}

/// `spent + reserved + price <= limit`, without overflow.
pub fn fits(spent: Amount, reserved: Amount, price: Amount, limit: Amount) -> bool {
    spent
        .checked_add(reserved)
        .and_then(|v| v.checked_add(price))
        .is_some_and(|total| total <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(agent: &str, price: Amount) -> Charge<'_> {
        Charge {
            owner: 1,
            budget_agent: Some(agent),
            agent_limit: Some(3_000_000),
            price,
            session_limit: Some(5_000_000),
            kill_ppm: Some(900_000),
            max_agents: 4,
        }
    }

    fn commit(s: &mut BudgetRecord, agent: &str, price: Amount) {
        s.settle(&Release {
            owner: 1,
            budget_agent: Some(agent),
            reserved: price,
            count: 1,
            cost: price,
        });
    }

    #[test]
    fn ralph_stops_at_its_own_budget_after_twenty_calls() {
        let mut s = BudgetRecord::new("s1", 0);
        let mut ok = 0;
        loop {
            match s.try_reserve(&charge("ralph-1", 150_000)) {
                Ok(()) => {
                    commit(&mut s, "ralph-1", 150_000);
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
        assert_eq!((s.spent, s.reserved()), (3_000_000, 0));
        assert!(s.owners.is_empty());
    }

    #[test]
    fn kill_switch_trips_at_the_threshold() {
        let mut s = BudgetRecord::new("s1", 0);
        let c = Charge {
            budget_agent: None,
            agent_limit: None,
            ..charge("auto-1", 150_000)
        };
        let mut ok = 0;
        while s.try_reserve(&c).is_ok() {
            s.settle(&Release {
                owner: 1,
                budget_agent: None,
                reserved: 150_000,
                count: 1,
                cost: 150_000,
            });
            ok += 1;
        }
        assert_eq!(ok, 30); // 30 × 150000 = 90% of 5M
        assert_eq!(
            s.try_reserve(&c).unwrap_err().code,
            ErrorCode::KillSwitchActive
        );
    }

    #[test]
    fn reservations_in_flight_count_and_belong_to_their_vm() {
        let mut s = BudgetRecord::new("s1", 0);
        let c = Charge {
            agent_limit: None,
            kill_ppm: None,
            ..charge("a", 2_000_000)
        };
        s.try_reserve(&c).unwrap();
        s.try_reserve(&Charge {
            owner: 2,
            ..c.clone()
        })
        .unwrap();
        let r = s.try_reserve(&c).unwrap_err();
        assert_eq!(r.code, ErrorCode::SessionBudgetExceeded);
        assert_eq!(s.reserved(), 4_000_000);
        assert_eq!(s.held_by(2), (2_000_000, 1));
        // VM 2 dies: its reservation is charged, VM 1's stays in flight.
        assert_eq!(s.recover(2), (2_000_000, 1));
        assert_eq!((s.spent, s.reserved()), (2_000_000, 2_000_000));
        assert_eq!(s.agent("a").unwrap().spent, 2_000_000);
        // VM 1's call fails upstream: released, nothing charged.
        s.settle(&Release {
            owner: 1,
            budget_agent: Some("a"),
            reserved: 2_000_000,
            count: 1,
            cost: 0,
        });
        assert_eq!((s.spent, s.reserved()), (2_000_000, 0));
        assert!(s.owners.is_empty());
    }

    #[test]
    fn a_reservation_a_recovery_charged_is_not_charged_again() {
        let mut s = BudgetRecord::new("s1", 0);
        s.try_reserve(&charge("a", 150_000)).unwrap();
        // The VM was taken for dead: its reservation is charged by a recovery...
        assert_eq!(s.recover(1), (150_000, 1));
        // ...then the VM settles the call it still held: nothing more is charged.
        commit(&mut s, "a", 150_000);
        assert_eq!((s.spent, s.reserved()), (150_000, 0));
        // A metered call that cost more than it reserved pays only the difference.
        s.try_reserve(&charge("a", 100)).unwrap();
        s.recover(1);
        s.settle(&Release {
            owner: 1,
            budget_agent: Some("a"),
            reserved: 100,
            count: 1,
            cost: 130,
        });
        assert_eq!(s.spent, 150_130);
    }

    #[test]
    fn a_metered_call_settles_at_its_real_cost() {
        let mut s = BudgetRecord::new("s1", 0);
        s.try_reserve(&charge("a", 100_000)).unwrap();
        s.settle(&Release {
            owner: 1,
            budget_agent: Some("a"),
            reserved: 100_000,
            count: 1,
            cost: 37_123,
        });
        assert_eq!((s.spent, s.reserved()), (37_123, 0));
        assert_eq!(s.agent_totals("a"), (37_123, 0));
    }

    #[test]
    fn agent_refusal_is_named_before_session_refusal() {
        let mut s = BudgetRecord::new("s1", 0);
        s.spent = 5_000_000;
        s.agents.push(BudgetAgent {
            id: "a".into(),
            spent: 3_000_000,
            alerts: 0,
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
    fn agent_budgets_are_bounded_and_idle_ones_make_room() {
        let mut s = BudgetRecord::new("s1", 0);
        for i in 0..4 {
            s.try_reserve(&charge(&format!("a-{i}"), 1)).unwrap();
        }
        assert_eq!(
            s.try_reserve(&charge("a-9", 1)).unwrap_err().code,
            ErrorCode::CapacityExceeded
        );
        // a-0's call failed: it never spent and holds nothing, so a-9 takes its place.
        s.settle(&Release {
            owner: 1,
            budget_agent: Some("a-0"),
            reserved: 1,
            count: 1,
            cost: 0,
        });
        assert!(s.try_reserve(&charge("a-9", 1)).is_ok());
        assert!(s.agent("a-0").is_none());
    }

    #[test]
    fn overflow_is_a_refusal_not_a_wrap() {
        let mut s = BudgetRecord::new("s1", 0);
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
        let mut s = BudgetRecord::new("sess-1", 42);
        s.try_reserve(&Charge {
            kill_ppm: None,
            ..charge("executor-1", 7)
        })
        .unwrap();
        s.try_reserve(&Charge {
            budget_agent: None,
            kill_ppm: None,
            ..charge("x", 9)
        })
        .unwrap();
        s.killed = true;
        s.alerts = 3;
        let bytes = s.encode();
        assert_eq!(BudgetRecord::decode(&bytes).unwrap(), s);
        assert!(BudgetRecord::encoded_id_is(&bytes, "sess-1"));
        assert!(!BudgetRecord::encoded_id_is(&bytes, "sess-2"));
        for cut in 1..bytes.len() {
            assert!(BudgetRecord::decode(&bytes[..cut]).is_err());
        }
        assert!(BudgetRecord::decode(&[9, 9, 9]).is_err());
    }

    #[test]
    fn claimable_when_idle_or_never_spent_and_never_while_in_flight() {
        let mut s = BudgetRecord::new("s", 100);
        // Never spent, nothing in flight: any new session may take the slot.
        assert!(s.is_claimable(101, 60));
        s.try_reserve(&charge("a", 5)).unwrap();
        assert!(!s.is_claimable(100_000, 60));
        commit(&mut s, "a", 5);
        assert!(!s.is_claimable(150, 60));
        assert!(s.is_claimable(160, 60));
        s.killed = true;
        s.spent = 0;
        assert!(!s.is_claimable(150, 60));
        assert!(BudgetRecord::default().is_claimable(0, 60));
    }
}
