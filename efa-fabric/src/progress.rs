//! Waiting politely: spin first for latency, then yield, then sleep, so that oversubscribed
//! ranks (more busy ranks than cores) still make progress; and blocking on completion queues'
//! wait objects ([`block_on`]: `fi_trywait(3)` then `poll(2)`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cq::CompletionQueue;
use crate::error::{Error, Result};

/// How [`Backoff`] waits once its spins are used up, for the whole process (set by the layer
/// that chooses a wait policy, e.g. efa-core's communicator; default
/// [`IdleMode::SpinYieldSleep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdleMode {
    /// Spin, then yield for [`Backoff::YIELD_FOR`], then sleep with doubling naps up to
    /// [`Backoff::MAX_SLEEP`] (the historical behaviour, good for a core per process).
    #[default]
    SpinYieldSleep,
    /// Spin briefly, then `sched_yield` on every call, never sleeping: lowest latency when
    /// processes outnumber cores (what Open MPI does with `mpi_yield_when_idle`).
    Yield,
}

/// [`IdleMode::Yield`] is in force (else the default).
static YIELDING: AtomicBool = AtomicBool::new(false);

/// Sets how every [`Backoff`] of this process waits from now on.
pub fn set_idle_mode(mode: IdleMode) {
    YIELDING.store(mode == IdleMode::Yield, Ordering::Relaxed);
}

/// How [`Backoff`]s wait ([`set_idle_mode`]).
pub fn idle_mode() -> IdleMode {
    if YIELDING.load(Ordering::Relaxed) {
        IdleMode::Yield
    } else {
        IdleMode::SpinYieldSleep
    }
}

/// What [`block_on`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// A CQ may have completions (`fi_trywait` said `FI_EAGAIN`, or a wait fd became
    /// readable): read the CQs.
    Ready,
    /// The timeout passed with no signal.
    TimedOut,
    /// Some CQ has no wait fd, so blocking could miss its completions: nothing was waited
    /// for (the caller falls back to a short sleep or a yield).
    NoWaitObject,
}

/// Blocks until one of `cqs` may have a completion, or `timeout` passes (`fi_trywait(3)`,
/// then `poll(2)` on their wait fds, fi_cq(3) "Wait objects"). Every CQ must have been
/// opened with [`crate::cq::CqWait::Fd`] and got a fd; otherwise returns
/// [`Woken::NoWaitObject`] at once. `timeout` is rounded to microseconds; keep it short
/// (a millisecond or so) when other things than these CQs can make progress (peers'
/// liveness, shared-memory rings without a fd, deadlines).
///
/// # Errors
/// `fi_trywait` errors other than `FI_EAGAIN`; `poll(2)` errors other than `EINTR` (an
/// interrupted poll counts as [`Woken::Ready`]).
pub fn block_on(cqs: &[CompletionQueue], timeout: Duration) -> Result<Woken> {
    // On the stack for the usual few CQs (one per transport): no allocation while waiting.
    let unset = libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut on_stack = [unset; 8];
    let mut on_heap = Vec::new();
    let fds: &mut [libc::pollfd] = if cqs.len() <= on_stack.len() {
        &mut on_stack[..cqs.len()]
    } else {
        on_heap.resize(cqs.len(), unset);
        &mut on_heap
    };
    for (cq, p) in cqs.iter().zip(fds.iter_mut()) {
        let Some(fd) = cq.wait_fd() else {
            return Ok(Woken::NoWaitObject);
        };
        p.fd = fd;
    }
    if fds.is_empty() {
        return Ok(Woken::NoWaitObject);
    }
    for cq in cqs {
        if !cq.try_wait()? {
            return Ok(Woken::Ready);
        }
    }
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: (timeout.subsec_micros() * 1000) as libc::c_long,
    };
    // SAFETY: fds is a valid array of fds.len() pollfd entries for the call; ts is a valid
    // timespec; a null sigmask keeps the current one.
    let ret = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(Woken::Ready);
        }
        let code = err.raw_os_error().unwrap_or(libc::EIO);
        return Err(Error::Call(crate::error::CallError {
            call: "poll",
            code,
            text: err.to_string(),
        }));
    }
    Ok(if ret == 0 {
        Woken::TimedOut
    } else {
        Woken::Ready
    })
}

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

    /// Busy polls before yielding in [`IdleMode::Yield`].
    pub const YIELD_SPINS: u32 = 16;

    /// Waits a little, according to how long this loop has been idle and the process's
    /// [`IdleMode`].
    pub fn snooze(&mut self) {
        let yielding = idle_mode() == IdleMode::Yield;
        let spins = if yielding {
            Self::YIELD_SPINS
        } else {
            Self::SPINS
        };
        if self.polls < spins {
            self.polls += 1;
            std::hint::spin_loop();
            return;
        }
        if yielding {
            std::thread::yield_now();
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
    /// Calls between clock reads ([`PollClock::EVERY`] unless set by [`PollClock::until`]).
    every: u32,
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
            every: Self::EVERY,
        }
    }

    /// A clock that expires at `deadline`, read every `every` calls (at least 1). For loops
    /// that idle by yielding or blocking between polls, where one clock read costs nothing
    /// beside the idle and reading only every [`PollClock::EVERY`] calls could make the
    /// deadline late by that many idles (seconds of `sched_yield` on a crowded host).
    pub fn until(deadline: Instant, every: u32) -> Self {
        PollClock {
            timeout: std::time::Duration::ZERO,
            polls: 0,
            deadline: Some(deadline),
            every: every.max(1),
        }
    }

    /// Counts one poll; true once the timeout has passed (checked every [`PollClock::EVERY`]
    /// calls, or as set by [`PollClock::until`]).
    pub fn expired(&mut self) -> bool {
        self.polls = self.polls.wrapping_add(1);
        if !self.polls.is_multiple_of(self.every) {
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

    #[test]
    fn until_reads_the_clock_as_often_as_asked() {
        let past = Instant::now() - Duration::from_millis(1);
        let mut every = PollClock::until(past, 1);
        assert!(
            every.expired(),
            "a deadline already passed, read at the first call"
        );
        let mut sparse = PollClock::until(past, 4);
        assert!(!sparse.expired() && !sparse.expired() && !sparse.expired());
        assert!(sparse.expired(), "read at the 4th call");
        let mut later = PollClock::until(Instant::now() + Duration::from_secs(60), 1);
        assert!(!later.expired());
        assert!(PollClock::until(past, 0).expired(), "every 0 counts as 1");
    }
}
