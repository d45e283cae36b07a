//! The benchmarks: each a `prepare` + `run` pair on top of [`crate::harness::sweep`].
//! Timed loops allocate nothing and read the clock once per iteration (client only).

use std::time::Instant;

use efa_fabric::{Access, RegisteredBuf};

use crate::fab::{TAG_ACK, TAG_DATA, TAG_FIN};
use crate::harness::{sweep, Session};
use crate::opts::{Api, RmaOp};
use crate::output::Writer;
use crate::{err, Result};

fn ns(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

/// Ping-pong latency (fi_pingpong / osu_latency): the client sends, the server echoes;
/// half the round trip is reported. Sizes up to inject_size go out with `fi_tinject`, larger
/// ones with `fi_tsend` from a registered buffer re-used every iteration. The next receive
/// is always pre-posted, as fi_pingpong does.
pub fn pingpong(s: &mut Session, w: Option<&mut Writer>) -> Result<()> {
    match s.cfg.api {
        Api::Raw => sweep(s, w, pp_raw_prepare, pp_raw_run),
        Api::Safe => sweep(s, w, pp_safe_prepare, pp_safe_run),
    }
}

fn pp_raw_prepare(s: &mut Session, _size: usize) -> Result<()> {
    let rx = s.rx.as_ref().expect("rx buffer");
    s.net.trecv(&mut s.slots[1], rx, TAG_DATA)
}

fn pp_raw_run(s: &mut Session, size: usize, iters: usize, samples: &mut Vec<u64>) -> Result<u64> {
    let Session {
        net, slots, tx, rx, ..
    } = s;
    let (tx, rx) = (tx.as_ref().expect("tx"), rx.as_ref().expect("rx"));
    let (a, b) = slots.split_at_mut(1);
    let (tx_slot, rx_slot) = (&mut a[0], &mut b[0]);
    let inject = size <= net.inject_size;
    let warmup = s.cfg.warmup;
    let total = warmup + iters;
    let client = s.side == crate::harness::Side::Client;
    let mut start = Instant::now();
    for i in 0..total {
        if client {
            let t0 = Instant::now();
            if i == warmup {
                start = t0;
            }
            if inject {
                net.tinject(&tx[..size], TAG_DATA)?;
            } else {
                net.tsend(tx_slot, tx, size, TAG_DATA)?;
            }
            net.wait("pingpong reply", || {
                rx_slot.is_done() && (inject || tx_slot.is_done())
            })?;
            let c = rx_slot.finish("receive")?;
            if !inject {
                tx_slot.finish("send")?;
            }
            if c.len != size {
                return Err(err(format!("reply of {} bytes, expected {size}", c.len)));
            }
            if i + 1 < total {
                net.trecv(rx_slot, rx, TAG_DATA)?;
            }
            if i >= warmup {
                samples.push(ns(t0) / 2);
            }
        } else {
            net.wait("pingpong message", || rx_slot.is_done())?;
            rx_slot.finish("receive")?;
            if i + 1 < total {
                net.trecv(rx_slot, rx, TAG_DATA)?;
            }
            if tx_slot.is_posted() {
                net.wait("pingpong send", || tx_slot.is_done())?;
                tx_slot.finish("send")?;
            }
            if inject {
                net.tinject(&tx[..size], TAG_DATA)?;
            } else {
                net.tsend(tx_slot, tx, size, TAG_DATA)?;
            }
        }
    }
    if tx_slot.is_posted() {
        net.wait("pingpong send", || tx_slot.is_done())?;
        tx_slot.finish("send")?;
    }
    Ok(ns(start))
}

fn pp_safe_prepare(s: &mut Session, size: usize) -> Result<()> {
    // Buffers of exactly `size` bytes (the safe API sends whole buffers), registered here,
    // outside the timed loop, and handed back and forth every iteration.
    let dom = s.net.ep.domain().clone();
    let ep = Some(&s.net.ep);
    s.safe_bufs.0 = Some(RegisteredBuf::new(&dom, size, Access::LOCAL, ep)?);
    let rx = RegisteredBuf::new(&dom, size, Access::LOCAL, ep)?;
    s.safe_rx = Some(s.net.ep.trecv(rx, s.net.peer, TAG_DATA, 0)?);
    Ok(())
}

fn pp_safe_run(s: &mut Session, size: usize, iters: usize, samples: &mut Vec<u64>) -> Result<u64> {
    let ep = s.net.ep.clone();
    let (peer, timeout, inject) = (s.net.peer, s.net.timeout, size <= s.net.inject_size);
    let warmup = s.cfg.warmup;
    let total = warmup + iters;
    let client = s.is_client();
    let mut start = Instant::now();
    for i in 0..total {
        let t0 = if client { Some(Instant::now()) } else { None };
        if i == warmup {
            if let Some(t) = t0 {
                start = t;
            }
        }
        if !client {
            let done = s.safe_rx.take().expect("posted receive").wait(timeout)?;
            if i + 1 < total {
                s.safe_rx = Some(ep.trecv(done.buf, peer, TAG_DATA, 0)?);
            }
            if let Some(p) = s.safe_tx.take() {
                s.safe_bufs.0 = Some(p.wait(timeout)?.buf);
            }
        }
        if inject {
            ep.tinject(&s.safe_bufs.0.as_ref().expect("tx")[..size], peer, TAG_DATA)?;
        } else {
            let b = s.safe_bufs.0.take().expect("tx buffer");
            s.safe_tx = Some(ep.tsend(b, peer, TAG_DATA)?);
        }
        if client {
            let done = s.safe_rx.take().expect("posted receive").wait(timeout)?;
            if let Some(p) = s.safe_tx.take() {
                s.safe_bufs.0 = Some(p.wait(timeout)?.buf);
            }
            if done.len != size {
                return Err(err(format!("reply of {} bytes, expected {size}", done.len)));
            }
            if i + 1 < total {
                s.safe_rx = Some(ep.trecv(done.buf, peer, TAG_DATA, 0)?);
            }
            if i >= warmup {
                samples.push(ns(t0.expect("client time")) / 2);
            }
        }
    }
    if let Some(p) = s.safe_tx.take() {
        s.safe_bufs.0 = Some(p.wait(timeout)?.buf);
    }
    Ok(ns(start))
}

/// Window sizes: warm-up windows (untimed) then timed windows, `w` messages each, the last
/// one possibly short.
fn windows(warmup: usize, iters: usize, w: usize) -> impl Iterator<Item = (usize, bool)> {
    let split =
        |n: usize, timed: bool| (0..n.div_ceil(w)).map(move |k| ((n - k * w).min(w), timed));
    split(warmup, false).chain(split(iters, true))
}

/// Streaming bandwidth (fi_bw / osu_bw): the client posts a window of sends, the server
/// receives them and answers with an ack; the client waits for the ack before the next
/// window. The server pre-posts the next window's receives before acking.
pub fn bw(s: &mut Session, w: Option<&mut Writer>) -> Result<()> {
    sweep(s, w, bw_prepare, bw_run)
}

fn bw_prepare(s: &mut Session, _size: usize) -> Result<()> {
    if s.is_client() {
        return Ok(());
    }
    let k = windows(s.cfg.warmup, s.cfg.iters_for(_size), s.cfg.window)
        .next()
        .map(|x| x.0)
        .unwrap_or(0);
    let rx = s.rx.as_ref().expect("rx");
    for j in 0..k {
        s.net.trecv(&mut s.slots[2 + j], rx, TAG_DATA)?;
    }
    Ok(())
}

fn bw_run(s: &mut Session, size: usize, iters: usize, samples: &mut Vec<u64>) -> Result<u64> {
    let Session {
        net, slots, tx, rx, ..
    } = s;
    let (tx, rx) = (tx.as_ref().expect("tx"), rx.as_ref().expect("rx"));
    let (ack, win) = slots.split_at_mut(2);
    let ack = &mut ack[1];
    let inject = size <= net.inject_size;
    let client = s.side == crate::harness::Side::Client;
    let mut plan = windows(s.cfg.warmup, iters, s.cfg.window).peekable();
    let mut start: Option<Instant> = None;
    while let Some((k, timed)) = plan.next() {
        if client {
            let t0 = Instant::now();
            if timed && start.is_none() {
                start = Some(t0);
            }
            net.trecv(ack, rx, TAG_ACK)?;
            for slot in win[..k].iter_mut() {
                if inject {
                    net.tinject(&tx[..size], TAG_DATA)?;
                } else {
                    net.tsend(slot, tx, size, TAG_DATA)?;
                }
            }
            net.wait("bw window", || {
                ack.is_done() && (inject || win[..k].iter().all(|x| x.is_done()))
            })?;
            ack.finish("ack")?;
            if !inject {
                for slot in win[..k].iter_mut() {
                    slot.finish("send")?;
                }
            }
            if timed {
                samples.push(ns(t0) / k as u64);
            }
        } else {
            net.wait("bw window", || win[..k].iter().all(|x| x.is_done()))?;
            for slot in win[..k].iter_mut() {
                slot.finish("receive")?;
            }
            if let Some(&(next, _)) = plan.peek() {
                for slot in win[..next].iter_mut() {
                    net.trecv(slot, rx, TAG_DATA)?;
                }
            }
            net.tinject(&tx[..4], TAG_ACK)?;
        }
    }
    Ok(start.map(ns).unwrap_or(0))
}

/// RMA latency (-W 1) or bandwidth (-W > 1): the client writes to / reads from the server's
/// registered region, `W` operations at a time, waiting for their local completions. The
/// server only progresses, until the client's end-of-size notice.
pub fn rma(s: &mut Session, w: Option<&mut Writer>) -> Result<()> {
    sweep(s, w, rma_prepare, rma_run)
}

fn rma_prepare(s: &mut Session, _size: usize) -> Result<()> {
    if s.is_client() {
        return Ok(());
    }
    let rx = s.rx.as_ref().expect("rx");
    s.net.trecv(&mut s.slots[1], rx, TAG_FIN)
}

fn rma_run(s: &mut Session, size: usize, iters: usize, samples: &mut Vec<u64>) -> Result<u64> {
    let Session {
        net,
        slots,
        tx,
        oob,
        remote,
        ..
    } = s;
    if s.side == crate::harness::Side::Server {
        let fin = &mut slots[1];
        net.wait_while_peer_alive(oob, "the end of the RMA run", || fin.is_done())?;
        fin.finish("end-of-size notice")?;
        return Ok(0);
    }
    let remote = remote
        .as_ref()
        .ok_or_else(|| err("server sent no RMA region"))?;
    let tx = tx.as_ref().expect("tx");
    let op = s.cfg.op.unwrap_or(RmaOp::Write);
    let win = &mut slots[2..];
    let mut start: Option<Instant> = None;
    for (k, timed) in windows(s.cfg.warmup, iters, s.cfg.window) {
        let t0 = Instant::now();
        if timed && start.is_none() {
            start = Some(t0);
        }
        for slot in win[..k].iter_mut() {
            match op {
                RmaOp::Write => net.write(slot, tx, size, remote)?,
                RmaOp::Read => net.read(slot, tx, size, remote)?,
            }
        }
        net.wait("rma window", || win[..k].iter().all(|x| x.is_done()))?;
        for slot in win[..k].iter_mut() {
            slot.finish(match op {
                RmaOp::Write => "fi_write",
                RmaOp::Read => "fi_read",
            })?;
        }
        if timed {
            samples.push(ns(t0) / k as u64);
        }
    }
    let elapsed = start.map(ns).unwrap_or(0);
    net.tinject(&tx[..1], TAG_FIN)?;
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn window_plan() {
        let v: Vec<_> = windows(10, 130, 64).collect();
        assert_eq!(v, vec![(10, false), (64, true), (64, true), (2, true)]);
        assert_eq!(windows(0, 3, 1).count(), 3);
    }
}
