//! The shared-memory segments: names, creation, mapping, unlinking and reclaiming.
//!
//! Each local rank owns one segment, a file in `/dev/shm` holding the rings that the other
//! local ranks write into it (its *inbound* rings):
//!
//! - **Name.** `efa-fbox-<euid>-<job>-<index>`: the effective uid, a 64-bit FNV-1a hash of
//!   the job key (hex) and the rank's local index. Every local rank computes every other's
//!   name, so nothing has to be exchanged. The name does not parse as an efa-fabric
//!   provider region (`efa_fabric::shm::parse_region_name`), so the two cleanups never touch
//!   each other's files.
//! - **Owner.** The header records the creating process ([`Owner`]: pid, start time and pid
//!   namespace), as efa-fabric's region names do; both use [`crate::owner`]'s rules.
//! - **Permissions.** Created with `O_CREAT | O_EXCL`, mode 0600 (the umask can only narrow
//!   it), then `fchmod` 0600. Attaching checks that the file is a regular file owned by this
//!   effective uid.
//! - **Unlinked early.** Each attaching peer increments a counter in the header; the one that
//!   brings it to `n_local - 1` unlinks the name: from then on the segment lives only in the
//!   mappings. The owner unlinks it when it detaches (drop), and the `atexit` handler of
//!   [`owner::unlink_at_exit`] does it for segments never detached. Both check the file's
//!   inode first, so a later segment of the same name is never removed.
//! - **Killed owners.** [`reclaim_stale_segments`] (run by every
//!   [`crate::Fastboxes::create`]) removes segments of this uid whose owner is gone,
//!   recognised by pid *and* start time, in this pid namespace; and segments whose header was
//!   never completed and that are older than a minute.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::owner::{self, euid, Owner};
pub use crate::owner::{Reclaimed, SHM_DIR};
use crate::ring::{ring_bytes, RingMem};
use crate::Error;
/// First part of every segment name.
pub const PREFIX: &str = "efa-fbox-";
/// Marks a complete header ("EFAFBOX" + layout version 1).
const MAGIC: u64 = 0x4546_4146_424f_5801;
/// Bytes reserved for the header (the rings start after it, page-aligned).
const HDR_BYTES: usize = 4096;

/// The segment header, at offset 0.
#[repr(C)]
struct SegHeader {
    /// [`MAGIC`] once every other field is written (stored with `Release`).
    magic: AtomicU64,
    n_local: u32,
    owner_index: u32,
    ring_cap: u32,
    owner_pid: u32,
    owner_start: u64,
    owner_ns: u64,
    /// Peers that have mapped the segment.
    attached: AtomicU32,
}

/// Bytes of a segment with `n_local` ranks (so `n_local - 1` inbound rings) of `cap` bytes.
pub fn segment_bytes(n_local: usize, cap: usize) -> usize {
    HDR_BYTES + (n_local - 1) * ring_bytes(cap)
}

/// 64-bit FNV-1a: a stable hash of the job key for names (not for security; the name is
/// checked by owner and contents).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The name of the segment of local rank `index` of job `job`.
pub fn segment_name(job: &str, index: usize) -> String {
    format!("{PREFIX}{}-{:016x}-{index}", euid(), fnv1a(job))
}

/// The path of a segment name.
pub fn segment_path(name: &str) -> PathBuf {
    Path::new(SHM_DIR).join(name)
}

/// A mapped segment, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
    path: PathBuf,
}

// SAFETY: the mapping is plain shared memory; the pointer is not tied to a thread. All
// access to the rings goes through Producer/Consumer, which are Send but not Sync.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing refers to the mapping any
        // more (the rings made from it are owned by the same Fastboxes and dropped first).
        if unsafe { libc::munmap(self.ptr.cast(), self.len) } != 0 {
            tracing::error!(path = %self.path.display(), "munmap of a fast-box segment failed: {}", io::Error::last_os_error());
        }
    }
}

impl Mapping {
    fn header(&self) -> &SegHeader {
        // SAFETY: the mapping is at least HDR_BYTES long, page-aligned, and lives as long as
        // self; the fields read concurrently are atomics, the rest are written once before
        // `magic` is published.
        unsafe { &*(self.ptr as *const SegHeader) }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The inbound ring of slot `slot` (`0..n_local - 1`).
    pub(crate) fn ring(&self, slot: usize, cap: usize) -> RingMem {
        let off = HDR_BYTES + slot * ring_bytes(cap);
        assert!(
            off + ring_bytes(cap) <= self.len,
            "ring slot within the segment"
        );
        // SAFETY: [off, off + ring_bytes(cap)) is inside the mapping (asserted), 128-aligned
        // (HDR_BYTES and ring_bytes(cap) are multiples of 128, the mapping is page-aligned),
        // zero-filled at creation, and kept mapped as long as the Fastboxes that owns both
        // this Mapping and the ring ends. Each ring has one producer (the peer of that slot)
        // and one consumer (the owner), by construction in Fastboxes.
        unsafe { RingMem::new(self.ptr.add(off), cap) }
    }
}

fn map(fd: &OwnedFd, len: usize, path: &Path) -> Result<Mapping, Error> {
    // SAFETY: mapping a file we opened read-write, with a length we have checked against
    // the file's size; MAP_SHARED so that peers see each other's writes.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::Map {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(Mapping {
        ptr: ptr.cast(),
        len,
        path: path.to_owned(),
    })
}

fn shm_open(name: &str, flags: i32, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated string; shm_open returns a new fd or -1.
    let fd =
        unsafe { libc::shm_open(c.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOFOLLOW, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// This rank's own segment, created; its name is unlinked on drop at the latest.
#[derive(Debug)]
pub(crate) struct Own {
    pub(crate) map: Mapping,
    ino: u64,
}

impl Own {
    /// Unlinks the name (if it is still this segment's: never a later segment of the same
    /// name) and takes it off the `atexit` list.
    pub(crate) fn unlink(&self) {
        owner::unlink_if_same(self.map.path(), Some(self.ino));
        owner::forget_at_exit(self.map.path());
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Creates the segment of local rank `index` of `n_local`, with rings of `cap` bytes.
pub(crate) fn create(job: &str, index: usize, n_local: usize, cap: usize) -> Result<Own, Error> {
    owner::log_reclaimed(reclaim_stale_segments(), "fast-box segments");
    let name = segment_name(job, index);
    let path = segment_path(&name);
    let len = segment_bytes(n_local, cap);
    let fd = match shm_open(&name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(Error::InUse {
                owner: owner_of(&path).map(|o| o.pid),
                path,
            })
        }
        Err(source) => return Err(Error::Create { path, source }),
    };
    let fail = |source: io::Error| Error::Create {
        path: path.clone(),
        source,
    };
    // From here on a failure must remove the file we created.
    let built = (|| {
        // SAFETY: fchmod/ftruncate on a descriptor we own.
        if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        let ino = std::fs::File::from(fd.try_clone().map_err(fail)?)
            .metadata()
            .map_err(fail)?
            .ino();
        let map = map(&fd, len, &path)?;
        Ok((map, ino))
    })();
    let (map, ino) = match built {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    owner::unlink_at_exit(&path, Some(ino));
    let h = map.header();
    let me = Owner::this();
    // SAFETY: the header's plain fields are written once, here, before `magic` is
    // published with Release; nobody reads them before seeing `magic` with Acquire. The
    // header lies in the mapping (at least HDR_BYTES long).
    unsafe {
        let p = map.ptr as *mut SegHeader;
        (*p).n_local = n_local as u32;
        (*p).owner_index = index as u32;
        (*p).ring_cap = cap as u32;
        (*p).owner_pid = me.pid;
        (*p).owner_start = me.start;
        (*p).owner_ns = me.pid_ns;
    }
    h.magic.store(MAGIC, Ordering::Release);
    Ok(Own { map, ino })
}

/// A peer's segment, attached.
pub(crate) struct Attached {
    pub(crate) map: Mapping,
    /// This attach unlinked the name (it was the last peer to map it).
    pub(crate) unlinked: bool,
}

/// Maps the segment of local rank `index` of `n_local` for writing into its ring of slot
/// `slot`.
pub(crate) fn attach(
    job: &str,
    index: usize,
    n_local: usize,
    cap: usize,
) -> Result<Attached, Error> {
    let name = segment_name(job, index);
    let path = segment_path(&name);
    let len = segment_bytes(n_local, cap);
    let fd = match shm_open(&name, libc::O_RDWR, 0) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::NotReady { path }),
        Err(source) => return Err(Error::Attach { path, source }),
    };
    let md = std::fs::File::from(fd.try_clone().map_err(|source| Error::Attach {
        path: path.clone(),
        source,
    })?)
    .metadata()
    .map_err(|source| Error::Attach {
        path: path.clone(),
        source,
    })?;
    let me = euid();
    if !md.file_type().is_file() || md.uid() != me {
        return Err(Error::Foreign {
            path,
            owner_uid: md.uid(),
            me,
        });
    }
    if (md.len() as usize) < len {
        // Created but not yet sized, or a segment of another layout.
        return Err(Error::NotReady { path });
    }
    let map = map(&fd, len, &path)?;
    let h = map.header();
    if h.magic.load(Ordering::Acquire) != MAGIC {
        return Err(Error::NotReady { path });
    }
    if h.n_local as usize != n_local
        || h.owner_index as usize != index
        || h.ring_cap as usize != cap
    {
        return Err(Error::Mismatch {
            path,
            expected: (n_local, index, cap),
            found: (
                h.n_local as usize,
                h.owner_index as usize,
                h.ring_cap as usize,
            ),
        });
    }
    let attached = h.attached.fetch_add(1, Ordering::AcqRel) + 1;
    let unlinked = attached as usize == n_local - 1;
    if unlinked {
        // Every peer has it mapped: the name is no longer needed.
        owner::unlink_if_same(&path, Some(md.ino()));
    }
    Ok(Attached { map, unlinked })
}

/// The owner recorded in a segment's header, if complete.
fn owner_of(path: &Path) -> Option<Owner> {
    let f = std::fs::OpenOptions::new().read(true).open(path).ok()?;
    let mut b = [0u8; 40];
    f.read_exact_at(&mut b, 0).ok()?;
    let word = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let half = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    (word(0) == MAGIC).then(|| Owner {
        pid: half(20),
        start: word(24),
        pid_ns: word(32),
    })
}

/// Segments whose header was never completed are removed once older than this.
const UNFINISHED_AGE: Duration = Duration::from_secs(60);

/// Removes the fast-box segments in `/dev/shm` of this effective uid whose owner is gone
/// (killed with `SIGKILL`, or crashed where no handler ran), and those whose creation never
/// finished and that are more than a minute old. Called by every segment creation; exposed
/// for tools and tests.
///
/// Never removed: files of other uids, other names, segments whose owner is alive
/// (recognised by pid and start time, so a reused pid does not protect a dead owner's
/// segment), segments created in another pid namespace or whose owner could not be
/// identified.
///
/// # Errors
/// Reading `/dev/shm` or `/proc/self` failed (then nothing was removed). Files that vanish
/// or cannot be removed while scanning are skipped.
pub fn reclaim_stale_segments() -> io::Result<Reclaimed> {
    let mine = format!("{PREFIX}{}-", euid());
    owner::reclaim(&mine, "fast-box segment", |c| match owner_of(c.path) {
        Some(o) => o.gone_because(c.my_ns),
        None => {
            let old = c
                .meta
                .modified()
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > UNFINISHED_AGE);
            old.then_some("its creation never finished")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_job_and_index() {
        let a = segment_name("job-1", 0);
        assert!(a.starts_with(PREFIX));
        assert_ne!(a, segment_name("job-2", 0));
        assert_ne!(a, segment_name("job-1", 1));
        assert_eq!(a, segment_name("job-1", 0));
        assert!(a.len() < 255);
    }

    #[test]
    fn header_offsets_match_owner_of() {
        // owner_of reads the header by byte offsets; they must be the struct's.
        assert_eq!(std::mem::offset_of!(SegHeader, owner_pid), 20);
        assert_eq!(std::mem::offset_of!(SegHeader, owner_start), 24);
        assert_eq!(std::mem::offset_of!(SegHeader, owner_ns), 32);
        assert!(std::mem::size_of::<SegHeader>() <= HDR_BYTES);
        assert_eq!(HDR_BYTES % 128, 0);
    }
}
