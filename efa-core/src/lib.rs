//! `efa-core`: the communicator that users see.
//!
//! Bootstrap under common launchers, per-peer placement (shm on the same host, the fabric on
//! the same subnet, IP across subnets), tagged point-to-point messaging, RMA windows and
//! collectives, all built from `efa-fabric` objects.
//!
//! The fabric-independent pieces live here as plain modules:
//!
//! * [`bootstrap`]: rank, world size and rendezvous from the launcher's environment
//!   (`efarun`, Open MPI, MPICH Hydra, Slurm, torchrun) or given explicitly.
//! * [`store`]: the rendezvous key-value store (TCP, shared directory, in-process) and
//!   [`store::exchange_all`], which collects one blob from every rank.
//! * [`placement`]: [`placement::Card`]s and the pure per-peer route choice.
//!
//! The `efarun` binary starts N local ranks with the bootstrap variables set and serves their
//! TCP store for the lifetime of the job.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bootstrap;
pub mod comm;
pub mod error;
pub mod net;
pub mod placement;
pub mod store;
pub mod wire;

pub use comm::{
    Communicator, CommunicatorBuilder, Config, RecvRequest, Request, SendRequest, Source, Status,
    Tag,
};
pub use error::{Error, Result};
pub use placement::Transport;
