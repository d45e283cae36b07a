//! `efarun`: start N local ranks of an efa-rs program, as `mpirun -n N` does.
//!
//! ```text
//! efarun -n N [--timeout SECS] [--grace SECS] [--host-store ADDR] [-x VAR=VALUE]... PROG [ARGS...]
//! ```
//!
//! * Each rank gets `EFA_RANK`, `EFA_WORLD_SIZE`, `EFA_LOCAL_RANK`, `EFA_LOCAL_SIZE`,
//!   `EFA_STORE`, `EFA_STORE_SERVED=1` and `EFA_STORE_TOKEN`, then the `-x` variables
//!   (which may override them).
//! * efarun itself serves the TCP rendezvous store for the whole job, on a free
//!   `127.0.0.1` port (or `--host-store ADDR`). Holding the listening socket from before the
//!   first rank starts means there is no race for the port, and since efarun outlives every
//!   rank nobody can tear the store down early. `EFA_STORE_SERVED=1` tells the ranks, rank 0
//!   included, to connect as clients.
//! * The store admits only this job's ranks: efarun generates a secret per job (32 random
//!   bytes from `/dev/urandom`, as 64 hex digits), serves the store with it and passes it to
//!   the ranks as `EFA_STORE_TOKEN` (`-x EFA_STORE_TOKEN=...` chooses it instead). Any other
//!   client is refused and efarun prints a warning naming its address; the job goes on. An
//!   unusable `-x EFA_STORE_TOKEN` (fewer than 16 or more than 256 characters, or not
//!   printable ASCII) makes efarun exit with 2 before any rank starts.
//!   `RUST_LOG` (default `efa_core=warn`) sets what efarun's own log shows.
//! * Each rank runs in its own process group with stdin from `/dev/null`. Every line it
//!   writes to stdout or stderr is written to efarun's stdout or stderr prefixed with
//!   `[rank] `, one whole line at a time (lines longer than 64 KiB are split).
//! * When a rank fails (non-zero exit or death by a signal), efarun says which rank and how
//!   on stderr, lets the others end on their own for `--report-grace` seconds (default 1;
//!   with efa-rs they learn of the failure and report it, naming the failed rank), then sends
//!   SIGTERM to the process groups of all ranks (the failed rank's group
//!   too, for processes it left behind) and SIGKILL after `--grace` seconds (default 3), and
//!   exits with the failing rank's code, or 128 + signal number for a signal death.
//! * When all ranks have exited, whatever is left in their process groups is sent SIGKILL:
//!   no process of the job outlives efarun, unless it moved to a group or session of its own.
//! * When `--timeout` expires, efarun kills all ranks the same way and exits with 124.
//! * SIGINT, SIGTERM and SIGHUP sent to efarun stop the job: efarun says so (`efarun: got
//!   SIGINT, stopping 4 ranks`), forwards the signal to every rank's process group (ranks are
//!   not in the terminal's foreground group, so Ctrl-C reaches only efarun), sends SIGKILL
//!   after the grace period, or at once on a second signal, and exits with 128 + the signal's
//!   number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP), as shells expect.
//! * If a rank cannot be started, efarun stops the others and exits with 127.
//! * Whenever the job did not succeed, efarun ends with a summary on stderr: what stopped the
//!   job (which rank failed first and how, the timeout, or a signal), then one line per rank
//!   that did not exit with 0: its exit code, or the signal that killed it by name (SIGKILL,
//!   SIGSEGV, ..., with "core dumped" when it did), and whether efarun sent that signal.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use clap::Parser;
use efa_core::store::{StoreToken, TcpStoreServer};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Lines longer than this are split.
const MAX_LINE: usize = 64 * 1024;

/// Start N local ranks of an efa-rs program with the bootstrap environment set.
#[derive(Debug, Parser)]
#[command(name = "efarun", version)]
struct Args {
    /// Number of ranks to start.
    #[arg(short = 'n', long = "np", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65_536))]
    n: u32,

    /// Kill all ranks and exit with 124 after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,

    /// Seconds between SIGTERM and SIGKILL when stopping ranks.
    #[arg(long, value_name = "SECS", default_value = "3", value_parser = parse_secs)]
    grace: Duration,

    /// After a rank fails, seconds to let the others end on their own before SIGTERM: they
    /// learn of the failure within about a second and report it, naming the failed rank.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    report_grace: Duration,

    /// Address for efarun's rendezvous store (default: 127.0.0.1 with a free port).
    #[arg(long, value_name = "ADDR")]
    host_store: Option<String>,

    /// Set VAR=VALUE in every rank's environment (repeatable).
    #[arg(short = 'x', value_name = "VAR=VALUE", value_parser = parse_var)]
    env: Vec<(String, String)>,

    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROG [ARGS...]"
    )]
    command: Vec<OsString>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("`{s}` is not a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "`{s}` is not VAR=VALUE (ranks inherit efarun's whole environment, so -x only sets or overrides)"
        )),
    }
}

/// Something to write to efarun's own stdout or stderr, one whole line.
enum Out {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// How a rank ended.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Exited(i32),
    /// Killed by this signal number; whether it dumped core.
    Signaled(i32, bool),
    /// Waiting for it failed; treated as exit code 1.
    Unknown,
}

impl Outcome {
    fn from_status(st: std::io::Result<ExitStatus>) -> Self {
        match st {
            Ok(st) => match (st.code(), st.signal()) {
                (Some(c), _) => Outcome::Exited(c),
                (None, Some(s)) => Outcome::Signaled(s, st.core_dumped()),
                (None, None) => Outcome::Unknown,
            },
            Err(_) => Outcome::Unknown,
        }
    }

    fn success(self) -> bool {
        matches!(self, Outcome::Exited(0))
    }

    fn exit_code(self) -> u8 {
        match self {
            Outcome::Exited(c) => (c & 0xff) as u8,
            Outcome::Signaled(s, _) => (128 + s).min(255) as u8,
            Outcome::Unknown => 1,
        }
    }

    fn describe(self) -> String {
        match self {
            Outcome::Exited(c) => format!("exited with code {c}"),
            Outcome::Signaled(s, core) => format!(
                "was killed by signal {s} ({}){}",
                signal_name(s),
                if core { ", core dumped" } else { "" }
            ),
            Outcome::Unknown => "ended in a way efarun could not observe".into(),
        }
    }
}

/// `SIGSEGV` for 11; `SIGRTMIN+2` for real-time signals.
fn signal_name(s: i32) -> String {
    match Signal::try_from(s) {
        Ok(sig) => sig.as_str().to_owned(),
        Err(_) if (34..=64).contains(&s) => format!("SIGRTMIN+{}", s - 34),
        Err(_) => "unknown signal".into(),
    }
}

/// What ended the job early. The first one wins: it decides efarun's exit status.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// This rank failed first.
    RankFailed(u32, Outcome),
    /// `--timeout` expired.
    Timeout,
    /// efarun got this signal.
    Signal(Signal),
}

/// "1 rank", "4 ranks".
fn ranks_word(n: usize) -> String {
    if n == 1 {
        "1 rank".into()
    } else {
        format!("{n} ranks")
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The store server's warnings (a refused client) go to efarun's stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("efa_core=warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("efarun: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(runtime.block_on(run(args)))
}

/// Writes `Out`s in arrival order from one thread, so lines never interleave.
fn spawn_writer(mut rx: mpsc::Receiver<Out>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
        while let Some(out) = rx.blocking_recv() {
            // A closed stdout (efarun | head) must not stop the job; drop the line.
            let _ = match out {
                Out::Stdout(b) => {
                    let mut s = stdout.lock();
                    s.write_all(&b).and_then(|_| s.flush())
                }
                Out::Stderr(b) => stderr.lock().write_all(&b),
            };
        }
    })
}

fn say(tx: &mpsc::Sender<Out>, msg: String) {
    let line = format!("efarun: {msg}\n").into_bytes();
    if let Err(e) = tx.try_send(Out::Stderr(line)) {
        // The writer is backed up or gone; say it directly rather than lose it.
        let _ = std::io::stderr().write_all(match &e {
            mpsc::error::TrySendError::Full(Out::Stderr(b) | Out::Stdout(b))
            | mpsc::error::TrySendError::Closed(Out::Stderr(b) | Out::Stdout(b)) => b,
        });
    }
}

/// Copies lines from a rank's pipe to the writer, prefixed with `[rank] `.
async fn pump(pipe: impl AsyncRead + Unpin, rank: u32, stderr: bool, tx: mpsc::Sender<Out>) {
    let mut reader = BufReader::new(pipe);
    let prefix = format!("[{rank}] ");
    let mut line = Vec::new();
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        let mut eof = false;
        loop {
            let buf = match reader.fill_buf().await {
                Ok(b) => b,
                Err(_) => {
                    eof = true;
                    break;
                }
            };
            if buf.is_empty() {
                eof = true;
                break;
            }
            let room = MAX_LINE + prefix.len() - line.len();
            let (n, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) if i < room => (i + 1, true),
                _ if buf.len() >= room => (room, true),
                _ => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..n]);
            reader.consume(n);
            if done {
                break;
            }
        }
        if line.len() > prefix.len() {
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            let out = std::mem::take(&mut line);
            let msg = if stderr {
                Out::Stderr(out)
            } else {
                Out::Stdout(out)
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        if eof {
            return;
        }
    }
}

/// Signals the process group of every rank started, including ranks that have exited: their
/// background children are still in the group.
fn signal_groups(pgids: &[(u32, i32)], sig: Signal) {
    for &(_, pgid) in pgids {
        // ESRCH: the group is already empty. Nothing else can fail for our own children.
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

fn fmt_ranks(r: &BTreeSet<u32>) -> String {
    r.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

fn advertised(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if !ip.is_unspecified() => ip,
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

async fn run(args: Args) -> u8 {
    let (tx, rx) = mpsc::channel::<Out>(4096);
    let writer = spawn_writer(rx);
    let code = run_job(&args, &tx).await;
    drop(tx);
    let _ = writer.join();
    code
}

async fn run_job(args: &Args, tx: &mpsc::Sender<Out>) -> u8 {
    let store_addr = args.host_store.as_deref().unwrap_or("127.0.0.1:0");
    // The job's secret: the user's, if they chose one with -x, else a fresh one.
    let token = match args.env.iter().rev().find(|(k, _)| k == "EFA_STORE_TOKEN") {
        Some((_, v)) => StoreToken::new(v),
        None => StoreToken::generate(),
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            say(tx, format!("cannot set up the store's token: {e}"));
            return 2;
        }
    };
    let server = match TcpStoreServer::bind_with_token(store_addr, Some(token.clone())) {
        Ok(s) => s,
        Err(e) => {
            say(tx, format!("cannot serve the rendezvous store: {e}"));
            return 1;
        }
    };
    let store = advertised(server.local_addr());

    // Signal streams first, so a signal during start-up is not lost.
    let mut signals = Vec::new();
    for (kind, sig) in [
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::hangup(), Signal::SIGHUP),
    ] {
        match signal(kind) {
            Ok(s) => signals.push((s, sig)),
            Err(e) => say(
                tx,
                format!("cannot catch {sig}: {e}; it will not be forwarded"),
            ),
        }
    }
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<Signal>();
    for (mut stream, sig) in signals {
        let sig_tx = sig_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if sig_tx.send(sig).is_err() {
                    return;
                }
            }
        });
    }

    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<(u32, Outcome)>();
    let mut pgids: Vec<(u32, i32)> = Vec::new();
    let mut running = BTreeSet::new();
    let mut pumps = Vec::new();
    let (prog, prog_args) = args.command.split_first().expect("clap requires PROG");

    for rank in 0..args.n {
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(prog_args)
            .env("EFA_RANK", rank.to_string())
            .env("EFA_WORLD_SIZE", args.n.to_string())
            .env("EFA_LOCAL_RANK", rank.to_string())
            .env("EFA_LOCAL_SIZE", args.n.to_string())
            .env("EFA_STORE", &store)
            .env("EFA_STORE_SERVED", "1")
            .env("EFA_STORE_TOKEN", token.as_str())
            .envs(args.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                say(
                    tx,
                    format!("cannot start rank {rank} ({}): {e}", prog.to_string_lossy()),
                );
                signal_groups(&pgids, Signal::SIGKILL);
                while !running.is_empty() {
                    match tokio::time::timeout(
                        args.grace.max(Duration::from_secs(1)),
                        exit_rx.recv(),
                    )
                    .await
                    {
                        Ok(Some((r, _))) => {
                            running.remove(&r);
                        }
                        _ => break,
                    }
                }
                return 127;
            }
        };
        let pid = child.id().expect("a just-spawned child has a pid") as i32;
        pgids.push((rank, pid));
        running.insert(rank);
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(out, rank, false, tx.clone())));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, rank, true, tx.clone())));
        }
        let exit_tx = exit_tx.clone();
        tokio::spawn(async move {
            let st = child.wait().await;
            let _ = exit_tx.send((rank, Outcome::from_status(st)));
        });
    }

    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let timeout_at = args.timeout.map(|t| Instant::now() + t);
    let mut stop: Option<Stop> = None;
    let mut kill_at: Option<Instant> = None;
    // When the other ranks get SIGTERM after a rank failed (see `--report-grace`).
    let mut term_at: Option<Instant> = None;
    let mut signals_seen = 0u32;
    // Signals efarun sent to the ranks' groups, and how each rank ended (with whether efarun
    // had started stopping the job by then).
    let mut sent: Vec<Signal> = Vec::new();
    let mut ended: BTreeMap<u32, (Outcome, bool)> = BTreeMap::new();

    while !running.is_empty() {
        tokio::select! {
            Some((rank, outcome)) = exit_rx.recv() => {
                running.remove(&rank);
                ended.insert(rank, (outcome, !sent.is_empty()));
                if !outcome.success() && stop.is_none() {
                    stop = Some(Stop::RankFailed(rank, outcome));
                    if running.is_empty() {
                        say(tx, format!("rank {rank} {}", outcome.describe()));
                    } else {
                        say(tx, format!(
                            "rank {rank} {}; terminating the other {} rank(s) in {:?} unless they end first: {}",
                            outcome.describe(), running.len(), args.report_grace, fmt_ranks(&running)
                        ));
                        term_at = Some(Instant::now() + args.report_grace);
                    }
                }
            }
            _ = tokio::time::sleep_until(term_at.unwrap_or(far)), if term_at.is_some() => {
                term_at = None;
                if sent.is_empty() {
                    signal_groups(&pgids, Signal::SIGTERM);
                    sent.push(Signal::SIGTERM);
                    kill_at.get_or_insert(Instant::now() + args.grace);
                }
            }
            _ = tokio::time::sleep_until(timeout_at.unwrap_or(far)), if timeout_at.is_some() && stop.is_none() => {
                stop = Some(Stop::Timeout);
                say(tx, format!(
                    "timeout: {:?} elapsed with rank(s) {} still running; killing them",
                    args.timeout.unwrap_or_default(), fmt_ranks(&running)
                ));
                signal_groups(&pgids, Signal::SIGTERM);
                sent.push(Signal::SIGTERM);
                kill_at = Some(kill_at.map_or(Instant::now() + args.grace, |k| k.min(Instant::now() + args.grace)));
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                say(tx, format!(
                    "rank(s) {} still running {:?} after SIGTERM; sending SIGKILL",
                    fmt_ranks(&running), args.grace
                ));
                signal_groups(&pgids, Signal::SIGKILL);
                sent.push(Signal::SIGKILL);
                kill_at = None;
            }
            Some(sig) = sig_rx.recv() => {
                signals_seen += 1;
                stop.get_or_insert(Stop::Signal(sig));
                if signals_seen == 1 {
                    say(tx, format!(
                        "got {sig}, stopping {} ({}: forwarding {sig}, SIGKILL after {:?})",
                        ranks_word(running.len()), fmt_ranks(&running), args.grace
                    ));
                    signal_groups(&pgids, sig);
                    sent.push(sig);
                    kill_at.get_or_insert(Instant::now() + args.grace);
                } else {
                    say(tx, format!("got {sig} again; killing rank(s) {} now", fmt_ranks(&running)));
                    signal_groups(&pgids, Signal::SIGKILL);
                    sent.push(Signal::SIGKILL);
                    kill_at = None;
                }
            }
        }
    }

    // Every rank has exited. Processes they left behind in their groups do not outlive the
    // job (as with mpirun); then the pumps see end-of-file and drain what the ranks wrote.
    signal_groups(&pgids, Signal::SIGKILL);
    let drain_until = Instant::now() + Duration::from_secs(2);
    for p in &mut pumps {
        if tokio::time::timeout_at(drain_until, &mut *p).await.is_err() {
            break;
        }
    }
    if pumps.iter().any(|p| !p.is_finished()) {
        say(
            tx,
            "some rank output pipes stayed open (a process left its group?); not waiting for them"
                .into(),
        );
        // Each pump holds a sender to the writer; abort them so the writer can finish.
        pumps.iter().for_each(|p| p.abort());
    }
    drop(server);

    if let Some(stop) = stop {
        summarize(tx, stop, &ended, &sent, args.n);
    }
    match stop {
        None => 0,
        Some(Stop::RankFailed(_, outcome)) => outcome.exit_code(),
        Some(Stop::Timeout) => 124,
        Some(Stop::Signal(sig)) => (128 + sig as i32).min(255) as u8,
    }
}

/// The job's end on stderr: what stopped it, then one line per rank that did not exit 0.
fn summarize(
    tx: &mpsc::Sender<Out>,
    stop: Stop,
    ended: &BTreeMap<u32, (Outcome, bool)>,
    sent: &[Signal],
    n: u32,
) {
    let failed: Vec<_> = ended.iter().filter(|(_, (o, _))| !o.success()).collect();
    let why = match stop {
        Stop::RankFailed(rank, outcome) => {
            format!("rank {rank} failed first and {}", outcome.describe())
        }
        Stop::Timeout => "stopped by efarun's --timeout".into(),
        Stop::Signal(sig) => format!("stopped by {sig} sent to efarun"),
    };
    let count = if failed.is_empty() {
        "every rank exited with 0".to_owned()
    } else {
        format!("{} of {n} ranks did not exit with 0:", failed.len())
    };
    say(tx, format!("job summary: {why}; {count}"));
    for (rank, (outcome, after_stop)) in failed {
        let note = match outcome {
            Outcome::Signaled(s, _) if sent.iter().any(|&x| x as i32 == *s) && *after_stop => {
                ", sent by efarun"
            }
            _ if *after_stop => ", after efarun began stopping the job",
            _ => "",
        };
        say(tx, format!("  rank {rank} {}{note}", outcome.describe()));
    }
}
