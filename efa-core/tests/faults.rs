//! Failures reach everyone, quickly, with the culprit named.
//!
//! Three ranks run allreduces in a loop, started without efarun (which would stop the job
//! at the first death) in the bare launcher environment that Kubernetes training operators
//! set (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; rank 0 serves the store). One
//! rank then dies (SIGKILL), aborts (`Communicator::abort`), or panics; every survivor's
//! loop must end within 2 s with an error that names that rank and how it ended.
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use efa_core::{Communicator, Error, PeerFailure, ReduceOp};

/// The rank that fails.
const VICTIM: u32 = 1;

/// One rank: allreduces until an error; the victim fails after 20 of them as
/// `EFA_FAULT` says. A survivor prints its error and exits 0 if it names the victim, 3 if
/// not.
#[test]
#[ignore = "a rank of the fault jobs, started by the tests below"]
fn fault_rank() {
    let Ok(fault) = std::env::var("EFA_FAULT") else {
        return;
    };
    let comm = Communicator::init().expect("init");
    let me = comm.rank();
    if fault == "none-bulk" {
        // No fault: large transfers between ranks on different hosts, which keep the
        // transport's queues full for seconds, must not be taken for a dead peer.
        let n = comm.size();
        let len = 256 << 20;
        let data = vec![me as u8; len];
        let mut got = vec![0u8; len];
        for round in 0..3 {
            let req = comm.isend(&data, (me + 1) % n, round).expect("isend");
            let st = comm.recv(&mut got, (me + n - 1) % n, round);
            if let Err(e) = st.and_then(|_| req.wait()) {
                eprintln!("rank {me}: round {round}: {e}");
                std::process::exit(3);
            }
            assert!(got.iter().all(|&b| b == ((me + n - 1) % n) as u8));
        }
        comm.finalize().expect("finalize");
        std::process::exit(0);
    }
    let mut v = vec![1.0f32; 4096];
    let mut i = 0u64;
    let err = loop {
        if me == VICTIM && i == 20 {
            match fault.as_str() {
                "kill" => {
                    let _ = Command::new("kill")
                        .args(["-KILL", &std::process::id().to_string()])
                        .status();
                    std::thread::sleep(Duration::from_secs(60));
                }
                "abort" => comm.abort(7, "input file is corrupt"),
                "stop" => {
                    let _ = Command::new("kill")
                        .args(["-STOP", &std::process::id().to_string()])
                        .status();
                    std::thread::sleep(Duration::from_secs(60));
                }
                "panic" => panic!("the victim panics on purpose"),
                other => panic!("unknown fault {other}"),
            }
        }
        if let Err(e) = comm.allreduce(&mut v, ReduceOp::Max) {
            break e;
        }
        i += 1;
    };
    eprintln!("rank {me}: after {i} allreduces: {err}");
    let named = match &err {
        Error::PeerFailed { rank, cause } => {
            *rank == VICTIM
                && match fault.as_str() {
                    "kill" if std::env::var_os("EFA_HOST_ID").is_some() => {
                        // When this rank saw the transport fail, the fabric error is the
                        // source of the cause.
                        let fabric = std::error::Error::source(&err)
                            .and_then(|c| c.source())
                            .and_then(|f| f.downcast_ref::<efa_fabric::Error>());
                        eprintln!("rank {me}: fabric error behind it: {fabric:?}");
                        matches!(cause, PeerFailure::Unreachable { source, .. }
                            if source.is_some() == fabric.is_some())
                    }
                    "kill" => matches!(cause, PeerFailure::Exited { pid: Some(_), .. }),
                    "stop" => matches!(cause, PeerFailure::Stopped { .. }),
                    "abort" => {
                        matches!(cause, PeerFailure::Aborted { code: 7, reason } if reason == "input file is corrupt")
                    }
                    _ => matches!(cause, PeerFailure::Aborted { code: 101, .. }),
                }
        }
        _ => false,
    };
    std::process::exit(if named { 0 } else { 3 });
}

fn free_port() -> u16 {
    // The store listens on MASTER_PORT + 1 (MASTER_PORT is torch's own store).
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 65_000 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// Starts `n` ranks. `separate_hosts` gives each its own host id (`EFA_HOST_ID`), so that
/// none watches another's pid. (Settings are passed per child, never through this process's
/// environment: the tests run in parallel.)
fn start(fault: &str, n: u32, timeout: &str, transports: &str, separate_hosts: bool) -> Vec<Child> {
    let port = free_port().to_string();
    (0..n)
        .map(|r| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--ignored", "--exact", "fault_rank", "--nocapture"])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("EFA_FAULT", fault)
                .env("EFA_IFACE", "lo")
                .env("EFA_TIMEOUT", timeout)
                .env("EFA_TRANSPORTS", transports)
                .envs(separate_hosts.then(|| ("EFA_HOST_ID", format!("fault-host-{r}"))))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a rank")
        })
        .collect()
}

/// Runs the job; returns the survivors' exit codes and the time from the victim's end to
/// the last survivor's.
fn run(fault: &str, transports: &str, separate_hosts: bool) -> (Vec<i32>, Duration) {
    let stop = fault == "stop";
    let timeout = if stop { "3" } else { "30" };
    let mut attempt = 1;
    let (ranks, mut victim, t0) = loop {
        let mut ranks = start(fault, 3, timeout, transports, separate_hosts);
        let mut victim = ranks.remove(VICTIM as usize);
        if !stop {
            let status = victim.wait().unwrap();
            eprintln!("victim ({fault}) ended: {status}");
            break (ranks, victim, Instant::now());
        }
        // A stopped victim never ends: time from the moment its state is "stopped".
        let stat = format!("/proc/{}/stat", victim.id());
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut ended = None;
        while !std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('T'))
        }) {
            assert!(Instant::now() < give_up, "the victim never stopped");
            if let Some(status) = victim.try_wait().unwrap() {
                ended = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let Some(status) = ended else {
            break (ranks, victim, Instant::now());
        };
        // The victim ended before its 20th allreduce, so it never stopped: the job failed
        // before the fault (the 3 s deadline also covers start-up, which several jobs at
        // once on 2 cores can exceed). That is not what this test is about: say so, and
        // run the job again, at most twice.
        let out = victim.wait_with_output().unwrap();
        for mut r in ranks {
            let _ = r.kill();
            let _ = r.wait();
        }
        eprintln!(
            "attempt {attempt}: the victim ended ({status}) before the fault: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(attempt < 3, "the job failed before the fault in 3 attempts");
        attempt += 1;
        println!("stop over {transports}: the job failed before the fault; running it again (attempt {attempt})");
    };
    let mut codes = Vec::new();
    for r in ranks {
        let mut r = r;
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(s) = r.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = r.kill();
                break r.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = r.wait_with_output().unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        codes.push(status.code().unwrap_or(-1));
    }
    let took = t0.elapsed();
    let _ = victim.kill();
    let out = victim.wait_with_output().unwrap();
    eprintln!("victim ({fault}): {}", String::from_utf8_lossy(&out.stderr));
    println!("{fault} over {transports}: survivors exited {codes:?}, {took:?} after the victim");
    (codes, took)
}

fn check(fault: &str, transports: &str) {
    check_within(fault, transports, false, Duration::from_secs(2));
}

fn check_within(fault: &str, transports: &str, separate_hosts: bool, limit: Duration) {
    let (codes, took) = run(fault, transports, separate_hosts);
    assert_eq!(
        codes,
        vec![0, 0],
        "every survivor must fail naming rank {VICTIM} ({fault}, {transports})"
    );
    assert!(
        took < limit,
        "survivors took {took:?} to report the {fault} of rank {VICTIM} ({transports})"
    );
}

#[test]
fn killed_rank_is_named_by_every_survivor_within_2s_shm() {
    check("kill", "shm");
}

#[test]
fn killed_rank_is_named_by_every_survivor_within_2s_ip() {
    check("kill", "ip");
}

#[test]
fn abort_reaches_every_rank_with_its_reason() {
    check("abort", "shm,ip");
}

#[test]
fn a_panicking_rank_is_named() {
    check("panic", "shm,ip");
}

/// A stopped rank (SIGSTOP) gives no transport error and no dead pid: the survivors learn
/// of it at their deadline (3 s here), and must then name it, not the neighbour they waited
/// for, within the deadline + 5 s.
#[test]
fn stopped_rank_is_named_at_the_deadline() {
    check_within("stop", "shm,ip", false, Duration::from_secs(8));
}

/// Each rank on a host of its own (`EFA_HOST_ID`), talking over TCP: no pid to watch, so
/// only the transport can tell that the killed rank is gone. Survivors probe the peers
/// they wait for, and the failed send names the rank.
#[test]
fn killed_rank_on_another_host_is_named_within_2s() {
    check_within("kill", "ip", true, Duration::from_secs(2));
}

/// Ranks on hosts of their own moving 256 MiB messages over TCP for several seconds: the
/// liveness probes must not take a busy peer for a dead one.
#[test]
fn bulk_transfers_between_hosts_are_not_failures() {
    let ranks = start("none-bulk", 3, "60", "ip", true);
    for (r, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        eprintln!("rank {r}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "rank {r}: {}", out.status);
    }
}
