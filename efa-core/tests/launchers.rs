//! The same rank program under the launchers people use: Open MPI's `mpirun`, MPICH's Hydra
//! `mpiexec`, and Slurm's `srun`, 4 ranks each on this host, with the bootstrap's defaults
//! (no `EFA_STORE`: a single-node file store keyed by the launcher's job id).
//!
//! The rank program is the `#[ignore]`d child test of this file (this test binary re-runs
//! itself as each rank), doing what `examples/p2p.rs` does: verified blocking, non-blocking
//! and async exchanges with every peer. Each test checks that every rank detected the right
//! launcher, found the same rendezvous, and verified its exchanges.
//!
//! `ci/launchers/setup.sh install` installs the launchers. The Slurm test uses the cluster of
//! `SLURM_CONF` if it answers, else starts a private one-node cluster with
//! `ci/launchers/setup.sh start` (root only) and stops it afterwards. A launcher that is
//! missing is a skip that prints `SKIPPED` and the reason, unless `EFA_REQUIRE_LAUNCHERS=1`,
//! which makes it a failure.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use efa_core::{bootstrap, Communicator};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

mod common;

const SETUP_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ci/launchers/setup.sh");
/// Set for the ranks this file starts, so the child test does nothing otherwise.
const MARK: &str = "EFA_LAUNCHERS_TEST_RANK";
const RANKS: u32 = 4;
/// How long one job may take before the launcher and its ranks are killed.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// The ranks' output, indented so that their own `test result:` lines are not taken for
/// this binary's by scripts that count them (ci/test).
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  | {l}\n")).collect()
}

/// The rank program: bootstrap from the launcher's environment, then `examples/p2p.rs`.
#[test]
#[ignore = "rank program of the launcher tests"]
fn child_launched_rank() {
    if std::env::var_os(MARK).is_none() {
        return;
    }
    let boot = bootstrap::from_env().expect("bootstrap from the launcher's environment");
    println!(
        "rank {}: launcher {}, {} ({})",
        boot.rank(),
        boot.launcher(),
        boot.rendezvous(),
        boot.rendezvous_source()
    );
    let comm = Communicator::builder()
        .bootstrap(boot)
        .build()
        .expect("Communicator");
    common::verify_all_pairs(&comm);
}

/// The full path of `prog` on `PATH`.
fn which(prog: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Prints the skip, or fails under `EFA_REQUIRE_LAUNCHERS=1`.
fn skip(test: &str, why: &str) {
    assert!(
        std::env::var("EFA_REQUIRE_LAUNCHERS").as_deref() != Ok("1"),
        "{test}: EFA_REQUIRE_LAUNCHERS=1 but {why}"
    );
    let _ = test;
    common::skip_test(why);
}

/// Variables through which an outer job (or a test harness) would leak into the job's
/// bootstrap: every launcher's identity variables, and our own overrides.
fn is_inherited_job_var(k: &str) -> bool {
    const PREFIXES: [&str; 7] = [
        "EFA_",
        "OMPI_",
        "PMI_",
        "PMIX_",
        "MPI_LOCAL",
        "SLURM_",
        "TORCHELASTIC_",
    ];
    const NAMES: [&str; 6] = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ];
    (PREFIXES.iter().any(|p| k.starts_with(p)) && k != "SLURM_CONF") || NAMES.contains(&k)
}

/// Runs `launcher args... <this test binary> <child test>`, bounded by [`JOB_TIMEOUT`], and
/// checks the job. Returns the ranks' standard output.
fn run_job(
    test: &str,
    launcher: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
    want_launcher: &str,
) -> String {
    let t0 = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let dir = std::env::temp_dir().join(format!("efa-launchers-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut cmd = Command::new(launcher);
    cmd.args(args)
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "child_launched_rank",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        // Its own process group, so a timeout kills the launcher and the ranks it forked.
        .process_group(0);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(is_inherited_job_var) {
            cmd.env_remove(k);
        }
    }
    cmd.env(MARK, "1")
        .env("EFA_TIMEOUT", "60")
        .envs(env.iter().copied());
    let mut child = cmd.spawn().expect("start the launcher");
    let pgid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + JOB_TIMEOUT;
    let status: Option<ExitStatus> = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            // TERM first: mpirun, mpiexec and srun pass it on to the ranks.
            let _ = killpg(pgid, Signal::SIGTERM);
            std::thread::sleep(Duration::from_secs(3));
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Ranks the launcher left behind in its process group, if any.
    let _ = killpg(pgid, Signal::SIGKILL);
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    // The per-job file stores are not removed by the ranks (none knows the others are done).
    let stores: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split("file store in ").nth(1))
        .filter_map(|s| s.split(' ').next())
        .collect();
    for s in &stores {
        if s.starts_with("/tmp/efa-store-") {
            let _ = std::fs::remove_dir_all(s);
        }
    }
    let dump = format!(
        "---- stdout:\n{}---- stderr:\n{}",
        indent(&stdout),
        indent(&stderr)
    );
    let Some(status) = status else {
        panic!("{test}: the job did not finish within {JOB_TIMEOUT:?}; killed\n{dump}");
    };
    assert!(
        status.success(),
        "{test}: {} exited with {status}\n{dump}",
        launcher.display()
    );
    for rank in 0..RANKS {
        let line = stdout
            .lines()
            .find_map(|l| {
                l.find(&format!("rank {rank}: launcher "))
                    .map(|at| &l[at..])
            })
            .unwrap_or_else(|| panic!("{test}: rank {rank} printed no bootstrap line\n{dump}"));
        assert!(
            line.contains(&format!(
                "launcher {want_launcher}, file store in /tmp/efa-store-"
            )),
            "{test}: rank {rank}: expected launcher {want_launcher} with a file store: {line:?}"
        );
        assert!(
            stdout.contains(&format!(
                "rank {rank}: verified blocking, non-blocking and async exchanges with all {} peers",
                RANKS - 1
            )),
            "{test}: rank {rank} did not verify its exchanges\n{dump}"
        );
        for peer in 0..RANKS {
            assert!(
                stdout.contains(&format!("rank {rank} -> {peer}: shm via shm (")),
                "{test}: rank {rank} -> {peer} should use shm on one host\n{dump}"
            );
        }
    }
    assert_eq!(stores.len(), RANKS as usize, "{dump}");
    assert!(
        stores.iter().all(|s| *s == stores[0]),
        "{test}: the ranks chose different stores: {stores:?}"
    );
    println!(
        "{test}: {RANKS} ranks verified under {want_launcher}, rendezvous {} ({:.1?})",
        stores[0],
        t0.elapsed()
    );
    stdout
}

#[test]
fn open_mpi_mpirun_four_ranks() {
    let test = "open_mpi_mpirun_four_ranks";
    let Some(mpirun) = which("mpirun.openmpi") else {
        return skip(
            test,
            "mpirun.openmpi (Open MPI) not installed: run ci/launchers/setup.sh install",
        );
    };
    let n = RANKS.to_string();
    // As root, Open MPI refuses to start without --allow-run-as-root; CI machines have
    // fewer cores than ranks, hence --oversubscribe.
    run_job(
        test,
        &mpirun,
        &["--allow-run-as-root", "--oversubscribe", "-n", &n],
        &[],
        "Open MPI",
    );
}

#[test]
fn mpich_hydra_mpiexec_four_ranks() {
    let test = "mpich_hydra_mpiexec_four_ranks";
    let Some(mpiexec) = which("mpiexec.hydra") else {
        return skip(
            test,
            "mpiexec.hydra (MPICH) not installed: run ci/launchers/setup.sh install",
        );
    };
    run_job(
        test,
        &mpiexec,
        &["-n", &RANKS.to_string()],
        &[],
        "MPICH Hydra",
    );
}

/// A private one-node Slurm cluster, stopped on drop.
struct Slurm {
    dir: PathBuf,
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new(SETUP_SH).arg("stop").arg(&self.dir).status();
    }
}

#[test]
fn slurm_srun_four_ranks() {
    let test = "slurm_srun_four_ranks";
    let Some(srun) = which("srun") else {
        return skip(
            test,
            "srun (Slurm) not installed: run ci/launchers/setup.sh install",
        );
    };
    let existing = std::env::var_os("SLURM_CONF").is_some()
        && Command::new("scontrol")
            .arg("ping")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("UP"));
    let mut cluster = None;
    if !existing {
        if which("slurmctld").is_none() || which("slurmd").is_none() {
            return skip(test, "no Slurm cluster answers (SLURM_CONF) and slurmctld/slurmd are not installed to start one: run ci/launchers/setup.sh install");
        }
        let dir = std::env::temp_dir().join(format!("efa-slurm-{}", std::process::id()));
        let out = Command::new(SETUP_SH)
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run ci/launchers/setup.sh");
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster = Some(Slurm { dir });
        match out.status.code() {
            Some(0) => print!("{msg}"),
            // 2: this machine cannot (not root); 1 is a failure to investigate.
            Some(2) => {
                return skip(
                    test,
                    &format!("cannot start a private Slurm cluster: {}", msg.trim()),
                )
            }
            _ => panic!("ci/launchers/setup.sh start failed:\n{msg}"),
        }
    }
    let conf = cluster.as_ref().map(|c| c.dir.join("slurm.conf"));
    let env: Vec<(&str, &OsStr)> = conf.iter().map(|c| ("SLURM_CONF", c.as_os_str())).collect();
    // --overcommit: 4 tasks on a node that may have fewer CPUs; -t: minutes, a backstop.
    run_job(
        test,
        &srun,
        &["--overcommit", "-t", "5", "-n", &RANKS.to_string()],
        &env,
        "Slurm srun",
    );
}
