//! Reliable-datagram endpoints (`fi_endpoint(3)`) and their data-path calls (`fi_msg(3)`,
//! `fi_tagged(3)`, `fi_rma(3)`).
//!
//! Two levels:
//! - `unsafe fn post_*`: one libfabric call each, no allocation, no lock. The caller keeps the
//!   buffer and the [`OpContext`](crate::OpContext) alive until the completion has been read.
//! - Safe operations ([`Endpoint::send`], [`Endpoint::trecv`], [`Endpoint::write`], ...) take
//!   ownership of an [`IoBuf`](crate::IoBuf) and return a [`Pending`](crate::Pending) that gives the buffer back once the
//!   completion has been reaped. See [`crate::op`].

use std::os::raw::c_void;
use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use efa_ffi as ffi;

use crate::av::{AddressVector, FiAddr};
use crate::cntr::{Counter, CounterEvents};
use crate::cq::CompletionQueue;
use crate::error::{check, check_int, Error, Result};
use crate::fabric::{close_fid, Domain};
use crate::info::{Caps, Info, MrMode};
use crate::progress::{Backoff, Deadline};

/// Builds an [`Endpoint`]: the domain, address vector and completion queue are required;
/// everything else is optional.
#[derive(Debug)]
pub struct EndpointBuilder {
    domain: Domain,
    info: Option<Info>,
    av: AddressVector,
    tx_cq: CompletionQueue,
    rx_cq: Option<CompletionQueue>,
    counters: Vec<(Counter, CounterEvents)>,
    post_timeout: Duration,
    peer_check: Option<CheckFn>,
}

/// A [`PeerCheck`], printable for `Debug`.
#[derive(Clone)]
struct CheckFn(PeerCheck);

impl std::fmt::Debug for CheckFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCheck")
    }
}

/// Asked, while a post to a peer retries on a full queue, whether that peer is still worth
/// waiting for ([`EndpointBuilder::peer_check`]).
pub type PeerCheck = std::sync::Arc<dyn Fn(FiAddr) -> bool + Send + Sync>;

/// How often a retrying post asks its [`PeerCheck`].
const PEER_CHECK_INTERVAL: Duration = Duration::from_millis(50);

impl EndpointBuilder {
    /// The info to open the endpoint from. Default: the domain's info.
    pub fn info(mut self, info: &Info) -> Self {
        self.info = Some(info.clone());
        self
    }
    /// A separate CQ for receive completions. Default: the transmit CQ serves both.
    pub fn rx_cq(mut self, cq: &CompletionQueue) -> Self {
        self.rx_cq = Some(cq.clone());
        self
    }
    /// Binds a counter for the given events. Default: no counters.
    pub fn counter(mut self, cntr: &Counter, events: CounterEvents) -> Self {
        self.counters.push((cntr.clone(), events));
        self
    }
    /// How long a safe post retries while the provider's queues are full (`FI_EAGAIN`)
    /// before giving up with [`Error::Timeout`]. Default 60 s.
    pub fn post_timeout(mut self, t: Duration) -> Self {
        self.post_timeout = t;
        self
    }
    /// A check that a retrying post asks every 50 ms whether its peer is still alive. A post
    /// to a peer it answers `false` for stops retrying at once with [`Error::PeerGone`]
    /// instead of waiting out the post timeout: a dead peer's queue never drains. Default:
    /// none (posts retry for the whole post timeout).
    pub fn peer_check(mut self, check: PeerCheck) -> Self {
        self.peer_check = Some(CheckFn(check));
        self
    }

    /// Opens, binds and enables the endpoint (`fi_endpoint`, `fi_ep_bind`, `fi_enable`).
    ///
    /// # Errors
    /// Errors of those calls, e.g. `FI_EINVAL` from `fi_enable` when the provider rejects
    /// the configuration.
    pub fn build(self) -> Result<Endpoint> {
        let info = self.info.unwrap_or_else(|| self.domain.info().clone());
        let is_shm = info.provider() == "shm";
        if is_shm {
            // Regions left by killed processes of this user (see `crate::shm`).
            crate::shm::reclaim_on_open();
        }
        // Endpoint creation is serialised process-wide: libfabric 1.17's shm provider names
        // each endpoint from an unsynchronised counter, so two threads opening endpoints at
        // once can pick the same name and fail with FI_EBUSY. This is the control path only.
        static OPEN_LOCK: Mutex<()> = Mutex::new(());
        let _serial = OPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut fid = ptr::null_mut();
        // SAFETY: domain is open and info valid; fi_endpoint writes the new endpoint.
        let ret = unsafe {
            ffi::fi_endpoint(self.domain.raw(), info.as_ptr(), &mut fid, ptr::null_mut())
        };
        check_int("fi_endpoint", ret)
            .map_err(|e| crate::error::open_error("opening the endpoint", e))?;
        let shm_name = if is_shm {
            // shm names its region after the pid (`<pid>:<uid>:<n>`), so a region left by a
            // killed process collides with a later process that gets the same pid (FI_EBUSY
            // at enable), and nothing tells whose a region is. Our names are unique over
            // time and identify the creating process exactly (`crate::shm`).
            let name = crate::shm::new_region_name();
            let cname = format!("{name}\0");
            // SAFETY: fid is the endpoint just opened (not yet enabled); the name is a
            // NUL-terminated string that the provider copies.
            let ret = unsafe {
                ffi::fi_setname(
                    ptr::addr_of_mut!((*fid).fid),
                    cname.as_ptr() as *mut c_void,
                    cname.len(),
                )
            };
            if let Err(e) = check_int("fi_setname", ret) {
                close_fid(
                    // SAFETY: fid_ep begins with its struct fid; closed once here.
                    unsafe { ptr::addr_of_mut!((*fid).fid) },
                    "endpoint",
                );
                return Err(e.into());
            }
            Some(name)
        } else {
            None
        };
        let rx_cq = self.rx_cq.unwrap_or_else(|| self.tx_cq.clone());
        let inner = EpInner {
            fid,
            needs_local_mr: info.mr_mode().contains(MrMode::LOCAL)
                || info.mode().contains(crate::info::Mode::LOCAL_MR),
            inject_size: info.inject_size(),
            max_msg_size: info.max_msg_size(),
            caps: info.caps(),
            post_timeout: self.post_timeout,
            peer_check: self.peer_check,
            orphans: Mutex::new(Vec::new()),
            info,
            domain: self.domain,
            av: self.av,
            tx_cq: self.tx_cq,
            rx_cq,
            counters: self.counters.iter().map(|(c, _)| c.clone()).collect(),
            shm_name: None,
        };
        // From here on EpInner's Drop closes the endpoint on every error path.
        //
        // SAFETY: (all binds) the endpoint and the bound objects are open and belong to the
        // same domain; flags are the documented bind flags.
        unsafe {
            check_int(
                "fi_ep_bind(av)",
                ffi::fi_ep_bind(fid, fid_of_av(&inner.av), 0),
            )?;
            if inner.tx_cq.raw() == inner.rx_cq.raw() {
                check_int(
                    "fi_ep_bind(cq)",
                    ffi::fi_ep_bind(
                        fid,
                        fid_of_cq(&inner.tx_cq),
                        (ffi::FI_TRANSMIT | ffi::FI_RECV) as u64,
                    ),
                )?;
            } else {
                check_int(
                    "fi_ep_bind(tx cq)",
                    ffi::fi_ep_bind(fid, fid_of_cq(&inner.tx_cq), ffi::FI_TRANSMIT as u64),
                )?;
                check_int(
                    "fi_ep_bind(rx cq)",
                    ffi::fi_ep_bind(fid, fid_of_cq(&inner.rx_cq), ffi::FI_RECV as u64),
                )?;
            }
            for (c, ev) in &self.counters {
                check_int(
                    "fi_ep_bind(cntr)",
                    ffi::fi_ep_bind(fid, c.raw_fid(), ev.bits()),
                )?;
            }
            check_int("fi_enable", ffi::fi_enable(fid))
                .map_err(|e| crate::error::open_error("enabling the endpoint", e))?;
        }
        let mut inner = inner;
        if let Some(name) = shm_name {
            // The region exists from fi_enable on; the provider unlinks it when the
            // endpoint closes, the atexit handler if it never does.
            crate::shm::opened(&name);
            let private = crate::shm::check_private(&name);
            inner.shm_name = Some(name);
            private?; // on error, EpInner's Drop closes the endpoint (which unlinks it)
        }
        tracing::debug!(provider = %inner.info.provider(), domain = %inner.info.domain(), "endpoint enabled");
        Ok(Endpoint {
            inner: Arc::new(inner),
        })
    }
}

fn fid_of_av(av: &AddressVector) -> *mut ffi::fid {
    // SAFETY: fid_av begins with its struct fid; the AV is open.
    unsafe { ptr::addr_of_mut!((*av.raw()).fid) }
}

fn fid_of_cq(cq: &CompletionQueue) -> *mut ffi::fid {
    // SAFETY: fid_cq begins with its struct fid; the CQ is open.
    unsafe { ptr::addr_of_mut!((*cq.raw()).fid) }
}

/// A reliable-datagram endpoint. Keeps its domain, address vector, completion queues and
/// counters alive (an endpoint must be closed before the objects bound to it).
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EpInner>,
}

struct EpInner {
    fid: *mut ffi::fid_ep,
    info: Info,
    needs_local_mr: bool,
    inject_size: usize,
    max_msg_size: usize,
    caps: Caps,
    post_timeout: Duration,
    peer_check: Option<CheckFn>,
    /// Buffers of operations that could not be cancelled: the provider may still use them,
    /// so they are freed only after the endpoint is closed.
    orphans: Mutex<Vec<Box<dyn Send>>>,
    /// Objects bound to the endpoint must outlive it.
    domain: Domain,
    av: AddressVector,
    tx_cq: CompletionQueue,
    rx_cq: CompletionQueue,
    counters: Vec<Counter>,
    /// The shm provider's region name (`crate::shm`), for shm endpoints once enabled.
    shm_name: Option<String>,
}

// SAFETY: opened on a FI_THREAD_SAFE domain; libfabric serializes access internally. Our own
// mutable state is behind a Mutex.
unsafe impl Send for EpInner {}
// SAFETY: as above.
unsafe impl Sync for EpInner {}

impl EpInner {
    fn raw_fid_ptr(&self) -> *mut ffi::fid {
        // SAFETY: fid_ep begins with its struct fid.
        unsafe { ptr::addr_of_mut!((*self.fid).fid) }
    }
}

impl Drop for EpInner {
    fn drop(&mut self) {
        close_fid(self.raw_fid_ptr(), "endpoint");
        if let Some(name) = &self.shm_name {
            // fi_close unlinked the region.
            crate::shm::closed(name);
        }
        // The endpoint is closed: the provider no longer touches orphaned buffers.
        let n = self.orphans.get_mut().map(|v| v.len()).unwrap_or(0);
        if n > 0 {
            tracing::debug!(
                count = n,
                "freeing buffers of uncancelled operations after endpoint close"
            );
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("provider", &self.inner.info.provider())
            .field("domain", &self.inner.info.domain())
            .finish()
    }
}

/// Returns Ok(true) on success, Ok(false) for FI_EAGAIN, Err otherwise.
fn posted(call: &'static str, ret: isize) -> Result<bool> {
    if ret == -(ffi::FI_EAGAIN as isize) {
        return Ok(false);
    }
    check(call, ret)?;
    Ok(true)
}

impl Endpoint {
    /// Starts building an endpoint on `domain`, bound to `av` and `cq`.
    pub fn builder(domain: &Domain, av: &AddressVector, cq: &CompletionQueue) -> EndpointBuilder {
        EndpointBuilder {
            domain: domain.clone(),
            info: None,
            av: av.clone(),
            tx_cq: cq.clone(),
            rx_cq: None,
            counters: Vec::new(),
            post_timeout: Duration::from_secs(60),
            peer_check: None,
        }
    }

    /// Opens everything an endpoint needs from one info: fabric, domain, a table AV, one CQ
    /// for both directions, and the endpoint itself.
    ///
    /// # Errors
    /// Errors of the underlying open calls.
    pub fn open(info: &Info) -> Result<Endpoint> {
        let domain = Domain::open(info)?;
        let av = AddressVector::open(&domain)?;
        let cq = CompletionQueue::open(&domain, 0)?;
        Endpoint::builder(&domain, &av, &cq).build()
    }

    /// This endpoint's address, to give to peers (`fi_getname`).
    ///
    /// # Errors
    /// `fi_getname` errors.
    pub fn name(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        // SAFETY: buf has `len` writable bytes; fi_getname sets `len` to the address size.
        let mut ret = unsafe { ffi::fi_getname(self.raw_fid(), buf.as_mut_ptr().cast(), &mut len) };
        if ret == -(ffi::FI_ETOOSMALL as i32) {
            buf.resize(len, 0);
            // SAFETY: as above with the size the provider asked for.
            ret = unsafe { ffi::fi_getname(self.raw_fid(), buf.as_mut_ptr().cast(), &mut len) };
        }
        check_int("fi_getname", ret)?;
        buf.truncate(len);
        Ok(buf)
    }

    /// The shared-memory region of an `shm` endpoint (`/dev/shm/efa-<pid>-...`, mode 0600,
    /// removed when the endpoint closes; see [`crate::shm`]); `None` for other providers.
    pub fn shm_region(&self) -> Option<std::path::PathBuf> {
        self.inner.shm_name.as_deref().map(crate::shm::region_path)
    }

    /// The info this endpoint was opened from.
    pub fn info(&self) -> &Info {
        &self.inner.info
    }
    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.inner.domain
    }
    /// The address vector.
    pub fn av(&self) -> &AddressVector {
        &self.inner.av
    }
    /// The transmit completion queue.
    pub fn tx_cq(&self) -> &CompletionQueue {
        &self.inner.tx_cq
    }
    /// The receive completion queue (the same as the transmit one unless set apart).
    pub fn rx_cq(&self) -> &CompletionQueue {
        &self.inner.rx_cq
    }
    /// Counters bound to this endpoint.
    pub fn counters(&self) -> &[Counter] {
        &self.inner.counters
    }
    /// Largest message for `fi_inject`.
    pub fn inject_size(&self) -> usize {
        self.inner.inject_size
    }
    /// Largest single message.
    pub fn max_msg_size(&self) -> usize {
        self.inner.max_msg_size
    }
    /// True when local buffers must be registered (`FI_MR_LOCAL`).
    pub fn needs_local_mr(&self) -> bool {
        self.inner.needs_local_mr
    }
    /// Capabilities of the endpoint.
    pub fn caps(&self) -> Caps {
        self.inner.caps
    }
    /// How long safe posts retry on `FI_EAGAIN`.
    pub fn post_timeout(&self) -> Duration {
        self.inner.post_timeout
    }

    pub(crate) fn raw(&self) -> *mut ffi::fid_ep {
        self.inner.fid
    }
    pub(crate) fn raw_fid(&self) -> *mut ffi::fid {
        self.inner.raw_fid_ptr()
    }

    /// Reads both completion queues once (drives progress).
    ///
    /// # Errors
    /// As [`CompletionQueue::poll`].
    pub fn progress(&self) -> Result<usize> {
        let mut n = self.inner.tx_cq.poll()?;
        if self.inner.rx_cq.raw() != self.inner.tx_cq.raw() {
            n += self.inner.rx_cq.poll()?;
        }
        Ok(n)
    }

    /// Keeps an uncancellable operation's buffer alive until the endpoint is closed.
    pub(crate) fn orphan(&self, b: Box<dyn Send>) {
        self.inner
            .orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(b);
    }

    /// Retries `post` while it returns `FI_EAGAIN`, progressing the CQs in between, until the
    /// endpoint's post timeout.
    pub(crate) fn retry_post(
        &self,
        op: &'static str,
        peer: FiAddr,
        post: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        self.retry_post_within(op, peer, self.inner.post_timeout, post)
    }

    /// [`Endpoint::retry_post`] for at most `budget`.
    pub(crate) fn retry_post_within(
        &self,
        op: &'static str,
        peer: FiAddr,
        budget: Duration,
        mut post: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        // The common case posts at once: no clock read, no backoff state.
        if post()? {
            return Ok(());
        }
        let deadline = Deadline::after(budget);
        let mut backoff = Backoff::new();
        let mut next_check = std::time::Instant::now() + PEER_CHECK_INTERVAL;
        loop {
            if post()? {
                return Ok(());
            }
            if let Some(CheckFn(check)) = &self.inner.peer_check {
                if peer != FiAddr::UNSPEC && std::time::Instant::now() >= next_check {
                    if !check(peer) {
                        return Err(Error::PeerGone { op });
                    }
                    next_check = std::time::Instant::now() + PEER_CHECK_INTERVAL;
                }
            }
            if self.progress()? > 0 {
                backoff.reset();
            } else {
                backoff.snooze();
            }
            if deadline.expired() {
                return Err(Error::Timeout {
                    op,
                    waited: deadline.waited(),
                });
            }
        }
    }

    /// Cancels the operation whose context is `ctx` (`fi_cancel`). The operation then
    /// completes with `FI_ECANCELED` (if it had not completed already).
    ///
    /// # Errors
    /// `fi_cancel` errors (`FI_ENOENT`: nothing to cancel).
    pub fn cancel(&self, ctx: &crate::OpContext) -> Result<()> {
        // SAFETY: fi_cancel only uses the context as a key to find a posted operation.
        let ret = unsafe { ffi::fi_cancel(self.raw_fid(), ctx.as_raw()) };
        check_int("fi_cancel", ret as i32).map_err(Into::into)
    }

    // ---- raw posts ------------------------------------------------------------------------

    /// Posts a send (`fi_send`). Returns `Ok(false)` when the queue is full (`FI_EAGAIN`).
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and unmodified, and `ctx` must point to a live
    /// [`crate::OpContext`] at a fixed address, until the completion for `ctx` has been read
    /// from the transmit CQ. `desc` must be null or the descriptor of a live region covering
    /// the buffer (required under `FI_MR_LOCAL`). `dest` must come from this endpoint's AV.
    pub unsafe fn post_send(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: FiAddr,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_send", unsafe {
            ffi::fi_send(self.raw(), buf.cast(), len, desc, dest.0, ctx)
        })
    }

    /// Posts a send with remote CQ data (`fi_senddata`).
    ///
    /// # Safety
    /// As [`Endpoint::post_send`].
    pub unsafe fn post_senddata(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        data: u64,
        dest: FiAddr,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_senddata", unsafe {
            ffi::fi_senddata(self.raw(), buf.cast(), len, desc, data, dest.0, ctx)
        })
    }

    /// Posts a receive (`fi_recv`).
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid for writes and must not be read or written by anyone
    /// else, and `ctx` must point to a live [`crate::OpContext`] at a fixed address, until the
    /// completion for `ctx` has been read from the receive CQ. `desc` as for
    /// [`Endpoint::post_send`].
    pub unsafe fn post_recv(
        &self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        src: FiAddr,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_recv", unsafe {
            ffi::fi_recv(self.raw(), buf.cast(), len, desc, src.0, ctx)
        })
    }

    /// Posts a tagged send (`fi_tsend`).
    ///
    /// # Safety
    /// As [`Endpoint::post_send`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_tsend(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: FiAddr,
        tag: u64,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_tsend", unsafe {
            ffi::fi_tsend(self.raw(), buf.cast(), len, desc, dest.0, tag, ctx)
        })
    }

    /// Posts a tagged send with remote CQ data (`fi_tsenddata`).
    ///
    /// # Safety
    /// As [`Endpoint::post_send`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_tsenddata(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        data: u64,
        dest: FiAddr,
        tag: u64,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_tsenddata", unsafe {
            ffi::fi_tsenddata(self.raw(), buf.cast(), len, desc, data, dest.0, tag, ctx)
        })
    }

    /// Posts a tagged receive (`fi_trecv`): matches messages whose tag equals `tag` in every
    /// bit not set in `ignore`.
    ///
    /// # Safety
    /// As [`Endpoint::post_recv`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_trecv(
        &self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        src: FiAddr,
        tag: u64,
        ignore: u64,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_trecv", unsafe {
            ffi::fi_trecv(self.raw(), buf.cast(), len, desc, src.0, tag, ignore, ctx)
        })
    }

    /// Posts an RMA read of `len` bytes from the peer's `addr` (key `key`) into `buf`
    /// (`fi_read`).
    ///
    /// # Safety
    /// As [`Endpoint::post_recv`] (the local buffer is written), with the completion read from
    /// the transmit CQ.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_read(
        &self,
        buf: *mut u8,
        len: usize,
        desc: *mut c_void,
        src: FiAddr,
        addr: u64,
        key: u64,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_read", unsafe {
            ffi::fi_read(self.raw(), buf.cast(), len, desc, src.0, addr, key, ctx)
        })
    }

    /// Posts an RMA write of `buf` to the peer's `addr` (key `key`) (`fi_write`).
    ///
    /// # Safety
    /// As [`Endpoint::post_send`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_write(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: FiAddr,
        addr: u64,
        key: u64,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_write", unsafe {
            ffi::fi_write(self.raw(), buf.cast(), len, desc, dest.0, addr, key, ctx)
        })
    }

    /// Posts an RMA write that also delivers `data` to the target's CQ (`fi_writedata`).
    ///
    /// # Safety
    /// As [`Endpoint::post_send`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_writedata(
        &self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        data: u64,
        dest: FiAddr,
        addr: u64,
        key: u64,
        ctx: *mut c_void,
    ) -> Result<bool> {
        // SAFETY: forwarded to the caller.
        posted("fi_writedata", unsafe {
            ffi::fi_writedata(
                self.raw(),
                buf.cast(),
                len,
                desc,
                data,
                dest.0,
                addr,
                key,
                ctx,
            )
        })
    }

    // ---- inject: the buffer is copied before the call returns, so these are safe ----------

    /// The common path of every inject call: size and peer checks, then the call (named
    /// `call`), retried while the queue is full. `post` makes the libfabric call on `buf`,
    /// which the provider copies before returning.
    fn inject_with(
        &self,
        op: &'static str,
        call: &'static str,
        buf: &[u8],
        dest: FiAddr,
        post: impl Fn(*const c_void, usize) -> isize,
    ) -> Result<()> {
        crate::error::check_len(
            op,
            buf.len(),
            self.inner.inject_size,
            crate::error::SizeLimit::Inject,
        )?;
        self.check_peer(op, dest, false)?;
        self.retry_post(op, dest, || {
            posted(call, post(buf.as_ptr().cast(), buf.len()))
        })
    }

    /// Sends a small message, copied before return, with no completion (`fi_inject`).
    /// Retries while the queue is full, up to the post timeout.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] if `buf` exceeds [`Endpoint::inject_size`]; `fi_inject`
    /// errors; [`Error::Timeout`] if the queue stays full.
    pub fn inject(&self, buf: &[u8], dest: FiAddr) -> Result<()> {
        // SAFETY: fi_inject copies the buffer before returning.
        self.inject_with("inject", "fi_inject", buf, dest, |p, n| unsafe {
            ffi::fi_inject(self.raw(), p, n, dest.0)
        })
    }

    /// Tagged [`Endpoint::inject`] (`fi_tinject`).
    ///
    /// # Errors
    /// As [`Endpoint::inject`].
    pub fn tinject(&self, buf: &[u8], dest: FiAddr, tag: u64) -> Result<()> {
        // SAFETY: fi_tinject copies the buffer before returning.
        self.inject_with("tinject", "fi_tinject", buf, dest, |p, n| unsafe {
            ffi::fi_tinject(self.raw(), p, n, dest.0, tag)
        })
    }

    /// [`Endpoint::inject`] with remote CQ data (`fi_injectdata`).
    ///
    /// # Errors
    /// As [`Endpoint::inject`].
    pub fn injectdata(&self, buf: &[u8], data: u64, dest: FiAddr) -> Result<()> {
        // SAFETY: fi_injectdata copies the buffer before returning.
        self.inject_with("injectdata", "fi_injectdata", buf, dest, |p, n| unsafe {
            ffi::fi_injectdata(self.raw(), p, n, data, dest.0)
        })
    }

    /// Tagged [`Endpoint::injectdata`] (`fi_tinjectdata`).
    ///
    /// # Errors
    /// As [`Endpoint::inject`].
    pub fn tinjectdata(&self, buf: &[u8], data: u64, dest: FiAddr, tag: u64) -> Result<()> {
        // SAFETY: fi_tinjectdata copies the buffer before returning.
        self.inject_with("tinjectdata", "fi_tinjectdata", buf, dest, |p, n| unsafe {
            ffi::fi_tinjectdata(self.raw(), p, n, data, dest.0, tag)
        })
    }

    /// Writes a small buffer into the peer's region at `offset`, copied before return, with no
    /// local completion (`fi_inject_write`).
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] for a range outside `remote`; as [`Endpoint::inject`].
    pub fn inject_write(
        &self,
        buf: &[u8],
        dest: FiAddr,
        remote: &crate::remote::RemoteRegion,
        offset: u64,
    ) -> Result<()> {
        let addr = remote.address_of("inject_write", offset, buf.len())?;
        // SAFETY: fi_inject_write copies the buffer before returning.
        self.inject_with(
            "inject_write",
            "fi_inject_write",
            buf,
            dest,
            |p, n| unsafe { ffi::fi_inject_write(self.raw(), p, n, dest.0, addr, remote.key) },
        )
    }
}
