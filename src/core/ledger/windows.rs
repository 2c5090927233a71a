//! A tenant's day and month windows, in one record so that both are reserved with one
//! compare-and-swap. Like a session's record, what is reserved is a list of owner
//! entries, one per VM with calls in flight, so that a dead VM's reservations can be
//! found and settled.

use crate::core::amount::Amount;
use crate::core::errors::{BudgetDetails, ErrorCode, Refusal, Scope};
use crate::core::ledger::budget::fits;
use crate::core::ledger::codec::{put_len, put_u16, put_u32, put_u64, DecodeError, Reader};
use crate::core::window::{day_index, month_index};

const VERSION: u8 = 3;

/// Spent of one window (a UTC day or month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowCounter {
    pub index: u32,
    pub spent: Amount,
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

/// Reservations one VM holds in the tenant's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowOwner {
    pub vm: u16,
    pub amount: Amount,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WindowsRecord {
    pub day: WindowCounter,
    pub month: WindowCounter,
    pub owners: Vec<WindowOwner>,
}

impl WindowsRecord {
    pub fn roll(&mut self, now: u64) {
        self.day.roll(day_index(now));
        self.month.roll(month_index(now));
    }

    /// In flight, in both windows (every priced call reserves in both).
    pub fn reserved(&self) -> Amount {
        self.owners
            .iter()
            .fold(0, |sum: Amount, o| sum.saturating_add(o.amount))
    }

    /// Reserves in both windows, or names the narrower one that refuses.
    /// [`WindowsRecord::try_reserve`] for a call that may reserve less than `price`,
    /// down to `min_price`: reserves what the day and month leave, and returns it.
    pub fn try_reserve_up_to(
        &mut self,
        owner: u16,
        price: Amount,
        min_price: Amount,
        daily: Option<Amount>,
        monthly: Option<Amount>,
    ) -> Result<Amount, Refusal> {
        let reserved = self.reserved();
        let mut fitted = price;
        for (limit, counter) in [(daily, self.day), (monthly, self.month)] {
            if let Some(limit) = limit {
                let room = limit.saturating_sub(counter.spent.saturating_add(reserved));
                fitted = fitted.min(room.max(min_price));
            }
        }
        self.try_reserve(owner, fitted, daily, monthly)?;
        Ok(fitted)
    }

    pub fn try_reserve(
        &mut self,
        owner: u16,
        price: Amount,
        daily: Option<Amount>,
        monthly: Option<Amount>,
    ) -> Result<(), Refusal> {
        let reserved = self.reserved();
        for (scope, limit, counter) in [
            (Scope::Daily, daily, self.day),
            (Scope::Monthly, monthly, self.month),
        ] {
            if let Some(limit) = limit {
                if !fits(counter.spent, reserved, price, limit) {
                    return Err(Refusal::budget(BudgetDetails {
                        scope,
                        limit,
                        spent: counter.spent,
                        reserved,
                        requested: price,
                    }));
                }
            }
        }
        if reserved.checked_add(price).is_none() {
            return Err(Refusal::new(
                ErrorCode::InternalError,
                "ledger amount overflow",
            ));
        }
        match self.owners.iter_mut().find(|o| o.vm == owner) {
            Some(o) => {
                o.amount = o.amount.saturating_add(price);
                o.count = o.count.saturating_add(1);
            }
            None => {
                if self.owners.len() >= 255 {
                    return Err(Refusal::new(
                        ErrorCode::CapacityExceeded,
                        "too many Envoy VMs hold reservations for this tenant",
                    ));
                }
                self.owners.push(WindowOwner {
                    vm: owner,
                    amount: price,
                    count: 1,
                });
            }
        }
        Ok(())
    }

    /// Gives back `reserved` (for `count` reservations) of a VM and charges `cost`; a
    /// part no longer held was charged by a recovery and is not charged again.
    pub fn settle(&mut self, owner: u16, reserved: Amount, count: u32, cost: Amount) {
        let mut held = 0;
        if let Some(o) = self.owners.iter_mut().find(|o| o.vm == owner) {
            held = reserved.min(o.amount);
            o.amount -= held;
            o.count -= count.min(o.count);
        }
        self.owners.retain(|o| o.amount > 0 || o.count > 0);
        let cost = cost.saturating_sub(reserved - held);
        self.day.spent = self.day.spent.saturating_add(cost);
        self.month.spent = self.month.spent.saturating_add(cost);
    }

    /// Charges every reservation a dead VM held (the rule for unknown outcomes).
    pub fn recover(&mut self, vm: u16) -> (Amount, u32) {
        let mut total = (0 as Amount, 0u32);
        for o in self.owners.iter().filter(|o| o.vm == vm) {
            total = (
                total.0.saturating_add(o.amount),
                total.1.saturating_add(o.count),
            );
        }
        self.owners.retain(|o| o.vm != vm);
        self.day.spent = self.day.spent.saturating_add(total.0);
        self.month.spent = self.month.spent.saturating_add(total.0);
        total
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(32 + self.owners.len() * 14);
        w.push(VERSION);
        for c in [self.day, self.month] {
            w.push(c.alerts);
            put_u32(&mut w, c.index);
            put_u64(&mut w, c.spent);
        }
        put_len(&mut w, self.owners.len());
        for o in self.owners.iter().take(255) {
            put_u16(&mut w, o.vm);
            put_u64(&mut w, o.amount);
            put_u32(&mut w, o.count);
        }
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<WindowsRecord, DecodeError> {
        if bytes.is_empty() {
            return Ok(WindowsRecord::default());
        }
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return Err(DecodeError);
        }
        let mut counter = || -> Result<WindowCounter, DecodeError> {
            Ok(WindowCounter {
                alerts: r.u8()?,
                index: r.u32()?,
                spent: r.u64()?,
            })
        };
        let day = counter()?;
        let month = counter()?;
        let n = usize::from(r.u8()?);
        let mut owners = Vec::with_capacity(n);
        for _ in 0..n {
            owners.push(WindowOwner {
                vm: r.u16()?,
                amount: r.u64()?,
                count: r.u32()?,
            });
        }
        r.end()?;
        Ok(WindowsRecord { day, month, owners })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_window_rolls_over_keeping_reservations_in_flight() {
        let mut t = WindowsRecord::default();
        let day1 = 1_796_040_000; // 2026-11-30 12:00 UTC
        t.roll(day1);
        t.try_reserve(1, 100, Some(1000), Some(5000)).unwrap();
        t.settle(1, 100, 1, 100);
        t.try_reserve(1, 50, Some(1000), Some(5000)).unwrap();
        assert_eq!((t.day.spent, t.reserved()), (100, 50));
        t.roll(day1 + 86_400); // next day, next month
        assert_eq!((t.day.spent, t.reserved()), (0, 50));
        assert_eq!(t.month.spent, 0);
        t.settle(1, 50, 1, 50);
        assert_eq!(t.day.spent, 50);
        // A worker whose clock is a moment behind never rolls a window back.
        t.roll(day1);
        assert_eq!(t.day.spent, 50);
    }

    #[test]
    fn daily_is_named_before_monthly() {
        let mut t = WindowsRecord::default();
        t.day.spent = 1000;
        t.month.spent = 5000;
        assert_eq!(
            t.try_reserve(1, 1, Some(1000), Some(5000))
                .unwrap_err()
                .code,
            ErrorCode::DailyBudgetExceeded
        );
        assert_eq!(
            t.try_reserve(1, 1, None, Some(5000)).unwrap_err().code,
            ErrorCode::MonthlyBudgetExceeded
        );
    }

    #[test]
    fn a_dead_vms_reservations_are_charged_and_no_longer_reserved() {
        let mut t = WindowsRecord::default();
        t.try_reserve(1, 10, Some(100), None).unwrap();
        t.try_reserve(2, 20, Some(100), None).unwrap();
        t.try_reserve(2, 30, Some(100), None).unwrap();
        assert_eq!(t.recover(2), (50, 2));
        assert_eq!((t.day.spent, t.reserved()), (50, 10));
        let bytes = t.encode();
        assert_eq!(WindowsRecord::decode(&bytes).unwrap(), t);
        for cut in 1..bytes.len() {
            assert!(WindowsRecord::decode(&bytes[..cut]).is_err());
        }
    }
}
