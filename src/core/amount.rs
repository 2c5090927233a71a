//! Amounts in the token's smallest unit (USDC: 6 decimals, so 5000000 = $5).
//!
//! Amounts travel as decimal strings. Anything that is not a plain run of digits, or
//! that does not fit in `u64`, is refused: the ledger never wraps.

/// An amount in the token's smallest unit.
pub type Amount = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmountError {
    Empty,
    NotDecimal,
    TooLarge,
}

impl std::fmt::Display for AmountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmountError::Empty => f.write_str("empty amount"),
            AmountError::NotDecimal => {
                f.write_str("not a decimal integer string (digits only, no sign, no decimal point)")
            }
            AmountError::TooLarge => f.write_str("amount too large (must fit in 64 bits)"),
        }
    }
}

/// Parses a decimal string of digits. Leading zeros are accepted ("007" = 7); any other
/// character, including `+`, `-`, `.`, spaces or exponents, is refused. Values of up to
/// 256 bits (78 digits) are read without overflow and refused when above `u64::MAX`.
pub fn parse_amount(text: &str) -> Result<Amount, AmountError> {
    if text.is_empty() {
        return Err(AmountError::Empty);
    }
    let mut value: Amount = 0;
    for byte in text.bytes() {
        if !byte.is_ascii_digit() {
            return Err(AmountError::NotDecimal);
        }
        let digit = Amount::from(byte - b'0');
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(digit))
            .ok_or(AmountError::TooLarge)?;
    }
    Ok(value)
}

/// Parses a threshold such as 0.7 into parts per million, so that comparisons against
/// amounts stay in integer arithmetic. Must be in (0, 1].
pub fn threshold_ppm(value: f64) -> Option<u64> {
    if !(value > 0.0 && value <= 1.0 && value.is_finite()) {
        return None;
    }
    let ppm = (value * 1_000_000.0).round();
    if ppm < 1.0 {
        return None;
    }
    Some(ppm as u64)
}

/// True when `used / limit >= ppm / 1e6`, computed without overflow or floats.
pub fn reaches(used: Amount, limit: Amount, ppm: u64) -> bool {
    if limit == 0 {
        return true;
    }
    u128::from(used) * 1_000_000 >= u128::from(limit) * u128::from(ppm)
}

/// `used / limit` as a number in [0, 1] (capped), for display only.
pub fn utilization(used: Amount, limit: Amount) -> f64 {
    if limit == 0 {
        return 1.0;
    }
    let rate = used as f64 / limit as f64;
    rate.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_digits() {
        assert_eq!(parse_amount("5000000"), Ok(5_000_000));
        assert_eq!(parse_amount("0"), Ok(0));
        assert_eq!(parse_amount("007"), Ok(7));
        assert_eq!(parse_amount("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn refuses_what_is_not_a_plain_integer() {
        for bad in ["", "-1", "+1", "1.5", "1e6", " 1", "1 ", "0x10", "１"] {
            assert!(parse_amount(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn refuses_overflow_instead_of_wrapping() {
        assert_eq!(
            parse_amount("18446744073709551616"),
            Err(AmountError::TooLarge)
        );
        let max_u256 =
            "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        assert_eq!(parse_amount(max_u256), Err(AmountError::TooLarge));
    }

    #[test]
    fn thresholds_are_integer_ppm() {
        assert_eq!(threshold_ppm(0.7), Some(700_000));
        assert_eq!(threshold_ppm(1.0), Some(1_000_000));
        assert_eq!(threshold_ppm(0.0), None);
        assert_eq!(threshold_ppm(1.01), None);
        assert_eq!(threshold_ppm(f64::NAN), None);
        assert!(reaches(4_500_000, 5_000_000, 900_000));
        assert!(!reaches(4_499_999, 5_000_000, 900_000));
        assert!(reaches(u64::MAX, u64::MAX, 1_000_000));
    }
}
