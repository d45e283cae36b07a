//! The descriptor a peer needs for RMA into a registered region.
//!
//! A leaf module (it uses only [`crate::error`]), so that endpoints ([`crate::ep`]) and
//! memory regions ([`crate::mr`]) can both name it without depending on each other.

use crate::error::{Error, Result};

/// What a peer needs to access a registered region: its base address (a virtual address under
/// `FI_MR_VIRT_ADDR`, else 0 with offsets), key and length. Exchange it with
/// [`RemoteRegion::to_bytes`] / [`RemoteRegion::from_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// Address that RMA calls take for offset 0.
    pub addr: u64,
    /// Remote key.
    pub key: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RemoteRegion {
    /// Wire size of [`RemoteRegion::to_bytes`].
    pub const WIRE_LEN: usize = 24;

    /// Little-endian wire form: addr, key, len.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.key.to_le_bytes());
        b[16..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parses [`RemoteRegion::to_bytes`].
    ///
    /// # Errors
    /// [`Error::RemoteRegionLength`] unless `b` is exactly [`RemoteRegion::WIRE_LEN`] bytes.
    pub fn from_bytes(b: &[u8]) -> Result<RemoteRegion> {
        if b.len() != Self::WIRE_LEN {
            return Err(Error::RemoteRegionLength {
                got: b.len(),
                expected: Self::WIRE_LEN,
            });
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        Ok(RemoteRegion {
            addr: word(0),
            key: word(8),
            len: word(16),
        })
    }

    /// Checks that `[offset, offset + len)` lies inside the region and returns the address
    /// to pass to RMA calls.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] naming the region size.
    pub fn address_of(&self, op: &'static str, offset: u64, len: usize) -> Result<u64> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.addr + offset),
            _ => Err(Error::OutOfBounds {
                op,
                offset,
                len,
                region_len: self.len,
            }),
        }
    }
}
