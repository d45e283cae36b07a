//! RMA windows: one-sided put and get (`MPI_Win_*`). Windows hold bytes; offsets and lengths
//! are in bytes.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use efa_core::{AnyRequest, RmaRequest, Window, WindowAccess};

use crate::efa_errcode::EFA_ERR_PENDING;
use crate::p2p::{new_request, Kind};
use crate::{
    comm_ref, efa_comm, efa_request, guarded, need, put, rank_arg, slice, slice_mut, CErr, CResult,
};

/// Who may access a window remotely.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum efa_win_access {
    /// Peers may only get.
    EFA_WIN_READ = 1,
    /// Peers may only put.
    EFA_WIN_WRITE = 2,
    /// Peers may put and get.
    EFA_WIN_READ_WRITE = 3,
}

/// An RMA window (opaque): `bytes` bytes of memory on every rank, owned by the library, that
/// peers put into and get from.
#[derive(Debug)]
pub struct efa_win {
    win: Window<u8>,
    /// Requests of this window not yet completed or freed ([`efa_win_free`] refuses while
    /// any are: they borrow the window).
    pending: Arc<AtomicUsize>,
    /// The window's communicator (the deadline of [`crate::efa_waitany`]).
    comm: efa_core::Communicator,
}

/// An RMA request in flight; it borrows its window, which therefore cannot be freed before it
/// completes.
pub(crate) struct RmaPending {
    req: Option<RmaRequest<'static, 'static, u8>>,
    pending: Arc<AtomicUsize>,
}

impl RmaPending {
    pub(crate) fn any(&mut self) -> &mut dyn AnyRequest {
        self.req.as_mut().expect("present until waited")
    }
    pub(crate) fn wait(mut self) -> efa_core::Result<()> {
        self.req.take().expect("present until waited").wait()
    }
}

impl Drop for RmaPending {
    fn drop(&mut self) {
        // The request (if not waited) drops first: it completes or drains its operation.
        drop(self.req.take());
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

fn win_ref<'a>(w: *const efa_win) -> CResult<&'a efa_win> {
    if w.is_null() {
        return Err(CErr::null("win"));
    }
    // SAFETY: not NULL; a live handle from efa_win_create (the header's contract).
    Ok(unsafe { &*w })
}

/// Creates a window of `bytes` zeroed bytes on every rank (`MPI_Win_allocate`); collective
/// over `comm` (every rank passes the same size). `access` is an `efa_win_access`. Free it
/// with [`efa_win_free`].
///
/// Errors: `EFA_ERR_NULL` (`comm`, `win`); `EFA_ERR_ARG` (access); `EFA_ERR_RMA` when a
/// rank's size differs or a route's provider has no RMA; `EFA_ERR_FABRIC` when registration
/// fails (the text names a too-low `ulimit -l`); `EFA_ERR_TIMEOUT`.
#[no_mangle]
pub unsafe extern "C" fn efa_win_create(
    comm: *const efa_comm,
    bytes: usize,
    access: c_int,
    win: *mut *mut efa_win,
) -> c_int {
    guarded("efa_win_create", || {
        let c = comm_ref(comm)?;
        need(win, "win")?;
        let access = match access {
            1 => WindowAccess::ReadOnly,
            2 => WindowAccess::WriteOnly,
            3 => WindowAccess::ReadWrite,
            a => {
                return Err(CErr::arg(format!(
                    "access {a} is not an efa_win_access (1..3)"
                )))
            }
        };
        let w = c.window::<u8>(bytes, access)?;
        let h = efa_win {
            win: w,
            pending: Arc::new(AtomicUsize::new(0)),
            comm: c.clone(),
        };
        put(win, "win", Box::into_raw(Box::new(h)))
    })
}

/// Frees `*win` (collective: a fence first, so no peer writes into freed memory) and sets it
/// NULL.
///
/// Errors: `EFA_ERR_NULL` (`win`, `*win`); `EFA_ERR_PENDING` when requests of the window are
/// in flight (nothing is freed: complete them first); the fence's errors.
#[no_mangle]
pub unsafe extern "C" fn efa_win_free(win: *mut *mut efa_win) -> c_int {
    guarded("efa_win_free", || {
        need(win, "win")?;
        // SAFETY: not NULL (the header's contract for the rest).
        let h = unsafe { *win };
        let w = win_ref(h)?;
        let n = w.pending.load(Ordering::Acquire);
        if n > 0 {
            return Err(CErr::new(EFA_ERR_PENDING, format!("efa_win_free: {n} RMA requests of this window are still in flight; wait for them first")));
        }
        // SAFETY: `*win` is a live handle from Box::into_raw; it is set NULL so it is freed once.
        let b = unsafe { Box::from_raw(win.replace(std::ptr::null_mut())) };
        b.win.free()?;
        Ok(())
    })
}

/// The window's size in bytes on every rank.
///
/// Errors: `EFA_ERR_NULL` (`win`, `bytes`).
#[no_mangle]
pub unsafe extern "C" fn efa_win_size(win: *const efa_win, bytes: *mut usize) -> c_int {
    guarded("efa_win_size", || {
        put(bytes, "bytes", win_ref(win)?.win.len())
    })
}

/// Copies `len` bytes of this rank's own window memory from `offset` into `out` (the window
/// memory is the library's: peers may write it at any time, so it is copied, never lent).
///
/// Errors: `EFA_ERR_NULL` (`win`; `out` with `len > 0`); `EFA_ERR_RMA` when out of bounds.
#[no_mangle]
pub unsafe extern "C" fn efa_win_read_local(
    win: *const efa_win,
    offset: usize,
    out: *mut c_void,
    len: usize,
) -> c_int {
    guarded("efa_win_read_local", || {
        let w = win_ref(win)?;
        // SAFETY: `out` holds `len` bytes (the header's contract).
        let o = unsafe { slice_mut::<u8>(out, len, "out") }?;
        Ok(w.win.read_local(offset, o)?)
    })
}

/// Copies `len` bytes from `data` into this rank's own window memory at `offset`.
///
/// Errors: `EFA_ERR_NULL` (`win`; `data` with `len > 0`); `EFA_ERR_RMA` when out of bounds.
#[no_mangle]
pub unsafe extern "C" fn efa_win_write_local(
    win: *mut efa_win,
    offset: usize,
    data: *const c_void,
    len: usize,
) -> c_int {
    guarded("efa_win_write_local", || {
        need(win, "win")?;
        // SAFETY: not NULL; a live handle, not aliased during the call (the header's contract).
        let w = unsafe { &mut *win };
        if w.pending.load(Ordering::Acquire) > 0 {
            return Err(CErr::new(EFA_ERR_PENDING, "efa_win_write_local: RMA requests of this window are in flight; wait for them first"));
        }
        // SAFETY: `data` holds `len` bytes.
        let d = unsafe { slice::<u8>(data, len, "data") }?;
        Ok(w.win.write_local(offset, d)?)
    })
}

/// Writes `len` bytes from `data` into `peer`'s window at byte `offset` (`MPI_Put`) and
/// returns when `data` may be reused. The target sees it after [`efa_win_fence`] or
/// [`efa_win_flush`].
///
/// Errors: `EFA_ERR_NULL` (`win`; `data` with `len > 0`); `EFA_ERR_RANK`; `EFA_ERR_RMA` (out
/// of bounds, naming the window size; access not granted); `EFA_ERR_TIMEOUT`; `EFA_ERR_FABRIC`.
#[no_mangle]
pub unsafe extern "C" fn efa_put(
    win: *const efa_win,
    peer: c_int,
    offset: usize,
    data: *const c_void,
    len: usize,
) -> c_int {
    guarded("efa_put", || {
        let w = win_ref(win)?;
        // SAFETY: `data` holds `len` bytes.
        let d = unsafe { slice::<u8>(data, len, "data") }?;
        Ok(w.win.put(rank_arg(peer, "peer")?, offset, d)?)
    })
}

/// Reads `len` bytes from `peer`'s window at byte `offset` into `out` (`MPI_Get`), and returns
/// when they are there.
///
/// Errors: as [`efa_put`].
#[no_mangle]
pub unsafe extern "C" fn efa_get(
    win: *const efa_win,
    peer: c_int,
    offset: usize,
    out: *mut c_void,
    len: usize,
) -> c_int {
    guarded("efa_get", || {
        let w = win_ref(win)?;
        // SAFETY: `out` holds `len` bytes.
        let o = unsafe { slice_mut::<u8>(out, len, "out") }?;
        Ok(w.win.get(rank_arg(peer, "peer")?, offset, o)?)
    })
}

fn rma_request(
    w: &efa_win,
    request: *mut *mut efa_request,
    req: RmaRequest<'static, 'static, u8>,
) -> CResult<()> {
    w.pending.fetch_add(1, Ordering::AcqRel);
    let p = RmaPending {
        req: Some(req),
        pending: w.pending.clone(),
    };
    new_request(request, &w.comm, Kind::Rma(p))
}

/// Starts [`efa_put`] (`MPI_Rput`): `data` is copied at once and may be reused; `*request`
/// completes locally. The window cannot be freed while the request is in flight.
///
/// Errors: as [`efa_put`], plus `EFA_ERR_NULL` (`request`).
#[no_mangle]
pub unsafe extern "C" fn efa_iput(
    win: *const efa_win,
    peer: c_int,
    offset: usize,
    data: *const c_void,
    len: usize,
    request: *mut *mut efa_request,
) -> c_int {
    guarded("efa_iput", || {
        let w = win_ref(win)?;
        need(request, "request")?;
        // SAFETY: `data` holds `len` bytes for the call.
        let d = unsafe { slice::<u8>(data, len, "data") }?;
        // SAFETY: the handle stays allocated until efa_win_free, which refuses while this
        // request is pending (the counter), so the 'static borrow of the window never dangles.
        let wr: &'static Window<u8> = unsafe { &*(&w.win as *const Window<u8>) };
        let r = wr.iput(rank_arg(peer, "peer")?, offset, d)?;
        rma_request(w, request, r)
    })
}

/// Starts [`efa_get`] (`MPI_Rget`): `out` must stay valid and untouched until `*request`
/// completes (or is freed, which waits for the data and drops it).
///
/// Errors: as [`efa_iput`].
#[no_mangle]
pub unsafe extern "C" fn efa_iget(
    win: *const efa_win,
    peer: c_int,
    offset: usize,
    out: *mut c_void,
    len: usize,
    request: *mut *mut efa_request,
) -> c_int {
    guarded("efa_iget", || {
        let w = win_ref(win)?;
        need(request, "request")?;
        // SAFETY: `out` stays valid until the request completes (the header's contract).
        let o: &'static mut [u8] = unsafe { slice_mut::<u8>(out, len, "out") }?;
        // SAFETY: as in efa_iput.
        let wr: &'static Window<u8> = unsafe { &*(&w.win as *const Window<u8>) };
        let r = wr.iget(rank_arg(peer, "peer")?, offset, o)?;
        rma_request(w, request, r)
    })
}

/// [`efa_put`] that also delivers `value` to `peer`, which receives `(source, value)` from
/// [`efa_win_wait_notify`] once the data is in its memory.
///
/// Errors: as [`efa_put`]; `EFA_ERR_RMA` when the provider carries too little remote CQ data
/// or this rank is 65536 or above.
#[no_mangle]
pub unsafe extern "C" fn efa_put_notify(
    win: *const efa_win,
    peer: c_int,
    offset: usize,
    data: *const c_void,
    len: usize,
    value: u16,
) -> c_int {
    guarded("efa_put_notify", || {
        let w = win_ref(win)?;
        // SAFETY: `data` holds `len` bytes.
        let d = unsafe { slice::<u8>(data, len, "data") }?;
        Ok(w.win
            .put_notify(rank_arg(peer, "peer")?, offset, d, value)?)
    })
}

/// Waits for a notification from [`efa_put_notify`]: `*source` gets the sender, `*value` its
/// value.
///
/// Errors: `EFA_ERR_NULL` (`win`, `source`, `value`); `EFA_ERR_TIMEOUT`.
#[no_mangle]
pub unsafe extern "C" fn efa_win_wait_notify(
    win: *const efa_win,
    source: *mut c_int,
    value: *mut u16,
) -> c_int {
    guarded("efa_win_wait_notify", || {
        let w = win_ref(win)?;
        need(source, "source")?;
        need(value, "value")?;
        let (s, v) = w.win.wait_notify()?;
        put(source, "source", s as c_int)?;
        put(value, "value", v)
    })
}

/// Returns when every put this rank issued to `peer` is in `peer`'s memory
/// (`MPI_Win_flush`).
///
/// Errors: `EFA_ERR_NULL` (`win`); `EFA_ERR_RANK`; the first failed operation's error;
/// `EFA_ERR_TIMEOUT`.
#[no_mangle]
pub unsafe extern "C" fn efa_win_flush(win: *const efa_win, peer: c_int) -> c_int {
    guarded("efa_win_flush", || {
        Ok(win_ref(win)?.win.flush(rank_arg(peer, "peer")?)?)
    })
}

/// [`efa_win_flush`] for every peer (`MPI_Win_flush_all`).
///
/// Errors: as [`efa_win_flush`].
#[no_mangle]
pub unsafe extern "C" fn efa_win_flush_all(win: *const efa_win) -> c_int {
    guarded("efa_win_flush_all", || Ok(win_ref(win)?.win.flush_all()?))
}

/// Collective synchronisation (`MPI_Win_fence`): flushes every put, then a barrier; after
/// it every rank sees the data put before it.
///
/// Errors: as [`efa_win_flush`], plus `EFA_ERR_PEER_FAILED`.
#[no_mangle]
pub unsafe extern "C" fn efa_win_fence(win: *const efa_win) -> c_int {
    guarded("efa_win_fence", || Ok(win_ref(win)?.win.fence()?))
}
