//! Envoy shared data behind the core's [`SharedStore`] trait. The only file that calls
//! `get_shared_data` / `set_shared_data`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::core::store::{SharedStore, StoreError};

pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((_, None)) => Ok(None),
            Ok((bytes, Some(cas))) => Ok(Some((bytes.unwrap_or_default(), cas))),
            Err(status) => Err(StoreError(format!("get {key}: {status:?}"))),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<bool, StoreError> {
        let cas = if cas == 0 { None } else { Some(cas) };
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(StoreError(format!("set {key}: {status:?}"))),
        }
    }

    fn now_micros(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64)
    }
}
