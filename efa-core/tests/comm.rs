//! Communicator tests: real multi-process jobs started by `efarun`, each rank running one of
//! the `#[ignore]`d child tests of this file.

use std::process::Command;
use std::time::{Duration, Instant};

use efa_core::{Communicator, Error, Source, Tag, Transport};

mod common;
use common::{assert_routes, efarun, fabric_present, in_job, skip_test};

fn pattern(seed: u64, len: usize) -> Vec<u64> {
    (0..len as u64)
        .map(|i| seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i)
        .collect()
}

/// Every rank exchanges verified messages with every other rank, by blocking, non-blocking
/// and async calls, at sizes from 0 to past the eager limit.
#[test]
#[ignore = "rank program for all_pairs_*"]
fn child_all_pairs() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().expect("init");
    let (me, n) = (comm.rank(), comm.size());
    for peer in 0..n {
        let r = comm.route(peer).unwrap();
        println!("route {me}->{peer}: {} ({})", r.transport, r.reason);
    }
    let sizes = [0usize, 1, 100, 1024, 1 << 14, 1 << 17];
    // Blocking: ordered pairwise exchange.
    for peer in 0..n {
        for (i, &len) in sizes.iter().enumerate() {
            let tag = i as u32;
            let out = pattern((me as u64) << 32 | peer as u64 | (i as u64) << 48, len);
            let mut got = vec![0u64; len];
            if me < peer {
                comm.send(&out, peer, tag).unwrap();
                let st = comm.recv(&mut got, peer, tag).unwrap();
                assert_eq!(st.count::<u64>(), len);
            } else if me > peer {
                let st = comm.recv(&mut got, peer, tag).unwrap();
                assert_eq!((st.source, st.tag, st.len), (peer, tag, len * 8));
                comm.send(&out, peer, tag).unwrap();
            } else {
                let mut req = comm.irecv(&mut got, me, tag).unwrap();
                comm.send(&out, me, tag).unwrap();
                assert!(req.test().is_ok());
                req.wait().unwrap();
            }
            let want = pattern((peer as u64) << 32 | me as u64 | (i as u64) << 48, len);
            assert_eq!(got, want, "blocking {len} words from {peer}");
        }
    }
    // Non-blocking: all receives posted with Source::Any, then all sends; wait_all.
    let len = 5000;
    let mut bufs: Vec<Vec<u64>> = (0..n).map(|_| vec![0u64; len]).collect();
    let out = pattern(1000 + me as u64, len);
    let mut reqs: Vec<efa_core::P2pRequest<'_>> = Vec::new();
    for b in bufs.iter_mut() {
        reqs.push(comm.irecv(b, Source::Any, Tag::Is(77)).unwrap().into());
    }
    for peer in 0..n {
        reqs.push(comm.isend(&out, peer, 77).unwrap().into());
    }
    let statuses = comm.wait_all(reqs).unwrap();
    let mut sources: Vec<u32> = statuses[..n as usize]
        .iter()
        .map(|s| s.unwrap().source)
        .collect();
    for (i, s) in statuses[..n as usize].iter().enumerate() {
        assert_eq!(bufs[i], pattern(1000 + s.unwrap().source as u64, len));
    }
    sources.sort_unstable();
    assert_eq!(sources, (0..n).collect::<Vec<_>>());
    // Non-overtaking: many messages with one tag arrive in order.
    let next = (me + 1) % n;
    let prev = (me + n - 1) % n;
    // Mixed eager and rendezvous sizes; the sends are not waited for until all receives
    // are done (rendezvous sends need the matching receive, as in MPI).
    let outs: Vec<Vec<u64>> = (0..50u64)
        .map(|k| vec![k; if k % 3 == 0 { 3000 } else { 2 }])
        .collect();
    let sends: Vec<_> = outs
        .iter()
        .map(|out| comm.isend(out, next, 5).unwrap())
        .collect();
    for k in 0..50u64 {
        let mut b = vec![0u64; 3000];
        let st = comm.recv(&mut b, prev, 5).unwrap();
        assert_eq!(b[0], k, "message {k} from {prev} overtaken");
        assert_eq!(st.count::<u64>(), if k % 3 == 0 { 3000 } else { 2 });
    }
    for s in sends {
        s.wait().unwrap();
    }
    // Async.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let data = pattern(42 + me as u64, 20_000);
        let mut got = vec![0u64; 20_000];
        let (s, r) = tokio::join!(
            comm.send_async(&data, next, 9),
            comm.recv_async(&mut got, prev, 9)
        );
        s.unwrap();
        assert_eq!(r.unwrap().source, prev);
        assert_eq!(got, pattern(42 + prev as u64, 20_000));
    });
    println!("rank {me}: all pairs verified");
}

#[test]
fn all_pairs_four_ranks() {
    let out = efarun(4, "child_all_pairs", &[]);
    assert!(out.status.success(), "efarun failed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("all pairs verified").count(),
        4,
        "every rank must finish"
    );
    // All ranks are on this host: shm where present.
    assert!(
        text.contains("route 0->1: shm"),
        "expected shm routes:\n{text}"
    );
}

#[test]
fn all_pairs_over_tcp_only() {
    let out = efarun(3, "child_all_pairs", &[("EFA_TRANSPORTS", "ip")]);
    assert!(out.status.success(), "efarun failed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("all pairs verified").count(), 3);
    assert!(
        text.contains("route 0->1: ip"),
        "EFA_TRANSPORTS=ip must force IP:\n{text}"
    );
    assert!(
        !text.contains(": shm"),
        "shm used despite EFA_TRANSPORTS=ip"
    );
}

/// Bad input: truncation, invalid ranks, reserved tags, timeouts naming the peer.
#[test]
#[ignore = "rank program for errors_are_clear"]
fn child_errors() {
    if !in_job() {
        return;
    }
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let me = comm.rank();
    // Each error is the right variant, and its text names the values involved.
    let e = comm.send(&[1u8], 99, 0).unwrap_err();
    assert!(
        matches!(e, Error::InvalidRank { rank: 99, size: 2 }),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("99") && text.contains('2'), "{text}");
    let mut b = [0u8; 4];
    let Err(e) = comm.irecv(&mut b, 7, 0) else {
        panic!("a receive from rank 7 of 2 was accepted");
    };
    assert!(
        matches!(e, Error::InvalidRank { rank: 7, size: 2 }),
        "{e:?}"
    );
    let e = comm.send(&[1u8], 0, u32::MAX).unwrap_err();
    assert!(matches!(e, Error::ReservedTag(u32::MAX)), "{e:?}");
    assert!(e.to_string().contains(&format!("{:#x}", u32::MAX)), "{e}");
    // Receives and probes on a reserved tag are refused too: they could take the library's
    // own collective or window traffic. Tag::Any never matches reserved tags.
    for t in [0x8000_0000u32, 0xC000_0000, u32::MAX] {
        let Err(e) = comm.irecv(&mut b, 0, Tag::Is(t)) else {
            panic!("a receive on reserved tag {t:#x} was accepted");
        };
        assert!(matches!(e, Error::ReservedTag(x) if x == t), "{e:?}");
        let e = comm.iprobe(Source::Any, Tag::Is(t)).unwrap_err();
        assert!(matches!(e, Error::ReservedTag(x) if x == t), "{e:?}");
        let e = comm.improbe(0, Tag::Is(t)).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::ReservedTag(x) if x == t), "{e:?}");
        let e = comm.probe(Source::Any, Tag::Is(t)).unwrap_err();
        assert!(matches!(e, Error::ReservedTag(x) if x == t), "{e:?}");
        let e = comm.mprobe(0, Tag::Is(t)).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::ReservedTag(x) if x == t), "{e:?}");
        let e = comm
            .sendrecv(&[1u8], 0, 5, &mut b, 0, Tag::Is(t))
            .unwrap_err();
        assert!(matches!(e, Error::ReservedTag(x) if x == t), "{e:?}");
    }
    if me == 0 {
        // Inject, eager and rendezvous truncation, then a good message: unaffected.
        for len in [20usize, 100, 100_000] {
            let mut small = vec![0u8; 10];
            match comm.recv(&mut small, 1, 1) {
                Err(Error::Truncated {
                    expected,
                    got,
                    peer,
                    tag,
                }) => {
                    assert_eq!((expected, got, peer, tag), (10, len, 1, 1));
                }
                other => panic!("expected Truncated, got {other:?}"),
            }
            assert!(
                small.iter().all(|&x| x == 0),
                "nothing written on truncation"
            );
        }
        let mut ok = vec![0u8; 100];
        comm.recv(&mut ok, 1, 2).unwrap();
        assert!(ok.iter().all(|&x| x == 7));
        // A dropped receive is cancelled: the message rank 1 sends on its tag afterwards
        // goes to the next receive, not into the dropped one's buffer.
        let t = Instant::now();
        let mut never = [0u8; 1];
        let req = comm.irecv(&mut never, 1, 3).unwrap();
        drop(req);
        println!("cancelled receive in {:?}", t.elapsed());
        comm.send(&[1u8], 1, 4).unwrap(); // "go ahead"
        let mut later = [0u8; 1];
        let st = comm.recv(&mut later, 1, 3).unwrap();
        assert_eq!((later, st.source, st.len), ([9], 1, 1));
        assert_eq!(never, [0], "the dropped receive must not take the message");
    } else {
        // As in MPI, only the receiver learns of a truncation: the send completes for every
        // size class (for a rendezvous, without moving any data).
        for len in [20usize, 100, 100_000] {
            let r = comm.send(&vec![5u8; len], 0, 1);
            assert!(r.is_ok(), "sender of a truncated {len}-byte message: {r:?}");
        }
        comm.send(&[7u8; 100], 0, 2).unwrap();
        let mut go = [0u8; 1];
        comm.recv(&mut go, 0, 4).unwrap();
        comm.send(&[9u8], 0, 3).unwrap();
    }
    println!("rank {me}: errors ok");
}

#[test]
fn errors_are_clear() {
    let out = efarun(2, "child_errors", &[]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("errors ok")
            .count(),
        2
    );
}

/// Rank 1 exits without receiving; rank 0's receive must fail within its deadline, naming 1.
#[test]
#[ignore = "rank program for dead_peer_gives_timeout_naming_it"]
fn child_dead_peer() {
    if !in_job() {
        return;
    }
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    if comm.rank() == 0 {
        let t = Instant::now();
        let mut b = [0u8; 8];
        let err = comm.recv(&mut b, 1, 0).unwrap_err();
        println!("rank 0 got: {err} after {:?}", t.elapsed());
        // Rank 1 returned without sending: its finalize tells rank 0 so, and a receive that
        // only rank 1 could match fails at once, naming it (not after the 3 s deadline).
        assert!(
            matches!(
                err,
                Error::PeerFinalized { rank: 1 } | Error::PeerFailed { rank: 1, .. }
            ),
            "{err:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        println!("dead peer detected");
    }
}

#[test]
fn dead_peer_gives_timeout_naming_it() {
    let out = efarun(2, "child_dead_peer", &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("dead peer detected"));
}

/// A rank that never starts: every other rank's init fails within the deadline, naming it.
#[test]
fn missing_rank_fails_init_naming_it() {
    let dir = std::env::temp_dir().join(format!("efa-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let boot = efa_core::bootstrap::BootstrapBuilder::new(
        0,
        2,
        efa_core::bootstrap::Rendezvous::File { dir: dir.clone() },
    )
    .build()
    .unwrap();
    let t = Instant::now();
    let err = Communicator::builder()
        .bootstrap(boot)
        .timeout(Duration::from_millis(500))
        .transports(efa_core::placement::TransportSet::of(&[Transport::Ip]))
        .ip_iface("lo")
        .build()
        .unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(
        text.contains("rank 1") || text.contains("ranks 1"),
        "{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A large message (above any eager limit, split into several chunks on providers with a
/// small max_msg_size) arrives intact.
#[test]
#[ignore = "rank program for large_message"]
fn child_large() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let len: usize = std::env::var("LARGE_BYTES").map_or(64 << 20, |v| v.parse().unwrap());
    let period: Vec<u8> = (0..LARGE_PERIOD).map(large_byte).collect();
    if comm.rank() == 0 {
        let mut data = vec![0u8; len];
        for c in data.chunks_mut(LARGE_PERIOD) {
            c.copy_from_slice(&period[..c.len()]);
        }
        comm.send(&data, 1, 0).unwrap();
    } else {
        let mut got = vec![0u8; len];
        let st = comm.recv(&mut got, 0, 0).unwrap();
        assert_eq!(st.len, len);
        assert!(got.chunks(LARGE_PERIOD).all(|c| c == &period[..c.len()]));
        println!("large message of {len} bytes verified");
    }
}

/// Byte `i` of [`child_large`]'s message.
fn large_byte(i: usize) -> u8 {
    (i * 7 + i / 4093) as u8
}

/// The period of [`large_byte`]: with i = 4093 q + r it is 28652 q + 7 r (mod 256), and
/// 28652 × 64 is a multiple of 256. Both ranks copy and compare whole periods: a loop per
/// byte over 1 GiB takes minutes in a debug build on a loaded host, and the receiver's
/// deadline (`EFA_TIMEOUT`) ran out while the sender was still filling its buffer.
const LARGE_PERIOD: usize = 4093 * 64;

/// [`LARGE_PERIOD`] is [`large_byte`]'s period (checked over two periods and a bit).
#[test]
fn large_pattern_has_its_period() {
    for i in 0..2 * LARGE_PERIOD + 5000 {
        assert_eq!(large_byte(i + LARGE_PERIOD), large_byte(i), "byte {i}");
    }
}

#[test]
fn large_message() {
    let out = efarun(2, "child_large", &[]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("large message of 67108864 bytes verified")
    );
}

/// The upper bound: a 1 GiB message, over shm and over TCP (split into chunks where a
/// provider's max_msg_size is smaller).
#[test]
fn one_gib_message() {
    for transports in ["shm", "ip"] {
        let t = std::time::Instant::now();
        let out = efarun(
            2,
            "child_large",
            &[
                ("LARGE_BYTES", "1073741824"),
                ("EFA_TRANSPORTS", transports),
                ("EFA_TIMEOUT", "120"),
            ],
        );
        assert!(out.status.success(), "1 GiB over {transports}");
        assert!(String::from_utf8_lossy(&out.stdout)
            .contains("large message of 1073741824 bytes verified"));
        println!("1 GiB over {transports}: {:?}", t.elapsed());
    }
}

/// Every pair over the fabric alone (2 and 4 ranks): the verbs route in the soft-RoCE VM.
#[test]
fn all_pairs_on_the_fabric() {
    let provider = match fabric_present() {
        Ok(p) => p,
        Err(why) => {
            skip_test(&why);
            return;
        }
    };
    for n in [2, 4] {
        let out = efarun(n, "child_all_pairs", &[("EFA_TRANSPORTS", "fabric")]);
        assert!(out.status.success(), "efarun -n {n} on {provider} failed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches("all pairs verified").count(), n as usize);
        assert_routes(&text, n, "fabric");
        println!("{n} ranks verified over {provider}");
    }
}

/// Starts `envs.len()` ranks of child test `name` directly (not through efarun), each with
/// its own extra environment, sharing a file store; returns each rank's output.
fn spawn_ranks(name: &str, envs: &[Vec<(&str, String)>]) -> Vec<std::process::Output> {
    let dir = std::env::temp_dir().join(format!("efa-ranks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let n = envs.len();
    let children: Vec<_> = envs
        .iter()
        .enumerate()
        .map(|(r, env)| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args([
                "--ignored",
                "--exact",
                name,
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EFA_RANK", r.to_string())
            .env("EFA_WORLD_SIZE", n.to_string())
            .env("EFA_LOCAL_RANK", r.to_string())
            .env("EFA_LOCAL_SIZE", n.to_string())
            .env("EFA_STORE", format!("file://{}", dir.display()))
            .env("EFA_TIMEOUT", "60")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.spawn().expect("spawn rank")
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outs.iter().enumerate() {
        // Indented, so that the ranks' own "test result:" lines are not read as this test's.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        println!("--- rank {r} ({}):", o.status);
        for line in text.lines() {
            println!("    {line}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    outs
}

/// Placement on two subnets of one fabric device: ranks 0 and 1 bind the fabric to two
/// addresses in 10.10.1.0/24, rank 2 to 10.10.2.1. Same-subnet pairs must use the fabric
/// (verbs), cross-subnet pairs IP, and every pair verifies its data. Needs the soft-RoCE VM
/// (EFA_TEST_ADDR, EFA_TEST_ADDR1B, EFA_TEST_ADDR2 name the addresses).
#[test]
fn two_subnets_route_by_subnet() {
    let addrs = ["EFA_TEST_ADDR", "EFA_TEST_ADDR1B", "EFA_TEST_ADDR2"].map(std::env::var);
    let (Ok(a), Ok(b), Ok(c)) = (&addrs[0], &addrs[1], &addrs[2]) else {
        skip_test("needs a fabric device with addresses in two subnets (EFA_TEST_ADDR, EFA_TEST_ADDR1B, EFA_TEST_ADDR2; set by ci/vm/softroce.sh)");
        return;
    };
    if let Err(why) = fabric_present() {
        skip_test(&why);
        return;
    }
    let envs: Vec<Vec<(&str, String)>> = [a, b, c]
        .iter()
        .map(|addr| {
            vec![
                ("EFA_FABRIC_ADDR", addr.to_string()),
                ("EFA_TRANSPORTS", "fabric,ip".to_string()),
                ("EFA_IFACE", "lo".to_string()),
            ]
        })
        .collect();
    let outs = spawn_ranks("child_all_pairs", &envs);
    let text: String = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    assert!(outs.iter().all(|o| o.status.success()), "a rank failed");
    assert_eq!(text.matches("all pairs verified").count(), 3);
    // Each pair's transport, and a reason that names the right subnets (the /24 networks
    // of the addresses ci/vm/softroce.sh puts on the rxe netdev).
    let net = |addr: &str| format!("{}.0/24", addr.rsplit_once('.').expect("IPv4").0);
    let nets = [net(a), net(b), net(c)];
    assert_eq!(
        nets[0], nets[1],
        "EFA_TEST_ADDR and EFA_TEST_ADDR1B share a /24"
    );
    assert_ne!(nets[0], nets[2], "EFA_TEST_ADDR2 is in another /24");
    let route_line = |x: usize, y: usize| {
        text.lines()
            .find(|l| l.contains(&format!("route {x}->{y}: ")))
            .unwrap_or_else(|| panic!("rank {x} printed no route to {y}:\n{text}"))
            .to_string()
    };
    for (x, y) in [(0, 1), (1, 0)] {
        let l = route_line(x, y);
        let want = format!("route {x}->{y}: fabric (fabric: same subnet {})", nets[x]);
        assert!(
            l.contains(&want),
            "same subnet must use the fabric: want `{want}` in `{l}`"
        );
    }
    for (x, y) in [(0, 2), (2, 0), (1, 2), (2, 1)] {
        let l = route_line(x, y);
        let want = format!(
            "route {x}->{y}: ip (IP: peer is in {}, this rank in {}",
            nets[y], nets[x]
        );
        assert!(
            l.contains(&want),
            "{x}->{y} crosses subnets, must use IP: want `{want}` in `{l}`"
        );
    }
}

#[test]
#[ignore = "rank program for explicit_transports_win_over_the_environment"]
fn child_explicit_transports() {
    if !in_job() {
        return;
    }
    // EFA_TRANSPORTS=ip is set for the job; the program explicitly allows every transport,
    // and that must win: the two ranks on this host talk over shm.
    let comm = Communicator::builder()
        .transports(efa_core::placement::TransportSet::all())
        .build()
        .unwrap();
    let peer = 1 - comm.rank();
    let route = comm.route(peer).unwrap();
    assert_eq!(route.transport, Transport::Shm, "{}", route.reason);
    let mut b = [0u32; 4];
    if comm.rank() == 0 {
        comm.send(&[7u32; 4], 1, 1).unwrap();
    } else {
        comm.recv(&mut b, 0, 1).unwrap();
        assert_eq!(b, [7; 4]);
    }
    println!("explicit transports used");
}

/// An explicit `CommunicatorBuilder::transports` wins over `EFA_TRANSPORTS`, even when it
/// is the default set (which the environment used to override).
#[test]
fn explicit_transports_win_over_the_environment() {
    let out = efarun(2, "child_explicit_transports", &[("EFA_TRANSPORTS", "ip")]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("explicit transports used")
            .count(),
        2
    );
}
