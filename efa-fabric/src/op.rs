//! Safe operations: the endpoint owns each buffer while the NIC may use it.
//!
//! Every safe post takes an [`IoBuf`] by value and returns a [`Pending`], which is
//! `#[must_use]`. [`Pending::wait`] gives the buffer back with the completion ([`Done`]), or
//! with the error ([`OpError`]) once the operation is over. Until then nothing else can read,
//! write or free the buffer.
//!
//! Dropping a `Pending` that has not completed cancels the operation (`fi_cancel`) and drains
//! its completion before the buffer is released. If the provider neither completes nor
//! cancels it within [`CANCEL_GRACE`], the buffer is parked on the endpoint and freed only
//! after the endpoint is closed (when the provider can no longer touch it), and the small
//! operation context is leaked: never "free and hope".

use std::time::Duration;

use efa_ffi as ffi;

use crate::av::FiAddr;
use crate::cq::{Completion, OpContext};
use crate::ep::Endpoint;
use crate::error::{Error, Result, SizeLimit};
use crate::mr::{Access, IoBuf, IoBufMut, MemoryRegion, RawMemory, RemoteRegion};
use crate::progress::{Backoff, Deadline, PollClock};

/// How long dropping or timing out an operation waits for its cancellation to complete.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// A finished operation: the buffer, back in the caller's hands, and what completed.
#[derive(Debug)]
pub struct Done<B> {
    /// The buffer the operation used.
    pub buf: B,
    /// Bytes received (receives), or the length transferred.
    pub len: usize,
    /// Tag of the matched message (tagged receives).
    pub tag: u64,
    /// Remote CQ data, if the message carried any.
    pub data: Option<u64>,
    /// Raw completion flags.
    pub flags: u64,
}

/// An operation that failed or could not be posted. The buffer is returned whenever the
/// provider is provably done with it (`buf` is `None` only when it had to be kept alive for
/// the provider).
#[derive(Debug)]
pub struct OpError<B> {
    /// What went wrong.
    pub error: Error,
    /// The buffer, if it could be released.
    pub buf: Option<B>,
}

impl<B> std::fmt::Display for OpError<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<B: std::fmt::Debug> std::error::Error for OpError<B> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<B> From<OpError<B>> for Error {
    fn from(e: OpError<B>) -> Error {
        e.error
    }
}

impl<B> OpError<B> {
    fn new(error: Error, buf: Option<B>) -> Self {
        OpError { error, buf }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    Recv,
    Read,
    Write,
}

/// An operation in flight that owns its buffer. See the [module docs](self).
#[must_use = "dropping a Pending cancels the operation"]
pub struct Pending<B: IoBuf> {
    // Field order: the temporary registration is released before the buffer.
    ctx: Option<Box<OpContext>>,
    mr: Option<MemoryRegion<RawMemory>>,
    buf: Option<B>,
    ep: Endpoint,
    kind: Kind,
    op: &'static str,
    len: usize,
}

impl<B: IoBuf> std::fmt::Debug for Pending<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("op", &self.op)
            .field("len", &self.len)
            .field("done", &self.is_done())
            .finish()
    }
}

impl<B: IoBuf> Pending<B> {
    /// True once the completion has been read (by any thread polling the CQ).
    pub fn is_done(&self) -> bool {
        self.ctx.as_ref().is_some_and(|c| c.is_done())
    }

    /// Progresses the endpoint's CQs once and reports whether the operation is done.
    ///
    /// # Errors
    /// CQ read errors that belong to no operation.
    pub fn test(&mut self) -> Result<bool> {
        if !self.is_done() {
            self.ep.progress()?;
        }
        Ok(self.is_done())
    }

    /// Waits for the completion, spinning first and then backing off, for at most `timeout`.
    ///
    /// # Errors
    /// The operation's completion error ([`Error::Truncated`] for a receive buffer that was
    /// too small); [`Error::Timeout`] after `timeout`, once the operation has been cancelled.
    pub fn wait(mut self, timeout: Duration) -> std::result::Result<Done<B>, OpError<B>> {
        let deadline = Deadline::after(timeout);
        let mut clock = PollClock::new(timeout);
        let mut backoff = Backoff::new();
        while !self.is_done() {
            match self.ep.progress() {
                Ok(0) => backoff.snooze(),
                Ok(_) => backoff.reset(),
                Err(e) => return Err(OpError::new(e, None)),
            }
            if clock.expired() && !self.is_done() {
                if !self.cancel_and_drain() {
                    self.orphan();
                    return Err(OpError::new(
                        Error::Timeout {
                            op: self.op,
                            waited: deadline.waited(),
                        },
                        None,
                    ));
                }
                // Cancelled, or it completed while we were cancelling: report what happened.
                let result = self.finish();
                return match result {
                    Ok(done) => Ok(done),
                    Err(e) if e.error.code() == Some(ffi::FI_ECANCELED as i32) => {
                        Err(OpError::new(
                            Error::Timeout {
                                op: self.op,
                                waited: deadline.waited(),
                            },
                            e.buf,
                        ))
                    }
                    Err(e) => Err(e),
                };
            }
        }
        self.finish()
    }

    /// Cancels the operation and waits (up to [`CANCEL_GRACE`]) for it to finish.
    ///
    /// # Errors
    /// [`Error::Timeout`] if the provider neither completed nor cancelled it; the buffer is
    /// then kept until the endpoint closes.
    pub fn cancel(mut self) -> std::result::Result<Done<B>, OpError<B>> {
        if self.cancel_and_drain() {
            self.finish()
        } else {
            self.orphan();
            Err(OpError::new(
                Error::Timeout {
                    op: "cancel",
                    waited: CANCEL_GRACE,
                },
                None,
            ))
        }
    }

    /// Gives the operation up without waiting: requests cancellation (`fi_cancel`) and, if
    /// it has not completed, parks its buffer (and registration) on the endpoint until the
    /// endpoint closes, as a drop does after its grace period. For operations with a peer
    /// that is known to be gone, whose completions may never come: dropping them would wait
    /// [`CANCEL_GRACE`] each.
    pub fn abandon(mut self) {
        let done = match self.ctx.as_ref() {
            None => true,
            Some(ctx) if ctx.is_done() => true,
            Some(ctx) => {
                if let Err(e) = self.ep.cancel(ctx) {
                    tracing::debug!(op = self.op, "fi_cancel: {e}");
                }
                // A provider that cancels at once reports it at the next progress.
                let _ = self.ep.progress();
                self.is_done()
            }
        };
        if !done {
            self.orphan();
        }
        // Done (or orphaned): the drop below has nothing left to wait for.
    }

    /// Requests cancellation and progresses until done or the grace period ends.
    fn cancel_and_drain(&mut self) -> bool {
        let Some(ctx) = self.ctx.as_ref() else {
            return true;
        };
        if ctx.is_done() {
            return true;
        }
        if let Err(e) = self.ep.cancel(ctx) {
            tracing::debug!(op = self.op, "fi_cancel: {e}");
        }
        let deadline = Deadline::after(CANCEL_GRACE);
        let mut backoff = Backoff::new();
        while !self.is_done() && !deadline.expired() {
            if self.ep.progress().unwrap_or(0) == 0 {
                backoff.snooze();
            }
        }
        self.is_done()
    }

    /// Parks the buffer (and registration) on the endpoint and leaks the context, because
    /// the provider may still use them.
    fn orphan(&mut self) {
        tracing::warn!(
            op = self.op,
            len = self.len,
            "operation neither completed nor cancelled; its buffer is kept until the endpoint closes"
        );
        if let Some(ctx) = self.ctx.take() {
            // The CQ may still deliver this context's completion, even after the endpoint
            // closes, so the context must never be freed.
            Box::leak(ctx);
        }
        let mr = self.mr.take();
        if let Some(buf) = self.buf.take() {
            self.ep.orphan(Box::new((mr, buf)));
        }
    }

    fn finish(&mut self) -> std::result::Result<Done<B>, OpError<B>> {
        let ctx = self.ctx.take().expect("finish on a consumed Pending");
        let result = ctx.result().expect("finish before completion");
        // Completed: the provider no longer uses it.
        OpContext::recycle(ctx);
        drop(self.mr.take());
        let buf = self.buf.take().expect("buffer present until finish");
        match result {
            Ok(c) => Ok(self.done(buf, c)),
            Err(ce) if ce.code == ffi::FI_ETRUNC as i32 => Err(OpError::new(
                Error::Truncated {
                    buffer_len: self.len,
                    // Providers report the overflow in `olen` when they know it (shm and
                    // ofi_rxm in 1.17 report 0).
                    message_len: (ce.olen > 0).then_some(self.len + ce.olen),
                },
                Some(buf),
            )),
            Err(ce) => Err(OpError::new(Error::Completion(ce), Some(buf))),
        }
    }

    fn done(&self, buf: B, c: Completion) -> Done<B> {
        Done {
            buf,
            len: if matches!(self.kind, Kind::Recv) {
                c.len
            } else {
                self.len
            },
            tag: c.tag,
            data: c.has_data().then_some(c.data),
            flags: c.flags,
        }
    }
}

impl<B: IoBuf> Drop for Pending<B> {
    fn drop(&mut self) {
        if self.ctx.is_none() {
            return;
        }
        if self.is_done() {
            if let Some(ctx) = self.ctx.take() {
                OpContext::recycle(ctx);
            }
            return;
        }
        if !self.cancel_and_drain() {
            self.orphan();
        }
    }
}

/// Registered-memory descriptor for `buf`: its own, or a temporary registration when the
/// provider requires registered local buffers (`FI_MR_LOCAL`).
fn local_desc<B: IoBuf>(
    ep: &Endpoint,
    buf: &B,
) -> Result<(*mut std::os::raw::c_void, Option<MemoryRegion<RawMemory>>)> {
    if let Some(d) = buf.io_desc() {
        return Ok((d, None));
    }
    if !ep.needs_local_mr() || buf.io_len() == 0 {
        return Ok((std::ptr::null_mut(), None));
    }
    // SAFETY: the region is stored in the Pending next to the buffer and released before it
    // (field order, and explicitly in `finish`); the buffer's memory is heap-backed and fixed
    // (IoBuf contract).
    let mr = unsafe {
        MemoryRegion::register_raw(
            ep.domain(),
            buf.io_ptr(),
            buf.io_len(),
            Access::LOCAL,
            Some(ep),
        )?
    };
    Ok((mr.desc(), Some(mr)))
}

impl Endpoint {
    /// Rejects peers that are not in this endpoint's AV (libfabric's behaviour for them is
    /// undefined). `FiAddr::UNSPEC` is accepted where `any_ok` (receives from anyone).
    pub(crate) fn check_peer(&self, op: &'static str, addr: FiAddr, any_ok: bool) -> Result<()> {
        if (any_ok && addr == FiAddr::UNSPEC) || self.av().contains(addr) {
            return Ok(());
        }
        Err(Error::UnknownPeer { op, addr })
    }

    fn check_size(&self, op: &'static str, len: usize) -> Result<()> {
        crate::error::check_len(op, len, self.max_msg_size(), SizeLimit::MaxMsg)
    }

    /// Common path of every safe post: size check, local registration, context, retry on
    /// FI_EAGAIN.
    fn start<B: IoBuf>(
        &self,
        buf: B,
        kind: Kind,
        budget: Option<Duration>,
        op: &'static str,
        peer: FiAddr,
        post: impl Fn(
            &Endpoint,
            &B,
            *mut std::os::raw::c_void,
            *mut std::os::raw::c_void,
        ) -> Result<bool>,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        let len = buf.io_len();
        let any_ok = kind == Kind::Recv;
        if let Err(e) = self
            .check_peer(op, peer, any_ok)
            .and_then(|()| self.check_size(op, len))
        {
            return Err(OpError::new(e, Some(buf)));
        }
        let (desc, mr) = match local_desc(self, &buf) {
            Ok(x) => x,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        let ctx = OpContext::new_boxed();
        let raw_ctx = ctx.as_raw();
        let budget = budget.unwrap_or_else(|| self.post_timeout());
        let posted = self.retry_post_within(op, peer, budget, || post(self, &buf, desc, raw_ctx));
        match posted {
            Ok(()) => Ok(Pending {
                ctx: Some(ctx),
                mr,
                buf: Some(buf),
                ep: self.clone(),
                kind,
                op,
                len,
            }),
            // Not posted: the provider never saw the buffer.
            Err(e) => {
                drop(mr);
                Err(OpError::new(e, Some(buf)))
            }
        }
    }

    /// Sends `buf` to `dest` (`fi_send`).
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] above `max_msg_size`; `fi_send` errors; registration errors
    /// under `FI_MR_LOCAL`. The buffer comes back in the [`OpError`].
    pub fn send<B: IoBuf>(
        &self,
        buf: B,
        dest: FiAddr,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        self.start(buf, Kind::Send, None, "send", dest, |ep, b, desc, ctx| {
            // SAFETY: the Pending owns the buffer (fixed heap memory), the registration and
            // the context until the completion is read or the endpoint closes.
            unsafe { ep.post_send(b.io_ptr(), b.io_len(), desc, dest, ctx) }
        })
    }

    /// Sends `buf` with remote CQ data `data` (`fi_senddata`).
    ///
    /// # Errors
    /// As [`Endpoint::send`].
    pub fn senddata<B: IoBuf>(
        &self,
        buf: B,
        data: u64,
        dest: FiAddr,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        self.start(
            buf,
            Kind::Send,
            None,
            "senddata",
            dest,
            |ep, b, desc, ctx| {
                // SAFETY: as in `send`.
                unsafe { ep.post_senddata(b.io_ptr(), b.io_len(), desc, data, dest, ctx) }
            },
        )
    }

    /// Sends `buf` to `dest` with `tag` (`fi_tsend`).
    ///
    /// # Errors
    /// As [`Endpoint::send`].
    pub fn tsend<B: IoBuf>(
        &self,
        buf: B,
        dest: FiAddr,
        tag: u64,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        self.start(buf, Kind::Send, None, "tsend", dest, |ep, b, desc, ctx| {
            // SAFETY: as in `send`.
            unsafe { ep.post_tsend(b.io_ptr(), b.io_len(), desc, dest, tag, ctx) }
        })
    }

    /// [`Endpoint::tsend`] that retries a full queue (`FI_EAGAIN`) for at most `budget`
    /// instead of the endpoint's post timeout: for probes and other optional messages that
    /// must not hold the caller (a connection-oriented provider answers `FI_EAGAIN` while it
    /// tries to reach a peer that is gone).
    ///
    /// # Errors
    /// As [`Endpoint::send`]; [`Error::Timeout`] when the post did not go through in time.
    pub fn tsend_within<B: IoBuf>(
        &self,
        buf: B,
        dest: FiAddr,
        tag: u64,
        budget: Duration,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        self.start(
            buf,
            Kind::Send,
            Some(budget),
            "tsend",
            dest,
            |ep, b, desc, ctx| {
                // SAFETY: as in `send`.
                unsafe { ep.post_tsend(b.io_ptr(), b.io_len(), desc, dest, tag, ctx) }
            },
        )
    }

    /// Tagged send with remote CQ data (`fi_tsenddata`).
    ///
    /// # Errors
    /// As [`Endpoint::send`].
    pub fn tsenddata<B: IoBuf>(
        &self,
        buf: B,
        data: u64,
        dest: FiAddr,
        tag: u64,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        self.start(
            buf,
            Kind::Send,
            None,
            "tsenddata",
            dest,
            |ep, b, desc, ctx| {
                // SAFETY: as in `send`.
                unsafe { ep.post_tsenddata(b.io_ptr(), b.io_len(), desc, data, dest, tag, ctx) }
            },
        )
    }

    /// Receives a message from `src` ([`FiAddr::UNSPEC`]: anyone) into `buf` (`fi_recv`).
    ///
    /// # Errors
    /// As [`Endpoint::send`]; a message larger than `buf` completes with
    /// [`Error::Truncated`].
    pub fn recv<B: IoBufMut>(
        &self,
        buf: B,
        src: FiAddr,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        self.start(buf, Kind::Recv, None, "recv", src, |ep, b, desc, ctx| {
            // SAFETY: the Pending owns the buffer exclusively until completion; the pointer
            // is derived from the owned value, which nobody else can access meanwhile.
            unsafe { ep.post_recv(b.io_ptr() as *mut u8, b.io_len(), desc, src, ctx) }
        })
    }

    /// Receives a message whose tag matches `tag` in every bit not set in `ignore`
    /// (`fi_trecv`).
    ///
    /// # Errors
    /// As [`Endpoint::recv`].
    pub fn trecv<B: IoBufMut>(
        &self,
        buf: B,
        src: FiAddr,
        tag: u64,
        ignore: u64,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        self.start(buf, Kind::Recv, None, "trecv", src, |ep, b, desc, ctx| {
            // SAFETY: as in `recv`.
            unsafe {
                ep.post_trecv(
                    b.io_ptr() as *mut u8,
                    b.io_len(),
                    desc,
                    src,
                    tag,
                    ignore,
                    ctx,
                )
            }
        })
    }

    /// Writes `buf` into the peer's `remote` region at `offset` (`fi_write`).
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] (nothing is transferred) for a range outside `remote`;
    /// otherwise as [`Endpoint::send`].
    pub fn write<B: IoBuf>(
        &self,
        buf: B,
        dest: FiAddr,
        remote: &RemoteRegion,
        offset: u64,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        let addr = match remote.address_of("write", offset, buf.io_len()) {
            Ok(a) => a,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        let key = remote.key;
        self.start(buf, Kind::Write, None, "write", dest, |ep, b, desc, ctx| {
            // SAFETY: as in `send`.
            unsafe { ep.post_write(b.io_ptr(), b.io_len(), desc, dest, addr, key, ctx) }
        })
    }

    /// [`Endpoint::write`] that also delivers `data` to the target's CQ (`fi_writedata`).
    ///
    /// # Errors
    /// As [`Endpoint::write`].
    pub fn writedata<B: IoBuf>(
        &self,
        buf: B,
        data: u64,
        dest: FiAddr,
        remote: &RemoteRegion,
        offset: u64,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        let addr = match remote.address_of("writedata", offset, buf.io_len()) {
            Ok(a) => a,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        let key = remote.key;
        self.start(
            buf,
            Kind::Write,
            None,
            "writedata",
            dest,
            |ep, b, desc, ctx| {
                // SAFETY: as in `send`.
                unsafe {
                    ep.post_writedata(b.io_ptr(), b.io_len(), desc, data, dest, addr, key, ctx)
                }
            },
        )
    }

    /// Reads `buf.len()` bytes from the peer's `remote` region at `offset` into `buf`
    /// (`fi_read`).
    ///
    /// # Errors
    /// As [`Endpoint::write`].
    pub fn read<B: IoBufMut>(
        &self,
        buf: B,
        src: FiAddr,
        remote: &RemoteRegion,
        offset: u64,
    ) -> std::result::Result<Pending<B>, OpError<B>> {
        let addr = match remote.address_of("read", offset, buf.io_len()) {
            Ok(a) => a,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        let key = remote.key;
        self.start(buf, Kind::Read, None, "read", src, |ep, b, desc, ctx| {
            // SAFETY: as in `recv`.
            unsafe { ep.post_read(b.io_ptr() as *mut u8, b.io_len(), desc, src, addr, key, ctx) }
        })
    }
}

// ---- borrowed user memory: exposure for remote read, and scoped RMA ------------------------

/// Borrowed user memory registered for remote read (`FI_REMOTE_READ`) on one endpoint's
/// domain, for as long as the borrow: the sender's side of a rendezvous by RMA read (RGET).
/// Put [`Exposed::remote`] (address, key, length) in the message that announces the data; the
/// peer then reads it with [`RmaScope::read`] or [`Endpoint::read_into`]. Dropping the value
/// deregisters the memory (`fi_close`); a peer's read after that fails on the peer's side.
///
/// The remote address follows the provider's convention: the virtual address of the bytes
/// under `FI_MR_VIRT_ADDR`, else 0 (offsets), as [`MemoryRegion::remote`]; readers just use
/// offsets within the [`RemoteRegion`]. A zero-length buffer is not registered (its remote
/// region has length 0, and reading 0 bytes of it posts nothing).
///
/// # Soundness
/// Peers only read: the memory is borrowed shared (`&'a [u8]`), so nobody writes it while it
/// is exposed, and remote reads do not change it. If the value is leaked (`mem::forget`), the
/// registration stays open after the borrow ends; peers holding the key may then read
/// whatever the memory holds later (or fail, once it is unmapped), which discloses bytes to
/// that peer but cannot change memory of this process. No write access is asked for
/// ([`Error::SharedRemoteWrite`] guards `MemoryRegion<&[T]>`); libfabric's MR cache on verbs
/// and efa registers with every right and keeps keys valid until eviction (see the crate
/// docs, "Registration cache"), so this relies on peers of the job using keys only as the
/// protocol says, as any RMA does.
///
/// # Example
/// ```no_run
/// # fn main() -> efa_fabric::Result<()> {
/// # let info = efa_fabric::Hints::new().provider("shm").get()?.remove(0);
/// # let a = efa_fabric::Endpoint::open(&info)?;
/// # let b = efa_fabric::Endpoint::open(&info)?;
/// # let a_at_b = b.av().insert(&a.name()?)?;
/// use std::time::Duration;
/// let data = vec![7u8; 1 << 20];
/// // Sender: expose the user's buffer and put its descriptor in the RTS.
/// let exposed = a.expose(&data)?;
/// let rts: [u8; efa_fabric::RemoteRegion::WIRE_LEN] = exposed.remote().to_bytes();
/// // Receiver: read straight into the user's buffer; returns once the read is drained.
/// let remote = efa_fabric::RemoteRegion::from_bytes(&rts)?;
/// let mut dest = vec![0u8; 1 << 20];
/// b.read_into(&mut dest, a_at_b, &remote, 0, Duration::from_secs(5))?;
/// drop(exposed); // after the FIN: deregisters, the borrow of `data` ends
/// # Ok(()) }
/// ```
pub struct Exposed<'a> {
    /// `None` for a zero-length buffer (not registered).
    mr: Option<MemoryRegion<&'a [u8]>>,
}

impl std::fmt::Debug for Exposed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposed")
            .field("len", &self.len())
            .field("remote", &self.remote())
            .finish()
    }
}

impl Exposed<'_> {
    /// What the peer needs to read the memory: address for offset 0, key, length in bytes.
    pub fn remote(&self) -> RemoteRegion {
        match &self.mr {
            Some(mr) => mr.remote(),
            None => RemoteRegion {
                addr: 0,
                key: 0,
                len: 0,
            },
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mr.as_ref().map_or(0, MemoryRegion::len)
    }

    /// True for an empty exposure.
    pub fn is_empty(&self) -> bool {
        self.mr.is_none()
    }
}

impl Endpoint {
    /// Registers `buf` for remote read on this endpoint's domain for the borrow's length
    /// (`fi_mr_regattr` with `FI_REMOTE_READ`; bound to this endpoint under `FI_MR_ENDPOINT`).
    /// See [`Exposed`].
    ///
    /// Cost: one registration per call. On shm and tcp it is a table insert; on verbs and efa
    /// it pins pages, and libfabric's own MR cache (on by default there, tuned by
    /// `FI_MR_CACHE_MAX_SIZE` / `FI_MR_CACHE_MAX_COUNT`, invalidated by its memory monitor
    /// `FI_MR_CACHE_MONITOR`) makes repeated registrations of the same buffer cheap.
    ///
    /// # Errors
    /// [`Error::MemlockLimit`] (verbs, efa: `ulimit -l` too low); [`Error::RawMrKey`];
    /// other `fi_mr_regattr` errors.
    pub fn expose<'a>(&self, buf: &'a [u8]) -> Result<Exposed<'a>> {
        if buf.is_empty() {
            return Ok(Exposed { mr: None });
        }
        let mr = MemoryRegion::register(self.domain(), buf, Access::REMOTE_READ, Some(self))?;
        Ok(Exposed { mr: Some(mr) })
    }

    /// Reads `buf.len()` bytes from the peer's `remote` region at byte `offset` straight into
    /// `buf` (`fi_read`, split at `max_msg_size`), and returns once every read has completed,
    /// failed, or been cancelled and reaped: the borrow of `buf` ends only when no NIC can
    /// write it any more. Returns the number of bytes read. The blocking form of
    /// [`RmaScope::read`].
    ///
    /// # Errors
    /// As [`RmaScope::read`] and [`RmaScope::wait`]: [`Error::OutOfBounds`] (nothing read),
    /// completion errors, [`Error::Timeout`] after `timeout` (the read was then cancelled and
    /// drained; `buf` holds unspecified bytes).
    pub fn read_into(
        &self,
        buf: &mut [u8],
        src: FiAddr,
        remote: &RemoteRegion,
        offset: u64,
        timeout: Duration,
    ) -> Result<usize> {
        rma_scope(timeout, |s| {
            let id = s.read(self, buf, src, remote, offset)?;
            s.wait(id)
        })
    }
}

/// One posted chunk of a scoped RMA operation.
struct ScopedOp {
    ctx: Box<OpContext>,
    ep: Endpoint,
    len: usize,
}

/// A scoped operation: indices into the scope's chunk list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopedId {
    first: usize,
    count: usize,
    len: usize,
    op: &'static str,
}

impl ScopedId {
    /// Bytes the operation moves.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte operation (nothing was posted).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// RMA on borrowed memory, drained before the borrows end. Made by [`rma_scope`]; see there.
pub struct RmaScope<'scope, 'env: 'scope> {
    // The drain lives in a field without lifetimes: a Drop on RmaScope itself would make
    // the borrow `&'scope RmaScope<'scope, _>` outlive the value.
    ops: std::cell::RefCell<Drain>,
    deadline: Deadline,
    timeout: Duration,
    // Invariant in both lifetimes, as std::thread::Scope.
    _scope: std::marker::PhantomData<&'scope mut &'scope ()>,
    _env: std::marker::PhantomData<&'env mut &'env ()>,
}

impl std::fmt::Debug for RmaScope<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RmaScope")
            .field("chunks", &self.ops.borrow().ops.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Runs `f` with a scope in which RMA operations may use BORROWED memory: reads land in, and
/// writes take from, `&'scope` borrows, and before `rma_scope` returns (or unwinds) every
/// operation posted in the scope has completed, failed, or been cancelled and reaped. The
/// receiver's side of a rendezvous by RMA read (RGET) posts its reads in such a scope, from
/// inside the call that holds the user's receive buffer. Operations [`RmaScope::wait`]ed for
/// report their result; those left running when `f` returns are cancelled (`fi_cancel`) and
/// drained, as [`Pending`] is on drop.
///
/// `timeout` bounds every wait in the scope ([`Error::Timeout`]).
///
/// # Soundness
/// The shape is `std::thread::scope`'s: `f` gets `&'scope RmaScope`, with `'scope` chosen
/// by `rma_scope`, so a buffer passed to [`RmaScope::read`] stays mutably borrowed until the
/// scope ends and cannot be touched meanwhile (a compile error), and the scope itself lives
/// in `rma_scope`'s frame: the caller can neither drop nor `mem::forget` it, so the drain
/// always runs, also when `f` panics. `ScopedId`s are plain values; leaking one changes
/// nothing. If the provider neither completes nor cancels an operation within
/// [`CANCEL_GRACE`], the drain keeps progressing (logging an error every few seconds) rather
/// than return while a NIC may still write memory that safe code owns again: a read to a
/// peer that is alive but stalled completes when the peer progresses; one to a dead peer
/// fails when the provider notices the loss.
///
/// # Example
/// Two rendezvous reads at once, from inside a call that holds both receive buffers (as
/// `wait_all` over two receive requests would):
/// ```no_run
/// # fn main() -> efa_fabric::Result<()> {
/// # let info = efa_fabric::Hints::new().provider("shm").get()?.remove(0);
/// # let ep = efa_fabric::Endpoint::open(&info)?;
/// # let peer = ep.av().insert(&ep.name()?)?;
/// # let (rts1, rts2) = ([0u8; 24], [0u8; 24]);
/// use std::time::Duration;
/// use efa_fabric::{rma_scope, RemoteRegion};
/// let (r1, r2) = (RemoteRegion::from_bytes(&rts1)?, RemoteRegion::from_bytes(&rts2)?);
/// let mut buf1 = vec![0u8; r1.len as usize];
/// let mut buf2 = vec![0u8; r2.len as usize];
/// let got = rma_scope(Duration::from_secs(30), |s| -> efa_fabric::Result<usize> {
///     let a = s.read(&ep, &mut buf1, peer, &r1, 0)?;
///     let b = s.read(&ep, &mut buf2, peer, &r2, 0)?;
///     Ok(s.wait(a)? + s.wait(b)?)
/// })?;
/// // Both reads are drained here: buf1 and buf2 are the caller's again.
/// # let _ = got;
/// # Ok(()) }
/// ```
pub fn rma_scope<'env, R>(
    timeout: Duration,
    f: impl for<'scope> FnOnce(&'scope RmaScope<'scope, 'env>) -> R,
) -> R {
    let scope = RmaScope {
        ops: std::cell::RefCell::new(Drain::new()),
        deadline: Deadline::after(timeout),
        timeout,
        _scope: std::marker::PhantomData,
        _env: std::marker::PhantomData,
    };
    f(&scope)
    // `scope` drops here (or while unwinding): Drop drains every chunk.
}

impl<'scope> RmaScope<'scope, '_> {
    /// Reads `buf.len()` bytes from `src`'s `remote` region at byte `offset` into `buf`
    /// (`fi_read`), split into chunks of at most the endpoint's `max_msg_size`. Under
    /// `FI_MR_LOCAL`, `buf` is registered for the scope. `buf` stays borrowed until the scope
    /// ends; [`RmaScope::wait`] tells when the data is there.
    ///
    /// # Errors
    /// [`Error::UnknownPeer`] for an address not in the endpoint's AV; [`Error::OutOfBounds`]
    /// when the range is outside `remote` (nothing posted); registration errors;
    /// `fi_read` errors and [`Error::Timeout`] when the queue stays full until the scope's
    /// deadline (a provider that connects on first use answers "full" until the peer
    /// accepts). If a later chunk fails to post, the earlier ones are drained with the scope.
    pub fn read(
        &'scope self,
        ep: &Endpoint,
        buf: &'scope mut [u8],
        src: FiAddr,
        remote: &RemoteRegion,
        offset: u64,
    ) -> Result<ScopedId> {
        let ptr = buf.as_mut_ptr();
        let len = buf.len();
        // SAFETY: `buf` is borrowed exclusively for 'scope, and the scope drains every chunk
        // before 'scope ends (Drop; the scope cannot be leaked, see rma_scope), so the
        // memory stays valid and untouched by anyone else while the NIC may write it.
        unsafe { self.post("read", ep, ptr, len, src, remote, offset, Access::READ) }
    }

    /// Writes `buf` into `dest`'s `remote` region at byte `offset` (`fi_write`), split as
    /// [`RmaScope::read`]. `buf` stays borrowed (shared) until the scope ends.
    ///
    /// # Errors
    /// As [`RmaScope::read`].
    pub fn write(
        &'scope self,
        ep: &Endpoint,
        buf: &'scope [u8],
        dest: FiAddr,
        remote: &RemoteRegion,
        offset: u64,
    ) -> Result<ScopedId> {
        // SAFETY: `buf` is borrowed (shared: nobody writes it) for 'scope and every chunk is
        // drained before 'scope ends; the NIC only reads it.
        unsafe {
            self.post(
                "write",
                ep,
                buf.as_ptr() as *mut u8,
                buf.len(),
                dest,
                remote,
                offset,
                Access::WRITE,
            )
        }
    }

    /// # Safety
    /// `ptr..ptr+len` stays valid (and, for reads, unaliased) until this scope is dropped.
    #[allow(clippy::too_many_arguments)]
    unsafe fn post(
        &self,
        op: &'static str,
        ep: &Endpoint,
        ptr: *mut u8,
        len: usize,
        peer: FiAddr,
        remote: &RemoteRegion,
        offset: u64,
        local: Access,
    ) -> Result<ScopedId> {
        ep.check_peer(op, peer, false)?;
        let base = remote.address_of(op, offset, len)?;
        let first = self.ops.borrow().ops.len();
        let mut id = ScopedId {
            first,
            count: 0,
            len,
            op,
        };
        if len == 0 {
            return Ok(id);
        }
        let desc = if ep.needs_local_mr() {
            // SAFETY: the caller keeps the memory valid until the scope drops, and the
            // registration is stored in the scope and released after every chunk is drained.
            let mr = unsafe {
                MemoryRegion::register_raw(ep.domain(), ptr, len, local | Access::LOCAL, Some(ep))?
            };
            let d = mr.desc();
            self.ops.borrow_mut().regs.push(mr);
            d
        } else {
            std::ptr::null_mut()
        };
        let chunk = ep.max_msg_size().max(1);
        let key = remote.key;
        let mut done = 0usize;
        while done < len {
            let n = chunk.min(len - done);
            let ctx = OpContext::new_boxed();
            let raw_ctx = ctx.as_raw();
            // SAFETY: done + n <= len.
            let p = unsafe { ptr.add(done) };
            let addr = base + done as u64;
            // A full queue is retried until the scope's deadline, not the endpoint's
            // (longer) post timeout: the deadline bounds everything in the scope.
            let budget = self.timeout.saturating_sub(self.deadline.waited());
            ep.retry_post_within(op, peer, budget, || {
                // SAFETY: the caller keeps ptr..ptr+len valid until the scope drops; the
                // context is boxed (fixed address) and kept in the scope until its
                // completion is read; desc covers the buffer when required.
                unsafe {
                    if local == Access::READ {
                        ep.post_read(p, n, desc, peer, addr, key, raw_ctx)
                    } else {
                        ep.post_write(p, n, desc, peer, addr, key, raw_ctx)
                    }
                }
            })
            .map_err(|e| match e {
                // Say how long the scope waited in all, not only this post.
                Error::Timeout { op, .. } => Error::Timeout {
                    op,
                    waited: self.deadline.waited(),
                },
                other => other,
            })?;
            self.ops.borrow_mut().ops.push(ScopedOp {
                ctx,
                ep: ep.clone(),
                len: n,
            });
            id.count += 1;
            done += n;
        }
        Ok(id)
    }

    fn all_done(&self, id: ScopedId) -> bool {
        self.ops.borrow().ops[id.first..id.first + id.count]
            .iter()
            .all(|o| o.ctx.is_done())
    }

    /// Progresses the endpoints of `id`'s chunks once and tells whether all completed.
    ///
    /// # Errors
    /// CQ read errors that belong to no operation.
    pub fn test(&self, id: ScopedId) -> Result<bool> {
        if !self.all_done(id) {
            self.progress(id).1?;
        }
        Ok(self.all_done(id))
    }

    /// Progresses the endpoints of `id`'s chunks once each ([`progress_distinct`]).
    fn progress(&self, id: ScopedId) -> (usize, Result<()>) {
        // Progress only reads CQs and marks contexts done; nothing posts to this scope
        // meanwhile, so the shared borrow of the chunk list is not contended.
        progress_distinct(&self.ops.borrow().ops[id.first..id.first + id.count])
    }

    /// Waits until every chunk of `id` has completed, or the scope's deadline. Returns the
    /// bytes moved.
    ///
    /// # Errors
    /// The first failed chunk's completion error; [`Error::Timeout`] at the deadline (the
    /// operation stays in the scope, which cancels and drains it when it ends; a read's
    /// buffer then holds unspecified bytes).
    pub fn wait(&self, id: ScopedId) -> Result<usize> {
        let mut backoff = Backoff::new();
        // The deadline is the scope's (set when it began), read every 64 polls.
        let mut polls = 0u32;
        while !self.all_done(id) {
            let (n, res) = self.progress(id);
            res?;
            if n == 0 {
                backoff.snooze();
            } else {
                backoff.reset();
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(64) && !self.all_done(id) && self.deadline.expired() {
                return Err(Error::Timeout {
                    op: id.op,
                    waited: self.deadline.waited(),
                });
            }
        }
        let ops = self.ops.borrow();
        let mut moved = 0;
        for o in &ops.ops[id.first..id.first + id.count] {
            match o.ctx.result().expect("done") {
                Ok(_) => moved += o.len,
                Err(ce) => return Err(Error::Completion(ce)),
            }
        }
        Ok(moved)
    }

    /// Waits for every operation posted in this scope so far ([`RmaScope::wait`]).
    ///
    /// # Errors
    /// As [`RmaScope::wait`], for the first operation that fails.
    pub fn wait_all(&self) -> Result<()> {
        let count = self.ops.borrow().ops.len();
        let all = ScopedId {
            first: 0,
            count,
            len: 0,
            op: "rma",
        };
        self.wait(all).map(|_| ())
    }
}

/// The chunks posted in a scope and the temporary registrations they use. Dropping it
/// cancels what is still running and waits until every chunk is reaped; only then are the
/// contexts freed and the registrations closed (field order).
struct Drain {
    ops: Vec<ScopedOp>,
    regs: Vec<MemoryRegion<RawMemory>>,
}

thread_local! {
    /// The (emptied) chunk list of this thread's last [`rma_scope`], for the next one: a
    /// scope per rendezvous message (the receiver's RGET) then allocates no list.
    static SPARE_OPS: std::cell::Cell<Vec<ScopedOp>> = const { std::cell::Cell::new(Vec::new()) };
}
/// A chunk list with room for more than this many chunks is not kept for reuse.
const SPARE_OPS_KEEP: usize = 1024;

/// Progresses each endpoint that `ops` were posted on once (chunks mostly share one),
/// also after one fails; returns the completions read and the first CQ read error. Builds
/// no list of the endpoints: this runs per poll.
fn progress_distinct(ops: &[ScopedOp]) -> (usize, Result<()>) {
    let (mut n, mut res) = (0, Ok(()));
    for (i, o) in ops.iter().enumerate() {
        if ops[..i].iter().all(|p| p.ep.raw() != o.ep.raw()) {
            match o.ep.progress() {
                Ok(k) => n += k,
                Err(e) => res = res.and(Err(e)),
            }
        }
    }
    (n, res)
}

impl Drain {
    /// An empty drain, with this thread's spare chunk list if it has one.
    fn new() -> Drain {
        Drain {
            // (No spare once this thread's locals are being destroyed: a new list.)
            ops: SPARE_OPS
                .try_with(std::cell::Cell::take)
                .unwrap_or_default(),
            regs: Vec::new(),
        }
    }

    /// Cancels the chunks still running and progresses their endpoints until every chunk
    /// is reaped, however long the provider takes (logging every few seconds).
    fn cancel_and_reap(&self) {
        let ops = &self.ops;
        for o in ops.iter().filter(|o| !o.ctx.is_done()) {
            if let Err(e) = o.ep.cancel(&o.ctx) {
                tracing::debug!("fi_cancel of a scoped RMA operation: {e}");
            }
        }
        let started = std::time::Instant::now();
        let mut next_report = started + CANCEL_GRACE;
        let mut backoff = Backoff::new();
        while !ops.iter().all(|o| o.ctx.is_done()) {
            // A CQ read error belongs to no chunk here: keep progressing until all are done.
            let (n, _) = progress_distinct(ops);
            if n == 0 {
                backoff.snooze();
            } else {
                backoff.reset();
            }
            if std::time::Instant::now() >= next_report {
                let left = ops.iter().filter(|o| !o.ctx.is_done()).count();
                tracing::error!(
                    left,
                    waited = ?started.elapsed(),
                    "RMA on borrowed memory neither completed nor cancelled; still waiting: \
                     returning would let the provider write memory the caller owns again"
                );
                next_report += Duration::from_secs(5);
            }
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        if !self.ops.iter().all(|o| o.ctx.is_done()) {
            self.cancel_and_reap();
        }
        // Every context is done: they go back for reuse (as Pending's do), then the
        // registrations close (field order).
        for o in self.ops.drain(..) {
            OpContext::recycle(o.ctx);
        }
        if self.ops.capacity() <= SPARE_OPS_KEEP {
            let ops = std::mem::take(&mut self.ops);
            // (Once this thread's locals are being destroyed, the list is just freed.)
            let _ = SPARE_OPS.try_with(|spare| spare.set(ops));
        }
    }
}

/// The smallest rendezvous payload, in bytes, for which reading straight from the sender's
/// registered buffer (RGET: [`Endpoint::expose`] + RTS, [`Endpoint::read_into`] into the
/// user's buffer, then a small FIN) beats a tagged send/receive through registered bounce
/// buffers with a copy at each end, for `provider` (a name as [`crate::Info::provider`]
/// gives it, e.g. `shm`, `tcp;ofi_rxm`). `None` when RGET should not be used on that
/// provider.
///
/// Measured with `cargo run --release -p efa-fabric --example rget_sweep` (one process, one
/// thread polling both endpoints, medians of 5 and then 7 alternating runs, registration
/// included in RGET; libfabric 1.17 on a 2-core host under a load average of 7-14, so single
/// points are noisy):
/// - `shm`: RGET (one copy by cross-memory attach) wins from 32-64 KiB on: 1.3-1.4x at
///   64 KiB, 1.6-7.9x from 128 KiB to 4 MiB; below 32 KiB the two are within noise.
/// - `tcp;ofi_rxm` on lo: RGET wins from 32 KiB on in most points (1.1-3.6x up to 4 MiB;
///   2 of 16 points above 64 KiB were slower, 0.83-0.88x); below, the copy path wins
///   (0.5-0.7x at 8-16 KiB).
/// - `udp;ofi_rxd`: RMA is emulated over datagrams and never faster (0.35-1.05x): `None`.
/// - `verbs;ofi_rxm` on the soft-RoCE device of the CI VM (the kernel copies, under
///   emulation): RGET 1.1-1.7x from 128 KiB to 2 MiB, slower at 32-64 KiB and at 4 MiB, all
///   within that device's large noise. Real verbs and efa hardware (zero-copy, registration
///   served by libfabric's MR cache) were not measured; they get 64 KiB, the value for shm
///   and tcp and about where MPI implementations switch to RGET.
pub fn rget_threshold(provider: &str) -> Option<usize> {
    match crate::info::core_provider(provider) {
        "udp" => None,
        _ => Some(RGET_THRESHOLD),
    }
}

/// [`rget_threshold`] of every provider with native RMA: measured for shm and tcp, assumed
/// for the others (see there).
const RGET_THRESHOLD: usize = 64 << 10;
