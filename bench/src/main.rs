//! `efa-bench`: benchmarks for efa-rs with fabtests/OSU/nccl-tests-compatible output.
//!
//! ```text
//! efa-bench pingpong -p shm -S 8,1k,64k        # both sides on this host
//! efa-bench bw -p 'tcp;ofi_rxm' -S 1m -W 64
//! efa-bench rma --op read -S all --json > rma.jsonl
//! efa-bench pingpong --listen 9000              # server of an explicit two-process run
//! efa-bench pingpong 127.0.0.1:9000             # its client
//! efa-bench allreduce -N 4 -b 8 -e 64m -f 4     # 4 local ranks, nccl-tests columns
//! efa-bench osu-latency -S 8,1k                  # 2 local ranks, through the communicator
//! efarun -n 2 efa-bench osu-bw -m 1:4m           # OSU's osu_bw method and columns
//! mpirun -n 2 efa-bench allreduce -d bfloat16 -o max --json
//! ```
//!
//! Structure (as fabtests' `shared.c`): [`opts`] is the one options struct, [`harness`] the
//! session setup and size sweep, [`output`] the one writer, [`benches`] the point-to-point
//! benchmarks, [`fab`] the allocation-free data path on efa-fabric, [`coll`] the
//! collectives on an efa-core communicator, [`osu`] OSU's point-to-point tests on one,
//! [`mem`] the resident memory of an idle job, [`scale`] the bootstrap of many simulated
//! ranks, and [`job`] the launcher-or-local-ranks choice
//! all three make.

mod benches;
mod coll;
mod fab;
mod harness;
mod job;
mod mem;
mod oob;
mod opts;
mod osu;
mod output;
mod plot;
mod scale;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use clap::Parser;

use harness::{RunConfig, Session};
use oob::Oob;
use opts::{Api, Cli, Cmd, Common, Sizes, DEFAULT_SIZES};
use output::{Format, Metric, Provenance, Writer};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub fn err(msg: impl Into<String>) -> Box<dyn std::error::Error + Send + Sync> {
    msg.into().into()
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EFA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("efa-bench: error: {e}");
        std::process::exit(1);
    }
}

fn config(cmd: &Cmd) -> RunConfig {
    let c = cmd.common().expect("a point-to-point benchmark");
    let mut sizes = c
        .sizes
        .clone()
        .unwrap_or_else(|| Sizes(DEFAULT_SIZES.to_vec()))
        .0;
    let (bench, window, api, op, bandwidth, xfers) = match cmd {
        Cmd::Pingpong(a) => ("pingpong", 1, a.api, None, false, 2),
        Cmd::Bw(a) => ("bw", a.window, Api::Raw, None, true, 1),
        Cmd::Rma(a) => ("rma", a.window, Api::Raw, Some(a.op), a.window > 1, 1),
        _ => unreachable!("collectives have no RunConfig"),
    };
    if bench == "rma" {
        // Zero-byte RMA is not meaningful (and some providers reject it).
        sizes.retain(|&s| s > 0);
    }
    RunConfig {
        bench: bench.into(),
        provider: c.provider.clone(),
        sizes,
        iters: c.iters,
        warmup: c.warmup,
        window,
        api,
        op,
        bandwidth,
        xfers_per_iter: xfers,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The spawned server is killed if the client fails, so nothing is left behind.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some((which, a)) = cli.cmd.collective() {
        a.validate().map_err(err)?;
        return job::run(a.nranks.unwrap_or(2), || coll::run_rank(which, a));
    }
    if let Cmd::BootstrapScale(a) = &cli.cmd {
        return scale::run(a);
    }
    if let Cmd::Rss(a) = &cli.cmd {
        return job::run(a.nranks, || mem::run_rank(a));
    }
    if let Some((which, a)) = cli.cmd.osu() {
        return job::run(2, || osu::run_rank(which, a));
    }
    let c: &Common = cli.cmd.common().expect("a point-to-point benchmark");
    let sub = match &cli.cmd {
        Cmd::Pingpong(_) => "pingpong",
        Cmd::Bw(_) => "bw",
        Cmd::Rma(_) => "rma",
        _ => unreachable!("collectives returned above"),
    };
    let timeout = c.timeout();
    // Server sides.
    if c.role.is_some() {
        let addr = c.oob.as_deref().ok_or_else(|| err("--role needs --oob"))?;
        let s = Session::server(c, Oob::connect(addr, timeout)?)?;
        return serve(s);
    }
    if let Some(l) = &c.listen {
        let addr = if l.contains(':') {
            l.clone()
        } else {
            format!("127.0.0.1:{l}")
        };
        let listener =
            TcpListener::bind(&addr).map_err(|e| err(format!("cannot listen on {addr}: {e}")))?;
        eprintln!(
            "efa-bench: {sub} server listening on {}",
            listener.local_addr()?
        );
        // A listening server waits for its client as long as it takes (a minute at most).
        let oob = Oob::accept(
            &listener,
            timeout.max(std::time::Duration::from_secs(60)),
            None,
        )?;
        let s = Session::server(c, oob)?;
        return serve(s);
    }
    // Client side: explicit peer, or spawn our own server on this host.
    let cfg = config(&cli.cmd);
    let mut guard = ChildGuard(None);
    let oob = match &c.peer {
        Some(p) => Oob::connect(p, timeout)?,
        None => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg(sub)
                .args(["--role", "server", "--oob", &format!("127.0.0.1:{port}")])
                .args(["-p", &c.provider, "--timeout", &c.timeout.to_string()]);
            if let Some(d) = &c.domain {
                cmd.args(["-d", d]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| err(format!("cannot spawn the server process: {e}")))?;
            guard.0 = Some(child);
            Oob::accept(&listener, timeout, guard.0.as_mut())?
        }
    };
    let mut s = Session::client(c, cfg, oob)?;
    let (maj, min) = efa_fabric::libfabric_version();
    let info = s.net.ep.info();
    let prov = Provenance {
        bench: match (&cli.cmd, s.cfg.op) {
            (Cmd::Rma(_), Some(op)) => format!("rma-{}", format!("{op:?}").to_lowercase()),
            _ => sub.to_string(),
        },
        provider: info.provider(),
        domain: info.domain(),
        route: format!("fabric-direct/{}", info.provider()),
        api: format!("{:?}", s.cfg.api).to_lowercase(),
        window: s.cfg.window,
        libfabric: format!("{maj}.{min}"),
        host: host_name(),
        git_rev: env!("EFA_BENCH_GIT_REV").to_string(),
    };
    let format = if c.json {
        Format::Json
    } else if c.osu {
        Format::Osu
    } else {
        Format::Fabtests
    };
    let metric = if s.cfg.bench == "bw" || (s.cfg.bench == "rma" && s.cfg.window > 1) {
        Metric::Bandwidth
    } else {
        Metric::Latency
    };
    let mut w = Writer::new(format, metric, prov);
    dispatch(&mut s, Some(&mut w))?;
    drop(s);
    if let Some(mut child) = guard.0.take() {
        let st = child.wait()?;
        if !st.success() {
            return Err(err(format!("the server process failed ({st})")));
        }
    }
    if let Some(p) = &c.plot {
        let baselines = c
            .baseline
            .iter()
            .map(|b| Ok((b.display().to_string(), plot::load_jsonl(b)?)))
            .collect::<Result<Vec<_>>>()?;
        plot::draw(p, w.metric(), &w.records, &baselines)?;
    }
    Ok(())
}

fn dispatch(s: &mut Session, w: Option<&mut Writer>) -> Result<()> {
    match s.cfg.bench.as_str() {
        "pingpong" => benches::pingpong(s, w),
        "bw" => benches::bw(s, w),
        "rma" => benches::rma(s, w),
        other => Err(err(format!("unknown benchmark '{other}' from client"))),
    }
}

fn serve(mut s: Session) -> Result<()> {
    let r = dispatch(&mut s, None);
    if let Err(e) = &r {
        let _ = s.oob.send(&format!("ERROR {e}"));
    }
    r
}
