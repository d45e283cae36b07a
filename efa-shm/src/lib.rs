//! Fast boxes: efa-rs's own intra-host channel for small ordered messages.
//!
//! Ranks on one host exchange small messages (eager data and protocol control messages)
//! through single-producer single-consumer rings in shared memory, one per ordered pair of
//! local ranks, in the spirit of Open MPI vader's fast boxes (`opal/mca/btl/vader`). A send
//! is a copy into the peer's ring and a release store; a receive is an acquire load of the
//! next record's header. There are no locks and no system calls on the data path. Large
//! messages do not belong here: the communicator keeps libfabric's `shm` provider for
//! those (single-copy RMA).
//!
//! # Quick start
//! ```no_run
//! use std::time::Duration;
//! use efa_shm::{Config, Fastboxes};
//!
//! # fn main() -> Result<(), efa_shm::Error> {
//! // Local rank 0 of 2 on this host, in the job keyed "job-42" (equal on every local rank).
//! let mut fb = Fastboxes::create("job-42", 0, 2, &Config::default())?;
//! fb.attach_all(Duration::from_secs(10))?; // waits until rank 1 has created its segment
//! while !fb.try_send(1, b"header", b"payload")? {
//!     fb.poll(|_, _| {})?; // ring full: keep draining our own side meanwhile
//! }
//! fb.poll(|src, bytes| println!("{} bytes from local rank {src}", bytes.len()))?;
//! # Ok(()) }
//! ```
//!
//! # Layout and protocol
//! Each local rank owns a segment holding its *inbound* rings, one per peer; peers map it
//! and write into their own ring there. See [`ring`] for the record format and the memory
//! ordering argument, [`segment`] for names, permissions and cleanup.
//!
//! # Ordering
//! Messages from one sender are delivered in the order they were sent (one ring per ordered
//! pair). [`Fastboxes::poll`] visits senders in turn; there is no order between senders.
//!
//! # Thread safety
//! [`Fastboxes`] is `Send` but not `Sync`: sends and polls take `&mut self`. Each ring has
//! exactly one producer and one consumer process, which is what makes the rings lock-free.
//!
//! # Resource cleanup
//! No file is left in `/dev/shm`: a segment's name is unlinked as soon as every peer has
//! mapped it, else when its owner detaches or exits (`atexit`), else (owner killed by
//! `SIGKILL`) by the next [`Fastboxes::create`] on the host. See [`segment`].
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod owner;
pub mod ring;
pub mod segment;

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use segment::{reclaim_stale_segments, Reclaimed};

use ring::{max_message_for, max_message_limit, Consumer, Producer, MAX_CAP, MIN_CAP};
use segment::{Attached, Mapping, Own};

/// Errors of the fast boxes; each says what happened and to which file or peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A peer index outside `0..n_local`, or this rank's own index.
    #[error("no local peer {peer}: local ranks are 0..{n_local} and this rank is {me}")]
    UnknownPeer {
        /// The index given.
        peer: usize,
        /// Number of local ranks.
        n_local: usize,
        /// This rank's local index.
        me: usize,
    },
    /// The peer's segment has not been attached ([`Fastboxes::attach`]) yet.
    #[error("local peer {peer} is not attached yet: call attach first")]
    NotAttached {
        /// The peer's local index.
        peer: usize,
    },
    /// The message is larger than a ring carries ([`Fastboxes::max_message`]); send it
    /// another way.
    #[error("message of {len} bytes exceeds the fast-box limit of {max} bytes")]
    TooLarge {
        /// Header plus payload bytes.
        len: usize,
        /// [`Fastboxes::max_message`].
        max: usize,
    },
    /// [`Config::ring_bytes`] is not a power of two in 4 KiB..=1 GiB, [`Config::max_message`]
    /// is 0 or above half the ring less 16, `n_local` is 0, or the local index is not below
    /// it.
    #[error("invalid fast-box setup: {what}")]
    InvalidSetup {
        /// What is wrong.
        what: String,
    },
    /// A segment of this name exists and its owner is alive (another job with the same job
    /// key, or a second world of this one): use a key unique to the job.
    #[error("fast-box segment {} is in use (owner pid {owner:?})", path.display())]
    InUse {
        /// The segment's path.
        path: PathBuf,
        /// Its owner's pid, if its header could be read.
        owner: Option<u32>,
    },
    /// Creating or sizing this rank's segment failed (`/dev/shm` full or missing, limits).
    #[error("cannot create fast-box segment {}: {source}", path.display())]
    Create {
        /// The segment's path.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// Opening a peer's segment failed for another reason than its absence.
    #[error("cannot open fast-box segment {}: {source}", path.display())]
    Attach {
        /// The segment's path.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// `mmap` failed (address space or `vm.max_map_count` exhausted).
    #[error("cannot map fast-box segment {}: {source}", path.display())]
    Map {
        /// The segment's path.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// The peer has not created (or finished creating) its segment yet. [`Fastboxes::attach_all`]
    /// retries this until its deadline.
    #[error("fast-box segment {} does not exist yet", path.display())]
    NotReady {
        /// The segment's path.
        path: PathBuf,
    },
    /// A file under a segment's name is not a regular file of this user: refused.
    #[error("fast-box segment {} belongs to uid {owner_uid}, not {me} (or is no regular file): refused", path.display())]
    Foreign {
        /// The path.
        path: PathBuf,
        /// The file's owner.
        owner_uid: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// The peer created its segment with another number of local ranks, index or ring size:
    /// the ranks were started with different settings.
    #[error("fast-box segment {} has (n_local, index, ring bytes) = {found:?}, expected {expected:?}: ranks disagree on the setup", path.display())]
    Mismatch {
        /// The path.
        path: PathBuf,
        /// What this rank expected.
        expected: (usize, usize, usize),
        /// What the segment holds.
        found: (usize, usize, usize),
    },
    /// A record in the ring from `peer` has an impossible length: the segment was
    /// overwritten by something else. The ring is not read any further.
    #[error("corrupt fast-box record from local peer {peer} at offset {offset} (length {len})")]
    Corrupt {
        /// The sender's local index.
        peer: usize,
        /// Offset of the record in the ring.
        offset: usize,
        /// The length it claims.
        len: u32,
    },
    /// [`Fastboxes::attach_all`] passed its deadline with peers still missing.
    #[error("local peers {missing:?} did not create their fast-box segments within {waited:?}")]
    Timeout {
        /// Local indices of the peers not attached.
        missing: Vec<usize>,
        /// How long it waited.
        waited: Duration,
    },
}

/// Fast-box settings. [`Config::default`] gives 64 KiB rings carrying messages of up to a
/// quarter of that.
#[derive(Debug, Clone)]
pub struct Config {
    ring_bytes: usize,
    max_message: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ring_bytes: 64 * 1024,
            max_message: None,
        }
    }
}

impl Config {
    /// Data bytes of each ring: a power of two from 4 KiB to 1 GiB. Default 64 KiB. Messages
    /// of up to a quarter of it (minus 16 bytes) fit; each rank maps `(n_local - 1)` rings of
    /// its own and one in each peer's segment, so memory grows with the square of the ranks
    /// per host (64 KiB x 63 x 64 = 252 MiB of `/dev/shm` for 64 ranks).
    pub fn ring_bytes(mut self, bytes: usize) -> Self {
        self.ring_bytes = bytes;
        self
    }

    /// The ring size set.
    pub fn get_ring_bytes(&self) -> usize {
        self.ring_bytes
    }

    /// Largest message (header plus payload) in bytes that a ring takes, at most half the
    /// ring less 16 bytes ([`ring::max_message_limit`]). Default: a quarter of the ring less
    /// 16 ([`ring::max_message_for`]), so that a ring holds at least four of the largest.
    /// Larger limits carry larger messages through rings of a given size (smaller rings stay
    /// in the caches: 64 KiB rings carried 256 B-1 KiB messages 0.1-0.25 us faster than
    /// 128 KiB rings in `fbox_pingpong`), at the price of rings that fill sooner.
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = Some(bytes);
        self
    }
}

/// One rank's fast boxes: its inbound rings (its segment) and its rings in each attached
/// peer's segment.
#[derive(Debug)]
pub struct Fastboxes {
    job: String,
    me: usize,
    n_local: usize,
    cap: usize,
    max_message: usize,
    /// Inbound, by slot: (sender's local index, consumer). Dropped before `own`.
    rx: Vec<(usize, Consumer)>,
    /// Where the next poll starts (fairness between senders).
    next_rx: usize,
    /// Outbound, by peer index (None for self and unattached peers). Dropped before `peers`.
    tx: Vec<Option<Producer>>,
    peers: Vec<Option<Mapping>>,
    /// Unlinks this rank's name when dropped (last: the rings above point into it).
    own: Own,
}

/// The slot of sender `from` in the segment of `to`.
fn slot(from: usize, to: usize) -> usize {
    if from < to {
        from
    } else {
        from - 1
    }
}

/// Records taken from one ring per visit of [`Fastboxes::poll`].
const POLL_BATCH: usize = 32;

impl Fastboxes {
    /// Creates this rank's segment: local rank `me` of `n_local` on this host, in the job
    /// named by `job`, a key equal on every local rank of the job and different for every
    /// other job running on the host at the same time (for example the job's rendezvous
    /// address and the world's instance). First removes segments left by killed processes
    /// ([`reclaim_stale_segments`]).
    ///
    /// # Errors
    /// [`Error::InvalidSetup`] for a ring size that is not a power of two in 4 KiB..=1 GiB,
    /// a largest message of 0 or above half the ring less 16, `n_local == 0` or
    /// `me >= n_local`; [`Error::InUse`] when a live process owns a segment
    /// of the same name; [`Error::Create`] / [`Error::Map`] when the system refuses.
    pub fn create(
        job: &str,
        me: usize,
        n_local: usize,
        config: &Config,
    ) -> Result<Fastboxes, Error> {
        let cap = config.ring_bytes;
        if !cap.is_power_of_two() || !(MIN_CAP..=MAX_CAP).contains(&cap) {
            return Err(Error::InvalidSetup {
                what: format!(
                    "ring size {cap} bytes is not a power of two in {MIN_CAP}..={MAX_CAP}"
                ),
            });
        }
        if me >= n_local {
            return Err(Error::InvalidSetup {
                what: format!("local index {me} is not below the number of local ranks {n_local}"),
            });
        }
        let max_message = config.max_message.unwrap_or(max_message_for(cap));
        if max_message == 0 || max_message > max_message_limit(cap) {
            return Err(Error::InvalidSetup {
                what: format!(
                    "largest message {max_message} bytes is not in 1..={} for {cap}-byte rings",
                    max_message_limit(cap)
                ),
            });
        }
        let n_rings = n_local - 1;
        if n_rings
            .checked_mul(ring::ring_bytes(cap))
            .is_none_or(|b| b > isize::MAX as usize / 2)
        {
            return Err(Error::InvalidSetup {
                what: format!("{n_local} local ranks with {cap}-byte rings do not fit in memory"),
            });
        }
        let own = segment::create(job, me, n_local, cap)?;
        let rx = (0..n_local)
            .filter(|&j| j != me)
            .map(|j| (j, Consumer::new(own.map.ring(slot(j, me), cap))))
            .collect();
        let fb = Fastboxes {
            job: job.to_owned(),
            me,
            n_local,
            cap,
            max_message,
            rx,
            next_rx: 0,
            tx: (0..n_local).map(|_| None).collect(),
            peers: (0..n_local).map(|_| None).collect(),
            own,
        };
        if n_local == 1 {
            // No peer will ever map it.
            fb.own.unlink();
        }
        Ok(fb)
    }

    /// This rank's local index.
    pub fn local_index(&self) -> usize {
        self.me
    }

    /// Number of local ranks.
    pub fn n_local(&self) -> usize {
        self.n_local
    }

    /// Largest message (header plus payload) in bytes that [`Fastboxes::try_send`] takes
    /// ([`Config::max_message`]; by default a quarter of the ring less 16 bytes of record
    /// header, 16368 for the default 64 KiB rings).
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// The path of this rank's segment (unlinked once every peer has mapped it).
    pub fn segment_path(&self) -> &std::path::Path {
        self.own.map.path()
    }

    /// Whether `peer`'s segment is mapped.
    pub fn is_attached(&self, peer: usize) -> bool {
        self.tx.get(peer).is_some_and(Option::is_some)
    }

    fn check_peer(&self, peer: usize) -> Result<(), Error> {
        if peer >= self.n_local || peer == self.me {
            return Err(Error::UnknownPeer {
                peer,
                n_local: self.n_local,
                me: self.me,
            });
        }
        Ok(())
    }

    /// Maps `peer`'s segment, once it exists (no waiting; a no-op when already attached).
    /// The last peer to map a segment unlinks its name.
    ///
    /// # Errors
    /// [`Error::UnknownPeer`]; [`Error::NotReady`] when the peer has not created its segment
    /// yet; [`Error::Foreign`], [`Error::Mismatch`], [`Error::Attach`], [`Error::Map`].
    pub fn attach(&mut self, peer: usize) -> Result<(), Error> {
        self.check_peer(peer)?;
        if self.tx[peer].is_some() {
            return Ok(());
        }
        let Attached { map, unlinked } = segment::attach(&self.job, peer, self.n_local, self.cap)?;
        if unlinked {
            tracing::trace!(
                peer,
                "fast-box segment unlinked: every local rank has mapped it"
            );
        }
        self.tx[peer] = Some(Producer::new(map.ring(slot(self.me, peer), self.cap)));
        self.peers[peer] = Some(map);
        Ok(())
    }

    /// Attaches every peer, retrying those whose segment is not ready (every millisecond)
    /// until `timeout` has passed.
    ///
    /// # Errors
    /// [`Error::Timeout`] naming the peers still missing; any other error of
    /// [`Fastboxes::attach`] at once.
    pub fn attach_all(&mut self, timeout: Duration) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            let mut missing = Vec::new();
            let me = self.me;
            for p in (0..self.n_local).filter(|&p| p != me) {
                match self.attach(p) {
                    Ok(()) => {}
                    Err(Error::NotReady { .. }) => missing.push(p),
                    Err(e) => return Err(e),
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(Error::Timeout { missing, waited });
            }
            // Start-up only (peers creating their segments), never on the message path.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queues one message, `header` followed by `payload`, to local rank `peer`. Returns
    /// `Ok(true)` when it was queued, `Ok(false)` when `peer`'s ring is full now (nothing
    /// was written; try again after the peer has polled, or send another way). Never
    /// blocks, never makes a system call.
    ///
    /// # Errors
    /// [`Error::UnknownPeer`] for an index outside `0..n_local` or this rank's own;
    /// [`Error::NotAttached`] before [`Fastboxes::attach`]; [`Error::TooLarge`] when
    /// `header.len() + payload.len()` exceeds [`Fastboxes::max_message`].
    #[inline]
    pub fn try_send(&mut self, peer: usize, header: &[u8], payload: &[u8]) -> Result<bool, Error> {
        let len = header.len() + payload.len();
        if len > self.max_message {
            return Err(Error::TooLarge {
                len,
                max: self.max_message,
            });
        }
        match self.tx.get_mut(peer) {
            Some(Some(p)) => Ok(p.push(header, payload)),
            Some(None) if peer != self.me => Err(Error::NotAttached { peer }),
            _ => Err(Error::UnknownPeer {
                peer,
                n_local: self.n_local,
                me: self.me,
            }),
        }
    }

    /// Whether any message is waiting (one load per peer; no side effect).
    pub fn has_incoming(&self) -> bool {
        self.rx.iter().any(|(_, c)| c.ready())
    }

    /// Hands the waiting messages to `f(sender's local index, header + payload bytes)`,
    /// each sender's in the order it sent them (at most 32 per sender per call, so that a
    /// fast sender cannot keep the call going). Returns how many were handed over. Never
    /// blocks, never makes a system call. The bytes are valid only during `f`: copy what
    /// you keep.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a ring holds an impossible record (that ring is not read
    /// again; the others are still polled by later calls).
    pub fn poll(&mut self, mut f: impl FnMut(usize, &[u8])) -> Result<usize, Error> {
        let n = self.rx.len();
        let mut total = 0;
        for k in 0..n {
            let i = (self.next_rx + k) % n;
            let (src, c) = &mut self.rx[i];
            let src = *src;
            total += c
                .drain(POLL_BATCH, |b| f(src, b))
                .map_err(|b| Error::Corrupt {
                    peer: src,
                    offset: b.offset,
                    len: b.len,
                })?;
        }
        if n > 0 {
            self.next_rx = (self.next_rx + 1) % n;
        }
        Ok(total)
    }

    /// Unmaps every segment and unlinks this rank's name if a peer has not already done so.
    /// Messages still in rings are dropped. Dropping a [`Fastboxes`] does the same (the
    /// fields drop in order: ring ends, peers' mappings, then this rank's segment, which
    /// unlinks its name).
    pub fn detach(self) {}
}
