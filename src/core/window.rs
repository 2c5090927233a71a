//! UTC day and month windows, from unix seconds, without a date library.

/// Days since 1970-01-01 (UTC).
pub fn day_index(unix_secs: u64) -> u32 {
    (unix_secs / 86_400) as u32
}

/// Months since 1970-01 (UTC): year * 12 + month - 1, counted from 1970.
pub fn month_index(unix_secs: u64) -> u32 {
    let (year, month, _) = civil_from_days((unix_secs / 86_400) as i64);
    ((year - 1970) * 12 + (month as i64 - 1)) as u32
}

/// Howard Hinnant's days-to-civil algorithm: (year, month 1-12, day 1-31).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2026-11-23 is day 20780.
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn windows_roll_at_utc_midnight_and_month_end() {
        let nov_30_2359 = 1_796_083_199; // 2026-11-30T23:59:59Z
        assert_eq!(
            civil_from_days((nov_30_2359 / 86_400) as i64),
            (2026, 11, 30)
        );
        assert_eq!(day_index(nov_30_2359) + 1, day_index(nov_30_2359 + 1));
        assert_eq!(month_index(nov_30_2359) + 1, month_index(nov_30_2359 + 1));
        assert_eq!(month_index(nov_30_2359), (2026 - 1970) * 12 + 10);
    }
}
