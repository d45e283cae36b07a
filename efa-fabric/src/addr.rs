//! Addresses: a peer's index in an address vector ([`FiAddr`]), and socket addresses in the
//! raw form IP providers use for endpoint addresses.
//!
//! A leaf module: it uses nothing of this crate, so that [`crate::av`], [`crate::info`] and
//! [`crate::error`] can name addresses without depending on each other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use efa_ffi as ffi;

/// A peer's address in an address vector (`fi_addr_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiAddr(pub u64);

impl FiAddr {
    /// `FI_ADDR_UNSPEC`: any source.
    pub const UNSPEC: FiAddr = FiAddr(ffi::FI_ADDR_UNSPEC);
}

/// Parses a `struct sockaddr_in` / `sockaddr_in6` in raw bytes (as IP providers use for
/// endpoint addresses).
pub fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([b[0], b[1]]) as i32;
    if family == libc::AF_INET && b.len() >= 8 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
        Some(SocketAddr::new(IpAddr::V4(ip), port))
    } else if family == libc::AF_INET6 && b.len() >= 24 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[8..24]);
        Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockaddr_in() {
        let mut b = vec![0u8; 16];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&4242u16.to_be_bytes());
        b[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(
            sockaddr_from_bytes(&b),
            Some("127.0.0.1:4242".parse().unwrap())
        );
        assert_eq!(sockaddr_from_bytes(&b[..6]), None);
    }

    #[test]
    fn parses_sockaddr_in6() {
        let mut b = vec![0u8; 28];
        b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&7u16.to_be_bytes());
        b[23] = 1;
        assert_eq!(sockaddr_from_bytes(&b), Some("[::1]:7".parse().unwrap()));
    }
}
