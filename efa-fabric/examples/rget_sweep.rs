//! Fabric-level sweep behind [`efa_fabric::rget_threshold`]: for each provider and size,
//! the time to move N bytes from one rank's user buffer into another's
//!
//! - `copy`: copy into a registered bounce buffer, tagged send, tagged receive into a
//!   registered bounce buffer, copy out, 1-byte ack back (the eager/pooled path);
//! - `rget`: register the user's send buffer (`Endpoint::expose`), send its 24-byte
//!   descriptor (the RTS), the receiver reads straight into its user buffer
//!   (`Endpoint::read_into`, registering it too under `FI_MR_LOCAL`), then sends a 1-byte FIN
//!   and the sender deregisters;
//!
//! and the cost of one `fi_mr_regattr` + `fi_close` per size. Both endpoints live in one
//! process and one thread polls both (see `run`).
//! Times are medians over `REPS` (default 5) alternating runs of each method. `ONLY_REG=1`
//! measures only the registration cost.
//!
//! ```text
//! cargo run --release -p efa-fabric --example rget_sweep -- shm "tcp;ofi_rxm" "udp;ofi_rxd"
//! ```
use std::time::{Duration, Instant};

use efa_fabric::{
    AddrFormat, BufPrefix, Caps, Endpoint, Hints, Info, MemoryRegion, RegisteredBuf, RemoteRegion,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const RTS: u64 = 1;
const FIN: u64 = 2;
const DATA: u64 = 3;

fn info(provider: &str) -> efa_fabric::Result<Info> {
    let caps = Caps::MSG | Caps::TAGGED | Caps::RMA | Caps::READ | Caps::REMOTE_READ;
    let mut h = Hints::new().provider(provider).caps(caps);
    if efa_fabric::is_ip_provider(provider) {
        h = h.domain("lo").addr_format(AddrFormat::SockaddrIn);
    }
    let infos = h.get()?;
    Ok(infos
        .into_iter()
        .find(|i| i.provider() == provider)
        .expect("the provider asked for"))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Copy,
    Rget,
}

/// Progresses both endpoints until both operations are done; returns their buffers.
fn both<X: efa_fabric::IoBuf, Y: efa_fabric::IoBuf>(
    mut x: efa_fabric::Pending<X>,
    mut y: efa_fabric::Pending<Y>,
) -> efa_fabric::Result<(X, Y)> {
    let deadline = Instant::now() + TIMEOUT;
    while !(x.test()? & y.test()?) {
        if Instant::now() > deadline {
            return Err(efa_fabric::Error::Timeout {
                op: "sweep",
                waited: TIMEOUT,
            });
        }
    }
    Ok((
        x.wait(TIMEOUT).map_err(|e| e.error)?.buf,
        y.wait(TIMEOUT).map_err(|e| e.error)?.buf,
    ))
}

/// Exchanges one message each way while helper threads progress both endpoints: providers
/// that connect on first use (shm, rxm) need the peer to progress while a post waits.
fn connect(
    a: &Endpoint,
    b: &Endpoint,
    a_to_b: efa_fabric::FiAddr,
    b_to_a: efa_fabric::FiAddr,
) -> efa_fabric::Result<()> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        for ep in [a, b] {
            let stop = &stop;
            sc.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = ep.progress();
                    std::thread::yield_now();
                }
            });
        }
        let r = (|| {
            let r = b.trecv(vec![0u8; 1], b_to_a, FIN, 0).map_err(|e| e.error)?;
            a.tsend(vec![1u8], a_to_b, FIN)
                .map_err(|e| e.error)?
                .wait(TIMEOUT)
                .map_err(|e| e.error)?;
            r.wait(TIMEOUT).map_err(|e| e.error)?;
            let r = a.trecv(vec![0u8; 1], a_to_b, FIN, 0).map_err(|e| e.error)?;
            b.tsend(vec![1u8], b_to_a, FIN)
                .map_err(|e| e.error)?
                .wait(TIMEOUT)
                .map_err(|e| e.error)?;
            r.wait(TIMEOUT).map_err(|e| e.error)?;
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

/// Microseconds per message, `iters` messages of `len` bytes from `a` to `b`. One thread
/// drives both endpoints (polling each in turn), so the result is the CPU and provider cost
/// of each path without cross-thread wake-up noise on a loaded machine.
fn run(info: &Info, method: Method, len: usize, iters: usize) -> efa_fabric::Result<f64> {
    let a = Endpoint::open(info)?;
    let b = Endpoint::open(info)?;
    let a_to_b = a.av().insert(&b.name()?)?;
    let b_to_a = b.av().insert(&a.name()?)?;
    connect(&a, &b, a_to_b, b_to_a)?;
    let src: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut dst = vec![0u8; len];
    let local = efa_fabric::Access::LOCAL;
    let mut tx = RegisteredBuf::new(a.domain(), len, local, Some(&a))?;
    let mut rx = RegisteredBuf::new(b.domain(), len, local, Some(&b))?;
    let mut small_a = RegisteredBuf::new(a.domain(), 64, local, Some(&a))?;
    let mut small_b = RegisteredBuf::new(b.domain(), 64, local, Some(&b))?;
    // One warm-up message, then the timed ones.
    let mut start = Instant::now();
    for i in 0..=iters {
        if i == 1 {
            start = Instant::now();
        }
        match method {
            Method::Copy => {
                tx.copy_from_slice(&src);
                let r = b.trecv(rx, b_to_a, DATA, 0).map_err(|e| e.error)?;
                let s = a.tsend(tx, a_to_b, DATA).map_err(|e| e.error)?;
                (tx, rx) = both(s, r)?;
                dst.copy_from_slice(&rx[..len]);
            }
            Method::Rget => {
                let exposed = a.expose(&src)?;
                small_a[..RemoteRegion::WIRE_LEN].copy_from_slice(&exposed.remote().to_bytes());
                let r = b.trecv(small_b, b_to_a, RTS, 0).map_err(|e| e.error)?;
                let s = a
                    .tsend(BufPrefix::new(small_a, RemoteRegion::WIRE_LEN), a_to_b, RTS)
                    .map_err(|e| e.error)?;
                let (sa, rb) = both(s, r)?;
                (small_a, small_b) = (sa.into_inner(), rb);
                let remote = RemoteRegion::from_bytes(&small_b[..RemoteRegion::WIRE_LEN])?;
                efa_fabric::rma_scope(TIMEOUT, |sc| -> efa_fabric::Result<usize> {
                    let id = sc.read(&b, &mut dst, b_to_a, &remote, 0)?;
                    // The target side progresses too (tcp serves reads in its progress).
                    while !sc.test(id)? {
                        a.progress()?;
                    }
                    sc.wait(id)
                })?;
                drop(exposed);
            }
        }
        // The FIN (RGET) or ack (copy): 1 byte back; completes the sender's message.
        let r = a.trecv(small_a, a_to_b, FIN, 0).map_err(|e| e.error)?;
        let s = b
            .tsend(BufPrefix::new(small_b, 1), b_to_a, FIN)
            .map_err(|e| e.error)?;
        let (sb, ra) = both(s, r)?;
        (small_b, small_a) = (sb.into_inner(), ra);
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / iters as f64;
    assert_eq!(dst[len - 1], (len - 1) as u8, "data arrived");
    Ok(us)
}

/// Microseconds per `fi_mr_regattr` + `fi_close` of `len` bytes (remote read access).
fn reg_cost(info: &Info, len: usize) -> efa_fabric::Result<f64> {
    let ep = Endpoint::open(info)?;
    let buf = vec![1u8; len];
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        let mr = MemoryRegion::register(
            ep.domain(),
            &buf[..],
            efa_fabric::Access::REMOTE_READ,
            Some(&ep),
        )?;
        drop(mr);
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() -> efa_fabric::Result<()> {
    let mut providers: Vec<String> = std::env::args().skip(1).collect();
    if providers.is_empty() {
        providers = vec!["shm".into(), "tcp;ofi_rxm".into(), "udp;ofi_rxd".into()];
    }
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sizes: Vec<usize> = (13..=22).map(|s| 1usize << s).collect();
    // ONLY_REG=1: only the registration cost (compare FI_MR_CACHE_MONITOR=disabled with the
    // default on providers that cache registrations: verbs, efa).
    let only_reg = std::env::var_os("ONLY_REG").is_some();
    for p in &providers {
        let info = match info(p) {
            Ok(i) => i,
            Err(e) => {
                println!("# {p}: skipped: {e}");
                continue;
            }
        };
        println!(
            "# provider {p} (max_msg_size {}, mr_mode {:?})",
            info.max_msg_size(),
            info.mr_mode()
        );
        println!(
            "{:>10} {:>12} {:>12} {:>8} {:>12}",
            "bytes", "copy_us", "rget_us", "ratio", "mr_reg_us"
        );
        let mut threshold = None;
        for &len in &sizes {
            if only_reg {
                println!(
                    "{len:>10} {:>12} {:>12} {:>8} {:>12.2}",
                    "-",
                    "-",
                    "-",
                    reg_cost(&info, len)?
                );
                continue;
            }
            let iters = ((256usize << 20) / len).clamp(20, 400) / reps.max(1) + 4;
            let mut copy = Vec::new();
            let mut rget = Vec::new();
            for _ in 0..reps {
                copy.push(run(&info, Method::Copy, len, iters)?);
                rget.push(run(&info, Method::Rget, len, iters)?);
            }
            let (c, r) = (median(copy), median(rget));
            let reg = reg_cost(&info, len)?;
            println!("{len:>10} {c:>12.1} {r:>12.1} {:>8.2} {reg:>12.2}", c / r);
            if r < c && threshold.is_none() {
                threshold = Some(len);
            } else if r >= c {
                threshold = None;
            }
        }
        println!("# {p}: RGET faster from {threshold:?} bytes on (and at every size above)");
    }
    Ok(())
}
