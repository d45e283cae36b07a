//! The C test suite (`tests/c/suite.c`) and the examples (`examples/c/`), compiled with
//! `cc -Wall -Wextra -Werror` against `include/efa.h` and `libefa.so`, run as real jobs:
//! under `efarun` and Open MPI's `mpirun` with 2 and 4 ranks, and once under valgrind (0
//! errors). Each rank must print its "checks passed" line; any failed check exits 1 with
//! what failed.

#[path = "../../efa-core/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// `target/<profile>/deps`, this test binary's own directory, where `cargo test` puts the
/// `libefa.so` and `libefa.a` it built for this run. (`target/<profile>/libefa.so` exists
/// only after a `cargo build`, and may be older than the source under test: a clean clone
/// running `cargo test` alone has none.)
fn lib_dir() -> PathBuf {
    let me = std::env::current_exe().expect("test binary path");
    me.parent()
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles the C suite `src` with `cc -Wall -Wextra -Werror` against the header of the
/// source tree and the `libefa.so` cargo built, with an rpath to that library's directory
/// (so it runs without `LD_LIBRARY_PATH`, as a user's program would); panics with the
/// compiler's output on any warning.
fn compile(src: &Path, name: &str) -> PathBuf {
    let lib = lib_dir();
    assert!(
        lib.join("libefa.so").is_file(),
        "{} is missing: cargo builds it with this package's library",
        lib.join("libefa.so").display()
    );
    // Built under a name of its own, then renamed over the last run's (atomic: a job of a
    // concurrent test run keeps the file it started), so nothing piles up in target/tmp.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = dir.join(name);
    let building = dir.join(format!("{name}.{}", std::process::id()));
    let mut cmd = Command::new("cc");
    cmd.args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-pedantic"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(src)
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lefa")
        .arg("-o")
        .arg(&building);
    let o = cmd.output().expect("run the compiler");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{cmd:?} failed or warned:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::rename(&building, &out).expect("rename the suite into place");
    out
}

fn suite() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| compile(&crate_dir().join("tests/c/suite.c"), "suite"))
}

fn which(p: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(p))
        .find(|f| f.is_file())
}

/// Runs `cmd` (a launcher and the suite) with a deadline, without `LD_LIBRARY_PATH`, and
/// checks that each of `n` ranks printed its line.
fn run_job(test: &str, mut cmd: Command, n: u32, timeout: Duration) -> String {
    // Not cargo's LD_LIBRARY_PATH (it holds target/<profile>/deps): a user's shell has none,
    // so the programs must find libefa.so through the rpath they were linked with (`compile`,
    // and efa.pc for the installed examples). Without it the loader would take rdma-core's
    // libefa.so (its EFA provider), or none, and every job here would fail to start.
    cmd.stdin(Stdio::null())
        .env("EFA_TIMEOUT", "60")
        .env_remove("LD_LIBRARY_PATH")
        .process_group(0);
    let out_path = std::env::temp_dir().join(format!("efa-capi-{}-{test}.out", std::process::id()));
    cmd.stdout(std::fs::File::create(&out_path).unwrap());
    cmd.stderr(std::fs::File::create(out_path.with_extension("err")).unwrap());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{test}: start {cmd:?}: {e}"));
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > timeout {
            // Kill the job's process group (the launcher and its ranks).
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(out_path.with_extension("err")).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(out_path.with_extension("err"));
    let dump = format!("---- stdout:\n{stdout}---- stderr:\n{stderr}");
    let status =
        status.unwrap_or_else(|| panic!("{test}: no result within {timeout:?}; killed\n{dump}"));
    assert!(
        status.success(),
        "{test}: {cmd:?} exited with {status}\n{dump}"
    );
    for r in 0..n {
        assert!(
            stdout.contains(&format!("efa-c-suite: rank {r} of {n}: "))
                || stdout.contains(&format!("rank {r} of {n}: ")),
            "{test}: rank {r} of {n} did not finish the suite\n{dump}"
        );
    }
    println!("{test}: {n} ranks passed ({:.1?})", t0.elapsed());
    stdout
}

fn efarun_suite(test: &str, n: u32, wrap: &[&str], timeout: Duration) {
    let mut cmd = Command::new(common::efarun_exe());
    cmd.args(["-n", &n.to_string()]).args(wrap).arg(suite());
    run_job(test, cmd, n, timeout);
}

fn mpirun_suite(test: &str, n: u32) {
    let Some(mpirun) = which("mpirun.openmpi") else {
        return common::skip_test(
            "mpirun.openmpi (Open MPI) not installed: run ci/launchers/setup.sh install",
        );
    };
    let mut cmd = Command::new(mpirun);
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        &n.to_string(),
    ])
    .arg(suite());
    run_job(test, cmd, n, Duration::from_secs(240));
}

use std::os::unix::process::CommandExt;

#[test]
fn c_suite_efarun_2() {
    efarun_suite("c_suite_efarun_2", 2, &[], Duration::from_secs(180));
}

#[test]
fn c_suite_efarun_4() {
    efarun_suite("c_suite_efarun_4", 4, &[], Duration::from_secs(240));
}

#[test]
fn c_suite_mpirun_2() {
    mpirun_suite("c_suite_mpirun_2", 2);
}

#[test]
fn c_suite_mpirun_4() {
    mpirun_suite("c_suite_mpirun_4", 4);
}

/// The suite under valgrind (memcheck) on 2 ranks: 0 errors (`--error-exitcode`), so no
/// invalid read or write, no use of uninitialised memory through the C ABI.
#[test]
fn c_suite_valgrind_2() {
    if which("valgrind").is_none() {
        return common::skip_test("valgrind not installed: ci/setup installs it");
    }
    efarun_suite(
        "c_suite_valgrind_2",
        2,
        &["valgrind", "-q", "--error-exitcode=99", "--leak-check=no"],
        Duration::from_secs(600),
    );
}

/// Installs libefa with `install.sh` into a temporary prefix, as a user would, and returns
/// `PKG_CONFIG_PATH` for it.
fn install_prefix() -> PathBuf {
    let prefix = std::env::temp_dir().join(format!("efa-capi-{}-prefix", std::process::id()));
    let o = Command::new(crate_dir().join("install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .arg("--from")
        .arg(lib_dir())
        .output()
        .expect("run install.sh");
    assert!(
        o.status.success(),
        "install.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    prefix
}

/// `pkg-config ARGS efa` against the prefix.
fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let o = Command::new("pkg-config")
        .args(args)
        .arg("efa")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .expect("run pkg-config");
    assert!(
        o.status.success(),
        "pkg-config {args:?} efa: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Builds `src` with plain `cc` (or `gfortran`) and the flags pkg-config gives for the
/// installed library; `static_lib` links libefa.a instead of libefa.so.
fn build_installed(prefix: &Path, src: &Path, out: &str, static_lib: bool) -> PathBuf {
    let exe = prefix.join(out);
    let fortran = src.extension().is_some_and(|e| e == "f90");
    let mut cmd = Command::new(if fortran { "gfortran" } else { "cc" });
    cmd.args(["-Wall", "-Wextra", "-Werror"])
        .arg(src)
        .arg("-o")
        .arg(&exe);
    if fortran {
        // -J: the module file (efa.mod) goes next to the program, not into the source tree.
        cmd.arg("-std=f2008").arg("-J").arg(prefix);
    }
    if static_lib {
        for f in pkg_config(prefix, &["--cflags", "--libs", "--static"]) {
            cmd.arg(if f == "-lefa" {
                "-l:libefa.a".to_string()
            } else {
                f
            });
        }
    } else {
        // pkg-config's flags alone, as the README says: they must make the program load
        // this libefa.so at run time (efa.pc's rpath), not rdma-core's libefa.so.
        cmd.args(pkg_config(prefix, &["--cflags", "--libs"]));
    }
    let o = cmd.output().expect("run the compiler");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{cmd:?} failed or warned:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    exe
}

/// The examples of `examples/c/`, built with plain `cc` against the installed header and
/// library (pkg-config; the allreduce also against libefa.a), run on 3 ranks under efarun;
/// the Fortran `bind(C)` example too, when gfortran is present.
#[test]
fn examples_c_and_fortran() {
    let ex = crate_dir().join("../examples/c");
    let prefix = install_prefix();
    for (src, out, line, static_lib) in [
        ("ring.c", "ring", "ring: rank", false),
        ("allreduce.c", "allreduce", "allreduce: rank", false),
        ("allreduce.c", "allreduce-static", "allreduce: rank", true),
    ] {
        let exe = build_installed(&prefix, &ex.join(src), out, static_lib);
        let mut cmd = Command::new(common::efarun_exe());
        cmd.args(["-n", "3"]).arg(&exe);
        let got = run_job(out, cmd, 0, Duration::from_secs(120));
        assert_eq!(
            got.matches(line).count(),
            3,
            "{out}: one line per rank:\n{got}"
        );
        assert!(!got.contains("WRONG"), "{out}:\n{got}");
    }
    if which("gfortran").is_none() {
        let _ = std::fs::remove_dir_all(&prefix);
        return common::skip_test(
            "the Fortran example (the C ones passed): gfortran not installed: ci/setup installs it",
        );
    }
    let exe = build_installed(&prefix, &ex.join("allreduce.f90"), "allreduce-f", false);
    let mut cmd = Command::new(common::efarun_exe());
    cmd.args(["-n", "3"]).arg(&exe);
    let got = run_job("fortran", cmd, 0, Duration::from_secs(120));
    assert_eq!(
        got.matches("fortran allreduce ok").count(),
        3,
        "fortran:\n{got}"
    );
    let _ = std::fs::remove_dir_all(&prefix);
}
