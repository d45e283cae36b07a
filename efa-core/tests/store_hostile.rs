//! The TCP store server among broken and hostile clients, on loopback: garbage, huge length
//! fields, half-sent frames that never finish, connect-and-close storms and requests whose
//! client vanishes. Real ranks (threads with real `TcpStore` clients) must still finish their
//! exchanges and barriers within their deadline, the server must keep serving, and its memory
//! must not grow with the lengths that clients merely announce.
//!
//! Kept in its own test binary: the memory check reads this process's `VmSize`, which other
//! tests running in parallel threads would disturb.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use efa_core::bootstrap::{barrier, exchange_all};
use efa_core::store::{Store, StoreToken, TcpStore, TcpStoreServer, MAX_FRAME};

/// A `/proc/self/status` field in KiB: `VmSize` (virtual size: a `vec![0; n]` of a huge
/// announced length shows here even before its pages are touched) or `VmRSS`.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn hello(rank: u32) -> Vec<u8> {
    let mut p = vec![1u8];
    p.extend_from_slice(&rank.to_be_bytes());
    frame(&p)
}

fn set(key: &str, value: &[u8]) -> Vec<u8> {
    let mut p = vec![2u8];
    p.extend_from_slice(&(key.len() as u32).to_be_bytes());
    p.extend_from_slice(key.as_bytes());
    p.extend_from_slice(value);
    frame(&p)
}

fn get(key: &str, wait_ms: u64) -> Vec<u8> {
    let mut p = vec![3u8];
    p.extend_from_slice(&(key.len() as u32).to_be_bytes());
    p.extend_from_slice(key.as_bytes());
    p.extend_from_slice(&wait_ms.to_be_bytes());
    frame(&p)
}

/// A GATHER of every entry of `exchange` among `world` ranks (selector 0: all).
fn gather(exchange: &str, world: u32, wait_ms: u64) -> Vec<u8> {
    let mut p = vec![7u8];
    p.extend_from_slice(&(exchange.len() as u32).to_be_bytes());
    p.extend_from_slice(exchange.as_bytes());
    p.extend_from_slice(&world.to_be_bytes());
    p.push(0);
    p.extend_from_slice(&wait_ms.to_be_bytes());
    frame(&p)
}

/// The requests that wait on the server (a GET of a key nobody sets, a GATHER of an
/// exchange nobody publishes in), by name.
fn waiting_requests() -> [(&'static str, Vec<u8>); 2] {
    [
        ("GET", get("never", 60_000)),
        ("GATHER", gather("never", 2, 60_000)),
    ]
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A raw client connection to `addr` that has said HELLO as `rank` and been answered.
fn greeted(addr: SocketAddr, rank: u32) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(&hello(rank)).unwrap();
    assert_eq!(reply(&mut s).unwrap().0, 0, "HELLO answered");
    s
}

/// Reads one reply frame: (status, body).
fn reply(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    assert!((1..=MAX_FRAME).contains(&len), "reply frame of {len} bytes");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((body[0], body[1..].to_vec()))
}

/// xorshift64*: garbage that differs per connection, reproducible.
fn garbage(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[test]
fn real_ranks_are_served_among_hostile_clients() {
    ranks_among_hostile_clients(None);
}

/// The same with a server that holds a job token: the hostile clients do not have it.
#[test]
fn real_ranks_with_the_token_are_served_among_hostile_clients() {
    ranks_among_hostile_clients(Some(
        StoreToken::new("hostile-test-token-0123456789abcdef").unwrap(),
    ));
}

/// The two hostile runs take turns: each measures this process's memory.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ranks_among_hostile_clients(token: Option<StoreToken>) {
    let _turn = MEASURING.lock().unwrap_or_else(|p| p.into_inner());
    const RANKS: u32 = 4;
    const ROUNDS: u32 = 15;
    const HUGE: usize = 150;
    const HALF_OPEN: usize = 150;
    let server = TcpStoreServer::bind_with_token("127.0.0.1:0", token.clone()).unwrap();
    let addr = server.local_addr();
    let vm_before = status_kib("VmSize");
    let rss_before = status_kib("VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let storms = Arc::new(AtomicU64::new(0));

    // Connections that stay open until the end: huge announced lengths (with a few body
    // bytes, so the server is inside the frame) and half-sent frames.
    let mut held = Vec::new();
    for i in 0..HUGE {
        let mut s = connect(addr);
        let len = if i % 3 == 0 {
            u32::MAX
        } else {
            MAX_FRAME as u32
        };
        let mut f = len.to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 1, b'k']);
        s.write_all(&f).unwrap();
        held.push(s);
    }
    for i in 0..HALF_OPEN {
        let mut s = connect(addr);
        let h = hello(1000 + i as u32);
        s.write_all(&h[..1 + i % (h.len() - 1)]).unwrap();
        held.push(s);
    }

    // Clients that come and go while the ranks work: garbage, connect-and-close, requests
    // abandoned mid-wait (with the longest wait the protocol can express).
    let hostile: Vec<_> = (0..3u64)
        .map(|kind| {
            let stop = stop.clone();
            let storms = storms.clone();
            thread::spawn(move || {
                let mut i = 0u64;
                let end = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end && i < 2000 {
                    i += 1;
                    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    match kind {
                        0 => {
                            let _ = s.write_all(&garbage(i, 1 + (i as usize * 37) % 3000));
                            let mut sink = [0u8; 512];
                            let _ = s.read(&mut sink);
                        }
                        1 => {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        _ => {
                            let _ = s.write_all(&hello(5000 + i as u32));
                            let _ = s.write_all(&get("never/set", u64::MAX));
                        }
                    }
                    storms.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                }
            })
        })
        .collect();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    let ranks: Vec<_> = (0..RANKS)
        .map(|rank| {
            let token = token.clone();
            thread::spawn(move || {
                let store =
                    TcpStore::connect_with_token(&addr.to_string(), rank, token.as_ref(), deadline)
                        .unwrap_or_else(|e| panic!("rank {rank} could not connect: {e}"));
                for round in 0..ROUNDS {
                    let blob = format!("rank {rank} round {round}").into_bytes();
                    let all =
                        exchange_all(&store, &format!("x/{round}"), rank, RANKS, &blob, deadline)
                            .unwrap_or_else(|e| panic!("rank {rank} round {round}: {e}"));
                    for (r, b) in all.iter().enumerate() {
                        assert_eq!(b, format!("rank {r} round {round}").as_bytes());
                    }
                    barrier(&store, &format!("b/{round}"), rank, RANKS, deadline)
                        .unwrap_or_else(|e| panic!("rank {rank} barrier {round}: {e}"));
                }
                store.close(deadline).unwrap();
            })
        })
        .collect();
    for r in ranks {
        r.join().expect("a real rank failed");
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for h in hostile {
        h.join().unwrap();
    }
    assert!(
        took < Duration::from_secs(20),
        "ranks needed {took:?} among hostile clients"
    );
    assert!(storms.load(Ordering::Relaxed) > 0, "no hostile client ran");

    let vm_mib = status_kib("VmSize").saturating_sub(vm_before) / 1024;
    let rss_mib = status_kib("VmRSS").saturating_sub(rss_before) / 1024;
    eprintln!(
        "ranks done in {took:?}; {} short-lived hostile connections, {} held; \
         VmSize grew {vm_mib} MiB, VmRSS {rss_mib} MiB",
        storms.load(Ordering::Relaxed),
        held.len()
    );
    // 150 connections announcing 64 MiB each would be 9600 MiB of address space if lengths
    // were trusted. The bound leaves room for glibc's per-thread malloc arenas (64 MiB of
    // address space each, for the 9 threads of this test).
    assert!(
        vm_mib < 2048,
        "address space grew {vm_mib} MiB with {HUGE} connections announcing huge frames"
    );
    assert!(rss_mib < 256, "resident memory grew {rss_mib} MiB");

    // Still serving, with every hostile connection still open.
    let store = TcpStore::connect_with_token(
        &addr.to_string(),
        0,
        token.as_ref(),
        Instant::now() + Duration::from_secs(5),
    )
    .expect("server still accepts clients");
    store.set("after", b"ok").unwrap();
    assert_eq!(
        store
            .get("after", Instant::now() + Duration::from_secs(5))
            .unwrap(),
        b"ok"
    );
    drop(held);
}

/// A GET may ask for the longest wait the protocol can express (u64::MAX ms) and must still
/// be answered when the key is set.
#[test]
fn get_with_the_longest_wait_is_answered_when_the_key_is_set() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr();
    let mut waiter = greeted(addr, 0);
    waiter.write_all(&get("late", u64::MAX)).unwrap();
    thread::sleep(Duration::from_millis(100));
    let mut setter = connect(addr);
    setter.write_all(&set("late", b"value")).unwrap();
    assert_eq!(reply(&mut setter).unwrap().0, 0);
    let (status, body) = reply(&mut waiter).expect("the waiting GET is answered");
    assert_eq!((status, body.as_slice()), (0, &b"value"[..]));
}

/// A rank whose connection closes while the server holds its GET (or GATHER) has left: the
/// server must notice at once, not when the wait ends (a serving rank 0 waits for
/// departures).
#[test]
fn client_gone_during_a_get_counts_as_departed_at_once() {
    for (what, request) in waiting_requests() {
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr();
        let mut s = greeted(addr, 0);
        s.write_all(&request).unwrap();
        thread::sleep(Duration::from_millis(100));
        drop(s);
        let t0 = Instant::now();
        server
            .wait_departed(1, Instant::now() + Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{what}: rank 0 departed when its connection closed: {e}"));
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{what}: {:?}",
            t0.elapsed()
        );
    }
}

/// A client that sends a second request while its GET (or GATHER) waits breaks the
/// one-request-in-flight rule: the server closes that connection (and serves everybody
/// else).
#[test]
fn pipelined_request_during_a_get_closes_only_that_connection() {
    for (what, request) in waiting_requests() {
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr();
        let mut s = greeted(addr, 0);
        s.write_all(&request).unwrap();
        s.write_all(&hello(0)).unwrap();
        let t0 = Instant::now();
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(
            matches!(r, Ok(0)) || r.is_err(),
            "{what}: expected the connection closed, got {r:?} {rest:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{what}");
        let other = TcpStore::connect(
            &addr.to_string(),
            1,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        other.set("k", b"v").unwrap();
    }
}

/// A GATHER of an exchange that is already complete does not wait, so a request sent right
/// behind it is served, as after a GET of a key that is set.
#[test]
fn request_behind_a_gather_that_need_not_wait_is_served() {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let store = TcpStore::connect(
        &server.local_addr().to_string(),
        0,
        Instant::now() + Duration::from_secs(5),
    )
    .unwrap();
    barrier(
        &store,
        "done",
        0,
        1,
        Instant::now() + Duration::from_secs(5),
    )
    .unwrap();
    let mut s = greeted(server.local_addr(), 1);
    s.write_all(&[gather("done", 1, 60_000), set("k", b"v")].concat())
        .unwrap();
    // One entry: rank 0's empty barrier blob.
    let entries = [1u32, 0, 0].map(u32::to_be_bytes).concat();
    assert_eq!(reply(&mut s).unwrap(), (0, entries));
    assert_eq!(reply(&mut s).unwrap().0, 0);
}
