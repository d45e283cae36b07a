//! What a user sees when `main` returns an `efa_core::Error`: std prints `Error: {err:?}`, so
//! `Debug` must carry the situation, the causes and the fix, not the variant's structure.
//!
//! This test has its own `main` (no test harness): run with `MAIN_ERROR_CASE` set, it is a
//! plain program `fn main() -> Result<(), efa_core::Error>` that fails to join a job;
//! without it, it runs itself as such a program for each case and checks its stderr.

use std::process::Command;
use std::time::Duration;

/// What the case is, its environment, what stderr must contain, and what it must not.
type Case<'a> = (
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a [&'a str],
    &'a [&'a str],
);

fn main() -> Result<(), efa_core::Error> {
    if std::env::var_os("MAIN_ERROR_CASE").is_some() {
        // The user's program: nothing but `?`.
        let comm = efa_core::Communicator::init()?;
        println!("unexpectedly joined as rank {}", comm.rank());
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("efa-main-error-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = format!("file://{}", dir.display());
    let cases: &[Case<'_>] = &[
        (
            "a rank that never joins",
            &[
                ("EFA_RANK", "1"),
                ("EFA_WORLD_SIZE", "2"),
                ("EFA_STORE", &store),
                ("EFA_TIMEOUT", "1"),
            ],
            &[
                "Error: rank 0 never joined the file store in ",
                "raise EFA_TIMEOUT",
            ],
            &["RankNeverJoined", "Bootstrap("],
        ),
        (
            "an unknown transport",
            &[
                ("EFA_RANK", "0"),
                ("EFA_WORLD_SIZE", "1"),
                ("EFA_TRANSPORTS", "shm,ucx"),
            ],
            &["Error: unknown transport `ucx` in EFA_TRANSPORTS=\"shm,ucx\"; known: shm"],
            &["UnknownTransport", "Transports("],
        ),
        (
            "a store nobody serves",
            &[
                ("EFA_RANK", "1"),
                ("EFA_WORLD_SIZE", "2"),
                ("EFA_STORE", "127.0.0.1:1"),
                ("EFA_STORE_SERVED", "1"),
                ("EFA_TIMEOUT", "1"),
            ],
            // Under efarun the store listens before any rank starts: refused means efarun
            // has exited, and the rank says so at once.
            &[
                "Error: rendezvous store failed: efarun, which serves the store at 127.0.0.1:1, refused the connection",
                "efarun has exited",
            ],
            &["ServerFailed {", "Store("],
        ),
    ];
    let mut failed = 0;
    for (what, env, want, unwanted) in cases {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env_clear().env("MAIN_ERROR_CASE", what);
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        for (k, v) in env.iter() {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run the failing program");
        let err = String::from_utf8_lossy(&out.stderr);
        println!("--- {what}: exit {:?}, stderr:\n{err}", out.status.code());
        let mut ok = out.status.code() == Some(1);
        for w in want.iter() {
            if !err.contains(w) {
                println!("    missing: {w:?}");
                ok = false;
            }
        }
        for u in unwanted.iter() {
            if err.contains(u) {
                println!("    should not show the structure: {u:?}");
                ok = false;
            }
        }
        if !ok {
            failed += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    // The structured form stays available as {:#?}.
    let e = efa_core::Error::Timeout {
        op: "recv",
        peer: Some(3),
        waited: Duration::from_secs(2),
    };
    let structured = format!("{e:#?}");
    println!("--- {{:#?}}:\n{structured}");
    if !structured.starts_with("Timeout {\n    op: \"recv\",\n    peer: Some(\n        3,") {
        failed += 1;
    }
    assert_eq!(failed, 0, "{failed} case(s) failed; see above");
    println!("main_error: {} cases passed", cases.len() + 1);
    Ok(())
}
