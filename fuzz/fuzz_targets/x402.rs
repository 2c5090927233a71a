//! Every x402 parser takes untrusted bytes: none may panic, whatever they are.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pag0::core::x402;

fuzz_target!(|data: &[u8]| {
    let _ = x402::parse_required_header(data);
    let _ = x402::parse_required_body(data);
    let _ = x402::parse_payment_header(data);
    let _ = x402::parse_settlement_header(data);
    let _ = x402::signer_answer(data, 2);
    let _ = pag0::core::base64::decode(&String::from_utf8_lossy(data));
    // Also as the base64 of the bytes, to reach the JSON layer.
    let wrapped = pag0::core::base64::encode(data);
    let _ = x402::parse_required_header(wrapped.as_bytes());
    let _ = x402::parse_payment_header(wrapped.as_bytes());
    let _ = x402::parse_settlement_header(wrapped.as_bytes());
});
