//! Ids: the one id maker, the one id check, and how a caller's value is quoted.
//!
//! A bottom module (it imports nothing from the crate): configuration validation, the
//! control plane and the data plane all use it, so it must not pull any of them in.

/// `N` random bytes from the OS. Without OS randomness, the clock's nanoseconds (repeated
/// to fill `N`): the ids stay unique per process, just guessable, which beats refusing to
/// start.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if getrandom::fill(&mut b).is_err() {
        // The clock read here rather than through `crate::time`: this module stays a leaf.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let clock = nanos.to_be_bytes();
        for (byte, c) in b.iter_mut().zip(clock.iter().cycle()) {
            *byte = *c;
        }
    }
    b
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Decodes lower- or upper-case hex; `None` on odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
        .collect()
}

/// A random id: `prefix` and the lower-case hex of `N` random bytes (`apr-` + 16 hex
/// digits for `N` = 8, say).
pub fn random_id<const N: usize>(prefix: &str) -> String {
    format!("{prefix}{}", hex(&random_bytes::<N>()))
}

/// Checks an id (tenant, agent, session): 1-128 characters of `[A-Za-z0-9._:@-]`, so it
/// shows in tables, logs and audit rows as itself. The error names `what` and quotes the
/// value with [`shown`].
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {} must be 1-128 characters of letters, digits and . - _ : @",
            shown(id)
        ))
    }
}

/// A caller's value as an answer quotes it: whole if short, else its first characters and
/// its length, so an error never carries a hostile value back (or into a log) whole.
pub fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.len() <= SHOWN {
        return format!("{value:?}");
    }
    let cut = (0..=SHOWN)
        .rev()
        .find(|&i| value.is_char_boundary(i))
        .unwrap_or(0);
    let head = value.get(..cut).unwrap_or("");
    format!("{head:?}… ({} bytes)", value.len())
}
