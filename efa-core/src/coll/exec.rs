//! The common part of every collective call, driven by a table: one [`Spec`] per
//! collective kind says its name and whether it has a root; a [`Call`] states what one call
//! is (its descriptor for the argument check, this rank's argument problem if any, and the
//! per-rank counts to compare for the rooted `v` collectives); [`run`] then does the steps
//! every collective shares (open the abort listener, agree, check the root, report bad
//! arguments, compare counts, run the body's schedule, wait for the sends). Each collective
//! states only its schedule and kernel, in the body.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::error::CollError;
use super::schedule::{self, Action, Step};
use super::{CollConfig, Order};
use crate::comm::{CollLink, CollRecv, CollSend, CollTag, Source};
use crate::error::{Error, Result};

/// Which collective (part of the argument check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
    Gatherv,
    Scatterv,
    Alltoallv,
    Scan,
    Exscan,
}

/// What the common setup needs to know about a kind.
pub(super) struct Spec {
    pub kind: Kind,
    pub name: &'static str,
    /// Takes a root (checked to be a rank, after the argument check).
    pub rooted: bool,
}

/// One row per kind.
#[rustfmt::skip]
pub(super) const SPECS: &[Spec] = &[
    Spec { kind: Kind::Barrier,       name: "barrier",        rooted: false },
    Spec { kind: Kind::Broadcast,     name: "broadcast",      rooted: true },
    Spec { kind: Kind::Reduce,        name: "reduce",         rooted: true },
    Spec { kind: Kind::Allreduce,     name: "allreduce",      rooted: false },
    Spec { kind: Kind::Allgather,     name: "allgather",      rooted: false },
    Spec { kind: Kind::Allgatherv,    name: "allgatherv",     rooted: false },
    Spec { kind: Kind::ReduceScatter, name: "reduce_scatter", rooted: false },
    Spec { kind: Kind::Gather,        name: "gather",         rooted: true },
    Spec { kind: Kind::Scatter,       name: "scatter",        rooted: true },
    Spec { kind: Kind::Alltoall,      name: "alltoall",       rooted: false },
    Spec { kind: Kind::Gatherv,       name: "gatherv",        rooted: true },
    Spec { kind: Kind::Scatterv,      name: "scatterv",       rooted: true },
    Spec { kind: Kind::Alltoallv,     name: "alltoallv",      rooted: false },
    Spec { kind: Kind::Scan,          name: "scan",           rooted: false },
    Spec { kind: Kind::Exscan,        name: "exscan",         rooted: false },
];

impl Kind {
    pub(super) fn spec(self) -> &'static Spec {
        SPECS
            .iter()
            .find(|s| s.kind == self)
            .expect("every kind has a row")
    }
    pub(super) fn name(self) -> &'static str {
        self.spec().name
    }
    fn from_code(c: u8) -> &'static str {
        SPECS
            .iter()
            .find(|s| s.kind as u8 == c)
            .map_or("?", |s| s.name)
    }
}

/// What one rank called: compared across ranks before any data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desc {
    kind: Kind,
    dtype: u8,
    op: u8,
    algo: u8,
    /// Arguments that are invalid on this rank (so every rank reports it).
    bad: bool,
    root: u32,
    count: u64,
    extra: u64,
    /// Bytes per element (compared exactly; data movements name elements by it).
    elem: u64,
}

impl Desc {
    fn words(&self) -> [u64; 4] {
        let w0 = u64::from(self.kind as u8)
            | u64::from(self.dtype) << 8
            | u64::from(self.op) << 16
            | u64::from(self.algo) << 24
            | u64::from(self.bad) << 31
            | u64::from(self.root) << 32;
        [w0, self.count, self.extra, self.elem]
    }
}

fn describe(w: &[u64]) -> String {
    const DTYPES: [&str; 11] = [
        "?", "i8", "u8", "i32", "u32", "i64", "u64", "f16", "bf16", "f32", "f64",
    ];
    let ops = [
        "-",
        "sum",
        "prod",
        "min",
        "max",
        "avg",
        "user (commutative)",
        "user (non-commutative)",
        "minloc",
        "maxloc",
    ];
    let b = |s: u32| ((w[0] >> s) & 0xFF) as usize;
    let dtype = match b(8) {
        // A data movement: any `Pod` type, named by its size.
        0 if w[3] > 0 => format!("{}-byte elements", w[3]),
        c if c < DTYPES.len() => DTYPES[c].to_string(),
        c if c == super::ops::DTYPE_USER as usize => "a user type".to_string(),
        c if c > super::ops::DTYPE_LOC as usize => format!(
            "({}, index)",
            DTYPES
                .get(c - super::ops::DTYPE_LOC as usize)
                .unwrap_or(&"?")
        ),
        _ => "?".to_string(),
    };
    let name = Kind::from_code(b(0) as u8);
    let mut s = format!("{name} of {} x {dtype}", w[1]);
    match ops.get(b(16)) {
        Some(&"-") => {}
        Some(op) => s.push_str(&format!(", op {op}")),
        None => s.push_str(", op ?"),
    }
    if SPECS.iter().any(|x| x.name == name && x.rooted) {
        s.push_str(&format!(", root {}", w[0] >> 32));
    }
    match b(24) & 0x7F {
        0 => {}
        1 => s.push_str(", algorithm rd (EFA_ALLREDUCE_ALGO)"),
        2 => s.push_str(", algorithm ring (EFA_ALLREDUCE_ALGO)"),
        a => s.push_str(&format!(", algorithm {a}")),
    }
    // Counts/displacements, element size and EFA_COLL_CHUNK, hashed: only equal or not
    // matters, and the text says what to compare.
    s.push_str(&format!(
        ", counts/element size/EFA_COLL_CHUNK digest {:#x}",
        w[2]
    ));
    if w[0] & (1 << 31) != 0 {
        s.push_str(" with invalid arguments");
    }
    s
}

pub(super) fn fnv(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Combines received bytes into working-buffer bytes.
pub(super) type Reducer<'a> = dyn Fn(&mut [u8], &[u8], Order) + 'a;

/// No combining (data movement only).
pub(super) fn copy_only(_: &mut [u8], _: &[u8], _: Order) {}

const SUB_ABORT: u32 = 0;
const SUB_AGREE: u32 = 1;
const SUB_COUNTS: u32 = 2;
pub(super) const SUB_DATA: u32 = 64;

/// What one collective call states; [`run`] does the rest.
pub(super) struct Call {
    pub kind: Kind,
    /// Elements (compared across ranks; 0 where ranks legitimately differ).
    pub count: usize,
    /// Element type and operator codes (0: none; a data movement has no type code, its
    /// elements are compared by `elem` only).
    pub dtype: u8,
    pub op: u8,
    /// Bytes per element.
    pub elem: usize,
    pub root: u32,
    pub algo: u8,
    /// Anything else every rank must agree on (a hash of counts), mixed with the settings.
    pub extra: u64,
    /// This rank's own argument problem.
    pub invalid: Option<CollError>,
    /// For the rooted `v` collectives: this rank's view of each rank's element count
    /// (`None`: no view); every two views of one rank must agree.
    pub per_rank: Option<Vec<Option<u64>>>,
}

impl Call {
    pub(super) fn new(kind: Kind, count: usize) -> Call {
        Call {
            kind,
            count,
            dtype: 0,
            op: 0,
            elem: 0,
            root: 0,
            algo: 0,
            extra: 0,
            invalid: None,
            per_rank: None,
        }
    }
    /// The element type of a data movement: any `Pod` type, compared across ranks by its
    /// size only (a size-0 type is [`CollError::ZeroSized`]).
    pub(super) fn elem<T: bytemuck::Pod>(mut self) -> Call {
        self.dtype = 0;
        self.elem = std::mem::size_of::<T>();
        self
    }
    pub(super) fn root(mut self, root: u32) -> Call {
        self.root = root;
        self
    }
    pub(super) fn invalid(mut self, e: Option<CollError>) -> Call {
        self.invalid = e;
        self
    }
}

/// Runs one collective call: the steps every collective shares, then `body` (which states
/// the schedule and kernel), then waits for the sends.
pub(super) fn run<R>(
    link: &CollLink,
    seq: u32,
    cfg: &CollConfig,
    call: Call,
    body: impl FnOnce(&mut Exec<'_>) -> Result<R>,
) -> Result<R> {
    let spec = call.kind.spec();
    let mut call = call;
    if call.elem == 0 && call.kind != Kind::Barrier && call.invalid.is_none() {
        // Nothing to move per element and no byte count to divide by: rejected alike on
        // every rank that passes such a type.
        call.invalid = Some(CollError::ZeroSized {
            op: call.kind.name(),
        });
    }
    let mut ex = Exec::new(link, call.kind, seq, cfg)?;
    let desc = Desc {
        kind: call.kind,
        dtype: call.dtype,
        op: call.op,
        algo: call.algo,
        bad: call.invalid.is_some(),
        root: call.root,
        count: call.count as u64,
        extra: call.extra ^ cfg.chunk_bytes as u64 ^ (call.elem as u64) << 48,
        elem: call.elem as u64,
    };
    ex.agree(&desc, cfg)?;
    if spec.rooted && call.root >= ex.n {
        return Err(Error::InvalidRank {
            rank: call.root,
            size: ex.n,
        });
    }
    if let Some(e) = call.invalid {
        return Err(e.into());
    }
    if let Some(views) = &call.per_rank {
        ex.agree_counts(views, cfg)?;
    }
    let r = body(&mut ex)?;
    ex.wait_sends()?;
    Ok(r)
}

/// Runs one collective call's schedules over the network.
pub(super) struct Exec<'c> {
    link: &'c CollLink,
    name: &'static str,
    seq: u32,
    pub(super) me: u32,
    pub(super) n: u32,
    start: Instant,
    deadline: Instant,
    abort: Option<CollRecv>,
    /// reporter -> the rank it waited for.
    reports: BTreeMap<u32, u32>,
    aborted: bool,
    sends: Vec<(CollSend, u32)>,
    /// [`CollConfig::window_bytes`].
    window_bytes: usize,
    /// The first receive of the wrong size (only possible when ranks' counts disagree and
    /// the argument check could not see it: `alltoallv`, or the check turned off).
    mismatch: Option<Error>,
}

struct Pending {
    req: CollRecv,
    peer: u32,
    range: Range<usize>,
    action: Action,
    index: usize,
}

impl<'c> Exec<'c> {
    fn new(link: &'c CollLink, kind: Kind, seq: u32, cfg: &CollConfig) -> Result<Exec<'c>> {
        let start = Instant::now();
        let mut ex = Exec {
            link,
            name: kind.name(),
            seq,
            me: link.rank(),
            n: link.size(),
            start,
            deadline: start + link.timeout(),
            abort: None,
            reports: BTreeMap::new(),
            aborted: false,
            sends: Vec::new(),
            window_bytes: cfg.window_bytes,
            mismatch: None,
        };
        if ex.n > 1 {
            ex.abort = Some(link.post_recv(Source::Any, ex.tag(SUB_ABORT), 8)?);
        }
        Ok(ex)
    }

    fn tag(&self, sub: u32) -> CollTag {
        CollTag::new(self.seq, sub)
    }

    /// Compares `desc` across all ranks; every rank fails alike on a mismatch. When the only
    /// difference is that some rank's arguments are invalid, that rank returns its own error
    /// (the caller's) and the others [`CollError::PeerArguments`].
    fn agree(&mut self, desc: &Desc, cfg: &CollConfig) -> Result<()> {
        if self.n == 1 || !cfg.check {
            return Ok(());
        }
        let w = desc.words();
        let me = u64::from(self.me);
        let mut rec = [w[0], w[1], w[2], w[3], me, w[0], w[1], w[2], w[3], me];
        let steps = schedule::recursive_doubling(self.n, self.me, 1);
        let combine = |dst: &mut [u8], src: &[u8], _: Order| {
            let s: [u64; 10] = bytemuck::pod_read_unaligned(src);
            let d: &mut [u64] = bytemuck::cast_slice_mut(dst);
            if s[..5] < d[..5] {
                d[..5].copy_from_slice(&s[..5]);
            }
            if s[5..] > d[5..] {
                d[5..].copy_from_slice(&s[5..]);
            }
        };
        self.run_steps(
            bytemuck::bytes_of_mut(&mut rec),
            &[],
            80,
            &steps,
            1,
            SUB_AGREE,
            &combine,
        )?;
        if rec[..4] == rec[5..9] {
            return Ok(());
        }
        let (a, b) = (rec[4] as u32, rec[9] as u32);
        if rec[0] ^ rec[5] == 1 << 31 && rec[1..4] == rec[6..9] {
            // Only the invalid-arguments bit differs; the maximum (rank b) has it set.
            if desc.bad {
                return Ok(());
            }
            return Err(CollError::PeerArguments {
                op: self.name,
                rank: b,
            }
            .into());
        }
        Err(Error::CollectiveMismatch {
            op: self.name,
            ranks: [a, b],
            calls: [describe(&rec[..4]), describe(&rec[5..9])],
        })
    }

    /// Compares every rank's view of every rank's element count (a recursive-doubling
    /// reduction of per-rank minimum and maximum); on a difference every rank fails with
    /// [`CollError::CountMismatch`].
    fn agree_counts(&mut self, views: &[Option<u64>], cfg: &CollConfig) -> Result<()> {
        if self.n == 1 || !cfg.check {
            return Ok(());
        }
        let mut rec: Vec<u64> = views
            .iter()
            .flat_map(|v| match v {
                Some(c) => [*c, *c],
                None => [u64::MAX, 0],
            })
            .collect();
        let steps = schedule::recursive_doubling(self.n, self.me, 1);
        let combine = |dst: &mut [u8], src: &[u8], _: Order| {
            let d: &mut [u64] = bytemuck::cast_slice_mut(dst);
            for (i, c) in src.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                d[i] = if i % 2 == 0 { d[i].min(v) } else { d[i].max(v) };
            }
        };
        let bytes = rec.len() * 8;
        self.run_steps(
            bytemuck::cast_slice_mut(&mut rec),
            &[],
            bytes,
            &steps,
            1,
            SUB_COUNTS,
            &combine,
        )?;
        for (r, p) in rec.chunks_exact(2).enumerate() {
            if p[0] != u64::MAX && p[0] != p[1] {
                return Err(CollError::CountMismatch {
                    op: self.name,
                    rank: r as u32,
                    a: p[0],
                    b: p[1],
                }
                .into());
            }
        }
        Ok(())
    }

    /// Polls `done` (progressing the engine) until it yields, the deadline passes, or another
    /// rank reports a failure.
    fn poll<R>(
        &mut self,
        peer: u32,
        mut done: impl FnMut(&mut Self) -> Result<Option<R>>,
    ) -> Result<R> {
        let mut waiter = self.link.waiter();
        loop {
            if let Some(x) = done(self)? {
                return Ok(x);
            }
            self.link.progress()?;
            if let Some(x) = done(self)? {
                return Ok(x);
            }
            if self.collect_aborts().is_some() {
                // Another rank gave up: report whom we wait for, hear the other reports,
                // then blame the end of the chain that starts at our peer.
                if let Some(e) = self.link.deadline_culprit(self.start.elapsed()) {
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
            waiter.idle();
        }
    }

    /// Reads abort reports; returns the rank to blame when one names another rank than us.
    fn collect_aborts(&mut self) -> Option<u32> {
        let mut blame = None;
        while let Some(res) = self.abort.as_mut().and_then(|a| a.take()) {
            self.abort = self
                .link
                .post_recv(Source::Any, self.tag(SUB_ABORT), 8)
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
            drop(self.link.post_send(&suspect.to_le_bytes(), r, tag));
        }
    }

    /// The deadline passed while waiting for `peer`: tell everyone, listen for their
    /// reports for a moment, and blame the end of the chain.
    fn timed_out(&mut self, peer: u32) -> Error {
        // A rank known to have failed, or stopped on this host, is the culprit: every rank
        // is told at once, and the wait chain below is not needed.
        if let Some(e) = self.link.deadline_culprit(self.start.elapsed()) {
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
            (self.link.timeout() / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let until = Instant::now() + grace;
        while Instant::now() < until {
            let _ = self.link.progress();
            let _ = self.collect_aborts();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The data of a receive, or `None` when it arrived with the wrong size (kept in
    /// `mismatch` and reported once this rank's part of the schedule is done, so that its
    /// peers are not left waiting for its sends). While it waits, queued sends go out as
    /// the window allows.
    fn wait_recv(
        &mut self,
        mut p: Pending,
        elem: usize,
        q: &mut SendQueue,
        work: &[u8],
        input: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        let peer = p.peer;
        let want = p.range.len() * elem;
        let got = self.poll(peer, |ex| {
            if let Some(x) = p.req.take() {
                return Ok(Some(x));
            }
            ex.pump(q, work, input, 0)?;
            Ok(None)
        })?;
        let data = match got {
            Ok((_, data)) => data,
            // More arrived than this rank's count allows: the same disagreement as a short
            // block, told the same way (a collective caller cannot act on a tag).
            Err(Error::Truncated { expected, got, .. }) => {
                self.mismatch.get_or_insert(
                    CollError::SizeMismatch {
                        op: self.name,
                        peer,
                        expected,
                        got,
                    }
                    .into(),
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if data.len() != want {
            self.mismatch.get_or_insert(
                CollError::SizeMismatch {
                    op: self.name,
                    peer,
                    expected: want,
                    got: data.len(),
                }
                .into(),
            );
            self.link.recycle(data);
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Retires the sends that have finished (returning the first failure), then issues
    /// queued sends, in order, while fewer than the window are in flight; the first `force`
    /// of them go out regardless of the window.
    fn pump(
        &mut self,
        q: &mut SendQueue,
        work: &[u8],
        input: &[u8],
        mut force: usize,
    ) -> Result<()> {
        let mut i = 0;
        while i < self.sends.len() {
            if self.sends[i].0.is_finished() {
                self.sends.swap_remove(i).0.wait()?;
            } else {
                i += 1;
            }
        }
        while let Some(x) = q.queued.front() {
            if force == 0 && self.sends.len() >= q.window {
                break;
            }
            let src = if x.input { input } else { work };
            let r = self
                .link
                .post_send(&src[x.bytes.clone()], x.peer, self.tag(q.sub))?;
            self.sends.push((r, x.peer));
            q.queued.pop_front();
            force = force.saturating_sub(1);
        }
        Ok(())
    }

    /// Issues every queued send that reads working-buffer bytes `range` (and those queued
    /// before it), whatever the window: the range is about to be overwritten, and a send
    /// carries the data as it was when the schedule reached it.
    fn before_write(
        &mut self,
        q: &mut SendQueue,
        work: &[u8],
        input: &[u8],
        range: &Range<usize>,
    ) -> Result<()> {
        let last = q
            .queued
            .iter()
            .rposition(|x| !x.input && x.bytes.start < range.end && range.start < x.bytes.end);
        match last {
            Some(i) => self.pump(q, work, input, i + 1),
            None => Ok(()),
        }
    }

    /// Runs `steps` (see [`schedule`] for their meaning) over `work` (and `input` for sends
    /// marked so), in chunks of at most `chunk` elements of `elem` bytes.
    ///
    /// Sends are queued in schedule order and issued while at most `window` chunks
    /// (`max(2, window_bytes / chunk bytes)`, see [`CollConfig::window_bytes`]) are in
    /// flight; waiting for a receive issues more as earlier ones finish. The data of a send
    /// is still the working buffer's at the point the schedule issues it: a receive that
    /// would overwrite a queued send's range first issues it. Bounding what is in flight
    /// keeps the engine's send and receive buffers few, so they stay in cache and in the
    /// engine's pools, and the reduction of one chunk overlaps the transfer of the next
    /// instead of every chunk of a step being copied out before the first is reduced.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_steps(
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
        let sub = sub_base;
        let post = |ex: &mut Exec<'_>, s: usize| -> Result<Vec<Pending>> {
            let mut out = Vec::new();
            for (index, rv) in steps[s].recvs.iter().enumerate() {
                for c in chunks(&rv.range) {
                    let req =
                        ex.link
                            .post_recv(Source::Rank(rv.peer), ex.tag(sub), c.len() * elem)?;
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
        let mut q = SendQueue {
            queued: VecDeque::new(),
            window: window_chunks(self.window_bytes, chunk * elem),
            sub,
        };
        let mut cur = post(self, 0)?;
        let mut early = vec![false; steps[0].sends.len()];
        for s in 0..steps.len() {
            // Sends of this step not already queued chunk by chunk.
            for (k, x) in steps[s].sends.iter().enumerate() {
                if early[k] {
                    continue;
                }
                for c in chunks(&x.range) {
                    q.queued.push_back(Queued {
                        peer: x.peer,
                        bytes: bytes(&c),
                        input: x.input,
                    });
                }
            }
            self.pump(&mut q, work, input, 0)?;
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
                // A receive of the wrong size is not applied, but the sends that follow it
                // still go out: the peers wait for them.
                if let Some(data) = self.wait_recv(p, elem, &mut q, work, input)? {
                    self.before_write(&mut q, work, input, &bytes(&range))?;
                    let dst = &mut work[bytes(&range)];
                    match action {
                        Action::Copy => dst.copy_from_slice(&data),
                        Action::Reduce(o) => reduce(dst, &data, o),
                    }
                    // Back to the communicator's buffer pool: no fresh mapping next time.
                    self.link.recycle(data);
                }
                for &k in &follow[index] {
                    q.queued.push_back(Queued {
                        peer: next_sends[k].peer,
                        bytes: bytes(&range),
                        input: false,
                    });
                }
                self.pump(&mut q, work, input, 0)?;
            }
            cur = next;
        }
        // The rest of the queue, still within the window.
        if let Some(peer) = q.queued.front().map(|x| x.peer) {
            self.poll(peer, |ex| {
                ex.pump(&mut q, work, input, 0)?;
                Ok(q.queued.is_empty().then_some(()))
            })?;
        }
        self.wait_sends()
    }

    fn wait_sends(&mut self) -> Result<()> {
        for (r, peer) in std::mem::take(&mut self.sends) {
            self.poll(peer, |_| Ok(r.is_finished().then_some(())))?;
            r.wait()?;
        }
        match self.mismatch.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Chunks a schedule may have in flight (issued, not yet finished) at once: `window_bytes`
/// of `chunk_bytes`-byte chunks, at least 2 (so one transfers while the next is queued).
pub(super) fn window_chunks(window_bytes: usize, chunk_bytes: usize) -> usize {
    (window_bytes / chunk_bytes.max(1)).max(2)
}

/// A send of a schedule, queued until the window has room.
struct Queued {
    peer: u32,
    /// Bytes of the working (or input) buffer.
    bytes: Range<usize>,
    input: bool,
}

/// The sends of one [`Exec::run_steps`] not yet issued, in the order the schedule issues
/// them (which is the order each peer's receives list them).
struct SendQueue {
    queued: VecDeque<Queued>,
    /// Most sends in flight at once.
    window: usize,
    sub: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_row_and_a_distinct_name() {
        let codes: Vec<u8> = SPECS.iter().map(|s| s.kind as u8).collect();
        assert_eq!(codes, (1..=SPECS.len() as u8).collect::<Vec<_>>());
        let mut names: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SPECS.len());
        assert_eq!(Kind::Exscan.name(), "exscan");
        assert!(Kind::Gatherv.spec().rooted && !Kind::Alltoallv.spec().rooted);
    }

    #[test]
    fn descriptions_name_new_types_and_operators() {
        let d = Desc {
            kind: Kind::Scan,
            dtype: super::super::ops::DTYPE_LOC + 9,
            op: super::super::ops::OP_MINLOC,
            algo: 0,
            bad: true,
            root: 0,
            count: 3,
            extra: 0,
            elem: 8,
        };
        assert_eq!(
            describe(&d.words()),
            "scan of 3 x (f32, index), op minloc, counts/element size/EFA_COLL_CHUNK digest 0x0 \
             with invalid arguments"
        );
        // A rooted collective names its root and the algorithm asked for; a data movement
        // has no operator to name, and names its elements by size.
        let d = Desc {
            kind: Kind::Gatherv,
            dtype: 0,
            op: 0,
            algo: 2,
            bad: false,
            root: 3,
            count: 8,
            extra: 0x10,
            elem: 12,
        };
        assert_eq!(
            describe(&d.words()),
            "gatherv of 8 x 12-byte elements, root 3, algorithm ring (EFA_ALLREDUCE_ALGO), \
             counts/element size/EFA_COLL_CHUNK digest 0x10"
        );
        let one = Desc {
            kind: Kind::Broadcast,
            elem: 1,
            algo: 0,
            ..d
        };
        assert!(describe(&one.words()).starts_with("broadcast of 8 x 1-byte elements, root 3,"));
        // The barrier has no elements.
        let bar = Desc {
            kind: Kind::Barrier,
            elem: 0,
            count: 0,
            algo: 0,
            ..d
        };
        assert!(describe(&bar.words()).starts_with("barrier of 0 x ?,"));
    }
}
