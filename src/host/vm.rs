//! What one VM keeps between streams: its part of the ledger, the API keys it has
//! already hashed, the request bytes it holds for paid retries, and the secret that
//! marks pag0's own retries. A VM runs on one thread, so this is a thread-local.

use std::cell::RefCell;

use hashbrown::HashMap;

use crate::core::compile::Config;
use crate::core::ledger::local::LocalLedger;
use crate::core::store::{secret_key, SharedStore, CREATE_CAS};
use crate::host::shared::HostStore;

/// API keys remembered per VM (more: the memo starts over).
const MAX_KEYS: usize = 1024;

#[derive(Default)]
pub struct Vm {
    pub ledger: LocalLedger,
    /// API key → tenant (or unknown): SHA-256 once per key, not per request.
    keys: HashMap<Vec<u8>, Option<usize>>,
    /// Request body bytes kept for paid retries, over every stream of this VM.
    pub held_bytes: usize,
    secret: Option<String>,
}

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
}

pub fn with<R>(f: impl FnOnce(&mut Vm) -> R) -> R {
    VM.with(|vm| f(&mut vm.borrow_mut()))
}

/// The tenant an API key belongs to, hashing each key once.
pub fn tenant_for_key(cfg: &Config, key: &[u8]) -> Option<usize> {
    with(|vm| {
        if let Some(found) = vm.keys.get(key) {
            return *found;
        }
        if vm.keys.len() >= MAX_KEYS {
            vm.keys.clear();
        }
        let found = cfg.tenant_for_key(key);
        vm.keys.insert(key.to_vec(), found);
        found
    })
}

/// Reserves `bytes` of the VM's budget for bodies kept for paid retries.
pub fn hold_bytes(bytes: usize, limit: usize) -> bool {
    with(|vm| {
        let total = vm.held_bytes.saturating_add(bytes);
        if total > limit {
            return false;
        }
        vm.held_bytes = total;
        true
    })
}

pub fn release_bytes(bytes: usize) {
    with(|vm| vm.held_bytes = vm.held_bytes.saturating_sub(bytes));
}

/// The secret that marks pag0's own paid retries when they come back through the
/// listener: random, made once per Envoy process and shared by its VMs.
pub fn secret() -> Option<String> {
    if let Some(s) = with(|vm| vm.secret.clone()) {
        return Some(s);
    }
    let store = HostStore;
    let key = secret_key();
    let existing = store
        .get(&key)
        .ok()
        .flatten()
        .map(|(v, _)| v)
        .filter(|v| !v.is_empty());
    let bytes = match existing {
        Some(v) => v,
        None => {
            let mut raw = [0u8; 16];
            getrandom::getrandom(&mut raw).ok()?;
            let mut hex = String::with_capacity(32);
            crate::core::cache::push_hex(&mut hex, &raw);
            // Whoever creates it first wins; everyone then reads the same one.
            let _ = store.set(&key, hex.as_bytes(), CREATE_CAS);
            store.get(&key).ok().flatten().map(|(v, _)| v)?
        }
    };
    let secret = String::from_utf8(bytes).ok()?;
    with(|vm| vm.secret = Some(secret.clone()));
    Some(secret)
}
