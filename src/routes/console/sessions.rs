//! The console's sign-in state, in memory and bounded: the live sessions ([`Sessions`]) and
//! the per-address sign-in throttle ([`SignInThrottle`]).
//!
//! Both are pure over an explicit `now_ms`, so their limits are unit-tested without a clock.
//! Both are bounded whatever a client sends: an expired session is dropped when it is next
//! looked up and at every sign-in, at most [`MAX_SESSIONS`] live at once (a sign-in past the
//! cap ends the session closest to its expiry); the throttle keeps one instant per address
//! and at most [`MAX_THROTTLED_ADDRESSES`] of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// How long a session lasts after sign-in.
pub const SESSION_TTL_MS: u64 = 8 * 60 * 60 * 1000;
/// Live sessions at most; a sign-in past it ends the oldest.
pub const MAX_SESSIONS: usize = 64;
/// Sign-in attempts a client address may make at once…
pub const SIGN_IN_BURST: u64 = 5;
/// …then one more per this interval (5 a minute).
pub const SIGN_IN_INTERVAL_MS: u64 = 12_000;
/// Addresses the throttle remembers at most; past it the one closest to a full allowance is
/// forgotten.
pub const MAX_THROTTLED_ADDRESSES: usize = 4096;

/// One signed-in operator: when the session ends, and the CSRF token its forms carry.
#[derive(Debug, Clone)]
pub struct Session {
    /// When the session ends (ms since the epoch).
    pub expires_ms: u64,
    /// The token every form of this session carries.
    pub csrf: String,
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The console's sessions: id -> (expiry, CSRF token). In memory: a restart signs everyone
/// out, which for an operator console is a feature.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Starts a session at `now_ms`: sweeps the expired ones, and past [`MAX_SESSIONS`]
    /// ends the one closest to its expiry (the oldest sign-in).
    pub fn start(&self, now_ms: u64) -> (String, Session) {
        let id = random_token();
        let session = Session {
            expires_ms: now_ms + SESSION_TTL_MS,
            csrf: random_token(),
        };
        let mut live = lock(&self.live);
        live.retain(|_, s| s.expires_ms > now_ms);
        while live.len() >= MAX_SESSIONS {
            let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            live.remove(&oldest);
        }
        live.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session `id`; an expired one is dropped on the way.
    pub fn get(&self, id: &str, now_ms: u64) -> Option<Session> {
        let mut live = lock(&self.live);
        match live.get(id) {
            Some(s) if s.expires_ms > now_ms => Some(s.clone()),
            Some(_) => {
                live.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends session `id` (sign-out).
    pub fn end(&self, id: &str) {
        lock(&self.live).remove(id);
    }

    /// How many sessions are held (live or not yet swept).
    pub fn len(&self) -> usize {
        lock(&self.live).len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sign-in attempts per client address: [`SIGN_IN_BURST`] at once, then one per
/// [`SIGN_IN_INTERVAL_MS`], right or wrong (checked before the token is compared, so a
/// guesser learns nothing past the limit). A generic cell rate: per address, only the
/// instant its allowance is next full.
#[derive(Debug, Default)]
pub struct SignInThrottle {
    full_at_ms: Mutex<HashMap<IpAddr, u64>>,
}

impl SignInThrottle {
    /// Takes one attempt for `address` at `now_ms`: `Ok`, or `Err(ms)` to wait before the
    /// next is allowed.
    pub fn attempt(&self, address: IpAddr, now_ms: u64) -> Result<(), u64> {
        let tolerance = (SIGN_IN_BURST - 1) * SIGN_IN_INTERVAL_MS;
        let mut addresses = lock(&self.full_at_ms);
        let full_at = addresses.get(&address).copied().unwrap_or(0).max(now_ms);
        if full_at - now_ms > tolerance {
            return Err(full_at - now_ms - tolerance);
        }
        if !addresses.contains_key(&address) && addresses.len() >= MAX_THROTTLED_ADDRESSES {
            addresses.retain(|_, at| *at > now_ms);
            if addresses.len() >= MAX_THROTTLED_ADDRESSES
                && let Some(nearest) = addresses.iter().min_by_key(|(_, at)| **at).map(|(a, _)| *a)
            {
                addresses.remove(&nearest);
            }
        }
        addresses.insert(address, full_at + SIGN_IN_INTERVAL_MS);
        Ok(())
    }

    /// How many addresses are remembered.
    pub fn len(&self) -> usize {
        lock(&self.full_at_ms).len()
    }

    /// Whether no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000;

    #[test]
    fn an_expired_session_is_gone_and_dropped_on_lookup() {
        let sessions = Sessions::default();
        let (id, _) = sessions.start(T0);
        assert!(sessions.get(&id, T0 + SESSION_TTL_MS - 1).is_some());
        assert!(sessions.get(&id, T0 + SESSION_TTL_MS).is_none());
        assert!(sessions.is_empty(), "swept on lookup");
    }

    #[test]
    fn a_sign_in_sweeps_every_expired_session() {
        let sessions = Sessions::default();
        for i in 0..10 {
            sessions.start(T0 + i);
        }
        let (fresh, _) = sessions.start(T0 + SESSION_TTL_MS + 10);
        assert_eq!(sessions.len(), 1);
        assert!(sessions.get(&fresh, T0 + SESSION_TTL_MS + 10).is_some());
    }

    #[test]
    fn live_sessions_are_bounded_and_the_oldest_ends_first() {
        let sessions = Sessions::default();
        let ids: Vec<String> = (0..MAX_SESSIONS as u64 + 3)
            .map(|i| sessions.start(T0 + i).0)
            .collect();
        assert_eq!(sessions.len(), MAX_SESSIONS);
        let now = T0 + MAX_SESSIONS as u64 + 3;
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                sessions.get(id, now).is_some(),
                i >= 3,
                "session {i}: the three oldest ended"
            );
        }
    }

    #[test]
    fn sign_in_attempts_are_limited_per_address_then_refill() {
        let throttle = SignInThrottle::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..SIGN_IN_BURST {
            assert_eq!(throttle.attempt(a, T0), Ok(()));
        }
        assert_eq!(throttle.attempt(a, T0), Err(SIGN_IN_INTERVAL_MS));
        assert_eq!(
            throttle.attempt(a, T0 + 2_000),
            Err(SIGN_IN_INTERVAL_MS - 2_000)
        );
        assert_eq!(
            throttle.attempt(b, T0),
            Ok(()),
            "another address is not held back"
        );
        // One attempt per interval after that, never a second burst while hammering.
        assert_eq!(throttle.attempt(a, T0 + SIGN_IN_INTERVAL_MS), Ok(()));
        assert!(throttle.attempt(a, T0 + SIGN_IN_INTERVAL_MS).is_err());
        // A quiet address gets its whole burst back.
        let later = T0 + (SIGN_IN_BURST + 1) * SIGN_IN_INTERVAL_MS;
        for _ in 0..SIGN_IN_BURST {
            assert_eq!(throttle.attempt(a, later), Ok(()));
        }
    }

    #[test]
    fn the_throttle_remembers_a_bounded_number_of_addresses() {
        let throttle = SignInThrottle::default();
        for i in 0..(MAX_THROTTLED_ADDRESSES as u32 + 100) {
            let address: IpAddr = std::net::Ipv4Addr::from(i).into();
            assert_eq!(throttle.attempt(address, T0), Ok(()));
        }
        assert_eq!(throttle.len(), MAX_THROTTLED_ADDRESSES);
    }
}
