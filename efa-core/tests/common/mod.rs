//! Shared harness of the multi-rank tests: a test binary re-runs its own `#[ignore]`d child
//! tests as the ranks of a job started by `efarun`.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs child test `name` of the current test binary as `n` ranks under `efarun` (IP route
/// pinned to `lo`, `EFA_TIMEOUT` 30 s), with extra environment; prints the job's output.
pub fn efarun(n: u32, name: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_efarun"));
    cmd.args(["-n", &n.to_string(), "--timeout", "180", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env("EFA_IFACE", "lo")
        .env("EFA_TIMEOUT", "30");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run efarun");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// True inside a rank of a job (the child tests do nothing when run on their own).
pub fn in_job() -> bool {
    std::env::var_os("EFA_RANK").is_some()
}

/// The fabric provider present on this machine (verbs in the soft-RoCE VM, efa on EC2), or
/// why there is none. Where the CI harness promises a fabric (`EFA_TEST_PROVIDER` names
/// one), its absence fails the test instead of skipping it.
pub fn fabric_present() -> Result<String, String> {
    if let Ok(p) = std::env::var("EFA_TEST_PROVIDER") {
        if p == "efa" || p.starts_with("verbs") {
            assert!(
                efa_fabric::Hints::new().provider(&p).get().is_ok(),
                "EFA_TEST_PROVIDER={p} but libfabric does not offer it"
            );
            return Ok(p);
        }
    }
    for p in ["efa", "verbs;ofi_rxm"] {
        if efa_fabric::Hints::new()
            .provider(p)
            .get()
            .is_ok_and(|v| v.iter().any(|i| i.provider() == p))
        {
            return Ok(p.to_string());
        }
    }
    Err(
        "no fabric provider (efa, verbs;ofi_rxm): no RDMA device on this host; \
         ci/test runs this test inside the soft-RoCE VM"
            .into(),
    )
}
