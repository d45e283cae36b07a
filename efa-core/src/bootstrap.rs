//! Who am I, how many are we, and where do we meet: rank, world size and rendezvous from the
//! launcher's environment.
//!
//! [`detect`] is a pure function over an environment lookup, so every launcher's behaviour is
//! unit-tested without touching the process environment; [`from_env`] applies it to the real
//! environment. [`BootstrapBuilder`] states everything explicitly instead.
//!
//! # Which launcher
//!
//! The first match wins:
//!
//! | launcher | recognised by | rank / size | local rank / size |
//! |---|---|---|---|
//! | [`Launcher::Efarun`] | `EFA_RANK` | `EFA_RANK` / `EFA_WORLD_SIZE` | `EFA_LOCAL_RANK` / `EFA_LOCAL_SIZE` |
//! | [`Launcher::Torchrun`] (elastic agent) | `TORCHELASTIC_RUN_ID` and `RANK` | `RANK` / `WORLD_SIZE` | `LOCAL_RANK` / `LOCAL_WORLD_SIZE` |
//! | [`Launcher::OpenMpi`] | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_RANK` / `_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` / `_LOCAL_SIZE` |
//! | [`Launcher::Hydra`] (MPICH, Intel MPI) | `PMI_RANK` | `PMI_RANK` / `PMI_SIZE` | `MPI_LOCALRANKID` / `MPI_LOCALNRANKS` if set |
//! | [`Launcher::Slurm`] (`srun`) | `SLURM_PROCID` | `SLURM_PROCID` / `SLURM_NTASKS` (or `SLURM_NPROCS`) | `SLURM_LOCALID` / this node's entry of `SLURM_STEP_TASKS_PER_NODE` (or `SLURM_TASKS_PER_NODE`) at `SLURM_NODEID` |
//! | [`Launcher::Torchrun`] (plain) | `RANK` | `RANK` / `WORLD_SIZE` | `LOCAL_RANK` / `LOCAL_WORLD_SIZE` |
//! | [`Launcher::Singleton`] | none of the above | 0 / 1 | 0 / 1 |
//!
//! Two refinements of the plain order, both because the variables of an outer launcher leak
//! into the processes of an inner one:
//!
//! * `srun torchrun ...`: `SLURM_PROCID` is the index of the *torchrun agent* (one per node),
//!   not the worker's rank. torchrun sets `TORCHELASTIC_RUN_ID`, and when it is present
//!   torchrun's variables win over Slurm's and MPI's.
//! * `srun --mpi=pmi2` sets `PMI_RANK`/`PMI_SIZE` too. When `PMI_RANK` equals `SLURM_PROCID`
//!   and Hydra's `MPI_LOCALRANKID` is absent, the job is treated as Slurm.
//!
//! # Which rendezvous
//!
//! 1. `EFA_STORE=host:port` (also `tcp://host:port`, `[v6]:port`): a TCP store. Rank 0 serves
//!    it, binding that address, and the others connect — unless `EFA_STORE_SERVED=1`, which
//!    says the launcher serves it (as `efarun` does) and every rank, rank 0 included, connects.
//! 2. `EFA_STORE=file:///path`: a [`FileStore`] in that directory,
//!    which all ranks must share.
//! 3. `MASTER_ADDR` and `MASTER_PORT`: a TCP store served by rank 0 at that address. Under
//!    torchrun with `TORCHELASTIC_USE_AGENT_STORE=True` the elastic agent already listens on
//!    `MASTER_PORT` (with PyTorch's own protocol), so `MASTER_PORT + 1` is used instead.
//! 4. A world of one rank: an in-process [`MemoryStore`].
//! 5. Under Open MPI, Hydra or Slurm, when all ranks are on this node (local size equals the
//!    world size, or Slurm reports one node): a file store in
//!    `/tmp/efa-store-<launcher>-<job>`, where `<job>` is `SLURM_JOB_ID.SLURM_STEP_ID`
//!    (Slurm), `OMPI_MCA_ess_base_jobid` or else `PMIX_NAMESPACE` (Open MPI), and
//!    `PMI_KVSNAME`, `PMI_JOBID` or `PMIX_NAMESPACE` (Hydra; MPICH 4's Hydra sets none of
//!    them, so [`from_env`] falls back to `proxy-<pid>` of the node's `hydra_pmi_proxy`, the
//!    parent of every rank on the node), with characters other than
//!    `[A-Za-z0-9._-]` replaced by `_`. Every rank of one job computes the same path, and
//!    different jobs get different ones.
//! 6. Under Slurm across several nodes: a TCP store served by rank 0 on the **first host of
//!    `SLURM_STEP_NODELIST`** (else `SLURM_JOB_NODELIST`; see [`expand_hostlist`]), port
//!    [`slurm_port`]`(job, step)`, a number in 10000..=29999 derived from the job and step
//!    ids, below Linux's ephemeral range. srun places rank 0 on the first node of the step
//!    under its block and cyclic distributions; with `--distribution=arbitrary` or a custom
//!    `SLURM_HOSTFILE`, set `EFA_STORE`.
//! 7. Anything else (mpirun across nodes, for example) is an error,
//!    [`BootstrapError::NoRendezvous`], asking for `EFA_STORE`.
//!
//! A file store's directory is created with mode 0700, but never its parents: with
//! `EFA_STORE=file:///fsx/jobs/42`, `/fsx/jobs` must exist, or [`Bootstrap::connect_store`]
//! fails at once with [`BootstrapError::InvalidVar`] naming `EFA_STORE` (a missing parent is
//! usually a typo or a filesystem not mounted on this node; creating it would leave this rank
//! waiting alone). The launcher-keyed directories of rule 5 live in `/tmp`, which exists.
//! `EFA_STORE_SERVED=1` without `EFA_STORE` is an error; with a file store it is ignored.
//!
//! # Who may join
//!
//! `EFA_STORE_TOKEN` is the job's secret for a TCP store (16 to 256 printable ASCII
//! characters, e.g. `openssl rand -hex 32`; empty means unset). A store served with a token
//! admits only clients presenting the same one; a store served without one admits only
//! clients without one. So:
//!
//! * under `efarun` nothing is needed: it generates a token per job and passes it on;
//! * under other launchers, set the same `EFA_STORE_TOKEN` on every rank, rank 0 (the server)
//!   included, and make the launcher pass it on: `mpirun -x EFA_STORE_TOKEN ...` (Open MPI),
//!   `mpiexec -genvlist EFA_STORE_TOKEN ...` (Hydra), `srun --export=ALL,EFA_STORE_TOKEN ...`
//!   (Hydra and srun pass the whole environment by default; lists of exported variables must
//!   name it);
//! * with no token anywhere the store admits anyone who can reach its port, as before
//!   tokens existed (rank 0 logs a warning when it serves on a non-loopback address);
//! * a rank whose token differs from the server's gets [`StoreError::Refused`] at once, and
//!   the server logs a warning naming the refused address and goes on serving the others.
//!
//! # Scale
//!
//! Every exchange is two store requests per rank, whatever the number of ranks: a
//! PUBLISH of this rank's blob and a GATHER that the server answers once every rank has
//! published ([`Store::publish`], [`Store::gather`]). The deadline and
//! [`BootstrapError::RankNeverJoined`], naming every rank that did not publish, work as
//! before, on every store and under every launcher (they only pick the store).
//!
//! What a rank receives is the other half. [`exchange_all`] hands every rank every blob:
//! `N²` blobs leave the store (3.5 GB for 4,096 ranks and 200-byte cards), whatever the
//! protocol. [`exchange_grouped`] hands each rank the blobs of its group only (the ranks of
//! its host, which is what placement needs at once: shared memory and fast boxes are set
//! up per host), and [`lookup`] fetches any other rank's blob, with one request, when it is
//! first needed (PMIx's direct modex).
//!
//! Measured on this 2-core machine, one thread per rank, each a real [`TcpStore`] client of
//! one [`TcpStoreServer`](crate::store::TcpStoreServer) on loopback (token set, as under efarun), connecting, exchanging
//! 200-byte cards and a ready barrier, 96 ranks per host (`bench/bootstrap-scale`,
//! `efa-bench bootstrap-scale --mode ...`):
//!
//! | ranks | per-key GETs (before) | cards over the ranks' own connections | bulk, every card | bulk, host's cards (`exchange_grouped`) |
//! |---|---|---|---|---|
//! | 256 | 0.73 s, 66,816 req., 13 MB | 0.20 s, 2,304 req. | 0.05 s, 1,536 req., 14 MB | 0.04 s, 1,536 req., 4.7 MB |
//! | 1,024 | 14.9 s, 1,053,696 req., 215 MB | 1.65 s, 10,240 req. | 0.35 s, 6,144 req., 218 MB | 0.16 s, 6,144 req., 20 MB |
//! | 2,048 | - | 4.8 s, 21,504 req. | 1.18 s, 12,288 req., 872 MB | 0.44 s, 12,288 req., 41 MB |
//! | 4,096 | - | 15.3 s, 45,056 req. | 5.2 s, 24,576 req., 3.5 GB | 0.89 s, 24,576 req., 82 MB |
//! | fit | N^2.17 | N^1.56 | N^1.64 | N^1.16 |
//!
//! (Requests and bytes are the store server's; "own connections" is NCCL's bootstrap: the
//! store carries only listener addresses, and the cards are allgathered by recursive
//! doubling over TCP connections between the ranks, which move the `N²` cards among
//! themselves.)
//!
//! Why the store with bulk operations, and grouped: both bulk and peer-to-peer exchanges
//! take `O(1)` requests per rank and `O(log N)` rounds at most, but any exchange that gives
//! every rank every card moves `N²` cards, and that is what dominates from 2,048 ranks on
//! (here 3.5 GB through one server, or through 4,096 threads' own sockets, slower still on
//! 2 cores). The store variant needs no listener per rank, no extra connection set-up, and
//! keeps the one place that already names missing ranks, applies the token and knows the
//! deadline; grouping makes the bytes `O(N × L)` for `L` ranks per host. The server answers
//! one GATHER per rank from a reply built once per group.
//!
//! [`Communicator::init`](crate::Communicator::init) still reads every card
//! ([`exchange_all`], the "bulk, every card" column): its engine chooses a route and
//! inserts an address-vector entry for every peer when it starts. Resolving peers on first
//! use (the card by [`lookup`], then the route and the address) is what remains for it to
//! take the grouped path.
//!
//! Files: a [`FileStore`] learns who has published, and in which group, from one directory
//! listing per poll (group markers are empty files whose names say the group), and opens
//! only the files it returns; a gather of every blob is read from one combined file that
//! rank 0 writes, so no store costs `N` opens per rank (`N²` on a shared filesystem).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::store::{
    entry_key, exchange_keys, FileStore, Members, MemoryStore, Store, StoreError, StoreServerInfo,
    StoreToken, TcpStore,
};

/// The program that started this process, as far as the environment tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Launcher {
    /// Our own launcher, `efarun`.
    Efarun,
    /// Open MPI's `mpirun`/`mpiexec` (ORTE or PRRTE).
    OpenMpi,
    /// MPICH's Hydra `mpiexec` (also Intel MPI).
    Hydra,
    /// Slurm's `srun`.
    Slurm,
    /// PyTorch's `torchrun` (or anything setting `RANK`/`WORLD_SIZE`).
    Torchrun,
    /// No launcher: a single process.
    Singleton,
    /// Rank and size were given explicitly with [`BootstrapBuilder`].
    Explicit,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Efarun => "efarun",
            Launcher::OpenMpi => "Open MPI",
            Launcher::Hydra => "MPICH Hydra",
            Launcher::Slurm => "Slurm srun",
            Launcher::Torchrun => "torchrun",
            Launcher::Singleton => "no launcher (singleton)",
            Launcher::Explicit => "explicit",
        })
    }
}

/// Who serves a TCP rendezvous store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreServer {
    /// Rank 0 binds the address and serves; it waits for everyone to leave before stopping.
    Rank0,
    /// The launcher serves it for the lifetime of the job (`EFA_STORE_SERVED=1`); every
    /// rank only connects.
    Launcher,
}

/// Where the ranks meet to exchange their cards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rendezvous {
    /// A TCP store at `addr` (`host:port`).
    Tcp {
        /// `host:port`; IPv6 literals in brackets.
        addr: String,
        /// Who serves it.
        server: StoreServer,
    },
    /// A file store in a directory shared by all ranks.
    File {
        /// The directory.
        dir: PathBuf,
    },
    /// An in-process store; only for a world of one rank.
    InProcess,
}

impl fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rendezvous::Tcp {
                addr,
                server: StoreServer::Rank0,
            } => write!(f, "TCP store at {addr} served by rank 0"),
            Rendezvous::Tcp {
                addr,
                server: StoreServer::Launcher,
            } => write!(f, "TCP store at {addr} served by the launcher"),
            Rendezvous::File { dir } => write!(f, "file store in {}", dir.display()),
            Rendezvous::InProcess => f.write_str("in-process store"),
        }
    }
}

impl Rendezvous {
    /// Parses an `EFA_STORE` value: `file:///abs/path`, `tcp://host:port` or `host:port`
    /// (IPv6 as `[addr]:port`). `launcher_serves` is the meaning of `EFA_STORE_SERVED=1`.
    ///
    /// # Errors
    ///
    /// [`BootstrapError::InvalidVar`] naming `EFA_STORE` and saying what is wrong.
    pub fn parse(value: &str, launcher_serves: bool) -> Result<Self, BootstrapError> {
        let bad = |reason: &str| BootstrapError::InvalidVar {
            var: "EFA_STORE".into(),
            value: value.into(),
            reason: reason.into(),
        };
        let v = value.trim();
        if let Some(path) = v.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a file store needs an absolute path: file:///shared/dir",
                ));
            }
            return Ok(Rendezvous::File { dir: path.into() });
        }
        let hp = v.strip_prefix("tcp://").unwrap_or(v);
        if let Some((scheme, _)) = hp.split_once("://") {
            return Err(bad(&format!(
                "unknown scheme `{scheme}://`; use host:port, tcp://host:port or file:///shared/dir"
            )));
        }
        if v.starts_with("file:") {
            return Err(bad(
                "write a file store as file:// followed by an absolute path: file:///shared/dir",
            ));
        }
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port or file:///path"))?;
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(bad("write IPv6 addresses in brackets: [fd00::1]:29500"));
        }
        if let Some(c) = host
            .chars()
            .find(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'))
        {
            return Err(bad(&format!(
                "the host contains {c:?}; give a host name or address and a port: node1:29500"
            )));
        }
        match port.parse::<u16>() {
            Ok(0) => {
                return Err(bad(
                    "port 0 means \"any free port\", which the other ranks cannot know; choose a port from 1 to 65535",
                ))
            }
            Ok(_) => {}
            Err(_) => return Err(bad("the port is not a number from 1 to 65535")),
        }
        Ok(Rendezvous::Tcp {
            addr: hp.to_owned(),
            server: if launcher_serves {
                StoreServer::Launcher
            } else {
                StoreServer::Rank0
            },
        })
    }
}

/// What went wrong while finding out who we are or meeting the other ranks.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// The launcher was recognised but one of its variables is missing.
    #[error("{launcher} launch detected but {var} is not set")]
    MissingVar {
        /// The launcher recognised.
        launcher: Launcher,
        /// The missing variable.
        var: &'static str,
    },
    /// A variable has a value that cannot be used.
    #[error("{var}={value:?} is invalid: {reason}")]
    InvalidVar {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `EFA_STORE` names a file store (`file:///dir`) whose directory cannot be used; the
    /// source ([`StoreError::Directory`]) says why and what to do.
    #[error("EFA_STORE={value:?} is invalid: {source}")]
    StoreDirectory {
        /// The value of `EFA_STORE`.
        value: String,
        /// Why the directory cannot be used.
        #[source]
        source: StoreError,
    },
    /// The world size is zero.
    #[error("world size is 0 (from {var}); a job needs at least one rank")]
    EmptyWorld {
        /// Where the size came from.
        var: &'static str,
    },
    /// The rank is not below the world size.
    #[error("rank {rank} is out of range for a world of {size} ranks")]
    InvalidRank {
        /// The rank.
        rank: u32,
        /// The world size.
        size: u32,
    },
    /// The local rank is not below the local size, or the local size exceeds the world size.
    #[error(
        "local rank {local_rank} of {local_size} is inconsistent with a world of {size} ranks"
    )]
    InvalidLocal {
        /// The local rank.
        local_rank: u32,
        /// The local size.
        local_size: u32,
        /// The world size.
        size: u32,
    },
    /// No rendezvous could be chosen from the environment.
    #[error("no rendezvous for this {launcher} job: {why}; set EFA_STORE=host:port (rank 0 serves it) or EFA_STORE=file:///shared/dir")]
    NoRendezvous {
        /// The launcher recognised.
        launcher: Launcher,
        /// Why no default applied.
        why: String,
    },
    /// A Slurm host list could not be expanded.
    #[error("cannot expand host list {list:?}: {reason}")]
    InvalidHostlist {
        /// The list.
        list: String,
        /// What is wrong with it.
        reason: String,
    },
    /// These ranks did not publish their data before the deadline: they were not started,
    /// crashed, are still starting, or use a different `EFA_STORE`. The message names the
    /// store: "rank 1 never joined the TCP store at 127.0.0.1:4242 (served by efarun) within
    /// 30.0 s ...".
    #[error("{} never joined {store} within {}: not started, crashed, still starting, or using another EFA_STORE or EFA_STORE_TOKEN (raise EFA_TIMEOUT for slow starts)", fmt_ranks(.ranks), fmt_secs(*.waited))]
    RankNeverJoined {
        /// Every rank that was missing, ascending.
        ranks: Vec<u32>,
        /// How long this rank waited.
        waited: Duration,
        /// The store, in words ([`Store::describe`]).
        store: String,
    },
    /// The store failed.
    #[error("rendezvous store failed: {0}")]
    Store(#[from] StoreError),
}

/// `0.3 s`, `30.0 s`, `2.5 ms`: a wait, readable.
fn fmt_secs(d: Duration) -> String {
    if d >= Duration::from_millis(100) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

fn fmt_ranks(ranks: &[u32]) -> String {
    match ranks {
        [r] => format!("rank {r}"),
        _ => format!(
            "ranks {}",
            ranks
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// This process's place in the job and the way to its rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    rank: u32,
    world_size: u32,
    local_rank: Option<u32>,
    local_size: Option<u32>,
    rendezvous: Rendezvous,
    launcher: Launcher,
    job_id: Option<String>,
    rendezvous_source: String,
    store_token: Option<StoreToken>,
}

impl Bootstrap {
    /// This process's rank, `0..world_size`.
    pub fn rank(&self) -> u32 {
        self.rank
    }
    /// Number of ranks in the job.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }
    /// Rank among the ranks on this node, if the launcher says.
    pub fn local_rank(&self) -> Option<u32> {
        self.local_rank
    }
    /// Number of ranks on this node, if the launcher says.
    pub fn local_size(&self) -> Option<u32> {
        self.local_size
    }
    /// Where the ranks meet.
    pub fn rendezvous(&self) -> &Rendezvous {
        &self.rendezvous
    }
    /// The launcher detected.
    pub fn launcher(&self) -> Launcher {
        self.launcher
    }
    /// The launcher's job identifier, if one was found.
    pub fn job_id(&self) -> Option<&str> {
        self.job_id.as_deref()
    }
    /// One line saying why this rendezvous was chosen (`"EFA_STORE"`, `"single-node Slurm
    /// job: file store keyed by SLURM_JOB_ID.SLURM_STEP_ID"`, ...), for logs.
    pub fn rendezvous_source(&self) -> &str {
        &self.rendezvous_source
    }
    /// The job's secret for a TCP store (`EFA_STORE_TOKEN`), if it has one.
    pub fn store_token(&self) -> Option<&StoreToken> {
        self.store_token.as_ref()
    }

    /// Opens the store: serves it if this is rank 0 of a rank-0-served TCP store, connects
    /// otherwise, retrying until `deadline`. A TCP store is served and joined with the job's
    /// [`store_token`](Bootstrap::store_token).
    ///
    /// # Errors
    ///
    /// [`BootstrapError::Store`] wrapping [`StoreError::Bind`] (rank 0 could not listen),
    /// [`StoreError::ServerFailed`] naming the server (`rank 0`, `efarun`): at once when
    /// efarun's store refuses the connection (efarun listens before any rank starts, so it
    /// has exited) or a server closes it, by the deadline when the server cannot be reached
    /// or does not answer; [`StoreError::Refused`] (the token does not match the server's).
    /// [`BootstrapError::InvalidVar`] naming `EFA_STORE` (or [`BootstrapError::Store`] with
    /// [`StoreError::Directory`] for a store not chosen by `EFA_STORE`) when a file store's
    /// directory cannot be used: its parent does not exist, for example.
    pub fn connect_store(&self, deadline: Instant) -> Result<Arc<dyn Store>, BootstrapError> {
        tracing::info!(
            rank = self.rank,
            size = self.world_size,
            launcher = %self.launcher,
            rendezvous = %self.rendezvous,
            source = %self.rendezvous_source,
            token = self.store_token.is_some(),
            "bootstrap"
        );
        let token = self.store_token.as_ref();
        Ok(match &self.rendezvous {
            Rendezvous::Tcp {
                addr,
                server: StoreServer::Rank0,
            } if self.rank == 0 => {
                let store =
                    TcpStore::serve_with_token(addr, 0, self.world_size, token.cloned(), deadline)?;
                if token.is_none() && store.server_addr().is_some_and(|a| !a.ip().is_loopback()) {
                    tracing::warn!(
                        addr,
                        "the rendezvous store accepts any client that reaches its port; set the same EFA_STORE_TOKEN on every rank to admit only this job's ranks"
                    );
                }
                Arc::new(store)
            }
            Rendezvous::Tcp { addr, server } => {
                // efarun binds the store before it starts any rank: refused means gone.
                let (name, listens_first) = match (server, self.launcher) {
                    (StoreServer::Rank0, _) => ("rank 0", false),
                    (StoreServer::Launcher, Launcher::Efarun) => ("efarun", true),
                    (StoreServer::Launcher, _) => ("the launcher", false),
                };
                let info = StoreServerInfo {
                    name: name.into(),
                    listens_first,
                };
                Arc::new(TcpStore::connect_served(
                    addr, self.rank, token, info, deadline,
                )?)
            }
            Rendezvous::File { dir } => match FileStore::open(dir) {
                Ok(store) => Arc::new(store),
                Err(source @ StoreError::Directory { .. })
                    if self.rendezvous_source == "EFA_STORE" =>
                {
                    return Err(BootstrapError::StoreDirectory {
                        value: format!("file://{}", dir.display()),
                        source,
                    })
                }
                Err(e) => return Err(e.into()),
            },
            Rendezvous::InProcess => Arc::new(MemoryStore::new()),
        })
    }
}

/// Builds a [`Bootstrap`] from explicit values, for programs that know their rank without a
/// launcher.
#[derive(Debug, Clone)]
pub struct BootstrapBuilder {
    rank: u32,
    world_size: u32,
    rendezvous: Rendezvous,
    local: Option<(u32, u32)>,
    store_token: Option<StoreToken>,
}

impl BootstrapBuilder {
    /// Rank, world size and rendezvous are required.
    pub fn new(rank: u32, world_size: u32, rendezvous: Rendezvous) -> Self {
        Self {
            rank,
            world_size,
            rendezvous,
            local: None,
            store_token: None,
        }
    }

    /// The job's secret for a TCP store; every rank must give the same one. Default: none
    /// (the store then admits only clients without a token).
    pub fn store_token(mut self, token: StoreToken) -> Self {
        self.store_token = Some(token);
        self
    }

    /// Rank and size among the ranks on this node. Default: unknown.
    pub fn local(mut self, local_rank: u32, local_size: u32) -> Self {
        self.local = Some((local_rank, local_size));
        self
    }

    /// Checks the values and builds.
    ///
    /// # Errors
    ///
    /// [`BootstrapError::EmptyWorld`], [`BootstrapError::InvalidRank`],
    /// [`BootstrapError::InvalidLocal`], or [`BootstrapError::NoRendezvous`] for an
    /// in-process rendezvous with more than one rank.
    pub fn build(self) -> Result<Bootstrap, BootstrapError> {
        let ids = Ids {
            rank: self.rank,
            size: self.world_size,
            local_rank: self.local.map(|l| l.0),
            local_size: self.local.map(|l| l.1),
        };
        validate(&ids, "world_size")?;
        if self.rendezvous == Rendezvous::InProcess && ids.size > 1 {
            return Err(BootstrapError::NoRendezvous {
                launcher: Launcher::Explicit,
                why: format!(
                    "an in-process store cannot serve {} separate processes",
                    ids.size
                ),
            });
        }
        Ok(Bootstrap {
            rank: ids.rank,
            world_size: ids.size,
            local_rank: ids.local_rank,
            local_size: ids.local_size,
            rendezvous: self.rendezvous,
            launcher: Launcher::Explicit,
            job_id: None,
            rendezvous_source: "given explicitly".into(),
            store_token: self.store_token,
        })
    }
}

/// [`detect`] over the process environment.
///
/// Under MPICH's Hydra, whose job (KVS) name travels only over the PMI socket, a single-node
/// job's file store is keyed by the parent process if that is `hydra_pmi_proxy`: it forks
/// every rank of its node and lives as long as the job.
///
/// # Errors
///
/// As [`detect`].
pub fn from_env() -> Result<Bootstrap, BootstrapError> {
    let proc = std::path::Path::new("/proc");
    let ppid = std::os::unix::process::parent_id();
    let proxy = hydra_proxy_key(proc, ppid);
    let mut b = detect_with(&|k| std::env::var(k).ok(), proxy)?;
    // Job ids repeat (Open MPI's are hashes, a restarted Slurm counts again, pids are
    // reused), and a file store left by an earlier job with the same id would hand this job
    // stale addresses. The launcher process that forked every local rank (mpirun,
    // slurmstepd, hydra_pmi_proxy) and its start time name this incarnation.
    if b.rendezvous_source.starts_with("single-node") {
        if let (Rendezvous::File { dir }, Some(inc)) = (&mut b.rendezvous, incarnation(proc, ppid))
        {
            let mut name = dir.as_os_str().to_owned();
            name.push(format!("-{inc}"));
            *dir = PathBuf::from(name);
        }
    }
    Ok(b)
}

/// `<ppid>.<start time>` of the parent process: unique per launcher incarnation.
fn incarnation(proc: &std::path::Path, ppid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(proc.join(ppid.to_string()).join("stat")).ok()?;
    // Field 22 (starttime); fields after the parenthesised command name, which may contain
    // spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{ppid}.{start}"))
}

/// `proxy-<ppid>` if process `ppid` (under the procfs root `proc`) is `hydra_pmi_proxy`.
fn hydra_proxy_key(proc: &std::path::Path, ppid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(proc.join(ppid.to_string()).join("comm")).ok()?;
    (comm.trim() == "hydra_pmi_proxy").then(|| format!("proxy-{ppid}"))
}

#[cfg(test)]
mod incarnation_tests {
    #[test]
    fn incarnation_reads_the_start_time() {
        let root =
            std::env::temp_dir().join(format!("efa-proc-incarnation-{}", std::process::id()));
        std::fs::create_dir_all(root.join("77")).unwrap();
        // comm with spaces and parentheses, then fields 3.. ; field 22 is 123456.
        let fields: Vec<String> = (3..=25)
            .map(|i| {
                if i == 22 {
                    "123456".into()
                } else {
                    i.to_string()
                }
            })
            .collect();
        std::fs::write(
            root.join("77/stat"),
            format!("77 (my (odd) prog) {}", fields.join(" ")),
        )
        .unwrap();
        assert_eq!(super::incarnation(&root, 77).as_deref(), Some("77.123456"));
        assert_eq!(super::incarnation(&root, 78), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}

#[derive(Debug, Clone, Copy)]
struct Ids {
    rank: u32,
    size: u32,
    local_rank: Option<u32>,
    local_size: Option<u32>,
}

/// Reads rank, size, local rank/size and the rendezvous from an environment lookup; see the
/// [module docs](self) for the rules. Empty values count as unset.
///
/// # Errors
///
/// * [`BootstrapError::MissingVar`]: a launcher was recognised but a variable it always sets
///   is missing (for example `EFA_RANK` without `EFA_WORLD_SIZE`).
/// * [`BootstrapError::InvalidVar`]: a value does not parse; names the variable and value.
/// * [`BootstrapError::EmptyWorld`], [`BootstrapError::InvalidRank`],
///   [`BootstrapError::InvalidLocal`]: inconsistent values.
/// * [`BootstrapError::NoRendezvous`]: several ranks, no `EFA_STORE`, no `MASTER_ADDR`, and
///   no default applies.
/// * [`BootstrapError::InvalidHostlist`]: a Slurm node list that does not parse.
pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Bootstrap, BootstrapError> {
    detect_with(env, None)
}

/// Which launcher started this process, from its environment `env`: the one rule that the
/// communicator's bootstrap ([`detect`]) and every tool that must know whether it runs as one
/// rank of a job (the benchmarks) apply. [`Launcher::Singleton`] when none did.
pub fn launcher_of(env: &dyn Fn(&str) -> Option<String>) -> Launcher {
    launcher_and_vars(env).0
}

/// The launcher that started this process ([`launcher_of`] of the process environment).
pub fn detected_launcher() -> Launcher {
    launcher_of(&|k| std::env::var(k).ok())
}

/// [`launcher_of`], with the variables that launcher sets: rank, size, local rank, local
/// size (`-` where it has none).
fn launcher_and_vars(env: &dyn Fn(&str) -> Option<String>) -> (Launcher, [&'static str; 4]) {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let has = |k: &str| get(k).is_some();

    let pmi_is_slurm = has("PMI_RANK")
        && !has("MPI_LOCALRANKID")
        && has("SLURM_PROCID")
        && get("PMI_RANK") == get("SLURM_PROCID");

    let slurm_size = if has("SLURM_NTASKS") {
        "SLURM_NTASKS"
    } else {
        "SLURM_NPROCS"
    };
    if has("EFA_RANK") {
        (
            Launcher::Efarun,
            [
                "EFA_RANK",
                "EFA_WORLD_SIZE",
                "EFA_LOCAL_RANK",
                "EFA_LOCAL_SIZE",
            ],
        )
    } else if has("TORCHELASTIC_RUN_ID") && has("RANK") {
        (
            Launcher::Torchrun,
            ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
        )
    } else if has("OMPI_COMM_WORLD_RANK") {
        (
            Launcher::OpenMpi,
            [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ],
        )
    } else if has("PMI_RANK") && !pmi_is_slurm {
        (
            Launcher::Hydra,
            ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"],
        )
    } else if has("SLURM_PROCID") {
        (
            Launcher::Slurm,
            ["SLURM_PROCID", slurm_size, "SLURM_LOCALID", "-"],
        )
    } else if has("RANK") {
        (
            Launcher::Torchrun,
            ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
        )
    } else {
        (Launcher::Singleton, ["-"; 4])
    }
}

/// [`detect`], with the Hydra job key to use when Hydra's environment names none.
fn detect_with(
    env: &dyn Fn(&str) -> Option<String>,
    hydra_proxy: Option<String>,
) -> Result<Bootstrap, BootstrapError> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let (launcher, vars) = launcher_and_vars(env);
    let ids = if launcher == Launcher::Singleton {
        Ids {
            rank: 0,
            size: 1,
            local_rank: Some(0),
            local_size: Some(1),
        }
    } else {
        let mut ids = read_ids(&get, launcher, vars)?;
        if launcher == Launcher::Slurm {
            ids.local_size = slurm_local_size(&get)?;
        }
        ids
    };
    validate_env(&ids, vars)?;

    let job_id = job_id(&get, launcher).or(match launcher {
        Launcher::Hydra => hydra_proxy,
        _ => None,
    });
    let (rendezvous, source) = choose_rendezvous(&get, launcher, &ids, job_id.as_deref())?;
    let store_token = get("EFA_STORE_TOKEN")
        .map(|v| {
            StoreToken::new(&v).map_err(|e| BootstrapError::InvalidVar {
                var: "EFA_STORE_TOKEN".into(),
                value: format!("<{} characters, hidden>", v.len()),
                reason: match e {
                    StoreError::InvalidToken { reason } => reason,
                    other => other.to_string(),
                },
            })
        })
        .transpose()?;
    Ok(Bootstrap {
        rank: ids.rank,
        world_size: ids.size,
        local_rank: ids.local_rank,
        local_size: ids.local_size,
        rendezvous,
        launcher,
        job_id,
        rendezvous_source: source,
        store_token,
    })
}

fn parse_u32(var: &str, value: &str) -> Result<u32, BootstrapError> {
    value
        .trim()
        .parse()
        .map_err(|_| BootstrapError::InvalidVar {
            var: var.into(),
            value: value.into(),
            reason: "expected a whole number from 0 to 4294967295".into(),
        })
}

/// Reads `[rank, size, local_rank, local_size]`; rank and size are required, the local pair
/// optional; `"-"` means "not offered by this launcher".
fn read_ids(
    get: &dyn Fn(&str) -> Option<String>,
    launcher: Launcher,
    vars: [&'static str; 4],
) -> Result<Ids, BootstrapError> {
    let req = |var: &'static str| -> Result<u32, BootstrapError> {
        let v = get(var).ok_or(BootstrapError::MissingVar { launcher, var })?;
        parse_u32(var, &v)
    };
    let opt = |var: &'static str| -> Result<Option<u32>, BootstrapError> {
        if var == "-" {
            return Ok(None);
        }
        get(var).map(|v| parse_u32(var, &v)).transpose()
    };
    Ok(Ids {
        rank: req(vars[0])?,
        size: req(vars[1])?,
        local_rank: opt(vars[2])?,
        local_size: opt(vars[3])?,
    })
}

fn validate(ids: &Ids, size_var: &'static str) -> Result<(), BootstrapError> {
    if ids.size == 0 {
        return Err(BootstrapError::EmptyWorld { var: size_var });
    }
    if ids.rank >= ids.size {
        return Err(BootstrapError::InvalidRank {
            rank: ids.rank,
            size: ids.size,
        });
    }
    if let (Some(lr), Some(ls)) = (ids.local_rank, ids.local_size) {
        if lr >= ls || ls > ids.size {
            return Err(BootstrapError::InvalidLocal {
                local_rank: lr,
                local_size: ls,
                size: ids.size,
            });
        }
    }
    Ok(())
}

/// [`validate`] for values read from the launcher's variables `vars` (rank, size, local
/// rank, local size; `"-"` for one the launcher does not offer): the error names the
/// variables and their values.
fn validate_env(ids: &Ids, vars: [&'static str; 4]) -> Result<(), BootstrapError> {
    let [rank_var, size_var, local_rank_var, local_size_var] = vars;
    let local_size_var = if local_size_var == "-" {
        "SLURM_STEP_TASKS_PER_NODE"
    } else {
        local_size_var
    };
    match validate(ids, size_var) {
        Err(BootstrapError::InvalidRank { rank, size }) => Err(BootstrapError::InvalidVar {
            var: rank_var.into(),
            value: rank.to_string(),
            reason: format!(
                "a rank must be below the world size, {size_var}={size} (ranks run from 0 to {}); the launcher's variables disagree: is one left over from another job or exported by hand?",
                size - 1
            ),
        }),
        Err(BootstrapError::InvalidLocal {
            local_rank,
            local_size,
            size,
        }) => Err(BootstrapError::InvalidVar {
            var: local_rank_var.into(),
            value: local_rank.to_string(),
            reason: format!(
                "the local rank must be below the local size, {local_size_var}={local_size}, which must not exceed {size_var}={size}; the launcher's variables disagree: is one left over from another job or exported by hand?"
            ),
        }),
        other => other,
    }
}

/// This node's task count under Slurm, from `SLURM_STEP_TASKS_PER_NODE` (or
/// `SLURM_TASKS_PER_NODE`) and `SLURM_NODEID`.
fn slurm_local_size(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<u32>, BootstrapError> {
    let var = if get("SLURM_STEP_TASKS_PER_NODE").is_some() {
        "SLURM_STEP_TASKS_PER_NODE"
    } else {
        "SLURM_TASKS_PER_NODE"
    };
    let (Some(list), Some(node)) = (get(var), get("SLURM_NODEID")) else {
        return Ok(None);
    };
    let node = parse_u32("SLURM_NODEID", &node)?;
    let counts = parse_tasks_per_node(&list).map_err(|reason| BootstrapError::InvalidVar {
        var: var.into(),
        value: list.clone(),
        reason,
    })?;
    Ok(counts.get(node as usize).copied())
}

/// Expands Slurm's compressed tasks-per-node form: `"2(x3),1"` is `[2, 2, 2, 1]`.
///
/// # Errors
///
/// A description of the first malformed element.
pub fn parse_tasks_per_node(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (count, times) = match part.split_once('(') {
            None => (part, 1),
            Some((c, rest)) => {
                let n = rest
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .and_then(|n| n.parse::<u32>().ok())
                    .ok_or_else(|| format!("`{part}` is not of the form N(xM)"))?;
                (c, n)
            }
        };
        let count: u32 = count
            .parse()
            .map_err(|_| format!("`{part}` does not start with a task count"))?;
        if out.len() + times as usize > 1 << 20 {
            return Err("more than a million nodes".into());
        }
        out.resize(out.len() + times as usize, count);
    }
    Ok(out)
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn job_id(get: &dyn Fn(&str) -> Option<String>, launcher: Launcher) -> Option<String> {
    let first = |vars: &[&str]| vars.iter().find_map(|v| get(v));
    match launcher {
        Launcher::Slurm => {
            let job = get("SLURM_JOB_ID").or_else(|| get("SLURM_JOBID"))?;
            let step = get("SLURM_STEP_ID").or_else(|| get("SLURM_STEPID"));
            Some(match step {
                Some(s) => format!("{job}.{s}"),
                None => job,
            })
        }
        Launcher::OpenMpi => first(&["OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"]),
        Launcher::Hydra => first(&["PMI_KVSNAME", "PMI_JOBID", "PMIX_NAMESPACE"]),
        Launcher::Torchrun => get("TORCHELASTIC_RUN_ID"),
        _ => None,
    }
}

/// The TCP port of the default Slurm store: FNV-1a of `"<job>.<step>"`, folded into
/// 10000..=29999 (below Linux's default ephemeral range, 32768..=60999). Every rank of a step
/// computes the same port; concurrent steps of one job usually differ.
pub fn slurm_port(job: &str, step: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in job.bytes().chain(std::iter::once(b'.')).chain(step.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    10_000 + (h % 20_000) as u16
}

fn choose_rendezvous(
    get: &dyn Fn(&str) -> Option<String>,
    launcher: Launcher,
    ids: &Ids,
    job: Option<&str>,
) -> Result<(Rendezvous, String), BootstrapError> {
    let served = match get("EFA_STORE_SERVED").as_deref().map(str::trim) {
        None | Some("0") => false,
        Some("1") => true,
        Some(other) => {
            return Err(BootstrapError::InvalidVar {
                var: "EFA_STORE_SERVED".into(),
                value: other.into(),
                reason: "expected 1 (the launcher serves the store) or 0".into(),
            })
        }
    };
    if let Some(v) = get("EFA_STORE") {
        return Ok((Rendezvous::parse(&v, served)?, "EFA_STORE".into()));
    }
    if served {
        return Err(BootstrapError::InvalidVar {
            var: "EFA_STORE_SERVED".into(),
            value: "1".into(),
            reason: "it says a launcher serves the store, but EFA_STORE (its address) is not set; set both, or neither".into(),
        });
    }
    match (get("MASTER_ADDR"), get("MASTER_PORT")) {
        (Some(host), Some(port)) => {
            let bad_port = |reason: &str| BootstrapError::InvalidVar {
                var: "MASTER_PORT".into(),
                value: port.clone(),
                reason: reason.into(),
            };
            let mut p: u16 = match port.trim().parse() {
                Ok(0) => return Err(bad_port("port 0 cannot be reached by the other ranks; expected a port number from 1 to 65535")),
                Ok(p) => p,
                Err(_) => return Err(bad_port("expected a port number from 1 to 65535")),
            };
            let mut source = "MASTER_ADDR/MASTER_PORT".to_owned();
            let agent_store = match get("TORCHELASTIC_USE_AGENT_STORE") {
                None => false,
                Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(BootstrapError::InvalidVar {
                            var: "TORCHELASTIC_USE_AGENT_STORE".into(),
                            value: v.clone(),
                            reason: "expected True or False (as torchrun sets it)".into(),
                        })
                    }
                },
            };
            if launcher == Launcher::Torchrun && agent_store {
                p = p.checked_add(1).ok_or_else(|| {
                    bad_port(
                        "torchrun's agent store holds this port and the next one does not exist",
                    )
                })?;
                source.push_str(" + 1 (torchrun's agent store holds MASTER_PORT)");
            }
            let host = host.trim();
            let bad_host = |reason: &str| BootstrapError::InvalidVar {
                var: "MASTER_ADDR".into(),
                value: host.into(),
                reason: reason.into(),
            };
            if let Some(c) = host
                .chars()
                .find(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'))
            {
                return Err(bad_host(&format!(
                    "it contains {c:?}; expected the host name or address of rank 0's node"
                )));
            }
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if host.contains(':') && bare.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad_host(
                    "expected a host name or address without a port (the port goes in MASTER_PORT)",
                ));
            }
            let host = host.trim();
            let addr = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{p}")
            } else {
                format!("{host}:{p}")
            };
            return Ok((
                Rendezvous::Tcp {
                    addr,
                    server: StoreServer::Rank0,
                },
                source,
            ));
        }
        (Some(_), None) => {
            return Err(BootstrapError::MissingVar {
                launcher,
                var: "MASTER_PORT",
            })
        }
        (None, Some(_)) => {
            return Err(BootstrapError::MissingVar {
                launcher,
                var: "MASTER_ADDR",
            })
        }
        (None, None) => {}
    }
    if ids.size == 1 {
        return Ok((Rendezvous::InProcess, "a world of one rank".into()));
    }
    let single_node = ids.local_size == Some(ids.size)
        || (launcher == Launcher::Slurm
            && [
                "SLURM_STEP_NUM_NODES",
                "SLURM_NNODES",
                "SLURM_JOB_NUM_NODES",
            ]
            .iter()
            .find_map(|v| get(v))
            .is_some_and(|n| n.trim() == "1"));
    if matches!(
        launcher,
        Launcher::Slurm | Launcher::OpenMpi | Launcher::Hydra
    ) && single_node
    {
        let Some(job) = job else {
            return Err(BootstrapError::NoRendezvous {
                launcher,
                why: "all ranks are on one node, but the launcher's job id was not found to key a file store".into(),
            });
        };
        let tag = match launcher {
            Launcher::Slurm => "slurm",
            Launcher::OpenMpi => "ompi",
            _ => "hydra",
        };
        let dir = PathBuf::from(format!("/tmp/efa-store-{tag}-{}", sanitize(job)));
        return Ok((
            Rendezvous::File { dir },
            format!("single-node {launcher} job: file store keyed by job id {job}"),
        ));
    }
    if launcher == Launcher::Slurm {
        let (var, list) = [
            "SLURM_STEP_NODELIST",
            "SLURM_JOB_NODELIST",
            "SLURM_NODELIST",
        ]
        .iter()
        .find_map(|v| get(v).map(|l| (*v, l)))
        .ok_or_else(|| BootstrapError::NoRendezvous {
            launcher,
            why: "SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are both unset".into(),
        })?;
        let host = first_host(&list)?;
        let job_var = get("SLURM_JOB_ID").or_else(|| get("SLURM_JOBID"));
        let Some(job_id) = job_var else {
            return Err(BootstrapError::NoRendezvous {
                launcher,
                why: "SLURM_JOB_ID is unset, so no port can be derived".into(),
            });
        };
        let step = get("SLURM_STEP_ID")
            .or_else(|| get("SLURM_STEPID"))
            .unwrap_or_default();
        let port = slurm_port(&job_id, &step);
        return Ok((
            Rendezvous::Tcp {
                addr: format!("{host}:{port}"),
                server: StoreServer::Rank0,
            },
            format!("multi-node Slurm step: first host of {var}, port derived from job {job_id} step {step}"),
        ));
    }
    Err(BootstrapError::NoRendezvous {
        launcher,
        why: match launcher {
            Launcher::OpenMpi | Launcher::Hydra => {
                "the ranks span several nodes and mpirun does not say which host runs rank 0".into()
            }
            _ => format!(
                "{} ranks and neither EFA_STORE nor MASTER_ADDR/MASTER_PORT is set",
                ids.size
            ),
        },
    })
}

fn first_host(list: &str) -> Result<String, BootstrapError> {
    // Expanding everything just to take the first would be wasteful on huge lists, but the
    // first element is short: expand only the first top-level item.
    let first = split_top_level(list).into_iter().next().ok_or_else(|| {
        BootstrapError::InvalidHostlist {
            list: list.into(),
            reason: "empty".into(),
        }
    })?;
    expand_hostlist(first)?
        .into_iter()
        .next()
        .ok_or_else(|| BootstrapError::InvalidHostlist {
            list: list.into(),
            reason: "empty".into(),
        })
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Largest number of hosts [`expand_hostlist`] produces.
pub const MAX_HOSTS: usize = 1 << 20;

/// Expands a Slurm host list: `"node[01-03,7],gpu5"` is
/// `["node01", "node02", "node03", "node7", "gpu5"]`.
///
/// Ranges keep the zero padding of their start (`[08-10]` gives `08 09 10`); several bracket
/// groups in one name multiply (`r[1-2]n[1-2]` gives `r1n1 r1n2 r2n1 r2n2`).
///
/// # Errors
///
/// [`BootstrapError::InvalidHostlist`] for unbalanced brackets, a range whose start exceeds
/// its end, a non-numeric range, or more than [`MAX_HOSTS`] hosts.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, BootstrapError> {
    let bad = |reason: String| BootstrapError::InvalidHostlist {
        list: list.into(),
        reason,
    };
    let mut depth = 0i32;
    for c in list.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(bad("unbalanced or nested brackets".into()));
        }
    }
    if depth != 0 {
        return Err(bad("unbalanced brackets".into()));
    }
    let mut out = Vec::new();
    for item in split_top_level(list) {
        expand_item(item, &mut out).map_err(bad)?;
    }
    Ok(out)
}

fn expand_item(item: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some(open) = item.find('[') else {
        push_host(out, item.to_owned())?;
        return Ok(());
    };
    let close = item[open..].find(']').ok_or("unbalanced brackets")? + open;
    let (prefix, body, suffix) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    if body.is_empty() {
        return Err(format!("empty brackets in `{item}`"));
    }
    for range in body.split(',') {
        let range = range.trim();
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let parse = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                Err(format!("`{range}` is not a number or a range N-M"))
            } else {
                s.parse::<u64>()
                    .map_err(|_| format!("`{range}` is too large"))
            }
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(format!("range `{range}` runs backwards"));
        }
        if b - a >= MAX_HOSTS as u64 {
            return Err(format!("range `{range}` has more than {MAX_HOSTS} hosts"));
        }
        let width = lo.len();
        for n in a..=b {
            expand_item(&format!("{prefix}{n:0width$}{suffix}"), out)?;
        }
    }
    Ok(())
}

fn push_host(out: &mut Vec<String>, host: String) -> Result<(), String> {
    if out.len() >= MAX_HOSTS {
        return Err(format!("more than {MAX_HOSTS} hosts"));
    }
    out.push(host);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Exchanges over the store
// ---------------------------------------------------------------------------------------

/// Publishes `my_blob` under `<tag>/<my_rank>` and collects the blobs of all `size` ranks,
/// indexed by rank.
///
/// `tag` names the exchange so that several exchanges (for example `card` and later
/// `barrier/1`) can use the same store without clashing; use a fresh tag for each exchange.
///
/// Two store requests per rank ([`Store::publish`], then [`Store::gather`] of
/// [`Members::All`], answered by the server once every rank has published), but every
/// rank receives all `size` blobs: the bytes grow as `size²` (4,096 ranks with 200-byte
/// blobs: 3.4 GB sent by the store). Where each rank needs only some blobs at once, use
/// [`exchange_grouped`] and [`lookup`] (see [Scale](self#scale)).
///
/// # Errors
///
/// * [`BootstrapError::RankNeverJoined`] listing **every** rank whose blob did not appear
///   before `deadline`, with the time waited.
/// * [`BootstrapError::InvalidRank`] if `my_rank >= size`.
/// * [`BootstrapError::Store`] for any other store failure.
///
/// A serving rank's store then stops, when dropped, without waiting for ranks that may
/// never leave: not for the ranks that never joined ([`Store::ranks_failed`]), and not at
/// all after a store failure ([`Store::job_failed`]).
pub fn exchange_all(
    store: &dyn Store,
    tag: &str,
    my_rank: u32,
    size: u32,
    my_blob: &[u8],
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, BootstrapError> {
    let got = exchange(
        store,
        tag,
        my_rank,
        size,
        "",
        &Members::All,
        my_blob,
        deadline,
    )?;
    if got.len() != size as usize || got.iter().enumerate().any(|(i, e)| e.0 != i as u32) {
        store.job_failed();
        return Err(StoreError::Protocol {
            addr: store.describe(),
            detail: format!("a gather of {size} ranks returned {} entries", got.len()),
        }
        .into());
    }
    Ok(got.into_iter().map(|(_, b)| b).collect())
}

/// Publishes `my_blob` as `my_rank`'s entry of exchange `tag` in `group` (for example this
/// rank's host identity), waits until all `size` ranks have published, and returns the
/// `(rank, blob)` of every rank of `group`, this one included, in rank order.
///
/// Two store requests per rank, and each rank receives only its group's blobs: with `L`
/// ranks per group the store sends `size × L` blobs in all, not `size²`. The other ranks'
/// blobs stay in the store, for [`lookup`] when (and if) this rank first needs them, as
/// PMIx's direct modex does.
///
/// # Errors
///
/// As [`exchange_all`].
pub fn exchange_grouped(
    store: &dyn Store,
    tag: &str,
    my_rank: u32,
    size: u32,
    group: &str,
    my_blob: &[u8],
    deadline: Instant,
) -> Result<Vec<(u32, Vec<u8>)>, BootstrapError> {
    let members = Members::Group(group.to_owned());
    exchange(
        store, tag, my_rank, size, group, &members, my_blob, deadline,
    )
}

/// The blob `rank` published in exchange `tag` ([`exchange_all`], [`exchange_grouped`]):
/// one store request. Waits until `deadline` if it is not there yet.
///
/// # Errors
///
/// [`BootstrapError::RankNeverJoined`] naming `rank` if its blob did not appear by
/// `deadline`; [`BootstrapError::Store`] for other store failures.
pub fn lookup(
    store: &dyn Store,
    tag: &str,
    rank: u32,
    deadline: Instant,
) -> Result<Vec<u8>, BootstrapError> {
    store
        .get(&entry_key(tag, rank), deadline)
        .map_err(|e| match e {
            StoreError::Timeout { waited, .. } => BootstrapError::RankNeverJoined {
                ranks: vec![rank],
                waited,
                store: store.describe(),
            },
            e => e.into(),
        })
}

/// Removes what `rank`'s part in exchange `tag` (published in `group`) left in the store:
/// a persistent store (files) reused by a later job must not hand it this job's blobs.
/// Call it once no rank will [`lookup`] this rank's blob any more.
///
/// # Errors
///
/// [`BootstrapError::Store`] for the first key that could not be removed.
pub fn withdraw(
    store: &dyn Store,
    tag: &str,
    rank: u32,
    group: &str,
) -> Result<(), BootstrapError> {
    for key in exchange_keys(tag, rank, group) {
        store.delete(&key)?;
    }
    Ok(())
}

/// Publishes, then gathers `members`; the deadline and the error naming every rank that
/// never joined are the same for every exchange.
#[allow(clippy::too_many_arguments)]
fn exchange(
    store: &dyn Store,
    tag: &str,
    my_rank: u32,
    size: u32,
    group: &str,
    members: &Members,
    my_blob: &[u8],
    deadline: Instant,
) -> Result<Vec<(u32, Vec<u8>)>, BootstrapError> {
    if my_rank >= size {
        return Err(BootstrapError::InvalidRank {
            rank: my_rank,
            size,
        });
    }
    let start = Instant::now();
    let gathered = store
        .publish(tag, my_rank, size, group, my_blob, deadline)
        .and_then(|()| store.gather(tag, my_rank, size, members, deadline));
    match gathered {
        Ok(got) => {
            tracing::debug!(tag, my_rank, size, got = got.len(), waited = ?start.elapsed(), "exchange complete");
            Ok(got)
        }
        Err(StoreError::Incomplete { missing, .. }) => {
            let waited = start.elapsed();
            tracing::warn!(tag, my_rank, ?missing, ?waited, "ranks never joined");
            // A serving store need not wait for these ranks (a stopped one keeps its
            // connection open), but the others are about to find the same and must not
            // lose the store while they look.
            store.ranks_failed(&missing);
            Err(BootstrapError::RankNeverJoined {
                ranks: missing,
                waited,
                store: store.describe(),
            })
        }
        Err(e) => {
            store.job_failed();
            Err(e.into())
        }
    }
}

/// Waits until all `size` ranks have reached the barrier named `tag`.
///
/// Two store requests per rank, and no blob comes back ([`Members::Nobody`]).
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
    exchange(
        store,
        tag,
        my_rank,
        size,
        "",
        &Members::Nobody,
        &[],
        deadline,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    /// `launcher_of` (which the benchmarks ask) and `detect` (which the communicator uses)
    /// answer alike for every launcher's environment.
    #[test]
    fn launcher_of_agrees_with_detect() {
        let cases: &[(&[(&str, &str)], Launcher)] = &[
            (&[], Launcher::Singleton),
            (
                &[
                    ("EFA_RANK", "1"),
                    ("EFA_WORLD_SIZE", "2"),
                    ("EFA_STORE", "127.0.0.1:9"),
                ],
                Launcher::Efarun,
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "10.0.0.1"),
                    ("MASTER_PORT", "29500"),
                ],
                Launcher::Torchrun,
            ),
            (
                &[
                    ("OMPI_COMM_WORLD_RANK", "0"),
                    ("OMPI_COMM_WORLD_SIZE", "2"),
                    ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                    ("EFA_STORE", "127.0.0.1:9"),
                ],
                Launcher::OpenMpi,
            ),
            (
                &[
                    ("PMI_RANK", "0"),
                    ("PMI_SIZE", "2"),
                    ("EFA_STORE", "127.0.0.1:9"),
                ],
                Launcher::Hydra,
            ),
            (
                &[
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_LOCALID", "0"),
                    ("SLURM_STEP_TASKS_PER_NODE", "2"),
                    ("SLURM_NODEID", "0"),
                    ("EFA_STORE", "127.0.0.1:9"),
                ],
                Launcher::Slurm,
            ),
        ];
        for (pairs, want) in cases {
            let e = env(pairs);
            assert_eq!(launcher_of(&e), *want, "{pairs:?}");
            match detect(&e) {
                Ok(b) => assert_eq!(b.launcher(), *want, "{pairs:?}"),
                Err(err) => panic!("{pairs:?}: {err}"),
            }
        }
    }

    fn det(pairs: &[(&str, &str)]) -> Result<Bootstrap, BootstrapError> {
        detect(&env(pairs))
    }

    fn tcp(addr: &str, server: StoreServer) -> Rendezvous {
        Rendezvous::Tcp {
            addr: addr.into(),
            server,
        }
    }

    #[test]
    fn efarun_launch() {
        let b = det(&[
            ("EFA_RANK", "2"),
            ("EFA_WORLD_SIZE", "4"),
            ("EFA_LOCAL_RANK", "2"),
            ("EFA_LOCAL_SIZE", "4"),
            ("EFA_STORE", "127.0.0.1:41000"),
            ("EFA_STORE_SERVED", "1"),
            // Lower-precedence launchers present too: ignored.
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("RANK", "0"),
        ])
        .unwrap();
        assert_eq!(b.launcher(), Launcher::Efarun);
        assert_eq!((b.rank(), b.world_size()), (2, 4));
        assert_eq!((b.local_rank(), b.local_size()), (Some(2), Some(4)));
        assert_eq!(
            b.rendezvous(),
            &tcp("127.0.0.1:41000", StoreServer::Launcher)
        );
        assert_eq!(b.rendezvous_source(), "EFA_STORE");
    }

    #[test]
    fn efarun_missing_size_names_the_variable() {
        let e = det(&[("EFA_RANK", "0")]).unwrap_err();
        assert!(
            matches!(
                e,
                BootstrapError::MissingVar {
                    var: "EFA_WORLD_SIZE",
                    launcher: Launcher::Efarun
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "efarun launch detected but EFA_WORLD_SIZE is not set"
        );
    }

    #[test]
    fn parse_error_names_variable_and_value() {
        let e = det(&[
            ("OMPI_COMM_WORLD_RANK", "x1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ])
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("OMPI_COMM_WORLD_RANK") && s.contains("\"x1\""),
            "{s}"
        );
        let e = det(&[("EFA_RANK", "0"), ("EFA_WORLD_SIZE", "-3")]).unwrap_err();
        assert!(e.to_string().contains("EFA_WORLD_SIZE=\"-3\""), "{e}");
    }

    #[test]
    fn rank_must_be_below_size_and_size_positive() {
        let e = det(&[
            ("EFA_RANK", "4"),
            ("EFA_WORLD_SIZE", "4"),
            ("EFA_STORE", "h:1"),
        ])
        .unwrap_err();
        assert_invalid(&e, "EFA_RANK", "4", "EFA_WORLD_SIZE=4");
        let e = det(&[("EFA_RANK", "0"), ("EFA_WORLD_SIZE", "0")]).unwrap_err();
        assert!(matches!(
            e,
            BootstrapError::EmptyWorld {
                var: "EFA_WORLD_SIZE"
            }
        ));
        let e = det(&[
            ("EFA_RANK", "0"),
            ("EFA_WORLD_SIZE", "4"),
            ("EFA_LOCAL_RANK", "2"),
            ("EFA_LOCAL_SIZE", "2"),
        ])
        .unwrap_err();
        assert_invalid(&e, "EFA_LOCAL_RANK", "2", "EFA_LOCAL_SIZE=2");
        let e = det(&[
            ("EFA_RANK", "0"),
            ("EFA_WORLD_SIZE", "2"),
            ("EFA_LOCAL_RANK", "0"),
            ("EFA_LOCAL_SIZE", "3"),
        ])
        .unwrap_err();
        assert_invalid(&e, "EFA_LOCAL_RANK", "0", "EFA_WORLD_SIZE=2");
        let e = det(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert_invalid(&e, "RANK", "2", "WORLD_SIZE=2");
        // The builder has no variables to name.
        assert!(matches!(
            BootstrapBuilder::new(4, 4, Rendezvous::InProcess).build(),
            Err(BootstrapError::InvalidRank { rank: 4, size: 4 })
        ));
    }

    /// `e` is an `InvalidVar` for `var` with `value`, and its message has `var="value"` and
    /// `hint`.
    #[track_caller]
    fn assert_invalid(e: &BootstrapError, var: &str, value: &str, hint: &str) {
        match e {
            BootstrapError::InvalidVar {
                var: v, value: x, ..
            } => {
                assert_eq!((v.as_str(), x.as_str()), (var, value), "{e}");
            }
            other => panic!("expected InvalidVar for {var}, got {other:?}"),
        }
        let s = e.to_string();
        assert!(s.contains(&format!("{var}={value:?}")), "{s}");
        assert!(s.contains(hint), "{hint:?} not in {s}");
    }

    #[test]
    fn bad_numbers_name_the_variable_the_value_and_the_range() {
        for (vars, var, value) in [
            (
                &[("EFA_RANK", "-1"), ("EFA_WORLD_SIZE", "2")][..],
                "EFA_RANK",
                "-1",
            ),
            (
                &[("EFA_RANK", "0"), ("EFA_WORLD_SIZE", "two")][..],
                "EFA_WORLD_SIZE",
                "two",
            ),
            (
                &[("EFA_RANK", "99999999999"), ("EFA_WORLD_SIZE", "2")][..],
                "EFA_RANK",
                "99999999999",
            ),
            (
                &[("EFA_RANK", "1.5"), ("EFA_WORLD_SIZE", "2")][..],
                "EFA_RANK",
                "1.5",
            ),
            (
                &[
                    ("EFA_RANK", "0"),
                    ("EFA_WORLD_SIZE", "2"),
                    ("EFA_LOCAL_RANK", "x"),
                ][..],
                "EFA_LOCAL_RANK",
                "x",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "-2")][..],
                "WORLD_SIZE",
                "-2",
            ),
            (&[("RANK", "a"), ("WORLD_SIZE", "2")][..], "RANK", "a"),
        ] {
            let e = det(vars).unwrap_err();
            assert_invalid(
                &e,
                var,
                value,
                "expected a whole number from 0 to 4294967295",
            );
        }
        let e = det(&[("RANK", "0")]).unwrap_err();
        assert!(
            matches!(
                e,
                BootstrapError::MissingVar {
                    var: "WORLD_SIZE",
                    launcher: Launcher::Torchrun
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn rendezvous_variables_are_validated() {
        let base = [("RANK", "1"), ("WORLD_SIZE", "2")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            det(&v)
        };
        let e = with(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "0")]).unwrap_err();
        assert_invalid(&e, "MASTER_PORT", "0", "from 1 to 65535");
        let e = with(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "-1")]).unwrap_err();
        assert_invalid(&e, "MASTER_PORT", "-1", "from 1 to 65535");
        let e = with(&[("MASTER_ADDR", "head:29500"), ("MASTER_PORT", "29500")]).unwrap_err();
        assert_invalid(&e, "MASTER_ADDR", "head:29500", "without a port");
        let e = with(&[("MASTER_ADDR", "head node"), ("MASTER_PORT", "29500")]).unwrap_err();
        assert_invalid(&e, "MASTER_ADDR", "head node", "host name or address");
        let e = with(&[("MASTER_ADDR", "tcp://head"), ("MASTER_PORT", "29500")]).unwrap_err();
        assert_invalid(&e, "MASTER_ADDR", "tcp://head", "host name or address");
        // IPv6 with or without brackets is fine.
        for a in ["fd00::1", "[fd00::1]"] {
            let mut v = base.to_vec();
            v.extend_from_slice(&[("MASTER_ADDR", a), ("MASTER_PORT", "29500")]);
            assert_eq!(
                det(&v).unwrap().rendezvous(),
                &tcp("[fd00::1]:29500", StoreServer::Rank0)
            );
        }
        let e = det(&[
            ("TORCHELASTIC_RUN_ID", "x"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "maybe"),
        ])
        .unwrap_err();
        assert_invalid(&e, "TORCHELASTIC_USE_AGENT_STORE", "maybe", "True or False");
        // A launcher-served store without its address.
        let e = with(&[("EFA_STORE_SERVED", "1")]).unwrap_err();
        assert_invalid(
            &e,
            "EFA_STORE_SERVED",
            "1",
            "EFA_STORE (its address) is not set",
        );
        // Every malformed EFA_STORE names the variable, the value and the fix.
        for (bad, hint) in [
            ("file://rel/path", "file:///shared/dir"),
            ("file:/abs/path", "file:///shared/dir"),
            ("http://h:80", "unknown scheme `http://`"),
            ("nohost", "expected host:port"),
            (":80", "the host is empty"),
            ("h:port", "from 1 to 65535"),
            ("h:70000", "from 1 to 65535"),
            ("h:0", "choose a port from 1 to 65535"),
            ("::1:80", "brackets"),
            ("head node:80", "node1:29500"),
            ("user@head:80", "node1:29500"),
        ] {
            let e = with(&[("EFA_STORE", bad)]).unwrap_err();
            assert_invalid(&e, "EFA_STORE", bad, hint);
        }
    }

    #[test]
    fn store_token_is_read_validated_and_hidden() {
        let secret = "0123456789abcdef0123456789abcdef";
        let b = det(&[
            ("EFA_RANK", "0"),
            ("EFA_WORLD_SIZE", "2"),
            ("EFA_STORE", "h:1"),
            ("EFA_STORE_TOKEN", secret),
        ])
        .unwrap();
        assert_eq!(b.store_token().map(|t| t.as_str()), Some(secret));
        assert!(!format!("{b:?}").contains(secret), "{b:?}");
        // Unset and empty mean no token.
        for v in [None, Some("")] {
            let mut vars = vec![
                ("EFA_RANK", "0"),
                ("EFA_WORLD_SIZE", "2"),
                ("EFA_STORE", "h:1"),
            ];
            vars.extend(v.map(|v| ("EFA_STORE_TOKEN", v)));
            assert_eq!(det(&vars).unwrap().store_token(), None);
        }
        for (bad, hint) in [
            ("short", "at least 16"),
            ("0123456789abcdef 0123456789", "not printable ASCII"),
        ] {
            let e = det(&[
                ("EFA_RANK", "0"),
                ("EFA_WORLD_SIZE", "2"),
                ("EFA_STORE", "h:1"),
                ("EFA_STORE_TOKEN", bad),
            ])
            .unwrap_err();
            let s = e.to_string();
            assert!(
                matches!(&e, BootstrapError::InvalidVar { var, .. } if var == "EFA_STORE_TOKEN"),
                "{e:?}"
            );
            assert!(s.contains(hint) && s.contains("openssl rand"), "{s}");
            assert!(!s.contains(bad), "the secret is repeated: {s}");
        }
        let long = "x".repeat(StoreToken::MAX_LEN + 1);
        assert!(StoreToken::new(&long).is_err());
        assert!(StoreToken::new(&"x".repeat(StoreToken::MAX_LEN)).is_ok());
    }

    #[test]
    fn no_launcher_is_a_singleton_with_an_in_process_store() {
        let b = det(&[]).unwrap();
        assert_eq!(b.launcher(), Launcher::Singleton);
        assert_eq!((b.rank(), b.world_size()), (0, 1));
        assert_eq!(b.rendezvous(), &Rendezvous::InProcess);
        // Empty values count as unset.
        assert_eq!(
            det(&[("EFA_RANK", " ")]).unwrap().launcher(),
            Launcher::Singleton
        );
    }

    #[test]
    fn open_mpi_single_node_uses_file_store_keyed_by_jobid() {
        let b = det(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("OMPI_MCA_ess_base_jobid", "1234567"),
            ("PMIX_NAMESPACE", "prterun-host-1@1"),
        ])
        .unwrap();
        assert_eq!(b.launcher(), Launcher::OpenMpi);
        assert_eq!(
            b.rendezvous(),
            &Rendezvous::File {
                dir: "/tmp/efa-store-ompi-1234567".into()
            }
        );
        // Open MPI 5: only the PMIx namespace; odd characters are sanitized.
        let b = det(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("PMIX_NAMESPACE", "prterun-host-1@1"),
        ])
        .unwrap();
        assert_eq!(
            b.rendezvous(),
            &Rendezvous::File {
                dir: "/tmp/efa-store-ompi-prterun-host-1_1".into()
            }
        );
    }

    #[test]
    fn open_mpi_multi_node_without_address_asks_for_efa_store() {
        let e = det(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("OMPI_MCA_ess_base_jobid", "1"),
        ])
        .unwrap_err();
        assert!(matches!(
            e,
            BootstrapError::NoRendezvous {
                launcher: Launcher::OpenMpi,
                ..
            }
        ));
        assert!(e.to_string().contains("set EFA_STORE="), "{e}");
    }

    #[test]
    fn single_node_without_job_id_is_an_error() {
        let e = det(&[
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALRANKID", "0"),
            ("MPI_LOCALNRANKS", "2"),
        ])
        .unwrap_err();
        assert!(
            matches!(
                e,
                BootstrapError::NoRendezvous {
                    launcher: Launcher::Hydra,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn hydra_without_kvsname_is_keyed_by_its_proxy() {
        // What MPICH 4.0's `mpiexec.hydra -n 2` sets: no PMI_KVSNAME, PMI_JOBID or PMIX_*.
        let vars = [
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "2"),
            ("PMI_FD", "6"),
            ("MPI_LOCALRANKID", "1"),
            ("MPI_LOCALNRANKS", "2"),
        ];
        let b = detect_with(&env(&vars), Some("proxy-4242".into())).unwrap();
        assert_eq!(b.job_id(), Some("proxy-4242"));
        assert_eq!(
            b.rendezvous(),
            &Rendezvous::File {
                dir: "/tmp/efa-store-hydra-proxy-4242".into()
            }
        );
        // A KVS name in the environment wins; other launchers ignore the proxy key.
        let mut with_kvs = vars.to_vec();
        with_kvs.push(("PMI_KVSNAME", "kvs_7_0"));
        let b = detect_with(&env(&with_kvs), Some("proxy-4242".into())).unwrap();
        assert_eq!(b.job_id(), Some("kvs_7_0"));
        let e = detect_with(
            &env(&[
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ]),
            Some("proxy-4242".into()),
        )
        .unwrap_err();
        assert!(matches!(e, BootstrapError::NoRendezvous { .. }), "{e}");

        let proc = std::env::temp_dir().join(format!("efa-proc-hydra-{}", std::process::id()));
        for (pid, comm) in [(10, "hydra_pmi_proxy\n"), (11, "bash\n")] {
            std::fs::create_dir_all(proc.join(pid.to_string())).unwrap();
            std::fs::write(proc.join(pid.to_string()).join("comm"), comm).unwrap();
        }
        assert_eq!(hydra_proxy_key(&proc, 10).as_deref(), Some("proxy-10"));
        assert_eq!(hydra_proxy_key(&proc, 11), None);
        assert_eq!(hydra_proxy_key(&proc, 12), None);
        std::fs::remove_dir_all(&proc).unwrap();
    }

    #[test]
    fn hydra_with_and_without_local_ids() {
        let b = det(&[
            ("PMI_RANK", "3"),
            ("PMI_SIZE", "4"),
            ("MPI_LOCALRANKID", "3"),
            ("MPI_LOCALNRANKS", "4"),
            ("PMI_KVSNAME", "kvs_4242_0"),
        ])
        .unwrap();
        assert_eq!(b.launcher(), Launcher::Hydra);
        assert_eq!((b.local_rank(), b.local_size()), (Some(3), Some(4)));
        assert_eq!(
            b.rendezvous(),
            &Rendezvous::File {
                dir: "/tmp/efa-store-hydra-kvs_4242_0".into()
            }
        );
        let b = det(&[
            ("PMI_RANK", "3"),
            ("PMI_SIZE", "4"),
            ("MASTER_ADDR", "n1"),
            ("MASTER_PORT", "5000"),
        ])
        .unwrap();
        assert_eq!((b.local_rank(), b.local_size()), (None, None));
        assert_eq!(b.rendezvous(), &tcp("n1:5000", StoreServer::Rank0));
    }

    fn slurm(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_JOB_ID", "777"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x4)"),
            ("SLURM_STEP_NUM_NODES", "4"),
            ("SLURM_STEP_NODELIST", "gpu[07-10]"),
            ("SLURM_JOB_NODELIST", "gpu[01-10]"),
        ];
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn slurm_multi_node_uses_first_step_host_and_derived_port() {
        let b = det(&slurm(&[])).unwrap();
        assert_eq!(b.launcher(), Launcher::Slurm);
        assert_eq!((b.rank(), b.world_size()), (5, 8));
        assert_eq!((b.local_rank(), b.local_size()), (Some(1), Some(2)));
        assert_eq!(b.job_id(), Some("777.0"));
        // FNV-1a of "777.0" is 0xc539_1862, folded into 10000..=29999 (worked out apart
        // from slurm_port, which this checks).
        let port = 23346;
        assert_eq!(
            b.rendezvous(),
            &tcp(&format!("gpu07:{port}"), StoreServer::Rank0)
        );
        // Without the step list, the job list.
        let v: Vec<_> = slurm(&[])
            .into_iter()
            .filter(|(k, _)| *k != "SLURM_STEP_NODELIST")
            .collect();
        assert_eq!(
            det(&v).unwrap().rendezvous(),
            &tcp(&format!("gpu01:{port}"), StoreServer::Rank0)
        );
    }

    #[test]
    fn slurm_single_node_uses_file_store() {
        let b = det(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "0"),
            ("SLURM_JOB_ID", "99"),
            ("SLURM_STEP_ID", "3"),
            ("SLURM_STEP_NUM_NODES", "1"),
        ])
        .unwrap();
        assert_eq!(
            b.rendezvous(),
            &Rendezvous::File {
                dir: "/tmp/efa-store-slurm-99.3".into()
            }
        );
    }

    #[test]
    fn slurm_explicit_addresses_win() {
        let b = det(&slurm(&[("MASTER_ADDR", "head"), ("MASTER_PORT", "29500")])).unwrap();
        assert_eq!(b.rendezvous(), &tcp("head:29500", StoreServer::Rank0));
        let b = det(&slurm(&[
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "29500"),
            ("EFA_STORE", "file:///fsx/x"),
        ]))
        .unwrap();
        assert_eq!(
            b.rendezvous(),
            &Rendezvous::File {
                dir: "/fsx/x".into()
            }
        );
    }

    #[test]
    fn srun_with_pmi2_is_still_slurm() {
        let b = det(&slurm(&[("PMI_RANK", "5"), ("PMI_SIZE", "8")])).unwrap();
        assert_eq!(b.launcher(), Launcher::Slurm);
    }

    #[test]
    fn mpirun_inside_slurm_is_mpi() {
        let b = det(&slurm(&[
            ("OMPI_COMM_WORLD_RANK", "6"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("EFA_STORE", "head:1"),
        ]))
        .unwrap();
        assert_eq!((b.launcher(), b.rank()), (Launcher::OpenMpi, 6));
    }

    #[test]
    fn torchrun_under_srun_uses_torchrun_ranks() {
        let b = det(&slurm(&[
            ("TORCHELASTIC_RUN_ID", "abc"),
            ("RANK", "13"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "5"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "gpu07"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap();
        assert_eq!(b.launcher(), Launcher::Torchrun);
        assert_eq!(
            (b.rank(), b.world_size(), b.local_rank(), b.local_size()),
            (13, 16, Some(5), Some(8))
        );
        // The agent's store holds 29500.
        assert_eq!(b.rendezvous(), &tcp("gpu07:29501", StoreServer::Rank0));
    }

    #[test]
    fn torchrun_plain() {
        let b = det(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "fd00::1"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!(b.launcher(), Launcher::Torchrun);
        assert_eq!(b.rendezvous(), &tcp("[fd00::1]:29500", StoreServer::Rank0));
        let e = det(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).unwrap_err();
        assert!(matches!(
            e,
            BootstrapError::MissingVar {
                var: "MASTER_PORT",
                ..
            }
        ));
        let e = det(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "99999"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT=\"99999\""), "{e}");
        let e = det(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(matches!(
            e,
            BootstrapError::NoRendezvous {
                launcher: Launcher::Torchrun,
                ..
            }
        ));
    }

    #[test]
    fn efa_store_parsing() {
        assert_eq!(
            Rendezvous::parse("file:///fsx/job1", false).unwrap(),
            Rendezvous::File {
                dir: "/fsx/job1".into()
            }
        );
        assert_eq!(
            Rendezvous::parse("tcp://h:1", false).unwrap(),
            tcp("h:1", StoreServer::Rank0)
        );
        assert_eq!(
            Rendezvous::parse("[::1]:80", true).unwrap(),
            tcp("[::1]:80", StoreServer::Launcher)
        );
        for bad in [
            "file://rel/path",
            "nohost",
            ":80",
            "h:port",
            "h:70000",
            "::1:80",
        ] {
            let e = Rendezvous::parse(bad, false).unwrap_err();
            assert!(e.to_string().contains("EFA_STORE"), "{bad}: {e}");
        }
        let e = det(&[
            ("EFA_RANK", "0"),
            ("EFA_WORLD_SIZE", "2"),
            ("EFA_STORE", "h:1"),
            ("EFA_STORE_SERVED", "yes"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("EFA_STORE_SERVED"), "{e}");
    }

    #[test]
    fn builder_validates() {
        let b = BootstrapBuilder::new(1, 2, tcp("h:1", StoreServer::Rank0))
            .local(1, 2)
            .build()
            .unwrap();
        assert_eq!(
            (b.rank(), b.world_size(), b.launcher()),
            (1, 2, Launcher::Explicit)
        );
        assert!(BootstrapBuilder::new(2, 2, Rendezvous::InProcess)
            .build()
            .is_err());
        assert!(BootstrapBuilder::new(0, 0, Rendezvous::InProcess)
            .build()
            .is_err());
        assert!(BootstrapBuilder::new(0, 2, Rendezvous::InProcess)
            .build()
            .is_err());
        assert!(BootstrapBuilder::new(0, 1, Rendezvous::InProcess)
            .build()
            .is_ok());
    }

    #[test]
    fn hostlist_expansion() {
        assert_eq!(
            expand_hostlist("node[01-03,7],gpu5").unwrap(),
            ["node01", "node02", "node03", "node7", "gpu5"]
        );
        assert_eq!(expand_hostlist("a").unwrap(), ["a"]);
        assert_eq!(expand_hostlist("n[08-10]").unwrap(), ["n08", "n09", "n10"]);
        assert_eq!(
            expand_hostlist("r[1-2]n[1-2]").unwrap(),
            ["r1n1", "r1n2", "r2n1", "r2n2"]
        );
        assert_eq!(expand_hostlist("x[3]-ib,y").unwrap(), ["x3-ib", "y"]);
        assert_eq!(
            expand_hostlist("ip-10-0-1-[5-6]").unwrap(),
            ["ip-10-0-1-5", "ip-10-0-1-6"]
        );
        assert!(expand_hostlist("").unwrap().is_empty());
        for bad in [
            "n[1-",
            "n]1[",
            "n[3-1]",
            "n[a-b]",
            "n[]",
            "n[[1]]",
            "n[1-2000000]",
            "n[1--2]",
        ] {
            assert!(
                matches!(
                    expand_hostlist(bad),
                    Err(BootstrapError::InvalidHostlist { .. })
                ),
                "{bad} should be rejected"
            );
        }
        assert_eq!(first_host("gpu[07-10],cpu1").unwrap(), "gpu07");
    }

    #[test]
    fn tasks_per_node() {
        assert_eq!(parse_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert_eq!(parse_tasks_per_node("4").unwrap(), [4]);
        assert!(parse_tasks_per_node("2(3)").is_err());
        assert!(parse_tasks_per_node("x").is_err());
    }

    #[test]
    fn slurm_port_is_stable_and_in_range() {
        // Literal values of FNV-1a("<job>.<step>") % 20000 + 10000, computed apart from
        // slurm_port: a change of the formula changes the port every rank must agree on.
        assert_eq!(slurm_port("777", "0"), 23346);
        assert_eq!(slurm_port("777", "1"), 20965);
        assert_eq!(slurm_port("0", "0"), 18185);
        for j in 0..2000 {
            let p = slurm_port(&j.to_string(), "0");
            assert!((10_000..30_000).contains(&p));
        }
    }

    #[test]
    fn never_joined_message_lists_ranks_and_names_the_store() {
        let e = BootstrapError::RankNeverJoined {
            ranks: vec![3],
            waited: Duration::from_millis(300),
            store: "the TCP store at 127.0.0.1:4242 (served by efarun)".into(),
        };
        assert!(
            e.to_string().starts_with(
                "rank 3 never joined the TCP store at 127.0.0.1:4242 (served by efarun) within 0.3 s: "
            ),
            "{e}"
        );
        let e = BootstrapError::RankNeverJoined {
            ranks: vec![1, 4],
            waited: Duration::from_secs(30),
            store: "the file store in /fsx/j".into(),
        };
        assert!(
            e.to_string()
                .starts_with("ranks 1, 4 never joined the file store in /fsx/j within 30.0 s: "),
            "{e}"
        );
        assert_eq!(fmt_secs(Duration::from_micros(2500)), "2.5 ms");
    }
}
