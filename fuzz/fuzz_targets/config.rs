//! The configuration compiler never panics, whatever JSON (or not) it is given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pag0::core::compile::compile_json(data);
});
