//! Shared pieces of the chaos suite: the workload's report events, the data patterns every
//! rank verifies, the seeded random generator and the classification of a run's outcome.
//!
//! Two binaries use them: `chaos-rank` (one rank of a workload, run under `efarun` or in a
//! bare `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` environment) and `efa-chaos` (the
//! driver that starts jobs, injects faults and measures the survivors).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;

use serde::{Deserialize, Serialize};

/// One line of a rank's report file (JSON, one object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The process started (before `Communicator::init`).
    Start {
        /// The rank from the launcher's environment.
        rank: u32,
        /// Its process id.
        pid: u32,
    },
    /// `Communicator::init` returned: every rank's card is known.
    Ready {
        /// The rank.
        rank: u32,
        /// Milliseconds from process start to ready.
        init_ms: u64,
    },
    /// A communicator call failed; the rank exits with [`EXIT_ERROR`].
    Error {
        /// The rank.
        rank: u32,
        /// `init` or `workload` (which includes creating the RMA window).
        phase: String,
        /// The error's text, with its sources.
        msg: String,
        /// Iterations completed before the failure.
        iters: u64,
        /// Milliseconds since the last completed operation: the failure's cause started at
        /// most this long ago.
        since_ok_ms: u64,
    },
    /// A delivered byte or element was wrong; the rank exits with [`EXIT_CORRUPT`].
    Corrupt {
        /// The rank.
        rank: u32,
        /// What was wrong: operation, peer, index, expected and found value.
        msg: String,
        /// The iteration.
        iters: u64,
    },
    /// The workload finished its iterations; the rank exits 0.
    Done {
        /// The rank.
        rank: u32,
        /// Iterations completed.
        iters: u64,
    },
}

/// `chaos-rank`'s exit code when a communicator call failed.
pub const EXIT_ERROR: i32 = 3;
/// `chaos-rank`'s exit code when a wrong byte was delivered.
pub const EXIT_CORRUPT: i32 = 4;
/// `chaos-rank`'s exit code for a bad setting.
pub const EXIT_USAGE: i32 = 2;

/// Byte `j` of the p2p message that rank `src` sends in iteration `iter`.
pub fn p2p_byte(iter: u64, src: u32, j: usize) -> u8 {
    let x = iter
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add(u64::from(src).wrapping_mul(0x85EB_CA6B))
        .wrapping_add(j as u64)
        .wrapping_add((j as u64) >> 8);
    (x ^ (x >> 13)) as u8
}

/// Rank `rank`'s contribution at element `k` of the allreduce in iteration `iter`.
pub fn allreduce_value(rank: u32, iter: u64, k: usize) -> u64 {
    (u64::from(rank) + 1) * (iter + 1) + (k as u64) * 3
}

/// The sum over `n` ranks of [`allreduce_value`], computed by the closed formula (no
/// summation loop shared with the communicator's kernels).
pub fn allreduce_expected(n: u32, iter: u64, k: usize) -> u64 {
    let n = u64::from(n);
    (iter + 1) * n * (n + 1) / 2 + n * (k as u64) * 3
}

/// Element `k` of what rank `writer` puts in iteration `iter`.
pub fn rma_value(iter: u64, writer: u32, k: usize) -> u64 {
    (iter << 40) ^ (u64::from(writer) << 32) ^ (k as u64).wrapping_mul(0x2545_F491)
}

/// SplitMix64: a small, fixed and documented generator, so a seed replays the same runs on
/// every build.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `lo..=hi` (`lo <= hi`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// `kill -9` of one rank at a random moment.
    Kill9,
    /// `SIGSTOP` of one rank, held past the deadline.
    Sigstop,
    /// The rendezvous store's server killed during bootstrap (rank 0 in a bare launcher
    /// environment, `efarun` itself under efarun).
    StoreKill,
}

impl Fault {
    /// All faults, in table order.
    pub const ALL: [Fault; 3] = [Fault::Kill9, Fault::Sigstop, Fault::StoreKill];
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::Kill9 => "kill-9",
            Fault::Sigstop => "sigstop",
            Fault::StoreKill => "store-kill",
        })
    }
}

/// The workload the ranks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    /// Ring exchanges with a rotating shift (every pair over `n - 1` iterations), sizes from
    /// inject to rendezvous, every byte verified.
    P2p,
    /// u64 sum allreduces of 1 to 128 Ki elements, every element verified.
    Allreduce,
    /// Puts into a peer's window, fence, verify the local window, get back and verify.
    Rma,
}

impl Workload {
    /// All workloads, in table order.
    pub const ALL: [Workload; 3] = [Workload::P2p, Workload::Allreduce, Workload::Rma];

    /// Parses the names [`fmt::Display`] prints.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.to_string() == s)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::P2p => "p2p",
            Workload::Allreduce => "allreduce",
            Workload::Rma => "rma",
        })
    }
}

/// How the job is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Launch {
    /// `efarun -n N chaos-rank`; efarun serves the store.
    Efarun,
    /// `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` as torchrun or Kubernetes set
    /// them; rank 0 serves the store.
    Bare,
}

impl fmt::Display for Launch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launch::Efarun => "efarun",
            Launch::Bare => "bare",
        })
    }
}

/// Who failed, as a survivor's error should name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Culprit {
    /// A rank of the job.
    Rank(u32),
    /// The store served by efarun.
    LauncherStore,
    /// The store served by rank 0 (killed with it).
    Rank0Store,
}

/// Whether `text` contains `rank R` as a whole number (so `rank 1` does not match `rank 12`).
pub fn mentions_rank(text: &str, rank: u32) -> bool {
    let needle = format!("rank {rank}");
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(&needle) {
        let end = from + i + needle.len();
        if !lower[end..].starts_with(|c: char| c.is_ascii_digit()) {
            return true;
        }
        from = end;
    }
    false
}

/// Whether an error text names the culprit: `rank V` for a rank, the word `store` for the
/// store (or `rank 0` when rank 0 served it).
pub fn names_culprit(text: &str, culprit: Culprit) -> bool {
    match culprit {
        Culprit::Rank(r) => mentions_rank(text, r),
        Culprit::LauncherStore => text.to_ascii_lowercase().contains("store"),
        Culprit::Rank0Store => {
            text.to_ascii_lowercase().contains("store") || mentions_rank(text, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_names_are_whole_numbers() {
        assert!(mentions_rank("recv with rank 2 did not complete", 2));
        assert!(mentions_rank("Rank 2 (pid 7) exited", 2));
        assert!(!mentions_rank("recv with rank 12 did not complete", 1));
        assert!(mentions_rank("rank 12 and rank 1", 1));
        assert!(!mentions_rank("rank 3", 2));
        assert!(!mentions_rank("Input/output error (-5)", 2));
        assert!(names_culprit("rank 2 (pid 7) exited", Culprit::Rank(2)));
        assert!(!names_culprit(
            "recv with rank 0: Input/output error (-5)",
            Culprit::Rank(2)
        ));
    }

    #[test]
    fn store_faults_need_the_store_named() {
        assert!(names_culprit(
            "TCP store at 127.0.0.1:5 closed the connection",
            Culprit::LauncherStore
        ));
        assert!(!names_culprit("rank 0 exited", Culprit::LauncherStore));
        assert!(names_culprit("rank 0 exited", Culprit::Rank0Store));
        assert!(!names_culprit(
            "recv with rank 1 did not complete",
            Culprit::Rank0Store
        ));
    }

    #[test]
    fn allreduce_formula_matches_a_plain_sum() {
        for n in 1..6 {
            for iter in [0, 1, 77] {
                for k in [0, 5, 1000] {
                    let sum: u64 = (0..n).map(|r| allreduce_value(r, iter, k)).sum();
                    assert_eq!(sum, allreduce_expected(n, iter, k));
                }
            }
        }
    }

    #[test]
    fn patterns_differ_by_iteration_and_sender() {
        let a: Vec<u8> = (0..64).map(|j| p2p_byte(1, 0, j)).collect();
        let b: Vec<u8> = (0..64).map(|j| p2p_byte(2, 0, j)).collect();
        let c: Vec<u8> = (0..64).map(|j| p2p_byte(1, 1, j)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(rma_value(1, 0, 3), rma_value(2, 0, 3));
        assert_ne!(rma_value(1, 0, 3), rma_value(1, 1, 3));
    }

    #[test]
    fn splitmix_is_fixed() {
        // Published first output of SplitMix64 with seed 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut r = SplitMix64::new(42);
        for _ in 0..1000 {
            let v = r.range(3, 4);
            assert!((3..=4).contains(&v));
        }
    }

    #[test]
    fn events_round_trip() {
        let e = Event::Error {
            rank: 1,
            phase: "workload".into(),
            msg: "recv with rank 2: \"x\"".into(),
            iters: 9,
            since_ok_ms: 12,
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.starts_with("{\"event\":\"error\""));
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
    }
}
