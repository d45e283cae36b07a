//! The benchmark's view of efa-fabric: opening a pinned endpoint, and a data path with no
//! allocation, lock or clock read per operation (`unsafe fn post_*` with reusable
//! [`OpContext`]s, busy-polling the CQ), every wait bounded by a deadline.

use std::os::raw::c_void;
use std::time::Duration;

use efa_fabric::{
    AddrFormat, Caps, Completion, CompletionQueue, Endpoint, FiAddr, Hints, OpContext, PollClock,
    RegisteredBuf, RemoteRegion,
};

use crate::oob::Oob;
use crate::opts::{is_ip_provider, Common};
use crate::{err, Result};

/// Tag of benchmark data messages.
pub const TAG_DATA: u64 = 0x1;
/// Tag of window acknowledgements (bw).
pub const TAG_ACK: u64 = 0x2;
/// Tag of the end-of-size notice (rma).
pub const TAG_FIN: u64 = 0x3;

/// Polls between two out-of-band liveness checks (x16) in `wait_while_peer_alive`.
/// (A power of two: tested with a mask.)
const POLLS_PER_CLOCK: u32 = 1024;

/// Opens an endpoint for `c.provider`, pinned to `c.domain` (`lo` for IP providers).
pub fn open_endpoint(c: &Common, caps: Caps) -> Result<Endpoint> {
    let mut hints = Hints::new().provider(c.provider.clone()).caps(caps);
    let domain = if is_ip_provider(&c.provider) {
        let d = c.domain.clone().unwrap_or_else(|| "lo".to_string());
        hints = hints.domain(d.clone()).addr_format(AddrFormat::SockaddrIn);
        Some(d)
    } else {
        if let Some(d) = &c.domain {
            hints = hints.domain(d.clone());
        }
        c.domain.clone()
    };
    let infos = hints.get().map_err(|e| {
        err(format!(
            "provider '{}'{} is not available with caps {caps:?}: {e} (see `fi_info -p '{}'`)",
            c.provider,
            domain
                .map(|d| format!(" on domain '{d}'"))
                .unwrap_or_default(),
            c.provider
        ))
    })?;
    let info = infos
        .into_iter()
        .find(|i| i.provider() == c.provider)
        .ok_or_else(|| err(format!("fi_getinfo returned no '{}' provider", c.provider)))?;
    Ok(Endpoint::open(&info)?)
}

/// One reusable operation context.
#[derive(Debug)]
pub struct Slot {
    ctx: Box<OpContext>,
    posted: bool,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            ctx: OpContext::new_boxed(),
            posted: false,
        }
    }
}

impl Slot {
    fn arm(&mut self) -> Result<*mut c_void> {
        if self.posted {
            return Err(err(
                "internal: slot reused while its operation is in flight",
            ));
        }
        if self.ctx.is_done() {
            self.ctx.reset();
        }
        Ok(self.ctx.as_raw())
    }
    pub fn is_done(&self) -> bool {
        self.ctx.is_done()
    }
    pub fn ctx(&self) -> &OpContext {
        &self.ctx
    }
    pub fn is_posted(&self) -> bool {
        self.posted
    }
    /// Takes the completion of a done operation.
    pub fn finish(&mut self, what: &str) -> Result<Completion> {
        self.posted = false;
        match self.ctx.result() {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(err(format!("{what} failed: {e}"))),
            None => Err(err(format!("internal: {what} finished before completion"))),
        }
    }
}

/// Endpoint, peer and timeout: everything the data path needs.
#[derive(Debug)]
pub struct Net {
    pub ep: Endpoint,
    cq: CompletionQueue,
    pub peer: FiAddr,
    pub inject_size: usize,
    pub timeout: Duration,
}

impl Net {
    pub fn new(ep: Endpoint, peer: FiAddr, timeout: Duration) -> Net {
        Net {
            cq: ep.tx_cq().clone(),
            inject_size: ep.inject_size(),
            ep,
            peer,
            timeout,
        }
    }

    #[inline]
    pub fn poll(&self) -> Result<()> {
        // The endpoint has one CQ for both directions (Endpoint::open).
        self.cq.poll()?;
        Ok(())
    }

    /// Busy-polls the CQ until `done()`, failing after the timeout. The clock is read only
    /// every [`PollClock::EVERY`] empty polls.
    #[inline]
    pub fn wait(&self, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
        let mut clock = PollClock::new(self.timeout);
        while !done() {
            self.poll()?;
            if clock.expired() {
                return Err(err(format!(
                    "{what} did not complete within {:?} (peer dead or stuck?)",
                    self.timeout
                )));
            }
        }
        Ok(())
    }

    /// Busy-polls until `done()` with no deadline of its own, as long as the peer is alive
    /// (its out-of-band connection open): for the passive side of RMA runs.
    pub fn wait_while_peer_alive(
        &self,
        oob: &Oob,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> Result<()> {
        let mut polls = 0u32;
        while !done() {
            self.poll()?;
            polls = polls.wrapping_add(1);
            if polls & (16 * POLLS_PER_CLOCK - 1) == 0 && !oob.peer_alive()? {
                return Err(err(format!("peer went away while waiting for {what}")));
            }
        }
        Ok(())
    }

    /// Retries a raw post while the provider says `FI_EAGAIN`, progressing in between.
    #[inline]
    fn retry(&self, what: &str, mut post: impl FnMut() -> efa_fabric::Result<bool>) -> Result<()> {
        let mut clock = PollClock::new(self.timeout);
        loop {
            if post()? {
                return Ok(());
            }
            self.poll()?;
            if clock.expired() {
                return Err(err(format!(
                    "{what}: provider queue stayed full for {:?}",
                    self.timeout
                )));
            }
        }
    }

    /// Sends the first `len` bytes of `buf` (`fi_tinject` up to inject_size; the caller
    /// decides). Copied before return: no completion.
    #[inline]
    pub fn tinject(&self, buf: &[u8], tag: u64) -> Result<()> {
        Ok(self.ep.tinject(buf, self.peer, tag)?)
    }

    /// Posts a tagged send of `buf[..len]`.
    ///
    /// The buffer and slot are owned by the [`Session`], which keeps both alive (and the
    /// buffer unmodified) until the slot completes, and on teardown cancels and drains
    /// in-flight operations, leaking their memory if the provider never gives it back.
    #[inline]
    pub fn tsend(&self, slot: &mut Slot, buf: &RegisteredBuf, len: usize, tag: u64) -> Result<()> {
        let ctx = slot.arm()?;
        let len = len.min(buf.len());
        self.retry("fi_tsend", || {
            // SAFETY: see above: the Session keeps `buf` and `slot` alive and unmodified
            // until the completion is read; `len` is within the buffer; the descriptor is the
            // buffer's own registration; `peer` came from this endpoint's AV.
            unsafe {
                self.ep
                    .post_tsend(buf.as_ptr(), len, buf.mr().desc(), self.peer, tag, ctx)
            }
        })?;
        slot.posted = true;
        Ok(())
    }

    /// Posts a tagged receive into the whole of `buf`.
    ///
    /// Several receives may target the same buffer (as osu_bw does): the bytes are never
    /// read by Rust code, only written by the provider.
    #[inline]
    pub fn trecv(&self, slot: &mut Slot, buf: &RegisteredBuf, tag: u64) -> Result<()> {
        let ctx = slot.arm()?;
        self.retry("fi_trecv", || {
            // SAFETY: as in `tsend`; the buffer's contents are not read or written by Rust
            // while the receive is in flight (the Session owns it and the benchmark never
            // looks at it).
            unsafe {
                self.ep.post_trecv(
                    buf.as_ptr() as *mut u8,
                    buf.len(),
                    buf.mr().desc(),
                    self.peer,
                    tag,
                    0,
                    ctx,
                )
            }
        })?;
        slot.posted = true;
        Ok(())
    }

    /// Posts an RMA write of `buf[..len]` to the start of `remote`.
    #[inline]
    pub fn write(
        &self,
        slot: &mut Slot,
        buf: &RegisteredBuf,
        len: usize,
        remote: &RemoteRegion,
    ) -> Result<()> {
        let addr = remote.address_of("write", 0, len)?;
        let ctx = slot.arm()?;
        self.retry("fi_write", || {
            // SAFETY: as in `tsend`.
            unsafe {
                self.ep.post_write(
                    buf.as_ptr(),
                    len,
                    buf.mr().desc(),
                    self.peer,
                    addr,
                    remote.key,
                    ctx,
                )
            }
        })?;
        slot.posted = true;
        Ok(())
    }

    /// Posts an RMA read of `len` bytes from the start of `remote` into `buf`.
    #[inline]
    pub fn read(
        &self,
        slot: &mut Slot,
        buf: &RegisteredBuf,
        len: usize,
        remote: &RemoteRegion,
    ) -> Result<()> {
        let addr = remote.address_of("read", 0, len)?;
        let len = len.min(buf.len());
        let ctx = slot.arm()?;
        self.retry("fi_read", || {
            // SAFETY: as in `trecv` (the local buffer is only written by the provider).
            unsafe {
                self.ep.post_read(
                    buf.as_ptr() as *mut u8,
                    len,
                    buf.mr().desc(),
                    self.peer,
                    addr,
                    remote.key,
                    ctx,
                )
            }
        })?;
        slot.posted = true;
        Ok(())
    }
}
