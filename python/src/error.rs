//! efa-core errors as Python exceptions: the class is chosen here (the one place that maps
//! [`efa_core::Error`]'s variants), the classes themselves are defined in
//! `efa/_errors.py` (so that `efa.TimeoutError` can derive from both `efa.Error` and the
//! builtin `TimeoutError`). `str(exc)` is the Rust error's text; `exc.report` is its
//! readable report with the causes and a hint (what `fn main() -> Result<..>` prints).

use efa_core::bootstrap::BootstrapError;
use efa_core::store::StoreError;
use efa_core::Error;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyModule;

/// The name in `efa._errors` of the class raised for `e`.
pub fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Timeout { .. }
        | Error::Bootstrap(BootstrapError::RankNeverJoined { .. })
        | Error::Bootstrap(BootstrapError::Store(StoreError::Timeout { .. })) => "TimeoutError",
        Error::PeerFailed { .. } => "PeerFailedError",
        Error::PeerFinalized { .. } => "PeerFinalizedError",
        Error::Truncated { .. } => "TruncatedError",
        Error::CollectiveMismatch { .. } | Error::Collective(_) => "CollectiveError",
        Error::InvalidRank { .. } | Error::ReservedTag(_) | Error::ElementSize { .. } => {
            "ArgumentError"
        }
        Error::Setting(_) | Error::Transports(_) => "SettingError",
        Error::Bootstrap(_) => "BootstrapError",
        Error::Finalized => "FinalizedError",
        Error::Cancelled => "CancelledError",
        Error::AlreadyInitialized { .. } => "AlreadyInitializedError",
        _ => "Error",
    }
}

static ERRORS: GILOnceCell<Py<PyModule>> = GILOnceCell::new();

/// The Python exception for `e`, with `rank` set for a failed or finalized peer.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let m = ERRORS.get_or_try_init(py, || {
            PyModule::import(py, "efa._errors").map(Bound::unbind)
        })?;
        let cls = m.bind(py).getattr(class_name(&e))?;
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
