//! Rendezvous key-value store: how ranks find each other before any fabric exists.
//!
//! Every rank publishes a small blob (its [`Card`](crate::placement::Card): host identity,
//! endpoint addresses, subnets) under a key and reads everyone else's. Three implementations
//! of the [`Store`] trait exist:
//!
//! * [`TcpStore`]: a client of a [`TcpStoreServer`]. The server is a tokio server on a
//!   dedicated background thread with its own runtime, so callers stay synchronous. It is
//!   served either by rank 0 ([`TcpStore::serve`]) or by the launcher (`efarun` serves it for
//!   the lifetime of the job and sets `EFA_STORE_SERVED=1`; then every rank, rank 0 included,
//!   only connects with [`TcpStore::connect`]).
//! * [`FileStore`]: a directory on a filesystem all ranks share (`EFA_STORE=file:///path`).
//!   Writes are atomic (temporary file + rename); reads poll with backoff.
//! * [`MemoryStore`]: in-process, for a job of one rank and for tests.
//!
//! # Waiting
//!
//! [`Store::get`] waits until the key is present or the deadline passes; it always looks at
//! least once, even with a deadline in the past. On the TCP store the wait happens on the
//! server, which answers as soon as the key is set: there is no polling over the network.
//!
//! # Keeping the server up long enough
//!
//! When rank 0 serves the store, its process must not tear the server down while other ranks
//! still read from it. The server therefore tracks which ranks have connected (each client
//! says hello with its rank) and which have gone again (an explicit [`TcpStore::close`], or
//! the connection dropping because the client was dropped or its process died). The serving
//! rank's [`TcpStore::close`] and `Drop` wait until every rank of the world has come and gone,
//! bounded by a deadline ([`TcpStore::set_linger`] for `Drop`, default 10 s), and only then
//! shut the server down. When the launcher serves the store, none of this is needed.
//! `Drop` does not wait for ranks that failed or never joined ([`Store::ranks_failed`],
//! which the bootstrap's `exchange_all` reports), nor at all once the job has failed
//! ([`Store::job_failed`]).
//!
//! # When the server fails
//!
//! A client that knows who serves its store ([`TcpStore::connect_served`]; every rank that
//! the bootstrap connects does) names it in
//! [`StoreError::ServerFailed`]: "rank 0, which serves the store at 127.0.0.1:29501, closed
//! the connection ...". It fails at once when it can tell that the server is gone: the
//! server closed or reset the connection, or refused a new one although it listens before
//! any rank starts (efarun) or had accepted one of this rank's before. A server that cannot
//! be reached at all (rank 0 may not have started yet) or does not answer (stopped, for
//! example with SIGSTOP) is reported at the caller's deadline, plus at most 2 s: every read
//! and write of a request ends by then.
//!
//! # Protocol
//!
//! Frames are a big-endian `u32` length followed by that many bytes, at most
//! [`MAX_FRAME`] bytes. A request starts with an opcode byte:
//! `1 HELLO rank:u32`, `2 SET key value`, `3 GET key wait_ms:u64`, `4 LEAVE`,
//! `5 HELLO_AUTH rank:u32 token`, `6 PUBLISH exchange rank:u32 world:u32 group value`,
//! `7 GATHER exchange world:u32 selector wait_ms:u64` (selector: `0` all, `1` then a group,
//! `2` nobody), where a key, an exchange or a group is `len:u32` + UTF-8 bytes and a value or
//! a token is the rest of the frame. A reply starts with a status byte: `0` value follows
//! (for GATHER: `count:u32`, then `rank:u32 len:u32 value` per entry), `1` not found (the
//! wait expired; for GATHER the missing ranks follow, `u32` each), `2` error text follows,
//! `3` refused (text follows, then the server closes the connection), `4` (to PUBLISH and
//! GATHER only) the exchange is used inconsistently (the exchange as a key, then the reason
//! text: [`StoreError::InvalidExchange`]). The protocol has no version number: a server
//! answers an opcode it does not know with the error `unknown opcode N`, which a client
//! reports as [`StoreError::ServerOutdated`]. PUBLISH stores its
//! value under `exchange/rank` too, so GET reads one rank's entry. The token rules below
//! apply to every request alike.
//! One request is in flight per connection; a [`TcpStore`] serialises its callers.
//!
//! The server trusts no client. It buffers a frame's bytes as they arrive (an announced
//! length costs nothing), and closes a connection that announces a frame over
//! [`MAX_FRAME`] bytes, that has not said HELLO within 30 s of connecting (and, when more
//! than 256 have not, the oldest of them that has been waiting for at least 2 s), that
//! takes over 30 s to finish a frame it started or to read a reply, or that sends a request
//! while its GET or GATHER waits. A connection that closes while either waits departs at once. A
//! client whose connection is dropped before HELLO is answered reconnects until its
//! deadline.
//!
//! # Who may join
//!
//! A TCP store is reachable by anyone who can reach its port, so a job can carry a shared
//! secret, a [`StoreToken`] (`EFA_STORE_TOKEN`; `efarun` generates one per job). A server
//! with a token answers a connection only after its first request, a `HELLO_AUTH`, carried
//! the same token (compared in constant time). A server without a token accepts only clients
//! without one (plain `HELLO`), so a job whose ranks disagree about the token fails at once
//! on both sides instead of half-working. A refused client gets [`StoreError::Refused`] at
//! once, not a timeout; the server logs a warning naming the peer's address, closes that
//! connection and goes on serving the others. Before a connection of a server with a token
//! has presented it, its first frame may be no longer than a `HELLO_AUTH` can be; a longer
//! one is refused as soon as its length arrives, without buffering it.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

/// Largest frame (request or reply) the TCP store accepts, in bytes: 64 MiB.
pub const MAX_FRAME: usize = 64 << 20;

/// Longest key any store accepts, in bytes.
pub const MAX_KEY: usize = 1024;

/// Default I/O timeout of a [`TcpStore`] for requests that have no deadline of their own.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time the serving rank's `Drop` waits for the other ranks to leave the store.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(10);

/// What went wrong while talking to a rendezvous store.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The key was not set before the deadline. Usually the rank that should have set it
    /// has not started, crashed, or uses a different `EFA_STORE`; see
    /// [`StoreError::missing_rank`].
    #[error("key `{key}` did not appear in the store within {waited:?}")]
    Timeout {
        /// The key that never appeared.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// Not every rank published in the exchange before the deadline ([`Store::gather`]).
    /// Those ranks have not started, crashed, or use a different `EFA_STORE`.
    #[error("{} of {world} ranks did not publish in exchange `{exchange}` within {waited:?}", missing.len())]
    Incomplete {
        /// The exchange.
        exchange: String,
        /// The size of the exchange's world.
        world: u32,
        /// Every rank that had not published, ascending.
        missing: Vec<u32>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// An exchange was used inconsistently: a rank not below the world size, or two ranks
    /// giving different world sizes for the same exchange. A bug in the caller, or two jobs
    /// sharing one store and exchange name.
    #[error("exchange `{exchange}` used inconsistently: {reason}")]
    InvalidExchange {
        /// The exchange.
        exchange: String,
        /// What is inconsistent.
        reason: String,
    },
    /// No connection to the store server could be made before the deadline. Check that the
    /// serving process (rank 0 or the launcher) runs and that the address is reachable.
    #[error("could not reach the store at {addr} within {waited:?}: {source} (is the process that serves it, rank 0 or the launcher, running, and is EFA_STORE the same on every rank?)")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// How long connecting was retried.
        waited: Duration,
        /// The last connection error.
        #[source]
        source: io::Error,
    },
    /// The server could not listen on the address. The address must belong to the machine
    /// of the serving rank and the port must be free; otherwise set `EFA_STORE`.
    #[error("could not serve the store on {addr}: {source} (is this rank running on that host, and is the port free? set EFA_STORE=host:port to choose)")]
    Bind {
        /// The address that could not be bound.
        addr: String,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// An address did not resolve or was malformed.
    #[error("store address `{addr}` is not usable: {reason}{}", source.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    BadAddress {
        /// The address given.
        addr: String,
        /// Why it is not usable.
        reason: String,
        /// The resolver's error, when it gave one.
        #[source]
        source: Option<io::Error>,
    },
    /// Reading or writing the store failed (socket or file I/O).
    #[error("store {location}: {op} failed: {source}")]
    Io {
        /// Server address or directory.
        location: String,
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The peer spoke something other than the store protocol (or a different version).
    #[error("store at {addr} sent a malformed message: {detail}")]
    Protocol {
        /// The server or client address.
        addr: String,
        /// What was wrong.
        detail: String,
    },
    /// The server reported an error for this request.
    #[error("store at {addr} refused the request: {message}")]
    Server {
        /// The server address.
        addr: String,
        /// The server's message.
        message: String,
    },
    /// The server does not know a request this program sent ([`Store::publish`] and
    /// [`Store::gather`] are newer than the rest of the protocol): it comes from an older
    /// efa-rs release than the program, typically an older `efarun` on the `PATH`. Start the
    /// job with the `efarun` of the program's release (or rebuild the program against the
    /// launcher's). The store protocol carries no version: the server's "unknown opcode"
    /// answer to the request is how the client tells.
    #[error("{server}, which serves the store at {addr}, does not know the {request} request: it is from an older efa-rs release than this program; start the job with the efarun of the program's release (or rebuild the program against the launcher's)")]
    ServerOutdated {
        /// Who serves the store: `efarun`, `rank 0`, or `the server` when not known.
        server: String,
        /// The store's address.
        addr: String,
        /// The request it does not know: `PUBLISH`, `GATHER`.
        request: &'static str,
    },
    /// The key is empty, too long or otherwise unusable.
    #[error("invalid store key `{key}`: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The value does not fit in one frame.
    #[error("value for `{key}` is {len} bytes; the store limit is {max}")]
    ValueTooLarge {
        /// The key.
        key: String,
        /// The value's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The serving rank closed the store while some ranks had not yet finished with it (or
    /// never connected). Those ranks may fail to rendezvous.
    #[error("ranks {ranks:?} were still using the store (or never connected) after {waited:?}")]
    StillInUse {
        /// Ranks that had not come and gone.
        ranks: Vec<u32>,
        /// How long the server waited for them.
        waited: Duration,
    },
    /// The server refused this client because its [`StoreToken`] (`EFA_STORE_TOKEN`) was
    /// wrong, missing, or given to a server that has none. Returned at once by
    /// [`TcpStore::connect_with_token`]; retrying cannot help.
    #[error("the store at {addr} refused this rank: {reason}. Every rank of a job needs the same EFA_STORE_TOKEN, or none has one: efarun sets it for its ranks; with mpirun pass it on with `-x EFA_STORE_TOKEN`, with srun with `--export=ALL,EFA_STORE_TOKEN`")]
    Refused {
        /// The server address.
        addr: String,
        /// The server's reason (`wrong EFA_STORE_TOKEN`, ...).
        reason: String,
    },
    /// The process that serves the store (named: `rank 0`, `efarun`) failed as far as this
    /// rank can tell, and the message names it: "rank 0, which serves the store at
    /// 127.0.0.1:29501, closed the connection ...". Returned by a [`TcpStore`] that knows its
    /// server ([`TcpStore::connect_served`], and every store the bootstrap connects):
    ///
    /// * at once when a server that listens before any rank starts (efarun) refuses the
    ///   connection, or any server refuses it after having accepted one: it has exited;
    /// * at once when a connected server closes or resets the connection;
    /// * by the caller's deadline (plus at most 2 s) when the server cannot be reached at
    ///   all (it may not have started) or does not answer (stopped, for example by SIGSTOP
    ///   or a debugger, or overloaded).
    #[error("{server}, which serves the store at {addr}, {what}")]
    ServerFailed {
        /// Who serves the store: `rank 0`, `efarun`, `the launcher`.
        server: String,
        /// The store's address.
        addr: String,
        /// What happened, and what it means.
        what: String,
    },
    /// A [`StoreToken`] that cannot be used (too short, too long, or not printable ASCII).
    #[error("unusable store token: {reason}")]
    InvalidToken {
        /// What is wrong with it.
        reason: String,
    },
    /// A file store's directory cannot be used: its parent does not exist, it is not a
    /// directory, or another user owns it. Returned at once by [`FileStore::open`].
    #[error("file store directory {dir}: {reason}")]
    Directory {
        /// The directory.
        dir: String,
        /// What is wrong and how to fix it.
        reason: String,
        /// The file system's error, when a call failed (`{:?}` lists it as the cause).
        #[source]
        source: Option<io::Error>,
    },
}

impl StoreError {
    /// For a [`StoreError::Timeout`], the key that never appeared.
    pub fn missing_key(&self) -> Option<&str> {
        match self {
            StoreError::Timeout { key, .. } => Some(key),
            _ => None,
        }
    }

    /// For a [`StoreError::Timeout`] on a key that encodes a rank as its last path segment
    /// (`card/3`, `exchange/init/3`), that rank: the rank that never joined.
    pub fn missing_rank(&self) -> Option<u32> {
        self.missing_key().and_then(rank_of_key)
    }
}

/// The rank encoded in a key's last `/`-separated segment, if it is a number:
/// `rank_of_key("card/7") == Some(7)`.
pub fn rank_of_key(key: &str) -> Option<u32> {
    key.rsplit('/').next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Exchanges: publish once, gather many in one request
// ---------------------------------------------------------------------------------------

/// Which entries of an exchange [`Store::gather`] returns once every rank has published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Members {
    /// Every rank's entry, in rank order (`N` entries: what `exchange_all` needs).
    All,
    /// The entries published with this group (for example the ranks of one host), in rank
    /// order. The empty group is a group like any other.
    Group(String),
    /// None: the gather only waits until every rank has published (a barrier).
    Nobody,
}

/// The key under which rank `rank`'s entry of exchange `exchange` is stored, so that a
/// plain [`Store::get`] reads one peer's entry (the lazy look-up of a peer's card).
pub fn entry_key(exchange: &str, rank: u32) -> String {
    format!("{exchange}/{rank}")
}

/// Which ranks of an exchange among `world` ranks have published, and in which groups.
/// Kept by the TCP server and the in-process store (the file store reads the same facts
/// from file names).
#[derive(Debug, Clone, Default)]
pub(crate) struct ExchangeIndex {
    world: u32,
    published: Vec<bool>,
    count: u32,
    groups: HashMap<String, BTreeSet<u32>>,
}

impl ExchangeIndex {
    /// An exchange among `world` ranks that nobody has published in yet.
    pub(crate) fn new(world: u32) -> Self {
        Self {
            world,
            published: vec![false; world as usize],
            count: 0,
            groups: HashMap::new(),
        }
    }

    /// Records `rank`'s entry in `group`; publishing again (a retry) changes nothing.
    ///
    /// # Errors
    ///
    /// A message when `rank` is not below the world size or `world` disagrees with the
    /// size the exchange was started with.
    pub(crate) fn publish(&mut self, rank: u32, world: u32, group: &str) -> Result<(), String> {
        self.check_world(world)?;
        if rank >= self.world {
            return Err(format!(
                "rank {rank} published in an exchange among {} ranks",
                self.world
            ));
        }
        if !std::mem::replace(&mut self.published[rank as usize], true) {
            self.count += 1;
            self.groups
                .entry(group.to_owned())
                .or_default()
                .insert(rank);
        }
        Ok(())
    }

    /// Whether `world` is the size the exchange was started with.
    pub(crate) fn check_world(&self, world: u32) -> Result<(), String> {
        if world == self.world {
            Ok(())
        } else {
            Err(format!(
                "an exchange among {world} ranks, but it was started among {}",
                self.world
            ))
        }
    }

    /// Whether every rank has published.
    pub(crate) fn complete(&self) -> bool {
        self.count == self.world
    }

    /// The ranks that have not published, ascending.
    pub(crate) fn missing(&self) -> Vec<u32> {
        (0..self.world)
            .filter(|&r| !self.published[r as usize])
            .collect()
    }

    /// The ranks `members` selects, ascending.
    pub(crate) fn members(&self, members: &Members) -> Vec<u32> {
        match members {
            Members::All => (0..self.world).collect(),
            Members::Group(g) => self
                .groups
                .get(g.as_str())
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Members::Nobody => Vec::new(),
        }
    }

    /// The entries `members` selects, as `(rank, value)` in rank order, read from `map`,
    /// where the TCP server and the in-process store keep them under [`entry_key`] (an
    /// entry removed since, by [`Store::delete`], reads as empty).
    pub(crate) fn entries<'m>(
        &self,
        exchange: &str,
        members: &Members,
        map: &'m HashMap<String, Vec<u8>>,
    ) -> Vec<(u32, &'m [u8])> {
        self.members(members)
            .into_iter()
            .map(|r| {
                let v = map.get(&entry_key(exchange, r));
                (r, v.map_or(&[][..], Vec::as_slice))
            })
            .collect()
    }
}

/// Encodes gathered entries: `count:u32`, then per entry `rank:u32 len:u32 bytes`
/// (big-endian). The body of a TCP GATHER reply and of a file store's combined file.
pub(crate) fn encode_gathered<'a>(
    entries: impl ExactSizeIterator<Item = (u32, &'a [u8])>,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + entries.len() * 8);
    b.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (rank, v) in entries {
        b.extend_from_slice(&rank.to_be_bytes());
        b.extend_from_slice(&(v.len() as u32).to_be_bytes());
        b.extend_from_slice(v);
    }
    b
}

/// Decodes [`encode_gathered`]'s form.
///
/// # Errors
///
/// A message saying where the bytes stop making sense.
pub(crate) fn decode_gathered(b: &[u8]) -> Result<Vec<(u32, Vec<u8>)>, String> {
    let u32_at = |at: usize| -> Result<u32, String> {
        b.get(at..at + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
            .ok_or_else(|| format!("gathered entries end at byte {} inside a number", b.len()))
    };
    let count = u32_at(0)? as usize;
    // Each entry takes at least 8 bytes: a count larger than that is a lie, not a reason
    // to allocate.
    if count > b.len() / 8 {
        return Err(format!("{count} entries announced in {} bytes", b.len()));
    }
    let mut out = Vec::with_capacity(count);
    let mut at = 4;
    for _ in 0..count {
        let rank = u32_at(at)?;
        let len = u32_at(at + 4)? as usize;
        at += 8;
        let v = b
            .get(at..at + len)
            .ok_or_else(|| format!("entry of rank {rank} ({len} bytes) is cut short"))?;
        out.push((rank, v.to_vec()));
        at += len;
    }
    if at != b.len() {
        return Err(format!("{} bytes after the last entry", b.len() - at));
    }
    Ok(out)
}

/// A job's shared secret for the TCP store (`EFA_STORE_TOKEN`): only clients that present it
/// may use a store served with it. See the [module docs](self#who-may-join).
///
/// The `Debug` form does not show the secret; comparison is in constant time.
#[derive(Clone, Eq)]
pub struct StoreToken(Vec<u8>);

impl StoreToken {
    /// Shortest token accepted, in bytes.
    pub const MIN_LEN: usize = 16;
    /// Longest token accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// A token from its text (for example the value of `EFA_STORE_TOKEN`).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidToken`] if it is shorter than [`StoreToken::MIN_LEN`] or longer
    /// than [`StoreToken::MAX_LEN`] bytes, or holds anything but printable ASCII without
    /// spaces. The message does not repeat the secret.
    pub fn new(text: &str) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::InvalidToken {
            reason: format!(
                "{reason}; generate one with `openssl rand -hex 32` (efarun makes its own)"
            ),
        };
        let n = text.len();
        if n < Self::MIN_LEN {
            return Err(bad(format!(
                "it has {n} characters, at least {} are needed",
                Self::MIN_LEN
            )));
        }
        if n > Self::MAX_LEN {
            return Err(bad(format!(
                "it has {n} characters, at most {} are allowed",
                Self::MAX_LEN
            )));
        }
        if let Some(pos) = text.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(bad(format!(
                "character {} is not printable ASCII (spaces and control characters are not allowed)",
                pos + 1
            )));
        }
        Ok(Self(text.as_bytes().to_vec()))
    }

    /// A fresh random token: 32 bytes from the operating system's random source
    /// (`/dev/urandom`), written as 64 hexadecimal digits.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] if `/dev/urandom` cannot be read.
    pub fn generate() -> Result<Self, StoreError> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(|source| StoreError::Io {
                location: "/dev/urandom".into(),
                op: "generating a store token",
                source,
            })?;
        Ok(Self(hex(&raw).into_bytes()))
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        // Only built from printable ASCII (checked in `new`) or hex digits.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Whether `other` is this token. Takes the same time whatever the position of the first
    /// differing byte, so timing does not reveal the secret byte by byte (the length is not
    /// secret: efarun's tokens are always 64 characters).
    pub fn matches(&self, other: &[u8]) -> bool {
        if self.0.len() != other.len() {
            return false;
        }
        let diff = self
            .0
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl PartialEq for StoreToken {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.0)
    }
}

impl std::hash::Hash for StoreToken {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Equal tokens have equal lengths; hashing the secret itself is not needed.
        self.0.len().hash(state);
    }
}

impl fmt::Debug for StoreToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreToken(<{} characters, hidden>)", self.0.len())
    }
}

/// A rendezvous key-value store shared by all ranks of a job.
///
/// Keys are UTF-8 strings of at most [`MAX_KEY`] bytes; values are bytes. Values are
/// write-once by convention (setting a key again replaces it, but readers may have seen the
/// old value).
pub trait Store: Send + Sync + fmt::Debug {
    /// Sets `key` to `value`, waking everyone waiting for it.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidKey`], [`StoreError::ValueTooLarge`], or an I/O or protocol
    /// error talking to the store.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// As [`Store::set`], ending by `deadline`: a store whose server does not take the value
    /// by then returns an error. The default calls [`Store::set`] (for stores whose writes
    /// are local); the TCP store bounds its request by `deadline` (at least 1 s from now).
    ///
    /// # Errors
    ///
    /// As [`Store::set`].
    fn set_by(&self, key: &str, value: &[u8], deadline: Instant) -> Result<(), StoreError> {
        let _ = deadline;
        self.set(key, value)
    }

    /// Returns the value of `key`, waiting until it is set or `deadline` passes. Looks at
    /// least once even when `deadline` has already passed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Timeout`] naming the key if it did not appear in time; I/O or protocol
    /// errors otherwise.
    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError>;

    /// Publishes this rank's entry of the exchange `exchange` among `world` ranks, in
    /// `group` (for [`Members::Group`]). The entry is then readable as
    /// [`entry_key`]`(exchange, rank)` with [`Store::get`]. One request on the TCP store;
    /// two file writes (the entry and, for a non-empty group, an empty marker whose name
    /// says the group) on the file store.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidExchange`] when `rank >= world`, or when `world` differs from
    /// the size another rank gave for the same exchange (the file store keeps no size, so
    /// it cannot tell this); [`StoreError::ServerOutdated`] from a TCP server older than
    /// this request; the errors of [`Store::set_by`].
    fn publish(
        &self,
        exchange: &str,
        rank: u32,
        world: u32,
        group: &str,
        value: &[u8],
        deadline: Instant,
    ) -> Result<(), StoreError>;

    /// Waits until all `world` ranks have published in `exchange`, then returns the entries
    /// `members` selects, as `(rank, value)` in rank order. One request on the TCP store
    /// (the server waits and gathers); on the file store a directory listing per poll and
    /// one file read per entry returned (for [`Members::All`], one combined file written
    /// by `rank` 0 and read by the others, so no store costs `N` opens per rank). `rank` is
    /// the caller's rank.
    ///
    /// # Errors
    ///
    /// [`StoreError::Incomplete`] listing every rank that had not published by `deadline`;
    /// [`StoreError::InvalidExchange`] when `world` differs from the exchange's (not on the
    /// file store, as for [`Store::publish`]); [`StoreError::ServerOutdated`] from a TCP
    /// server older than this request; I/O and protocol errors.
    fn gather(
        &self,
        exchange: &str,
        rank: u32,
        world: u32,
        members: &Members,
        deadline: Instant,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError>;

    /// Waits until every key in `keys` is set, or `deadline` passes.
    ///
    /// # Errors
    ///
    /// The first [`StoreError::Timeout`] (or other error) met.
    fn wait_all(&self, keys: &[&str], deadline: Instant) -> Result<(), StoreError> {
        for key in keys {
            self.get(key, deadline)?;
        }
        Ok(())
    }

    /// Removes `key` (absent keys are fine). Stores that live only as long as one job (TCP,
    /// in-process) need not implement it; a persistent store (files) must, so that a later
    /// job with the same id cannot read this job's values.
    ///
    /// # Errors
    ///
    /// I/O errors other than the key being absent.
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _ = key;
        Ok(())
    }

    /// The store in words, for messages: `the TCP store at 127.0.0.1:4242 (served by
    /// efarun)`, `the file store in /fsx/job`. The bootstrap's `exchange_all` names it when
    /// ranks never join.
    fn describe(&self) -> String {
        "the rendezvous store".into()
    }

    /// The job has failed (a rank died, aborted or stopped answering): a serving store
    /// stops, when dropped, without waiting for ranks that may never leave. No effect on
    /// other stores.
    fn job_failed(&self) {}

    /// These ranks failed or never joined: a serving store stops, when dropped, without
    /// waiting for them to leave (a stopped rank keeps its connection open), but still
    /// waits, as usual, for the other ranks, which may still be reading. No effect on other
    /// stores.
    fn ranks_failed(&self, ranks: &[u32]) {
        let _ = ranks;
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.len() > MAX_KEY {
        "longer than MAX_KEY bytes"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidKey {
        key: key.chars().take(64).collect(),
        reason,
    })
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

// ---------------------------------------------------------------------------------------
// In-memory store
// ---------------------------------------------------------------------------------------

/// An in-process store: a map behind a mutex with a condition variable for waiters.
///
/// Used for jobs of one rank, and by tests that run several ranks as threads (share it
/// through an `Arc`).
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct MemoryState {
    map: HashMap<String, Vec<u8>>,
    exchanges: HashMap<String, ExchangeIndex>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // A panicking holder cannot leave the state half-updated (each change is one insert).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the condition variable until `ready` holds or `deadline` passes; returns
    /// the guard and whether it held.
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, MemoryState>,
        deadline: Instant,
        ready: impl Fn(&MemoryState) -> bool,
    ) -> (MutexGuard<'a, MemoryState>, bool) {
        loop {
            if ready(&state) {
                return (state, true);
            }
            let left = remaining(deadline);
            if left.is_zero() {
                return (state, false);
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Store for MemoryStore {
    fn describe(&self) -> String {
        "the in-process store".into()
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_key(key)?;
        self.lock().map.insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        let start = Instant::now();
        let (state, found) = self.wait_until(self.lock(), deadline, |s| s.map.contains_key(key));
        match state.map.get(key) {
            Some(v) if found => Ok(v.clone()),
            _ => Err(StoreError::Timeout {
                key: key.to_owned(),
                waited: start.elapsed(),
            }),
        }
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.lock().map.remove(key);
        Ok(())
    }

    fn publish(
        &self,
        exchange: &str,
        rank: u32,
        world: u32,
        group: &str,
        value: &[u8],
        _deadline: Instant,
    ) -> Result<(), StoreError> {
        let key = entry_key(exchange, rank);
        check_key(&key)?;
        let mut state = self.lock();
        state
            .exchanges
            .entry(exchange.to_owned())
            .or_insert_with(|| ExchangeIndex::new(world))
            .publish(rank, world, group)
            .map_err(|reason| invalid_exchange(exchange, reason))?;
        state.map.insert(key, value.to_vec());
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    fn gather(
        &self,
        exchange: &str,
        _rank: u32,
        world: u32,
        members: &Members,
        deadline: Instant,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        let start = Instant::now();
        let mut state = self.lock();
        state
            .exchanges
            .entry(exchange.to_owned())
            .or_insert_with(|| ExchangeIndex::new(world))
            .check_world(world)
            .map_err(|reason| invalid_exchange(exchange, reason))?;
        let (state, _) = self.wait_until(state, deadline, |s| s.exchanges[exchange].complete());
        let index = &state.exchanges[exchange];
        if !index.complete() {
            return Err(StoreError::Incomplete {
                exchange: exchange.to_owned(),
                world,
                missing: index.missing(),
                waited: start.elapsed(),
            });
        }
        Ok(index
            .entries(exchange, members, &state.map)
            .into_iter()
            .map(|(r, v)| (r, v.to_vec()))
            .collect())
    }
}

/// The error for an exchange used inconsistently (a rank out of range, two world sizes).
fn invalid_exchange(exchange: &str, reason: String) -> StoreError {
    StoreError::InvalidExchange {
        exchange: exchange.to_owned(),
        reason,
    }
}

// ---------------------------------------------------------------------------------------
// File store
// ---------------------------------------------------------------------------------------

/// A store in a directory on a filesystem all ranks share (`EFA_STORE=file:///path`).
///
/// Each key is one file, named by percent-encoding the key. [`Store::set`] writes a
/// temporary file in the same directory and renames it over the key's file, so readers see
/// either nothing or the whole value. [`Store::get`] polls with exponential backoff from
/// 1 ms up to 50 ms. On NFS, attribute caching can delay visibility by the mount's `actimeo`.
///
/// The directory is not removed when the store is dropped: no rank can know that all the
/// others have finished reading. Use a fresh directory per job.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileStore {
    /// Opens the store directory `dir`, creating it (mode 0700: only this user can read the
    /// cards or add to them) if it does not exist. Only `dir` itself is created, never its
    /// parents: a missing parent usually means a mistyped path or a filesystem that is not
    /// mounted on this host, and creating it would make this rank wait alone for ranks that
    /// look elsewhere.
    ///
    /// # Errors
    ///
    /// [`StoreError::Directory`] at once if the parent of `dir` does not exist, `dir` is not a
    /// directory, it cannot be created, or it already exists and every user may write to it
    /// (the "other" write permission). The message names the path and the fix.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = dir.into();
        let bad_because = |reason: String, source: Option<io::Error>| StoreError::Directory {
            dir: dir.display().to_string(),
            reason,
            source,
        };
        let bad = |reason: String| bad_because(reason, None);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(Self { dir }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let parent = dir.parent().unwrap_or(Path::new("/")).display().to_string();
                return Err(bad(format!(
                    "its parent directory {parent} does not exist; create it on a filesystem \
                     every rank shares (mkdir -p {parent}) or set EFA_STORE=file:///<an existing \
                     shared directory>/<job>"
                )));
            }
            Err(e) => {
                return Err(bad_because(
                    format!(
                        "cannot be created ({}); choose a directory this user may write to",
                        e.kind()
                    ),
                    Some(e),
                ))
            }
        }
        let meta = std::fs::metadata(&dir)
            .map_err(|e| bad_because(format!("cannot be read ({})", e.kind()), Some(e)))?;
        if !meta.is_dir() {
            return Err(bad(
                "exists and is not a directory; remove it or choose another path".into(),
            ));
        }
        // Group write is allowed: with user private groups (the default on Debian and Ubuntu,
        // umask 002) every directory a user makes is group-writable.
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o002 != 0 {
            return Err(bad(format!(
                "every user may write to it (mode {mode:04o}), so anyone could add cards to \
                 this job; run chmod o-w on it, or let the store create a fresh directory"
            )));
        }
        Ok(Self { dir })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file name of `key` (or of any key starting with `key`): `k`, then the key with
    /// bytes other than `[A-Za-z0-9_-]` percent-encoded.
    fn file_name(key: &str) -> String {
        let mut name = String::with_capacity(key.len() + 1);
        name.push('k'); // never starts with '.', so it cannot clash with temporary files
        for b in key.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        name
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        let name = Self::file_name(key);
        if name.len() > 240 {
            return Err(StoreError::InvalidKey {
                key: key.chars().take(64).collect(),
                reason: "too long for a file name once encoded",
            });
        }
        Ok(self.dir.join(name))
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            location: self.dir.display().to_string(),
            op,
            source,
        }
    }

    /// The file's bytes, or `None` if it does not exist.
    fn read_if_present(&self, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("reading a key")(e)),
        }
    }

    /// Who has published in `exchange`, and in which groups, from one listing of the
    /// directory (no file is opened).
    fn list_exchange(&self, exchange: &str, world: u32) -> Result<ExchangeIndex, StoreError> {
        let entries = Self::file_name(&format!("{exchange}/"));
        let markers = Self::file_name(&format!("{exchange}/@g/"));
        let mut published = Vec::new();
        let mut groups: HashMap<u32, String> = HashMap::new();
        let dir = std::fs::read_dir(&self.dir).map_err(self.io("listing the directory"))?;
        for e in dir {
            let e = e.map_err(self.io("listing the directory"))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(rest) = name.strip_prefix(&markers) {
                // `<hex group>%2F<rank>`
                if let Some((g, r)) = rest.split_once("%2F") {
                    if let (Some(g), Ok(r)) = (unhex(g), r.parse::<u32>()) {
                        groups.insert(r, g);
                    }
                }
            } else if let Some(r) = name.strip_prefix(&entries) {
                if let Ok(r) = r.parse::<u32>() {
                    published.push(r);
                }
            }
        }
        let mut index = ExchangeIndex::new(world);
        for r in published.into_iter().filter(|&r| r < world) {
            let group = groups.get(&r).map_or("", String::as_str);
            index
                .publish(r, world, group)
                .map_err(|reason| invalid_exchange(exchange, reason))?;
        }
        Ok(index)
    }
}

/// Calls `look` until it finds something or `deadline` passes (at least once), sleeping
/// with exponential backoff from 1 ms up to 50 ms between looks: how the file store waits.
fn poll<T>(
    deadline: Instant,
    mut look: impl FnMut() -> Result<Option<T>, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut backoff = Duration::from_millis(1);
    loop {
        if let Some(v) = look()? {
            return Ok(Some(v));
        }
        let left = remaining(deadline);
        if left.is_zero() {
            return Ok(None);
        }
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// The key of the empty file whose name says which group `rank` published in: the file
/// store learns the groups of an exchange from one directory listing.
fn marker_key(exchange: &str, group: &str, rank: u32) -> String {
    format!("{exchange}/@g/{}/{rank}", hex(group.as_bytes()))
}

/// The key of the file store's combined file of every entry of `exchange`.
fn all_key(exchange: &str) -> String {
    format!("{exchange}/@all")
}

/// The keys an exchange's entry of `rank` leaves in a store ([`entry_key`], and on the file
/// store its group marker and, for rank 0, the combined file), for removing them.
pub(crate) fn exchange_keys(exchange: &str, rank: u32, group: &str) -> Vec<String> {
    let mut keys = vec![entry_key(exchange, rank), marker_key(exchange, group, rank)];
    if rank == 0 {
        keys.push(all_key(exchange));
    }
    keys
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

impl Store for FileStore {
    fn describe(&self) -> String {
        format!("the file store in {}", self.dir.display())
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let tmp = self.dir.join(format!(
            ".tmp.{}.{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(value)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io("writing a key")(e));
        }
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                location: path.display().to_string(),
                op: "removing a key",
                source,
            }),
        }
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(key)?;
        let start = Instant::now();
        poll(deadline, || self.read_if_present(&path))?.ok_or_else(|| StoreError::Timeout {
            key: key.to_owned(),
            waited: start.elapsed(),
        })
    }

    fn publish(
        &self,
        exchange: &str,
        rank: u32,
        world: u32,
        group: &str,
        value: &[u8],
        _deadline: Instant,
    ) -> Result<(), StoreError> {
        ExchangeIndex::new(world)
            .publish(rank, world, group)
            .map_err(|reason| invalid_exchange(exchange, reason))?;
        // The marker first: a gather that sees the entry sees its group too. No marker
        // means the empty group.
        if !group.is_empty() {
            self.set(&marker_key(exchange, group, rank), &[])?;
        }
        self.set(&entry_key(exchange, rank), value)
    }

    fn gather(
        &self,
        exchange: &str,
        rank: u32,
        world: u32,
        members: &Members,
        deadline: Instant,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        let start = Instant::now();
        let all_path = self.path_of(&all_key(exchange))?;
        let mut last = None;
        let complete = poll(deadline, || {
            let listing = self.list_exchange(exchange, world)?;
            Ok(if listing.complete() {
                Some(listing)
            } else {
                last = Some(listing);
                None
            })
        })?;
        let Some(listing) = complete else {
            return Err(StoreError::Incomplete {
                exchange: exchange.to_owned(),
                world,
                missing: last.map_or_else(|| (0..world).collect(), |l| l.missing()),
                waited: start.elapsed(),
            });
        };
        let read_all = |ranks: Vec<u32>| -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
            ranks
                .into_iter()
                .map(|r| {
                    let path = self.path_of(&entry_key(exchange, r))?;
                    Ok((r, self.read_if_present(&path)?.unwrap_or_default()))
                })
                .collect()
        };
        if *members != Members::All {
            return read_all(listing.members(members));
        }
        // Every rank wants every entry: rank 0 reads them and writes one combined file, the
        // others read that, so the shared file system sees 2N + N opens, not N².
        if rank == 0 {
            let all = read_all(listing.members(&Members::All))?;
            let body = encode_gathered(all.iter().map(|(r, v)| (*r, v.as_slice())));
            self.set(&all_key(exchange), &body)?;
            return Ok(all);
        }
        match poll(deadline, || self.read_if_present(&all_path))? {
            Some(b) => decode_gathered(&b).map_err(|detail| StoreError::Protocol {
                addr: all_path.display().to_string(),
                detail,
            }),
            // Rank 0 published and then stopped: read the entries here.
            None => read_all(listing.members(&Members::All)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// TCP store: wire format
// ---------------------------------------------------------------------------------------

const OP_HELLO: u8 = 1;
const OP_SET: u8 = 2;
const OP_GET: u8 = 3;
const OP_LEAVE: u8 = 4;
const OP_HELLO_AUTH: u8 = 5;
const OP_PUBLISH: u8 = 6;
const OP_GATHER: u8 = 7;

/// Longest HELLO_AUTH request body: opcode, rank, token.
const HELLO_AUTH_MAX: usize = 1 + 4 + StoreToken::MAX_LEN;

pub(crate) const ST_VALUE: u8 = 0;
pub(crate) const ST_NOT_FOUND: u8 = 1;
pub(crate) const ST_ERROR: u8 = 2;
pub(crate) const ST_REFUSED: u8 = 3;
/// A PUBLISH or GATHER used its exchange inconsistently ([`StoreError::InvalidExchange`]):
/// the exchange as a key, then the reason text. Only replies to those requests carry it,
/// so clients older than them never see it.
pub(crate) const ST_INVALID: u8 = 4;

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A big-endian `u32` at the start of `b`, and the bytes it took.
fn take_u32(b: &[u8]) -> Result<(u32, usize), String> {
    let a: [u8; 4] = b
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or("truncated u32")?;
    Ok((u32::from_be_bytes(a), 4))
}

/// A [`put_str`] string (a key, an exchange or a group) at the start of `b`, and the bytes
/// it took.
fn take_str(b: &[u8]) -> Result<(String, usize), String> {
    let (len, n) = take_u32(b)?;
    let len = len as usize;
    if len > MAX_KEY {
        return Err(format!("key of {len} bytes is longer than {MAX_KEY}"));
    }
    let s = b.get(n..n + len).ok_or("truncated key")?;
    let s = std::str::from_utf8(s).map_err(|_| "key is not UTF-8")?;
    Ok((s.to_owned(), n + len))
}

/// The server's error text for an opcode it does not know. Servers from before an opcode
/// existed answer its requests so (an `efarun` older than the program): the client
/// recognises the text to report [`StoreError::ServerOutdated`], so it must not change.
fn unknown_opcode(op: u8) -> String {
    format!("unknown opcode {op}")
}

/// The body of an [`ST_INVALID`] reply: the exchange, then why its use is inconsistent.
fn invalid_body(exchange: &str, reason: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + exchange.len() + reason.len());
    put_str(&mut b, exchange);
    b.extend_from_slice(reason.as_bytes());
    b
}

/// A request as the server sees it.
#[derive(Debug, PartialEq)]
pub(crate) enum Request {
    Hello {
        rank: u32,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        wait: Duration,
    },
    Leave,
    /// HELLO with the job's token, for a server that has one.
    HelloAuth {
        rank: u32,
        token: Vec<u8>,
    },
    /// A rank's entry of an exchange ([`Store::publish`]).
    Publish {
        exchange: String,
        rank: u32,
        world: u32,
        group: String,
        value: Vec<u8>,
    },
    /// Wait for an exchange and return entries ([`Store::gather`]).
    Gather {
        exchange: String,
        world: u32,
        members: Members,
        wait: Duration,
    },
}

/// Milliseconds of a wait on the wire, rounded up, so the server never gives up before the
/// caller's deadline.
fn wait_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl Request {
    /// The request's opcode, and its name in the protocol (for messages).
    fn opcode(&self) -> (u8, &'static str) {
        match self {
            Request::Hello { .. } => (OP_HELLO, "HELLO"),
            Request::Set { .. } => (OP_SET, "SET"),
            Request::Get { .. } => (OP_GET, "GET"),
            Request::Leave => (OP_LEAVE, "LEAVE"),
            Request::HelloAuth { .. } => (OP_HELLO_AUTH, "HELLO_AUTH"),
            Request::Publish { .. } => (OP_PUBLISH, "PUBLISH"),
            Request::Gather { .. } => (OP_GATHER, "GATHER"),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.opcode().0];
        match self {
            Request::Hello { rank } => {
                b.extend_from_slice(&rank.to_be_bytes());
            }
            Request::Set { key, value } => {
                put_str(&mut b, key);
                b.extend_from_slice(value);
            }
            Request::Get { key, wait } => {
                put_str(&mut b, key);
                b.extend_from_slice(&wait_ms(*wait).to_be_bytes());
            }
            Request::Publish {
                exchange,
                rank,
                world,
                group,
                value,
            } => {
                put_str(&mut b, exchange);
                b.extend_from_slice(&rank.to_be_bytes());
                b.extend_from_slice(&world.to_be_bytes());
                put_str(&mut b, group);
                b.extend_from_slice(value);
            }
            Request::Gather {
                exchange,
                world,
                members,
                wait,
            } => {
                put_str(&mut b, exchange);
                b.extend_from_slice(&world.to_be_bytes());
                match members {
                    Members::All => b.push(0),
                    Members::Group(g) => {
                        b.push(1);
                        put_str(&mut b, g);
                    }
                    Members::Nobody => b.push(2),
                }
                b.extend_from_slice(&wait_ms(*wait).to_be_bytes());
            }
            Request::Leave => {}
            Request::HelloAuth { rank, token } => {
                b.extend_from_slice(&rank.to_be_bytes());
                b.extend_from_slice(token);
            }
        }
        b
    }

    pub(crate) fn decode(frame: &[u8]) -> Result<Self, String> {
        let (&op, rest) = frame.split_first().ok_or("empty request")?;
        match op {
            OP_HELLO => {
                let (rank, n) = take_u32(rest)?;
                if rest.len() != n {
                    return Err("trailing bytes after HELLO".into());
                }
                Ok(Request::Hello { rank })
            }
            OP_SET => {
                let (key, n) = take_str(rest)?;
                Ok(Request::Set {
                    key,
                    value: rest[n..].to_vec(),
                })
            }
            OP_GET => {
                let (key, n) = take_str(rest)?;
                let ms: [u8; 8] = rest
                    .get(n..)
                    .and_then(|s| s.try_into().ok())
                    .ok_or("GET needs exactly 8 bytes of wait time")?;
                Ok(Request::Get {
                    key,
                    wait: Duration::from_millis(u64::from_be_bytes(ms)),
                })
            }
            OP_LEAVE if rest.is_empty() => Ok(Request::Leave),
            OP_PUBLISH => {
                let (exchange, n) = take_str(rest)?;
                let (rank, m) = take_u32(&rest[n..])?;
                let (world, k) = take_u32(&rest[n + m..])?;
                let (group, g) = take_str(&rest[n + m + k..])?;
                Ok(Request::Publish {
                    exchange,
                    rank,
                    world,
                    group,
                    value: rest[n + m + k + g..].to_vec(),
                })
            }
            OP_GATHER => {
                let (exchange, n) = take_str(rest)?;
                let (world, m) = take_u32(&rest[n..])?;
                let rest = &rest[n + m..];
                let (&sel, rest) = rest.split_first().ok_or("GATHER without a selector")?;
                let (members, rest) = match sel {
                    0 => (Members::All, rest),
                    1 => {
                        let (g, k) = take_str(rest)?;
                        (Members::Group(g), &rest[k..])
                    }
                    2 => (Members::Nobody, rest),
                    other => return Err(format!("unknown GATHER selector {other}")),
                };
                let ms: [u8; 8] = rest
                    .try_into()
                    .map_err(|_| "GATHER needs exactly 8 bytes of wait time")?;
                Ok(Request::Gather {
                    exchange,
                    world,
                    members,
                    wait: Duration::from_millis(u64::from_be_bytes(ms)),
                })
            }
            OP_HELLO_AUTH => {
                let (rank, n) = take_u32(rest)?;
                let token = &rest[n..];
                if token.len() > StoreToken::MAX_LEN {
                    return Err(format!(
                        "token of {} bytes is longer than {}",
                        token.len(),
                        StoreToken::MAX_LEN
                    ));
                }
                Ok(Request::HelloAuth {
                    rank,
                    token: token.to_vec(),
                })
            }
            other => Err(unknown_opcode(other)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// TCP store: server
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Presence {
    /// Live connections per rank that said hello.
    live: HashMap<u32, usize>,
    /// Ranks that said hello at least once.
    seen: BTreeSet<u32>,
}

impl Presence {
    /// Ranks of `0..world` that have not yet come and gone.
    #[cfg(test)]
    fn not_departed(&self, world: u32) -> Vec<u32> {
        self.not_departed_except(world, &[])
    }

    /// As `not_departed`, not counting the ranks in `except`.
    fn not_departed_except(&self, world: u32, except: &[u32]) -> Vec<u32> {
        (0..world)
            .filter(|r| !except.contains(r))
            .filter(|r| !self.seen.contains(r) || self.live.get(r).copied().unwrap_or(0) > 0)
            .collect()
    }
}

/// One exchange as the server keeps it.
#[derive(Debug)]
struct ServerExchange {
    index: ExchangeIndex,
    /// Becomes true when every rank has published: wakes the gathers of this exchange
    /// only, once (a SET wakes every waiting GET instead).
    done: watch::Sender<bool>,
    /// Reply frames already built, per selection: every rank of a host asks for the same.
    replies: HashMap<Members, Arc<Vec<u8>>>,
}

impl ServerExchange {
    fn new(world: u32) -> Self {
        Self {
            index: ExchangeIndex::new(world),
            done: watch::channel(false).0,
            replies: HashMap::new(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    /// Exchanges by name. Locked before `map` when both are.
    exchanges: Mutex<HashMap<String, ServerExchange>>,
    version: watch::Sender<u64>,
    presence: Mutex<Presence>,
    presence_changed: Condvar,
    /// The job's secret; `None` admits only clients without one.
    token: Option<StoreToken>,
    /// What [`TcpStoreServer::stats`] reports.
    stats: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
}

/// What a [`TcpStoreServer`] has done so far ([`TcpStoreServer::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Requests received (every frame, HELLO and refused ones included).
    pub requests: u64,
    /// Bytes of request frames received, length fields included.
    pub bytes_received: u64,
    /// Bytes of reply frames sent, length fields included.
    pub bytes_sent: u64,
}

impl Shared {
    /// A server's state; with `token`, connections are served only after presenting it.
    pub(crate) fn new(token: Option<StoreToken>) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            exchanges: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
            presence: Mutex::new(Presence::default()),
            presence_changed: Condvar::new(),
            token,
            stats: Counters::default(),
        }
    }

    fn presence(&self) -> MutexGuard<'_, Presence> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn exchanges(&self) -> MutexGuard<'_, HashMap<String, ServerExchange>> {
        self.exchanges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a PUBLISH; the error is the reply's status and body.
    fn publish(
        &self,
        exchange: &str,
        rank: u32,
        world: u32,
        group: &str,
        value: Vec<u8>,
    ) -> Result<(), (u8, Vec<u8>)> {
        let key = entry_key(exchange, rank);
        check_key(&key).map_err(|e| (ST_ERROR, e.to_string().into_bytes()))?;
        let mut exchanges = self.exchanges();
        let ex = exchanges
            .entry(exchange.to_owned())
            .or_insert_with(|| ServerExchange::new(world));
        ex.index
            .publish(rank, world, group)
            .map_err(|reason| (ST_INVALID, invalid_body(exchange, &reason)))?;
        // A rank publishing again may change its value.
        ex.replies.clear();
        self.map().insert(key, value);
        if ex.index.complete() {
            ex.done.send_replace(true);
        }
        drop(exchanges);
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// The exchange's completion flag to wait on; the error is the reply's body (status
    /// [`ST_INVALID`]).
    fn exchange_done(&self, exchange: &str, world: u32) -> Result<watch::Receiver<bool>, Vec<u8>> {
        let mut exchanges = self.exchanges();
        let ex = exchanges
            .entry(exchange.to_owned())
            .or_insert_with(|| ServerExchange::new(world));
        ex.index
            .check_world(world)
            .map_err(|reason| invalid_body(exchange, &reason))?;
        Ok(ex.done.subscribe())
    }

    /// The reply frame of a GATHER whose exchange is complete (status and entries) or not
    /// (`ST_NOT_FOUND` and the missing ranks).
    fn gather_reply(&self, exchange: &str, members: &Members) -> Arc<Vec<u8>> {
        let mut exchanges = self.exchanges();
        let Some(ex) = exchanges.get_mut(exchange) else {
            return Arc::new(reply_frame(ST_ERROR, b"no such exchange"));
        };
        if !ex.index.complete() {
            let missing: Vec<u8> = ex
                .index
                .missing()
                .iter()
                .flat_map(|r| r.to_be_bytes())
                .collect();
            return Arc::new(reply_frame(ST_NOT_FOUND, &missing));
        }
        if let Some(r) = ex.replies.get(members) {
            return r.clone();
        }
        let map = self.map();
        let body = encode_gathered(ex.index.entries(exchange, members, &map).into_iter());
        drop(map);
        let frame = if body.len() + 1 > MAX_FRAME {
            reply_frame(
                ST_ERROR,
                format!(
                    "the gathered entries take {} bytes, more than a frame's {MAX_FRAME}: gather a group",
                    body.len()
                )
                .as_bytes(),
            )
        } else {
            reply_frame(ST_VALUE, &body)
        };
        let frame = Arc::new(frame);
        ex.replies.insert(members.clone(), frame.clone());
        frame
    }

    fn arrive(&self, rank: u32) {
        let mut p = self.presence();
        p.seen.insert(rank);
        *p.live.entry(rank).or_insert(0) += 1;
        self.presence_changed.notify_all();
    }

    fn depart(&self, rank: u32) {
        let mut p = self.presence();
        if let Some(n) = p.live.get_mut(&rank) {
            *n = n.saturating_sub(1);
        }
        self.presence_changed.notify_all();
    }
}

/// The server side of the TCP store.
///
/// Runs a tokio current-thread runtime on a dedicated thread; all public methods are
/// synchronous. Dropping the server stops it at once (connections are closed); to wait for
/// the ranks to finish first, call [`TcpStoreServer::wait_departed`] or use the serving
/// [`TcpStore`], whose `close` and `Drop` do so.
#[derive(Debug)]
pub struct TcpStoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpStoreServer {
    /// Binds `addr` (`host:port`; port 0 picks a free port) and starts serving, without a
    /// token: only clients without one are admitted. Same as
    /// [`TcpStoreServer::bind_with_token`]`(addr, None)`.
    ///
    /// # Errors
    ///
    /// [`StoreError::BadAddress`] if `addr` does not resolve; [`StoreError::Bind`] if no
    /// resolved address can be bound; [`StoreError::Io`] if the server thread cannot start.
    pub fn bind(addr: &str) -> Result<Self, StoreError> {
        Self::bind_with_token(addr, None)
    }

    /// Binds `addr` and starts serving. With a `token`, a connection is served only after
    /// its first request presented that token; any other client is refused (a warning
    /// naming its address is logged and its connection closed) and the server goes on
    /// serving the others. Without one, clients that present a token are refused.
    ///
    /// # Errors
    ///
    /// As [`TcpStoreServer::bind`].
    pub fn bind_with_token(addr: &str, token: Option<StoreToken>) -> Result<Self, StoreError> {
        Self::bind_with(addr, token, LIMITS)
    }

    fn bind_with(
        addr: &str,
        token: Option<StoreToken>,
        limits: Limits,
    ) -> Result<Self, StoreError> {
        let candidates = resolve(addr)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                location: addr.to_owned(),
                op: "starting the store runtime",
                source,
            })?;
        let mut last = None;
        let listener = candidates
            .iter()
            .find_map(|a| match listen(&runtime, *a) {
                Ok(l) => Some(l),
                Err(e) => {
                    last = Some(e);
                    None
                }
            })
            .ok_or_else(|| StoreError::Bind {
                addr: addr.to_owned(),
                source: last.unwrap_or_else(|| io::Error::other("no address")),
            })?;
        let local = listener.local_addr().map_err(|source| StoreError::Io {
            location: addr.to_owned(),
            op: "reading the bound address",
            source,
        })?;
        let shared = Arc::new(Shared::new(token));
        let (tx, rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("efa-store {local}"))
            .spawn(move || runtime.block_on(serve(listener, thread_shared, limits, rx)))
            .map_err(|source| StoreError::Io {
                location: local.to_string(),
                op: "spawning the store thread",
                source,
            })?;
        tracing::info!(%local, token = shared.token.is_some(), "rendezvous store serving");
        Ok(Self {
            addr: local,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address the server listens on (with the real port if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests and bytes the server has received and sent since it started.
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.stats;
        StoreStats {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
        }
    }

    /// Waits until every rank in `0..world_size` has connected and disconnected again (or
    /// said goodbye), or `deadline` passes.
    ///
    /// # Errors
    ///
    /// [`StoreError::StillInUse`] listing the ranks that are still connected or never came.
    pub fn wait_departed(&self, world_size: u32, deadline: Instant) -> Result<(), StoreError> {
        self.wait_departed_except(world_size, &[], deadline)
    }

    /// As [`TcpStoreServer::wait_departed`], not waiting for the ranks in `except`.
    fn wait_departed_except(
        &self,
        world_size: u32,
        except: &[u32],
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let start = Instant::now();
        let mut p = self.shared.presence();
        loop {
            let left_over = p.not_departed_except(world_size, except);
            if left_over.is_empty() {
                return Ok(());
            }
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(StoreError::StillInUse {
                    ranks: left_over,
                    waited: start.elapsed(),
                });
            }
            p = self
                .shared
                .presence_changed
                .wait_timeout(p, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops the server and joins its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(addr = %self.addr, "store server thread panicked");
            }
            tracing::debug!(addr = %self.addr, "rendezvous store stopped");
        }
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connections the kernel queues for the server before it accepts them (capped by
/// `net.core.somaxconn`, 4096 on current kernels). Every rank of a job connects at once:
/// with std's 128, a job of 1,024 ranks lost about a second to SYNs dropped and resent.
const LISTEN_BACKLOG: u32 = 8192;

/// A non-blocking listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as std's).
fn listen(runtime: &tokio::runtime::Runtime, addr: SocketAddr) -> io::Result<StdTcpListener> {
    // The socket registers with the runtime it is made in; `into_std` takes it back out.
    let _in_runtime = runtime.enter();
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// Limits that keep broken or hostile clients from tying up the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Time a new connection has to say HELLO (requests before it are served, but do not
    /// lift the limit). Real clients say HELLO as soon as they are connected.
    hello: Duration,
    /// Time a frame that has started to arrive has to arrive completely, and time a reply
    /// has to be written. Real clients write each request in one go and read every reply.
    frame: Duration,
    /// Connections that have not said HELLO yet; when more pile up, the oldest is closed,
    /// so that silent or garbage-sending connections cannot use up the server's
    /// descriptors...
    unidentified: usize,
    /// ...but only once it has had this long to say HELLO, so that a storm of new
    /// connections cannot push out a real client whose HELLO is on its way.
    evict_after: Duration,
}

pub(crate) const LIMITS: Limits = Limits {
    hello: Duration::from_secs(30),
    frame: Duration::from_secs(30),
    unidentified: 256,
    evict_after: Duration::from_secs(2),
};

/// Splits the bytes of one connection into frames (big-endian `u32` length, then the body)
/// without trusting the length field: its buffer holds only bytes that actually arrived, so
/// a client announcing [`MAX_FRAME`] bytes and sending three costs three bytes, and a length
/// above [`MAX_FRAME`] is refused as soon as its four bytes are in.
#[derive(Debug, Default)]
pub(crate) struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Buffers bytes read from the connection.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether no byte of a next frame has arrived.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes held, including spare capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next complete frame's body, if it has arrived.
    ///
    /// # Errors
    ///
    /// The announced length, if it exceeds [`MAX_FRAME`].
    pub(crate) fn next_frame(&mut self) -> Result<Option<Vec<u8>>, usize> {
        self.next_frame_within(MAX_FRAME)
    }

    /// As [`FrameDecoder::next_frame`], with a frame limit of `max` bytes (at most
    /// [`MAX_FRAME`]).
    ///
    /// # Errors
    ///
    /// The announced length, if it exceeds `max`.
    pub(crate) fn next_frame_within(&mut self, max: usize) -> Result<Option<Vec<u8>>, usize> {
        let Some(&[a, b, c, d]) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > max.min(MAX_FRAME) {
            return Err(len);
        }
        let Some(body) = self.buf.get(4..4 + len) else {
            return Ok(None);
        };
        let frame = body.to_vec();
        if self.buf.len() == 4 + len {
            // Give a large buffer back rather than keep it for the connection's lifetime.
            if self.buf.capacity() > 64 << 10 {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        } else {
            self.buf.drain(..4 + len);
        }
        Ok(Some(frame))
    }
}

/// Connections that have not said HELLO yet, oldest first.
#[derive(Debug, Default)]
struct Unidentified {
    next_id: u64,
    /// By id (so in order of arrival): the task and when it was accepted.
    conns: std::collections::BTreeMap<u64, (tokio::task::AbortHandle, tokio::time::Instant)>,
}

/// Held by a connection until it says HELLO; dropping it takes the connection off the
/// [`Unidentified`] list.
#[derive(Debug)]
pub(crate) struct UnidentifiedGuard {
    id: u64,
    list: Arc<Mutex<Unidentified>>,
}

impl Drop for UnidentifiedGuard {
    fn drop(&mut self) {
        let mut l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        l.conns.remove(&self.id);
    }
}

async fn serve(
    listener: StdTcpListener,
    shared: Arc<Shared>,
    limits: Limits,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "store listener could not join the runtime");
            return;
        }
    };
    let unidentified = Arc::new(Mutex::new(Unidentified::default()));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let mut list = unidentified.lock().unwrap_or_else(|p| p.into_inner());
                    let id = list.next_id;
                    list.next_id += 1;
                    let guard = UnidentifiedGuard { id, list: unidentified.clone() };
                    // The runtime has one thread: the task cannot run (and drop its guard)
                    // before it is on the list.
                    let task = tokio::spawn(connection(
                        stream,
                        peer.to_string(),
                        shared.clone(),
                        limits,
                        Some(guard),
                    ));
                    let now = tokio::time::Instant::now();
                    list.conns.insert(id, (task.abort_handle(), now));
                    while list.conns.len() > limits.unidentified {
                        let Some(entry) = list.conns.first_entry() else { break };
                        if now.duration_since(entry.get().1) < limits.evict_after {
                            // Everyone waiting is new: let the list grow for now.
                            break;
                        }
                        entry.remove().0.abort();
                        tracing::warn!(
                            limit = limits.unidentified,
                            "store: too many connections without HELLO; closed the oldest"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    // Dropping the runtime after this returns cancels every connection task.
}

/// Why a server refuses a connection's request, if it does: the token rule of the
/// [module docs](self#who-may-join). `authed` says whether this connection already presented
/// the right token.
fn refusal(
    token: Option<&StoreToken>,
    authed: bool,
    req: &Result<Request, String>,
) -> Option<&'static str> {
    match (token, req) {
        (Some(t), Ok(Request::HelloAuth { token: given, .. })) => {
            (!t.matches(given)).then_some("wrong EFA_STORE_TOKEN")
        }
        (Some(_), _) if !authed => Some(
            "this store requires EFA_STORE_TOKEN and the client presented none (or spoke before presenting it)",
        ),
        (None, Ok(Request::HelloAuth { .. })) => {
            Some("this store has no EFA_STORE_TOKEN but the client presented one")
        }
        _ => None,
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn hello_auth_roundtrip_and_limits() {
        let r = Request::HelloAuth {
            rank: 3,
            token: b"0123456789abcdef".to_vec(),
        };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        // An empty token decodes (and is then refused as wrong); a huge one does not.
        assert!(Request::decode(&[OP_HELLO_AUTH, 0, 0, 0, 1]).is_ok());
        let mut big = vec![OP_HELLO_AUTH, 0, 0, 0, 1];
        big.resize(5 + StoreToken::MAX_LEN + 1, b'x');
        assert!(Request::decode(&big).is_err());
        assert!(Request::decode(&[OP_HELLO_AUTH, 0, 0]).is_err());
    }

    #[test]
    fn refusal_rules() {
        let t = StoreToken::new("0123456789abcdef").unwrap();
        let auth = |tok: &[u8]| {
            Ok(Request::HelloAuth {
                rank: 0,
                token: tok.to_vec(),
            })
        };
        let hello = Ok(Request::Hello { rank: 0 });
        let get = Ok(Request::Get {
            key: "k".into(),
            wait: Duration::ZERO,
        });
        // With a token: only the right HELLO_AUTH opens the connection.
        assert_eq!(refusal(Some(&t), false, &auth(b"0123456789abcdef")), None);
        assert!(refusal(Some(&t), false, &auth(b"0123456789abcdeF")).is_some());
        assert!(refusal(Some(&t), false, &auth(b"")).is_some());
        assert!(refusal(Some(&t), false, &hello).is_some());
        assert!(refusal(Some(&t), false, &get).is_some());
        assert!(refusal(Some(&t), false, &Err("garbage".into())).is_some());
        // Once in, requests are served; a wrong token later still ends the connection.
        assert_eq!(refusal(Some(&t), true, &get), None);
        assert!(refusal(Some(&t), true, &auth(b"wrong-wrong-wrong")).is_some());
        // Without a token: everything but a token is served, as before tokens existed.
        assert_eq!(refusal(None, true, &hello), None);
        assert_eq!(refusal(None, true, &get), None);
        assert!(refusal(None, true, &auth(b"0123456789abcdef")).is_some());
    }
}

fn protocol_violation(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Serves one client connection until it closes, breaks the protocol or times out.
/// Generic over the stream so that the fuzz targets can run it on bytes in memory.
pub(crate) async fn connection<S>(
    mut stream: S,
    peer: String,
    shared: Arc<Shared>,
    limits: Limits,
    mut unidentified: Option<UnidentifiedGuard>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut rank = None;
    let mut authed = shared.token.is_none();
    let result = async {
        let connected = tokio::time::Instant::now();
        let mut frame_started = connected;
        let mut decoder = FrameDecoder::default();
        let mut chunk = vec![0u8; 8 << 10];
        loop {
            // Before the token, only a HELLO_AUTH is acceptable: a longer first frame is
            // refused as soon as its length is in, and no more than one such frame is read.
            let max = if authed { MAX_FRAME } else { HELLO_AUTH_MAX };
            let frame = loop {
                match decoder.next_frame_within(max) {
                    Ok(Some(f)) => break f,
                    Ok(None) => {}
                    Err(len) if !authed => {
                        tracing::warn!("refused a store client from {peer}: a first frame of {len} bytes, too long for a token; its connection is closed");
                        return Ok(());
                    }
                    Err(len) => {
                        return Err(protocol_violation(format!(
                            "frame of {len} bytes exceeds the limit of {MAX_FRAME}"
                        )))
                    }
                }
                let limit = if unidentified.is_some() {
                    Some((connected + limits.hello, "no HELLO"))
                } else if !decoder.is_empty() {
                    Some((frame_started + limits.frame, "frame not completed"))
                } else {
                    // Between requests a rank may be quiet for as long as its job runs.
                    None
                };
                let room = if authed { chunk.len() } else { 4 + HELLO_AUTH_MAX };
                let buf = &mut chunk[..room];
                let n = match limit {
                    Some((at, what)) => {
                        match tokio::time::timeout_at(at, stream.read(buf)).await {
                            Ok(r) => r?,
                            Err(_) => {
                                return Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("{what} in time"),
                                ))
                            }
                        }
                    }
                    None => stream.read(buf).await?,
                };
                if n == 0 {
                    return if decoder.is_empty() {
                        Ok(())
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside a frame",
                        ))
                    };
                }
                if decoder.is_empty() {
                    frame_started = tokio::time::Instant::now();
                }
                decoder.push(&chunk[..n]);
            };
            shared.stats.requests.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .bytes_received
                .fetch_add(4 + frame.len() as u64, Ordering::Relaxed);
            let req = Request::decode(&frame);
            if let Some(reason) = refusal(shared.token.as_ref(), authed, &req) {
                tracing::warn!("refused a store client from {peer}: {reason}; its connection is closed");
                let reply = reply_frame(ST_REFUSED, reason.as_bytes());
                // Best effort and bounded: the client may be gone or not reading; either way
                // the connection ends here.
                let _ = tokio::time::timeout(limits.frame, async {
                    stream.write_all(&reply).await?;
                    stream.shutdown().await
                })
                .await;
                return Ok(());
            }
            let (status, body): (u8, Vec<u8>) = match req {
                Err(msg) => (ST_ERROR, msg.into_bytes()),
                Ok(Request::Publish {
                    exchange,
                    rank: r,
                    world,
                    group,
                    value,
                }) => match shared.publish(&exchange, r, world, &group, value) {
                    Ok(()) => (ST_VALUE, Vec::new()),
                    Err(reply) => reply,
                },
                Ok(Request::Gather {
                    exchange,
                    world,
                    members,
                    wait,
                }) => {
                    // The reply is built once per selection and shared by every rank that
                    // asks for it, so it is written here, not copied into `body`.
                    let frame = match shared.exchange_done(&exchange, world) {
                        Err(body) => Arc::new(reply_frame(ST_INVALID, &body)),
                        Ok(mut done) => {
                            if !*done.borrow_and_update() {
                                let until = tokio::time::Instant::now() + wait;
                                let filled = async move {
                                    while !*done.borrow_and_update() {
                                        if tokio::time::timeout_at(until, done.changed()).await.is_err() {
                                            break;
                                        }
                                    }
                                };
                                let watched =
                                    wait_watching(&mut stream, &mut chunk, &decoder, "GATHER", filled);
                                if watched.await?.is_none() {
                                    return Ok(());
                                }
                            }
                            shared.gather_reply(&exchange, &members)
                        }
                    };
                    write_reply(&mut stream, &frame, &shared, limits).await?;
                    continue;
                }
                Ok(Request::Hello { rank: r } | Request::HelloAuth { rank: r, .. }) => {
                    // The connection is a client, not a squatter: off the list, no limit.
                    unidentified = None;
                    authed = true;
                    if rank.is_none() {
                        rank = Some(r);
                        shared.arrive(r);
                    }
                    (ST_VALUE, Vec::new())
                }
                Ok(Request::Set { key, value }) => {
                    shared.map().insert(key, value);
                    shared.version.send_modify(|v| *v += 1);
                    (ST_VALUE, Vec::new())
                }
                Ok(Request::Get { key, wait }) => {
                    let present = shared.map().get(&key).cloned();
                    let found = match present {
                        Some(v) => Some(v),
                        None => {
                            let waited = wait_for(&shared, &key, wait);
                            match wait_watching(&mut stream, &mut chunk, &decoder, "GET", waited)
                                .await?
                            {
                                Some(found) => found,
                                None => return Ok(()),
                            }
                        }
                    };
                    match found {
                        Some(v) => (ST_VALUE, v),
                        None => (ST_NOT_FOUND, Vec::new()),
                    }
                }
                Ok(Request::Leave) => {
                    if let Some(r) = rank.take() {
                        shared.depart(r);
                    }
                    (ST_VALUE, Vec::new())
                }
            };
            write_reply(&mut stream, &reply_frame(status, &body), &shared, limits).await?;
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "store connection ended with an error");
    }
    if let Some(r) = rank {
        shared.depart(r);
    }
}

/// Runs `wait` (a GET's or a GATHER's: `what`) while watching the connection: a client
/// that closes it has gone (`Ok(None)`: it departs now, not when the wait ends); one that
/// sends more, or had already sent more, breaks the one-request-in-flight rule (an error).
async fn wait_watching<S, T>(
    stream: &mut S,
    chunk: &mut [u8],
    decoder: &FrameDecoder,
    what: &str,
    wait: impl std::future::Future<Output = T>,
) -> io::Result<Option<T>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let broken = || protocol_violation(format!("request sent while a {what} was waiting"));
    if !decoder.is_empty() {
        return Err(broken());
    }
    tokio::select! {
        biased;
        v = wait => Ok(Some(v)),
        r = stream.read(chunk) => match r? {
            0 => Ok(None),
            _ => Err(broken()),
        },
    }
}

/// A reply frame: length, status, body.
fn reply_frame(status: u8, body: &[u8]) -> Vec<u8> {
    let mut reply = Vec::with_capacity(5 + body.len());
    reply.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    reply.push(status);
    reply.extend_from_slice(body);
    reply
}

/// Writes a reply frame, within the frame time limit.
async fn write_reply<S>(
    stream: &mut S,
    frame: &[u8],
    shared: &Shared,
    limits: Limits,
) -> io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    shared
        .stats
        .bytes_sent
        .fetch_add(frame.len() as u64, Ordering::Relaxed);
    let written = async {
        stream.write_all(frame).await?;
        stream.flush().await
    };
    match tokio::time::timeout(limits.frame, written).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client did not read its reply in time",
        )),
    }
}

async fn wait_for(shared: &Shared, key: &str, wait: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribing before looking means a set between the look and the wait is not missed.
    let mut rx = shared.version.subscribe();
    loop {
        if let Some(v) = shared.map().get(key) {
            return Some(v.clone());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out, or the sender is gone (cannot happen while `shared` lives).
            _ => return shared.map().get(key).cloned(),
        }
    }
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, StoreError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| StoreError::BadAddress {
            addr: addr.to_owned(),
            reason: "it does not resolve".into(),
            source: Some(e),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(StoreError::BadAddress {
            addr: addr.to_owned(),
            reason: "resolves to no address".into(),
            source: None,
        });
    }
    Ok(addrs)
}

// ---------------------------------------------------------------------------------------
// TCP store: client
// ---------------------------------------------------------------------------------------

/// Who serves a TCP store, as its clients know it: named in every error about the server
/// ([`StoreError::ServerFailed`]), and telling a server that is gone from one that has not
/// started yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreServerInfo {
    /// Who it is, for messages: `efarun`, `rank 0`, `the launcher`.
    pub name: String,
    /// Whether it listens before any client starts, as efarun does (it binds the store before
    /// it starts any rank). Then a refused connection means that it has exited, and
    /// connecting fails at once instead of retrying until the deadline.
    pub listens_first: bool,
}

/// A client of a [`TcpStoreServer`]; on rank 0 without a launcher-served store it also owns
/// the server ([`TcpStore::serve`]).
///
/// One request is in flight per `TcpStore` at a time: concurrent callers on different
/// threads take turns, and a caller blocked in [`Store::get`] holds up the others.
pub struct TcpStore {
    addr: String,
    rank: u32,
    conn: Mutex<Option<TcpStream>>,
    io_timeout: Duration,
    server: Option<ServedBy>,
    /// Who serves the store, if known, for messages (`efarun`, `rank 0`).
    served_by: Option<StoreServerInfo>,
    /// Set by [`Store::job_failed`]: `Drop` does not linger.
    failed: std::sync::atomic::AtomicBool,
    /// Set by [`Store::ranks_failed`]: `Drop` does not wait for these ranks.
    failed_ranks: Mutex<Vec<u32>>,
}

/// The server a serving rank owns, and the world it waits for.
struct ServedBy {
    server: TcpStoreServer,
    world_size: u32,
    linger: Duration,
}

impl fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStore")
            .field("addr", &self.addr)
            .field("rank", &self.rank)
            .field("serving", &self.server.is_some())
            .finish()
    }
}

impl TcpStore {
    /// Connects to the store at `addr` (`host:port`) as `rank`, without a token; see
    /// [`TcpStore::connect_with_token`].
    ///
    /// # Errors
    ///
    /// As [`TcpStore::connect_with_token`].
    pub fn connect(addr: &str, rank: u32, deadline: Instant) -> Result<Self, StoreError> {
        Self::connect_with_token(addr, rank, None, deadline)
    }

    /// Connects to the store at `addr` (`host:port`) as `rank`, presenting `token` (the
    /// job's `EFA_STORE_TOKEN`, if it has one), retrying (rank 0 or the launcher may start
    /// later) until `deadline`. Errors do not name the server; see
    /// [`TcpStore::connect_served`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Unreachable`] with the last connection error if no connection could be
    /// made before `deadline`; [`StoreError::BadAddress`] for a malformed address;
    /// [`StoreError::Refused`] at once if the server does not accept the token (or its
    /// absence); [`StoreError::Io`] if the server closes the connection or does not answer.
    pub fn connect_with_token(
        addr: &str,
        rank: u32,
        token: Option<&StoreToken>,
        deadline: Instant,
    ) -> Result<Self, StoreError> {
        Self::connect_inner(addr, rank, token, None, deadline)
    }

    /// As [`TcpStore::connect_with_token`], knowing who serves the store (`server`): every
    /// error about the server names it ([`StoreError::ServerFailed`]), and a refused
    /// connection fails at once when the server listens before any rank starts
    /// ([`StoreServerInfo::listens_first`]) or has accepted a connection of this rank
    /// before. The bootstrap (`Bootstrap::connect_store`) connects this way.
    ///
    /// # Errors
    ///
    /// [`StoreError::ServerFailed`] naming the server: at once if it refused the connection
    /// and must have exited, or closed the connection; at `deadline` (plus at most 2 s) if it
    /// could not be reached or did not answer. [`StoreError::BadAddress`] and
    /// [`StoreError::Refused`] as [`TcpStore::connect_with_token`].
    pub fn connect_served(
        addr: &str,
        rank: u32,
        token: Option<&StoreToken>,
        server: StoreServerInfo,
        deadline: Instant,
    ) -> Result<Self, StoreError> {
        Self::connect_inner(addr, rank, token, Some(server), deadline)
    }

    fn connect_inner(
        addr: &str,
        rank: u32,
        token: Option<&StoreToken>,
        server: Option<StoreServerInfo>,
        deadline: Instant,
    ) -> Result<Self, StoreError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        // Once the server has accepted a connection, a refused one means it is gone.
        let mut listening = server.as_ref().is_some_and(|s| s.listens_first);
        let failed = |server: &StoreServerInfo, what: String| StoreError::ServerFailed {
            server: server.name.clone(),
            addr: addr.to_owned(),
            what,
        };
        loop {
            let err = match Self::dial(addr, deadline)? {
                Err(e) => e,
                Ok(stream) => {
                    listening = true;
                    let _ = stream.set_nodelay(true);
                    let store = Self {
                        addr: addr.to_owned(),
                        rank,
                        conn: Mutex::new(Some(stream)),
                        io_timeout: DEFAULT_IO_TIMEOUT,
                        server: None,
                        served_by: server.clone(),
                        failed: std::sync::atomic::AtomicBool::new(false),
                        failed_ranks: Mutex::new(Vec::new()),
                    };
                    let hello = match token {
                        Some(t) => Request::HelloAuth {
                            rank,
                            token: t.0.clone(),
                        },
                        None => Request::Hello { rank },
                    };
                    match store.exchange(&hello, Some(deadline))? {
                        Ok(body) => {
                            store.parse(body)?;
                            tracing::debug!(addr, rank, waited = ?start.elapsed(), "connected to the rendezvous store");
                            return Ok(store);
                        }
                        // Closed before answering HELLO: a server that has too many
                        // connections without HELLO closes the oldest. Connect again; if the
                        // server is gone, that attempt is refused.
                        Err((e, _)) if closed(&e) && !remaining(deadline).is_zero() => {
                            tracing::debug!(addr, error = %e, "the store closed the connection before answering HELLO; connecting again");
                            e
                        }
                        Err((e, waited)) => return Err(store.lost(e, waited)),
                    }
                }
            };
            if let Some(s) = server.as_ref() {
                if listening && err.kind() == io::ErrorKind::ConnectionRefused {
                    let why = if s.listens_first {
                        "it listens before any rank starts"
                    } else {
                        "it had accepted a connection of this rank"
                    };
                    return Err(failed(
                        s,
                        format!(
                            "refused the connection ({err}): {} has exited ({why}, so a refused connection means it is gone)",
                            s.name
                        ),
                    ));
                }
            }
            let left = remaining(deadline);
            if left.is_zero() {
                let waited = start.elapsed();
                return Err(match server.as_ref() {
                    Some(s) => failed(
                        s,
                        format!(
                            "could not be reached within {:.1} s: {err} (has {} exited, or not started yet? is EFA_STORE the same on every rank?)",
                            waited.as_secs_f64(),
                            s.name
                        ),
                    ),
                    None => StoreError::Unreachable {
                        addr: addr.to_owned(),
                        waited,
                        source: err,
                    },
                });
            }
            tracing::trace!(addr, error = %err, "store not reachable yet, retrying");
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_millis(250));
        }
    }

    /// One attempt to open a TCP connection to `addr`: the stream, or the error to retry
    /// after.
    ///
    /// # Errors
    ///
    /// [`StoreError::BadAddress`] for an address that can never resolve.
    fn dial(addr: &str, deadline: Instant) -> Result<Result<TcpStream, io::Error>, StoreError> {
        match addr.to_socket_addrs() {
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Err(StoreError::BadAddress {
                addr: addr.to_owned(),
                reason: "it is not host:port".into(),
                source: Some(e),
            }),
            // Name resolution may fail transiently while the job starts; retry.
            Err(e) => Ok(Err(e)),
            Ok(candidates) => {
                let mut last = io::Error::other("resolves to no address");
                for a in candidates {
                    let t =
                        remaining(deadline).clamp(Duration::from_millis(1), Duration::from_secs(2));
                    match TcpStream::connect_timeout(&a, t) {
                        Ok(s) => return Ok(Ok(s)),
                        Err(e) => last = e,
                    }
                }
                Ok(Err(last))
            }
        }
    }

    /// Starts a [`TcpStoreServer`] on `addr` without a token and connects to it as `rank`;
    /// see [`TcpStore::serve_with_token`].
    ///
    /// # Errors
    ///
    /// As [`TcpStoreServer::bind`] and [`TcpStore::connect`].
    pub fn serve(
        addr: &str,
        rank: u32,
        world_size: u32,
        deadline: Instant,
    ) -> Result<Self, StoreError> {
        Self::serve_with_token(addr, rank, world_size, None, deadline)
    }

    /// Starts a [`TcpStoreServer`] on `addr` with `token` and connects to it as `rank`; the
    /// returned store owns the server. This is what rank 0 does when no launcher serves the
    /// store.
    ///
    /// The server stays up until every rank in `0..world_size` has connected and left again:
    /// see [`TcpStore::close`] and [`TcpStore::set_linger`].
    ///
    /// # Errors
    ///
    /// As [`TcpStoreServer::bind`] and [`TcpStore::connect_with_token`].
    pub fn serve_with_token(
        addr: &str,
        rank: u32,
        world_size: u32,
        token: Option<StoreToken>,
        deadline: Instant,
    ) -> Result<Self, StoreError> {
        let server = TcpStoreServer::bind_with_token(addr, token.clone())?;
        let mut store = Self::connect_with_token(
            &server.local_addr().to_string(),
            rank,
            token.as_ref(),
            deadline,
        )?;
        // Messages name the address as given (a host name), or the real port for port 0.
        if !addr.ends_with(":0") {
            store.addr = addr.to_owned();
        }
        store.served_by = Some(StoreServerInfo {
            name: format!("rank {rank}"),
            listens_first: true,
        });
        store.server = Some(ServedBy {
            server,
            world_size,
            linger: DEFAULT_LINGER,
        });
        Ok(store)
    }

    /// Says who serves the store (`"efarun"`, `"rank 0"`), for messages such as "rank 1
    /// never joined the TCP store at 127.0.0.1:4242 (served by efarun)".
    /// Errors about the server name it from now on ([`StoreError::ServerFailed`]).
    pub fn set_served_by(&mut self, who: impl Into<String>) {
        let name = who.into();
        match &mut self.served_by {
            Some(s) => s.name = name,
            None => {
                self.served_by = Some(StoreServerInfo {
                    name,
                    listens_first: false,
                })
            }
        }
    }

    /// For a serving store, the address the server listens on.
    pub fn server_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(|s| s.server.local_addr())
    }

    /// Sets the timeout for requests without a deadline of their own ([`Store::set`]).
    /// Default: [`DEFAULT_IO_TIMEOUT`] (30 s).
    pub fn set_io_timeout(&mut self, timeout: Duration) {
        self.io_timeout = timeout;
    }

    /// For a serving store, how long `Drop` waits for the other ranks to leave before
    /// stopping the server. Longer is safer for slow peers; shorter makes a job whose other
    /// ranks crashed exit sooner. Default: [`DEFAULT_LINGER`] (10 s). No effect on clients.
    pub fn set_linger(&mut self, linger: Duration) {
        if let Some(s) = &mut self.server {
            s.linger = linger;
        }
    }

    /// Leaves the store. A client says goodbye and disconnects. A serving store also waits
    /// until every rank of the world has left (or `deadline` passes), then stops the server.
    ///
    /// # Errors
    ///
    /// [`StoreError::StillInUse`] on the serving rank if some ranks had not left by
    /// `deadline` (the server is stopped anyway); I/O errors saying goodbye are ignored,
    /// since the server treats a dropped connection as a departure.
    pub fn close(mut self, deadline: Instant) -> Result<(), StoreError> {
        self.leave();
        match self.server.take() {
            Some(s) => {
                let r = s.server.wait_departed(s.world_size, deadline);
                s.server.shutdown();
                r
            }
            None => Ok(()),
        }
    }

    fn leave(&self) {
        let left = self.request(
            &Request::Leave,
            Some(Instant::now() + Duration::from_secs(1)),
        );
        if let Err(e) = left {
            tracing::debug!(addr = %self.addr, error = %e, "saying goodbye to the store failed");
        }
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            location: self.addr.clone(),
            op,
            source,
        }
    }

    /// Sends one request and reads its reply. `deadline` bounds the whole exchange (a GET
    /// adds its own wait on top); `None` means the I/O timeout.
    fn request(
        &self,
        req: &Request,
        deadline: Option<Instant>,
    ) -> Result<(u8, Vec<u8>), StoreError> {
        match self.exchange(req, deadline)? {
            Ok(body) => self.parse(body).map_err(|e| self.outdated(req, e)),
            Err((e, waited)) => Err(self.lost(e, waited)),
        }
    }

    /// [`StoreError::ServerOutdated`] for a server that answered `req` with "unknown opcode"
    /// of `req`'s own opcode: it is older than the request (the text every server has
    /// answered an unknown opcode with). Any other error is returned as it is.
    fn outdated(&self, req: &Request, e: StoreError) -> StoreError {
        let (op, request) = req.opcode();
        match e {
            StoreError::Server { addr, message } if message == unknown_opcode(op) => {
                StoreError::ServerOutdated {
                    server: self
                        .served_by
                        .as_ref()
                        .map_or_else(|| "the server".to_owned(), |s| s.name.clone()),
                    addr,
                    request,
                }
            }
            e => e,
        }
    }

    /// Sends a request that waits on the server (GET, GATHER), built by `make` for the
    /// time left until `deadline`, and sends it again while the server answers "not yet"
    /// ([`ST_NOT_FOUND`]) before `deadline` (it measures the wait from when the request
    /// arrived). Returns the last reply: [`ST_VALUE`], or [`ST_NOT_FOUND`] once `deadline`
    /// has passed.
    fn request_until(
        &self,
        deadline: Instant,
        make: impl Fn(Duration) -> Request,
    ) -> Result<(u8, Vec<u8>), StoreError> {
        loop {
            let (status, body) = self.request(&make(remaining(deadline)), Some(Instant::now()))?;
            if status == ST_VALUE || remaining(deadline).is_zero() {
                return Ok((status, body));
            }
        }
    }

    fn set_within(
        &self,
        key: &str,
        value: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        if value.len() + key.len() + 16 > MAX_FRAME {
            return Err(StoreError::ValueTooLarge {
                key: key.to_owned(),
                len: value.len(),
                max: MAX_FRAME - key.len() - 16,
            });
        }
        self.request(
            &Request::Set {
                key: key.to_owned(),
                value: value.to_vec(),
            },
            deadline,
        )
        .map(|_| ())
    }

    /// A reply body's status and value; drops the connection after a refusal (the server
    /// closes it).
    fn parse(&self, body: Vec<u8>) -> Result<(u8, Vec<u8>), StoreError> {
        let parsed = parse_reply(&self.addr, body);
        if let Err(StoreError::Refused { .. }) = parsed {
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        parsed
    }

    /// Sends one request and reads its reply body. The outer error is this side's (no
    /// connection, value too large); the inner one the connection's, with the time spent
    /// (the connection is dropped then: it is out of step).
    #[allow(clippy::type_complexity)]
    fn exchange(
        &self,
        req: &Request,
        deadline: Option<Instant>,
    ) -> Result<Result<Vec<u8>, (io::Error, Duration)>, StoreError> {
        let payload = req.encode();
        if payload.len() > MAX_FRAME {
            return Err(StoreError::ValueTooLarge {
                key: match req {
                    Request::Set { key, .. } => key.clone(),
                    Request::Publish { exchange, rank, .. } => entry_key(exchange, *rank),
                    _ => String::new(),
                },
                len: payload.len(),
                max: MAX_FRAME,
            });
        }
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let stream = guard.as_mut().ok_or_else(|| StoreError::Io {
            location: self.addr.clone(),
            op: "sending a request",
            source: io::Error::new(io::ErrorKind::NotConnected, "store already closed"),
        })?;
        // The server answers a GET when its wait ends, so allow that plus a margin. The
        // margin (at least 1 s, for the network and a busy server) is all a stopped server
        // gets beyond the caller's deadline.
        let extra = match req {
            Request::Get { wait, .. } | Request::Gather { wait, .. } => *wait,
            _ => Duration::ZERO,
        };
        let started = Instant::now();
        let base = deadline.map_or(self.io_timeout, |d| {
            remaining(d).max(Duration::from_secs(1))
        });
        let until = started + base + extra + Duration::from_secs(1);
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        let mut bounded = Bounded {
            stream: &mut *stream,
            until,
        };
        let result = bounded
            .write_all(&frame)
            .and_then(|()| read_reply(&mut bounded));
        Ok(result.map_err(|e| {
            // The stream is out of step now; drop it so no later request reads a stale reply.
            *guard = None;
            (e, started.elapsed())
        }))
    }

    /// The error for a connection that failed after `waited`: it names the server when this
    /// store knows it.
    fn lost(&self, e: io::Error, waited: Duration) -> StoreError {
        if e.kind() == io::ErrorKind::InvalidData {
            return StoreError::Protocol {
                addr: self.addr.clone(),
                detail: e.to_string(),
            };
        }
        let Some(server) = &self.served_by else {
            return self.io_err("exchanging a request")(e);
        };
        let name = &server.name;
        let what = if e.kind() == io::ErrorKind::UnexpectedEof {
            format!("closed the connection: {name} has exited, or dropped this rank")
        } else if closed(&e) {
            format!("closed the connection ({e}): {name} has exited, or dropped this rank")
        } else if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!(
                "did not answer within {:.1} s: {name} is stopped (SIGSTOP, a debugger) or overloaded",
                waited.as_secs_f64()
            )
        } else {
            format!("failed while exchanging a request: {e}")
        };
        StoreError::ServerFailed {
            server: name.clone(),
            addr: self.addr.clone(),
            what,
        }
    }
}

/// Whether an I/O error means that the other side closed or reset the connection.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

/// A stream whose every read and write ends by `until`: each call's socket timeout is the
/// time left, so a server that takes (or gives) a few bytes at a time cannot stretch an
/// exchange past its deadline.
struct Bounded<'a> {
    stream: &'a mut TcpStream,
    until: Instant,
}

impl Bounded<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = remaining(self.until);
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer before the deadline",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Reads one reply frame from the server and returns its body (status byte first). The
/// body's buffer grows with the bytes that arrive, not with the announced length.
///
/// # Errors
///
/// `InvalidData` for an empty frame or one longer than [`MAX_FRAME`]; `UnexpectedEof` if
/// the stream ends inside the frame; the stream's own errors (timeouts included).
pub(crate) fn read_reply(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply frame of {len} bytes (the limit is {MAX_FRAME})"),
        ));
    }
    let mut body = Vec::with_capacity(len.min(64 << 10));
    stream.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("reply frame ends after {} of {len} bytes", body.len()),
        ));
    }
    Ok(body)
}

/// Splits a reply body into its status ([`ST_VALUE`] or [`ST_NOT_FOUND`]) and value.
///
/// # Errors
///
/// [`StoreError::Server`] for an error reply, [`StoreError::Refused`] for a refusal (the
/// server closes the connection after it), [`StoreError::InvalidExchange`] for an exchange
/// used inconsistently, [`StoreError::Protocol`] for an empty body, an unknown status or
/// an invalid-exchange reply that does not name its exchange.
pub(crate) fn parse_reply(addr: &str, mut body: Vec<u8>) -> Result<(u8, Vec<u8>), StoreError> {
    if body.is_empty() {
        return Err(StoreError::Protocol {
            addr: addr.to_owned(),
            detail: "empty reply".into(),
        });
    }
    let status = body.remove(0);
    match status {
        ST_VALUE | ST_NOT_FOUND => Ok((status, body)),
        ST_ERROR => Err(StoreError::Server {
            addr: addr.to_owned(),
            message: String::from_utf8_lossy(&body).into_owned(),
        }),
        ST_REFUSED => Err(StoreError::Refused {
            addr: addr.to_owned(),
            reason: String::from_utf8_lossy(&body).into_owned(),
        }),
        ST_INVALID => Err(match take_str(&body) {
            Ok((exchange, n)) => StoreError::InvalidExchange {
                exchange,
                reason: String::from_utf8_lossy(&body[n..]).into_owned(),
            },
            Err(e) => StoreError::Protocol {
                addr: addr.to_owned(),
                detail: format!("an invalid-exchange reply without its exchange: {e}"),
            },
        }),
        other => Err(StoreError::Protocol {
            addr: addr.to_owned(),
            detail: format!("unknown reply status {other}"),
        }),
    }
}

impl Store for TcpStore {
    fn job_failed(&self) {
        self.failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn ranks_failed(&self, ranks: &[u32]) {
        let mut failed = self.failed_ranks.lock().unwrap_or_else(|p| p.into_inner());
        failed.extend_from_slice(ranks);
        failed.sort_unstable();
        failed.dedup();
    }

    fn describe(&self) -> String {
        match &self.served_by {
            Some(who) => format!("the TCP store at {} (served by {})", self.addr, who.name),
            None => format!("the TCP store at {}", self.addr),
        }
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.set_within(key, value, None)
    }

    fn set_by(&self, key: &str, value: &[u8], deadline: Instant) -> Result<(), StoreError> {
        self.set_within(key, value, Some(deadline))
    }

    fn publish(
        &self,
        exchange: &str,
        rank: u32,
        world: u32,
        group: &str,
        value: &[u8],
        deadline: Instant,
    ) -> Result<(), StoreError> {
        check_key(&entry_key(exchange, rank))?;
        self.request(
            &Request::Publish {
                exchange: exchange.to_owned(),
                rank,
                world,
                group: group.to_owned(),
                value: value.to_vec(),
            },
            Some(deadline),
        )
        .map(|_| ())
    }

    fn gather(
        &self,
        exchange: &str,
        _rank: u32,
        world: u32,
        members: &Members,
        deadline: Instant,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        let start = Instant::now();
        let malformed = |detail: String| StoreError::Protocol {
            addr: self.addr.clone(),
            detail,
        };
        let (status, body) = self.request_until(deadline, |wait| Request::Gather {
            exchange: exchange.to_owned(),
            world,
            members: members.clone(),
            wait,
        })?;
        if status == ST_VALUE {
            return decode_gathered(&body).map_err(malformed);
        }
        if body.len() % 4 != 0 {
            return Err(malformed(format!(
                "a list of missing ranks of {} bytes",
                body.len()
            )));
        }
        Err(StoreError::Incomplete {
            exchange: exchange.to_owned(),
            world,
            missing: body
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            waited: start.elapsed(),
        })
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        let start = Instant::now();
        let (status, value) = self.request_until(deadline, |wait| Request::Get {
            key: key.to_owned(),
            wait,
        })?;
        if status == ST_VALUE {
            return Ok(value);
        }
        Err(StoreError::Timeout {
            key: key.to_owned(),
            waited: start.elapsed(),
        })
    }
}

impl Drop for TcpStore {
    fn drop(&mut self) {
        if self
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            self.leave();
        }
        if let Some(s) = self.server.take() {
            let linger = if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
                Duration::ZERO
            } else {
                s.linger
            };
            let deadline = Instant::now() + linger;
            let except = self
                .failed_ranks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Err(e) = s
                .server
                .wait_departed_except(s.world_size, &except, deadline)
            {
                tracing::warn!(error = %e, "stopping the rendezvous store while ranks may still need it");
            }
            s.server.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        for r in [
            Request::Hello { rank: 7 },
            Request::Set {
                key: "card/3".into(),
                value: vec![1, 2, 3],
            },
            Request::Set {
                key: "k".into(),
                value: vec![],
            },
            Request::Get {
                key: "a/b".into(),
                wait: Duration::from_millis(1234),
            },
            Request::Leave,
            Request::Publish {
                exchange: "job/card".into(),
                rank: 5,
                world: 6,
                group: "host 1".into(),
                value: vec![9; 200],
            },
            Request::Gather {
                exchange: "job/card".into(),
                world: 6,
                members: Members::Group("host 1".into()),
                wait: Duration::from_millis(7),
            },
            Request::Gather {
                exchange: "x".into(),
                world: 1,
                members: Members::All,
                wait: Duration::ZERO,
            },
            Request::Gather {
                exchange: "x".into(),
                world: 1,
                members: Members::Nobody,
                wait: Duration::ZERO,
            },
        ] {
            let e = r.encode();
            assert_eq!(Request::decode(&e).unwrap(), r);
            // Every truncation is an error, never a shorter request.
            if matches!(r, Request::Gather { .. }) {
                for cut in 1..e.len() {
                    assert!(Request::decode(&e[..cut]).is_err(), "{r:?} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn gathered_entries_roundtrip_and_garbage_is_refused() {
        let entries = [(0u32, vec![1u8, 2]), (3, vec![]), (7, vec![5; 300])];
        let b = encode_gathered(entries.iter().map(|(r, v)| (*r, v.as_slice())));
        assert_eq!(decode_gathered(&b).unwrap(), entries.to_vec());
        for cut in 0..b.len() {
            assert!(decode_gathered(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_gathered(&long).is_err());
        // A count no frame could hold is refused before anything is allocated.
        assert!(decode_gathered(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])
            .unwrap_err()
            .contains("announced"));
    }

    #[test]
    fn exchange_index_counts_groups_and_missing_ranks() {
        let mut x = ExchangeIndex::new(4);
        x.publish(2, 4, "b").unwrap();
        x.publish(0, 4, "a").unwrap();
        x.publish(0, 4, "a").unwrap(); // a retry counts once
        assert!(!x.complete());
        assert_eq!(x.missing(), [1, 3]);
        x.publish(3, 4, "a").unwrap();
        x.publish(1, 4, "b").unwrap();
        assert!(x.complete());
        assert_eq!(x.members(&Members::Group("a".into())), [0, 3]);
        assert_eq!(x.members(&Members::Group("b".into())), [1, 2]);
        assert_eq!(x.members(&Members::Group("c".into())), Vec::<u32>::new());
        assert_eq!(x.members(&Members::All), [0, 1, 2, 3]);
        assert_eq!(x.members(&Members::Nobody), Vec::<u32>::new());
        assert!(x.publish(4, 4, "a").is_err());
        assert!(x.publish(1, 5, "a").is_err());
    }

    #[test]
    fn request_decode_rejects_garbage() {
        assert!(Request::decode(&[]).is_err());
        assert!(Request::decode(&[99]).is_err());
        assert!(Request::decode(&[OP_HELLO, 0, 0]).is_err());
        assert!(Request::decode(&[OP_HELLO, 0, 0, 0, 1, 5]).is_err());
        assert!(Request::decode(&[OP_GET, 0, 0, 0, 1, b'k', 0]).is_err());
        assert!(Request::decode(&[OP_SET, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(Request::decode(&[OP_LEAVE, 1]).is_err());
    }

    fn quick_limits() -> Limits {
        Limits {
            hello: Duration::from_millis(300),
            frame: Duration::from_millis(300),
            unidentified: 4,
            evict_after: Duration::ZERO,
        }
    }

    /// Reads until the server closes the connection; how long that took.
    fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
        let t0 = Instant::now();
        s.set_read_timeout(Some(limit)).unwrap();
        let mut sink = [0u8; 64];
        loop {
            match s.read(&mut sink) {
                Ok(0) => return t0.elapsed(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return t0.elapsed(),
                Err(e) => panic!("connection still open after {:?}: {e}", t0.elapsed()),
            }
        }
    }

    #[test]
    fn silent_and_half_sent_connections_are_closed_after_their_limit() {
        let server = TcpStoreServer::bind_with("127.0.0.1:0", None, quick_limits()).unwrap();
        let addr = server.local_addr();
        // Never sends anything.
        let mut silent = TcpStream::connect(addr).unwrap();
        // Sends one garbage request (answered with an error), then nothing: still no client.
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0, 0, 0, 2, 99, 99]).unwrap();
        let refused = read_reply(&mut garbage).unwrap();
        assert_eq!(refused[0], ST_ERROR);
        // Says hello, then starts a frame and never finishes it.
        let mut half = TcpStream::connect(addr).unwrap();
        let hello = Request::Hello { rank: 0 }.encode();
        half.write_all(&(hello.len() as u32).to_be_bytes()).unwrap();
        half.write_all(&hello).unwrap();
        read_reply(&mut half).unwrap();
        half.write_all(&[0, 0]).unwrap();
        // Says hello and stays idle between requests: a rank, kept.
        let idle = TcpStore::connect(
            &addr.to_string(),
            1,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(5)) < Duration::from_secs(3));
        assert!(closed_within(&mut garbage, Duration::from_secs(5)) < Duration::from_secs(3));
        assert!(closed_within(&mut half, Duration::from_secs(5)) < Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(400));
        idle.set("still", b"here").unwrap();
        // The half-sent connection's rank has departed; the idle one has not.
        assert_eq!(server.shared.presence().not_departed(2), vec![1]);
    }

    #[test]
    fn too_many_silent_connections_close_the_oldest() {
        let mut limits = quick_limits();
        limits.hello = Duration::from_secs(60);
        let server = TcpStoreServer::bind_with("127.0.0.1:0", None, limits).unwrap();
        let addr = server.local_addr();
        let mut silent: Vec<_> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // A real client still gets in, and its HELLO takes it off the list.
        let store = TcpStore::connect(
            &addr.to_string(),
            0,
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        store.set("k", b"v").unwrap();
        // The 10 + 1 connections left room for 4: the 7 oldest silent ones were closed.
        for s in &mut silent[..7] {
            assert!(closed_within(s, Duration::from_secs(5)) < Duration::from_secs(3));
        }
        for s in &mut silent[7..] {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let e = s.read(&mut [0u8; 8]).unwrap_err();
            assert!(matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ));
        }
        assert_eq!(store.get("k", Instant::now()).unwrap(), b"v");
    }

    /// A server that drops a connection before answering HELLO (as when it sheds
    /// connections) does not fail the client: it reconnects until the deadline.
    #[test]
    fn connect_retries_when_the_server_drops_the_connection_before_hello() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = std::thread::spawn(move || {
            // First connection: read the HELLO, close without answering.
            let (mut s, _) = listener.accept().unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            drop(s);
            // Second: answer HELLO like a server.
            let (mut s, _) = listener.accept().unwrap();
            s.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut body).unwrap();
            assert_eq!(body[0], OP_HELLO);
            s.write_all(&[0, 0, 0, 1, ST_VALUE]).unwrap();
            s
        });
        let store = TcpStore::connect(
            &addr.to_string(),
            2,
            Instant::now() + Duration::from_secs(5),
        )
        .expect("connect retries after the dropped connection");
        drop(fake.join().unwrap());
        drop(store);
    }

    /// A server from before PUBLISH and GATHER (an older efarun) answers them with "unknown
    /// opcode 6" and "unknown opcode 7", as every server has answered opcodes it does not
    /// know: the client names the version mismatch instead of passing the text on.
    #[test]
    fn a_server_older_than_the_request_is_named_outdated() {
        // The text of servers before PUBLISH, and of this one.
        assert_eq!(Request::decode(&[99]).unwrap_err(), "unknown opcode 99");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let old = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut len = [0u8; 4];
            while s.read_exact(&mut len).is_ok() {
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                s.read_exact(&mut body).unwrap();
                let reply = match body[0] {
                    OP_HELLO..=OP_HELLO_AUTH => reply_frame(ST_VALUE, &[]),
                    op => reply_frame(ST_ERROR, format!("unknown opcode {op}").as_bytes()),
                };
                s.write_all(&reply).unwrap();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let efarun = StoreServerInfo {
            name: "efarun".into(),
            listens_first: true,
        };
        let store = TcpStore::connect_served(&addr.to_string(), 3, None, efarun, deadline).unwrap();
        let e = store.publish("card", 3, 4, "", b"c", deadline).unwrap_err();
        assert!(
            matches!(&e, StoreError::ServerOutdated { server, request: "PUBLISH", .. } if server == "efarun"),
            "{e:?}"
        );
        assert!(e.to_string().contains("older efa-rs release"), "{e}");
        let e = store
            .gather("card", 3, 4, &Members::All, deadline)
            .unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::ServerOutdated {
                    request: "GATHER",
                    ..
                }
            ),
            "{e:?}"
        );
        // The connection still serves the requests the old server knows.
        store.set("k", b"v").unwrap();
        drop(store);
        old.join().unwrap();
    }

    /// An invalid-exchange reply names its exchange; one that does not is a protocol error.
    #[test]
    fn invalid_exchange_replies_are_typed() {
        let mut body = vec![ST_INVALID];
        body.extend_from_slice(&invalid_body("job/card", "rank 9 published among 4 ranks"));
        match parse_reply("a", body) {
            Err(StoreError::InvalidExchange { exchange, reason }) => {
                assert_eq!(exchange, "job/card");
                assert_eq!(reason, "rank 9 published among 4 ranks");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_reply("a", vec![ST_INVALID, 0, 0]),
            Err(StoreError::Protocol { .. })
        ));
    }

    /// A burst of new connections does not push out connections that have not yet had
    /// `evict_after` to say HELLO (a real client's HELLO may be on its way); once they
    /// have, the oldest go.
    #[test]
    fn eviction_spares_connections_that_just_arrived() {
        let mut limits = quick_limits();
        limits.hello = Duration::from_secs(60);
        limits.evict_after = Duration::from_millis(800);
        let server = TcpStoreServer::bind_with("127.0.0.1:0", None, limits).unwrap();
        let addr = server.local_addr();
        let mut burst: Vec<_> = (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for s in &mut burst {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let e = s.read(&mut [0u8; 8]).unwrap_err();
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "a connection younger than evict_after was closed: {e}"
            );
        }
        std::thread::sleep(Duration::from_millis(900));
        // One more arrival: 13 wait, 4 may; the 9 oldest have had their time.
        let _late = TcpStream::connect(addr).unwrap();
        for s in &mut burst[..9] {
            assert!(closed_within(s, Duration::from_secs(5)) < Duration::from_secs(3));
        }
        for s in &mut burst[9..] {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let e = s.read(&mut [0u8; 8]).unwrap_err();
            assert!(matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ));
        }
    }

    #[test]
    fn token_server_refuses_before_buffering_and_lifts_the_limit_only_for_the_token() {
        let token = StoreToken::new("limits-token-0123456789").unwrap();
        let server =
            TcpStoreServer::bind_with("127.0.0.1:0", Some(token.clone()), quick_limits()).unwrap();
        let addr = server.local_addr();
        // A first frame one byte longer than a HELLO_AUTH can be: closed without a reply
        // as soon as its length is in, although its body never comes.
        let mut long = TcpStream::connect(addr).unwrap();
        long.write_all(&((HELLO_AUTH_MAX + 1) as u32).to_be_bytes())
            .unwrap();
        let mut sink = Vec::new();
        long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = Instant::now();
        let _ = long.read_to_end(&mut sink);
        assert!(sink.is_empty(), "a reply to an oversized first frame");
        assert!(
            t0.elapsed() < Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        // A plain HELLO: refused with the reason, then closed.
        let mut plain = TcpStream::connect(addr).unwrap();
        let hello = Request::Hello { rank: 0 }.encode();
        plain
            .write_all(&(hello.len() as u32).to_be_bytes())
            .unwrap();
        plain.write_all(&hello).unwrap();
        let body = read_reply(&mut plain).unwrap();
        assert_eq!(body[0], ST_REFUSED);
        assert!(closed_within(&mut plain, Duration::from_secs(5)) < Duration::from_secs(1));
        // The right token: served, and kept past the HELLO limit while idle.
        let store = TcpStore::connect_with_token(
            &addr.to_string(),
            0,
            Some(&token),
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        store.set("k", b"v").unwrap();
        assert_eq!(store.get("k", Instant::now()).unwrap(), b"v");
        // The client refused by a token-less server closes its side (no stale connection).
        let plain_server = TcpStoreServer::bind_with("127.0.0.1:0", None, quick_limits()).unwrap();
        let e = TcpStore::connect_with_token(
            &plain_server.local_addr().to_string(),
            0,
            Some(&token),
            Instant::now() + Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(e, StoreError::Refused { .. }), "{e:?}");
    }

    #[test]
    fn frame_decoder_refuses_huge_lengths_before_allocating() {
        let mut d = FrameDecoder::default();
        d.push(&[0x7f, 0xff]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[0xff, 0xff, 1, 2, 3]);
        assert_eq!(d.next_frame(), Err(0x7fff_ffff));
        assert!(d.capacity() < 1024);
        let mut d = FrameDecoder::default();
        d.push(&(MAX_FRAME as u32).to_be_bytes());
        d.push(&[7; 100]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(d.capacity() < 1024, "{}", d.capacity());
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 2, 9, 9, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Ok(Some(vec![9, 9])));
        assert_eq!(d.next_frame(), Ok(Some(vec![])));
        assert_eq!(d.next_frame(), Ok(None));
        assert!(!d.is_empty());
    }

    #[test]
    fn reply_reader_does_not_trust_the_length() {
        let mut r: &[u8] = &[0x04, 0, 0, 0, 0, 1, 2];
        let e = read_reply(&mut r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0];
        assert_eq!(
            read_reply(&mut r).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert_eq!(
            read_reply(&mut r).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut r: &[u8] = &[0, 0, 0, 3, ST_VALUE, 5, 6];
        assert_eq!(
            parse_reply("a", read_reply(&mut r).unwrap()).unwrap(),
            (ST_VALUE, vec![5, 6])
        );
        assert!(matches!(
            parse_reply("a", vec![9]),
            Err(StoreError::Protocol { .. })
        ));
        assert!(matches!(
            parse_reply("a", vec![]),
            Err(StoreError::Protocol { .. })
        ));
    }

    #[test]
    fn rank_of_key_reads_last_segment() {
        assert_eq!(rank_of_key("card/7"), Some(7));
        assert_eq!(rank_of_key("x/card/12"), Some(12));
        assert_eq!(rank_of_key("5"), Some(5));
        assert_eq!(rank_of_key("card/x"), None);
        assert_eq!(rank_of_key("card/"), None);
    }

    #[test]
    fn presence_tracks_come_and_go() {
        let mut p = Presence::default();
        assert_eq!(p.not_departed(2), vec![0, 1]);
        p.seen.insert(0);
        p.live.insert(0, 1);
        assert_eq!(p.not_departed(2), vec![0, 1]);
        p.live.insert(0, 0);
        assert_eq!(p.not_departed(2), vec![1]);
        p.seen.insert(1);
        assert!(p.not_departed(2).is_empty());
    }

    #[test]
    fn memory_store_get_waits_and_times_out() {
        let s = Arc::new(MemoryStore::new());
        let t0 = Instant::now();
        let e = s
            .get("nope/3", Instant::now() + Duration::from_millis(50))
            .unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(e.missing_rank(), Some(3));
        let s2 = s.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            s2.set("late", b"v").unwrap();
        });
        assert_eq!(
            s.get("late", Instant::now() + Duration::from_secs(5))
                .unwrap(),
            b"v"
        );
        h.join().unwrap();
    }

    #[test]
    fn file_store_encodes_keys_into_safe_names() {
        let dir = std::env::temp_dir().join(format!("efa-core-unit-{}", std::process::id()));
        let s = FileStore::open(&dir).unwrap();
        let p = s.path_of("card/../../etc").unwrap();
        assert_eq!(p.parent().unwrap(), dir);
        assert!(!p.file_name().unwrap().to_str().unwrap().contains('/'));
        assert!(s.path_of("").is_err());
        assert!(s.path_of(&"/".repeat(100)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
