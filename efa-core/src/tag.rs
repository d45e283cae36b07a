//! Tags and sources: which messages a receive accepts, the tag space users may use, and
//! what a completed receive got ([`Status`]).
//!
//! A leaf module: it uses nothing of this crate, so that the communicator
//! ([`crate::comm`], which re-exports these), its errors and its collectives all share one
//! definition.

/// Largest user tag; tags above are reserved for collectives and internal messages.
pub const MAX_USER_TAG: u32 = 0x7FFF_FFFF;

// The reserved tag space (bit 31 set), laid out here and nowhere else, so that no two kinds
// of library traffic on one communicator can ever match each other:
//
// | bits 31..30 | rest | kind |
// |---|---|---|
// | `10` | 18 bits of the call's sequence number, 12 bits of phase | collectives ([`coll_tag`]) |
// | `11` | 14 bits unused, 8+8 bits: window id (16 bits), phase (8 bits) | windows ([`window_tag`]) |

/// Reserved bit pattern of collective tags (bits 31..30 = `10`).
const COLL_TAGS: u32 = 0x8000_0000;
/// Reserved bit pattern of window tags (bits 31..30 = `11`).
const WINDOW_TAGS: u32 = 0xC000_0000;

/// The tag of phase `sub` (taken modulo 2^12) of collective call `seq` (taken modulo 2^18:
/// two calls that far apart are never in flight together on one communicator).
pub(crate) const fn coll_tag(seq: u32, sub: u32) -> u32 {
    COLL_TAGS | (seq & 0x3_FFFF) << 12 | (sub & 0xFFF)
}

/// The tag of phase `sub` (taken modulo 2^8) of window `id` (taken modulo 2^16): its
/// descriptor exchange and its fences.
pub(crate) const fn window_tag(id: u32, sub: u32) -> u32 {
    WINDOW_TAGS | (id & 0xFFFF) << 8 | (sub & 0xFF)
}

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
    /// Number of whole `T` elements received: `len / size_of::<T>()`, rounded down (a
    /// 6-byte message is 1 `u32`). Where that may not divide (`MPI_Get_count` would give
    /// `MPI_UNDEFINED`), size buffers from [`Status::len`] in bytes.
    pub fn count<T>(&self) -> usize {
        self.len / std::mem::size_of::<T>().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every collective tag and every window tag is reserved, and none is both: a window's
    /// descriptor exchange can never match a collective's message (they once overlapped
    /// for collective sequence numbers with bits 0x70000 set).
    #[test]
    fn reserved_ranges_are_disjoint() {
        for seq in (0..1u32 << 19).chain([u32::MAX - 1, u32::MAX]) {
            for sub in [0, 1, 7, 0xFFF, 0x1000, u32::MAX] {
                let t = coll_tag(seq, sub);
                assert!(t > MAX_USER_TAG, "collective tag {t:#x} is a user tag");
                assert_eq!(
                    t & WINDOW_TAGS,
                    COLL_TAGS,
                    "collective tag {t:#x} (seq {seq})"
                );
            }
        }
        for id in (0..1u32 << 17).chain([u32::MAX]) {
            for sub in [0, 1, 0xFF, u32::MAX] {
                let t = window_tag(id, sub);
                assert_eq!(t & WINDOW_TAGS, WINDOW_TAGS, "window tag {t:#x} (id {id})");
            }
        }
        // Distinct phases of one call, and consecutive calls, get distinct tags.
        assert_ne!(coll_tag(5, 0), coll_tag(5, 1));
        assert_ne!(coll_tag(5, 0), coll_tag(6, 0));
        assert_ne!(window_tag(5, 0), window_tag(5, 1));
        assert_ne!(window_tag(5, 0), window_tag(6, 0));
    }
}
