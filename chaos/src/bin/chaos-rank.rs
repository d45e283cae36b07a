//! One rank of a chaos workload. The driver (`efa-chaos`) starts it under `efarun` or in a
//! bare launcher environment and injects faults; this program only runs the workload,
//! verifies every delivered byte, and reports.
//!
//! Settings (environment):
//! * `CHAOS_REPORT_DIR` (required): the rank appends JSON [`Event`] lines to
//!   `DIR/rank-R.jsonl` (R from `EFA_RANK` or `RANK`). A file, not stdout, so the report
//!   survives a dead launcher's closed pipes.
//! * `CHAOS_WORKLOAD`: `p2p` (default), `allreduce` or `rma`.
//! * `CHAOS_ITERS`: iterations (default: unbounded; the driver ends the job).
//! * `CHAOS_JOIN_DELAY=R:MS`: rank R sleeps MS milliseconds before `Communicator::init`.
//! * `CHAOS_CORRUPT_AT=R:I`: rank R flips one received byte in iteration I before
//!   verifying it, which proves that verification catches a wrong byte (`--self-test`).
//! * `EFA_TIMEOUT` and every other `EFA_*` setting as usual.
//!
//! Exit codes: 0 done, 3 ([`EXIT_ERROR`]) a communicator error, 4 ([`EXIT_CORRUPT`]) a wrong
//! byte, 2 a bad setting. The same event is printed on stdout as `CHAOS {json}`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use efa_chaos::{
    allreduce_expected, allreduce_value, p2p_byte, rma_value, Event, Workload, EXIT_CORRUPT,
    EXIT_ERROR, EXIT_USAGE,
};
use efa_core::{Communicator, ReduceOp, Source, Tag, WindowAccess};

/// p2p message sizes: inject, eager, a bit above 64 KiB, rendezvous.
const P2P_SIZES: [usize; 4] = [8, 3000, 65_539, (1 << 20) + 5];
/// Allreduce element counts.
const AR_COUNTS: [usize; 3] = [1, 1000, 128 * 1024];
/// Elements of one writer's slot in an RMA window.
const RMA_SLOT: usize = 16 * 1024;
/// Put lengths, in elements.
const RMA_LENS: [usize; 3] = [1, 100, RMA_SLOT];

struct Report {
    file: File,
    rank: u32,
}

impl Report {
    fn emit(&mut self, e: &Event) {
        let mut line = serde_json::to_string(e).unwrap_or_else(|err| {
            format!("{{\"event\":\"error\",\"msg\":\"unserialisable event: {err}\"}}")
        });
        line.push('\n');
        // One write per line on an O_APPEND file: lines never interleave.
        let _ = self.file.write_all(line.as_bytes());
        // stdout may be a dead launcher's pipe: never panic on it.
        let _ = write!(std::io::stdout(), "CHAOS {line}");
    }
}

/// Why the workload stopped early.
enum Stop {
    Error(String),
    Corrupt(String),
}

fn error_text(e: &efa_core::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}

fn rank_pair(var: &str) -> Result<Option<(u32, u64)>, String> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(v) => {
            let (r, n) = v
                .split_once(':')
                .ok_or_else(|| format!("{var}={v:?} is not RANK:NUMBER"))?;
            Ok(Some((
                r.parse().map_err(|_| format!("{var}={v:?}: bad rank"))?,
                n.parse().map_err(|_| format!("{var}={v:?}: bad number"))?,
            )))
        }
    }
}

struct Settings {
    dir: PathBuf,
    rank: u32,
    workload: Workload,
    iters: u64,
    join_delay: Option<(u32, u64)>,
    corrupt_at: Option<(u32, u64)>,
}

fn settings() -> Result<Settings, String> {
    let dir = std::env::var_os("CHAOS_REPORT_DIR")
        .map(PathBuf::from)
        .ok_or("CHAOS_REPORT_DIR is not set")?;
    let rank = std::env::var("EFA_RANK")
        .or_else(|_| std::env::var("RANK"))
        .map_err(|_| "neither EFA_RANK nor RANK is set".to_string())?;
    let rank = rank
        .parse()
        .map_err(|_| format!("rank {rank:?} is not a number"))?;
    let workload = match std::env::var("CHAOS_WORKLOAD") {
        Err(_) => Workload::P2p,
        Ok(w) => Workload::parse(&w).ok_or(format!(
            "CHAOS_WORKLOAD={w:?}: expected p2p, allreduce or rma"
        ))?,
    };
    let iters = match std::env::var("CHAOS_ITERS") {
        Err(_) => u64::MAX,
        Ok(v) => v
            .parse()
            .map_err(|_| format!("CHAOS_ITERS={v:?} is not a number"))?,
    };
    Ok(Settings {
        dir,
        rank,
        workload,
        iters,
        join_delay: rank_pair("CHAOS_JOIN_DELAY")?,
        corrupt_at: rank_pair("CHAOS_CORRUPT_AT")?,
    })
}

fn main() -> ExitCode {
    let t0 = Instant::now();
    let s = match settings() {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "chaos-rank: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let path = s.dir.join(format!("rank-{}.jsonl", s.rank));
    let file = match OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "chaos-rank: cannot open {}: {e}",
                path.display()
            );
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let mut rep = Report { file, rank: s.rank };
    rep.emit(&Event::Start {
        rank: s.rank,
        pid: std::process::id(),
    });
    if let Some((r, ms)) = s.join_delay {
        if r == s.rank {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
    let mut last_ok = Instant::now();
    let comm = match Communicator::init() {
        Ok(c) => c,
        Err(e) => return fail(&mut rep, "init", Stop::Error(error_text(&e)), 0, last_ok),
    };
    let corrupt_at = s.corrupt_at.filter(|&(r, _)| r == s.rank).map(|(_, i)| i);
    rep.emit(&Event::Ready {
        rank: s.rank,
        init_ms: t0.elapsed().as_millis() as u64,
    });
    last_ok = Instant::now();
    let mut iters = 0u64;
    let result = match s.workload {
        Workload::P2p => p2p(&comm, s.iters, corrupt_at, &mut iters, &mut last_ok),
        Workload::Allreduce => allreduce(&comm, s.iters, corrupt_at, &mut iters, &mut last_ok),
        Workload::Rma => rma(&comm, s.iters, corrupt_at, &mut iters, &mut last_ok),
    };
    match result {
        Ok(()) => {
            rep.emit(&Event::Done {
                rank: rep.rank,
                iters,
            });
            ExitCode::SUCCESS
        }
        Err(stop) => fail(&mut rep, "workload", stop, iters, last_ok),
    }
}

fn fail(rep: &mut Report, phase: &str, stop: Stop, iters: u64, last_ok: Instant) -> ExitCode {
    let rank = rep.rank;
    match stop {
        Stop::Error(msg) => {
            rep.emit(&Event::Error {
                rank,
                phase: phase.into(),
                msg,
                iters,
                since_ok_ms: last_ok.elapsed().as_millis() as u64,
            });
            ExitCode::from(EXIT_ERROR as u8)
        }
        Stop::Corrupt(msg) => {
            rep.emit(&Event::Corrupt { rank, msg, iters });
            ExitCode::from(EXIT_CORRUPT as u8)
        }
    }
}

fn err(e: efa_core::Error) -> Stop {
    Stop::Error(error_text(&e))
}

/// The peers of iteration `i`: a ring shifted by `1 + i % (n - 1)`, so every pair talks
/// within `n - 1` iterations.
fn peers(me: u32, n: u32, i: u64) -> (u32, u32) {
    let s = 1 + (i % u64::from(n - 1)) as u32;
    ((me + s) % n, (me + n - s) % n)
}

fn p2p(
    comm: &Communicator,
    iters: u64,
    corrupt_at: Option<u64>,
    done: &mut u64,
    last_ok: &mut Instant,
) -> Result<(), Stop> {
    let (me, n) = (comm.rank(), comm.size());
    if n < 2 {
        return Err(Stop::Error("p2p needs at least 2 ranks".into()));
    }
    let mut send = vec![0u8; P2P_SIZES[3]];
    let mut recv = vec![0u8; P2P_SIZES[3]];
    for i in 0..iters {
        let (dst, src) = peers(me, n, i);
        let len = P2P_SIZES[(i % 4) as usize];
        for (j, b) in send[..len].iter_mut().enumerate() {
            *b = p2p_byte(i, me, j);
        }
        let tag = (i % 1024) as u32;
        let req = comm.isend(&send[..len], dst, tag).map_err(err)?;
        let st = comm
            .recv(&mut recv[..len], Source::Rank(src), Tag::Is(tag))
            .map_err(err)?;
        req.wait().map_err(err)?;
        if corrupt_at == Some(i) {
            recv[len / 2] ^= 0x40;
        }
        if st.len != len {
            return Err(Stop::Corrupt(format!(
                "p2p iteration {i}: {} bytes from rank {src}, expected {len}",
                st.len
            )));
        }
        if let Some(j) = (0..len).find(|&j| recv[j] != p2p_byte(i, src, j)) {
            return Err(Stop::Corrupt(format!(
                "p2p iteration {i}: byte {j} of {len} from rank {src} is {:#04x}, expected {:#04x}",
                recv[j],
                p2p_byte(i, src, j)
            )));
        }
        *done = i + 1;
        *last_ok = Instant::now();
    }
    comm.barrier().map_err(err)
}

fn allreduce(
    comm: &Communicator,
    iters: u64,
    corrupt_at: Option<u64>,
    done: &mut u64,
    last_ok: &mut Instant,
) -> Result<(), Stop> {
    let (me, n) = (comm.rank(), comm.size());
    let mut buf = vec![0u64; AR_COUNTS[2]];
    for i in 0..iters {
        let count = AR_COUNTS[(i % 3) as usize];
        for (k, x) in buf[..count].iter_mut().enumerate() {
            *x = allreduce_value(me, i, k);
        }
        comm.allreduce(&mut buf[..count], ReduceOp::Sum)
            .map_err(err)?;
        if corrupt_at == Some(i) {
            buf[count / 2] ^= 0x40;
        }
        if let Some(k) = (0..count).find(|&k| buf[k] != allreduce_expected(n, i, k)) {
            return Err(Stop::Corrupt(format!(
                "allreduce iteration {i}: element {k} of {count} is {}, expected {}",
                buf[k],
                allreduce_expected(n, i, k)
            )));
        }
        *done = i + 1;
        *last_ok = Instant::now();
    }
    Ok(())
}

fn rma(
    comm: &Communicator,
    iters: u64,
    corrupt_at: Option<u64>,
    done: &mut u64,
    last_ok: &mut Instant,
) -> Result<(), Stop> {
    let (me, n) = (comm.rank(), comm.size());
    if n < 2 {
        return Err(Stop::Error("rma needs at least 2 ranks".into()));
    }
    let win = comm
        .window::<u64>(RMA_SLOT * n as usize, WindowAccess::ReadWrite)
        .map_err(err)?;
    *last_ok = Instant::now();
    let mut data = vec![0u64; RMA_SLOT];
    let mut back = vec![0u64; RMA_SLOT];
    for i in 0..iters {
        let (dst, src) = peers(me, n, i);
        let len = RMA_LENS[(i % 3) as usize];
        for (k, x) in data[..len].iter_mut().enumerate() {
            *x = rma_value(i, me, k);
        }
        let mine = me as usize * RMA_SLOT;
        win.put(dst, mine, &data[..len]).map_err(err)?;
        win.flush(dst).map_err(err)?;
        // Everyone's puts of iteration i are visible after the fence. A fence also opens
        // the next epoch: a peer that leaves it first may put its iteration i+1 data at
        // once, so each rank copies its window out and then fences again before anyone
        // writes into it.
        win.fence().map_err(err)?;
        let theirs = src as usize * RMA_SLOT;
        let mut local = vec![0u64; len];
        win.read_local(theirs, &mut local).map_err(err)?;
        win.fence().map_err(err)?;
        if corrupt_at == Some(i) {
            local[len / 2] ^= 0x40;
        }
        if let Some(k) = (0..len).find(|&k| local[k] != rma_value(i, src, k)) {
            return Err(Stop::Corrupt(format!(
                "rma iteration {i}: element {k} of {len} put by rank {src} is {:#x}, expected {:#x}",
                local[k],
                rma_value(i, src, k)
            )));
        }
        win.get(dst, mine, &mut back[..len]).map_err(err)?;
        if let Some(k) = (0..len).find(|&k| back[k] != data[k]) {
            return Err(Stop::Corrupt(format!(
                "rma iteration {i}: get of element {k} of {len} from rank {dst} is {:#x}, expected {:#x}",
                back[k], data[k]
            )));
        }
        *done = i + 1;
        *last_ok = Instant::now();
    }
    win.free().map_err(err)
}
