//! `efa-chaos`: randomised fault runs against real efa-rs jobs (run it through `ci/chaos`).
//!
//! Each run starts a job of 3 or 4 `chaos-rank` processes, under `efarun` or in a bare
//! launcher environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; rank 0 serves
//! the store), running one workload (p2p, allreduce or RMA, every byte verified). It injects
//! one fault at a random moment:
//!
//! * `kill-9`: SIGKILL of a random rank, at 0-3 s after that rank started;
//! * `sigstop`: SIGSTOP of a random rank, held until the run ends (past the deadline);
//! * `store-kill`: SIGKILL of the store's server during bootstrap (rank 0 when bare, efarun
//!   itself under efarun), while one other rank is still held back from joining.
//!
//! Then it measures, from the fault, when each survivor exits, and reads its report: the
//! error text must name the failed rank (or the store), no delivered byte may be wrong, and
//! the survivor must exit within the limit: 5 s where a dead pid or a closed connection
//! tells (kill-9 after bootstrap, store-kill once the store listened), else the deadline
//! (`EFA_TIMEOUT`) + 5 s. A survivor still running at deadline + 5 s is killed and counted
//! as a hang; so is one that exits after its limit. Every process of the run is killed at the
//! end, and a process left over counts as a failure.
//!
//! Seeds replay: run `I` of seed `S` has the same fault, workload, launch, victim and
//! moment on every machine (`efa-chaos --seed S --run I`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use efa_chaos::{names_culprit, Culprit, Event, Fault, Launch, SplitMix64, Workload, EXIT_CORRUPT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Randomised fault runs against efa-rs jobs.
#[derive(Debug, Parser)]
#[command(name = "efa-chaos")]
struct Args {
    /// Number of runs (fault x workload x launch cycle through 18 combinations).
    #[arg(default_value_t = 100)]
    runs: u64,
    /// Seed of the run parameters (default: from the clock; printed for replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Replay only run number I of the seed.
    #[arg(long, value_name = "I")]
    run: Option<u64>,
    /// The short version: 9 runs, each fault x workload once, both launches.
    #[arg(long)]
    quick: bool,
    /// First check that the harness can see failures: fault-free runs of each workload must
    /// all pass, and a run with one flipped byte must be reported as a corruption.
    #[arg(long)]
    self_test: bool,
    /// The communicator deadline given to the ranks (EFA_TIMEOUT), in seconds.
    #[arg(long, default_value_t = 10)]
    deadline: u64,
    /// Directory with chaos-rank and efarun (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep every run's directory (reports and output), not only failed runs'.
    #[arg(long)]
    keep: bool,
}

/// The limit where a dead pid or a closed connection tells the survivors.
const FAST_LIMIT: Duration = Duration::from_secs(5);
/// How long a join is held back in store-kill runs.
const JOIN_HOLD_MS: u64 = 2500;

#[derive(Debug, Clone)]
struct Spec {
    index: u64,
    fault: Fault,
    workload: Workload,
    launch: Launch,
    ranks: u32,
    /// The victim rank (kill-9, sigstop; rank 0 for a bare store-kill).
    victim: u32,
    /// kill-9/sigstop: ms after the victim started; store-kill: ms after launch.
    moment_ms: u64,
    /// store-kill: the rank held back from joining.
    held: u32,
}

fn spec(seed: u64, index: u64) -> Spec {
    let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
    let k = index % 9;
    let fault = Fault::ALL[(k / 3) as usize];
    let workload = Workload::ALL[(k % 3) as usize];
    let launch = if k.is_multiple_of(2) == (index % 18 < 9) {
        Launch::Efarun
    } else {
        Launch::Bare
    };
    let ranks = rng.range(3, 4) as u32;
    let (victim, moment_ms, held) = match fault {
        Fault::Kill9 | Fault::Sigstop => (
            rng.range(0, u64::from(ranks) - 1) as u32,
            rng.range(0, 3000),
            0,
        ),
        Fault::StoreKill => {
            let held = rng.range(1, u64::from(ranks) - 1) as u32;
            (0, rng.range(300, JOIN_HOLD_MS - 700), held)
        }
    };
    Spec {
        index,
        fault,
        workload,
        launch,
        ranks,
        victim,
        moment_ms,
        held,
    }
}

/// How one survivor ended.
#[derive(Debug, Clone)]
struct Survivor {
    rank: u32,
    /// From the fault to its exit; None when it was still running at the hard limit.
    time: Option<Duration>,
    /// Its last report event.
    last: Option<Event>,
    /// Exit status, when the driver is its parent.
    status: Option<ExitStatus>,
    /// Its limit: 5 s where something can tell it, else the deadline + 5 s.
    limit: Duration,
}

#[derive(Debug, Clone, Default)]
struct Outcome {
    /// The fault hit before the victim (or the store) could have told anyone.
    early: bool,
    limit: Duration,
    survivors: Vec<(Survivor, Verdict)>,
    corruptions: Vec<String>,
    leftovers: usize,
    /// Why the run could not be carried out (not a measurement).
    setup_error: Option<String>,
    launcher_line: Option<String>,
    /// Shared-memory files the run's dead ranks left in /dev/shm (removed by the driver).
    shm_removed: usize,
}

/// The verdict on one survivor: timing and naming are judged separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Verdict {
    /// Exited after its limit, or still running at deadline + 5 s (and killed).
    hang: bool,
    /// Whether what it ended with names the culprit; None when it never ended by itself
    /// (the driver killed it), which is already a hang.
    named: Option<bool>,
}

struct Env {
    rank_bin: PathBuf,
    efarun: PathBuf,
    deadline: Duration,
    root: PathBuf,
}

/// Variables of other launchers that must not leak into a run.
fn foreign_var(k: &str) -> bool {
    const EXACT: [&str; 6] = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ];
    const PREFIX: [&str; 7] = [
        "EFA_",
        "CHAOS_",
        "OMPI_",
        "PMI_",
        "PMIX_",
        "SLURM_",
        "TORCHELASTIC_",
    ];
    EXACT.contains(&k) || PREFIX.iter().any(|p| k.starts_with(p))
}

fn base_command(env: &Env, prog: &Path, dir: &Path, spec: &Spec) -> Command {
    let mut c = Command::new(prog);
    for (k, _) in std::env::vars_os() {
        if foreign_var(&k.to_string_lossy()) {
            c.env_remove(&k);
        }
    }
    c.env("EFA_TIMEOUT", env.deadline.as_secs().to_string())
        .env("CHAOS_REPORT_DIR", dir)
        .env("CHAOS_WORKLOAD", spec.workload.to_string())
        .stdin(Stdio::null())
        .process_group(0);
    if spec.fault == Fault::StoreKill {
        c.env("CHAOS_JOIN_DELAY", format!("{}:{JOIN_HOLD_MS}", spec.held));
    }
    c
}

fn out_file(dir: &Path, name: &str) -> std::io::Result<Stdio> {
    Ok(fs::File::create(dir.join(name))?.into())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether something listens on 127.0.0.1:`port` (from /proc/net/tcp, without connecting).
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X} ");
    fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines()
                .any(|l| l.contains(&want) && l.split_whitespace().nth(3) == Some("0A"))
        })
        .unwrap_or(false)
}

fn read_events(dir: &Path, rank: u32) -> Vec<Event> {
    fs::read_to_string(dir.join(format!("rank-{rank}.jsonl")))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn start_pid(events: &[Event]) -> Option<u32> {
    events.iter().find_map(|e| match e {
        Event::Start { pid, .. } => Some(*pid),
        _ => None,
    })
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn pid_exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

/// Every live process whose environment carries this run's report directory: the run's
/// ranks wherever they were reparented, and nothing else.
fn run_processes(dir: &Path) -> Vec<u32> {
    let needle = format!("CHAOS_REPORT_DIR={}\0", dir.display());
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || pid_exited(pid) {
            continue;
        }
        if let Ok(env) = fs::read(format!("/proc/{pid}/environ")) {
            if env.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

fn sig(pid: u32, s: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), s);
}

fn execute(env: &Env, spec: &Spec) -> (Outcome, PathBuf) {
    let dir = env.root.join(format!("run-{}", spec.index));
    let mut out = Outcome::default();
    if let Err(e) = fs::create_dir_all(&dir) {
        out.setup_error = Some(format!("cannot create {}: {e}", dir.display()));
        return (out, dir);
    }
    let mut children: Vec<(Option<u32>, Child)> = Vec::new();
    let mut port = 0;
    let launched = (|| -> std::io::Result<()> {
        match spec.launch {
            Launch::Bare => {
                port = free_port()?;
                for r in 0..spec.ranks {
                    let mut c = base_command(env, &env.rank_bin, &dir, spec);
                    // Only the four variables a Kubernetes PyTorchJob sets (torchrun
                    // adds LOCAL_RANK and LOCAL_WORLD_SIZE).
                    c.env("RANK", r.to_string())
                        .env("WORLD_SIZE", spec.ranks.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string())
                        .stdout(out_file(&dir, &format!("rank-{r}.out"))?)
                        .stderr(out_file(&dir, &format!("rank-{r}.err"))?);
                    children.push((Some(r), c.spawn()?));
                }
            }
            Launch::Efarun => {
                let mut c = base_command(env, &env.efarun, &dir, spec);
                c.arg("-n")
                    .arg(spec.ranks.to_string())
                    .arg(&env.rank_bin)
                    .stdout(out_file(&dir, "efarun.out")?)
                    .stderr(out_file(&dir, "efarun.err")?);
                children.push((None, c.spawn()?));
            }
        }
        Ok(())
    })();
    let launched_at = Instant::now();
    if let Err(e) = launched {
        out.setup_error = Some(format!("cannot launch: {e}"));
        cleanup(&dir, &mut children, &mut out);
        return (out, dir);
    }

    // The pid of each rank: known at spawn when bare, from its report under efarun.
    let mut pids: HashMap<u32, u32> = children
        .iter()
        .filter_map(|(r, c)| r.map(|r| (r, c.id())))
        .collect();
    let refresh = |pids: &mut HashMap<u32, u32>| {
        for r in 0..spec.ranks {
            if let std::collections::hash_map::Entry::Vacant(v) = pids.entry(r) {
                if let Some(p) = start_pid(&read_events(&dir, r)) {
                    v.insert(p);
                }
            }
        }
    };

    // Wait for the moment and strike.
    let culprit = culprit_of(spec);
    let target_pid = match spec.fault {
        // efarun (the store) or bare rank 0 (rank 0 serves the store): the first child.
        Fault::StoreKill => children[0].1.id(),
        Fault::Kill9 | Fault::Sigstop => {
            // The victim's clock starts when its process started.
            let until = launched_at + Duration::from_secs(10);
            loop {
                refresh(&mut pids);
                if pids.contains_key(&spec.victim) || Instant::now() > until {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            match pids.get(&spec.victim) {
                Some(&p) => p,
                None => {
                    out.setup_error =
                        Some(format!("rank {} never started within 10 s", spec.victim));
                    cleanup(&dir, &mut children, &mut out);
                    return (out, dir);
                }
            }
        }
    };
    let strike_at = match spec.fault {
        Fault::StoreKill => launched_at + Duration::from_millis(spec.moment_ms),
        _ => Instant::now() + Duration::from_millis(spec.moment_ms),
    };
    std::thread::sleep(strike_at.saturating_duration_since(Instant::now()));
    out.early = match spec.fault {
        // Ready means the communicator exists: every card is published and the transports
        // are up, so a dead pid or a closed connection can tell.
        Fault::Kill9 => !read_events(&dir, spec.victim)
            .iter()
            .any(|e| matches!(e, Event::Ready { .. })),
        Fault::Sigstop => false,
        Fault::StoreKill => spec.launch == Launch::Bare && !listening(port),
    };
    let fault_at = Instant::now();
    sig(
        target_pid,
        if spec.fault == Fault::Sigstop {
            Signal::SIGSTOP
        } else {
            Signal::SIGKILL
        },
    );
    out.limit = if spec.fault == Fault::Sigstop || out.early {
        env.deadline + FAST_LIMIT
    } else {
        FAST_LIMIT
    };
    // A rank held back from joining a bare job meets a refused connection, which cannot
    // tell a dead rank 0 from one that has not started yet: only the deadline tells it.
    // (Under efarun the store listens before any rank starts, so refused means dead.)
    let limit_of = |r: u32| {
        if spec.fault == Fault::StoreKill && spec.launch == Launch::Bare && r == spec.held {
            env.deadline + FAST_LIMIT
        } else {
            out.limit
        }
    };
    let hard = fault_at + env.deadline + FAST_LIMIT;

    // Survivors: every rank but the victim (every rank when efarun itself was killed).
    let survivor_ranks: Vec<u32> = (0..spec.ranks)
        .filter(|&r| !(culprit == Culprit::Rank(r) || (culprit == Culprit::Rank0Store && r == 0)))
        .collect();
    let mut exited: BTreeMap<u32, (Duration, Option<ExitStatus>)> = BTreeMap::new();
    let mut launcher_exit: Option<Duration> = None;
    let mut last_refresh = Instant::now();
    while exited.len() < survivor_ranks.len() && Instant::now() < hard {
        if last_refresh.elapsed() > Duration::from_millis(50) {
            refresh(&mut pids);
            last_refresh = Instant::now();
        }
        let now = fault_at.elapsed();
        for (r, child) in children.iter_mut() {
            if let Ok(Some(st)) = child.try_wait() {
                match r {
                    Some(r) => {
                        if survivor_ranks.contains(r) {
                            exited.entry(*r).or_insert((now, Some(st)));
                        }
                    }
                    None => {
                        launcher_exit.get_or_insert(now);
                    }
                }
            }
        }
        if spec.launch == Launch::Efarun {
            for &r in &survivor_ranks {
                if exited.contains_key(&r) {
                    continue;
                }
                match pids.get(&r) {
                    Some(&p) if pid_exited(p) => {
                        exited.insert(r, (now, None));
                    }
                    // efarun waits for every rank it started before exiting; a rank that
                    // never reported its pid is gone once efarun is (unless efarun was the
                    // victim: then the final scan finds it).
                    None if launcher_exit.is_some() && spec.fault != Fault::StoreKill => {
                        exited.insert(r, (now, None));
                    }
                    _ => {}
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for &r in &survivor_ranks {
        let events = read_events(&dir, r);
        let (time, status) = match exited.get(&r) {
            Some(&(t, st)) => (Some(t), st),
            None => (None, None),
        };
        let last = events
            .iter()
            .rev()
            .find(|e| !matches!(e, Event::Start { .. } | Event::Ready { .. }))
            .cloned();
        out.survivors.push((
            Survivor {
                rank: r,
                time,
                last,
                status,
                limit: limit_of(r),
            },
            Verdict::default(),
        ));
    }
    refresh(&mut pids);
    let all_pids: Vec<u32> = pids.values().copied().collect();
    cleanup(&dir, &mut children, &mut out);

    // Corruption anywhere (the victim too, before the fault) counts.
    for r in 0..spec.ranks {
        for e in read_events(&dir, r) {
            if let Event::Corrupt { msg, .. } = e {
                out.corruptions.push(format!("rank {r}: {msg}"));
            }
        }
    }
    if spec.launch == Launch::Efarun {
        out.launcher_line = fs::read_to_string(dir.join("efarun.err"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("efarun: rank"))
                    .map(str::to_owned)
            });
    }
    let launcher_line = out.launcher_line.clone();
    for (s, v) in out.survivors.iter_mut() {
        *v = judge(s, culprit, launcher_line.as_deref());
    }
    out.shm_removed = remove_shm_of(&all_pids);
    (out, dir)
}

/// The verdict on one survivor.
fn judge(s: &Survivor, culprit: Culprit, launcher: Option<&str>) -> Verdict {
    let Some(t) = s.time else {
        return Verdict {
            hang: true,
            named: None,
        };
    };
    let named = match &s.last {
        Some(Event::Error { msg, .. }) => names_culprit(msg, culprit),
        Some(Event::Corrupt { .. }) => false,
        Some(Event::Done { .. }) => false,
        // No error of its own: it was ended by a signal. Under efarun that is efarun
        // stopping the job, and what the user sees is efarun's line.
        Some(Event::Start { .. } | Event::Ready { .. }) | None => {
            let by_signal = s.status.is_none_or(|st| st.signal().is_some());
            by_signal && launcher.is_some_and(|l| names_culprit(l, culprit))
        }
    };
    Verdict {
        hang: t > s.limit,
        named: Some(named),
    }
}

/// Removes the /dev/shm files of the given dead processes (efa-rs's `efa-PID-...` and
/// libfabric shm's `PID:UID:N`); returns how many there were.
fn remove_shm_of(pids: &[u32]) -> usize {
    let Ok(rd) = fs::read_dir("/dev/shm") else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("efa-")
            .and_then(|r| r.split('-').next())
            .or_else(|| name.contains(':').then(|| name.split(':').next()).flatten())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(p) = pid {
            if pids.contains(&p)
                && !Path::new(&format!("/proc/{p}")).exists()
                && fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// Kills every process of the run and reaps the driver's children; counts leftovers.
fn cleanup(dir: &Path, children: &mut [(Option<u32>, Child)], out: &mut Outcome) {
    for (_, c) in children.iter_mut() {
        if c.try_wait().ok().flatten().is_none() {
            // Its own process group: the child and anything it started.
            let _ = nix::sys::signal::killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            sig(c.id(), Signal::SIGKILL);
        }
    }
    // Ranks of a dead efarun are in process groups of their own; find them by environment.
    for p in run_processes(dir) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(p as i32), Signal::SIGKILL);
        sig(p, Signal::SIGKILL);
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let left = run_processes(dir);
        if left.is_empty() {
            break;
        }
        if Instant::now() > until {
            out.leftovers = left.len();
            break;
        }
        for p in left {
            sig(p, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fmt_secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn describe_survivor(s: &Survivor, v: Verdict) -> String {
    let time = s
        .time
        .map_or_else(|| "still running (killed)".to_string(), fmt_secs);
    let what = match &s.last {
        Some(Event::Error { msg, phase, .. }) => format!("{phase} error: {msg}"),
        Some(Event::Corrupt { msg, .. }) => format!("CORRUPT: {msg}"),
        Some(Event::Done { .. }) => "finished without an error".into(),
        _ => match s.status {
            Some(st) => format!("no report; {st}"),
            None => "no report (ended by a signal)".into(),
        },
    };
    format!(
        "    rank {}: {time} (limit {}){}{}: {what}",
        s.rank,
        fmt_secs(s.limit),
        if v.hang { ", HANG" } else { "" },
        match v.named {
            Some(true) => ", named",
            Some(false) => ", MISNAMED",
            None => "",
        }
    )
}

#[derive(Default)]
struct Row {
    runs: u64,
    worst: Duration,
    worst_hang: bool,
    survivors: u64,
    named: u64,
    hangs: u64,
    corruptions: u64,
    by_launcher: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default()
    });
    let rank_bin = bin_dir.join("chaos-rank");
    let efarun = bin_dir.join("efarun");
    for b in [&rank_bin, &efarun] {
        if !b.is_file() {
            eprintln!(
                "efa-chaos: {} is missing; build it with cargo build -p efa-chaos -p efarun",
                b.display()
            );
            return ExitCode::from(2);
        }
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let root = std::env::temp_dir().join(format!("efa-chaos-{}-{seed}", std::process::id()));
    let env = Env {
        rank_bin,
        efarun,
        deadline: Duration::from_secs(args.deadline),
        root: root.clone(),
    };
    let mut failed_setup = 0u64;
    if args.self_test && !self_test(&env) {
        return ExitCode::from(1);
    }
    let indices: Vec<u64> = match (args.run, args.quick) {
        (Some(i), _) => vec![i],
        (None, true) => (0..9).collect(),
        (None, false) => (0..args.runs).collect(),
    };
    println!(
        "chaos: seed {seed}, {} runs, deadline (EFA_TIMEOUT) {} s; replay: ci/chaos --seed {seed}{}",
        indices.len(),
        args.deadline,
        if args.quick { " --quick" } else { "" }
    );
    let mut rows: BTreeMap<(Fault, Launch, Workload), Row> = BTreeMap::new();
    let (mut hangs, mut corrupt, mut misnamed, mut leftovers) = (0u64, 0u64, 0u64, 0usize);
    let mut shm_removed = 0usize;
    for &i in &indices {
        let sp = spec(seed, i);
        let (out, dir) = execute(&env, &sp);
        let mut line = format!(
            "run {i}: {} {} {} n={} ",
            sp.fault, sp.launch, sp.workload, sp.ranks
        );
        match sp.fault {
            Fault::StoreKill => {
                let _ = write!(
                    line,
                    "store killed at {} ms (rank {} held back)",
                    sp.moment_ms, sp.held
                );
            }
            _ => {
                let _ = write!(line, "rank {} at {} ms", sp.victim, sp.moment_ms);
            }
        }
        if let Some(e) = &out.setup_error {
            println!("{line}: NOT RUN: {e}");
            failed_setup += 1;
            continue;
        }
        let row = rows.entry((sp.fault, sp.launch, sp.workload)).or_default();
        row.runs += 1;
        let run_hangs = out.survivors.iter().filter(|(_, v)| v.hang).count() as u64;
        let run_misnamed = out
            .survivors
            .iter()
            .filter(|(_, v)| v.named == Some(false))
            .count() as u64;
        for (s, v) in &out.survivors {
            row.survivors += 1;
            if v.named == Some(true) {
                row.named += 1;
            }
            if v.named == Some(true) && !matches!(&s.last, Some(Event::Error { .. })) {
                row.by_launcher += 1;
            }
            let t = s.time.unwrap_or(env.deadline + FAST_LIMIT);
            if t >= row.worst {
                row.worst = t;
                row.worst_hang = s.time.is_none();
            }
        }
        row.hangs += run_hangs;
        row.corruptions += out.corruptions.len() as u64;
        hangs += run_hangs;
        misnamed += run_misnamed;
        corrupt += out.corruptions.len() as u64;
        leftovers += out.leftovers;
        shm_removed += out.shm_removed;
        let bad = run_hangs + run_misnamed + out.corruptions.len() as u64 + out.leftovers as u64;
        let worst = out
            .survivors
            .iter()
            .map(|(s, _)| s.time.unwrap_or(env.deadline + FAST_LIMIT))
            .max()
            .unwrap_or_default();
        println!(
            "{line}{}: worst {} (limit {}), {} hang, {} misnamed, {} corrupt{}",
            if out.early {
                " [before it was ready]"
            } else {
                ""
            },
            fmt_secs(worst),
            fmt_secs(out.limit),
            run_hangs,
            run_misnamed,
            out.corruptions.len(),
            if out.leftovers > 0 {
                format!(", {} processes LEFT OVER", out.leftovers)
            } else {
                String::new()
            }
        );
        if bad > 0 {
            for (s, v) in &out.survivors {
                println!("{}", describe_survivor(s, *v));
            }
            for c in &out.corruptions {
                println!("    CORRUPTION {c}");
            }
            if let Some(l) = &out.launcher_line {
                println!("    launcher: {l}");
            }
            println!(
                "    replay: ci/chaos --seed {seed} --run {i}; output kept in {}",
                dir.display()
            );
        } else if !args.keep {
            let _ = fs::remove_dir_all(&dir);
        }
    }

    println!();
    println!(
        "| fault | launch | workload | runs | worst time to fail | hangs | named correctly | corruptions |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for ((f, l, w), r) in &rows {
        println!(
            "| {f} | {l} | {w} | {} | {}{} | {} | {}/{}{} | {} |",
            r.runs,
            if r.worst_hang { ">" } else { "" },
            fmt_secs(r.worst),
            r.hangs,
            r.named,
            r.survivors,
            if r.by_launcher > 0 {
                format!(" ({} by efarun)", r.by_launcher)
            } else {
                String::new()
            },
            r.corruptions
        );
    }
    let runs = indices.len() as u64 - failed_setup;
    println!();
    if failed_setup > 0 {
        println!("chaos: {failed_setup} runs could not be started (see NOT RUN above)");
    }
    if leftovers > 0 {
        println!("chaos: {leftovers} processes were left over after their run");
    }
    println!("chaos: {shm_removed} files left in /dev/shm by this suite's dead ranks were removed");
    println!("chaos: {runs} runs, {hangs} hangs, {corrupt} corruptions, {misnamed} misnamed");
    let _ = fs::remove_dir(&root);
    if hangs + corrupt + misnamed + failed_setup + leftovers as u64 > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn culprit_of(sp: &Spec) -> Culprit {
    match (sp.fault, sp.launch) {
        (Fault::StoreKill, Launch::Efarun) => Culprit::LauncherStore,
        (Fault::StoreKill, Launch::Bare) => Culprit::Rank0Store,
        _ => Culprit::Rank(sp.victim),
    }
}

/// Fault-free runs must pass and a flipped byte must be caught, or the suite measures
/// nothing.
fn self_test(env: &Env) -> bool {
    let mut ok = true;
    for (k, (workload, launch, corrupt)) in [
        (Workload::P2p, Launch::Bare, false),
        (Workload::Allreduce, Launch::Efarun, false),
        (Workload::Rma, Launch::Bare, false),
        (Workload::P2p, Launch::Efarun, true),
        (Workload::Allreduce, Launch::Bare, true),
        (Workload::Rma, Launch::Efarun, true),
    ]
    .into_iter()
    .enumerate()
    {
        let r = control_run(env, k as u64, workload, launch, corrupt);
        let pass = match (&r, corrupt) {
            (Ok(codes), false) => codes.iter().all(|&c| c == 0),
            (Ok(codes), true) => codes.contains(&EXIT_CORRUPT),
            (Err(_), _) => false,
        };
        println!(
            "self-test: {workload} under {launch}{}: {} ({r:?})",
            if corrupt { " with a flipped byte" } else { "" },
            if pass { "as expected" } else { "WRONG" }
        );
        ok &= pass;
    }
    ok
}

/// A fault-free job of 3 ranks and 12 iterations; the ranks' exit codes (bare) or
/// efarun's exit code and the report's verdicts (efarun).
fn control_run(
    env: &Env,
    k: u64,
    workload: Workload,
    launch: Launch,
    corrupt: bool,
) -> Result<Vec<i32>, String> {
    let dir = env.root.join(format!("self-test-{k}"));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sp = Spec {
        index: k,
        fault: Fault::Kill9,
        workload,
        launch,
        ranks: 3,
        victim: 0,
        moment_ms: 0,
        held: 0,
    };
    let mut out = Outcome::default();
    let mut children = Vec::new();
    let prep = |c: &mut Command| {
        c.env("CHAOS_ITERS", "12");
        if corrupt {
            c.env("CHAOS_CORRUPT_AT", "1:5");
        }
    };
    let res = (|| -> std::io::Result<()> {
        match launch {
            Launch::Bare => {
                let port = free_port()?;
                for r in 0..3u32 {
                    let mut c = base_command(env, &env.rank_bin, &dir, &sp);
                    c.env("RANK", r.to_string())
                        .env("WORLD_SIZE", "3")
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string())
                        .stdout(out_file(&dir, &format!("rank-{r}.out"))?)
                        .stderr(out_file(&dir, &format!("rank-{r}.err"))?);
                    prep(&mut c);
                    children.push((Some(r), c.spawn()?));
                }
            }
            Launch::Efarun => {
                let mut c = base_command(env, &env.efarun, &dir, &sp);
                c.args(["-n", "3"])
                    .arg(&env.rank_bin)
                    .stdout(out_file(&dir, "efarun.out")?)
                    .stderr(out_file(&dir, "efarun.err")?);
                prep(&mut c);
                children.push((None, c.spawn()?));
            }
        }
        Ok(())
    })();
    if let Err(e) = res {
        cleanup(&dir, &mut children, &mut out);
        return Err(e.to_string());
    }
    let until = Instant::now() + env.deadline * 3;
    let mut codes = Vec::new();
    for (_, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    codes.push(st.code().unwrap_or(128 + st.signal().unwrap_or(0)));
                    break;
                }
                _ if Instant::now() > until => {
                    cleanup(&dir, &mut children, &mut out);
                    return Err(format!("still running after {:?}", env.deadline * 3));
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    cleanup(&dir, &mut children, &mut out);
    // Under efarun its exit code is the first failing rank's; the reports say which. With
    // a flipped byte the other ranks may fail waiting for the corrupt one: that is expected.
    for r in 0..3 {
        for e in read_events(&dir, r) {
            match e {
                Event::Corrupt { .. } => codes.push(EXIT_CORRUPT),
                Event::Error { msg, .. } if !corrupt => return Err(format!("rank {r}: {msg}")),
                _ => {}
            }
        }
    }
    if out.leftovers > 0 {
        return Err(format!("{} processes left over", out.leftovers));
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(codes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn survivor(time: Option<u64>, last: Option<Event>, signal: Option<i32>) -> Survivor {
        Survivor {
            rank: 1,
            time: time.map(Duration::from_millis),
            last,
            status: signal.map(ExitStatus::from_raw),
            limit: FAST_LIMIT,
        }
    }

    fn error(msg: &str) -> Option<Event> {
        Some(Event::Error {
            rank: 1,
            phase: "workload".into(),
            msg: msg.into(),
            iters: 3,
            since_ok_ms: 1,
        })
    }

    fn v(hang: bool, named: Option<bool>) -> Verdict {
        Verdict { hang, named }
    }

    #[test]
    fn verdicts() {
        let c = Culprit::Rank(2);
        let named = error("recv with rank 2: rank 2 (pid 9) exited");
        let other = error("recv with rank 0 did not complete within 10s");
        let judged = |time, last: &Option<Event>, status, line| {
            judge(&survivor(time, last.clone(), status), c, line)
        };
        assert_eq!(judged(Some(900), &named, None, None), v(false, Some(true)));
        // Late but named: a hang, and not misnamed.
        assert_eq!(judged(Some(5001), &named, None, None), v(true, Some(true)));
        assert_eq!(judged(None, &None, None, None), v(true, None));
        assert_eq!(judged(Some(10), &other, None, None), v(false, Some(false)));
        assert_eq!(judged(Some(6000), &other, None, None), v(true, Some(false)));
        let done = Some(Event::Done { rank: 1, iters: 4 });
        assert_eq!(judged(Some(10), &done, None, None), v(false, Some(false)));
        // Killed by efarun's SIGTERM (raw wait status 15) after efarun named the culprit.
        let line = "efarun: rank 2 was killed by signal 9 (SIGKILL); terminating the other 2 rank(s) in 1s unless they end first: 0, 1";
        assert_eq!(
            judged(Some(10), &None, Some(15), Some(line)),
            v(false, Some(true))
        );
        let line2 = "efarun: rank 1 exited with code 3; terminating the other 2 rank(s) in 1s unless they end first: 0, 2";
        assert_eq!(
            judged(Some(10), &None, Some(15), Some(line2)),
            v(false, Some(false))
        );
        // An exit code (raw status 3 << 8) with no report is not a signal: not named.
        assert_eq!(
            judged(Some(10), &None, Some(3 << 8), Some(line)),
            v(false, Some(false))
        );
    }

    #[test]
    fn specs_replay_and_cover() {
        let a: Vec<_> = (0..18).map(|i| spec(7, i)).collect();
        let b: Vec<_> = (0..18).map(|i| spec(7, i)).collect();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.victim, x.moment_ms, x.ranks),
                (y.victim, y.moment_ms, y.ranks)
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &a {
            assert!((3..=4).contains(&s.ranks));
            assert!(s.victim < s.ranks && s.held < s.ranks);
            seen.insert((s.fault, s.launch, s.workload));
        }
        assert_eq!(
            seen.len(),
            18,
            "18 runs cover every fault x launch x workload"
        );
        let quick: std::collections::BTreeSet<_> =
            a[..9].iter().map(|s| (s.fault, s.workload)).collect();
        assert_eq!(quick.len(), 9);
        for f in Fault::ALL {
            let launches: std::collections::BTreeSet<_> = a[..9]
                .iter()
                .filter(|s| s.fault == f)
                .map(|s| s.launch)
                .collect();
            assert_eq!(
                launches.len(),
                2,
                "the quick runs use both launches for {f}"
            );
        }
        for s in a.iter().filter(|s| s.fault == Fault::StoreKill) {
            assert_eq!(s.victim, 0);
            assert!(s.held >= 1 && s.moment_ms < JOIN_HOLD_MS);
        }
    }

    #[test]
    fn foreign_launcher_variables_are_removed() {
        for v in [
            "RANK",
            "MASTER_PORT",
            "EFA_STORE",
            "OMPI_COMM_WORLD_RANK",
            "SLURM_PROCID",
            "CHAOS_ITERS",
        ] {
            assert!(foreign_var(v), "{v}");
        }
        for v in ["PATH", "FI_TCP_IFACE", "HOME", "RUST_LOG"] {
            assert!(!foreign_var(v), "{v}");
        }
    }
}
