//! The communicator: bootstrap, one endpoint per transport, a route per peer, and tagged
//! point-to-point messaging with MPI semantics.
//!
//! # Protocol
//! See [`crate::wire`]: eager messages up to [`Config::eager_limit`], rendezvous above, a
//! per-sender sequence number for MPI's non-overtaking order, and software matching so
//! that `Source::Any` works across every transport at once.
//!
//! # Buffers
//! The NIC never touches user memory: eager payloads are copied into registered bounce
//! buffers, and rendezvous data goes through memory the engine owns. So every user-facing
//! call may borrow (`&[T]`, `&mut [T]`), and a request or future that is dropped or leaked
//! cannot make the NIC write into freed memory.
//!
//! # Progress
//! All endpoints' completion queues are read by one progress function, so a rank can talk
//! to peers on different routes at once. Waiting spins first, then yields, then sleeps
//! ([`efa_fabric::Backoff`]), so oversubscribed ranks still make progress.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use efa_fabric::{Access, BufPrefix, Endpoint, FiAddr, Info, Pending, RegisteredBuf, SharedSlice};

use crate::bootstrap::{self, Bootstrap};
use crate::error::{Error, PeerFailure, Result, SettingError};
use crate::net;
use crate::placement::{self, Card, EndpointCard, Route, Transport, TransportSet};
use crate::roles;
use crate::store::{self, Store};
use crate::wire::{self, FailCode, Header, Kind, CTRL_TAG, HDR_LEN};

mod coll_link;
pub(crate) use coll_link::{CollLink, CollRecv, CollSend, CollTag};

/// Largest user tag; tags above are reserved for collectives and internal messages.
pub const MAX_USER_TAG: u32 = 0x7FFF_FFFF;

/// Which rank a receive accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Any rank (`MPI_ANY_SOURCE`).
    Any,
    /// Only this rank.
    Rank(u32),
}

impl From<u32> for Source {
    fn from(r: u32) -> Self {
        Source::Rank(r)
    }
}

/// Which tag a receive accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// Any tag (`MPI_ANY_TAG`).
    Any,
    /// Only this tag.
    Is(u32),
}

impl From<u32> for Tag {
    fn from(t: u32) -> Self {
        Tag::Is(t)
    }
}

/// What a completed receive got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The sender.
    pub source: u32,
    /// The message's tag.
    pub tag: u32,
    /// Message length in bytes.
    pub len: usize,
}

impl Status {
    /// Number of `T` elements received.
    pub fn count<T>(&self) -> usize {
        self.len / std::mem::size_of::<T>().max(1)
    }
}

/// Communicator settings. Every field has a default; see each setter of
/// [`CommunicatorBuilder`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Deadline of every blocking call.
    pub timeout: Duration,
    /// Transports allowed (`EFA_TRANSPORTS`).
    pub transports: TransportSet,
    /// Interface for the IP route (`EFA_IFACE`).
    pub ip_iface: Option<String>,
    /// Local address the fabric endpoint binds to (`EFA_FABRIC_ADDR`), for hosts whose fabric
    /// interface has several addresses.
    pub fabric_addr: Option<String>,
    /// Largest payload sent eagerly (copied into pre-posted buffers) over the fabric and IP.
    pub eager_limit: usize,
    /// Largest payload sent eagerly over shm, where receive buffers cost no pinned memory and
    /// a rendezvous round trip costs more than copying a mid-size message.
    pub shm_eager_limit: usize,
    /// Receive buffers kept posted per endpoint.
    pub rx_depth: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(60),
            transports: TransportSet::all(),
            ip_iface: None,
            fabric_addr: None,
            eager_limit: 8192,
            shm_eager_limit: 32 * 1024,
            rx_depth: 64,
        }
    }
}

/// Builds a [`Communicator`]. Rank, size and rendezvous come from the launcher's
/// environment (see [`crate::bootstrap`]) unless given with [`CommunicatorBuilder::bootstrap`].
#[derive(Debug, Default)]
pub struct CommunicatorBuilder {
    bootstrap: Option<Bootstrap>,
    config: Config,
    env: bool,
    /// `transports` was called: `EFA_TRANSPORTS` is then not read.
    transports_explicit: bool,
}

impl CommunicatorBuilder {
    /// A builder that reads `EFA_TIMEOUT`, `EFA_TRANSPORTS`, `EFA_IFACE` and
    /// `EFA_FABRIC_ADDR` when built (explicit setters win).
    pub fn new() -> Self {
        CommunicatorBuilder {
            bootstrap: None,
            config: Config::default(),
            env: true,
            transports_explicit: false,
        }
    }
    /// Explicit rank, size and rendezvous. Default: detected from the environment.
    pub fn bootstrap(mut self, b: Bootstrap) -> Self {
        self.bootstrap = Some(b);
        self
    }
    /// Deadline of every blocking call, including joining. Default 60 s (`EFA_TIMEOUT`,
    /// seconds). Shorter detects dead peers sooner; too short fails slow but healthy jobs.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.config.timeout = t;
        self.env_timeout_overridden();
        self
    }
    /// Transports allowed. Default: `EFA_TRANSPORTS`, else all. An explicit set wins over
    /// `EFA_TRANSPORTS`, whatever it is (`TransportSet::all()` included).
    pub fn transports(mut self, t: TransportSet) -> Self {
        self.config.transports = t;
        self.transports_explicit = true;
        self
    }
    /// Interface of the IP route. Default: `EFA_IFACE`, else `lo` when all ranks are on
    /// this host, else the first non-loopback IPv4 interface.
    pub fn ip_iface(mut self, iface: impl Into<String>) -> Self {
        self.config.ip_iface = Some(iface.into());
        self
    }
    /// Local address of the fabric endpoint. Default: `EFA_FABRIC_ADDR`, else the provider's
    /// choice.
    pub fn fabric_addr(mut self, addr: impl Into<String>) -> Self {
        self.config.fabric_addr = Some(addr.into());
        self
    }
    /// Largest eager payload over the fabric and IP, in bytes, from 0 to
    /// [`MAX_EAGER_LIMIT`] (1 MiB; [`CommunicatorBuilder::build`] fails above). Default 8 KiB.
    /// Larger means fewer round trips for mid-size messages but more memory per posted
    /// receive buffer.
    pub fn eager_limit(mut self, bytes: usize) -> Self {
        self.config.eager_limit = bytes;
        self
    }

    fn env_timeout_overridden(&mut self) {
        self.env = false;
    }

    /// Bootstraps, opens the endpoints, exchanges cards and chooses every route.
    ///
    /// # Errors
    /// [`Error::Bootstrap`] (bad environment, a rank that never joins within the timeout),
    /// [`Error::NoTransport`], [`Error::NoRoute`], [`Error::Transports`].
    pub fn build(mut self) -> Result<Communicator> {
        crate::debug::init(self.bootstrap.as_ref())?;
        if self.env {
            if let Some(v) = crate::error::env_var("EFA_TIMEOUT", TIMEOUT_FORMS)? {
                self.config.timeout = parse_timeout(&v).map_err(|problem| {
                    SettingError::env("EFA_TIMEOUT", v, problem, TIMEOUT_FORMS)
                })?;
            }
        }
        check_timeout(self.config.timeout).map_err(|problem| {
            SettingError::argument(
                "CommunicatorBuilder::timeout",
                format!("{:?}", self.config.timeout),
                problem,
                TIMEOUT_FORMS,
            )
        })?;
        if self.config.eager_limit > MAX_EAGER_LIMIT {
            return Err(SettingError::argument(
                "CommunicatorBuilder::eager_limit",
                self.config.eager_limit.to_string(),
                "is larger than the largest eager limit: every endpoint keeps rx_depth receive \
                 buffers of this size registered",
                format!("0 to {MAX_EAGER_LIMIT} bytes (default 8192)"),
            )
            .into());
        }
        if !self.transports_explicit {
            self.config.transports = TransportSet::from_env()?;
        }
        net::settle_addresses(&mut self.config.ip_iface, &mut self.config.fabric_addr)?;
        let boot = match self.bootstrap {
            Some(b) => b,
            None => bootstrap::from_env()?,
        };
        Communicator::start(boot, self.config)
    }
}

/// Largest eager limit accepted ([`CommunicatorBuilder::eager_limit`]), in bytes.
pub const MAX_EAGER_LIMIT: usize = 1 << 20;

const TIMEOUT_FORMS: &str = "a number of seconds from 0.001 to 31536000 (one year), e.g. 60 or 2.5";

/// Seconds, as `EFA_TIMEOUT` gives them.
fn parse_timeout(v: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = v
        .trim()
        .parse()
        .map_err(|_| "is not a number of seconds".to_string())?;
    let d = Duration::try_from_secs_f64(secs).map_err(|_| {
        if secs.is_sign_negative() {
            "is negative: a deadline must lie in the future".to_string()
        } else {
            "is not a finite number of seconds".to_string()
        }
    })?;
    check_timeout(d)?;
    Ok(d)
}

/// A deadline too short to join a job (0 would fail every call at once) or too long to be
/// meant (a hung job would never be reported).
fn check_timeout(d: Duration) -> std::result::Result<(), String> {
    if d < Duration::from_millis(1) {
        return Err(
            "is shorter than 1 ms: every call, joining included, would fail at once".into(),
        );
    }
    if d > Duration::from_secs(365 * 24 * 3600) {
        return Err("is longer than a year: a hung job would never be reported".into());
    }
    Ok(())
}

/// An open endpoint serving one transport.
struct Port {
    /// Which rank each address of this endpoint's address vector is, and whether those
    /// ranks are alive: asked by posts that retry on a full queue (set once routes are known).
    liveness: Arc<std::sync::OnceLock<PortLiveness>>,
    transport: Transport,
    provider: String,
    ep: Endpoint,
    max_msg: usize,
    inject: usize,
    /// Posted control-message receive buffers.
    slots: Vec<Option<Pending<RegisteredBuf>>>,
    /// Free registered bounce buffers for eager sends.
    bounce: Vec<RegisteredBuf>,
    /// Largest eager payload on this endpoint (its receive buffers hold header + this).
    eager: usize,
    /// Some peer is routed through this endpoint.
    used: bool,
    /// CQ completion count when the slots were last scanned.
    seen: u64,
}

/// How this rank reaches one peer.
#[derive(Debug, Clone)]
struct PeerRoute {
    port: usize,
    addr: FiAddr,
}

/// A message that arrived before its receive was posted.
enum Unexpected {
    Eager {
        src: u32,
        tag: u32,
        data: Vec<u8>,
    },
    Rts {
        src: u32,
        tag: u32,
        len: usize,
        rndv: u32,
    },
}

/// A sequence-numbered message, processed in the sender's order.
enum Ordered {
    /// An eager message or RTS, matched against receives.
    Msg(Unexpected),
    /// The sender's last message: it is finalizing.
    Fin,
}

enum RecvState {
    Posted,
    /// Rendezvous data being received into `data`.
    Receiving {
        chunks: Vec<Pending<BufPrefix<Vec<u8>>>>,
    },
    Done,
    Failed(Error),
}

struct RecvOp {
    src: Source,
    tag: Tag,
    capacity: usize,
    data: Vec<u8>,
    status: Option<Status>,
    state: RecvState,
}

enum SendState {
    /// Waiting for the receiver's CTS.
    WaitCts {
        data: Arc<Vec<u8>>,
    },
    Sending {
        chunks: Vec<Pending<SharedSlice>>,
        /// The payload, returned to the buffer pool when every chunk is done.
        data: Arc<Vec<u8>>,
    },
    Done,
    Failed(Error),
}

struct SendOp {
    dest: u32,
    tag: u32,
    state: SendState,
}

/// An eager send or control message in flight (its request, if any, is already complete).
struct Background {
    port: usize,
    dest: u32,
    op: Pending<BufPrefix<RegisteredBuf>>,
}

struct Engine {
    rank: u32,
    ports: Vec<Port>,
    peers: Vec<PeerRoute>,
    next_seq: Vec<u32>,
    expected_seq: Vec<u32>,
    /// Messages that arrived ahead of their sequence number, per source.
    reorder: Vec<BTreeMap<u32, Ordered>>,
    posted: VecDeque<u64>,
    unexpected: VecDeque<Unexpected>,
    recvs: HashMap<u64, RecvOp, IdHash>,
    sends: HashMap<u64, SendOp, IdHash>,
    /// Rendezvous id -> send request id.
    rndv_sends: HashMap<u32, u64>,
    background: Vec<Background>,
    next_id: u64,
    next_rndv: u32,
    scratch: Vec<u8>,
    ctx: u32,
    /// Completions seen so far (for backoff decisions).
    events: u64,
    /// Remote CQ data delivered with RMA writes (`writedata`), oldest first.
    notifications: VecDeque<u64>,
    /// Large rendezvous buffers kept for reuse.
    pool: BufPool,
    /// Finalize progress, per peer.
    fin: Vec<FinState>,
    /// `finalize` has completed: no new operations.
    finalized: bool,
    /// Every rank's process, whether it shares this host, and which ranks failed; shared
    /// with the endpoints' post paths ([`Liveness`]).
    live: Arc<Liveness>,
    /// The first rank known to have failed, and how. Once set, every pending and later
    /// operation fails with [`Error::PeerFailed`] naming it.
    failure: Option<(u32, PeerFailure)>,
    /// Progress calls since the last liveness check of same-host peers, and its time.
    polls: u32,
    last_check: Instant,
    /// When peers on other hosts were last probed ([`Kind::Ping`]).
    last_ping: Instant,
    /// Per peer: since when probes find no room to be sent (see [`PROBE_REFUSED_LIMIT`]).
    refused_since: Vec<Option<Instant>>,
    /// An operation passed its deadline: the job is not healthy, so finalize waits for its
    /// peers only briefly instead of a whole deadline more.
    broken: bool,
}

/// How often blocked ranks look at same-host peers' processes.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
/// How often ranks with pending operations probe the peers on other hosts they involve.
const PING_INTERVAL: Duration = Duration::from_millis(250);
/// A peer whose probes find no room in the provider's queue for this long, while no
/// rendezvous data moves between it and this rank, is unreachable. (`tcp;ofi_rxm` keeps its
/// queue full so while it tries to reconnect to a process that is gone.)
const PROBE_REFUSED_LIMIT: Duration = Duration::from_secs(1);

/// Where the finalize handshake with one peer stands.
#[derive(Debug, Default, Clone, Copy)]
struct FinState {
    /// The peer's `Fin` was processed (so were all its messages before it).
    got_fin: bool,
    /// This rank acknowledged the peer's `Fin`.
    sent_ack: bool,
    /// The peer acknowledged this rank's `Fin`.
    got_ack: bool,
}

/// Request ids are sequential integers: hashing them with SipHash (the std default) costs
/// more than the lookup. This passes the id through.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// Large buffers kept for reuse. Allocations above glibc's mmap threshold (128 KiB) are
/// fresh mappings each time: every rendezvous would pay an mmap, a page fault per page and
/// a munmap on both sides (measured: a 1 MiB shm ping-pong took 640 us instead of about
/// 300 us).
#[derive(Default)]
struct BufPool {
    free: Vec<Vec<u8>>,
}

impl BufPool {
    /// Buffers smaller than this come from malloc cheaply; they are not pooled.
    const MIN: usize = 64 * 1024;
    /// At most this many buffers are kept (a pipelined collective has many chunks in
    /// flight at once).
    const KEEP: usize = 64;
    /// Buffers larger than this are not kept (one huge message must not pin its size).
    const MAX: usize = 64 << 20;
    /// At most this many bytes are kept in all.
    const MAX_TOTAL: usize = 256 << 20;

    fn take(&mut self, cap: usize) -> Option<Vec<u8>> {
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= cap)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)?;
        Some(self.free.swap_remove(best))
    }

    /// A buffer holding a copy of `data`.
    fn take_filled(&mut self, data: &[u8]) -> Vec<u8> {
        match self.take(data.len()) {
            Some(mut v) => {
                v.clear();
                v.extend_from_slice(data);
                v
            }
            None => data.to_vec(),
        }
    }

    /// An empty buffer with room for `cap` bytes.
    fn take_empty(&mut self, cap: usize) -> Vec<u8> {
        match self.take(cap) {
            Some(mut v) => {
                v.clear();
                v
            }
            None => Vec::with_capacity(cap),
        }
    }

    /// An initialised buffer of at least `len` bytes (its old contents, not zeros, beyond
    /// what a previous user wrote: receive buffers are overwritten by the data).
    fn take_zeroed(&mut self, len: usize) -> Vec<u8> {
        match self.take(len) {
            Some(mut v) => {
                if v.len() < len {
                    v.resize(len, 0);
                }
                v
            }
            None => vec![0u8; len],
        }
    }

    fn put(&mut self, v: Vec<u8>) {
        let cap = v.capacity();
        if !(Self::MIN..=Self::MAX).contains(&cap) || self.free.len() >= Self::KEEP {
            return;
        }
        let kept: usize = self.free.iter().map(Vec::capacity).sum();
        if kept + cap <= Self::MAX_TOTAL {
            self.free.push(v);
        }
    }
}

struct Inner {
    rank: u32,
    size: u32,
    config: Config,
    routes: Vec<Route>,
    providers: Vec<(Transport, String)>,
    /// Keeps a rank-0-served TCP store alive until the communicator is dropped.
    _store: Arc<dyn Store>,
    engine: Mutex<Engine>,
    /// Collective objects (RMA windows) created so far.
    objects: std::sync::atomic::AtomicU32,
    /// Collective calls made so far (every rank makes them in the same order).
    coll_seq: std::sync::atomic::AtomicU32,
}

fn lock_engine(m: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// The finalize protocol (see [`crate::wire`]): waits until every send has completed
    /// locally, sends `Fin` to every peer, acknowledges every peer's `Fin` once all its data
    /// is here, and returns when every peer has acknowledged this rank's `Fin`. Afterwards
    /// no operation may start. Runs at most once.
    fn finalize(&self) -> Result<()> {
        if lock_engine(&self.engine).finalized {
            return Ok(());
        }
        let result = self.finalize_handshake();
        lock_engine(&self.engine).finalized = true;
        result
    }

    /// Tells every peer that this rank failed with `cause`, and gives those messages up to
    /// a second to leave.
    fn tell_and_flush(&self, cause: PeerFailure) {
        let mut e = lock_engine(&self.engine);
        e.mark_failed(self.rank, cause, true);
        let deadline = Instant::now() + Duration::from_secs(1);
        while !e.background.is_empty() && Instant::now() < deadline {
            if e.progress().is_err() {
                break;
            }
            std::thread::yield_now();
        }
        e.finalized = true;
    }

    fn finalize_handshake(&self) -> Result<()> {
        let start = Instant::now();
        let mut backoff = efa_fabric::Backoff::new();
        // After an operation timed out, peers may be stopped or stuck: waiting a whole
        // deadline more for them would only delay the exit that reports it.
        let limit = if lock_engine(&self.engine).broken {
            self.config.timeout.min(Duration::from_secs(1))
        } else {
            self.config.timeout
        };
        let mut clock = efa_fabric::PollClock::new(limit);
        let mut sent_fin = false;
        loop {
            let waiting = {
                let mut e = lock_engine(&self.engine);
                let before = e.events;
                e.progress()?;
                if let Some(err) = e.failure_error() {
                    // Messages to or from a failed rank cannot be delivered any more, and
                    // every other rank hears of the failure and gives up the same way.
                    return Err(err);
                }
                if e.events != before {
                    backoff.reset();
                }
                if !sent_fin {
                    match e.unfinished_send() {
                        Some(p) => Some(("finalize: waiting for a send to complete", p)),
                        None => {
                            for p in (0..self.size).filter(|&p| p != self.rank) {
                                let h = e.fin_header(Kind::Fin, p);
                                e.send_ctrl_with(p, &h, &[], false)?;
                            }
                            sent_fin = true;
                            e.finalize_step()?
                                .map(|p| ("finalize: waiting for the peer to finalize", p))
                        }
                    }
                } else {
                    e.finalize_step()?
                        .map(|p| ("finalize: waiting for the peer to finalize", p))
                }
            };
            let Some((op, peer)) = waiting else {
                let e = lock_engine(&self.engine);
                let unread = e.unexpected.len();
                if unread > 0 {
                    tracing::warn!(
                        rank = self.rank,
                        unread,
                        "finalize: messages that arrived were never received"
                    );
                }
                tracing::debug!(rank = self.rank, took = ?start.elapsed(), "finalized");
                return Ok(());
            };
            if clock.expired() {
                let mut e = lock_engine(&self.engine);
                return Err(e.deadline_passed(op, Some(peer), start.elapsed()));
            }
            backoff.snooze();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        {
            let e = lock_engine(&self.engine);
            // Ranks that failed or stopped may never leave the store: a serving rank does
            // not wait for them.
            if e.failure.is_some() || e.broken {
                self._store.job_failed();
            }
            if e.finalized {
                return;
            }
        }
        if std::thread::panicking() {
            tracing::warn!(
                rank = self.rank,
                "communicator dropped during a panic: telling the other ranks, no finalize"
            );
            self.tell_and_flush(PeerFailure::Aborted {
                code: 101,
                reason: "the rank panicked".into(),
            });
            return;
        }
        if let Err(e) = self.finalize() {
            self._store.job_failed();
            tracing::error!(rank = self.rank, "finalize at drop failed: {e}");
            eprintln!(
                "efa: rank {}: finalize when the communicator was dropped failed: {e}",
                self.rank
            );
        }
    }
}

/// A communicator: every rank of a job, reachable by rank number.
///
/// Cheap to clone (an `Arc`); `Send + Sync`. Calls from several threads are serialized by an
/// internal lock around the progress engine.
#[derive(Clone)]
pub struct Communicator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.inner.rank)
            .field("size", &self.inner.size)
            .field("providers", &self.inner.providers)
            .finish()
    }
}

impl Communicator {
    /// Joins the job described by the environment (efarun, mpirun, srun, torchrun), like
    /// `MPI_Init`.
    ///
    /// # Errors
    /// As [`CommunicatorBuilder::build`].
    pub fn init() -> Result<Communicator> {
        CommunicatorBuilder::new().build()
    }

    /// A builder for explicit settings.
    pub fn builder() -> CommunicatorBuilder {
        CommunicatorBuilder::new()
    }

    /// Joins the job: chooses and opens an endpoint per role, publishes this rank's card
    /// and reads everyone's, chooses a route to every peer and connects it, builds the
    /// engine, and waits until every rank is ready.
    fn start(boot: Bootstrap, config: Config) -> Result<Communicator> {
        let (rank, size) = (boot.rank(), boot.world_size());
        let deadline = Instant::now() + config.timeout;
        let store = boot.connect_store(deadline)?;
        let all_local = boot.local_size() == Some(size) || size == 1;
        let (discovery, selection) = select_roles(&config, all_local);
        let (mut ports, card) = open_ports(rank, &discovery, &selection, &config)?;
        let cards = exchange_cards(&*store, &card, rank, size, deadline)?;
        let routes = choose_routes(&card, &cards, &config.transports)?;
        let peers = connect_peers(rank, &mut ports, &cards, &routes)?;
        let live = liveness(&card, &cards, &ports, &peers);
        let comm = assemble(
            rank,
            size,
            config,
            store.clone(),
            ports,
            peers,
            routes,
            live,
        )?;
        ready_barrier(&comm, &*store)?;
        tracing::info!(rank, size, launcher = %boot.launcher(), "communicator ready");
        Ok(comm)
    }

    /// Ends this rank's part in the job, like `MPI_Finalize`: returns once every message
    /// that this rank's API calls reported as sent (inject, eager, rendezvous, detached
    /// sends and collective traffic) has reached its peer, and every peer has finalized its
    /// side with this rank. It is collective: every rank must call it (or drop its last
    /// clone of the communicator, which does the same, best effort, logging what it could
    /// not finish). Afterwards every operation on a remaining clone fails with
    /// [`Error::Finalized`].
    ///
    /// Messages that arrived but were never received are dropped (logged at warn level).
    /// A process that ends without dropping the communicator (`std::process::exit`, a
    /// clone leaked or held by a thread still running) skips finalize, and its last
    /// messages may be lost.
    ///
    /// # Errors
    /// [`Error::Timeout`] naming a peer when, within the communicator's deadline, a send
    /// did not complete (a rendezvous whose receive was never posted) or a peer did not
    /// finalize; fabric errors.
    pub fn finalize(self) -> Result<()> {
        self.inner.finalize()
    }

    /// Ends the job on purpose, like `MPI_Abort`: tells every rank it can reach that this
    /// rank aborted with `code` and `reason` (their pending and later operations fail at
    /// once with [`Error::PeerFailed`] naming this rank, [`PeerFailure::Aborted`]), gives
    /// those messages up to a second to leave, and exits the process with `code`.
    pub fn abort(&self, code: i32, reason: &str) -> ! {
        tracing::error!(rank = self.inner.rank, code, "abort: {reason}");
        self.inner.tell_and_flush(PeerFailure::Aborted {
            code,
            reason: reason.to_owned(),
        });
        std::process::exit(code)
    }

    /// This process's rank.
    pub fn rank(&self) -> u32 {
        self.inner.rank
    }
    /// Number of ranks.
    pub fn size(&self) -> u32 {
        self.inner.size
    }
    /// The route to `peer`, with the reason it was chosen.
    ///
    /// # Errors
    /// [`Error::InvalidRank`].
    pub fn route(&self, peer: u32) -> Result<&Route> {
        self.check_rank(peer)?;
        Ok(&self.inner.routes[peer as usize])
    }
    /// The provider serving `transport` on this rank, if that transport is open.
    pub fn provider(&self, transport: Transport) -> Option<&str> {
        self.inner
            .providers
            .iter()
            .find(|(t, _)| *t == transport)
            .map(|(_, p)| p.as_str())
    }
    /// The deadline applied to blocking calls.
    pub fn timeout(&self) -> Duration {
        self.inner.config.timeout
    }

    /// The endpoint and address through which `peer` is reached (for RMA).
    pub(crate) fn peer_endpoint(&self, peer: u32) -> (usize, Endpoint, FiAddr) {
        let e = self.engine();
        let r = &e.peers[peer as usize];
        (r.port, e.ports[r.port].ep.clone(), r.addr)
    }

    /// Every open endpoint, by port index, with whether any peer is routed through it.
    pub(crate) fn port_endpoints(&self) -> Vec<(Endpoint, bool)> {
        let e = self.engine();
        e.ports.iter().map(|p| (p.ep.clone(), p.used)).collect()
    }

    /// Takes the remote CQ data delivered by RMA writes with notification, oldest first.
    pub(crate) fn take_notifications(&self) -> Vec<u64> {
        let mut e = self.engine();
        let _ = e.progress();
        let mut out: Vec<u64> = e.notifications.drain(..).collect();
        for p in &e.ports {
            for c in p.ep.rx_cq().take_unsolicited() {
                if c.has_data() {
                    out.push(c.data);
                }
            }
        }
        out
    }

    /// A fresh id for a collective object (window), equal on every rank that creates its
    /// objects in the same order.
    pub(crate) fn next_object_id(&self) -> u32 {
        self.inner
            .objects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn check_rank(&self, r: u32) -> Result<()> {
        if r >= self.inner.size {
            return Err(Error::InvalidRank {
                rank: r,
                size: self.inner.size,
            });
        }
        Ok(())
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        lock_engine(&self.inner.engine)
    }

    /// Starts sending `buf` to `dest` with `tag`. The data is copied (eager) or handed to
    /// the engine (rendezvous) before this returns, so `buf` may be reused at once.
    ///
    /// # Errors
    /// [`Error::InvalidRank`], [`Error::ReservedTag`], fabric errors.
    pub fn isend<T: Pod>(&self, buf: &[T], dest: u32, tag: u32) -> Result<SendRequest> {
        self.check_rank(dest)?;
        if tag > MAX_USER_TAG {
            return Err(Error::ReservedTag(tag));
        }
        let id = self
            .engine()
            .start_send(bytemuck::cast_slice(buf), dest, tag)?;
        Ok(SendRequest {
            comm: self.clone(),
            id,
            dest,
        })
    }

    /// [`Communicator::isend`] of raw bytes with any tag, including the reserved range above
    /// [`MAX_USER_TAG`] (for collectives and other library-internal traffic).
    pub(crate) fn isend_bytes(&self, data: &[u8], dest: u32, tag: u32) -> Result<SendRequest> {
        self.check_rank(dest)?;
        let id = self.engine().start_send(data, dest, tag)?;
        Ok(SendRequest {
            comm: self.clone(),
            id,
            dest,
        })
    }

    /// [`Communicator::irecv`] of raw bytes with an exact tag, including reserved ones.
    #[allow(dead_code)] // used by the collectives module
    pub(crate) fn irecv_bytes<'a>(
        &self,
        buf: &'a mut [u8],
        src: Source,
        tag: u32,
    ) -> Result<RecvRequest<'a>> {
        if let Source::Rank(r) = src {
            self.check_rank(r)?;
        }
        let id = self.engine().start_recv(src, Tag::Is(tag), buf.len())?;
        Ok(RecvRequest {
            comm: self.clone(),
            id,
            src,
            buf: Some(buf),
            elem: 1,
        })
    }

    /// Starts a receive into `buf` from `src` with `tag` (wildcards allowed).
    ///
    /// # Errors
    /// [`Error::InvalidRank`].
    pub fn irecv<'a, T: Pod>(
        &self,
        buf: &'a mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
    ) -> Result<RecvRequest<'a>> {
        let src = src.into();
        if let Source::Rank(r) = src {
            self.check_rank(r)?;
        }
        let elem = std::mem::size_of::<T>();
        let bytes: &'a mut [u8] = bytemuck::cast_slice_mut(buf);
        let id = self.engine().start_recv(src, tag.into(), bytes.len())?;
        Ok(RecvRequest {
            comm: self.clone(),
            id,
            src,
            buf: Some(bytes),
            elem,
        })
    }

    /// Sends `buf` to `dest` and waits until the send has completed locally.
    ///
    /// # Errors
    /// As [`Communicator::isend`], plus [`Error::Timeout`] naming the peer and
    /// [`Error::PeerFailed`]. A receiver whose buffer is too small gets
    /// [`Error::Truncated`]; the sender is not told (as in MPI).
    pub fn send<T: Pod>(&self, buf: &[T], dest: u32, tag: u32) -> Result<()> {
        self.isend(buf, dest, tag)?.wait()
    }

    /// Receives into `buf` and returns who sent how much with which tag.
    ///
    /// # Errors
    /// [`Error::Truncated`] when the message is larger than `buf` (nothing is written),
    /// [`Error::Timeout`], fabric errors.
    pub fn recv<T: Pod>(
        &self,
        buf: &mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
    ) -> Result<Status> {
        self.irecv(buf, src, tag)?.wait()
    }

    /// Async [`Communicator::send`] for tokio code. The future may be dropped at any time.
    ///
    /// # Errors
    /// As [`Communicator::send`].
    pub async fn send_async<T: Pod>(&self, buf: &[T], dest: u32, tag: u32) -> Result<()> {
        let mut req = self.isend(buf, dest, tag)?;
        poll_until(self, "send", Some(dest), || req.test()).await?;
        req.wait()
    }

    /// Async [`Communicator::recv`] for tokio code. The future may be dropped at any time;
    /// the receive is then cancelled.
    ///
    /// # Errors
    /// As [`Communicator::recv`].
    pub async fn recv_async<T: Pod>(
        &self,
        buf: &mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
    ) -> Result<Status> {
        let mut req = self.irecv(buf, src, tag)?;
        let peer = match req.src {
            Source::Rank(r) => Some(r),
            Source::Any => None,
        };
        poll_until(self, "recv", peer, || req.test()).await?;
        req.wait()
    }

    /// Progresses every endpoint once.
    ///
    /// # Errors
    /// Fabric errors that belong to no operation.
    pub fn progress(&self) -> Result<()> {
        self.engine().progress()
    }

    /// Waits for every request, returning the receive statuses in order (`None` for sends).
    /// All requests are waited for even when one fails; the first error is returned.
    ///
    /// # Errors
    /// The first request's error.
    pub fn wait_all(&self, reqs: Vec<Request<'_>>) -> Result<Vec<Option<Status>>> {
        let mut out = Vec::with_capacity(reqs.len());
        let mut first_err = None;
        for r in reqs {
            let res = match r {
                Request::Send(s) => s.wait().map(|()| None),
                Request::Recv(r) => r.wait().map(Some),
            };
            match res {
                Ok(s) => out.push(s),
                Err(e) => {
                    out.push(None);
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Polls `test` from an async context: yields to the runtime between polls and sleeps with a
/// growing interval when idle, until done or the deadline.
async fn poll_until(
    comm: &Communicator,
    op: &'static str,
    peer: Option<u32>,
    mut test: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let timeout = comm.timeout();
    let start = Instant::now();
    let mut idle = 0u32;
    loop {
        if test()? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(comm.engine().deadline_passed(op, peer, start.elapsed()));
        }
        idle += 1;
        if idle < 64 {
            tokio::task::yield_now().await;
        } else {
            let us = (idle as u64 - 63).min(200);
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

/// Either kind of request, for [`Communicator::wait_all`].
#[derive(Debug)]
pub enum Request<'a> {
    /// A send.
    Send(SendRequest),
    /// A receive.
    Recv(RecvRequest<'a>),
}

impl From<SendRequest> for Request<'_> {
    fn from(r: SendRequest) -> Self {
        Request::Send(r)
    }
}
impl<'a> From<RecvRequest<'a>> for Request<'a> {
    fn from(r: RecvRequest<'a>) -> Self {
        Request::Recv(r)
    }
}

/// A send in progress. Dropping it does not cancel the send (the data is already owned by
/// the engine), but its outcome is then not reported.
#[derive(Debug)]
#[must_use = "a send request should be waited for to learn its outcome"]
pub struct SendRequest {
    comm: Communicator,
    id: u64,
    dest: u32,
}

impl SendRequest {
    /// Progresses and reports whether the send has completed (successfully or not).
    ///
    /// # Errors
    /// Fabric errors that belong to no operation.
    pub fn test(&mut self) -> Result<bool> {
        let mut e = self.comm.engine();
        e.progress()?;
        Ok(e.send_finished(self.id))
    }

    /// Waits for the send to complete, up to the communicator's timeout.
    ///
    /// # Errors
    /// [`Error::Timeout`] naming the peer; [`Error::PeerFailed`]; fabric errors. (A
    /// truncation is reported to the receiver only.)
    pub fn wait(mut self) -> Result<()> {
        let comm = self.comm.clone();
        let id = self.id;
        wait_loop(&comm, "send", Some(self.dest), |e| e.send_finished(id))?;
        let state = comm.engine().sends.remove(&id);
        // Consumed: the drop below has nothing left to detach. (Not `mem::forget`, which
        // would leak this request's clone of the communicator, so the communicator would
        // never be dropped and never finalize.)
        self.id = 0;
        match state.map(|s| s.state) {
            Some(SendState::Failed(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for SendRequest {
    fn drop(&mut self) {
        if self.id == 0 {
            return;
        }
        // Forget the outcome; in-flight data stays owned by the engine until done.
        let mut e = self.comm.engine();
        if e.send_finished(self.id) {
            e.sends.remove(&self.id);
        } else if let Some(op) = e.sends.get_mut(&self.id) {
            op.tag = u32::MAX; // detached: removed when it finishes
        }
    }
}

/// A receive in progress into a borrowed buffer. Dropping it cancels the receive.
#[derive(Debug)]
#[must_use = "a receive request must be waited for"]
pub struct RecvRequest<'a> {
    comm: Communicator,
    id: u64,
    src: Source,
    buf: Option<&'a mut [u8]>,
    elem: usize,
}

impl RecvRequest<'_> {
    /// Progresses and reports whether the receive has completed (successfully or not).
    ///
    /// # Errors
    /// Fabric errors that belong to no operation.
    pub fn test(&mut self) -> Result<bool> {
        let mut e = self.comm.engine();
        e.progress()?;
        Ok(e.recv_finished(self.id))
    }

    /// Waits for the message, copies it into the buffer and returns its status.
    ///
    /// # Errors
    /// [`Error::Truncated`] (nothing written), [`Error::Timeout`], [`Error::ElementSize`],
    /// fabric errors.
    pub fn wait(mut self) -> Result<Status> {
        let peer = match self.src {
            Source::Rank(r) => Some(r),
            Source::Any => None,
        };
        let comm = self.comm.clone();
        let id = self.id;
        if let Err(e) = wait_loop(&comm, "recv", peer, |e| e.recv_finished(id)) {
            comm.engine().cancel_recv(id);
            self.id = 0;
            return Err(e);
        }
        let op = comm.engine().recvs.remove(&id);
        self.id = 0;
        let op = op.expect("finished receive is present");
        match op.state {
            RecvState::Failed(e) => Err(e),
            _ => {
                let status = op.status.expect("completed receive has a status");
                if !status.len.is_multiple_of(self.elem.max(1)) {
                    return Err(Error::ElementSize {
                        bytes: status.len,
                        elem: self.elem,
                    });
                }
                let buf = self.buf.take().expect("buffer present until wait");
                buf[..status.len].copy_from_slice(&op.data[..status.len]);
                comm.engine().pool.put(op.data);
                Ok(status)
            }
        }
    }
}

impl Drop for RecvRequest<'_> {
    fn drop(&mut self) {
        if self.id != 0 {
            self.comm.engine().cancel_recv(self.id);
        }
    }
}

/// Progresses until `done` holds, spinning then backing off, up to the timeout.
fn wait_loop(
    comm: &Communicator,
    op: &'static str,
    peer: Option<u32>,
    mut done: impl FnMut(&Engine) -> bool,
) -> Result<()> {
    let start = Instant::now();
    let timeout = comm.timeout();
    let mut backoff = efa_fabric::Backoff::new();
    let mut clock = efa_fabric::PollClock::new(timeout);
    loop {
        {
            let mut e = comm.engine();
            if done(&e) {
                return Ok(());
            }
            let before = e.events;
            e.progress()?;
            if done(&e) {
                return Ok(());
            }
            if e.events != before {
                backoff.reset();
            }
        }
        if clock.expired() {
            return Err(comm.engine().deadline_passed(op, peer, start.elapsed()));
        }
        backoff.snooze();
    }
}

/// The role settings of a communicator: its transports, interface and fabric address as
/// settled by [`CommunicatorBuilder::build`], and libfabric's own filters (for reasons).
fn role_settings(config: &Config, all_local: bool) -> roles::Settings {
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    roles::Settings {
        transports: config.transports,
        transports_from: format!("the allowed transports ({})", config.transports),
        ip_iface: config.ip_iface.clone(),
        fabric_addr: config.fabric_addr.clone(),
        all_local,
        fi_provider: env("FI_PROVIDER"),
        fi_tcp_iface: env("FI_TCP_IFACE"),
    }
}

/// Asks libfabric and the host what they offer and chooses the endpoint of each role
/// ([`roles::discover`], [`roles::select`]: the same choice `efa info` shows).
fn select_roles(config: &Config, all_local: bool) -> (roles::Discovery, roles::Selection) {
    let settings = role_settings(config, all_local);
    let discovery = roles::discover(&settings, roles::Listing::Roles);
    if let Some(e) = &discovery.error {
        tracing::debug!("fi_getinfo: {e}");
    }
    let selection = roles::select(&discovery.offers, &discovery.interfaces, &settings);
    for rc in &selection.roles {
        match rc.chosen.map(|i| &discovery.offers[i]) {
            Some(o) => {
                tracing::debug!(transport = %rc.role, provider = %o.provider, fabric = %o.fabric, domain = %o.domain, iface = ?o.iface, subnet = ?rc.subnet, why = %rc.why, "role")
            }
            None => tracing::debug!(transport = %rc.role, why = %rc.why, "role has no endpoint"),
        }
    }
    (discovery, selection)
}

/// Opens the endpoint of every role that has one, and starts this rank's card with their
/// addresses and subnets.
///
/// # Errors
/// [`Error::NoTransport`] when no role has an endpoint; fabric errors opening one.
fn open_ports(
    rank: u32,
    discovery: &roles::Discovery,
    selection: &roles::Selection,
    config: &Config,
) -> Result<(Vec<Port>, Card)> {
    let mut ports: Vec<Port> = Vec::new();
    let mut card = Card {
        rank,
        host_id: placement::host_id().map_err(|e| Error::Config(e.to_string()))?,
        endpoints: Vec::new(),
        fabric_subnet: None,
        ip_subnet: None,
        process: placement::ProcessId::this(),
    };
    let mut missing = Vec::new();
    for rc in &selection.roles {
        let Some(info) = rc.chosen.and_then(|i| discovery.info(i)) else {
            if config.transports.contains(rc.role) {
                missing.push(format!("{}: {}", rc.role, rc.why));
            }
            continue;
        };
        ports.push(open_port(rc.role, info, config)?);
        match rc.role {
            Transport::Shm => {}
            Transport::Fabric => card.fabric_subnet = rc.subnet,
            Transport::Ip => card.ip_subnet = rc.subnet,
        }
    }
    if ports.is_empty() {
        return Err(Error::NoTransport(format!(
            "allowed {}; {}",
            config.transports,
            missing.join("; ")
        )));
    }
    for p in &ports {
        card.endpoints.push(EndpointCard {
            transport: p.transport,
            provider: p.provider.clone(),
            addr: p
                .ep
                .name()
                .map_err(|e| Error::fabric("fi_getname", None, e))?,
        });
    }
    Ok((ports, card))
}

/// Publishes this rank's card and reads every rank's, indexed by rank.
///
/// # Errors
/// [`Error::Card`] for a card that does not encode or decode; store errors and timeouts.
fn exchange_cards(
    store: &dyn Store,
    card: &Card,
    rank: u32,
    size: u32,
    deadline: Instant,
) -> Result<Vec<Card>> {
    let encoded = card
        .encode()
        .map_err(|source| Error::Card { rank, source })?;
    let blobs = store::exchange_all(store, "efa/card", rank, size, &encoded, deadline)?;
    blobs
        .iter()
        .enumerate()
        .map(|(r, b)| {
            Card::decode(b).map_err(|source| Error::Card {
                rank: r as u32,
                source,
            })
        })
        .collect()
}

/// The route to every rank ([`placement::choose_route`]), indexed by rank.
///
/// # Errors
/// [`Error::NoRoute`] for the first peer that no allowed transport reaches.
fn choose_routes(card: &Card, cards: &[Card], allowed: &TransportSet) -> Result<Vec<Route>> {
    cards
        .iter()
        .enumerate()
        .map(|(r, peer_card)| {
            placement::choose_route(card, peer_card, allowed).map_err(|e| Error::NoRoute {
                peer: r as u32,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Inserts every peer's address into the address vector of the endpoint its route uses,
/// and marks those endpoints used.
///
/// # Errors
/// Fabric errors of `fi_av_insert`.
fn connect_peers(
    rank: u32,
    ports: &mut [Port],
    cards: &[Card],
    routes: &[Route],
) -> Result<Vec<PeerRoute>> {
    let mut peers = Vec::with_capacity(routes.len());
    for (r, (route, peer_card)) in routes.iter().zip(cards).enumerate() {
        let port = ports
            .iter()
            .position(|p| p.transport == route.transport)
            .expect("routes use opened transports");
        let addr = ports[port]
            .ep
            .av()
            .insert(&peer_card.endpoints[route.peer_endpoint].addr)
            .map_err(|e| Error::fabric("fi_av_insert", Some(r as u32), e))?;
        tracing::debug!(rank, peer = r, transport = %route.transport, provider = %ports[port].provider, reason = %route.reason, "route");
        ports[port].used = true;
        peers.push(PeerRoute { port, addr });
    }
    Ok(peers)
}

/// The liveness flags shared by the engine and every endpoint's post path, and which rank
/// each endpoint's addresses are.
fn liveness(card: &Card, cards: &[Card], ports: &[Port], peers: &[PeerRoute]) -> Arc<Liveness> {
    let live = Arc::new(Liveness {
        dead: (0..cards.len())
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect(),
        procs: cards
            .iter()
            .map(|c| (c.process.clone(), c.host_id == card.host_id))
            .collect(),
    });
    for (i, port) in ports.iter().enumerate() {
        let rank_of = peers
            .iter()
            .enumerate()
            .filter(|(_, r)| r.port == i)
            .map(|(rank, r)| (r.addr, rank as u32))
            .collect();
        let _ = port.liveness.set(PortLiveness {
            rank_of,
            liveness: live.clone(),
        });
    }
    live
}

/// Builds the engine over the open endpoints, posts its receive buffers, and wraps it in
/// a communicator.
///
/// # Errors
/// Fabric errors posting the receive buffers.
#[allow(clippy::too_many_arguments)]
fn assemble(
    rank: u32,
    size: u32,
    config: Config,
    store: Arc<dyn Store>,
    ports: Vec<Port>,
    peers: Vec<PeerRoute>,
    routes: Vec<Route>,
    live: Arc<Liveness>,
) -> Result<Communicator> {
    let providers = ports
        .iter()
        .map(|p| (p.transport, p.provider.clone()))
        .collect();
    let scratch_len = ports
        .iter()
        .map(|p| p.inject.max(HDR_LEN + p.eager))
        .max()
        .unwrap_or(HDR_LEN);
    let mut engine = Engine {
        rank,
        ports,
        peers,
        next_seq: vec![0; size as usize],
        expected_seq: vec![0; size as usize],
        reorder: (0..size).map(|_| BTreeMap::new()).collect(),
        posted: VecDeque::new(),
        unexpected: VecDeque::new(),
        recvs: HashMap::default(),
        sends: HashMap::default(),
        rndv_sends: HashMap::new(),
        background: Vec::new(),
        next_id: 1,
        next_rndv: 1,
        // Control messages are assembled here when they are injected: as large as the
        // largest inject size or eager message of any endpoint.
        scratch: vec![0u8; scratch_len],
        ctx: 0,
        events: 0,
        notifications: VecDeque::new(),
        pool: BufPool::default(),
        fin: vec![FinState::default(); size as usize],
        finalized: false,
        live,
        failure: None,
        polls: 0,
        last_check: Instant::now(),
        last_ping: Instant::now(),
        refused_since: vec![None; size as usize],
        broken: false,
    };
    engine.post_all_slots()?;
    Ok(Communicator {
        inner: Arc::new(Inner {
            rank,
            size,
            routes,
            providers,
            _store: store,
            engine: Mutex::new(engine),
            config,
            objects: std::sync::atomic::AtomicU32::new(0),
            coll_seq: std::sync::atomic::AtomicU32::new(0),
        }),
    })
}

/// Waits until every rank has posted its receive buffers (so nobody sends before its peer
/// can receive), then removes this rank's card from the store.
///
/// # Errors
/// Store errors and timeouts: the job never started, and this rank will not finalize.
fn ready_barrier(comm: &Communicator, store: &dyn Store) -> Result<()> {
    let (rank, size) = (comm.inner.rank, comm.inner.size);
    if let Err(e) = store::barrier(
        store,
        "efa/ready",
        rank,
        size,
        Instant::now() + comm.inner.config.timeout,
    ) {
        // The job never started: there is nothing to finalize, and a rank that never
        // became ready would hold this one's drop for a whole deadline more.
        lock_engine(&comm.inner.engine).finalized = true;
        store.job_failed();
        return Err(e.into());
    }
    // Every rank has read every card (a rank sets its ready key only after that), so the
    // cards can go: a persistent store reused by a later job with the same id must not
    // hand it this job's addresses.
    if let Err(e) = store.delete(&format!("efa/card/{rank}")) {
        tracing::warn!("could not remove this rank's card from the store: {e}");
    }
    Ok(())
}

/// The ranks behind one endpoint's addresses, and the communicator's liveness flags.
struct PortLiveness {
    rank_of: HashMap<FiAddr, u32>,
    liveness: Arc<Liveness>,
}

/// What posts retrying on a full queue ask: whether the rank they post to is still alive.
/// Shared by the engine (which marks failed ranks) and every endpoint's post path.
struct Liveness {
    /// Ranks known to have failed.
    dead: Vec<std::sync::atomic::AtomicBool>,
    /// Each rank's process, and whether it shares this host (so its pid can be checked).
    procs: Vec<(placement::ProcessId, bool)>,
}

impl Liveness {
    /// False once `rank` is known to have failed, or its process on this host is gone.
    fn alive(&self, rank: u32) -> bool {
        let r = rank as usize;
        if self.dead[r].load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let (p, same_host) = &self.procs[r];
        !(*same_host && p.is_gone())
    }
}

fn open_port(transport: Transport, info: &Info, config: &Config) -> Result<Port> {
    let provider = info.provider();
    let liveness: Arc<std::sync::OnceLock<PortLiveness>> = Arc::default();
    let check = {
        let l = liveness.clone();
        Arc::new(move |addr: FiAddr| {
            l.get().is_none_or(|pl| {
                pl.rank_of
                    .get(&addr)
                    .is_none_or(|&rank| pl.liveness.alive(rank))
            })
        })
    };
    // Posts that find the provider's queue full retry (progressing) for at most the
    // communicator's deadline: a peer that died with our messages queued must not hold a
    // caller past the deadline it was promised.
    let ep = (|| {
        let domain = efa_fabric::Domain::open(info)?;
        let av = efa_fabric::AddressVector::open(&domain)?;
        let cq = efa_fabric::CompletionQueue::open(&domain, 0)?;
        Endpoint::builder(&domain, &av, &cq)
            .post_timeout(config.timeout)
            // A post to a rank that died stops retrying at once (its queue never drains).
            .peer_check(check)
            .build()
    })()
    .map_err(|e| Error::fabric("opening endpoint", None, e))?;
    let max_msg = info.max_msg_size();
    let limit = if transport == Transport::Shm {
        config.shm_eager_limit
    } else {
        config.eager_limit
    };
    let eager = limit.min(max_msg.saturating_sub(HDR_LEN));
    let slot_len = HDR_LEN + eager;
    if max_msg < HDR_LEN + 1 {
        return Err(Error::NoTransport(format!(
            "{provider}: max_msg_size {max_msg} is too small"
        )));
    }
    let mut bounce = Vec::new();
    for _ in 0..8 {
        bounce.push(
            RegisteredBuf::new(ep.domain(), slot_len, Access::LOCAL, Some(&ep))
                .map_err(|e| Error::fabric("registering buffers", None, e))?,
        );
    }
    tracing::debug!(%transport, %provider, fabric = %info.fabric(), domain = %info.domain(), "endpoint open");
    Ok(Port {
        liveness,
        transport,
        provider,
        inject: info.inject_size(),
        max_msg,
        eager,
        slots: (0..config.rx_depth).map(|_| None).collect(),
        bounce,
        ep,
        used: false,
        seen: 0,
    })
}

impl Engine {
    fn slot_len(&self, port: usize) -> usize {
        HDR_LEN + self.ports[port].eager
    }

    fn post_all_slots(&mut self) -> Result<()> {
        for p in 0..self.ports.len() {
            for s in 0..self.ports[p].slots.len() {
                let len = self.slot_len(p);
                let buf = RegisteredBuf::new(
                    self.ports[p].ep.domain(),
                    len,
                    Access::LOCAL,
                    Some(&self.ports[p].ep),
                )
                .map_err(|e| Error::fabric("registering buffers", None, e))?;
                self.post_slot(p, s, buf)?;
            }
        }
        Ok(())
    }

    fn post_slot(&mut self, port: usize, slot: usize, buf: RegisteredBuf) -> Result<()> {
        let pending = self.ports[port]
            .ep
            .trecv(buf, FiAddr::UNSPEC, CTRL_TAG, 0)
            .map_err(|e| Error::fabric("posting receive buffers", None, e.error))?;
        self.ports[port].slots[slot] = Some(pending);
        Ok(())
    }

    fn route(&self, peer: u32) -> (usize, FiAddr) {
        let r = &self.peers[peer as usize];
        (r.port, r.addr)
    }

    /// Sends a control message (header + payload) to `dest`: inject when it fits, else
    /// through a bounce buffer tracked in the background.
    fn send_ctrl(&mut self, dest: u32, hdr: &Header, payload: &[u8]) -> Result<()> {
        self.send_ctrl_with(dest, hdr, payload, true)
    }

    /// [`Engine::send_ctrl`], injecting only when `inject` allows it. An inject has no
    /// completion, so a provider may still hold it when the endpoint closes: the finalize
    /// handshake's messages are tracked sends instead.
    fn send_ctrl_with(
        &mut self,
        dest: u32,
        hdr: &Header,
        payload: &[u8],
        inject: bool,
    ) -> Result<()> {
        let (port, addr) = self.route(dest);
        let total = HDR_LEN + payload.len();
        let p = &mut self.ports[port];
        if inject && total <= p.inject {
            let s = &mut self.scratch[..total];
            hdr.encode(s);
            s[HDR_LEN..].copy_from_slice(payload);
            return p
                .ep
                .tinject(s, addr, CTRL_TAG)
                .map_err(|e| Error::fabric("send", Some(dest), e));
        }
        let mut buf = match p.bounce.pop() {
            Some(b) => b,
            None => {
                let len = HDR_LEN + p.eager;
                RegisteredBuf::new(p.ep.domain(), len, Access::LOCAL, Some(&p.ep))
                    .map_err(|e| Error::fabric("registering buffers", Some(dest), e))?
            }
        };
        hdr.encode(&mut buf[..HDR_LEN]);
        buf[HDR_LEN..total].copy_from_slice(payload);
        let op =
            p.ep.tsend(BufPrefix::new(buf, total), addr, CTRL_TAG)
                .map_err(|e| Error::fabric("send", Some(dest), e.error))?;
        self.background.push(Background { port, dest, op });
        Ok(())
    }

    /// Sends a [`Kind::Ping`] to `dest` without waiting for room in a full queue. `Ok(false)`
    /// when the provider had no room (`FI_EAGAIN`: a connection-oriented provider answers
    /// so while it tries to reach a peer that is gone).
    fn probe(&mut self, dest: u32) -> std::result::Result<bool, efa_fabric::Error> {
        let (port, addr) = self.route(dest);
        let hdr = Header {
            kind: Kind::Ping,
            flags: 0,
            src: self.rank,
            tag: 0,
            seq: 0,
            len: 0,
            rndv: 0,
            ctx: self.ctx,
        };
        let p = &mut self.ports[port];
        let mut buf = match p.bounce.pop() {
            Some(b) => b,
            None => {
                RegisteredBuf::new(p.ep.domain(), HDR_LEN + p.eager, Access::LOCAL, Some(&p.ep))?
            }
        };
        hdr.encode(&mut buf[..HDR_LEN]);
        match p.ep.tsend_within(
            BufPrefix::new(buf, HDR_LEN),
            addr,
            CTRL_TAG,
            Duration::from_millis(1),
        ) {
            Ok(op) => {
                self.background.push(Background { port, dest, op });
                Ok(true)
            }
            Err(e) => {
                if let Some(b) = e.buf {
                    p.bounce.push(b.into_inner());
                }
                match e.error {
                    efa_fabric::Error::Timeout { .. } => Ok(false),
                    other => Err(other),
                }
            }
        }
    }

    fn start_send(&mut self, data: &[u8], dest: u32, tag: u32) -> Result<u64> {
        self.start_send_inner(data, dest, tag)
            .map_err(|e| self.upgrade(e))
    }

    fn start_send_inner(&mut self, data: &[u8], dest: u32, tag: u32) -> Result<u64> {
        self.check_open()?;
        if self.fin[dest as usize].got_fin {
            return Err(Error::PeerFinalized { rank: dest });
        }
        let id = self.next_id;
        self.next_id += 1;
        let seq = self.next_seq[dest as usize];
        self.next_seq[dest as usize] = seq.wrapping_add(1);
        let mut hdr = Header {
            kind: Kind::Eager,
            flags: 0,
            src: self.rank,
            tag,
            seq,
            len: data.len() as u64,
            rndv: 0,
            ctx: self.ctx,
        };
        let (port, _) = self.route(dest);
        if data.len() <= self.slot_len(port) - HDR_LEN {
            self.send_ctrl(dest, &hdr, data)?;
            self.sends.insert(
                id,
                SendOp {
                    dest,
                    tag,
                    state: SendState::Done,
                },
            );
            return Ok(id);
        }
        let rndv = self.next_rndv;
        self.next_rndv = self.next_rndv.wrapping_add(1).max(1) & 0xF_FFFF;
        hdr.kind = Kind::Rts;
        hdr.rndv = rndv;
        self.send_ctrl(dest, &hdr, &[])?;
        self.rndv_sends.insert(rndv, id);
        self.sends.insert(
            id,
            SendOp {
                dest,
                tag,
                state: SendState::WaitCts {
                    data: Arc::new(self.pool.take_filled(data)),
                },
            },
        );
        Ok(id)
    }

    fn start_recv(&mut self, src: Source, tag: Tag, capacity: usize) -> Result<u64> {
        self.check_open()?;
        let id = self.next_id;
        self.next_id += 1;
        self.recvs.insert(
            id,
            RecvOp {
                src,
                tag,
                capacity,
                data: Vec::new(),
                status: None,
                state: RecvState::Posted,
            },
        );
        // Search the messages already processed (oldest first). A message that has arrived
        // but is not processed yet will match this receive in `posted` when it is: no
        // progress call is needed here.
        let pos = self.unexpected.iter().position(|u| {
            let (s, t) = match u {
                Unexpected::Eager { src, tag, .. } | Unexpected::Rts { src, tag, .. } => {
                    (*src, *tag)
                }
            };
            matches(src, tag, s, t)
        });
        match pos {
            Some(i) => {
                let u = self.unexpected.remove(i).expect("index from position");
                self.deliver(id, u)?;
            }
            None => match src {
                // Everything that rank sent has been processed: nothing can match any more.
                Source::Rank(r) if self.fin[r as usize].got_fin => {
                    self.recvs.get_mut(&id).expect("inserted above").state =
                        RecvState::Failed(Error::PeerFinalized { rank: r });
                }
                _ => self.posted.push_back(id),
            },
        }
        Ok(id)
    }

    fn check_open(&self) -> Result<()> {
        if self.finalized {
            return Err(Error::Finalized);
        }
        match self.failure_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The error every operation gets once a peer has failed.
    fn failure_error(&self) -> Option<Error> {
        self.failure
            .as_ref()
            .map(|(rank, cause)| Error::PeerFailed {
                rank: *rank,
                cause: cause.clone(),
            })
    }

    /// Records that `rank` failed (the first failure wins), fails every pending operation,
    /// and, when this rank learned it first hand (`tell`), tells every other rank it can
    /// still reach.
    fn mark_failed(&mut self, rank: u32, cause: PeerFailure, tell: bool) {
        if self.failure.is_some() {
            return;
        }
        tracing::error!(rank = self.rank, failed = rank, "{}", cause.describe(rank));
        self.failure = Some((rank, cause.clone()));
        if let Some(d) = self.live.dead.get(rank as usize) {
            d.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let err = || Error::PeerFailed {
            rank,
            cause: cause.clone(),
        };
        self.posted.clear();
        self.rndv_sends.clear();
        // Their transfers are given up without waiting (`Pending::abandon`): a dead peer's
        // may never complete, and dropping them would wait for each in turn.
        for op in self.recvs.values_mut() {
            if matches!(op.state, RecvState::Done | RecvState::Failed(_)) {
                continue;
            }
            if let RecvState::Receiving { chunks } = &mut op.state {
                chunks.drain(..).for_each(Pending::abandon);
            }
            op.state = RecvState::Failed(err());
        }
        for op in self.sends.values_mut() {
            if matches!(op.state, SendState::Done | SendState::Failed(_)) {
                continue;
            }
            if let SendState::Sending { chunks, .. } = &mut op.state {
                chunks.drain(..).for_each(Pending::abandon);
            }
            op.state = SendState::Failed(err());
        }
        let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.background)
            .into_iter()
            .partition(|b| b.dest == rank);
        self.background = kept;
        lost.into_iter().for_each(|b| b.op.abandon());
        // Detached sends that failed are forgotten.
        self.sends.retain(|_, op| op.tag != u32::MAX);
        if tell {
            let (code, num, text) = match &cause {
                PeerFailure::Exited { pid, host } => (
                    FailCode::Exited,
                    u64::from(pid.unwrap_or(0)),
                    host.clone().unwrap_or_default(),
                ),
                PeerFailure::Unreachable { detail } => (FailCode::Unreachable, 0, detail.clone()),
                PeerFailure::Aborted { code, reason } => {
                    (FailCode::Aborted, *code as i64 as u64, reason.clone())
                }
                PeerFailure::Stopped { pid, waited } => (
                    FailCode::Stopped,
                    u64::from(*pid) | ((waited.as_millis() as u64) << 32),
                    String::new(),
                ),
                PeerFailure::TimedOut { waited } => {
                    (FailCode::TimedOut, waited.as_millis() as u64, String::new())
                }
            };
            let mut end = text.len().min(1024);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let h = Header {
                kind: Kind::Failed,
                flags: code as u8,
                src: self.rank,
                tag: rank,
                seq: 0,
                len: num,
                rndv: 0,
                ctx: self.ctx,
            };
            for p in 0..self.peers.len() as u32 {
                if p == self.rank || p == rank || self.fin[p as usize].got_ack {
                    continue;
                }
                if let Err(e) = self.send_ctrl(p, &h, &text.as_bytes()[..end]) {
                    tracing::debug!(peer = p, "could not tell the rank about the failure: {e}");
                }
            }
        }
    }

    /// A failure notice from `from` about rank `h.tag`.
    fn on_failed(&mut self, h: &Header, text: &[u8]) {
        let text = String::from_utf8_lossy(text).into_owned();
        let cause = match FailCode::from_flags(h.flags) {
            Some(FailCode::Exited) => PeerFailure::Exited {
                pid: (h.len != 0).then_some(h.len as u32),
                host: (!text.is_empty()).then_some(text),
            },
            Some(FailCode::Aborted) => PeerFailure::Aborted {
                code: h.len as i64 as i32,
                reason: text,
            },
            Some(FailCode::Stopped) => PeerFailure::Stopped {
                pid: h.len as u32,
                waited: Duration::from_millis(h.len >> 32),
            },
            Some(FailCode::TimedOut) => PeerFailure::TimedOut {
                waited: Duration::from_millis(h.len),
            },
            _ => PeerFailure::Unreachable {
                detail: format!("{text} (reported by rank {})", h.src),
            },
        };
        let rank = if (h.tag as usize) < self.peers.len() {
            h.tag
        } else {
            h.src
        };
        self.mark_failed(rank, cause, false);
    }

    /// Looks at the processes of same-host peers that have not finalized: one that is gone
    /// (or whose pid now belongs to another process) has failed.
    fn check_peers(&mut self) {
        for p in 0..self.live.procs.len() {
            let (proc_, same_host) = &self.live.procs[p];
            if p as u32 == self.rank || !same_host || proc_.pid == 0 || self.fin[p].got_fin {
                continue;
            }
            if proc_.is_gone() {
                let cause = exited(proc_);
                self.mark_failed(p as u32, cause, true);
                return;
            }
        }
    }

    /// After a deadline passed: the job is broken; a stopped same-host peer, if any, is the
    /// culprit, every rank is told, and its error is returned.
    fn stopped_culprit(&mut self, waited: Duration) -> Option<Error> {
        self.broken = true;
        if let Some(e) = self.failure_error() {
            return Some(e);
        }
        let (rank, pid) = self.stopped_peer()?;
        self.mark_failed(rank, PeerFailure::Stopped { pid, waited }, true);
        self.failure_error()
    }

    /// Probes the peers on other hosts that a pending operation waits for (every such peer
    /// for a receive from any source): a send to a process that is gone fails, and the
    /// failure is then reported like any other (see [`Engine::reap_background`]).
    fn ping_remote_peers(&mut self) {
        let mut want = vec![false; self.live.procs.len()];
        let mut any = false;
        for id in &self.posted {
            match self.recvs.get(id).map(|op| op.src) {
                Some(Source::Rank(r)) => want[r as usize] = true,
                Some(Source::Any) => any = true,
                None => {}
            }
        }
        for op in self.sends.values() {
            if matches!(op.state, SendState::WaitCts { .. }) {
                want[op.dest as usize] = true;
            }
        }
        let mut bulk = vec![false; want.len()];
        for op in self.recvs.values() {
            if let (RecvState::Receiving { .. }, Some(st)) = (&op.state, op.status) {
                want[st.source as usize] = true;
                bulk[st.source as usize] = true;
            }
        }
        for op in self.sends.values() {
            if matches!(op.state, SendState::Sending { .. }) {
                bulk[op.dest as usize] = true;
            }
        }
        for (p, wanted) in want.into_iter().enumerate() {
            let remote = !self.live.procs[p].1;
            if p as u32 == self.rank || !remote || self.fin[p].got_fin || !(any || wanted) {
                continue;
            }
            // While rendezvous data moves to or from the peer, a full queue is congestion (a
            // large transfer fills it for seconds), not a dead peer: not judged then.
            if bulk[p] {
                self.refused_since[p] = None;
            }
            let detail = match self.probe(p as u32) {
                Ok(true) => {
                    self.refused_since[p] = None;
                    continue;
                }
                Ok(false) => {
                    let since = *self.refused_since[p].get_or_insert_with(Instant::now);
                    if since.elapsed() < PROBE_REFUSED_LIMIT {
                        continue;
                    }
                    format!(
                        "the transport has refused every message to it for {:?} (its process \
                         or host is gone, or its network is cut)",
                        since.elapsed()
                    )
                }
                Err(e) => e.to_string(),
            };
            self.mark_failed(p as u32, PeerFailure::Unreachable { detail }, true);
            return;
        }
    }

    /// A same-host peer whose process is stopped (SIGSTOP, a debugger): rank and pid.
    fn stopped_peer(&self) -> Option<(u32, u32)> {
        self.live
            .procs
            .iter()
            .enumerate()
            .filter(|(p, (_, same))| *p as u32 != self.rank && *same)
            .find(|(_, (id, _))| id.is_stopped())
            .map(|(p, (id, _))| (p as u32, id.pid))
    }

    /// What a wait that passed its deadline reports: a stopped same-host peer is named as
    /// the culprit; otherwise the peer waited for is. Either way every other rank is told, so
    /// that theirs fail at once instead of at their own deadlines.
    fn deadline_passed(&mut self, op: &'static str, peer: Option<u32>, waited: Duration) -> Error {
        if let Some(e) = self.stopped_culprit(waited) {
            return e;
        }
        if let Some(p) = peer.filter(|&p| p != self.rank) {
            self.mark_failed(p, PeerFailure::TimedOut { waited }, true);
        }
        Error::Timeout { op, peer, waited }
    }

    /// A send to some peer that has not completed locally (its request or a background
    /// bounce-buffer send), if any.
    fn unfinished_send(&self) -> Option<u32> {
        self.sends
            .values()
            .find(|op| !matches!(op.state, SendState::Done | SendState::Failed(_)))
            .map(|op| op.dest)
            .or_else(|| self.background.first().map(|b| b.dest))
    }

    /// Whether rendezvous data from `peer` is still being received.
    fn receiving_from(&self, peer: u32) -> bool {
        self.recvs.values().any(|op| {
            matches!(op.state, RecvState::Receiving { .. })
                && op.status.is_some_and(|s| s.source == peer)
        })
    }

    fn fin_header(&mut self, kind: Kind, peer: u32) -> Header {
        let seq = if kind == Kind::Fin {
            let s = self.next_seq[peer as usize];
            self.next_seq[peer as usize] = s.wrapping_add(1);
            s
        } else {
            0
        };
        Header {
            kind,
            flags: 0,
            src: self.rank,
            tag: 0,
            seq,
            len: 0,
            rndv: 0,
            ctx: self.ctx,
        }
    }

    /// One step of the finalize handshake: acknowledges every peer whose `Fin` has been
    /// processed and whose rendezvous data has all arrived. Returns the first peer the
    /// handshake still waits for, or `None` when it is complete and every handshake message
    /// has completed locally.
    fn finalize_step(&mut self) -> Result<Option<u32>> {
        let mut waiting = None;
        for p in 0..self.fin.len() as u32 {
            if p == self.rank {
                continue;
            }
            let f = self.fin[p as usize];
            if f.got_fin && !f.sent_ack && !self.receiving_from(p) {
                let h = self.fin_header(Kind::FinAck, p);
                self.send_ctrl_with(p, &h, &[], false)?;
                self.fin[p as usize].sent_ack = true;
            }
            let f = self.fin[p as usize];
            if waiting.is_none() && !(f.sent_ack && f.got_ack) {
                waiting = Some(p);
            }
        }
        Ok(waiting.or_else(|| self.background.first().map(|b| b.dest)))
    }

    fn cancel_recv(&mut self, id: u64) {
        self.posted.retain(|&p| p != id);
        // Dropping the op drops any rendezvous chunk receives, which cancels and drains them.
        self.recvs.remove(&id);
    }

    fn send_finished(&self, id: u64) -> bool {
        match self.sends.get(&id) {
            Some(op) => matches!(op.state, SendState::Done | SendState::Failed(_)),
            None => true,
        }
    }

    fn recv_finished(&self, id: u64) -> bool {
        match self.recvs.get(&id) {
            Some(op) => matches!(op.state, RecvState::Done | RecvState::Failed(_)),
            None => true,
        }
    }

    /// Hands a matched message to receive `id`.
    fn deliver(&mut self, id: u64, msg: Unexpected) -> Result<()> {
        let Some(op) = self.recvs.get_mut(&id) else {
            return Ok(());
        };
        match msg {
            Unexpected::Eager { src, tag, data } => {
                if data.len() > op.capacity {
                    op.state = RecvState::Failed(Error::Truncated {
                        expected: op.capacity,
                        got: data.len(),
                        peer: src,
                        tag,
                    });
                } else {
                    op.status = Some(Status {
                        source: src,
                        tag,
                        len: data.len(),
                    });
                    op.data = data;
                    op.state = RecvState::Done;
                }
                Ok(())
            }
            Unexpected::Rts {
                src,
                tag,
                len,
                rndv,
            } => {
                let capacity = op.capacity;
                let mut cts = Header {
                    kind: Kind::Cts,
                    flags: 0,
                    src: self.rank,
                    tag,
                    seq: 0,
                    len: capacity as u64,
                    rndv,
                    ctx: self.ctx,
                };
                if len > capacity {
                    op.state = RecvState::Failed(Error::Truncated {
                        expected: capacity,
                        got: len,
                        peer: src,
                        tag,
                    });
                    cts.flags = wire::CTS_TRUNCATED;
                    return self.send_ctrl(src, &cts, &[]);
                }
                let (port, addr) = self.route(src);
                let max = self.ports[port].max_msg;
                let mut chunks = Vec::new();
                for (i, (_, clen)) in wire::chunks(len, max).into_iter().enumerate() {
                    let buf = BufPrefix::new(self.pool.take_zeroed(clen), clen);
                    let p = self.ports[port]
                        .ep
                        .trecv(buf, addr, wire::data_tag(src, rndv, i), 0)
                        .map_err(|e| Error::fabric("recv", Some(src), e.error))?;
                    chunks.push(p);
                }
                let op = self.recvs.get_mut(&id).expect("present");
                op.status = Some(Status {
                    source: src,
                    tag,
                    len,
                });
                op.state = RecvState::Receiving { chunks };
                self.send_ctrl(src, &cts, &[])
            }
        }
    }

    /// One round of progress: read every CQ, then handle whatever completed.
    fn progress(&mut self) -> Result<()> {
        self.progress_round().map_err(|e| self.upgrade(e))
    }

    /// A post that stopped because its peer is gone ([`efa_fabric::Error::PeerGone`]) is
    /// that peer's failure: reported as [`Error::PeerFailed`], to every rank.
    fn upgrade(&mut self, e: Error) -> Error {
        let Error::Fabric {
            peer,
            source: efa_fabric::Error::PeerGone { .. },
            ..
        } = &e
        else {
            return e;
        };
        let peer = *peer;
        self.check_peers();
        if self.failure.is_none() {
            if let Some(p) = peer {
                let detail = "its queue stopped draining".to_string();
                self.mark_failed(p, PeerFailure::Unreachable { detail }, true);
            }
        }
        self.failure_error().unwrap_or(e)
    }

    fn progress_round(&mut self) -> Result<()> {
        if self.failure.is_none() {
            self.polls = self.polls.wrapping_add(1);
            if self.polls.is_multiple_of(64) && self.last_check.elapsed() >= LIVENESS_INTERVAL {
                self.last_check = Instant::now();
                self.check_peers();
                if self.failure.is_none() && self.last_ping.elapsed() >= PING_INTERVAL {
                    self.last_ping = Instant::now();
                    self.ping_remote_peers();
                }
            }
        }
        let mut any = false;
        for p in 0..self.ports.len() {
            // An endpoint that no peer is routed to never has traffic: polling it would
            // only cost time (a syscall per poll for IP providers).
            if !self.ports[p].used {
                continue;
            }
            self.ports[p]
                .ep
                .progress()
                .map_err(|e| Error::fabric("progress", None, e))?;
            // Count completions delivered by anyone (posts that retried on FI_EAGAIN read
            // the CQ too), not just by this call.
            // (When one CQ serves both directions this counts it twice: still a number that
            // changes exactly when a completion is delivered.)
            let ep = &self.ports[p].ep;
            let delivered = ep.rx_cq().delivered().wrapping_add(ep.tx_cq().delivered());
            if delivered != self.ports[p].seen {
                self.events += delivered.wrapping_sub(self.ports[p].seen);
                self.ports[p].seen = delivered;
                any = true;
                self.reap_slots(p)?;
            }
        }
        if any {
            self.reap_background();
            self.reap_sends()?;
            self.reap_recvs();
        }
        Ok(())
    }

    fn reap_slots(&mut self, port: usize) -> Result<()> {
        for s in 0..self.ports[port].slots.len() {
            if !self.ports[port].slots[s]
                .as_ref()
                .is_some_and(|p| p.is_done())
            {
                continue;
            }
            let pending = self.ports[port].slots[s].take().expect("checked");
            let buf = match pending.wait(Duration::ZERO) {
                Ok(done) if done.len == 0 && done.data.is_some() => {
                    // Remote CQ data of an RMA write that consumed a receive buffer.
                    self.notifications.extend(done.data);
                    done.buf
                }
                Ok(done) => {
                    let res = Header::decode(&done.buf, done.len);
                    match res {
                        Ok(h) => {
                            let payload = done.buf[HDR_LEN..done.len].to_vec();
                            self.incoming(h, payload)?;
                        }
                        Err(e) => tracing::warn!("dropping malformed control message: {e}"),
                    }
                    done.buf
                }
                Err(e) => {
                    tracing::warn!("control receive failed: {}", e.error);
                    match e.buf {
                        Some(b) => b,
                        None => continue,
                    }
                }
            };
            self.post_slot(port, s, buf)?;
        }
        Ok(())
    }

    fn incoming(&mut self, h: Header, payload: Vec<u8>) -> Result<()> {
        if h.src as usize >= self.peers.len() {
            tracing::warn!(src = h.src, "control message from an unknown rank");
            return Ok(());
        }
        match h.kind {
            Kind::Cts => self.on_cts(h),
            Kind::FinAck => {
                self.fin[h.src as usize].got_ack = true;
                Ok(())
            }
            Kind::Failed => {
                self.on_failed(&h, &payload);
                Ok(())
            }
            Kind::Ping => Ok(()),
            Kind::Eager | Kind::Rts | Kind::Fin => {
                let msg = match h.kind {
                    Kind::Eager => Ordered::Msg(Unexpected::Eager {
                        src: h.src,
                        tag: h.tag,
                        data: payload,
                    }),
                    Kind::Rts => Ordered::Msg(Unexpected::Rts {
                        src: h.src,
                        tag: h.tag,
                        len: h.len as usize,
                        rndv: h.rndv,
                    }),
                    _ => Ordered::Fin,
                };
                let src = h.src as usize;
                if h.seq != self.expected_seq[src] {
                    self.reorder[src].insert(h.seq, msg);
                    return Ok(());
                }
                self.matched_in_order(h.src, msg)?;
                loop {
                    let next = self.expected_seq[src];
                    match self.reorder[src].remove(&next) {
                        Some(m) => self.matched_in_order(h.src, m)?,
                        None => break,
                    }
                }
                Ok(())
            }
        }
    }

    /// A message whose turn it is: match it against posted receives or queue it.
    fn matched_in_order(&mut self, src: u32, msg: Ordered) -> Result<()> {
        self.expected_seq[src as usize] = self.expected_seq[src as usize].wrapping_add(1);
        let msg = match msg {
            Ordered::Msg(m) => m,
            Ordered::Fin => {
                self.fin[src as usize].got_fin = true;
                // Receives waiting for this rank alone can never match now.
                let recvs = &mut self.recvs;
                self.posted.retain(|id| match recvs.get_mut(id) {
                    Some(op) if op.src == Source::Rank(src) => {
                        op.state = RecvState::Failed(Error::PeerFinalized { rank: src });
                        false
                    }
                    _ => true,
                });
                return Ok(());
            }
        };
        let tag = match &msg {
            Unexpected::Eager { tag, .. } | Unexpected::Rts { tag, .. } => *tag,
        };
        let pos = self.posted.iter().position(|id| {
            self.recvs
                .get(id)
                .is_some_and(|op| matches(op.src, op.tag, src, tag))
        });
        match pos {
            Some(i) => {
                let id = self.posted.remove(i).expect("index from position");
                self.deliver(id, msg)
            }
            None => {
                self.unexpected.push_back(msg);
                Ok(())
            }
        }
    }

    fn on_cts(&mut self, h: Header) -> Result<()> {
        let Some(id) = self.rndv_sends.remove(&h.rndv) else {
            tracing::warn!(rndv = h.rndv, peer = h.src, "CTS for an unknown rendezvous");
            return Ok(());
        };
        let Some(op) = self.sends.get_mut(&id) else {
            return Ok(());
        };
        let SendState::WaitCts { data } = &op.state else {
            return Ok(());
        };
        let data = data.clone();
        if h.flags & wire::CTS_TRUNCATED != 0 {
            // The receiver reports the truncation; as in MPI, the send itself completes
            // (for every size class alike), and no data moves.
            tracing::debug!(
                peer = h.src,
                tag = op.tag,
                len = data.len(),
                capacity = h.len,
                "rendezvous refused: the receive buffer is too small"
            );
            op.state = SendState::Done;
            if let Ok(v) = Arc::try_unwrap(data) {
                self.pool.put(v);
            }
            if op.tag == u32::MAX {
                self.sends.remove(&id);
            }
            return Ok(());
        }
        let dest = op.dest;
        let (port, addr) = self.route(dest);
        let max = self.ports[port].max_msg;
        let mut chunks = Vec::new();
        for (i, (off, len)) in wire::chunks(data.len(), max).into_iter().enumerate() {
            let p = self.ports[port]
                .ep
                .tsend(
                    SharedSlice::new(data.clone(), off, len),
                    addr,
                    wire::data_tag(self.rank, h.rndv, i),
                )
                .map_err(|e| Error::fabric("send", Some(dest), e.error))?;
            chunks.push(p);
        }
        self.sends.get_mut(&id).expect("present").state = SendState::Sending { chunks, data };
        Ok(())
    }

    fn reap_background(&mut self) {
        let mut i = 0;
        while i < self.background.len() {
            if !self.background[i].op.is_done() {
                i += 1;
                continue;
            }
            let bg = self.background.swap_remove(i);
            match bg.op.wait(Duration::ZERO) {
                Ok(done) => self.ports[bg.port].bounce.push(done.buf.into_inner()),
                Err(e) => {
                    tracing::warn!(peer = bg.dest, "send failed: {}", e.error);
                    self.transport_failure(bg.dest, e.error.to_string());
                    if let Some(b) = e.buf {
                        self.ports[bg.port].bounce.push(b.into_inner());
                    }
                }
            }
        }
    }

    fn reap_sends(&mut self) -> Result<()> {
        let mut finished = Vec::new();
        let mut lost = Vec::new();
        for (&id, op) in self.sends.iter_mut() {
            let SendState::Sending { chunks, data } = &mut op.state else {
                continue;
            };
            if !chunks.iter().all(|c| c.is_done()) {
                continue;
            }
            let mut err = None;
            for c in chunks.drain(..) {
                if let Err(e) = c.wait(Duration::ZERO) {
                    if err.is_none() {
                        lost.push((id, op.dest, e.error.to_string()));
                    }
                    err.get_or_insert(Error::fabric("send", Some(op.dest), e.error));
                }
            }
            // Every chunk's slice is dropped: this is the last reference to the payload.
            let data = std::mem::take(data);
            if let Ok(v) = Arc::try_unwrap(data) {
                self.pool.put(v);
            }
            op.state = match err {
                Some(e) => SendState::Failed(e),
                None => SendState::Done,
            };
            if op.tag == u32::MAX {
                finished.push(id);
            }
        }
        for id in finished {
            self.sends.remove(&id);
        }
        for (id, peer, detail) in lost {
            let err = self.transport_failure(peer, detail);
            if let (Some(op), Some(e)) = (self.sends.get_mut(&id), err) {
                op.state = SendState::Failed(e);
            }
        }
        Ok(())
    }

    /// A transfer with `peer` failed in the transport (`detail`): unless `peer` finalized,
    /// it has failed (exited, if its pid is gone on this host; else unreachable), and every
    /// rank is told. Returns the error for the operation that saw it.
    fn transport_failure(&mut self, peer: u32, detail: String) -> Option<Error> {
        if peer == self.rank || self.fin[peer as usize].got_fin {
            return None;
        }
        let (proc_, same_host) = &self.live.procs[peer as usize];
        let cause = if *same_host && proc_.is_gone() {
            exited(proc_)
        } else {
            PeerFailure::Unreachable { detail }
        };
        self.mark_failed(peer, cause, true);
        self.failure_error()
    }

    fn reap_recvs(&mut self) {
        let mut lost = Vec::new();
        for (&id, op) in self.recvs.iter_mut() {
            let RecvState::Receiving { chunks } = &mut op.state else {
                continue;
            };
            if !chunks.iter().all(|c| c.is_done()) {
                continue;
            }
            let src = op.status.map(|s| s.source);
            let single = chunks.len() == 1;
            let mut data = if single {
                Vec::new()
            } else {
                self.pool.take_empty(op.status.map_or(0, |s| s.len))
            };
            let mut err = None;
            for c in chunks.drain(..) {
                match c.wait(Duration::ZERO) {
                    Ok(d) if single => data = d.buf.into_inner(),
                    Ok(d) => {
                        let v = d.buf.into_inner();
                        data.extend_from_slice(&v[..d.len]);
                        self.pool.put(v);
                    }
                    Err(e) => {
                        if let (None, Some(peer)) = (&err, src) {
                            lost.push((id, peer, e.error.to_string()));
                        }
                        err.get_or_insert(Error::fabric("recv", src, e.error));
                    }
                }
            }
            match err {
                Some(e) => op.state = RecvState::Failed(e),
                None => {
                    op.data = data;
                    op.state = RecvState::Done;
                }
            }
        }
        for (id, peer, detail) in lost {
            let err = self.transport_failure(peer, detail);
            if let (Some(op), Some(e)) = (self.recvs.get_mut(&id), err) {
                op.state = RecvState::Failed(e);
            }
        }
    }
}

/// How a same-host peer whose process is gone failed.
fn exited(p: &placement::ProcessId) -> PeerFailure {
    PeerFailure::Exited {
        pid: Some(p.pid),
        host: (!p.host.is_empty()).then(|| p.host.clone()),
    }
}

fn matches(want_src: Source, want_tag: Tag, src: u32, tag: u32) -> bool {
    (match want_src {
        Source::Any => true,
        Source::Rank(r) => r == src,
    }) && (match want_tag {
        Tag::Any => tag <= MAX_USER_TAG,
        Tag::Is(t) => t == tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(matches(Source::Any, Tag::Any, 3, 5));
        assert!(matches(Source::Rank(3), Tag::Is(5), 3, 5));
        assert!(!matches(Source::Rank(2), Tag::Any, 3, 5));
        assert!(!matches(Source::Any, Tag::Is(4), 3, 5));
        // Reserved (internal) tags never match a user's Tag::Any.
        assert!(!matches(Source::Any, Tag::Any, 3, MAX_USER_TAG + 1));
    }

    #[test]
    fn status_counts_elements() {
        let s = Status {
            source: 0,
            tag: 0,
            len: 24,
        };
        assert_eq!(s.count::<u64>(), 3);
        assert_eq!(s.count::<u8>(), 24);
    }
}
