//! `efa-bench bootstrap-scale`: the bootstrap of N ranks simulated in one process, one thread
//! per rank, each a real [`TcpStore`](efa_core::store::TcpStore) client of one [`TcpStoreServer`] on loopback, as under
//! efarun (the launcher serves the store, with a token).
//!
//! Every rank does what [`Communicator::init`](efa_core::Communicator::init) does with the
//! store: connect ([`Bootstrap::connect_store`](efa_core::bootstrap::Bootstrap::connect_store)), exchange a card of `--card` bytes, then a
//! ready barrier ([`bootstrap::barrier`]). The exchange is one of:
//!
//! * `grouped` ([`bootstrap::exchange_grouped`]): each rank receives the cards of the ranks
//!   on its host only (`--per-host` ranks per simulated host); the others stay in the store
//!   for [`bootstrap::lookup`] on first use. What scales.
//! * `all` ([`bootstrap::exchange_all`]): every rank receives every card in one request;
//!   the store sends `N²` cards.
//! * `keys`: the protocol before issue 17, for comparison: one SET, then one GET per rank
//!   (`N²` requests).
//! * `peers`: the cards travel over the ranks' own connections (NCCL's bootstrap): each rank
//!   publishes the address of a TCP listener, looks up its `log2 N` partners' addresses, and
//!   the cards are allgathered by recursive doubling over those connections (`N` a power of
//!   two). The store sees `O(N log N)` requests, the ranks move `N²` cards among themselves.
//!
//! Time is from the moment every thread is started (they wait on one barrier) until the
//! last rank has passed the ready barrier. Requests and bytes are the server's
//! ([`TcpStoreServer::stats`]). The summary line fits `time = c·N^E` by least squares over
//! the sizes run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use efa_core::bootstrap::{self, BootstrapBuilder, Rendezvous, StoreServer};
use efa_core::store::{StoreStats, StoreToken, TcpStoreServer};
use serde::Serialize;

use crate::opts::{ExchangeMode, ScaleArgs};
use crate::{err, Result};

/// One size's result.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub mode: &'static str,
    pub ranks: u32,
    pub per_host: u32,
    pub seconds: f64,
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Cards this rank received (rank 0's count), for the grouped/all comparison.
    pub cards_per_rank: usize,
    /// Growth of this process's VmRSS from before the threads started to the moment every
    /// rank has finished and still holds what it received, per rank, in KiB (thread stacks
    /// and the client and server sides of its store connection included).
    pub rss_kib_per_rank: f64,
}

pub fn run(a: &ScaleArgs) -> Result<()> {
    let mut points = Vec::new();
    if !a.json {
        println!(
            "# bootstrap-scale: {} exchange, {}-byte cards, {} ranks per host, one thread per rank, TCP store on loopback",
            a.mode.name(),
            a.card,
            a.per_host
        );
        println!(
            "{:>8} {:>10} {:>12} {:>14} {:>14} {:>8} {:>12}",
            "ranks", "time(s)", "requests", "bytes_sent", "bytes_recv", "cards", "KiB/rank"
        );
    }
    for &n in &a.ranks.0 {
        let p = run_one(a, n as u32)?;
        if a.json {
            println!("{}", serde_json::to_string(&p)?);
        } else {
            println!(
                "{:>8} {:>10.3} {:>12} {:>14} {:>14} {:>8} {:>12.1}",
                p.ranks,
                p.seconds,
                p.requests,
                p.bytes_sent,
                p.bytes_received,
                p.cards_per_rank,
                p.rss_kib_per_rank
            );
        }
        points.push(p);
    }
    println!("{}", summary(&points));
    Ok(())
}

/// `bootstrap-scale: N=1024 T1 s, N=4096 T2 s, exponent E` (sizes not run are `-`).
pub fn summary(points: &[Point]) -> String {
    let at = |n: u32| {
        points
            .iter()
            .find(|p| p.ranks == n)
            .map_or("-".to_string(), |p| format!("{:.3}", p.seconds))
    };
    let e = exponent(points).map_or("-".to_string(), |e| format!("{e:.2}"));
    format!(
        "bootstrap-scale: N=1024 {} s, N=4096 {} s, exponent {e}",
        at(1024),
        at(4096)
    )
}

/// The least-squares slope of log(time) against log(N), from sizes of 256 ranks up (below,
/// thread start-up and fixed costs dominate), else from all sizes; `None` with fewer than two.
pub fn exponent(points: &[Point]) -> Option<f64> {
    let big: Vec<&Point> = points.iter().filter(|p| p.ranks >= 256).collect();
    let use_: Vec<&Point> = if big.len() >= 2 {
        big
    } else {
        points.iter().collect()
    };
    if use_.len() < 2 {
        return None;
    }
    let xs: Vec<f64> = use_.iter().map(|p| f64::from(p.ranks).ln()).collect();
    let ys: Vec<f64> = use_.iter().map(|p| p.seconds.max(1e-6).ln()).collect();
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn run_one(a: &ScaleArgs, n: u32) -> Result<Point> {
    if a.mode == ExchangeMode::Peers && !n.is_power_of_two() {
        return Err(err(format!(
            "--mode peers allgathers by recursive doubling and needs a power of two, not {n}"
        )));
    }
    let token = StoreToken::generate()?;
    let server = TcpStoreServer::bind_with_token("127.0.0.1:0", Some(token.clone()))?;
    let addr = server.local_addr().to_string();
    let timeout = Duration::from_secs_f64(a.timeout);
    let rss_before = vm_rss_kib();
    // Every rank waits at `start`, then at `finished` still holding what it received (so
    // the memory is measured), then at `release`.
    let [start, finished, release] = [(); 3].map(|()| Arc::new(Barrier::new(n as usize + 1)));
    let mut threads = Vec::with_capacity(n as usize);
    for rank in 0..n {
        let (addr, token) = (addr.clone(), token.clone());
        let (start, finished, release) = (start.clone(), finished.clone(), release.clone());
        let (mode, card_len, per_host) = (a.mode, a.card, a.per_host);
        let t = std::thread::Builder::new()
            .name(format!("rank {rank}"))
            .stack_size(256 << 10)
            .spawn(move || -> Result<usize> {
                start.wait();
                // A panic must still reach the barriers, or the others wait forever.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rank_main(rank, n, &addr, token, mode, card_len, per_host, timeout)
                }))
                .unwrap_or_else(|_| Err(err("panicked")));
                finished.wait();
                release.wait();
                r.map(|(cards, _held)| cards)
            })
            .map_err(|e| err(format!("cannot start thread {rank} of {n}: {e}")))?;
        threads.push(t);
    }
    start.wait();
    let t0 = Instant::now();
    finished.wait();
    let seconds = t0.elapsed().as_secs_f64();
    let rss = vm_rss_kib().saturating_sub(rss_before);
    release.wait();
    let mut cards = 0;
    let mut first_err = None;
    for (rank, t) in threads.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(c)) if rank == 0 => cards = c,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(format!("rank {rank}: {e}"));
            }
            Err(_) => {
                first_err.get_or_insert(format!("rank {rank} panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(err(format!("{n} ranks: {e}")));
    }
    let StoreStats {
        requests,
        bytes_sent,
        bytes_received,
    } = server.stats();
    Ok(Point {
        mode: a.mode.name(),
        ranks: n,
        per_host: a.per_host,
        seconds,
        requests,
        bytes_sent,
        bytes_received,
        cards_per_rank: cards,
        rss_kib_per_rank: rss as f64 / f64::from(n),
    })
}

/// This process's resident memory (`VmRSS` of `/proc/self/status`), in KiB; 0 if unknown.
fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A card of `len` bytes that names its rank, so that a card delivered to the wrong place
/// is caught.
fn card(rank: u32, len: usize) -> Vec<u8> {
    let mut c = vec![(rank % 251) as u8; len.max(4)];
    c[..4].copy_from_slice(&rank.to_be_bytes());
    c
}

fn check_card(rank: u32, c: &[u8], len: usize) -> Result<()> {
    if c != card(rank, len).as_slice() {
        return Err(err(format!("the card of rank {rank} arrived wrong")));
    }
    Ok(())
}

/// One rank: connect, exchange, ready barrier. Returns the number of cards received, and
/// the cards and the store, which the caller holds until the memory has been measured.
#[allow(clippy::too_many_arguments)]
fn rank_main(
    rank: u32,
    n: u32,
    addr: &str,
    token: StoreToken,
    mode: ExchangeMode,
    card_len: usize,
    per_host: u32,
    timeout: Duration,
) -> Result<(usize, Held)> {
    let deadline = Instant::now() + timeout;
    let boot = BootstrapBuilder::new(
        rank,
        n,
        Rendezvous::Tcp {
            addr: addr.to_owned(),
            server: StoreServer::Launcher,
        },
    )
    .store_token(token)
    .build()?;
    let store = boot.connect_store(deadline)?;
    let mine = card(rank, card_len);
    let host = rank / per_host;
    let got = match mode {
        ExchangeMode::Grouped => {
            let got = bootstrap::exchange_grouped(
                &*store,
                "card",
                rank,
                n,
                &format!("host-{host}"),
                &mine,
                deadline,
            )?;
            let expect = (host * per_host..((host + 1) * per_host).min(n)).collect::<Vec<_>>();
            if got.iter().map(|g| g.0).collect::<Vec<_>>() != expect {
                return Err(err(format!("rank {rank} got the wrong host group")));
            }
            for (r, c) in &got {
                check_card(*r, c, card_len)?;
            }
            (got.len(), Box::new(got) as Box<dyn std::any::Any + Send>)
        }
        ExchangeMode::All => {
            let got = bootstrap::exchange_all(&*store, "card", rank, n, &mine, deadline)?;
            for (r, c) in got.iter().enumerate() {
                check_card(r as u32, c, card_len)?;
            }
            (got.len(), Box::new(got) as Box<dyn std::any::Any + Send>)
        }
        ExchangeMode::Keys => {
            store.set_by(&format!("card/{rank}"), &mine, deadline)?;
            let mut got = Vec::with_capacity(n as usize);
            for r in 0..n {
                let c = store.get(&format!("card/{r}"), deadline)?;
                check_card(r, &c, card_len)?;
                got.push(c);
            }
            (got.len(), Box::new(got) as Box<dyn std::any::Any + Send>)
        }
        ExchangeMode::Peers => {
            let got = peers_allgather(&*store, rank, n, mine, deadline)?;
            for (r, c) in got.iter().enumerate() {
                check_card(r as u32, c, card_len)?;
            }
            (got.len(), Box::new(got) as Box<dyn std::any::Any + Send>)
        }
    };
    bootstrap::barrier(&*store, "ready", rank, n, deadline)?;
    Ok((got.0, (got.1, store)))
}

/// What a rank keeps after its bootstrap: the cards it received and its store connection.
type Held = (
    Box<dyn std::any::Any + Send>,
    Arc<dyn efa_core::store::Store>,
);

/// Recursive-doubling allgather of the cards over TCP connections between the ranks: in
/// round `k` rank `r` swaps everything it has with `r ^ 2^k` (the lower rank connects).
fn peers_allgather(
    store: &dyn efa_core::store::Store,
    rank: u32,
    n: u32,
    mine: Vec<u8>,
    deadline: Instant,
) -> Result<Vec<Vec<u8>>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let me = listener.local_addr()?.to_string();
    store.set_by(&format!("addr/{rank}"), me.as_bytes(), deadline)?;
    let mut have: Vec<Option<Vec<u8>>> = vec![None; n as usize];
    have[rank as usize] = Some(mine);
    // Connections accepted early, by round.
    let mut stash: Vec<Option<TcpStream>> = (0..32).map(|_| None).collect();
    let mut mask = 1;
    let mut round = 0usize;
    while mask < n {
        let partner = rank ^ mask;
        let mut s = if rank < partner {
            let a = bootstrap::lookup(store, "addr", partner, deadline)?;
            let mut s = TcpStream::connect(String::from_utf8_lossy(&a).as_ref())?;
            s.write_all(&(round as u32).to_be_bytes())?;
            s
        } else {
            loop {
                if let Some(s) = stash[round].take() {
                    break s;
                }
                let (mut s, _) = listener.accept()?;
                let mut r = [0u8; 4];
                s.read_exact(&mut r)?;
                stash[u32::from_be_bytes(r) as usize] = Some(s);
            }
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))?;
        // My block: the 2^round ranks sharing my bits above `round`.
        let base = rank & !(mask - 1);
        let mut out = Vec::new();
        for r in base..base + mask {
            let c = have[r as usize].as_ref().ok_or("missing card")?;
            out.extend_from_slice(&(c.len() as u32).to_be_bytes());
            out.extend_from_slice(c);
        }
        // Written by a thread of its own: both partners send at once, and blocks larger
        // than the socket buffers would otherwise block both writers.
        let writer = {
            let mut w = s.try_clone()?;
            std::thread::spawn(move || w.write_all(&out))
        };
        let pbase = partner & !(mask - 1);
        for r in pbase..pbase + mask {
            let mut l = [0u8; 4];
            s.read_exact(&mut l)?;
            let mut c = vec![0u8; u32::from_be_bytes(l) as usize];
            s.read_exact(&mut c)?;
            have[r as usize] = Some(c);
        }
        writer.join().map_err(|_| err("writer panicked"))??;
        mask <<= 1;
        round += 1;
    }
    Ok(have.into_iter().map(Option::unwrap_or_default).collect())
}
