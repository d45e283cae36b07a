//! The wait policy (`EFA_WAIT`, `CommunicatorBuilder::wait`): every policy, forced, runs a
//! 4-rank job correctly on shm and on IP, and a wait on a silent peer reports its deadline
//! on time under each of them (Block included: it blocks in bounded slices, so the deadline
//! is still looked at). Timing is measured in benchmarks (bench/oversubscribed.sh), not here.

mod common;

use std::time::{Duration, Instant};

use common::in_job;
use efa_core::{Communicator, Error, PeerFailure, ReduceOp, WaitPolicy};

const POLICIES: [(&str, WaitPolicy); 3] = [
    ("spin", WaitPolicy::Spin),
    ("yield", WaitPolicy::Yield),
    ("block", WaitPolicy::Block),
];

fn expected_policy() -> WaitPolicy {
    let v = std::env::var("EFA_WAIT").expect("the test sets EFA_WAIT");
    POLICIES
        .iter()
        .find(|(n, _)| *n == v)
        .map(|(_, p)| *p)
        .unwrap_or_else(|| panic!("EFA_WAIT={v} is not a forced policy"))
}

/// Runs child `name` as 4 ranks with `EFA_WAIT=policy` over `transports`; the job must
/// succeed.
fn job(name: &str, policy: &str, transports: &str, extra: &[(&str, &str)]) {
    let mut env = vec![("EFA_WAIT", policy), ("EFA_TRANSPORTS", transports)];
    env.extend_from_slice(extra);
    let out = common::efarun(4, name, &env);
    assert!(
        out.status.success(),
        "{name} with EFA_WAIT={policy} over {transports} failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let done = text.matches("wait-test-done").count();
    assert_eq!(done, 4, "every rank must report done:\n{text}");
}

/// Child: collectives and a halo exchange, results checked exactly, under the forced policy.
#[test]
#[ignore]
fn child_work() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let want = expected_policy();
    assert_eq!(comm.wait_policy(), want, "EFA_WAIT was not applied");
    let (me, n) = (comm.rank(), comm.size());
    for count in [1usize << 10, 16 << 10, 256 << 10] {
        let mut v: Vec<f32> = (0..count).map(|i| ((i + me as usize) % 5) as f32).collect();
        comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
        for (i, &x) in v.iter().enumerate() {
            let e: f32 = (0..n).map(|r| ((i + r as usize) % 5) as f32).sum();
            assert_eq!(x, e, "rank {me}: allreduce of {count} floats, element {i}");
        }
    }
    let (left, right) = ((me + n - 1) % n, (me + 1) % n);
    for it in 0..50u32 {
        let to_l = vec![me * 1000 + it; 128];
        let to_r = vec![me * 1000 + it + 500; 128];
        let mut from_l = vec![0u32; 128];
        let mut from_r = vec![0u32; 128];
        let rl = comm.irecv(&mut from_l, left, 1).unwrap();
        let rr = comm.irecv(&mut from_r, right, 0).unwrap();
        let sl = comm.isend(&to_l, left, 0).unwrap();
        let sr = comm.isend(&to_r, right, 1).unwrap();
        comm.wait_all(vec![rl.into(), rr.into(), sl.into(), sr.into()])
            .unwrap();
        assert!(from_l.iter().all(|&x| x == left * 1000 + it + 500));
        assert!(from_r.iter().all(|&x| x == right * 1000 + it));
    }
    comm.barrier().unwrap();
    println!("rank {me}: policy {} wait-test-done", comm.wait_policy());
    comm.finalize().unwrap();
}

/// The deadline of the silent-peer child (`EFA_TIMEOUT`; it also bounds joining, which takes
/// a few seconds when several jobs share the 2 cores).
const SILENT_TIMEOUT: Duration = Duration::from_secs(4);
/// How late after the deadline the timeout may be reported (generous: 2 loaded cores).
const REPORT_SLACK: Duration = Duration::from_secs(3);

/// Child: the last rank stays silent (alive, not calling the library) past the deadline;
/// every other rank's receive from it must fail with a timeout naming it, no earlier than the
/// deadline and well before a blocked waiter would notice without bounded slices.
#[test]
#[ignore]
fn child_silent_peer() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    assert_eq!(comm.wait_policy(), expected_policy());
    assert_eq!(comm.timeout(), SILENT_TIMEOUT, "the test sets EFA_TIMEOUT");
    let (me, n) = (comm.rank(), comm.size());
    let silent = n - 1;
    comm.barrier().unwrap();
    if me == silent {
        // Longer than the others may take to report: the messages this rank sends when it
        // ends (finalize) must not be what wakes them.
        std::thread::sleep(SILENT_TIMEOUT + REPORT_SLACK + Duration::from_secs(1));
        println!("rank {me}: silent rank wait-test-done");
        return;
    }
    let t = Instant::now();
    let mut buf = [0u8; 8];
    let err = comm.recv(&mut buf, silent, 9).unwrap_err();
    let took = t.elapsed();
    // This rank's own deadline passed (a timeout naming the silent rank), or another rank's
    // did first and it told everyone (the silent rank failed: timed out).
    match err {
        Error::Timeout { peer, waited, .. } => {
            assert_eq!(peer, Some(silent), "the timeout names the silent rank");
            assert!(waited >= SILENT_TIMEOUT, "reported after {waited:?}");
        }
        Error::PeerFailed {
            rank,
            cause: PeerFailure::TimedOut { waited },
        } => {
            assert_eq!(rank, silent, "the failure names the silent rank");
            assert!(waited >= SILENT_TIMEOUT, "reported after {waited:?}");
        }
        other => panic!("rank {me}: expected a timeout naming rank {silent}, got {other}"),
    }
    assert!(
        took >= SILENT_TIMEOUT / 2,
        "rank {me}: gave up after {took:?}, long before the deadline"
    );
    assert!(
        took < SILENT_TIMEOUT + REPORT_SLACK,
        "rank {me}: the deadline ({SILENT_TIMEOUT:?}) was reported after {took:?}"
    );
    println!(
        "rank {me}: policy {} timed out after {took:?} wait-test-done",
        comm.wait_policy()
    );
}

#[test]
fn every_policy_runs_4_ranks_correctly_on_shm() {
    for (name, _) in POLICIES {
        job("child_work", name, "shm", &[]);
    }
}

#[test]
fn every_policy_runs_4_ranks_correctly_on_ip() {
    for (name, _) in POLICIES {
        job("child_work", name, "ip", &[]);
    }
}

#[test]
fn a_silent_peer_is_reported_at_the_deadline_under_every_policy_shm() {
    for (name, _) in POLICIES {
        job("child_silent_peer", name, "shm", &[("EFA_TIMEOUT", "4")]);
    }
}

#[test]
fn a_silent_peer_is_reported_at_the_deadline_under_every_policy_ip() {
    for (name, _) in POLICIES {
        job("child_silent_peer", name, "ip", &[("EFA_TIMEOUT", "4")]);
    }
}

/// A bad `EFA_WAIT` is a setting error naming the variable, before anything waits.
#[test]
fn a_bad_efa_wait_is_a_setting_error() {
    let out = common::efarun(1, "child_bad_wait", &[("EFA_WAIT", "sleepy")]);
    assert!(out.status.success(), "{}", out.status);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("wait-test-done"),
        "the child did not run"
    );
}

/// Child of [`a_bad_efa_wait_is_a_setting_error`].
#[test]
#[ignore]
fn child_bad_wait() {
    if !in_job() {
        return;
    }
    let err = Communicator::init().unwrap_err();
    let Error::Setting(s) = &err else {
        panic!("expected a setting error, got {err}");
    };
    assert_eq!(s.var(), Some("EFA_WAIT"));
    assert!(s.to_string().contains("sleepy"), "{s}");
    assert!(s.to_string().contains("spin, yield, block or auto"), "{s}");
    // The builder wins over the variable.
    let comm = Communicator::builder()
        .wait(WaitPolicy::Yield)
        .build()
        .unwrap();
    assert_eq!(comm.wait_policy(), WaitPolicy::Yield);
    assert_eq!(comm.config().wait(), WaitPolicy::Yield);
    println!("wait-test-done");
}

/// Without `EFA_WAIT`, the policy follows the ranks on this host against its cores: 4 ranks
/// on this host block when they outnumber the cores this process may use, and spin otherwise;
/// a single rank always spins.
#[test]
fn auto_policy_follows_ranks_per_core() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for n in [1u32, 4] {
        let want = if n as usize > cores { "block" } else { "spin" };
        let mut cmd = common::efarun_command(n, "child_auto");
        cmd.env_remove("EFA_WAIT").env("WAIT_EXPECT", want);
        let out = cmd.output().expect("run efarun");
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "{n} ranks on {cores} cores: {}",
            out.status
        );
        assert_eq!(
            text.matches("wait-test-done").count(),
            n as usize,
            "{n} ranks on {cores} cores"
        );
    }
}

/// Child of [`auto_policy_follows_ranks_per_core`].
#[test]
#[ignore]
fn child_auto() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let want = std::env::var("WAIT_EXPECT").unwrap();
    assert_eq!(comm.config().wait(), WaitPolicy::Auto);
    assert_eq!(comm.wait_policy().name(), want, "rank {}", comm.rank());
    comm.barrier().unwrap();
    println!("rank {}: auto chose {want} wait-test-done", comm.rank());
    comm.finalize().unwrap();
}
