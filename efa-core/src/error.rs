//! The communicator's errors: each speaks of the situation and keeps the fabric error as its
//! source.

use std::time::Duration;

use crate::bootstrap::BootstrapError;
use crate::placement::{CardError, UnknownTransport};

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the communicator returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Finding rank, size or rendezvous, or exchanging cards, failed. The message names
    /// the variable, or the ranks that never joined.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// `EFA_TRANSPORTS` names an unknown transport.
    #[error(transparent)]
    Transports(#[from] UnknownTransport),
    /// A peer's card could not be read (different efa-rs versions?).
    #[error("card of rank {rank}: {source}")]
    Card {
        /// The peer.
        rank: u32,
        /// Why.
        source: CardError,
    },
    /// No endpoint could be opened for any allowed transport.
    #[error("no transport could be opened: {0}")]
    NoTransport(String),
    /// This rank and `peer` share no usable transport; the message says what each offers.
    #[error("no route to rank {peer}: {reason}")]
    NoRoute {
        /// The peer.
        peer: u32,
        /// What each side offers and why nothing fits.
        reason: String,
    },
    /// A rank outside `0..size`.
    #[error("rank {rank} is out of range for a communicator of size {size}")]
    InvalidRank {
        /// The rank given.
        rank: u32,
        /// The communicator size.
        size: u32,
    },
    /// A tag in the range reserved for the library's own messages.
    #[error("tag {0:#x} is reserved (user tags are below {max:#x})", max = crate::comm::MAX_USER_TAG + 1)]
    ReservedTag(u32),
    /// The message was larger than the receive buffer. Nothing was written to the buffer;
    /// the sender gets the same error. Other messages are unaffected.
    #[error("message of {got} bytes from rank {peer} (tag {tag}) does not fit the {expected}-byte receive buffer")]
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
    #[error("received {bytes} bytes, not a whole number of {elem}-byte elements")]
    ElementSize {
        /// Bytes received.
        bytes: usize,
        /// Element size.
        elem: usize,
    },
    /// A blocking operation passed its deadline. The peer may be slow, stuck or dead; the
    /// deadline is set with `CommunicatorBuilder::timeout` or `EFA_TIMEOUT` (seconds).
    #[error("{op}{} did not complete within {waited:?}", peer.map(|p| format!(" with rank {p}")).unwrap_or_default())]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The peer, when one is known.
        peer: Option<u32>,
        /// Time waited.
        waited: Duration,
    },
    /// The fabric failed an operation with `peer`.
    #[error("{op}{}: {source}", peer.map(|p| format!(" with rank {p}")).unwrap_or_default())]
    Fabric {
        /// The operation.
        op: &'static str,
        /// The peer, when one is known.
        peer: Option<u32>,
        /// The libfabric error.
        source: efa_fabric::Error,
    },
    /// A malformed message arrived (another program on the port, or mismatched versions).
    #[error("protocol error from rank {peer}: {what}")]
    Protocol {
        /// The sender.
        peer: u32,
        /// What was wrong.
        what: String,
    },
    /// An RMA access outside the peer's window. Nothing was transferred.
    #[error("{op} of {count} elements at offset {offset} is outside rank {peer}'s window of {window_len} elements")]
    RmaOutOfBounds {
        /// put or get.
        op: crate::window::RmaOp,
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
    #[error("{op} denied: rank {peer}'s window is {access:?}")]
    RmaAccess {
        /// put or get.
        op: crate::window::RmaOp,
        /// The target rank.
        peer: u32,
        /// The window's access.
        access: crate::window::WindowAccess,
    },
    /// The provider lacks a capability this call needs; the message says which.
    #[error("unsupported: {what}")]
    Unsupported {
        /// The missing capability and what to do.
        what: String,
    },
    /// A peer failed: it exited, became unreachable, aborted the job, or stopped answering.
    /// Pending and later operations that need it fail with this error. The job cannot go on
    /// as it was: finish what does not need the peer, report, and exit.
    #[error("{}", cause.describe(*rank))]
    PeerFailed {
        /// The failed rank.
        rank: u32,
        /// How it failed.
        cause: PeerFailure,
    },
    /// A bad configuration value (the message names it).
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn fabric(op: &'static str, peer: Option<u32>, source: efa_fabric::Error) -> Self {
        match source {
            // A post that could not be queued within the deadline is a timeout with that peer.
            efa_fabric::Error::Timeout { waited, .. } => Error::Timeout { op, peer, waited },
            source => Error::Fabric { op, peer, source },
        }
    }
}

/// How a peer failed; carried by [`Error::PeerFailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The transport reports that the peer cannot be reached; `detail` is the transport's text.
    Unreachable {
        /// The transport's error text, e.g. "connection reset".
        detail: String,
    },
    /// The peer called `abort(code, reason)`.
    Aborted {
        /// The code it gave.
        code: i32,
        /// The reason it gave.
        reason: String,
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
            PeerFailure::Unreachable { detail } => format!("rank {rank} unreachable: {detail}"),
            PeerFailure::Aborted { code, reason } => {
                format!("rank {rank} aborted the job (code {code}): {reason}")
            }
            PeerFailure::TimedOut { waited } => {
                format!("rank {rank} did not answer within {waited:?}")
            }
        }
    }
}

#[cfg(test)]
mod peer_failed_tests {
    use super::*;

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
