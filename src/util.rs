//! Small shared helpers: clocks, ids, decimal and hex formatting.

use std::cell::Cell;
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Fill `buf` from the operating system's cryptographic source (`/dev/urandom`). Returns false,
/// leaving `buf` unspecified, when that source cannot be read.
pub fn os_random(buf: &mut [u8]) -> bool {
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).is_ok()
}

/// `bytes` bytes from the operating system's cryptographic source, as lower-case hex; `None` when
/// that source cannot be read (the caller decides how to fall back, and says so).
pub fn secure_hex(bytes: usize) -> Option<String> {
    let mut buf = vec![0u8; bytes];
    if !os_random(&mut buf) {
        return None;
    }
    let mut s = String::with_capacity(bytes * 2);
    for b in buf {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    Some(s)
}

fn seed_fallback() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(SystemTime::now())
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut b = [0u8; 8];
        if os_random(&mut b) {
            u64::from_le_bytes(b)
        } else {
            // Ids only need to differ, not to be unguessable: a hashed clock will do.
            splitmix(&mut seed_fallback())
        }
    });
}

/// A fast per-thread pseudo-random number, seeded from the OS (ids, not secrets).
pub fn fast_random() -> u64 {
    RNG.with(|c| {
        let mut s = c.get();
        let v = splitmix(&mut s);
        c.set(s);
        v
    })
}

/// `len` lower-case hex characters of fast randomness.
pub fn random_hex(len: usize) -> String {
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        s.push_str(&format!("{:016x}", fast_random()));
    }
    s.truncate(len);
    s
}

/// The civil date `(year, month 1–12, day 1–31)` of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Append `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Append `n` in lower-case hex (chunk sizes).
pub fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 16];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_of_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_791), (2026, 12, 4));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn number_formatting() {
        let mut v = Vec::new();
        push_decimal(&mut v, 0);
        v.push(b' ');
        push_decimal(&mut v, 18446744073709551615);
        v.push(b' ');
        push_hex(&mut v, 0);
        v.push(b' ');
        push_hex(&mut v, 0x1a2f);
        assert_eq!(v, b"0 18446744073709551615 0 1a2f");
    }

    #[test]
    fn secure_hex_reads_the_os_source() {
        let a = secure_hex(16).expect("/dev/urandom");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(a, secure_hex(16).unwrap());
    }

    #[test]
    fn random_ids_differ() {
        let a = random_hex(24);
        assert_eq!(a.len(), 24);
        assert_ne!(a, random_hex(24));
    }
}
