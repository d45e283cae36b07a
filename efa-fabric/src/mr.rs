//! Memory registration (`fi_mr(3)`) and the buffer types that operations take ownership of.

use std::alloc::{self, Layout};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use bitflags::bitflags;
use efa_ffi as ffi;

use crate::ep::Endpoint;
use crate::error::{check_int, memlock_limit, registration_error, Error, Result};
use crate::fabric::{close_fid, Domain};
use crate::info::MrMode;

/// Kept here too: it was first published as `efa_fabric::mr::RemoteRegion`.
pub use crate::remote::RemoteRegion;

bitflags! {
    /// Access rights of a memory region.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Access: u64 {
        /// Source of local sends.
        const SEND = ffi::FI_SEND as u64;
        /// Target of local receives.
        const RECV = ffi::FI_RECV as u64;
        /// Local buffer of RMA reads (data lands here).
        const READ = ffi::FI_READ as u64;
        /// Local buffer of RMA writes (data is taken from here).
        const WRITE = ffi::FI_WRITE as u64;
        /// Peers may read this region.
        const REMOTE_READ = ffi::FI_REMOTE_READ as u64;
        /// Peers may write this region.
        const REMOTE_WRITE = ffi::FI_REMOTE_WRITE as u64;
    }
}

impl Access {
    /// Every local use: send, receive, RMA read and write source/target.
    pub const LOCAL: Access = Access::SEND
        .union(Access::RECV)
        .union(Access::READ)
        .union(Access::WRITE);
}

/// A registered memory region. Keeps its [`Domain`] (and, under `FI_MR_ENDPOINT`, its
/// endpoint) alive. The memory itself is not owned: see [`MemoryRegion::register_raw`] and the
/// owning [`RegisteredBuf`].
#[derive(Clone)]
pub struct MemoryRegion {
    inner: Arc<MrInner>,
}

struct MrInner {
    fid: *mut ffi::fid_mr,
    addr: usize,
    len: usize,
    access: Access,
    key: u64,
    desc: *mut std::os::raw::c_void,
    virt_addr: bool,
    /// The region must be closed before its domain.
    _domain: Domain,
    /// Under FI_MR_ENDPOINT the region is bound to an endpoint, which must stay open.
    _ep: Option<Endpoint>,
}

// SAFETY: the MR is registered on a FI_THREAD_SAFE domain; all our fields are immutable after
// registration.
unsafe impl Send for MrInner {}
// SAFETY: as above.
unsafe impl Sync for MrInner {}

impl Drop for MrInner {
    fn drop(&mut self) {
        // SAFETY: fid_mr begins with its struct fid.
        close_fid(
            unsafe { ptr::addr_of_mut!((*self.fid).fid) },
            "memory region",
        );
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &(self.inner.addr as *const u8))
            .field("len", &self.inner.len)
            .field("key", &self.inner.key)
            .field("access", &self.inner.access)
            .finish()
    }
}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` (`fi_mr_regattr`), honouring the domain's MR modes:
    /// under `FI_MR_PROV_KEY` the provider picks the key, otherwise a domain-unique key is
    /// requested; under `FI_MR_ENDPOINT` the region is bound to `ep` and enabled;
    /// [`MemoryRegion::remote`] gives a virtual address under `FI_MR_VIRT_ADDR`, else 0.
    ///
    /// # Safety
    /// `addr..addr+len` must be memory that stays allocated (and is not unmapped or
    /// remapped) until this region and every clone of it are dropped. Under `FI_MR_ALLOCATED`
    /// it must be backed by allocated pages. While peers may access it (remote access rights),
    /// any Rust reference to that memory can observe or be overwritten by remote writes at any
    /// time; use raw pointers or volatile access for such memory.
    ///
    /// # Errors
    /// - [`Error::EndpointRequired`] when `FI_MR_ENDPOINT` is required and `ep` is `None`.
    /// - [`Error::MemlockLimit`] when registration fails and `ulimit -l` is finite (the usual
    ///   cause for providers that pin memory: verbs and efa).
    /// - Other `fi_mr_regattr`, `fi_mr_bind` and `fi_mr_enable` errors.
    pub unsafe fn register_raw(
        domain: &Domain,
        addr: *const u8,
        len: usize,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<MemoryRegion> {
        let mode = domain.mr_mode();
        if mode.contains(MrMode::ENDPOINT) && ep.is_none() {
            return Err(Error::EndpointRequired {
                provider: domain.info().provider(),
            });
        }
        if domain.info().mr_key_size() > 8 {
            return Err(Error::RawMrKey {
                provider: domain.info().provider(),
                key_size: domain.info().mr_key_size(),
            });
        }
        let iov = libc::iovec {
            iov_base: addr as *mut std::os::raw::c_void,
            iov_len: len,
        };
        let requested_key = if mode.contains(MrMode::PROV_KEY) {
            0
        } else {
            domain.next_key()
        };
        let mut attr = ffi::fi_mr_attr {
            iov_count: 1,
            access: access.bits(),
            offset: 0,
            requested_key,
            ..Default::default()
        };
        let iov_ptr = &iov as *const libc::iovec as *const ffi::iovec;
        // libfabric 2.x moved mr_iov into a union with the dma-buf descriptor.
        #[cfg(fi_v2)]
        {
            attr.__bindgen_anon_1.mr_iov = iov_ptr;
        }
        #[cfg(not(fi_v2))]
        {
            attr.mr_iov = iov_ptr;
        }
        let mut fid = ptr::null_mut();
        // SAFETY: domain is open; attr and iov are valid for the call; the caller guarantees
        // the memory outlives the region.
        let ret = unsafe { ffi::fi_mr_regattr(domain.raw(), &attr, 0, &mut fid) };
        if let Err(e) = check_int("fi_mr_regattr", ret) {
            return Err(registration_error(len, e, memlock_limit()));
        }
        // From here on, the region is closed on every path by MrInner's Drop.
        let mut inner = MrInner {
            fid,
            addr: addr as usize,
            len,
            access,
            key: 0,
            desc: ptr::null_mut(),
            virt_addr: mode.contains(MrMode::VIRT_ADDR),
            _domain: domain.clone(),
            _ep: None,
        };
        if let (true, Some(ep)) = (mode.contains(MrMode::ENDPOINT), ep) {
            // SAFETY: both objects are open; binding an MR to its endpoint is what
            // FI_MR_ENDPOINT requires before enabling it.
            let ret = unsafe { ffi::fi_mr_bind(fid, ep.raw_fid(), 0) };
            check_int("fi_mr_bind", ret)?;
            // SAFETY: the MR is bound as required.
            let ret = unsafe { ffi::fi_mr_enable(fid) };
            check_int("fi_mr_enable", ret)?;
            inner._ep = Some(ep.clone());
        }
        // SAFETY: the MR is registered (and enabled); key and desc are plain reads.
        unsafe {
            inner.key = ffi::fi_mr_key(fid);
            inner.desc = ffi::fi_mr_desc(fid);
        }
        if inner.key == ffi::FI_KEY_NOTAVAIL {
            return Err(Error::RawMrKey {
                provider: domain.info().provider(),
                key_size: domain.info().mr_key_size(),
            });
        }
        Ok(MemoryRegion {
            inner: Arc::new(inner),
        })
    }

    /// The local descriptor to pass with data transfers (`fi_mr_desc`).
    pub fn desc(&self) -> *mut std::os::raw::c_void {
        self.inner.desc
    }

    /// The key peers use (`fi_mr_key`).
    pub fn key(&self) -> u64 {
        self.inner.key
    }

    /// Registered length.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// True when zero bytes are registered.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Access rights.
    pub fn access(&self) -> Access {
        self.inner.access
    }

    /// What a peer needs to access this region.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: if self.inner.virt_addr {
                self.inner.addr as u64
            } else {
                0
            },
            key: self.inner.key,
            len: self.inner.len as u64,
        }
    }

    /// True when `[ptr, ptr+len)` lies inside this region.
    pub fn covers(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        p >= self.inner.addr && p + len <= self.inner.addr + self.inner.len
    }
}

/// A zero-initialised, page-aligned heap buffer (what registration prefers, and what
/// `FI_MR_ALLOCATED` requires).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Alignment of every buffer.
    pub const ALIGN: usize = 4096;

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), Self::ALIGN).expect("buffer too large")
    }

    /// A zeroed buffer of `len` bytes.
    ///
    /// # Panics
    /// If the allocation fails.
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// A page-aligned buffer registered for local use (and, if asked, remote access): the usual
/// buffer for sends, receives and RMA on providers that want registered memory.
pub struct RegisteredBuf {
    // Field order matters: the regions are closed before the memory is freed.
    mr: MemoryRegion,
    /// Registrations of the same memory in other domains ([`RegisteredBuf::register_in`]).
    extra: Vec<MemoryRegion>,
    buf: AlignedBuf,
}

impl std::fmt::Debug for RegisteredBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredBuf")
            .field("len", &self.buf.len)
            .field("mr", &self.mr)
            .finish()
    }
}

impl RegisteredBuf {
    /// Allocates `len` zeroed bytes and registers them with `access` (plus every local use).
    /// `ep` is needed on providers with `FI_MR_ENDPOINT`.
    ///
    /// # Errors
    /// As [`MemoryRegion::register_raw`].
    pub fn new(domain: &Domain, len: usize, access: Access, ep: Option<&Endpoint>) -> Result<Self> {
        let buf = AlignedBuf::zeroed(len);
        // SAFETY: the buffer is heap memory owned by the RegisteredBuf, freed only after the
        // region (field order), and its address never changes.
        let mr = unsafe {
            MemoryRegion::register_raw(domain, buf.ptr.as_ptr(), len, access | Access::LOCAL, ep)?
        };
        Ok(RegisteredBuf {
            mr,
            extra: Vec::new(),
            buf,
        })
    }

    /// Registers the same memory in another domain too (a rank that reaches peers through
    /// several providers exposes one buffer on each), and returns that registration. The
    /// registration lives, and is closed, with this buffer.
    ///
    /// # Errors
    /// As [`MemoryRegion::register_raw`].
    pub fn register_in(
        &mut self,
        domain: &Domain,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<MemoryRegion> {
        // SAFETY: as in `new`: the memory is owned by self, fixed, and freed only after every
        // registration in `extra` (field order).
        let mr = unsafe {
            MemoryRegion::register_raw(
                domain,
                self.buf.ptr.as_ptr(),
                self.buf.len,
                access | Access::LOCAL,
                ep,
            )?
        };
        self.extra.push(mr.clone());
        Ok(mr)
    }

    /// The memory region.
    pub fn mr(&self) -> &MemoryRegion {
        &self.mr
    }

    /// What a peer needs to access this buffer (if registered with remote access).
    pub fn remote(&self) -> RemoteRegion {
        self.mr.remote()
    }
}

impl std::ops::Deref for RegisteredBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for RegisteredBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// A buffer whose ownership can be handed to an operation in flight.
///
/// # Safety
/// Implementors guarantee that `as_ptr()..as_ptr()+len()` stays valid and at the same address
/// while the value is alive, even when the value itself is moved (heap-backed storage), and
/// that `desc()` (if any) is the descriptor of a region covering that memory that lives as
/// long as the value.
pub unsafe trait IoBuf: Send + 'static {
    /// Start of the bytes.
    fn io_ptr(&self) -> *const u8;
    /// Number of bytes.
    fn io_len(&self) -> usize;
    /// Registered-memory descriptor, if the buffer is registered.
    fn io_desc(&self) -> Option<*mut std::os::raw::c_void> {
        None
    }
}

/// An [`IoBuf`] that operations may write into (receive and RMA-read targets).
///
/// # Safety
/// As [`IoBuf`]; additionally `io_mut_ptr()` is valid for writes of `io_len()` bytes.
pub unsafe trait IoBufMut: IoBuf {
    /// Start of the writable bytes.
    fn io_mut_ptr(&mut self) -> *mut u8;
}

// SAFETY: Vec<T> storage is on the heap and does not move when the Vec moves.
unsafe impl<T: bytemuck::Pod + Send> IoBuf for Vec<T> {
    fn io_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn io_len(&self) -> usize {
        std::mem::size_of_val(self.as_slice())
    }
}
// SAFETY: as above; Pod types accept any byte pattern.
unsafe impl<T: bytemuck::Pod + Send> IoBufMut for Vec<T> {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr().cast()
    }
}
// SAFETY: Box<[T]> storage is on the heap and does not move.
unsafe impl<T: bytemuck::Pod + Send> IoBuf for Box<[T]> {
    fn io_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn io_len(&self) -> usize {
        std::mem::size_of_val(&**self)
    }
}
// SAFETY: as above.
unsafe impl<T: bytemuck::Pod + Send> IoBufMut for Box<[T]> {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr().cast()
    }
}
// SAFETY: AlignedBuf owns a fixed heap allocation.
unsafe impl IoBuf for AlignedBuf {
    fn io_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn io_len(&self) -> usize {
        self.len
    }
}
// SAFETY: as above.
unsafe impl IoBufMut for AlignedBuf {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}
// SAFETY: the memory is owned and fixed; the region covering it lives as long as the value.
unsafe impl IoBuf for RegisteredBuf {
    fn io_ptr(&self) -> *const u8 {
        self.buf.ptr.as_ptr()
    }
    fn io_len(&self) -> usize {
        self.buf.len
    }
    fn io_desc(&self) -> Option<*mut std::os::raw::c_void> {
        Some(self.mr.desc())
    }
}
// SAFETY: as above.
unsafe impl IoBufMut for RegisteredBuf {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.buf.ptr.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_region_round_trips_and_checks_bounds() {
        let r = RemoteRegion {
            addr: 0x1000,
            key: 77,
            len: 64,
        };
        assert_eq!(RemoteRegion::from_bytes(&r.to_bytes()).unwrap(), r);
        assert!(RemoteRegion::from_bytes(&[0u8; 23]).is_err());
        assert_eq!(r.address_of("write", 0, 64).unwrap(), 0x1000);
        assert_eq!(r.address_of("write", 60, 4).unwrap(), 0x1000 + 60);
        let e = r.address_of("write", 60, 5).unwrap_err();
        assert!(e.to_string().contains("64 bytes"), "{e}");
        assert!(r.address_of("read", u64::MAX, 2).is_err());
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 100_000] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.io_ptr() as usize % AlignedBuf::ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
    }
}

/// The first `len` bytes of an owned buffer, as a buffer an operation can take: send part of
/// a larger (registered) buffer without copying it.
#[derive(Debug)]
pub struct BufPrefix<B> {
    buf: B,
    len: usize,
}

impl<B: IoBuf> BufPrefix<B> {
    /// The first `len` bytes of `buf`.
    ///
    /// # Panics
    /// If `len` exceeds the buffer's length.
    pub fn new(buf: B, len: usize) -> Self {
        assert!(
            len <= buf.io_len(),
            "prefix of {len} bytes of a {}-byte buffer",
            buf.io_len()
        );
        BufPrefix { buf, len }
    }
    /// The whole buffer back.
    pub fn into_inner(self) -> B {
        self.buf
    }
    /// The underlying buffer.
    pub fn get_ref(&self) -> &B {
        &self.buf
    }
}

// SAFETY: delegates to B's guarantees and only shortens the length.
unsafe impl<B: IoBuf> IoBuf for BufPrefix<B> {
    fn io_ptr(&self) -> *const u8 {
        self.buf.io_ptr()
    }
    fn io_len(&self) -> usize {
        self.len
    }
    fn io_desc(&self) -> Option<*mut std::os::raw::c_void> {
        self.buf.io_desc()
    }
}
// SAFETY: as above; B's memory is writable for its whole length.
unsafe impl<B: IoBufMut> IoBufMut for BufPrefix<B> {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.buf.io_mut_ptr()
    }
}

/// A read-only window `[off, off+len)` of shared bytes: several sends (chunks of one large
/// message) can use one allocation at once.
#[derive(Debug, Clone)]
pub struct SharedSlice {
    data: std::sync::Arc<Vec<u8>>,
    off: usize,
    len: usize,
}

impl SharedSlice {
    /// The window `[off, off+len)` of `data`.
    ///
    /// # Panics
    /// If the window is outside `data`.
    pub fn new(data: std::sync::Arc<Vec<u8>>, off: usize, len: usize) -> Self {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= data.len()),
            "window outside the data"
        );
        SharedSlice { data, off, len }
    }
}

// SAFETY: the Arc keeps the Vec (and its heap storage, never resized: nobody can get `&mut`
// through an Arc shared with us) alive and in place while this value lives.
unsafe impl IoBuf for SharedSlice {
    fn io_ptr(&self) -> *const u8 {
        // SAFETY: off <= data.len() (checked in new).
        unsafe { self.data.as_ptr().add(self.off) }
    }
    fn io_len(&self) -> usize {
        self.len
    }
}
