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
//!
//! # Protocol
//!
//! Frames are a big-endian `u32` length followed by that many bytes, at most
//! [`MAX_FRAME`] bytes. A request starts with an opcode byte:
//! `1 HELLO rank:u32`, `2 SET key value`, `3 GET key wait_ms:u64`, `4 LEAVE`, where a key is
//! `len:u32` + UTF-8 bytes and a value is the rest of the frame. A reply starts with a status
//! byte: `0` value follows, `1` not found (the wait expired), `2` error text follows.
//! One request is in flight per connection; a [`TcpStore`] serialises its callers.
//!
//! The server trusts no client. It buffers a frame's bytes as they arrive (an announced
//! length costs nothing), and closes a connection that announces a frame over
//! [`MAX_FRAME`] bytes, that has not said HELLO within 30 s of connecting (and the oldest
//! one when more than 256 have not), that takes over 30 s to finish a frame it started or
//! to read a reply, or that sends a request while its GET waits. A connection that closes
//! while its GET waits departs at once.

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

use crate::bootstrap::BootstrapError;

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
    /// No connection to the store server could be made before the deadline. Check that the
    /// serving process (rank 0 or the launcher) runs and that the address is reachable.
    #[error("could not reach the store at {addr} within {waited:?}: {source}")]
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
    #[error("store address `{addr}` is not usable: {reason}")]
    BadAddress {
        /// The address given.
        addr: String,
        /// Why it is not usable.
        reason: String,
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

    /// Returns the value of `key`, waiting until it is set or `deadline` passes. Looks at
    /// least once even when `deadline` has already passed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Timeout`] naming the key if it did not appear in time; I/O or protocol
    /// errors otherwise.
    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError>;

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
}

/// Publishes `my_blob` under `<tag>/<my_rank>` and collects the blobs of all `size` ranks,
/// indexed by rank.
///
/// `tag` names the exchange so that several exchanges (for example `card` and later
/// `barrier/1`) can use the same store without clashing; use a fresh tag for each exchange.
///
/// # Errors
///
/// * [`BootstrapError::RankNeverJoined`] listing **every** rank whose blob did not appear
///   before `deadline`, with the time waited.
/// * [`BootstrapError::InvalidRank`] if `my_rank >= size`.
/// * [`BootstrapError::Store`] for any other store failure.
pub fn exchange_all(
    store: &dyn Store,
    tag: &str,
    my_rank: u32,
    size: u32,
    my_blob: &[u8],
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, BootstrapError> {
    if my_rank >= size {
        return Err(BootstrapError::InvalidRank {
            rank: my_rank,
            size,
        });
    }
    let start = Instant::now();
    store.set(&format!("{tag}/{my_rank}"), my_blob)?;
    let mut blobs = Vec::with_capacity(size as usize);
    let mut missing = Vec::new();
    for rank in 0..size {
        if rank == my_rank {
            blobs.push(my_blob.to_vec());
            continue;
        }
        // Once the deadline has passed, each `get` still looks once, so every absent rank is
        // found without waiting for each in turn.
        match store.get(&format!("{tag}/{rank}"), deadline) {
            Ok(v) => blobs.push(v),
            Err(StoreError::Timeout { .. }) => {
                missing.push(rank);
                blobs.push(Vec::new());
            }
            Err(e) => return Err(e.into()),
        }
    }
    if missing.is_empty() {
        tracing::debug!(tag, my_rank, size, waited = ?start.elapsed(), "exchange complete");
        Ok(blobs)
    } else {
        let waited = start.elapsed();
        tracing::warn!(tag, my_rank, ?missing, ?waited, "ranks never joined");
        Err(BootstrapError::RankNeverJoined {
            ranks: missing,
            waited,
        })
    }
}

/// Waits until all `size` ranks have reached the barrier named `tag`.
///
/// Built on [`exchange_all`] with empty blobs, so it works on every [`Store`].
///
/// # Errors
///
/// As for [`exchange_all`]: [`BootstrapError::RankNeverJoined`] lists the ranks that did not
/// arrive in time.
pub fn barrier(
    store: &dyn Store,
    tag: &str,
    my_rank: u32,
    size: u32,
    deadline: Instant,
) -> Result<(), BootstrapError> {
    exchange_all(store, tag, my_rank, size, &[], deadline).map(|_| ())
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
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A panicking holder cannot leave the map half-updated (insert is atomic for us).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_key(key)?;
        self.lock().insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        let start = Instant::now();
        let mut map = self.lock();
        loop {
            if let Some(v) = map.get(key) {
                return Ok(v.clone());
            }
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(StoreError::Timeout {
                    key: key.to_owned(),
                    waited: start.elapsed(),
                });
            }
            map = self
                .changed
                .wait_timeout(map, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
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
    /// Opens (creating if needed) the store directory `dir`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] if the directory cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            location: dir.display().to_string(),
            op: "creating the store directory",
            source,
        })?;
        Ok(Self { dir })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        let mut name = String::with_capacity(key.len() + 1);
        name.push('k'); // never starts with '.', so it cannot clash with temporary files
        for b in key.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
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
}

impl Store for FileStore {
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
        let mut backoff = Duration::from_millis(1);
        loop {
            match std::fs::read(&path) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io("reading a key")(e)),
            }
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(StoreError::Timeout {
                    key: key.to_owned(),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_millis(50));
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

pub(crate) const ST_VALUE: u8 = 0;
pub(crate) const ST_NOT_FOUND: u8 = 1;
pub(crate) const ST_ERROR: u8 = 2;

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A request as the server sees it.
#[derive(Debug, PartialEq)]
pub(crate) enum Request {
    Hello { rank: u32 },
    Set { key: String, value: Vec<u8> },
    Get { key: String, wait: Duration },
    Leave,
}

impl Request {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Request::Hello { rank } => {
                b.push(OP_HELLO);
                b.extend_from_slice(&rank.to_be_bytes());
            }
            Request::Set { key, value } => {
                b.push(OP_SET);
                put_str(&mut b, key);
                b.extend_from_slice(value);
            }
            Request::Get { key, wait } => {
                b.push(OP_GET);
                put_str(&mut b, key);
                // Rounded up, so the server never gives up before the caller's deadline.
                let ms = u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
                b.extend_from_slice(&ms.to_be_bytes());
            }
            Request::Leave => b.push(OP_LEAVE),
        }
        b
    }

    pub(crate) fn decode(frame: &[u8]) -> Result<Self, String> {
        let (&op, rest) = frame.split_first().ok_or("empty request")?;
        let take_u32 = |b: &[u8]| -> Result<(u32, usize), String> {
            let a: [u8; 4] = b
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or("truncated u32")?;
            Ok((u32::from_be_bytes(a), 4))
        };
        let take_str = |b: &[u8]| -> Result<(String, usize), String> {
            let (len, n) = take_u32(b)?;
            let len = len as usize;
            if len > MAX_KEY {
                return Err(format!("key of {len} bytes is longer than {MAX_KEY}"));
            }
            let s = b.get(n..n + len).ok_or("truncated key")?;
            let s = std::str::from_utf8(s).map_err(|_| "key is not UTF-8")?;
            Ok((s.to_owned(), n + len))
        };
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
            other => Err(format!("unknown opcode {other}")),
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
    fn not_departed(&self, world: u32) -> Vec<u32> {
        (0..world)
            .filter(|r| !self.seen.contains(r) || self.live.get(r).copied().unwrap_or(0) > 0)
            .collect()
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    version: watch::Sender<u64>,
    presence: Mutex<Presence>,
    presence_changed: Condvar,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
            presence: Mutex::new(Presence::default()),
            presence_changed: Condvar::new(),
        }
    }

    fn presence(&self) -> MutexGuard<'_, Presence> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
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
    /// Binds `addr` (`host:port`; port 0 picks a free port) and starts serving.
    ///
    /// # Errors
    ///
    /// [`StoreError::BadAddress`] if `addr` does not resolve; [`StoreError::Bind`] if no
    /// resolved address can be bound; [`StoreError::Io`] if the server thread cannot start.
    pub fn bind(addr: &str) -> Result<Self, StoreError> {
        Self::bind_with(addr, LIMITS)
    }

    fn bind_with(addr: &str, limits: Limits) -> Result<Self, StoreError> {
        let candidates = resolve(addr)?;
        let mut last = None;
        let listener = candidates
            .iter()
            .find_map(|a| match StdTcpListener::bind(a) {
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
        listener
            .set_nonblocking(true)
            .map_err(|source| StoreError::Io {
                location: local.to_string(),
                op: "making the listener non-blocking",
                source,
            })?;
        let shared = Arc::new(Shared::new());
        let (tx, rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                location: local.to_string(),
                op: "starting the store runtime",
                source,
            })?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("efa-store {local}"))
            .spawn(move || runtime.block_on(serve(listener, thread_shared, limits, rx)))
            .map_err(|source| StoreError::Io {
                location: local.to_string(),
                op: "spawning the store thread",
                source,
            })?;
        tracing::info!(%local, "rendezvous store serving");
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

    /// Waits until every rank in `0..world_size` has connected and disconnected again (or
    /// said goodbye), or `deadline` passes.
    ///
    /// # Errors
    ///
    /// [`StoreError::StillInUse`] listing the ranks that are still connected or never came.
    pub fn wait_departed(&self, world_size: u32, deadline: Instant) -> Result<(), StoreError> {
        let start = Instant::now();
        let mut p = self.shared.presence();
        loop {
            let left_over = p.not_departed(world_size);
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
    /// descriptors.
    unidentified: usize,
}

pub(crate) const LIMITS: Limits = Limits {
    hello: Duration::from_secs(30),
    frame: Duration::from_secs(30),
    unidentified: 256,
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
        let Some(&[a, b, c, d]) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > MAX_FRAME {
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
    conns: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
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
                    list.conns.insert(id, task.abort_handle());
                    while list.conns.len() > limits.unidentified {
                        if let Some((_, oldest)) = list.conns.pop_first() {
                            oldest.abort();
                        }
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
    let result = async {
        let connected = tokio::time::Instant::now();
        let mut frame_started = connected;
        let mut decoder = FrameDecoder::default();
        let mut chunk = vec![0u8; 8 << 10];
        loop {
            let frame = loop {
                match decoder.next_frame() {
                    Ok(Some(f)) => break f,
                    Ok(None) => {}
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
                let n = match limit {
                    Some((at, what)) => {
                        match tokio::time::timeout_at(at, stream.read(&mut chunk)).await {
                            Ok(r) => r?,
                            Err(_) => {
                                return Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("{what} in time"),
                                ))
                            }
                        }
                    }
                    None => stream.read(&mut chunk).await?,
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
            let (status, body): (u8, Vec<u8>) = match Request::decode(&frame) {
                Err(msg) => (ST_ERROR, msg.into_bytes()),
                Ok(Request::Hello { rank: r }) => {
                    // The connection is a client, not a squatter: off the list, no limit.
                    unidentified = None;
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
                    // While the GET waits, watch the connection: a client that closes it
                    // has gone (and departs now, not when the wait ends); one that sends
                    // more breaks the one-request-in-flight rule.
                    let present = shared.map().get(&key).cloned();
                    match present {
                        Some(v) => (ST_VALUE, v),
                        None if !decoder.is_empty() => {
                            return Err(protocol_violation(
                                "request sent while a GET was waiting".into(),
                            ))
                        }
                        None => tokio::select! {
                            biased;
                            v = wait_for(&shared, &key, wait) => match v {
                                Some(v) => (ST_VALUE, v),
                                None => (ST_NOT_FOUND, Vec::new()),
                            },
                            r = stream.read(&mut chunk) => {
                                return match r? {
                                    0 => Ok(()),
                                    _ => Err(protocol_violation(
                                        "request sent while a GET was waiting".into(),
                                    )),
                                };
                            }
                        },
                    }
                }
                Ok(Request::Leave) => {
                    if let Some(r) = rank.take() {
                        shared.depart(r);
                    }
                    (ST_VALUE, Vec::new())
                }
            };
            let mut reply = Vec::with_capacity(5 + body.len());
            reply.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
            reply.push(status);
            reply.extend_from_slice(&body);
            let written = async {
                stream.write_all(&reply).await?;
                stream.flush().await
            };
            match tokio::time::timeout(limits.frame, written).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client did not read its reply in time",
                    ))
                }
            }
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
            reason: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(StoreError::BadAddress {
            addr: addr.to_owned(),
            reason: "resolves to no address".into(),
        });
    }
    Ok(addrs)
}

// ---------------------------------------------------------------------------------------
// TCP store: client
// ---------------------------------------------------------------------------------------

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
    /// Connects to the store at `addr` (`host:port`) as `rank`, retrying (rank 0 or the
    /// launcher may start later) until `deadline`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unreachable`] with the last connection error if no connection could be
    /// made before `deadline`; [`StoreError::BadAddress`] for a malformed address.
    pub fn connect(addr: &str, rank: u32, deadline: Instant) -> Result<Self, StoreError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let stream = loop {
            let err = match addr.to_socket_addrs() {
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    return Err(StoreError::BadAddress {
                        addr: addr.to_owned(),
                        reason: e.to_string(),
                    })
                }
                // Name resolution may fail transiently while the job starts; retry.
                Err(e) => e,
                Ok(candidates) => {
                    let mut last = io::Error::other("resolves to no address");
                    let mut got = None;
                    for a in candidates {
                        let t = remaining(deadline)
                            .clamp(Duration::from_millis(1), Duration::from_secs(2));
                        match TcpStream::connect_timeout(&a, t) {
                            Ok(s) => {
                                got = Some(s);
                                break;
                            }
                            Err(e) => last = e,
                        }
                    }
                    match got {
                        Some(s) => break s,
                        None => last,
                    }
                }
            };
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(StoreError::Unreachable {
                    addr: addr.to_owned(),
                    waited: start.elapsed(),
                    source: err,
                });
            }
            tracing::trace!(addr, error = %err, "store not reachable yet, retrying");
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_millis(250));
        };
        let _ = stream.set_nodelay(true);
        let store = Self {
            addr: addr.to_owned(),
            rank,
            conn: Mutex::new(Some(stream)),
            io_timeout: DEFAULT_IO_TIMEOUT,
            server: None,
        };
        store.request(&Request::Hello { rank }, Some(deadline))?;
        tracing::debug!(addr, rank, waited = ?start.elapsed(), "connected to the rendezvous store");
        Ok(store)
    }

    /// Starts a [`TcpStoreServer`] on `addr` and connects to it as `rank`; the returned store
    /// owns the server. This is what rank 0 does when no launcher serves the store.
    ///
    /// The server stays up until every rank in `0..world_size` has connected and left again:
    /// see [`TcpStore::close`] and [`TcpStore::set_linger`].
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
        let server = TcpStoreServer::bind(addr)?;
        let mut store = Self::connect(&server.local_addr().to_string(), rank, deadline)?;
        store.addr = addr.to_owned();
        store.server = Some(ServedBy {
            server,
            world_size,
            linger: DEFAULT_LINGER,
        });
        Ok(store)
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

    /// Sends one request and reads its reply. `deadline` bounds the socket I/O (a GET adds
    /// its own wait on top); `None` means the I/O timeout.
    fn request(
        &self,
        req: &Request,
        deadline: Option<Instant>,
    ) -> Result<(u8, Vec<u8>), StoreError> {
        let payload = req.encode();
        if payload.len() > MAX_FRAME {
            return Err(StoreError::ValueTooLarge {
                key: match req {
                    Request::Set { key, .. } => key.clone(),
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
        // The server answers a GET when its wait ends, so allow that plus a margin.
        let extra = match req {
            Request::Get { wait, .. } => *wait,
            _ => Duration::ZERO,
        };
        let base = deadline.map_or(self.io_timeout, |d| {
            remaining(d).max(Duration::from_secs(1))
        });
        let timeout = base + extra + Duration::from_secs(1);
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| stream.set_write_timeout(Some(timeout)))
            .map_err(self.io_err("setting socket timeouts"))?;
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        let result = stream
            .write_all(&frame)
            .and_then(|()| read_reply(&mut *stream));
        let body = match result {
            Ok(b) => b,
            Err(e) => {
                // The stream is out of step now; drop it so no later request reads a stale reply.
                *guard = None;
                return Err(if e.kind() == io::ErrorKind::InvalidData {
                    StoreError::Protocol {
                        addr: self.addr.clone(),
                        detail: e.to_string(),
                    }
                } else {
                    self.io_err("exchanging a request")(e)
                });
            }
        };
        parse_reply(&self.addr, body)
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
/// [`StoreError::Server`] for an error reply, [`StoreError::Protocol`] for an empty body or
/// an unknown status.
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
        other => Err(StoreError::Protocol {
            addr: addr.to_owned(),
            detail: format!("unknown reply status {other}"),
        }),
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
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
            None,
        )
        .map(|_| ())
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        let start = Instant::now();
        loop {
            let (status, value) = self.request(
                &Request::Get {
                    key: key.to_owned(),
                    wait: remaining(deadline),
                },
                Some(Instant::now()),
            )?;
            if status == ST_VALUE {
                return Ok(value);
            }
            // The server measures the wait from when the request arrived; ask again if our
            // own deadline has not quite passed yet.
            if remaining(deadline).is_zero() {
                return Err(StoreError::Timeout {
                    key: key.to_owned(),
                    waited: start.elapsed(),
                });
            }
        }
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
            let deadline = Instant::now() + s.linger;
            if let Err(e) = s.server.wait_departed(s.world_size, deadline) {
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
        ] {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
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
        let server = TcpStoreServer::bind_with("127.0.0.1:0", quick_limits()).unwrap();
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
        let server = TcpStoreServer::bind_with("127.0.0.1:0", limits).unwrap();
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
