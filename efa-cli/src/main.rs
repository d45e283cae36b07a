//! `efa`: what this host offers efa-rs, and what is wrong with it.
//!
//! * `efa info` lists every libfabric provider, fabric and domain with the limits that
//!   matter, says which endpoint the communicator opens for each role and why every other
//!   entry was not chosen, and explains the route to given peers.
//! * `efa doctor` checks the host (memlock, ptrace scope, huge pages, RDMA devices, fork
//!   safety, EFA device, security group, the IP interface) and prints a fix for each problem;
//!   it exits 1 if any check fails.
#![forbid(unsafe_code)]

mod doctor;
mod info;
mod net;
mod probe;
mod roles;
mod routes;
mod system;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use efa_core::placement::{Subnet, Transport};

use crate::doctor::{Check, SgProbe, Status};
use crate::info::Gathered;
use crate::system::System;

const ROLE_RULES: &str = "\
Roles and how they are chosen (efa_core::roles, which the communicator itself calls):
  intra-host  shm
  fabric      efa, else verbs;ofi_rxm
  IP          tcp;ofi_rxm, else net, else sockets
An entry qualifies if it has an FI_EP_RDM endpoint with MSG and TAGGED (RMA is wanted and
its absence noted) and fi_getinfo returns it for the communicator's hints (FI_THREAD_SAFE,
the MR modes efa-rs implements: LOCAL, VIRT_ADDR, ALLOCATED, PROV_KEY, ENDPOINT; for the IP
role FI_SOCKADDR_IN; for the fabric role EFA_FABRIC_ADDR as the source address).
The IP route's interface is EFA_IFACE if set; else lo when every rank runs on this host
(--local); else the first up, non-loopback interface with an IPv4 address. The IP role takes
the first IPv4 fabric libfabric lists on that interface.
The fabric role takes the first qualifying domain (the one holding EFA_FABRIC_ADDR if set).
EFA_TRANSPORTS (e.g. shm,tcp or ^fabric) removes roles. FI_PROVIDER hides providers inside
libfabric; FI_TCP_IFACE hides the tcp provider's other interfaces (it does not move the
communicator's IP route, which then falls back to net or sockets).";

/// What this host offers efa-rs, and what is wrong with it.
#[derive(Debug, Parser)]
#[command(name = "efa", version, about, long_about = None)]
struct Cli {
    /// Describe a job whose ranks all run on this host: the communicator then puts its IP
    /// route on lo. Default: a job spanning hosts.
    #[arg(long, global = true)]
    local: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List providers, fabrics and domains; say which endpoint each role uses and why the
    /// others were not chosen; explain routes to peers.
    #[command(after_help = ROLE_RULES)]
    Info(InfoArgs),
    /// Check memlock, ptrace scope, huge pages, RDMA devices, fork safety, the EFA device,
    /// the security group and the IP interface. Exit status 1 if any check FAILs.
    Doctor(DoctorArgs),
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// A running job's rendezvous store: host:port, tcp://host:port or file:///dir. efa
    /// reads the ranks' cards (`<tag>/<rank>`) and never writes.
    #[arg(long, value_name = "ADDR")]
    store: Option<String>,
    /// Number of ranks whose cards to read from --store.
    #[arg(long, value_name = "N", requires = "store")]
    world: Option<u32>,
    /// Key prefix of the cards in the store.
    #[arg(long, default_value = "efa/card")]
    tag: String,
    /// How long to wait for the store and for missing cards, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    wait_ms: u64,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// One JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// A peer as ADDR/PREFIX (10.0.1.7/24) or ADDR (takes this host's prefix); repeatable.
    /// The peer is assumed to open the same providers as this host.
    #[arg(long, value_name = "ADDR[/PREFIX]")]
    peer: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
struct DoctorArgs {
    /// A JSON array of checks instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
    /// With --store: send one empty tagged message over the fabric to each peer in this
    /// host's fabric subnet and report those that do not acknowledge it (a suspected
    /// security-group block).
    #[arg(long, requires = "store")]
    probe: bool,
    /// Also print what each passing check means.
    #[arg(long, short)]
    verbose: bool,
    /// How long to wait for each probe, in seconds.
    #[arg(long, value_name = "S", default_value_t = 5)]
    probe_timeout: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let sys = System::live();
    let g = match info::gather(&sys, cli.local) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("efa: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::Info(a) => run_info(&g, a),
        Cmd::Doctor(a) => run_doctor(&sys, &g, a),
    }
}

fn read_store(s: &StoreArgs) -> Option<Result<routes::StoreCards, String>> {
    let addr = s.store.as_ref()?;
    let Some(world) = s.world else {
        return Some(Err("--store needs --world N".into()));
    };
    Some(
        routes::read_cards(addr, world, &s.tag, Duration::from_millis(s.wait_ms))
            .map_err(|e| e.to_string()),
    )
}

fn run_info(g: &Gathered, a: InfoArgs) -> ExitCode {
    let facts = g.local_facts();
    let mut peers: Vec<Subnet> = Vec::new();
    for p in &a.peer {
        match routes::parse_peer(p, &facts) {
            Ok(s) => peers.push(s),
            Err(e) => {
                eprintln!("efa info: --peer {p}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut lines = routes::peer_routes(&facts, &peers, &g.settings.transports);
    let mut problems = Vec::new();
    match read_store(&a.store) {
        None => {}
        Some(Ok(sc)) => {
            lines.extend(routes::pair_routes(&sc.cards, &g.settings.transports));
            problems.extend(sc.problems);
        }
        Some(Err(e)) => problems.push(format!("store: {e}")),
    }
    if a.json {
        let doc = info::to_json(g, lines, problems);
        match serde_json::to_string_pretty(&doc) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("efa info: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", info::render(g, &lines, &problems));
    }
    ExitCode::SUCCESS
}

fn sg_probe(g: &Gathered, a: &DoctorArgs) -> Result<SgProbe, String> {
    let Some(store) = read_store(&a.store) else {
        return Ok(SgProbe::NoPeers);
    };
    let Some(fab) = g.chosen(Transport::Fabric) else {
        return Ok(SgProbe::NoFabric);
    };
    let sc = store?;
    let me = g.local_facts();
    let mut targets: Vec<(String, Vec<u8>)> = Vec::new();
    for c in &sc.cards {
        let same = match (me.fabric_subnet, c.fabric_subnet) {
            (Some(x), Some(y)) => x.same_subnet(&y),
            _ => false,
        };
        if let Some(e) = c
            .endpoints
            .iter()
            .find(|e| e.transport == Transport::Fabric && e.provider == fab.provider)
        {
            if same && !e.addr.is_empty() {
                targets.push((format!("rank {}", c.rank), e.addr.clone()));
            }
        }
    }
    let fabric_peers: Vec<String> = targets.iter().map(|(n, _)| n.clone()).collect();
    if !a.probe {
        return Ok(SgProbe::NotProbed { fabric_peers });
    }
    let res = probe::probe(
        &fab.provider,
        &fab.domain,
        &targets,
        Duration::from_secs(a.probe_timeout),
    )?;
    Ok(SgProbe::Probed {
        fabric_peers,
        failed: res
            .into_iter()
            .filter_map(|(n, r)| r.err().map(|e| (n, e)))
            .collect(),
    })
}

fn routes_check(g: &Gathered) -> Check {
    let names: Vec<String> = Transport::ALL
        .iter()
        .map(|r| {
            format!(
                "{}: {}",
                efa_core::roles::role_name(*r),
                g.chosen(*r).map_or("none", |d| d.provider.as_str())
            )
        })
        .collect();
    let value = names.join(", ");
    let fab_why = g.selection.role(Transport::Fabric).why.clone();
    let ip_why = g.selection.role(Transport::Ip).why.clone();
    let (status, detail, fix) = match (
        g.discovery_error.as_ref(),
        g.chosen(Transport::Fabric),
        g.chosen(Transport::Ip),
    ) {
        (Some(e), _, _) => (
            Status::Fail,
            format!("fi_getinfo failed: {e}"),
            Some("run `fi_info -l`; check LD_LIBRARY_PATH and FI_PROVIDER".to_string()),
        ),
        (None, None, None) => (
            Status::Fail,
            format!("no endpoint for peers on other hosts: fabric: {fab_why}; IP: {ip_why}"),
            Some(
                "unset FI_PROVIDER / EFA_TRANSPORTS / EFA_IFACE restrictions, or see `efa info`"
                    .into(),
            ),
        ),
        (None, Some(_), None) => (
            Status::Warn,
            format!("no IP route, so peers outside the fabric subnet are unreachable: {ip_why}"),
            Some("see `efa info`".into()),
        ),
        (None, None, Some(_)) => (
            Status::Pass,
            format!("peers off this host use IP; no fabric: {fab_why}"),
            None,
        ),
        (None, Some(_), Some(_)) => (Status::Pass, "fabric and IP available".into(), None),
    };
    Check {
        check: "routes".into(),
        status,
        value,
        detail,
        fix,
    }
}

fn run_doctor(sys: &System, g: &Gathered, a: DoctorArgs) -> ExitCode {
    let efa_present = g.rdma.devices().iter().any(|d| d.is_efa());
    let efa_listed = g.offers.iter().any(|d| d.provider == "efa");
    let mut checks = vec![
        doctor::check_memlock(&sys.memlock()),
        doctor::check_ptrace(sys),
        doctor::check_hugepages(sys, efa_present),
    ];
    checks.extend(doctor::check_rdma(
        sys,
        &g.rdma,
        g.ip_iface.name_or_placeholder(),
    ));
    checks.push(doctor::check_fork(sys, &g.rdma));
    checks.push(doctor::check_efa(sys, &g.rdma, g.libfabric, efa_listed));
    checks.push(routes_check(g));
    checks.push(match sg_probe(g, &a) {
        Ok(p) => doctor::check_security_group(&p),
        Err(e) => Check {
            check: "security group".into(),
            status: Status::Warn,
            value: "not probed".into(),
            detail: format!("could not probe: {e}"),
            fix: Some(doctor::SG_RULE.into()),
        },
    });
    checks.push(doctor::check_iface(sys, &g.ip_iface));
    if a.json {
        match serde_json::to_string_pretty(&checks) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("efa doctor: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", render_checks(&checks, a.verbose));
    }
    if doctor::any_fail(&checks) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn render_checks(checks: &[Check], verbose: bool) -> String {
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| vec![c.status.to_string(), c.check.clone(), c.value.clone()])
        .collect();
    let w = checks
        .iter()
        .map(|c| c.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut o = String::new();
    o.push_str(&format!("{:<6}  {:<w$}  VALUE\n", "STATUS", "CHECK"));
    for (c, r) in checks.iter().zip(&rows) {
        o.push_str(&format!("{:<6}  {:<w$}  {}\n", r[0], r[1], r[2]));
        if c.status != Status::Pass || verbose {
            let pad = " ".repeat(8);
            o.push_str(&format!("{pad}why: {}\n", c.detail));
            if let Some(f) = &c.fix {
                o.push_str(&format!("{pad}fix: {f}\n"));
            }
        }
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    o.push_str(&format!(
        "\nefa doctor: {} PASS, {} WARN, {} FAIL, {} SKIP\n",
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail),
        count(Status::Skip)
    ));
    o
}

/// Serializes a list of `Display` values as strings.
pub(crate) fn ser_display_vec<T: std::fmt::Display, S: serde::Serializer>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}
