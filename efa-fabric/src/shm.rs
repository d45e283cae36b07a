//! The `shm` provider's shared-memory regions: their names, their permissions, and cleanup.
//!
//! Every `shm` endpoint owns one region, a file of about 16 MiB in `/dev/shm` that peers on
//! the same host map to deliver messages. This module makes sure that none is left behind
//! and that none is readable by another user:
//!
//! - **Names.** [`EndpointBuilder::build`](crate::EndpointBuilder::build) names each region
//!   `efa-<pid>-<start>-<pidns>-<nanos>-<seq>`: the creating process's pid, its start time
//!   (clock ticks since boot, field 22 of `/proc/<pid>/stat`), its pid namespace (the inode of
//!   `/proc/<pid>/ns/pid`), the creation time (nanoseconds since the epoch, hex) and a
//!   per-process counter. The name is unique over time, and it says exactly which process
//!   owns the region, even after the pid has been reused. (`efa-<pid>-<nanos>-<seq>` names
//!   are from earlier versions; libfabric's own `<pid>:<uid>:<n>` names are never used by
//!   efa-rs endpoints.) The rules about owners, unlinking at exit and reclaiming are
//!   `efa_shm::owner`'s, shared with the fast-box segments, which have names of their own.
//! - **Permissions.** libfabric (1.17 and 2.x) creates the region with `shm_open(..., O_CREAT |
//!   O_EXCL, 0600)`, which the umask can only narrow. After `fi_enable` the region is checked:
//!   it must be a regular file owned by this process's effective uid; group or other access
//!   bits are removed (mode 0600). A region owned by someone else fails the open with
//!   [`crate::Error::ShmRegion`].
//! - **Clean exit.** Closing the endpoint (dropping the last handle) makes the provider
//!   unlink the region. Endpoints that are never dropped (a handle in a `static`, a leaked
//!   handle, `std::process::exit`) are unlinked by an `atexit` handler. `SIGINT`, `SIGTERM`,
//!   `SIGSEGV` and `SIGBUS` are covered by the provider's own signal handlers.
//! - **Killed processes.** `SIGKILL` (or a power cut of the process) leaves the region. Each
//!   time an `shm` endpoint is opened, [`reclaim_stale_regions`] removes the regions that
//!   efa-rs named, that belong to this effective uid and whose owner is gone. So the next job
//!   on the host cleans up after a killed one, and a host cannot fill up.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use efa_shm::owner::{self, euid, Owner};
pub use efa_shm::owner::{Reclaimed, SHM_DIR};

use crate::error::{Error, Result, ShmProblem};

const PREFIX: &str = "efa-";

/// Who created a region, as its name records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionOwner {
    /// Process id of the creator.
    pub pid: u32,
    /// The creator's start time in clock ticks since boot (`/proc/<pid>/stat` field 22);
    /// `None` for names of earlier efa-rs versions, `Some(0)` where `/proc` was unreadable.
    pub start: Option<u64>,
    /// Inode of the creator's pid namespace (`/proc/<pid>/ns/pid`); same convention.
    pub pid_ns: Option<u64>,
}

/// Parses a region name that efa-rs gave (see the [module docs](self)); `None` for any other
/// file name, e.g. libfabric's own `<pid>:<uid>:<n>`.
pub fn parse_region_name(name: &str) -> Option<RegionOwner> {
    let rest = name.strip_prefix(PREFIX)?;
    let f: Vec<&str> = rest.split('-').collect();
    let dec = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let pid = u32::try_from(dec(f.first()?)?).ok()?;
    match f.len() {
        // efa-<pid>-<start>-<pidns>-<nanos hex>-<seq>
        5 if hex(f[3]) && dec(f[4]).is_some() => Some(RegionOwner {
            pid,
            start: Some(dec(f[1])?),
            pid_ns: Some(dec(f[2])?),
        }),
        // Earlier versions: efa-<pid>-<nanos hex>-<seq>
        3 if hex(f[1]) && dec(f[2]).is_some() => Some(RegionOwner {
            pid,
            start: None,
            pid_ns: None,
        }),
        _ => None,
    }
}

/// A new region name for this process (see the [module docs](self)).
pub(crate) fn new_region_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // 0 where /proc cannot tell: such regions are never reclaimed by other processes.
    let Owner { pid, start, pid_ns } = Owner::this();
    format!(
        "{PREFIX}{pid}-{start}-{pid_ns}-{nanos:x}-{}",
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Records an enabled endpoint's region, to be unlinked at exit if its endpoint is never
/// closed (handles in statics or leaked, `std::process::exit`): [`owner::unlink_at_exit`].
pub(crate) fn opened(name: &str) {
    owner::unlink_at_exit(&region_path(name), None);
}

/// Forgets a region whose endpoint has been closed (the provider unlinked it).
pub(crate) fn closed(name: &str) {
    owner::forget_at_exit(&region_path(name));
}

/// Checks that an enabled endpoint's region is private: a regular file owned by this
/// process's effective uid, mode 0600 (group and other bits are removed if a provider
/// version set them).
///
/// # Errors
/// [`Error::ShmRegion`] when the file is not a regular file, is owned by another uid, or its
/// mode cannot be narrowed.
pub(crate) fn check_private(name: &str) -> Result<()> {
    let path = region_path(name);
    let fail = |problem: ShmProblem| Error::ShmRegion {
        path: path.clone(),
        problem,
    };
    let md = match std::fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Not where glibc puts it: nothing to check or clean up here.
            tracing::warn!(path = %path.display(), "shm region not found in {SHM_DIR}; its mode and cleanup are not checked");
            return Ok(());
        }
        Err(e) => return Err(fail(ShmProblem::Stat(e))),
    };
    if !md.file_type().is_file() {
        return Err(fail(ShmProblem::NotAFile {
            file_type: format!("{:?}", md.file_type()),
        }));
    }
    let me = euid();
    if md.uid() != me {
        return Err(fail(ShmProblem::ForeignOwner {
            owner: md.uid(),
            me,
        }));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "shm region created with mode {mode:o}; narrowing it to 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| fail(ShmProblem::Chmod { mode, source }))?;
    }
    Ok(())
}

/// Why a region is stale, or `None` if it must be kept.
fn stale_because(owner: &RegionOwner, my_ns: u64) -> Option<&'static str> {
    match (owner.start, owner.pid_ns) {
        (Some(start), Some(pid_ns)) => Owner {
            pid: owner.pid,
            start,
            pid_ns,
        }
        .gone_because(my_ns),
        // Earlier versions' names record the pid only.
        _ => match std::fs::symlink_metadata(format!("/proc/{}", owner.pid)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some("its process is gone"),
            _ => None,
        },
    }
}

/// Removes the shared-memory regions in `/dev/shm` that efa-rs named, that belong to this
/// process's effective uid, and whose creating process is gone (killed with `SIGKILL`, or
/// crashed where no handler ran). Called each time an `shm` endpoint is opened; exposed for
/// tools and tests.
///
/// What is never removed: files of other uids; names that efa-rs did not give (e.g.
/// libfabric's `<pid>:<uid>:<n>`, which other libfabric programs use); regions whose creator
/// is alive, recognised by pid *and* start time, so a reused pid does not protect a dead
/// owner's region and a live owner's region is never taken; regions created in another pid
/// namespace; regions whose creator could not be identified. Two jobs reclaiming at once
/// only remove dead owners' files, so each may find a file already gone, which is fine.
///
/// # Errors
/// Reading `/dev/shm` or `/proc/self` failed (then nothing was removed). Files that vanish
/// or cannot be removed while scanning are skipped.
pub fn reclaim_stale_regions() -> io::Result<Reclaimed> {
    owner::reclaim(PREFIX, "shm region", |c| {
        parse_region_name(c.name).and_then(|o| stale_because(&o, c.my_ns))
    })
}

/// [`reclaim_stale_regions`] as run when an `shm` endpoint is opened: failures are logged,
/// never returned (a full or odd `/dev/shm` then shows up as the provider's own error).
pub(crate) fn reclaim_on_open() {
    owner::log_reclaimed(reclaim_stale_regions(), "shm regions");
}

/// The path of a region name, for [`Endpoint::shm_region`](crate::Endpoint::shm_region).
pub(crate) fn region_path(name: &str) -> PathBuf {
    Path::new(SHM_DIR).join(OsStr::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check_private` on what an attacker could leave under an endpoint's name: each is
    /// [`Error::ShmRegion`] with the matching [`ShmProblem`], never a panic.
    #[test]
    fn region_problems_are_typed() {
        let name = format!("efa-test-{}-{}", std::process::id(), new_region_name());
        let path = region_path(&name);
        std::fs::create_dir(&path).unwrap();
        let err = check_private(&name).unwrap_err();
        std::fs::remove_dir(&path).unwrap();
        assert!(
            matches!(&err, Error::ShmRegion { path: p, problem: ShmProblem::NotAFile { .. } } if *p == path),
            "{err:?}"
        );
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        let err = check_private(&name).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(&err, Error::ShmRegion { problem: ShmProblem::NotAFile { file_type }, .. } if file_type.contains("symlink") || file_type.contains("FileType")),
            "{err:?}"
        );
        // A regular file of ours with a wide mode is narrowed, not an error.
        std::fs::write(&path, b"x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_private(&name).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        std::fs::remove_file(&path).unwrap();
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn names_round_trip() {
        let n = new_region_name();
        let o = parse_region_name(&n).expect("our own name parses");
        assert_eq!(o.pid, std::process::id());
        let me = Owner::this();
        assert_eq!(o.start, Some(me.start));
        assert_eq!(o.pid_ns, Some(me.pid_ns));
        assert!(me.start > 0 && me.pid_ns > 0, "/proc tells {me:?}");
        assert_ne!(n, new_region_name(), "names are unique");
        assert!(n.len() < 255, "fits the provider's SMR_NAME_MAX");
    }

    #[test]
    fn foreign_and_legacy_names() {
        assert_eq!(
            parse_region_name("efa-12652-18ecf9cc78115da3-0"),
            Some(RegionOwner {
                pid: 12652,
                start: None,
                pid_ns: None
            })
        );
        assert_eq!(
            parse_region_name("efa-7-123-4026531836-18ecf9cc78115da3-12"),
            Some(RegionOwner {
                pid: 7,
                start: Some(123),
                pid_ns: Some(4026531836)
            })
        );
        for other in [
            "12652:0:0",
            "efa-",
            "efa-x-1-2",
            "efa-1-zz-2",
            "efa-1-2-3-4",
            "efa-1-2-3-ab-cd",
            "efa-99999999999-1-2",
            "sem.efa-1-2-3",
            "efa-1--3",
        ] {
            assert_eq!(parse_region_name(other), None, "{other}");
        }
        // The fast-box segments (efa_shm::segment) share the prefix and the reclaim code but
        // not the names: neither cleanup takes the other's files for its own.
        let fbox = efa_shm::segment::segment_name("job-1", 3);
        assert!(fbox.starts_with(PREFIX), "{fbox}");
        assert_eq!(parse_region_name(&fbox), None, "{fbox}");
        assert!(!new_region_name().starts_with(efa_shm::segment::PREFIX));
    }
    // stat_start_time_with_odd_command_name moved with the parser to efa_shm::owner.
}
