//! The communicator: bootstrap, one endpoint per transport, a route per peer, and tagged
//! point-to-point messaging with MPI semantics.
//!
//! # Protocol
//! The decisions are made by a pure state machine, the private module `proto` (matching, per-sender
//! ordering, eager or RGET rendezvous, truncation, flow control, finalize); the `Engine`
//! here executes them on the endpoints. See [`crate::wire`]: eager messages up to
//! [`Config::eager_limit`], RGET rendezvous above (the receiver reads the sender's exposed
//! buffer and acknowledges), a per-sender sequence number for MPI's non-overtaking order,
//! and software matching so that `Source::Any` works across every transport at once.
//!
//! # Buffers
//! Eager payloads are copied into registered bounce buffers. A large message moves from the
//! sender's buffer straight into the receiver's (zero-copy RGET, from the provider's
//! threshold on, [`efa_fabric::rget_threshold`]): `send` and `isend` register the user's
//! buffer for peers to read, and the request borrows it (`SendRequest<'a>`) until the
//! receiver has read it; `recv`, `wait` and [`Communicator::wait_all`] read into the user's
//! buffer from inside the call that holds the borrow. Below that threshold the sender's data
//! is copied into a registered engine buffer and the receiver reads into engine memory.
//! So the NIC writes user memory only inside a call that holds its `&mut` borrow, and reads
//! it only while a request or call borrows it: a request or future that is dropped or
//! leaked cannot make the NIC write into freed memory (a leaked send request leaves its
//! buffer registered, see [`efa_fabric::Exposed`]: a peer may read what the memory holds
//! later, nothing in this process changes).
//!
//! # Flows
//! With `EFA_IP_FLOWS=K` (K > 1; [`CommunicatorBuilder::ip_flows`]) the IP transport opens
//! K endpoints in one domain (over `tcp;ofi_rxm`, K connections per peer: K 5-tuples) and
//! publishes their addresses in the card ([`Card::flows`]), inserting a peer's on its first
//! use, as its route's address is; control and eager messages use
//! the first, and rendezvous reads from the stripe threshold on are cut into chunks spread
//! over all of them ([`stripe`]: the rule, its constants, equal or adaptive).
//! [`Communicator::ip_flows`] tells what each flow carried.
//!
//! # Progress
//! All endpoints' completion queues are read by one progress function, so a rank can talk
//! to peers on different routes at once. Every blocking call waits under the communicator's
//! wait policy ([`crate::wait`]: spin, yield, or block on the CQs' wait fds; chosen
//! automatically so that ranks outnumbering cores still make progress).
//!
//! # State per peer
//! A rank pays for a peer it never talks to only a few bytes (issue 17 §2, in the manner
//! of UCX's lazy endpoints and PMIx's direct modex). At start every route is chosen
//! ([`placement::choose_route`]: a peer no transport reaches fails `build`), but a peer's
//! address enters the endpoint's address vector (`fi_av_insert`) only when this rank first
//! sends to it, reads a rendezvous from it, probes it or exposes an RMA window to it.
//! Messages from peers not yet inserted are received and matched all the same: receive
//! buffers are posted for any source and the sender's rank is in the header. The cards are
//! kept in a [`placement::CardTable`] (shared strings once, addresses in one arena), from
//! which a peer's address is read on first use and [`Communicator::route`] is told.
//!
//! What stays per peer, idle or not ([`Communicator::peer_state_bytes`]), measured by the
//! unit test `idle_peer_state_fits_256_bytes` for 16,384 simulated ranks, 96 per host, with
//! this host's address sizes (shm 72 B, tcp 16 B): **204 bytes per peer**: 153 for its
//! card, 32 of protocol state (sequence numbers, credits, finalize flags, and a pointer to
//! the messages that came out of turn, allocated only if any does), 8 + 2 for its address
//! and route, 8 for the world group's rank maps, 1 for its liveness flag (and 4 for the
//! fast-box index when the host has several ranks). With 8 ranks per host it is 212 bytes;
//! with one rank per host 277 (each card then carries its own host id and host name).
//! Built in one process, the 16,384 ranks' state grew VmRSS by 139 bytes per peer (the
//! allocator reuses what start-up freed). Before (the same accounting): about 285 bytes per peer kept (a
//! `Route` of 72, a process id of 72, address, carrier and probe time 48, liveness map
//! entry about 20, fast-box index 16, the same protocol state and group), plus every peer's
//! address in libfabric's address vector, plus about 550 bytes per peer of decoded cards
//! during start.
//!
//! Resident memory of real processes (`efa-bench rss` under `efarun -n N` on one host, debug
//! build, idle, right after `build` and one barrier; KiB per rank; before this change in
//! brackets):
//!
//! | ranks | default (shm, fast boxes) | `EFA_FASTBOX=0` | `EFA_TRANSPORTS=ip` |
//! |---|---|---|---|
//! | 2 | 24,564 (24,810) | 24,596 (24,850) | 50,652 (50,822) |
//! | 8 | 24,572 (24,766) | | 50,738 (50,762) |
//! | 16 | 24,686 (24,850) | | 50,746 (50,878) |
//! | 32 | 24,944 (24,989) | | 50,853 (50,876) |
//! | 64 | 25,203 (25,538) | 24,682 (24,762) | 50,840 (50,860) |
//!
//! At these sizes a rank's memory is its fixed cost (libraries, receive buffers, the
//! provider's; `tcp;ofi_rxm` holds 35 MiB of anonymous memory whatever the job size): the
//! state above is 13 KiB at 64 ranks. What grows with the number of peers on one host is
//! the fast boxes, about 10 KiB per same-host peer (64 ranks: 25,203 KiB with them, 24,682
//! without; rings polled and attached for every local peer at start).
//!
//! Still paid for every peer: finalize's handshake (`Fin`/`FinAck` with every rank, so
//! finalize inserts every address not yet inserted), a failure notice (sent to every rank),
//! an RMA window (exchanged with every rank), a receive from any source that waits long
//! enough for the failure detector to probe peers on other hosts (it probes every such
//! peer, connecting it), and the fast boxes of same-host ranks
//! (their rings, created and attached at start; `EFA_FASTBOX=0` turns them off).
//!
//! # Matching and communicators
//! A message is matched on (context id, source, tag), in the order each sender sent it
//! (MPI's non-overtaking rule, per communicator and stronger: per pair of processes).
//! The context id is the wire header's `ctx`: 0 for the world, agreed by the members for
//! each [`Communicator::dup`] and [`Communicator::split`]. So traffic of different
//! communicators never matches, `Source::Any`/`Tag::Any` and the collectives' and windows'
//! internal tags included. Failure and abort notices, liveness probes and the finalize
//! handshake are per process, not per communicator: a failed rank fails every
//! communicator it belongs to.
//!
//! # Requests
//! Every non-blocking call returns a request; all kinds implement [`Request`] (`test`,
//! `wait` with the communicator's deadline, `cancel`), and any mix of kinds can be waited
//! for together with [`Communicator::wait_any`], [`Communicator::wait_some`] and
//! [`Communicator::test_all`] (`MPI_Waitany`, `MPI_Waitsome`, `MPI_Testall`, MPI 4.0
//! §3.7.5). What dropping an unfinished request does, and whether it can be cancelled:
//!
//! | request | dropped before `wait` | `cancel()` |
//! |---|---|---|
//! | [`SendRequest`] (`isend`, `ibsend`) | a copied send (`ibsend`; `isend` when eager or below the zero-copy threshold) goes on (the engine owns the copy); its outcome is not reported; `finalize` still waits for it. A send whose buffer is registered (zero-copy) waits in `drop` until the receiver has read it, up to the deadline (the peer then counts as failed), so that the borrow ends only when no peer reads the buffer: drop such a request only when its receive is posted or will be without this thread's help | never: the eager data is already in the peer's receive buffers, or the rendezvous announced (MPI 4.0 deprecates cancelling sends too) |
//! | [`RecvRequest`] (`irecv`, [`Message::irecv`]) | the receive is cancelled: an unmatched message stays for a later receive; a message already matched is consumed and lost: a rendezvous read still under way goes on into the engine's own buffer and is discarded (never into the dropped buffer), so the sender's send completes, and `finalize` waits for it. The same when `wait` fails or an async receive's future is dropped | while no message has matched it; `wait` then returns [`Error::Cancelled`] |
//! | [`P2pRequest`] | as the send or receive it holds | as the send or receive it holds |
//! | [`CollRequest`](crate::CollRequest) (`iallreduce`, ...) | the collective runs to its end on its helper thread (the other ranks take part in it); its result is discarded | never: the other ranks would wait for this one until their deadline |
//! | [`RmaRequest`](crate::RmaRequest) (`iput`, `iget`) | the operation is cancelled at the NIC and drained before its memory is freed; whether a put reached the target is unknown | never: the NIC may already have written the target, and nothing would tell |
//! | [`Message`] (`mprobe`, `improbe`) | the message goes back to its place in the queue | (not a request: receive it or drop it) |
//!
//! Every `wait` has the communicator's deadline ([`Communicator::timeout`]); a collective
//! request's `wait` joins its helper thread, whose collective has that deadline itself.
//!
//! **Persistent requests** (`MPI_Send_init`/`MPI_Start`) are not offered: in this engine
//! they could not be cheaper than fresh requests. Starting a small send costs a copy of
//! the data into a registered bounce buffer, a header and one post; a large one registers
//! the user's buffer (0.2-0.5 µs on shm and tcp; libfabric's MR cache keeps it cheap on
//! verbs and efa, see `efa_fabric`'s "Registration cache") and needs its RTS, read and
//! ACK each time. All a persistent request would save is the argument checks, a request id
//! and that registration, small next to the post and the transfer.

use std::collections::{BTreeMap, HashMap, VecDeque};

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use efa_fabric::{Access, BufPrefix, Endpoint, FiAddr, Info, Pending, RegisteredBuf};

use crate::bootstrap::{self, Bootstrap};
use crate::error::{Error, Malformed, PeerFailure, Result, SettingError};
use crate::fastbox::FastPath;
use crate::net;
use crate::placement::Chosen;
use crate::placement::{
    self, Card, CardTable, CardTableBuilder, EndpointCard, Route, Transport, TransportSet,
};
use crate::proto::{self, Action, Body, Core, Mode, Outcome, PostError, RecvId, Remote, SendId};
use crate::roles;
use crate::store::Store;
use crate::wait::{WaitPolicy, WaitSet};
use crate::wire::{self, FailCode, Header, Kind, CTRL_TAG, HDR_LEN};

mod coll_link;
pub mod stripe;
pub(crate) use coll_link::{CollLink, CollRecv, CollSend, CollTag};

pub use crate::tag::{Source, Status, Tag, MAX_USER_TAG};

/// Communicator settings, as built: set through [`CommunicatorBuilder`] (each setter
/// documents its default), read back through [`Communicator::config`].
///
/// Memory: every endpoint keeps [`Config::rx_depth`] receive buffers of a 32-byte header
/// plus its eager limit posted (with the defaults 64 x 32 KiB over shm and 64 x 8 KiB over
/// IP, about 2.6 MiB in all). The rest of an idle rank's memory is libfabric's: the shm
/// provider's region and, once a peer is reached over IP, `ofi_rxm`'s bounce buffers. The
/// README's "Memory per rank" measures each part and names the settings that shrink it.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) timeout: Duration,
    pub(crate) transports: TransportSet,
    pub(crate) ip_iface: Option<String>,
    pub(crate) fabric_addr: Option<String>,
    pub(crate) eager_limit: usize,
    pub(crate) shm_eager_limit: usize,
    pub(crate) rx_depth: usize,
    pub(crate) wait: WaitPolicy,
    pub(crate) ip_flows: stripe::FlowSettings,
}

impl Config {
    /// Deadline of every blocking call ([`CommunicatorBuilder::timeout`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Transports allowed ([`CommunicatorBuilder::transports`], `EFA_TRANSPORTS`).
    pub fn transports(&self) -> TransportSet {
        self.transports
    }
    /// Interface of the IP route ([`CommunicatorBuilder::ip_iface`], `EFA_IFACE`), once
    /// chosen.
    pub fn ip_iface(&self) -> Option<&str> {
        self.ip_iface.as_deref()
    }
    /// Local address of the fabric endpoint ([`CommunicatorBuilder::fabric_addr`],
    /// `EFA_FABRIC_ADDR`), if one was set.
    pub fn fabric_addr(&self) -> Option<&str> {
        self.fabric_addr.as_deref()
    }
    /// Largest payload sent eagerly over the fabric and IP, in bytes
    /// ([`CommunicatorBuilder::eager_limit`]).
    pub fn eager_limit(&self) -> usize {
        self.eager_limit
    }
    /// Largest payload sent eagerly over shm, in bytes
    /// ([`CommunicatorBuilder::shm_eager_limit`]).
    pub fn shm_eager_limit(&self) -> usize {
        self.shm_eager_limit
    }
    /// Receive buffers kept posted per endpoint ([`CommunicatorBuilder::rx_depth`]).
    pub fn rx_depth(&self) -> usize {
        self.rx_depth
    }
    /// The wait policy asked for ([`CommunicatorBuilder::wait`], `EFA_WAIT`); the one in
    /// force is [`Communicator::wait_policy`].
    pub fn wait(&self) -> WaitPolicy {
        self.wait
    }
    /// Flows per peer on the IP route and how large reads are striped over them
    /// ([`CommunicatorBuilder::ip_flows`]; `EFA_IP_FLOWS`, `EFA_IP_STRIPE_MIN`,
    /// `EFA_IP_STRIPE`; see [`stripe`]).
    pub fn ip_flows(&self) -> stripe::FlowSettings {
        self.ip_flows
    }
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
            wait: WaitPolicy::Auto,
            ip_flows: stripe::FlowSettings::default(),
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
    /// `wait` was called: `EFA_WAIT` is then not read.
    wait_explicit: bool,
    /// `ip_flows` was called: `EFA_IP_FLOWS`, `EFA_IP_STRIPE_MIN` and `EFA_IP_STRIPE` are
    /// then not read.
    ip_flows_explicit: bool,
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
            wait_explicit: false,
            ip_flows_explicit: false,
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
    /// Largest eager payload over shm, in bytes, from 0 to [`MAX_EAGER_LIMIT`]
    /// ([`CommunicatorBuilder::build`] fails above). Default 32 KiB: shm receive buffers
    /// cost no pinned memory, and a rendezvous round trip costs more than copying a
    /// mid-size message.
    pub fn shm_eager_limit(mut self, bytes: usize) -> Self {
        self.config.shm_eager_limit = bytes;
        self
    }
    /// Receive buffers kept posted per endpoint, from 1 to [`MAX_RX_DEPTH`]
    /// ([`CommunicatorBuilder::build`] fails outside). Default 64. More absorbs larger
    /// bursts of small messages from many peers without the provider queueing them; each
    /// costs a registered buffer of header + eager limit bytes.
    pub fn rx_depth(mut self, buffers: usize) -> Self {
        self.config.rx_depth = buffers;
        self
    }

    /// Flows (TCP connections) per peer on the IP route, and how rendezvous reads are
    /// striped over them (see [`stripe`] for the rule and its constants). Default:
    /// `EFA_IP_FLOWS` (else 8 on an AWS ENA interface, 1 elsewhere:
    /// [`stripe::default_flows`]), `EFA_IP_STRIPE_MIN` (else 256 KiB), `EFA_IP_STRIPE` (else
    /// adaptive). More flows pass a per-flow cap (EC2: 5-25 Gbit/s per flow) at the cost of
    /// one endpoint and connection per flow and peer. Explicit settings win over the
    /// variables; [`CommunicatorBuilder::build`] fails with [`Error::Setting`] for a flow
    /// count outside 1 to [`stripe::MAX_FLOWS`] or a threshold below [`stripe::CHUNK_MIN`].
    pub fn ip_flows(mut self, settings: stripe::FlowSettings) -> Self {
        self.config.ip_flows = settings;
        self.ip_flows_explicit = true;
        self
    }

    /// How blocking calls wait between polls of the completion queues (see
    /// [`crate::wait`] for each policy's trade-off and measurements). Default: `EFA_WAIT`,
    /// else [`WaitPolicy::Auto`]: [`WaitPolicy::Spin`] (lowest latency, a busy core per
    /// waiting rank) unless this host runs more ranks of the job than this process may use
    /// cores; then [`WaitPolicy::Block`]. An explicit policy wins over `EFA_WAIT`.
    pub fn wait(mut self, policy: WaitPolicy) -> Self {
        self.config.wait = policy;
        self.wait_explicit = true;
        self
    }

    fn env_timeout_overridden(&mut self) {
        self.env = false;
    }

    /// Bootstraps, opens the endpoints, exchanges cards and chooses every route.
    ///
    /// # Errors
    /// [`Error::Bootstrap`] (bad environment, a rank that never joins within the timeout),
    /// [`Error::NoTransport`], [`Error::NoRoute`], [`Error::Transports`];
    /// [`Error::AlreadyInitialized`] when this process already has a live world
    /// communicator of the same job (same rendezvous) that was not finalized: clone it or
    /// [`Communicator::dup`] it instead.
    pub fn build(mut self) -> Result<Communicator> {
        crate::debug::init(self.bootstrap.as_ref())?;
        // Before the first fi_getinfo, which makes libfabric read them.
        crate::provider_env::apply();
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
        if self.config.shm_eager_limit > MAX_EAGER_LIMIT {
            return Err(SettingError::argument(
                "CommunicatorBuilder::shm_eager_limit",
                self.config.shm_eager_limit.to_string(),
                "is larger than the largest eager limit: every shm endpoint keeps rx_depth \
                 receive buffers of this size",
                format!("0 to {MAX_EAGER_LIMIT} bytes (default 32768)"),
            )
            .into());
        }
        if !(1..=MAX_RX_DEPTH).contains(&self.config.rx_depth) {
            return Err(SettingError::argument(
                "CommunicatorBuilder::rx_depth",
                self.config.rx_depth.to_string(),
                "is outside the accepted range: without a posted receive buffer nothing can \
                 arrive, and each buffer is registered memory",
                format!("1 to {MAX_RX_DEPTH} buffers (default 64)"),
            )
            .into());
        }
        if !self.transports_explicit {
            self.config.transports = TransportSet::from_env()?;
        }
        if !self.wait_explicit {
            if let Some(p) = crate::wait::wait_from_env()? {
                self.config.wait = p;
            }
        }
        if self.ip_flows_explicit {
            self.config
                .ip_flows
                .check("CommunicatorBuilder::ip_flows")?;
        } else {
            self.config.ip_flows = stripe::FlowSettings::from_env()?;
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
/// Largest number of receive buffers per endpoint accepted ([`CommunicatorBuilder::rx_depth`]).
pub const MAX_RX_DEPTH: usize = 4096;

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
        } else if secs.is_finite() {
            "is longer than a year: a hung job would never be reported".to_string()
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
    /// The further flows of the IP route (`EFA_IP_FLOWS` - 1 endpoints, in `ep`'s domain,
    /// address vector and CQ: each its own connection to a peer; they only carry striped
    /// rendezvous reads, see [`stripe`]). Empty on other transports.
    flows: Vec<Endpoint>,
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

/// How this rank reaches each peer. The route (which endpoint of this rank, which of the
/// peer's) is chosen for every peer at start ([`placement::choose_route`], so that a peer no
/// transport reaches is an error of `build`); the peer's address is inserted into the
/// endpoint's address vector only when this rank first sends to it, reads from it or
/// exposes an RMA window to it ([`Engine::resolve`]). A message from a peer this rank has
/// not resolved is still received and matched: receive buffers are posted for any source
/// (`FI_ADDR_UNSPEC`) and the sender's rank travels in the header ([`Header::src`]).
///
/// Per peer this is 10 bytes until first use, and 10 after it (see
/// [`Engine::peer_state_bytes`]).
#[derive(Debug, Default)]
struct Peers {
    /// Per peer: the index of the port its route uses, and the index of the peer's
    /// endpoint on its card ([`Route::peer_endpoint`]).
    route: Vec<(u8, u8)>,
    /// Per peer: its address in that port's address vector; [`FiAddr::UNSPEC`] until first
    /// use.
    addr: Vec<FiAddr>,
}

/// Where control and eager messages to a peer go, and where they come from. Today every
/// peer's go through its route's libfabric endpoint (tagged messages with
/// [`CTRL_TAG`] into posted receive buffers). Another carrier of small ordered messages
/// (a same-host shared-memory ring, crate `efa-shm`) plugs in as a variant: the send side
/// is [`Engine::send_ctrl_with`], which matches on the peer's carrier, and the receive side
/// is [`Engine::progress_round`], which polls every carrier and hands each message (its
/// header and payload bytes) to [`Engine::on_control`]. Rendezvous data always moves by RMA read on
/// the peer's route's endpoint ([`Peers`]), whatever carries its control messages. The protocol
/// core restores each sender's order across carriers (sequence numbers), so one peer's
/// messages may use several carriers at once.
#[derive(Debug, Clone, Copy)]
enum Carrier {
    /// A libfabric endpoint: port index and the peer's address in its address vector.
    Port { port: usize, addr: FiAddr },
}

/// What the executor keeps for one receive, alongside the core's state (indexed by
/// [`RecvId::index`]).
#[derive(Debug, Default)]
struct RecvSlot {
    /// Where its data goes.
    dest: RecvDest,
    /// The received bytes (an eager payload's buffer, or the read target), until the
    /// request takes them.
    data: Vec<u8>,
    /// A rendezvous read waiting for the call that holds the user's buffer
    /// ([`RecvRequest::read_in_place`]).
    wanted: Option<WantedRead>,
    /// The data was read straight into the user's buffer.
    in_place: bool,
    /// The transport error behind a failed read.
    error: Option<Error>,
}

/// Where a receive's data goes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum RecvDest {
    /// Into engine memory, handed over as a `Vec` (collectives) or copied out.
    #[default]
    Engine,
    /// Into a user buffer that its request borrows: a large rendezvous is read straight
    /// into it, from inside a call that holds the borrow (zero-copy RGET).
    User,
}

/// A read into the user's buffer that its receive's waiting call is to do
/// ([`Engine::take_wanted`]): the peer, its parts ([`Engine::read_plan`]), the peer's
/// exposed region, and the length in bytes.
type WantedInPlace = (u32, Parts<ReadPart>, efa_fabric::RemoteRegion, usize);

/// One or more items, the first inline: a read in one part allocates nothing for it.
#[derive(Debug, Clone)]
struct Parts<T> {
    first: T,
    rest: Vec<T>,
}

impl<T> Parts<T> {
    fn one(first: T) -> Parts<T> {
        Parts {
            first,
            rest: Vec::new(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        std::iter::once(&mut self.first).chain(&mut self.rest)
    }

    fn into_items(self) -> impl Iterator<Item = T> {
        std::iter::once(self.first).chain(self.rest)
    }
}

/// One piece of a rendezvous read ([`Engine::read_plan`]): bytes `off..off + len` of the
/// peer's region, read through `ep` from the peer's address `addr` on it; `flow` is the
/// peer's flow it was assigned to, `None` when the read is not striped.
#[derive(Debug, Clone)]
struct ReadPart {
    flow: Option<usize>,
    ep: Endpoint,
    addr: FiAddr,
    off: usize,
    len: usize,
}

/// A rendezvous read to do into a user's buffer.
#[derive(Debug, Clone, Copy)]
struct WantedRead {
    peer: u32,
    remote: Remote,
    len: usize,
}

/// A rendezvous read under way into a receive's engine-owned buffer (copy path: the bytes
/// reach the user's buffer in its `wait`).
struct ReadOp {
    recv: RecvId,
    peer: u32,
    len: usize,
    chunks: Vec<Pending<BufPrefix<Vec<u8>>>>,
    /// Per chunk: its flow, its length, and whether its completion was reported to the
    /// peer's scheduler ([`Engine::read_part_done`]).
    flows: Vec<(Option<usize>, usize, bool)>,
}

/// A send's exposed buffer: a registered copy of its data that the receiver reads.
struct ExposedBuf {
    port: usize,
    buf: RegisteredBuf,
}

/// An eager send or control message in flight (its request, if any, is already complete).
struct Background {
    port: usize,
    dest: u32,
    op: Pending<BufPrefix<RegisteredBuf>>,
}

/// The executor of the protocol core ([`crate::proto`]) on libfabric endpoints: it feeds
/// the core posts and arriving messages, carries out the core's actions, and owns every
/// buffer, endpoint and failure detector (liveness checks, pings, failure notices).
struct Engine {
    rank: u32,
    ports: Vec<Port>,
    /// The endpoint of each peer's route and the peer's address on it, resolved on first
    /// use (its control and eager messages, rendezvous reads and RMA all use it).
    peers: Peers,
    /// Every rank's card, compactly: where a peer's address is found on first use.
    cards: Arc<CardTable>,
    /// The flows of each peer whose route has several, set up on its first striped read
    /// ([`Engine::read_plan`]); no entry (no memory) for the others.
    flows: HashMap<u32, PeerFlows>,
    /// Reads of at least this many bytes are striped over a peer's flows.
    stripe_min: usize,
    /// How chunks are handed to a peer's flows.
    stripe_mode: stripe::StripeMode,
    /// Matching, ordering, rendezvous, flow control and finalize.
    core: Core<Vec<u8>>,
    /// Per receive slot of the core.
    recv_slots: Vec<RecvSlot>,
    /// Per send slot of the core: its exposed buffer while a rendezvous is announced.
    exposed: Vec<Option<ExposedBuf>>,
    /// Reads under way.
    reads: Vec<ReadOp>,
    /// Receives whose read waits for the call that holds their user buffer.
    wanted: Vec<RecvId>,
    /// The receives whose buffers a call waiting in this engine now holds
    /// ([`RecvRequest::wait`], [`Communicator::wait_all`]): their reads are left for those
    /// calls; any other waiting read is done through an engine buffer at the next progress,
    /// so that no rank waits for a receive that its owner is not waiting for (an `irecv`
    /// followed by a blocking `send` on both sides).
    owners: Vec<RecvId>,
    /// Free eager-payload buffers (capacity: the largest eager limit), reused.
    small: Vec<Vec<u8>>,
    /// Capacity of the buffers in `small`.
    small_cap: usize,
    /// Free exposed buffers per port, reused for rendezvous sends.
    exposed_free: Vec<Vec<RegisteredBuf>>,
    background: Vec<Background>,
    scratch: Vec<u8>,
    ctx: u32,
    /// Completions seen so far (for backoff decisions).
    events: u64,
    /// Remote CQ data delivered with RMA writes (`writedata`), oldest first.
    notifications: VecDeque<u64>,
    /// Large rendezvous buffers kept for reuse.
    pool: BufPool,
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
    /// The peers whose probes find no room to be sent, and since when (see
    /// [`PROBE_REFUSED_LIMIT`]); empty while every probe is sent.
    refused_since: HashMap<u32, Instant>,
    /// An operation passed its deadline: the job is not healthy, so finalize waits for its
    /// peers only briefly instead of a whole deadline more.
    broken: bool,
    /// Rings to this host's ranks carrying control messages ([`crate::fastbox`]).
    fast: Option<FastPath>,
}

/// Free eager-payload buffers kept ([`Engine::small`]).
const SMALL_KEEP: usize = 256;
/// Free exposed (rendezvous) buffers kept per endpoint ([`Engine::exposed_free`]).
const EXPOSED_KEEP: usize = 16;

/// How often blocked ranks look at same-host peers' processes.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
/// How often ranks with pending operations probe the peers on other hosts they involve.
const PING_INTERVAL: Duration = Duration::from_millis(250);
/// A peer whose probes find no room in the provider's queue for this long, while no
/// rendezvous data moves between it and this rank, is unreachable. (`tcp;ofi_rxm` keeps its
/// queue full so while it tries to reconnect to a process that is gone.)
const PROBE_REFUSED_LIMIT: Duration = Duration::from_secs(1);

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
    /// Every rank's card (shared with the engine): routes are told from them
    /// ([`Communicator::route`]).
    cards: Arc<CardTable>,
    providers: Vec<(Transport, String)>,
    /// Keeps a rank-0-served TCP store alive until the communicator is dropped.
    _store: Arc<dyn Store>,
    engine: Mutex<Engine>,
    /// Who may allocate a context id at this moment ([`Communicator::split`]).
    ctx_alloc: Mutex<CtxAllocator>,
    /// This world's place among the live worlds of the process, released at finalize.
    claim: WorldClaim,
    /// How every blocking call waits ([`crate::wait`]).
    wait: Arc<WaitSet>,
}

/// The jobs whose world communicator is alive in this process, by rendezvous (see
/// [`Error::AlreadyInitialized`]).
static LIVE_WORLDS: Mutex<Vec<bootstrap::Rendezvous>> = Mutex::new(Vec::new());

/// A world communicator's entry in [`LIVE_WORLDS`]: one live world per job and process,
/// like `MPI_Init`. The entry is the job's rendezvous (the store all its ranks meet in), so
/// a test may still build several worlds of different jobs (different explicit
/// [`Bootstrap`]s) in one process; an in-process rendezvous is a one-rank job of its own
/// each time and is not recorded.
struct WorldClaim {
    key: Mutex<Option<bootstrap::Rendezvous>>,
    /// Prefix of this world's keys in the store: `efa` for the first world of the job in
    /// this process, `efa/<n>` for the n-th one built after it (a world built after another
    /// was finalized must not find the first one's cards or ready marks).
    store_prefix: String,
}

/// How many worlds of each job (by rendezvous) this process has built so far.
static WORLDS_BUILT: Mutex<Vec<(bootstrap::Rendezvous, u32)>> = Mutex::new(Vec::new());

impl WorldClaim {
    /// Records `boot`'s job as live in this process.
    ///
    /// # Errors
    /// [`Error::AlreadyInitialized`] when a world of that job is already live here.
    fn take(boot: &Bootstrap) -> Result<WorldClaim> {
        let r = boot.rendezvous();
        if *r == bootstrap::Rendezvous::InProcess {
            return Ok(WorldClaim {
                key: Mutex::new(None),
                store_prefix: "efa".into(),
            });
        }
        let mut live = LIVE_WORLDS.lock().unwrap_or_else(|p| p.into_inner());
        if live.contains(r) {
            return Err(Error::AlreadyInitialized {
                rendezvous: r.to_string(),
            });
        }
        live.push(r.clone());
        let mut built = WORLDS_BUILT.lock().unwrap_or_else(|p| p.into_inner());
        let n = match built.iter_mut().find(|(k, _)| k == r) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                built.push((r.clone(), 0));
                0
            }
        };
        Ok(WorldClaim {
            key: Mutex::new(Some(r.clone())),
            store_prefix: if n == 0 {
                "efa".into()
            } else {
                format!("efa/{n}")
            },
        })
    }

    /// Removes the entry (once; later calls do nothing).
    fn release(&self) {
        let key = self.key.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(k) = key {
            let mut live = LIVE_WORLDS.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = live.iter().position(|r| *r == k) {
                live.swap_remove(i);
            }
        }
    }
}

impl Drop for WorldClaim {
    fn drop(&mut self) {
        self.release();
    }
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
        self.claim.release();
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
        let mut waiter = self.wait.waiter();
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
                    waiter.progressed();
                }
                if !sent_fin {
                    match e.unfinished_send() {
                        Some(p) => Some(("finalize: waiting for a send to complete", p)),
                        None => {
                            e.send_fins()?;
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
                let unread = e.core.unexpected_len();
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
            waiter.idle();
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

/// A communicator: a group of the job's ranks, reachable by rank number, with a context of
/// its own. [`Communicator::init`] gives the world (every rank of the job);
/// [`Communicator::dup`] and [`Communicator::split`] give sub-communicators.
///
/// Cheap to clone (an `Arc`); `Send + Sync`. Calls from several threads are serialized by an
/// internal lock around the progress engine.
///
/// # Sub-communicators
/// A sub-communicator has its own context id (the wire header's `ctx`), its own rank
/// numbering (`0..size()`) and size. Every call on it (point-to-point, probes, collectives,
/// windows) takes and reports ranks of that communicator; the translation to the job's
/// (world) ranks happens inside this module. Messages are matched on (context, source,
/// tag): traffic of different communicators never matches, wildcards and the library's
/// internal tags included. Errors about an argument or a message ([`Error::InvalidRank`],
/// [`Error::Truncated`], RMA bounds) name ranks of this communicator; errors about a
/// process ([`Error::Timeout`], [`Error::PeerFailed`], [`Error::PeerFinalized`]) name its
/// **world** rank, the number `efarun` prefixes its output with. A failed rank fails every
/// communicator of the job (as `MPI_ERRORS_ARE_FATAL`).
///
/// A sub-communicator shares the world's endpoints and engine: [`Communicator::finalize`]
/// on it and dropping it release only the sub-communicator (`MPI_Comm_disconnect`), never
/// the endpoints. The job's part of this process ends (`MPI_Finalize`) when `finalize` is
/// called on the world, or when the last handle of the world **and** of every
/// communicator derived from it has been dropped.
#[derive(Clone)]
pub struct Communicator {
    inner: Arc<Inner>,
    group: Arc<Group>,
}

/// Which ranks of the job a communicator holds, and its context.
#[derive(Debug)]
struct Group {
    /// Context id: 0 for the world; see [`Communicator::split`] for how others are chosen.
    ctx: u32,
    /// This process's rank in the group.
    rank: u32,
    /// The world rank of each rank of the group.
    world_of: Vec<u32>,
    /// The group rank of each world rank ([`NOT_MEMBER`] for ranks outside the group).
    local_of: Vec<u32>,
    /// Collective objects (RMA windows) created so far on this communicator.
    objects: std::sync::atomic::AtomicU32,
    /// Collective calls made so far on this communicator (every rank makes them in the same
    /// order).
    coll_seq: std::sync::atomic::AtomicU32,
}

/// [`Group::local_of`] of a world rank outside the group.
const NOT_MEMBER: u32 = u32::MAX;
/// The context id of the world communicator.
const WORLD_CTX: u32 = 0;
/// Context ids of communicators are below this bit; with it set, the id carries the
/// creation traffic ([`Communicator::split`]'s exchange) of the communicator with the rest.
const CREATE_CTX_BIT: u32 = 1 << 31;

impl Group {
    fn new(ctx: u32, rank: u32, world_of: Vec<u32>, world_size: u32) -> Group {
        let mut local_of = vec![NOT_MEMBER; world_size as usize];
        for (l, &w) in world_of.iter().enumerate() {
            local_of[w as usize] = l as u32;
        }
        Group {
            ctx,
            rank,
            world_of,
            local_of,
            objects: std::sync::atomic::AtomicU32::new(0),
            coll_seq: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn world(rank: u32, size: u32) -> Group {
        Group::new(WORLD_CTX, rank, (0..size).collect(), size)
    }

    fn size(&self) -> u32 {
        self.world_of.len() as u32
    }

    /// Bytes of its per-rank tables (`size_of` plus capacity).
    fn bytes(&self) -> usize {
        std::mem::size_of::<Group>()
            + (self.world_of.capacity() + self.local_of.capacity()) * std::mem::size_of::<u32>()
    }
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.group.rank)
            .field("size", &self.group.size())
            .field("ctx", &self.group.ctx)
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
        let claim = WorldClaim::take(&boot)?;
        let (rank, size) = (boot.rank(), boot.world_size());
        let deadline = Instant::now() + config.timeout;
        let store = boot.connect_store(deadline)?;
        let all_local = boot.local_size() == Some(size) || size == 1;
        let (discovery, selection) = select_roles(&config, all_local);
        // CQs get wait fds only when blocking on them may be chosen: a wait object costs
        // the provider a signal per completion. The launcher's local size (else the world
        // size) stands for the ranks on this host until the cards tell.
        let cores = crate::wait::available_cores();
        let guess = boot.local_size().unwrap_or(size);
        let cq_wait = if crate::wait::wants_wait_fds(config.wait, guess, cores) {
            efa_fabric::CqWait::Fd
        } else {
            efa_fabric::CqWait::None
        };
        let (mut ports, card) = open_ports(rank, &discovery, &selection, &config, cq_wait)?;
        let prefix = claim.store_prefix.clone();
        let (cards, routes) =
            exchange_cards(&*store, &prefix, &card, size, deadline, &config.transports)?;
        let peers = peer_routes(&mut ports, &routes)?;
        let fast = FastPath::create(rank, &cards, &routes, &prefix);
        let on_host = (0..size).filter(|&r| cards.same_host(r, rank)).count() as u32;
        // From here on the routes are kept as the engine's two bytes per peer (a peer's
        // address is found in its card on first use).
        drop(routes);
        let cards = Arc::new(cards);
        let live = liveness(rank, &cards, &ports);
        // The rings have no wait fd: a blocking wait must sleep in bounded steps.
        let wait = wait_set(&config, &ports, usize::from(fast.is_some()), on_host, cores);
        let comm = assemble(
            rank,
            size,
            config,
            store.clone(),
            ports,
            peers,
            cards,
            live,
            claim,
            wait,
        )?;
        // Created before the barrier, attached after it: every peer has created its own.
        lock_engine(&comm.inner.engine).fast = fast;
        ready_barrier(&comm, &*store)?;
        if let Some(f) = lock_engine(&comm.inner.engine).fast.as_mut() {
            f.attach();
        }
        tracing::info!(rank, size, launcher = %boot.launcher(), "communicator ready");
        Ok(comm)
    }

    /// Ends this rank's part in the job, like `MPI_Finalize`: returns once every message
    /// that this rank's API calls reported as sent (inject, eager, rendezvous, detached
    /// sends and collective traffic) has reached its peer, and every peer has finalized its
    /// side with this rank. It is collective: every rank must call it (or drop its last
    /// clone of the communicator, which does the same, best effort, logging what it could
    /// not finish). Afterwards every operation on a remaining clone fails with
    /// [`Error::Finalized`], except `finalize` itself, which returns `Ok` at once (as
    /// dropping that clone would).
    ///
    /// Messages that arrived but were never received are dropped (logged at warn level).
    /// A process that ends without dropping the communicator (`std::process::exit`, a
    /// clone leaked or held by a thread still running) skips finalize, and its last
    /// messages may be lost.
    ///
    /// On a sub-communicator ([`Communicator::dup`], [`Communicator::split`]) this is
    /// `MPI_Comm_disconnect` instead: it waits until every send started on this
    /// sub-communicator has completed locally, then releases this handle. It is not
    /// collective, and it never finalizes the world or closes an endpoint (see
    /// [Sub-communicators](Communicator#sub-communicators)).
    ///
    /// # Errors
    /// [`Error::Timeout`] naming a peer when, within the communicator's deadline, a send
    /// did not complete (a rendezvous whose receive was never posted) or a peer did not
    /// finalize; fabric errors.
    pub fn finalize(self) -> Result<()> {
        if self.group.ctx == WORLD_CTX {
            return self.inner.finalize();
        }
        let ctx = self.group.ctx;
        wait_loop(
            &self,
            "finalize: waiting for a send to complete",
            None,
            None,
            |e| e.core.unfinished_send_on(ctx).is_none(),
        )
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

    /// The wait policy in force for every blocking call of this communicator and its
    /// sub-communicators: the one asked for ([`Config::wait`]), with
    /// [`WaitPolicy::Auto`] resolved for this host (never `Auto`; see [`crate::wait`]).
    pub fn wait_policy(&self) -> WaitPolicy {
        self.inner.wait.policy()
    }

    /// A waiter for one blocking call, under this communicator's wait policy.
    pub(crate) fn waiter(&self) -> crate::wait::Waiter {
        self.inner.wait.waiter()
    }

    /// This process's rank in this communicator.
    pub fn rank(&self) -> u32 {
        self.group.rank
    }
    /// Number of ranks in this communicator.
    pub fn size(&self) -> u32 {
        self.group.size()
    }
    /// The world rank (the rank in [`Communicator::init`]'s communicator) of this
    /// communicator's rank `rank`.
    ///
    /// # Errors
    /// [`Error::InvalidRank`].
    pub fn world_rank(&self, rank: u32) -> Result<u32> {
        self.check_rank(rank)?;
        Ok(self.group.world_of[rank as usize])
    }
    /// The route to `peer` (a rank of this communicator), with the reason it was chosen:
    /// [`placement::choose_route`] of the two ranks' cards, the choice the communicator
    /// made for `peer` when it was built (it keeps the cards, not the routes, and connects
    /// a peer on first use).
    ///
    /// # Errors
    /// [`Error::InvalidRank`]; [`Error::NoRoute`] never happens here (`build` fails first).
    pub fn route(&self, peer: u32) -> Result<Route> {
        let w = self.world_rank(peer)?;
        let cards = &self.inner.cards;
        let (Some(me), Some(them)) = (cards.card(self.inner.rank), cards.card(w)) else {
            return Err(Error::InvalidRank {
                rank: peer,
                size: self.size(),
            });
        };
        placement::choose_route(&me, &them, &self.inner.config.transports)
            .map_err(|source| Error::NoRoute { peer: w, source })
    }
    /// The flows to `peer` (a rank of this communicator) when its route has several
    /// (the IP route with `EFA_IP_FLOWS` > 1 on both ranks; [`stripe`]): per flow, the bytes
    /// and chunks of striped reads it carried into this rank, and its measured rate. `None`
    /// when the route has one flow, or before this rank first used the peer (its flows are
    /// connected on first use, as its route's address is).
    ///
    /// # Errors
    /// [`Error::InvalidRank`].
    pub fn ip_flows(&self, peer: u32) -> Result<Option<Vec<stripe::FlowStat>>> {
        let w = self.world_rank(peer)?;
        Ok(self.engine().flows.get(&w).map(|f| f.sched.stats()))
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

    /// The settings this communicator was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Bytes this rank keeps for the ranks of the job, used or idle: every structure of
    /// the communicator whose size grows with the world size, measured as `size_of` plus
    /// heap capacity (the card table, each peer's route and address, the protocol's
    /// per-peer state, liveness, failure probes, the fast-box index, and this
    /// communicator's group). Divided by [`Communicator::size`] it is the cost of a peer:
    /// for a large world of idle peers about 204 bytes with 96 ranks per host, 277 with one
    /// rank per host (see [module docs](crate::comm#state-per-peer)); each peer connected
    /// adds an entry of its endpoint's address map (about 16 bytes). Not counted:
    /// libfabric's memory (its address vectors and connections, which grow only with the
    /// peers this rank has talked to) and the fast boxes' shared-memory rings.
    pub fn peer_state_bytes(&self) -> usize {
        self.engine().peer_state_bytes() + self.group.bytes()
    }

    /// How many ranks of the job (this one included) this rank has connected to so far:
    /// whose address it inserted into an endpoint's address vector because it sent to
    /// them, read a rendezvous from them, probed them or exposed an RMA window to them. A
    /// peer that only sent to this rank is not counted (see
    /// [State per peer](crate::comm#state-per-peer)); messages carried by the fast boxes
    /// between ranks on one host connect nobody either.
    pub fn connected_peers(&self) -> u32 {
        self.engine()
            .peers
            .addr
            .iter()
            .filter(|&&a| a != FiAddr::UNSPEC)
            .count() as u32
    }

    /// The world rank of this communicator's `rank` (checked by the caller).
    fn world_of(&self, rank: u32) -> u32 {
        self.group.world_of[rank as usize]
    }

    /// [`Source`] in world ranks.
    fn world_source(&self, src: Source) -> Source {
        match src {
            Source::Rank(r) => Source::Rank(self.world_of(r)),
            Source::Any => Source::Any,
        }
    }

    /// A status from the engine (world ranks) in this communicator's ranks.
    fn local_status(&self, st: Status) -> Status {
        Status {
            source: self.group.local_of[st.source as usize],
            ..st
        }
    }

    /// The endpoint and address through which `peer` (a rank of this communicator) is
    /// reached (for RMA), inserting the peer's address on first use.
    ///
    /// # Errors
    /// Fabric errors of `fi_av_insert`.
    pub(crate) fn peer_endpoint(&self, peer: u32) -> Result<(usize, Endpoint, FiAddr)> {
        let w = self.world_of(peer);
        let mut e = self.engine();
        let (port, addr) = e
            .resolve(w)
            .map_err(|source| Error::fabric("fi_av_insert", Some(w), source))?;
        Ok((port, e.ports[port].ep.clone(), addr))
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
        self.group
            .objects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A user's receive or probe: a valid source rank and a tag outside the reserved range
    /// (a receive on a reserved tag could take the library's own collective or window
    /// traffic).
    fn check_user_match(&self, src: Source, tag: Tag) -> Result<()> {
        if let Source::Rank(r) = src {
            self.check_rank(r)?;
        }
        match tag {
            Tag::Is(t) if t > MAX_USER_TAG => Err(Error::ReservedTag(t)),
            _ => Ok(()),
        }
    }

    fn check_rank(&self, r: u32) -> Result<()> {
        if r >= self.size() {
            return Err(Error::InvalidRank {
                rank: r,
                size: self.size(),
            });
        }
        Ok(())
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        lock_engine(&self.inner.engine)
    }

    /// Starts sending `buf` to `dest` with `tag` (`MPI_Isend`). The request borrows `buf`
    /// until it completes or is dropped.
    ///
    /// A small message (up to the route's eager limit) is copied into the message at once;
    /// a large one is sent without a copy: `buf` is registered for the request's lifetime
    /// and the receiver reads it (RGET; from the provider's zero-copy threshold on, 64 KiB on
    /// shm and tcp, [`efa_fabric::rget_threshold`]), or, below that threshold, copied into
    /// an engine buffer that the receiver reads. Dropping an unfinished request whose buffer
    /// is registered waits, up to the communicator's deadline, until the receiver has read
    /// it (see [Requests](self#requests)).
    ///
    /// # Errors
    /// [`Error::InvalidRank`], [`Error::ReservedTag`], [`Error::PeerFailed`],
    /// [`Error::Finalized`]; fabric errors (registering `buf`, posting the message).
    pub fn isend<'a, T: Pod>(&self, buf: &'a [T], dest: u32, tag: u32) -> Result<SendRequest<'a>> {
        if tag > MAX_USER_TAG {
            return Err(Error::ReservedTag(tag));
        }
        let w = self.world_rank(dest)?;
        self.start_send(bytemuck::cast_slice(buf), w, tag, self.group.ctx)
    }

    /// Starts a buffered send of `buf` to `dest` with `tag` (as `MPI_Ibsend`): the data is
    /// copied before this returns (eager: into the message; larger: into an engine buffer
    /// that the receiver reads), so the request borrows nothing and `buf` may be reused at
    /// once. A dropped request detaches: the send goes on and `finalize` waits for it. Costs
    /// a copy of a large message that [`Communicator::isend`] avoids; for requests that must
    /// outlive the buffer (bindings, fire-and-forget sends).
    ///
    /// # Errors
    /// [`Error::InvalidRank`], [`Error::ReservedTag`], [`Error::PeerFailed`],
    /// [`Error::Finalized`]; fabric errors (registering an engine buffer, posting).
    pub fn ibsend<T: Pod>(&self, buf: &[T], dest: u32, tag: u32) -> Result<SendRequest<'static>> {
        if tag > MAX_USER_TAG {
            return Err(Error::ReservedTag(tag));
        }
        self.isend_copied(bytemuck::cast_slice(buf), dest, tag, self.group.ctx)
    }

    /// Starts a send of `data` to world rank `w` on context `ctx`, borrowing `data`: a
    /// large message exposes it (zero-copy RGET, [`Engine::zero_copy_send`]), a smaller one
    /// is copied ([`Communicator::post_copied`]).
    fn start_send<'a>(
        &self,
        data: &'a [u8],
        w: u32,
        tag: u32,
        ctx: u32,
    ) -> Result<SendRequest<'a>> {
        let e = self.engine();
        let Some(ep) = e.zero_copy_send(w, data.len()) else {
            return self.post_copied(e, data, w, tag, ctx);
        };
        // Registered without the lock (other threads' calls need it meanwhile).
        drop(e);
        let exposed = ep
            .expose(data)
            .map_err(|e| Error::fabric("registering the send buffer", Some(w), e))?;
        let remote = remote_of(&exposed.remote());
        let mut e = self.engine();
        let id = e.start_send_exposed(data, w, tag, ctx, remote)?;
        self.send_request(e, w, id, Some(exposed))
    }

    /// Starts a send of a copy of `data` to `dest` (a rank of this communicator) on context
    /// `ctx`: the request borrows nothing.
    fn isend_copied(
        &self,
        data: &[u8],
        dest: u32,
        tag: u32,
        ctx: u32,
    ) -> Result<SendRequest<'static>> {
        let w = self.world_rank(dest)?;
        self.post_copied(self.engine(), data, w, tag, ctx)
    }

    /// Posts a send of a copy of `data` to world rank `w` on context `ctx` (eager, or into
    /// an exposed engine buffer), under the engine lock `e`.
    fn post_copied(
        &self,
        mut e: MutexGuard<'_, Engine>,
        data: &[u8],
        w: u32,
        tag: u32,
        ctx: u32,
    ) -> Result<SendRequest<'static>> {
        let id = e.start_send(data, w, tag, ctx)?;
        self.send_request(e, w, id, None)
    }

    /// The request of send `id` to world rank `w`, just posted under the engine lock `e`
    /// (the one place a [`SendRequest`] is built). A send that completed at once (eager) is
    /// taken out of the engine here, so its request has nothing left to wait for.
    fn send_request<'a>(
        &self,
        mut e: MutexGuard<'_, Engine>,
        w: u32,
        id: SendId,
        exposed: Option<efa_fabric::Exposed<'a>>,
    ) -> Result<SendRequest<'a>> {
        let id = if e.core.send_finished(id) {
            e.take_send(id)?;
            None
        } else {
            Some(id)
        };
        drop(e);
        Ok(SendRequest {
            comm: self.clone(),
            id,
            dest: w,
            exposed,
        })
    }

    /// Starts a receive of at most `buf.len()` bytes from `src` (of this communicator) on
    /// context `ctx`; statuses are reported in elements of `elem` bytes.
    fn irecv_ctx<'a>(
        &self,
        buf: &'a mut [u8],
        src: Source,
        tag: Tag,
        ctx: u32,
        elem: usize,
    ) -> Result<RecvRequest<'a>> {
        if let Source::Rank(r) = src {
            self.check_rank(r)?;
        }
        let src = self.world_source(src);
        let id = self
            .engine()
            .start_recv(src, tag, ctx, buf.len(), RecvDest::User)?;
        Ok(RecvRequest {
            comm: self.clone(),
            id: Some(id),
            src,
            buf: Some(buf),
            elem,
        })
    }

    /// [`Communicator::isend`] of raw bytes with any tag, including the reserved range above
    /// [`MAX_USER_TAG`] (for collectives and other library-internal traffic).
    /// The data is copied (eager, or into an exposed engine buffer), so the request borrows
    /// nothing: collectives and windows keep their requests past their buffers' scopes.
    pub(crate) fn isend_bytes(
        &self,
        data: &[u8],
        dest: u32,
        tag: u32,
    ) -> Result<SendRequest<'static>> {
        self.isend_copied(data, dest, tag, self.group.ctx)
    }

    /// [`Communicator::irecv`] of raw bytes with an exact tag, including reserved ones.
    #[allow(dead_code)] // used by the collectives module
    pub(crate) fn irecv_bytes<'a>(
        &self,
        buf: &'a mut [u8],
        src: Source,
        tag: u32,
    ) -> Result<RecvRequest<'a>> {
        self.irecv_ctx(buf, src, Tag::Is(tag), self.group.ctx, 1)
    }

    /// Starts a receive into `buf` from `src` with `tag` (wildcards allowed).
    ///
    /// # Errors
    /// [`Error::InvalidRank`]; [`Error::ReservedTag`] for a tag above [`MAX_USER_TAG`].
    pub fn irecv<'a, T: Pod>(
        &self,
        buf: &'a mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
    ) -> Result<RecvRequest<'a>> {
        let (src, tag) = (src.into(), tag.into());
        self.check_user_match(src, tag)?;
        let elem = std::mem::size_of::<T>();
        let bytes: &'a mut [u8] = bytemuck::cast_slice_mut(buf);
        self.irecv_ctx(bytes, src, tag, self.group.ctx, elem)
    }

    /// Sends `buf` to `dest` and waits until the send has completed locally.
    ///
    /// # Errors
    /// As [`Communicator::isend`], plus [`Error::Timeout`] naming the peer (which from then
    /// on counts as failed for the whole job, see [`Error::Timeout`]) and
    /// [`Error::PeerFailed`]. A receiver whose buffer is too small gets
    /// [`Error::Truncated`]; the sender is not told (as in MPI).
    ///
    /// A large message is sent without a copy: `buf` is registered for the call and the
    /// receiver reads it (RGET); the call returns once the receiver has acknowledged, and
    /// deregisters it then (also when it fails).
    pub fn send<T: Pod>(&self, buf: &[T], dest: u32, tag: u32) -> Result<()> {
        // An eager send completes inside `isend`, under its one lock; a large one waits for
        // the receiver's read of `buf`, which stays registered until then (also when the
        // wait fails: the request deregisters it as it ends).
        self.isend(buf, dest, tag)?.wait()
    }

    /// Receives into `buf` and returns who sent how much with which tag.
    ///
    /// # Errors
    /// [`Error::Truncated`] when the message is larger than `buf` (nothing is written);
    /// [`Error::InvalidRank`], [`Error::ReservedTag`]; [`Error::Timeout`] (a receive from
    /// one rank that passes the deadline makes that rank count as failed for the whole job:
    /// it is not retryable, see [`Error::Timeout`]); [`Error::PeerFailed`]; fabric errors.
    pub fn recv<T: Pod>(
        &self,
        buf: &mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
    ) -> Result<Status> {
        self.irecv(buf, src, tag)?.wait()
    }

    /// Async [`Communicator::send`] for tokio code. The future may be dropped at any time
    /// without blocking: the data is copied (eager, or into an engine buffer that the
    /// receiver reads), so a dropped future's send goes on detached, as a dropped copied
    /// [`SendRequest`] does.
    ///
    /// # Errors
    /// As [`Communicator::send`].
    pub async fn send_async<T: Pod>(&self, buf: &[T], dest: u32, tag: u32) -> Result<()> {
        let mut req = self.ibsend(buf, dest, tag)?;
        poll_until(self, "send", Some(dest), || req.test()).await?;
        req.wait()
    }

    /// Async [`Communicator::recv`] for tokio code. The future may be dropped at any time
    /// (a `tokio::time::timeout` that expires, say); the receive is then cancelled as a
    /// dropped [`RecvRequest`] is: a message that already matched it is consumed and lost,
    /// and its sender still completes.
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

    /// Waits for every request (`MPI_Waitall`), returning the receive statuses in order
    /// (`None` for sends). All requests are waited for even when one fails; the first error
    /// is returned.
    ///
    /// The whole call has one deadline: this communicator's [timeout](Self::timeout),
    /// counted from the call's entry (not from each request's wait), so requests that
    /// never complete make it return after about one timeout, however many there are.
    ///
    /// Large messages matched by any of the receives are read straight into their buffers
    /// (zero-copy RGET), several at once, whichever request they belong to: this call
    /// holds every buffer until it returns.
    ///
    /// # Errors
    /// The first failed request's error (in the order of `reqs`): that request's own error,
    /// as its `wait` would return it (for example [`Error::Truncated`] or
    /// [`Error::PeerFailed`]), or, for a request still running when the call's deadline
    /// passes, [`Error::Timeout`] (naming its peer, which then counts as failed, as in
    /// [`Communicator::recv`]; `peer: None` for a receive from [`Source::Any`]) or the
    /// [`Error::PeerFailed`] of a peer that another rank reported first.
    pub fn wait_all(&self, mut reqs: Vec<P2pRequest<'_>>) -> Result<Vec<Option<Status>>> {
        let deadline = CallDeadline::new(self.timeout());
        // Until every receive has finished, their reads are done here in place; then each
        // request's wait only collects its outcome. (A failure here, a deadline, is
        // reported by the waits below as well.)
        if let Err(e) = self.read_all_in_place(&mut reqs, &deadline) {
            tracing::debug!("wait_all: {e}");
        }
        let mut out = Vec::with_capacity(reqs.len());
        let mut first_err = None;
        for r in reqs {
            let res = r.wait_by(Some(&deadline));
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

impl Communicator {
    /// [`Communicator::wait_all`]'s first part: waits until every receive of `reqs` has
    /// finished, reading each large message matched to one of them straight into its
    /// buffer as soon as it is matched, while earlier reads are still under way (all in one
    /// [`efa_fabric::rma_scope`], which this call holds with every buffer: the NIC writes
    /// them only inside it, see [`read_in_place`]).
    fn read_all_in_place(
        &self,
        reqs: &mut [P2pRequest<'_>],
        deadline: &CallDeadline,
    ) -> Result<()> {
        // Each receive still running, with its buffer (taken when its read is posted).
        let mut bufs: Vec<(RecvId, Option<&mut [u8]>)> = reqs
            .iter_mut()
            .filter_map(|r| match r {
                P2pRequest::Recv(r) => Some((r.id?, r.buf.as_deref_mut())),
                P2pRequest::Send(_) => None,
            })
            .collect();
        if bufs.is_empty() {
            return Ok(());
        }
        {
            let mut e = self.engine();
            for &(id, _) in &bufs {
                e.own(id);
            }
        }
        // `bufs[..finished]` have finished (receives of one window mostly finish in order).
        let mut finished = 0;
        let res = efa_fabric::rma_scope(deadline.left(), |s| {
            // Reads posted and not yet reaped.
            let mut posted: Vec<(RecvId, ScopedRead)> = Vec::new();
            let res = wait_loop(self, "wait_all", None, Some(deadline), |e| {
                let mut i = 0;
                while i < e.wanted.len() {
                    let id = e.wanted[i];
                    let Some(slot) = bufs.iter_mut().find(|(r, b)| *r == id && b.is_some()) else {
                        i += 1;
                        continue;
                    };
                    let Some((peer, parts, region, len)) = e.take_wanted(id) else {
                        i += 1;
                        continue;
                    };
                    // Taken out of `e.wanted`: the next one is at `i` now.
                    let buf = slot.1.take().expect("checked above");
                    let capacity = buf.len();
                    let Some(dst) = in_place_target(buf, len) else {
                        for p in parts.iter() {
                            e.read_part_dropped(peer, p.flow, p.len);
                        }
                        e.read_not_posted(id, capacity, len);
                        continue;
                    };
                    posted.push((id, ScopedRead::post(s, dst, peer, parts, &region)));
                }
                let mut reaped = false;
                let mut k = 0;
                while k < posted.len() {
                    if !posted[k].1.poll(s) {
                        k += 1;
                        continue;
                    }
                    let (id, r) = posted.swap_remove(k);
                    let peer = r.peer;
                    match r.finish(s, e, deadline.start.elapsed()) {
                        Ok(()) => e.read_in_place_done(id),
                        Err(err) => e.read_failed(id, peer, err),
                    }
                    reaped = true;
                }
                if reaped {
                    if let Err(err) = e.drain() {
                        tracing::debug!("wait_all: after in-place reads: {err}");
                    }
                }
                while finished < bufs.len() && e.core.recv_finished(bufs[finished].0) {
                    finished += 1;
                }
                posted.is_empty() && finished == bufs.len()
            });
            if res.is_err() && !posted.is_empty() {
                // The scope cancels and drains these reads as it ends; their receives fail
                // (with a timeout, as their parts have not all completed).
                let mut e = self.engine();
                for (id, r) in posted {
                    let peer = r.peer;
                    match r.finish(s, &mut e, deadline.start.elapsed()) {
                        Ok(()) => e.read_in_place_done(id),
                        Err(err) => e.read_failed(id, peer, err),
                    }
                }
            }
            res
        });
        let mut e = self.engine();
        for &(id, _) in &bufs {
            e.disown(id);
        }
        res
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

/// A point-to-point request of either kind, for [`Communicator::wait_all`], which returns
/// the receives' statuses. (Any mix of request kinds goes to [`Communicator::wait_any`],
/// [`Communicator::wait_some`] and [`Communicator::test_all`].)
#[derive(Debug)]
pub enum P2pRequest<'a> {
    /// A send.
    Send(SendRequest<'a>),
    /// A receive.
    Recv(RecvRequest<'a>),
}

impl<'a> From<SendRequest<'a>> for P2pRequest<'a> {
    fn from(r: SendRequest<'a>) -> Self {
        P2pRequest::Send(r)
    }
}
impl<'a> From<RecvRequest<'a>> for P2pRequest<'a> {
    fn from(r: RecvRequest<'a>) -> Self {
        P2pRequest::Recv(r)
    }
}

/// A send in progress ([`Request`]), borrowing its buffer for `'a` (a send whose data was
/// copied borrows nothing: `SendRequest<'static>`). What dropping it does, and why it cannot
/// be cancelled: [Requests](self#requests).
#[derive(Debug)]
#[must_use = "a send request should be waited for to learn its outcome"]
pub struct SendRequest<'a> {
    comm: Communicator,
    /// `None` once waited for (consumed), or when the send completed as it started.
    id: Option<SendId>,
    dest: u32,
    /// The user's buffer, registered for the receiver to read (zero-copy RGET) until the
    /// send has finished; deregistered when the request ends.
    exposed: Option<efa_fabric::Exposed<'a>>,
}

impl SendRequest<'_> {
    /// Progresses and reports whether the send has completed (successfully or not).
    ///
    /// # Errors
    /// Fabric errors that belong to no operation.
    pub fn test(&mut self) -> Result<bool> {
        let mut e = self.comm.engine();
        if self.id.is_none_or(|id| e.core.send_finished(id)) {
            return Ok(true);
        }
        e.progress()?;
        Ok(self.id.is_none_or(|id| e.core.send_finished(id)))
    }

    /// Waits for the send to complete, up to the communicator's timeout.
    ///
    /// # Errors
    /// [`Error::Timeout`] naming the peer; [`Error::PeerFailed`]; fabric errors. (A
    /// truncation is reported to the receiver only.)
    pub fn wait(self) -> Result<()> {
        self.wait_by(None)
    }

    /// [`SendRequest::wait`] up to `deadline` (a call's that waits for several requests),
    /// or, with `None`, the communicator's timeout from now.
    fn wait_by(mut self, deadline: Option<&CallDeadline>) -> Result<()> {
        let Some(id) = self.id.take() else {
            return Ok(());
        };
        let res = wait_loop(&self.comm, "send", Some(self.dest), deadline, |e| {
            e.core.send_finished(id)
        });
        let res = match res {
            Ok(()) => self.comm.engine().take_send(id),
            Err(err) => {
                self.comm.engine().core.drop_send(id);
                Err(err)
            }
        };
        // The receiver has read the data, or the send failed (its peer then counts as
        // failed): the registration ends with the request (`exposed` drops with `self`).
        res
    }
}

impl Drop for SendRequest<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        if self.exposed.is_some() {
            // The receiver may read the borrowed buffer until the send finishes: wait for
            // that (up to the deadline, after which the peer counts as failed), so that the
            // registration, and the borrow, end only once no peer reads it any more.
            if let Err(e) = wait_loop(&self.comm, "send", Some(self.dest), None, |e| {
                e.core.send_finished(id)
            }) {
                tracing::debug!(
                    "a dropped send of a registered buffer to rank {}: {e}",
                    self.dest
                );
            }
        }
        // Forget the outcome; in-flight copied data stays owned by the engine until done.
        self.comm.engine().core.drop_send(id);
    }
}

/// A receive in progress into a borrowed buffer ([`Request`]). What dropping or cancelling
/// it does: [Requests](self#requests).
#[derive(Debug)]
#[must_use = "a receive request must be waited for"]
pub struct RecvRequest<'a> {
    comm: Communicator,
    /// `None` once waited for (consumed) or forgotten.
    id: Option<RecvId>,
    src: Source,
    buf: Option<&'a mut [u8]>,
    elem: usize,
}

impl RecvRequest<'_> {
    /// Progresses and reports whether the receive has completed (successfully or not).
    ///
    /// # Errors
    /// Fabric errors that belong to no operation.
    ///
    /// Never blocks: a large rendezvous message is read through an engine buffer here
    /// (only [`RecvRequest::wait`] reads straight into the user's buffer).
    pub fn test(&mut self) -> Result<bool> {
        let mut e = self.comm.engine();
        e.progress()?;
        Ok(self.id.is_none_or(|id| e.core.recv_finished(id)))
    }

    /// Cancels the receive if no message has matched it yet (`MPI_Cancel`): `true` when
    /// it was cancelled (it is then complete, [`RecvRequest::wait`] returns
    /// [`Error::Cancelled`], and the message it would have got stays for a later receive),
    /// `false` when a message already matched it (it completes normally).
    ///
    /// # Errors
    /// None today (see [`AnyRequest::cancel`]).
    pub fn cancel(&mut self) -> Result<bool> {
        let Some(id) = self.id else {
            return Ok(false);
        };
        Ok(self.comm.engine().core.cancel_recv(id))
    }

    /// Waits for the message, copies it into the buffer and returns its status.
    ///
    /// # Errors
    /// [`Error::Truncated`] (nothing written), [`Error::Timeout`], [`Error::ElementSize`],
    /// fabric errors.
    pub fn wait(self) -> Result<Status> {
        self.wait_by(None)
    }

    /// [`RecvRequest::wait`] up to `deadline` (a call's that waits for several requests),
    /// or, with `None`, the communicator's timeout from now.
    fn wait_by(mut self, deadline: Option<&CallDeadline>) -> Result<Status> {
        let peer = match self.src {
            Source::Rank(r) => Some(r),
            Source::Any => None,
        };
        let comm = self.comm.clone();
        let Some(id) = self.id.take() else {
            return Err(Error::Internal {
                what: "a receive request was waited for twice",
            });
        };
        // Waits until the receive finishes or a large message asks to be read into the
        // buffer, which this call holds. While it waits, this receive is the engine's
        // `owner`: its read is left for this call, not read into an engine buffer.
        loop {
            let mut wanted = None;
            let waited = wait_loop(&comm, "recv", peer, deadline, |e| {
                e.own(id);
                wanted = e.take_wanted(id);
                wanted.is_some() || e.core.recv_finished(id)
            });
            let read = match (waited, wanted) {
                (Ok(()), Some(w)) => match self.buf.as_deref_mut() {
                    Some(buf) => read_in_place(&comm, deadline, buf, id, w).map(|()| true),
                    None => Err(Error::Internal {
                        what: "a receive request without its buffer has a read to do",
                    }),
                },
                (Ok(()), None) => Ok(false),
                (Err(e), _) => Err(e),
            };
            match read {
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    let mut e = comm.engine();
                    e.disown(id);
                    e.cancel_recv(id);
                    return Err(err);
                }
            }
        }
        // One lock for what is left: the receive is taken out, a small message copied out
        // and its buffer recycled. (A large one is copied without the lock, which other
        // threads' calls need meanwhile.)
        let mut e = comm.engine();
        e.disown(id);
        let in_place = e.in_place(id);
        let (st, data) = match e.take_recv(id) {
            // The buffer was this receive's: the sender is named in this communicator's ranks.
            Err(Error::Truncated {
                expected,
                got,
                peer,
                tag,
            }) => {
                return Err(Error::Truncated {
                    expected,
                    got,
                    peer: comm.group.local_of[peer as usize],
                    tag,
                })
            }
            Err(err) => return Err(err),
            Ok(x) => x,
        };
        let status = comm.local_status(st);
        let res = if !status.len.is_multiple_of(self.elem.max(1)) {
            Err(Error::ElementSize {
                bytes: status.len,
                elem: self.elem,
            })
        } else {
            let buf = self.buf.take().expect("buffer present until wait");
            if !in_place {
                if data.capacity() >= BufPool::MIN {
                    drop(e);
                    buf[..status.len].copy_from_slice(&data[..status.len]);
                    e = comm.engine();
                } else {
                    buf[..status.len].copy_from_slice(&data[..status.len]);
                }
            }
            Ok(status)
        };
        e.recycle(data);
        res
    }
}

impl Drop for RecvRequest<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.comm.engine().cancel_recv(id);
        }
    }
}

/// Zero-copy RGET of one large rendezvous message the engine matched to receive `id`
/// ([`Engine::take_wanted`]): reads it from its sender's exposed buffer straight into `buf`
/// (`fi_read` in one [`efa_fabric::rma_scope`]), and returns only once the read has
/// completed, failed or been cancelled and drained: the NIC writes the user's memory only
/// inside this call, which holds the borrow, so neither a dropped nor a leaked request can
/// let it write freed memory. The receive learns the read's outcome ([`in_place_target`]
/// for a `buf` too short); the first error of the actions that follow is returned. Builds
/// no list: one message, one scoped read per part of its [`Engine::read_plan`] (one part,
/// kept inline, unless the read is striped over the peer's flows).
fn read_in_place(
    comm: &Communicator,
    deadline: Option<&CallDeadline>,
    buf: &mut [u8],
    id: RecvId,
    (peer, parts, region, len): WantedInPlace,
) -> Result<()> {
    let capacity = buf.len();
    let Some(dst) = in_place_target(buf, len) else {
        let mut e = comm.engine();
        for p in parts.iter() {
            e.read_part_dropped(peer, p.flow, p.len);
        }
        e.read_not_posted(id, capacity, len);
        return e.drain();
    };
    let timeout = time_left(comm, deadline);
    efa_fabric::rma_scope(timeout, |s| {
        // One scoped read per part (one part unless striped: nothing allocated for it).
        let mut read = ScopedRead::post(s, dst, peer, parts, &region);
        let mut clock = efa_fabric::PollClock::new(timeout);
        // Idle as the scope's own waits do (efa-fabric's process-wide idle mode: spin first
        // under the spin policy): a yield after every poll cost a 1 MiB TCP ping-pong
        // about 1.2x (a sched_yield per poll, 1,583 per 200 round trips under strace).
        let mut backoff = efa_fabric::Backoff::new();
        while !read.poll(s) && !clock.expired() {
            backoff.snooze();
        }
        let mut e = comm.engine();
        match read.finish(s, &mut e, timeout) {
            Ok(()) => e.read_in_place_done(id),
            Err(err) => e.read_failed(id, peer, err),
        }
        e.drain()
    })
}

/// One part of a [`ScopedRead`]: its scoped id (`None`: not posted), flow, length in
/// bytes, and when it was seen complete.
struct ScopedPart {
    id: Option<efa_fabric::ScopedId>,
    flow: Option<usize>,
    len: usize,
    done: Option<Instant>,
}

/// A rendezvous read into a user's buffer posted in an [`efa_fabric::rma_scope`]: one
/// scoped operation per part of its [`Engine::read_plan`].
struct ScopedRead {
    peer: u32,
    parts: Parts<ScopedPart>,
    /// The first error posting or progressing a part.
    error: Option<efa_fabric::Error>,
}

impl ScopedRead {
    /// Posts `parts` (in order, covering `buf`) of a read from `peer`'s `region` into `buf`.
    /// A part that fails to post stops the posting; the error is kept for
    /// [`ScopedRead::finish`] (the parts posted are drained by the scope).
    fn post<'s>(
        s: &'s efa_fabric::RmaScope<'s, '_>,
        buf: &'s mut [u8],
        peer: u32,
        parts: Parts<ReadPart>,
        region: &efa_fabric::RemoteRegion,
    ) -> ScopedRead {
        let mut error = None;
        let mut rest = buf;
        let mut post = |p: ReadPart| {
            let at = p.len.min(rest.len());
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(at);
            rest = tail;
            let id = if error.is_none() {
                match s.read(&p.ep, head, p.addr, region, p.off as u64) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        error = Some(e);
                        None
                    }
                }
            } else {
                None
            };
            ScopedPart {
                id,
                flow: p.flow,
                len: p.len,
                done: None,
            }
        };
        let mut items = parts.into_items();
        let first = post(items.next().expect("parts have a first"));
        let rest_parts = items.map(&mut post).collect();
        ScopedRead {
            peer,
            parts: Parts {
                first,
                rest: rest_parts,
            },
            error,
        }
    }

    /// Progresses the parts not yet complete once, noting when each completes; true once
    /// every posted part has completed or an error stopped the read.
    fn poll(&mut self, s: &efa_fabric::RmaScope<'_, '_>) -> bool {
        if self.error.is_some() {
            return true;
        }
        let mut all = true;
        for part in self.parts.iter_mut() {
            let Some(id) = part.id else { continue };
            if part.done.is_some() {
                continue;
            }
            match s.test(id) {
                Ok(true) => part.done = Some(Instant::now()),
                Ok(false) => all = false,
                Err(e) => {
                    self.error = Some(e);
                    return true;
                }
            }
        }
        all
    }

    /// Tells the peer's scheduler what each part did, and gives the read's outcome: the
    /// first error, [`efa_fabric::Error::Timeout`] (having `waited`) when a part has not
    /// completed.
    fn finish(
        self,
        s: &efa_fabric::RmaScope<'_, '_>,
        e: &mut Engine,
        waited: Duration,
    ) -> std::result::Result<(), efa_fabric::Error> {
        let mut res = match self.error {
            Some(err) => Err(err),
            None => Ok(()),
        };
        for ScopedPart {
            id,
            flow,
            len,
            done,
        } in self.parts.into_items()
        {
            match (id, done) {
                (Some(id), Some(at)) => {
                    e.read_part_done(self.peer, flow, len, at);
                    if let (Ok(()), Err(err)) = (&res, s.wait(id)) {
                        res = Err(err);
                    }
                }
                _ => {
                    e.read_part_dropped(self.peer, flow, len);
                    if res.is_ok() {
                        res = Err(efa_fabric::Error::Timeout { op: "read", waited });
                    }
                }
            }
        }
        res
    }
}

/// The part of a receive's buffer `buf` that its in-place read of `len` bytes fills;
/// `None` when `buf` is shorter. (The protocol core truncates a message longer than its
/// receive before asking for a read, so `None` means broken bookkeeping, reported with
/// [`Engine::read_not_posted`], not a panic.)
fn in_place_target(buf: &mut [u8], len: usize) -> Option<&mut [u8]> {
    buf.get_mut(..len)
}

/// The deadline of one call that waits several times ([`Communicator::wait_all`]): the
/// communicator's timeout from the call's entry, shared by every wait inside it, so that
/// requests that never complete take one timeout in all, not one each.
#[derive(Debug, Clone, Copy)]
struct CallDeadline {
    start: Instant,
    timeout: Duration,
}

impl CallDeadline {
    /// `timeout` from now.
    fn new(timeout: Duration) -> CallDeadline {
        CallDeadline {
            start: Instant::now(),
            timeout,
        }
    }

    /// What is left of it (zero once passed).
    fn left(&self) -> Duration {
        self.timeout.saturating_sub(self.start.elapsed())
    }
}

/// How long a wait may take: what is left of `deadline`, or with `None` (a wait that is a
/// call of its own) the communicator's whole timeout.
fn time_left(comm: &Communicator, deadline: Option<&CallDeadline>) -> Duration {
    deadline.map_or_else(|| comm.timeout(), CallDeadline::left)
}

/// Progresses until `done` holds, spinning then backing off, up to `deadline` (see
/// [`time_left`]).
fn wait_loop(
    comm: &Communicator,
    op: &'static str,
    peer: Option<u32>,
    deadline: Option<&CallDeadline>,
    mut done: impl FnMut(&mut Engine) -> bool,
) -> Result<()> {
    let now = Instant::now();
    let start = deadline.map_or(now, |d| d.start);
    let timeout = time_left(comm, deadline);
    let mut waiter = comm.inner.wait.waiter();
    // The deadline counts from the call's entry. Policies that yield or block on every idle
    // poll read the clock at every poll (one vDSO read beside a system call): reading it
    // every 64 polls made deadlines seconds late under yield on a crowded host.
    let every = match comm.inner.wait.policy() {
        crate::wait::WaitPolicy::Yield | crate::wait::WaitPolicy::Block => 1,
        _ => efa_fabric::PollClock::EVERY,
    };
    let mut clock = efa_fabric::PollClock::until(now + timeout, every);
    loop {
        {
            let mut e = comm.engine();
            if done(&mut e) {
                return Ok(());
            }
            let before = e.events;
            e.progress()?;
            if done(&mut e) {
                return Ok(());
            }
            if e.events != before {
                waiter.progressed();
            }
        }
        if clock.expired() {
            return Err(comm.engine().deadline_passed(op, peer, start.elapsed()));
        }
        waiter.idle();
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
    cq_wait: efa_fabric::CqWait,
) -> Result<(Vec<Port>, Card)> {
    let mut ports: Vec<Port> = Vec::new();
    let mut card = Card {
        rank,
        host_id: placement::host_id()?,
        endpoints: Vec::new(),
        fabric_subnet: None,
        ip_subnet: None,
        process: placement::ProcessId::this(),
    };
    let mut missing = Vec::new();
    for rc in &selection.roles {
        let Some(info) = rc.chosen.and_then(|i| discovery.info(i)) else {
            if config.transports.contains(rc.role) {
                missing.push((rc.role, rc.why.to_string()));
            }
            continue;
        };
        let flows = match rc.role {
            Transport::Ip => {
                let iface = rc.chosen.and_then(|i| discovery.offers[i].iface.as_deref());
                config.ip_flows.flows_for(iface)
            }
            _ => 1,
        };
        ports.push(open_port(rc.role, info, config, flows, cq_wait)?);
        match rc.role {
            Transport::Shm => {}
            Transport::Fabric => card.fabric_subnet = rc.subnet,
            Transport::Ip => card.ip_subnet = rc.subnet,
        }
    }
    if ports.is_empty() {
        return Err(Error::NoTransport {
            allowed: config.transports,
            missing,
        });
    }
    for p in &ports {
        // Flow 0 first, then the further flows right after it ([`Card::flows`]).
        for ep in std::iter::once(&p.ep).chain(&p.flows) {
            card.endpoints.push(EndpointCard {
                transport: p.transport,
                provider: p.provider.clone(),
                addr: ep
                    .name()
                    .map_err(|e| Error::fabric("fi_getname", None, e))?,
            });
        }
    }
    Ok((ports, card))
}

/// Publishes this rank's card, reads every rank's into a table indexed by rank, and
/// chooses the route to each ([`placement::choose_route`]).
///
/// # Errors
/// [`Error::Card`] for a card that does not encode or decode; [`Error::NoRoute`] for the
/// first peer that no allowed transport reaches; store errors and timeouts.
fn exchange_cards(
    store: &dyn Store,
    prefix: &str,
    card: &Card,
    size: u32,
    deadline: Instant,
    allowed: &TransportSet,
) -> Result<(CardTable, Vec<Chosen>)> {
    let rank = card.rank;
    let encoded = card
        .encode()
        .map_err(|source| Error::Card { rank, source })?;
    let blobs = bootstrap::exchange_all(
        store,
        &format!("{prefix}/card"),
        rank,
        size,
        &encoded,
        deadline,
    )?;
    // One card decoded at a time, each reply blob freed once read: start-up never holds
    // every card decoded (about 550 bytes per rank) next to the reply.
    let mut table = CardTableBuilder::default();
    let mut routes = Vec::with_capacity(blobs.len());
    for (r, blob) in blobs.into_iter().enumerate() {
        let peer = r as u32;
        let c = Card::decode(&blob).map_err(|source| Error::Card { rank: peer, source })?;
        let route = placement::choose_route(card, &c, allowed)
            .map_err(|source| Error::NoRoute { peer, source })?;
        tracing::debug!(rank, peer, transport = %route.transport, reason = %route.reason, "route");
        routes.push((route.transport, route.peer_endpoint));
        table.push(&c).map_err(|e| {
            tracing::error!("{e}");
            Error::Internal {
                what: "the job's cards exceed the communicator's card table (4 GiB of addresses)",
            }
        })?;
    }
    Ok((table.finish(), routes))
}

/// Each peer's route as the engine keeps it (the port and the peer's endpoint, no
/// address yet: see [`Peers`]), and marks the endpoints that some peer is routed through.
///
/// # Errors
/// [`Error::Internal`] when a route uses a transport that has no open endpoint or an
/// endpoint index past 255 (placement chooses only among opened endpoints, at most a few).
fn peer_routes(ports: &mut [Port], routes: &[Chosen]) -> Result<Peers> {
    let transports: Vec<Transport> = ports.iter().map(|p| p.transport).collect();
    let (peers, used) = routes_to_ports(&transports, routes)?;
    for (p, used) in ports.iter_mut().zip(used) {
        p.used = used;
    }
    Ok(peers)
}

/// The flows to one peer whose route has several ([`stripe`]): the peer's address of each
/// (flow 0: the route's), and the scheduler that spreads striped reads over them. Made on
/// the peer's first striped read ([`Engine::peer_flows`]).
struct PeerFlows {
    addrs: Vec<FiAddr>,
    sched: stripe::Striper,
}

/// [`peer_routes`] over the transports of the open ports, in port order: the engine's
/// routes, and whether each port is used.
fn routes_to_ports(transports: &[Transport], routes: &[Chosen]) -> Result<(Peers, Vec<bool>)> {
    let mut used = vec![false; transports.len()];
    let mut peers = Peers {
        route: Vec::with_capacity(routes.len()),
        addr: vec![FiAddr::UNSPEC; routes.len()],
    };
    for &(transport, peer_endpoint) in routes {
        let port = transports
            .iter()
            .position(|&t| t == transport)
            .and_then(|p| u8::try_from(p).ok())
            .ok_or(Error::Internal {
                what: "a route uses a transport that has no open endpoint",
            })?;
        let peer_endpoint = u8::try_from(peer_endpoint).map_err(|_| Error::Internal {
            what: "a route uses a peer endpoint past the 256th",
        })?;
        used[usize::from(port)] = true;
        peers.route.push((port, peer_endpoint));
    }
    Ok((peers, used))
}

/// The liveness flags shared by the engine and every endpoint's post path; each endpoint
/// learns which rank an address is as the engine inserts it ([`Engine::resolve`]).
fn liveness(rank: u32, cards: &Arc<CardTable>, ports: &[Port]) -> Arc<Liveness> {
    let live = Arc::new(Liveness {
        dead: (0..cards.len())
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect(),
        cards: cards.clone(),
        rank,
    });
    for port in ports {
        let _ = port.liveness.set(PortLiveness {
            rank_of: Mutex::new(HashMap::new()),
            liveness: live.clone(),
        });
    }
    live
}

/// The wait policy for `on_host` ranks of the job on this host and `cores` usable cores
/// ([`crate::wait::choose`]), over the CQs of the endpoints that peers are routed to.
/// `fdless_carriers` counts the other things the engine polls for messages that have no wait
/// fd (e.g. shared-memory rings): with any, Block blocks in short slices only
/// ([`WaitSet::new`]).
fn wait_set(
    config: &Config,
    ports: &[Port],
    fdless_carriers: usize,
    on_host: u32,
    cores: usize,
) -> Arc<WaitSet> {
    let mut cqs: Vec<efa_fabric::CompletionQueue> = Vec::new();
    for p in ports.iter().filter(|p| p.used) {
        for cq in [p.ep.rx_cq(), p.ep.tx_cq()] {
            if !cqs.iter().any(|c| c.same(cq)) {
                cqs.push(cq.clone());
            }
        }
    }
    let fds = cqs.iter().filter(|c| c.wait_fd().is_some()).count();
    let chosen = crate::wait::choose(config.wait, on_host, cores);
    crate::wait::log_choice(config.wait, chosen, on_host, cores, fds, cqs.len());
    Arc::new(WaitSet::new(chosen, cqs, fdless_carriers))
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
    peers: Peers,
    cards: Arc<CardTable>,
    live: Arc<Liveness>,
    claim: WorldClaim,
    wait: Arc<WaitSet>,
) -> Result<Communicator> {
    let providers = ports
        .iter()
        .map(|p| (p.transport, p.provider.clone()))
        .collect();
    let mut engine = Engine::new(rank, size, ports, peers, cards.clone(), live);
    engine.stripe_min = config.ip_flows.stripe_min;
    engine.stripe_mode = config.ip_flows.mode;
    engine.post_all_slots()?;
    Ok(Communicator {
        inner: Arc::new(Inner {
            rank,
            size,
            cards,
            providers,
            _store: store,
            engine: Mutex::new(engine),
            config,
            ctx_alloc: Mutex::new(CtxAllocator::default()),
            claim,
            wait,
        }),
        group: Arc::new(Group::world(rank, size)),
    })
}

impl Engine {
    /// The engine of rank `rank` of `size` over the open endpoints, with no receive buffer
    /// posted yet ([`Engine::post_all_slots`]).
    fn new(
        rank: u32,
        size: u32,
        ports: Vec<Port>,
        peers: Peers,
        cards: Arc<CardTable>,
        live: Arc<Liveness>,
    ) -> Engine {
        let scratch_len = ports
            .iter()
            .map(|p| p.inject.max(HDR_LEN + p.eager))
            .max()
            .unwrap_or(HDR_LEN);
        let small_cap = ports.iter().map(|p| p.eager).max().unwrap_or(0);
        let exposed_free = ports.iter().map(|_| Vec::new()).collect();
        Engine {
            rank,
            ports,
            peers,
            cards,
            flows: HashMap::new(),
            stripe_min: stripe::DEFAULT_STRIPE_MIN,
            stripe_mode: stripe::StripeMode::default(),
            core: Core::new(rank, size, proto::Config::default()),
            recv_slots: Vec::new(),
            exposed: Vec::new(),
            reads: Vec::new(),
            wanted: Vec::new(),
            owners: Vec::new(),
            small: Vec::new(),
            small_cap,
            exposed_free,
            background: Vec::new(),
            // Control messages are assembled here when they are injected: as large as the
            // largest inject size or eager message of any endpoint.
            scratch: vec![0u8; scratch_len],
            ctx: WORLD_CTX,
            events: 0,
            notifications: VecDeque::new(),
            pool: BufPool::default(),
            finalized: false,
            live,
            failure: None,
            polls: 0,
            last_check: Instant::now(),
            last_ping: Instant::now(),
            refused_since: HashMap::new(),
            broken: false,
            fast: None,
        }
    }

    /// Bytes of the state this rank keeps per rank of the job, whether it ever talks to
    /// it or not (the structures whose size grows with the job; `size_of` plus heap
    /// capacity): the card table, each peer's route and address, the protocol core's
    /// per-peer state, the liveness flags and the addresses each endpoint has learned,
    /// the probe bookkeeping and the fast-box index. Not counted: libfabric's own memory
    /// (its address vectors, connections) and the fast boxes' shared-memory rings (see
    /// [`crate::fastbox`]).
    fn peer_state_bytes(&self) -> usize {
        let map_entry = |k: usize, v: usize| k + v + 1; // hashbrown: a control byte per slot
        let learned: usize = self
            .ports
            .iter()
            .filter_map(|p| p.liveness.get())
            .map(|pl| {
                let m = pl
                    .rank_of
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                m.capacity() * map_entry(std::mem::size_of::<FiAddr>(), 4)
            })
            .sum();
        self.cards.heap_bytes()
            + self.peers.route.capacity() * std::mem::size_of::<(u8, u8)>()
            + self.peers.addr.capacity() * std::mem::size_of::<FiAddr>()
            + self.core.peer_bytes()
            + self.live.dead.capacity() * std::mem::size_of::<std::sync::atomic::AtomicBool>()
            + learned
            + self.refused_since.capacity() * map_entry(4, std::mem::size_of::<Instant>())
            + self.fast.as_ref().map_or(0, FastPath::index_bytes)
    }
}

/// Waits until every rank has posted its receive buffers (so nobody sends before its peer
/// can receive), then removes this rank's card from the store.
///
/// # Errors
/// Store errors and timeouts: the job never started, and this rank will not finalize.
fn ready_barrier(comm: &Communicator, store: &dyn Store) -> Result<()> {
    let (rank, size) = (comm.inner.rank, comm.inner.size);
    let prefix = &comm.inner.claim.store_prefix;
    if let Err(e) = bootstrap::barrier(
        store,
        &format!("{prefix}/ready"),
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
    if let Err(e) = bootstrap::withdraw(store, &format!("{prefix}/card"), rank, "") {
        tracing::warn!("could not remove this rank's card from the store: {e}");
    }
    Ok(())
}

/// The ranks behind one endpoint's addresses (those inserted so far), and the
/// communicator's liveness flags.
struct PortLiveness {
    /// Filled by [`Engine::resolve`] under the engine's lock; read by posts that retry on a
    /// full queue (rarely: the lock is not on a fast path).
    rank_of: Mutex<HashMap<FiAddr, u32>>,
    liveness: Arc<Liveness>,
}

impl PortLiveness {
    /// The rank whose address `addr` is on this endpoint, once inserted.
    fn rank_of(&self, addr: FiAddr) -> Option<u32> {
        self.rank_of
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&addr)
            .copied()
    }
}

/// What posts retrying on a full queue ask: whether the rank they post to is still alive.
/// Shared by the engine (which marks failed ranks) and every endpoint's post path.
struct Liveness {
    /// Ranks known to have failed.
    dead: Vec<std::sync::atomic::AtomicBool>,
    /// Each rank's process and host (so that a same-host peer's pid can be checked).
    cards: Arc<CardTable>,
    /// This rank.
    rank: u32,
}

impl Liveness {
    /// Whether `rank` runs on this host.
    fn same_host(&self, rank: u32) -> bool {
        self.cards.same_host(self.rank, rank)
    }

    /// False once `rank` is known to have failed, or its process on this host is gone.
    fn alive(&self, rank: u32) -> bool {
        let r = rank as usize;
        if self.dead[r].load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        !(self.same_host(rank) && self.cards.process_gone(rank))
    }
}

/// Opens the endpoint of one transport, with `flows` - 1 further flows in its domain.
fn open_port(
    transport: Transport,
    info: &Info,
    config: &Config,
    flows: usize,
    cq_wait: efa_fabric::CqWait,
) -> Result<Port> {
    let provider = info.provider();
    let liveness: Arc<std::sync::OnceLock<PortLiveness>> = Arc::default();
    let check = {
        let l = liveness.clone();
        Arc::new(move |addr: FiAddr| {
            l.get()
                .is_none_or(|pl| pl.rank_of(addr).is_none_or(|rank| pl.liveness.alive(rank)))
        })
    };
    // Posts that find the provider's queue full retry (progressing) for at most the
    // communicator's deadline: a peer that died with our messages queued must not hold a
    // caller past the deadline it was promised.
    let extra = flows.saturating_sub(1);
    let (ep, flows) = (|| {
        let domain = efa_fabric::Domain::open(info)?;
        let av = efa_fabric::AddressVector::open(&domain)?;
        let cq = efa_fabric::CompletionQueue::open_with(&domain, 0, cq_wait)?;
        let open = || {
            Endpoint::builder(&domain, &av, &cq)
                .post_timeout(config.timeout)
                // A post to a rank that died stops retrying at once (its queue never drains).
                .peer_check(check.clone())
                .build()
        };
        // One domain for all flows: memory registered in it is readable through each.
        let ep = open()?;
        let flows = (0..extra)
            .map(|_| open())
            .collect::<efa_fabric::Result<Vec<_>>>()?;
        Ok((ep, flows))
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
        return Err(Error::MaxMsgTooSmall {
            provider: provider.to_string(),
            max_msg_size: max_msg,
            needed: HDR_LEN + 1,
        });
    }
    let mut bounce = Vec::new();
    for _ in 0..8 {
        bounce.push(
            RegisteredBuf::new(ep.domain(), slot_len, Access::LOCAL, Some(&ep))
                .map_err(|e| Error::fabric("registering buffers", None, e))?,
        );
    }
    tracing::debug!(%transport, %provider, fabric = %info.fabric(), domain = %info.domain(), flows = 1 + flows.len(), "endpoint open");
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
        flows,
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

    /// The port of `peer`'s route.
    fn port_of(&self, peer: u32) -> usize {
        usize::from(self.peers.route[peer as usize].0)
    }

    /// The port of `peer`'s route and the peer's address in its address vector, inserting
    /// the address (from the peer's card) on first use, and telling the port's post path
    /// which rank the address is.
    ///
    /// # Errors
    /// Fabric errors of `fi_av_insert`.
    fn resolve(&mut self, peer: u32) -> std::result::Result<(usize, FiAddr), efa_fabric::Error> {
        let (port, endpoint) = self.peers.route[peer as usize];
        let port = usize::from(port);
        let known = self.peers.addr[peer as usize];
        if known != FiAddr::UNSPEC {
            return Ok((port, known));
        }
        // Placement chose the endpoint among the card's, so it exists; an empty address
        // (never) would be refused by the provider as any bad address is.
        let bytes = self
            .cards
            .addr_of(peer, usize::from(endpoint))
            .unwrap_or_default();
        let addr = self.ports[port].ep.av().insert(bytes)?;
        tracing::trace!(rank = self.rank, peer, provider = %self.ports[port].provider, "peer connected on first use");
        self.peers.addr[peer as usize] = addr;
        self.tell_rank_of(port, addr, peer);
        self.connect_flows(peer, port, usize::from(endpoint), addr)?;
        Ok((port, addr))
    }

    /// Tells `port`'s post path that address `addr` is rank `peer`.
    fn tell_rank_of(&self, port: usize, addr: FiAddr, peer: u32) {
        if let Some(pl) = self.ports[port].liveness.get() {
            pl.rank_of
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(addr, peer);
        }
    }

    /// On `peer`'s first use ([`Engine::resolve`]), when its route's endpoint (`port`, the
    /// peer's `endpoint` on its card, already inserted as `addr`) has further flows on both
    /// sides: inserts the peer's further flows' addresses and sets up its scheduler (as
    /// many flows as both sides have, [`Card::flows`]).
    ///
    /// # Errors
    /// Fabric errors of `fi_av_insert` (the peer then stays without further flows: its
    /// reads use flow 0).
    fn connect_flows(
        &mut self,
        peer: u32,
        port: usize,
        endpoint: usize,
        addr: FiAddr,
    ) -> std::result::Result<(), efa_fabric::Error> {
        let mine = 1 + self.ports[port].flows.len();
        if mine < 2 {
            return Ok(());
        }
        let Some(card) = self.cards.card(peer) else {
            return Ok(());
        };
        let n = mine.min(card.flows(endpoint));
        if n < 2 {
            return Ok(());
        }
        let mut addrs = Vec::with_capacity(n);
        addrs.push(addr);
        for e in &card.endpoints[endpoint + 1..endpoint + n] {
            let a = self.ports[port].ep.av().insert(&e.addr)?;
            self.tell_rank_of(port, a, peer);
            addrs.push(a);
        }
        tracing::debug!(rank = self.rank, peer, flows = n, mode = %self.stripe_mode, stripe_min = self.stripe_min, "flows");
        self.flows.insert(
            peer,
            PeerFlows {
                addrs,
                sched: stripe::Striper::new(n, self.stripe_mode),
            },
        );
        Ok(())
    }

    /// Where control and eager messages to `dest` go (resolving it on first use).
    fn carrier(&mut self, dest: u32) -> Result<Carrier> {
        let (port, addr) = self
            .resolve(dest)
            .map_err(|e| Error::fabric("fi_av_insert", Some(dest), e))?;
        Ok(Carrier::Port { port, addr })
    }

    /// The largest eager payload to `peer`: its carrier's.
    fn eager_limit(&self, peer: u32) -> usize {
        self.ports[self.port_of(peer)].eager
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
        if let Some(f) = self.fast.as_mut() {
            if f.try_send(dest, hdr, payload) {
                return Ok(());
            }
        }
        let Carrier::Port { port, addr } = self.carrier(dest)?;
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
        let (port, addr) = self.resolve(dest)?;
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

    /// The error for a post the core refused.
    fn post_error(&self, e: PostError) -> Error {
        match e {
            PostError::Failed => self.failure_error().unwrap_or(Error::Internal {
                what: "the protocol core reports a failure that the engine did not record",
            }),
            PostError::PeerFinalized(rank) => Error::PeerFinalized { rank },
            PostError::TooMany => Error::Internal {
                what: "more than 16 Mi point-to-point requests in flight",
            },
        }
    }

    /// Starts a send of `data` to world rank `dest` on context `ctx`: eager (the data is
    /// copied into the message), or rendezvous (the data is copied into an exposed buffer
    /// that the receiver reads).
    fn start_send(&mut self, data: &[u8], dest: u32, tag: u32, ctx: u32) -> Result<SendId> {
        self.start_send_inner(data, dest, tag, ctx, None)
            .map_err(|e| self.upgrade(e))
    }

    /// [`Engine::start_send`] of data that the caller has exposed itself (`exposed`, the
    /// user's buffer registered for the call): a rendezvous announces it as it is, without
    /// a copy.
    fn start_send_exposed(
        &mut self,
        data: &[u8],
        dest: u32,
        tag: u32,
        ctx: u32,
        exposed: Remote,
    ) -> Result<SendId> {
        self.start_send_inner(data, dest, tag, ctx, Some(exposed))
            .map_err(|e| self.upgrade(e))
    }

    /// Whether a send of `len` bytes to `dest` should expose the user's buffer (zero-copy
    /// RGET): above the eager limit and from the provider's measured threshold on.
    fn zero_copy_send(&self, dest: u32, len: usize) -> Option<Endpoint> {
        if len <= self.eager_limit(dest) || !self.zero_copy(dest, len) {
            return None;
        }
        Some(self.ports[self.port_of(dest)].ep.clone())
    }

    fn start_send_inner(
        &mut self,
        data: &[u8],
        dest: u32,
        tag: u32,
        ctx: u32,
        exposed: Option<Remote>,
    ) -> Result<SendId> {
        self.check_open()?;
        let limit = self.eager_limit(dest);
        let st = self
            .core
            .post_send(dest, ctx, tag, data.len(), limit)
            .map_err(|e| self.post_error(e))?;
        let sent = match st.mode {
            Mode::Eager => self.send_ctrl(dest, &st.header, data),
            Mode::Rendezvous => match exposed {
                Some(remote) => Ok(remote),
                None => self.expose(st.id, dest, data),
            }
            .and_then(|r| self.send_ctrl(dest, &st.header, &wire::rts_payload(r.addr, r.key))),
        };
        if let Err(e) = sent {
            self.core.forget_send(st.id);
            self.unexpose(st.id);
            return Err(e);
        }
        Ok(st.id)
    }

    /// Copies `data` into a registered buffer that `dest` may read, kept for send `id`.
    fn expose(&mut self, id: SendId, dest: u32, data: &[u8]) -> Result<Remote> {
        let port = self.port_of(dest);
        let free = &mut self.exposed_free[port];
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= data.len())
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        let mut buf = match best {
            Some(i) => free.swap_remove(i),
            None => {
                let p = &self.ports[port];
                RegisteredBuf::new(
                    p.ep.domain(),
                    data.len().max(1),
                    Access::REMOTE_READ,
                    Some(&p.ep),
                )
                .map_err(|e| Error::fabric("registering a rendezvous buffer", Some(dest), e))?
            }
        };
        buf[..data.len()].copy_from_slice(data);
        let remote = remote_of(&buf.remote());
        if self.exposed.len() < self.core.send_slots() {
            self.exposed.resize_with(self.core.send_slots(), || None);
        }
        self.exposed[id.index()] = Some(ExposedBuf { port, buf });
        Ok(remote)
    }

    /// Send `id`'s exposed buffer is read by nobody any more: kept for reuse (a few per
    /// endpoint, none above [`BufPool::MAX`]).
    fn unexpose(&mut self, id: SendId) {
        let Some(ExposedBuf { port, buf }) =
            self.exposed.get_mut(id.index()).and_then(Option::take)
        else {
            return;
        };
        let free = &mut self.exposed_free[port];
        if free.len() < EXPOSED_KEEP && buf.len() <= BufPool::MAX {
            free.push(buf);
        }
    }

    /// Starts a receive from world rank `src` (or any) on context `ctx`.
    fn start_recv(
        &mut self,
        src: Source,
        tag: Tag,
        ctx: u32,
        capacity: usize,
        dest: RecvDest,
    ) -> Result<RecvId> {
        self.check_open()?;
        let id = self
            .core
            .post_recv(ctx, src, tag, capacity)
            .map_err(|e| self.post_error(e))?;
        // Before the actions: a queued RTS has just been matched and asks for its read.
        self.recv_slot(id).dest = dest;
        self.drain()?;
        Ok(id)
    }

    /// Starts a receive of a message taken by a matched probe, into at most `capacity`
    /// bytes.
    fn start_recv_matched(
        &mut self,
        msg: proto::Message<Vec<u8>>,
        capacity: usize,
    ) -> Result<RecvId> {
        if let Err(e) = self.check_open() {
            drop(msg);
            return Err(e);
        }
        let id = self
            .core
            .recv_message(msg, capacity)
            .map_err(|e| self.post_error(e));
        if let Ok(id) = id {
            // Its actions are still queued: the read may go into the user's buffer.
            self.recv_slot(id).dest = RecvDest::User;
        }
        self.drain()?;
        id
    }

    /// Puts a matched probe's message back.
    fn requeue(&mut self, msg: proto::Message<Vec<u8>>) {
        self.core.requeue(msg);
        if let Err(e) = self.drain() {
            tracing::debug!("putting a probed message back: {e}");
        }
    }

    /// A buffer for an eager payload (from the free list once warmed up).
    fn take_small(&mut self) -> Vec<u8> {
        match self.small.pop() {
            Some(v) => v,
            None => Vec::with_capacity(self.small_cap),
        }
    }

    /// Takes back a buffer the engine handed out (eager payloads, read targets).
    fn recycle(&mut self, mut v: Vec<u8>) {
        if v.capacity() >= self.small_cap && v.capacity() < BufPool::MIN {
            if self.small.len() < SMALL_KEEP {
                v.clear();
                self.small.push(v);
            }
            return;
        }
        self.pool.put(v);
    }

    fn recv_slot(&mut self, id: RecvId) -> &mut RecvSlot {
        if self.recv_slots.len() <= id.index() {
            let n = self.core.recv_slots().max(id.index() + 1);
            self.recv_slots.resize_with(n, RecvSlot::default);
        }
        &mut self.recv_slots[id.index()]
    }

    /// Whether a rendezvous of `len` bytes from `peer` is read straight into the user's
    /// buffer: from the provider's measured threshold on ([`efa_fabric::rget_threshold`];
    /// below it, reading into an engine buffer and copying is as fast).
    fn zero_copy(&self, peer: u32, len: usize) -> bool {
        let port = self.port_of(peer);
        efa_fabric::rget_threshold(&self.ports[port].provider).is_some_and(|t| len >= t)
    }

    /// Takes receive `id`'s waiting read: the endpoint, the peer's address, the region and
    /// the length to read into the user's buffer. (The peer was resolved when the read was
    /// left for the call, [`Engine::drain`].)
    fn take_wanted(&mut self, id: RecvId) -> Option<WantedInPlace> {
        let w = self.recv_slots.get_mut(id.index())?.wanted.take()?;
        self.wanted.retain(|&r| r != id);
        let region = region_of(w.remote, w.len);
        let parts = self.read_plan(w.peer, w.len);
        Some((w.peer, parts, region, w.len))
    }

    /// How a rendezvous read of `len` bytes from `peer` moves: striped when the peer has
    /// several flows and `len` reaches the stripe threshold (`EFA_IP_STRIPE_MIN`): cut by
    /// [`stripe::chunks`], each chunk on the flow the peer's scheduler chooses (and counted
    /// queued there); otherwise one part on the route's endpoint. The one place that decides.
    fn read_plan(&mut self, peer: u32, len: usize) -> Parts<ReadPart> {
        // Resolved by the caller (the read was asked for after the peer's first use).
        let port = self.port_of(peer);
        let addr = self.peers.addr[peer as usize];
        let p = &self.ports[port];
        match self.flows.get_mut(&peer) {
            Some(f) if len > 0 && len >= self.stripe_min => {
                let now = Instant::now();
                let mut parts = stripe::chunks(len, f.addrs.len(), p.max_msg)
                    .into_iter()
                    .map(|(off, clen)| {
                        let flow = f.sched.assign(clen, now);
                        ReadPart {
                            flow: Some(flow),
                            ep: if flow == 0 {
                                p.ep.clone()
                            } else {
                                p.flows[flow - 1].clone()
                            },
                            addr: f.addrs[flow],
                            off,
                            len: clen,
                        }
                    });
                let first = parts.next().expect("a striped read has chunks");
                Parts {
                    first,
                    rest: parts.collect(),
                }
            }
            _ => Parts::one(ReadPart {
                flow: None,
                ep: p.ep.clone(),
                addr,
                off: 0,
                len,
            }),
        }
    }

    /// A part of a read from `peer` on `flow` completed at `at` (or failed: counted the
    /// same, the read fails anyway): tells the peer's scheduler.
    fn read_part_done(&mut self, peer: u32, flow: Option<usize>, len: usize, at: Instant) {
        if let (Some(flow), Some(f)) = (flow, self.flows.get_mut(&peer)) {
            f.sched.completed(flow, len, at);
        }
    }

    /// A part of a read from `peer` on `flow` will not complete (never posted, abandoned).
    fn read_part_dropped(&mut self, peer: u32, flow: Option<usize>, len: usize) {
        if let (Some(flow), Some(f)) = (flow, self.flows.get_mut(&peer)) {
            f.sched.dropped(flow, len);
        }
    }

    /// Receive `id`'s data was read into the user's buffer.
    fn read_in_place_done(&mut self, id: RecvId) {
        self.core.read_done(id);
        if self.core.recv_live(id) {
            self.recv_slot(id).in_place = true;
        }
    }

    /// Whether receive `id`'s data is already in the user's buffer.
    fn in_place(&self, id: RecvId) -> bool {
        self.recv_slots.get(id.index()).is_some_and(|s| s.in_place)
    }

    /// A call holding receive `id`'s buffer waits for it now: its read is left for that
    /// call ([`Engine::take_wanted`]), not read into an engine buffer.
    fn own(&mut self, id: RecvId) {
        if !self.owners.contains(&id) {
            self.owners.push(id);
        }
    }

    /// Receive `id`'s wait has ended: its read, if one comes, is no longer left for it.
    fn disown(&mut self, id: RecvId) {
        if let Some(i) = self.owners.iter().position(|&r| r == id) {
            self.owners.swap_remove(i);
        }
    }

    /// Carries out the core's actions. Every action is carried out; the first error is
    /// returned.
    fn drain(&mut self) -> Result<()> {
        let mut first = None;
        while let Some(a) = self.core.poll_action() {
            let r = match a {
                Action::Send { peer, header } => {
                    // Finalize's messages are tracked sends (an inject may still sit in a
                    // provider's queue when the endpoint closes).
                    let inject = !matches!(header.kind, Kind::Fin | Kind::FinAck);
                    self.send_ctrl_with(peer, &header, &[], inject)
                }
                Action::Deliver {
                    recv,
                    mut payload,
                    len,
                } => {
                    payload.truncate(len);
                    let old = std::mem::replace(&mut self.recv_slot(recv).data, payload);
                    if old.capacity() > 0 {
                        self.recycle(old);
                    }
                    Ok(())
                }
                Action::Release(p) => {
                    self.recycle(p);
                    Ok(())
                }
                Action::Read {
                    recv,
                    peer,
                    remote,
                    len,
                } => {
                    if self.recv_slot(recv).dest == RecvDest::User && self.zero_copy(peer, len) {
                        // Read later, by the call that holds the user's buffer; the peer's
                        // address is inserted now, on first use.
                        match self.resolve(peer) {
                            Ok(_) => {
                                self.recv_slot(recv).wanted =
                                    Some(WantedRead { peer, remote, len });
                                self.wanted.push(recv);
                            }
                            Err(e) => self.read_failed(recv, peer, e),
                        }
                    } else {
                        self.start_read(recv, peer, remote, len);
                    }
                    Ok(())
                }
                Action::Unexpose(id) => {
                    self.unexpose(id);
                    Ok(())
                }
                Action::AbandonRead(recv) => {
                    if let Some(i) = self.reads.iter().position(|r| r.recv == recv) {
                        let op = self.reads.swap_remove(i);
                        for &(flow, len, reported) in &op.flows {
                            if !reported {
                                self.read_part_dropped(op.peer, flow, len);
                            }
                        }
                        op.chunks.into_iter().for_each(Pending::abandon);
                    }
                    Ok(())
                }
            };
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Posts the RGET read of `len` bytes of `peer`'s exposed buffer into an engine buffer
    /// for receive `recv` (in chunks of at most the provider's `max_msg_size`).
    fn start_read(&mut self, recv: RecvId, peer: u32, remote: Remote, len: usize) {
        if len == 0 {
            self.core.read_done(recv);
            return;
        }
        let port = match self.resolve(peer) {
            Ok((port, _)) => port,
            Err(e) => {
                self.read_failed(recv, peer, e);
                return;
            }
        };
        let region = region_of(remote, len);
        let max = self.ports[port].max_msg;
        let mut chunks = Vec::new();
        let mut flows = Vec::new();
        let parts = self.read_plan(peer, len);
        for (i, part) in parts.iter().enumerate() {
            for (off, clen) in wire::chunks(part.len, max) {
                let off = part.off + off;
                let buf = BufPrefix::new(self.pool.take_zeroed(clen), clen);
                match part.ep.read(buf, part.addr, &region, off as u64) {
                    Ok(p) => {
                        chunks.push(p);
                        flows.push((part.flow, clen, false));
                    }
                    Err(e) => {
                        chunks.into_iter().for_each(Pending::abandon);
                        for &(flow, clen, _) in &flows {
                            self.read_part_dropped(peer, flow, clen);
                        }
                        // This part's unposted rest and the parts after it.
                        self.read_part_dropped(peer, part.flow, part.off + part.len - off);
                        for later in parts.iter().skip(i + 1) {
                            self.read_part_dropped(peer, later.flow, later.len);
                        }
                        self.read_failed(recv, peer, e.error);
                        return;
                    }
                }
            }
        }
        self.reads.push(ReadOp {
            recv,
            peer,
            len,
            chunks,
            flows,
        });
    }

    /// A read failed: the receive fails with the transport's error (or the peer's failure).
    fn read_failed(&mut self, recv: RecvId, peer: u32, source: efa_fabric::Error) {
        self.core.read_failed(recv);
        let err = self
            .transport_failure(peer, source)
            .unwrap_or_else(|source| Error::fabric("read", Some(peer), source));
        if self.core.recv_live(recv) {
            self.recv_slot(recv).error = Some(err);
        }
    }

    /// Receive `id`'s read of `len` bytes into its `capacity`-byte buffer was not posted
    /// (see [`in_place_target`]): the receive fails with [`Error::Internal`], and its
    /// sender is told the read failed. The peer is not to blame, so it is not marked failed.
    fn read_not_posted(&mut self, id: RecvId, capacity: usize, len: usize) {
        tracing::error!("receive {id:?}: a {len}-byte read for a {capacity}-byte buffer");
        self.core.read_failed(id);
        if self.core.recv_live(id) {
            self.recv_slot(id).error = Some(Error::Internal {
                what: "a rendezvous read is longer than its receive buffer",
            });
        }
    }

    /// Finishes the reads whose chunks have all completed.
    fn reap_reads(&mut self) {
        let mut i = 0;
        let now = Instant::now();
        while i < self.reads.len() {
            let op = &mut self.reads[i];
            let peer = op.peer;
            let mut newly = Vec::new();
            for (c, f) in op.chunks.iter().zip(op.flows.iter_mut()) {
                if !f.2 && c.is_done() {
                    f.2 = true;
                    newly.push((f.0, f.1));
                }
            }
            let all = op.flows.iter().all(|f| f.2);
            for (flow, len) in newly {
                self.read_part_done(peer, flow, len, now);
            }
            if !all {
                i += 1;
                continue;
            }
            let op = self.reads.swap_remove(i);
            let single = op.chunks.len() == 1;
            let mut data = if single {
                Vec::new()
            } else {
                self.pool.take_empty(op.len)
            };
            let mut err = None;
            for c in op.chunks {
                match c.wait(Duration::ZERO) {
                    Ok(d) if single => {
                        data = d.buf.into_inner();
                        data.truncate(op.len);
                    }
                    Ok(d) => {
                        let v = d.buf.into_inner();
                        data.extend_from_slice(&v[..d.len]);
                        self.pool.put(v);
                    }
                    Err(e) => {
                        err.get_or_insert(e.error);
                    }
                }
            }
            match err {
                None => {
                    self.core.read_done(op.recv);
                    if self.core.recv_live(op.recv) {
                        let old = std::mem::replace(&mut self.recv_slot(op.recv).data, data);
                        self.recycle(old);
                    } else {
                        // Its request was dropped: the data is discarded.
                        self.recycle(data);
                    }
                }
                Some(e) => {
                    self.recycle(data);
                    self.read_failed(op.recv, op.peer, e);
                }
            }
        }
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
        // The core fails every pending operation; reads are abandoned without waiting
        // (`Pending::abandon`): a dead peer's may never complete.
        self.core.peer_failed();
        if let Err(e) = self.drain() {
            tracing::debug!("after a failure: {e}");
        }
        let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.background)
            .into_iter()
            .partition(|b| b.dest == rank);
        self.background = kept;
        lost.into_iter().for_each(|b| b.op.abandon());
        if tell {
            let (code, num, text) = match &cause {
                PeerFailure::Exited { pid, host } => (
                    FailCode::Exited,
                    u64::from(pid.unwrap_or(0)),
                    host.clone().unwrap_or_default(),
                ),
                PeerFailure::Unreachable { detail, .. } => {
                    (FailCode::Unreachable, 0, detail.clone())
                }
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
            for p in 0..self.cards.len() as u32 {
                if p == self.rank || p == rank || self.core.peer_acked_fin(p) {
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
                source: None,
            },
        };
        let rank = if (h.tag as usize) < self.cards.len() {
            h.tag
        } else {
            h.src
        };
        self.mark_failed(rank, cause, false);
    }

    /// Looks at the processes of same-host peers that have not finalized: one that is gone
    /// (or whose pid now belongs to another process) has failed.
    fn check_peers(&mut self) {
        for p in 0..self.cards.len() as u32 {
            if p == self.rank
                || !self.live.same_host(p)
                || self.cards.pid(p) == 0
                || self.core.peer_finalized(p)
            {
                continue;
            }
            if self.cards.process_gone(p) {
                let cause = exited(&self.cards.process(p).unwrap_or_default());
                self.mark_failed(p, cause, true);
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
        // All peers on this host (their processes are looked at instead): nothing to probe,
        // and nothing to allocate every PING_INTERVAL.
        if (0..self.cards.len() as u32).all(|p| self.live.same_host(p)) {
            return;
        }
        let mut want = vec![false; self.cards.len()];
        let mut bulk = vec![false; want.len()];
        let mut any = false;
        self.core.for_each_awaited(|peer, moving| match peer {
            Some(p) => {
                want[p as usize] = true;
                bulk[p as usize] |= moving;
            }
            None => any = true,
        });
        for (p, wanted) in want.into_iter().enumerate() {
            let remote = !self.live.same_host(p as u32);
            if p as u32 == self.rank
                || !remote
                || self.core.peer_finalized(p as u32)
                || !(any || wanted)
            {
                continue;
            }
            // While rendezvous data moves to or from the peer, a full queue is congestion (a
            // large transfer fills it for seconds), not a dead peer: not judged then.
            if bulk[p] {
                self.refused_since.remove(&(p as u32));
            }
            let mut source = None;
            let detail = match self.probe(p as u32) {
                Ok(true) => {
                    self.refused_since.remove(&(p as u32));
                    continue;
                }
                Ok(false) => {
                    let since = *self
                        .refused_since
                        .entry(p as u32)
                        .or_insert_with(Instant::now);
                    if since.elapsed() < PROBE_REFUSED_LIMIT {
                        continue;
                    }
                    format!(
                        "the transport has refused every message to it for {:?} (its process \
                         or host is gone, or its network is cut)",
                        since.elapsed()
                    )
                }
                Err(e) => {
                    let detail = e.to_string();
                    source = Some(Arc::new(e));
                    detail
                }
            };
            self.mark_failed(p as u32, PeerFailure::Unreachable { detail, source }, true);
            return;
        }
    }

    /// A same-host peer whose process is stopped (SIGSTOP, a debugger): rank and pid.
    fn stopped_peer(&self) -> Option<(u32, u32)> {
        (0..self.cards.len() as u32)
            .filter(|&p| p != self.rank && self.live.same_host(p))
            .find_map(|p| Some((p, self.cards.process_stopped(p)?)))
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

    /// A send to some peer that has not completed locally (a rendezvous waiting for its
    /// receiver, or a background bounce-buffer send), if any.
    fn unfinished_send(&self) -> Option<u32> {
        self.core
            .unfinished_send()
            .or_else(|| self.background.first().map(|b| b.dest))
    }

    /// Finalize's first step: a `Fin` to every peer (once).
    fn send_fins(&mut self) -> Result<()> {
        self.core.send_fins();
        self.drain()
    }

    /// One step of the finalize handshake ([`Core::finalize_step`]). Returns the first
    /// peer it still waits for, or `None` when it is complete and every handshake message
    /// has completed locally.
    fn finalize_step(&mut self) -> Result<Option<u32>> {
        let waiting = self.core.finalize_step();
        self.drain()?;
        Ok(waiting.or_else(|| self.background.first().map(|b| b.dest)))
    }

    /// Forgets receive `id`, whose request is gone (dropped, or its wait failed): see
    /// [`Core::drop_recv`]. A rendezvous read under way goes on into the engine's own
    /// buffer (never the user's), so that the sender completes; its data is discarded.
    fn cancel_recv(&mut self, id: RecvId) {
        self.core.drop_recv(id);
        if self
            .recv_slots
            .get_mut(id.index())
            .and_then(|s| s.wanted.take())
            .is_some()
        {
            self.wanted.retain(|&r| r != id);
            // Nobody will read into the dropped buffer: the message is consumed and lost,
            // and the sender is answered at once.
            self.core.read_done(id);
            if let Err(e) = self.drain() {
                tracing::debug!("answering a dropped receive's sender: {e}");
            }
        }
        if !self.core.recv_live(id) {
            if let Some(s) = self.recv_slots.get_mut(id.index()) {
                let d = std::mem::take(&mut s.data);
                s.error = None;
                s.in_place = false;
                s.dest = RecvDest::Engine;
                if d.capacity() > 0 {
                    self.recycle(d);
                }
            }
        }
    }

    /// The outcome of finished send `id` (forgotten afterwards).
    fn take_send(&mut self, id: SendId) -> Result<()> {
        match self.core.take_send(id) {
            Some(Outcome::Sent) | None => Ok(()),
            Some(Outcome::TransferFailed(p)) => {
                Err(self.failure_error().unwrap_or_else(|| Error::PeerFailed {
                    rank: p,
                    cause: PeerFailure::Unreachable {
                        detail: "its read of the rendezvous data failed".into(),
                        source: None,
                    },
                }))
            }
            Some(_) => Err(self.failure_error().unwrap_or(Error::Internal {
                what: "a send failed but no failure is recorded",
            })),
        }
    }

    /// The outcome of finished receive `id` (forgotten afterwards): its status (world
    /// ranks) and the engine buffer holding its data.
    fn take_recv(&mut self, id: RecvId) -> Result<(Status, Vec<u8>)> {
        let out = self.core.take_recv(id).ok_or(Error::Internal {
            what: "a finished receive is no longer in the engine",
        })?;
        let slot = self.recv_slot(id);
        let data = std::mem::take(&mut slot.data);
        let error = slot.error.take();
        if slot.wanted.take().is_some() {
            self.wanted.retain(|&r| r != id);
        }
        let slot = self.recv_slot(id);
        slot.in_place = false;
        slot.dest = RecvDest::Engine;
        let res = match out {
            Outcome::Received(st) => return Ok((st, data)),
            Outcome::Truncated {
                capacity,
                len,
                src,
                tag,
            } => Error::Truncated {
                expected: capacity,
                got: len,
                peer: src,
                tag,
            },
            Outcome::Cancelled => Error::Cancelled,
            Outcome::PeerFinalized(rank) => Error::PeerFinalized { rank },
            Outcome::TransferFailed(_) | Outcome::PeerFailed | Outcome::Sent => error
                .or_else(|| self.failure_error())
                .unwrap_or(Error::Internal {
                    what: "a receive failed but no failure is recorded",
                }),
        };
        if data.capacity() > 0 {
            self.recycle(data);
        }
        Err(res)
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
                let cause = PeerFailure::Unreachable {
                    detail,
                    source: None,
                };
                self.mark_failed(p, cause, true);
            }
        }
        self.failure_error().unwrap_or(e)
    }

    /// Reads the waiting reads of receives whose owner is not waiting now into engine
    /// buffers (copy path), so that their senders are answered.
    fn release_wanted(&mut self) {
        let mut i = 0;
        while i < self.wanted.len() {
            let id = self.wanted[i];
            if self.owners.contains(&id) {
                i += 1;
                continue;
            }
            self.wanted.swap_remove(i);
            if let Some(w) = self
                .recv_slots
                .get_mut(id.index())
                .and_then(|s| s.wanted.take())
            {
                self.start_read(id, w.peer, w.remote, w.len);
            }
        }
    }

    fn progress_round(&mut self) -> Result<()> {
        self.release_wanted();
        let polled = self.poll_carriers();
        // The liveness look comes after the carriers were read: a peer's report of a
        // failure that has already arrived ([`Kind::Failed`]) is handled before this rank
        // finds processes gone on its own. Otherwise a survivor that looks while both the
        // failed rank and the rank that reported it have exited may name the reporter.
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
        polled
    }

    /// Reads every carrier (fast-box rings, then each used endpoint's CQs) and handles what
    /// arrived or completed.
    fn poll_carriers(&mut self) -> Result<()> {
        let mut any = false;
        // Messages are handled straight from the rings. The carrier is out of the engine
        // meanwhile, so the actions they cause (which may send through it) run after.
        if let Some(mut fast) = self.fast.take() {
            let mut n = 0u64;
            let polled = fast.poll(|msg| {
                n += 1;
                self.take_control(msg);
            });
            self.fast = Some(fast);
            if polled {
                any = true;
                // A ring message is progress as a completion is: waits that count events
                // (the wait policy's idle count) must not sleep while rings deliver.
                self.events += n;
                self.drain()?;
            }
        }
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
            self.reap_reads();
            // Reads that finished queued their ACKs.
            self.drain()?;
        }
        Ok(())
    }

    fn reap_slots(&mut self, port: usize) -> Result<()> {
        // Every buffer is posted again even when handling a message failed.
        let mut first = None;
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
                    if let Err(e) = self.on_control(&done.buf[..done.len]) {
                        first.get_or_insert(e);
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
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A control or eager message (header and payload) arrived, by any carrier.
    fn on_control(&mut self, msg: &[u8]) -> Result<()> {
        self.take_control(msg);
        self.drain()
    }

    /// [`Engine::on_control`] without carrying out the actions it causes ([`Engine::drain`]
    /// does): it sends nothing, so it may run while a carrier is being read.
    fn take_control(&mut self, msg: &[u8]) {
        let h = match Header::decode(msg, msg.len()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("dropping malformed control message: {e}");
                return;
            }
        };
        if h.src as usize >= self.cards.len() {
            tracing::warn!(src = h.src, "control message from an unknown rank");
            return;
        }
        let payload = &msg[HDR_LEN..];
        let body = match h.kind {
            Kind::Failed => {
                self.on_failed(&h, payload);
                return;
            }
            Kind::Ping => return,
            Kind::Eager => {
                let mut v = self.take_small();
                v.clear();
                v.extend_from_slice(payload);
                Body::Eager(v)
            }
            Kind::Rts => {
                let Some((addr, key)) = wire::parse_rts(payload) else {
                    tracing::warn!(
                        src = h.src,
                        len = payload.len(),
                        "dropping an RTS without its buffer's address and key"
                    );
                    return;
                };
                Body::Rts(Remote { addr, key })
            }
            Kind::Ack | Kind::Credit | Kind::Fin | Kind::FinAck => Body::Empty,
        };
        if let Err(e) = self.core.on_message(h, body) {
            tracing::warn!(src = h.src, "dropping a control message: {e:?}");
        }
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
                    let _ = self.transport_failure(bg.dest, e.error);
                    if let Some(b) = e.buf {
                        self.ports[bg.port].bounce.push(b.into_inner());
                    }
                }
            }
        }
    }

    /// A transfer with `peer` failed in the transport (`source`): unless `peer` finalized,
    /// it has failed (exited, if its pid is gone on this host; else unreachable, keeping
    /// `source`), and every rank is told. Returns the error for the operation that saw it:
    /// the peer's failure, or (`Err`) `source` back when the peer has not failed (it
    /// finalized, or is this rank).
    fn transport_failure(
        &mut self,
        peer: u32,
        source: efa_fabric::Error,
    ) -> std::result::Result<Error, efa_fabric::Error> {
        if peer == self.rank || self.core.peer_finalized(peer) {
            return Err(source);
        }
        let cause = if self.live.same_host(peer) && self.cards.process_gone(peer) {
            exited(&self.cards.process(peer).unwrap_or_default())
        } else {
            PeerFailure::Unreachable {
                detail: source.to_string(),
                source: Some(Arc::new(source)),
            }
        };
        self.mark_failed(peer, cause, true);
        Ok(self.failure_error().unwrap_or(Error::Internal {
            what: "a peer was marked failed but no failure is recorded",
        }))
    }
}

/// The (address, key) an RTS announces for an exposed region (the protocol core knows
/// no libfabric types).
fn remote_of(r: &efa_fabric::RemoteRegion) -> Remote {
    Remote {
        addr: r.addr,
        key: r.key,
    }
}

/// The region of `len` bytes that an RTS's (address, key) names, for `fi_read`.
fn region_of(r: Remote, len: usize) -> efa_fabric::RemoteRegion {
    efa_fabric::RemoteRegion {
        addr: r.addr,
        key: r.key,
        len: len as u64,
    }
}

/// How a same-host peer whose process is gone failed.
fn exited(p: &placement::ProcessId) -> PeerFailure {
    PeerFailure::Exited {
        pid: Some(p.pid),
        host: (!p.host.is_empty()).then(|| p.host.clone()),
    }
}

// ---- Sub-communicators (`MPI_Comm_dup`, `MPI_Comm_split`). ----

/// This process's context ids (see [`Communicator::split`]): every id below `next` has
/// been proposed, claimed or skipped and is never proposed again; `reserved` holds the
/// proposals of the creations in progress, by creation.
#[derive(Debug, Default)]
struct CtxAllocator {
    next: u32,
    reserved: BTreeMap<u32, u64>,
    /// Creations in progress: (parent context id, creation number).
    running: std::collections::BTreeSet<(u32, u64)>,
    serial: u64,
}

/// One communicator creation's dealings with its process's [`CtxAllocator`]; dropping it
/// gives back what it reserved.
struct CtxCreation<'a> {
    alloc: &'a Mutex<CtxAllocator>,
    parent: u32,
    id: u64,
    proposal: Option<u32>,
}

impl<'a> CtxCreation<'a> {
    fn begin(alloc: &'a Mutex<CtxAllocator>, parent: u32) -> CtxCreation<'a> {
        let mut a = alloc.lock().unwrap_or_else(|p| p.into_inner());
        a.serial += 1;
        let id = a.serial;
        a.running.insert((parent, id));
        CtxCreation {
            alloc,
            parent,
            id,
            proposal: None,
        }
    }

    fn lock(&self) -> MutexGuard<'a, CtxAllocator> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves the smallest id never proposed in this process ([`CREATE_CTX_BIT`] when
    /// none is left).
    fn propose(&mut self) -> u32 {
        let mut a = self.lock();
        let p = a.next.max(WORLD_CTX + 1);
        if p >= CREATE_CTX_BIT {
            return CREATE_CTX_BIT;
        }
        a.next = p + 1;
        a.reserved.insert(p, self.id);
        self.proposal = Some(p);
        p
    }

    /// Takes `candidate` for this creation if no other creation of this process can have
    /// it: it was never proposed here, or it is this creation's own proposal. Afterwards
    /// nothing in this process proposes or claims an id up to `candidate` any more.
    fn claim(&mut self, candidate: u32) -> bool {
        let mut a = self.lock();
        let ok = candidate >= a.next || a.reserved.get(&candidate) == Some(&self.id);
        a.next = a.next.max(candidate + 1);
        ok
    }

    /// Gives back this round's proposal before another round.
    fn retry(&mut self) {
        if let Some(p) = self.proposal.take() {
            self.lock().reserved.remove(&p);
        }
    }

    /// Waits before another round, longer the more creations of lower parent context run
    /// in this process, so that concurrent creations stop meeting in lockstep: every
    /// process orders them alike.
    fn stand_back(&self, attempt: u32) {
        let ahead = self.lock().running.range(..(self.parent, self.id)).count() as u32;
        let unit = Duration::from_micros(200 * u64::from(attempt.min(10)));
        std::thread::sleep(unit * ahead);
        std::thread::yield_now();
    }
}

impl Drop for CtxCreation<'_> {
    fn drop(&mut self) {
        self.retry();
        let (parent, id) = (self.parent, self.id);
        self.lock().running.remove(&(parent, id));
    }
}

/// Bytes each rank contributes to [`Communicator::split`]'s exchange: whether it has a
/// color, the color, the key, its proposed context id.
const SPLIT_MSG: usize = 13;

impl Communicator {
    /// A new communicator with the same ranks in the same order and a context of its own
    /// (`MPI_Comm_dup`, MPI 4.0 §7.4.2): messages, probes and collectives on it never match
    /// those of this communicator, even with equal tags or wildcards. Collective: every rank
    /// of this communicator calls it, in the same order relative to its other collective
    /// calls. Dropping the result (or [`Communicator::finalize`] on it) does not finalize
    /// this communicator.
    ///
    /// # Errors
    /// As [`Communicator::split`].
    pub fn dup(&self) -> Result<Communicator> {
        let c = self.split(Some(0), self.rank() as i32)?;
        c.ok_or(Error::Internal {
            what: "dup: every rank gave a color, yet this rank got no communicator",
        })
    }

    /// Splits this communicator by `color` (`MPI_Comm_split`, MPI 4.0 §7.4.2): the ranks
    /// that pass the same `Some(color)` form a new communicator, ordered by `key` and then
    /// by their rank here; a rank that passes `None` (`MPI_UNDEFINED`) gets `Ok(None)`.
    /// Collective over this communicator, like [`Communicator::dup`].
    ///
    /// The new communicator's context id is agreed without a central allocator, in two
    /// exchanges among the ranks of this communicator:
    /// 1. every rank reserves, in its process, the smallest id never proposed there, and
    ///    sends it with its color and key; the largest proposal is the candidate;
    /// 2. every rank claims the candidate in its process, which succeeds unless another
    ///    communicator creation of that process (another thread) proposed or claimed it
    ///    meanwhile, and sends whether it did; if every rank did, the candidate is the id.
    ///
    /// Otherwise every rank tries again with ids above the candidate (creations running at
    /// once in a process step back in the order of their parent's context id, so one of
    /// them goes first), until the deadline. So communicators created from several threads
    /// of a process at once (each from a different parent: two creations on the same
    /// parent at once are erroneous, as in MPI) never share a context in any process, and
    /// ids are never reused. The communicators of one split share an id (they have no rank
    /// in common). Cost: two all-to-all exchanges of a few bytes (the second, one byte, is
    /// what makes concurrent creation safe), plus one pair per retry under contention.
    ///
    /// # Errors
    /// [`Error::Timeout`] when a rank does not take part within the deadline, or when the
    /// ranks kept failing to claim a common id for the whole deadline;
    /// [`Error::MalformedMessage`] when a rank sends a malformed contribution (another efa-rs
    /// version); [`Error::ContextsExhausted`] (on every rank) after 2^31 context ids were
    /// used in some member process; [`Error::PeerFailed`], [`Error::Finalized`].
    pub fn split(&self, color: Option<u32>, key: i32) -> Result<Option<Communicator>> {
        let me = self.rank();
        let xctx = self.group.ctx | CREATE_CTX_BIT;
        let parent = self.group.ctx;
        let start = Instant::now();
        let mut creation = CtxCreation::begin(&self.inner.ctx_alloc, parent);
        let mut attempt = 0u32;
        let (ctx, all) = loop {
            attempt += 1;
            // Round 1: (color, key, proposal); the largest proposal is the candidate.
            let proposal = creation.propose();
            let mut mine = [0u8; SPLIT_MSG];
            mine[0] = u8::from(color.is_some());
            mine[1..5].copy_from_slice(&color.unwrap_or(0).to_le_bytes());
            mine[5..9].copy_from_slice(&key.to_le_bytes());
            mine[9..13].copy_from_slice(&proposal.to_le_bytes());
            let all = self.exchange_fixed(&mine, 0, xctx, "split")?;
            let mut candidate = 0;
            for (p, m) in all.iter().enumerate() {
                let prop = u32::from_le_bytes(m[9..13].try_into().expect("4 bytes"));
                if prop > CREATE_CTX_BIT || m[0] > 1 {
                    return Err(Error::MalformedMessage {
                        peer: self.world_of(p as u32),
                        what: Malformed::SplitFields,
                        source: None,
                    });
                }
                candidate = candidate.max(prop);
            }
            if candidate >= CREATE_CTX_BIT {
                // Some rank has no id left: every rank sees it and fails alike.
                return Err(Error::ContextsExhausted {
                    limit: CREATE_CTX_BIT,
                });
            }
            // Round 2: every rank claims the candidate in its process; all must succeed.
            let claimed = creation.claim(candidate);
            let votes = self.exchange_fixed(&[u8::from(claimed)], 1, xctx, "split")?;
            if let Some(p) = votes.iter().position(|v| v[0] > 1) {
                return Err(Error::MalformedMessage {
                    peer: self.world_of(p as u32),
                    what: Malformed::SplitFields,
                    source: None,
                });
            }
            if votes.iter().all(|v| v[0] == 1) {
                break (candidate, all);
            }
            // Another communicator of some member process took the candidate meanwhile
            // (several threads creating at once): try again above it.
            creation.retry();
            let waited = start.elapsed();
            if waited >= self.timeout() {
                return Err(self.engine().deadline_passed(
                    "split: agreeing on a context id (other threads keep creating communicators)",
                    None,
                    waited,
                ));
            }
            creation.stand_back(attempt);
        };
        drop(creation);
        if color.is_none() {
            return Ok(None);
        }
        let mut members = Vec::new();
        for (p, m) in all.iter().enumerate() {
            let u32_at = |i: usize| u32::from_le_bytes(m[i..i + 4].try_into().expect("4 bytes"));
            if m[0] == 1 && Some(u32_at(1)) == color {
                members.push((u32_at(5) as i32, p as u32));
            }
        }
        members.sort_unstable();
        let rank = members
            .iter()
            .position(|&(_, p)| p == me)
            .expect("this rank is a member of its color") as u32;
        let world_of = members.iter().map(|&(_, p)| self.world_of(p)).collect();
        tracing::debug!(
            parent = self.group.ctx,
            ctx,
            rank,
            size = members.len(),
            "communicator created"
        );
        Ok(Some(Communicator {
            inner: self.inner.clone(),
            group: Arc::new(Group::new(ctx, rank, world_of, self.inner.size)),
        }))
    }

    /// Sends `mine` to every other rank of this communicator on context `xctx` with `tag`
    /// and receives theirs, each exactly `mine.len()` bytes; returns every rank's, by rank.
    fn exchange_fixed(
        &self,
        mine: &[u8],
        tag: u32,
        xctx: u32,
        op: &'static str,
    ) -> Result<Vec<Vec<u8>>> {
        let (n, me) = (self.size(), self.rank());
        let mut all = vec![vec![0u8; mine.len()]; n as usize];
        all[me as usize].copy_from_slice(mine);
        let mut recvs = Vec::new();
        for (p, b) in all.iter_mut().enumerate() {
            if p as u32 != me {
                recvs.push(self.irecv_ctx(b, Source::Rank(p as u32), Tag::Is(tag), xctx, 1)?);
            }
        }
        let mut sends = Vec::new();
        for p in (0..n).filter(|&p| p != me) {
            sends.push(self.isend_copied(mine, p, tag, xctx)?);
        }
        let mut reqs: Vec<&mut dyn AnyRequest> = Vec::new();
        reqs.extend(recvs.iter_mut().map(|r| r as &mut dyn AnyRequest));
        reqs.extend(sends.iter_mut().map(|s| s as &mut dyn AnyRequest));
        self.wait_requests(op, &mut reqs, |done, all| done == all)?;
        for r in recvs {
            let st = r.wait()?;
            if st.len != mine.len() {
                return Err(Error::MalformedMessage {
                    peer: self.world_of(st.source),
                    what: Malformed::SplitLength {
                        len: u32::try_from(st.len).unwrap_or(u32::MAX),
                    },
                    source: None,
                });
            }
        }
        for s in sends {
            s.wait()?;
        }
        Ok(all)
    }

    /// This communicator's context id (0 for the world): what the wire header's `ctx`
    /// carries, so that its messages match only its own receives.
    pub fn context_id(&self) -> u32 {
        self.group.ctx
    }
}

// ---- Combined send-receive (MPI 4.0 §3.10). ----

impl Communicator {
    /// Sends `send` to `dest` with `send_tag` and receives into `recv` from `src` with
    /// `recv_tag`, both at once (`MPI_Sendrecv`, MPI 4.0 §3.10): a ring shift or pairwise
    /// exchange written this way cannot deadlock. Returns the receive's status; both
    /// operations share one deadline.
    ///
    /// # Errors
    /// As [`Communicator::send`] and [`Communicator::recv`]; the receive's error first.
    pub fn sendrecv<S: Pod, R: Pod>(
        &self,
        send: &[S],
        dest: u32,
        send_tag: u32,
        recv: &mut [R],
        src: impl Into<Source>,
        recv_tag: impl Into<Tag>,
    ) -> Result<Status> {
        let mut r = self.irecv(recv, src, recv_tag)?;
        let mut s = self.isend(send, dest, send_tag)?;
        self.wait_requests("sendrecv", &mut [&mut r, &mut s], |done, all| done == all)?;
        let st = r.wait();
        let sent = s.wait();
        let st = st?;
        sent?;
        Ok(st)
    }

    /// [`Communicator::sendrecv`] with one buffer (`MPI_Sendrecv_replace`): sends `buf`'s
    /// contents to `dest`, then receives into `buf` from `src` (at most `buf.len()`
    /// elements; the status says how many arrived). The outgoing data is copied first, so
    /// this costs one copy of `buf` more than `sendrecv`.
    ///
    /// # Errors
    /// As [`Communicator::sendrecv`].
    pub fn sendrecv_replace<T: Pod>(
        &self,
        buf: &mut [T],
        dest: u32,
        send_tag: u32,
        src: impl Into<Source>,
        recv_tag: impl Into<Tag>,
    ) -> Result<Status> {
        // The data is copied (eager into a bounce buffer, rendezvous into memory the engine
        // owns), so `buf` is free for the receive at once.
        let mut s = self.ibsend(&*buf, dest, send_tag)?;
        let mut r = self.irecv(buf, src, recv_tag)?;
        self.wait_requests("sendrecv_replace", &mut [&mut r, &mut s], |done, all| {
            done == all
        })?;
        let st = r.wait();
        let sent = s.wait();
        let st = st?;
        sent?;
        Ok(st)
    }
}

// ---- Probes (MPI 4.0 §3.8). ----

impl Communicator {
    /// Whether a message from `src` with `tag` (wildcards allowed) has arrived, without
    /// receiving it (`MPI_Iprobe`, MPI 4.0 §3.8.1): its [`Status`] (source, tag, length in
    /// bytes; [`Status::count`] in elements) if so, else `None`. Progresses once. A receive
    /// with the same source and tag posted next gets this message, unless a receive posted
    /// earlier, or another thread, takes it first; [`Communicator::improbe`] has no such race.
    ///
    /// # Errors
    /// [`Error::InvalidRank`], [`Error::ReservedTag`]; [`Error::PeerFailed`], [`Error::Finalized`]; fabric errors.
    pub fn iprobe(&self, src: impl Into<Source>, tag: impl Into<Tag>) -> Result<Option<Status>> {
        self.probe_once(src.into(), tag.into(), |e, ctx, wsrc, tag| {
            e.core.probe(ctx, wsrc, tag).map(|st| self.local_status(st))
        })
    }

    /// Waits until a message from `src` with `tag` (wildcards allowed) has arrived and
    /// returns its [`Status`] without receiving it (`MPI_Probe`, MPI 4.0 §3.8.1): size a
    /// buffer from `status.count::<T>()`, then receive from `status.source` with
    /// `status.tag`. Same race as [`Communicator::iprobe`].
    ///
    /// # Errors
    /// [`Error::Timeout`] when nothing arrives within the deadline; [`Error::PeerFinalized`]
    /// when `src` finalized without sending such a message; as [`Communicator::iprobe`].
    pub fn probe(&self, src: impl Into<Source>, tag: impl Into<Tag>) -> Result<Status> {
        self.probe_until("probe", src.into(), tag.into(), |e, ctx, wsrc, tag| {
            e.core.probe(ctx, wsrc, tag).map(|st| self.local_status(st))
        })
    }

    /// Matched probe (`MPI_Improbe`, MPI 4.0 §3.8.2): takes the first message from `src`
    /// with `tag` that has arrived out of the queue, if any, and returns it as a
    /// [`Message`]; no other receive or probe can get it any more, so threads that probe
    /// and receive concurrently cannot steal each other's messages. Progresses once.
    ///
    /// # Errors
    /// As [`Communicator::iprobe`].
    pub fn improbe(&self, src: impl Into<Source>, tag: impl Into<Tag>) -> Result<Option<Message>> {
        let msg = self.probe_once(src.into(), tag.into(), |e, ctx, wsrc, tag| {
            e.core.mprobe(ctx, wsrc, tag)
        })?;
        Ok(msg.map(|m| self.message(m)))
    }

    /// Waiting matched probe (`MPI_Mprobe`, MPI 4.0 §3.8.2): [`Communicator::improbe`]
    /// until a message arrives or the deadline passes.
    ///
    /// # Errors
    /// As [`Communicator::probe`].
    pub fn mprobe(&self, src: impl Into<Source>, tag: impl Into<Tag>) -> Result<Message> {
        let msg = self.probe_until("mprobe", src.into(), tag.into(), |e, ctx, wsrc, tag| {
            e.core.mprobe(ctx, wsrc, tag)
        })?;
        Ok(self.message(msg))
    }

    /// The probes' shared part, once (`MPI_Iprobe`/`MPI_Improbe`): checks `src` and `tag`,
    /// progresses once, and looks in this communicator's unexpected queue.
    fn probe_once<R>(
        &self,
        src: Source,
        tag: Tag,
        look: impl FnOnce(&mut Engine, u32, Source, Tag) -> Option<R>,
    ) -> Result<Option<R>> {
        self.check_user_match(src, tag)?;
        let wsrc = self.world_source(src);
        let mut e = self.engine();
        e.check_open()?;
        e.progress()?;
        Ok(look(&mut e, self.group.ctx, wsrc, tag))
    }

    /// The probes' shared part, waiting (`MPI_Probe`/`MPI_Mprobe`): as
    /// [`Communicator::probe_once`] until `look` finds a message or the deadline passes.
    fn probe_until<R>(
        &self,
        op: &'static str,
        src: Source,
        tag: Tag,
        mut look: impl FnMut(&mut Engine, u32, Source, Tag) -> Option<R>,
    ) -> Result<R> {
        self.check_user_match(src, tag)?;
        let wsrc = self.world_source(src);
        let ctx = self.group.ctx;
        self.poll_engine(op, wsrc, |e| Ok(look(e, ctx, wsrc, tag)))
    }

    fn message(&self, msg: proto::Message<Vec<u8>>) -> Message {
        Message {
            comm: self.clone(),
            status: self.local_status(msg.status()),
            msg: Some(msg),
        }
    }

    /// Progresses until `f` returns a value, up to the deadline. A receive-like wait on
    /// `src` fails at once when `src` has finalized (nothing more can arrive from it).
    fn poll_engine<R>(
        &self,
        op: &'static str,
        src: Source,
        mut f: impl FnMut(&mut Engine) -> Result<Option<R>>,
    ) -> Result<R> {
        let start = Instant::now();
        let mut waiter = self.inner.wait.waiter();
        let mut clock = efa_fabric::PollClock::new(self.timeout());
        let peer = match src {
            Source::Rank(r) => Some(r),
            Source::Any => None,
        };
        loop {
            {
                let mut e = self.engine();
                e.check_open()?;
                let before = e.events;
                e.progress()?;
                if let Some(r) = f(&mut e)? {
                    return Ok(r);
                }
                if let Some(p) = peer.filter(|&p| e.core.peer_finalized(p)) {
                    return Err(Error::PeerFinalized { rank: p });
                }
                if e.events != before {
                    waiter.progressed();
                }
            }
            if clock.expired() {
                return Err(self.engine().deadline_passed(op, peer, start.elapsed()));
            }
            waiter.idle();
        }
    }
}

/// A message taken out of the queue by a matched probe ([`Communicator::mprobe`],
/// [`Communicator::improbe`]), to be received with [`Message::recv`] or
/// [`Message::irecv`] (`MPI_Mrecv`, `MPI_Imrecv`). Until then it belongs to this handle
/// alone. Dropping it unreceived puts the message back where it was in the queue, so a
/// later receive or probe gets it, in its original order.
#[derive(Debug)]
#[must_use = "a matched message should be received (dropping it puts it back in the queue)"]
pub struct Message {
    comm: Communicator,
    status: Status,
    /// `None` once received.
    msg: Option<proto::Message<Vec<u8>>>,
}

impl Message {
    /// The message's source (a rank of the probed communicator), tag and length in bytes.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Receives the message into `buf` (`MPI_Mrecv`).
    ///
    /// # Errors
    /// [`Error::Truncated`] when it is larger than `buf` (nothing is written; the message is
    /// consumed, as in MPI); [`Error::ElementSize`]; as [`RecvRequest::wait`].
    pub fn recv<T: Pod>(self, buf: &mut [T]) -> Result<Status> {
        self.irecv(buf)?.wait()
    }

    /// Starts receiving the message into `buf` (`MPI_Imrecv`); a rendezvous message's data
    /// is requested now.
    ///
    /// # Errors
    /// [`Error::PeerFailed`], [`Error::Finalized`], fabric errors.
    pub fn irecv<T: Pod>(mut self, buf: &mut [T]) -> Result<RecvRequest<'_>> {
        let msg = self.msg.take().expect("a message until received");
        let src = Source::Rank(msg.status().source);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf);
        let id = self.comm.engine().start_recv_matched(msg, bytes.len())?;
        Ok(RecvRequest {
            comm: self.comm.clone(),
            id: Some(id),
            src,
            buf: Some(bytes),
            elem: std::mem::size_of::<T>(),
        })
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Some(msg) = self.msg.take() {
            self.comm.engine().requeue(msg);
        }
    }
}

// ---- One request model (MPI 4.0 §3.7). ----

/// The object-safe part of every request ([`Request`]): what [`Communicator::wait_any`],
/// [`Communicator::wait_some`] and [`Communicator::test_all`] need, so that they take any
/// mix of request kinds as `&mut [&mut dyn AnyRequest]`. Implemented by every [`Request`].
pub trait AnyRequest {
    /// Progresses and reports whether the operation has completed (successfully, with an
    /// error, or cancelled), so that [`Request::wait`] returns at once (`MPI_Test`). Never
    /// blocks.
    ///
    /// # Errors
    /// Fabric errors that belong to no operation; the operation's own error is reported by
    /// `wait`.
    fn test(&mut self) -> Result<bool>;

    /// Asks to cancel the operation (`MPI_Cancel`). `Ok(true)`: it is cancelled; it is
    /// complete, and `wait` returns [`Error::Cancelled`]. `Ok(false)`: it cannot be
    /// cancelled (any more) and completes normally. Only a receive ([`RecvRequest`]) that
    /// no message has matched yet can be cancelled; the [module docs](self#requests) say
    /// why the others cannot.
    ///
    /// # Errors
    /// None today; reserved for kinds whose cancellation can fail.
    fn cancel(&mut self) -> Result<bool>;
}

/// A non-blocking operation in progress, of any kind: [`SendRequest`], [`RecvRequest`],
/// [`P2pRequest`], [`CollRequest`](crate::CollRequest), [`RmaRequest`](crate::RmaRequest).
/// See the [module docs](self#requests) for what dropping each does.
pub trait Request: AnyRequest {
    /// What a completed operation gives back: `()` for sends and RMA, the [`Status`] for a
    /// receive, the buffer for most collectives.
    type Output;

    /// Waits for the operation (`MPI_Wait`), up to the communicator's deadline, and returns
    /// its result.
    ///
    /// # Errors
    /// The operation's error; [`Error::Timeout`]; [`Error::Cancelled`] after a successful
    /// [`AnyRequest::cancel`].
    fn wait(self) -> Result<Self::Output>;
}

impl AnyRequest for SendRequest<'_> {
    fn test(&mut self) -> Result<bool> {
        SendRequest::test(self)
    }
    /// A send cannot be cancelled: its eager data is already in the peer's receive buffers
    /// or its rendezvous announced (MPI 4.0 deprecates cancelling sends too).
    fn cancel(&mut self) -> Result<bool> {
        Ok(false)
    }
}

impl Request for SendRequest<'_> {
    type Output = ();
    fn wait(self) -> Result<()> {
        SendRequest::wait(self)
    }
}

impl AnyRequest for RecvRequest<'_> {
    fn test(&mut self) -> Result<bool> {
        RecvRequest::test(self)
    }
    fn cancel(&mut self) -> Result<bool> {
        RecvRequest::cancel(self)
    }
}

impl Request for RecvRequest<'_> {
    type Output = Status;
    fn wait(self) -> Result<Status> {
        RecvRequest::wait(self)
    }
}

impl AnyRequest for P2pRequest<'_> {
    fn test(&mut self) -> Result<bool> {
        match self {
            P2pRequest::Send(s) => s.test(),
            P2pRequest::Recv(r) => r.test(),
        }
    }
    fn cancel(&mut self) -> Result<bool> {
        match self {
            P2pRequest::Send(_) => Ok(false),
            P2pRequest::Recv(r) => r.cancel(),
        }
    }
}

impl Request for P2pRequest<'_> {
    /// `None` for a send, the status for a receive.
    type Output = Option<Status>;
    fn wait(self) -> Result<Option<Status>> {
        self.wait_by(None)
    }
}

impl P2pRequest<'_> {
    /// [`Request::wait`] up to `deadline` (see [`time_left`]).
    fn wait_by(self, deadline: Option<&CallDeadline>) -> Result<Option<Status>> {
        match self {
            P2pRequest::Send(s) => s.wait_by(deadline).map(|()| None),
            P2pRequest::Recv(r) => r.wait_by(deadline).map(Some),
        }
    }
}

impl Communicator {
    /// Waits until one of `reqs` has completed (`MPI_Waitany`, MPI 4.0 §3.7.5) and returns
    /// its index (the lowest, when several have); `None` when `reqs` is empty
    /// (`MPI_UNDEFINED`). Any mix of request kinds, of any communicator; the deadline is
    /// this communicator's. The request stays in `reqs`: `wait` on it returns at once.
    ///
    /// # Errors
    /// [`Error::Timeout`] when none completes within the deadline (one for the whole call:
    /// this communicator's timeout from the call's entry); an error from a request's
    /// `test`.
    pub fn wait_any(&self, reqs: &mut [&mut dyn AnyRequest]) -> Result<Option<usize>> {
        if reqs.is_empty() {
            return Ok(None);
        }
        let done = self.wait_requests("wait_any", reqs, |done, _| done > 0)?;
        Ok(done.first().copied())
    }

    /// Waits until at least one of `reqs` has completed (`MPI_Waitsome`) and returns the
    /// indexes of all that have, in increasing order; empty when `reqs` is. A request that
    /// completed is reported again by the next call until the caller takes it out of
    /// `reqs` (and `wait`s for it).
    ///
    /// # Errors
    /// As [`Communicator::wait_any`].
    pub fn wait_some(&self, reqs: &mut [&mut dyn AnyRequest]) -> Result<Vec<usize>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        self.wait_requests("wait_some", reqs, |done, _| done > 0)
    }

    /// Tests every request once (`MPI_Testall`): true when all of `reqs` have completed
    /// (then `wait` on each returns at once). Never blocks.
    ///
    /// # Errors
    /// An error from a request's `test`.
    pub fn test_all(&self, reqs: &mut [&mut dyn AnyRequest]) -> Result<bool> {
        let mut all = true;
        for r in reqs.iter_mut() {
            all &= r.test()?;
        }
        Ok(all)
    }

    /// Tests `reqs` until `enough(completed, total)` holds, up to the deadline; returns the
    /// indexes of the completed ones.
    fn wait_requests(
        &self,
        op: &'static str,
        reqs: &mut [&mut dyn AnyRequest],
        enough: impl Fn(usize, usize) -> bool,
    ) -> Result<Vec<usize>> {
        let start = Instant::now();
        let mut waiter = self.inner.wait.waiter();
        let mut clock = efa_fabric::PollClock::new(self.timeout());
        loop {
            let before = self.engine().events;
            let mut done = Vec::new();
            for (i, r) in reqs.iter_mut().enumerate() {
                if r.test()? {
                    done.push(i);
                }
            }
            if enough(done.len(), reqs.len()) {
                return Ok(done);
            }
            if self.engine().events != before {
                waiter.progressed();
            }
            if clock.expired() {
                return Err(self.engine().deadline_passed(op, None, start.elapsed()));
            }
            waiter.idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A card like those of this host's ranks: shm and `tcp;ofi_rxm` endpoints (addresses of
    /// 72 and 16 bytes, as efa-fabric's shm region names and `sockaddr_in` are), a boot id
    /// with a network namespace as host id, `per_host` ranks per host.
    fn sim_card(rank: u32, per_host: u32) -> Card {
        let host = rank / per_host;
        Card {
            rank,
            host_id: format!("577d94e6-308f-4af8-b0d6-8d6a{host:08x}/netns:4026531833"),
            endpoints: vec![
                EndpointCard {
                    transport: Transport::Shm,
                    provider: "shm".into(),
                    addr: format!("{:072}", u64::from(rank) * 7919).into_bytes(),
                },
                EndpointCard {
                    transport: Transport::Ip,
                    provider: "tcp;ofi_rxm".into(),
                    addr: [&[2, 0, 0x9c, 0x40][..], &rank.to_be_bytes(), &[0; 8]].concat(),
                },
            ],
            fabric_subnet: None,
            ip_subnet: Some("10.0.0.0/16".parse().unwrap()),
            process: placement::ProcessId {
                pid: 1000 + rank,
                start: 123_456 + u64::from(rank),
                host: format!("ip-10-0-{}-{}", host / 256, host % 256),
            },
        }
    }

    /// Issue 17 §2's target: the state a rank keeps for the job's ranks is at most 256
    /// bytes per rank while it has talked to none of them, for up to 16,384 simulated ranks
    /// with 8 to 192 ranks per host, built by the same functions as a real communicator's
    /// (cards, routes, liveness, engine, group). With one rank per host it is 277 bytes
    /// (each card then carries a host id and host name of its own, 63 bytes here): held
    /// to 288. Fails if any per-peer structure grows past the budget.
    #[test]
    fn idle_peer_state_fits_256_bytes() {
        for (n, per_host, budget) in [
            (16_384u32, 96u32, 256.0),
            (4096, 192, 256.0),
            (1024, 8, 256.0),
            (1024, 1, 288.0),
        ] {
            let me = n / 2 + 3;
            let cards: Vec<Card> = (0..n).map(|r| sim_card(r, per_host)).collect();
            let routes: Vec<Chosen> =
                placement::choose_routes(&cards[me as usize], &cards, &TransportSet::all())
                    .into_iter()
                    .map(|r| r.map(|r| (r.transport, r.peer_endpoint)).unwrap())
                    .collect();
            let transports = [Transport::Shm, Transport::Ip];
            let (peers, used) = routes_to_ports(&transports, &routes).unwrap();
            // Shm serves this rank itself (and its host's ranks), tcp the others.
            assert_eq!(used, [true, true]);
            let table = Arc::new(CardTable::new(&cards).unwrap());
            let live = liveness(me, &table, &[]);
            let engine = Engine::new(me, n, Vec::new(), peers, table, live);
            let bytes = engine.peer_state_bytes() + Group::world(me, n).bytes();
            let per_peer = bytes as f64 / f64::from(n);
            println!(
                "{n} ranks, {per_host} per host: {bytes} bytes, {per_peer:.1} per peer, of which cards {:.1}",
                engine.cards.heap_bytes() as f64 / f64::from(n)
            );
            assert!(
                per_peer <= budget,
                "{per_peer:.1} bytes per idle peer at {n} ranks, {per_host} per host, exceeds \
                 {budget}"
            );
            // And the table gives back every card as published (it is what routes and
            // addresses are read from on first use).
            for r in [0, me, n - 1] {
                assert_eq!(engine.cards.card(r).as_ref(), Some(&cards[r as usize]));
            }
            assert_eq!(
                engine
                    .peers
                    .addr
                    .iter()
                    .filter(|a| **a != FiAddr::UNSPEC)
                    .count(),
                0
            );
        }
    }

    /// EFA_TIMEOUT: each kind of bad value says what is wrong with it (a huge but finite
    /// value once read "not a finite number").
    #[test]
    fn timeout_values() {
        assert_eq!(parse_timeout(" 2.5 "), Ok(Duration::from_millis(2500)));
        for (v, says) in [
            ("ten", "not a number"),
            ("-1", "negative"),
            ("0", "shorter than 1 ms"),
            ("99999999999999999999", "longer than a year"),
            ("40000000", "longer than a year"),
            ("inf", "not a finite number"),
            ("NaN", "not a finite number"),
        ] {
            let e = parse_timeout(v).unwrap_err();
            assert!(e.contains(says), "{v}: {e}");
        }
    }

    fn matches(ctx: u32, src: Source, tag: Tag, m: (u32, u32, u32)) -> bool {
        proto::matches(ctx, src, tag, m.0, m.1, m.2)
    }

    #[test]
    fn wildcard_matching() {
        let m = (0, 3, 5);
        assert!(matches(0, Source::Any, Tag::Any, m));
        assert!(matches(0, Source::Rank(3), Tag::Is(5), m));
        assert!(!matches(0, Source::Rank(2), Tag::Any, m));
        assert!(!matches(0, Source::Any, Tag::Is(4), m));
        // Reserved (internal) tags never match a user's Tag::Any.
        assert!(!matches(0, Source::Any, Tag::Any, (0, 3, MAX_USER_TAG + 1)));
    }

    #[test]
    fn contexts_never_match_each_other() {
        let m = (7, 3, 5);
        assert!(matches(7, Source::Rank(3), Tag::Is(5), m));
        for ctx in [0, 6, 8, 7 | CREATE_CTX_BIT] {
            assert!(!matches(ctx, Source::Any, Tag::Any, m), "ctx {ctx}");
            assert!(!matches(ctx, Source::Rank(3), Tag::Is(5), m), "ctx {ctx}");
        }
        // A communicator's creation traffic is not its user traffic either.
        let c = (7 | CREATE_CTX_BIT, 3, 0);
        assert!(!matches(7, Source::Any, Tag::Any, c));
        assert!(!matches(7, Source::Any, Tag::Is(0), c));
    }

    #[test]
    fn group_translates_ranks_both_ways() {
        // World ranks 5, 1, 3 of a job of 6, in that order.
        let g = Group::new(9, 1, vec![5, 1, 3], 6);
        assert_eq!(g.size(), 3);
        for (l, &w) in g.world_of.iter().enumerate() {
            assert_eq!(g.local_of[w as usize], l as u32);
        }
        for w in [0, 2, 4] {
            assert_eq!(g.local_of[w], NOT_MEMBER);
        }
        let world = Group::world(2, 4);
        assert_eq!(world.world_of, vec![0, 1, 2, 3]);
        assert_eq!(world.local_of, vec![0, 1, 2, 3]);
        assert_eq!(world.ctx, WORLD_CTX);
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
