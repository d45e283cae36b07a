//! Runs the built `efarun` with small shell programs (and, for the end-to-end store test,
//! with this test binary as the rank program).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const EFARUN: &str = env!("CARGO_BIN_EXE_efarun");

fn efarun(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(EFARUN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("efarun runs");
    (out, t.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn sets_bootstrap_environment_for_every_rank() {
    let (out, _) = efarun(&[
        "-n",
        "3",
        "-x",
        "FOO=bar baz",
        "sh",
        "-c",
        r#"echo "R=$EFA_RANK W=$EFA_WORLD_SIZE LR=$EFA_LOCAL_RANK LS=$EFA_LOCAL_SIZE SV=$EFA_STORE_SERVED X=$FOO S=$EFA_STORE""#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut stores = Vec::new();
    for rank in 0..3 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("[{rank}] ")))
            .unwrap_or_else(|| panic!("no line from rank {rank}: {stdout}"));
        let want = format!("[{rank}] R={rank} W=3 LR={rank} LS=3 SV=1 X=bar baz S=");
        assert!(line.starts_with(&want), "{line:?} vs {want:?}");
        stores.push(line[want.len()..].to_owned());
    }
    assert!(stores.iter().all(|s| s == &stores[0]), "{stores:?}");
    assert!(stores[0].starts_with("127.0.0.1:"), "{stores:?}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

#[test]
fn prefixes_whole_lines_without_interleaving() {
    let n = 4;
    let lines = 300;
    let script = format!(
        r#"pad=$(printf '%0500d' 0); i=0; while [ $i -lt {lines} ]; do echo "rank=$EFA_RANK i=$i $pad"; i=$((i+1)); done; echo "to stderr $EFA_RANK" >&2; printf 'no newline'"#
    );
    let (out, _) = efarun(&["-n", &n.to_string(), "sh", "-c", &script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let pad = "0".repeat(500);
    let mut seen: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut tails = 0;
    for line in stdout.lines() {
        let (prefix, rest) = line.split_once(' ').expect("prefixed");
        let rank: u32 = prefix
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .expect("[rank]");
        if rest == "no newline" {
            tails += 1;
            continue;
        }
        let want_start = format!("rank={rank} i=");
        assert!(
            rest.starts_with(&want_start) && rest.ends_with(&pad),
            "mangled line: {line:.80}"
        );
        let i: u32 = rest[want_start.len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        seen.entry(rank).or_default().push(i);
    }
    assert_eq!(
        tails, n,
        "an unterminated last line is still emitted, with a newline"
    );
    assert_eq!(seen.len(), n as usize);
    for (rank, is) in seen {
        assert_eq!(
            is,
            (0..lines).collect::<Vec<_>>(),
            "rank {rank} lines out of order or lost"
        );
    }
    let stderr = text(&out.stderr);
    for rank in 0..n {
        assert!(
            stderr
                .lines()
                .any(|l| l == format!("[{rank}] to stderr {rank}")),
            "{stderr}"
        );
    }
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

#[test]
fn failing_rank_code_is_propagated_and_others_are_killed() {
    let dir = std::env::temp_dir().join(format!("efarun-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        r#"sleep 30 & echo $! > {dir}/sleep.$EFA_RANK
           if [ "$EFA_RANK" = 2 ]; then sleep 0.3; exit 7; fi
           wait"#,
        dir = dir.display()
    );
    let (out, took) = efarun(&["-n", "4", "sh", "-c", &script]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}: the others were not killed promptly"
    );
    assert!(
        stderr.contains(
            "efarun: rank 2 exited with code 7; terminating the other 3 rank(s): 0, 1, 3"
        ),
        "{stderr}"
    );
    // The background `sleep 30`s died with their process groups, the failed rank's included.
    for rank in 0..4 {
        let pid: u32 = std::fs::read_to_string(dir.join(format!("sleep.{rank}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let t = Instant::now();
        while !dead(pid) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(dead(pid), "rank {rank}'s sleep {pid} survived");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn signal_death_maps_to_128_plus_signal() {
    let (out, took) = efarun(&[
        "-n",
        "2",
        "sh",
        "-c",
        r#"if [ "$EFA_RANK" = 1 ]; then kill -SEGV $$; fi; sleep 30"#,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 11), "{stderr}");
    assert!(
        stderr.contains("rank 1 was killed by signal 11 (SIGSEGV)"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn timeout_kills_everything_and_exits_124() {
    let (out, took) = efarun(&["-n", "2", "--timeout", "0.5", "sh", "-c", "sleep 30"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("efarun: timeout: 500ms elapsed with rank(s) 0, 1 still running"),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn ranks_ignoring_sigterm_get_sigkill_after_the_grace_period() {
    let (out, took) = efarun(&[
        "-n",
        "2",
        "--timeout",
        "0.3",
        "--grace",
        "0.5",
        "sh",
        "-c",
        r#"trap '' TERM; sleep 30"#,
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(stderr.contains("sending SIGKILL"), "{stderr}");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[test]
fn sigint_is_forwarded_to_the_ranks() {
    let mut child = Command::new(EFARUN)
        .args([
            "-n",
            "2",
            "--timeout",
            "20",
            "sh",
            "-c",
            r#"trap 'echo "got INT"; exit 3' INT; echo ready; while :; do sleep 0.05; done"#,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ready = 0;
    let mut line = String::new();
    while ready < 2 {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "efarun ended before the ranks were ready"
        );
        if line.ends_with("ready\n") {
            ready += 1;
        }
    }
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(status.code(), Some(3), "{rest}");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(
        rest.contains("[0] got INT") && rest.contains("[1] got INT"),
        "{rest}"
    );
}

#[test]
fn missing_program_exits_127() {
    let (out, _) = efarun(&["-n", "2", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("cannot start rank 0 (/nonexistent/program)"));
}

#[test]
fn bad_arguments_are_rejected() {
    let (out, _) = efarun(&["-n", "2", "-x", "NOEQUALS", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is not VAR=VALUE"),
        "{}",
        text(&out.stderr)
    );
    let (out, _) = efarun(&["-n", "0", "true"]);
    assert_eq!(out.status.code(), Some(2));
    let (out, _) = efarun(&["-n", "2"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `efarun -n 3 <this test binary> --ignored --exact rank_main`, so every rank bootstraps
/// from the environment efarun sets and exchanges a blob through efarun's store.
#[test]
fn ranks_rendezvous_through_efaruns_store() {
    let me = std::env::current_exe().unwrap();
    let me = me.to_str().unwrap();
    let (out, _) = efarun(&[
        "-n",
        "3",
        "--timeout",
        "30",
        me,
        "--ignored",
        "--exact",
        "rank_main",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for rank in 0..3 {
        // libtest may print "test rank_main ... " on the same line first.
        let prefix = format!("[{rank}] ");
        let want = format!(
            "exchanged rank {rank} of 3 via efarun: hello from 0|hello from 1|hello from 2"
        );
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&prefix) && l.ends_with(&want)),
            "missing {want:?} from rank {rank} in\n{stdout}"
        );
    }
}

/// Not a test on its own: the rank program for `ranks_rendezvous_through_efaruns_store`.
#[test]
#[ignore = "rank program, run under efarun by ranks_rendezvous_through_efaruns_store"]
fn rank_main() {
    use efa_core::bootstrap::{from_env, Launcher, Rendezvous, StoreServer};
    use efa_core::store::{barrier, exchange_all};
    let b = from_env().unwrap();
    assert_eq!(b.launcher(), Launcher::Efarun);
    assert!(matches!(
        b.rendezvous(),
        Rendezvous::Tcp {
            server: StoreServer::Launcher,
            ..
        }
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = b.connect_store(deadline).unwrap();
    let blob = format!("hello from {}", b.rank());
    let all = exchange_all(
        &*store,
        "card",
        b.rank(),
        b.world_size(),
        blob.as_bytes(),
        deadline,
    )
    .unwrap();
    barrier(&*store, "end", b.rank(), b.world_size(), deadline).unwrap();
    let all: Vec<String> = all
        .into_iter()
        .map(|v| String::from_utf8(v).unwrap())
        .collect();
    println!(
        "exchanged rank {} of {} via {}: {}",
        b.rank(),
        b.world_size(),
        b.launcher(),
        all.join("|")
    );
}
