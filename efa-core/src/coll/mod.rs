//! Collectives: `barrier`, `broadcast`, `reduce`, `allreduce`, `allgather(v)`,
//! `reduce_scatter`, `gather`, `scatter` and `alltoall` on a [`Communicator`], with in-place
//! variants and non-blocking forms.
//!
//! # Rules (as in MPI)
//! Every rank calls the same collectives in the same order. Each call gets a sequence number
//! counted by every rank, and all its messages use reserved tags derived from it, so messages
//! of consecutive (or concurrent non-blocking) collectives never mix with each other or with
//! user messages.
//!
//! # Argument check
//! Unless disabled ([`CollConfig::check`]), every collective starts with a recursive-doubling
//! exchange of a 32-byte descriptor (kind, element type, operator, root, element count,
//! algorithm, chunk size, a hash of per-rank counts for the `v` variants, and a flag for
//! locally invalid buffer sizes), reducing the lexicographic minimum and maximum of
//! (descriptor, rank). Every rank ends with the same pair, so when any two ranks disagree
//! **every** rank returns [`Error::Protocol`] naming two ranks that differ and what each
//! called, before any data moves. Cost: `ceil(log2 n)` small-message latencies (plus two
//! for non-power-of-two sizes).
//!
//! # Failures
//! Each call has one deadline (the communicator's timeout, from the call's start). A rank
//! that passes it while waiting for a peer tells every rank (a 4-byte abort message naming
//! the peer it waited for), listens briefly for others' reports and then returns
//! [`Error::Timeout`] naming the rank at the end of the chain of reports ("0 waited for 1,
//! 1 waited for 3": rank 3). Ranks that receive a report fail at once with the same blame.
//!
//! # Determinism
//! Every rank gets a bitwise-identical allreduce result: the order of every reduction is
//! fixed by the schedule ([`schedule`]), never by arrival timing. Different algorithms (and,
//! for the ring, different world sizes) may associate floating-point sums differently.
//!
//! # Element types
//! See [`Element`]: `f16`/`bf16` are reduced in `f32` and rounded once at the end; their
//! partial results travel as `f32`.
//!
//! # Non-blocking forms
//! `i*` methods take owned buffers and return a [`CollRequest`]. The collective's sequence
//! number is taken at the call, and it runs on a helper thread (so it progresses without
//! `test` calls); `wait` returns the buffer. Dropping a request detaches it: the collective
//! still completes (its peers need it) and the buffer is then freed.

pub mod kernel;
pub mod schedule;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytemuck::Zeroable;

use crate::comm::{Communicator, OwnedRecv, SendRequest, Source};
use crate::error::{Error, Result, SettingError};
pub use kernel::{Accum, DType, Element, Order, ReduceOp};
use schedule::{Action, Step};

/// Allreduce algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Recursive doubling below [`CollConfig::ring_threshold`] bytes, ring above.
    Auto,
    /// Recursive doubling (with non-power-of-two folding): `log2 n` steps, each moving the
    /// whole buffer. Best for small messages.
    RecursiveDoubling,
    /// Ring reduce-scatter then ring allgather, chunked and pipelined: `2(n-1)` steps, each
    /// moving `1/n` of the buffer. Best for large messages.
    Ring,
}

impl Algorithm {
    fn code(self) -> u8 {
        match self {
            Algorithm::Auto => 0,
            Algorithm::RecursiveDoubling => 1,
            Algorithm::Ring => 2,
        }
    }
}

/// Tuning of the collectives. [`CollConfig::from_env`] is what the plain methods use.
#[derive(Debug, Clone)]
pub struct CollConfig {
    /// Allreduce algorithm. Default [`Algorithm::Auto`] (`EFA_ALLREDUCE_ALGO=auto|rd|ring`).
    pub algorithm: Algorithm,
    /// Messages at least this large (bytes, per rank) use the ring (and the chain broadcast,
    /// and the ring reduce). Default 64 KiB (`EFA_COLL_RING_MIN`).
    pub ring_threshold: usize,
    /// Largest message of a pipelined schedule. Smaller chunks overlap sending, receiving
    /// and reducing more finely but cost more per-message overhead (each rendezvous is a
    /// round trip). Default 256 KiB (`EFA_COLL_CHUNK`).
    pub chunk_bytes: usize,
    /// Check that all ranks called with the same arguments (see the module docs). Default
    /// on (`EFA_COLL_CHECK=0` turns it off; mismatched calls then fail with truncation
    /// errors or time-outs instead of a clear error, or silently reduce garbage).
    pub check: bool,
}

impl Default for CollConfig {
    fn default() -> Self {
        CollConfig {
            algorithm: Algorithm::Auto,
            ring_threshold: 64 << 10,
            chunk_bytes: 256 << 10,
            check: true,
        }
    }
}

impl CollConfig {
    /// Defaults overridden by `EFA_ALLREDUCE_ALGO` (`auto`, `rd` or `recursive_doubling`,
    /// `ring`; any case), `EFA_COLL_RING_MIN` (bytes), `EFA_COLL_CHUNK` (bytes, at least 64)
    /// and `EFA_COLL_CHECK` (`1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`). Unset or blank
    /// variables keep the defaults.
    ///
    /// # Errors
    /// [`Error::Setting`] naming the variable, its value and the accepted forms.
    pub fn from_env() -> Result<CollConfig> {
        Self::from_lookup(&|k| crate::error::env_var(k, "see CollConfig::from_env"))
            .map_err(Error::Setting)
    }

    /// [`CollConfig::from_env`] over a lookup (`Ok(None)`: unset).
    fn from_lookup(
        var: &dyn Fn(&'static str) -> std::result::Result<Option<String>, SettingError>,
    ) -> std::result::Result<CollConfig, SettingError> {
        const ALGOS: &str = "auto, rd (or recursive_doubling), ring";
        const BYTES: &str = "a whole number of bytes, e.g. 65536";
        const CHUNK: &str = "a whole number of bytes, at least 64, e.g. 262144";
        const SWITCH: &str = "1, true, yes, on, or 0, false, no, off";
        let mut c = CollConfig::default();
        if let Some(v) = var("EFA_ALLREDUCE_ALGO")? {
            c.algorithm = match v.trim().to_ascii_lowercase().as_str() {
                "auto" => Algorithm::Auto,
                "rd" | "recursive_doubling" => Algorithm::RecursiveDoubling,
                "ring" => Algorithm::Ring,
                _ => {
                    return Err(SettingError::env(
                        "EFA_ALLREDUCE_ALGO",
                        v,
                        "not an allreduce algorithm",
                        ALGOS,
                    ))
                }
            };
        }
        let bytes = |k: &'static str, v: String, forms: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| SettingError::env(k, v.clone(), "not a whole number of bytes", forms))
        };
        if let Some(v) = var("EFA_COLL_RING_MIN")? {
            c.ring_threshold = bytes("EFA_COLL_RING_MIN", v, BYTES)?;
        }
        if let Some(v) = var("EFA_COLL_CHUNK")? {
            c.chunk_bytes = bytes("EFA_COLL_CHUNK", v.clone(), CHUNK)?;
            if c.chunk_bytes < 64 {
                return Err(SettingError::env(
                    "EFA_COLL_CHUNK",
                    v,
                    "below the smallest chunk of 64 bytes",
                    CHUNK,
                ));
            }
        }
        if let Some(v) = var("EFA_COLL_CHECK")? {
            c.check = match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(SettingError::env(
                        "EFA_COLL_CHECK",
                        v,
                        "not a switch",
                        SWITCH,
                    ))
                }
            };
        }
        Ok(c)
    }

    fn allreduce_algo(&self, bytes: usize, n: u32) -> Algorithm {
        match self.algorithm {
            Algorithm::Auto if bytes >= self.ring_threshold && n > 1 => Algorithm::Ring,
            Algorithm::Auto => Algorithm::RecursiveDoubling,
            a => a,
        }
    }
}

fn env_config() -> Result<&'static CollConfig> {
    static CFG: OnceLock<std::result::Result<CollConfig, SettingError>> = OnceLock::new();
    CFG.get_or_init(|| {
        CollConfig::from_lookup(&|k| crate::error::env_var(k, "see CollConfig::from_env"))
    })
    .as_ref()
    .map_err(|e| Error::Setting(e.clone()))
}

/// Which collective (part of the argument check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Barrier = 1,
    Broadcast,
    Reduce,
    Allreduce,
    Allgather,
    Allgatherv,
    ReduceScatter,
    Gather,
    Scatter,
    Alltoall,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Barrier => "barrier",
            Kind::Broadcast => "broadcast",
            Kind::Reduce => "reduce",
            Kind::Allreduce => "allreduce",
            Kind::Allgather => "allgather",
            Kind::Allgatherv => "allgatherv",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::Gather => "gather",
            Kind::Scatter => "scatter",
            Kind::Alltoall => "alltoall",
        }
    }
    fn from_code(c: u8) -> &'static str {
        [
            Kind::Barrier,
            Kind::Broadcast,
            Kind::Reduce,
            Kind::Allreduce,
            Kind::Allgather,
            Kind::Allgatherv,
            Kind::ReduceScatter,
            Kind::Gather,
            Kind::Scatter,
            Kind::Alltoall,
        ]
        .iter()
        .find(|k| **k as u8 == c)
        .map_or("?", |k| k.name())
    }
}

/// What one rank called: compared across ranks before any data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desc {
    kind: Kind,
    dtype: u8,
    op: u8,
    algo: u8,
    /// Buffer sizes that are invalid on this rank (so every rank reports it).
    bad: bool,
    root: u32,
    count: u64,
    extra: u64,
}

impl Desc {
    fn new(kind: Kind, count: usize) -> Desc {
        Desc {
            kind,
            dtype: 0,
            op: 0,
            algo: 0,
            bad: false,
            root: 0,
            count: count as u64,
            extra: 0,
        }
    }
    fn dtype<T: Element>(mut self) -> Desc {
        self.dtype = T::DTYPE.code();
        self
    }
    fn words(&self) -> [u64; 3] {
        let w0 = u64::from(self.kind as u8)
            | u64::from(self.dtype) << 8
            | u64::from(self.op) << 16
            | u64::from(self.algo) << 24
            | u64::from(self.bad) << 31
            | u64::from(self.root) << 32;
        [w0, self.count, self.extra]
    }
}

fn describe(w: &[u64]) -> String {
    let dtypes = [
        "?", "i8", "u8", "i32", "u32", "i64", "u64", "f16", "bf16", "f32", "f64",
    ];
    let ops = ["-", "sum", "prod", "min", "max", "avg"];
    let b = |s: u32| ((w[0] >> s) & 0xFF) as usize;
    let mut s = format!(
        "{} of {} x {}, op {}, root {}, algorithm {}, settings {:#x}",
        Kind::from_code(b(0) as u8),
        w[1],
        dtypes.get(b(8)).unwrap_or(&"?"),
        ops.get(b(16)).unwrap_or(&"?"),
        w[0] >> 32,
        b(24),
        w[2]
    );
    if w[0] & (1 << 31) != 0 {
        s.push_str(" with invalid buffer sizes");
    }
    s
}

fn fnv(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Combines received bytes into working-buffer bytes.
type Reducer<'a> = dyn Fn(&mut [u8], &[u8], Order) + 'a;

const TAG_BIT: u32 = 0x8000_0000;
const SUB_ABORT: u32 = 0;
const SUB_AGREE: u32 = 1;
const SUB_DATA: u32 = 64;

/// Runs one collective call's schedules over the network.
struct Exec<'c> {
    comm: &'c Communicator,
    name: &'static str,
    seq: u32,
    me: u32,
    n: u32,
    start: Instant,
    deadline: Instant,
    abort: Option<OwnedRecv>,
    /// reporter -> the rank it waited for.
    reports: BTreeMap<u32, u32>,
    aborted: bool,
    sends: Vec<(SendRequest, u32)>,
}

struct Pending {
    req: OwnedRecv,
    peer: u32,
    range: Range<usize>,
    action: Action,
    index: usize,
}

impl<'c> Exec<'c> {
    fn new(comm: &'c Communicator, kind: Kind, seq: u32) -> Result<Exec<'c>> {
        let start = Instant::now();
        let mut ex = Exec {
            comm,
            name: kind.name(),
            seq,
            me: comm.rank(),
            n: comm.size(),
            start,
            deadline: start + comm.timeout(),
            abort: None,
            reports: BTreeMap::new(),
            aborted: false,
            sends: Vec::new(),
        };
        if ex.n > 1 {
            ex.abort = Some(comm.irecv_owned(Source::Any, ex.tag(SUB_ABORT), 8)?);
        }
        Ok(ex)
    }

    fn tag(&self, sub: u32) -> u32 {
        TAG_BIT | (self.seq & 0x7_FFFF) << 12 | (sub & 0xFFF)
    }

    /// Compares `desc` across all ranks; every rank fails alike on a mismatch.
    fn agree(&mut self, desc: &Desc, cfg: &CollConfig) -> Result<()> {
        if self.n == 1 || !cfg.check {
            return Ok(());
        }
        let w = desc.words();
        let me = u64::from(self.me);
        let mut rec = [w[0], w[1], w[2], me, w[0], w[1], w[2], me];
        let steps = schedule::recursive_doubling(self.n, self.me, 1);
        let combine = |dst: &mut [u8], src: &[u8], _: Order| {
            let s: [u64; 8] = bytemuck::pod_read_unaligned(src);
            let d: &mut [u64] = bytemuck::cast_slice_mut(dst);
            if s[..4] < d[..4] {
                d[..4].copy_from_slice(&s[..4]);
            }
            if s[4..] > d[4..] {
                d[4..].copy_from_slice(&s[4..]);
            }
        };
        self.run_steps(
            bytemuck::bytes_of_mut(&mut rec),
            &[],
            64,
            &steps,
            1,
            SUB_AGREE,
            &combine,
        )?;
        if rec[..3] != rec[4..7] {
            let (a, b) = (rec[3] as u32, rec[7] as u32);
            return Err(Error::Protocol {
                peer: if a == self.me { b } else { a },
                what: format!(
                    "{}: ranks called different collectives or with different arguments: \
                     rank {a} called {}; rank {b} called {}",
                    self.name,
                    describe(&rec[..3]),
                    describe(&rec[4..7])
                ),
            });
        }
        Ok(())
    }

    /// Polls `done` (progressing the engine) until it yields, the deadline passes, or another
    /// rank reports a failure.
    fn poll<R>(&mut self, peer: u32, mut done: impl FnMut() -> Option<R>) -> Result<R> {
        let mut backoff = efa_fabric::Backoff::new();
        loop {
            if let Some(x) = done() {
                return Ok(x);
            }
            self.comm.progress()?;
            if let Some(x) = done() {
                return Ok(x);
            }
            if self.collect_aborts().is_some() {
                // Another rank gave up: report whom we wait for, hear the other reports,
                // then blame the end of the chain that starts at our peer.
                if let Some(e) = self.comm.deadline_culprit(self.start.elapsed()) {
                    return Err(e);
                }
                self.send_abort(peer);
                self.grace();
                let blame = self.blame(peer);
                return Err(Error::Timeout {
                    op: self.name,
                    peer: Some(blame),
                    waited: self.start.elapsed(),
                });
            }
            if Instant::now() >= self.deadline {
                return Err(self.timed_out(peer));
            }
            backoff.snooze();
        }
    }

    /// Reads abort reports; returns the rank to blame when one names another rank than us.
    fn collect_aborts(&mut self) -> Option<u32> {
        let mut blame = None;
        while let Some(res) = self.abort.as_mut().and_then(|a| a.take()) {
            self.abort = self
                .comm
                .irecv_owned(Source::Any, self.tag(SUB_ABORT), 8)
                .ok();
            if let Ok((st, d)) = res {
                if let Ok(b) = <[u8; 4]>::try_from(&d[..]) {
                    let suspect = u32::from_le_bytes(b);
                    self.reports.insert(st.source, suspect);
                    if suspect != self.me {
                        blame = Some(suspect);
                    }
                }
            }
        }
        blame.map(|b| self.blame(b))
    }

    /// Follows the chain of reports from `q` (a rank that reported is alive).
    fn blame(&self, mut q: u32) -> u32 {
        for _ in 0..self.n {
            match self.reports.get(&q) {
                Some(&next) if next != q && next != self.me => q = next,
                _ => break,
            }
        }
        q
    }

    fn send_abort(&mut self, suspect: u32) {
        if self.aborted {
            return;
        }
        self.aborted = true;
        let tag = self.tag(SUB_ABORT);
        // Not to the suspects: sends to a dead rank may stall in the provider.
        let suspects: Vec<u32> = self.reports.values().copied().chain([suspect]).collect();
        for r in (0..self.n).filter(|r| *r != self.me && !suspects.contains(r)) {
            // Detached: the outcome does not matter.
            drop(self.comm.isend_bytes(&suspect.to_le_bytes(), r, tag));
        }
    }

    /// The deadline passed while waiting for `peer`: tell everyone, listen for their
    /// reports for a moment, and blame the end of the chain.
    fn timed_out(&mut self, peer: u32) -> Error {
        // A rank known to have failed, or stopped on this host, is the culprit: every rank
        // is told at once, and the wait chain below is not needed.
        if let Some(e) = self.comm.deadline_culprit(self.start.elapsed()) {
            return e;
        }
        self.send_abort(peer);
        self.grace();
        Error::Timeout {
            op: self.name,
            peer: Some(self.blame(peer)),
            waited: self.start.elapsed(),
        }
    }

    /// Collects abort reports for a moment.
    fn grace(&mut self) {
        let grace =
            (self.comm.timeout() / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let until = Instant::now() + grace;
        while Instant::now() < until {
            let _ = self.comm.progress();
            let _ = self.collect_aborts();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_recv(&mut self, mut p: Pending, elem: usize) -> Result<Vec<u8>> {
        let peer = p.peer;
        let (_, data) = self.poll(peer, || p.req.take())??;
        let want = p.range.len() * elem;
        if data.len() != want {
            return Err(Error::Protocol {
                peer,
                what: format!("{}: expected {want} bytes, got {}", self.name, data.len()),
            });
        }
        Ok(data)
    }

    fn isend(&mut self, bytes: &[u8], peer: u32, sub: u32) -> Result<()> {
        let r = self.comm.isend_bytes(bytes, peer, self.tag(sub))?;
        self.sends.push((r, peer));
        Ok(())
    }

    /// Runs `steps` (see [`schedule`] for their meaning) over `work` (and `input` for sends
    /// marked so), in chunks of at most `chunk` elements of `elem` bytes.
    #[allow(clippy::too_many_arguments)]
    fn run_steps(
        &mut self,
        work: &mut [u8],
        input: &[u8],
        elem: usize,
        steps: &[Step],
        chunk: usize,
        sub_base: u32,
        reduce: &Reducer<'_>,
    ) -> Result<()> {
        let chunks = |r: &Range<usize>| -> Vec<Range<usize>> {
            (r.start..r.end)
                .step_by(chunk.max(1))
                .map(|s| s..(s + chunk).min(r.end))
                .collect()
        };
        let bytes = |r: &Range<usize>| r.start * elem..r.end * elem;
        // One tag per phase: the steps of different ranks do not line up (folded ranks have
        // fewer), but each pair's messages are matched in the order both sides list them.
        let sub = |_: usize| sub_base;
        let post = |ex: &mut Exec<'_>, s: usize| -> Result<Vec<Pending>> {
            let mut out = Vec::new();
            for (index, rv) in steps[s].recvs.iter().enumerate() {
                for c in chunks(&rv.range) {
                    let req = ex.comm.irecv_owned(
                        Source::Rank(rv.peer),
                        ex.tag(sub(s)),
                        c.len() * elem,
                    )?;
                    out.push(Pending {
                        req,
                        peer: rv.peer,
                        range: c,
                        action: rv.action,
                        index,
                    });
                }
            }
            Ok(out)
        };
        if steps.is_empty() {
            return Ok(());
        }
        let mut cur = post(self, 0)?;
        let mut early = vec![false; steps[0].sends.len()];
        for s in 0..steps.len() {
            // Sends of this step not already issued chunk by chunk.
            for (k, x) in steps[s].sends.iter().enumerate() {
                if early[k] {
                    continue;
                }
                for c in chunks(&x.range) {
                    let src = if x.input { input } else { &*work };
                    let r = self
                        .comm
                        .isend_bytes(&src[bytes(&c)], x.peer, self.tag(sub(s)))?;
                    self.sends.push((r, x.peer));
                }
            }
            let next_sends = steps.get(s + 1).map_or(&[][..], |n| &n.sends[..]);
            let next = if s + 1 < steps.len() {
                post(self, s + 1)?
            } else {
                Vec::new()
            };
            early = vec![false; next_sends.len()];
            // For each receive of this step, the next step's sends of exactly its range.
            let follow: Vec<Vec<usize>> = steps[s]
                .recvs
                .iter()
                .map(|rv| {
                    next_sends
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| !x.input && x.range == rv.range)
                        .map(|(k, _)| k)
                        .collect()
                })
                .collect();
            for f in &follow {
                for &k in f {
                    early[k] = true;
                }
            }
            for p in cur.drain(..) {
                let (range, action, index) = (p.range.clone(), p.action, p.index);
                let data = self.wait_recv(p, elem)?;
                let dst = &mut work[bytes(&range)];
                match action {
                    Action::Copy => dst.copy_from_slice(&data),
                    Action::Reduce(o) => reduce(dst, &data, o),
                }
                // Back to the communicator's buffer pool: no fresh mapping next time.
                self.comm.recycle(data);
                for &k in &follow[index] {
                    self.isend(&work[bytes(&range)], next_sends[k].peer, sub(s + 1))?;
                }
            }
            cur = next;
        }
        self.wait_sends()
    }

    fn wait_sends(&mut self) -> Result<()> {
        for (r, peer) in std::mem::take(&mut self.sends) {
            self.poll(peer, || r.is_finished().then_some(()))?;
            r.wait()?;
        }
        Ok(())
    }
}

/// Runs `f` on the buffer in the accumulator type: directly when it is the element type,
/// else widened into a scratch buffer and rounded back once at the end.
fn with_acc<T: Element>(buf: &mut [T], f: impl FnOnce(&mut [T::Acc]) -> Result<()>) -> Result<()> {
    if T::as_acc(buf).is_some() {
        return f(T::as_acc(buf).expect("checked"));
    }
    let mut acc = vec![T::Acc::zeroed(); buf.len()];
    T::to_acc(buf, &mut acc);
    f(&mut acc)?;
    T::from_acc(&acc, buf);
    Ok(())
}

fn chunk_elems(cfg: &CollConfig, elem: usize) -> usize {
    (cfg.chunk_bytes / elem.max(1)).max(1)
}

fn reducer<A: Accum>(op: ReduceOp) -> impl Fn(&mut [u8], &[u8], Order) {
    move |d: &mut [u8], s: &[u8], o: Order| kernel::reduce_bytes::<A>(d, s, op, o)
}

fn check_root(comm: &Communicator, root: u32) -> Result<()> {
    if root >= comm.size() {
        return Err(Error::InvalidRank {
            rank: root,
            size: comm.size(),
        });
    }
    Ok(())
}

fn allreduce_seq<T: Element>(
    comm: &Communicator,
    seq: u32,
    buf: &mut [T],
    op: ReduceOp,
    bad: bool,
    cfg: &CollConfig,
) -> Result<()> {
    let n = comm.size();
    let elem = std::mem::size_of::<T::Acc>();
    let algo = cfg.allreduce_algo(buf.len() * elem, n);
    let mut d = Desc::new(Kind::Allreduce, buf.len()).dtype::<T>();
    d.op = op.code();
    d.algo = algo.code();
    d.bad = bad;
    d.extra = cfg.chunk_bytes as u64;
    let mut ex = Exec::new(comm, Kind::Allreduce, seq)?;
    ex.agree(&d, cfg)?;
    if bad {
        return Err(Error::Config(
            "allreduce_into: the send and receive buffers differ in length; pass buffers of the \
             same length"
                .into(),
        ));
    }
    let me = comm.rank();
    with_acc(buf, |acc| {
        let steps = match algo {
            Algorithm::Ring => schedule::ring_allreduce(n, me, acc.len()),
            _ => schedule::recursive_doubling(n, me, acc.len()),
        };
        ex.run_steps(
            bytemuck::cast_slice_mut(acc),
            &[],
            elem,
            &steps,
            chunk_elems(cfg, elem),
            SUB_DATA,
            &reducer::<T::Acc>(op),
        )?;
        if op == ReduceOp::Avg {
            T::Acc::divide(acc, n);
        }
        Ok(())
    })
}

fn broadcast_seq<T: Element>(
    comm: &Communicator,
    seq: u32,
    buf: &mut [T],
    root: u32,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (comm.size(), comm.rank());
    let elem = std::mem::size_of::<T>();
    let chain = std::mem::size_of_val(buf) >= cfg.ring_threshold;
    let mut d = Desc::new(Kind::Broadcast, buf.len()).dtype::<T>();
    d.root = root;
    d.algo = u8::from(chain);
    d.extra = cfg.chunk_bytes as u64;
    let mut ex = Exec::new(comm, Kind::Broadcast, seq)?;
    ex.agree(&d, cfg)?;
    check_root(comm, root)?;
    let steps = if chain {
        schedule::chain_bcast(n, me, root, buf.len())
    } else {
        schedule::binomial_bcast(n, me, root, buf.len())
    };
    ex.run_steps(
        bytemuck::cast_slice_mut(buf),
        &[],
        elem,
        &steps,
        chunk_elems(cfg, elem),
        SUB_DATA,
        &|_: &mut [u8], _: &[u8], _: Order| {},
    )
}

fn reduce_seq<T: Element>(
    comm: &Communicator,
    seq: u32,
    buf: &mut [T],
    op: ReduceOp,
    root: u32,
    bad: bool,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (comm.size(), comm.rank());
    let elem = std::mem::size_of::<T::Acc>();
    let ring = buf.len() * elem >= cfg.ring_threshold && n > 1;
    let mut d = Desc::new(Kind::Reduce, buf.len()).dtype::<T>();
    d.op = op.code();
    d.root = root;
    d.algo = u8::from(ring);
    d.bad = bad;
    d.extra = cfg.chunk_bytes as u64;
    let mut ex = Exec::new(comm, Kind::Reduce, seq)?;
    ex.agree(&d, cfg)?;
    check_root(comm, root)?;
    if bad {
        return Err(Error::Config(
            "reduce: the root's receive buffer must have the send buffer's length".into(),
        ));
    }
    with_acc(buf, |acc| {
        let steps = if ring {
            schedule::ring_reduce(n, me, root, acc.len())
        } else {
            schedule::binomial_reduce(n, me, root, acc.len())
        };
        ex.run_steps(
            bytemuck::cast_slice_mut(acc),
            &[],
            elem,
            &steps,
            chunk_elems(cfg, elem),
            SUB_DATA,
            &reducer::<T::Acc>(op),
        )?;
        if op == ReduceOp::Avg && me == root {
            T::Acc::divide(acc, n);
        }
        Ok(())
    })
}

/// Allgather of `counts[r]` elements from each rank `r` into `buf` (rank `me`'s block
/// already in place).
fn allgatherv_seq<T: Element>(
    comm: &Communicator,
    seq: u32,
    buf: &mut [T],
    counts: &[usize],
    kind: Kind,
    bad: bool,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (comm.size(), comm.rank());
    let elem = std::mem::size_of::<T>();
    let mut d = Desc::new(kind, buf.len()).dtype::<T>();
    d.bad = bad;
    d.extra = fnv(counts.iter().map(|&c| c as u64)) ^ cfg.chunk_bytes as u64;
    let mut ex = Exec::new(comm, kind, seq)?;
    ex.agree(&d, cfg)?;
    if bad {
        return Err(Error::Config(format!(
            "{}: buffer lengths do not match the counts; pass size() counts, a send buffer of \
             counts[rank()] elements and a receive buffer of their sum",
            kind.name()
        )));
    }
    let blocks = schedule::blocks_of(counts);
    let steps = schedule::ring_allgather(n, me, &blocks);
    ex.run_steps(
        bytemuck::cast_slice_mut(buf),
        &[],
        elem,
        &steps,
        chunk_elems(cfg, elem),
        SUB_DATA,
        &|_: &mut [u8], _: &[u8], _: Order| {},
    )
}

fn reduce_scatter_seq<T: Element>(
    comm: &Communicator,
    seq: u32,
    buf: &mut [T],
    op: ReduceOp,
    bad: bool,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (comm.size(), comm.rank());
    let elem = std::mem::size_of::<T::Acc>();
    let mut d = Desc::new(Kind::ReduceScatter, buf.len()).dtype::<T>();
    d.op = op.code();
    d.bad = bad;
    d.extra = cfg.chunk_bytes as u64;
    let mut ex = Exec::new(comm, Kind::ReduceScatter, seq)?;
    ex.agree(&d, cfg)?;
    if bad {
        return Err(Error::Config(
            "reduce_scatter: the send buffer must hold size() blocks of the receive buffer's length"
                .into(),
        ));
    }
    let blocks = schedule::even_blocks(buf.len(), n);
    with_acc(buf, |acc| {
        let steps = schedule::ring_reduce_scatter(n, me, &blocks);
        ex.run_steps(
            bytemuck::cast_slice_mut(acc),
            &[],
            elem,
            &steps,
            chunk_elems(cfg, elem),
            SUB_DATA,
            &reducer::<T::Acc>(op),
        )?;
        if op == ReduceOp::Avg {
            T::Acc::divide(&mut acc[blocks[me as usize].clone()], n);
        }
        Ok(())
    })
}

/// Which buffers a rooted or all-to-all data movement uses.
struct Movement<'a, T> {
    work: &'a mut [T],
    input: &'a [T],
}

#[allow(clippy::too_many_arguments)]
fn movement_seq<T: Element>(
    comm: &Communicator,
    seq: u32,
    kind: Kind,
    m: Movement<'_, T>,
    count: usize,
    root: u32,
    bad: bool,
    steps: impl FnOnce() -> Vec<Step>,
    cfg: &CollConfig,
) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    let mut d = Desc::new(kind, count).dtype::<T>();
    d.root = root;
    d.bad = bad;
    d.extra = cfg.chunk_bytes as u64;
    let mut ex = Exec::new(comm, kind, seq)?;
    ex.agree(&d, cfg)?;
    if kind != Kind::Alltoall {
        check_root(comm, root)?;
    }
    if bad {
        return Err(Error::Config(format!(
            "{}: buffer lengths do not fit (every rank must pass the same count; the root's \
             buffer holds size() blocks)",
            kind.name()
        )));
    }
    ex.run_steps(
        bytemuck::cast_slice_mut(m.work),
        bytemuck::cast_slice(m.input),
        elem,
        &steps(),
        chunk_elems(cfg, elem),
        SUB_DATA,
        &|_: &mut [u8], _: &[u8], _: Order| {},
    )
}

/// A non-blocking collective: runs on a helper thread; `wait` returns its buffer.
#[derive(Debug)]
#[must_use = "a collective request should be waited for"]
pub struct CollRequest<R> {
    handle: Option<std::thread::JoinHandle<Result<R>>>,
}

impl<R: Send + 'static> CollRequest<R> {
    fn spawn(f: impl FnOnce() -> Result<R> + Send + 'static) -> CollRequest<R> {
        CollRequest {
            handle: Some(std::thread::spawn(f)),
        }
    }

    /// Whether the collective has finished (successfully or not). Never blocks.
    pub fn test(&mut self) -> bool {
        match &self.handle {
            Some(h) => h.is_finished(),
            None => true,
        }
    }

    /// Waits for the collective and returns its result (the buffer, for most).
    ///
    /// # Errors
    /// As the blocking form.
    ///
    /// # Panics
    /// If the collective panicked (a bug), the panic is resumed here.
    pub fn wait(mut self) -> Result<R> {
        let h = self.handle.take().expect("waited once");
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

/// Collectives. Every rank must call the same collectives in the same order, with matching
/// arguments (checked, see the [module docs](crate::coll)). Each call fails on every rank
/// with [`Error::Protocol`] when arguments differ, and with [`Error::Timeout`] naming the
/// unresponsive rank when a rank dies or hangs.
impl Communicator {
    /// Reduces `buf` across all ranks in place; every rank gets the bitwise-identical result
    /// (`MPI_Allreduce` with `MPI_IN_PLACE`). Algorithm per [`CollConfig::from_env`].
    ///
    /// # Errors
    /// [`Error::Protocol`] when ranks pass different lengths, types or operators;
    /// [`Error::Timeout`] naming a failed rank; [`Error::Setting`] for a bad `EFA_*` setting;
    /// fabric errors.
    pub fn allreduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let cfg = env_config()?;
        self.allreduce_with(buf, op, cfg)
    }

    /// [`Communicator::allreduce`] with explicit settings (algorithm choice, chunk size).
    /// All ranks must pass equivalent settings (checked).
    ///
    /// # Errors
    /// As [`Communicator::allreduce`].
    pub fn allreduce_with<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        cfg: &CollConfig,
    ) -> Result<()> {
        allreduce_seq(self, self.next_coll_seq(), buf, op, false, cfg)
    }

    /// Out-of-place [`Communicator::allreduce`]: `recv` (same length as `send`) gets the result.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`]; a `recv` of another length makes every rank fail.
    pub fn allreduce_into<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let cfg = env_config()?;
        if send.len() != recv.len() {
            // Still take part so that every rank reports the problem.
            let mut d = send.to_vec();
            return allreduce_seq(self, self.next_coll_seq(), &mut d, op, true, cfg);
        }
        recv.copy_from_slice(send);
        self.allreduce_with(recv, op, cfg)
    }

    /// Non-blocking [`Communicator::allreduce`] of an owned buffer, returned by
    /// [`CollRequest::wait`].
    pub fn iallreduce<T: Element>(&self, mut buf: Vec<T>, op: ReduceOp) -> CollRequest<Vec<T>> {
        let seq = self.next_coll_seq();
        let comm = self.clone();
        CollRequest::spawn(move || {
            allreduce_seq(&comm, seq, &mut buf, op, false, env_config()?)?;
            Ok(buf)
        })
    }

    /// Copies `buf` of rank `root` into `buf` of every rank (`MPI_Bcast`). Binomial tree for
    /// small buffers, a chunked pipelined chain for large ones.
    ///
    /// # Errors
    /// [`Error::Protocol`] on mismatched lengths, types or roots; [`Error::InvalidRank`];
    /// [`Error::Timeout`].
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: u32) -> Result<()> {
        broadcast_seq(self, self.next_coll_seq(), buf, root, env_config()?)
    }

    /// Non-blocking [`Communicator::broadcast`].
    pub fn ibroadcast<T: Element>(&self, mut buf: Vec<T>, root: u32) -> CollRequest<Vec<T>> {
        let seq = self.next_coll_seq();
        let comm = self.clone();
        CollRequest::spawn(move || {
            broadcast_seq(&comm, seq, &mut buf, root, env_config()?)?;
            Ok(buf)
        })
    }

    /// Blocks until every rank has called it (`MPI_Barrier`): a recursive-doubling exchange
    /// of the 32-byte argument descriptor.
    ///
    /// # Errors
    /// [`Error::Protocol`] when another rank is in a different collective;
    /// [`Error::Timeout`].
    pub fn barrier(&self) -> Result<()> {
        barrier_seq(self, self.next_coll_seq())
    }

    /// Non-blocking [`Communicator::barrier`] (`MPI_Ibarrier`).
    pub fn ibarrier(&self) -> CollRequest<()> {
        let seq = self.next_coll_seq();
        let comm = self.clone();
        CollRequest::spawn(move || barrier_seq(&comm, seq))
    }

    /// Reduces `buf` of all ranks into `buf` of `root`, in place (`MPI_Reduce` with
    /// `MPI_IN_PLACE`). On other ranks `buf` is used as scratch and holds a partial result
    /// afterwards.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`], plus [`Error::InvalidRank`].
    pub fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: u32) -> Result<()> {
        reduce_seq(
            self,
            self.next_coll_seq(),
            buf,
            op,
            root,
            false,
            env_config()?,
        )
    }

    /// Out-of-place [`Communicator::reduce`]: `send` is unchanged; `recv` (significant at the
    /// root only, where it must have `send`'s length) gets the result.
    ///
    /// # Errors
    /// As [`Communicator::reduce`].
    pub fn reduce_into<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
        root: u32,
    ) -> Result<()> {
        let seq = self.next_coll_seq();
        let cfg = env_config()?;
        if self.rank() == root && recv.len() == send.len() {
            recv.copy_from_slice(send);
            return reduce_seq(self, seq, recv, op, root, false, cfg);
        }
        let bad = self.rank() == root;
        let mut tmp = send.to_vec();
        reduce_seq(self, seq, &mut tmp, op, root, bad, cfg)
    }

    /// Non-blocking in-place [`Communicator::reduce`].
    pub fn ireduce<T: Element>(
        &self,
        mut buf: Vec<T>,
        op: ReduceOp,
        root: u32,
    ) -> CollRequest<Vec<T>> {
        let seq = self.next_coll_seq();
        let comm = self.clone();
        CollRequest::spawn(move || {
            reduce_seq(&comm, seq, &mut buf, op, root, false, env_config()?)?;
            Ok(buf)
        })
    }

    /// Gathers `send` (the same length on every rank) from all ranks into `recv` of every
    /// rank, in rank order (`MPI_Allgather`); `recv.len()` must be `size() * send.len()`.
    /// Ring algorithm.
    ///
    /// # Errors
    /// [`Error::Protocol`] (on every rank) for mismatched lengths; [`Error::Timeout`].
    pub fn allgather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size() as usize;
        let c = send.len();
        let bad = recv.len() != c * n;
        let me = self.rank() as usize;
        if !bad {
            recv[me * c..(me + 1) * c].copy_from_slice(send);
        }
        let seq = self.next_coll_seq();
        let cfg = env_config()?;
        let counts = vec![c; n];
        if bad {
            let mut tmp = vec![T::zeroed(); c * n];
            return allgatherv_seq(self, seq, &mut tmp, &counts, Kind::Allgather, true, cfg);
        }
        allgatherv_seq(self, seq, recv, &counts, Kind::Allgather, false, cfg)
    }

    /// In-place [`Communicator::allgather`]: `buf` holds `size()` equal blocks, this rank's
    /// block already filled.
    ///
    /// # Errors
    /// As [`Communicator::allgather`]; a length not divisible by `size()` fails on every rank.
    pub fn allgather_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let n = self.size() as usize;
        let bad = !buf.len().is_multiple_of(n);
        let counts = vec![buf.len() / n; n];
        allgatherv_seq(
            self,
            self.next_coll_seq(),
            buf,
            &counts,
            Kind::Allgather,
            bad,
            env_config()?,
        )
    }

    /// Non-blocking in-place [`Communicator::allgather_in_place`].
    pub fn iallgather<T: Element>(&self, mut buf: Vec<T>) -> CollRequest<Vec<T>> {
        let seq = self.next_coll_seq();
        let comm = self.clone();
        CollRequest::spawn(move || {
            let n = comm.size() as usize;
            let counts = vec![buf.len() / n; n];
            let bad = !buf.len().is_multiple_of(n);
            allgatherv_seq(
                &comm,
                seq,
                &mut buf,
                &counts,
                Kind::Allgather,
                bad,
                env_config()?,
            )?;
            Ok(buf)
        })
    }

    /// Allgather of variable sizes (`MPI_Allgatherv`): rank `r` contributes `counts[r]`
    /// elements (`send.len()` on that rank); `recv` holds them all in rank order. Every rank
    /// passes the same `counts`.
    ///
    /// # Errors
    /// [`Error::Protocol`] (on every rank) when counts or lengths disagree;
    /// [`Error::Timeout`].
    pub fn allgatherv<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        let n = self.size() as usize;
        let me = self.rank() as usize;
        let total: usize = counts.iter().sum();
        let bad = counts.len() != n
            || send.len() != counts[me.min(counts.len().saturating_sub(1))]
            || recv.len() != total;
        let seq = self.next_coll_seq();
        let cfg = env_config()?;
        if bad {
            let mut tmp = vec![T::zeroed(); total];
            return allgatherv_seq(self, seq, &mut tmp, counts, Kind::Allgatherv, true, cfg);
        }
        let off: usize = counts[..me].iter().sum();
        recv[off..off + send.len()].copy_from_slice(send);
        allgatherv_seq(self, seq, recv, counts, Kind::Allgatherv, false, cfg)
    }

    /// In-place [`Communicator::allgatherv`]: `buf` (of `counts`' total length) already holds
    /// this rank's block at its offset.
    ///
    /// # Errors
    /// As [`Communicator::allgatherv`].
    pub fn allgatherv_in_place<T: Element>(&self, buf: &mut [T], counts: &[usize]) -> Result<()> {
        let bad = counts.len() != self.size() as usize || buf.len() != counts.iter().sum::<usize>();
        allgatherv_seq(
            self,
            self.next_coll_seq(),
            buf,
            counts,
            Kind::Allgatherv,
            bad,
            env_config()?,
        )
    }

    /// Reduces `send` (`size()` blocks of `recv.len()` elements) across ranks and leaves
    /// block `r` of the result in `recv` of rank `r` (`MPI_Reduce_scatter_block`). Ring.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`].
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let n = self.size() as usize;
        let c = recv.len();
        let bad = send.len() != c * n;
        let mut work = send.to_vec();
        reduce_scatter_seq(
            self,
            self.next_coll_seq(),
            &mut work,
            op,
            bad,
            env_config()?,
        )?;
        let me = self.rank() as usize;
        recv.copy_from_slice(&work[me * c..(me + 1) * c]);
        Ok(())
    }

    /// In-place [`Communicator::reduce_scatter`]: `buf` holds `size()` equal blocks; afterwards
    /// block `rank()` holds this rank's reduced block (the other blocks hold partials).
    ///
    /// # Errors
    /// As [`Communicator::reduce_scatter`]; a length not divisible by `size()` fails on every
    /// rank.
    pub fn reduce_scatter_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let bad = !buf.len().is_multiple_of(self.size() as usize);
        reduce_scatter_seq(self, self.next_coll_seq(), buf, op, bad, env_config()?)
    }

    /// Non-blocking [`Communicator::reduce_scatter_in_place`].
    pub fn ireduce_scatter<T: Element>(
        &self,
        mut buf: Vec<T>,
        op: ReduceOp,
    ) -> CollRequest<Vec<T>> {
        let seq = self.next_coll_seq();
        let comm = self.clone();
        CollRequest::spawn(move || {
            let bad = !buf.len().is_multiple_of(comm.size() as usize);
            reduce_scatter_seq(&comm, seq, &mut buf, op, bad, env_config()?)?;
            Ok(buf)
        })
    }

    /// Gathers `send` (same length on every rank) into `recv` of `root` in rank order
    /// (`MPI_Gather`); `recv` is significant at the root only, where its length must be
    /// `size() * send.len()`.
    ///
    /// # Errors
    /// [`Error::Protocol`] on every rank for mismatched lengths or roots;
    /// [`Error::InvalidRank`]; [`Error::Timeout`].
    pub fn gather<T: Element>(&self, send: &[T], recv: &mut [T], root: u32) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        let c = send.len();
        let is_root = me == root;
        let bad = is_root && recv.len() != c * n as usize;
        if is_root && !bad {
            recv[me as usize * c..(me as usize + 1) * c].copy_from_slice(send);
        }
        let blocks = schedule::even_blocks(c * n as usize, n);
        let m = Movement {
            work: if is_root { recv } else { &mut [] },
            input: send,
        };
        movement_seq(
            self,
            self.next_coll_seq(),
            Kind::Gather,
            m,
            c,
            root,
            bad,
            || schedule::gather(n, me, root.min(n - 1), &blocks, true),
            env_config()?,
        )
    }

    /// In-place [`Communicator::gather`]: at the root `buf` holds `size()` blocks with the
    /// root's own already in place; elsewhere `buf` is the block to send.
    ///
    /// # Errors
    /// As [`Communicator::gather`].
    pub fn gather_in_place<T: Element>(&self, buf: &mut [T], root: u32) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        let is_root = me == root;
        let bad = is_root && !buf.len().is_multiple_of(n as usize);
        let c = if is_root {
            buf.len() / n as usize
        } else {
            buf.len()
        };
        let blocks = schedule::even_blocks(c * n as usize, n);
        let (work, input): (&mut [T], Vec<T>) = if is_root {
            (buf, Vec::new())
        } else {
            (&mut [], buf.to_vec())
        };
        let m = Movement {
            work,
            input: &input,
        };
        movement_seq(
            self,
            self.next_coll_seq(),
            Kind::Gather,
            m,
            c,
            root,
            bad,
            || schedule::gather(n, me, root.min(n - 1), &blocks, true),
            env_config()?,
        )
    }

    /// Sends block `r` of `send` on `root` (`size()` blocks of `recv.len()` elements,
    /// significant at the root only) to `recv` of rank `r` (`MPI_Scatter`).
    ///
    /// # Errors
    /// As [`Communicator::gather`].
    pub fn scatter<T: Element>(&self, send: &[T], recv: &mut [T], root: u32) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        let c = recv.len();
        let is_root = me == root;
        let bad = is_root && send.len() != c * n as usize;
        if is_root && !bad {
            recv.copy_from_slice(&send[me as usize * c..(me as usize + 1) * c]);
        }
        let blocks = schedule::even_blocks(c * n as usize, n);
        let m = Movement {
            work: if is_root { &mut [] } else { recv },
            input: if is_root && !bad { send } else { &[] },
        };
        movement_seq(
            self,
            self.next_coll_seq(),
            Kind::Scatter,
            m,
            c,
            root,
            bad,
            || schedule::scatter(n, me, root.min(n - 1), &blocks),
            env_config()?,
        )
    }

    /// In-place [`Communicator::scatter`]: at the root `buf` holds all blocks (its own stays
    /// in place); elsewhere `buf` receives this rank's block.
    ///
    /// # Errors
    /// As [`Communicator::scatter`].
    pub fn scatter_in_place<T: Element>(&self, buf: &mut [T], root: u32) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        let is_root = me == root;
        let bad = is_root && !buf.len().is_multiple_of(n as usize);
        let c = if is_root {
            buf.len() / n as usize
        } else {
            buf.len()
        };
        let blocks = schedule::even_blocks(c * n as usize, n);
        let m = if is_root {
            Movement {
                work: &mut [],
                input: &*buf,
            }
        } else {
            Movement {
                work: buf,
                input: &[],
            }
        };
        movement_seq(
            self,
            self.next_coll_seq(),
            Kind::Scatter,
            m,
            c,
            root,
            bad,
            || schedule::scatter(n, me, root.min(n - 1), &blocks),
            env_config()?,
        )
    }

    /// All-to-all (`MPI_Alltoall`): block `d` of `send` on rank `s` lands in block `s` of
    /// `recv` on rank `d`; both hold `size()` equal blocks. Pairwise exchange.
    ///
    /// # Errors
    /// [`Error::Protocol`] on every rank for mismatched lengths; [`Error::Timeout`].
    pub fn alltoall<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let (n, me) = (self.size(), self.rank());
        let bad = send.len() != recv.len() || !send.len().is_multiple_of(n as usize);
        let blocks = schedule::even_blocks(if bad { 0 } else { send.len() }, n);
        if !bad {
            let own = blocks[me as usize].clone();
            recv[own.clone()].copy_from_slice(&send[own]);
        }
        let m = Movement {
            work: recv,
            input: send,
        };
        movement_seq(
            self,
            self.next_coll_seq(),
            Kind::Alltoall,
            m,
            send.len() / n as usize,
            0,
            bad,
            || schedule::pairwise_alltoall(n, me, &blocks, &blocks),
            env_config()?,
        )
    }

    /// In-place [`Communicator::alltoall`] (one copy of `buf` is made).
    ///
    /// # Errors
    /// As [`Communicator::alltoall`].
    pub fn alltoall_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let input = buf.to_vec();
        self.alltoall(&input, buf)
    }

    /// Non-blocking [`Communicator::alltoall`]; returns the received buffer.
    pub fn ialltoall<T: Element>(&self, send: Vec<T>) -> CollRequest<Vec<T>> {
        let seq = self.next_coll_seq();
        let comm = self.clone();
        CollRequest::spawn(move || {
            let (n, me) = (comm.size(), comm.rank());
            let mut recv = send.clone();
            let bad = !send.len().is_multiple_of(n as usize);
            let blocks = schedule::even_blocks(if bad { 0 } else { send.len() }, n);
            let m = Movement {
                work: &mut recv,
                input: &send,
            };
            movement_seq(
                &comm,
                seq,
                Kind::Alltoall,
                m,
                send.len() / n as usize,
                0,
                bad,
                || schedule::pairwise_alltoall(n, me, &blocks, &blocks),
                env_config()?,
            )?;
            Ok(recv)
        })
    }
}

fn barrier_seq(comm: &Communicator, seq: u32) -> Result<()> {
    let mut ex = Exec::new(comm, Kind::Barrier, seq)?;
    if comm.size() == 1 {
        return Ok(());
    }
    // The argument check is the barrier (always on here).
    let cfg = CollConfig {
        check: true,
        ..CollConfig::default()
    };
    ex.agree(&Desc::new(Kind::Barrier, 0), &cfg)
}

#[cfg(test)]
mod env_tests {
    use super::*;

    fn cfg(pairs: &[(&'static str, &str)]) -> std::result::Result<CollConfig, SettingError> {
        let pairs: Vec<(&'static str, String)> =
            pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        CollConfig::from_lookup(&|k| {
            Ok(pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.trim().is_empty()))
        })
    }

    #[test]
    fn good_values() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.algorithm, Algorithm::Auto);
        assert!(c.check);
        let c = cfg(&[
            ("EFA_ALLREDUCE_ALGO", "Ring"),
            ("EFA_COLL_RING_MIN", " 1024 "),
            ("EFA_COLL_CHUNK", "64"),
            ("EFA_COLL_CHECK", "off"),
        ])
        .unwrap();
        assert_eq!(c.algorithm, Algorithm::Ring);
        assert_eq!(
            (c.ring_threshold, c.chunk_bytes, c.check),
            (1024, 64, false)
        );
        let c = cfg(&[
            ("EFA_ALLREDUCE_ALGO", "recursive_doubling"),
            ("EFA_COLL_CHECK", "YES"),
        ])
        .unwrap();
        assert_eq!(c.algorithm, Algorithm::RecursiveDoubling);
        assert!(c.check);
    }

    #[test]
    fn bad_values_name_variable_value_and_forms() {
        for (var, value, text) in [
            (
                "EFA_ALLREDUCE_ALGO",
                "tree",
                "EFA_ALLREDUCE_ALGO=\"tree\": not an allreduce algorithm; accepted: auto, rd \
                 (or recursive_doubling), ring",
            ),
            (
                "EFA_COLL_RING_MIN",
                "-1",
                "EFA_COLL_RING_MIN=\"-1\": not a whole number of bytes; accepted: a whole \
                 number of bytes, e.g. 65536",
            ),
            (
                "EFA_COLL_CHUNK",
                "63",
                "EFA_COLL_CHUNK=\"63\": below the smallest chunk of 64 bytes; accepted: a \
                 whole number of bytes, at least 64, e.g. 262144",
            ),
            (
                "EFA_COLL_CHUNK",
                "1M",
                "EFA_COLL_CHUNK=\"1M\": not a whole number of bytes; accepted: a whole number \
                 of bytes, at least 64, e.g. 262144",
            ),
            (
                "EFA_COLL_CHECK",
                "flase",
                "EFA_COLL_CHECK=\"flase\": not a switch; accepted: 1, true, yes, on, or 0, \
                 false, no, off",
            ),
        ] {
            let e = cfg(&[(var, value)]).unwrap_err();
            assert_eq!(e.var(), Some(var));
            assert_eq!(e.to_string(), text);
        }
    }
}
