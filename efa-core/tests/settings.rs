//! `EFA_*` settings in real jobs under `efarun`.
//!
//! `EFA_DEBUG`: a program that installs no subscriber prints the library's log with the rank,
//! to stderr or to `EFA_DEBUG_FILE`; without the variable it prints none; an application's
//! own subscriber wins.
//!
//! Every other variable: a bad value is an `Error::Setting` (or `Error::Transports`) naming
//! the variable, the value and the accepted forms, before anything waits.

mod common;

use std::process::Output;

use common::in_job;
use efa_core::{Communicator, Error, SettingSource, Source, Tag};

/// Runs child test `name` as `n` ranks under `efarun` with exactly the `EFA_DEBUG*` variables
/// given (the test's own environment's are removed).
fn job(n: u32, name: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = common::efarun_command(n, name);
    cmd.env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("EFA_DEBUG")
            || k.starts_with("EFA_COLL_")
            || ["EFA_TRANSPORTS", "EFA_FABRIC_ADDR", "EFA_ALLREDUCE_ALGO"].contains(&&*k)
        {
            cmd.env_remove(&*k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run efarun");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The job's debug lines (ours, not efarun's or the test harness's).
fn debug_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.contains("[efa rank ")).collect()
}

/// Child: builds a communicator and exchanges one message with the next rank; installs no
/// subscriber.
#[test]
#[ignore]
fn child_ring() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let (me, n) = (comm.rank(), comm.size());
    let mine = [me; 4];
    let req = comm.isend(&mine, (me + 1) % n, 5).unwrap();
    let mut got = [0u32; 4];
    comm.recv(&mut got, Source::Any, Tag::Is(5)).unwrap();
    req.wait().unwrap();
    assert_eq!(got, [(me + n - 1) % n; 4]);
    println!("rank {me}: ring ok");
}

/// Every rank's stderr carries its route lines, prefixed with its own rank.
fn assert_routes_with_rank(text: &str, n: u32) {
    let lines = debug_lines(text);
    for r in 0..n {
        // efarun prefixes each rank's output with `[r] `; our prefix must agree with it.
        let mine: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("[{r}] [efa rank {r} ")))
            .collect();
        for peer in 0..n {
            assert!(
                mine.iter()
                    .any(|l| l.contains(" route ") && l.contains(&format!("peer={peer} "))),
                "rank {r}: no route line for peer {peer} in:\n{}",
                mine.iter().map(|l| **l).collect::<Vec<_>>().join("\n")
            );
        }
        assert!(
            mine.iter().any(|l| l.contains("bootstrap")),
            "rank {r}: no bootstrap line"
        );
        assert!(
            mine.iter().any(|l| l.contains("endpoint open")),
            "rank {r}: no provider line"
        );
    }
    // No line carries another rank's prefix.
    for l in &lines {
        let efarun_rank = l.trim_start_matches('[').split(']').next().unwrap();
        assert!(
            l.contains(&format!("[efa rank {efarun_rank} ")),
            "rank mismatch: {l}"
        );
    }
}

#[test]
fn efa_debug_debug_shows_routes_with_rank() {
    let out = job(3, "child_ring", &[("EFA_DEBUG", "debug")]);
    assert!(out.status.success());
    assert_routes_with_rank(&stderr(&out), 3);
}

#[test]
fn without_efa_debug_nothing_is_logged() {
    let out = job(2, "child_ring", &[]);
    assert!(out.status.success());
    let text = stderr(&out);
    assert!(
        debug_lines(&text).is_empty(),
        "debug lines without EFA_DEBUG:\n{text}"
    );
    assert!(!text.contains("route"), "{text}");
}

#[test]
fn efa_debug_info_shows_bootstrap_but_not_routes() {
    let out = job(2, "child_ring", &[("EFA_DEBUG", "INFO")]);
    assert!(out.status.success());
    let text = stderr(&out);
    let lines = debug_lines(&text);
    for r in 0..2 {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("[{r}] [efa rank {r} "))
                    && l.contains("communicator ready")),
            "rank {r}: no ready line:\n{text}"
        );
    }
    assert!(!lines.iter().any(|l| l.contains(" route ")), "{text}");
}

#[test]
fn efa_debug_subsys_filters() {
    let out = job(
        2,
        "child_ring",
        &[("EFA_DEBUG", "debug"), ("EFA_DEBUG_SUBSYS", "bootstrap")],
    );
    assert!(out.status.success());
    let text = stderr(&out);
    let lines = debug_lines(&text);
    assert!(
        lines.iter().any(|l| l.contains("efa_core::bootstrap")),
        "{text}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("efa_core::comm") || l.contains("efa_fabric")),
        "{text}"
    );
}

/// Child: one allreduce below the ring threshold (16 B) and one above it (1 MiB of f32).
#[test]
#[ignore]
fn child_allreduce_two_sizes() {
    if !in_job() {
        return;
    }
    let comm = Communicator::init().unwrap();
    let n = comm.size() as f32;
    for len in [4usize, 1 << 18] {
        let mut v = vec![1.0f32; len];
        comm.allreduce(&mut v, efa_core::ReduceOp::Sum).unwrap();
        assert!(v.iter().all(|&x| x == n));
    }
}

/// The allreduce algorithm chosen for each call is logged at debug level under `coll`, with
/// the size and the configured algorithm; `EFA_ALLREDUCE_ALGO` shows in both.
#[test]
fn efa_debug_coll_logs_the_allreduce_algorithm() {
    let algos = |env: &[(&str, &str)]| -> Vec<String> {
        let out = job(2, "child_allreduce_two_sizes", env);
        assert!(out.status.success());
        let text = stderr(&out);
        let lines = debug_lines(&text);
        assert!(
            !lines.iter().any(|l| l.contains("efa_core::comm")),
            "EFA_DEBUG_SUBSYS=coll let comm through:\n{text}"
        );
        lines
            .iter()
            .filter(|l| l.starts_with("[0] ") && l.contains("allreduce algorithm"))
            .map(|l| {
                let a = l.split("algorithm=").nth(1).unwrap_or("");
                let b = l.split("bytes=").nth(1).unwrap_or("");
                format!(
                    "{} {}",
                    b.split_whitespace().next().unwrap_or(""),
                    a.split_whitespace().next().unwrap_or("")
                )
            })
            .collect()
    };
    let base = [("EFA_DEBUG", "debug"), ("EFA_DEBUG_SUBSYS", "coll")];
    assert_eq!(
        algos(&base),
        ["16 RecursiveDoubling", "1048576 Ring"],
        "auto: recursive doubling below the ring threshold, ring above"
    );
    let forced = [base[0], base[1], ("EFA_ALLREDUCE_ALGO", "rd")];
    assert_eq!(
        algos(&forced),
        ["16 RecursiveDoubling", "1048576 RecursiveDoubling"]
    );
}

#[test]
fn efa_debug_file_writes_one_file_per_rank() {
    let dir = std::env::temp_dir().join(format!("efa-debug-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pattern = format!("{}/efa-%h-r%r-%p.log", dir.display());
    let out = job(
        2,
        "child_ring",
        &[("EFA_DEBUG", "debug"), ("EFA_DEBUG_FILE", &pattern)],
    );
    assert!(out.status.success());
    let text = stderr(&out);
    assert!(debug_lines(&text).is_empty(), "lines on stderr:\n{text}");
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    for (r, f) in files.iter().enumerate() {
        assert!(
            f.starts_with(&format!("efa-{host}-r{r}-")) && f.ends_with(".log"),
            "{f}"
        );
        let pid = f.trim_end_matches(".log").rsplit('-').next().unwrap();
        let body = std::fs::read_to_string(dir.join(f)).unwrap();
        println!("{f}:\n{body}");
        let prefix = format!("[efa rank {r} {host}:{pid}]");
        assert!(body.lines().count() > 3, "{body}");
        assert!(body.lines().all(|l| l.starts_with(&prefix)), "{body}");
        assert!(body.contains(" route "), "{body}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Child: building (or, with `EXPECT_AT=allreduce`, the first allreduce) fails with a
/// setting error naming `EXPECT_VAR` and containing `EXPECT_TEXT`.
#[test]
#[ignore]
fn child_bad_setting() {
    if !in_job() {
        return;
    }
    let var = std::env::var("EXPECT_VAR").unwrap();
    let text = std::env::var("EXPECT_TEXT").unwrap_or_default();
    let e = if std::env::var("EXPECT_AT").as_deref() == Ok("allreduce") {
        let comm = Communicator::init().unwrap();
        let mut buf = [1.0f32; 16];
        comm.allreduce(&mut buf, efa_core::ReduceOp::Sum)
            .unwrap_err()
    } else if std::env::var("EXPECT_AT").as_deref() == Ok("builder") {
        let mut b = Communicator::builder();
        if let Ok(v) = std::env::var("ARG_IP_IFACE") {
            b = b.ip_iface(v);
        }
        if let Ok(v) = std::env::var("ARG_FABRIC_ADDR") {
            b = b.fabric_addr(v);
        }
        b.build().unwrap_err()
    } else {
        Communicator::init().unwrap_err()
    };
    match &e {
        Error::Setting(s) => match s.source_of_value {
            SettingSource::Env(v) | SettingSource::Argument(v) => assert_eq!(v, var, "{e}"),
        },
        Error::Transports(t) => assert_eq!(var, "EFA_TRANSPORTS", "{t}"),
        // A host identity that cannot be used is a HostId error whose source is the reason.
        Error::HostId(h) if var == "EFA_HOST_ID" => {
            assert!(h.what.contains("EFA_HOST_ID"), "{h}");
            // HostId is transparent: its source is the I/O error behind it.
            let io = std::error::Error::source(&e).expect("HostId has a source");
            assert_eq!(
                io.downcast_ref::<std::io::Error>().map(|e| e.kind()),
                Some(std::io::ErrorKind::InvalidInput),
                "{io:?}"
            );
        }
        other => panic!("expected a setting error for {var}, got {other}"),
    }
    let shown = e.to_string();
    assert!(shown.contains(&text), "{shown:?} lacks {text:?}");
    assert!(
        shown.contains("accepted: ") || shown.contains("known: ") || shown.contains("; set "),
        "{shown}"
    );
    eprintln!("typed error: {e}");
}

/// One job per bad value of every `EFA_*` variable (other than the bootstrap ones and
/// `EFA_TIMEOUT`) and per bad builder argument.
#[test]
fn every_bad_setting_is_a_typed_error() {
    let cases: &[(&str, &str, &str, &str)] = &[
        // (variable, value, where it fails, text the message must contain)
        ("EFA_TRANSPORTS", "^all", "init", "EFA_TRANSPORTS=\"^all\": allows no transport"),
        ("EFA_TRANSPORTS", ",", "init", "allows no transport; accepted: a comma-separated"),
        ("EFA_TRANSPORTS", "shm,ucx", "init", "unknown transport `ucx` in EFA_TRANSPORTS"),
        ("EFA_IFACE", "nonexistent0", "init", "no interface nonexistent0 with an IP address; accepted: the name of an interface of this host that is up and has an IP address: lo (127.0.0.1/8"),
        ("EFA_FABRIC_ADDR", "192.0.2.77", "init", "EFA_FABRIC_ADDR=\"192.0.2.77\": 192.0.2.77 is not an address of this host; accepted: an IP address"),
        ("EFA_FABRIC_ADDR", "lo", "init", "EFA_FABRIC_ADDR=\"lo\": not an IP address"),
        ("EFA_ALLREDUCE_ALGO", "tree", "allreduce", "EFA_ALLREDUCE_ALGO=\"tree\": not an allreduce algorithm"),
        ("EFA_COLL_RING_MIN", "lots", "allreduce", "EFA_COLL_RING_MIN=\"lots\": not a whole number of bytes"),
        ("EFA_COLL_CHUNK", "8", "allreduce", "EFA_COLL_CHUNK=\"8\": below the smallest chunk"),
        ("EFA_COLL_WINDOW", "1m", "allreduce", "EFA_COLL_WINDOW=\"1m\": not a whole number of bytes"),
        ("EFA_COLL_CHECK", "maybe", "allreduce", "EFA_COLL_CHECK=\"maybe\": not a switch"),
        ("EFA_DEBUG", "loud", "init", "EFA_DEBUG=\"loud\": not a log level"),
        ("EFA_DEBUG_SUBSYS", "comm,ucx", "init", "unknown subsystem `ucx`"),
        ("EFA_DEBUG_FILE", "/tmp/x%q", "init", "unknown substitution %q"),
        ("EFA_DEBUG_FILE", "/nonexistent-efa-dir/x.log", "init", "cannot open /nonexistent-efa-dir/x.log"),
    ];
    let long_host_id = "h".repeat(70_000);
    let host_id_case = [(
        "EFA_HOST_ID",
        long_host_id.as_str(),
        "init",
        "EFA_HOST_ID is longer than the 65535 bytes a card carries: invalid input parameter; \
         set EFA_HOST_ID to a string unique",
    )];
    let mut failed = Vec::new();
    for &(var, value, at, text) in cases.iter().chain(&host_id_case) {
        let mut env = vec![
            (var, value),
            ("EXPECT_VAR", var),
            ("EXPECT_AT", at),
            ("EXPECT_TEXT", text),
        ];
        if var.starts_with("EFA_DEBUG_") {
            env.push(("EFA_DEBUG", "info"));
        }
        let out = job(1, "child_bad_setting", &env);
        if !out.status.success() || !stderr(&out).contains("typed error: ") {
            let shown: String = value.chars().take(40).collect();
            failed.push(format!("{var}={shown} ({} bytes)", value.len()));
        }
    }
    for (var, arg, value, text) in [
        (
            "CommunicatorBuilder::ip_iface",
            "ARG_IP_IFACE",
            "nonexistent0",
            "CommunicatorBuilder::ip_iface(\"nonexistent0\"): this host has no interface",
        ),
        (
            "CommunicatorBuilder::fabric_addr",
            "ARG_FABRIC_ADDR",
            "10.",
            "CommunicatorBuilder::fabric_addr(\"10.\"): not an IP address",
        ),
    ] {
        let env = [
            (arg, value),
            ("EXPECT_VAR", var),
            ("EXPECT_AT", "builder"),
            ("EXPECT_TEXT", text),
        ];
        let out = job(1, "child_bad_setting", &env);
        if !out.status.success() || !stderr(&out).contains("typed error: ") {
            failed.push(format!("{var}({value})"));
        }
    }
    assert!(failed.is_empty(), "not typed errors: {failed:?}");
}

/// Good values of the same variables are accepted, and the job runs.
#[test]
fn good_settings_are_accepted() {
    let out = job(
        2,
        "child_ring",
        &[
            ("EFA_TRANSPORTS", "^fabric"),
            ("EFA_IFACE", " lo "),
            ("EFA_ALLREDUCE_ALGO", "RING"),
            ("EFA_COLL_CHUNK", "64"),
            ("EFA_COLL_WINDOW", "128"),
            ("EFA_COLL_CHECK", "yes"),
            ("EFA_DEBUG", ""),
        ],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ring ok"));
}

/// Child: the application installs its own subscriber (to stdout, efa_core at debug) before
/// building.
#[test]
#[ignore]
fn child_own_subscriber() {
    if !in_job() {
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .with_env_filter("efa_core=debug")
        .init();
    let comm = Communicator::init().unwrap();
    assert_eq!(comm.size(), 2);
}

#[test]
fn efa_debug_leaves_the_applications_subscriber_alone() {
    let out = job(2, "child_own_subscriber", &[("EFA_DEBUG", "trace")]);
    assert!(out.status.success());
    let err = stderr(&out);
    let lines = debug_lines(&err);
    // One note per rank, nothing else from the switch.
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("installed its own tracing subscriber")),
        "{err}"
    );
    // The application's subscriber got the library's events.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("route"), "{stdout}");
}
