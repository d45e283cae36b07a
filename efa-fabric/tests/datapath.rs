//! Data-path tests on every provider present (see `common` for the provider parameter).

mod common;

use std::time::{Duration, Instant};

use common::*;
use efa_fabric::{Access, Caps, Counter, CounterEvents, Endpoint, Error, FiAddr, TargetBuf};

/// Providers that complete an oversized receive successfully, cut to the buffer's size,
/// instead of reporting `FI_ETRUNC` (libfabric 1.17).
const SILENT_TRUNCATION: &[&str] = &["udp;ofi_rxd"];

const MSG_CAPS: Caps = Caps::MSG.union(Caps::TAGGED);

fn sizes(info: &efa_fabric::Info) -> Vec<usize> {
    let max = info.max_msg_size();
    let mut v = vec![0, 1, info.inject_size(), 64 * 1024, 16 * 1024 * 1024];
    if max <= 16 * 1024 * 1024 {
        v.push(max);
    }
    v.retain(|&s| s <= max);
    v.sort_unstable();
    v.dedup();
    v
}

fn exchange(pair: &Pair, len: usize, tagged: bool, seed: u64) {
    let data = pattern(len, seed);
    let (recv, send) = if tagged {
        let tag = 0xA000 + seed;
        let r = pair
            .b
            .trecv(vec![0u8; len], pair.b_to_a, tag, 0)
            .expect("post trecv");
        let s = pair
            .a
            .tsend(data.clone(), pair.a_to_b, tag)
            .expect("post tsend");
        (r, s)
    } else {
        let r = pair.b.recv(vec![0u8; len], pair.b_to_a).expect("post recv");
        let s = pair.a.send(data.clone(), pair.a_to_b).expect("post send");
        (r, s)
    };
    let (r, s) = both(recv, send);
    let s = s.unwrap_or_else(|e| panic!("send of {len} B failed: {e}"));
    assert_eq!(s.buf, data, "send buffer must come back unchanged");
    let r = r.unwrap_or_else(|e| panic!("recv of {len} B failed: {e}"));
    assert_eq!(r.len, len, "received length");
    if tagged {
        assert_eq!(r.tag, 0xA000 + seed, "received tag");
    }
    assert_eq!(first_diff(&r.buf, &data), None, "{len} B message corrupted");
}

#[test]
fn messages_of_every_size_arrive_intact() {
    for_each_provider("sizes", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        for (i, len) in sizes(info).into_iter().enumerate() {
            let t = Instant::now();
            exchange(&pair, len, true, i as u64);
            exchange(&pair, len, false, 100 + i as u64);
            println!("  {len} B tagged+untagged ok ({:?})", t.elapsed());
        }
        Outcome::Ran
    });
}

#[test]
fn inject_delivers_small_messages() {
    for_each_provider("inject", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        let len = pair.a.inject_size().min(64);
        let data = pattern(len, 9);
        let r = pair.b.trecv(vec![0u8; len], FiAddr::UNSPEC, 5, 0).unwrap();
        pair.a.tinject(&data, pair.a_to_b, 5).unwrap();
        let r = r.wait(OP_TIMEOUT).unwrap();
        assert_eq!(r.buf, data);
        let r = pair.b.recv(vec![0u8; len], FiAddr::UNSPEC).unwrap();
        pair.a.inject(&data, pair.a_to_b).unwrap();
        assert_eq!(r.wait(OP_TIMEOUT).unwrap().buf, data);
        let too_big = vec![0u8; pair.a.inject_size() + 1];
        let e = pair.a.inject(&too_big, pair.a_to_b).unwrap_err();
        assert!(
            matches!(
                e,
                Error::MessageTooLarge { op: "inject", len, max, limit: efa_fabric::SizeLimit::Inject }
                    if len == too_big.len() && max == pair.a.inject_size()
            ),
            "{e:?}"
        );
        Outcome::Ran
    });
}

#[test]
fn tagged_matching_honours_ignore_masks() {
    for_each_provider("tag-masks", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        // Receive 1 takes any tag 0x12xx; receive 2 takes exactly 0x9999.
        let wild = pair
            .b
            .trecv(vec![0u8; 8], FiAddr::UNSPEC, 0x1200, 0x00FF)
            .unwrap();
        let exact = pair
            .b
            .trecv(vec![0u8; 8], FiAddr::UNSPEC, 0x9999, 0)
            .unwrap();
        // Send the exact one first: it must not land in the wildcard receive.
        let s1 = pair
            .a
            .tsend(b"exact-99".to_vec(), pair.a_to_b, 0x9999)
            .unwrap();
        let (e, s1) = both(exact, s1);
        s1.unwrap();
        let e = e.unwrap();
        assert_eq!(&e.buf, b"exact-99");
        assert_eq!(e.tag, 0x9999);
        assert!(!wild.is_done(), "0x9999 matched the 0x12xx receive");
        let s2 = pair
            .a
            .tsend(b"wild-_34".to_vec(), pair.a_to_b, 0x1234)
            .unwrap();
        let (w, s2) = both(wild, s2);
        s2.unwrap();
        let w = w.unwrap();
        assert_eq!(&w.buf, b"wild-_34");
        assert_eq!(w.tag, 0x1234, "completion must carry the sender's full tag");
        Outcome::Ran
    });
}

#[test]
fn senddata_carries_remote_cq_data() {
    for_each_provider("senddata", MSG_CAPS, |info| {
        if info.cq_data_size() == 0 {
            return Outcome::Skipped(
                "the provider carries no remote CQ data (cq_data_size 0)".into(),
            );
        }
        let pair = Pair::new(info);
        let r = pair.b.trecv(vec![0u8; 4], FiAddr::UNSPEC, 3, 0).unwrap();
        let s = pair
            .a
            .tsenddata(b"data".to_vec(), 0xBEEF, pair.a_to_b, 3)
            .unwrap();
        let (r, s) = both(r, s);
        s.unwrap();
        let r = r.unwrap();
        assert_eq!(r.data, Some(0xBEEF));
        assert_eq!(&r.buf, b"data");
        Outcome::Ran
    });
}

#[test]
fn truncated_receive_reports_both_sizes_and_endpoint_survives() {
    for_each_provider("truncation", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        let r = pair.b.trecv(vec![0u8; 10], pair.b_to_a, 1, 0).unwrap();
        let s = pair.a.tsend(pattern(20, 1), pair.a_to_b, 1).unwrap();
        let (r, s) = both(r, s);
        let _ = s; // The sender may see success or an error, depending on the provider.
        let sent = pattern(20, 1);
        if SILENT_TRUNCATION.contains(&info.provider().as_str()) {
            // Known provider defect: it completes the receive successfully with the first
            // bytes. efa-core's message header detects this; here we pin the behaviour down
            // so that a fix (or a worse regression) is noticed.
            let d = r.expect("silently truncating provider");
            println!(
                "  KNOWN PROVIDER DEFECT: {} truncates silently",
                info.provider()
            );
            assert_eq!(d.len, 10);
            assert_eq!(&d.buf[..], &sent[..10]);
            exchange(&pair, 100, true, 77);
            return Outcome::Ran;
        }
        let err = r.expect_err("a 20-byte message into a 10-byte buffer must fail");
        match &err.error {
            Error::Truncated {
                buffer_len,
                message_len,
            } => {
                assert_eq!(*buffer_len, 10);
                // Providers that report the overflow must report it right.
                assert!(
                    matches!(message_len, None | Some(20)),
                    "message_len {message_len:?}"
                );
            }
            other => panic!("expected Truncated, got {other}"),
        }
        assert_eq!(
            err.buf.as_ref().map(Vec::len),
            Some(10),
            "buffer must be returned"
        );
        // The endpoint keeps working afterwards. tcp;ofi_rxm (1.17) may drop the connection
        // on which the oversized message came, so the first send after it can fail with
        // EPIPE while the connection is re-established; a later one must succeed.
        let ok = (0..5).any(|i| {
            let r = pair
                .b
                .trecv(vec![0u8; 100], pair.b_to_a, 500 + i, 0)
                .unwrap();
            let s = pair.a.tsend(pattern(100, i), pair.a_to_b, 500 + i).unwrap();
            let (r, s) = both(r, s);
            match (r, s) {
                (Ok(r), Ok(_)) => r.buf == pattern(100, i),
                (r, s) => {
                    println!(
                        "  exchange {i} after truncation failed: {:?} / {:?}",
                        r.err().map(|e| e.error),
                        s.err().map(|e| e.error)
                    );
                    false
                }
            }
        });
        assert!(ok, "the endpoint never recovered after a truncated receive");
        Outcome::Ran
    });
}

fn rma_caps() -> Caps {
    MSG_CAPS | Caps::RMA | Caps::READ | Caps::WRITE | Caps::REMOTE_READ | Caps::REMOTE_WRITE
}

#[test]
fn rma_write_and_read_move_exact_bytes() {
    for_each_provider("rma", rma_caps(), |info| {
        let pair = Pair::new(info);
        let region_len = 1 << 20;
        let target = TargetBuf::new(
            pair.b.domain(),
            region_len,
            Access::REMOTE_READ | Access::REMOTE_WRITE,
            Some(&pair.b),
        )
        .expect("register target");
        let remote = target.remote();
        for (i, (off, len)) in [
            (0u64, 1usize),
            (4096, 8192),
            (12345, 100_000),
            (0, region_len),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(len, 40 + i as u64);
            let w = pair
                .a
                .write(data.clone(), pair.a_to_b, &remote, off)
                .unwrap();
            let w = w
                .wait(OP_TIMEOUT)
                .unwrap_or_else(|e| panic!("write {len}@{off}: {e}"));
            assert_eq!(w.buf, data);
            // Read it back through RMA, and check the target's memory directly.
            let r = pair
                .a
                .read(vec![0u8; len], pair.a_to_b, &remote, off)
                .unwrap();
            let r = r
                .wait(OP_TIMEOUT)
                .unwrap_or_else(|e| panic!("read {len}@{off}: {e}"));
            assert_eq!(first_diff(&r.buf, &data), None, "read-back of {len}@{off}");
            let mut mem = vec![0u8; len];
            target.read_local(off as usize, &mut mem).unwrap();
            assert_eq!(first_diff(&mem, &data), None, "target memory {len}@{off}");
        }
        // Small writes by inject.
        pair.a
            .inject_write(b"inj", pair.a_to_b, &remote, 7)
            .unwrap();
        let r = pair.a.read(vec![0u8; 3], pair.a_to_b, &remote, 7).unwrap();
        assert_eq!(&r.wait(OP_TIMEOUT).unwrap().buf, b"inj");
        Outcome::Ran
    });
}

#[test]
fn rma_out_of_bounds_is_rejected_before_posting() {
    for_each_provider("rma-bounds", rma_caps(), |info| {
        let pair = Pair::new(info);
        let target =
            TargetBuf::new(pair.b.domain(), 4096, Access::REMOTE_WRITE, Some(&pair.b)).unwrap();
        let remote = target.remote();
        let err = pair
            .a
            .write(vec![1u8; 10], pair.a_to_b, &remote, 4090)
            .unwrap_err();
        assert!(
            matches!(
                err.error,
                Error::OutOfBounds {
                    region_len: 4096,
                    ..
                }
            ),
            "{}",
            err.error
        );
        assert_eq!(err.buf, Some(vec![1u8; 10]), "buffer returned");
        let mut mem = vec![1u8; target.len()];
        target.read_local(0, &mut mem).unwrap();
        assert!(mem.iter().all(|&b| b == 0), "nothing was written");
        let err = pair
            .a
            .read(vec![0u8; 1], pair.a_to_b, &remote, 4096)
            .unwrap_err();
        assert!(matches!(err.error, Error::OutOfBounds { .. }));
        Outcome::Ran
    });
}

#[test]
fn counters_count_rma_completions() {
    for_each_provider("counters", rma_caps(), |info| {
        let domain = efa_fabric::Domain::open(info).unwrap();
        let cntr = match Counter::open(&domain) {
            Ok(c) => c,
            Err(e) => return Outcome::Skipped(format!("counters unsupported: {e}")),
        };
        let av = efa_fabric::AddressVector::open(&domain).unwrap();
        let cq = efa_fabric::CompletionQueue::open(&domain, 0).unwrap();
        let a = Endpoint::builder(&domain, &av, &cq)
            .counter(&cntr, CounterEvents::WRITE)
            .build()
            .unwrap();
        let b = Endpoint::open(info).unwrap();
        let a_to_b = a.av().insert(&b.name().unwrap()).unwrap();
        b.av().insert(&a.name().unwrap()).unwrap();
        let _progress = (Progressor::spawn(&a), Progressor::spawn(&b));
        let target = TargetBuf::new(b.domain(), 64, Access::REMOTE_WRITE, Some(&b)).unwrap();
        let before = cntr.read();
        for i in 0..3u64 {
            let w = a
                .write(vec![i as u8; 8], a_to_b, &target.remote(), i * 8)
                .unwrap();
            w.wait(OP_TIMEOUT).unwrap();
        }
        assert_eq!(cntr.wait(before + 3, OP_TIMEOUT).unwrap(), before + 3);
        // A write completes at the initiator once transmitted (FI_TRANSMIT_COMPLETE); the
        // bytes land at the target shortly after.
        let want: Vec<u8> = (0..24).map(|i| (i / 8) as u8).collect();
        let t = Instant::now();
        let mut got = vec![0u8; 24];
        target.read_local(0, &mut got).unwrap();
        while got != want && t.elapsed() < OP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(1));
            target.read_local(0, &mut got).unwrap();
        }
        assert_eq!(got, want);
        cntr.set(100).unwrap();
        cntr.add(5).unwrap();
        assert_eq!(cntr.read(), 105);
        Outcome::Ran
    });
}

#[test]
fn cancelled_receive_returns_its_buffer() {
    for_each_provider("cancel", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        let r = pair.b.trecv(vec![7u8; 32], FiAddr::UNSPEC, 42, 0).unwrap();
        let err = r
            .cancel()
            .expect_err("nothing was sent, so the receive cannot succeed");
        assert_eq!(err.buf, Some(vec![7u8; 32]));
        // Dropping a pending receive also cancels it and does not hang.
        let t = Instant::now();
        drop(pair.b.trecv(vec![0u8; 32], FiAddr::UNSPEC, 43, 0).unwrap());
        assert!(t.elapsed() < Duration::from_secs(5));
        // A receive that waits for a message that never comes times out with an error.
        let r = pair.b.trecv(vec![0u8; 8], FiAddr::UNSPEC, 44, 0).unwrap();
        let err = r.wait(Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(err.error, Error::Timeout { op: "trecv", .. }),
            "{}",
            err.error
        );
        Outcome::Ran
    });
}

#[test]
fn unknown_address_is_an_error_not_a_hang() {
    for_each_provider("unknown-address", MSG_CAPS, |info| {
        let pair = Pair::new(info);
        // An address that the provider cannot parse.
        let t = Instant::now();
        let garbage = pair.a.av().insert(&[0xFFu8; 3]);
        // An index that was never inserted.
        let never = FiAddr(4096);
        let res = pair
            .a
            .tsend(vec![1u8; 64], never, 1)
            .and_then(|p| p.wait(Duration::from_secs(5)));
        assert!(res.is_err(), "send to an AV index never inserted must fail");
        println!(
            "  garbage insert: {:?}; send to unknown index: {}",
            garbage.err().map(|e| e.to_string()),
            res.unwrap_err()
        );
        assert!(t.elapsed() < Duration::from_secs(5) + efa_fabric::op::CANCEL_GRACE * 2);
        Outcome::Ran
    });
}

/// Not a test by itself: the peer process of `closed_peer_is_an_error_not_a_hang`. It opens
/// an endpoint on `EFA_TEST_CHILD_PROVIDER`, prints its address in hex, and exits (closing
/// the endpoint).
#[test]
#[ignore = "helper process for closed_peer_is_an_error_not_a_hang"]
fn closed_peer_child() {
    let provider = std::env::var("EFA_TEST_CHILD_PROVIDER").expect("run by the parent test");
    let info = info_for(&provider, MSG_CAPS).expect("provider present in the child");
    let ep = Endpoint::open(&info).unwrap();
    let hex: String = ep
        .name()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("ADDR={hex}");
}

/// Opens an endpoint in a child process that then exits, and returns its address.
fn closed_peer_address(info: &efa_fabric::Info) -> Vec<u8> {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "closed_peer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EFA_TEST_CHILD_PROVIDER", info.provider())
        .output()
        .expect("spawn child");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let hex = stdout
        .lines()
        .find_map(|l| l.split("ADDR=").nth(1))
        .expect("child printed its address")
        .trim()
        .to_string();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn closed_peer_is_an_error_not_a_hang() {
    for_each_provider("closed-peer", MSG_CAPS, |info| {
        let domain = efa_fabric::Domain::open(info).unwrap();
        let av = efa_fabric::AddressVector::open(&domain).unwrap();
        let cq = efa_fabric::CompletionQueue::open(&domain, 0).unwrap();
        let a = Endpoint::builder(&domain, &av, &cq)
            .post_timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        // The peer lives in another process, which has exited (and closed it) by now.
        let to_b = a.av().insert(&closed_peer_address(info)).unwrap();
        let t = Instant::now();
        let deadline = Duration::from_secs(3);
        // Large enough to need the peer (no eager completion).
        let res = a
            .tsend(vec![3u8; 1 << 20], to_b, 9)
            .and_then(|p| p.wait(deadline));
        let waited = t.elapsed();
        let err = res.expect_err("a 1 MiB send to a closed peer cannot complete");
        println!("  send to closed peer: {} after {waited:?}", err.error);
        assert!(
            waited < deadline + efa_fabric::op::CANCEL_GRACE * 2,
            "took {waited:?}"
        );
        Outcome::Ran
    });
}

/// Why `provider`'s registrations are not bound by `ulimit -l`; `None` for those that pin
/// pages (verbs, efa).
fn pins_no_memory(provider: &str) -> Option<&'static str> {
    match efa_fabric::core_provider(provider) {
        "verbs" | "efa" => None,
        _ => Some("its registration pins no pages, so ulimit -l does not apply"),
    }
}

/// Helper process for `memlock_limit_is_named`: lowers RLIMIT_MEMLOCK to 64 KiB, registers
/// 64 MiB, and prints the outcome.
#[test]
#[ignore = "helper process for memlock_limit_is_named"]
fn memlock_child() {
    let provider = std::env::var("EFA_TEST_CHILD_PROVIDER").expect("run by the parent test");
    let lim = libc::rlimit {
        rlim_cur: 64 * 1024,
        rlim_max: 64 * 1024,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; lowering a limit is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) }, 0);
    let info = info_for(&provider, MSG_CAPS).unwrap();
    // Whichever step fails first under the low limit must name it.
    let outcome = efa_fabric::Domain::open(&info).and_then(|domain| {
        let ep = Endpoint::builder(
            &domain,
            &efa_fabric::AddressVector::open(&domain)?,
            &efa_fabric::CompletionQueue::open(&domain, 0)?,
        )
        .build()?;
        TargetBuf::new(&domain, 64 << 20, Access::REMOTE_WRITE, Some(&ep))
    });
    match outcome {
        Ok(_) => println!("OUTCOME=registered"),
        Err(e) => println!("OUTCOME=error {e}"),
    }
}

#[test]
fn memlock_limit_is_named() {
    let why_not = "no provider here pins registered memory (verbs, efa), so ulimit -l does not \
                   apply; ci/test runs this test on verbs in the soft-RoCE VM";
    for_each_provider_where("memlock", MSG_CAPS, pins_no_memory, why_not, |info| {
        // Root has CAP_IPC_LOCK, which ignores RLIMIT_MEMLOCK: drop it from the child's
        // bounding set so that the limit applies as it does for ordinary users.
        let exe = std::env::current_exe().unwrap();
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--bounding-set", "-ipc_lock", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd
            .args([
                "--ignored",
                "--exact",
                "memlock_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EFA_TEST_CHILD_PROVIDER", info.provider())
            .output()
            .expect("spawn child (setpriv from util-linux when root)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let outcome = stdout
            .lines()
            .find_map(|l| l.split("OUTCOME=").nth(1))
            .unwrap_or_else(|| {
                panic!(
                    "child printed no outcome ({}): {stdout}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        println!("  {outcome}");
        assert!(
            outcome.contains("RLIMIT_MEMLOCK is 65536") && outcome.contains("ulimit -l 64"),
            "registration under a 64 KiB memlock limit must name the limit, got: {outcome}"
        );
        Outcome::Ran
    });
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
