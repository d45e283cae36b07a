//! How a rank waits: the one wait policy that every blocking call of this crate follows
//! (point-to-point waits, probes, `wait_any`/`wait_some`, collectives, RMA notifications,
//! finalize; efa-fabric's own retry loops follow it too, through
//! [`efa_fabric::set_idle_mode`]).
//!
//! A waiting rank polls its completion queues; between two polls that found nothing it
//! idles according to its [`WaitPolicy`]:
//!
//! | policy | between idle polls | best when | cost |
//! |---|---|---|---|
//! | [`WaitPolicy::Spin`] | a CPU pause; a `sched_yield` every [`SPIN_YIELD_EVERY`] polls | a core per rank | a waiting rank keeps its core busy |
//! | [`WaitPolicy::Yield`] | `sched_yield` (Open MPI's `mpi_yield_when_idle`) | ranks outnumber cores on an otherwise idle host | cores stay busy; on a host with other work, each yield may hand the core to another process for its whole time slice |
//! | [`WaitPolicy::Block`] | `sched_yield` for [`BLOCK_AFTER`] idle polls, then block in `poll(2)` on the CQs' wait fds (`FI_WAIT_FD`, `fi_trywait(3)`) for at most [`BLOCK_SLICE`]; when a CQ (or another carrier) has no wait fd, block or sleep [`FALLBACK_SLEEP`] at most | ranks outnumber cores; hosts shared with other work | each completion costs the provider a signal; a wake-up costs a context switch; without wait fds a message may wait up to [`FALLBACK_SLEEP`] (plus the kernel's timer slack) |
//! | [`WaitPolicy::Auto`] (default) | Spin, or Block when oversubscribed | | |
//!
//! "Oversubscribed" means this host runs more ranks of the job than this process may use
//! cores (`sched_getaffinity`, limited by a cgroup CPU quota:
//! [`std::thread::available_parallelism`]); the ranks on the host are counted from the
//! cards every rank publishes. When the policy may block, the CQs are opened with
//! `FI_WAIT_FD` (the launcher's local size, else the world size, stands for the ranks on the
//! host at that point); CQs of a spinning rank get no wait object, which costs nothing.
//!
//! Why Block and not Yield when oversubscribed: with 4 ranks on this 2-core machine, Block
//! was even with Yield on a quiet host and, while other processes ran, 2-4x faster over TCP
//! and for a halo exchange, and within the noise for shm allreduces. Our reading: a rank
//! woken from a sleep or a fd is scheduled ahead of CPU-bound processes, where a yielding
//! rank stays runnable and may wait out their time slices. Open MPI yields instead.
//!
//! Which providers give a wait fd (libfabric 1.17, efa-fabric's `tests/cq_wait.rs`):
//! `tcp;ofi_rxm` and `sockets` do and wake a blocked reader when a message arrives; `shm` and
//! `udp;ofi_rxd` give none, so over shm Block yields and then sleeps in
//! [`FALLBACK_SLEEP`] steps; `net`'s fd never lets a reader sleep (Block then polls).
//!
//! Block slices are bounded so that deadlines, peers' liveness checks and carriers without a
//! wait fd (a shared-memory ring polled by the engine, such as our own intra-host channel,
//! which must count itself through `WaitSet::new`'s `fdless_carriers`) are still looked at:
//! such a message is seen at the latest [`FALLBACK_SLEEP`] later. Yield sees it at the next
//! poll.
//!
//! Measured with `bench/oversubscribed.sh` (README, "Oversubscription").
//!
//! Set the policy with `EFA_WAIT=spin|yield|block|auto` or
//! [`CommunicatorBuilder::wait`](crate::CommunicatorBuilder::wait) (the builder wins). The
//! choice is logged at debug level (`efa_core::wait`: requested, chosen, ranks on the host,
//! cores, CQs with a wait fd).

use std::sync::Arc;
use std::time::Duration;

use efa_fabric::{CompletionQueue, Woken};

use crate::setting::SettingError;

/// How a waiting rank idles between polls of its completion queues (see the
/// [module docs](self) for the trade-offs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitPolicy {
    /// [`WaitPolicy::Yield`] when this host runs more ranks of the job than this process
    /// may use cores, else [`WaitPolicy::Spin`].
    #[default]
    Auto,
    /// Busy polling: lowest latency; needs a core per rank.
    Spin,
    /// Polling with `sched_yield` between idle polls (Open MPI's `mpi_yield_when_idle`).
    Yield,
    /// After a short spin and yield, blocking on the completion queues' wait fds
    /// (`FI_WAIT_FD`, `fi_trywait(3)`, `poll(2)`) in bounded slices.
    Block,
}

impl WaitPolicy {
    /// The name `EFA_WAIT` takes.
    pub fn name(self) -> &'static str {
        match self {
            WaitPolicy::Auto => "auto",
            WaitPolicy::Spin => "spin",
            WaitPolicy::Yield => "yield",
            WaitPolicy::Block => "block",
        }
    }
}

impl std::fmt::Display for WaitPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The accepted values of `EFA_WAIT`.
pub(crate) const WAIT_FORMS: &str = "spin, yield, block or auto (default auto)";

/// Parses `EFA_WAIT`'s value (case-insensitive, surrounding blanks ignored).
pub(crate) fn parse_wait(v: &str) -> Option<WaitPolicy> {
    match v.trim().to_ascii_lowercase().as_str() {
        "auto" => Some(WaitPolicy::Auto),
        "spin" => Some(WaitPolicy::Spin),
        "yield" => Some(WaitPolicy::Yield),
        "block" => Some(WaitPolicy::Block),
        _ => None,
    }
}

/// `EFA_WAIT`, if set.
///
/// # Errors
/// [`SettingError`] naming `EFA_WAIT` for a value other than [`WAIT_FORMS`].
pub(crate) fn wait_from_env() -> Result<Option<WaitPolicy>, SettingError> {
    let Some(v) = crate::setting::env_var("EFA_WAIT", WAIT_FORMS)? else {
        return Ok(None);
    };
    match parse_wait(&v) {
        Some(p) => Ok(Some(p)),
        None => Err(SettingError::env(
            "EFA_WAIT",
            v,
            "is not a wait policy",
            WAIT_FORMS,
        )),
    }
}

/// True when this host runs more of the job's ranks than this process may use cores.
pub(crate) fn oversubscribed(ranks_on_host: u32, cores: usize) -> bool {
    ranks_on_host as usize > cores.max(1)
}

/// Whether the completion queues should be opened with wait fds (`FI_WAIT_FD`): when the
/// policy may block on them. A wait object costs the provider a signal per completion, so
/// CQs of a rank that spins get none.
pub(crate) fn wants_wait_fds(requested: WaitPolicy, ranks_on_host: u32, cores: usize) -> bool {
    choose(requested, ranks_on_host, cores) == WaitPolicy::Block
}

/// The policy to use: `requested` unless it is [`WaitPolicy::Auto`], which becomes
/// [`WaitPolicy::Block`] when `ranks_on_host` (this job's ranks on this host) exceeds `cores`
/// (the cores this process may run on), else [`WaitPolicy::Spin`]. Never returns `Auto`.
pub(crate) fn choose(requested: WaitPolicy, ranks_on_host: u32, cores: usize) -> WaitPolicy {
    match requested {
        WaitPolicy::Auto if oversubscribed(ranks_on_host, cores) => WaitPolicy::Block,
        WaitPolicy::Auto => WaitPolicy::Spin,
        p => p,
    }
}

/// The cores this process may run on (`sched_getaffinity`, limited by a cgroup CPU quota:
/// [`std::thread::available_parallelism`]); 1 when unknown.
pub(crate) fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Under [`WaitPolicy::Spin`], idle polls between two `sched_yield`s (so that a host busier
/// than planned, e.g. several jobs at once, still lets the other processes run).
pub const SPIN_YIELD_EVERY: u32 = 128;
/// Under [`WaitPolicy::Block`], idle polls (each followed by a `sched_yield`) before the first
/// block.
pub const BLOCK_AFTER: u32 = 64;
/// Under [`WaitPolicy::Block`], the longest single block on the CQs' wait fds: bounds how late
/// a deadline, a liveness check or a message through a carrier without a wait fd is seen.
pub const BLOCK_SLICE: Duration = Duration::from_millis(1);
/// Under [`WaitPolicy::Block`], the sleep used instead when a CQ has no wait fd.
pub const FALLBACK_SLEEP: Duration = Duration::from_micros(50);

/// A communicator's resolved wait policy and the completion queues it may block on.
#[derive(Debug)]
pub(crate) struct WaitSet {
    policy: WaitPolicy,
    /// Longest single block: [`BLOCK_SLICE`] when every carrier of messages has a wait fd,
    /// else [`FALLBACK_SLEEP`] (a message through a carrier without one is seen only when
    /// the block ends).
    slice: std::time::Duration,
    /// The CQs of the endpoints in use, to block on and to detect progress by.
    cqs: Vec<CompletionQueue>,
}

impl WaitSet {
    /// A wait set for `policy` (resolved: not [`WaitPolicy::Auto`]) over `cqs`. Also sets
    /// how efa-fabric's own retry loops idle ([`efa_fabric::set_idle_mode`]); that setting is
    /// per process, so with several world communicators (of different jobs) in one process
    /// the last one built sets it.
    ///
    /// `fdless_carriers` counts what else the engine polls for messages that has no wait
    /// fd (e.g. shared-memory rings); CQs without a wait fd count the same way.
    pub(crate) fn new(
        policy: WaitPolicy,
        cqs: Vec<CompletionQueue>,
        fdless_carriers: usize,
    ) -> WaitSet {
        debug_assert!(policy != WaitPolicy::Auto);
        efa_fabric::set_idle_mode(match policy {
            WaitPolicy::Spin | WaitPolicy::Auto => efa_fabric::IdleMode::SpinYieldSleep,
            WaitPolicy::Yield | WaitPolicy::Block => efa_fabric::IdleMode::Yield,
        });
        let all_fds = fdless_carriers == 0 && cqs.iter().all(|c| c.wait_fd().is_some());
        let slice = if all_fds { BLOCK_SLICE } else { FALLBACK_SLEEP };
        WaitSet { policy, slice, cqs }
    }

    /// The policy in force.
    pub(crate) fn policy(&self) -> WaitPolicy {
        self.policy
    }

    /// Completions delivered so far by all CQs (changes exactly when one is delivered).
    fn delivered(&self) -> u64 {
        self.cqs
            .iter()
            .fold(0u64, |a, cq| a.wrapping_add(cq.delivered()))
    }

    /// A waiter for one blocking call.
    pub(crate) fn waiter(self: &Arc<Self>) -> Waiter {
        Waiter {
            set: self.clone(),
            idle: 0,
            seen: self.delivered(),
        }
    }
}

/// One blocking call's state under its communicator's [`WaitSet`]: call
/// [`Waiter::idle`] after each poll that did not finish the call. A completion delivered by
/// anyone since the last call counts as progress and starts the policy over (spin first).
#[derive(Debug)]
pub(crate) struct Waiter {
    set: Arc<WaitSet>,
    /// Idle polls since the last progress.
    idle: u32,
    /// [`WaitSet::delivered`] at the last progress.
    seen: u64,
}

impl Waiter {
    /// Starts over (after progress the caller saw by other means than CQ completions).
    pub(crate) fn progressed(&mut self) {
        self.idle = 0;
    }

    /// Idles once, as the policy says. Returns quickly: at most [`BLOCK_SLICE`] (Block),
    /// a yield or a pause otherwise, so the caller's deadline and failure checks keep running.
    pub(crate) fn idle(&mut self) {
        let now = self.set.delivered();
        if now != self.seen {
            self.seen = now;
            self.idle = 0;
        }
        self.idle = self.idle.saturating_add(1);
        match self.set.policy {
            WaitPolicy::Spin | WaitPolicy::Auto => {
                if self.idle.is_multiple_of(SPIN_YIELD_EVERY) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            // Yielding at once measured faster than spinning a few polls first (4 ranks on
            // 2 cores): a peer with work on this core runs sooner.
            WaitPolicy::Yield => std::thread::yield_now(),
            WaitPolicy::Block => {
                if self.idle <= BLOCK_AFTER {
                    std::thread::yield_now();
                } else {
                    self.block();
                }
            }
        }
    }

    fn block(&mut self) {
        match efa_fabric::block_on(&self.set.cqs, self.set.slice) {
            Ok(Woken::Ready) | Ok(Woken::TimedOut) => {}
            Ok(Woken::NoWaitObject) => std::thread::sleep(FALLBACK_SLEEP),
            Err(e) => {
                // The next poll of the CQs reports a broken CQ; idle as without a wait fd.
                tracing::debug!("blocking on the completion queues failed: {e}");
                std::thread::sleep(FALLBACK_SLEEP);
            }
        }
    }
}

/// Logs the choice (debug level) and returns it.
pub(crate) fn log_choice(
    requested: WaitPolicy,
    chosen: WaitPolicy,
    ranks_on_host: u32,
    cores: usize,
    fds: usize,
    cqs: usize,
) -> WaitPolicy {
    tracing::debug!(
        %requested,
        %chosen,
        ranks_on_host,
        cores,
        wait_fds = fds,
        cqs,
        "wait policy"
    );
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Auto spins unless ranks on this host outnumber its cores, and then blocks. An
    /// explicit policy is kept whatever the host; wait fds are wanted exactly when the policy
    /// may block.
    #[test]
    fn auto_spins_unless_oversubscribed() {
        for (ranks, cores, want) in [
            (1, 1, WaitPolicy::Spin),
            (2, 2, WaitPolicy::Spin),
            (2, 8, WaitPolicy::Spin),
            (3, 2, WaitPolicy::Block),
            (4, 2, WaitPolicy::Block),
            (64, 32, WaitPolicy::Block),
            (2, 1, WaitPolicy::Block),
            // No core known counts as one.
            (1, 0, WaitPolicy::Spin),
            (2, 0, WaitPolicy::Block),
        ] {
            assert_eq!(
                choose(WaitPolicy::Auto, ranks, cores),
                want,
                "{ranks} ranks on {cores} cores"
            );
            assert_eq!(
                wants_wait_fds(WaitPolicy::Auto, ranks, cores),
                want == WaitPolicy::Block,
                "{ranks} ranks on {cores} cores"
            );
        }
        for p in [WaitPolicy::Spin, WaitPolicy::Yield, WaitPolicy::Block] {
            for (ranks, cores) in [(1, 8), (8, 1), (4, 2)] {
                assert_eq!(choose(p, ranks, cores), p);
                assert_eq!(wants_wait_fds(p, ranks, cores), p == WaitPolicy::Block);
            }
        }
    }

    #[test]
    fn env_values() {
        assert_eq!(parse_wait(" Block "), Some(WaitPolicy::Block));
        assert_eq!(parse_wait("SPIN"), Some(WaitPolicy::Spin));
        assert_eq!(parse_wait("yield"), Some(WaitPolicy::Yield));
        assert_eq!(parse_wait("auto"), Some(WaitPolicy::Auto));
        assert_eq!(parse_wait("sleep"), None);
        assert_eq!(parse_wait(""), None);
        for p in [
            WaitPolicy::Auto,
            WaitPolicy::Spin,
            WaitPolicy::Yield,
            WaitPolicy::Block,
        ] {
            assert_eq!(parse_wait(p.name()), Some(p));
        }
    }
}
