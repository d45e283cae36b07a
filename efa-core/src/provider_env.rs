//! Defaults for libfabric provider parameters that only an environment variable can set.
//!
//! libfabric reads its providers' parameters (`fi_info -e` lists them) from the
//! environment once, when it is first initialised in the process (the first `fi_getinfo`).
//! [`apply`] runs before the communicator's first `fi_getinfo` and sets each variable of
//! [`DEFAULTS`] that the environment does not already have, so the user's value always wins.
//! A process that used libfabric before building its first communicator keeps libfabric's
//! own defaults. Child processes inherit the variables.
//!
//! Measured with `efa-bench rss` (2 ranks on one host, release build, libfabric 1.17; see
//! the README's "Memory per rank"): `ofi_rxm` over `tcp` shares one receive context among
//! all connections by default and posts 4096 bounce buffers of 16 KiB into it when the IP
//! endpoint opens: 64 MiB of the 86 MiB that an idle rank held, even in a job whose peers
//! are all reached over shm. Without the shared context (`FI_OFI_RXM_USE_SRX=0`, which
//! libfabric documents as the lower-latency mode) receive buffers come per connection, only
//! for peers actually reached over IP: an idle rank holds 18 MiB.

/// (variable, value) pairs set when absent.
pub(crate) const DEFAULTS: &[(&str, &str)] = &[
    // ofi_rxm: a receive context per connection instead of one shared context with 4096
    // pre-posted 16 KiB buffers (64 MiB per process, touched at endpoint open).
    ("FI_OFI_RXM_USE_SRX", "0"),
];

/// Sets the [`DEFAULTS`] that the environment lacks, once per process.
pub(crate) fn apply() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (var, value) in DEFAULTS {
            if std::env::var_os(var).is_none() {
                std::env::set_var(var, value);
                tracing::debug!(var, value, "libfabric provider parameter defaulted");
            }
        }
    });
}
