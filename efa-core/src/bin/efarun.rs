//! `efarun`: start N local ranks of an efa-rs program, as `mpirun -n N` does.
//!
//! ```text
//! efarun -n N [--timeout SECS] [--grace SECS] [--host-store ADDR] [-x VAR=VALUE]... PROG [ARGS...]
//! ```
//!
//! * Each rank gets `EFA_RANK`, `EFA_WORLD_SIZE`, `EFA_LOCAL_RANK`, `EFA_LOCAL_SIZE`,
//!   `EFA_STORE` and `EFA_STORE_SERVED=1`, then the `-x` variables (which may override them).
//! * efarun itself serves the TCP rendezvous store for the whole job, on a free
//!   `127.0.0.1` port (or `--host-store ADDR`). Holding the listening socket from before the
//!   first rank starts means there is no race for the port, and since efarun outlives every
//!   rank nobody can tear the store down early. `EFA_STORE_SERVED=1` tells the ranks, rank 0
//!   included, to connect as clients.
//! * Each rank runs in its own process group with stdin from `/dev/null`. Every line it
//!   writes to stdout or stderr is written to efarun's stdout or stderr prefixed with
//!   `[rank] `, one whole line at a time (lines longer than 64 KiB are split).
//! * When a rank fails (non-zero exit or death by a signal), efarun says which rank and how
//!   on stderr, sends SIGTERM to the process groups of all ranks (the failed rank's group
//!   too, for processes it left behind) and SIGKILL after `--grace` seconds (default 3), and
//!   exits with the failing rank's code, or 128 + signal number for a signal death.
//! * When all ranks have exited, whatever is left in their process groups is sent SIGKILL:
//!   no process of the job outlives efarun, unless it moved to a group or session of its own.
//! * When `--timeout` expires, efarun kills all ranks the same way and exits with 124.
//! * SIGINT, SIGTERM and SIGHUP sent to efarun are forwarded to every rank's process group
//!   (ranks are not in the terminal's foreground group, so Ctrl-C reaches only efarun);
//!   SIGKILL follows after the grace period, or at once on a second signal.
//! * If a rank cannot be started, efarun stops the others and exits with 127.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use clap::Parser;
use efa_core::store::TcpStoreServer;
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
    Signaled(i32),
    /// Waiting for it failed; treated as exit code 1.
    Unknown,
}

impl Outcome {
    fn from_status(st: std::io::Result<ExitStatus>) -> Self {
        match st {
            Ok(st) => match (st.code(), st.signal()) {
                (Some(c), _) => Outcome::Exited(c),
                (None, Some(s)) => Outcome::Signaled(s),
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
            Outcome::Signaled(s) => (128 + s).min(255) as u8,
            Outcome::Unknown => 1,
        }
    }

    fn describe(self) -> String {
        match self {
            Outcome::Exited(c) => format!("exited with code {c}"),
            Outcome::Signaled(s) => {
                let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("unknown");
                format!("was killed by signal {s} ({name})")
            }
            Outcome::Unknown => "ended in a way efarun could not observe".into(),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    let server = match TcpStoreServer::bind(store_addr) {
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
    let mut timed_out = false;
    let mut first_failure: Option<(u32, Outcome)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut signals_seen = 0u32;

    while !running.is_empty() {
        tokio::select! {
            Some((rank, outcome)) = exit_rx.recv() => {
                running.remove(&rank);
                if !outcome.success() && first_failure.is_none() && !timed_out {
                    first_failure = Some((rank, outcome));
                    if running.is_empty() || signals_seen > 0 {
                        say(tx, format!("rank {rank} {}", outcome.describe()));
                    } else {
                        say(tx, format!(
                            "rank {rank} {}; terminating the other {} rank(s): {}",
                            outcome.describe(), running.len(), fmt_ranks(&running)
                        ));
                        signal_groups(&pgids, Signal::SIGTERM);
                        kill_at.get_or_insert(Instant::now() + args.grace);
                    }
                }
            }
            _ = tokio::time::sleep_until(timeout_at.unwrap_or(far)), if timeout_at.is_some() && !timed_out => {
                timed_out = true;
                say(tx, format!(
                    "timeout: {:?} elapsed with rank(s) {} still running; killing them",
                    args.timeout.unwrap_or_default(), fmt_ranks(&running)
                ));
                signal_groups(&pgids, Signal::SIGTERM);
                kill_at = Some(kill_at.map_or(Instant::now() + args.grace, |k| k.min(Instant::now() + args.grace)));
            }
            _ = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                say(tx, format!(
                    "rank(s) {} still running {:?} after SIGTERM; sending SIGKILL",
                    fmt_ranks(&running), args.grace
                ));
                signal_groups(&pgids, Signal::SIGKILL);
                kill_at = None;
            }
            Some(sig) = sig_rx.recv() => {
                signals_seen += 1;
                if signals_seen == 1 {
                    say(tx, format!("received {sig}; forwarding it to rank(s) {}", fmt_ranks(&running)));
                    signal_groups(&pgids, sig);
                    kill_at.get_or_insert(Instant::now() + args.grace);
                } else {
                    say(tx, format!("received {sig} again; killing rank(s) {}", fmt_ranks(&running)));
                    signal_groups(&pgids, Signal::SIGKILL);
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

    if timed_out {
        124
    } else if let Some((_, outcome)) = first_failure {
        outcome.exit_code()
    } else {
        0
    }
}
