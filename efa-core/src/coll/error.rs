//! [`CollError`]: a collective's arguments that do not fit the call. A leaf module (it
//! depends on nothing else in the crate), so that [`crate::error`] can hold it without a
//! module cycle.

/// Buffers, counts or displacements of a collective call that do not fit it, on this rank or
/// another. Counts and lengths are in elements unless a field says bytes.
///
/// With the argument check on ([`CollConfig::check`](super::CollConfig::check), the
/// default), a rank whose own arguments do not fit gets the variant that says which, and
/// every other rank gets [`CollError::PeerArguments`] naming it, before any data moves: no
/// rank waits for a call that cannot happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CollError {
    /// A buffer has the wrong length for the call's shape.
    #[error("{op}: the {buffer} buffer holds {len} elements; it must hold {expected}")]
    BufferLength {
        /// The collective.
        op: &'static str,
        /// Which buffer (`send`, `receive`, `in-place`).
        buffer: &'static str,
        /// Its length.
        len: usize,
        /// The length the call needs.
        expected: usize,
    },
    /// A buffer that must hold one equal block per rank does not.
    #[error("{op}: the {buffer} buffer holds {len} elements, not a whole number of blocks for {size} ranks; pass size() blocks of equal length")]
    NotDivisible {
        /// The collective.
        op: &'static str,
        /// Which buffer.
        buffer: &'static str,
        /// Its length.
        len: usize,
        /// The number of ranks.
        size: u32,
    },
    /// A counts or displacements slice without exactly one entry per rank.
    #[error("{op}: {what} has {len} entries; it must have one per rank ({size})")]
    CountsLength {
        /// The collective.
        op: &'static str,
        /// `counts`, `displs`, `send counts`, ...
        what: &'static str,
        /// Its length.
        len: usize,
        /// The number of ranks.
        size: u32,
    },
    /// Block `rank` (`displs[rank]..displs[rank] + counts[rank]`) does not lie within its
    /// buffer.
    #[error("{op}: block {rank} of the {buffer} buffer (elements {start}..{end}) lies outside its {len} elements; keep displs[r] + counts[r] within the buffer")]
    BlockOutside {
        /// The collective.
        op: &'static str,
        /// Which buffer.
        buffer: &'static str,
        /// The block's rank.
        rank: u32,
        /// First element of the block.
        start: usize,
        /// One past its last element (saturated at `usize::MAX`).
        end: usize,
        /// The buffer's length.
        len: usize,
    },
    /// Two blocks of a receive buffer overlap (MPI 4.0 section 6.5.2: no element of a
    /// receive buffer may be written twice).
    #[error("{op}: blocks {a} and {b} of the receive buffer overlap; each element may receive data once")]
    BlocksOverlap {
        /// The collective.
        op: &'static str,
        /// One block's rank.
        a: u32,
        /// The other's.
        b: u32,
    },
    /// Two ranks disagree on how many elements rank `rank` contributes or receives (the
    /// root's `counts[rank]` and rank `rank`'s own buffer length). Found by the argument
    /// check, on every rank.
    #[error("{op}: rank {rank}'s block has {a} elements on one side and {b} on the other; a block's count must be the same where it is sent and where it is received (for a rooted collective, the root's counts[{rank}] equals rank {rank}'s own buffer length; for alltoallv, send_counts[j] on rank i equals recv_counts[i] on rank j)")]
    CountMismatch {
        /// The collective.
        op: &'static str,
        /// Whose block.
        rank: u32,
        /// One count.
        a: u64,
        /// The other.
        b: u64,
    },
    /// A message of the wrong size arrived: the sender's count for this rank differs from
    /// this rank's count for it (only the receiver can tell; the all-to-all-v counts are not
    /// part of the argument check, see [`Communicator::alltoallv_into`](crate::Communicator::alltoallv_into)).
    #[error("{op}: {got} bytes arrived from rank {peer} where {expected} were expected; the two ranks' counts for this block disagree")]
    SizeMismatch {
        /// The collective.
        op: &'static str,
        /// The sender.
        peer: u32,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// Another rank's arguments do not fit the call; that rank got the error that says
    /// which. This rank fails too, so that no rank waits.
    #[error("{op}: rank {rank} passed buffers or counts that do not fit the call (its own error says which); every rank fails so that none waits")]
    PeerArguments {
        /// The collective.
        op: &'static str,
        /// The rank whose arguments do not fit.
        rank: u32,
    },
    /// A zero-sized element type (`size_of::<T>() == 0`, e.g. `()` or `[u8; 0]`), in a
    /// user-defined reduction or a data movement: there is nothing to reduce or move.
    /// Returned on every rank that passes one (the others get [`CollError::PeerArguments`]).
    #[error("{op}: the element type has size 0; collectives need elements of at least one byte")]
    ZeroSized {
        /// The collective.
        op: &'static str,
    },
}
