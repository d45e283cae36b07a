//! The shared driver (fabtests' `shared.c` role): session setup over the out-of-band
//! channel, the size sweep with warm-up and timing, and the progress bar. Each benchmark
//! supplies only a `prepare` (post what must be posted before the per-size barrier) and a
//! `run` (warm-up + timed loop) function.

use std::io::IsTerminal;
use std::time::Duration;

use efa_fabric::{Access, Caps, Endpoint, Pending, RegisteredBuf, RemoteRegion, TargetBuf};
use serde::{Deserialize, Serialize};

use crate::fab::{open_endpoint, Net, Slot};
use crate::oob::{hex, unhex, Oob};
use crate::opts::{default_iters, Api, Common, RmaOp};
use crate::output::{percentiles, Measured, Writer};
use crate::{err, Result};

/// What the client tells the server, so that the server needs only `-p`/`-d`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub bench: String,
    pub provider: String,
    pub sizes: Vec<usize>,
    pub iters: Option<usize>,
    pub warmup: usize,
    pub window: usize,
    pub api: Api,
    pub op: Option<RmaOp>,
    /// Bandwidth-style default iteration counts.
    pub bandwidth: bool,
    /// Transfers per timed iteration (2 for a round trip).
    pub xfers_per_iter: usize,
}

impl RunConfig {
    pub fn iters_for(&self, size: usize) -> usize {
        self.iters
            .unwrap_or_else(|| default_iters(size, self.bandwidth))
    }
    pub fn max_size(&self) -> usize {
        self.sizes.iter().copied().max().unwrap_or(0)
    }
    pub fn caps(&self) -> Caps {
        if self.bench == "rma" {
            Caps::MSG | Caps::TAGGED | Caps::RMA
        } else {
            Caps::MSG | Caps::TAGGED
        }
    }
}

/// Which side of the benchmark this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Drives the timed loops and prints results.
    Client,
    /// Answers.
    Server,
}

/// Everything one side holds during a run. Buffers and operation contexts live here so that
/// the raw data path's safety contract (alive and untouched until completion) holds, and
/// teardown cancels what is still in flight.
#[derive(Debug)]
pub struct Session {
    pub net: Net,
    pub oob: Oob,
    pub side: Side,
    pub cfg: RunConfig,
    /// Raw-path contexts: 0 = send, 1 = receive/ack/fin, 2.. = window.
    pub slots: Vec<Slot>,
    pub tx: Option<RegisteredBuf>,
    pub rx: Option<RegisteredBuf>,
    /// Server side of RMA: the region the client reads and writes.
    pub target: Option<TargetBuf>,
    /// Client side of RMA: the server's region.
    pub remote: Option<RemoteRegion>,
    /// Safe-API path: the receive in flight (its buffer is inside).
    pub safe_rx: Option<Pending<RegisteredBuf>>,
    pub safe_tx: Option<Pending<RegisteredBuf>>,
    pub safe_bufs: (Option<RegisteredBuf>, Option<RegisteredBuf>),
}

impl Session {
    /// Client: opens its endpoint, sends the configuration, swaps addresses.
    pub fn client(c: &Common, cfg: RunConfig, mut oob: Oob) -> Result<Session> {
        let ep = open_endpoint(c, cfg.caps())?;
        oob.send(&format!("HELLO {}", serde_json::to_string(&cfg)?))?;
        let reply = oob.expect("ADDR")?;
        let mut parts = reply.split_whitespace();
        let peer_name = unhex(parts.next().ok_or_else(|| err("empty ADDR"))?)?;
        let remote = match parts.next() {
            Some("-") | None => None,
            Some(h) => Some(RemoteRegion::from_bytes(&unhex(h)?)?),
        };
        oob.send(&format!("ADDR {}", hex(&ep.name()?)))?;
        let peer = ep.av().insert(&peer_name)?;
        let mut s = Session::new(ep, peer, c.timeout(), oob, Side::Client, cfg)?;
        s.remote = remote;
        s.oob.barrier("start")?;
        Ok(s)
    }

    /// Server: receives the configuration, opens its endpoint, swaps addresses.
    pub fn server(c: &Common, mut oob: Oob) -> Result<Session> {
        let cfg: RunConfig = serde_json::from_str(&oob.expect("HELLO")?)?;
        let r = (|| {
            if cfg.provider != c.provider {
                return Err(err(format!(
                    "client uses provider '{}' but this server was started with -p '{}'",
                    cfg.provider, c.provider
                )));
            }
            let ep = open_endpoint(c, cfg.caps())?;
            let target = if cfg.bench == "rma" {
                Some(TargetBuf::new(
                    ep.domain(),
                    cfg.max_size().max(64),
                    Access::REMOTE_READ | Access::REMOTE_WRITE,
                    Some(&ep),
                )?)
            } else {
                None
            };
            Ok((ep, target))
        })();
        let (ep, target) = match r {
            Ok(x) => x,
            Err(e) => {
                let _ = oob.send(&format!("ERROR {e}"));
                return Err(e);
            }
        };
        let region = target
            .as_ref()
            .map(|t| hex(&t.remote().to_bytes()))
            .unwrap_or_else(|| "-".into());
        oob.send(&format!("ADDR {} {region}", hex(&ep.name()?)))?;
        let peer_name = unhex(&oob.expect("ADDR")?)?;
        let peer = ep.av().insert(&peer_name)?;
        let mut s = Session::new(ep, peer, c.timeout(), oob, Side::Server, cfg)?;
        s.target = target;
        s.oob.barrier("start")?;
        Ok(s)
    }

    fn new(
        ep: Endpoint,
        peer: efa_fabric::FiAddr,
        timeout: Duration,
        oob: Oob,
        side: Side,
        cfg: RunConfig,
    ) -> Result<Session> {
        let len = cfg.max_size().max(64);
        let tx = RegisteredBuf::new(ep.domain(), len, Access::LOCAL, Some(&ep))?;
        let rx = RegisteredBuf::new(ep.domain(), len, Access::LOCAL, Some(&ep))?;
        let slots = (0..cfg.window.max(1) + 2)
            .map(|_| Slot::default())
            .collect();
        Ok(Session {
            net: Net::new(ep, peer, timeout),
            oob,
            side,
            cfg,
            slots,
            tx: Some(tx),
            rx: Some(rx),
            target: None,
            remote: None,
            safe_rx: None,
            safe_tx: None,
            safe_bufs: (None, None),
        })
    }

    pub fn is_client(&self) -> bool {
        self.side == Side::Client
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Safe-path operations cancel and drain themselves when dropped.
        self.safe_rx.take();
        self.safe_tx.take();
        let in_flight = |s: &Session| s.slots.iter().any(|x| x.is_posted() && !x.is_done());
        if !in_flight(self) {
            return;
        }
        // Raw-path operations: cancel, drain for a while, and if the provider still holds
        // them, leak contexts and buffers rather than free memory it may write.
        for s in &self.slots {
            if s.is_posted() && !s.is_done() {
                let _ = self.net.ep.cancel(slot_ctx(s));
            }
        }
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while in_flight(self) && std::time::Instant::now() < end {
            let _ = self.net.poll();
        }
        if in_flight(self) {
            tracing::warn!("operations still in flight at exit; leaking their buffers");
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(self.tx.take());
            std::mem::forget(self.rx.take());
            std::mem::forget(self.target.take());
        }
    }
}

fn slot_ctx(s: &Slot) -> &efa_fabric::OpContext {
    s.ctx()
}

/// A progress line on stderr, only when stderr is a terminal and the sweep is long.
#[derive(Debug)]
pub struct ProgressBar {
    on: bool,
    total: usize,
}

impl ProgressBar {
    pub fn new(total: usize) -> ProgressBar {
        ProgressBar {
            on: total > 3 && std::io::stderr().is_terminal(),
            total,
        }
    }
    pub fn tick(&self, i: usize, size: usize) {
        if self.on {
            let w = 30;
            let filled = w * i / self.total.max(1);
            eprint!(
                "\r[{}{}] {}/{} size {:<8}",
                "#".repeat(filled),
                ".".repeat(w - filled),
                i,
                self.total,
                crate::output::size_str(size as u64)
            );
        }
    }
    pub fn finish(&self) {
        if self.on {
            eprint!("\r{}\r", " ".repeat(70));
        }
    }
}

/// The size sweep: per size, `prepare`, barrier, `run` (warm-up + timed loop, filling
/// per-transfer samples in ns into a preallocated Vec), then output on the client.
pub fn sweep(
    s: &mut Session,
    mut writer: Option<&mut Writer>,
    mut prepare: impl FnMut(&mut Session, usize) -> Result<()>,
    mut run: impl FnMut(&mut Session, usize, usize, &mut Vec<u64>) -> Result<u64>,
) -> Result<()> {
    let sizes = s.cfg.sizes.clone();
    let cap = sizes.iter().map(|&z| s.cfg.iters_for(z)).max().unwrap_or(0);
    let mut samples: Vec<u64> = Vec::with_capacity(cap);
    let bar = ProgressBar::new(if s.is_client() { sizes.len() } else { 0 });
    for (i, &size) in sizes.iter().enumerate() {
        bar.tick(i, size);
        let iters = s.cfg.iters_for(size);
        samples.clear();
        prepare(s, size)?;
        s.oob.barrier(&format!("size {size}"))?;
        let elapsed_ns = run(s, size, iters, &mut samples)?;
        if let Some(w) = writer.as_deref_mut() {
            let (p50_ns, p99_ns, max_ns) = percentiles(&mut samples);
            bar.finish();
            w.row(&Measured {
                bytes: size,
                iters,
                xfers_per_iter: s.cfg.xfers_per_iter,
                elapsed_ns,
                p50_ns,
                p99_ns,
                max_ns,
            })?;
        }
    }
    bar.finish();
    s.oob.barrier("end")?;
    Ok(())
}
