//! The kinds of one-sided operation and the remote access a window grants.
//!
//! A leaf module: it uses nothing of this crate, so that windows ([`crate::window`], which
//! re-exports these) and the errors that name them ([`crate::error`]) share one definition.

use efa_fabric::Access;

/// Who may access a window remotely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowAccess {
    /// Peers may only get.
    ReadOnly,
    /// Peers may only put.
    WriteOnly,
    /// Peers may put and get.
    ReadWrite,
}

impl WindowAccess {
    pub(crate) fn fabric(self) -> Access {
        match self {
            WindowAccess::ReadOnly => Access::REMOTE_READ,
            WindowAccess::WriteOnly => Access::REMOTE_WRITE,
            WindowAccess::ReadWrite => Access::REMOTE_READ | Access::REMOTE_WRITE,
        }
    }
    pub(crate) fn code(self) -> u8 {
        match self {
            WindowAccess::ReadOnly => 1,
            WindowAccess::WriteOnly => 2,
            WindowAccess::ReadWrite => 3,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(WindowAccess::ReadOnly),
            2 => Some(WindowAccess::WriteOnly),
            3 => Some(WindowAccess::ReadWrite),
            _ => None,
        }
    }
    pub(crate) fn allows(self, op: RmaOp) -> bool {
        match op {
            RmaOp::Put => self != WindowAccess::ReadOnly,
            RmaOp::Get => self != WindowAccess::WriteOnly,
        }
    }
}

/// One-sided operation kinds, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmaOp {
    /// Write into the peer's window.
    Put,
    /// Read from the peer's window.
    Get,
}

impl std::fmt::Display for RmaOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RmaOp::Put => "put",
            RmaOp::Get => "get",
        })
    }
}
