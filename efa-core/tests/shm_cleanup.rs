//! Nothing left behind in `/dev/shm`: a 2-rank job over shm that exits cleanly leaves no
//! region, and the regions of a job whose rank was killed with SIGKILL are removed by the
//! next job that starts on the host.
//!
//! Other jobs on the host have regions of their own, so only the files whose names carry the
//! pids of the ranks started here are counted (the ranks print their pids).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use efa_core::{Communicator, ReduceOp, Source, Tag, Transport};
use efa_fabric::shm::{parse_region_name, SHM_DIR};

mod common;
use common::{efarun, in_job};

/// The regions in /dev/shm that efa-rs named for any of `pids`.
fn regions_of(pids: &BTreeSet<u32>) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(SHM_DIR) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(parse_region_name)
                .is_some_and(|o| pids.contains(&o.pid))
        })
        .map(|e| e.path())
        .collect()
}

/// All regions in /dev/shm that efa-rs named (every job's, for the log).
fn all_regions() -> usize {
    std::fs::read_dir(SHM_DIR).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().and_then(parse_region_name).is_some())
            .count()
    })
}

/// Values of `KEY <n>` lines in a job's output (lines may carry efarun's `[rank]` prefix).
fn values(out: &Output, key: &str) -> Vec<u32> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let i = l.find(key)?;
            l[i + key.len()..].split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Traffic of every size class over the shm route (inject, eager, rendezvous), a ring
/// exchange and an allreduce, every byte checked. Returns this rank's regions while open.
fn exchange(comm: &Communicator) -> usize {
    let (me, n) = (comm.rank(), comm.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    let route = comm.route(next).unwrap();
    assert_eq!(
        route.transport,
        Transport::Shm,
        "ranks on one host talk over shm ({})",
        route.reason
    );
    for (i, len) in [8usize, 5000, 1 << 20].into_iter().enumerate() {
        let out: Vec<u8> = (0..len).map(|k| (k as u8) ^ (me as u8) ^ i as u8).collect();
        let req = comm.isend(&out, next, i as u32).unwrap();
        let mut got = vec![0u8; len];
        let st = comm
            .recv(&mut got, Source::Rank(prev), Tag::Is(i as u32))
            .unwrap();
        assert_eq!(st.len, len);
        let want: Vec<u8> = (0..len)
            .map(|k| (k as u8) ^ (prev as u8) ^ i as u8)
            .collect();
        assert!(
            got == want,
            "message {i} of {len} bytes from rank {prev} differs"
        );
        req.wait().unwrap();
    }
    let mut v = vec![me as u64 + 1; 1024];
    comm.allreduce(&mut v, ReduceOp::Sum).unwrap();
    let sum = (1..=n as u64).sum::<u64>();
    assert!(v.iter().all(|&x| x == sum));
    let mine = regions_of(&BTreeSet::from([std::process::id()]));
    assert!(
        !mine.is_empty(),
        "an open shm endpoint has a region in {SHM_DIR}"
    );
    mine.len()
}

#[test]
#[ignore = "rank program for no_shm_region_is_left_behind"]
fn child_clean_rank() {
    if !in_job() {
        return;
    }
    let pid = std::process::id();
    println!("RANK_PID {pid}");
    {
        let comm = Communicator::init().expect("init");
        println!("REGIONS_OPEN {}", exchange(&comm));
    }
    // Dropping the communicator closed its endpoints, before the process exits.
    let left = regions_of(&BTreeSet::from([pid]));
    println!("REGIONS_AFTER_DROP {}", left.len());
    assert!(
        left.is_empty(),
        "left after the communicator was dropped: {left:?}"
    );
}

#[test]
#[ignore = "rank program for no_shm_region_is_left_behind"]
fn child_killed_rank() {
    if !in_job() {
        return;
    }
    let pid = std::process::id();
    println!("RANK_PID {pid}");
    let comm = Communicator::init().expect("init");
    let open = exchange(&comm);
    if comm.rank() == 1 {
        println!("KILLED {pid} REGIONS {open}");
        nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        std::thread::sleep(Duration::from_secs(60));
    } else {
        // Waits for a message that never comes; efarun stops this rank when rank 1 dies.
        let _ = comm.recv(&mut [0u8; 1], Source::Rank(1), Tag::Is(99));
    }
}

fn pids_of(out: &Output) -> BTreeSet<u32> {
    let pids: BTreeSet<u32> = values(out, "RANK_PID ").into_iter().collect();
    assert_eq!(pids.len(), 2, "both ranks printed their pid");
    pids
}

/// One test, so that no other job of this binary reclaims the killed job's regions before
/// they are counted.
#[test]
fn no_shm_region_is_left_behind() {
    let env = [("EFA_TRANSPORTS", "shm,ip")];
    println!(
        "/dev/shm before: {} efa-rs region(s) of any job",
        all_regions()
    );

    // (a) A clean job.
    let out = efarun(2, "child_clean_rank", &env);
    assert!(out.status.success(), "clean job failed");
    let clean = pids_of(&out);
    assert_eq!(
        values(&out, "REGIONS_OPEN ").len(),
        2,
        "both ranks had a region open"
    );
    assert_eq!(values(&out, "REGIONS_AFTER_DROP "), [0, 0]);
    let left = regions_of(&clean);
    println!(
        "clean job (pids {clean:?}): {} region(s) left; /dev/shm now {} efa-rs region(s)",
        left.len(),
        all_regions()
    );
    assert!(left.is_empty(), "a clean job left {left:?}");

    // (b) A job whose rank 1 is killed with SIGKILL mid-run.
    let out = efarun(2, "child_killed_rank", &env);
    assert!(!out.status.success(), "the killed job fails");
    let killed = pids_of(&out);
    assert_eq!(values(&out, "KILLED ").len(), 1, "rank 1 killed itself");
    let left = regions_of(&killed);
    println!(
        "killed job (pids {killed:?}): {} region(s) left: {left:?}",
        left.len()
    );
    // Normally rank 1's region is left (rank 0 got SIGTERM first, whose handler unlinks),
    // and the next job must remove it. Not asserted: any job that opens an shm endpoint on
    // this host meanwhile reclaims it first, which is the behaviour under test as well. The
    // ranks asserted that their regions existed while open, and on a library that does not
    // reclaim, the check after the next job fails whoever else runs.
    if left.is_empty() {
        println!("the killed job's regions were already reclaimed by another job on this host");
    }

    // The next job on the host reclaims them.
    let out = efarun(2, "child_clean_rank", &env);
    assert!(out.status.success(), "the next job failed");
    let next = pids_of(&out);
    let still = regions_of(&killed);
    println!(
        "after the next job (pids {next:?}): {} region(s) of the killed job, {} of the next job; \
         /dev/shm now {} efa-rs region(s)",
        still.len(),
        regions_of(&next).len(),
        all_regions()
    );
    assert!(still.is_empty(), "not reclaimed: {still:?}");
    assert!(regions_of(&next).is_empty());
}
