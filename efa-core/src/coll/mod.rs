//! Collectives on a [`Communicator`]: `barrier`, `broadcast`, `reduce`, `allreduce`,
//! `reduce_scatter`, `scan`, `exscan`, `gather(v)`, `scatter(v)`, `allgather(v)` and
//! `alltoall(v)`, blocking and non-blocking, with built-in ([`ReduceOp`]), user-defined
//! ([`UserOp`]) and min/max-with-location ([`LocOp`]) reductions.
//!
//! # In place and out of place
//! One convention for every collective: the plain name works **in place** on one buffer
//! (`allreduce(&mut buf, op)`, `allgather(&mut buf)`, `gather(&mut buf, root)`, ...), the
//! `_into` form is **out of place** (`allreduce_into(&send, &mut recv, op)`, ...), and `i*`
//! is the non-blocking form of the in-place one, on an owned buffer that
//! [`CollRequest::wait`] returns. Each method's docs give the shapes, in elements; `n` is
//! `size()`, `me` is `rank()`. (MPI's `MPI_IN_PLACE` is the plain form; rsmpi's `_into` is
//! the same as ours.)
//!
//! # Rules (as in MPI)
//! Every rank calls the same collectives in the same order. Each call gets a sequence number
//! counted by every rank, and all its messages use reserved tags derived from it, so messages
//! of consecutive (or concurrent non-blocking) collectives never mix with each other or with
//! user messages.
//!
//! # Argument check
//! Unless disabled ([`CollConfig::check`]), every collective starts with a recursive-doubling
//! exchange of a 40-byte descriptor (kind, element type of a reduction, operator, root,
//! element count, algorithm, element size, chunk size, a hash of per-rank counts for `allgatherv`, and a
//! flag for locally invalid arguments), reducing the lexicographic minimum and maximum of
//! (descriptor, rank). Every rank ends with the same pair, so when any two ranks disagree
//! **every** rank returns [`Error::CollectiveMismatch`] naming two ranks that differ and what each
//! called, before any data moves. When the only difference is that a rank's own buffers or
//! counts do not fit the call, that rank returns the [`CollError`] that says why and every
//! other rank [`CollError::PeerArguments`] naming it. The rooted `v` collectives then
//! compare the root's `counts[r]` with rank `r`'s own length in a second such exchange
//! ([`CollError::CountMismatch`] on every rank). Cost: `ceil(log2 n)` small-message
//! latencies per exchange (plus two for non-power-of-two sizes).
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
//! Non-commutative operators are applied in rank order (see [`ops`]).
//!
//! # Element types
//! - Data movements (`broadcast`, `gather(v)`, `scatter(v)`, `allgather(v)`, `alltoall(v)`,
//!   their `_into` and `i*` forms) move any [`Pod`] type `T` (plus `Send`; `'static` comes
//!   with `Pod`): `u16`, `[f32; 3]`, a `#[repr(C)]` struct deriving `bytemuck::Pod`. Shapes
//!   are in elements of `T`; bytes on the wire are `size_of::<T>()` per element, copied
//!   unchanged (as MPI, no conversion between ranks: every rank runs the same build). The
//!   argument check compares the element **size** only, and names data-movement elements by
//!   it for every type (`"gather of 8 x 12-byte elements"`; `u32` and `f32` are both
//!   "4-byte elements"), since telling [`Element`] types apart would need specialization.
//!   A size-0 type (`()`, `[u8; 0]`) is [`CollError::ZeroSized`] on every rank that passes it.
//! - Built-in reductions ([`ReduceOp`]) take an [`Element`]: `f16`/`bf16` are reduced in
//!   `f32` and rounded once at the end; their partial results travel as `f32`. The check
//!   names these types. User-defined operators work on any [`Pod`] type; [`LocOp`] on
//!   [`ValueIndex`] pairs of every [`Element`] type.
//!
//! # Non-blocking forms
//! `i*` methods take owned buffers and return a [`CollRequest`]. The collective's sequence
//! number is taken at the call, and it runs on a helper thread (so it progresses without
//! `test` calls); `wait` returns the buffer. Dropping a request detaches it: the collective
//! still completes (its peers need it) and the buffer is then freed.

pub mod error;
mod exec;
pub mod kernel;
pub mod ops;
pub mod schedule;

use std::ops::Range;
use std::sync::OnceLock;

use bytemuck::Pod;

use crate::comm::{CollLink, Communicator};
use crate::error::{Error, Result, SettingError};
pub use error::CollError;
use exec::{copy_only, fnv, Call, Kind, SUB_DATA};
pub use kernel::{Accum, DType, Element, Order, ReduceOp};
pub use ops::{LocOp, LocValue, Reduction, UserOp, ValueIndex};
use schedule::Step;

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
    /// Most bytes of a pipelined schedule in flight at once: its sends are issued while
    /// fewer than `max(2, window_bytes / chunk_bytes)` chunks are unfinished, the rest as
    /// earlier ones finish. A small window keeps the engine's chunk buffers few and in
    /// cache, so that a large call is as fast per byte as a small one; a large one hides
    /// more latency per chunk. Does not change results. Default 512 KiB: two default chunks,
    /// what a 1 MiB allreduce of 2 ranks has in flight per rank (`EFA_COLL_WINDOW`).
    pub window_bytes: usize,
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
            window_bytes: 512 << 10,
            check: true,
        }
    }
}

impl CollConfig {
    /// Defaults overridden by `EFA_ALLREDUCE_ALGO` (`auto`, `rd` or `recursive_doubling`,
    /// `ring`; any case), `EFA_COLL_RING_MIN` (bytes), `EFA_COLL_CHUNK` (bytes, at least 64),
    /// `EFA_COLL_WINDOW` (bytes) and `EFA_COLL_CHECK` (`1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`). Unset or blank
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
        if let Some(v) = var("EFA_COLL_WINDOW")? {
            c.window_bytes = bytes("EFA_COLL_WINDOW", v, BYTES)?;
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

fn chunk_elems(cfg: &CollConfig, elem: usize) -> usize {
    (cfg.chunk_bytes / elem.max(1)).max(1)
}

/// The call of a reduction with operator `op`.
fn op_call<T, O: Reduction<T>>(
    kind: Kind,
    count: usize,
    op: &O,
    algo: u8,
    invalid: Option<CollError>,
) -> Call {
    let (dtype, opc) = op.codes();
    let mut c = Call::new(kind, count);
    c.dtype = dtype;
    c.op = opc;
    c.elem = std::mem::size_of::<T>();
    c.algo = algo;
    c.invalid = invalid.or_else(|| {
        (std::mem::size_of::<T>() == 0).then_some(CollError::ZeroSized { op: kind.name() })
    });
    c
}

fn allreduce_seq<T, O: Reduction<T>>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    op: &O,
    invalid: Option<CollError>,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let algo = if op.commutative() {
        cfg.allreduce_algo(buf.len() * op.work_elem(), n)
    } else {
        Algorithm::RecursiveDoubling
    };
    tracing::debug!(
        rank = me,
        ranks = n,
        bytes = buf.len() * op.work_elem(),
        algorithm = ?algo,
        configured = ?cfg.algorithm,
        ring_threshold = cfg.ring_threshold,
        commutative = op.commutative(),
        "allreduce algorithm"
    );
    let call = op_call::<T, O>(Kind::Allreduce, buf.len(), op, algo.code(), invalid);
    exec::run(link, seq, cfg, call, |ex| {
        op.with_work(buf, &mut |bytes, k| {
            let e = k.elem();
            let count = bytes.len() / e;
            let steps = match algo {
                Algorithm::Ring => schedule::ring_allreduce(n, me, count),
                _ => schedule::recursive_doubling(n, me, count),
            };
            let red = |d: &mut [u8], s: &[u8], o: Order| k.combine(d, s, o);
            ex.run_steps(bytes, &[], e, &steps, chunk_elems(cfg, e), SUB_DATA, &red)?;
            k.average(bytes, n);
            Ok(())
        })
    })
}

#[allow(clippy::too_many_arguments)]
fn reduce_seq<T, O: Reduction<T>>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    op: &O,
    root: u32,
    invalid: Option<CollError>,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    // 0: binomial tree, 1: ring, 2: rank-ordered tree (non-commutative operators).
    let algo = if !op.commutative() {
        2
    } else {
        u8::from(buf.len() * op.work_elem() >= cfg.ring_threshold && n > 1)
    };
    let mut call = op_call::<T, O>(Kind::Reduce, buf.len(), op, algo, invalid);
    call.root = root;
    exec::run(link, seq, cfg, call, |ex| {
        op.with_work(buf, &mut |bytes, k| {
            let e = k.elem();
            let count = bytes.len() / e;
            let steps = match algo {
                1 => schedule::ring_reduce(n, me, root, count),
                0 => schedule::binomial_reduce(n, me, root, count),
                _ => schedule::ordered_reduce(n, me, root, count),
            };
            let red = |d: &mut [u8], s: &[u8], o: Order| k.combine(d, s, o);
            ex.run_steps(bytes, &[], e, &steps, chunk_elems(cfg, e), SUB_DATA, &red)?;
            if me == root {
                k.average(bytes, n);
            }
            Ok(())
        })
    })
}

fn reduce_scatter_seq<T, O: Reduction<T>>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    op: &O,
    invalid: Option<CollError>,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    // 0: ring; 1: recursive-doubling allreduce of the whole buffer (rank order).
    let algo = u8::from(!op.commutative());
    let call = op_call::<T, O>(Kind::ReduceScatter, buf.len(), op, algo, invalid);
    exec::run(link, seq, cfg, call, |ex| {
        op.with_work(buf, &mut |bytes, k| {
            let e = k.elem();
            let count = bytes.len() / e;
            let blocks = schedule::even_blocks(count, n);
            let steps = if algo == 0 {
                schedule::ring_reduce_scatter(n, me, &blocks)
            } else {
                schedule::recursive_doubling(n, me, count)
            };
            let red = |d: &mut [u8], s: &[u8], o: Order| k.combine(d, s, o);
            ex.run_steps(bytes, &[], e, &steps, chunk_elems(cfg, e), SUB_DATA, &red)?;
            let own = &blocks[me as usize];
            k.average(&mut bytes[own.start * e..own.end * e], n);
            Ok(())
        })
    })
}

fn scan_seq<T, O: Reduction<T>>(
    link: &CollLink,
    seq: u32,
    kind: Kind,
    buf: &mut [T],
    op: &O,
    invalid: Option<CollError>,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let call = op_call::<T, O>(kind, buf.len(), op, 0, invalid);
    exec::run(link, seq, cfg, call, |ex| {
        op.with_work(buf, &mut |bytes, k| {
            let e = k.elem();
            let count = bytes.len() / e;
            let steps = if kind == Kind::Scan {
                schedule::scan(n, me, count)
            } else {
                schedule::exscan(n, me, count)
            };
            let red = |d: &mut [u8], s: &[u8], o: Order| k.combine(d, s, o);
            ex.run_steps(bytes, &[], e, &steps, chunk_elems(cfg, e), SUB_DATA, &red)?;
            // Averages over the ranks combined: me + 1 (scan) or me (exscan; rank 0 keeps
            // its buffer).
            match kind {
                Kind::Scan => k.average(bytes, me + 1),
                _ if me > 0 => k.average(bytes, me),
                _ => {}
            }
            Ok(())
        })
    })
}

fn broadcast_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    root: u32,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let chain = std::mem::size_of_val(buf) >= cfg.ring_threshold;
    let mut call = Call::new(Kind::Broadcast, buf.len()).elem::<T>().root(root);
    call.algo = u8::from(chain);
    let count = buf.len();
    move_seq(link, seq, cfg, call, buf, &[], || {
        if chain {
            schedule::chain_bcast(n, me, root, count)
        } else {
            schedule::binomial_bcast(n, me, root, count)
        }
    })
}

fn barrier_seq(link: &CollLink, seq: u32) -> Result<()> {
    // The argument check is the barrier (always on here).
    let cfg = CollConfig {
        check: true,
        ..CollConfig::default()
    };
    exec::run(link, seq, &cfg, Call::new(Kind::Barrier, 0), |_| Ok(()))
}

/// A data movement: `steps` over `work` (receives, and sends not marked `input`) and
/// `input`, no combining.
fn move_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    cfg: &CollConfig,
    call: Call,
    work: &mut [T],
    input: &[T],
    steps: impl FnOnce() -> Vec<Step>,
) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    exec::run(link, seq, cfg, call, |ex| {
        ex.run_steps(
            bytemuck::cast_slice_mut(work),
            bytemuck::cast_slice(input),
            elem,
            &steps(),
            chunk_elems(cfg, elem),
            SUB_DATA,
            &copy_only,
        )
    })
}

/// Allgather of `counts[r]` elements from each rank `r` into `buf` (this rank's block
/// already in place).
fn allgatherv_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    counts: &[usize],
    kind: Kind,
    invalid: Option<CollError>,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let mut call = Call::new(kind, buf.len()).elem::<T>().invalid(invalid);
    call.extra = fnv(counts.iter().map(|&c| c as u64));
    move_seq(link, seq, cfg, call, buf, &[], || {
        schedule::ring_allgather(n, me, &schedule::blocks_of(counts))
    })
}

/// `len` must be a whole number of blocks for `n` ranks.
fn divisible(op: &'static str, buffer: &'static str, len: usize, n: u32) -> Option<CollError> {
    (!len.is_multiple_of(n as usize)).then_some(CollError::NotDivisible {
        op,
        buffer,
        len,
        size: n,
    })
}

/// `len` must equal `expected`.
fn length(
    op: &'static str,
    buffer: &'static str,
    len: usize,
    expected: usize,
) -> Option<CollError> {
    (len != expected).then_some(CollError::BufferLength {
        op,
        buffer,
        len,
        expected,
    })
}

/// The blocks `displs[r]..displs[r] + counts[r]` of a buffer of `len` elements, checked:
/// one count and one displacement per rank, every block inside the buffer, and (for a
/// receive buffer, `disjoint`) no two blocks overlapping.
#[allow(clippy::too_many_arguments)]
fn v_blocks(
    op: &'static str,
    buffer: &'static str,
    names: (&'static str, &'static str),
    counts: &[usize],
    displs: &[usize],
    n: u32,
    len: usize,
    disjoint: bool,
) -> std::result::Result<Vec<Range<usize>>, CollError> {
    for (what, l) in [(names.0, counts.len()), (names.1, displs.len())] {
        if l != n as usize {
            return Err(CollError::CountsLength {
                op,
                what,
                len: l,
                size: n,
            });
        }
    }
    let mut blocks = Vec::with_capacity(n as usize);
    for (r, (&c, &d)) in counts.iter().zip(displs).enumerate() {
        let end = d.saturating_add(c);
        if end > len {
            return Err(CollError::BlockOutside {
                op,
                buffer,
                rank: r as u32,
                start: d,
                end,
                len,
            });
        }
        blocks.push(d..end);
    }
    if disjoint {
        let mut order: Vec<usize> = (0..blocks.len())
            .filter(|&r| !blocks[r].is_empty())
            .collect();
        order.sort_by_key(|&r| blocks[r].start);
        for w in order.windows(2) {
            if blocks[w[0]].end > blocks[w[1]].start {
                return Err(CollError::BlocksOverlap {
                    op,
                    a: w[0].min(w[1]) as u32,
                    b: w[0].max(w[1]) as u32,
                });
            }
        }
    }
    Ok(blocks)
}

/// The plan of a rooted `v` collective (gatherv, scatterv) on this rank.
struct RootedV {
    /// At the root, every rank's block of its buffer; elsewhere only this rank's,
    /// `0..own_len`.
    blocks: Vec<Range<usize>>,
    invalid: Option<CollError>,
    /// Element counts this rank knows, for the count check.
    views: Vec<Option<u64>>,
}

impl RootedV {
    /// `root_len`: the root's full buffer; `own_len`: this rank's block (at the root, its
    /// separate send or receive buffer, if any).
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: Kind,
        buffer: &'static str,
        disjoint: bool,
        link: &CollLink,
        root: u32,
        counts: &[usize],
        displs: &[usize],
        root_len: usize,
        own_len: Option<usize>,
    ) -> RootedV {
        let (n, me) = (link.size(), link.rank());
        let op = kind.name();
        let mut blocks = vec![0..0; n as usize];
        if me != root {
            let own = own_len.unwrap_or(0);
            blocks[me as usize] = 0..own;
            let views = (0..n).map(|r| (r == me).then_some(own as u64)).collect();
            return RootedV {
                blocks,
                invalid: None,
                views,
            };
        }
        let invalid = match v_blocks(
            op,
            buffer,
            ("counts", "displs"),
            counts,
            displs,
            n,
            root_len,
            disjoint,
        ) {
            Ok(b) => {
                blocks = b;
                own_len.and_then(|l| {
                    length(
                        op,
                        if buffer == "send" { "receive" } else { "send" },
                        l,
                        counts[me as usize],
                    )
                })
            }
            Err(e) => Some(e),
        };
        let views = counts.iter().map(|&c| Some(c as u64)).collect();
        RootedV {
            blocks,
            invalid,
            views,
        }
    }

    fn call<T: Pod + Send>(&mut self, kind: Kind, root: u32) -> Call {
        let mut call = Call::new(kind, 0)
            .elem::<T>()
            .root(root)
            .invalid(self.invalid.clone());
        call.per_rank = Some(std::mem::take(&mut self.views));
        call
    }
}

#[allow(clippy::too_many_arguments)]
fn alltoallv_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    send: &[T],
    send_counts: &[usize],
    send_displs: &[usize],
    recv: &mut [T],
    recv_counts: &[usize],
    recv_displs: &[usize],
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let op = Kind::Alltoallv.name();
    let sb = v_blocks(
        op,
        "send",
        ("send_counts", "send_displs"),
        send_counts,
        send_displs,
        n,
        send.len(),
        false,
    );
    let rb = v_blocks(
        op,
        "receive",
        ("recv_counts", "recv_displs"),
        recv_counts,
        recv_displs,
        n,
        recv.len(),
        true,
    );
    let (sb, rb, invalid) = match (sb, rb) {
        (Ok(s), Ok(r)) => {
            let m = me as usize;
            let bad = (s[m].len() != r[m].len()).then_some(CollError::CountMismatch {
                op,
                rank: me,
                a: s[m].len() as u64,
                b: r[m].len() as u64,
            });
            (s, r, bad)
        }
        (Err(e), _) | (_, Err(e)) => (Vec::new(), Vec::new(), Some(e)),
    };
    if invalid.is_none() {
        let m = me as usize;
        recv[rb[m].clone()].copy_from_slice(&send[sb[m].clone()]);
    }
    let call = Call::new(Kind::Alltoallv, 0).elem::<T>().invalid(invalid);
    move_seq(link, seq, env_config()?, call, recv, send, || {
        schedule::pairwise_alltoall(n, me, &sb, &rb)
    })
}

/// A non-blocking collective ([`Request`](crate::Request)): runs on a helper thread; `wait`
/// returns its buffer. What dropping it does, and why it cannot be cancelled:
/// [Requests](crate::comm#requests).
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
    ///
    /// # Errors
    /// None (the collective's own error is reported by [`CollRequest::wait`]); a `Result`
    /// like every [`Request`](crate::Request)'s `test`.
    pub fn test(&mut self) -> Result<bool> {
        Ok(match &self.handle {
            Some(h) => h.is_finished(),
            None => true,
        })
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

impl Communicator {
    /// Takes this call's sequence number, then runs `f` on a helper thread.
    fn spawn_coll<R: Send + 'static>(
        &self,
        f: impl FnOnce(&CollLink, u32) -> Result<R> + Send + 'static,
    ) -> CollRequest<R> {
        let link = CollLink::new(self);
        let seq = link.next_seq();
        CollRequest::spawn(move || f(&link, seq))
    }

    fn coll(&self) -> (CollLink, u32) {
        let link = CollLink::new(self);
        let seq = link.next_seq();
        (link, seq)
    }
}

impl<R: Send + 'static> crate::AnyRequest for CollRequest<R> {
    fn test(&mut self) -> Result<bool> {
        CollRequest::test(self)
    }
    /// A collective cannot be cancelled: the other ranks take part in it, and would wait
    /// for this one until their deadline.
    fn cancel(&mut self) -> Result<bool> {
        Ok(false)
    }
}

impl<R: Send + 'static> crate::Request for CollRequest<R> {
    type Output = R;
    fn wait(self) -> Result<R> {
        CollRequest::wait(self)
    }
}

/// Collectives. Every rank must call the same collectives in the same order, with matching
/// arguments (checked, see the [module docs](crate::coll)). Each call fails on every rank
/// with [`Error::CollectiveMismatch`] when arguments differ, with a [`CollError`] when a rank's
/// buffers or counts do not fit the call, and with [`Error::Timeout`] or
/// [`Error::PeerFailed`] naming the unresponsive rank when a rank dies or hangs; every call
/// may also fail with [`Error::Setting`] for a bad `EFA_*` collective setting
/// ([`CollConfig::from_env`]) and with fabric errors.
///
/// Shapes are in elements; `n` is `size()`, `me` is `rank()`.
impl Communicator {
    // ---- Reductions -------------------------------------------------------------------

    /// Reduces `buf` (`count` elements, the same on every rank) across all ranks in place;
    /// every rank gets the bitwise-identical result (`MPI_Allreduce` with `MPI_IN_PLACE`,
    /// MPI 4.0 section 6.9.6). `op` is a [`ReduceOp`], a [`UserOp`] or a [`LocOp`].
    /// Algorithm per [`CollConfig::from_env`]; non-commutative operators always use
    /// recursive doubling.
    ///
    /// # Errors
    /// [`Error::CollectiveMismatch`] when ranks pass different lengths, types or operators;
    /// [`Error::Timeout`] naming a failed rank; [`CollError::ZeroSized`] for a zero-sized
    /// user type.
    pub fn allreduce<T, O: Reduction<T>>(&self, buf: &mut [T], op: O) -> Result<()> {
        let cfg = env_config()?;
        self.allreduce_with(buf, op, cfg)
    }

    /// [`Communicator::allreduce`] with explicit settings (algorithm choice, chunk size).
    /// All ranks must pass equivalent settings (checked).
    ///
    /// # Errors
    /// As [`Communicator::allreduce`].
    pub fn allreduce_with<T, O: Reduction<T>>(
        &self,
        buf: &mut [T],
        op: O,
        cfg: &CollConfig,
    ) -> Result<()> {
        let (link, seq) = self.coll();
        allreduce_seq(&link, seq, buf, &op, None, cfg)
    }

    /// Out-of-place [`Communicator::allreduce`]: `send` (`count`) is unchanged, `recv`
    /// (`count`) gets the result.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`]; [`CollError::BufferLength`] when `recv` has another
    /// length (and [`CollError::PeerArguments`] on the other ranks).
    pub fn allreduce_into<T: Pod, O: Reduction<T>>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: O,
    ) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        let bad = length("allreduce", "receive", recv.len(), send.len());
        if bad.is_some() {
            // Still take part so that every rank reports the problem.
            let mut d = send.to_vec();
            return allreduce_seq(&link, seq, &mut d, &op, bad, cfg);
        }
        recv.copy_from_slice(send);
        allreduce_seq(&link, seq, recv, &op, None, cfg)
    }

    /// Non-blocking [`Communicator::allreduce`] of an owned buffer, returned by
    /// [`CollRequest::wait`].
    pub fn iallreduce<T: Pod + Send, O: Reduction<T>>(
        &self,
        mut buf: Vec<T>,
        op: O,
    ) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            allreduce_seq(link, seq, &mut buf, &op, None, env_config()?)?;
            Ok(buf)
        })
    }

    /// Reduces `buf` (`count` elements on every rank) of all ranks into `buf` of `root`, in
    /// place (`MPI_Reduce` with `MPI_IN_PLACE`, MPI 4.0 section 6.9.1). On other ranks `buf`
    /// is used as scratch and holds a partial result afterwards.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`], plus [`Error::InvalidRank`] for a `root` outside
    /// `0..n` (on every rank).
    pub fn reduce<T, O: Reduction<T>>(&self, buf: &mut [T], op: O, root: u32) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        reduce_seq(&link, seq, buf, &op, root, None, cfg)
    }

    /// Out-of-place [`Communicator::reduce`]: `send` (`count`) is unchanged; `recv`
    /// (significant at the root only, where it must hold `count`) gets the result.
    ///
    /// # Errors
    /// As [`Communicator::reduce`]; [`CollError::BufferLength`] at a root whose `recv` has
    /// another length.
    pub fn reduce_into<T: Pod, O: Reduction<T>>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: O,
        root: u32,
    ) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        let bad = if self.rank() == root {
            length("reduce", "receive", recv.len(), send.len())
        } else {
            None
        };
        if self.rank() == root && bad.is_none() {
            recv.copy_from_slice(send);
            return reduce_seq(&link, seq, recv, &op, root, None, cfg);
        }
        let mut tmp = send.to_vec();
        reduce_seq(&link, seq, &mut tmp, &op, root, bad, cfg)
    }

    /// Non-blocking in-place [`Communicator::reduce`].
    pub fn ireduce<T: Pod + Send, O: Reduction<T>>(
        &self,
        mut buf: Vec<T>,
        op: O,
        root: u32,
    ) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            reduce_seq(link, seq, &mut buf, &op, root, None, env_config()?)?;
            Ok(buf)
        })
    }

    /// Reduce-scatter in place (`MPI_Reduce_scatter_block` with `MPI_IN_PLACE`, MPI 4.0
    /// section 6.10.2): `buf` holds `n` equal blocks of `c` elements; afterwards block `me`
    /// holds the reduction of every rank's block `me` (the other blocks hold partials).
    /// Ring; recursive doubling over the whole buffer for non-commutative operators.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`]; [`CollError::NotDivisible`] when the length is not a
    /// multiple of `n`.
    pub fn reduce_scatter<T, O: Reduction<T>>(&self, buf: &mut [T], op: O) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        let bad = divisible("reduce_scatter", "in-place", buf.len(), self.size());
        reduce_scatter_seq(&link, seq, buf, &op, bad, cfg)
    }

    /// Out-of-place [`Communicator::reduce_scatter`]: `send` holds `n` blocks of
    /// `recv.len()` elements (`n * c`) and is unchanged; `recv` (`c`) gets block `me` of the
    /// reduction.
    ///
    /// # Errors
    /// As [`Communicator::reduce_scatter`]; [`CollError::BufferLength`] when `send` does not
    /// hold `n * recv.len()`.
    pub fn reduce_scatter_into<T: Pod, O: Reduction<T>>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: O,
    ) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        let n = self.size() as usize;
        let c = recv.len();
        let bad = length("reduce_scatter", "send", send.len(), c * n);
        let mut work = send.to_vec();
        reduce_scatter_seq(&link, seq, &mut work, &op, bad, cfg)?;
        let me = self.rank() as usize;
        recv.copy_from_slice(&work[me * c..(me + 1) * c]);
        Ok(())
    }

    /// Non-blocking in-place [`Communicator::reduce_scatter`].
    pub fn ireduce_scatter<T: Pod + Send, O: Reduction<T>>(
        &self,
        mut buf: Vec<T>,
        op: O,
    ) -> CollRequest<Vec<T>> {
        let n = self.size();
        self.spawn_coll(move |link, seq| {
            let bad = divisible("reduce_scatter", "in-place", buf.len(), n);
            reduce_scatter_seq(link, seq, &mut buf, &op, bad, env_config()?)?;
            Ok(buf)
        })
    }

    /// Inclusive prefix reduction in place (`MPI_Scan` with `MPI_IN_PLACE`, MPI 4.0 section
    /// 6.11.1): `buf` (`count` on every rank) becomes `x0 ∘ x1 ∘ ... ∘ x(me)`, in rank
    /// order (so non-commutative operators are fine). [`ReduceOp::Avg`] divides by
    /// `me + 1`. Recursive doubling, `ceil(log2 n)` steps.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`].
    pub fn scan<T, O: Reduction<T>>(&self, buf: &mut [T], op: O) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        scan_seq(&link, seq, Kind::Scan, buf, &op, None, cfg)
    }

    /// Out-of-place [`Communicator::scan`]: `send` (`count`) is unchanged, `recv` (`count`)
    /// gets the prefix.
    ///
    /// # Errors
    /// As [`Communicator::scan`]; [`CollError::BufferLength`] when `recv` has another
    /// length.
    pub fn scan_into<T: Pod, O: Reduction<T>>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: O,
    ) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        let bad = length("scan", "receive", recv.len(), send.len());
        if bad.is_some() {
            let mut d = send.to_vec();
            return scan_seq(&link, seq, Kind::Scan, &mut d, &op, bad, cfg);
        }
        recv.copy_from_slice(send);
        scan_seq(&link, seq, Kind::Scan, recv, &op, None, cfg)
    }

    /// Non-blocking in-place [`Communicator::scan`].
    pub fn iscan<T: Pod + Send, O: Reduction<T>>(
        &self,
        mut buf: Vec<T>,
        op: O,
    ) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            scan_seq(link, seq, Kind::Scan, &mut buf, &op, None, env_config()?)?;
            Ok(buf)
        })
    }

    /// Exclusive prefix reduction in place (`MPI_Exscan` with `MPI_IN_PLACE`, MPI 4.0
    /// section 6.11.2): on rank `me > 0`, `buf` (`count` on every rank) becomes
    /// `x0 ∘ ... ∘ x(me-1)`, in rank order. **Rank 0's buffer is left untouched** (MPI
    /// leaves it undefined; here it keeps rank 0's input). [`ReduceOp::Avg`] divides by
    /// `me`. A scan plus one shift, `ceil(log2 n) + 1` steps.
    ///
    /// # Errors
    /// As [`Communicator::allreduce`].
    pub fn exscan<T, O: Reduction<T>>(&self, buf: &mut [T], op: O) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        scan_seq(&link, seq, Kind::Exscan, buf, &op, None, cfg)
    }

    /// Out-of-place [`Communicator::exscan`]: `send` (`count`) is unchanged; `recv`
    /// (`count`) gets the exclusive prefix, except on rank 0, where `recv` is not written.
    ///
    /// # Errors
    /// As [`Communicator::exscan`]; [`CollError::BufferLength`] when `recv` has another
    /// length.
    pub fn exscan_into<T: Pod, O: Reduction<T>>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: O,
    ) -> Result<()> {
        let cfg = env_config()?;
        let (link, seq) = self.coll();
        let bad = length("exscan", "receive", recv.len(), send.len());
        let mut work = send.to_vec();
        scan_seq(&link, seq, Kind::Exscan, &mut work, &op, bad, cfg)?;
        if self.rank() > 0 {
            recv.copy_from_slice(&work);
        }
        Ok(())
    }

    /// Non-blocking in-place [`Communicator::exscan`].
    pub fn iexscan<T: Pod + Send, O: Reduction<T>>(
        &self,
        mut buf: Vec<T>,
        op: O,
    ) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            scan_seq(link, seq, Kind::Exscan, &mut buf, &op, None, env_config()?)?;
            Ok(buf)
        })
    }

    // ---- Data movement ----------------------------------------------------------------

    /// Copies `buf` (`count`, the same on every rank) of rank `root` into `buf` of every
    /// rank (`MPI_Bcast`, MPI 4.0 section 6.4). Binomial tree for small buffers, a chunked
    /// pipelined chain for large ones.
    ///
    /// # Errors
    /// [`Error::CollectiveMismatch`] on mismatched lengths, element sizes or roots;
    /// [`CollError::ZeroSized`] for a size-0 `T`; [`Error::InvalidRank`];
    /// [`Error::Timeout`].
    pub fn broadcast<T: Pod + Send>(&self, buf: &mut [T], root: u32) -> Result<()> {
        let (link, seq) = self.coll();
        broadcast_seq(&link, seq, buf, root, env_config()?)
    }

    /// Non-blocking [`Communicator::broadcast`].
    pub fn ibroadcast<T: Pod + Send>(&self, mut buf: Vec<T>, root: u32) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            broadcast_seq(link, seq, &mut buf, root, env_config()?)?;
            Ok(buf)
        })
    }

    /// Blocks until every rank has called it (`MPI_Barrier`): a recursive-doubling exchange
    /// of the 40-byte argument descriptor.
    ///
    /// # Errors
    /// [`Error::CollectiveMismatch`] when another rank is in a different collective;
    /// [`Error::Timeout`].
    pub fn barrier(&self) -> Result<()> {
        let (link, seq) = self.coll();
        barrier_seq(&link, seq)
    }

    /// Non-blocking [`Communicator::barrier`] (`MPI_Ibarrier`).
    pub fn ibarrier(&self) -> CollRequest<()> {
        self.spawn_coll(barrier_seq)
    }

    /// Allgather in place (`MPI_Allgather` with `MPI_IN_PLACE`, MPI 4.0 section 6.7): `buf`
    /// holds `n` blocks of `c` elements (`n * c`), this rank's block `me` already filled;
    /// afterwards block `r` holds rank `r`'s block. Ring.
    ///
    /// # Errors
    /// [`Error::CollectiveMismatch`] on mismatched lengths; [`CollError::NotDivisible`] when the length
    /// is not a multiple of `n`; [`Error::Timeout`].
    pub fn allgather<T: Pod + Send>(&self, buf: &mut [T]) -> Result<()> {
        let (link, seq) = self.coll();
        let n = self.size() as usize;
        let bad = divisible("allgather", "in-place", buf.len(), self.size());
        let counts = vec![buf.len() / n; n];
        allgatherv_seq(
            &link,
            seq,
            buf,
            &counts,
            Kind::Allgather,
            bad,
            env_config()?,
        )
    }

    /// Out-of-place [`Communicator::allgather`]: `send` (`c`, the same on every rank) from
    /// every rank lands in block `r` of `recv` (`n * c`).
    ///
    /// # Errors
    /// As [`Communicator::allgather`]; [`CollError::BufferLength`] when `recv` does not hold
    /// `n * send.len()`.
    pub fn allgather_into<T: Pod + Send>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let (link, seq) = self.coll();
        let n = self.size() as usize;
        let c = send.len();
        let me = self.rank() as usize;
        let bad = length("allgather", "receive", recv.len(), c * n);
        let counts = vec![c; n];
        let cfg = env_config()?;
        if bad.is_some() {
            let mut tmp = vec![T::zeroed(); c * n];
            return allgatherv_seq(&link, seq, &mut tmp, &counts, Kind::Allgather, bad, cfg);
        }
        recv[me * c..(me + 1) * c].copy_from_slice(send);
        allgatherv_seq(&link, seq, recv, &counts, Kind::Allgather, None, cfg)
    }

    /// Non-blocking in-place [`Communicator::allgather`].
    pub fn iallgather<T: Pod + Send>(&self, mut buf: Vec<T>) -> CollRequest<Vec<T>> {
        let n = self.size();
        self.spawn_coll(move |link, seq| {
            let bad = divisible("allgather", "in-place", buf.len(), n);
            let counts = vec![buf.len() / n as usize; n as usize];
            allgatherv_seq(
                link,
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

    /// Allgather of variable sizes in place (`MPI_Allgatherv` with `MPI_IN_PLACE`, MPI 4.0
    /// section 6.7): rank `r` contributes `counts[r]` elements; `buf` (`counts`' sum) holds
    /// them in rank order, this rank's already at its offset. Every rank passes the same
    /// `counts` (`n` entries; checked).
    ///
    /// # Errors
    /// [`Error::CollectiveMismatch`] when counts or lengths differ between ranks;
    /// [`CollError::CountsLength`], [`CollError::BufferLength`]; [`Error::Timeout`].
    pub fn allgatherv<T: Pod + Send>(&self, buf: &mut [T], counts: &[usize]) -> Result<()> {
        let (link, seq) = self.coll();
        let bad = allgatherv_bad(self.size(), self.rank(), counts, buf.len(), None);
        allgatherv_seq(
            &link,
            seq,
            buf,
            counts,
            Kind::Allgatherv,
            bad,
            env_config()?,
        )
    }

    /// Out-of-place [`Communicator::allgatherv`]: `send` (`counts[me]`) from every rank
    /// lands in `recv` (`counts`' sum) in rank order.
    ///
    /// # Errors
    /// As [`Communicator::allgatherv`].
    pub fn allgatherv_into<T: Pod + Send>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        let (link, seq) = self.coll();
        let cfg = env_config()?;
        let total: usize = counts.iter().sum();
        let bad = allgatherv_bad(
            self.size(),
            self.rank(),
            counts,
            recv.len(),
            Some(send.len()),
        );
        if bad.is_some() {
            let mut tmp = vec![T::zeroed(); total];
            return allgatherv_seq(&link, seq, &mut tmp, counts, Kind::Allgatherv, bad, cfg);
        }
        let me = self.rank() as usize;
        let off: usize = counts[..me].iter().sum();
        recv[off..off + send.len()].copy_from_slice(send);
        allgatherv_seq(&link, seq, recv, counts, Kind::Allgatherv, None, cfg)
    }

    /// Non-blocking in-place [`Communicator::allgatherv`].
    pub fn iallgatherv<T: Pod + Send>(
        &self,
        mut buf: Vec<T>,
        counts: Vec<usize>,
    ) -> CollRequest<Vec<T>> {
        let (n, me) = (self.size(), self.rank());
        self.spawn_coll(move |link, seq| {
            let bad = allgatherv_bad(n, me, &counts, buf.len(), None);
            allgatherv_seq(
                link,
                seq,
                &mut buf,
                &counts,
                Kind::Allgatherv,
                bad,
                env_config()?,
            )?;
            Ok(buf)
        })
    }

    /// Gather in place (`MPI_Gather` with `MPI_IN_PLACE`, MPI 4.0 section 6.5): at `root`,
    /// `buf` holds `n` blocks of `c` (`n * c`) with the root's own block `root` already in
    /// place, and receives block `r` from rank `r`; elsewhere `buf` is this rank's block
    /// (`c`, the same on every rank) and is unchanged.
    ///
    /// # Errors
    /// [`Error::CollectiveMismatch`] on every rank for mismatched block lengths or roots;
    /// [`CollError::NotDivisible`] at the root; [`Error::InvalidRank`]; [`Error::Timeout`].
    pub fn gather<T: Pod + Send>(&self, buf: &mut [T], root: u32) -> Result<()> {
        let (link, seq) = self.coll();
        gather_seq(&link, seq, buf, root, env_config()?)
    }

    /// Out-of-place [`Communicator::gather`]: `send` (`c`, the same on every rank) of rank
    /// `r` lands in block `r` of `recv` at the root (`n * c`; `recv` is significant at the
    /// root only).
    ///
    /// # Errors
    /// As [`Communicator::gather`]; [`CollError::BufferLength`] at a root whose `recv` does
    /// not hold `n * send.len()`.
    pub fn gather_into<T: Pod + Send>(&self, send: &[T], recv: &mut [T], root: u32) -> Result<()> {
        let (link, seq) = self.coll();
        let (n, me) = (self.size(), self.rank());
        let c = send.len();
        let is_root = me == root;
        let bad = if is_root {
            length("gather", "receive", recv.len(), c * n as usize)
        } else {
            None
        };
        if is_root && bad.is_none() {
            recv[me as usize * c..(me as usize + 1) * c].copy_from_slice(send);
        }
        let call = Call::new(Kind::Gather, c)
            .elem::<T>()
            .root(root)
            .invalid(bad);
        let work = if is_root { recv } else { &mut [] };
        move_seq(&link, seq, env_config()?, call, work, send, || {
            schedule::gather(n, me, root, &schedule::even_blocks(c * n as usize, n), true)
        })
    }

    /// Non-blocking in-place [`Communicator::gather`].
    pub fn igather<T: Pod + Send>(&self, mut buf: Vec<T>, root: u32) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            gather_seq(link, seq, &mut buf, root, env_config()?)?;
            Ok(buf)
        })
    }

    /// Scatter in place (`MPI_Scatter` with `MPI_IN_PLACE`, MPI 4.0 section 6.6): at `root`,
    /// `buf` holds `n` blocks of `c` (`n * c`), block `r` goes to rank `r`, and the buffer
    /// is unchanged; elsewhere `buf` (`c`, the same on every rank) receives this rank's
    /// block.
    ///
    /// # Errors
    /// As [`Communicator::gather`].
    pub fn scatter<T: Pod + Send>(&self, buf: &mut [T], root: u32) -> Result<()> {
        let (link, seq) = self.coll();
        scatter_seq(&link, seq, buf, root, env_config()?)
    }

    /// Out-of-place [`Communicator::scatter`]: block `r` of `send` at the root (`n * c`,
    /// significant at the root only) lands in `recv` (`c`) of rank `r`.
    ///
    /// # Errors
    /// As [`Communicator::scatter`]; [`CollError::BufferLength`] at a root whose `send` does
    /// not hold `n * recv.len()`.
    pub fn scatter_into<T: Pod + Send>(&self, send: &[T], recv: &mut [T], root: u32) -> Result<()> {
        let (link, seq) = self.coll();
        let (n, me) = (self.size(), self.rank());
        let c = recv.len();
        let is_root = me == root;
        let bad = if is_root {
            length("scatter", "send", send.len(), c * n as usize)
        } else {
            None
        };
        if is_root && bad.is_none() {
            recv.copy_from_slice(&send[me as usize * c..(me as usize + 1) * c]);
        }
        let call = Call::new(Kind::Scatter, c)
            .elem::<T>()
            .root(root)
            .invalid(bad);
        let (work, input): (&mut [T], &[T]) = if is_root {
            (&mut [], send)
        } else {
            (recv, &[])
        };
        move_seq(&link, seq, env_config()?, call, work, input, || {
            schedule::scatter(n, me, root, &schedule::even_blocks(c * n as usize, n))
        })
    }

    /// Non-blocking in-place [`Communicator::scatter`].
    pub fn iscatter<T: Pod + Send>(&self, mut buf: Vec<T>, root: u32) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            scatter_seq(link, seq, &mut buf, root, env_config()?)?;
            Ok(buf)
        })
    }

    /// All-to-all in place (`MPI_Alltoall` with `MPI_IN_PLACE`, MPI 4.0 section 6.8): `buf`
    /// holds `n` blocks of `c` (`n * c`, the same on every rank); block `d` goes to rank
    /// `d`, and block `s` is replaced by what rank `s` sent to this rank. Pairwise exchange
    /// (one copy of `buf` is made).
    ///
    /// # Errors
    /// [`Error::CollectiveMismatch`] for mismatched lengths; [`CollError::NotDivisible`];
    /// [`Error::Timeout`].
    pub fn alltoall<T: Pod + Send>(&self, buf: &mut [T]) -> Result<()> {
        let input = buf.to_vec();
        self.alltoall_into(&input, buf)
    }

    /// Out-of-place [`Communicator::alltoall`]: block `d` of `send` (`n * c`) on rank `s`
    /// lands in block `s` of `recv` (`n * c`) on rank `d`.
    ///
    /// # Errors
    /// As [`Communicator::alltoall`]; [`CollError::BufferLength`] when the lengths differ.
    pub fn alltoall_into<T: Pod + Send>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let (link, seq) = self.coll();
        alltoall_seq(&link, seq, send, recv)
    }

    /// Non-blocking in-place [`Communicator::alltoall`].
    pub fn ialltoall<T: Pod + Send>(&self, buf: Vec<T>) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            let mut recv = buf.clone();
            alltoall_seq(link, seq, &buf, &mut recv)?;
            Ok(recv)
        })
    }

    /// Gather of variable sizes in place (`MPI_Gatherv` with `MPI_IN_PLACE`, MPI 4.0 section
    /// 6.5): at `root`, `buf` receives rank `r`'s block at elements
    /// `displs[r]..displs[r] + counts[r]` (the root's own block already in place; other
    /// elements untouched); elsewhere `buf` is this rank's block (`counts[me]` at the root)
    /// and is unchanged. `counts` and `displs` (`n` entries each, in elements) are
    /// significant at the root only (others may pass `&[]`).
    ///
    /// # Errors
    /// At the root: [`CollError::CountsLength`], [`CollError::BlockOutside`],
    /// [`CollError::BlocksOverlap`] (other ranks then get [`CollError::PeerArguments`]);
    /// on every rank: [`CollError::CountMismatch`] when the root's `counts[r]` differs from
    /// rank `r`'s length, [`Error::CollectiveMismatch`] for mismatched element sizes or roots,
    /// [`Error::InvalidRank`], [`Error::Timeout`].
    pub fn gatherv<T: Pod + Send>(
        &self,
        buf: &mut [T],
        counts: &[usize],
        displs: &[usize],
        root: u32,
    ) -> Result<()> {
        let (link, seq) = self.coll();
        gatherv_in_place(&link, seq, buf, counts, displs, root)
    }

    /// Out-of-place [`Communicator::gatherv`]: `send` (rank `r`'s block, `counts[r]` at the
    /// root) lands at `displs[r]` of `recv` at the root; `recv`, `counts` and `displs` are
    /// significant at the root only.
    ///
    /// # Errors
    /// As [`Communicator::gatherv`]; [`CollError::BufferLength`] at a root whose `send`
    /// does not hold `counts[root]`.
    pub fn gatherv_into<T: Pod + Send>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
        displs: &[usize],
        root: u32,
    ) -> Result<()> {
        let (link, seq) = self.coll();
        let work = if self.rank() == root { recv } else { &mut [] };
        gatherv_seq(&link, seq, work, send, false, counts, displs, root)
    }

    /// Non-blocking in-place [`Communicator::gatherv`].
    pub fn igatherv<T: Pod + Send>(
        &self,
        mut buf: Vec<T>,
        counts: Vec<usize>,
        displs: Vec<usize>,
        root: u32,
    ) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            gatherv_in_place(link, seq, &mut buf, &counts, &displs, root)?;
            Ok(buf)
        })
    }

    /// Scatter of variable sizes in place (`MPI_Scatterv` with `MPI_IN_PLACE`, MPI 4.0
    /// section 6.6): at `root`, elements `displs[r]..displs[r] + counts[r]` of `buf` go to
    /// rank `r` (blocks may overlap; `buf` is unchanged); elsewhere `buf` (`counts[me]` at
    /// the root) receives this rank's block. `counts` and `displs` (`n` entries each, in
    /// elements) are significant at the root only.
    ///
    /// # Errors
    /// As [`Communicator::gatherv`] (without the overlap check).
    pub fn scatterv<T: Pod + Send>(
        &self,
        buf: &mut [T],
        counts: &[usize],
        displs: &[usize],
        root: u32,
    ) -> Result<()> {
        let (link, seq) = self.coll();
        scatterv_in_place(&link, seq, buf, counts, displs, root)
    }

    /// Out-of-place [`Communicator::scatterv`]: block `r` of `send` at the root lands in
    /// `recv` (`counts[r]`) of rank `r`; `send`, `counts` and `displs` are significant at
    /// the root only.
    ///
    /// # Errors
    /// As [`Communicator::scatterv`]; [`CollError::BufferLength`] at a root whose `recv`
    /// does not hold `counts[root]`.
    pub fn scatterv_into<T: Pod + Send>(
        &self,
        send: &[T],
        recv: &mut [T],
        counts: &[usize],
        displs: &[usize],
        root: u32,
    ) -> Result<()> {
        let (link, seq) = self.coll();
        let input = if self.rank() == root { send } else { &[] };
        scatterv_seq(&link, seq, input, recv, false, counts, displs, root)
    }

    /// Non-blocking in-place [`Communicator::scatterv`].
    pub fn iscatterv<T: Pod + Send>(
        &self,
        mut buf: Vec<T>,
        counts: Vec<usize>,
        displs: Vec<usize>,
        root: u32,
    ) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            scatterv_in_place(link, seq, &mut buf, &counts, &displs, root)?;
            Ok(buf)
        })
    }

    /// All-to-all of variable sizes in place (`MPI_Alltoallv` with `MPI_IN_PLACE`, MPI 4.0
    /// section 6.8): elements `displs[d]..displs[d] + counts[d]` of `buf` go to rank `d`,
    /// and are replaced by what rank `d` sent to this rank (so `counts[d]` here must equal
    /// rank `d`'s `counts[me]`). `counts` and `displs` have `n` entries, in elements; blocks
    /// may not overlap. One copy of `buf` is made.
    ///
    /// # Errors
    /// As [`Communicator::alltoallv_into`].
    pub fn alltoallv<T: Pod + Send>(
        &self,
        buf: &mut [T],
        counts: &[usize],
        displs: &[usize],
    ) -> Result<()> {
        let input = buf.to_vec();
        self.alltoallv_into(&input, counts, displs, buf, counts, displs)
    }

    /// Out-of-place all-to-all of variable sizes (`MPI_Alltoallv`, MPI 4.0 section 6.8):
    /// `send[send_displs[d]..][..send_counts[d]]` goes to rank `d` and lands in
    /// `recv[recv_displs[s]..][..recv_counts[s]]` of rank `d`, where `s` is this rank. All
    /// four slices have `n` entries, in elements; receive blocks may not overlap.
    ///
    /// # Errors
    /// [`CollError::CountsLength`], [`CollError::BlockOutside`],
    /// [`CollError::BlocksOverlap`], and [`CollError::CountMismatch`] when
    /// `send_counts[me] != recv_counts[me]`, on the rank that passed them
    /// ([`CollError::PeerArguments`] on the others); [`Error::CollectiveMismatch`] for mismatched
    /// types. The per-pair counts are not part of the argument check (that would cost `n²`
    /// numbers): when rank `s`'s `send_counts[d]` differs from rank `d`'s `recv_counts[s]`,
    /// rank `d` gets [`CollError::SizeMismatch`] and the other ranks
    /// complete. [`Error::Timeout`].
    pub fn alltoallv_into<T: Pod + Send>(
        &self,
        send: &[T],
        send_counts: &[usize],
        send_displs: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<()> {
        let (link, seq) = self.coll();
        alltoallv_seq(
            &link,
            seq,
            send,
            send_counts,
            send_displs,
            recv,
            recv_counts,
            recv_displs,
        )
    }

    /// Non-blocking in-place [`Communicator::alltoallv`].
    pub fn ialltoallv<T: Pod + Send>(
        &self,
        mut buf: Vec<T>,
        counts: Vec<usize>,
        displs: Vec<usize>,
    ) -> CollRequest<Vec<T>> {
        self.spawn_coll(move |link, seq| {
            let input = buf.clone();
            alltoallv_seq(
                link, seq, &input, &counts, &displs, &mut buf, &counts, &displs,
            )?;
            Ok(buf)
        })
    }
}

/// The arguments of an allgatherv: `n` counts, a buffer of their sum and, out of place, a
/// send buffer of `counts[me]`.
fn allgatherv_bad(
    n: u32,
    me: u32,
    counts: &[usize],
    len: usize,
    send: Option<usize>,
) -> Option<CollError> {
    let op = "allgatherv";
    if counts.len() != n as usize {
        return Some(CollError::CountsLength {
            op,
            what: "counts",
            len: counts.len(),
            size: n,
        });
    }
    let total = counts.iter().fold(0usize, |a, &c| a.saturating_add(c));
    let buffer = if send.is_some() {
        "receive"
    } else {
        "in-place"
    };
    length(op, buffer, len, total)
        .or_else(|| send.and_then(|s| length(op, "send", s, counts[me as usize])))
}

fn gather_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    root: u32,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let is_root = me == root;
    let (c, bad) = if is_root {
        (
            buf.len() / n as usize,
            divisible("gather", "in-place", buf.len(), n),
        )
    } else {
        (buf.len(), None)
    };
    let call = Call::new(Kind::Gather, c)
        .elem::<T>()
        .root(root)
        .invalid(bad);
    let blocks = schedule::even_blocks(c * n as usize, n);
    let steps = || schedule::gather(n, me, root, &blocks, true);
    if is_root {
        move_seq(link, seq, cfg, call, buf, &[], steps)
    } else {
        move_seq(link, seq, cfg, call, &mut [], buf, steps)
    }
}

fn scatter_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    root: u32,
    cfg: &CollConfig,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let is_root = me == root;
    let (c, bad) = if is_root {
        (
            buf.len() / n as usize,
            divisible("scatter", "in-place", buf.len(), n),
        )
    } else {
        (buf.len(), None)
    };
    let call = Call::new(Kind::Scatter, c)
        .elem::<T>()
        .root(root)
        .invalid(bad);
    let blocks = schedule::even_blocks(c * n as usize, n);
    let steps = || schedule::scatter(n, me, root, &blocks);
    if is_root {
        move_seq(link, seq, cfg, call, &mut [], buf, steps)
    } else {
        move_seq(link, seq, cfg, call, buf, &[], steps)
    }
}

fn alltoall_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    send: &[T],
    recv: &mut [T],
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let bad = length("alltoall", "receive", recv.len(), send.len())
        .or_else(|| divisible("alltoall", "send", send.len(), n));
    let blocks = schedule::even_blocks(if bad.is_some() { 0 } else { send.len() }, n);
    if bad.is_none() {
        let own = blocks[me as usize].clone();
        recv[own.clone()].copy_from_slice(&send[own]);
    }
    let call = Call::new(Kind::Alltoall, send.len() / n as usize)
        .elem::<T>()
        .invalid(bad);
    move_seq(link, seq, env_config()?, call, recv, send, || {
        schedule::pairwise_alltoall(n, me, &blocks, &blocks)
    })
}

/// Gatherv. At the root `work` is the receive buffer and `input` its own block (empty when
/// `root_in_place`: the block is already in `work`); elsewhere `work` is empty and `input`
/// this rank's block.
#[allow(clippy::too_many_arguments)]
fn gatherv_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    work: &mut [T],
    input: &[T],
    root_in_place: bool,
    counts: &[usize],
    displs: &[usize],
    root: u32,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let cfg = env_config()?;
    let is_root = me == root;
    let own_len = (!(is_root && root_in_place)).then_some(input.len());
    let mut plan = RootedV::new(
        Kind::Gatherv,
        "receive",
        true,
        link,
        root,
        counts,
        displs,
        work.len(),
        own_len,
    );
    if is_root && !root_in_place && plan.invalid.is_none() {
        work[plan.blocks[me as usize].clone()].copy_from_slice(input);
    }
    let call = plan.call::<T>(Kind::Gatherv, root);
    let steps = || schedule::gather(n, me, root, &plan.blocks, true);
    if is_root {
        move_seq(link, seq, cfg, call, work, &[], steps)
    } else {
        move_seq(link, seq, cfg, call, &mut [], input, steps)
    }
}

/// Scatterv. At the root `input` is the send buffer and `work` its own receive block (empty
/// when `root_in_place`: the block stays in `input`); elsewhere `input` is empty and `work`
/// this rank's receive block.
#[allow(clippy::too_many_arguments)]
fn scatterv_seq<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    input: &[T],
    work: &mut [T],
    root_in_place: bool,
    counts: &[usize],
    displs: &[usize],
    root: u32,
) -> Result<()> {
    let (n, me) = (link.size(), link.rank());
    let cfg = env_config()?;
    let is_root = me == root;
    let own_len = (!(is_root && root_in_place)).then_some(work.len());
    let mut plan = RootedV::new(
        Kind::Scatterv,
        "send",
        false,
        link,
        root,
        counts,
        displs,
        input.len(),
        own_len,
    );
    if is_root && !root_in_place && plan.invalid.is_none() {
        work.copy_from_slice(&input[plan.blocks[me as usize].clone()]);
    }
    let call = plan.call::<T>(Kind::Scatterv, root);
    let steps = || schedule::scatter(n, me, root, &plan.blocks);
    if is_root {
        move_seq(link, seq, cfg, call, &mut [], input, steps)
    } else {
        move_seq(link, seq, cfg, call, work, &[], steps)
    }
}

/// In-place gatherv: `buf` is the root's receive buffer, another rank's block.
fn gatherv_in_place<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    counts: &[usize],
    displs: &[usize],
    root: u32,
) -> Result<()> {
    if link.rank() == root {
        gatherv_seq(link, seq, buf, &[], true, counts, displs, root)
    } else {
        gatherv_seq(link, seq, &mut [], buf, false, counts, displs, root)
    }
}

/// In-place scatterv: `buf` is the root's send buffer, another rank's receive block.
fn scatterv_in_place<T: Pod + Send>(
    link: &CollLink,
    seq: u32,
    buf: &mut [T],
    counts: &[usize],
    displs: &[usize],
    root: u32,
) -> Result<()> {
    if link.rank() == root {
        scatterv_seq(link, seq, buf, &mut [], true, counts, displs, root)
    } else {
        scatterv_seq(link, seq, &[], buf, false, counts, displs, root)
    }
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
            ("EFA_COLL_WINDOW", "0"),
            ("EFA_COLL_CHECK", "off"),
        ])
        .unwrap();
        assert_eq!(c.algorithm, Algorithm::Ring);
        assert_eq!(
            (c.ring_threshold, c.chunk_bytes, c.window_bytes, c.check),
            (1024, 64, 0, false)
        );
        assert_eq!(cfg(&[]).unwrap().window_bytes, 512 << 10);
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
                "EFA_COLL_WINDOW",
                "1m",
                "EFA_COLL_WINDOW=\"1m\": not a whole number of bytes; accepted: a whole \
                 number of bytes, e.g. 65536",
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

#[cfg(test)]
mod arg_tests {
    use super::*;

    fn blocks(
        counts: &[usize],
        displs: &[usize],
        len: usize,
        disjoint: bool,
    ) -> std::result::Result<Vec<Range<usize>>, CollError> {
        v_blocks(
            "t",
            "receive",
            ("counts", "displs"),
            counts,
            displs,
            3,
            len,
            disjoint,
        )
    }

    #[test]
    fn counts_and_displacements_are_checked() {
        // Shuffled, with gaps and an empty block that sits inside another.
        assert_eq!(
            blocks(&[2, 0, 3], &[5, 1, 0], 7, true),
            Ok(vec![5..7, 1..1, 0..3])
        );
        assert!(matches!(
            blocks(&[1, 1], &[0, 1, 2], 3, true),
            Err(CollError::CountsLength {
                what: "counts",
                len: 2,
                size: 3,
                ..
            })
        ));
        assert!(matches!(
            blocks(&[1, 1, 1], &[0, 1], 3, true),
            Err(CollError::CountsLength {
                what: "displs",
                len: 2,
                ..
            })
        ));
        assert!(matches!(
            blocks(&[1, 2, 1], &[0, 1, 3], 3, true),
            Err(CollError::BlockOutside {
                rank: 2,
                start: 3,
                end: 4,
                len: 3,
                ..
            })
        ));
        // An overflowing displacement is outside, not a panic.
        assert!(matches!(
            blocks(&[1, 2, 1], &[0, usize::MAX, 3], 4, true),
            Err(CollError::BlockOutside {
                rank: 1,
                end: usize::MAX,
                ..
            })
        ));
        assert!(matches!(
            blocks(&[2, 2, 1], &[3, 0, 1], 5, true),
            Err(CollError::BlocksOverlap { a: 1, b: 2, .. })
        ));
        // Send blocks may overlap.
        assert_eq!(
            blocks(&[2, 2, 1], &[3, 0, 1], 5, false),
            Ok(vec![3..5, 0..2, 1..2])
        );
    }

    #[test]
    fn buffer_shapes() {
        assert_eq!(divisible("a", "b", 6, 3), None);
        assert!(matches!(
            divisible("a", "b", 7, 3),
            Some(CollError::NotDivisible {
                len: 7,
                size: 3,
                ..
            })
        ));
        assert!(matches!(
            allgatherv_bad(3, 1, &[1, 2, 3], 6, Some(1)),
            Some(CollError::BufferLength {
                buffer: "send",
                len: 1,
                expected: 2,
                ..
            })
        ));
        assert!(matches!(
            allgatherv_bad(3, 1, &[1, 2, 3], 5, None),
            Some(CollError::BufferLength {
                buffer: "in-place",
                len: 5,
                expected: 6,
                ..
            })
        ));
        assert_eq!(allgatherv_bad(3, 1, &[1, 2, 3], 6, Some(2)), None);
    }
}
