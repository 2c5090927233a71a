//! Shared-data records decode anything without panicking (a corrupt record is an error).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pag0::core::ledger::SessionRecord::decode(data);
    let _ = pag0::core::ledger::TenantRecord::decode(data);
    let _ = pag0::core::cache::Entry::decode(data);
    let _ = pag0::core::endpoint::endpoint(data, data);
});
