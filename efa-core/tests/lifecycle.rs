//! A job's end loses nothing: ranks that return from `main` right after their last operation
//! must not lose a message that the API reported as sent (issue: "nothing lost").
//!
//! Each job does a few allreduces, then a burst of ring sends of every size class (inject,
//! eager through a bounce buffer, rendezvous) and returns at once, without a barrier. Many
//! jobs run at the same time so that ranks are descheduled at the worst moments: a sender
//! that exits while its last messages are still in flight fails the receiver's `recv`.
//!
//! This test has no libtest harness (`harness = false`): a rank must be a plain `main` that
//! returns, as a user's program is. (Run inside libtest's test thread, the same rank lost
//! messages in 1 of 16 jobs instead of 9 of 16: the harness's own exit path hid the race.)
//! Run as a test it runs the job sets below and prints libtest-style result lines; started
//! by `efarun` (`EFA_RANK` set) it is one rank. `EFA_LIFE_JOBS` sets the jobs per set (100),
//! `EFA_LIFE_CONCURRENT` the jobs at once (4).

use std::process::{Command, Stdio};
use std::time::Instant;

use efa_core::{Communicator, ReduceOp, Source, Tag};

mod common;

/// Message sizes of the ring burst, in bytes: inject (below every provider's inject size),
/// eager through a bounce buffer (above shm's 4 KiB inject size, below the eager limits),
/// and rendezvous (above every eager limit, several chunks on none).
const SIZES: [usize; 3] = [8, 5000, 100_000];

fn burst_pattern(from: u32, round: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32 ^ (from << 5) ^ (round << 13)).wrapping_mul(2_654_435_761) as u8)
        .collect()
}

/// One rank of a job: allreduces, then `EFA_LIFE_ROUNDS` rounds of ring sends of each size,
/// every byte checked, then return (drop: no explicit finalize) unless
/// `EFA_LIFE_FINALIZE=1`.
fn lifecycle_rank() {
    let rounds: u32 = std::env::var("EFA_LIFE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let comm = Communicator::init().expect("init");
    let (me, n) = (comm.rank(), comm.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    for i in 0..5 {
        let mut v = vec![me as f32 + i as f32; 1024];
        comm.allreduce(&mut v, ReduceOp::Sum).expect("allreduce");
        let want = (0..n).map(|r| r as f32 + i as f32).sum::<f32>();
        assert!(v.iter().all(|&x| x == want), "allreduce {i}: got {}", v[0]);
    }
    // Post every send first, then receive: the last sends are still in flight when this
    // rank's receives complete and it returns.
    // The size class sent last varies per job (`EFA_LIFE_LAST`): a rendezvous send cannot
    // complete before its receiver has processed everything sent before it, so only a burst
    // that ends with an inject or eager message shows those classes' losses.
    let last: usize = std::env::var("EFA_LIFE_LAST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        % SIZES.len();
    let mut order: Vec<usize> = (1..=SIZES.len())
        .map(|k| SIZES[(last + k) % SIZES.len()])
        .collect();
    // `EFA_LIFE_ONLY=B`: one size only (the job: one 5000-byte ring exchange).
    if let Some(b) = std::env::var("EFA_LIFE_ONLY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        order = vec![b];
    }
    // Every send borrows its data until it completes.
    let outs: Vec<(u32, Vec<u8>)> = (0..rounds)
        .flat_map(|round| {
            order
                .iter()
                .map(move |&len| (round, burst_pattern(me, round, len)))
        })
        .collect();
    let mut sends = Vec::new();
    for (round, data) in &outs {
        sends.push(comm.isend(data, next, *round).expect("isend"));
    }
    // A receiver that is descheduled for a while (here: sleeps, for up to 3 s, longer than
    // efa-fabric's 2 s drain of dropped operations) while its sender returns from `main`.
    let max_delay: u64 = std::env::var("EFA_LIFE_MAX_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if max_delay > 0 && me % 2 == 1 {
        let salt = u64::from(std::process::id()) * 2_654_435_761;
        std::thread::sleep(std::time::Duration::from_millis(salt % max_delay));
    }
    for round in 0..rounds {
        for &len in &order {
            let mut got = vec![0u8; len];
            let st = comm
                .recv(&mut got, Source::Rank(prev), Tag::Is(round))
                .unwrap_or_else(|e| panic!("rank {me}: recv of {len} B round {round}: {e}"));
            assert_eq!(st.len, len);
            assert!(
                got == burst_pattern(prev, round, len),
                "rank {me}: corrupt {len}-byte message from rank {prev}"
            );
        }
    }
    for s in sends {
        s.wait().expect("send wait");
    }
    if std::env::var("EFA_LIFE_FINALIZE").as_deref() == Ok("1") {
        comm.finalize().expect("finalize");
    }
    println!("rank {me}: lifecycle job done");
}

/// Runs `jobs` jobs of 2, 3 and 4 ranks, `concurrent` at a time, with `env`; returns the
/// number that failed, after printing the first failures' output.
fn run_jobs(jobs: usize, concurrent: usize, env: &[(&str, &str)]) -> usize {
    let exe = std::env::current_exe().unwrap();
    let mut failed = 0;
    let mut shown = 0;
    let mut started = 0;
    let concurrent = std::env::var("EFA_LIFE_CONCURRENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(concurrent);
    let t0 = Instant::now();
    while started < jobs {
        let wave: Vec<_> = (0..concurrent.min(jobs - started))
            .map(|k| {
                let n = 2 + ((started + k) % 3) as u32;
                let mut cmd = Command::new(common::efarun_exe());
                cmd.args(["-n", &n.to_string(), "--timeout", "60", "--"])
                    .arg(&exe)
                    .env("EFA_IFACE", "lo")
                    .env("EFA_TIMEOUT", "10")
                    .env("EFA_LIFE_LAST", ((started + k) / 3).to_string())
                    .envs(variant(started + k))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                for (k, v) in env {
                    cmd.env(k, v);
                }
                (n, cmd.spawn().expect("start efarun"))
            })
            .collect();
        started += wave.len();
        for (n, child) in wave {
            let out = child.wait_with_output().expect("wait for efarun");
            let done = String::from_utf8_lossy(&out.stdout)
                .matches("lifecycle job done")
                .count();
            if !out.status.success() || done != n as usize {
                failed += 1;
                if shown < 3 {
                    shown += 1;
                    eprintln!(
                        "job of {n} ranks failed ({}, {done} ranks done):\n{}\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
    }
    println!(
        "{jobs} jobs ({concurrent} at a time, {env:?}): {failed} failed, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    failed
}

/// Job `k`'s burst: one size class only (inject, eager, rendezvous: the last message a rank
/// sends is of that class), or all three; 1 to 3 rounds.
fn variant(k: usize) -> Vec<(&'static str, String)> {
    let rounds = ("EFA_LIFE_ROUNDS", (1 + k % 3).to_string());
    match (k / 2) % 4 {
        3 => vec![rounds],
        c => vec![rounds, ("EFA_LIFE_ONLY", SIZES[c].to_string())],
    }
}

fn jobs_from_env(default: usize) -> usize {
    std::env::var("EFA_LIFE_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Case = (&'static str, fn() -> usize);

/// The job sets: name, and a function returning how many jobs failed.
const CASES: [Case; 4] = [
    ("job_end_loses_nothing_on_shm", || {
        run_jobs(jobs_from_env(100), 4, &[("EFA_TRANSPORTS", "shm")])
    }),
    ("job_end_loses_nothing_on_ip", || {
        run_jobs(jobs_from_env(100), 4, &[("EFA_TRANSPORTS", "ip")])
    }),
    ("job_end_loses_nothing_default_transports", || {
        run_jobs(jobs_from_env(100) / 2, 4, &[])
    }),
    ("explicit_finalize_loses_nothing", || {
        run_jobs(jobs_from_env(100) / 4, 4, &[("EFA_LIFE_FINALIZE", "1")])
    }),
];

fn main() {
    if std::env::var_os("EFA_RANK").is_some() {
        lifecycle_rank();
        return;
    }
    // `cargo test -- FILTER` runs the sets whose name contains FILTER; libtest's own flags
    // (`--nocapture`, `--test-threads`) are accepted and ignored.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, run) in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let bad = run();
        if bad == 0 {
            println!("test {name} ... ok");
            passed += 1;
        } else {
            println!("test {name} ... FAILED: {bad} jobs lost a message or failed");
            failed += 1;
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(101);
    }
}
