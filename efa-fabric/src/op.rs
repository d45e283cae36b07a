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
use crate::mr::{Access, IoBuf, IoBufMut, MemoryRegion, RemoteRegion};
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
    mr: Option<MemoryRegion>,
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
) -> Result<(*mut std::os::raw::c_void, Option<MemoryRegion>)> {
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
