//! Time, in one place, so tests can drive it.
//!
//! Production reads the wall clock. Tests of back-off and retention use [`Clock::tokio`],
//! which advances with tokio's clock: under `tokio::time::pause()` time jumps ahead exactly
//! when every task is waiting, so hour-long back-offs finish instantly and deterministically.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of "now".
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// Wall time at creation plus the tokio time elapsed since (follows a paused clock).
    Tokio {
        /// Wall time when the clock was made.
        wall: SystemTime,
        /// tokio's instant at the same moment.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's (possibly paused) time.
    pub fn tokio() -> Clock {
        Clock::Tokio {
            wall: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }

    /// Now, as wall time.
    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { wall, start } => *wall + start.elapsed(),
        }
    }

    /// Now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        to_ms(self.now())
    }

    /// How long until `at_ms` (zero when it has passed).
    pub fn until_ms(&self, at_ms: u64) -> Duration {
        Duration::from_millis(at_ms.saturating_sub(self.now_ms()))
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 with milliseconds, UTC: `2026-11-28T01:44:57.123Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
