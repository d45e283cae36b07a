//! Datatypes, statuses, point-to-point messaging and requests.

use std::ffi::{c_int, c_void};

use efa_core::{AnyRequest, Communicator, Pod, RecvRequest, SendRequest, Source, Status, Tag};

use crate::efa_errcode::*;
use crate::{
    check_buf, comm_ref, efa_comm, guarded, need, put, rank_arg, slice, slice_mut, CErr, CResult,
    EFA_ANY_SOURCE, EFA_ANY_TAG, EFA_UNDEFINED,
};

/// Element types of buffers (`MPI_Datatype`). Counts are in elements of this type.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum efa_datatype {
    /// `int8_t`.
    EFA_INT8 = 0,
    /// `uint8_t` (also for raw bytes).
    EFA_UINT8 = 1,
    /// `int32_t`.
    EFA_INT32 = 2,
    /// `uint32_t`.
    EFA_UINT32 = 3,
    /// `int64_t`.
    EFA_INT64 = 4,
    /// `uint64_t`.
    EFA_UINT64 = 5,
    /// IEEE 754 binary16 (`_Float16`), stored as 16 bits; reduced in `float`.
    EFA_FLOAT16 = 6,
    /// bfloat16, stored as 16 bits; reduced in `float`.
    EFA_BFLOAT16 = 7,
    /// `float`.
    EFA_FLOAT = 8,
    /// `double`.
    EFA_DOUBLE = 9,
    /// A `float` and its `int` index: `efa_float_int` (`MPI_FLOAT_INT`), for `EFA_MINLOC`
    /// and `EFA_MAXLOC`. The pair types have MPI's layout (natural alignment, so a program's
    /// own `struct { float; int; }` is the same) and any `int` index.
    EFA_FLOAT_INT = 10,
    /// A `double` and its `int` index: `efa_double_int` (`MPI_DOUBLE_INT`), 16 bytes.
    EFA_DOUBLE_INT = 11,
    /// A `long` and its `int` index: `efa_long_int` (`MPI_LONG_INT`), 16 bytes.
    EFA_LONG_INT = 12,
    /// An `int` and its `int` index: `efa_2int` (`MPI_2INT`).
    EFA_2INT = 13,
}

impl efa_datatype {
    pub(crate) fn from_int(d: c_int) -> CResult<efa_datatype> {
        use efa_datatype::*;
        Ok(match d {
            0 => EFA_INT8,
            1 => EFA_UINT8,
            2 => EFA_INT32,
            3 => EFA_UINT32,
            4 => EFA_INT64,
            5 => EFA_UINT64,
            6 => EFA_FLOAT16,
            7 => EFA_BFLOAT16,
            8 => EFA_FLOAT,
            9 => EFA_DOUBLE,
            10 => EFA_FLOAT_INT,
            11 => EFA_DOUBLE_INT,
            12 => EFA_LONG_INT,
            13 => EFA_2INT,
            d => {
                return Err(CErr::arg(format!(
                    "datatype {d} is not an efa_datatype (EFA_INT8 .. EFA_2INT, 0..13)"
                )))
            }
        })
    }

    /// Bytes per element: the size of the Rust type [`with_type!`] maps it to.
    pub(crate) fn size(self) -> usize {
        with_type!(self, T => std::mem::size_of::<T>())
    }
}

/// The one map from an `efa_datatype` to its Rust types: runs `$elem` with `$T` the element
/// type of a plain datatype (an `efa_core::Element`), or `$pair` with `$P` the `Pod` twin of
/// a pair datatype's C type (`EFA_FLOAT_INT`, ...: its bytes as the caller lays them out)
/// and `$L` the `ValueIndex` that `EFA_MINLOC`/`EFA_MAXLOC` reduce it as
/// ([`crate::pair::Staged`] converts between them).
macro_rules! match_type {
    ($dt:expr, elem $T:ident => $elem:expr, pair $P:ident, $L:ident => $pair:expr) => {{
        use $crate::p2p::efa_datatype as D;
        match $dt {
            D::EFA_FLOAT_INT => {
                type $P = $crate::pair::FloatIntBits;
                type $L = efa_core::ValueIndex<f32>;
                $pair
            }
            D::EFA_DOUBLE_INT => {
                type $P = $crate::pair::DoubleIntBits;
                type $L = efa_core::ValueIndex<f64>;
                $pair
            }
            D::EFA_LONG_INT => {
                type $P = $crate::pair::LongIntBits;
                type $L = efa_core::ValueIndex<i64>;
                $pair
            }
            D::EFA_2INT => {
                type $P = $crate::pair::TwoIntBits;
                type $L = efa_core::ValueIndex<i32>;
                $pair
            }
            D::EFA_INT8 => {
                type $T = i8;
                $elem
            }
            D::EFA_UINT8 => {
                type $T = u8;
                $elem
            }
            D::EFA_INT32 => {
                type $T = i32;
                $elem
            }
            D::EFA_UINT32 => {
                type $T = u32;
                $elem
            }
            D::EFA_INT64 => {
                type $T = i64;
                $elem
            }
            D::EFA_UINT64 => {
                type $T = u64;
                $elem
            }
            D::EFA_FLOAT16 => {
                type $T = efa_core::f16;
                $elem
            }
            D::EFA_BFLOAT16 => {
                type $T = efa_core::bf16;
                $elem
            }
            D::EFA_FLOAT => {
                type $T = f32;
                $elem
            }
            D::EFA_DOUBLE => {
                type $T = f64;
                $elem
            }
        }
    }};
}

/// Runs `$body` with `$T` the Rust type of datatype `$dt` (an `efa_datatype`) as the caller
/// lays it out: a plain element type or a pair's `Pod` twin.
macro_rules! with_type {
    ($dt:expr, $T:ident => $body:expr) => {
        $crate::p2p::match_type!($dt, elem $T => $body, pair $T, _L => $body)
    };
}
pub(crate) use {match_type, with_type};

/// The size in bytes of one element of `datatype` (`MPI_Type_size`).
///
/// Errors: `EFA_ERR_ARG` (unknown datatype); `EFA_ERR_NULL` (`size`).
#[no_mangle]
pub unsafe extern "C" fn efa_type_size(datatype: c_int, size: *mut usize) -> c_int {
    guarded("efa_type_size", || {
        let d = efa_datatype::from_int(datatype)?;
        put(size, "size", d.size())
    })
}

/// What a completed receive got (`MPI_Status`). Functions that fill one accept NULL for
/// "ignore" (`MPI_STATUS_IGNORE`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct efa_status {
    /// The sender's rank (`EFA_ANY_SOURCE` for a send or a NULL request).
    pub source: c_int,
    /// The message's tag (`EFA_ANY_TAG` for a send or a NULL request).
    pub tag: c_int,
    /// The message's length in bytes (0 for a send).
    pub bytes: usize,
    /// The request's error code (`efa_errcode`), for [`efa_waitall`] and [`efa_testall`].
    pub error: c_int,
}

impl efa_status {
    pub(crate) const EMPTY: efa_status = efa_status {
        source: EFA_ANY_SOURCE,
        tag: EFA_ANY_TAG,
        bytes: 0,
        error: 0,
    };
    fn of(s: Status) -> efa_status {
        efa_status {
            source: s.source as c_int,
            tag: s.tag as c_int,
            bytes: s.len,
            error: 0,
        }
    }
}

pub(crate) fn put_status(out: *mut efa_status, s: efa_status) {
    if !out.is_null() {
        // SAFETY: not NULL; points to an efa_status (the header's contract).
        unsafe { out.write(s) };
    }
}

/// The number of whole elements of `datatype` a receive got (`MPI_Get_count`):
/// `status->bytes / size`, and `EFA_UNDEFINED` when that does not divide.
///
/// Errors: `EFA_ERR_NULL` (`status`, `count`); `EFA_ERR_ARG` (unknown datatype).
#[no_mangle]
pub unsafe extern "C" fn efa_get_count(
    status: *const efa_status,
    datatype: c_int,
    count: *mut c_int,
) -> c_int {
    guarded("efa_get_count", || {
        need(status, "status")?;
        let d = efa_datatype::from_int(datatype)?;
        // SAFETY: not NULL; points to an efa_status (the header's contract).
        let b = unsafe { (*status).bytes };
        let n = if b % d.size() == 0 {
            c_int::try_from(b / d.size()).unwrap_or(EFA_UNDEFINED)
        } else {
            EFA_UNDEFINED
        };
        put(count, "count", n)
    })
}

fn source_arg(s: c_int) -> CResult<Source> {
    if s == EFA_ANY_SOURCE {
        Ok(Source::Any)
    } else {
        Ok(Source::Rank(rank_arg(s, "source")?))
    }
}

fn tag_arg(t: c_int) -> CResult<Tag> {
    if t == EFA_ANY_TAG {
        Ok(Tag::Any)
    } else {
        Ok(Tag::Is(send_tag(t)?))
    }
}

fn send_tag(t: c_int) -> CResult<u32> {
    u32::try_from(t).map_err(|_| {
        CErr::new(
            EFA_ERR_TAG,
            format!("tag {t} is negative: user tags are 0..=EFA_TAG_UB"),
        )
    })
}

/// `count` elements of `datatype` at `buf` as bytes (messages carry bytes; the datatype
/// gives the size and the alignment check).
unsafe fn bytes<'a>(
    buf: *const c_void,
    count: usize,
    datatype: c_int,
    what: &str,
) -> CResult<&'a [u8]> {
    let d = efa_datatype::from_int(datatype)?;
    // SAFETY: the caller's buffer contract (see `slice`).
    with_type!(d, T => unsafe { slice::<T>(buf, count, what) }.map(bytemuck_bytes))
}

/// Checks a receive buffer of `count` elements of `d` (as [`slice_mut`]) without borrowing it.
fn check_buf_of(d: efa_datatype, buf: *mut c_void, count: usize, what: &str) -> CResult<()> {
    with_type!(d, T => check_buf::<T>(buf, count, what).map(|_| ()))
}

fn bytemuck_bytes<T: Pod>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

/// Sends `count` elements of `datatype` at `buf` to rank `dest` of `comm` with `tag`
/// (`MPI_Send`), and returns when `buf` may be reused (small messages are copied; large
/// ones are read by the receiver before this returns).
///
/// Errors: `EFA_ERR_NULL` (`comm`; `buf` with `count > 0`); `EFA_ERR_ARG` (datatype,
/// alignment); `EFA_ERR_RANK`; `EFA_ERR_TAG` (negative or above `EFA_TAG_UB`);
/// `EFA_ERR_TIMEOUT`; `EFA_ERR_PEER_FAILED`; `EFA_ERR_PEER_FINALIZED`; `EFA_ERR_FABRIC`.
#[no_mangle]
pub unsafe extern "C" fn efa_send(
    comm: *const efa_comm,
    buf: *const c_void,
    count: usize,
    datatype: c_int,
    dest: c_int,
    tag: c_int,
) -> c_int {
    guarded("efa_send", || {
        let c = comm_ref(comm)?;
        // SAFETY: `buf` holds `count` elements for the call (the header's contract).
        let data = unsafe { bytes(buf, count, datatype, "buf") }?;
        c.send(data, rank_arg(dest, "dest")?, send_tag(tag)?)?;
        Ok(())
    })
}

/// Receives into `buf` (room for `count` elements of `datatype`) a message from `source`
/// (a rank or `EFA_ANY_SOURCE`) with `tag` (or `EFA_ANY_TAG`) (`MPI_Recv`). `status` (may be
/// NULL) gets the sender, tag and length in bytes.
///
/// Errors: `EFA_ERR_NULL` (`comm`; `buf` with `count > 0`); `EFA_ERR_ARG`; `EFA_ERR_RANK`;
/// `EFA_ERR_TAG`; `EFA_ERR_TRUNCATED` when the message is longer than `buf` (nothing
/// more is written; the message is consumed) or is not a whole number of elements of
/// `datatype` (`status` is not filled); `EFA_ERR_TIMEOUT`; `EFA_ERR_PEER_FAILED`;
/// `EFA_ERR_PEER_FINALIZED`.
#[no_mangle]
pub unsafe extern "C" fn efa_recv(
    comm: *const efa_comm,
    buf: *mut c_void,
    count: usize,
    datatype: c_int,
    source: c_int,
    tag: c_int,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_recv", || {
        let c = comm_ref(comm)?;
        let d = efa_datatype::from_int(datatype)?;
        let (src, tag) = (source_arg(source)?, tag_arg(tag)?);
        // Typed, so that efa-core refuses a message that is not whole elements.
        let st = with_type!(d, T => {
            // SAFETY: `buf` holds room for `count` elements (the header's contract).
            let data = unsafe { slice_mut::<T>(buf, count, "buf") }?;
            c.recv(data, src, tag)?
        });
        put_status(status, efa_status::of(st));
        Ok(())
    })
}

/// Sends `sendcount` elements to `dest` and receives at most `recvcount` from `source`
/// (`MPI_Sendrecv`), without deadlock whatever the order of the ranks' calls.
///
/// Errors: as [`efa_send`] and [`efa_recv`].
#[no_mangle]
pub unsafe extern "C" fn efa_sendrecv(
    comm: *const efa_comm,
    sendbuf: *const c_void,
    sendcount: usize,
    sendtype: c_int,
    dest: c_int,
    sendtag: c_int,
    recvbuf: *mut c_void,
    recvcount: usize,
    recvtype: c_int,
    source: c_int,
    recvtag: c_int,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_sendrecv", || {
        let c = comm_ref(comm)?;
        // SAFETY: the buffers hold their counts (the header's contract).
        let s = unsafe { bytes(sendbuf, sendcount, sendtype, "sendbuf") }?;
        let rt = efa_datatype::from_int(recvtype)?;
        let src = match source_arg(source)? {
            Source::Rank(r) => r,
            Source::Any => {
                return Err(CErr::arg(
                    "efa_sendrecv: source must be a rank (EFA_ANY_SOURCE is not offered)",
                ))
            }
        };
        let (dest, sendtag, recvtag) = (
            rank_arg(dest, "dest")?,
            send_tag(sendtag)?,
            tag_arg(recvtag)?,
        );
        let st = with_type!(rt, T => {
            // SAFETY: `recvbuf` holds room for `recvcount` elements (the header's contract).
            let r = unsafe { slice_mut::<T>(recvbuf, recvcount, "recvbuf") }?;
            c.sendrecv(s, dest, sendtag, r, src, recvtag)?
        });
        put_status(status, efa_status::of(st));
        Ok(())
    })
}

/// Waits until a message from `source` with `tag` (wildcards allowed) can be received, and
/// describes it in `*status` without receiving it (`MPI_Probe`).
///
/// Errors: `EFA_ERR_NULL` (`comm`, `status`); `EFA_ERR_RANK`; `EFA_ERR_TAG`;
/// `EFA_ERR_TIMEOUT`; `EFA_ERR_PEER_FAILED`.
#[no_mangle]
pub unsafe extern "C" fn efa_probe(
    comm: *const efa_comm,
    source: c_int,
    tag: c_int,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_probe", || {
        let c = comm_ref(comm)?;
        need(status, "status")?;
        let st = c.probe(source_arg(source)?, tag_arg(tag)?)?;
        put(status, "status", efa_status::of(st))
    })
}

/// [`efa_probe`] without waiting (`MPI_Iprobe`): `*flag` is 1 and `*status` filled when such
/// a message is there, else `*flag` is 0. `status` may be NULL.
///
/// Errors: `EFA_ERR_NULL` (`comm`, `flag`); `EFA_ERR_RANK`; `EFA_ERR_TAG`; `EFA_ERR_FABRIC`.
#[no_mangle]
pub unsafe extern "C" fn efa_iprobe(
    comm: *const efa_comm,
    source: c_int,
    tag: c_int,
    flag: *mut c_int,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_iprobe", || {
        let c = comm_ref(comm)?;
        need(flag, "flag")?;
        match c.iprobe(source_arg(source)?, tag_arg(tag)?)? {
            Some(st) => {
                put_status(status, efa_status::of(st));
                put(flag, "flag", 1)
            }
            None => put(flag, "flag", 0),
        }
    })
}

// ---- Requests -----------------------------------------------------------------------------

/// A collective in flight whose result is copied into the caller's buffer on completion.
pub(crate) trait CollPending: AnyRequest {
    /// Waits, then copies the result out.
    fn finish(self: Box<Self>) -> efa_core::Result<()>;
}

pub(crate) enum Kind {
    Send(SendRequest<'static>),
    Recv(RecvRequest<'static>),
    Coll(Box<dyn CollPending>),
    Rma(crate::rma::RmaPending),
}

/// A non-blocking operation in flight (opaque; `MPI_Request`). Completed and freed by
/// [`efa_wait`], [`efa_test`] (when done), [`efa_waitall`], [`efa_waitany`], [`efa_testall`],
/// or dropped by [`efa_request_free`].
pub struct efa_request {
    pub(crate) kind: Kind,
    /// The communicator whose deadline and wait policy [`efa_waitany`] uses.
    pub(crate) comm: Communicator,
}

impl std::fmt::Debug for efa_request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = match &self.kind {
            Kind::Send(_) => "send",
            Kind::Recv(_) => "recv",
            Kind::Coll(_) => "collective",
            Kind::Rma(_) => "rma",
        };
        write!(f, "efa_request({k})")
    }
}

impl efa_request {
    fn any(&mut self) -> &mut dyn AnyRequest {
        match &mut self.kind {
            Kind::Send(r) => r,
            Kind::Recv(r) => r,
            Kind::Coll(r) => r.as_mut(),
            Kind::Rma(r) => r.any(),
        }
    }

    fn wait(self) -> efa_core::Result<efa_status> {
        match self.kind {
            Kind::Send(r) => r.wait().map(|()| efa_status::EMPTY),
            Kind::Recv(r) => r.wait().map(efa_status::of),
            Kind::Coll(r) => r.finish().map(|()| efa_status::EMPTY),
            Kind::Rma(r) => r.wait().map(|()| efa_status::EMPTY),
        }
    }
}

pub(crate) fn new_request(
    out: *mut *mut efa_request,
    comm: &Communicator,
    kind: Kind,
) -> CResult<()> {
    let comm = comm.clone();
    put(
        out,
        "request (output)",
        Box::into_raw(Box::new(efa_request { kind, comm })),
    )
}

/// Takes the request out of `*req` (setting it NULL); `None` for a NULL request.
///
/// # Safety
/// `req` is not NULL and points to NULL or a handle from this library not freed yet.
unsafe fn take(req: *mut *mut efa_request) -> Option<Box<efa_request>> {
    // SAFETY: the caller's contract.
    let h = unsafe { req.replace(std::ptr::null_mut()) };
    if h.is_null() {
        None
    } else {
        // SAFETY: non-NULL handles come from Box::into_raw in new_request; `*req` is NULL
        // now, so it is freed once.
        Some(unsafe { Box::from_raw(h) })
    }
}

/// Starts sending `count` elements of `datatype` at `buf` to `dest` with `tag`
/// (`MPI_Isend`). The data is taken (copied, or handed to the engine) before this returns,
/// so `buf` may be reused at once. `*request` must be completed or freed.
///
/// Errors: as [`efa_send`] (without the timeout), plus `EFA_ERR_NULL` (`request`).
#[no_mangle]
pub unsafe extern "C" fn efa_isend(
    comm: *const efa_comm,
    buf: *const c_void,
    count: usize,
    datatype: c_int,
    dest: c_int,
    tag: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    guarded("efa_isend", || {
        let c = comm_ref(comm)?;
        need(request, "request")?;
        // SAFETY: `buf` holds `count` elements for the call (the header's contract).
        let data = unsafe { bytes(buf, count, datatype, "buf") }?;
        // Buffered (`ibsend`): the data is copied, as documented, so the request borrows
        // nothing from the caller's memory.
        let r = c.ibsend(data, rank_arg(dest, "dest")?, send_tag(tag)?)?;
        new_request(request, c, Kind::Send(r))
    })
}

/// Starts a receive into `buf` (room for `count` elements of `datatype`) from `source` with
/// `tag`, wildcards allowed (`MPI_Irecv`). `buf` must stay valid and untouched until the
/// request completes or is freed (freeing an unmatched receive cancels it; nothing is
/// written afterwards).
///
/// Errors: `EFA_ERR_NULL` (`comm`, `request`; `buf` with `count > 0`); `EFA_ERR_ARG`;
/// `EFA_ERR_RANK`; `EFA_ERR_TAG`. The receive's own errors come from the wait.
#[no_mangle]
pub unsafe extern "C" fn efa_irecv(
    comm: *const efa_comm,
    buf: *mut c_void,
    count: usize,
    datatype: c_int,
    source: c_int,
    tag: c_int,
    request: *mut *mut efa_request,
) -> c_int {
    guarded("efa_irecv", || {
        let c = comm_ref(comm)?;
        need(request, "request")?;
        let d = efa_datatype::from_int(datatype)?;
        let (src, tag) = (source_arg(source)?, tag_arg(tag)?);
        let r = with_type!(d, T => {
            // SAFETY: `buf` stays valid and exclusively the request's until it completes or
            // is freed (the header's contract), so the 'static borrow never outlives the
            // memory: the request (which cancels on drop) is always dropped first.
            let data: &'static mut [T] = unsafe { slice_mut::<T>(buf, count, "buf") }?;
            c.irecv(data, src, tag)?
        });
        new_request(request, c, Kind::Recv(r))
    })
}

/// Waits for `*request` (`MPI_Wait`), up to the communicator's deadline, frees it and sets
/// `*request` to NULL (also on error). A NULL `*request` returns at once with an empty
/// status. `status` (may be NULL) gets a receive's sender, tag and length.
///
/// Errors: `EFA_ERR_NULL` (`request`); the operation's error (`EFA_ERR_TIMEOUT`,
/// `EFA_ERR_TRUNCATED`, `EFA_ERR_CANCELLED`, `EFA_ERR_PEER_FAILED`, a collective's or an RMA
/// operation's errors).
#[no_mangle]
pub unsafe extern "C" fn efa_wait(
    request: *mut *mut efa_request,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_wait", || {
        need(request, "request")?;
        // SAFETY: `request` is not NULL (the header's contract for the rest).
        let Some(r) = (unsafe { take(request) }) else {
            put_status(status, efa_status::EMPTY);
            return Ok(());
        };
        let st = r.wait()?;
        put_status(status, st);
        Ok(())
    })
}

/// Tests `*request` without blocking (`MPI_Test`): when it has completed, `*flag` is 1, the
/// request is freed, `*request` becomes NULL and `status` (may be NULL) is filled; else
/// `*flag` is 0. A NULL `*request` gives `*flag` 1 and an empty status.
///
/// Errors: `EFA_ERR_NULL` (`request`, `flag`); the operation's error when it completed with
/// one (then it is freed too).
#[no_mangle]
pub unsafe extern "C" fn efa_test(
    request: *mut *mut efa_request,
    flag: *mut c_int,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_test", || {
        need(request, "request")?;
        need(flag, "flag")?;
        // SAFETY: not NULL; points to NULL or a live handle (the header's contract).
        let h = unsafe { *request };
        if h.is_null() {
            put_status(status, efa_status::EMPTY);
            return put(flag, "flag", 1);
        }
        // SAFETY: a live handle from new_request, not aliased during the call.
        let done = unsafe { (*h).any() }.test()?;
        if !done {
            return put(flag, "flag", 0);
        }
        put(flag, "flag", 1)?;
        // SAFETY: as in efa_wait.
        let r = unsafe { take(request) }.expect("checked non-NULL");
        let st = r.wait()?;
        put_status(status, st);
        Ok(())
    })
}

/// Asks to cancel `*request` (`MPI_Cancel`): only a receive that no message has matched yet
/// can be; it then completes, and waiting for it gives `EFA_ERR_CANCELLED`. `*cancelled`
/// (may be NULL) gets 1 if it was cancelled, else 0. The request still has to be waited
/// for or freed.
///
/// Errors: `EFA_ERR_NULL` (`request`).
#[no_mangle]
pub unsafe extern "C" fn efa_cancel(request: *mut efa_request, cancelled: *mut c_int) -> c_int {
    guarded("efa_cancel", || {
        need(request, "request")?;
        // SAFETY: not NULL; a live handle (the header's contract).
        let c = unsafe { (*request).any() }.cancel()?;
        if !cancelled.is_null() {
            put(cancelled, "cancelled", c as c_int)?;
        }
        Ok(())
    })
}

/// Frees `*request` without waiting (`MPI_Request_free`) and sets it NULL: a receive no
/// message matched is cancelled (its buffer is not written afterwards), a send still
/// arrives, a collective or RMA operation completes in the background (a collective's
/// result is then not copied out). A NULL `*request` is a no-op.
///
/// Errors: `EFA_ERR_NULL` (`request`).
#[no_mangle]
pub unsafe extern "C" fn efa_request_free(request: *mut *mut efa_request) -> c_int {
    guarded("efa_request_free", || {
        need(request, "request")?;
        // SAFETY: as in efa_wait.
        drop(unsafe { take(request) });
        Ok(())
    })
}

/// The requests of a C array of `count` handle pointers, checked as every buffer
/// ([`slice_mut`]: NULL only when `count` is 0, alignment, size).
///
/// # Safety
/// A non-NULL `reqs` holds `count` entries, each NULL or a live handle.
unsafe fn req_array<'a>(
    reqs: *mut *mut efa_request,
    count: usize,
) -> CResult<&'a mut [*mut efa_request]> {
    // SAFETY: the caller's contract.
    unsafe { slice_mut(reqs as *mut c_void, count, "requests") }
}

/// The `count` statuses of [`efa_waitall`] / [`efa_testall`]: `None` for NULL ("ignore"),
/// else checked as every buffer ([`slice_mut`]). Checked before any request completes, so
/// that a bad array loses no completion.
///
/// # Safety
/// A non-NULL `statuses` holds `count` entries.
unsafe fn status_array<'a>(
    statuses: *mut efa_status,
    count: usize,
) -> CResult<Option<&'a mut [efa_status]>> {
    if statuses.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's contract.
    unsafe { slice_mut(statuses as *mut c_void, count, "statuses") }.map(Some)
}

/// Waits for all `count` requests (`MPI_Waitall`), frees them and sets every entry NULL.
/// Every request is waited for even when one fails. `statuses` (NULL, or `count` entries)
/// gets each one's status, with its own error code in `error`. Returns the first error.
///
/// Errors: `EFA_ERR_NULL` (`requests` with `count > 0`); `EFA_ERR_ARG` when `count`
/// entries of `requests` or `statuses` overflow the address space or an array is not
/// aligned (nothing is waited for); the first failed request's error.
#[no_mangle]
pub unsafe extern "C" fn efa_waitall(
    count: usize,
    requests: *mut *mut efa_request,
    statuses: *mut efa_status,
) -> c_int {
    guarded("efa_waitall", || {
        // SAFETY: the header's contract for `statuses` and `requests`.
        let mut sts = unsafe { status_array(statuses, count) }?;
        // SAFETY: as above.
        let reqs = unsafe { req_array(requests, count) }?;
        let mut first: Option<CErr> = None;
        for (i, slot) in reqs.iter_mut().enumerate() {
            // SAFETY: each entry is NULL or a live handle.
            let st = match unsafe { take(slot) } {
                None => efa_status::EMPTY,
                Some(r) => match r.wait() {
                    Ok(st) => st,
                    Err(e) => {
                        let e = CErr::from(e);
                        let st = efa_status {
                            error: e.code as c_int,
                            ..efa_status::EMPTY
                        };
                        first.get_or_insert(e);
                        st
                    }
                },
            };
            if let Some(s) = sts.as_deref_mut() {
                s[i] = st;
            }
        }
        first.map_or(Ok(()), Err)
    })
}

/// Tests all `count` requests once (`MPI_Testall`): when every one has completed, `*flag`
/// is 1 and they are completed as by [`efa_waitall`]; else `*flag` is 0 and none is freed.
///
/// Errors: `EFA_ERR_NULL` (`flag`; `requests` with `count > 0`); as [`efa_waitall`].
#[no_mangle]
pub unsafe extern "C" fn efa_testall(
    count: usize,
    requests: *mut *mut efa_request,
    flag: *mut c_int,
    statuses: *mut efa_status,
) -> c_int {
    let r = guarded("efa_testall", || {
        need(flag, "flag")?;
        // SAFETY: the header's contract for `statuses` and `requests`.
        unsafe { status_array(statuses, count) }?;
        // SAFETY: as above.
        let reqs = unsafe { req_array(requests, count) }?;
        let mut all = true;
        for h in reqs.iter() {
            if !h.is_null() {
                // SAFETY: a live handle.
                all &= unsafe { (**h).any() }.test()?;
            }
        }
        put(flag, "flag", all as c_int)
    });
    // SAFETY: `flag` was checked by the call above when it succeeded.
    if r == EFA_SUCCESS as c_int && unsafe { *flag } == 1 {
        // SAFETY: forwarded contract.
        return unsafe { efa_waitall(count, requests, statuses) };
    }
    r
}

/// Waits until one of `count` requests completes (`MPI_Waitany`), completes and frees it,
/// sets its entry NULL and `*index` to its position; `status` (may be NULL) gets its status.
/// NULL entries are skipped; when all are NULL (or `count` is 0), `*index` is
/// `EFA_UNDEFINED` at once. The deadline is that of the first request's communicator.
///
/// Errors: `EFA_ERR_NULL` (`index`; `requests` with `count > 0`); `EFA_ERR_ARG` when `count`
/// entries of `requests` overflow the address space; `EFA_ERR_TIMEOUT` when
/// none completes in time (nothing is freed); the completed request's error (`*index` is
/// set, and it is freed).
#[no_mangle]
pub unsafe extern "C" fn efa_waitany(
    count: usize,
    requests: *mut *mut efa_request,
    index: *mut c_int,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_waitany", || {
        need(index, "index")?;
        // SAFETY: the header's contract for `requests`.
        let reqs = unsafe { req_array(requests, count) }?;
        let live: Vec<usize> = (0..reqs.len()).filter(|&i| !reqs[i].is_null()).collect();
        let Some(&first) = live.first() else {
            put_status(status, efa_status::EMPTY);
            return put(index, "index", EFA_UNDEFINED);
        };
        // SAFETY: a live handle.
        let comm: Communicator = unsafe { (*reqs[first]).comm.clone() };
        let mut refs: Vec<&mut dyn AnyRequest> = Vec::with_capacity(live.len());
        for &i in &live {
            // SAFETY: live, distinct handles: no two `&mut` alias.
            refs.push(unsafe { (*reqs[i]).any() });
        }
        let k = comm.wait_any(&mut refs)?.expect("not empty");
        drop(refs);
        let i = live[k];
        put(index, "index", i as c_int)?;
        // SAFETY: as in efa_wait.
        let r = unsafe { take(&mut reqs[i]) }.expect("live");
        let st = r.wait()?;
        put_status(status, st);
        Ok(())
    })
}

// ---- Matched probes -----------------------------------------------------------------------

/// A message taken out of matching by [`efa_mprobe`] / [`efa_improbe`] (opaque;
/// `MPI_Message`): only [`efa_mrecv`] receives it. Freeing it unreceived
/// ([`efa_message_free`]) puts it back in its place in the queue.
#[derive(Debug)]
pub struct efa_message {
    msg: efa_core::Message,
}

/// Waits for a message from `source` with `tag` (wildcards allowed) and takes it out of
/// matching (`MPI_Mprobe`): no other receive or probe can get it. `*message` gets the handle
/// and `*status` (may be NULL) its sender, tag and length, so a buffer can be sized before
/// [`efa_mrecv`].
///
/// Errors: `EFA_ERR_NULL` (`comm`, `message`); `EFA_ERR_RANK`; `EFA_ERR_TAG`;
/// `EFA_ERR_TIMEOUT`; `EFA_ERR_PEER_FAILED`.
#[no_mangle]
pub unsafe extern "C" fn efa_mprobe(
    comm: *const efa_comm,
    source: c_int,
    tag: c_int,
    message: *mut *mut efa_message,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_mprobe", || {
        let c = comm_ref(comm)?;
        need(message, "message")?;
        let msg = c.mprobe(source_arg(source)?, tag_arg(tag)?)?;
        put_status(status, efa_status::of(msg.status()));
        put(
            message,
            "message",
            Box::into_raw(Box::new(efa_message { msg })),
        )
    })
}

/// [`efa_mprobe`] without waiting (`MPI_Improbe`): `*flag` is 1 and `*message` set when such a
/// message is there, else `*flag` is 0 and `*message` NULL.
///
/// Errors: `EFA_ERR_NULL` (`comm`, `flag`, `message`); `EFA_ERR_RANK`; `EFA_ERR_TAG`.
#[no_mangle]
pub unsafe extern "C" fn efa_improbe(
    comm: *const efa_comm,
    source: c_int,
    tag: c_int,
    flag: *mut c_int,
    message: *mut *mut efa_message,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_improbe", || {
        let c = comm_ref(comm)?;
        need(flag, "flag")?;
        need(message, "message")?;
        match c.improbe(source_arg(source)?, tag_arg(tag)?)? {
            Some(msg) => {
                put_status(status, efa_status::of(msg.status()));
                put(
                    message,
                    "message",
                    Box::into_raw(Box::new(efa_message { msg })),
                )?;
                put(flag, "flag", 1)
            }
            None => {
                put(message, "message", std::ptr::null_mut())?;
                put(flag, "flag", 0)
            }
        }
    })
}

/// Receives the message `*message` into `buf` (room for `count` elements of `datatype`)
/// (`MPI_Mrecv`), frees the handle and sets `*message` NULL (also on error: the message is
/// then consumed, as MPI does).
///
/// Errors: `EFA_ERR_NULL` (`message`, `*message`; `buf` with `count > 0`); `EFA_ERR_ARG`;
/// `EFA_ERR_TRUNCATED` when the message is longer than `buf` or not a whole number of
/// elements of `datatype`; `EFA_ERR_TIMEOUT`.
#[no_mangle]
pub unsafe extern "C" fn efa_mrecv(
    buf: *mut c_void,
    count: usize,
    datatype: c_int,
    message: *mut *mut efa_message,
    status: *mut efa_status,
) -> c_int {
    guarded("efa_mrecv", || {
        need(message, "message")?;
        let d = efa_datatype::from_int(datatype)?;
        // Checked before the message is taken, so a bad buffer loses nothing.
        check_buf_of(d, buf, count, "buf")?;
        // SAFETY: not NULL; points to NULL or a live handle (the header's contract).
        let h = unsafe { message.replace(std::ptr::null_mut()) };
        if h.is_null() {
            return Err(CErr::null("*message"));
        }
        // SAFETY: a live handle from efa_mprobe/efa_improbe, freed once (`*message` is NULL).
        let m = unsafe { Box::from_raw(h) };
        let st = with_type!(d, T => {
            // SAFETY: `buf` holds room for `count` elements (the header's contract).
            let data = unsafe { slice_mut::<T>(buf, count, "buf") }?;
            m.msg.recv(data)?
        });
        put_status(status, efa_status::of(st));
        Ok(())
    })
}

/// Frees `*message` unreceived and sets it NULL: the message goes back to its place in the
/// queue for a later receive or probe. A NULL `*message` is a no-op.
///
/// Errors: `EFA_ERR_NULL` (`message`).
#[no_mangle]
pub unsafe extern "C" fn efa_message_free(message: *mut *mut efa_message) -> c_int {
    guarded("efa_message_free", || {
        need(message, "message")?;
        // SAFETY: not NULL; points to NULL or a live handle (the header's contract).
        let h = unsafe { message.replace(std::ptr::null_mut()) };
        if !h.is_null() {
            // SAFETY: a live handle, freed once.
            drop(unsafe { Box::from_raw(h) });
        }
        Ok(())
    })
}
