//! Completion queues (`fi_cq(3)`) and the per-operation context that completions are
//! delivered to.

use std::cell::{RefCell, UnsafeCell};
use std::collections::VecDeque;
use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use efa_ffi as ffi;

use crate::error::{check, check_int, strerror, CompletionError, Error, Result};
use crate::fabric::{close_fid, Domain};

/// How many completions one `fi_cq_read` call takes at most.
pub const CQ_BATCH: usize = 32;

/// A successful completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// Completion flags (`FI_SEND`, `FI_RECV`, `FI_TAGGED`, `FI_RMA`, `FI_REMOTE_CQ_DATA`, ...).
    pub flags: u64,
    /// Bytes received (receives) or transferred.
    pub len: usize,
    /// Tag of the received message (tagged receives).
    pub tag: u64,
    /// Remote CQ data, valid when `flags` has `FI_REMOTE_CQ_DATA`.
    pub data: u64,
}

impl Completion {
    /// True when the completion carries remote CQ data (`senddata`, `writedata`).
    pub fn has_data(&self) -> bool {
        self.flags & ffi::FI_REMOTE_CQ_DATA as u64 != 0
    }
}

const PENDING: u32 = 0;
const DONE: u32 = 1;

thread_local! {
    /// Completed contexts kept for reuse by this thread ([`OpContext::recycle`]). Per thread,
    /// so that a post and a completion take no lock (a process-wide mutex cost more than the
    /// allocation it saved: 39 ns against 15 ns for a fresh box, 3 ns for this). Boxed: a
    /// context's address is what the provider holds, so it must not move when the list grows.
    #[allow(clippy::vec_box)]
    static FREE_CONTEXTS: RefCell<Vec<Box<OpContext>>> = const { RefCell::new(Vec::new()) };
}
/// At most this many free contexts are kept per thread (about 200 bytes each).
pub const FREE_CONTEXTS_KEEP: usize = 4096;

/// The context of one posted operation.
///
/// Every operation posted through this crate passes a pointer to an `OpContext` as its
/// libfabric context. It begins with a `struct fi_context2`, the scratch space that providers
/// requiring `FI_CONTEXT` or `FI_CONTEXT2` use, and then records the operation's completion
/// when a [`CompletionQueue`] reads it. It must stay at the same address, and must not be
/// freed, until [`OpContext::is_done`] is true.
#[repr(C)]
pub struct OpContext {
    /// Provider scratch space; must be the first field.
    fi_ctx: UnsafeCell<ffi::fi_context2>,
    state: AtomicU32,
    result: UnsafeCell<Option<std::result::Result<Completion, CompletionError>>>,
}

impl std::fmt::Debug for OpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpContext")
            .field("done", &self.is_done())
            .finish()
    }
}

// SAFETY: `result` is written only by the single CQ reader that dequeues this context's
// completion (libfabric delivers each completion once), before `state` is set to DONE with
// Release; it is read only after observing DONE with Acquire. `fi_ctx` is touched only by the
// provider while the operation is in flight.
unsafe impl Sync for OpContext {}
// SAFETY: as above; no thread-affine data.
unsafe impl Send for OpContext {}

impl Default for OpContext {
    fn default() -> Self {
        OpContext {
            fi_ctx: UnsafeCell::new(ffi::fi_context2::default()),
            state: AtomicU32::new(PENDING),
            result: UnsafeCell::new(None),
        }
    }
}

impl OpContext {
    /// A fresh, pending context on the heap (heap so that its address is stable). Reuses
    /// a context given back by [`OpContext::recycle`] when one is free, so that steady
    /// traffic allocates none.
    pub fn new_boxed() -> Box<OpContext> {
        // (No free list once this thread's locals are being destroyed: allocate.)
        FREE_CONTEXTS
            .try_with(|free| free.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Gives back a completed context for reuse by [`OpContext::new_boxed`] on this thread
    /// (up to [`FREE_CONTEXTS_KEEP`] are kept; the rest are freed).
    ///
    /// # Panics
    /// If the context is still pending (as [`OpContext::reset`]).
    pub fn recycle(mut ctx: Box<OpContext>) {
        ctx.reset();
        // (Once this thread's locals are being destroyed, the context is just freed.)
        let _ = FREE_CONTEXTS.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < FREE_CONTEXTS_KEEP {
                free.push(ctx);
            }
        });
    }

    /// The pointer to pass as libfabric's `context` argument.
    pub fn as_raw(&self) -> *mut std::os::raw::c_void {
        self as *const OpContext as *mut std::os::raw::c_void
    }

    /// True once the operation's completion (successful or not) has been read from its CQ.
    pub fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == DONE
    }

    /// The outcome, once [`OpContext::is_done`]; `None` while pending.
    pub fn result(&self) -> Option<std::result::Result<Completion, CompletionError>> {
        if !self.is_done() {
            return None;
        }
        // SAFETY: DONE was stored with Release after the single write of `result`; we observed
        // it with Acquire, and nobody writes `result` again.
        unsafe { (*self.result.get()).clone() }
    }

    /// Resets a completed context so that it can be posted again.
    ///
    /// # Panics
    /// If the context is still pending: reusing it would corrupt an operation in flight.
    pub fn reset(&mut self) {
        assert!(
            self.is_done(),
            "OpContext::reset on an operation still in flight"
        );
        *self.result.get_mut() = None;
        *self.fi_ctx.get_mut() = ffi::fi_context2::default();
        self.state.store(PENDING, Ordering::Relaxed);
    }

    /// Records the completion.
    ///
    /// # Safety
    /// `ctx` must point to a live `OpContext` whose completion has not been recorded yet, and
    /// only the reader that dequeued this completion may call this.
    unsafe fn complete(ctx: *const OpContext, r: std::result::Result<Completion, CompletionError>) {
        // SAFETY: guaranteed by the caller: live, not yet completed, single writer.
        unsafe {
            *(*ctx).result.get() = Some(r);
            (*ctx).state.store(DONE, Ordering::Release);
        }
    }
}

/// A completion queue in `FI_CQ_FORMAT_TAGGED`. Keeps its [`Domain`] alive.
///
/// Reading it ([`CompletionQueue::poll`]) delivers each completion to the [`OpContext`] of
/// its operation. Completions that carry no context (remote CQ data from `writedata` on
/// providers that report it without consuming a receive) are queued and returned by
/// [`CompletionQueue::take_unsolicited`].
#[derive(Clone)]
pub struct CompletionQueue {
    inner: Arc<CqInner>,
}

struct CqInner {
    fid: *mut ffi::fid_cq,
    /// A CQ cannot outlive its domain.
    domain: Domain,
    /// The wait object's file descriptor (`FI_GETWAIT`), when opened with [`CqWait::Fd`]
    /// and the provider has one. Owned by the provider; valid while the CQ is open.
    wait_fd: Option<std::os::fd::RawFd>,
    unsolicited: Mutex<VecDeque<Completion>>,
    size: usize,
    /// Completions delivered so far, by any reader.
    delivered: AtomicU64,
}

// SAFETY: opened on a FI_THREAD_SAFE domain; libfabric serializes access internally. Our own
// state is behind a Mutex.
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: fid_cq begins with its struct fid.
        close_fid(
            unsafe { ptr::addr_of_mut!((*self.fid).fid) },
            "completion queue",
        );
    }
}

impl std::fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("size", &self.inner.size)
            .finish()
    }
}

/// The wait object a completion queue is opened with (`wait_obj` of `fi_cq_attr`,
/// fi_cq(3)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CqWait {
    /// `FI_WAIT_NONE`: the CQ can only be polled. Cheapest: completions signal nothing.
    #[default]
    None,
    /// `FI_WAIT_FD`: the provider signals a file descriptor when completions arrive, so a
    /// caller with nothing to do can block in `poll(2)` ([`crate::progress::block_on`])
    /// instead of burning a core. Costs the provider a signal per completion. Providers
    /// without fd wait objects are opened with `FI_WAIT_NONE` instead
    /// ([`CompletionQueue::wait_fd`] is then `None`).
    Fd,
}

impl CompletionQueue {
    /// Opens a CQ with room for `size` entries (0: the provider's default), without a wait
    /// object ([`CqWait::None`]).
    ///
    /// # Errors
    /// `fi_cq_open` errors, e.g. `FI_ENOMEM`.
    pub fn open(domain: &Domain, size: usize) -> Result<CompletionQueue> {
        Self::open_with(domain, size, CqWait::None)
    }

    /// Opens a CQ with room for `size` entries (0: the provider's default) and wait object
    /// `wait`. When the provider refuses `FI_WAIT_FD` (`FI_ENOSYS`, `FI_EINVAL`,
    /// `FI_ENODATA`, `FI_EOPNOTSUPP`) or has no fd to give (`fi_control(FI_GETWAIT)`
    /// fails), the CQ is opened without a wait object and [`CompletionQueue::wait_fd`] says
    /// `None` (logged at debug level): callers then fall back to short sleeps.
    ///
    /// # Errors
    /// `fi_cq_open` errors other than the refusals above, e.g. `FI_ENOMEM`.
    pub fn open_with(domain: &Domain, size: usize, wait: CqWait) -> Result<CompletionQueue> {
        if wait == CqWait::Fd {
            match Self::open_raw(domain, size, ffi::FI_WAIT_FD) {
                Ok(fid) => {
                    let mut fd: std::os::raw::c_int = -1;
                    // SAFETY: fid is the CQ just opened; FI_GETWAIT on an FI_WAIT_FD CQ
                    // writes one int (the fd), fi_cq(3).
                    let ret = unsafe {
                        ffi::fi_control(
                            ptr::addr_of_mut!((*fid).fid),
                            ffi::FI_GETWAIT as i32,
                            ptr::addr_of_mut!(fd).cast(),
                        )
                    };
                    let cq = Self::wrap(domain, size, fid, (ret == 0 && fd >= 0).then_some(fd));
                    if cq.inner.wait_fd.is_none() {
                        tracing::debug!(
                            ret,
                            "fi_control(FI_GETWAIT) gave no fd: the CQ will be polled only"
                        );
                    }
                    return Ok(cq);
                }
                Err(Error::Call(c))
                    if [
                        ffi::FI_ENOSYS,
                        ffi::FI_EINVAL,
                        ffi::FI_ENODATA,
                        ffi::FI_EOPNOTSUPP,
                    ]
                    .iter()
                    .any(|&code| c.code == code as i32) =>
                {
                    tracing::debug!("fi_cq_open with FI_WAIT_FD refused ({c}): polling only");
                }
                Err(e) => return Err(e),
            }
        }
        let fid = Self::open_raw(domain, size, ffi::FI_WAIT_NONE)?;
        Ok(Self::wrap(domain, size, fid, None))
    }

    fn open_raw(
        domain: &Domain,
        size: usize,
        wait_obj: ffi::fi_wait_obj,
    ) -> Result<*mut ffi::fid_cq> {
        let mut attr = ffi::fi_cq_attr {
            size,
            format: ffi::FI_CQ_FORMAT_TAGGED,
            wait_obj,
            ..Default::default()
        };
        let mut fid = ptr::null_mut();
        // SAFETY: domain is open, attr valid for the call; fi_cq_open writes the new CQ.
        let ret = unsafe { ffi::fi_cq_open(domain.raw(), &mut attr, &mut fid, ptr::null_mut()) };
        check_int("fi_cq_open", ret)?;
        Ok(fid)
    }

    fn wrap(
        domain: &Domain,
        size: usize,
        fid: *mut ffi::fid_cq,
        wait_fd: Option<std::os::fd::RawFd>,
    ) -> CompletionQueue {
        CompletionQueue {
            inner: Arc::new(CqInner {
                fid,
                domain: domain.clone(),
                wait_fd,
                unsolicited: Mutex::new(VecDeque::new()),
                size,
                delivered: AtomicU64::new(0),
            }),
        }
    }

    /// The file descriptor that becomes readable when completions may be waiting, if this
    /// CQ was opened with [`CqWait::Fd`] and the provider has one. Block on it only after
    /// [`CompletionQueue::try_wait`] said so ([`crate::progress::block_on`] does both).
    pub fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.wait_fd
    }

    /// `fi_trywait(3)` on this CQ: `Ok(true)` when it is safe to block on
    /// [`CompletionQueue::wait_fd`] (no completion pending; the provider has reset the fd
    /// and made the progress it needs to), `Ok(false)` when completions may be pending and
    /// the CQ should be read first (`FI_EAGAIN`). A CQ without a wait fd says `Ok(false)`.
    ///
    /// # Errors
    /// Other `fi_trywait` errors.
    pub fn try_wait(&self) -> Result<bool> {
        if self.inner.wait_fd.is_none() {
            return Ok(false);
        }
        // SAFETY: the CQ is open; fi_trywait reads one fid pointer from the array.
        let mut fids = [unsafe { ptr::addr_of_mut!((*self.inner.fid).fid) }];
        // SAFETY: the fabric and the CQ are open (the CQ keeps its domain, which keeps its
        // fabric); fids holds one valid fid.
        let ret =
            unsafe { ffi::fi_trywait(self.inner.domain.fabric().raw(), fids.as_mut_ptr(), 1) };
        if ret == -(ffi::FI_EAGAIN as i32) {
            return Ok(false);
        }
        check_int("fi_trywait", ret)?;
        Ok(true)
    }

    /// True when `other` is a handle on this same CQ.
    pub fn same(&self, other: &CompletionQueue) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn raw(&self) -> *mut ffi::fid_cq {
        self.inner.fid
    }

    /// The domain this CQ belongs to.
    pub fn domain(&self) -> &Domain {
        &self.inner.domain
    }

    /// Reads up to [`CQ_BATCH`] completions and delivers each to its operation's context.
    /// Returns how many were delivered (0 when the queue was empty). Reading also drives
    /// progress for providers with manual progress.
    ///
    /// # Errors
    /// `fi_cq_read` errors other than `FI_EAGAIN`; an error entry without an operation context
    /// is returned as [`Error::Completion`].
    pub fn poll(&self) -> Result<usize> {
        let mut entries = std::mem::MaybeUninit::<[ffi::fi_cq_tagged_entry; CQ_BATCH]>::uninit();
        // SAFETY: entries has room for CQ_BATCH tagged entries, the CQ's format; libfabric
        // writes the first `ret` of them, and only those are read below. Not zeroing the
        // array keeps an empty poll cheap.
        let ret = unsafe { ffi::fi_cq_read(self.inner.fid, entries.as_mut_ptr().cast(), CQ_BATCH) };
        if ret == -(ffi::FI_EAGAIN as isize) {
            return Ok(0);
        }
        if ret == -(ffi::FI_EAVAIL as isize) {
            self.read_error()?;
            self.inner.delivered.fetch_add(1, Ordering::Release);
            return Ok(1);
        }
        let n = check("fi_cq_read", ret)?.min(CQ_BATCH);
        // SAFETY: fi_cq_read initialised the first `n` entries (n <= CQ_BATCH).
        let entries: &[ffi::fi_cq_tagged_entry] =
            unsafe { std::slice::from_raw_parts(entries.as_ptr().cast(), n) };
        for e in entries {
            let c = Completion {
                flags: e.flags,
                len: e.len,
                tag: e.tag,
                data: e.data,
            };
            if e.op_context.is_null() {
                self.inner
                    .unsolicited
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(c);
            } else {
                // SAFETY: every operation posted through this crate uses a live OpContext as
                // its context, kept alive until it is done; this reader dequeued the entry, so
                // it is the only one completing it.
                unsafe { OpContext::complete(e.op_context as *const OpContext, Ok(c)) };
            }
        }
        self.inner.delivered.fetch_add(n as u64, Ordering::Release);
        Ok(n)
    }

    fn read_error(&self) -> Result<()> {
        let mut err = ffi::fi_cq_err_entry::default();
        // SAFETY: err is a valid, zeroed error entry (err_data_size 0: provider-owned err_data).
        let ret = unsafe { ffi::fi_cq_readerr(self.inner.fid, &mut err, 0) };
        if ret == -(ffi::FI_EAGAIN as isize) {
            return Ok(());
        }
        check("fi_cq_readerr", ret)?;
        let mut buf = [0 as std::os::raw::c_char; 256];
        // SAFETY: fi_cq_strerror writes at most buf.len() bytes into buf and returns a
        // NUL-terminated string (possibly a static one) valid until the next CQ read.
        let prov_text = unsafe {
            let p = ffi::fi_cq_strerror(
                self.inner.fid,
                err.prov_errno,
                err.err_data,
                buf.as_mut_ptr(),
                buf.len(),
            );
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        // Some providers (shm in 1.17) report `err` negated; the contract is a positive code.
        let code = err.err.abs();
        let ce = CompletionError {
            code,
            text: strerror(code),
            prov_errno: err.prov_errno,
            prov_text,
            flags: err.flags,
            len: err.len,
            olen: err.olen,
            tag: err.tag,
        };
        if err.op_context.is_null() {
            return Err(Error::Completion(ce));
        }
        tracing::debug!(
            code = ce.code,
            prov_errno = ce.prov_errno,
            "error completion: {ce}"
        );
        // SAFETY: as in poll: the context is a live OpContext, completed only by this reader.
        unsafe { OpContext::complete(err.op_context as *const OpContext, Err(ce)) };
        Ok(())
    }

    /// How many completions this CQ has delivered so far, whoever read them. A caller that
    /// tracks operations of its own compares this with an earlier value to learn whether any
    /// may have completed since, even through reads made by other code (a post that retried
    /// on `FI_EAGAIN` reads the CQ too).
    pub fn delivered(&self) -> u64 {
        self.inner.delivered.load(Ordering::Acquire)
    }

    /// Takes the completions that arrived without an operation context (remote CQ data).
    pub fn take_unsolicited(&self) -> Vec<Completion> {
        self.inner
            .unsolicited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }
}
