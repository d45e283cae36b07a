//! Python memory without copies: the buffer protocol (PEP 3118: numpy arrays, bytearray,
//! memoryview, array.array) and DLPack (`__dlpack__`: torch CPU tensors, and anything else
//! that exports host memory).
//!
//! A [`Buf`] holds the exporter's view (a `Py_buffer`, or the DLPack capsule's managed
//! tensor) for as long as it lives, so the memory cannot be freed or resized under it, and
//! releases it in `Drop` (with the GIL). Its element type is a [`Dtype`]; its bytes are
//! handed to efa-core as `&[T]` / `&mut [T]` of the matching Rust type, checked for
//! alignment and whole elements by bytemuck.
//!
//! Only C-contiguous memory is accepted: efa-core moves flat slices, and a strided view
//! silently sent as if it were flat would be wrong data. Such input fails with a
//! `BufferError` that says how to make a contiguous copy.

use std::ffi::{c_void, CStr};
use std::ptr::NonNull;

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

/// The element types the package knows. Reductions take the ones efa-core reduces
/// ([`Dtype::REDUCIBLE`]); data movements take any, by size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `bool` (numpy `?`), 1 byte.
    Bool,
    /// `int8`.
    I8,
    /// `uint8` (also raw bytes: `bytes`, `bytearray`).
    U8,
    /// `int16`.
    I16,
    /// `uint16`.
    U16,
    /// `int32`.
    I32,
    /// `uint32`.
    U32,
    /// `int64`.
    I64,
    /// `uint64`.
    U64,
    /// IEEE half (`float16`).
    F16,
    /// bfloat16 (torch; numpy has none).
    Bf16,
    /// `float32`.
    F32,
    /// `float64`.
    F64,
    /// `complex64` (two `float32`).
    C64,
    /// `complex128` (two `float64`).
    C128,
}

impl Dtype {
    /// The numpy / torch name.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::I8 => "int8",
            Dtype::U8 => "uint8",
            Dtype::I16 => "int16",
            Dtype::U16 => "uint16",
            Dtype::I32 => "int32",
            Dtype::U32 => "uint32",
            Dtype::I64 => "int64",
            Dtype::U64 => "uint64",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::C64 => "complex64",
            Dtype::C128 => "complex128",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::I8 | Dtype::U8 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 | Dtype::C64 => 8,
            Dtype::C128 => 16,
        }
    }

    /// The types efa-core's built-in reductions take (`efa_core::Element`).
    pub const REDUCIBLE: &'static [Dtype] = &[
        Dtype::I8,
        Dtype::U8,
        Dtype::I32,
        Dtype::U32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F16,
        Dtype::Bf16,
        Dtype::F32,
        Dtype::F64,
    ];

    /// The type of a PEP 3118 format string of `itemsize` bytes (`None` is unsigned bytes).
    /// Native or little-endian byte order only (`@`, `=`, `<`; this is a little-endian
    /// library); `l`/`L`/`n`/`N` are resolved by their size.
    pub fn from_format(format: Option<&str>, itemsize: usize) -> Result<Dtype, String> {
        let Some(f) = format else {
            return Ok(Dtype::U8);
        };
        let body = f.trim_start_matches(['@', '=', '<']);
        if body.starts_with(['>', '!']) {
            return Err(format!(
                "big-endian elements (format {f:?}) are not supported; convert with \
                 x.astype(x.dtype.newbyteorder('='))"
            ));
        }
        let int = |signed: bool| match (itemsize, signed) {
            (1, true) => Some(Dtype::I8),
            (1, false) => Some(Dtype::U8),
            (2, true) => Some(Dtype::I16),
            (2, false) => Some(Dtype::U16),
            (4, true) => Some(Dtype::I32),
            (4, false) => Some(Dtype::U32),
            (8, true) => Some(Dtype::I64),
            (8, false) => Some(Dtype::U64),
            _ => None,
        };
        let t = match body {
            "?" => Some(Dtype::Bool),
            "b" | "h" | "i" | "l" | "q" | "n" => int(true),
            "B" | "c" | "H" | "I" | "L" | "Q" | "N" => int(false),
            "e" => Some(Dtype::F16),
            "f" => Some(Dtype::F32),
            "d" => Some(Dtype::F64),
            "Zf" => Some(Dtype::C64),
            "Zd" => Some(Dtype::C128),
            _ => None,
        };
        match t {
            Some(t) if t.size() == itemsize => Ok(t),
            _ => Err(format!(
                "elements of format {f:?} ({itemsize} bytes) are not supported; efa moves \
                 bool, (u)int8/16/32/64, float16, bfloat16, float32, float64, complex64 and \
                 complex128"
            )),
        }
    }

    /// The type of a DLPack `DLDataType` (`code`, `bits`, `lanes`).
    fn from_dlpack(code: u8, bits: u8, lanes: u16) -> Result<Dtype, String> {
        let t = match (code, bits, lanes) {
            (0, 8, 1) => Some(Dtype::I8),
            (0, 16, 1) => Some(Dtype::I16),
            (0, 32, 1) => Some(Dtype::I32),
            (0, 64, 1) => Some(Dtype::I64),
            (1, 8, 1) => Some(Dtype::U8),
            (1, 16, 1) => Some(Dtype::U16),
            (1, 32, 1) => Some(Dtype::U32),
            (1, 64, 1) => Some(Dtype::U64),
            (2, 16, 1) => Some(Dtype::F16),
            (2, 32, 1) => Some(Dtype::F32),
            (2, 64, 1) => Some(Dtype::F64),
            (4, 16, 1) => Some(Dtype::Bf16),
            (5, 64, 1) => Some(Dtype::C64),
            (5, 128, 1) => Some(Dtype::C128),
            (6, 8, 1) => Some(Dtype::Bool),
            _ => None,
        };
        t.ok_or_else(|| {
            format!(
                "DLPack elements of type code {code}, {bits} bits, {lanes} lanes are not supported"
            )
        })
    }
}

/// What keeps the memory alive, released in `Drop`.
enum Keep {
    /// A buffer-protocol view (`PyObject_GetBuffer`), released with `PyBuffer_Release`.
    View(Box<ffi::Py_buffer>),
    /// A consumed DLPack capsule; its tensor's deleter is called once.
    DlPack {
        managed: NonNull<DLManagedTensor>,
        _capsule: Py<PyAny>,
    },
}

/// Memory of a Python object, borrowed without a copy for as long as this lives.
pub struct Buf {
    ptr: NonNull<u8>,
    /// Length in bytes.
    len: usize,
    dtype: Dtype,
    readonly: bool,
    /// Held for its `Drop`, which releases the view.
    _keep: Keep,
}

// SAFETY: `Buf` only refers to memory that its exporter keeps alive until the view (or the
// DLPack deleter) is released, which `Drop` does with the GIL held (`Python::with_gil`), on
// whichever thread drops it. The pointer itself carries no thread affinity; concurrent
// access to the bytes is governed by the `&`/`&mut` borrows of `Buf`'s methods.
unsafe impl Send for Buf {}
// SAFETY: shared access only hands out `&[u8]` (reads); writes need `&mut Buf`.
unsafe impl Sync for Buf {}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buf")
            .field("len", &self.len)
            .field("dtype", &self.dtype)
            .field("readonly", &self.readonly)
            .finish()
    }
}

/// DLPack's `DLDevice` (dlpack.h).
#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

/// DLPack's `DLDataType`.
#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

/// DLPack's `DLTensor` (strides in elements; `NULL` strides mean C order).
#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// DLPack's `DLManagedTensor` (the unversioned capsule `"dltensor"`).
#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const DL_CPU: i32 = 1;
const DL_CUDA_HOST: i32 = 3;

/// Whether `shape`/`strides` (strides in elements) are C-contiguous (dimensions of length 1
/// may have any stride, as numpy and torch allow).
pub fn c_contiguous(shape: &[i64], strides: &[i64]) -> bool {
    let mut expect = 1i64;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(n);
    }
    true
}

fn not_contiguous(what: &str, shape: &[i64], strides: &[i64], unit: &str) -> PyErr {
    PyBufferError::new_err(format!(
        "efa: {what} is not C-contiguous (shape {shape:?}, strides {strides:?} {unit}); efa \
         sends and receives flat memory without copying it: pass a contiguous array \
         (numpy.ascontiguousarray(x), or x.contiguous() for a torch tensor)"
    ))
}

impl Buf {
    /// Borrows the memory of `obj` (`what` names the argument in errors). `writable`: the
    /// call writes into it (receive and result buffers).
    ///
    /// # Errors
    /// `TypeError` when `obj` offers neither the buffer protocol nor DLPack, or its element
    /// type is not supported; `BufferError` when it is not C-contiguous, is read-only but
    /// must be written, or is not host memory.
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<Buf> {
        // SAFETY: `obj` is a live object and the GIL is held (`Bound`).
        if unsafe { ffi::PyObject_CheckBuffer(obj.as_ptr()) } == 1 {
            return Self::from_buffer(obj, writable, what);
        }
        if obj.hasattr(pyo3::intern!(obj.py(), "__dlpack__"))? {
            return Self::from_dlpack(obj, writable, what);
        }
        Err(PyTypeError::new_err(format!(
            "efa: {what} must be a buffer-protocol object (numpy array, bytearray, memoryview, \
             array.array) or a DLPack tensor on the CPU (torch tensor); got {}",
            obj.get_type().name()?
        )))
    }

    fn from_buffer(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<Buf> {
        let py = obj.py();
        let mut view: Box<ffi::Py_buffer> = Box::new(ffi::Py_buffer::new());
        let flags = ffi::PyBUF_RECORDS_RO | if writable { ffi::PyBUF_WRITABLE } else { 0 };
        // SAFETY: `view` is a valid, writable `Py_buffer`; on success it must be released
        // once with `PyBuffer_Release` (done by `Keep::View`'s drop), on failure not at all.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) } != 0 {
            let err = PyErr::fetch(py);
            if writable {
                let mut probe = Box::new(ffi::Py_buffer::new());
                // SAFETY: as above; a successful probe is released at once.
                let ro = unsafe {
                    ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *probe, ffi::PyBUF_RECORDS_RO)
                };
                if ro == 0 {
                    // SAFETY: `probe` was filled by the successful call above.
                    unsafe { ffi::PyBuffer_Release(&mut *probe) };
                    return Err(PyBufferError::new_err(format!(
                        "efa: {what} is read-only, but this call writes into it; pass a \
                         writable array"
                    )));
                }
                // Not a read-only problem: report the exporter's own error below.
                PyErr::fetch(py);
            }
            let e = PyBufferError::new_err(format!("efa: {what}: {err}"));
            e.set_cause(py, Some(err));
            return Err(e);
        }
        let keep = Keep::View(view);
        let Keep::View(v) = &keep else { unreachable!() };
        let ndim = usize::try_from(v.ndim).unwrap_or(0);
        // SAFETY: with PyBUF_RECORDS_RO the exporter fills `shape` and `strides` with
        // `ndim` entries each (or leaves them NULL for ndim 0), valid while the view lives.
        let (shape, strides): (Vec<i64>, Vec<i64>) = unsafe {
            (
                dims(v.shape, ndim).iter().map(|&x| x as i64).collect(),
                dims(v.strides, ndim).iter().map(|&x| x as i64).collect(),
            )
        };
        let itemsize = usize::try_from(v.itemsize).unwrap_or(0).max(1);
        // SAFETY: the view was filled by a successful PyObject_GetBuffer.
        let contiguous = unsafe { ffi::PyBuffer_IsContiguous(&**v, b'C' as _) } == 1;
        if !contiguous {
            return Err(not_contiguous(what, &shape, &strides, "bytes"));
        }
        // SAFETY: `format` is NULL or a NUL-terminated string owned by the view.
        let format = unsafe {
            (!v.format.is_null()).then(|| CStr::from_ptr(v.format).to_string_lossy().into_owned())
        };
        let dtype = Dtype::from_format(format.as_deref(), itemsize)
            .map_err(|m| PyTypeError::new_err(format!("efa: {what}: {m}")))?;
        let len = usize::try_from(v.len).unwrap_or(0);
        let ptr = NonNull::new(v.buf.cast::<u8>()).unwrap_or(NonNull::dangling());
        let readonly = v.readonly != 0;
        Ok(Buf {
            ptr: if len == 0 { NonNull::dangling() } else { ptr },
            len,
            dtype,
            readonly,
            _keep: keep,
        })
    }

    fn from_dlpack(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<Buf> {
        let py = obj.py();
        let capsule = obj
            .call_method0(pyo3::intern!(py, "__dlpack__"))
            .map_err(|e| {
                let msg = if e.to_string().contains("requires_grad")
                    || e.to_string().contains("gradient")
                {
                    format!("efa: {what}: {e}; pass x.detach() (efa does not record autograd)")
                } else {
                    format!("efa: {what}: __dlpack__() failed: {e}")
                };
                let err = PyBufferError::new_err(msg);
                err.set_cause(py, Some(e));
                err
            })?;
        let cap = capsule.downcast::<PyCapsule>().map_err(|_| {
            PyTypeError::new_err(format!(
                "efa: {what}: __dlpack__() did not return a capsule"
            ))
        })?;
        let name = c"dltensor";
        // SAFETY: `cap` is a live capsule (checked by the downcast) and the GIL is held.
        let raw = unsafe { ffi::PyCapsule_GetPointer(cap.as_ptr(), name.as_ptr()) };
        let Some(managed) = NonNull::new(raw.cast::<DLManagedTensor>()) else {
            PyErr::fetch(py);
            return Err(PyBufferError::new_err(format!(
                "efa: {what}: __dlpack__() returned a capsule that is not an unused \"dltensor\""
            )));
        };
        // Consume it (the DLPack protocol): from now on the deleter is ours to call, once,
        // in `Keep::DlPack`'s drop; the capsule's own destructor leaves "used_dltensor"s.
        // SAFETY: as above; the name is a static NUL-terminated string.
        if unsafe { ffi::PyCapsule_SetName(cap.as_ptr(), c"used_dltensor".as_ptr()) } != 0 {
            return Err(PyErr::fetch(py));
        }
        let keep = Keep::DlPack {
            managed,
            _capsule: capsule.clone().unbind(),
        };
        // SAFETY: the producer keeps the managed tensor valid until its deleter is called.
        let t = unsafe { &managed.as_ref().dl_tensor };
        if t.device.device_type != DL_CPU && t.device.device_type != DL_CUDA_HOST {
            return Err(PyBufferError::new_err(format!(
                "efa: {what} is on DLPack device type {} (not host memory); efa moves CPU \
                 memory: pass x.cpu()",
                t.device.device_type
            )));
        }
        let dtype = Dtype::from_dlpack(t.dtype.code, t.dtype.bits, t.dtype.lanes)
            .map_err(|m| PyTypeError::new_err(format!("efa: {what}: {m}")))?;
        let ndim = usize::try_from(t.ndim).unwrap_or(0);
        // SAFETY: `shape` has `ndim` entries and `strides` is NULL or has `ndim` entries,
        // both valid while the managed tensor is (dlpack.h).
        let shape: Vec<i64> = unsafe { dims(t.shape, ndim).to_vec() };
        let strides: Option<Vec<i64>> = (!t.strides.is_null()).then(|| {
            // SAFETY: non-NULL `strides` has `ndim` entries (dlpack.h), valid as above.
            unsafe { dims(t.strides, ndim).to_vec() }
        });
        if let Some(s) = &strides {
            if !c_contiguous(&shape, s) {
                return Err(not_contiguous(what, &shape, s, "elements"));
            }
        }
        let count = shape.iter().try_fold(1usize, |acc, &n| {
            usize::try_from(n).ok().and_then(|n| acc.checked_mul(n))
        });
        let len = count
            .and_then(|c| c.checked_mul(dtype.size()))
            .ok_or_else(|| {
                PyBufferError::new_err(format!("efa: {what}: bad DLPack shape {shape:?}"))
            })?;
        let base = t.data.cast::<u8>().wrapping_add(t.byte_offset as usize);
        let _ = writable; // DLPack (unversioned) has no read-only flag: torch tensors are writable.
        Ok(Buf {
            ptr: if len == 0 {
                NonNull::dangling()
            } else {
                NonNull::new(base).ok_or_else(|| {
                    PyBufferError::new_err(format!("efa: {what}: DLPack data pointer is NULL"))
                })?
            },
            len,
            dtype,
            readonly: false,
            _keep: keep,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Whether the two buffers share any byte (an out-of-place call given the same memory
    /// twice would alias a `&` and a `&mut`).
    pub fn overlaps(&self, other: &Buf) -> bool {
        let (a, b) = (self.ptr.as_ptr() as usize, other.ptr.as_ptr() as usize);
        self.len > 0 && other.len > 0 && a < b + other.len && b < a + self.len
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes (or dangling with `len` 0) while the view
        // in `keep` lives, which is as long as `self`; reads do not conflict with the
        // exporter, which only frees or resizes once the view is released.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, to be written: fails for a read-only buffer (`what` names it).
    pub fn bytes_mut(&mut self, what: &str) -> PyResult<&mut [u8]> {
        if self.readonly {
            return Err(PyBufferError::new_err(format!(
                "efa: {what} is read-only, but this call writes into it; pass a writable array"
            )));
        }
        // SAFETY: as in `bytes`; `&mut self` makes this the only borrow handed out, and
        // the exporter granted write access (PyBUF_WRITABLE, or a DLPack tensor).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) })
    }

    /// The bytes, writable, for a receive that outlives this borrow (`irecv`).
    ///
    /// # Safety
    /// The returned slice must not be used after `self` is dropped, and nothing else may
    /// use `self`'s bytes while it is in use: the caller keeps `self` next to (and dropped
    /// after) the request that holds the slice.
    pub unsafe fn bytes_mut_static(&mut self, what: &str) -> PyResult<&'static mut [u8]> {
        let b = self.bytes_mut(what)?;
        // SAFETY: the caller's contract above.
        Ok(unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr(), b.len()) })
    }
}

/// `n` entries at `p` (empty for NULL or 0).
///
/// # Safety
/// `p` is NULL or valid for `n` reads of `T` for the returned lifetime.
unsafe fn dims<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        Python::with_gil(|_| match self {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer and is
            // released exactly once, here, with the GIL held.
            Keep::View(v) => unsafe { ffi::PyBuffer_Release(&mut **v) },
            Keep::DlPack { managed, .. } => {
                // SAFETY: the capsule was consumed by us (renamed "used_dltensor"), so the
                // deleter is ours to call exactly once; the tensor is valid until then.
                unsafe {
                    if let Some(del) = managed.as_ref().deleter {
                        del(managed.as_ptr());
                    }
                }
            }
        });
    }
}
