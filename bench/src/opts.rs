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
    about = "Point-to-point benchmarks for efa-rs, with fabtests/OSU-compatible output",
    long_about = "Point-to-point benchmarks for efa-rs, with fabtests/OSU-compatible output.\n\n\
        With no peer argument both sides run on this host (efa-bench spawns its own server \
        process). For two explicit processes run `efa-bench <bench> --listen PORT` on one side \
        and `efa-bench <bench> HOST:PORT` on the other; the TCP connection is used only to \
        exchange endpoint addresses and for barriers."
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
}

impl Cmd {
    pub fn common(&self) -> &Common {
        match self {
            Cmd::Pingpong(a) => &a.common,
            Cmd::Bw(a) => &a.common,
            Cmd::Rma(a) => &a.common,
        }
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

/// True for providers that run over IP and therefore must be pinned to an interface.
pub fn is_ip_provider(provider: &str) -> bool {
    let core = provider.split(';').next().unwrap_or(provider);
    matches!(core, "tcp" | "udp" | "sockets" | "net")
}

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
    fn providers_parse() {
        for ok in ["shm", "tcp;ofi_rxm", "udp;ofi_rxd", "efa"] {
            assert!(parse_provider(ok).is_ok(), "{ok}");
        }
        for bad in ["", "tcp;", "TCP", "tcp;ofi_rxm;x", "tcp ofi_rxm"] {
            assert!(parse_provider(bad).is_err(), "{bad}");
        }
    }
}
