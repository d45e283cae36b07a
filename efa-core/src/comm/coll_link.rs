//! The collectives' narrow interface onto point-to-point: [`CollLink`].
//!
//! `crate::coll` holds a [`CollLink`] and nothing else of the communicator's internals. It
//! offers exactly what a collective schedule needs:
//!
//! | need | call |
//! |---|---|
//! | a sequence number per collective call, equal on every rank | [`CollLink::next_seq`] |
//! | post a byte send on a collective (reserved) tag | [`CollLink::post_send`] -> [`CollSend`] |
//! | post a receive whose data is handed over owned (no copy-out) | [`CollLink::post_recv`] -> [`CollRecv`] |
//! | make progress | [`CollLink::progress`] |
//! | at a deadline, the failed or stopped rank if one is known | [`CollLink::deadline_culprit`] |
//! | return a received buffer to the pool | [`CollLink::recycle`] |
//!
//! Tags above [`MAX_USER_TAG`](super::MAX_USER_TAG) are reserved for the library; a
//! [`CollTag`] is always in that range, so collective traffic never matches a user's
//! `Tag::Any` receive, and a user send cannot reach a collective.

use std::time::Duration;

use super::{Communicator, SendRequest, Source, Status, Tag, MAX_USER_TAG};
use crate::error::{Error, Result};
use crate::proto::RecvId;

/// A tag in the collectives' reserved range ([`crate::tag::coll_tag`]: bits 31..30 = `10`,
/// then 18 bits of the call's sequence number and 12 bits of sub-tag (phase)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CollTag(u32);

impl CollTag {
    /// The tag of phase `sub` (`< 4096`) of collective call `seq` (taken modulo 2^18).
    pub(crate) fn new(seq: u32, sub: u32) -> CollTag {
        let t = crate::tag::coll_tag(seq, sub);
        debug_assert!(t > MAX_USER_TAG);
        CollTag(t)
    }
}

/// The collectives' handle on a communicator's point-to-point engine.
#[derive(Debug, Clone)]
pub(crate) struct CollLink {
    comm: Communicator,
}

impl CollLink {
    /// The link of `comm`.
    pub(crate) fn new(comm: &Communicator) -> CollLink {
        CollLink { comm: comm.clone() }
    }

    /// This rank.
    pub(crate) fn rank(&self) -> u32 {
        self.comm.rank()
    }

    /// Number of ranks.
    pub(crate) fn size(&self) -> u32 {
        self.comm.size()
    }

    /// The deadline of one collective call.
    pub(crate) fn timeout(&self) -> Duration {
        self.comm.timeout()
    }

    /// This rank's number of collective calls so far on this communicator (then counts this
    /// one). All ranks call collectives in the same order, so equal numbers mean the same
    /// call.
    pub(crate) fn next_seq(&self) -> u32 {
        self.comm
            .group
            .coll_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts sending `data` (copied or handed to the engine before this returns) to `dest`.
    pub(crate) fn post_send(&self, data: &[u8], dest: u32, tag: CollTag) -> Result<CollSend> {
        Ok(CollSend(self.comm.isend_bytes(data, dest, tag.0)?))
    }

    /// Starts a receive of at most `capacity` bytes from `src`; the data is taken with
    /// [`CollRecv::take`].
    pub(crate) fn post_recv(&self, src: Source, tag: CollTag, capacity: usize) -> Result<CollRecv> {
        if let Source::Rank(r) = src {
            self.comm.check_rank(r)?;
        }
        // Ranks of this communicator, its context: see `Communicator`'s sub-communicators.
        let src = self.comm.world_source(src);
        let ctx = self.comm.group.ctx;
        let id = self.comm.engine().start_recv(
            src,
            Tag::Is(tag.0),
            ctx,
            capacity,
            super::RecvDest::Engine,
        )?;
        Ok(CollRecv {
            comm: self.comm.clone(),
            id: Some(id),
        })
    }

    /// A waiter for one blocking wait, under the communicator's wait policy.
    pub(crate) fn waiter(&self) -> crate::wait::Waiter {
        self.comm.waiter()
    }

    /// Progresses the engine once.
    pub(crate) fn progress(&self) -> Result<()> {
        self.comm.progress()
    }

    /// For a collective whose wait passed its deadline: the error naming a failed or
    /// stopped rank when one is known (every rank is then told), else `None` (the collective
    /// blames the end of its own wait chain). Either way the communicator counts as broken,
    /// so finalize will not wait a whole deadline more.
    pub(crate) fn deadline_culprit(&self, waited: Duration) -> Option<Error> {
        self.comm.engine().stopped_culprit(waited)
    }

    /// Returns a buffer obtained from [`CollRecv::take`] to the engine's pool.
    pub(crate) fn recycle(&self, v: Vec<u8>) {
        self.comm.engine().recycle(v);
    }
}

/// A posted collective send.
#[derive(Debug)]
pub(crate) struct CollSend(SendRequest<'static>);

impl CollSend {
    /// Whether the send has completed (successfully or not), without progressing.
    pub(crate) fn is_finished(&self) -> bool {
        let e = self.0.comm.engine();
        self.0.id.is_none_or(|id| e.core.send_finished(id))
    }

    /// Its outcome (once [`CollSend::is_finished`]).
    pub(crate) fn wait(self) -> Result<()> {
        self.0.wait()
    }
}

/// A receive whose data the engine hands over as an owned `Vec<u8>` (no copy-out).
/// Dropping it cancels the receive.
#[derive(Debug)]
pub(crate) struct CollRecv {
    comm: Communicator,
    /// `None` once taken.
    id: Option<RecvId>,
}

impl CollRecv {
    /// The status and data of the finished receive, `None` while it is still in flight.
    pub(crate) fn take(&mut self) -> Option<Result<(Status, Vec<u8>)>> {
        let mut e = self.comm.engine();
        let id = self.id?;
        if !e.core.recv_finished(id) {
            return None;
        }
        self.id = None;
        Some(e.take_recv(id).map(|(status, mut data)| {
            data.truncate(status.len);
            (self.comm.local_status(status), data)
        }))
    }
}

impl Drop for CollRecv {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.comm.engine().cancel_recv(id);
        }
    }
}
