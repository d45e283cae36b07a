//! Settings whose value cannot be used, and reading them from the environment.
//!
//! A leaf module: it uses nothing of this crate, so that every layer that reads a setting
//! (placement, net, the communicator) can report a bad one without depending on
//! [`crate::error`], which re-exports these.

/// Where a bad setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingSource {
    /// An environment variable, e.g. `EFA_IFACE`.
    Env(&'static str),
    /// A builder method, e.g. `CommunicatorBuilder::ip_iface`.
    Argument(&'static str),
}

/// A setting whose value cannot be used: names the variable (or builder method), the value,
/// what is wrong, and the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}; accepted: {accepted}", match .source_of_value { SettingSource::Env(v) => format!("{v}={:?}", .value), SettingSource::Argument(m) => format!("{m}({:?})", .value) })]
pub struct SettingError {
    /// The variable or builder method.
    pub source_of_value: SettingSource,
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
    /// The accepted forms, or the values this host allows.
    pub accepted: String,
}

impl SettingError {
    /// A bad value of environment variable `var`.
    pub fn env(
        var: &'static str,
        value: impl Into<String>,
        problem: impl Into<String>,
        accepted: impl Into<String>,
    ) -> Self {
        SettingError {
            source_of_value: SettingSource::Env(var),
            value: value.into(),
            problem: problem.into(),
            accepted: accepted.into(),
        }
    }

    /// A bad argument of builder method `method`.
    pub fn argument(
        method: &'static str,
        value: impl Into<String>,
        problem: impl Into<String>,
        accepted: impl Into<String>,
    ) -> Self {
        SettingError {
            source_of_value: SettingSource::Argument(method),
            value: value.into(),
            problem: problem.into(),
            accepted: accepted.into(),
        }
    }

    /// The variable's name, if the value came from the environment.
    pub fn var(&self) -> Option<&'static str> {
        match self.source_of_value {
            SettingSource::Env(v) => Some(v),
            SettingSource::Argument(_) => None,
        }
    }
}

/// The value of environment variable `var`; `None` when unset or blank.
///
/// # Errors
/// [`SettingError`] naming `var` when the value is not UTF-8 (`accepted` says what is).
pub(crate) fn env_var(
    var: &'static str,
    accepted: &str,
) -> std::result::Result<Option<String>, SettingError> {
    match std::env::var(var) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => Err(SettingError::env(
            var,
            raw.to_string_lossy(),
            "is not valid UTF-8",
            accepted,
        )),
    }
}
