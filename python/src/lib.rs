//! `efa._efa`: the Python extension module of the `efa` package (see `python/efa/_efa.pyi`
//! for the Python-facing documentation of every class and method, and the README).
//!
//! It wraps efa-core's public API one to one: [`Communicator`] is
//! `efa_core::Communicator` (same bootstrap, same names, same in-place / `_into` rule);
//! buffers are any buffer-protocol object or DLPack CPU tensor, borrowed without a copy
//! ([`buffer::Buf`]); every call that can block releases the GIL; efa-core errors become the
//! exceptions of `efa._errors` ([`error`]).
//!
//! `unsafe` lives in [`buffer`] only (the CPython buffer and DLPack C structures), each block
//! with its `// SAFETY:` comment.

mod buffer;
mod error;

use std::time::Duration;

use buffer::{Buf, Dtype};
use efa_core::{RecvRequest, SendRequest, Source, Tag};
use error::IntoPy;
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The wildcard source of `recv`/`irecv`/`probe` (`MPI_ANY_SOURCE`).
const ANY_SOURCE: i64 = -1;
/// The wildcard tag of `recv`/`irecv`/`probe` (`MPI_ANY_TAG`).
const ANY_TAG: i64 = -1;

/// The built-in reduction operators (efa-core's `ReduceOp`).
#[pyclass(eq, eq_int, hash, module = "efa._efa", frozen)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[allow(clippy::upper_case_acronyms)]
enum ReduceOp {
    SUM,
    PROD,
    MIN,
    MAX,
    AVG,
}

impl From<ReduceOp> for efa_core::ReduceOp {
    fn from(op: ReduceOp) -> Self {
        match op {
            ReduceOp::SUM => efa_core::ReduceOp::Sum,
            ReduceOp::PROD => efa_core::ReduceOp::Prod,
            ReduceOp::MIN => efa_core::ReduceOp::Min,
            ReduceOp::MAX => efa_core::ReduceOp::Max,
            ReduceOp::AVG => efa_core::ReduceOp::Avg,
        }
    }
}

/// What a receive or probe found (efa-core's `Status`).
#[pyclass(module = "efa._efa", frozen, get_all)]
#[derive(Clone, Debug)]
struct Status {
    /// The sender (a rank of the communicator).
    source: u32,
    /// The message's tag.
    tag: u32,
    /// The message's length in bytes.
    nbytes: usize,
}

#[pymethods]
impl Status {
    fn __repr__(&self) -> String {
        format!(
            "Status(source={}, tag={}, nbytes={})",
            self.source, self.tag, self.nbytes
        )
    }
}

impl From<efa_core::Status> for Status {
    fn from(s: efa_core::Status) -> Self {
        Status {
            source: s.source,
            tag: s.tag,
            nbytes: s.len,
        }
    }
}

/// Runs `$body` with `$T` the Rust element type of `$dt`, for reductions; other types fail
/// with a `TypeError` naming the call (`$what`) and the types that reduce.
macro_rules! reducible {
    ($dt:expr, $what:expr, |$T:ident| $body:expr) => {
        match $dt {
            Dtype::I8 => {
                type $T = i8;
                $body
            }
            Dtype::U8 => {
                type $T = u8;
                $body
            }
            Dtype::I32 => {
                type $T = i32;
                $body
            }
            Dtype::U32 => {
                type $T = u32;
                $body
            }
            Dtype::I64 => {
                type $T = i64;
                $body
            }
            Dtype::U64 => {
                type $T = u64;
                $body
            }
            Dtype::F16 => {
                type $T = efa_core::f16;
                $body
            }
            Dtype::Bf16 => {
                type $T = efa_core::bf16;
                $body
            }
            Dtype::F32 => {
                type $T = f32;
                $body
            }
            Dtype::F64 => {
                type $T = f64;
                $body
            }
            other => return Err(not_reducible($what, other)),
        }
    };
}

/// Runs `$body` with `$T` an unsigned Rust type of `$dt`'s size, for data movements (which
/// efa-core checks by element size).
macro_rules! movable {
    ($dt:expr, |$T:ident| $body:expr) => {
        match $dt.size() {
            1 => {
                type $T = u8;
                $body
            }
            2 => {
                type $T = u16;
                $body
            }
            4 => {
                type $T = u32;
                $body
            }
            8 => {
                type $T = u64;
                $body
            }
            _ => {
                type $T = [u64; 2];
                $body
            }
        }
    };
}

fn not_reducible(what: &str, t: Dtype) -> PyErr {
    let names: Vec<_> = Dtype::REDUCIBLE.iter().map(|d| d.name()).collect();
    PyTypeError::new_err(format!(
        "efa: {what}: elements of type {} cannot be reduced; efa reduces {}",
        t.name(),
        names.join(", ")
    ))
}

/// `bytes` as elements of `T`: whole elements, aligned (`what` names the argument). An
/// empty buffer is no elements whatever its address (an empty array's may be any, e.g. the
/// dangling `1` of an empty `Buf`, which is not aligned for `T`).
fn elems<'a, T: bytemuck::Pod>(bytes: &'a [u8], what: &str) -> PyResult<&'a [T]> {
    if bytes.is_empty() {
        return Ok(&[]);
    }
    bytemuck::try_cast_slice(bytes).map_err(|e| misfit::<T>(what, e))
}

/// `bytes` as elements of `T`, writable (empty as in [`elems`]).
fn elems_mut<'a, T: bytemuck::Pod>(bytes: &'a mut [u8], what: &str) -> PyResult<&'a mut [T]> {
    if bytes.is_empty() {
        return Ok(&mut []);
    }
    bytemuck::try_cast_slice_mut(bytes).map_err(|e| misfit::<T>(what, e))
}

fn misfit<T>(what: &str, e: bytemuck::PodCastError) -> PyErr {
    PyBufferError::new_err(format!(
        "efa: {what} cannot be used as {}-byte elements ({e:?}): its address must be a \
         multiple of the element size; pass a copy (numpy.array(x))",
        std::mem::size_of::<T>()
    ))
}

/// The send and receive buffers of an out-of-place call: the same element type, no shared
/// byte.
fn borrow_pair(op: &str, send: &Bound<'_, PyAny>, recv: &Bound<'_, PyAny>) -> PyResult<(Buf, Buf)> {
    let s = Buf::get(send, false, "send")?;
    let r = Buf::get(recv, true, "recv")?;
    if s.dtype() != r.dtype() {
        return Err(PyTypeError::new_err(format!(
            "efa: {op}: send has elements of type {}, recv of type {}; both must have the same",
            s.dtype().name(),
            r.dtype().name()
        )));
    }
    if s.overlaps(&r) {
        return Err(PyValueError::new_err(format!(
            "efa: {op}: send and recv share memory; use the in-place form ({op} without _into) \
             or separate buffers"
        )));
    }
    Ok((s, r))
}

fn source_of(source: i64) -> PyResult<Source> {
    match source {
        ANY_SOURCE => Ok(Source::Any),
        r => u32::try_from(r).map(Source::Rank).map_err(|_| {
            PyValueError::new_err(format!(
                "efa: source {r} is not a rank; pass a rank (0 to size - 1) or efa.ANY_SOURCE"
            ))
        }),
    }
}

fn tag_of(tag: i64) -> PyResult<Tag> {
    match tag {
        ANY_TAG => Ok(Tag::Any),
        t => u32::try_from(t).map(Tag::Is).map_err(|_| {
            PyValueError::new_err(format!(
                "efa: tag {t} is not a tag; pass a tag (0 or more) or efa.ANY_TAG"
            ))
        }),
    }
}

/// A communicator: efa-core's `Communicator` (see `efa/_efa.pyi`).
#[pyclass(module = "efa._efa", frozen, weakref)]
struct Communicator {
    comm: efa_core::Communicator,
}

#[pymethods]
impl Communicator {
    /// Joins the job (`Communicator::init`, or the builder with a deadline).
    #[new]
    #[pyo3(signature = (*, timeout = None))]
    fn new(py: Python<'_>, timeout: Option<f64>) -> PyResult<Self> {
        let mut b = efa_core::Communicator::builder();
        if let Some(t) = timeout {
            let d = Duration::try_from_secs_f64(t)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "efa: timeout {t} is not a positive number of seconds"
                    ))
                })?;
            b = b.timeout(d);
        }
        let comm = py.allow_threads(|| b.build()).py_err(py)?;
        Ok(Communicator { comm })
    }

    #[getter]
    fn rank(&self) -> u32 {
        self.comm.rank()
    }

    #[getter]
    fn size(&self) -> u32 {
        self.comm.size()
    }

    /// The deadline of every blocking call, in seconds.
    #[getter]
    fn timeout(&self) -> f64 {
        self.comm.timeout().as_secs_f64()
    }

    #[getter]
    fn wait_policy(&self) -> &'static str {
        self.comm.wait_policy().name()
    }

    #[getter]
    fn context_id(&self) -> u32 {
        self.comm.context_id()
    }

    fn world_rank(&self, py: Python<'_>, rank: u32) -> PyResult<u32> {
        self.comm.world_rank(rank).py_err(py)
    }

    fn route(&self, py: Python<'_>, peer: u32) -> PyResult<String> {
        let r = self.comm.route(peer).py_err(py)?;
        Ok(r.to_string())
    }

    fn __repr__(&self) -> String {
        format!(
            "Communicator(rank={}, size={}, context_id={})",
            self.comm.rank(),
            self.comm.size(),
            self.comm.context_id()
        )
    }

    fn dup(&self, py: Python<'_>) -> PyResult<Communicator> {
        let comm = py.allow_threads(|| self.comm.dup()).py_err(py)?;
        Ok(Communicator { comm })
    }

    #[pyo3(signature = (color, key = 0))]
    fn split(
        &self,
        py: Python<'_>,
        color: Option<u32>,
        key: i32,
    ) -> PyResult<Option<Communicator>> {
        let c = py
            .allow_threads(|| self.comm.split(color, key))
            .py_err(py)?;
        Ok(c.map(|comm| Communicator { comm }))
    }

    fn finalize(&self, py: Python<'_>) -> PyResult<()> {
        let c = self.comm.clone();
        py.allow_threads(|| c.finalize()).py_err(py)
    }

    fn abort(&self, py: Python<'_>, code: i32, reason: &str) {
        py.allow_threads(|| self.comm.abort(code, reason))
    }

    // ---- Point-to-point ---------------------------------------------------------------

    #[pyo3(signature = (buf, dest, tag = 0))]
    fn send(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, dest: u32, tag: u32) -> PyResult<()> {
        let b = Buf::get(buf, false, "buf")?;
        let bytes = b.bytes();
        py.allow_threads(|| self.comm.send(bytes, dest, tag))
            .py_err(py)
    }

    #[pyo3(signature = (buf, source = ANY_SOURCE, tag = ANY_TAG))]
    fn recv(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        source: i64,
        tag: i64,
    ) -> PyResult<Status> {
        let (src, tag) = (source_of(source)?, tag_of(tag)?);
        let mut b = Buf::get(buf, true, "buf")?;
        let dt = b.dtype();
        let bytes = b.bytes_mut("buf")?;
        movable!(dt, |T| {
            let s = elems_mut::<T>(bytes, "buf")?;
            let st = py
                .allow_threads(|| self.comm.recv(s, src, tag))
                .py_err(py)?;
            Ok(st.into())
        })
    }

    #[pyo3(signature = (buf, dest, tag = 0))]
    fn isend(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        dest: u32,
        tag: u32,
    ) -> PyResult<Request> {
        let b = Buf::get(buf, false, "buf")?;
        // Buffered (`ibsend`): the data is copied, so the request borrows nothing from the
        // Python object and a dropped request detaches.
        let r = self.comm.ibsend(b.bytes(), dest, tag).py_err(py)?;
        Ok(Request::pending(Pending::Send(r)))
    }

    #[pyo3(signature = (buf, source = ANY_SOURCE, tag = ANY_TAG))]
    fn irecv(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        source: i64,
        tag: i64,
    ) -> PyResult<Request> {
        let (src, tag) = (source_of(source)?, tag_of(tag)?);
        let mut b = Buf::get(buf, true, "buf")?;
        let dt = b.dtype();
        // SAFETY: the slice goes into a `Pending::Recv` together with `b`, whose field
        // order drops the request (which cancels or completes the receive and gives up the
        // slice) before the buffer view.
        let bytes = unsafe { b.bytes_mut_static("buf")? };
        let req = movable!(dt, |T| {
            let s = elems_mut::<T>(bytes, "buf")?;
            self.comm.irecv(s, src, tag).py_err(py)?
        });
        Ok(Request::pending(Pending::Recv(RecvPending {
            req,
            _buf: b,
        })))
    }

    #[pyo3(signature = (sendbuf, dest, recvbuf, source = ANY_SOURCE, sendtag = 0, recvtag = ANY_TAG))]
    #[allow(clippy::too_many_arguments)]
    fn sendrecv(
        &self,
        py: Python<'_>,
        sendbuf: &Bound<'_, PyAny>,
        dest: u32,
        recvbuf: &Bound<'_, PyAny>,
        source: i64,
        sendtag: u32,
        recvtag: i64,
    ) -> PyResult<Status> {
        let (src, rtag) = (source_of(source)?, tag_of(recvtag)?);
        let s = Buf::get(sendbuf, false, "sendbuf")?;
        let mut r = Buf::get(recvbuf, true, "recvbuf")?;
        if s.overlaps(&r) {
            return Err(PyValueError::new_err(
                "efa: sendrecv: sendbuf and recvbuf share memory; use sendrecv_replace",
            ));
        }
        let dt = r.dtype();
        let sb = s.bytes();
        let rb = r.bytes_mut("recvbuf")?;
        movable!(dt, |T| {
            let rs = elems_mut::<T>(rb, "recvbuf")?;
            let st = py
                .allow_threads(|| self.comm.sendrecv(sb, dest, sendtag, rs, src, rtag))
                .py_err(py)?;
            Ok(st.into())
        })
    }

    #[pyo3(signature = (buf, dest, source = ANY_SOURCE, sendtag = 0, recvtag = ANY_TAG))]
    fn sendrecv_replace(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        dest: u32,
        source: i64,
        sendtag: u32,
        recvtag: i64,
    ) -> PyResult<Status> {
        let (src, rtag) = (source_of(source)?, tag_of(recvtag)?);
        let mut b = Buf::get(buf, true, "buf")?;
        let dt = b.dtype();
        let bytes = b.bytes_mut("buf")?;
        movable!(dt, |T| {
            let s = elems_mut::<T>(bytes, "buf")?;
            let st = py
                .allow_threads(|| self.comm.sendrecv_replace(s, dest, sendtag, src, rtag))
                .py_err(py)?;
            Ok(st.into())
        })
    }

    #[pyo3(signature = (source = ANY_SOURCE, tag = ANY_TAG))]
    fn probe(&self, py: Python<'_>, source: i64, tag: i64) -> PyResult<Status> {
        let (src, tag) = (source_of(source)?, tag_of(tag)?);
        let st = py.allow_threads(|| self.comm.probe(src, tag)).py_err(py)?;
        Ok(st.into())
    }

    #[pyo3(signature = (source = ANY_SOURCE, tag = ANY_TAG))]
    fn iprobe(&self, py: Python<'_>, source: i64, tag: i64) -> PyResult<Option<Status>> {
        let (src, tag) = (source_of(source)?, tag_of(tag)?);
        let st = self.comm.iprobe(src, tag).py_err(py)?;
        Ok(st.map(Into::into))
    }

    // ---- Collectives: reductions ------------------------------------------------------

    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.comm.barrier()).py_err(py)
    }

    #[pyo3(signature = (buf, op = ReduceOp::SUM))]
    fn allreduce(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, op: ReduceOp) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            reducible!(dt, "allreduce", |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.allreduce(x, efa_core::ReduceOp::from(op))))
            })
        })
    }

    #[pyo3(signature = (send, recv, op = ReduceOp::SUM))]
    fn allreduce_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        op: ReduceOp,
    ) -> PyResult<()> {
        self.pair(py, "allreduce", send, recv, |c, dt, s, r| {
            reducible!(dt, "allreduce", |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.allreduce_into(s, r, efa_core::ReduceOp::from(op))))
            })
        })
    }

    #[pyo3(signature = (buf, op = ReduceOp::SUM, root = 0))]
    fn reduce(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        op: ReduceOp,
        root: u32,
    ) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            reducible!(dt, "reduce", |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.reduce(x, efa_core::ReduceOp::from(op), root)))
            })
        })
    }

    #[pyo3(signature = (send, recv, op = ReduceOp::SUM, root = 0))]
    fn reduce_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        op: ReduceOp,
        root: u32,
    ) -> PyResult<()> {
        self.pair(py, "reduce", send, recv, |c, dt, s, r| {
            reducible!(dt, "reduce", |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.reduce_into(s, r, efa_core::ReduceOp::from(op), root)))
            })
        })
    }

    #[pyo3(signature = (buf, op = ReduceOp::SUM))]
    fn reduce_scatter(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, op: ReduceOp) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            reducible!(dt, "reduce_scatter", |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.reduce_scatter(x, efa_core::ReduceOp::from(op))))
            })
        })
    }

    #[pyo3(signature = (send, recv, op = ReduceOp::SUM))]
    fn reduce_scatter_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        op: ReduceOp,
    ) -> PyResult<()> {
        self.pair(py, "reduce_scatter", send, recv, |c, dt, s, r| {
            reducible!(dt, "reduce_scatter", |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.reduce_scatter_into(s, r, efa_core::ReduceOp::from(op))))
            })
        })
    }

    #[pyo3(signature = (buf, op = ReduceOp::SUM))]
    fn scan(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, op: ReduceOp) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            reducible!(dt, "scan", |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.scan(x, efa_core::ReduceOp::from(op))))
            })
        })
    }

    #[pyo3(signature = (send, recv, op = ReduceOp::SUM))]
    fn scan_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        op: ReduceOp,
    ) -> PyResult<()> {
        self.pair(py, "scan", send, recv, |c, dt, s, r| {
            reducible!(dt, "scan", |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.scan_into(s, r, efa_core::ReduceOp::from(op))))
            })
        })
    }

    #[pyo3(signature = (buf, op = ReduceOp::SUM))]
    fn exscan(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, op: ReduceOp) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            reducible!(dt, "exscan", |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.exscan(x, efa_core::ReduceOp::from(op))))
            })
        })
    }

    #[pyo3(signature = (send, recv, op = ReduceOp::SUM))]
    fn exscan_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        op: ReduceOp,
    ) -> PyResult<()> {
        self.pair(py, "exscan", send, recv, |c, dt, s, r| {
            reducible!(dt, "exscan", |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.exscan_into(s, r, efa_core::ReduceOp::from(op))))
            })
        })
    }

    // ---- Collectives: data movement ---------------------------------------------------

    #[pyo3(signature = (buf, root = 0))]
    fn broadcast(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, root: u32) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.broadcast(x, root)))
            })
        })
    }

    fn allgather(&self, py: Python<'_>, buf: &Bound<'_, PyAny>) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.allgather(x)))
            })
        })
    }

    fn allgather_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.pair(py, "allgather", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.allgather_into(s, r)))
            })
        })
    }

    fn allgatherv(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        counts: Vec<usize>,
    ) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.allgatherv(x, &counts)))
            })
        })
    }

    fn allgatherv_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        counts: Vec<usize>,
    ) -> PyResult<()> {
        self.pair(py, "allgatherv", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.allgatherv_into(s, r, &counts)))
            })
        })
    }

    #[pyo3(signature = (buf, root = 0))]
    fn gather(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, root: u32) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.gather(x, root)))
            })
        })
    }

    #[pyo3(signature = (send, recv, root = 0))]
    fn gather_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        root: u32,
    ) -> PyResult<()> {
        self.pair(py, "gather", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.gather_into(s, r, root)))
            })
        })
    }

    #[pyo3(signature = (buf, counts, displs, root = 0))]
    fn gatherv(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        counts: Vec<usize>,
        displs: Vec<usize>,
        root: u32,
    ) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.gatherv(x, &counts, &displs, root)))
            })
        })
    }

    #[pyo3(signature = (send, recv, counts, displs, root = 0))]
    fn gatherv_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        counts: Vec<usize>,
        displs: Vec<usize>,
        root: u32,
    ) -> PyResult<()> {
        self.pair(py, "gatherv", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.gatherv_into(s, r, &counts, &displs, root)))
            })
        })
    }

    #[pyo3(signature = (buf, root = 0))]
    fn scatter(&self, py: Python<'_>, buf: &Bound<'_, PyAny>, root: u32) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.scatter(x, root)))
            })
        })
    }

    #[pyo3(signature = (send, recv, root = 0))]
    fn scatter_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        root: u32,
    ) -> PyResult<()> {
        self.pair(py, "scatter", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.scatter_into(s, r, root)))
            })
        })
    }

    #[pyo3(signature = (buf, counts, displs, root = 0))]
    fn scatterv(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        counts: Vec<usize>,
        displs: Vec<usize>,
        root: u32,
    ) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.scatterv(x, &counts, &displs, root)))
            })
        })
    }

    #[pyo3(signature = (send, recv, counts, displs, root = 0))]
    fn scatterv_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        counts: Vec<usize>,
        displs: Vec<usize>,
        root: u32,
    ) -> PyResult<()> {
        self.pair(py, "scatterv", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.scatterv_into(s, r, &counts, &displs, root)))
            })
        })
    }

    fn alltoall(&self, py: Python<'_>, buf: &Bound<'_, PyAny>) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.alltoall(x)))
            })
        })
    }

    fn alltoall_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.pair(py, "alltoall", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| c.alltoall_into(s, r)))
            })
        })
    }

    fn alltoallv(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        counts: Vec<usize>,
        displs: Vec<usize>,
    ) -> PyResult<()> {
        self.in_place(py, buf, |c, dt, b| {
            movable!(dt, |T| {
                let x = elems_mut::<T>(b, "buf")?;
                Ok(py.allow_threads(|| c.alltoallv(x, &counts, &displs)))
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn alltoallv_into(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        send_counts: Vec<usize>,
        send_displs: Vec<usize>,
        recv: &Bound<'_, PyAny>,
        recv_counts: Vec<usize>,
        recv_displs: Vec<usize>,
    ) -> PyResult<()> {
        self.pair(py, "alltoallv", send, recv, |c, dt, s, r| {
            movable!(dt, |T| {
                let (s, r) = (elems::<T>(s, "send")?, elems_mut::<T>(r, "recv")?);
                Ok(py.allow_threads(|| {
                    c.alltoallv_into(s, &send_counts, &send_displs, r, &recv_counts, &recv_displs)
                }))
            })
        })
    }
}

/// The shapes every collective wrapper shares: borrow the buffers, run the typed call (which
/// releases the GIL), turn its error into the Python exception.
impl Communicator {
    fn pair(
        &self,
        py: Python<'_>,
        what: &str,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        f: impl FnOnce(
            &efa_core::Communicator,
            Dtype,
            &[u8],
            &mut [u8],
        ) -> PyResult<efa_core::Result<()>>,
    ) -> PyResult<()> {
        let (s, mut r) = borrow_pair(what, send, recv)?;
        let dt = s.dtype();
        f(&self.comm, dt, s.bytes(), r.bytes_mut("recv")?)?.py_err(py)
    }

    fn in_place(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        f: impl FnOnce(&efa_core::Communicator, Dtype, &mut [u8]) -> PyResult<efa_core::Result<()>>,
    ) -> PyResult<()> {
        let mut b = Buf::get(buf, true, "buf")?;
        let dt = b.dtype();
        f(&self.comm, dt, b.bytes_mut("buf")?)?.py_err(py)
    }
}

/// A receive in flight: the request, then the buffer it writes. Field order matters: the
/// request is dropped (cancelled, giving up its `'static` slice of the buffer) before the
/// buffer's view is released.
struct RecvPending {
    req: RecvRequest<'static>,
    _buf: Buf,
}

enum Pending {
    Send(SendRequest<'static>),
    Recv(RecvPending),
}

/// A non-blocking send or receive (see `efa/_efa.pyi`).
#[pyclass(module = "efa._efa")]
struct Request {
    pending: Option<Pending>,
    /// The outcome once complete: the receive's status (`None` for a send), or its error.
    done: Option<Result<Option<Status>, PyErr>>,
}

impl Request {
    fn pending(p: Pending) -> Request {
        Request {
            pending: Some(p),
            done: None,
        }
    }

    /// Waits for the pending operation (GIL released) and records its outcome.
    fn complete(&mut self, py: Python<'_>) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let res = match p {
            Pending::Send(r) => py.allow_threads(|| r.wait()).map(|()| None),
            Pending::Recv(RecvPending { req, _buf }) => {
                let r = py.allow_threads(|| req.wait()).map(|s| Some(s.into()));
                drop(_buf);
                r
            }
        };
        self.done = Some(res.map_err(|e| error::to_py(py, e)));
    }

    fn outcome(&self, py: Python<'_>) -> PyResult<Option<Status>> {
        match &self.done {
            Some(Ok(s)) => Ok(s.clone()),
            Some(Err(e)) => Err(e.clone_ref(py)),
            None => Err(pyo3::exceptions::PyRuntimeError::new_err(
                "efa: internal error: a request has neither an operation nor an outcome",
            )),
        }
    }
}

#[pymethods]
impl Request {
    /// Waits; the receive's Status, or None for a send.
    fn wait(&mut self, py: Python<'_>) -> PyResult<Option<Status>> {
        self.complete(py);
        self.outcome(py)
    }

    /// Whether it has completed (never blocks). A receive's data is in its buffer once
    /// this returns True.
    fn test(&mut self, py: Python<'_>) -> PyResult<bool> {
        let finished = match self.pending.as_mut() {
            None => return Ok(true),
            Some(Pending::Send(r)) => r.test(),
            Some(Pending::Recv(r)) => r.req.test(),
        };
        if finished.py_err(py)? {
            self.complete(py);
            return Ok(true);
        }
        Ok(false)
    }

    /// Cancels a receive that no message has matched yet; True if cancelled.
    fn cancel(&mut self, py: Python<'_>) -> PyResult<bool> {
        match self.pending.as_mut() {
            Some(Pending::Recv(r)) => r.req.cancel().py_err(py),
            _ => Ok(false),
        }
    }

    #[getter]
    fn done(&self) -> bool {
        self.pending.is_none()
    }
}

/// The extension module.
#[pymodule]
fn _efa(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Communicator>()?;
    m.add_class::<Request>()?;
    m.add_class::<Status>()?;
    m.add_class::<ReduceOp>()?;
    m.add("ANY_SOURCE", ANY_SOURCE)?;
    m.add("ANY_TAG", ANY_TAG)?;
    m.add("MAX_TAG", efa_core::comm::MAX_USER_TAG)?;
    Ok(())
}
