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

/// A deadline for polling loops that reads the clock only every [`PollClock::EVERY`] calls
/// (a clock read costs about as much as an empty CQ poll), starting the clock at the first
/// read, so the common case of an operation that completes at once never reads it.
#[derive(Debug, Clone)]
pub struct PollClock {
    timeout: std::time::Duration,
    polls: u32,
    deadline: Option<Instant>,
}

impl PollClock {
    /// Calls between clock reads.
    pub const EVERY: u32 = 64;

    /// A clock that expires about `timeout` after its first reading.
    pub fn new(timeout: std::time::Duration) -> Self {
        PollClock {
            timeout,
            polls: 0,
            deadline: None,
        }
    }

    /// Counts one poll; true once the timeout has passed (checked every [`PollClock::EVERY`]
    /// calls).
    pub fn expired(&mut self) -> bool {
        self.polls = self.polls.wrapping_add(1);
        if !self.polls.is_multiple_of(Self::EVERY) {
            return false;
        }
        let now = Instant::now();
        match self.deadline {
            None => {
                self.deadline = Some(now + self.timeout);
                self.timeout.is_zero()
            }
            Some(d) => now >= d,
        }
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
    fn poll_clock_expires_only_after_its_timeout() {
        let mut c = PollClock::new(Duration::from_millis(20));
        let t = Instant::now();
        while !c.expired() {
            assert!(t.elapsed() < Duration::from_secs(5), "never expired");
        }
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "expired after {:?}",
            t.elapsed()
        );
        let mut z = PollClock::new(Duration::ZERO);
        assert!(
            (0..PollClock::EVERY).any(|_| z.expired()),
            "a zero timeout expires at the first reading"
        );
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
