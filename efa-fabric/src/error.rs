//! Errors from libfabric calls and completions.

use std::ffi::CStr;
use std::fmt;
use std::time::Duration;

use efa_ffi as ffi;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed libfabric call: the call's name, its `FI_E*` code and `fi_strerror` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The libfabric function that failed, e.g. `fi_endpoint`.
    pub call: &'static str,
    /// Positive `FI_E*` / errno code (libfabric returns it negated).
    pub code: i32,
    /// `fi_strerror(code)`.
    pub text: String,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {} (-{})", self.call, self.text, self.code)
    }
}

impl std::error::Error for CallError {}

/// A completion that finished with an error (`fi_cq_readerr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionError {
    /// Positive `FI_E*` code of the failure.
    pub code: i32,
    /// `fi_strerror(code)`.
    pub text: String,
    /// Provider-specific errno.
    pub prov_errno: i32,
    /// `fi_cq_strerror` text for `prov_errno`.
    pub prov_text: String,
    /// Completion flags (`FI_SEND`, `FI_RECV`, `FI_RMA`, ...).
    pub flags: u64,
    /// Bytes transferred before the failure.
    pub len: usize,
    /// Bytes that did not fit (for truncation).
    pub olen: usize,
    /// Tag of the failed operation, for tagged receives.
    pub tag: u64,
}

impl fmt::Display for CompletionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "completion error: {} (-{}); provider errno {}: {}",
            self.text, self.code, self.prov_errno, self.prov_text
        )
    }
}

impl std::error::Error for CompletionError {}

/// Every error that `efa-fabric` returns.
///
/// `Debug` (`{:?}`, what `fn main() -> efa_fabric::Result<()>` prints) is the message
/// followed by any cause it does not already include; `{:#?}` is the structured form.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A libfabric call returned an error code. Check the call and code; `fi_strerror` text is
    /// included.
    #[error(transparent)]
    Call(#[from] CallError),
    /// An operation completed with an error. The peer may have gone away, or the provider
    /// rejected the transfer; `prov_text` says why.
    #[error(transparent)]
    Completion(#[from] CompletionError),
    /// A message was larger than the receive buffer. The first `buffer_len` bytes were
    /// delivered; post a larger buffer (or exchange sizes first) to receive it whole.
    #[error("message truncated: {} arrived for a {buffer_len}-byte receive buffer", match message_len { Some(n) => format!("{n} bytes"), None => "a larger message".to_string() })]
    Truncated {
        /// Capacity of the posted receive buffer.
        buffer_len: usize,
        /// Full length of the message, when the provider reports it (`olen`); shm and
        /// ofi_rxm in libfabric 1.17 do not.
        message_len: Option<usize>,
    },
    /// Memory registration failed and the locked-memory limit (`ulimit -l`) is the likely
    /// cause. Raise the limit (`ulimit -l unlimited`, or `memlock` in
    /// `/etc/security/limits.conf`, or `LimitMEMLOCK=infinity` for systemd services).
    #[error(
        "{op} ({requested} bytes) failed ({source}); the locked-memory limit \
         RLIMIT_MEMLOCK is {limit} (ulimit -l {limit_kib}): raise it, e.g. `ulimit -l unlimited`"
    )]
    MemlockLimit {
        /// What failed: memory registration, or opening a domain or endpoint (which register
        /// internal buffers on providers that pin memory).
        op: &'static str,
        /// Bytes we tried to register (0 when the provider registers internally).
        requested: usize,
        /// Soft RLIMIT_MEMLOCK in bytes.
        limit: u64,
        /// The same limit in KiB, as `ulimit -l` prints it.
        limit_kib: u64,
        /// The registration call's error.
        source: CallError,
    },
    /// The operation did not complete within its deadline. It was cancelled (where the
    /// provider supports cancelling) before this error was returned.
    #[error("{op} did not complete within {waited:?}")]
    Timeout {
        /// What timed out, e.g. `send`, `recv`, `write`.
        op: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// A post to a peer that the endpoint's [`crate::PeerCheck`] reports gone: it stopped
    /// retrying on the full queue at once. Nothing was posted.
    #[error("{op} not posted: the peer is gone (its queue will never drain)")]
    PeerGone {
        /// What was posted, e.g. `send`, `inject`.
        op: &'static str,
    },
    /// An RMA access outside the remote region. Nothing was transferred.
    #[error(
        "RMA {op} of {len} bytes at offset {offset} is outside the remote region of {region_len} bytes"
    )]
    OutOfBounds {
        /// `read` or `write`.
        op: &'static str,
        /// Requested offset into the remote region.
        offset: u64,
        /// Requested length.
        len: usize,
        /// Size of the remote region.
        region_len: u64,
    },
    /// Registration: the provider uses raw memory-region keys (`FI_MR_RAW`, a key longer
    /// than 8 bytes, or `fi_mr_key` answering `FI_KEY_NOTAVAIL`), which this crate's RMA
    /// does not carry (`fi_mr(3)`, "FI_MR_RAW"). `key_size` is the provider's
    /// `mr_key_size` in bytes. Use another provider for RMA.
    #[error("provider {provider} uses raw memory-region keys (FI_MR_RAW, mr_key_size {key_size} bytes), which RMA here does not support; choose another provider for RMA")]
    RawMrKey {
        /// Provider name.
        provider: String,
        /// The provider's `mr_key_size`, in bytes.
        key_size: usize,
    },
    /// Registration: remote write access (`FI_REMOTE_WRITE`) was asked for memory reached
    /// through a shared reference or a type that hands out references to its bytes
    /// (`&[T]`, [`crate::RegisteredBuf`]). Peers' writes would change bytes that safe code
    /// reads through `&[T]`, a data race. Nothing was registered. Register memory peers may
    /// write as a [`crate::TargetBuf`] (copy-in/copy-out) or through an owned or `&mut`
    /// buffer in a [`crate::MemoryRegion`].
    #[error("remote write access refused for {what}: peers' writes would race with references to its bytes; use a TargetBuf or a MemoryRegion over owned or &mut memory")]
    SharedRemoteWrite {
        /// What was being registered, e.g. `RegisteredBuf`, `MemoryRegion<&[T]>`.
        what: &'static str,
    },
    /// A message longer than the endpoint allows for this kind of post: `max_msg_size` for
    /// every post (split the message), `inject_size` for `inject*` (use a regular send, which
    /// has no such limit below `max_msg_size`). Nothing was posted.
    #[error(
        "{op} of {len} bytes exceeds the provider's {limit} of {max} bytes; {}",
        if *limit == SizeLimit::Inject { "use a regular send for messages of this size" } else { "split the message" }
    )]
    MessageTooLarge {
        /// What was posted, e.g. `send`, `inject`, `write`.
        op: &'static str,
        /// The message length, in bytes.
        len: usize,
        /// The endpoint's limit, in bytes.
        max: usize,
        /// Which limit.
        limit: SizeLimit,
    },
    /// A post to an address that is not in the endpoint's address vector (never inserted,
    /// or removed). libfabric's behaviour for such addresses is undefined, so nothing was
    /// posted. Insert the peer's address with [`crate::AddressVector::insert`] first.
    #[error(
        "{op}: peer address {} is not in this endpoint's address vector; insert the peer's \
         address first (AddressVector::insert)",
        addr.0
    )]
    UnknownPeer {
        /// What was posted.
        op: &'static str,
        /// The address given.
        addr: crate::addr::FiAddr,
    },
    /// [`crate::AddressVector::insert`] got an address that the provider could not insert:
    /// empty (`len` 0), or not in the provider's address format (from another provider, or
    /// cut short). Nothing was inserted. Exchange addresses from [`crate::Endpoint::name`]
    /// of endpoints of the same provider.
    #[error(
        "{}; pass the whole address from Endpoint::name of an endpoint of the same provider",
        if *len == 0 { "an empty endpoint address cannot be inserted".to_string() } else { format!("the provider could not insert the {len}-byte address {head:02x?}") }
    )]
    BadAddress {
        /// The address's length in bytes.
        len: usize,
        /// Its first bytes (at most 32).
        head: Vec<u8>,
    },
    /// [`crate::RemoteRegion::from_bytes`] got a descriptor of the wrong length: it was not
    /// made by [`crate::RemoteRegion::to_bytes`] of this version, or was cut short.
    #[error(
        "remote region descriptor is {got} bytes, expected {expected}; pass exactly what \
         RemoteRegion::to_bytes produced"
    )]
    RemoteRegionLength {
        /// Bytes given.
        got: usize,
        /// [`crate::RemoteRegion::WIRE_LEN`].
        expected: usize,
    },
    /// A string hint for `fi_getinfo` ([`crate::Hints`]) contains a NUL byte, which C
    /// strings cannot carry. Nothing was asked of libfabric.
    #[error("the {field} hint {value:?} contains a NUL byte; names passed to libfabric cannot")]
    InvalidHint {
        /// Which hint: `provider`, `fabric`, `domain`, `node` or `service`.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// The provider requires memory to be registered through an endpoint
    /// (`FI_MR_ENDPOINT`, see `fi_mr(3)`) and none was given. Pass `Some(endpoint)`.
    #[error(
        "provider {provider} requires FI_MR_ENDPOINT: register memory through an endpoint \
         (pass Some(endpoint))"
    )]
    EndpointRequired {
        /// The provider's name.
        provider: String,
    },
    /// [`crate::Counter::wait`]: the counter's error count rose while waiting, so an
    /// operation it counts failed (and the awaited value may never be reached). Read the
    /// completion queue's error entry (`fi_cq_readerr`) for which and why.
    #[error(
        "an operation counted by this counter failed (error count {errors}, value {value}, \
         waiting for {threshold}); the completion queue's error entry says which and why"
    )]
    CounterFailed {
        /// The counter's value when the failure was seen.
        value: u64,
        /// The value waited for.
        threshold: u64,
        /// The counter's error count (`fi_cntr_readerr`).
        errors: u64,
    },
    /// The shared-memory region of a new `shm` endpoint is not private to this user: not a
    /// regular file, owned by another uid (someone created a file with the endpoint's name
    /// first), or its mode could not be narrowed to 0600. The endpoint was closed. See
    /// [`crate::shm`].
    #[error("shm region {}: {problem}", path.display())]
    ShmRegion {
        /// The region's file, e.g. `/dev/shm/efa-4242-...`.
        path: std::path::PathBuf,
        /// What is wrong with it; its source is the failed system call, if one failed.
        #[source]
        problem: ShmProblem,
    },
}

/// Which size limit of an endpoint a post exceeded ([`Error::MessageTooLarge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeLimit {
    /// `max_msg_size` (`fi_endpoint(3)`), the limit of every post.
    MaxMsg,
    /// `inject_size`, the limit of `fi_inject` and its variants.
    Inject,
}

impl fmt::Display for SizeLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SizeLimit::MaxMsg => "max_msg_size",
            SizeLimit::Inject => "inject_size",
        })
    }
}

/// What is wrong with an shm endpoint's region file ([`Error::ShmRegion`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmProblem {
    /// It could not be examined (`lstat` failed).
    #[error("cannot stat it")]
    Stat(#[source] std::io::Error),
    /// It is not a regular file (a symlink, directory, ...).
    #[error("not a regular file ({file_type})")]
    NotAFile {
        /// What it is, as `std::fs::FileType`'s `Debug` shows it.
        file_type: String,
    },
    /// Another user owns it: someone created a file with this endpoint's name first.
    #[error(
        "owned by uid {owner}, not by this process's uid {me}: another user created a file \
         with this endpoint's name"
    )]
    ForeignOwner {
        /// The file's owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Its mode gives group or others access, and narrowing it to 0600 failed.
    #[error("mode {mode:o} and chmod 0600 failed")]
    Chmod {
        /// The mode it has (permission bits).
        mode: u32,
        /// The `chmod` error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The positive `FI_E*` code behind this error, if it came from libfabric.
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Call(e) => Some(e.code),
            Error::Completion(e) => Some(e.code),
            Error::MemlockLimit { source, .. } => Some(source.code),
            Error::Truncated { .. } => Some(ffi::FI_ETRUNC as i32),
            _ => None,
        }
    }

    /// True for `FI_EAGAIN`: retry after progressing the completion queues.
    pub fn is_again(&self) -> bool {
        self.code() == Some(ffi::FI_EAGAIN as i32)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !f.alternate() {
            let shown = self.to_string();
            f.write_str(&shown)?;
            let mut next = std::error::Error::source(self);
            let mut first = true;
            while let Some(cause) = next {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    if first {
                        f.write_str("\n\nCaused by:")?;
                        first = false;
                    }
                    write!(f, "\n    {text}")?;
                }
                next = cause.source();
            }
            return Ok(());
        }
        match self {
            Error::Call(e) => f.debug_tuple("Call").field(e).finish(),
            Error::Completion(e) => f.debug_tuple("Completion").field(e).finish(),
            Error::Truncated {
                buffer_len,
                message_len,
            } => f
                .debug_struct("Truncated")
                .field("buffer_len", buffer_len)
                .field("message_len", message_len)
                .finish(),
            Error::MemlockLimit {
                op,
                requested,
                limit,
                limit_kib,
                source,
            } => f
                .debug_struct("MemlockLimit")
                .field("op", op)
                .field("requested", requested)
                .field("limit", limit)
                .field("limit_kib", limit_kib)
                .field("source", source)
                .finish(),
            Error::Timeout { op, waited } => f
                .debug_struct("Timeout")
                .field("op", op)
                .field("waited", waited)
                .finish(),
            Error::PeerGone { op } => f.debug_struct("PeerGone").field("op", op).finish(),
            Error::OutOfBounds {
                op,
                offset,
                len,
                region_len,
            } => f
                .debug_struct("OutOfBounds")
                .field("op", op)
                .field("offset", offset)
                .field("len", len)
                .field("region_len", region_len)
                .finish(),
            Error::SharedRemoteWrite { what } => f
                .debug_struct("SharedRemoteWrite")
                .field("what", what)
                .finish(),
            Error::RawMrKey { provider, key_size } => f
                .debug_struct("RawMrKey")
                .field("provider", provider)
                .field("key_size", key_size)
                .finish(),
            Error::MessageTooLarge {
                op,
                len,
                max,
                limit,
            } => f
                .debug_struct("MessageTooLarge")
                .field("op", op)
                .field("len", len)
                .field("max", max)
                .field("limit", limit)
                .finish(),
            Error::UnknownPeer { op, addr } => f
                .debug_struct("UnknownPeer")
                .field("op", op)
                .field("addr", addr)
                .finish(),
            Error::BadAddress { len, head } => f
                .debug_struct("BadAddress")
                .field("len", len)
                .field("head", head)
                .finish(),
            Error::RemoteRegionLength { got, expected } => f
                .debug_struct("RemoteRegionLength")
                .field("got", got)
                .field("expected", expected)
                .finish(),
            Error::InvalidHint { field, value } => f
                .debug_struct("InvalidHint")
                .field("field", field)
                .field("value", value)
                .finish(),
            Error::EndpointRequired { provider } => f
                .debug_struct("EndpointRequired")
                .field("provider", provider)
                .finish(),
            Error::CounterFailed {
                value,
                threshold,
                errors,
            } => f
                .debug_struct("CounterFailed")
                .field("value", value)
                .field("threshold", threshold)
                .field("errors", errors)
                .finish(),
            Error::ShmRegion { path, problem } => f
                .debug_struct("ShmRegion")
                .field("path", path)
                .field("problem", problem)
                .finish(),
        }
    }
}

/// [`Error::MessageTooLarge`] when `len` exceeds `max` (the endpoint's `limit`).
pub(crate) fn check_len(op: &'static str, len: usize, max: usize, limit: SizeLimit) -> Result<()> {
    if len > max {
        return Err(Error::MessageTooLarge {
            op,
            len,
            max,
            limit,
        });
    }
    Ok(())
}

/// `fi_strerror` for a positive or negative code.
pub fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror accepts any int and returns a pointer to a static NUL-terminated
    // string (or to a thread-local buffer for unknown codes), valid until the next call on this
    // thread; we copy it out immediately.
    unsafe {
        let p = ffi::fi_strerror(code.abs());
        if p.is_null() {
            return format!("error {code}");
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// Turns a libfabric return value (0 or positive on success, `-FI_E*` on failure) into a
/// `Result`, naming the call.
pub(crate) fn check(call: &'static str, ret: isize) -> Result<usize, CallError> {
    if ret >= 0 {
        Ok(ret as usize)
    } else {
        let code = (-ret) as i32;
        Err(CallError {
            call,
            code,
            text: strerror(code),
        })
    }
}

/// [`check`] for the `int`-returning calls.
pub(crate) fn check_int(call: &'static str, ret: i32) -> Result<(), CallError> {
    check(call, ret as isize).map(|_| ())
}

/// The current soft `RLIMIT_MEMLOCK` in bytes (`u64::MAX` for unlimited).
pub fn memlock_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid `lim` we pass; RLIMIT_MEMLOCK is a valid resource.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if ret != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        lim.rlim_cur
    }
}

/// Classifies a failed registration: when the locked-memory limit is finite, a registration
/// failure is reported as [`Error::MemlockLimit`] (naming the limit and its value), because
/// that is by far the most common cause; otherwise the call error is returned as is.
pub(crate) fn registration_error(requested: usize, err: CallError, limit: u64) -> Error {
    memlock_error("memory registration", requested, err, limit)
}

/// [`registration_error`] for any call that registers memory internally; `op` names it.
pub(crate) fn memlock_error(
    op: &'static str,
    requested: usize,
    err: CallError,
    limit: u64,
) -> Error {
    let memlock_related = [
        libc::ENOMEM,
        libc::EPERM,
        libc::EFAULT,
        libc::EAGAIN,
        libc::EINVAL,
    ]
    .contains(&err.code)
        || err.code == ffi::FI_ENOMEM as i32;
    if limit != u64::MAX && memlock_related {
        Error::MemlockLimit {
            op,
            requested,
            limit,
            limit_kib: limit / 1024,
            source: err,
        }
    } else {
        Error::Call(err)
    }
}

/// Errors of calls that may register memory internally (opening domains and endpoints on
/// providers that pin memory): out-of-memory under a finite memlock limit names the limit.
pub(crate) fn open_error(op: &'static str, err: CallError) -> Error {
    let limit = memlock_limit();
    if limit != u64::MAX && [libc::ENOMEM, libc::EAGAIN, libc::EPERM].contains(&err.code) {
        memlock_error(op, 0, err, limit)
    } else {
        Error::Call(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_readable_and_alternate_structured() {
        let e = Error::Call(CallError {
            call: "fi_endpoint",
            code: 12,
            text: "Cannot allocate memory".into(),
        });
        assert_eq!(
            format!("{e:?}"),
            "fi_endpoint failed: Cannot allocate memory (-12)"
        );
        assert_eq!(
            format!("{e:#?}"),
            "Call(\n    CallError {\n        call: \"fi_endpoint\",\n        code: 12,\n        \
             text: \"Cannot allocate memory\",\n    },\n)"
        );
        let e = Error::Timeout {
            op: "send",
            waited: Duration::from_secs(1),
        };
        assert_eq!(format!("{e:?}"), "send did not complete within 1s");
        assert!(format!("{e:#?}").starts_with("Timeout {\n    op: \"send\","));
    }

    fn call_err(code: i32) -> CallError {
        CallError {
            call: "fi_mr_reg",
            code,
            text: strerror(code),
        }
    }

    #[test]
    fn check_maps_negative_codes() {
        assert_eq!(check("fi_x", 5).unwrap(), 5);
        let e = check("fi_x", -(ffi::FI_EAGAIN as isize)).unwrap_err();
        assert_eq!(e.code, ffi::FI_EAGAIN as i32);
        assert_eq!(e.call, "fi_x");
        assert!(e.to_string().starts_with("fi_x failed: "), "{e}");
        assert!(Error::from(e).is_again());
    }

    #[test]
    fn registration_error_names_the_memlock_limit() {
        let e = registration_error(1 << 20, call_err(libc::ENOMEM), 64 * 1024);
        let text = e.to_string();
        assert!(matches!(e, Error::MemlockLimit { limit: 65536, .. }));
        assert!(text.contains("RLIMIT_MEMLOCK is 65536"), "{text}");
        assert!(text.contains("ulimit -l 64"), "{text}");
    }

    #[test]
    fn registration_error_with_unlimited_memlock_is_plain() {
        let e = registration_error(1 << 20, call_err(libc::ENOMEM), u64::MAX);
        assert!(matches!(e, Error::Call(_)));
    }

    /// `max_msg_size` is 2^64 - 1 on every provider of the host, so no real buffer can
    /// exceed it: the rule is checked here.
    #[test]
    fn above_the_limit_is_message_too_large_with_both_sizes() {
        assert!(check_len("send", 10, 10, SizeLimit::MaxMsg).is_ok());
        let e = check_len("send", 11, 10, SizeLimit::MaxMsg).unwrap_err();
        assert!(
            matches!(
                e,
                Error::MessageTooLarge {
                    op: "send",
                    len: 11,
                    max: 10,
                    limit: SizeLimit::MaxMsg
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "send of 11 bytes exceeds the provider's max_msg_size of 10 bytes; split the message"
        );
    }

    #[test]
    fn truncation_gives_both_sizes() {
        let e = Error::Truncated {
            buffer_len: 10,
            message_len: Some(20),
        };
        assert_eq!(e.code(), Some(ffi::FI_ETRUNC as i32));
        let s = e.to_string();
        assert!(s.contains("20 bytes") && s.contains("10-byte"), "{s}");
    }
}
