//! The communicator's errors: each says what happened and what to do, and keeps the fabric
//! error as its source.
//!
//! # What a user sees
//! `Display` (`{}`) is one line: the situation and the fix. `Debug` (`{:?}`), which is what
//! `fn main() -> Result<(), efa_core::Error>` prints, is that line followed by any cause it
//! does not already include and, where the line cannot say it all, a hint:
//!
//! ```text
//! Error: rank 1 (pid 4242 on host a) exited
//!
//! Hint: the job cannot go on without that rank: look at its own output (efarun prefixes it
//! with its rank) for why it failed
//! ```
//!
//! The alternate form (`{:#?}`) is the structured, derive-like form
//! (`Bootstrap(RankNeverJoined { ranks: [1], waited: 60s })`), for programs that log errors
//! as data.
//!
//! # Matching
//! Each variant is one situation, with the numbers a handler needs as fields and the
//! lower-level error, where there is one, as its [`source`](std::error::Error::source):
//!
//! | when | variants |
//! |---|---|
//! | start-up | [`Error::Bootstrap`], [`Error::Transports`], [`Error::Setting`], [`Error::HostId`], [`Error::Card`], [`Error::NoTransport`], [`Error::NoRoute`] |
//! | a bad argument on this rank | [`Error::InvalidRank`], [`Error::ReservedTag`] |
//! | arguments that do not fit across ranks (every rank gets it) | [`Error::CollectiveMismatch`], [`Error::Collective`] (a [`crate::coll::CollError`]), [`Error::WindowMismatch`] |
//! | a message and its buffer | [`Error::Truncated`], [`Error::ElementSize`] |
//! | RMA | [`Error::RmaOutOfBounds`], [`Error::RmaAccess`], [`Error::NoRma`], [`Error::CqDataTooSmall`], [`Error::NotifyRank`] |
//! | peers | [`Error::PeerFailed`] (source: [`PeerFailure`], then the fabric error), [`Error::PeerFinalized`], [`Error::Timeout`] |
//! | the fabric | [`Error::Fabric`] (source: [`efa_fabric::Error`]) |
//! | foreign or corrupt traffic | [`Error::MalformedMessage`] |
//! | this communicator's life | [`Error::Finalized`] |
//! | a bug in efa-core | [`Error::Internal`] |
//!
//! # Classes
//! [`Error::class`] sorts the variants into [`ErrorClass`]es, coarse enough for a caller
//! that cannot match Rust enums: the C ABI's error codes and the Python package's exception
//! classes are both read from it, so a situation is classified once, here.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::bootstrap::BootstrapError;
use crate::placement::{
    CardError, HostIdError, Transport, TransportSet, TransportsEnvError, UnknownTransport,
};
pub(crate) use crate::setting::env_var;
pub use crate::setting::{SettingError, SettingSource};

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the communicator returns.
///
/// `Debug` prints the readable report (see the [module docs](self)); `{:#?}` prints the
/// structured form.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Finding rank, size or rendezvous, or exchanging cards, failed. The message names
    /// the variable, or the ranks that never joined.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// `EFA_TRANSPORTS` names an unknown transport.
    #[error(transparent)]
    Transports(#[from] UnknownTransport),
    /// A setting (an `EFA_*` variable or a builder argument) has a value that cannot be used.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// A peer's card could not be read (different efa-rs versions?).
    #[error("the card (endpoint addresses) of rank {rank} could not be read: {source}; every rank must run the same efa-rs version")]
    Card {
        /// The peer.
        rank: u32,
        /// Why.
        source: CardError,
    },
    /// Start-up: no endpoint could be opened for any allowed transport. `missing` gives,
    /// for each allowed transport, why none was chosen (the reason `efa info` prints).
    #[error("no transport could be opened (allowed: {allowed}; {}); `efa info` and `efa doctor` show what this host offers, EFA_TRANSPORTS chooses among shm, fabric and ip", fmt_missing(.missing))]
    NoTransport {
        /// The transports this rank was allowed to use.
        allowed: TransportSet,
        /// Each allowed transport and why it has no endpoint.
        missing: Vec<(Transport, String)>,
    },
    /// Start-up: the provider chosen for a transport carries messages of at most
    /// `max_msg_size` bytes, less than the `needed` bytes of the library's header and one
    /// byte of data (`fi_endpoint(3)`, `max_msg_size`).
    #[error("provider {provider} carries messages of at most {max_msg_size} bytes, fewer than the {needed} bytes of a message header and one byte of data; choose another provider (FI_PROVIDER) or transport (EFA_TRANSPORTS)")]
    MaxMsgTooSmall {
        /// The provider.
        provider: String,
        /// Its `max_msg_size`, in bytes.
        max_msg_size: usize,
        /// The smallest size that works, in bytes.
        needed: usize,
    },
    /// Start-up: this rank and `peer` share no usable transport; `source` says what each
    /// offers, what is allowed and why nothing fits.
    #[error("{source}; allow a transport that both ranks offer (EFA_TRANSPORTS)")]
    NoRoute {
        /// The peer.
        peer: u32,
        /// What each side offers and why nothing fits.
        #[source]
        source: crate::placement::NoRoute,
    },
    /// Start-up: this host's identity (which decides where shared memory can be used) could
    /// not be read from `/proc`, or `EFA_HOST_ID` cannot be used. The message says what to
    /// set.
    #[error(transparent)]
    HostId(#[from] HostIdError),
    /// A rank outside `0..size`.
    #[error("rank {rank} is out of range for a communicator of size {size}; ranks are 0 to {}", size.saturating_sub(1))]
    InvalidRank {
        /// The rank given.
        rank: u32,
        /// The communicator size.
        size: u32,
    },
    /// A tag in the range reserved for the library's own messages.
    #[error("tag {0:#x} is reserved for the library's own messages; use a tag below {max:#x}", max = crate::tag::MAX_USER_TAG + 1)]
    ReservedTag(u32),
    /// The message was larger than the receive buffer. Nothing was written to the buffer.
    /// Only the receiver gets this error: as in MPI (MPI-4.0 section 3.2.5), the sender's
    /// send completes normally whatever the size (a rendezvous then moves no data). Other
    /// messages are unaffected.
    #[error("message of {got} bytes from rank {peer} (tag {tag}) does not fit the {expected}-byte receive buffer; post a buffer of at least {got} bytes, or send the size first")]
    Truncated {
        /// Capacity of the receive buffer, in bytes.
        expected: usize,
        /// Size of the message, in bytes.
        got: usize,
        /// The other side.
        peer: u32,
        /// The message's tag.
        tag: u32,
    },
    /// A buffer whose byte length is not a multiple of the element size.
    #[error("received {bytes} bytes, not a whole number of {elem}-byte elements; sender and receiver must use the same element type")]
    ElementSize {
        /// Bytes received.
        bytes: usize,
        /// Element size.
        elem: usize,
    },
    /// A blocking operation passed its deadline. The peer may be slow, stuck or dead; the
    /// deadline is set with `CommunicatorBuilder::timeout` or `EFA_TIMEOUT` (seconds).
    ///
    /// A deadline is not retryable: when the operation waited for a known `peer`, this rank
    /// treats that peer as failed from then on ([`PeerFailure::TimedOut`]) and tells every
    /// rank it can reach, so their operations with it fail at once with
    /// [`Error::PeerFailed`] instead of each waiting out its own deadline (as a job under
    /// `MPI_ERRORS_ARE_FATAL`, or NCCL's watchdog, ends). Choose the deadline so that only
    /// a dead or stuck peer passes it.
    #[error("{op}{} did not complete within {waited:?}; the peer may be slow, stopped or dead{} (raise EFA_TIMEOUT, in seconds, if it is only slow)", peer.map(|p| format!(" with rank {p}")).unwrap_or_default(), peer.map(|p| format!("; rank {p} is now treated as failed by every rank")).unwrap_or_default())]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The peer, when one is known.
        peer: Option<u32>,
        /// Time waited.
        waited: Duration,
    },
    /// The fabric failed an operation with `peer`.
    #[error("{op}{} failed: {source}; EFA_DEBUG=debug shows the routes and providers, FI_LOG_LEVEL=warn libfabric's own messages", peer.map(|p| format!(" with rank {p}")).unwrap_or_default())]
    Fabric {
        /// The operation.
        op: &'static str,
        /// The peer, when one is known.
        peer: Option<u32>,
        /// The libfabric error.
        source: efa_fabric::Error,
    },
    /// A malformed message of the library's own protocol arrived from `peer`: another
    /// program sends to this job's endpoints, or the ranks run different efa-rs versions.
    /// The operation that needed the message fails; nothing else is affected.
    #[error("malformed {what} from rank {peer}; every rank must run the same efa-rs version, and no other program may send to this job's endpoints")]
    MalformedMessage {
        /// The sender.
        peer: u32,
        /// Which message, and what was wrong with it.
        what: Malformed,
        /// The parse error, when a lower layer found it.
        #[source]
        source: Option<efa_fabric::Error>,
    },
    /// A collective (every rank, at once): the ranks called different collectives, or the
    /// same one with different counts, element types, operators or roots. `ranks` are two
    /// ranks that differ and `calls` what each called (as MPI requires, every rank must call
    /// the same collectives in the same order with matching arguments). Nothing was
    /// transferred.
    #[error("{op}: ranks called different collectives or with different arguments: rank {} called {}; rank {} called {}", ranks[0], calls[0], ranks[1], calls[1])]
    CollectiveMismatch {
        /// The collective this rank called.
        op: &'static str,
        /// Two ranks whose calls differ.
        ranks: [u32; 2],
        /// What each of them called: collective, count, element type, operator, root.
        calls: [String; 2],
    },
    /// [`crate::Communicator::window`]: `peer` created a window of another size than this
    /// rank. Every rank must create the same window (same element type and length).
    #[error("window: rank {peer} created {peer_bytes} bytes, this rank {bytes} bytes; every rank must create the same window")]
    WindowMismatch {
        /// The rank whose window differs.
        peer: u32,
        /// Its window size in bytes.
        peer_bytes: u64,
        /// This rank's window size in bytes.
        bytes: u64,
    },
    /// An RMA access outside the peer's window. Nothing was transferred.
    #[error("{op} of {count} elements at offset {offset} is outside rank {peer}'s window of {window_len} elements; keep offset + count within {window_len}")]
    RmaOutOfBounds {
        /// put or get.
        op: crate::rma::RmaOp,
        /// The target rank.
        peer: u32,
        /// First element.
        offset: usize,
        /// Number of elements.
        count: usize,
        /// Window size in elements.
        window_len: usize,
    },
    /// The peer's window does not allow this operation. Nothing was transferred.
    #[error("{op} denied: rank {peer}'s window is {access:?}; create it with an access that allows {op} (WindowAccess::ReadWrite allows both)")]
    RmaAccess {
        /// put or get.
        op: crate::rma::RmaOp,
        /// The target rank.
        peer: u32,
        /// The window's access.
        access: crate::rma::WindowAccess,
    },
    /// [`crate::Communicator::split`] or [`crate::Communicator::dup`]: this process has
    /// used all `limit` context ids, one per communicator it ever created. Nothing was
    /// created; create fewer communicators (reuse them).
    #[error("no context id is left for a new communicator: all {limit} are used; create fewer communicators (reuse them)")]
    ContextsExhausted {
        /// How many context ids there are.
        limit: u32,
    },
    /// [`crate::Communicator::init`] or [`crate::CommunicatorBuilder::build`]: this process
    /// already holds a live world communicator of the same job (`rendezvous`), like a second
    /// `MPI_Init`. Nothing was opened. Clone the existing communicator, or `dup()` it for a
    /// separate context; a new world can be built once the first is finalized or its last
    /// handle dropped.
    #[error("this process already has a live communicator of this job ({rendezvous}): clone it, or dup() it for a communicator of its own; build a new one only after finalizing the first or dropping its last handle")]
    AlreadyInitialized {
        /// The job's rendezvous, as [`crate::bootstrap::Rendezvous`] displays it.
        rendezvous: String,
    },
    /// [`crate::Communicator::window`]: the provider of a route this rank uses has no RMA
    /// (`FI_RMA`). Nothing was registered.
    #[error("provider {provider} has no FI_RMA capability, so RMA windows cannot use it; restrict EFA_TRANSPORTS to a transport with RMA")]
    NoRma {
        /// The provider.
        provider: String,
    },
    /// [`crate::Window::put_notify`]: the route's provider carries fewer bytes of remote CQ
    /// data than a notification needs. Nothing was transferred; use a put and a message.
    #[error("provider {provider} carries {bytes} bytes of remote CQ data; put_notify needs {needed} bytes (use put and a message instead)")]
    CqDataTooSmall {
        /// The provider.
        provider: String,
        /// Bytes of CQ data it carries (`cq_data_size`).
        bytes: usize,
        /// Bytes a notification needs.
        needed: usize,
    },
    /// [`crate::Window::put_notify`] from a rank that a notification cannot name
    /// (notifications carry 16 bits of rank). Nothing was transferred; use a put and a
    /// message.
    #[error("put_notify from rank {rank}: notifications carry ranks below {limit} (use put and a message instead)")]
    NotifyRank {
        /// This rank.
        rank: u32,
        /// The first rank that cannot notify.
        limit: u32,
    },
    /// A peer failed: it exited, became unreachable, aborted the job, or stopped answering.
    /// Pending and later operations that need it fail with this error. The job cannot go on
    /// as it was: finish what does not need the peer, report, and exit.
    #[error("{}", cause.describe(*rank))]
    PeerFailed {
        /// The failed rank.
        rank: u32,
        /// How it failed; its source is the fabric error, when this rank saw one.
        #[source]
        cause: PeerFailure,
    },
    /// A collective's buffers, counts or displacements do not fit the call, on this rank or
    /// another (see [`crate::coll::CollError`]).
    #[error(transparent)]
    Collective(#[from] crate::coll::error::CollError),
    /// A bug in efa-core: an internal invariant does not hold (`what` says which). Please
    /// report it with the output of `EFA_DEBUG=debug`.
    #[error("internal error in efa-core: {what}; this is a bug: please report it with the output of EFA_DEBUG=debug")]
    Internal {
        /// The invariant that failed.
        what: &'static str,
    },
    /// The communicator was finalized ([`crate::Communicator::finalize`]); no operation may
    /// follow.
    #[error("the communicator has been finalized: no operation may follow finalize")]
    Finalized,
    /// `rank` has finalized: every message it sent has been processed, and it will send and
    /// receive no more. A receive that only that rank could match, or a send to it, fails
    /// with this error at once instead of waiting for the deadline.
    #[error("rank {rank} has finalized: it sends and receives no more messages; every operation with a rank must come before that rank's finalize")]
    PeerFinalized {
        /// The rank that finalized.
        rank: u32,
    },
    /// The receive was cancelled ([`crate::AnyRequest::cancel`], `MPI_Cancel`) before a
    /// message matched it: nothing was written into its buffer, and the message that would
    /// have matched it stays for a later receive.
    #[error("the receive was cancelled before a message matched it; nothing was received")]
    Cancelled,
}

/// The class of an [`Error`] ([`Error::class`]): what a caller outside Rust (the C ABI's
/// `efa_errcode`, the Python package's exception classes) or a generic handler branches on.
/// Each [`Error`] variant belongs to exactly one class; a deadline passed anywhere, in
/// bootstrap as well, is [`ErrorClass::Timeout`].
///
/// Not `#[non_exhaustive]` on purpose: a new class must be mapped by every binding, and
/// their exhaustive matches make that a compile error instead of a silent "other".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Start-up failed: rank, size or rendezvous not found, a peer's card unreadable, no
    /// host id ([`Error::Bootstrap`] but its deadlines, [`Error::Card`], [`Error::HostId`]).
    Bootstrap,
    /// A bad setting ([`Error::Setting`], [`Error::Transports`]).
    Setting,
    /// No transport reaches a peer ([`Error::NoTransport`], [`Error::MaxMsgTooSmall`],
    /// [`Error::NoRoute`]).
    NoRoute,
    /// A rank argument out of range ([`Error::InvalidRank`]).
    Rank,
    /// A tag reserved for the library ([`Error::ReservedTag`]).
    Tag,
    /// A message does not fit its receive buffer, in bytes or in whole elements
    /// ([`Error::Truncated`], [`Error::ElementSize`]).
    Truncated,
    /// A deadline passed: an operation ([`Error::Timeout`]), a rank that never joined or a
    /// store that did not answer during bootstrap.
    Timeout,
    /// The fabric failed an operation ([`Error::Fabric`]).
    Fabric,
    /// Foreign or corrupt traffic ([`Error::MalformedMessage`]).
    Protocol,
    /// Ranks called different collectives, or with different arguments
    /// ([`Error::CollectiveMismatch`]).
    Mismatch,
    /// A collective's buffers, counts or displacements do not fit the call
    /// ([`Error::Collective`]).
    CollectiveArgument,
    /// An RMA window or operation error ([`Error::WindowMismatch`],
    /// [`Error::RmaOutOfBounds`], [`Error::RmaAccess`], [`Error::NoRma`],
    /// [`Error::CqDataTooSmall`], [`Error::NotifyRank`]).
    Rma,
    /// A fixed resource ran out ([`Error::ContextsExhausted`]).
    Resource,
    /// A communicator already exists in this process ([`Error::AlreadyInitialized`]).
    AlreadyInitialized,
    /// A peer failed ([`Error::PeerFailed`]).
    PeerFailed,
    /// A peer finalized ([`Error::PeerFinalized`]).
    PeerFinalized,
    /// This communicator was finalized ([`Error::Finalized`]).
    Finalized,
    /// The receive was cancelled ([`Error::Cancelled`]).
    Cancelled,
    /// A bug in efa-core ([`Error::Internal`]).
    Internal,
}

impl From<TransportsEnvError> for Error {
    fn from(e: TransportsEnvError) -> Self {
        match e {
            TransportsEnvError::Unknown(e) => Error::Transports(e),
            TransportsEnvError::Setting(e) => Error::Setting(e),
        }
    }
}

impl Error {
    /// The [`ErrorClass`] of this error: the one place that sorts variants into classes
    /// (the C ABI's codes and the Python exceptions read it).
    pub fn class(&self) -> ErrorClass {
        use crate::store::StoreError;
        match self {
            Error::Bootstrap(BootstrapError::RankNeverJoined { .. })
            | Error::Bootstrap(BootstrapError::Store(
                StoreError::Timeout { .. } | StoreError::Incomplete { .. },
            ))
            | Error::Timeout { .. } => ErrorClass::Timeout,
            Error::Bootstrap(_) | Error::Card { .. } | Error::HostId(_) => ErrorClass::Bootstrap,
            Error::Transports(_) | Error::Setting(_) => ErrorClass::Setting,
            Error::NoTransport { .. } | Error::MaxMsgTooSmall { .. } | Error::NoRoute { .. } => {
                ErrorClass::NoRoute
            }
            Error::InvalidRank { .. } => ErrorClass::Rank,
            Error::ReservedTag(_) => ErrorClass::Tag,
            Error::Truncated { .. } | Error::ElementSize { .. } => ErrorClass::Truncated,
            Error::Fabric { .. } => ErrorClass::Fabric,
            Error::MalformedMessage { .. } => ErrorClass::Protocol,
            Error::CollectiveMismatch { .. } => ErrorClass::Mismatch,
            Error::Collective(_) => ErrorClass::CollectiveArgument,
            Error::WindowMismatch { .. }
            | Error::RmaOutOfBounds { .. }
            | Error::RmaAccess { .. }
            | Error::NoRma { .. }
            | Error::CqDataTooSmall { .. }
            | Error::NotifyRank { .. } => ErrorClass::Rma,
            Error::ContextsExhausted { .. } => ErrorClass::Resource,
            Error::AlreadyInitialized { .. } => ErrorClass::AlreadyInitialized,
            Error::PeerFailed { .. } => ErrorClass::PeerFailed,
            Error::PeerFinalized { .. } => ErrorClass::PeerFinalized,
            Error::Finalized => ErrorClass::Finalized,
            Error::Cancelled => ErrorClass::Cancelled,
            Error::Internal { .. } => ErrorClass::Internal,
        }
    }

    pub(crate) fn fabric(op: &'static str, peer: Option<u32>, source: efa_fabric::Error) -> Self {
        // Every failed fabric operation passes here: `EFA_DEBUG=debug` shows it even when
        // the application swallows the error.
        tracing::debug!(op, ?peer, error = %source, "fabric operation failed");
        match source {
            // A post that could not be queued within the deadline is a timeout with that peer.
            efa_fabric::Error::Timeout { waited, .. } => Error::Timeout { op, peer, waited },
            source => Error::Fabric { op, peer, source },
        }
    }

    /// What to do, where the message itself cannot say it all. (Bootstrap and store errors
    /// carry their own fix in their text.)
    fn hint(&self) -> Option<String> {
        match self {
            Error::PeerFailed { .. } => Some(
                "the job cannot go on without that rank: look at its own output (efarun \
                 prefixes it with its rank) for why it failed"
                    .into(),
            ),
            Error::CollectiveMismatch { .. } => Some(
                "every rank must call the same collectives in the same order; a rank that skips \
                 one (an early return, a branch on the rank) shifts every later one"
                    .into(),
            ),
            _ => None,
        }
    }

    /// The structured, derive-like form (`{:#?}`).
    fn fmt_structured(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bootstrap(e) => f.debug_tuple("Bootstrap").field(e).finish(),
            Error::Transports(e) => f.debug_tuple("Transports").field(e).finish(),
            Error::Setting(e) => f.debug_tuple("Setting").field(e).finish(),
            Error::Card { rank, source } => f
                .debug_struct("Card")
                .field("rank", rank)
                .field("source", source)
                .finish(),
            Error::NoTransport { allowed, missing } => f
                .debug_struct("NoTransport")
                .field("allowed", allowed)
                .field("missing", missing)
                .finish(),
            Error::MaxMsgTooSmall {
                provider,
                max_msg_size,
                needed,
            } => f
                .debug_struct("MaxMsgTooSmall")
                .field("provider", provider)
                .field("max_msg_size", max_msg_size)
                .field("needed", needed)
                .finish(),
            Error::NoRoute { peer, source } => f
                .debug_struct("NoRoute")
                .field("peer", peer)
                .field("source", source)
                .finish(),
            Error::HostId(e) => f.debug_tuple("HostId").field(e).finish(),
            Error::InvalidRank { rank, size } => f
                .debug_struct("InvalidRank")
                .field("rank", rank)
                .field("size", size)
                .finish(),
            Error::ReservedTag(t) => f.debug_tuple("ReservedTag").field(t).finish(),
            Error::Truncated {
                expected,
                got,
                peer,
                tag,
            } => f
                .debug_struct("Truncated")
                .field("expected", expected)
                .field("got", got)
                .field("peer", peer)
                .field("tag", tag)
                .finish(),
            Error::ElementSize { bytes, elem } => f
                .debug_struct("ElementSize")
                .field("bytes", bytes)
                .field("elem", elem)
                .finish(),
            Error::Timeout { op, peer, waited } => f
                .debug_struct("Timeout")
                .field("op", op)
                .field("peer", peer)
                .field("waited", waited)
                .finish(),
            Error::Fabric { op, peer, source } => f
                .debug_struct("Fabric")
                .field("op", op)
                .field("peer", peer)
                .field("source", source)
                .finish(),
            Error::MalformedMessage { peer, what, source } => f
                .debug_struct("MalformedMessage")
                .field("peer", peer)
                .field("what", what)
                .field("source", source)
                .finish(),
            Error::CollectiveMismatch { op, ranks, calls } => f
                .debug_struct("CollectiveMismatch")
                .field("op", op)
                .field("ranks", ranks)
                .field("calls", calls)
                .finish(),
            Error::WindowMismatch {
                peer,
                peer_bytes,
                bytes,
            } => f
                .debug_struct("WindowMismatch")
                .field("peer", peer)
                .field("peer_bytes", peer_bytes)
                .field("bytes", bytes)
                .finish(),
            Error::RmaOutOfBounds {
                op,
                peer,
                offset,
                count,
                window_len,
            } => f
                .debug_struct("RmaOutOfBounds")
                .field("op", op)
                .field("peer", peer)
                .field("offset", offset)
                .field("count", count)
                .field("window_len", window_len)
                .finish(),
            Error::RmaAccess { op, peer, access } => f
                .debug_struct("RmaAccess")
                .field("op", op)
                .field("peer", peer)
                .field("access", access)
                .finish(),
            Error::ContextsExhausted { limit } => f
                .debug_struct("ContextsExhausted")
                .field("limit", limit)
                .finish(),
            Error::AlreadyInitialized { rendezvous } => f
                .debug_struct("AlreadyInitialized")
                .field("rendezvous", rendezvous)
                .finish(),
            Error::NoRma { provider } => {
                f.debug_struct("NoRma").field("provider", provider).finish()
            }
            Error::CqDataTooSmall {
                provider,
                bytes,
                needed,
            } => f
                .debug_struct("CqDataTooSmall")
                .field("provider", provider)
                .field("bytes", bytes)
                .field("needed", needed)
                .finish(),
            Error::NotifyRank { rank, limit } => f
                .debug_struct("NotifyRank")
                .field("rank", rank)
                .field("limit", limit)
                .finish(),
            Error::PeerFailed { rank, cause } => f
                .debug_struct("PeerFailed")
                .field("rank", rank)
                .field("cause", cause)
                .finish(),
            Error::Collective(e) => f.debug_tuple("Collective").field(e).finish(),
            Error::Internal { what } => f.debug_struct("Internal").field("what", what).finish(),
            Error::Finalized => f.write_str("Finalized"),
            Error::PeerFinalized { rank } => {
                f.debug_struct("PeerFinalized").field("rank", rank).finish()
            }
            Error::Cancelled => f.write_str("Cancelled"),
        }
    }
}

impl fmt::Debug for Error {
    /// `{:?}`: the message, its causes and a hint (what `main` prints when it returns this
    /// error). `{:#?}`: the structured form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            return self.fmt_structured(f);
        }
        write_report(f, self, self.hint().as_deref())
    }
}

/// Writes `err`'s message, then every cause that the message does not already include, then
/// `hint`.
fn write_report(f: &mut fmt::Formatter<'_>, err: &dyn StdError, hint: Option<&str>) -> fmt::Result {
    let mut shown = err.to_string();
    f.write_str(&shown)?;
    let mut causes = Vec::new();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // Most messages already carry their source's text; repeating it helps nobody.
        if !shown.contains(&text) {
            causes.push(text.clone());
        }
        shown.push_str(&text);
        next = cause.source();
    }
    match causes.as_slice() {
        [] => {}
        [one] => write!(f, "\n\nCaused by:\n    {one}")?,
        many => {
            f.write_str("\n\nCaused by:")?;
            for (i, c) in many.iter().enumerate() {
                write!(f, "\n    {i}: {c}")?;
            }
        }
    }
    if let Some(h) = hint {
        write!(f, "\n\nHint: {h}")?;
    }
    Ok(())
}

/// Which message of the library's own protocol was malformed, and how
/// ([`Error::MalformedMessage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Malformed {
    /// A window descriptor ([`crate::Communicator::window`]) whose remote region does not
    /// parse.
    WindowRegion,
    /// A window descriptor with an access code that names no [`crate::WindowAccess`].
    WindowAccess {
        /// The code received.
        code: u8,
    },
    /// A contribution to [`crate::Communicator::split`] of the wrong length.
    SplitLength {
        /// Its length in bytes (at most `u32::MAX`: this keeps [`Error`] small).
        len: u32,
    },
    /// A contribution to [`crate::Communicator::split`] whose fields are out of range.
    SplitFields,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::WindowRegion => f.write_str("window descriptor (its region does not parse)"),
            Malformed::WindowAccess { code } => {
                write!(f, "window descriptor (unknown access code {code})")
            }
            Malformed::SplitLength { len } => write!(f, "split contribution ({len} bytes)"),
            Malformed::SplitFields => f.write_str("split contribution (fields out of range)"),
        }
    }
}

/// How a peer failed; carried by [`Error::PeerFailed`], whose source it is.
///
/// Two failures are equal when they say the same thing; the fabric error behind an
/// [`PeerFailure::Unreachable`] is not compared.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PeerFailure {
    /// The peer's process is gone (seen as a dead pid on the same host, or a closed
    /// connection).
    Exited {
        /// Its process id, when known.
        pid: Option<u32>,
        /// Its host, when known.
        host: Option<String>,
    },
    /// The transport reports that the peer cannot be reached; `detail` is the transport's
    /// text (what the other ranks are told), `source` the fabric error when this rank saw it.
    Unreachable {
        /// The transport's error text, e.g. "connection reset".
        detail: String,
        /// The failed operation's fabric error, when this rank saw one (not when another
        /// rank reported the failure, or when the peer stopped answering).
        source: Option<std::sync::Arc<efa_fabric::Error>>,
    },
    /// The peer called `abort(code, reason)`.
    Aborted {
        /// The code it gave.
        code: i32,
        /// The reason it gave.
        reason: String,
    },
    /// The peer's process is stopped (SIGSTOP, a debugger) and did not answer within the
    /// communicator's deadline.
    Stopped {
        /// Its process id.
        pid: u32,
        /// Time waited.
        waited: Duration,
    },
    /// The peer did not answer within the communicator's deadline.
    TimedOut {
        /// Time waited.
        waited: Duration,
    },
}

impl PeerFailure {
    /// The sentence for rank `rank` failing this way, e.g. "rank 1 (pid 4242 on host a) exited".
    pub fn describe(&self, rank: u32) -> String {
        match self {
            PeerFailure::Exited { pid, host } => {
                let at = match (pid, host) {
                    (Some(pid), Some(host)) => format!(" (pid {pid} on host {host})"),
                    (Some(pid), None) => format!(" (pid {pid})"),
                    (None, Some(host)) => format!(" (on host {host})"),
                    (None, None) => String::new(),
                };
                format!("rank {rank}{at} exited")
            }
            PeerFailure::Unreachable { detail, .. } => {
                format!("rank {rank} unreachable: {detail}")
            }
            PeerFailure::Aborted { code, reason } => {
                format!("rank {rank} aborted the job (code {code}): {reason}")
            }
            PeerFailure::Stopped { pid, waited } => {
                format!("rank {rank} (pid {pid}) is stopped and did not answer within {waited:?}")
            }
            PeerFailure::TimedOut { waited } => {
                format!("rank {rank} did not answer within {waited:?}")
            }
        }
    }
}

impl PartialEq for PeerFailure {
    fn eq(&self, other: &Self) -> bool {
        use PeerFailure::*;
        match (self, other) {
            (Exited { pid: a, host: h }, Exited { pid: b, host: g }) => a == b && h == g,
            (Unreachable { detail: a, .. }, Unreachable { detail: b, .. }) => a == b,
            (Aborted { code: a, reason: r }, Aborted { code: b, reason: s }) => a == b && r == s,
            (Stopped { pid: a, waited: w }, Stopped { pid: b, waited: v }) => a == b && w == v,
            (TimedOut { waited: w }, TimedOut { waited: v }) => w == v,
            _ => false,
        }
    }
}

impl Eq for PeerFailure {}

/// The failure as a cause: `{}` is how the rank failed without naming it (the
/// [`Error::PeerFailed`] message names it); the source is the fabric error, if any.
impl fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerFailure::Unreachable { detail, .. } => write!(f, "unreachable: {detail}"),
            PeerFailure::Aborted { code, reason } => {
                write!(f, "aborted the job (code {code}): {reason}")
            }
            PeerFailure::Exited { .. } => f.write_str("exited"),
            PeerFailure::Stopped { waited, .. } => {
                write!(f, "is stopped and did not answer within {waited:?}")
            }
            PeerFailure::TimedOut { waited } => write!(f, "did not answer within {waited:?}"),
        }
    }
}

impl StdError for PeerFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            PeerFailure::Unreachable {
                source: Some(e), ..
            } => Some(&**e),
            _ => None,
        }
    }
}

/// `NoTransport`'s list: "shm: why; ip: why".
fn fmt_missing(missing: &[(Transport, String)]) -> String {
    let parts: Vec<String> = missing
        .iter()
        .map(|(t, why)| format!("{t}: {why}"))
        .collect();
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_deadline_is_the_timeout_class_and_other_start_up_errors_bootstrap() {
        let waited = Duration::from_secs(3);
        let never_joined = Error::Bootstrap(BootstrapError::RankNeverJoined {
            ranks: vec![1],
            waited,
            store: "tcp 127.0.0.1:1".into(),
        });
        let store_timeout =
            Error::Bootstrap(BootstrapError::Store(crate::store::StoreError::Timeout {
                key: "k".into(),
                waited,
            }));
        let incomplete = Error::Bootstrap(BootstrapError::Store(
            crate::store::StoreError::Incomplete {
                exchange: "cards".into(),
                world: 2,
                missing: vec![1],
                waited,
            },
        ));
        let op_timeout = Error::Timeout {
            op: "recv",
            peer: Some(1),
            waited,
        };
        for e in [&never_joined, &store_timeout, &incomplete, &op_timeout] {
            assert_eq!(e.class(), ErrorClass::Timeout, "{e:#?}");
        }
        let not_a_deadline = Error::Bootstrap(BootstrapError::Store(
            crate::store::StoreError::InvalidToken {
                reason: "differs".into(),
            },
        ));
        assert_eq!(not_a_deadline.class(), ErrorClass::Bootstrap);
        assert_eq!(
            Error::ElementSize { bytes: 3, elem: 4 }.class(),
            ErrorClass::Truncated
        );
        assert_eq!(Error::Finalized.class(), ErrorClass::Finalized);
    }

    #[test]
    fn debug_is_the_report_and_alternate_the_structure() {
        // The source's text is already in the message: no "Caused by" repeating it.
        let e = Error::Fabric {
            op: "send",
            peer: Some(2),
            source: efa_fabric::Error::PeerGone { op: "send" },
        };
        let report = format!("{e:?}");
        assert_eq!(report, e.to_string());
        assert!(
            report.starts_with(
                "send with rank 2 failed: send not posted: the peer is gone (its queue will \
                 never drain); EFA_DEBUG=debug"
            ),
            "{report}"
        );
        assert!(format!("{e:#?}").starts_with("Fabric {\n    op: \"send\","));

        // Bootstrap and store errors carry their fix in their text: Debug adds nothing.
        let e = Error::Bootstrap(BootstrapError::Store(
            crate::store::StoreError::Unreachable {
                addr: "h:1".into(),
                waited: Duration::from_secs(1),
                source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
            },
        ));
        assert_eq!(format!("{e:?}"), e.to_string());

        // A cause the message does not include is listed, then the hint.
        #[derive(Debug, thiserror::Error)]
        #[error("outer failed")]
        struct Outer(#[source] std::io::Error);
        struct Report<'a>(&'a dyn StdError, Option<&'a str>);
        impl fmt::Display for Report<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_report(f, self.0, self.1)
            }
        }
        let outer = Outer(std::io::Error::other("inner cause"));
        assert_eq!(
            Report(&outer, Some("do this")).to_string(),
            "outer failed\n\nCaused by:\n    inner cause\n\nHint: do this"
        );
        assert_eq!(
            Report(&outer, None).to_string(),
            "outer failed\n\nCaused by:\n    inner cause"
        );

        let e = Error::PeerFailed {
            rank: 3,
            cause: PeerFailure::Unreachable {
                detail: "connection reset".into(),
                source: None,
            },
        };
        assert!(format!("{e:?}").starts_with("rank 3 unreachable: connection reset\n\nHint: "));
    }

    #[test]
    fn setting_errors_name_the_source_value_and_forms() {
        let e = SettingError::env("EFA_IFACE", "eth9", "no such interface", "lo, eth0");
        assert_eq!(
            e.to_string(),
            "EFA_IFACE=\"eth9\": no such interface; accepted: lo, eth0"
        );
        let e = SettingError::argument(
            "CommunicatorBuilder::ip_iface",
            "eth9",
            "no such interface",
            "lo",
        );
        assert_eq!(
            e.to_string(),
            "CommunicatorBuilder::ip_iface(\"eth9\"): no such interface; accepted: lo"
        );
        assert_eq!(e.var(), None);
    }

    /// The fabric error behind an unreachable peer stays reachable through `source()`, and
    /// the report does not repeat what the message already says.
    #[test]
    fn peer_failed_keeps_the_fabric_error_as_source() {
        let fabric = efa_fabric::Error::Completion(efa_fabric::CompletionError {
            code: 104,
            text: "Connection reset by peer".into(),
            prov_errno: 0,
            prov_text: "none".into(),
            flags: 0,
            len: 0,
            olen: 0,
            tag: 0,
        });
        let e = Error::PeerFailed {
            rank: 2,
            cause: PeerFailure::Unreachable {
                detail: fabric.to_string(),
                source: Some(std::sync::Arc::new(fabric)),
            },
        };
        let cause = e.source().expect("PeerFailed has its cause as source");
        assert!(matches!(
            cause.downcast_ref::<PeerFailure>(),
            Some(PeerFailure::Unreachable { .. })
        ));
        let fabric = cause.source().expect("the fabric error");
        assert!(matches!(
            fabric.downcast_ref::<efa_fabric::Error>(),
            Some(efa_fabric::Error::Completion(c)) if c.code == 104
        ));
        assert!(!format!("{e:?}").contains("Caused by"), "{e:?}");
        // Equal when they say the same, whatever the source.
        let other = PeerFailure::Unreachable {
            detail: cause.to_string()["unreachable: ".len()..].to_string(),
            source: None,
        };
        assert_eq!(cause.downcast_ref::<PeerFailure>(), Some(&other));
    }

    #[test]
    fn peer_failed_names_rank_and_cause() {
        let e = Error::PeerFailed {
            rank: 1,
            cause: PeerFailure::Exited {
                pid: Some(4242),
                host: Some("a".into()),
            },
        };
        assert_eq!(e.to_string(), "rank 1 (pid 4242 on host a) exited");
        let e = Error::PeerFailed {
            rank: 1,
            cause: PeerFailure::Unreachable {
                detail: "connection reset".into(),
                source: None,
            },
        };
        assert_eq!(e.to_string(), "rank 1 unreachable: connection reset");
        let e = Error::PeerFailed {
            rank: 1,
            cause: PeerFailure::Aborted {
                code: 3,
                reason: "bad input".into(),
            },
        };
        assert_eq!(e.to_string(), "rank 1 aborted the job (code 3): bad input");
        let e = Error::PeerFailed {
            rank: 2,
            cause: PeerFailure::TimedOut {
                waited: Duration::from_secs(5),
            },
        };
        assert_eq!(e.to_string(), "rank 2 did not answer within 5s");
        let e = Error::PeerFailed {
            rank: 0,
            cause: PeerFailure::Exited {
                pid: None,
                host: None,
            },
        };
        assert_eq!(e.to_string(), "rank 0 exited");
    }
}
