//! Tags and sources: which messages a receive accepts, and the tag space users may use.
//!
//! A leaf module: it uses nothing of this crate, so that the communicator
//! ([`crate::comm`], which re-exports these), its errors and its collectives all share one
//! definition.

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
