//! The fast-box carrier: small ordered messages to ranks on this host through
//! [`efa_shm`]'s rings instead of the `shm` provider.
//!
//! Every control message (eager data, RTS, CTS, Fin, FinAck, Failed) to a peer routed over
//! shm goes into that peer's ring when it fits ([`max_message`]: 32 KiB less 16 bytes with
//! the 64 KiB rings of up to 129 ranks per host, see [`ring_bytes`]) and the ring has room; otherwise it takes the provider as
//! before. Both paths carry the same header with the same per-sender sequence numbers, so
//! the receiver's reordering keeps MPI's non-overtaking order across the two. Rendezvous
//! data and RMA stay on the provider (single copy through cross-memory attach).
//!
//! Setup: each rank whose host has other ranks of the job routed over shm creates its
//! segment before the ready barrier and attaches its peers' after it (every peer has
//! created its own by then). A rank that cannot create or attach logs why and uses the
//! provider for those peers; a receiver polls all its inbound rings regardless, so the two
//! sides never disagree. `EFA_FASTBOX=0` turns the carrier off (for comparisons).
//!
//! Waiting: a ring has no wait fd, so a message in a ring wakes no rank blocked on a
//! completion queue's fd. Polling the rings costs one load per local peer and never blocks;
//! a wait policy that blocks must bound its blocking while this carrier is in use (count it
//! as a carrier without a wait fd).

use efa_shm::Fastboxes;

use crate::placement::{CardTable, Chosen, Transport};
use crate::wire::{Header, HDR_LEN};

/// Environment variable that turns the carrier off when `0`, `off` or `false`.
pub const ENV: &str = "EFA_FASTBOX";

/// Data bytes of each ring for `n_local` ranks on the host: 64 KiB, halved as long as a
/// rank's inbound rings would exceed 8 MiB, but never below 16 KiB.
fn ring_bytes(n_local: usize) -> usize {
    let mut ring = 64 * 1024;
    while ring > 16 * 1024 && (n_local - 1) * ring > 8 << 20 {
        ring /= 2;
    }
    ring
}

/// Largest message through a ring: half of it less the record header, 32,752 bytes with
/// 64 KiB rings, so that eager messages up to the default shm eager limit (32 KiB) less our
/// 32-byte header take the rings. Measured with `efa-shm`'s `fbox_pingpong` (2 processes,
/// median half round trip): a 16 KiB message takes 3.4-3.9 us through a ring against
/// 7.2 us through the shm provider under the communicator; 128 KiB rings (the other way to
/// carry 32 KiB) made 256 B-1 KiB messages 0.1-0.25 us slower (cache footprint).
fn max_message(ring: usize) -> usize {
    efa_shm::ring::max_message_limit(ring)
}

/// [`FastPath::index_of`] of a rank whose segment is not attached.
const UNATTACHED: u32 = u32::MAX;

/// This rank's fast boxes and the map between world ranks and local indices.
#[derive(Debug)]
pub(crate) struct FastPath {
    boxes: Fastboxes,
    /// By world rank: the peer's local index, once its segment is attached ([`UNATTACHED`]
    /// before).
    index_of: Vec<u32>,
    /// By local index: the world rank.
    rank_of: Vec<u32>,
    /// Messages sent through the rings, and received from them.
    sent: u64,
    received: u64,
    /// Messages to an attached peer that took the provider: ring full, or too large.
    full: u64,
    large: u64,
}

impl Drop for FastPath {
    fn drop(&mut self) {
        tracing::debug!(
            target: "efa_core::comm",
            sent = self.sent,
            received = self.received,
            full = self.full,
            large = self.large,
            "fast boxes closed"
        );
    }
}

/// Whether `EFA_FASTBOX` turns the carrier off.
fn disabled() -> bool {
    std::env::var(ENV).is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false" | "no"))
}

impl FastPath {
    /// Creates this rank's segment if other ranks on this host are routed over shm (`None`
    /// otherwise, when turned off, or when creation fails, which is logged). `prefix` is
    /// the world's store prefix (it tells apart the worlds built one after another in one
    /// process).
    pub(crate) fn create(
        rank: u32,
        cards: &CardTable,
        routes: &[Chosen],
        prefix: &str,
    ) -> Option<FastPath> {
        let rank_of: Vec<u32> = (0..cards.len() as u32)
            .filter(|&r| {
                r == rank || (routes[r as usize].0 == Transport::Shm && cards.same_host(r, rank))
            })
            .collect();
        if rank_of.len() < 2 || disabled() {
            return None;
        }
        let local = rank_of.iter().position(|&r| r == rank)?;
        // The job key: the shm endpoint address of the lowest local rank names one endpoint
        // of one process (efa-fabric's region names are unique over time), so it is the same
        // on every local rank and differs between jobs; the prefix tells apart worlds.
        let first = cards.card(rank_of[0])?;
        let addr = first
            .endpoints
            .iter()
            .find(|e| e.transport == Transport::Shm)
            .map(|e| e.addr.as_slice())
            .unwrap_or_default();
        let key = format!(
            "{}/{}/{}",
            addr.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            first.process.pid,
            prefix
        );
        let ring = ring_bytes(rank_of.len());
        let config = efa_shm::Config::default()
            .ring_bytes(ring)
            .max_message(max_message(ring));
        match Fastboxes::create(&key, local, rank_of.len(), &config) {
            Ok(boxes) => Some(FastPath {
                boxes,
                index_of: vec![UNATTACHED; cards.len()],
                rank_of,
                sent: 0,
                received: 0,
                full: 0,
                large: 0,
            }),
            Err(e) => {
                tracing::warn!(
                    "fast boxes off, messages to this host's ranks use the shm provider: {e}"
                );
                None
            }
        }
    }

    /// Bytes of its tables indexed by rank (`size_of` plus capacity; the rings are shared
    /// memory, not counted).
    pub(crate) fn index_bytes(&self) -> usize {
        std::mem::size_of::<FastPath>()
            + self.index_of.capacity() * std::mem::size_of::<u32>()
            + self.rank_of.capacity() * std::mem::size_of::<u32>()
    }

    /// Maps every local peer's segment (they exist once the ready barrier has passed).
    /// Peers that fail are logged and keep using the provider.
    pub(crate) fn attach(&mut self) {
        for (i, &r) in self.rank_of.iter().enumerate() {
            if i == self.boxes.local_index() {
                continue;
            }
            match self.boxes.attach(i) {
                Ok(()) => self.index_of[r as usize] = i as u32,
                Err(e) => tracing::warn!(
                    peer = r,
                    "fast box not attached, using the shm provider: {e}"
                ),
            }
        }
        tracing::debug!(
            target: "efa_core::comm",
            peers = self.index_of.iter().filter(|&&i| i != UNATTACHED).count(),
            local = self.rank_of.len(),
            max_message = self.boxes.max_message(),
            "fast boxes attached"
        );
    }

    /// Puts one control message into `dest`'s ring. `false` when `dest` has no ring, the
    /// message is too large for one, or the ring is full: send it through the provider.
    #[inline]
    pub(crate) fn try_send(&mut self, dest: u32, hdr: &Header, payload: &[u8]) -> bool {
        let Some(&i) = self
            .index_of
            .get(dest as usize)
            .filter(|&&i| i != UNATTACHED)
        else {
            return false;
        };
        let mut h = [0u8; HDR_LEN];
        hdr.encode(&mut h);
        // The size limit is the rings' own decision (`TooLarge`), checked before any write.
        match self.boxes.try_send(i as usize, &h, payload) {
            Ok(true) => {
                self.sent += 1;
                true
            }
            Ok(false) => {
                self.full += 1;
                false
            }
            Err(efa_shm::Error::TooLarge { .. }) => {
                self.large += 1;
                false
            }
            Err(e) => {
                tracing::warn!(
                    peer = dest,
                    "fast-box send failed, using the shm provider: {e}"
                );
                false
            }
        }
    }

    /// Hands each message waiting in the rings (header and payload, each sender's in the
    /// order it sent them) to `handle`, straight from the ring: no copy, no allocation, no
    /// system call, never blocks. `true` if there were any. `handle` may not send through
    /// this carrier (it is borrowed): the engine defers its sends until the poll is over.
    #[inline]
    pub(crate) fn poll(&mut self, mut handle: impl FnMut(&[u8])) -> bool {
        // The common case, nothing waiting, costs one load per local peer.
        if !self.boxes.has_incoming() {
            return false;
        }
        let rank_of = &self.rank_of;
        let res = self.boxes.poll(|src, b| {
            // The header must name the ring's sender: a message is never taken for
            // another rank's.
            match Header::decode(b, b.len()) {
                Ok(h) if h.src == rank_of[src] => handle(b),
                Ok(h) => tracing::warn!(
                    src = h.src,
                    ring = rank_of[src],
                    "dropping a fast-box message whose header names another sender"
                ),
                Err(e) => tracing::warn!("dropping malformed fast-box message: {e}"),
            }
        });
        match res {
            Ok(n) => {
                self.received += n as u64;
                n > 0
            }
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ring_bytes;

    #[test]
    fn ring_sizes() {
        assert_eq!(ring_bytes(2), 64 * 1024);
        assert_eq!(ring_bytes(129), 64 * 1024);
        assert_eq!(ring_bytes(130), 32 * 1024);
        assert_eq!(ring_bytes(1000), 16 * 1024);
        for n in 2..2000 {
            let r = ring_bytes(n);
            assert!(r.is_power_of_two() && (16 * 1024..=64 * 1024).contains(&r));
        }
        // The default shm eager limit (32 KiB) less the 32-byte header fits 64 KiB rings.
        assert_eq!(super::max_message(64 * 1024), 32 * 1024 - 16);
    }
}
