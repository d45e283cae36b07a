//! Collectives, blocking and non-blocking.
//!
//! Every collective takes its datatype as an `efa_datatype` and reductions an `efa_op`.
//! `EFA_IN_PLACE` as the send buffer (as the receive buffer for scatter(v) at the root)
//! selects the in-place form, as in MPI. Non-blocking forms copy their input when they start
//! and copy the result into the receive buffer when they complete ([`crate::efa_wait`] and
//! friends): the receive buffer must stay valid until then, the send buffer need not.

// `op.clone()` is shared by ReduceOp and LocOp (Copy) and UserOp (Clone) in reduction!.
#![allow(clippy::clone_on_copy)]

use std::ffi::{c_int, c_void};

use bytemuck::Zeroable;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use efa_core::{AnyRequest, CollRequest, Communicator, LocOp, Pod, ReduceOp, UserOp};

use crate::p2p::{efa_datatype, match_type, new_request, with_type, CollPending, Kind};
use crate::pair::{staged, unstage, with_staged, Staged};
use crate::{
    comm_ref, efa_comm, efa_request, guarded, is_in_place, need, put, rank_arg, slice, slice_mut,
    CErr, CResult,
};

/// Reduction operators (`MPI_Op`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum efa_op {
    /// Sum (wrapping for integers).
    EFA_SUM = 0,
    /// Product (wrapping for integers).
    EFA_PROD = 1,
    /// Minimum (for floats, NaN is ignored unless every input is NaN).
    EFA_MIN = 2,
    /// Maximum (NaN as for `EFA_MIN`).
    EFA_MAX = 3,
    /// Sum divided by the number of ranks once at the end (integer division for integers).
    EFA_AVG = 4,
    /// The smallest value and its index (`MPI_MINLOC`), over the pair datatypes only
    /// (`EFA_FLOAT_INT`, `EFA_DOUBLE_INT`, `EFA_LONG_INT`, `EFA_2INT`, MPI's layouts): among
    /// equal values the lowest index wins, in signed order (any `int`, negative ones
    /// included, as MPI); a float NaN never wins against a number. The library reduces a
    /// copy of the pairs and writes back `value` and `index` only (at completion for the
    /// non-blocking forms), never the padding.
    EFA_MINLOC = 5,
    /// The largest value and its index (`MPI_MAXLOC`), as `EFA_MINLOC`.
    EFA_MAXLOC = 6,
}

/// A reduction operator of a call: built in, min/max with location, or one made by
/// [`efa_op_create`].
pub(crate) enum Op {
    Builtin(ReduceOp),
    Loc(LocOp),
    User(Arc<UserFn>),
}

fn op_arg(op: c_int) -> CResult<Op> {
    Ok(Op::Builtin(match op {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Prod,
        2 => ReduceOp::Min,
        3 => ReduceOp::Max,
        4 => ReduceOp::Avg,
        5 => return Ok(Op::Loc(LocOp::MinLoc)),
        6 => return Ok(Op::Loc(LocOp::MaxLoc)),
        o if o >= USER_OP_BASE => {
            let ops = user_ops().lock().unwrap_or_else(|p| p.into_inner());
            return match ops.get(&o) {
                Some(f) => Ok(Op::User(f.clone())),
                None => Err(CErr::arg(format!(
                    "op {o} is not a live user operator (efa_op_create; freed ones are gone)"
                ))),
            };
        }
        o => {
            return Err(CErr::arg(format!(
                "op {o} is not an efa_op (EFA_SUM .. EFA_MAXLOC, 0..6) or a user operator from efa_op_create"
            )))
        }
    }))
}

/// The one dispatch of the reducing collectives (allreduce, reduce, reduce_scatter_block,
/// scan, exscan; blocking and non-blocking): checks the communicator and the datatype
/// ([`coll`]) and the operator ([`op_arg`]), then runs `$body` with `$c` the communicator,
/// `$T` the element type efa-core computes on and `$o` the operator as a Rust
/// `Reduction<$T>`: a [`ReduceOp`] over a plain datatype, a [`LocOp`] over a pair datatype's
/// `ValueIndex` (staged from the caller's MPI-layout pairs by [`in_or_out`] and [`vec_in`],
/// written back by them or by [`CopyBack`]), or a [`UserOp`] calling the C function over the
/// caller's elements as they are. Any other pairing is `EFA_ERR_ARG` ([`op_misfit`]).
macro_rules! reduction {
    ($name:literal, $comm:expr, $datatype:expr, $op:expr,
     |$c:ident, $T:ident, $o:ident| $body:expr) => {
        coll($name, $comm, $datatype, |$c, d| match op_arg($op)? {
            Op::Builtin(r) => match_type!(d, elem $T => {
                let $o = r;
                $body
            }, pair _P, _L => Err(op_misfit(d, $op))),
            Op::Loc(l) => match_type!(d, elem _E => Err(op_misfit(d, $op)), pair _P, $T => {
                let $o = l;
                $body
            }),
            Op::User(u) => with_type!(d, $T => {
                let $o = u.typed::<$T>();
                $body
            }),
        })
    };
}

/// The error of a built-in operator over a pair datatype, or of `EFA_MINLOC`/`EFA_MAXLOC`
/// over a plain one.
fn op_misfit(d: efa_datatype, op: c_int) -> CErr {
    let pair = match_type!(d, elem _E => false, pair _P, _L => true);
    CErr::arg(if pair {
        format!("op {op} (a built-in arithmetic operator) does not apply to the pair datatype {d:?}: pairs take EFA_MINLOC, EFA_MAXLOC or a user operator")
    } else {
        format!("op {op} (EFA_MINLOC or EFA_MAXLOC) needs a pair datatype (EFA_FLOAT_INT, EFA_DOUBLE_INT, EFA_LONG_INT, EFA_2INT), not {d:?}")
    })
}

/// The C function of a user operator: `acc[i] = acc[i] op x[i]` for `count` elements, `acc`
/// holding the result of the lower ranks.
pub type efa_user_function = Option<
    unsafe extern "C" fn(acc: *mut c_void, x: *const c_void, count: usize, user_data: *mut c_void),
>;

/// A user operator: the C function, whether it commutes, and its `user_data`.
pub(crate) struct UserFn {
    f: unsafe extern "C" fn(*mut c_void, *const c_void, usize, *mut c_void),
    commute: bool,
    user_data: usize,
}

impl UserFn {
    fn typed<T: Pod + Send + Sync>(self: &Arc<Self>) -> UserOp<T> {
        let me = self.clone();
        let f = move |acc: &mut [T], x: &[T]| {
            // SAFETY: `acc` and `x` hold `count` elements of the call's datatype; the function
            // and `user_data` are valid until efa_op_free and may be called from any thread
            // (efa_op_create's contract).
            unsafe {
                (me.f)(
                    acc.as_mut_ptr() as *mut c_void,
                    x.as_ptr() as *const c_void,
                    acc.len().min(x.len()),
                    me.user_data as *mut c_void,
                )
            }
        };
        if self.commute {
            UserOp::commutative(f)
        } else {
            UserOp::non_commutative(f)
        }
    }
}

/// The first id of user operators (the `efa_op` values are below).
const USER_OP_BASE: c_int = 1000;

fn user_ops() -> &'static Mutex<HashMap<c_int, Arc<UserFn>>> {
    static OPS: OnceLock<Mutex<HashMap<c_int, Arc<UserFn>>>> = OnceLock::new();
    OPS.get_or_init(Default::default)
}

/// Makes a user reduction operator (`MPI_Op_create`) and returns its id in `*op`, for the
/// `op` argument of every reduction. `function(acc, x, count, user_data)` must set
/// `acc[i] = acc[i] op x[i]` for `count` elements of the call's datatype; `acc` holds the
/// result of the lower ranks, so a non-commutative operator (`commute` = 0) is applied in
/// rank order. The library may call it on any run of whole elements (chunks, blocks), so it
/// must combine each element of the datatype on its own: the C ABI has no derived datatypes,
/// so records spanning several elements (a matrix) cannot be one element here. It may be
/// called from any thread (non-blocking collectives run on a helper thread) and must not
/// call libefa. `user_data` is passed through.
///
/// Errors: `EFA_ERR_NULL` (`function`, `op`).
#[no_mangle]
pub unsafe extern "C" fn efa_op_create(
    function: efa_user_function,
    commute: c_int,
    user_data: *mut c_void,
    op: *mut c_int,
) -> c_int {
    guarded("efa_op_create", || {
        let f = function.ok_or_else(|| CErr::null("function"))?;
        need(op, "op")?;
        static NEXT: AtomicI32 = AtomicI32::new(USER_OP_BASE);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let u = UserFn {
            f,
            commute: commute != 0,
            user_data: user_data as usize,
        };
        user_ops()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::new(u));
        put(op, "op", id)
    })
}

/// Frees a user operator (`MPI_Op_free`) and sets `*op` to -1. Collectives already started
/// with it keep it until they complete.
///
/// Errors: `EFA_ERR_NULL` (`op`); `EFA_ERR_ARG` when `*op` is no live user operator.
#[no_mangle]
pub unsafe extern "C" fn efa_op_free(op: *mut c_int) -> c_int {
    guarded("efa_op_free", || {
        need(op, "op")?;
        // SAFETY: not NULL; points to an int (the header's contract).
        let id = unsafe { op.read() };
        let gone = user_ops()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if gone.is_none() {
            return Err(CErr::arg(format!("op {id} is not a live user operator")));
        }
        put(op, "op", -1)
    })
}

fn n_of(c: &Communicator) -> usize {
    c.size() as usize
}

fn mul(a: usize, b: usize, what: &str) -> CResult<usize> {
    a.checked_mul(b)
        .ok_or_else(|| CErr::arg(format!("{what}: {a} x {b} elements overflow")))
}

/// Fails when an out-of-place send and receive buffer overlap (that needs `EFA_IN_PLACE`).
fn disjoint<T>(send: &[T], recv: &[T]) -> CResult<()> {
    let (s, r) = (send.as_ptr_range(), recv.as_ptr_range());
    if !send.is_empty() && !recv.is_empty() && s.start < r.end && r.start < s.end {
        return Err(CErr::arg(
            "sendbuf and recvbuf overlap: pass EFA_IN_PLACE as sendbuf for the in-place form",
        ));
    }
    Ok(())
}

/// `n` entries of a `size_t` array (counts or displacements, in elements).
///
/// # Safety
/// A non-NULL `p` holds `n` entries.
unsafe fn counts(p: *const usize, n: usize, what: &str) -> CResult<Vec<usize>> {
    // SAFETY: the caller's contract.
    Ok(unsafe { slice::<usize>(p as *const c_void, n, what) }?.to_vec())
}

/// The elements a (counts, displs) layout spans: `max(displs[r] + counts[r])`.
fn extent(counts: &[usize], displs: &[usize]) -> CResult<usize> {
    if counts.len() != displs.len() {
        return Err(CErr::arg("counts and displs have different lengths"));
    }
    counts
        .iter()
        .zip(displs)
        .try_fold(0usize, |m, (c, d)| Some(m.max(c.checked_add(*d)?)))
        .ok_or_else(|| CErr::arg("a displacement plus its count overflows"))
}

// ---- Blocking ------------------------------------------------------------------------------

/// Runs a collective's body with its communicator and datatype checked.
fn coll(
    name: &str,
    comm: *const efa_comm,
    datatype: c_int,
    f: impl FnOnce(&Communicator, efa_datatype) -> CResult<()>,
) -> c_int {
    guarded(name, || {
        let c = comm_ref(comm)?;
        let d = efa_datatype::from_int(datatype)?;
        f(c, d)
    })
}

/// The in-place or out-of-place form over `count` elements of receive (and send) buffer.
/// The buffers hold `T::C` (checked for that type's alignment and size); `in_place` and
/// `out_of_place` see them as `T` ([`with_staged`], [`staged`]).
///
/// # Safety
/// The buffers hold `count` elements each, valid for the call.
unsafe fn in_or_out<T: Staged>(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    send_count: usize,
    recv_count: usize,
    in_place: impl FnOnce(&mut [T]) -> efa_core::Result<()>,
    out_of_place: impl FnOnce(&[T], &mut [T]) -> efa_core::Result<()>,
) -> CResult<()> {
    if is_in_place(sendbuf) {
        // SAFETY: forwarded buffer contract.
        let recv = unsafe { slice_mut::<T::C>(recvbuf, recv_count, "recvbuf") }?;
        with_staged(recv, in_place)?;
    } else {
        // SAFETY: as above.
        let recv = unsafe { slice_mut::<T::C>(recvbuf, recv_count, "recvbuf") }?;
        // SAFETY: as above.
        let send = unsafe { slice::<T::C>(sendbuf, send_count, "sendbuf") }?;
        disjoint(send, recv)?;
        let send = staged::<T>(send);
        with_staged(recv, |r| out_of_place(&send, r))?;
    }
    Ok(())
}

/// A reduction of `count` elements in and out (allreduce, scan, exscan): `in_place(c, recv,
/// op)` or `out_of_place(c, send, recv, op)`, as [`in_or_out`] picks.
///
/// # Safety
/// As [`in_or_out`].
unsafe fn reduce_n<T: Staged, O: Clone>(
    c: &Communicator,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    op: O,
    in_place: fn(&Communicator, &mut [T], O) -> efa_core::Result<()>,
    out_of_place: fn(&Communicator, &[T], &mut [T], O) -> efa_core::Result<()>,
) -> CResult<()> {
    let o = op.clone();
    // SAFETY: forwarded contract.
    unsafe {
        in_or_out::<T>(
            sendbuf,
            recvbuf,
            count,
            count,
            |b| in_place(c, b, o),
            |s, r| out_of_place(c, s, r, op),
        )
    }
}

/// The root argument, and whether this rank is it.
fn root_of(c: &Communicator, root: c_int) -> CResult<(u32, bool)> {
    let r = rank_arg(root, "root")?;
    Ok((r, c.rank() == r))
}

/// Reduces `count` elements across all ranks; every rank gets the result in `recvbuf`
/// (`MPI_Allreduce`). `sendbuf` is `EFA_IN_PLACE` (the input is `recvbuf`) or `count`
/// elements not overlapping `recvbuf`. Collective: every rank passes the same count,
/// datatype and op.
///
/// Errors (for every collective, with the additions each lists): `EFA_ERR_NULL` (`comm`; a
/// buffer or array with elements); `EFA_ERR_ARG` (datatype, op, an op that does not fit the
/// datatype: `EFA_MINLOC`/`EFA_MAXLOC` with a plain datatype or a built-in arithmetic op with
/// a pair datatype; alignment, overlapping buffers, counts whose size overflows); `EFA_ERR_MISMATCH` on every rank when ranks pass different counts, datatypes,
/// ops or roots; `EFA_ERR_COLL_ARG` when a rank's buffers or counts do not fit the call (on
/// every rank, naming it); `EFA_ERR_RANK` (root); `EFA_ERR_TIMEOUT`, `EFA_ERR_PEER_FAILED`
/// naming the rank.
#[no_mangle]
pub unsafe extern "C" fn efa_allreduce(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
) -> c_int {
    reduction!("efa_allreduce", comm, datatype, op, |c, T, op| {
        let (in_place, out_of_place) = (Communicator::allreduce, Communicator::allreduce_into);
        // SAFETY: the header's buffer contract.
        unsafe { reduce_n::<T, _>(c, sendbuf, recvbuf, count, op, in_place, out_of_place) }
    })
}

/// Reduces `count` elements of every rank into `recvbuf` at `root` (`MPI_Reduce`). `recvbuf`
/// is significant at the root only (NULL elsewhere is fine). `sendbuf` is `EFA_IN_PLACE` at
/// the root (input in `recvbuf`); elsewhere `EFA_IN_PLACE` means the input is in `recvbuf`,
/// which is then used as scratch.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_reduce(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    root: c_int,
) -> c_int {
    reduction!("efa_reduce", comm, datatype, op, |c, T, op| {
        let (root, is_root) = root_of(c, root)?;
        let rc = if is_root || is_in_place(sendbuf) {
            count
        } else {
            0
        };
        // SAFETY: the header's buffer contract.
        unsafe {
            in_or_out::<T>(
                sendbuf,
                recvbuf,
                count,
                rc,
                |b| c.reduce(b, op.clone(), root),
                |s, r| c.reduce_into(s, r, op.clone(), root),
            )
        }
    })
}

/// Reduce-scatter with equal blocks (`MPI_Reduce_scatter_block`): `sendbuf` holds `n`
/// blocks of `recvcount` elements (`n` = size); `recvbuf` (`recvcount`) gets block `rank`
/// of the reduction. With `sendbuf` = `EFA_IN_PLACE`, `recvbuf` holds the `n * recvcount`
/// input, and block `rank` of it gets the result (the other blocks hold partials).
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_reduce_scatter_block(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: c_int,
    op: c_int,
) -> c_int {
    reduction!(
        "efa_reduce_scatter_block",
        comm,
        datatype,
        op,
        |c, T, op| {
            let total = mul(recvcount, n_of(c), "reduce_scatter")?;
            let rc = if is_in_place(sendbuf) {
                total
            } else {
                recvcount
            };
            // SAFETY: the header's buffer contract.
            unsafe {
                in_or_out::<T>(
                    sendbuf,
                    recvbuf,
                    total,
                    rc,
                    |b| c.reduce_scatter(b, op.clone()),
                    |s, r| c.reduce_scatter_into(s, r, op.clone()),
                )
            }
        }
    )
}

/// Inclusive prefix reduction (`MPI_Scan`): `recvbuf` (`count`) of rank `r` gets the
/// reduction of ranks `0..=r`. `sendbuf` as in [`efa_allreduce`].
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_scan(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
) -> c_int {
    reduction!("efa_scan", comm, datatype, op, |c, T, op| {
        let (in_place, out_of_place) = (Communicator::scan, Communicator::scan_into);
        // SAFETY: the header's buffer contract.
        unsafe { reduce_n::<T, _>(c, sendbuf, recvbuf, count, op, in_place, out_of_place) }
    })
}

/// Exclusive prefix reduction (`MPI_Exscan`): `recvbuf` (`count`) of rank `r > 0` gets the
/// reduction of ranks `0..r`; rank 0's `recvbuf` is not written (in place: it keeps its
/// input). `sendbuf` as in [`efa_allreduce`].
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_exscan(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
) -> c_int {
    reduction!("efa_exscan", comm, datatype, op, |c, T, op| {
        let (in_place, out_of_place) = (Communicator::exscan, Communicator::exscan_into);
        // SAFETY: the header's buffer contract.
        unsafe { reduce_n::<T, _>(c, sendbuf, recvbuf, count, op, in_place, out_of_place) }
    })
}

/// Copies `count` elements of `buf` at `root` into `buf` of every rank (`MPI_Bcast`).
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_bcast(
    comm: *const efa_comm,
    buf: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
) -> c_int {
    coll("efa_bcast", comm, datatype, |c, d| {
        let (root, _) = root_of(c, root)?;
        // SAFETY: the header's buffer contract.
        with_type!(d, T => { let b = unsafe { slice_mut::<T>(buf, count, "buf") }?; c.broadcast(b, root)?; Ok(()) })
    })
}

/// Returns when every rank has called it (`MPI_Barrier`).
///
/// Errors: `EFA_ERR_NULL` (`comm`); `EFA_ERR_MISMATCH`; `EFA_ERR_TIMEOUT`,
/// `EFA_ERR_PEER_FAILED`.
#[no_mangle]
pub unsafe extern "C" fn efa_barrier(comm: *const efa_comm) -> c_int {
    guarded("efa_barrier", || Ok(comm_ref(comm)?.barrier()?))
}

/// Gathers `count` elements of every rank into `recvbuf` (`n * count`, block `r` from rank
/// `r`) on every rank (`MPI_Allgather`). With `sendbuf` = `EFA_IN_PLACE`, this rank's block
/// is already at block `rank` of `recvbuf`.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_allgather(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
) -> c_int {
    coll("efa_allgather", comm, datatype, |c, d| {
        let total = mul(count, n_of(c), "allgather")?;
        // SAFETY: the header's buffer contract.
        with_type!(d, T => unsafe { in_or_out::<T>(sendbuf, recvbuf, count, total, |b| c.allgather(b), |s, r| c.allgather_into(s, r)) })
    })
}

/// Gathers `recvcounts[r]` elements of every rank `r` into `recvbuf` in rank order
/// (`MPI_Allgatherv` with contiguous blocks; `recvbuf` holds the sum of `recvcounts`, `n`
/// entries, the same on every rank). `sendcount` must be `recvcounts[rank]`. With
/// `sendbuf` = `EFA_IN_PLACE`, this rank's block is already in place.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_allgatherv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    datatype: c_int,
) -> c_int {
    coll("efa_allgatherv", comm, datatype, |c, d| {
        // SAFETY: `recvcounts` holds `n` entries (the header's contract).
        let counts = unsafe { counts(recvcounts, n_of(c), "recvcounts") }?;
        let total = counts
            .iter()
            .try_fold(0usize, |a, b| a.checked_add(*b))
            .ok_or_else(|| CErr::arg("recvcounts overflow"))?;
        // SAFETY: the header's buffer contract.
        with_type!(d, T => unsafe { in_or_out::<T>(sendbuf, recvbuf, sendcount, total, |b| c.allgatherv(b, &counts), |s, r| c.allgatherv_into(s, r, &counts)) })
    })
}

/// Gathers `count` elements of every rank into `recvbuf` (`n * count`) at `root`
/// (`MPI_Gather`); `recvbuf` is significant at the root only. With `sendbuf` =
/// `EFA_IN_PLACE` at the root, its own block is already in place.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_gather(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
) -> c_int {
    coll("efa_gather", comm, datatype, |c, d| {
        let (root, is_root) = root_of(c, root)?;
        let rc = if is_root {
            mul(count, n_of(c), "gather")?
        } else if is_in_place(sendbuf) {
            count
        } else {
            0
        };
        // SAFETY: the header's buffer contract.
        with_type!(d, T => unsafe { in_or_out::<T>(sendbuf, recvbuf, count, rc, |b| c.gather(b, root), |s, r| c.gather_into(s, r, root)) })
    })
}

/// Gathers `sendcount` elements of every rank `r` into `recvbuf` at `root`, at element
/// `displs[r]` (`MPI_Gatherv`); `recvcounts[r]` must equal rank `r`'s `sendcount`.
/// `recvbuf`, `recvcounts` and `displs` (`n` entries) are significant at the root only
/// (NULL elsewhere is fine). With `sendbuf` = `EFA_IN_PLACE` at the root, its own block is
/// already in place.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_gatherv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    displs: *const usize,
    datatype: c_int,
    root: c_int,
) -> c_int {
    coll("efa_gatherv", comm, datatype, |c, d| {
        let (root, is_root) = root_of(c, root)?;
        let k = if is_root { n_of(c) } else { 0 };
        // SAFETY: at the root, the arrays hold `n` entries (the header's contract).
        let (cnt, dsp) = unsafe {
            (
                counts(recvcounts, k, "recvcounts")?,
                counts(displs, k, "displs")?,
            )
        };
        let rc = if is_root {
            extent(&cnt, &dsp)?
        } else if is_in_place(sendbuf) {
            sendcount
        } else {
            0
        };
        // SAFETY: the header's buffer contract.
        with_type!(d, T => unsafe { in_or_out::<T>(sendbuf, recvbuf, sendcount, rc, |b| c.gatherv(b, &cnt, &dsp, root), |s, r| c.gatherv_into(s, r, &cnt, &dsp, root)) })
    })
}

/// Sends block `r` (`count` elements) of `sendbuf` (`n * count`, significant at the root
/// only) at `root` to `recvbuf` (`count`) of rank `r` (`MPI_Scatter`). With `recvbuf` =
/// `EFA_IN_PLACE` at the root, the root's block stays in `sendbuf`.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_scatter(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
) -> c_int {
    coll("efa_scatter", comm, datatype, |c, d| {
        let (root, is_root) = root_of(c, root)?;
        let sc = if is_root {
            mul(count, n_of(c), "scatter")?
        } else {
            0
        };
        with_type!(d, T => {
            if is_in_place(recvbuf) {
                // SAFETY: the header's buffer contract (at the root, `sendbuf` holds n * count).
                let b = unsafe { slice_mut::<T>(sendbuf as *mut c_void, sc.max(count), "sendbuf") }?;
                c.scatter(b, root)?;
            } else {
                // SAFETY: as above.
                let r = unsafe { slice_mut::<T>(recvbuf, count, "recvbuf") }?;
                // SAFETY: as above.
                let s = unsafe { slice::<T>(sendbuf, sc, "sendbuf") }?;
                disjoint(s, r)?;
                c.scatter_into(s, r, root)?;
            }
            Ok(())
        })
    })
}

/// Sends elements `displs[r] .. displs[r] + sendcounts[r]` of `sendbuf` at `root` to
/// `recvbuf` (`recvcount` = `sendcounts[r]`) of rank `r` (`MPI_Scatterv`); `sendbuf`,
/// `sendcounts` and `displs` are significant at the root only. With `recvbuf` =
/// `EFA_IN_PLACE` at the root, the root's block stays in `sendbuf`.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_scatterv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcounts: *const usize,
    displs: *const usize,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: c_int,
    root: c_int,
) -> c_int {
    coll("efa_scatterv", comm, datatype, |c, d| {
        let (root, is_root) = root_of(c, root)?;
        let k = if is_root { n_of(c) } else { 0 };
        // SAFETY: at the root, the arrays hold `n` entries (the header's contract).
        let (cnt, dsp) = unsafe {
            (
                counts(sendcounts, k, "sendcounts")?,
                counts(displs, k, "displs")?,
            )
        };
        let sc = if is_root { extent(&cnt, &dsp)? } else { 0 };
        with_type!(d, T => {
            if is_in_place(recvbuf) {
                // SAFETY: the header's buffer contract.
                let b = unsafe { slice_mut::<T>(sendbuf as *mut c_void, sc.max(recvcount), "sendbuf") }?;
                c.scatterv(b, &cnt, &dsp, root)?;
            } else {
                // SAFETY: as above.
                let r = unsafe { slice_mut::<T>(recvbuf, recvcount, "recvbuf") }?;
                // SAFETY: as above.
                let s = unsafe { slice::<T>(sendbuf, sc, "sendbuf") }?;
                disjoint(s, r)?;
                c.scatterv_into(s, r, &cnt, &dsp, root)?;
            }
            Ok(())
        })
    })
}

/// All-to-all (`MPI_Alltoall`): block `d` (`count` elements) of `sendbuf` (`n * count`) goes
/// to rank `d`, and lands in block `s` of its `recvbuf` (`n * count`), `s` being this rank.
/// With `sendbuf` = `EFA_IN_PLACE`, `recvbuf` holds the input.
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_alltoall(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
) -> c_int {
    coll("efa_alltoall", comm, datatype, |c, d| {
        let total = mul(count, n_of(c), "alltoall")?;
        // SAFETY: the header's buffer contract.
        with_type!(d, T => unsafe { in_or_out::<T>(sendbuf, recvbuf, total, total, |b| c.alltoall(b), |s, r| c.alltoall_into(s, r)) })
    })
}

/// All-to-all of variable sizes (`MPI_Alltoallv`): `sendcounts[d]` elements at
/// `sdispls[d]` of `sendbuf` go to rank `d` and land at `rdispls[s]` of its `recvbuf`
/// (`recvcounts[s]` elements, equal to the sender's count). Arrays have `n` entries, in
/// elements. With `sendbuf` = `EFA_IN_PLACE`, `recvbuf` holds the input laid out by
/// `recvcounts`/`rdispls` (and `sendcounts`/`sdispls` are ignored).
///
/// Errors: as [`efa_allreduce`].
#[no_mangle]
pub unsafe extern "C" fn efa_alltoallv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    datatype: c_int,
) -> c_int {
    coll("efa_alltoallv", comm, datatype, |c, d| {
        let n = n_of(c);
        let ip = is_in_place(sendbuf);
        let ns = if ip { 0 } else { n };
        // SAFETY: the arrays hold `n` entries (the header's contract).
        let (sc, sd, rc, rd) = unsafe {
            (
                counts(sendcounts, ns, "sendcounts")?,
                counts(sdispls, ns, "sdispls")?,
                counts(recvcounts, n, "recvcounts")?,
                counts(rdispls, n, "rdispls")?,
            )
        };
        let (se, re) = (extent(&sc, &sd)?, extent(&rc, &rd)?);
        // SAFETY: the header's buffer contract.
        with_type!(d, T => unsafe { in_or_out::<T>(sendbuf, recvbuf, se, re, |b| c.alltoallv(b, &rc, &rd), |s, r| c.alltoallv_into(s, &sc, &sd, r, &rc, &rd)) })
    })
}

// ---- Non-blocking ----------------------------------------------------------------------------

/// A non-blocking collective whose result (`len` elements from `from`) is written to the
/// caller's `out` ([`unstage`]) when it completes.
struct CopyBack<T: Staged> {
    req: CollRequest<Vec<T>>,
    out: *mut T::C,
    from: usize,
    len: usize,
}

impl<T: Staged> AnyRequest for CopyBack<T> {
    fn test(&mut self) -> efa_core::Result<bool> {
        self.req.test()
    }
    fn cancel(&mut self) -> efa_core::Result<bool> {
        Ok(false)
    }
}

impl<T: Staged> CollPending for CopyBack<T> {
    fn finish(self: Box<Self>) -> efa_core::Result<()> {
        let v = self.req.wait()?;
        if self.len > 0 {
            let src = v
                .get(self.from..self.from + self.len)
                .ok_or(efa_core::Error::Internal {
                    what: "a non-blocking collective returned a shorter buffer than it was given",
                })?;
            // SAFETY: `out` was checked (non-NULL, aligned, `len` elements) when the request
            // started, and stays valid and unused by the caller until it completes (the
            // header's contract); `src` is our own vector, so they do not overlap.
            let out = unsafe { std::slice::from_raw_parts_mut(self.out, self.len) };
            unstage(src, out);
        }
        Ok(())
    }
}

struct Barrier(CollRequest<()>);

impl AnyRequest for Barrier {
    fn test(&mut self) -> efa_core::Result<bool> {
        self.0.test()
    }
    fn cancel(&mut self) -> efa_core::Result<bool> {
        Ok(false)
    }
}

impl CollPending for Barrier {
    fn finish(self: Box<Self>) -> efa_core::Result<()> {
        self.0.wait()
    }
}

/// A request for `req` whose result `[from..][..out.len()]` goes to `out`.
fn start<T: Staged>(
    c: &Communicator,
    request: *mut *mut efa_request,
    req: CollRequest<Vec<T>>,
    out: &mut [T::C],
    from: usize,
) -> CResult<()> {
    let kind = Kind::Coll(Box::new(CopyBack {
        req,
        out: out.as_mut_ptr(),
        from,
        len: out.len(),
    }));
    new_request(request, c, kind)
}

/// The input vector (a copy of `sendbuf`, or of `recvbuf` in place, as `T`: [`staged`])
/// and the output slice (for [`start`]).
///
/// # Safety
/// The buffers hold their counts and `recvbuf` stays valid until the request completes.
unsafe fn vec_in<'a, T: Staged>(
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    send_count: usize,
    recv_count: usize,
) -> CResult<(Vec<T>, &'a mut [T::C])> {
    // SAFETY: forwarded contract.
    let out = unsafe { slice_mut::<T::C>(recvbuf, recv_count, "recvbuf") }?;
    let v = if is_in_place(sendbuf) {
        staged::<T>(out).into_owned()
    } else {
        // SAFETY: forwarded contract.
        staged::<T>(unsafe { slice::<T::C>(sendbuf, send_count, "sendbuf") }?).into_owned()
    };
    Ok((v, out))
}

/// A vector of `len` zeros with `block` copied in at `at` (as much as fits).
fn placed<T: Pod>(len: usize, at: usize, block: &[T]) -> Vec<T> {
    let mut v = vec![T::zeroed(); len];
    let end = (at + block.len()).min(len);
    if at < end {
        v[at..end].copy_from_slice(&block[..end - at]);
    }
    v
}

/// Starts [`efa_allreduce`] (`MPI_Iallreduce`); `*request` completes it, copying the result
/// into `recvbuf`, which must stay valid until then. Errors: as [`efa_allreduce`] for the
/// arguments, plus `EFA_ERR_NULL` (`request`); the collective's own errors come from the
/// wait. The same holds for every `efa_i*` collective.
#[no_mangle]
pub unsafe extern "C" fn efa_iallreduce(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    reduction!("efa_iallreduce", comm, datatype, op, |c, T, op| {
        need(request, "request")?;
        // SAFETY: the header's buffer contract.
        let (v, out) = unsafe { vec_in::<T>(sendbuf, recvbuf, count, count) }?;
        start(c, request, c.iallreduce(v, op), out, 0)
    })
}

/// Starts [`efa_reduce`] (`MPI_Ireduce`).
#[no_mangle]
pub unsafe extern "C" fn efa_ireduce(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    root: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    reduction!("efa_ireduce", comm, datatype, op, |c, T, op| {
        need(request, "request")?;
        let (root, is_root) = root_of(c, root)?;
        let rc = if is_root || is_in_place(sendbuf) {
            count
        } else {
            0
        };
        // SAFETY: the header's buffer contract.
        let (v, out) = unsafe { vec_in::<T>(sendbuf, recvbuf, count, rc) }?;
        start(c, request, c.ireduce(v, op, root), out, 0)
    })
}

/// Starts [`efa_reduce_scatter_block`] (`MPI_Ireduce_scatter_block`).
#[no_mangle]
pub unsafe extern "C" fn efa_ireduce_scatter_block(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: c_int,
    op: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    reduction!(
        "efa_ireduce_scatter_block",
        comm,
        datatype,
        op,
        |c, T, op| {
            need(request, "request")?;
            let total = mul(recvcount, n_of(c), "reduce_scatter")?;
            let ip = is_in_place(sendbuf);
            // SAFETY: the header's buffer contract.
            let (v, out) = unsafe {
                vec_in::<T>(sendbuf, recvbuf, total, if ip { total } else { recvcount })
            }?;
            let from = if ip { 0 } else { c.rank() as usize * recvcount };
            start(c, request, c.ireduce_scatter(v, op), out, from)
        }
    )
}

/// Starts [`efa_scan`] (`MPI_Iscan`).
#[no_mangle]
pub unsafe extern "C" fn efa_iscan(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    reduction!("efa_iscan", comm, datatype, op, |c, T, op| {
        need(request, "request")?;
        // SAFETY: the header's buffer contract.
        let (v, out) = unsafe { vec_in::<T>(sendbuf, recvbuf, count, count) }?;
        start(c, request, c.iscan(v, op), out, 0)
    })
}

/// Starts [`efa_exscan`] (`MPI_Iexscan`); rank 0's `recvbuf` is not written.
#[no_mangle]
pub unsafe extern "C" fn efa_iexscan(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    op: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    reduction!("efa_iexscan", comm, datatype, op, |c, T, op| {
        need(request, "request")?;
        // SAFETY: the header's buffer contract.
        let (v, out) = unsafe { vec_in::<T>(sendbuf, recvbuf, count, count) }?;
        let out = if c.rank() == 0 { &mut out[..0] } else { out };
        start(c, request, c.iexscan(v, op), out, 0)
    })
}

/// Starts [`efa_bcast`] (`MPI_Ibcast`); `buf` must stay valid until completion.
#[no_mangle]
pub unsafe extern "C" fn efa_ibcast(
    comm: *const efa_comm,
    buf: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_ibcast", comm, datatype, |c, d| {
        need(request, "request")?;
        let (root, _) = root_of(c, root)?;
        with_type!(d, T => {
            // SAFETY: the header's buffer contract.
            let out = unsafe { slice_mut::<T>(buf, count, "buf") }?;
            start(c, request, c.ibroadcast(out.to_vec(), root), out, 0)
        })
    })
}

/// Starts [`efa_barrier`] (`MPI_Ibarrier`).
#[no_mangle]
pub unsafe extern "C" fn efa_ibarrier(
    comm: *const efa_comm,
    request: *mut *mut efa_request,
) -> c_int {
    guarded("efa_ibarrier", || {
        let c = comm_ref(comm)?;
        need(request, "request")?;
        new_request(request, c, Kind::Coll(Box::new(Barrier(c.ibarrier()))))
    })
}

/// Starts [`efa_allgather`] (`MPI_Iallgather`).
#[no_mangle]
pub unsafe extern "C" fn efa_iallgather(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_iallgather", comm, datatype, |c, d| {
        need(request, "request")?;
        let total = mul(count, n_of(c), "allgather")?;
        with_type!(d, T => {
            // SAFETY: the header's buffer contract.
            let out = unsafe { slice_mut::<T>(recvbuf, total, "recvbuf") }?;
            let v = if is_in_place(sendbuf) { out.to_vec() } else {
                // SAFETY: as above.
                placed(total, c.rank() as usize * count, unsafe { slice::<T>(sendbuf, count, "sendbuf") }?)
            };
            start(c, request, c.iallgather(v), out, 0)
        })
    })
}

/// Starts [`efa_allgatherv`] (`MPI_Iallgatherv`).
#[no_mangle]
pub unsafe extern "C" fn efa_iallgatherv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    datatype: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_iallgatherv", comm, datatype, |c, d| {
        need(request, "request")?;
        // SAFETY: `recvcounts` holds `n` entries.
        let cnt = unsafe { counts(recvcounts, n_of(c), "recvcounts") }?;
        let me = c.rank() as usize;
        let total = cnt
            .iter()
            .try_fold(0usize, |a, b| a.checked_add(*b))
            .ok_or_else(|| CErr::arg("recvcounts overflow"))?;
        let at: usize = cnt[..me].iter().sum();
        with_type!(d, T => {
            // SAFETY: the header's buffer contract.
            let out = unsafe { slice_mut::<T>(recvbuf, total, "recvbuf") }?;
            let v = if is_in_place(sendbuf) { out.to_vec() } else {
                // SAFETY: as above.
                let s = unsafe { slice::<T>(sendbuf, sendcount, "sendbuf") }?;
                // A wrong sendcount gives a buffer of the wrong length, which the collective
                // reports on every rank.
                placed((total + sendcount).saturating_sub(cnt[me]), at, s)
            };
            start(c, request, c.iallgatherv(v, cnt), out, 0)
        })
    })
}

/// Starts [`efa_gather`] (`MPI_Igather`).
#[no_mangle]
pub unsafe extern "C" fn efa_igather(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_igather", comm, datatype, |c, d| {
        need(request, "request")?;
        let (root, is_root) = root_of(c, root)?;
        let total = mul(count, n_of(c), "gather")?;
        let ip = is_in_place(sendbuf);
        with_type!(d, T => {
            let rc = if is_root { total } else if ip { count } else { 0 };
            // SAFETY: the header's buffer contract.
            let out = unsafe { slice_mut::<T>(recvbuf, rc, "recvbuf") }?;
            let v = if ip { out.to_vec() } else {
                // SAFETY: as above.
                let s = unsafe { slice::<T>(sendbuf, count, "sendbuf") }?;
                if is_root { placed(total, c.rank() as usize * count, s) } else { s.to_vec() }
            };
            start(c, request, c.igather(v, root), out, 0)
        })
    })
}

/// Starts [`efa_gatherv`] (`MPI_Igatherv`).
#[no_mangle]
pub unsafe extern "C" fn efa_igatherv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    displs: *const usize,
    datatype: c_int,
    root: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_igatherv", comm, datatype, |c, d| {
        need(request, "request")?;
        let (root, is_root) = root_of(c, root)?;
        let k = if is_root { n_of(c) } else { 0 };
        // SAFETY: at the root, the arrays hold `n` entries.
        let (cnt, dsp) = unsafe {
            (
                counts(recvcounts, k, "recvcounts")?,
                counts(displs, k, "displs")?,
            )
        };
        let ip = is_in_place(sendbuf);
        let rc = if is_root {
            extent(&cnt, &dsp)?
        } else if ip {
            sendcount
        } else {
            0
        };
        with_type!(d, T => {
            // SAFETY: the header's buffer contract.
            let out = unsafe { slice_mut::<T>(recvbuf, rc, "recvbuf") }?;
            let v = if ip { out.to_vec() } else {
                // SAFETY: as above.
                let s = unsafe { slice::<T>(sendbuf, sendcount, "sendbuf") }?;
                if is_root { placed(rc, dsp[c.rank() as usize], s) } else { s.to_vec() }
            };
            start(c, request, c.igatherv(v, cnt, dsp, root), out, 0)
        })
    })
}

/// Starts [`efa_scatter`] (`MPI_Iscatter`).
#[no_mangle]
pub unsafe extern "C" fn efa_iscatter(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    root: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_iscatter", comm, datatype, |c, d| {
        need(request, "request")?;
        let (root, is_root) = root_of(c, root)?;
        let ip = is_in_place(recvbuf);
        with_type!(d, T => {
            let out: &mut [T] = if ip && is_root { &mut [] } else {
                // SAFETY: the header's buffer contract.
                unsafe { slice_mut::<T>(recvbuf, count, "recvbuf") }?
            };
            let (v, from) = if is_root {
                // SAFETY: as above.
                (unsafe { slice::<T>(sendbuf, mul(count, n_of(c), "scatter")?, "sendbuf") }?.to_vec(), c.rank() as usize * count)
            } else {
                (vec![T::zeroed(); count], 0)
            };
            start(c, request, c.iscatter(v, root), out, from)
        })
    })
}

/// Starts [`efa_scatterv`] (`MPI_Iscatterv`).
#[no_mangle]
pub unsafe extern "C" fn efa_iscatterv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcounts: *const usize,
    displs: *const usize,
    recvbuf: *mut c_void,
    recvcount: usize,
    datatype: c_int,
    root: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_iscatterv", comm, datatype, |c, d| {
        need(request, "request")?;
        let (root, is_root) = root_of(c, root)?;
        let k = if is_root { n_of(c) } else { 0 };
        // SAFETY: at the root, the arrays hold `n` entries.
        let (cnt, dsp) = unsafe {
            (
                counts(sendcounts, k, "sendcounts")?,
                counts(displs, k, "displs")?,
            )
        };
        let ip = is_in_place(recvbuf);
        with_type!(d, T => {
            let out: &mut [T] = if ip && is_root { &mut [] } else {
                // SAFETY: the header's buffer contract.
                unsafe { slice_mut::<T>(recvbuf, recvcount, "recvbuf") }?
            };
            let (v, from) = if is_root {
                // SAFETY: as above.
                (unsafe { slice::<T>(sendbuf, extent(&cnt, &dsp)?, "sendbuf") }?.to_vec(), dsp[c.rank() as usize])
            } else {
                (vec![T::zeroed(); recvcount], 0)
            };
            start(c, request, c.iscatterv(v, cnt, dsp, root), out, from)
        })
    })
}

/// Starts [`efa_alltoall`] (`MPI_Ialltoall`).
#[no_mangle]
pub unsafe extern "C" fn efa_ialltoall(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    datatype: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_ialltoall", comm, datatype, |c, d| {
        need(request, "request")?;
        let total = mul(count, n_of(c), "alltoall")?;
        with_type!(d, T => {
            // SAFETY: the header's buffer contract.
            let (v, out) = unsafe { vec_in::<T>(sendbuf, recvbuf, total, total) }?;
            start(c, request, c.ialltoall(v), out, 0)
        })
    })
}

/// Starts [`efa_alltoallv`] (`MPI_Ialltoallv`). The Rust API offers the non-blocking form with
/// one layout only: `sendbuf` is `EFA_IN_PLACE`, or `sendcounts`/`sdispls` equal
/// `recvcounts`/`rdispls` (else `EFA_ERR_ARG`).
#[no_mangle]
pub unsafe extern "C" fn efa_ialltoallv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcounts: *const usize,
    sdispls: *const usize,
    recvbuf: *mut c_void,
    recvcounts: *const usize,
    rdispls: *const usize,
    datatype: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    coll("efa_ialltoallv", comm, datatype, |c, d| {
        need(request, "request")?;
        let n = n_of(c);
        let ip = is_in_place(sendbuf);
        let ns = if ip { 0 } else { n };
        // SAFETY: the arrays hold `n` entries.
        let (sc, sd, rc, rd) = unsafe {
            (
                counts(sendcounts, ns, "sendcounts")?,
                counts(sdispls, ns, "sdispls")?,
                counts(recvcounts, n, "recvcounts")?,
                counts(rdispls, n, "rdispls")?,
            )
        };
        if !ip && (sc != rc || sd != rd) {
            return Err(CErr::arg("efa_ialltoallv: the send layout must equal the receive layout (or pass EFA_IN_PLACE); use efa_alltoallv for different layouts"));
        }
        let e = extent(&rc, &rd)?;
        with_type!(d, T => {
            // SAFETY: the header's buffer contract.
            let (v, out) = unsafe { vec_in::<T>(sendbuf, recvbuf, e, e) }?;
            start(c, request, c.ialltoallv(v, rc, rd), out, 0)
        })
    })
}
