//! Time: the clock and the one civil-date algorithm (RFC 3339 formatting and parsing).
//!
//! A bottom module (it imports nothing from the crate): the audit log, the control plane,
//! `aegis ctl` and the protojson input all print and read dates through it.

/// Current time as Unix nanoseconds (saturating; the clock never runs before 1970 here).
pub fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix nanoseconds as RFC 3339 UTC (`2026-01-31T12:00:00.5Z`).
pub fn rfc3339_nanos(ns: i64) -> String {
    let nanos = i32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0);
    rfc3339(ns.div_euclid(1_000_000_000), nanos)
}

/// A time for a table: RFC 3339 UTC to the second, `-` for 0 (never set).
pub fn secs_or_dash(secs: i64) -> String {
    if secs == 0 {
        return "-".into();
    }
    rfc3339(secs, 0)
}

/// RFC 3339 in UTC with protojson's fraction rule (0, 3, 6 or 9 digits): `seconds` since
/// 1970-01-01 and `nanos` into that second (clamped to 0-999,999,999).
pub fn rfc3339(seconds: i64, nanos: i32) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let nanos = nanos.clamp(0, 999_999_999);
    let frac = if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}Z")
}

/// Parses a time given as Unix seconds or RFC 3339 (`2026-01-31T12:00:00Z`,
/// `...T12:00:00.5+01:00`); returns Unix nanoseconds.
pub fn parse(s: &str) -> Result<i64, String> {
    let bad =
        || format!("{s:?} is not a time: give RFC 3339 (2026-01-31T12:00:00Z) or Unix seconds");
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        let secs: i64 = s.parse().map_err(|_| bad())?;
        return secs.checked_mul(1_000_000_000).ok_or_else(bad);
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(r).ok_or_else(bad)?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let at = |i: usize| b.get(i).copied();
    if b.len() < 20
        || at(4) != Some(b'-')
        || at(7) != Some(b'-')
        || !matches!(at(10), Some(b'T' | b't' | b' '))
        || at(13) != Some(b':')
        || at(16) != Some(b':')
    {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = s.get(start..i).ok_or_else(bad)?;
        if digits.is_empty() {
            return Err(bad());
        }
        let padded: String = digits.chars().chain("000000000".chars()).take(9).collect();
        nanos = padded.parse().map_err(|_| bad())?;
    }
    let offset = match s.get(i..).ok_or_else(bad)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && tz.as_bytes().get(3) == Some(&b':') => {
            let sign = match tz.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return Err(bad()),
            };
            sign * (num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60)
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    secs.checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(nanos))
        .ok_or_else(bad)
}

/// Days since 1970-01-01 → (year, month, day); Howard Hinnant's algorithm.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both in range by construction (day 1-31, month 1-12).
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01; Howard Hinnant's algorithm.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known dates: the epoch, leap days (2000 is a leap year, 1900 and 2100 are not),
    /// the ends of years and a time before 1970.
    const KNOWN: &[(i64, &str)] = &[
        (0, "1970-01-01T00:00:00Z"),
        (1, "1970-01-01T00:00:01Z"),
        (-1, "1969-12-31T23:59:59Z"),
        (951_782_400, "2000-02-29T00:00:00Z"),
        (951_868_800, "2000-03-01T00:00:00Z"),
        (1_709_164_800, "2024-02-29T00:00:00Z"),
        (1_795_965_739, "2026-11-29T15:22:19Z"),
        (946_684_799, "1999-12-31T23:59:59Z"),
        (-2_203_891_200, "1900-03-01T00:00:00Z"),
        (4_107_542_400, "2100-03-01T00:00:00Z"),
        (253_402_300_799, "9999-12-31T23:59:59Z"),
    ];

    #[test]
    fn known_dates_format_and_parse_back() {
        for &(secs, text) in KNOWN {
            assert_eq!(rfc3339(secs, 0), text, "{secs}");
            // Beyond 2262 the time does not fit in i64 nanoseconds: refused, not wrapped.
            assert_eq!(parse(text).ok(), secs.checked_mul(1_000_000_000), "{text}");
        }
    }

    #[test]
    fn days_and_civil_dates_are_inverse_across_leap_years() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        assert_eq!(
            days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28),
            1
        );
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        for day in -800_000..800_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), day);
        }
    }

    #[test]
    fn fractions_follow_protojson_and_tables_show_a_dash_for_never() {
        assert_eq!(rfc3339(0, 500_000_000), "1970-01-01T00:00:00.500Z");
        assert_eq!(rfc3339(0, 1_000), "1970-01-01T00:00:00.000001Z");
        assert_eq!(rfc3339(0, 1), "1970-01-01T00:00:00.000000001Z");
        assert_eq!(rfc3339_nanos(1_500_000_000), "1970-01-01T00:00:01.500Z");
        assert_eq!(secs_or_dash(0), "-");
        assert_eq!(secs_or_dash(1), "1970-01-01T00:00:01Z");
        assert_eq!(
            parse("2026-01-31T12:00:00.5+01:00"),
            Ok(1_769_857_200_500_000_000)
        );
        assert_eq!(parse("12"), Ok(12_000_000_000));
        assert!(parse("2026-13-01T00:00:00Z").is_err());
    }
}
