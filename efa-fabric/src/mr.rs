//! Memory registration (`fi_mr(3)`) and the buffer types that operations take ownership of.

use std::alloc::{self, Layout};
use std::ptr::{self, NonNull};

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

/// One registration (`fi_mr_regattr`) and the objects it depends on. Not `Clone`: exactly one
/// owner closes it, and that owner decides when (always before the memory goes back).
struct RawMr {
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
// registration, and the raw pointers are handles (fid, desc) that libfabric lets any thread use.
unsafe impl Send for RawMr {}
// SAFETY: as above.
unsafe impl Sync for RawMr {}

impl Drop for RawMr {
    fn drop(&mut self) {
        // SAFETY: fid_mr begins with its struct fid; this is the only owner of the fid.
        close_fid(
            unsafe { ptr::addr_of_mut!((*self.fid).fid) },
            "memory region",
        );
    }
}

impl RawMr {
    /// Registers `len` bytes at `addr`, honouring the domain's MR modes.
    ///
    /// # Safety
    /// `addr..addr+len` stays allocated and mapped until the returned value is dropped.
    unsafe fn register(
        domain: &Domain,
        addr: *const u8,
        len: usize,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<RawMr> {
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
        // From here on, the region is closed on every path by RawMr's Drop.
        let mut raw = RawMr {
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
            raw._ep = Some(ep.clone());
        }
        // SAFETY: the MR is registered (and enabled); key and desc are plain reads.
        unsafe {
            raw.key = ffi::fi_mr_key(fid);
            raw.desc = ffi::fi_mr_desc(fid);
        }
        if raw.key == ffi::FI_KEY_NOTAVAIL {
            return Err(Error::RawMrKey {
                provider: domain.info().provider(),
                key_size: domain.info().mr_key_size(),
            });
        }
        Ok(raw)
    }

    /// What a peer needs: under `FI_MR_VIRT_ADDR` RMA addresses are virtual addresses of
    /// the target's memory, otherwise offsets from 0 (`fi_mr(3)`, "FI_MR_VIRT_ADDR").
    fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: if self.virt_addr { self.addr as u64 } else { 0 },
            key: self.key,
            len: self.len as u64,
        }
    }

    fn fmt_fields(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("addr", &(self.addr as *const u8))
            .field("len", &self.len)
            .field("key", &self.key)
            .field("access", &self.access)
            .finish()
    }
}

/// Memory at a fixed address that a [`MemoryRegion`] can describe while it holds the value.
///
/// # Safety
/// `reg_ptr()..reg_ptr()+reg_len()` is allocated, mapped, and at the same address for as
/// long as the value lives, even when the value itself is moved (heap-backed storage, or a
/// borrow). When `EXCLUSIVE` is true, nobody else can read or write those bytes while the
/// value is held by a region (an owned buffer, or a `&mut` borrow); when false, others may
/// hold shared references to them (a `&[T]` borrow).
pub unsafe trait RegMemory {
    /// True when holding the value gives exclusive access to its bytes.
    const EXCLUSIVE: bool;
    /// What this is, for error messages.
    const WHAT: &'static str;
    /// Start of the bytes.
    fn reg_ptr(&self) -> *const u8;
    /// Number of bytes.
    fn reg_len(&self) -> usize;
}

// SAFETY: Vec<T> storage is on the heap, does not move when the Vec moves, and is owned.
unsafe impl<T: bytemuck::Pod> RegMemory for Vec<T> {
    const EXCLUSIVE: bool = true;
    const WHAT: &'static str = "MemoryRegion<Vec<T>>";
    fn reg_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn reg_len(&self) -> usize {
        std::mem::size_of_val(self.as_slice())
    }
}
// SAFETY: as for Vec.
unsafe impl<T: bytemuck::Pod> RegMemory for Box<[T]> {
    const EXCLUSIVE: bool = true;
    const WHAT: &'static str = "MemoryRegion<Box<[T]>>";
    fn reg_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn reg_len(&self) -> usize {
        std::mem::size_of_val(&**self)
    }
}
// SAFETY: AlignedBuf owns a fixed heap allocation.
unsafe impl RegMemory for AlignedBuf {
    const EXCLUSIVE: bool = true;
    const WHAT: &'static str = "MemoryRegion<AlignedBuf>";
    fn reg_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn reg_len(&self) -> usize {
        self.len
    }
}
// SAFETY: the borrow keeps the memory alive and in place for 'a; others may share it.
unsafe impl<T: bytemuck::Pod> RegMemory for &[T] {
    const EXCLUSIVE: bool = false;
    const WHAT: &'static str = "MemoryRegion<&[T]>";
    fn reg_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn reg_len(&self) -> usize {
        std::mem::size_of_val(*self)
    }
}
// SAFETY: the exclusive borrow keeps the memory alive, in place and unaliased for 'a.
unsafe impl<T: bytemuck::Pod> RegMemory for &mut [T] {
    const EXCLUSIVE: bool = true;
    const WHAT: &'static str = "MemoryRegion<&mut [T]>";
    fn reg_ptr(&self) -> *const u8 {
        self.as_ptr().cast()
    }
    fn reg_len(&self) -> usize {
        std::mem::size_of_val(&**self)
    }
}

/// [`RegMemory`] that gives exclusive access to its bytes (owned buffers, `&mut [T]`): a
/// region over it may be the target of local receives and reads.
///
/// # Safety
/// `RegMemory::EXCLUSIVE` is true and the bytes are writable.
pub unsafe trait RegMemoryMut: RegMemory {}
// SAFETY: owned, writable heap storage.
unsafe impl<T: bytemuck::Pod> RegMemoryMut for Vec<T> {}
// SAFETY: owned, writable heap storage.
unsafe impl<T: bytemuck::Pod> RegMemoryMut for Box<[T]> {}
// SAFETY: owned, writable heap storage.
unsafe impl RegMemoryMut for AlignedBuf {}
// SAFETY: an exclusive, writable borrow.
unsafe impl<T: bytemuck::Pod> RegMemoryMut for &mut [T] {}
// SAFETY: register_raw's caller vouches for the memory.
unsafe impl RegMemoryMut for RawMemory {}

/// Memory described only by its address and length, for [`MemoryRegion::register_raw`]:
/// the caller vouches for it.
#[derive(Debug, Clone, Copy)]
pub struct RawMemory {
    addr: *const u8,
    len: usize,
}

// SAFETY: only an address; register_raw's caller guarantees what the trait asks.
unsafe impl Send for RawMemory {}
// SAFETY: as above.
unsafe impl Sync for RawMemory {}

// SAFETY: register_raw's caller guarantees the memory stays valid and unaliased as stated
// there.
unsafe impl RegMemory for RawMemory {
    const EXCLUSIVE: bool = true;
    const WHAT: &'static str = "MemoryRegion<RawMemory>";
    fn reg_ptr(&self) -> *const u8 {
        self.addr
    }
    fn reg_len(&self) -> usize {
        self.len
    }
}

/// A registered memory region (`fi_mr(3)`) that holds the memory it describes, as
/// rust-ibverbs' `MemoryRegion<O>` does: `O` is an owned buffer (`Vec<T>`, `Box<[T]>`,
/// [`AlignedBuf`]) or a borrow (`&'a [T]`, `&'a mut [T]`), so the region cannot outlive its
/// memory, and it is not `Clone`, so one owner decides when it is closed.
/// [`MemoryRegion::into_inner`] deregisters (`fi_close`) before handing the memory back;
/// dropping the region does the same, in that order.
///
/// The region gives no access to its bytes while registered: with remote access, peers may
/// change them at any time. Use it as the buffer of an operation (it is an [`IoBuf`] carrying
/// its own descriptor), or take the memory back. Remote write access is refused for shared
/// borrows (`&[T]`: others may read them) with [`Error::SharedRemoteWrite`].
///
/// Keeps its [`Domain`] (and, under `FI_MR_ENDPOINT`, its endpoint) alive.
pub struct MemoryRegion<O: RegMemory> {
    // Field order: the registration is closed before the memory is released.
    raw: RawMr,
    owner: O,
}

impl<O: RegMemory> std::fmt::Debug for MemoryRegion<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.raw.fmt_fields("MemoryRegion", f)
    }
}

impl<O: RegMemory> MemoryRegion<O> {
    /// Registers `owner`'s memory with `access` (`fi_mr_regattr`), honouring the domain's MR
    /// modes: under `FI_MR_PROV_KEY` the provider picks the key, otherwise a domain-unique key
    /// is requested; under `FI_MR_ENDPOINT` the region is bound to `ep` and enabled;
    /// [`MemoryRegion::remote`] gives a virtual address under `FI_MR_VIRT_ADDR`, else 0.
    ///
    /// # Errors
    /// - [`Error::SharedRemoteWrite`] for [`Access::REMOTE_WRITE`] on a shared borrow.
    /// - [`Error::EndpointRequired`] when `FI_MR_ENDPOINT` is required and `ep` is `None`.
    /// - [`Error::RawMrKey`] for providers with raw keys.
    /// - [`Error::MemlockLimit`] when registration fails and `ulimit -l` is finite (the usual
    ///   cause for providers that pin memory: verbs and efa).
    /// - Other `fi_mr_regattr`, `fi_mr_bind` and `fi_mr_enable` errors.
    pub fn register(
        domain: &Domain,
        owner: O,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<Self> {
        if access.contains(Access::REMOTE_WRITE) && !O::EXCLUSIVE {
            return Err(Error::SharedRemoteWrite { what: O::WHAT });
        }
        // SAFETY: RegMemory guarantees the memory stays in place while `owner` lives; owner
        // is stored next to the registration and released only after it (field order, and
        // explicitly in into_inner).
        let raw = unsafe { RawMr::register(domain, owner.reg_ptr(), owner.reg_len(), access, ep)? };
        Ok(MemoryRegion { raw, owner })
    }

    /// Deregisters (`fi_close`), then gives the memory back. A close failure is logged.
    pub fn into_inner(self) -> O {
        let MemoryRegion { raw, owner } = self;
        drop(raw);
        owner
    }

    /// The local descriptor to pass with data transfers (`fi_mr_desc`).
    pub fn desc(&self) -> *mut std::os::raw::c_void {
        self.raw.desc
    }

    /// The key peers use (`fi_mr_key`).
    pub fn key(&self) -> u64 {
        self.raw.key
    }

    /// Registered length in bytes.
    pub fn len(&self) -> usize {
        self.raw.len
    }

    /// True when zero bytes are registered.
    pub fn is_empty(&self) -> bool {
        self.raw.len == 0
    }

    /// Access rights.
    pub fn access(&self) -> Access {
        self.raw.access
    }

    /// What a peer needs to access this region.
    pub fn remote(&self) -> RemoteRegion {
        self.raw.remote()
    }

    /// True when `[ptr, ptr+len)` lies inside this region.
    pub fn covers(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        p >= self.raw.addr
            && p.checked_add(len)
                .is_some_and(|e| e <= self.raw.addr + self.raw.len)
    }
}

impl MemoryRegion<RawMemory> {
    /// Registers `len` bytes at `addr` without holding them: the caller vouches for the
    /// memory. As [`MemoryRegion::register`] otherwise.
    ///
    /// # Safety
    /// `addr..addr+len` must stay allocated (and not be unmapped or remapped) until this
    /// region is dropped. Under `FI_MR_ALLOCATED` it must be backed by allocated pages. While
    /// peers may write it (remote write access), no Rust reference to that memory may exist:
    /// use raw pointers or volatile access.
    ///
    /// # Errors
    /// As [`MemoryRegion::register`].
    pub unsafe fn register_raw(
        domain: &Domain,
        addr: *const u8,
        len: usize,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<Self> {
        MemoryRegion::register(domain, RawMemory { addr, len }, access, ep)
    }
}

// SAFETY: the memory is held by the region (RegMemory: fixed, exclusively held when
// EXCLUSIVE) and `io_desc` is the descriptor of the registration covering it, which lives as
// long as the value. A shared-borrow region is not 'static, so it cannot be an IoBuf.
unsafe impl<O: RegMemory + Send + 'static> IoBuf for MemoryRegion<O> {
    fn io_ptr(&self) -> *const u8 {
        self.owner.reg_ptr()
    }
    fn io_len(&self) -> usize {
        self.owner.reg_len()
    }
    fn io_desc(&self) -> Option<*mut std::os::raw::c_void> {
        Some(self.raw.desc)
    }
}

// SAFETY: as for IoBuf; RegMemoryMut gives exclusive, writable memory.
unsafe impl<O: RegMemoryMut + Send + 'static> IoBufMut for MemoryRegion<O> {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.owner.reg_ptr() as *mut u8
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

/// Page-aligned, zeroed memory owned together with its registrations: the one in the domain
/// it was made for and those in other domains ([`OwnedRegs::register_in`]). The body of
/// [`RegisteredBuf`] and [`TargetBuf`], which differ only in what access they allow and
/// whether they lend out references to the bytes.
struct OwnedRegs {
    // Field order matters: the regions are closed before the memory is freed.
    mr: MemoryRegion<RawMemory>,
    /// Registrations of the same memory in other domains.
    extra: Vec<MemoryRegion<RawMemory>>,
    buf: AlignedBuf,
}

impl OwnedRegs {
    fn new(domain: &Domain, len: usize, access: Access, ep: Option<&Endpoint>) -> Result<Self> {
        let buf = AlignedBuf::zeroed(len);
        let mr = Self::register(domain, &buf, access, ep)?;
        Ok(OwnedRegs {
            mr,
            extra: Vec::new(),
            buf,
        })
    }

    fn register_in(
        &mut self,
        domain: &Domain,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<&MemoryRegion<RawMemory>> {
        let mr = Self::register(domain, &self.buf, access, ep)?;
        self.extra.push(mr);
        Ok(self.extra.last().expect("just pushed"))
    }

    /// Registers `buf` (owned by the `OwnedRegs` that stores the returned region) with
    /// `access` plus every local use.
    fn register(
        domain: &Domain,
        buf: &AlignedBuf,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<MemoryRegion<RawMemory>> {
        // SAFETY: the buffer is heap memory owned by the OwnedRegs that stores the returned
        // region; it is freed only after every region (field order), and its address never
        // changes. Memory with remote write access is never exposed through references
        // (TargetBuf has no Deref; RegisteredBuf refuses REMOTE_WRITE).
        unsafe {
            MemoryRegion::register_raw(
                domain,
                buf.ptr.as_ptr(),
                buf.len,
                access | Access::LOCAL,
                ep,
            )
        }
    }

    fn fmt(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("len", &self.buf.len)
            .field("mr", &self.mr)
            .finish()
    }
}

// SAFETY: the memory is owned and fixed; the region covering it lives as long as the value.
unsafe impl IoBuf for OwnedRegs {
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
unsafe impl IoBufMut for OwnedRegs {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.buf.ptr.as_ptr()
    }
}

/// A page-aligned buffer registered for local use (and, if asked, remote read): the usual
/// buffer for sends, receives and RMA on providers that want registered memory. It derefs to
/// `[u8]`, so peers may never write it: [`RegisteredBuf::new`] refuses
/// [`Access::REMOTE_WRITE`]. Memory peers write is a [`TargetBuf`].
pub struct RegisteredBuf(OwnedRegs);

impl std::fmt::Debug for RegisteredBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt("RegisteredBuf", f)
    }
}

impl RegisteredBuf {
    fn refuse_remote_write(access: Access) -> Result<()> {
        if access.contains(Access::REMOTE_WRITE) {
            return Err(Error::SharedRemoteWrite {
                what: "RegisteredBuf",
            });
        }
        Ok(())
    }

    /// Allocates `len` zeroed bytes and registers them with `access` (plus every local use).
    /// `ep` is needed on providers with `FI_MR_ENDPOINT`.
    ///
    /// # Errors
    /// [`Error::SharedRemoteWrite`] when `access` has [`Access::REMOTE_WRITE`] (use a
    /// [`TargetBuf`]); as [`MemoryRegion::register`] otherwise.
    pub fn new(domain: &Domain, len: usize, access: Access, ep: Option<&Endpoint>) -> Result<Self> {
        Self::refuse_remote_write(access)?;
        OwnedRegs::new(domain, len, access, ep).map(RegisteredBuf)
    }

    /// Registers the same memory in another domain too, and returns that registration. It
    /// lives, and is closed, with this buffer.
    ///
    /// # Errors
    /// As [`RegisteredBuf::new`].
    pub fn register_in(
        &mut self,
        domain: &Domain,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<&MemoryRegion<RawMemory>> {
        Self::refuse_remote_write(access)?;
        self.0.register_in(domain, access, ep)
    }

    /// The memory region.
    pub fn mr(&self) -> &MemoryRegion<RawMemory> {
        &self.0.mr
    }

    /// What a peer needs to read this buffer (if registered with remote read access).
    pub fn remote(&self) -> RemoteRegion {
        self.0.mr.remote()
    }
}

impl std::ops::Deref for RegisteredBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0.buf
    }
}

impl std::ops::DerefMut for RegisteredBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0.buf
    }
}

/// A page-aligned, zeroed buffer registered as the target of peers' RMA: memory they may
/// write (and read) at any time, an MPI window's memory.
///
/// It hands out no reference to its bytes: a `&[u8]` over memory a NIC writes would be a
/// data race in safe Rust (the compiler may assume the bytes do not change while the
/// reference lives). Bytes are copied in and out instead ([`TargetBuf::read_local`],
/// [`TargetBuf::write_local`]), with volatile accesses that never form a reference, so a
/// concurrent remote write yields some mix of old and new bytes (as MPI leaves a conflicting
/// access undefined), never undefined behaviour. A guard valid "between synchronisations"
/// would not be sound: after a fence a peer may start the next epoch's writes at once, and
/// nothing local can stop it. As an [`IoBuf`] it may be the source or target of local
/// operations too (they use raw pointers only).
pub struct TargetBuf(OwnedRegs);

impl std::fmt::Debug for TargetBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt("TargetBuf", f)
    }
}

impl TargetBuf {
    /// Allocates `len` zeroed bytes and registers them with `access` (plus every local use).
    /// `ep` is needed on providers with `FI_MR_ENDPOINT`.
    ///
    /// # Errors
    /// As [`MemoryRegion::register`].
    pub fn new(domain: &Domain, len: usize, access: Access, ep: Option<&Endpoint>) -> Result<Self> {
        OwnedRegs::new(domain, len, access, ep).map(TargetBuf)
    }

    /// Registers the same memory in another domain too (a rank that reaches peers through
    /// several providers exposes one buffer on each), and returns that registration. It
    /// lives, and is closed, with this buffer.
    ///
    /// # Errors
    /// As [`MemoryRegion::register`].
    pub fn register_in(
        &mut self,
        domain: &Domain,
        access: Access,
        ep: Option<&Endpoint>,
    ) -> Result<&MemoryRegion<RawMemory>> {
        self.0.register_in(domain, access, ep)
    }

    /// The memory region.
    pub fn mr(&self) -> &MemoryRegion<RawMemory> {
        &self.0.mr
    }

    /// What a peer needs to access this buffer.
    pub fn remote(&self) -> RemoteRegion {
        self.0.mr.remote()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.buf.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.0.buf.len == 0
    }

    fn range(&self, op: &'static str, offset: usize, len: usize) -> Result<*mut u8> {
        let buf = &self.0.buf;
        match offset.checked_add(len) {
            // SAFETY: offset + len <= buf.len, so the result stays inside the allocation.
            Some(end) if end <= buf.len => Ok(unsafe { buf.ptr.as_ptr().add(offset) }),
            _ => Err(Error::OutOfBounds {
                op,
                offset: offset as u64,
                len,
                region_len: buf.len as u64,
            }),
        }
    }

    /// Copies `out.len()` bytes at byte `offset` into `out`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] (nothing copied) when the range is outside the buffer.
    pub fn read_local(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let src = self.range("read_local", offset, out.len())?;
        // SAFETY: src..src+out.len() is inside our allocation (checked); out is a distinct
        // exclusive borrow (it cannot alias our memory: we never hand out references to it).
        unsafe { volatile_copy_from(src, out) };
        Ok(())
    }

    /// Copies `data` into the buffer at byte `offset`. `&mut self`: local writers are
    /// exclusive with each other (peers' writes are not, see the type's docs).
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] (nothing copied) when the range is outside the buffer.
    pub fn write_local(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        let dst = self.range("write_local", offset, data.len())?;
        // SAFETY: as in read_local.
        unsafe { volatile_copy_to(dst, data) };
        Ok(())
    }

    /// Sets `len` bytes at byte `offset` to `value`.
    ///
    /// # Errors
    /// As [`TargetBuf::write_local`].
    pub fn fill_local(&mut self, offset: usize, len: usize, value: u8) -> Result<()> {
        let dst = self.range("fill_local", offset, len)?;
        for i in 0..len {
            // SAFETY: dst..dst+len is inside our allocation (checked).
            unsafe { ptr::write_volatile(dst.add(i), value) };
        }
        Ok(())
    }
}

/// Copies from memory that a NIC may write concurrently into `out`, in aligned 8-byte
/// volatile loads (bytes at the unaligned ends).
///
/// # Safety
/// `src..src+out.len()` is allocated and no Rust reference covers it.
unsafe fn volatile_copy_from(src: *const u8, out: &mut [u8]) {
    let n = out.len();
    let head = src.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: i < n: inside the caller's range.
        out[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: src+i is 8-aligned (after the head) and src+i..src+i+8 is in range.
        let w = unsafe { ptr::read_volatile(src.add(i).cast::<u64>()) };
        out[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        out[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Copies `data` into memory that a NIC may access concurrently, as [`volatile_copy_from`].
///
/// # Safety
/// `dst..dst+data.len()` is allocated, writable, and no Rust reference covers it.
unsafe fn volatile_copy_to(dst: *mut u8, data: &[u8]) {
    let n = data.len();
    let head = dst.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: i < n: inside the caller's range.
        unsafe { ptr::write_volatile(dst.add(i), data[i]) };
        i += 1;
    }
    while i + 8 <= n {
        let w = u64::from_ne_bytes(data[i..i + 8].try_into().expect("8 bytes"));
        // SAFETY: dst+i is 8-aligned (after the head) and in range.
        unsafe { ptr::write_volatile(dst.add(i).cast::<u64>(), w) };
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { ptr::write_volatile(dst.add(i), data[i]) };
        i += 1;
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
// SAFETY: as for OwnedRegs (owned, fixed memory and the region covering it).
unsafe impl IoBuf for RegisteredBuf {
    fn io_ptr(&self) -> *const u8 {
        self.0.io_ptr()
    }
    fn io_len(&self) -> usize {
        self.0.io_len()
    }
    fn io_desc(&self) -> Option<*mut std::os::raw::c_void> {
        self.0.io_desc()
    }
}
// SAFETY: as above.
unsafe impl IoBufMut for RegisteredBuf {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.0.io_mut_ptr()
    }
}

// SAFETY: as for OwnedRegs. Operations use the pointer only; no reference to these bytes is
// ever formed.
unsafe impl IoBuf for TargetBuf {
    fn io_ptr(&self) -> *const u8 {
        self.0.io_ptr()
    }
    fn io_len(&self) -> usize {
        self.0.io_len()
    }
    fn io_desc(&self) -> Option<*mut std::os::raw::c_void> {
        self.0.io_desc()
    }
}
// SAFETY: as above.
unsafe impl IoBufMut for TargetBuf {
    fn io_mut_ptr(&mut self) -> *mut u8 {
        self.0.io_mut_ptr()
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
