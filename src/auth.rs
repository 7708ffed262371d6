//! Caller authentication shared by HTTP and WebSocket: secret comparison and the opt-in per-IP
//! failure limiter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, AuthMode, RateLimitConfig};

/// Result of checking a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    /// Accepted.
    Ok,
    /// Missing or wrong secret.
    Invalid,
    /// Too many failures from this client; retry after this many seconds.
    Locked(u64),
}

#[derive(Debug, Default)]
struct Failures {
    times: Vec<Instant>,
    locked_until: Option<Instant>,
}

/// Checks secrets in constant time and counts failures per client IP.
#[derive(Debug)]
pub struct Authorizer {
    mode: AuthMode,
    secret_digest: Option<[u8; 32]>,
    limit: Option<RateLimitConfig>,
    /// Shared with the authorizer that replaces this one on a config reload.
    failures: Arc<Mutex<HashMap<IpAddr, Failures>>>,
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

/// Constant-time equality of two digests.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The secret in `Authorization: Bearer <secret>` (scheme case-insensitive).
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, rest) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

impl Authorizer {
    /// An authorizer for `cfg`.
    pub fn new(cfg: &AuthConfig) -> Self {
        let secret = match cfg.mode {
            AuthMode::Token => cfg.token.as_deref(),
            AuthMode::Password => cfg.password.as_deref(),
            AuthMode::None => None,
        };
        Authorizer {
            mode: cfg.mode,
            secret_digest: secret.map(|s| digest(s.as_bytes())),
            limit: cfg.rate_limit.clone(),
            failures: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// An authorizer for a reloaded `cfg` that keeps `old`'s failure counts and lockouts, so a
    /// reload (or a rotated secret) does not reset the limiter.
    pub fn reloaded(cfg: &AuthConfig, old: &Authorizer) -> Self {
        Authorizer { failures: old.failures.clone(), ..Self::new(cfg) }
    }

    /// Check `secret` presented by `ip` at `now`.
    pub fn check(&self, secret: Option<&str>, ip: IpAddr, now: Instant) -> AuthResult {
        if self.mode == AuthMode::None {
            return AuthResult::Ok;
        }
        let limited = self.limit.as_ref().filter(|l| !(l.exempt_loopback && ip.is_loopback()));
        if limited.is_some() {
            let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(until) = map.get(&ip).and_then(|f| f.locked_until) {
                if until > now {
                    return AuthResult::Locked(until.duration_since(now).as_secs().max(1));
                }
                map.remove(&ip);
            }
        }
        let ok = match (&self.secret_digest, secret) {
            (Some(want), Some(got)) => ct_eq(want, &digest(got.as_bytes())),
            _ => false,
        };
        if ok {
            return AuthResult::Ok;
        }
        if let Some(l) = limited {
            let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() > 100_000 {
                // Bound memory under a spray of source addresses: drop entries with no lockout.
                map.retain(|_, f| f.locked_until.is_some_and(|u| u > now));
            }
            let f = map.entry(ip).or_default();
            f.times.retain(|t| now.duration_since(*t) < l.window);
            f.times.push(now);
            if f.times.len() as u32 >= l.max_attempts {
                f.locked_until = Some(now + l.lockout);
                f.times.clear();
            }
        }
        AuthResult::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(mode: AuthMode, rl: Option<RateLimitConfig>) -> AuthConfig {
        AuthConfig { mode, token: Some("tok".into()), password: Some("pw".into()), rate_limit: rl }
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bEaReR   abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn modes() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        let a = Authorizer::new(&cfg(AuthMode::Token, None));
        assert_eq!(a.check(Some("tok"), ip, now), AuthResult::Ok);
        assert_eq!(a.check(Some("pw"), ip, now), AuthResult::Invalid);
        assert_eq!(a.check(None, ip, now), AuthResult::Invalid);
        let a = Authorizer::new(&cfg(AuthMode::Password, None));
        assert_eq!(a.check(Some("pw"), ip, now), AuthResult::Ok);
        assert_eq!(a.check(Some("tok"), ip, now), AuthResult::Invalid);
        let a = Authorizer::new(&cfg(AuthMode::None, None));
        assert_eq!(a.check(None, ip, now), AuthResult::Ok);
    }

    #[test]
    fn limiter_locks_out_and_expires() {
        let rl = RateLimitConfig {
            max_attempts: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
            exempt_loopback: true,
        };
        let a = Authorizer::new(&cfg(AuthMode::Token, Some(rl)));
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(a.check(Some("bad"), ip, t0), AuthResult::Invalid);
        }
        // Even the right secret is refused while locked out.
        assert_eq!(a.check(Some("tok"), ip, t0), AuthResult::Locked(300));
        assert_eq!(a.check(Some("tok"), ip, t0 + Duration::from_secs(301)), AuthResult::Ok);
        // Loopback is exempt.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(a.check(Some("bad"), lo, t0), AuthResult::Invalid);
        }
        assert_eq!(a.check(Some("tok"), lo, t0), AuthResult::Ok);
    }

    #[test]
    fn a_reloaded_authorizer_keeps_lockouts_and_uses_the_new_secret() {
        let rl = RateLimitConfig {
            max_attempts: 2,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
            exempt_loopback: false,
        };
        let a = Authorizer::new(&cfg(AuthMode::Token, Some(rl.clone())));
        let (bad, good): (IpAddr, IpAddr) = ("10.0.0.8".parse().unwrap(), "10.0.0.9".parse().unwrap());
        let t0 = Instant::now();
        a.check(Some("x"), bad, t0);
        a.check(Some("x"), bad, t0);
        let mut c = cfg(AuthMode::Token, Some(rl));
        c.token = Some("new".into());
        let b = Authorizer::reloaded(&c, &a);
        assert_eq!(b.check(Some("new"), bad, t0), AuthResult::Locked(300));
        assert_eq!(b.check(Some("new"), good, t0), AuthResult::Ok);
        assert_eq!(b.check(Some("tok"), good, t0), AuthResult::Invalid);
    }
}
