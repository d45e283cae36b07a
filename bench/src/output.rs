//! The one output writer: fabtests' `show_perf` table, OSU's two-column format, or JSON lines
//! with provenance. Column formats are copied from fabtests `common/shared.c` so that numbers
//! can be laid side by side with `fi_pingpong`/`fi_bw`.

use std::io::Write;

use serde::{Deserialize, Serialize};

/// fabtests' `size_str`: 1k, 1.5k, 64k, 1m, ...
pub fn size_str(size: u64) -> String {
    let (base, mag) = if size >= 1 << 30 {
        (1u64 << 30, "g")
    } else if size >= 1 << 20 {
        (1 << 20, "m")
    } else if size >= 1 << 10 {
        (1 << 10, "k")
    } else {
        (1, "")
    };
    let fraction = if size / base < 10 {
        (size % base) * 10 / base
    } else {
        0
    };
    if fraction > 0 {
        format!("{}.{}{}", size / base, fraction, mag)
    } else {
        format!("{}{}", size / base, mag)
    }
}

/// fabtests' `cnt_str`: 10k, 1m, ...
pub fn cnt_str(cnt: u64) -> String {
    if cnt >= 1_000_000_000 {
        format!("{}b", cnt / 1_000_000_000)
    } else if cnt >= 1_000_000 {
        format!("{}m", cnt / 1_000_000)
    } else if cnt >= 1000 {
        format!("{}k", cnt / 1000)
    } else {
        format!("{cnt}")
    }
}

/// The fabtests header, exactly as `show_perf` prints it.
pub fn fabtests_header() -> String {
    format!(
        "{:<8}{:<8}{:<8}{:>8} {:>10}{:>13}{:>13}",
        "bytes", "iters", "total", "time", "MB/sec", "usec/xfer", "Mxfers/sec"
    )
}

/// What was measured for one size.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub bytes: usize,
    /// Timed iterations (messages for bandwidth tests).
    pub iters: usize,
    /// Transfers per iteration (2 for a ping-pong round trip).
    pub xfers_per_iter: usize,
    pub elapsed_ns: u64,
    /// Per-transfer time percentiles, in nanoseconds.
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl Measured {
    fn elapsed_us(&self) -> f64 {
        (self.elapsed_ns as f64 / 1000.0).max(1e-3)
    }
    pub fn total_bytes(&self) -> u64 {
        (self.iters * self.bytes * self.xfers_per_iter) as u64
    }
    pub fn mb_per_sec(&self) -> f64 {
        self.total_bytes() as f64 / self.elapsed_us()
    }
    pub fn usec_per_xfer(&self) -> f64 {
        self.elapsed_us() / self.iters as f64 / self.xfers_per_iter as f64
    }
}

/// Who measured what where: written with every JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    pub bench: String,
    pub provider: String,
    pub domain: String,
    /// How the bytes travelled: `fabric-direct/<provider>` for now (efa-core routes later).
    pub route: String,
    pub api: String,
    pub window: usize,
    pub libfabric: String,
    pub host: String,
    pub git_rev: String,
}

/// One JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub prov: Provenance,
    pub bytes: u64,
    pub iters: u64,
    pub total: u64,
    pub time_s: f64,
    pub mb_per_sec: f64,
    pub usec_per_xfer: f64,
    pub mxfers_per_sec: f64,
    /// Per-transfer latency percentiles in microseconds (half round trip for pingpong,
    /// per operation for RMA, per message within a window for bandwidth runs).
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Fabtests,
    Osu,
    Json,
}

/// Whether the OSU format shows latency or bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Latency,
    Bandwidth,
    /// Bandwidth of both directions together (osu_bibw).
    BiBandwidth,
}

#[derive(Debug)]
pub struct Writer {
    format: Format,
    metric: Metric,
    prov: Provenance,
    header_done: bool,
    /// Everything written, for `--plot`.
    pub records: Vec<Record>,
}

impl Writer {
    pub fn new(format: Format, metric: Metric, prov: Provenance) -> Writer {
        Writer {
            format,
            metric,
            prov,
            header_done: false,
            records: Vec::new(),
        }
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn record(&self, m: &Measured) -> Record {
        Record {
            prov: self.prov.clone(),
            bytes: m.bytes as u64,
            iters: m.iters as u64,
            total: m.total_bytes(),
            time_s: m.elapsed_ns as f64 / 1e9,
            mb_per_sec: m.mb_per_sec(),
            usec_per_xfer: m.usec_per_xfer(),
            mxfers_per_sec: 1.0 / m.usec_per_xfer(),
            p50: m.p50_ns as f64 / 1000.0,
            p99: m.p99_ns as f64 / 1000.0,
            max: m.max_ns as f64 / 1000.0,
        }
    }

    /// Formats one row (with the header first time) as the chosen format prints it.
    pub fn format_row(&mut self, m: &Measured) -> String {
        let rec = self.record(m);
        let mut s = String::new();
        match self.format {
            Format::Fabtests => {
                if !self.header_done {
                    s.push_str(&fabtests_header());
                    s.push('\n');
                }
                // show_perf: "%-8s%-8s%-8s%8.2fs%10.2f%11.2f%11.2f"
                s.push_str(&format!(
                    "{:<8}{:<8}{:<8}{:>8.2}s{:>10.2}{:>11.2}{:>11.2}\n",
                    size_str(rec.bytes),
                    cnt_str(rec.iters),
                    size_str(rec.total),
                    rec.time_s,
                    rec.mb_per_sec,
                    rec.usec_per_xfer,
                    rec.mxfers_per_sec
                ));
            }
            Format::Osu => {
                if !self.header_done {
                    let (title, col) = match self.metric {
                        Metric::Latency => ("Latency Test", "Latency (us)"),
                        Metric::Bandwidth => ("Bandwidth Test", "Bandwidth (MB/s)"),
                        Metric::BiBandwidth => {
                            ("Bi-Directional Bandwidth Test", "Bandwidth (MB/s)")
                        }
                    };
                    s.push_str(&format!(
                        "# efa-bench {} {title} ({})\n{:<10}{:>20}\n",
                        self.prov.bench, self.prov.provider, "# Size", col
                    ));
                }
                let v = match self.metric {
                    Metric::Latency => rec.usec_per_xfer,
                    Metric::Bandwidth | Metric::BiBandwidth => rec.mb_per_sec,
                };
                s.push_str(&format!("{:<10}{:>20.2}\n", rec.bytes, v));
            }
            Format::Json => {
                s.push_str(&serde_json::to_string(&rec).expect("record serializes"));
                s.push('\n');
            }
        }
        self.header_done = true;
        self.records.push(rec);
        s
    }

    /// Writes one row to stdout and flushes it (so a long sweep shows rows as they finish).
    pub fn row(&mut self, m: &Measured) -> std::io::Result<()> {
        let s = self.format_row(m);
        let mut out = std::io::stdout().lock();
        out.write_all(s.as_bytes())?;
        out.flush()
    }
}

// ---- nccl-tests format (the collectives) ---------------------------------------------------

/// nccl-tests' column header, out-of-place section only (`common.cu`'s format strings with
/// the in-place columns left out), three lines.
pub fn nccl_header() -> String {
    format!(
        "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}           out-of-place\n\
         # {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6} {:>6}\n\
         # {:>10}  {:>12}  {:>8}  {:>6}  {:>6}  {:>7}  {:>6}  {:>6}",
        "",
        "",
        "",
        "",
        "",
        "size",
        "count",
        "type",
        "redop",
        "root",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "(B)",
        "(elements)",
        "",
        "",
        "",
        "(us)",
        "(GB/s)",
        "(GB/s)"
    )
}

/// One nccl-tests row: `%12li  %12li  %8s  %6s  %6i` then `  %7s  %6.2f  %6.2f  %5s`, with
/// the time as `%7.2f` below 100 us, `%7.1f` below 10 ms, else `%7.0f`; `#wrong` is `N/A`
/// when results were not checked.
#[allow(clippy::too_many_arguments)]
pub fn nccl_row(
    size: usize,
    count: usize,
    dtype: &str,
    redop: &str,
    root: i64,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: Option<u64>,
) -> String {
    let time = if time_us >= 10000.0 {
        format!("{time_us:>7.0}")
    } else if time_us >= 100.0 {
        format!("{time_us:>7.1}")
    } else {
        format!("{time_us:>7.2}")
    };
    let wrong = wrong.map_or_else(|| "N/A".to_string(), |w| w.to_string());
    format!(
        "{size:>12}  {count:>12}  {dtype:>8}  {redop:>6}  {root:>6}  {time:>7}  {algbw:>6.2}  \
         {busbw:>6.2}  {wrong:>5}"
    )
}

/// One `--json` line of a collective benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollRecord {
    pub bench: String,
    /// Bytes, as nccl-tests' `size` column.
    pub size: u64,
    /// Elements, as nccl-tests' `count` column.
    pub count: u64,
    #[serde(rename = "type")]
    pub dtype: String,
    pub redop: String,
    pub root: i64,
    pub nranks: u32,
    pub iters: u64,
    pub warmup: u64,
    /// Max over ranks of the mean per-iteration time, microseconds.
    pub time_us: f64,
    pub algbw: f64,
    pub busbw: f64,
    /// Wrong elements summed over ranks; `null` when not checked (`-c 0`).
    pub wrong: Option<u64>,
    /// Per-iteration time percentiles in microseconds, each the max over ranks.
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// `EFA_ALLREDUCE_ALGO` (or `auto`).
    pub algorithm: String,
    /// Every rank's route to every peer: `src->dst transport provider`.
    pub routes: Vec<String>,
    /// Distinct `transport/provider` pairs in use.
    pub route: String,
    pub libfabric: String,
    pub host: String,
    pub git_rev: String,
}

/// p50, p99 and max of `samples` (sorted in place; called outside the timed loop).
pub fn percentiles(samples: &mut [u64]) -> (u64, u64, u64) {
    if samples.is_empty() {
        return (0, 0, 0);
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |q: usize| samples[((n * q).div_ceil(100)).clamp(1, n) - 1];
    (at(50), at(99), samples[n - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fabtests_strings() {
        assert_eq!(size_str(0), "0");
        assert_eq!(size_str(64), "64");
        assert_eq!(size_str(1024), "1k");
        assert_eq!(size_str(1536), "1.5k");
        assert_eq!(size_str(128_000), "125k");
        assert_eq!(size_str(4 << 20), "4m");
        assert_eq!(cnt_str(1000), "1k");
        assert_eq!(cnt_str(999), "999");
        assert_eq!(
            fabtests_header(),
            "bytes   iters   total       time     MB/sec    usec/xfer   Mxfers/sec"
        );
    }

    #[test]
    fn fabtests_row_matches_show_perf() {
        let prov = Provenance {
            bench: "pingpong".into(),
            provider: "tcp;ofi_rxm".into(),
            domain: "lo".into(),
            route: "fabric-direct/tcp;ofi_rxm".into(),
            api: "raw".into(),
            window: 1,
            libfabric: "1.17".into(),
            host: "h".into(),
            git_rev: "x".into(),
        };
        let mut w = Writer::new(Format::Fabtests, Metric::Latency, prov);
        // fi_pingpong: "64      1k      =1k      125k        0.07s      1.81      35.35       0.03"
        let m = Measured {
            bytes: 64,
            iters: 1000,
            xfers_per_iter: 2,
            elapsed_ns: 70_700_000,
            p50_ns: 1,
            p99_ns: 2,
            max_ns: 3,
        };
        let s = w.format_row(&m);
        let row = s.lines().nth(1).unwrap();
        assert_eq!(
            row,
            "64      1k      125k        0.07s      1.81      35.35       0.03"
        );
    }

    #[test]
    fn nccl_format_matches_nccl_tests() {
        let h = nccl_header();
        let lines: Vec<&str> = h.lines().collect();
        assert_eq!(
            lines[1],
            "#       size         count      type   redop    root     time   algbw   busbw #wrong"
        );
        assert_eq!(
            lines[2],
            "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)"
        );
        // From an nccl-tests run: "           8             2     float     sum      -1    19.24    0.00    0.00      0"
        assert_eq!(
            nccl_row(8, 2, "float", "sum", -1, 19.24, 0.0, 0.0, Some(0)),
            "           8             2     float     sum      -1    19.24    0.00    0.00      0"
        );
        assert_eq!(
            nccl_row(
                1048576,
                262144,
                "float",
                "sum",
                -1,
                105.9,
                9.9,
                17.33,
                Some(0)
            ),
            "     1048576        262144     float     sum      -1    105.9    9.90   17.33      0"
        );
        assert!(nccl_row(8, 2, "float", "sum", -1, 12345.6, 0.0, 0.0, None)
            .ends_with("    12346    0.00    0.00    N/A"));
    }

    #[test]
    fn percentile_picks() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut v), (50, 99, 100));
        assert_eq!(percentiles(&mut [7]), (7, 7, 7));
    }
}
