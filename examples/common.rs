//! Shared helpers for the efa-rs demos.
#![deny(missing_docs)]

use efa_fabric::{AddrFormat, Caps, Endpoint, Hints, Info};

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`). With `EFA_DEBUG` set (and
/// `RUST_LOG` unset), installs nothing: the communicator's own `EFA_DEBUG` log then shows.
pub fn init_logging() {
    if std::env::var_os("EFA_DEBUG").is_some() && std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The info for `provider`; IP providers are pinned to `lo` (or `EFA_IFACE`).
///
/// # Errors
/// When the provider is not present.
pub fn info_for(provider: &str) -> efa_fabric::Result<Info> {
    let mut hints = Hints::new()
        .provider(provider)
        .caps(Caps::MSG | Caps::TAGGED);
    if efa_fabric::is_ip_provider(provider) {
        let iface = std::env::var("EFA_IFACE").unwrap_or_else(|_| "lo".into());
        hints = hints.domain(iface).addr_format(AddrFormat::SockaddrIn);
    }
    let mut infos = hints.get()?;
    infos.retain(|i| i.provider() == provider);
    infos
        .into_iter()
        .next()
        .ok_or_else(|| no_data("fi_getinfo"))
}

/// What `fi_getinfo` says when nothing matches the hints (`FI_ENODATA`, `fi_getinfo(3)`).
fn no_data(call: &'static str) -> efa_fabric::Error {
    const FI_ENODATA: i32 = 61; // = ENODATA on Linux, fi_errno(3)
    efa_fabric::Error::Call(efa_fabric::CallError {
        call,
        code: FI_ENODATA,
        text: efa_fabric::error::strerror(FI_ENODATA),
    })
}

/// The best provider for two processes on this host: a fabric if present, else shm, else
/// TCP on loopback.
///
/// # Errors
/// When none of them is present.
pub fn best_provider() -> efa_fabric::Result<String> {
    for p in ["efa", "verbs;ofi_rxm", "shm", "tcp;ofi_rxm"] {
        if info_for(p).is_ok() {
            return Ok(p.to_string());
        }
    }
    // None of efa, verbs;ofi_rxm, shm or tcp;ofi_rxm answered.
    Err(no_data("fi_getinfo"))
}

/// Opens an endpoint on `provider`.
///
/// # Errors
/// When the provider is absent or an open call fails.
pub fn open_endpoint(provider: &str) -> efa_fabric::Result<Endpoint> {
    Endpoint::open(&info_for(provider)?)
}

/// Lower-case hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses [`to_hex`].
///
/// # Errors
/// On odd length or non-hex characters.
pub fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd-length hex address {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("bad hex {s:?}: {e}")))
        .collect()
}
