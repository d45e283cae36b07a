//! Fast boxes between real processes: the test binary re-runs its own `#[ignore]`d `rank`
//! test as the ranks of a job (settings in `FBOX_*` environment variables), and checks
//! their exit status and what is left in `/dev/shm`.
//!
//! What the ranks check: every message from every sender arrives exactly once, in the order
//! it was sent, intact (sequence number and contents), with rings small enough to be full
//! most of the time and to wrap thousands of times; with 4 ranks every rank receives from 3
//! concurrent senders.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use efa_shm::{reclaim_stale_segments, segment, Config, Error, Fastboxes};

fn job_key(what: &str) -> String {
    format!("test-{what}-{}-{:?}", std::process::id(), Instant::now())
}

fn paths(job: &str, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| segment::segment_path(&segment::segment_name(job, i)))
        .collect()
}

fn spawn_rank(job: &str, me: usize, n: usize, msgs: usize, ring: usize, mode: &str) -> Child {
    spawn_cmd(job, me, n, msgs, ring, mode)
        .spawn()
        .expect("start a rank")
}

fn spawn_cmd(job: &str, me: usize, n: usize, msgs: usize, ring: usize, mode: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "rank",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("FBOX_JOB", job)
    .env("FBOX_ME", me.to_string())
    .env("FBOX_N", n.to_string())
    .env("FBOX_MSGS", msgs.to_string())
    .env("FBOX_RING", ring.to_string())
    .env("FBOX_MODE", mode)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    c
}

/// Runs a job of `n` ranks and asserts each passed; returns their outputs.
fn run_job(job: &str, n: usize, msgs: usize, ring: usize, max: Option<usize>) -> Vec<String> {
    let kids: Vec<Child> = (0..n)
        .map(|me| {
            let mut c = spawn_cmd(job, me, n, msgs, ring, "exchange");
            if let Some(m) = max {
                c.env("FBOX_MAX", m.to_string());
            }
            c.spawn().expect("start a rank")
        })
        .collect();
    kids.into_iter()
        .enumerate()
        .map(|(me, k)| {
            let out = k.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "rank {me} of {n} failed: {}\n{text}",
                out.status
            );
            assert!(
                text.contains("RANK-OK"),
                "rank {me} did not run its checks:\n{text}"
            );
            text
        })
        .collect()
}

/// The message number `i` from `src`: an 12-byte header (sender, number) and a payload
/// whose length and bytes follow from both, from 0 up to the largest the ring takes.
fn payload(src: usize, i: u64, max: usize) -> Vec<u8> {
    let len = ((i as usize).wrapping_mul(2654435761) ^ src) % (max - 12 + 1);
    (0..len)
        .map(|k| (k as u8) ^ (i as u8).wrapping_mul(13) ^ (src as u8))
        .collect()
}

fn header(src: usize, i: u64) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&(src as u32).to_le_bytes());
    h[4..].copy_from_slice(&i.to_le_bytes());
    h
}

/// One rank, run by the tests above in a process of its own.
#[test]
#[ignore = "a rank of the multi-process tests; started by them"]
fn rank() {
    let var =
        |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent test"));
    let job = var("FBOX_JOB");
    let me: usize = var("FBOX_ME").parse().unwrap();
    let n: usize = var("FBOX_N").parse().unwrap();
    let msgs: u64 = var("FBOX_MSGS").parse().unwrap();
    let ring: usize = var("FBOX_RING").parse().unwrap();
    let mode = var("FBOX_MODE");
    let mut cfg = Config::default().ring_bytes(ring);
    if let Ok(m) = std::env::var("FBOX_MAX") {
        cfg = cfg.max_message(m.parse().unwrap());
    }
    let mut fb = Fastboxes::create(&job, me, n, &cfg).unwrap();
    if mode == "create-and-wait" {
        // The cleanup test kills this process: it must not get further.
        println!("CREATED {}", fb.segment_path().display());
        std::thread::sleep(Duration::from_secs(120));
        panic!("not killed");
    }
    if mode == "create-and-exit" {
        // Never detached: `exit` runs no destructor, only the atexit handler.
        println!("CREATED {}", fb.segment_path().display());
        std::process::exit(0);
    }
    fb.attach_all(Duration::from_secs(60)).unwrap();
    let max = fb.max_message();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next_send = vec![0u64; n];
    next_send[me] = msgs;
    let mut expected = vec![0u64; n];
    expected[me] = msgs;
    let mut full = 0u64;
    let mut bad: Option<String> = None;
    while expected.iter().any(|&e| e < msgs) || next_send.iter().any(|&s| s < msgs) {
        assert!(
            Instant::now() < deadline,
            "rank {me}: sent {next_send:?}, received {expected:?} at the deadline"
        );
        for p in (0..n).filter(|&p| p != me) {
            // Send as long as the ring takes them.
            while next_send[p] < msgs {
                let i = next_send[p];
                if fb
                    .try_send(p, &header(me, i), &payload(me, i, max))
                    .unwrap()
                {
                    next_send[p] += 1;
                } else {
                    full += 1;
                    break;
                }
            }
        }
        let got = fb
            .poll(|src, b| {
                if bad.is_some() {
                    return;
                }
                let s = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
                let i = u64::from_le_bytes(b[4..12].try_into().unwrap());
                if s != src || i != expected[src] || b[12..] != payload(src, i, max)[..] {
                    bad = Some(format!(
                        "from {src}: got message ({s}, {i}) of {} bytes, expected number {}",
                        b.len(),
                        expected[src]
                    ));
                }
                expected[src] += 1;
            })
            .unwrap();
        if let Some(b) = &bad {
            panic!("rank {me}: {b}");
        }
        if got == 0 {
            // 2 cores shared by several ranks: let the others run.
            std::thread::yield_now();
        }
    }
    // Nothing more may arrive: no duplicates after the last one.
    std::thread::sleep(Duration::from_millis(20));
    let extra = fb.poll(|_, _| {}).unwrap();
    assert_eq!(extra, 0, "rank {me}: messages after the last");
    // Every peer has mapped our segment, so its name is gone already.
    let path = fb.segment_path().to_owned();
    assert!(
        !path.exists(),
        "rank {me}: {} still linked after every peer attached",
        path.display()
    );
    fb.detach();
    println!("RANK-OK full={full}");
}

/// Two processes exchange 20,000 messages each way through 4 KiB rings, with messages of
/// up to half a ring (2032 bytes, so many laps, pads and full rings); then no segment is
/// left.
#[test]
fn two_processes_order_full_rings_wrap() {
    let job = job_key("two");
    let outs = run_job(&job, 2, 20_000, 4096, Some(2032));
    // Full rings happened (else this test did not test them).
    assert!(outs.iter().any(|o| !o.contains("full=0")), "{outs:?}");
    for p in paths(&job, 2) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

/// Four processes, each sending 5,000 messages to each of the others at once: every
/// receiver has three concurrent senders.
#[test]
fn four_processes_concurrent_senders() {
    let job = job_key("four");
    run_job(&job, 4, 5_000, 8192, None);
    for p in paths(&job, 4) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

/// A process killed by SIGKILL leaves its segment; the next creation on the host removes it,
/// and a job of the same key can start again.
#[test]
fn sigkill_leftover_is_reclaimed() {
    let job = job_key("kill");
    let mut k = spawn_rank(&job, 0, 2, 0, 4096, "create-and-wait");
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(k.stdout.take().unwrap());
        while !line.contains("CREATED") {
            line.clear();
            assert!(
                r.read_line(&mut line).unwrap() > 0,
                "the rank ended before creating"
            );
        }
    }
    let path = paths(&job, 2).remove(0);
    assert!(
        path.exists(),
        "{} exists while its owner lives",
        path.display()
    );
    // A live owner's segment is never taken.
    reclaim_stale_segments().unwrap();
    assert!(path.exists(), "a live owner's segment was reclaimed");
    assert!(matches!(
        Fastboxes::create(&job, 0, 2, &Config::default().ring_bytes(4096)),
        Err(Error::InUse { owner: Some(pid), .. }) if pid == k.id()
    ));
    nix_kill(k.id());
    k.wait().unwrap();
    assert!(
        path.exists(),
        "SIGKILL ran no cleanup, so the file is still there"
    );
    // The next creation (of any job) reclaims it; then the same name can be created.
    let other = Fastboxes::create(&job_key("after-kill"), 0, 1, &Config::default()).unwrap();
    assert!(!path.exists(), "{} was not reclaimed", path.display());
    let again = Fastboxes::create(&job, 0, 2, &Config::default().ring_bytes(4096)).unwrap();
    assert!(path.exists());
    drop(again);
    drop(other);
    assert!(!path.exists(), "detach unlinks a segment no peer mapped");
}

/// A segment whose owner exits without detaching it (`std::process::exit`, or a handle in a
/// `static`) is unlinked by the `atexit` handler of `efa_shm::owner`, the one that
/// efa-fabric's shm regions use too. (Another test's reclaim could also remove it, but only
/// after the owner has exited; the test can pass wrongly only if that races the exit, never
/// fail wrongly.)
#[test]
fn exit_without_detach_unlinks() {
    let job = job_key("exit");
    let k = spawn_rank(&job, 0, 2, 0, 4096, "create-and-exit");
    let out = k.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {text}", out.status);
    let path = paths(&job, 2).remove(0);
    assert!(
        text.contains(&format!("CREATED {}", path.display())),
        "the rank created its segment: {text}"
    );
    assert!(!path.exists(), "{} left at exit", path.display());
}

fn nix_kill(pid: u32) {
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Bad input gets typed errors, never a panic.
#[test]
fn errors_are_typed() {
    let job = job_key("errors");
    let cfg = Config::default().ring_bytes(4096);
    assert!(matches!(
        Fastboxes::create(&job, 0, 2, &Config::default().ring_bytes(5000)),
        Err(Error::InvalidSetup { .. })
    ));
    assert!(matches!(
        Fastboxes::create(&job, 0, 2, &Config::default().ring_bytes(1024)),
        Err(Error::InvalidSetup { .. })
    ));
    assert!(matches!(
        Fastboxes::create(&job, 2, 2, &cfg),
        Err(Error::InvalidSetup { .. })
    ));
    let mut a = Fastboxes::create(&job, 0, 2, &cfg).unwrap();
    assert!(matches!(
        Fastboxes::create(&job, 0, 2, &cfg),
        Err(Error::InUse { .. })
    ));
    assert!(matches!(
        a.try_send(1, b"x", b""),
        Err(Error::NotAttached { peer: 1 })
    ));
    assert!(matches!(a.attach(1), Err(Error::NotReady { .. })));
    assert!(matches!(
        a.attach_all(Duration::from_millis(20)),
        Err(Error::Timeout { ref missing, .. }) if missing == &[1]
    ));
    assert!(matches!(
        a.try_send(0, b"x", b""),
        Err(Error::UnknownPeer { peer: 0, .. })
    ));
    assert!(matches!(
        a.try_send(7, b"x", b""),
        Err(Error::UnknownPeer { peer: 7, .. })
    ));
    assert!(matches!(a.attach(2), Err(Error::UnknownPeer { .. })));
    let mut b = Fastboxes::create(&job, 1, 2, &cfg).unwrap();
    a.attach(1).unwrap();
    b.attach(0).unwrap();
    let max = a.max_message();
    assert_eq!(max, 1008);
    let big = vec![0u8; max];
    assert!(matches!(
        a.try_send(1, b"h", &big),
        Err(Error::TooLarge { len, max: m }) if len == max + 1 && m == max
    ));
    assert!(
        a.try_send(1, &big[..8], &big[8..]).unwrap(),
        "exactly the maximum fits"
    );
    let mut n = 0;
    b.poll(|src, m| {
        assert_eq!((src, m.len()), (0, max));
        n += 1;
    })
    .unwrap();
    assert_eq!(n, 1);
    // A rank of another layout refuses to attach.
    let job2 = job_key("mismatch");
    let _c = Fastboxes::create(&job2, 0, 3, &cfg).unwrap();
    let mut d = Fastboxes::create(&job2, 1, 2, &cfg).unwrap();
    assert!(matches!(d.attach(0), Err(Error::Mismatch { .. })));
}

/// Three ranks as threads of one process (each with its own mapping, as separate processes
/// would have), all sending to all with small rings, while several jobs of this test run
/// at once.
#[test]
fn threads_all_to_all() {
    let job = job_key("threads");
    let n = 3;
    let msgs = 20_000u64;
    std::thread::scope(|s| {
        for me in 0..n {
            let job = &job;
            s.spawn(move || {
                let mut fb =
                    Fastboxes::create(job, me, n, &Config::default().ring_bytes(4096)).unwrap();
                fb.attach_all(Duration::from_secs(30)).unwrap();
                let max = fb.max_message();
                let mut sent = vec![0u64; n];
                sent[me] = msgs;
                let mut exp = vec![0u64; n];
                exp[me] = msgs;
                let deadline = Instant::now() + Duration::from_secs(120);
                while sent.iter().chain(&exp).any(|&c| c < msgs) {
                    assert!(Instant::now() < deadline, "thread {me}: {sent:?} {exp:?}");
                    for p in (0..n).filter(|&p| p != me) {
                        if sent[p] < msgs {
                            let i = sent[p];
                            if fb
                                .try_send(p, &header(me, i), &payload(me, i, max))
                                .unwrap()
                            {
                                sent[p] += 1;
                            }
                        }
                    }
                    let got = fb
                        .poll(|src, b| {
                            let i = u64::from_le_bytes(b[4..12].try_into().unwrap());
                            assert_eq!(i, exp[src], "thread {me} from {src}");
                            assert_eq!(b[12..], payload(src, i, max)[..]);
                            exp[src] += 1;
                        })
                        .unwrap();
                    if got == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
    for p in paths(&job, n) {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}
