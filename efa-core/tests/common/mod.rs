//! Shared harness of the multi-rank tests: a test binary re-runs its own `#[ignore]`d child
//! tests as the ranks of a job started by `efarun`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `efarun` binary that the multi-rank tests start.
///
/// `efarun` is a crate of its own (`efarun/`), so `env!("CARGO_BIN_EXE_efarun")` does not
/// exist in efa-core's tests. The binary is the one cargo puts next to this test binary's
/// directory: `target/<profile>/efarun` for `target/<profile>/deps/<test>`. Under cargo
/// (`cargo test` sets `CARGO`) it is first brought up to date, once per test process, with
/// `cargo build -p efarun` for the same target directory and profile, so a test never runs
/// a launcher built from older efa-core sources (a no-op when it is current).
/// `EFA_TEST_EFARUN=PATH` names the binary instead and builds nothing.
///
/// # Panics
/// When the build fails or the binary is missing, with what to do: a test that needs
/// `efarun` fails without it, it never passes or skips silently.
pub fn efarun_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        if let Some(p) = std::env::var_os("EFA_TEST_EFARUN") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "EFA_TEST_EFARUN={} is not a file: build efarun with `cargo build -p efarun`",
                p.display()
            );
            return p;
        }
        let me = std::env::current_exe().expect("the test binary's path");
        let profile_dir = me
            .parent()
            .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
            .and_then(Path::parent)
            .unwrap_or_else(|| {
                panic!(
                    "{} is not in a cargo target directory (target/<profile>/deps): \
                     set EFA_TEST_EFARUN to an efarun binary",
                    me.display()
                )
            });
        let exe = profile_dir.join("efarun");
        if let Some(cargo) = std::env::var_os("CARGO") {
            build_efarun(Path::new(&cargo), profile_dir);
        }
        assert!(
            exe.is_file(),
            "{} is missing: build it with `cargo build -p efarun` (add --release for a \
             release test build), or set EFA_TEST_EFARUN to an efarun binary",
            exe.display()
        );
        exe
    })
}

/// `cargo build -p efarun` into `profile_dir` (`target/<profile>`); panics with cargo's
/// output if it fails.
fn build_efarun(cargo: &Path, profile_dir: &Path) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--package", "efarun", "--bin", "efarun"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => panic!("no profile in {}", profile_dir.display()),
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {} to build efarun: {e}", cargo.display()));
    assert!(
        out.status.success(),
        "`cargo build -p efarun` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs child test `name` of the current test binary as `n` ranks under `efarun` (IP route
/// pinned to `lo`, `EFA_TIMEOUT` 30 s), with extra environment; prints the job's output.
pub fn efarun(n: u32, name: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = efarun_command(n, name);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run efarun");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs child test `child` as `n` ranks on shm (the default on one host), then on IP
/// (`EFA_TRANSPORTS=ip`): each job must succeed and every rank print `<child>: done`.
pub fn run_both(n: u32, child: &str) {
    for env in [&[][..], &[("EFA_TRANSPORTS", "ip")][..]] {
        let out = efarun(n, child, env);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{child} on {env:?} failed:\n{text}");
        assert_eq!(
            text.matches(&format!("{child}: done")).count(),
            n as usize,
            "every rank of {child} on {env:?} must finish:\n{text}"
        );
    }
}

/// Prints that the running test is skipped, and why: `SKIPPED: <test>: <why>`, straight to
/// this process's stderr, past the test harness's output capture, so that the reason reaches
/// the CI log (ci/test lists every such line and counts the test as skipped, not passed).
pub fn skip_test(why: &str) {
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {why}");
}

/// Asserts that every rank of a job's output (lines `route A->B: <transport> ...`, printed by
/// the child tests) reached every other rank over `transport`.
pub fn assert_routes(text: &str, n: u32, transport: &str) {
    for a in 0..n {
        for b in (0..n).filter(|&b| b != a) {
            let line = text
                .lines()
                .find(|l| l.contains(&format!("route {a}->{b}: ")))
                .unwrap_or_else(|| panic!("rank {a} printed no route to {b}:\n{text}"));
            let got = line
                .split(&format!("route {a}->{b}: "))
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            assert_eq!(got, transport, "route {a}->{b}: {line}");
        }
    }
}

/// The command that runs child test `name` of the current test binary as `n` ranks under
/// `efarun` (IP route pinned to `lo`, `EFA_TIMEOUT` 30 s, the job killed after 180 s).
pub fn efarun_command(n: u32, name: &str) -> Command {
    let mut cmd = Command::new(efarun_exe());
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
    cmd
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

/// Message `kind` from `from` to `to`: distinct for every pair, kind and index.
pub fn pattern(from: u32, to: u32, kind: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| i ^ (from << 24) ^ (to << 16) ^ (kind << 12))
        .collect()
}

/// What `examples/p2p.rs` does, as a test: prints the route to every peer, then exchanges
/// verified messages with every other rank by blocking calls (0 B to 400 KB), non-blocking
/// calls (`Source::Any` + `wait_all`) and tokio async calls (a ring shift). Panics naming the
/// peer on any bad message.
pub fn verify_all_pairs(comm: &efa_core::Communicator) {
    use efa_core::{P2pRequest, Source, Tag};
    let (me, n) = (comm.rank(), comm.size());
    for peer in 0..n {
        let r = comm.route(peer).expect("route");
        let provider = comm.provider(r.transport).unwrap_or("?");
        println!(
            "rank {me} -> {peer}: {} via {provider} ({})",
            r.transport, r.reason
        );
    }
    for peer in (0..n).filter(|&p| p != me) {
        for (k, &len) in [0usize, 1, 1000, 100_000].iter().enumerate() {
            let k = k as u32;
            let mut got = vec![0u32; len];
            if me < peer {
                comm.send(&pattern(me, peer, k, len), peer, k).unwrap();
                comm.recv(&mut got, peer, k).unwrap();
            } else {
                comm.recv(&mut got, peer, k).unwrap();
                comm.send(&pattern(me, peer, k, len), peer, k).unwrap();
            }
            assert!(
                got == pattern(peer, me, k, len),
                "blocking: bad {len}-word message from rank {peer}"
            );
        }
    }
    let len = 10_000;
    let mut bufs: Vec<Vec<u32>> = (1..n).map(|_| vec![0u32; len]).collect();
    let outs: Vec<Vec<u32>> = (0..n).map(|peer| pattern(me, peer, 100, len)).collect();
    let mut reqs: Vec<P2pRequest<'_>> = Vec::new();
    for b in &mut bufs {
        reqs.push(comm.irecv(b, Source::Any, Tag::Is(100)).unwrap().into());
    }
    for peer in (0..n).filter(|&p| p != me) {
        reqs.push(comm.isend(&outs[peer as usize], peer, 100).unwrap().into());
    }
    let statuses = comm.wait_all(reqs).unwrap();
    for (b, st) in bufs.iter().zip(&statuses) {
        let src = st.expect("receive status").source;
        assert!(
            *b == pattern(src, me, 100, len),
            "non-blocking: bad message from {src}"
        );
    }
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let out = pattern(me, next, 200, 50_000);
        let mut got = vec![0u32; 50_000];
        let (s, r) = tokio::join!(
            comm.send_async(&out, next, 200),
            comm.recv_async(&mut got, prev, 200)
        );
        s.and(r).map(|_| got)
    });
    assert!(
        got.unwrap() == pattern(prev, me, 200, 50_000),
        "async: bad message from {prev}"
    );
    println!(
        "rank {me}: verified blocking, non-blocking and async exchanges with all {} peers",
        n - 1
    );
}
