//! efa-core errors as Python exceptions. The class is chosen from the error's
//! [`ErrorClass`] ([`efa_core::Error::class`], the one place that sorts efa-core's variants)
//! by one match over the classes below; the classes themselves are defined in
//! `efa/_errors.py` (so that `efa.TimeoutError` can derive from both `efa.Error` and the
//! builtin `TimeoutError`). `str(exc)` is the Rust error's text; `exc.report` is its
//! readable report with the causes and a hint (what `fn main() -> Result<..>` prints).

use efa_core::{Error, ErrorClass};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyModule;

/// The name in `efa._errors` of the class raised for an error of class `class`.
///
/// Exhaustive on purpose (`ErrorClass` is not `#[non_exhaustive]`): a new class in efa-core
/// does not compile here until it is given a Python class.
pub fn class_name(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Timeout => "TimeoutError",
        ErrorClass::PeerFailed => "PeerFailedError",
        ErrorClass::PeerFinalized => "PeerFinalizedError",
        ErrorClass::Truncated => "TruncatedError",
        ErrorClass::Mismatch | ErrorClass::CollectiveArgument => "CollectiveError",
        ErrorClass::Rank | ErrorClass::Tag => "ArgumentError",
        ErrorClass::Setting => "SettingError",
        ErrorClass::Bootstrap => "BootstrapError",
        ErrorClass::Finalized => "FinalizedError",
        ErrorClass::Cancelled => "CancelledError",
        ErrorClass::AlreadyInitialized => "AlreadyInitializedError",
        // No narrower Python class: the base `efa.Error`, with the Rust text.
        ErrorClass::NoRoute
        | ErrorClass::Fabric
        | ErrorClass::Protocol
        | ErrorClass::Rma
        | ErrorClass::Resource
        | ErrorClass::Internal => "Error",
    }
}

static ERRORS: GILOnceCell<Py<PyModule>> = GILOnceCell::new();

/// The Python exception for `e`, with `rank` set for a failed or finalized peer.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let m = ERRORS.get_or_try_init(py, || {
            PyModule::import(py, "efa._errors").map(Bound::unbind)
        })?;
        let cls = m.bind(py).getattr(class_name(e.class()))?;
        let exc = cls.call1((e.to_string(),))?;
        exc.setattr("report", format!("{e:?}"))?;
        let rank = match &e {
            Error::PeerFailed { rank, .. } | Error::PeerFinalized { rank } => Some(*rank),
            _ => None,
        };
        exc.setattr("rank", rank)?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|import_failed| import_failed)
}

/// `Result` of efa-core to `PyResult`.
pub trait IntoPy<T> {
    /// Converts the error (needs the GIL: call after `allow_threads` returns).
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for efa_core::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
