//! Address vectors (`fi_av(3)`).

use std::collections::HashSet;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use efa_ffi as ffi;

use crate::error::{check_int, Error, Result};
use crate::fabric::{close_fid, Domain};

/// Defined in a leaf module, kept here where they were first published
/// (`efa_fabric::av::FiAddr`, `efa_fabric::av::sockaddr_from_bytes`).
pub use crate::addr::{sockaddr_from_bytes, FiAddr};

/// An address vector of type `FI_AV_TABLE`: inserted addresses get consecutive indices.
/// Keeps its [`Domain`] alive.
#[derive(Clone)]
pub struct AddressVector {
    inner: Arc<AvInner>,
}

struct AvInner {
    fid: *mut ffi::fid_av,
    /// Indices handed out so far (FI_AV_TABLE indices are consecutive from 0).
    inserted: AtomicU64,
    /// Indices removed since; checked only when `any_removed` is set.
    removed: Mutex<HashSet<u64>>,
    any_removed: AtomicBool,
    /// An AV cannot be closed after its domain, so it keeps the domain alive.
    domain: Domain,
}

// SAFETY: opened on a FI_THREAD_SAFE domain; libfabric serializes access internally.
unsafe impl Send for AvInner {}
// SAFETY: as above.
unsafe impl Sync for AvInner {}

impl Drop for AvInner {
    fn drop(&mut self) {
        // SAFETY: fid_av begins with its struct fid.
        close_fid(
            unsafe { ptr::addr_of_mut!((*self.fid).fid) },
            "address vector",
        );
    }
}

impl std::fmt::Debug for AddressVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressVector")
            .field("domain", &self.inner.domain)
            .finish()
    }
}

impl AddressVector {
    /// Opens a table address vector (`fi_av_open`).
    ///
    /// # Errors
    /// `fi_av_open` errors, e.g. `FI_ENOSYS` if the provider has no AV of this type.
    pub fn open(domain: &Domain) -> Result<AddressVector> {
        let mut attr = ffi::fi_av_attr {
            type_: ffi::FI_AV_TABLE,
            ..Default::default()
        };
        let mut fid = ptr::null_mut();
        // SAFETY: domain is open; attr is a valid attribute struct read during the call.
        let ret = unsafe { ffi::fi_av_open(domain.raw(), &mut attr, &mut fid, ptr::null_mut()) };
        check_int("fi_av_open", ret)?;
        Ok(AddressVector {
            inner: Arc::new(AvInner {
                fid,
                inserted: AtomicU64::new(0),
                removed: Mutex::new(HashSet::new()),
                any_removed: AtomicBool::new(false),
                domain: domain.clone(),
            }),
        })
    }

    /// Inserts one raw endpoint address (as returned by `Endpoint::name`).
    ///
    /// # Errors
    /// [`Error::BadAddress`] for an empty address, or one the provider inserted none of;
    /// other `fi_av_insert` errors (`FI_EINVAL` for an address the provider cannot parse).
    pub fn insert(&self, addr: &[u8]) -> Result<FiAddr> {
        if addr.is_empty() {
            return Err(Error::BadAddress {
                len: 0,
                head: Vec::new(),
            });
        }
        let mut out: ffi::fi_addr_t = ffi::FI_ADDR_NOTAVAIL;
        // SAFETY: addr points to a readable address of the provider's format (the provider
        // validates it); `out` receives one fi_addr_t.
        let ret = unsafe {
            ffi::fi_av_insert(
                self.inner.fid,
                addr.as_ptr().cast(),
                1,
                &mut out,
                0,
                ptr::null_mut(),
            )
        };
        if ret < 0 {
            check_int("fi_av_insert", ret)?;
        }
        if ret != 1 || out == ffi::FI_ADDR_NOTAVAIL {
            return Err(Error::BadAddress {
                len: addr.len(),
                head: addr[..addr.len().min(32)].to_vec(),
            });
        }
        self.inner.inserted.fetch_max(out + 1, Ordering::Release);
        Ok(FiAddr(out))
    }

    /// True when `addr` was inserted into this AV and not removed. Sending to any other index
    /// is undefined in libfabric (some providers crash), so every safe post checks this.
    pub fn contains(&self, addr: FiAddr) -> bool {
        if addr.0 >= self.inner.inserted.load(Ordering::Acquire) {
            return false;
        }
        !(self.inner.any_removed.load(Ordering::Acquire)
            && self
                .inner
                .removed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&addr.0))
    }

    /// Removes an address (`fi_av_remove`).
    ///
    /// # Errors
    /// `fi_av_remove` errors.
    pub fn remove(&self, addr: FiAddr) -> Result<()> {
        let mut a = addr.0;
        // SAFETY: `a` is one fi_addr_t read during the call.
        let ret = unsafe { ffi::fi_av_remove(self.inner.fid, &mut a, 1, 0) };
        check_int("fi_av_remove", ret)?;
        self.inner
            .removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.0);
        self.inner.any_removed.store(true, Ordering::Release);
        Ok(())
    }

    /// Looks up the raw address stored for `addr` (`fi_av_lookup`).
    ///
    /// # Errors
    /// `fi_av_lookup` errors, e.g. `FI_EINVAL` for an index never inserted.
    pub fn lookup(&self, addr: FiAddr) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        // SAFETY: buf has `len` writable bytes; libfabric writes at most that and sets `len`
        // to the full address size.
        let ret =
            unsafe { ffi::fi_av_lookup(self.inner.fid, addr.0, buf.as_mut_ptr().cast(), &mut len) };
        check_int("fi_av_lookup", ret)?;
        buf.truncate(len.min(256));
        Ok(buf)
    }

    pub(crate) fn raw(&self) -> *mut ffi::fid_av {
        self.inner.fid
    }
}
