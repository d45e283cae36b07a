//! Files in `/dev/shm` and the processes that own them: who a process is (across pid
//! reuse), unlinking at exit, and reclaiming the files of owners that were killed.
//!
//! The one home of these rules for every shared-memory file of efa-rs: the fast-box
//! segments ([`crate::segment`], owner recorded in the segment's header) and efa-fabric's
//! `shm` provider regions (`efa_fabric::shm`, owner recorded in the file name). Each keeps
//! its own names; both decide with [`Owner::gone_because`], unlink at exit through
//! [`unlink_at_exit`] (one `atexit` handler per process) and scan with [`reclaim`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use std::os::unix::fs::MetadataExt;

/// The directory in which glibc's `shm_open` creates its files.
pub const SHM_DIR: &str = "/dev/shm";

/// A process, identified even after its pid has been reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`); 0 where
    /// `/proc` could not tell.
    pub start: u64,
    /// Inode of the process's pid namespace (`/proc/<pid>/ns/pid`); 0 where `/proc` could
    /// not tell.
    pub pid_ns: u64,
}

impl Owner {
    /// This process.
    pub fn this() -> Owner {
        Owner {
            pid: std::process::id(),
            start: proc_start("self").unwrap_or(0),
            pid_ns: proc_pid_ns("self").unwrap_or(0),
        }
    }

    /// Why the files of this owner may be removed (it is gone, or its pid belongs to a
    /// process started at another time), seen from a process in pid namespace `my_ns`
    /// ([`Owner::this`]`().pid_ns`); `None` when they must be kept: the owner is alive (or an
    /// unreaped zombie), could not be identified (0), lives in another pid namespace (a
    /// container sharing `/dev/shm`, whose pids we cannot see), or `/proc` does not answer
    /// now (racing its exit: next time).
    pub fn gone_because(&self, my_ns: u64) -> Option<&'static str> {
        if self.start == 0 || self.pid_ns == 0 || self.pid_ns != my_ns {
            return None;
        }
        match proc_start(&self.pid.to_string()) {
            Ok(s) if s == self.start => None,
            Ok(_) => Some("its pid now belongs to another process"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some("its process is gone"),
            Err(_) => None,
        }
    }
}

/// Start time (clock ticks since boot) of process `pid` (a number or `self`).
fn proc_start(pid: &str) -> io::Result<u64> {
    let pid = match pid {
        "self" => std::process::id(),
        n => n
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a pid"))?,
    };
    proc_stat(pid).map(|(_, start)| start)
}

/// The state letter (field 3) and the start time in clock ticks since boot (field 22) of
/// `/proc/<pid>/stat`: the one reader of that file in efa-rs (efa-core's failure detector
/// calls it too, `efa_core::placement::proc_stat`).
///
/// Makes no heap allocation (path and contents live on the stack): waiting ranks call it
/// every 100 ms for each same-host peer, inside the allocation-free message path. The
/// command name may hold any bytes, not only UTF-8.
///
/// # Errors
/// `NotFound` when no process `pid` exists; other I/O errors as `/proc` gives them;
/// `InvalidData` when the line has no such fields.
pub fn proc_stat(pid: u32) -> io::Result<(char, u64)> {
    use std::io::{Read, Write};
    use std::os::unix::ffi::OsStrExt;
    const PATH_MAX: usize = 32;
    let mut path = [0u8; PATH_MAX];
    let n = {
        let mut w = &mut path[..];
        write!(w, "/proc/{pid}/stat")?;
        PATH_MAX - w.len()
    };
    let mut file = std::fs::File::open(std::ffi::OsStr::from_bytes(&path[..n]))?;
    // The line is at most a few hundred bytes: the command name (field 2) is at most 64
    // bytes, the 50 other fields are numbers.
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(k) => len += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    parse_stat(&buf[..len])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no state or starttime in stat"))
}

/// State (field 3) and starttime (field 22) of a `/proc/<pid>/stat` line.
fn parse_stat(stat: &[u8]) -> Option<(char, u64)> {
    // The command name (field 2) is in parentheses and may contain spaces, ')' and any
    // byte; field 3 (state) is the first after the last ')', so starttime is the 20th.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let after = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut f = after.split_whitespace();
    let state = f.next()?.chars().next()?;
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Inode of the pid namespace of process `pid` (`pid:[4026531836]`).
fn proc_pid_ns(pid: &str) -> io::Result<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/pid"))?;
    link.to_str()
        .and_then(|s| s.strip_prefix("pid:["))
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected ns/pid link"))
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Files to unlink when this process exits: (creating pid, path, inode if known).
static AT_EXIT: Mutex<Vec<(u32, PathBuf, Option<u64>)>> = Mutex::new(Vec::new());

/// Unlinks `path` when this process exits (`exit`, return from `main`), unless
/// [`forget_at_exit`] is called first: for files whose owner may never be dropped (a handle
/// in a `static`, a leaked handle, `std::process::exit`). With `ino`, only while the path
/// is still that inode (never a later file of the same name).
pub fn unlink_at_exit(path: &Path, ino: Option<u64>) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: run_at_exit is an `extern "C" fn()` taking nothing, as atexit needs. It
        // does not panic (no unwrap), and a panic could not unwind out of an `extern "C"`
        // fn anyway (it aborts).
        if unsafe { libc::atexit(run_at_exit) } != 0 {
            tracing::warn!("atexit failed: shared-memory files of this process that are never closed may stay in {SHM_DIR} until the next job reclaims them");
        }
    });
    AT_EXIT.lock().unwrap_or_else(|p| p.into_inner()).push((
        std::process::id(),
        path.to_owned(),
        ino,
    ));
}

/// Takes `path` off the list of [`unlink_at_exit`] (it was unlinked, or is someone else's
/// to unlink now).
pub fn forget_at_exit(path: &Path) {
    let mut files = AT_EXIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = files.iter().position(|(_, p, _)| p == path) {
        files.swap_remove(i);
    }
}

/// Unlinks the files still listed when the process exits. Peers that have mapped one keep
/// their mapping; the name only keeps the file on tmpfs. Only files that this very process
/// listed are unlinked: a child forked after a file was listed inherits the list and this
/// handler, and must not remove its parent's live files.
extern "C" fn run_at_exit() {
    // Never block at exit: a thread that held the lock may have been stopped mid-way.
    let files = match AT_EXIT.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    let me = std::process::id();
    for (pid, path, ino) in files.iter() {
        if *pid == me {
            unlink_if_same(path, *ino);
        }
    }
}

/// Unlinks `path`; with `ino`, only if the path is still that inode.
pub fn unlink_if_same(path: &Path, ino: Option<u64>) {
    let same = ino.is_none_or(|ino| std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino));
    if same {
        let _ = std::fs::remove_file(path);
    }
}

/// What [`reclaim`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// The files removed.
    pub files: Vec<PathBuf>,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// A file that [`reclaim`] asks about.
#[derive(Debug)]
pub struct Candidate<'a> {
    /// Its name in [`SHM_DIR`].
    pub name: &'a str,
    /// Its path.
    pub path: &'a Path,
    /// Its metadata (a regular file of this effective uid).
    pub meta: &'a std::fs::Metadata,
    /// This process's pid namespace, for [`Owner::gone_because`].
    pub my_ns: u64,
}

/// Removes the files in [`SHM_DIR`] whose name starts with `prefix`, that are regular files
/// of this effective uid, and for which `stale` gives a reason (`None`: keep). `what` names
/// the files in the log. Two processes reclaiming at once may each find a file already
/// gone, which is fine.
///
/// # Errors
/// Reading [`SHM_DIR`] or `/proc/self` failed (then nothing was removed). Files that vanish
/// or cannot be removed while scanning are skipped.
pub fn reclaim(
    prefix: &str,
    what: &str,
    mut stale: impl FnMut(&Candidate<'_>) -> Option<&'static str>,
) -> io::Result<Reclaimed> {
    let my_ns = proc_pid_ns("self")?;
    let me = euid();
    let mut out = Reclaimed::default();
    for entry in std::fs::read_dir(SHM_DIR)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with(prefix)) else {
            continue;
        };
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() || meta.uid() != me {
            continue;
        }
        let c = Candidate {
            name,
            path: &path,
            meta: &meta,
            my_ns,
        };
        let Some(why) = stale(&c) else {
            continue;
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), bytes = meta.len(), "removed stale {what}: {why}");
                out.bytes += meta.len();
                out.files.push(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // another process got it first
            Err(e) => {
                tracing::debug!(path = %path.display(), "cannot remove stale {what}: {e}");
            }
        }
    }
    Ok(out)
}

/// Logs what a [`reclaim`] run before creating a file did (`what`: the files, plural):
/// failures are logged, never returned (a full or odd `/dev/shm` then shows up as the
/// creation's own error).
pub fn log_reclaimed(res: io::Result<Reclaimed>, what: &str) {
    match res {
        Ok(r) if !r.files.is_empty() => tracing::info!(
            files = r.files.len(),
            bytes = r.bytes,
            "removed {what} left in {SHM_DIR} by processes that were killed"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!("not reclaiming {what} in {SHM_DIR}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time_with_odd_command_name() {
        // The command name may contain ") " and digits: starttime is counted from the last ')'.
        let line = "4242 (a) b 1 2) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 \
                    987654 12345678 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let stat_start = |l: &str| parse_stat(l.as_bytes()).map(|(_, start)| start);
        assert_eq!(stat_start(line), Some(987654));
        assert_eq!(stat_start("4242 (no close paren S 1 2"), None);
        assert_eq!(stat_start("4242 (short) S 1 2 3"), None);
        assert!(proc_start("self").unwrap() > 0);
        // The state, and a command name that is not UTF-8.
        let odd = b"4242 (\xff\xfe) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 1 0 77 1";
        assert_eq!(parse_stat(odd), Some(('S', 77)));
        assert_eq!(
            proc_stat(u32::MAX).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// Alive, unidentified and foreign-namespace owners are kept; a pid reused by a later
    /// process is not.
    #[test]
    fn gone_because() {
        let me = Owner::this();
        assert!(me.start > 0 && me.pid_ns > 0, "{me:?}");
        assert_eq!(me.gone_because(me.pid_ns), None, "this process is alive");
        let reused = Owner {
            start: me.start + 1,
            ..me
        };
        assert_eq!(
            reused.gone_because(me.pid_ns),
            Some("its pid now belongs to another process")
        );
        assert_eq!(
            reused.gone_because(me.pid_ns + 1),
            None,
            "another namespace"
        );
        assert_eq!(Owner { start: 0, ..reused }.gone_because(me.pid_ns), None);
        assert_eq!(
            Owner {
                pid_ns: 0,
                ..reused
            }
            .gone_because(0),
            None
        );
    }

    /// A listed file is unlinked by the handler only while it is the same inode.
    #[test]
    fn unlink_checks_the_inode() {
        let path = Path::new(SHM_DIR).join(format!("efa-owner-test-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        unlink_if_same(&path, Some(ino + 1));
        assert!(path.exists(), "another inode is kept");
        unlink_if_same(&path, Some(ino));
        assert!(!path.exists());
        std::fs::write(&path, b"x").unwrap();
        unlink_if_same(&path, None);
        assert!(!path.exists());
    }
}
