//! The registry of Envoy VMs that hold reservations, so that a VM's death never
//! leaves money reserved for ever.
//!
//! Each VM (one per worker thread, plus the main thread's) registers once and gets a
//! slot number; its reservations carry that number as their owner (see
//! [`crate::core::ledger::budget::Owner`]). A live VM refreshes its heartbeat from its
//! tick. A VM whose heartbeat is older than the owner lease is dead (a panic with
//! `FAIL_RELOAD` replaces it by a fresh VM with a new slot): the first VM to notice
//! takes the recovery, walks the session tables and the tenants' windows a few keys
//! per tick, and settles every reservation the dead VM held by the rule for unknown
//! outcomes (charged, counted as unconfirmed). A recovery whose VM dies in turn is
//! taken over after another lease. Then the slot is free again.
//!
//! The registry also carries each VM's acknowledgement of the report API's flush
//! requests (see [`crate::core::ledger::pending`]).

use crate::core::errors::{ErrorCode, Refusal};
use crate::core::ledger::codec::{put_u16, put_u64, DecodeError, Reader};
use crate::core::store::{read, update, vm_registry_key, SharedStore, Step};

const VERSION: u8 = 1;
/// Most VMs registered at once (live, or dead and not yet recovered).
pub const MAX_VMS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Free,
    Live,
    /// Dead; its reservations are being settled, up to `cursor`.
    Recovering,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmEntry {
    pub nonce: u64,
    pub state: VmState,
    /// Live: last heartbeat. Recovering: when the recovering VM last made progress.
    pub beat_ms: u64,
    /// The last flush request this VM answered.
    pub acked_epoch: u64,
    /// Recovering: how far the walk over keys has come.
    pub cursor: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registry {
    pub next_nonce: u64,
    pub entries: Vec<VmEntry>,
}

/// A registered VM: its slot (the owner number of its reservations) and its nonce
/// (which tells a VM whether its slot is still its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmId {
    pub slot: u16,
    pub nonce: u64,
}

/// A dead VM whose reservations this VM now settles, from `cursor` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub slot: u16,
    pub cursor: u64,
}

impl Registry {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(11 + self.entries.len() * 33);
        w.push(VERSION);
        put_u64(&mut w, self.next_nonce);
        put_u16(&mut w, self.entries.len() as u16);
        for e in &self.entries {
            put_u64(&mut w, e.nonce);
            w.push(match e.state {
                VmState::Free => 0,
                VmState::Live => 1,
                VmState::Recovering => 2,
            });
            put_u64(&mut w, e.beat_ms);
            put_u64(&mut w, e.acked_epoch);
            put_u64(&mut w, e.cursor);
        }
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<Registry, DecodeError> {
        if bytes.is_empty() {
            return Ok(Registry::default());
        }
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return Err(DecodeError);
        }
        let next_nonce = r.u64()?;
        let n = usize::from(r.u16()?);
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let nonce = r.u64()?;
            let state = match r.u8()? {
                0 => VmState::Free,
                1 => VmState::Live,
                2 => VmState::Recovering,
                _ => return Err(DecodeError),
            };
            entries.push(VmEntry {
                nonce,
                state,
                beat_ms: r.u64()?,
                acked_epoch: r.u64()?,
                cursor: r.u64()?,
            });
        }
        r.end()?;
        Ok(Registry {
            next_nonce,
            entries,
        })
    }

    fn owns(&self, id: VmId) -> bool {
        self.entries
            .get(usize::from(id.slot))
            .is_some_and(|e| e.nonce == id.nonce && e.state == VmState::Live)
    }
}

fn decode(bytes: &[u8]) -> Result<Registry, Refusal> {
    Registry::decode(bytes).map_err(|_| {
        Refusal::new(
            ErrorCode::InternalError,
            "corrupt VM registry in shared data",
        )
    })
}

/// Registers this VM: the first free slot, or a new one.
pub fn register<S: SharedStore + ?Sized>(store: &S, now_ms: u64) -> Result<VmId, Refusal> {
    update(store, &vm_registry_key(), |bytes| {
        let mut reg = decode(bytes)?;
        reg.next_nonce = reg.next_nonce.saturating_add(1);
        let nonce = reg.next_nonce;
        let entry = VmEntry {
            nonce,
            state: VmState::Live,
            beat_ms: now_ms,
            acked_epoch: 0,
            cursor: 0,
        };
        let slot = match reg.entries.iter().position(|e| e.state == VmState::Free) {
            Some(i) => {
                reg.entries[i] = entry;
                i
            }
            None if reg.entries.len() < MAX_VMS => {
                reg.entries.push(entry);
                reg.entries.len() - 1
            }
            None => {
                return Err(Refusal::new(
                    ErrorCode::CapacityExceeded,
                    "the VM registry is full (dead VMs not yet recovered)",
                ))
            }
        };
        let slot = u16::try_from(slot).unwrap_or(u16::MAX);
        Ok(Step::Write(reg.encode(), VmId { slot, nonce }))
    })
}

/// Refreshes this VM's heartbeat (and records the flush request it answered).
/// `false`: the slot is no longer ours (we were taken for dead and recovered): the
/// caller must forget every reservation it holds and register again.
pub fn heartbeat<S: SharedStore + ?Sized>(
    store: &S,
    id: VmId,
    now_ms: u64,
    acked_epoch: u64,
) -> Result<bool, Refusal> {
    update(store, &vm_registry_key(), |bytes| {
        let mut reg = decode(bytes)?;
        if !reg.owns(id) {
            return Ok(Step::Keep(false));
        }
        let e = &mut reg.entries[usize::from(id.slot)];
        e.beat_ms = e.beat_ms.max(now_ms);
        e.acked_epoch = e.acked_epoch.max(acked_epoch);
        Ok(Step::Write(reg.encode(), true))
    })
}

/// Takes the recovery of a dead VM, if there is one: a live VM whose heartbeat is
/// older than the lease, or a recovery whose recovering VM stopped making progress.
pub fn take_recovery<S: SharedStore + ?Sized>(
    store: &S,
    me: VmId,
    now_ms: u64,
    lease_ms: u64,
) -> Result<Option<Recovery>, Refusal> {
    update(store, &vm_registry_key(), |bytes| {
        let mut reg = decode(bytes)?;
        let stale = |e: &VmEntry| now_ms.saturating_sub(e.beat_ms) > lease_ms;
        let found = reg.entries.iter().enumerate().position(|(i, e)| {
            i != usize::from(me.slot)
                && matches!(e.state, VmState::Live | VmState::Recovering)
                && stale(e)
        });
        let Some(i) = found else {
            return Ok(Step::Keep(None));
        };
        let e = &mut reg.entries[i];
        if e.state == VmState::Live {
            e.state = VmState::Recovering;
            e.cursor = 0;
        }
        e.beat_ms = now_ms;
        let recovery = Recovery {
            slot: u16::try_from(i).unwrap_or(u16::MAX),
            cursor: e.cursor,
        };
        Ok(Step::Write(reg.encode(), Some(recovery)))
    })
}

/// Records a recovery's progress (and keeps its lease fresh); `done` frees the slot.
pub fn recovery_progress<S: SharedStore + ?Sized>(
    store: &S,
    recovery: Recovery,
    now_ms: u64,
    done: bool,
) -> Result<(), Refusal> {
    update(store, &vm_registry_key(), |bytes| {
        let mut reg = decode(bytes)?;
        let Some(e) = reg.entries.get_mut(usize::from(recovery.slot)) else {
            return Ok(Step::Keep(()));
        };
        if e.state != VmState::Recovering {
            return Ok(Step::Keep(()));
        }
        e.cursor = e.cursor.max(recovery.cursor);
        e.beat_ms = now_ms;
        if done {
            e.state = VmState::Free;
        }
        Ok(Step::Write(reg.encode(), ()))
    })
}

/// Whether every live VM has answered flush request `epoch` (a VM silent for longer
/// than the lease is not waited for: it is dead, and recovery will charge its calls).
pub fn all_acked<S: SharedStore + ?Sized>(
    store: &S,
    epoch: u64,
    now_ms: u64,
    lease_ms: u64,
) -> Result<bool, Refusal> {
    let reg = decode(&read(store, &vm_registry_key())?)?;
    Ok(reg.entries.iter().all(|e| {
        e.state != VmState::Live
            || e.acked_epoch >= epoch
            || now_ms.saturating_sub(e.beat_ms) > lease_ms
    }))
}

/// Number of VMs that may hold reservations (for reports and tests).
pub fn live_count<S: SharedStore + ?Sized>(store: &S) -> Result<usize, Refusal> {
    let reg = decode(&read(store, &vm_registry_key())?)?;
    Ok(reg
        .entries
        .iter()
        .filter(|e| e.state == VmState::Live)
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemoryStore;

    #[test]
    fn a_silent_vm_is_recovered_once_and_its_slot_reused() {
        let store = MemoryStore::new();
        let a = register(&store, 0).unwrap();
        let b = register(&store, 0).unwrap();
        assert_ne!(a.slot, b.slot);
        // b keeps beating; a goes silent.
        assert!(heartbeat(&store, b, 5_000, 0).unwrap());
        assert_eq!(take_recovery(&store, b, 5_000, 10_000).unwrap(), None);
        let r = take_recovery(&store, b, 10_001, 10_000).unwrap().unwrap();
        assert_eq!(
            r,
            Recovery {
                slot: a.slot,
                cursor: 0
            }
        );
        // Nobody else takes it while the recovery makes progress.
        assert_eq!(take_recovery(&store, b, 10_002, 10_000).unwrap(), None);
        // a wakes up: its slot is no longer its own.
        assert!(!heartbeat(&store, a, 10_003, 0).unwrap());
        recovery_progress(&store, Recovery { cursor: 7, ..r }, 10_004, true).unwrap();
        let c = register(&store, 10_005).unwrap();
        assert_eq!(c.slot, a.slot);
        assert_ne!(c.nonce, a.nonce);
    }

    #[test]
    fn a_stalled_recovery_is_taken_over_where_it_stopped() {
        let store = MemoryStore::new();
        let dead = register(&store, 0).unwrap();
        let x = register(&store, 0).unwrap();
        let y = register(&store, 0).unwrap();
        heartbeat(&store, x, 20_000, 0).unwrap();
        heartbeat(&store, y, 20_000, 0).unwrap();
        let r = take_recovery(&store, x, 20_000, 10_000).unwrap().unwrap();
        assert_eq!(r.slot, dead.slot);
        recovery_progress(&store, Recovery { cursor: 40, ..r }, 20_000, false).unwrap();
        // x dies mid-recovery; after a lease y takes over at 40.
        heartbeat(&store, y, 40_000, 0).unwrap();
        let taken = take_recovery(&store, y, 40_000, 10_000).unwrap();
        assert_eq!(
            taken,
            Some(Recovery {
                slot: dead.slot,
                cursor: 40
            })
        );
    }

    #[test]
    fn flush_acks_wait_for_live_vms_only() {
        let store = MemoryStore::new();
        let a = register(&store, 0).unwrap();
        let b = register(&store, 0).unwrap();
        heartbeat(&store, a, 100, 3).unwrap();
        assert!(!all_acked(&store, 3, 100, 10_000).unwrap());
        heartbeat(&store, b, 100, 3).unwrap();
        assert!(all_acked(&store, 3, 100, 10_000).unwrap());
        // b goes silent: after a lease it is not waited for.
        heartbeat(&store, a, 20_000, 4).unwrap();
        assert!(all_acked(&store, 4, 20_000, 10_000).unwrap());
        let bytes = read(&store, &vm_registry_key()).unwrap();
        let reg = Registry::decode(&bytes).unwrap();
        assert_eq!(Registry::decode(&reg.encode()).unwrap(), reg);
        for cut in 1..bytes.len() {
            assert!(Registry::decode(&bytes[..cut]).is_err());
        }
    }
}
