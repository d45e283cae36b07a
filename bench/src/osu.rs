//! The OSU micro-benchmarks' point-to-point tests run through an efa-core [`Communicator`]
//! (not the raw fabric of [`crate::benches`]), with OSU's method, iteration counts and
//! output, so that their numbers lie side by side with `osu_latency`, `osu_bw` and
//! `osu_bibw` on an MPI (and with `bench/mpi_osu.c`, their Open MPI counterpart here).
//!
//! Method (OSU 5.x–7.x `mpi/pt2pt`), exactly 2 ranks, a barrier before each size:
//! - `osu-latency`: rank 0 `send`s then `recv`s, rank 1 `recv`s then `send`s (tag 1),
//!   `skip` untimed then `iters` timed round trips; latency = elapsed / (2 · iters), in us.
//! - `osu-bw`: per iteration rank 0 starts `W` `isend`s (tag 100), waits for all of them,
//!   then receives a 4-byte ack (tag 101); rank 1 starts `W` `irecv`s, waits for all, sends
//!   the ack. Bandwidth = size · iters · W / elapsed, in MB/s (10^6 bytes).
//! - `osu-bibw`: both ranks start `W` `irecv`s then `W` `isend`s, wait for the sends, then
//!   the receives; bandwidth counts both directions: 2 · size · iters · W / elapsed.
//!
//! The time is rank 0's, from the first timed iteration to the last one's end, read twice
//! per size (as OSU's `MPI_Wtime`); `--json` adds per-iteration percentiles, at the cost of
//! a clock read per iteration. Iteration counts ([`OsuTest::default_counts`]) and sweeps
//! are OSU's.
//!
//! One deviation: OSU posts all `W` receives of a window into the same buffer. Here each
//! receive of a window has its own slice of one buffer of `W · size` bytes (Rust's borrow
//! rules allow one writer per buffer, and MPI calls overlapping pending receives erroneous);
//! `mpi_osu.c` does the same, so both sides touch the same amount of memory.
//!
//! Every rank fills its send buffer with a pattern of its own, and after each size checks
//! that the last message received holds the peer's pattern: a run that moves wrong bytes
//! fails instead of printing a number.

use std::time::{Duration, Instant};

use efa_core::{Communicator, P2pRequest, Status};

use crate::opts::{OsuArgs, OsuTest};
use crate::output::{Format, Measured, Metric, Provenance, Writer};
use crate::{err, Result};

/// osu_latency's tag.
const TAG_LAT: u32 = 1;
/// osu_bw's data and ack tags.
const TAG_BW: u32 = 100;
const TAG_ACK: u32 = 101;
/// osu_bibw's tags: rank 0 receives on 10 and sends on 100.
const TAG_BI_0: u32 = 10;
const TAG_BI_1: u32 = 100;

/// Byte `i` of rank `r`'s send buffer.
fn pattern(r: u32, i: usize) -> u8 {
    (i.wrapping_mul(7) as u8).wrapping_add(1 + 64 * r as u8)
}

fn check(got: &[u8], peer: u32, what: &str) -> Result<()> {
    match got
        .iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern(peer, i))
    {
        None => Ok(()),
        Some((i, &b)) => Err(err(format!(
            "{what}: byte {i} of {} received from rank {peer} is {b:#04x}, expected {:#04x}",
            got.len(),
            pattern(peer, i)
        ))),
    }
}

fn check_len(st: &Status, size: usize, what: &str) -> Result<()> {
    if st.len != size {
        return Err(err(format!(
            "{what}: received {} bytes, expected {size}",
            st.len
        )));
    }
    Ok(())
}

/// Runs `test` as one rank of a 2-rank job; rank 0 prints.
pub fn run_rank(test: OsuTest, a: &OsuArgs) -> Result<()> {
    let comm = crate::job::join(a.timeout, a.flows)?;
    if comm.size() != 2 {
        return Err(err(format!(
            "{} needs exactly 2 ranks (this job has {}), as OSU's point-to-point tests do",
            test.name(),
            comm.size()
        )));
    }
    let me = comm.rank();
    let peer = 1 - me;
    let route = comm.route(peer)?.transport;
    let provider = comm.provider(route).unwrap_or("?").to_string();
    let (maj, min) = efa_fabric::libfabric_version();
    let window = if test == OsuTest::Latency {
        1
    } else {
        a.window
    };
    let prov = Provenance {
        bench: test.name().into(),
        provider: provider.clone(),
        domain: comm.config().ip_iface().unwrap_or("-").into(),
        route: match comm.ip_flows(peer)? {
            Some(f) => format!(
                "communicator/{route}/{provider}/{} flows {}",
                f.len(),
                comm.config().ip_flows().mode
            ),
            None => format!("communicator/{route}/{provider}"),
        },
        api: "communicator".into(),
        window,
        libfabric: format!("{maj}.{min}"),
        host: crate::host_name(),
        git_rev: env!("EFA_BENCH_GIT_REV").into(),
    };
    let metric = match test {
        OsuTest::Latency => Metric::Latency,
        OsuTest::Bw => Metric::Bandwidth,
        OsuTest::Bibw => Metric::BiBandwidth,
    };
    let format = if a.json { Format::Json } else { Format::Osu };
    let mut w = Writer::new(format, metric, prov);
    let sizes = a.sizes(test);
    let max = sizes.iter().copied().max().unwrap_or(0);
    let sbuf: Vec<u8> = (0..max).map(|i| pattern(me, i)).collect();
    // One slot per message of a window (stride at least 1 so that 0-byte slots exist).
    let mut rbuf = vec![0u8; window * max.max(1)];
    let cap = sizes
        .iter()
        .map(|&s| a.counts(test, s).0)
        .max()
        .unwrap_or(0);
    let mut samples: Vec<u64> = Vec::with_capacity(if a.json { cap } else { 0 });
    for &size in &sizes {
        let (iters, skip) = a.counts(test, size);
        samples.clear();
        comm.barrier()?;
        let s = &sbuf[..size];
        let sampled = a.json.then_some(&mut samples);
        let elapsed = match test {
            OsuTest::Latency => latency(&comm, s, &mut rbuf, iters, skip, sampled)?,
            OsuTest::Bw => bw(&comm, s, &mut rbuf, window, iters, skip, sampled)?,
            OsuTest::Bibw => bibw(&comm, s, &mut rbuf, window, iters, skip, sampled)?,
        };
        if me == 0 {
            let (p50_ns, p99_ns, max_ns) = crate::output::percentiles(&mut samples);
            w.row(&Measured {
                bytes: size,
                iters: iters * window,
                // A round trip is 2 transfers (so usec/xfer is half of it); bibw moves 2
                // messages per window slot.
                xfers_per_iter: if test == OsuTest::Bw { 1 } else { 2 },
                elapsed_ns: elapsed.as_nanos() as u64,
                p50_ns,
                p99_ns,
                max_ns,
            })?;
        }
    }
    comm.barrier()?;
    Ok(())
}

/// OSU's loop: `skip` untimed then `iters` timed runs of `step(last)` (`last` is true on the
/// final run); returns the time from the first timed run's start to the last one's end. With
/// `samples`, each timed run's time divided by `per` (the messages it counts as) is pushed.
fn timed(
    iters: usize,
    skip: usize,
    per: u64,
    mut samples: Option<&mut Vec<u64>>,
    mut step: impl FnMut(bool) -> Result<()>,
) -> Result<Duration> {
    let mut start = Instant::now();
    for i in 0..iters + skip {
        if i == skip {
            start = Instant::now();
        }
        let t = samples.is_some().then(Instant::now);
        step(i + 1 == iters + skip)?;
        if let (Some(t), Some(v), true) = (t, samples.as_deref_mut(), i >= skip) {
            v.push(t.elapsed().as_nanos() as u64 / per);
        }
    }
    Ok(start.elapsed())
}

/// Ping-pong; returns rank 0's elapsed time of the timed iterations.
fn latency(
    comm: &Communicator,
    s: &[u8],
    rbuf: &mut [u8],
    iters: usize,
    skip: usize,
    samples: Option<&mut Vec<u64>>,
) -> Result<Duration> {
    let size = s.len();
    let me = comm.rank();
    let peer = 1 - me;
    let r = &mut rbuf[..size];
    let mut last = None;
    let elapsed = timed(iters, skip, 2, samples, |_| {
        if me == 0 {
            comm.send(s, peer, TAG_LAT)?;
            last = Some(comm.recv(r, peer, TAG_LAT)?);
        } else {
            last = Some(comm.recv(r, peer, TAG_LAT)?);
            comm.send(s, peer, TAG_LAT)?;
        }
        Ok(())
    })?;
    if let Some(st) = last {
        check_len(&st, size, "osu-latency")?;
    }
    check(r, peer, "osu-latency")?;
    Ok(elapsed)
}

/// `W` sends of `s`, all from the same buffer (as OSU).
fn post_sends<'a>(
    comm: &Communicator,
    s: &'a [u8],
    window: usize,
    peer: u32,
    tag: u32,
    reqs: &mut Vec<P2pRequest<'a>>,
) -> Result<()> {
    for _ in 0..window {
        reqs.push(comm.isend(s, peer, tag)?.into());
    }
    Ok(())
}

/// `W` receives into the window slots of `rbuf` (`stride` bytes apart, `size` bytes each).
fn post_recvs<'a>(
    comm: &Communicator,
    rbuf: &'a mut [u8],
    window: usize,
    size: usize,
    peer: u32,
    tag: u32,
    reqs: &mut Vec<P2pRequest<'a>>,
) -> Result<()> {
    let stride = size.max(1);
    for slot in rbuf[..window * stride].chunks_exact_mut(stride) {
        reqs.push(comm.irecv(&mut slot[..size], peer, tag)?.into());
    }
    Ok(())
}

fn check_window(
    statuses: &[Option<Status>],
    rbuf: &[u8],
    size: usize,
    peer: u32,
    what: &str,
) -> Result<()> {
    for st in statuses.iter().flatten() {
        check_len(st, size, what)?;
    }
    let stride = size.max(1);
    for slot in rbuf[..statuses.len() * stride].chunks_exact(stride) {
        check(&slot[..size], peer, what)?;
    }
    Ok(())
}

/// Unidirectional windows with an ack; returns rank 0's elapsed time.
fn bw(
    comm: &Communicator,
    s: &[u8],
    rbuf: &mut [u8],
    window: usize,
    iters: usize,
    skip: usize,
    samples: Option<&mut Vec<u64>>,
) -> Result<Duration> {
    let size = s.len();
    let me = comm.rank();
    let peer = 1 - me;
    let mut ack = [0u8; 4];
    timed(iters, skip, window as u64, samples, |last| {
        let mut reqs = Vec::with_capacity(window);
        if me == 0 {
            post_sends(comm, s, window, peer, TAG_BW, &mut reqs)?;
            comm.wait_all(reqs)?;
            comm.recv(&mut ack, peer, TAG_ACK)?;
        } else {
            post_recvs(comm, rbuf, window, size, peer, TAG_BW, &mut reqs)?;
            let st = comm.wait_all(reqs)?;
            if last {
                check_window(&st, rbuf, size, peer, "osu-bw")?;
            }
            comm.send(&ack, peer, TAG_ACK)?;
        }
        Ok(())
    })
}

/// Bidirectional windows; returns rank 0's elapsed time.
fn bibw(
    comm: &Communicator,
    s: &[u8],
    rbuf: &mut [u8],
    window: usize,
    iters: usize,
    skip: usize,
    samples: Option<&mut Vec<u64>>,
) -> Result<Duration> {
    let size = s.len();
    let me = comm.rank();
    let peer = 1 - me;
    let (rtag, stag) = if me == 0 {
        (TAG_BI_0, TAG_BI_1)
    } else {
        (TAG_BI_1, TAG_BI_0)
    };
    timed(iters, skip, 2 * window as u64, samples, |last| {
        let mut recvs = Vec::with_capacity(window);
        post_recvs(comm, rbuf, window, size, peer, rtag, &mut recvs)?;
        let mut sends = Vec::with_capacity(window);
        post_sends(comm, s, window, peer, stag, &mut sends)?;
        comm.wait_all(sends)?;
        let st = comm.wait_all(recvs)?;
        if last {
            check_window(&st, rbuf, size, peer, "osu-bibw")?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_between_ranks_and_check_finds_a_wrong_byte() {
        let a: Vec<u8> = (0..300).map(|i| pattern(0, i)).collect();
        let mut b: Vec<u8> = (0..300).map(|i| pattern(1, i)).collect();
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert!(check(&a, 0, "t").is_ok());
        assert!(check(&b, 1, "t").is_ok());
        b[257] ^= 1;
        let e = check(&b, 1, "t").unwrap_err().to_string();
        assert!(e.contains("byte 257 of 300"), "{e}");
    }
}
