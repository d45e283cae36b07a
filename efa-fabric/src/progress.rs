//! Waiting politely: spin first for latency, then yield, then sleep, so that oversubscribed
//! ranks (more busy ranks than cores) still make progress.

use std::time::{Duration, Instant};

/// A spin-then-yield-then-sleep backoff for polling loops.
///
/// The first [`Backoff::SPINS`] calls return at once (busy polling: lowest latency). Then
/// each call yields the core for up to [`Backoff::YIELD_FOR`]; after that each call sleeps,
/// doubling from 1 µs up to [`Backoff::MAX_SLEEP`]. Call [`Backoff::reset`] whenever the loop
/// made progress.
#[derive(Debug, Clone)]
pub struct Backoff {
    polls: u32,
    started_yield: Option<Instant>,
    sleep: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Busy polls before yielding.
    pub const SPINS: u32 = 2_000;
    /// How long to keep yielding before sleeping.
    pub const YIELD_FOR: Duration = Duration::from_millis(2);
    /// Longest single sleep.
    pub const MAX_SLEEP: Duration = Duration::from_micros(200);

    /// A fresh backoff.
    pub fn new() -> Self {
        Backoff {
            polls: 0,
            started_yield: None,
            sleep: Duration::from_micros(1),
        }
    }

    /// Back to spinning (call after progress).
    pub fn reset(&mut self) {
        *self = Backoff::new();
    }

    /// Waits a little, according to how long this loop has been idle.
    pub fn snooze(&mut self) {
        if self.polls < Self::SPINS {
            self.polls += 1;
            std::hint::spin_loop();
            return;
        }
        let since = *self.started_yield.get_or_insert_with(Instant::now);
        if since.elapsed() < Self::YIELD_FOR {
            std::thread::yield_now();
            return;
        }
        std::thread::sleep(self.sleep);
        self.sleep = (self.sleep * 2).min(Self::MAX_SLEEP);
    }
}

/// A point in time after which a blocking call gives up.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: Instant,
    end: Option<Instant>,
}

impl Deadline {
    /// Expires `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        let start = Instant::now();
        Deadline {
            start,
            end: start.checked_add(timeout),
        }
    }
    /// True once expired.
    pub fn expired(&self) -> bool {
        self.end.is_some_and(|e| Instant::now() >= e)
    }
    /// Time since the deadline was set.
    pub fn waited(&self) -> Duration {
        self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_spins_then_sleeps() {
        let mut b = Backoff::new();
        let t = Instant::now();
        for _ in 0..Backoff::SPINS {
            b.snooze();
        }
        assert!(b.started_yield.is_none());
        b.snooze();
        assert!(b.started_yield.is_some());
        while t.elapsed() < Backoff::YIELD_FOR * 2 {
            b.snooze();
        }
        b.snooze();
        assert!(
            b.sleep > Duration::from_micros(1),
            "backoff never reached the sleep phase"
        );
        b.reset();
        assert_eq!(b.polls, 0);
    }

    #[test]
    fn deadline_expires() {
        let d = Deadline::after(Duration::from_millis(5));
        assert!(!d.expired());
        std::thread::sleep(Duration::from_millis(6));
        assert!(d.expired());
        assert!(d.waited() >= Duration::from_millis(5));
    }
}
