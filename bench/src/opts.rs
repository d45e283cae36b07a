//! The one options struct shared by every benchmark (like fabtests' `shared.c` options), and
//! the parsers that reject bad values with a message saying what is expected.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// Largest size of the `-S all` sweep: 8 MiB, as in fabtests.
pub const MAX_SWEEP: usize = 8 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "efa-bench",
    version,
    about = "Benchmarks for efa-rs, with fabtests/OSU/nccl-tests-compatible output",
    long_about = "Benchmarks for efa-rs, with fabtests/OSU/nccl-tests-compatible output.\n\n\
        Point-to-point (pingpong, bw, rma): with no peer argument both sides run on this host \
        (efa-bench spawns its own server process). For two explicit processes run \
        `efa-bench <bench> --listen PORT` on one side and `efa-bench <bench> HOST:PORT` on the \
        other; the TCP connection is used only to exchange endpoint addresses and for \
        barriers.\n\n\
        Collectives (allreduce, broadcast, allgather, reduce-scatter, alltoall) run on an \
        efa-core communicator: under a launcher (efarun, mpirun, srun, torchrun) every rank \
        runs the benchmark and rank 0 prints; without one, `-N` copies are started on this \
        host.\n\n\
        OSU point-to-point tests (osu-latency, osu-bw, osu-bibw) run through the \
        communicator too, with OSU's method, iteration counts and columns, on exactly 2 \
        ranks (started on this host when there is no launcher). `rss` prints the resident \
        memory of each rank of an idle job."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Latency: half the round trip of a tagged message (fi_pingpong, osu_latency).
    Pingpong(PingpongArgs),
    /// Streaming bandwidth with a window of outstanding messages (fi_bw, osu_bw).
    Bw(BwArgs),
    /// RMA put (fi_write) / get (fi_read) latency (-W 1) or bandwidth (-W > 1).
    Rma(RmaArgs),
    /// Out-of-place allreduce on an efa-core communicator (nccl-tests all_reduce_perf).
    Allreduce(CollArgs),
    /// Broadcast from `-r ROOT`, in place (nccl-tests broadcast_perf).
    Broadcast(CollArgs),
    /// Out-of-place allgather (nccl-tests all_gather_perf).
    Allgather(CollArgs),
    /// Out-of-place reduce-scatter (nccl-tests reduce_scatter_perf).
    ReduceScatter(CollArgs),
    /// Out-of-place all-to-all (nccl-tests alltoall_perf).
    Alltoall(CollArgs),
    /// osu_latency through the communicator: blocking send/recv ping-pong between 2 ranks,
    /// half the round trip in us.
    OsuLatency(OsuArgs),
    /// osu_bw through the communicator: windows of non-blocking sends, each acknowledged by
    /// the receiver; MB/s.
    OsuBw(OsuArgs),
    /// osu_bibw through the communicator: both ranks send a window to each other at once;
    /// MB/s of both directions together.
    OsuBibw(OsuArgs),
    /// Resident memory per rank of an idle job, after init and after some traffic, with a
    /// breakdown (heap, thread stacks, shm region, other anonymous, files) from smaps.
    Rss(RssArgs),
    /// The bootstrap of N ranks simulated in this process (one thread per rank, a real TCP
    /// store on loopback): time, store requests and bytes per N, and the fitted exponent.
    BootstrapScale(ScaleArgs),
}

impl Cmd {
    /// The point-to-point options, `None` for the collectives.
    pub fn common(&self) -> Option<&Common> {
        match self {
            Cmd::Pingpong(a) => Some(&a.common),
            Cmd::Bw(a) => Some(&a.common),
            Cmd::Rma(a) => Some(&a.common),
            _ => None,
        }
    }

    /// The collective and its options, `None` for the point-to-point benchmarks.
    pub fn collective(&self) -> Option<(Collective, &CollArgs)> {
        match self {
            Cmd::Allreduce(a) => Some((Collective::Allreduce, a)),
            Cmd::Broadcast(a) => Some((Collective::Broadcast, a)),
            Cmd::Allgather(a) => Some((Collective::Allgather, a)),
            Cmd::ReduceScatter(a) => Some((Collective::ReduceScatter, a)),
            Cmd::Alltoall(a) => Some((Collective::Alltoall, a)),
            _ => None,
        }
    }

    /// The OSU point-to-point benchmark through the communicator and its options.
    pub fn osu(&self) -> Option<(OsuTest, &OsuArgs)> {
        match self {
            Cmd::OsuLatency(a) => Some((OsuTest::Latency, a)),
            Cmd::OsuBw(a) => Some((OsuTest::Bw, a)),
            Cmd::OsuBibw(a) => Some((OsuTest::Bibw, a)),
            _ => None,
        }
    }
}

/// How the cards travel in `efa-bench bootstrap-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExchangeMode {
    /// Each rank receives its host's cards; the rest stay in the store for look-ups.
    Grouped,
    /// Each rank receives every card, in one gather request.
    All,
    /// The protocol before issue 17: one GET per card (N² requests).
    Keys,
    /// Cards allgathered over the ranks' own TCP connections (recursive doubling).
    Peers,
}

impl ExchangeMode {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ExchangeMode::Grouped => "grouped",
            ExchangeMode::All => "all",
            ExchangeMode::Keys => "keys",
            ExchangeMode::Peers => "peers",
        }
    }
}

/// Options of `efa-bench bootstrap-scale`.
#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// Numbers of ranks to run, one after the other (`k` = 1024).
    #[arg(short = 'N', long = "ranks", default_value = "64,256,1k,2k,4k", value_parser = parse_sizes)]
    pub ranks: Sizes,
    /// How the cards travel.
    #[arg(long, value_enum, default_value_t = ExchangeMode::Grouped)]
    pub mode: ExchangeMode,
    /// Bytes of each rank's card (a real card is about 200).
    #[arg(long, default_value_t = 200, value_parser = parse_positive)]
    pub card: usize,
    /// Ranks per simulated host (p5 and hpc7a: 96 or 192).
    #[arg(long, default_value_t = 96, value_parser = parse_u32_positive)]
    pub per_host: u32,
    /// Seconds each rank may take (its bootstrap deadline).
    #[arg(long, default_value_t = 120.0, value_parser = parse_timeout)]
    pub timeout: f64,
    /// One JSON object per size instead of the table (the summary line stays).
    #[arg(long)]
    pub json: bool,
}

fn parse_u32_positive(s: &str) -> Result<u32, String> {
    parse_positive(s).and_then(|n| u32::try_from(n).map_err(|_| format!("'{s}' is too large")))
}

/// Options of `efa-bench rss`.
#[derive(Debug, Clone, Args)]
pub struct RssArgs {
    /// Ranks to start on this host when not under a launcher (default 2).
    #[arg(short = 'N', long = "nranks", default_value_t = 2, value_parser = parse_positive)]
    pub nranks: usize,
    /// Seconds each rank stays idle before each measurement (lets background threads
    /// settle).
    #[arg(long, default_value_t = 0.2, value_parser = parse_idle)]
    pub idle: f64,
    /// Print one JSON object per rank and phase instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seconds any blocking call may take (the communicator's timeout). Default:
    /// `EFA_TIMEOUT`, else 60.
    #[arg(long, value_parser = parse_timeout)]
    pub timeout: Option<f64>,
}

fn parse_idle(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if (0.0..=60.0).contains(&t) => Ok(t),
        _ => Err(format!("'{s}' is not a number of seconds from 0 to 60")),
    }
}

/// An OSU point-to-point benchmark run through the communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsuTest {
    /// osu_latency.
    Latency,
    /// osu_bw.
    Bw,
    /// osu_bibw.
    Bibw,
}

/// OSU's `LARGE_MESSAGE_SIZE`: above it, the large-message iteration counts apply.
pub const OSU_LARGE: usize = 8192;
/// OSU's `MAX_MESSAGE_SIZE`: the default sweep ends at 4 MiB.
pub const OSU_MAX: usize = 4 << 20;

impl OsuTest {
    /// The subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            OsuTest::Latency => "osu-latency",
            OsuTest::Bw => "osu-bw",
            OsuTest::Bibw => "osu-bibw",
        }
    }

    /// OSU's (iterations, skip) for `size` (osu_util.h: `LAT_LOOP_SMALL` 10000 / `LAT_SKIP_SMALL`
    /// 100, `LAT_LOOP_LARGE` 1000 / 10; `BW_LOOP_SMALL` 100 / 10, `BW_LOOP_LARGE` 20 / 2;
    /// large means above [`OSU_LARGE`]). For the bandwidth tests an iteration is one window.
    pub fn default_counts(self, size: usize) -> (usize, usize) {
        let large = size > OSU_LARGE;
        match (self, large) {
            (OsuTest::Latency, false) => (10000, 100),
            (OsuTest::Latency, true) => (1000, 10),
            (_, false) => (100, 10),
            (_, true) => (20, 2),
        }
    }

    /// OSU's default sweep: 0 (latency) or 1 (bandwidth), then powers of two to 4 MiB.
    pub fn default_sizes(self) -> Vec<usize> {
        let min = if self == OsuTest::Latency { 0 } else { 1 };
        osu_sweep(min, OSU_MAX)
    }
}

/// OSU's sweep: `min`, then doubling (0 is followed by 1), up to `max`.
pub fn osu_sweep(min: usize, max: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut s = min;
    while s <= max {
        v.push(s);
        s = match s {
            0 => 1,
            _ => match s.checked_mul(2) {
                Some(n) => n,
                None => break,
            },
        };
    }
    v
}

/// OSU's `-m [MIN:]MAX` (bytes, with k/m/g suffixes here): the doubling sweep between them.
pub fn parse_message_size(s: &str) -> Result<Sizes, String> {
    let (min, max) = match s.split_once(':') {
        Some((a, b)) => (parse_size(a)?, parse_size(b)?),
        None => (0, parse_size(s)?),
    };
    if min > max {
        return Err(format!(
            "'{s}': MIN is larger than MAX (expected [MIN:]MAX, e.g. 8:4m)"
        ));
    }
    Ok(Sizes(osu_sweep(min, max)))
}

/// Options of the OSU benchmarks through the communicator. Flags follow the other
/// efa-bench subcommands, with OSU's spellings accepted too (`-i`, `-x`, `-m`).
#[derive(Debug, Clone, Args)]
pub struct OsuArgs {
    /// Sizes: one, a comma list (`8,1k,64k`) or `all`. Default: OSU's sweep, 0 (latency) or
    /// 1 (bandwidth) then powers of two up to 4 MiB.
    #[arg(short = 'S', long = "size", value_parser = parse_sizes, conflicts_with = "message_size")]
    pub sizes: Option<Sizes>,
    /// OSU's `-m [MIN:]MAX`: the doubling sweep from MIN (default 0) to MAX.
    #[arg(short = 'm', long = "message-size", value_parser = parse_message_size)]
    pub message_size: Option<Sizes>,
    /// Timed iterations per size (OSU's `-i`; a bandwidth iteration is one window). Default
    /// OSU's: latency 10000 up to 8 KiB, 1000 above; bandwidth 100 up to 8 KiB, 20 above.
    #[arg(short = 'I', short_alias = 'i', long = "iters", alias = "iterations", value_parser = parse_positive)]
    pub iters: Option<usize>,
    /// Untimed warm-up iterations per size (OSU's `-x`). Default OSU's: latency 100 up to
    /// 8 KiB, 10 above; bandwidth 10 up to 8 KiB, 2 above.
    #[arg(short = 'w', short_alias = 'x', long = "warmup")]
    pub warmup: Option<usize>,
    /// Messages in flight per window (osu_bw/osu_bibw's `-W`), default 64 as OSU.
    #[arg(short = 'W', long = "window", default_value_t = 64, value_parser = parse_positive)]
    pub window: usize,
    /// Print one JSON object per size (with provenance and per-iteration p50/p99/max, which
    /// costs one clock read per iteration) instead of OSU's two columns.
    #[arg(long)]
    pub json: bool,
    /// Seconds any blocking call may take before the run fails (the communicator's
    /// timeout). Default: `EFA_TIMEOUT`, else 60.
    #[arg(long, value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Flows (TCP connections) per peer on the IP route, 1 to 64: sets the communicator's
    /// `EFA_IP_FLOWS` (`EFA_IP_STRIPE_MIN` and `EFA_IP_STRIPE` still apply). Default:
    /// `EFA_IP_FLOWS`, else 8 on an AWS ENA interface and 1 elsewhere. Other routes ignore
    /// it.
    #[arg(long, value_parser = parse_flows)]
    pub flows: Option<usize>,
}

fn parse_flows(s: &str) -> Result<usize, String> {
    let max = efa_core::comm::stripe::MAX_FLOWS;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a flow count from 1 to {max}")),
    }
}

impl OsuArgs {
    /// The sizes to run.
    pub fn sizes(&self, test: OsuTest) -> Vec<usize> {
        self.sizes
            .as_ref()
            .or(self.message_size.as_ref())
            .map(|s| s.0.clone())
            .unwrap_or_else(|| test.default_sizes())
    }

    /// (timed iterations, warm-up iterations) for `size`.
    pub fn counts(&self, test: OsuTest, size: usize) -> (usize, usize) {
        let (i, w) = test.default_counts(size);
        (self.iters.unwrap_or(i), self.warmup.unwrap_or(w))
    }
}

/// A collective benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    Allreduce,
    Broadcast,
    Allgather,
    ReduceScatter,
    Alltoall,
}

/// Options of the collective benchmarks: nccl-tests' flags and defaults where they exist
/// (except the size range: nccl-tests defaults to one size, 32 MiB; we sweep 8 B..64 MiB).
#[derive(Debug, Clone, Args)]
pub struct CollArgs {
    /// Smallest size in bytes (`8`, `4k`, `1m`), as nccl-tests' `-b/--minbytes`.
    #[arg(short = 'b', long = "minbytes", default_value = "8", value_parser = parse_size)]
    pub minbytes: usize,
    /// Largest size in bytes, as nccl-tests' `-e/--maxbytes`.
    #[arg(short = 'e', long = "maxbytes", default_value = "64m", value_parser = parse_size)]
    pub maxbytes: usize,
    /// Multiply the size by this factor between steps (nccl-tests' `-f/--stepfactor`).
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2, value_parser = parse_factor)]
    pub stepfactor: usize,
    /// Timed iterations per size (nccl-tests' `-n/--iters`).
    #[arg(short = 'n', long = "iters", default_value_t = 20, value_parser = parse_positive)]
    pub iters: usize,
    /// Untimed warm-up iterations per size (nccl-tests' `-w/--warmup_iters`).
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 5)]
    pub warmup: usize,
    /// Check the result of the last iteration against the locally computed expected value
    /// and count wrong elements in `#wrong` (nccl-tests' `-c/--check`): 0 or 1.
    #[arg(short = 'c', long = "check", default_value_t = 1, value_parser = parse_check)]
    pub check: u8,
    /// Element type, by nccl-tests name: int8, uint8, int32, uint32, int64, uint64, half,
    /// float, double, bfloat16.
    #[arg(short = 'd', long = "datatype", default_value = "float", value_parser = parse_dtype)]
    pub dtype: DataType,
    /// Reduction operator (allreduce, reduce-scatter): sum, prod, min, max, avg.
    #[arg(short = 'o', long = "op", default_value = "sum", value_parser = parse_op)]
    pub op: Op,
    /// Root rank (broadcast), as nccl-tests' `-r/--root`.
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    pub root: u32,
    /// Ranks to start on this host when not under a launcher (efarun, mpirun, srun,
    /// torchrun). Under a launcher the launcher's world size is used.
    #[arg(short = 'N', long = "nranks", value_parser = parse_positive)]
    pub nranks: Option<usize>,
    /// Print one JSON object per size (with provenance and p50/p99/max) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seconds any collective may take before the run fails (the communicator's timeout).
    /// Default: `EFA_TIMEOUT`, else 60.
    #[arg(long, value_parser = parse_timeout)]
    pub timeout: Option<f64>,
}

impl CollArgs {
    /// The sizes nccl-tests would run: `minbytes`, times `stepfactor`, up to `maxbytes`.
    pub fn sizes(&self) -> Vec<usize> {
        let mut v = Vec::new();
        let mut s = self.minbytes;
        while s <= self.maxbytes {
            v.push(s);
            if s == 0 {
                s = 1;
                continue;
            }
            match s.checked_mul(self.stepfactor) {
                Some(n) => s = n,
                None => break,
            }
        }
        v
    }

    /// Checks what clap cannot (relations between flags).
    pub fn validate(&self) -> Result<(), String> {
        if self.minbytes > self.maxbytes {
            return Err(format!(
                "-b/--minbytes ({}) is larger than -e/--maxbytes ({})",
                self.minbytes, self.maxbytes
            ));
        }
        Ok(())
    }
}

/// An element type, with nccl-tests' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Int8,
    Uint8,
    Int32,
    Uint32,
    Int64,
    Uint64,
    Half,
    Float,
    Double,
    Bfloat16,
}

/// (nccl-tests name, aliases, type)
const DTYPES: &[(&str, &[&str], DataType)] = &[
    ("int8", &["char", "i8"], DataType::Int8),
    ("uint8", &["u8"], DataType::Uint8),
    ("int32", &["int", "i32"], DataType::Int32),
    ("uint32", &["u32"], DataType::Uint32),
    ("int64", &["i64"], DataType::Int64),
    ("uint64", &["u64"], DataType::Uint64),
    ("half", &["float16", "fp16", "f16"], DataType::Half),
    ("float", &["float32", "fp32", "f32"], DataType::Float),
    ("double", &["float64", "fp64", "f64"], DataType::Double),
    ("bfloat16", &["bf16"], DataType::Bfloat16),
];

impl DataType {
    /// nccl-tests' name (the `type` column).
    pub fn name(self) -> &'static str {
        DTYPES
            .iter()
            .find(|(_, _, t)| *t == self)
            .map(|(n, _, _)| *n)
            .expect("every type is listed")
    }
}

pub fn parse_dtype(s: &str) -> Result<DataType, String> {
    let l = s.to_ascii_lowercase();
    DTYPES
        .iter()
        .find(|(n, a, _)| *n == l || a.contains(&l.as_str()))
        .map(|(_, _, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = DTYPES.iter().map(|(n, _, _)| *n).collect();
            format!(
                "'{s}' is not a supported data type (expected one of: {})",
                names.join(", ")
            )
        })
}

/// A reduction operator, with nccl-tests' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Sum,
    Prod,
    Min,
    Max,
    Avg,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Sum => "sum",
            Op::Prod => "prod",
            Op::Min => "min",
            Op::Max => "max",
            Op::Avg => "avg",
        }
    }
}

pub fn parse_op(s: &str) -> Result<Op, String> {
    match s.to_ascii_lowercase().as_str() {
        "sum" => Ok(Op::Sum),
        "prod" => Ok(Op::Prod),
        "min" => Ok(Op::Min),
        "max" => Ok(Op::Max),
        "avg" => Ok(Op::Avg),
        _ => Err(format!(
            "'{s}' is not a supported reduction (expected one of: sum, prod, min, max, avg)"
        )),
    }
}

fn parse_factor(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(format!(
            "'{s}': the step factor must be an integer of at least 2 (each size is the \
             previous one times it)"
        )),
    }
}

fn parse_check(s: &str) -> Result<u8, String> {
    match s {
        "0" => Ok(0),
        "1" => Ok(1),
        _ => Err(format!("'{s}': expected 0 (no check) or 1 (check results)")),
    }
}

/// Which data-path API the timed loops use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `unsafe fn post_*` with reusable `OpContext`s and a busy-polled CQ: no allocation or
    /// clock read per operation (what fabtests does in C).
    Raw,
    /// The safe owned-buffer API (`Endpoint::tsend`/`trecv` + `Pending::wait`) with
    /// `RegisteredBuf`s handed back and forth.
    Safe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RmaOp {
    /// Put: `fi_write`.
    Write,
    /// Get: `fi_read`.
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Server,
}

#[derive(Debug, Args)]
pub struct PingpongArgs {
    #[command(flatten)]
    pub common: Common,
    /// Data-path API for the timed loop (see README in bench/).
    #[arg(long, value_enum, default_value_t = Api::Raw)]
    pub api: Api,
}

#[derive(Debug, Args)]
pub struct BwArgs {
    #[command(flatten)]
    pub common: Common,
    /// Messages in flight before waiting for an ack (osu_bw's window).
    #[arg(short = 'W', long = "window", default_value_t = 64, value_parser = parse_positive)]
    pub window: usize,
}

#[derive(Debug, Args)]
pub struct RmaArgs {
    #[command(flatten)]
    pub common: Common,
    /// Operations in flight: 1 measures latency, more measures bandwidth.
    #[arg(short = 'W', long = "window", default_value_t = 1, value_parser = parse_positive)]
    pub window: usize,
    /// RMA operation.
    #[arg(long, value_enum, default_value_t = RmaOp::Write)]
    pub op: RmaOp,
}

/// Options every benchmark shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Provider, e.g. `shm`, `tcp;ofi_rxm`, `udp;ofi_rxd`, `efa`, `verbs;ofi_rxm`.
    #[arg(short = 'p', long = "provider", default_value = "tcp;ofi_rxm", value_parser = parse_provider)]
    pub provider: String,
    /// Domain (interface for IP providers). Default for tcp/udp/sockets: `lo`, so that traffic
    /// never leaves this host unless you name another interface.
    #[arg(short = 'd', long = "domain")]
    pub domain: Option<String>,
    /// Transfer size (`64`, `4k`, `1m`), a comma list (`8,1k,64k`) or `all`
    /// (0, 1, then 2^i and 1.5*2^i up to 8 MiB, like `fi_pingpong -S all`).
    /// Default: 64,256,1k,4k,64k,1m (fi_pingpong's default set).
    #[arg(short = 'S', long = "size", value_parser = parse_sizes)]
    pub sizes: Option<Sizes>,
    /// Timed iterations per size. Default as fabtests: 10000 below 64 KiB, 1000 below 1 MiB,
    /// 100 above (twice that for bandwidth tests).
    #[arg(short = 'I', long = "iters", value_parser = parse_positive)]
    pub iters: Option<usize>,
    /// Untimed warm-up iterations per size.
    #[arg(short = 'w', long = "warmup", default_value_t = 10)]
    pub warmup: usize,
    /// Seconds any single wait may take before the run fails (a dead peer gives an error,
    /// not a hang).
    #[arg(long, default_value_t = 10.0, value_parser = parse_timeout)]
    pub timeout: f64,
    /// Print OSU's `# Size Latency (us)` / `# Size Bandwidth (MB/s)` format.
    #[arg(long, conflicts_with = "json")]
    pub osu: bool,
    /// Print one JSON object per size (with provenance and p50/p99/max) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw latency or bandwidth against size (log-log) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Earlier `--json` output to overlay on the plot (repeatable).
    #[arg(long, value_name = "FILE.jsonl", requires = "plot")]
    pub baseline: Vec<PathBuf>,
    /// Run as the server of an explicit two-process run: listen for the client's out-of-band
    /// connection on PORT (127.0.0.1) or ADDR:PORT.
    #[arg(long, value_name = "PORT|ADDR:PORT", conflicts_with = "peer")]
    pub listen: Option<String>,
    /// Server to connect to (its `--listen` address). Without it (and without --listen)
    /// both sides run on this host.
    #[arg(value_name = "HOST:PORT")]
    pub peer: Option<String>,
    /// Internal: run as the spawned server side.
    #[arg(long, hide = true, value_enum)]
    pub role: Option<Role>,
    /// Internal: where the spawned server connects for the out-of-band exchange.
    #[arg(long, hide = true)]
    pub oob: Option<String>,
}

impl Common {
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.timeout)
    }
}

/// The sizes to sweep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes(pub Vec<usize>);

/// fi_pingpong's default sizes.
pub const DEFAULT_SIZES: &[usize] = &[64, 256, 1024, 4096, 65536, 1 << 20];

/// `fi_pingpong -S all`: 0, 1, then 2^i and 2^i + 2^(i-1), up to `max`.
pub fn all_sizes(max: usize) -> Vec<usize> {
    let mut v = vec![0, 1];
    let mut p = 2usize;
    while p <= max {
        v.push(p);
        if p + p / 2 <= max {
            v.push(p + p / 2);
        }
        p <<= 1;
    }
    v
}

/// fabtests' `size_to_count`.
pub fn default_iters(size: usize, bandwidth: bool) -> usize {
    let n = if size >= 1 << 20 {
        100
    } else if size >= 1 << 16 {
        1000
    } else {
        10000
    };
    if bandwidth {
        2 * n
    } else {
        n
    }
}

pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c))
            if c.is_ascii_alphabetic() && i > 0 && t[..i].bytes().all(|b| b.is_ascii_digit()) =>
        {
            let m = match c.to_ascii_lowercase() {
                'k' => 1usize << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => return Err(format!("'{s}': unknown size suffix '{c}' (use k, m or g)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (expected e.g. 64, 4k, 1m, or 'all')"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("'{s}' is too large"))
}

pub fn parse_sizes(s: &str) -> Result<Sizes, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(Sizes(all_sizes(MAX_SWEEP)));
    }
    let v = s
        .split(',')
        .map(parse_size)
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err("no sizes given".into());
    }
    Ok(Sizes(v))
}

pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive integer")),
    }
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t > 0.0 && t.is_finite() => Ok(t),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// A libfabric provider name: one or two `;`-separated lower-case names (core;utility).
pub fn parse_provider(s: &str) -> Result<String, String> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let parts: Vec<&str> = s.split(';').collect();
    if parts.len() <= 2 && parts.iter().all(|p| ok_part(p)) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a libfabric provider name: expected a core provider optionally \
             followed by ';' and a utility provider, e.g. 'shm', 'tcp;ofi_rxm', 'udp;ofi_rxd' \
             (see `fi_info -l`)"
        ))
    }
}

pub use efa_fabric::is_ip_provider;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_sizes("64").unwrap().0, vec![64]);
        assert_eq!(parse_sizes("8,1k,4M").unwrap().0, vec![8, 1024, 4 << 20]);
        assert!(parse_sizes("abc").is_err());
        assert!(parse_sizes("4x").is_err());
        let all = parse_sizes("all").unwrap().0;
        assert_eq!(&all[..6], &[0, 1, 2, 3, 4, 6]);
        assert_eq!(*all.last().unwrap(), 8 << 20);
    }

    #[test]
    fn collective_flags_parse() {
        assert_eq!(parse_dtype("float"), Ok(DataType::Float));
        assert_eq!(parse_dtype("BF16"), Ok(DataType::Bfloat16));
        assert!(parse_dtype("complex").unwrap_err().contains("bfloat16"));
        for t in DTYPES {
            assert_eq!(parse_dtype(t.0), Ok(t.2));
            assert_eq!(t.2.name(), t.0);
        }
        assert_eq!(parse_op("max"), Ok(Op::Max));
        assert!(parse_op("premulsum").is_err());
        assert!(parse_factor("1").is_err());
        assert_eq!(parse_factor("4"), Ok(4));
        assert!(parse_check("2").is_err());
    }

    #[test]
    fn collective_sizes_follow_nccl_tests() {
        use clap::Parser as _;
        let cli = Cli::parse_from(["efa-bench", "allreduce", "-b", "4k", "-e", "64m", "-f", "4"]);
        let (_, a) = cli.cmd.collective().unwrap();
        let v = a.sizes();
        assert_eq!(v.first(), Some(&4096));
        assert_eq!(v.last(), Some(&(64 << 20)));
        assert!(v.contains(&(1 << 20)));
        assert_eq!(v.len(), 8);
        let cli = Cli::parse_from(["efa-bench", "allreduce", "-b", "8", "-e", "4"]);
        assert!(cli.cmd.collective().unwrap().1.validate().is_err());
    }

    #[test]
    fn osu_sweeps_and_counts_follow_osu() {
        assert_eq!(OsuTest::Latency.default_sizes()[..4], [0, 1, 2, 4]);
        assert_eq!(OsuTest::Bw.default_sizes()[0], 1);
        assert_eq!(OsuTest::Bibw.default_sizes().last(), Some(&(4 << 20)));
        assert_eq!(OsuTest::Latency.default_sizes().len(), 24);
        assert_eq!(parse_message_size("8:64").unwrap().0, vec![8, 16, 32, 64]);
        assert_eq!(parse_message_size("4").unwrap().0, vec![0, 1, 2, 4]);
        assert!(parse_message_size("64:8").is_err());
        assert!(parse_message_size("x:8").is_err());
        // 8 KiB is still small; above it the large counts apply.
        assert_eq!(OsuTest::Latency.default_counts(8192), (10000, 100));
        assert_eq!(OsuTest::Latency.default_counts(8193), (1000, 10));
        assert_eq!(OsuTest::Bw.default_counts(8192), (100, 10));
        assert_eq!(OsuTest::Bibw.default_counts(1 << 20), (20, 2));
        use clap::Parser as _;
        assert!(Cli::try_parse_from(["efa-bench", "osu-bw", "--flows", "0"]).is_err());
        assert!(Cli::try_parse_from(["efa-bench", "osu-bw", "--flows", "65"]).is_err());
        let cli = Cli::parse_from(["efa-bench", "osu-bw", "--flows", "4"]);
        assert_eq!(cli.cmd.osu().unwrap().1.flows, Some(4));
        let cli = Cli::parse_from(["efa-bench", "osu-bw", "-i", "5", "-x", "1", "-m", "1:4"]);
        let (t, a) = cli.cmd.osu().unwrap();
        assert_eq!(t, OsuTest::Bw);
        assert_eq!(a.counts(t, 1 << 20), (5, 1));
        assert_eq!(a.sizes(t), vec![1, 2, 4]);
        assert_eq!(a.window, 64);
    }

    #[test]
    fn providers_parse() {
        for ok in ["shm", "tcp;ofi_rxm", "udp;ofi_rxd", "efa"] {
            assert!(parse_provider(ok).is_ok(), "{ok}");
        }
        for bad in ["", "tcp;", "TCP", "tcp;ofi_rxm;x", "tcp ofi_rxm"] {
            assert!(parse_provider(bad).is_err(), "{bad}");
        }
    }
}
