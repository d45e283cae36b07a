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
                    "kill" => matches!(cause, PeerFailure::Exited { pid: Some(_), .. }),
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

fn start(fault: &str, n: u32) -> Vec<Child> {
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
                .env("EFA_TIMEOUT", "30")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a rank")
        })
        .collect()
}

/// Runs the job; returns the survivors' exit codes and the time from the victim's end to
/// the last survivor's.
fn run(fault: &str, transports: &str) -> (Vec<i32>, Duration) {
    std::env::set_var("EFA_TRANSPORTS", transports);
    let mut ranks = start(fault, 3);
    std::env::remove_var("EFA_TRANSPORTS");
    let victim = ranks.remove(VICTIM as usize);
    let out = victim.wait_with_output().unwrap();
    let t0 = Instant::now();
    eprintln!(
        "victim ({fault}) ended: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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
    println!("{fault} over {transports}: survivors exited {codes:?}, {took:?} after the victim");
    (codes, took)
}

fn check(fault: &str, transports: &str) {
    let (codes, took) = run(fault, transports);
    assert_eq!(
        codes,
        vec![0, 0],
        "every survivor must fail naming rank {VICTIM} ({fault}, {transports})"
    );
    assert!(
        took < Duration::from_secs(2),
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
