//! Fabric and domain (`fi_fabric(3)`, `fi_domain(3)`).

use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use efa_ffi as ffi;

use crate::error::{check_int, strerror, Result};
use crate::info::{Info, MrMode};

/// Closes a libfabric object, logging (never panicking) on failure.
pub(crate) fn close_fid(fid: *mut ffi::fid, what: &'static str) {
    if fid.is_null() {
        return;
    }
    // SAFETY: callers pass a fid they own and have not closed; it is closed exactly once here.
    let ret = unsafe { ffi::fi_close(fid) };
    if ret != 0 {
        tracing::error!(
            object = what,
            code = -ret,
            "fi_close failed: {}",
            strerror(ret)
        );
    }
}

/// A fabric (`fi_fabric(3)`): the root of a provider's object tree.
#[derive(Clone)]
pub struct Fabric {
    inner: Arc<FabricInner>,
}

struct FabricInner {
    fid: *mut ffi::fid_fabric,
    info: Info,
}

// SAFETY: domains are opened with FI_THREAD_SAFE (see the crate docs), under which libfabric
// serializes access to every object internally, so its handles may be used from any thread.
unsafe impl Send for FabricInner {}
// SAFETY: as above.
unsafe impl Sync for FabricInner {}

impl Drop for FabricInner {
    fn drop(&mut self) {
        // SAFETY: fid_fabric begins with its struct fid.
        close_fid(unsafe { ptr::addr_of_mut!((*self.fid).fid) }, "fabric");
    }
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric")
            .field("provider", &self.inner.info.provider())
            .field("name", &self.inner.info.fabric())
            .finish()
    }
}

impl Fabric {
    /// Opens the fabric that `info` describes (`fi_fabric`).
    ///
    /// # Errors
    /// `fi_fabric` errors: `FI_ENODATA`/`FI_EINVAL` when the info does not name a usable fabric.
    pub fn open(info: &Info) -> Result<Fabric> {
        let mut fid = ptr::null_mut();
        // SAFETY: info.as_ptr() is a valid fi_info whose fabric_attr lives as long as `info`;
        // fi_fabric writes the new object into `fid`.
        let ret =
            unsafe { ffi::fi_fabric((*info.as_ptr()).fabric_attr, &mut fid, ptr::null_mut()) };
        check_int("fi_fabric", ret)?;
        Ok(Fabric {
            inner: Arc::new(FabricInner {
                fid,
                info: info.clone(),
            }),
        })
    }

    /// The info this fabric was opened from.
    pub fn info(&self) -> &Info {
        &self.inner.info
    }

    pub(crate) fn raw(&self) -> *mut ffi::fid_fabric {
        self.inner.fid
    }
}

/// A domain (`fi_domain(3)`): one NIC or provider instance. Keeps its [`Fabric`] alive.
#[derive(Clone)]
pub struct Domain {
    inner: Arc<DomainInner>,
}

struct DomainInner {
    fid: *mut ffi::fid_domain,
    info: Info,
    /// Closing a fabric with open domains fails (FI_EBUSY), so the domain keeps it alive.
    fabric: Fabric,
    /// Next key to request when the provider does not choose keys (no FI_MR_PROV_KEY).
    next_key: AtomicU64,
}

// SAFETY: opened with FI_THREAD_SAFE; libfabric serializes access internally.
unsafe impl Send for DomainInner {}
// SAFETY: as above.
unsafe impl Sync for DomainInner {}

impl Drop for DomainInner {
    fn drop(&mut self) {
        // SAFETY: fid_domain begins with its struct fid.
        close_fid(unsafe { ptr::addr_of_mut!((*self.fid).fid) }, "domain");
    }
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("provider", &self.inner.info.provider())
            .field("name", &self.inner.info.domain())
            .finish()
    }
}

impl Domain {
    /// Opens the fabric and then the domain that `info` describes.
    ///
    /// # Errors
    /// `fi_fabric` or `fi_domain` errors.
    pub fn open(info: &Info) -> Result<Domain> {
        let fabric = Fabric::open(info)?;
        Domain::open_in(&fabric, info)
    }

    /// Opens the domain that `info` describes in an already open fabric (`fi_domain`).
    ///
    /// # Errors
    /// `fi_domain` errors: `FI_EINVAL` for an info from another fabric, `FI_ENOMEM`.
    pub fn open_in(fabric: &Fabric, info: &Info) -> Result<Domain> {
        let mut fid = ptr::null_mut();
        // SAFETY: fabric.raw() is an open fabric, info a valid fi_info; fi_domain writes the
        // new object into `fid`.
        let ret = unsafe { ffi::fi_domain(fabric.raw(), info.as_ptr(), &mut fid, ptr::null_mut()) };
        check_int("fi_domain", ret)
            .map_err(|e| crate::error::open_error("opening the domain", e))?;
        tracing::debug!(provider = %info.provider(), domain = %info.domain(), "domain opened");
        Ok(Domain {
            inner: Arc::new(DomainInner {
                fid,
                info: info.clone(),
                fabric: fabric.clone(),
                next_key: AtomicU64::new(1),
            }),
        })
    }

    /// The info this domain was opened from; endpoints use it by default.
    pub fn info(&self) -> &Info {
        &self.inner.info
    }

    /// The fabric this domain belongs to.
    pub fn fabric(&self) -> &Fabric {
        &self.inner.fabric
    }

    /// MR modes this domain requires.
    pub fn mr_mode(&self) -> MrMode {
        self.inner.info.mr_mode()
    }

    pub(crate) fn raw(&self) -> *mut ffi::fid_domain {
        self.inner.fid
    }

    /// A key unique within this domain, for providers that let the application pick keys.
    pub(crate) fn next_key(&self) -> u64 {
        self.inner.next_key.fetch_add(1, Ordering::Relaxed)
    }
}
