//! Counters (`fi_cntr(3)`): cheap completion counting, e.g. for RMA.

use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use bitflags::bitflags;
use efa_ffi as ffi;

use crate::error::{check_int, Error, Result};
use crate::fabric::{close_fid, Domain};
use crate::progress::{Backoff, Deadline};

bitflags! {
    /// Which completions a counter bound to an endpoint counts.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CounterEvents: u64 {
        /// Completed sends.
        const SEND = ffi::FI_SEND as u64;
        /// Completed receives.
        const RECV = ffi::FI_RECV as u64;
        /// Completed RMA reads initiated here.
        const READ = ffi::FI_READ as u64;
        /// Completed RMA writes initiated here.
        const WRITE = ffi::FI_WRITE as u64;
        /// RMA reads of our memory by peers (needs `FI_RMA_EVENT`).
        const REMOTE_READ = ffi::FI_REMOTE_READ as u64;
        /// RMA writes into our memory by peers (needs `FI_RMA_EVENT`).
        const REMOTE_WRITE = ffi::FI_REMOTE_WRITE as u64;
    }
}

/// A completion counter. Keeps its [`Domain`] alive.
#[derive(Clone)]
pub struct Counter {
    inner: Arc<CntrInner>,
}

struct CntrInner {
    fid: *mut ffi::fid_cntr,
    /// A counter cannot outlive its domain.
    _domain: Domain,
}

// SAFETY: opened on a FI_THREAD_SAFE domain; libfabric serializes access internally.
unsafe impl Send for CntrInner {}
// SAFETY: as above.
unsafe impl Sync for CntrInner {}

impl Drop for CntrInner {
    fn drop(&mut self) {
        // SAFETY: fid_cntr begins with its struct fid.
        close_fid(unsafe { ptr::addr_of_mut!((*self.fid).fid) }, "counter");
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter")
            .field("value", &self.read())
            .finish()
    }
}

impl Counter {
    /// Opens a counter with no wait object (`fi_cntr_open`); [`Counter::wait`] polls.
    ///
    /// # Errors
    /// `fi_cntr_open` errors, e.g. `FI_ENOSYS` for providers without counters.
    pub fn open(domain: &Domain) -> Result<Counter> {
        let mut attr = ffi::fi_cntr_attr {
            events: ffi::FI_CNTR_EVENTS_COMP,
            wait_obj: ffi::FI_WAIT_NONE,
            ..Default::default()
        };
        let mut fid = ptr::null_mut();
        // SAFETY: domain is open; attr valid for the call.
        let ret = unsafe { ffi::fi_cntr_open(domain.raw(), &mut attr, &mut fid, ptr::null_mut()) };
        check_int("fi_cntr_open", ret)?;
        Ok(Counter {
            inner: Arc::new(CntrInner {
                fid,
                _domain: domain.clone(),
            }),
        })
    }

    pub(crate) fn raw_fid(&self) -> *mut ffi::fid {
        // SAFETY: fid_cntr begins with its struct fid.
        unsafe { ptr::addr_of_mut!((*self.inner.fid).fid) }
    }

    /// Successful completions counted so far (`fi_cntr_read`; also drives progress).
    pub fn read(&self) -> u64 {
        // SAFETY: the counter is open.
        unsafe { ffi::fi_cntr_read(self.inner.fid) }
    }

    /// Failed completions counted so far (`fi_cntr_readerr`).
    pub fn read_err(&self) -> u64 {
        // SAFETY: the counter is open.
        unsafe { ffi::fi_cntr_readerr(self.inner.fid) }
    }

    /// Adds to the counter (`fi_cntr_add`).
    ///
    /// # Errors
    /// `fi_cntr_add` errors.
    pub fn add(&self, v: u64) -> Result<()> {
        // SAFETY: the counter is open.
        check_int("fi_cntr_add", unsafe {
            ffi::fi_cntr_add(self.inner.fid, v)
        })
        .map_err(Into::into)
    }

    /// Adds to the error count (`fi_cntr_adderr`), e.g. to report a failure detected outside
    /// the provider to whoever waits on the counter.
    ///
    /// # Errors
    /// `fi_cntr_adderr` errors.
    pub fn add_err(&self, v: u64) -> Result<()> {
        // SAFETY: the counter is open.
        check_int("fi_cntr_adderr", unsafe {
            ffi::fi_cntr_adderr(self.inner.fid, v)
        })
        .map_err(Into::into)
    }

    /// Sets the counter (`fi_cntr_set`).
    ///
    /// # Errors
    /// `fi_cntr_set` errors.
    pub fn set(&self, v: u64) -> Result<()> {
        // SAFETY: the counter is open.
        check_int("fi_cntr_set", unsafe {
            ffi::fi_cntr_set(self.inner.fid, v)
        })
        .map_err(Into::into)
    }

    /// Waits until the counter reaches `threshold`, spinning and then backing off.
    ///
    /// # Errors
    /// [`Error::Timeout`] after `timeout`; [`Error::CounterFailed`] if the error count rose
    /// while waiting (an operation failed: read its CQ for details).
    pub fn wait(&self, threshold: u64, timeout: Duration) -> Result<u64> {
        let deadline = Deadline::after(timeout);
        let errs = self.read_err();
        let mut backoff = Backoff::new();
        loop {
            let v = self.read();
            if v >= threshold {
                return Ok(v);
            }
            if self.read_err() > errs {
                return Err(Error::CounterFailed {
                    value: v,
                    threshold,
                    errors: self.read_err(),
                });
            }
            if deadline.expired() {
                return Err(Error::Timeout {
                    op: "counter wait",
                    waited: deadline.waited(),
                });
            }
            backoff.snooze();
        }
    }
}
