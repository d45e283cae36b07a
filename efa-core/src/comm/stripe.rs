//! Striping the IP route over several flows (issue 15): the settings, the cut of a
//! rendezvous read into chunks, and the scheduler that hands each chunk to a flow.
//!
//! # Why
//! EC2 caps each flow (5-tuple: addresses, ports, protocol) between two instances at
//! 5-25 Gbit/s, far below the ENA limit. Over `tcp;ofi_rxm` each endpoint is its own TCP
//! connection, so the IP transport opens `K` endpoints in one domain ([`FlowSettings::flows`],
//! `EFA_IP_FLOWS`): `K` source ports, `K` flows. Memory registrations belong to the domain,
//! so every flow can read a peer's exposed buffer.
//!
//! # What moves on which flow
//! Control and eager messages always use flow 0 (their latency does not change). A
//! rendezvous read of at least [`FlowSettings::stripe_min`] bytes (`EFA_IP_STRIPE_MIN`,
//! default 256 KiB) is cut by [`chunks`] into pieces of at least [`CHUNK_MIN`] (64 KiB) and
//! the pieces are spread over the flows. The read completes when every piece has; order and
//! matching are the protocol core's and do not change.
//!
//! # The control rule ([`Striper`])
//! `EFA_IP_STRIPE=adaptive` (the default): each flow keeps a smoothed delivery rate `r`,
//! in bytes per second of the time it had data outstanding:
//! - a sample is `bytes completed / busy time`, measured over at least [`MIN_SAMPLE`]
//!   (200 µs) of busy time, so that completions seen together in one poll do not read as
//!   an infinite rate; a flow that goes idle before that drops the partial sample;
//! - `r <- r + GAIN * (sample - r)` with [`GAIN`] = 1/4 (about the last 4 samples count);
//!   a flow without a sample yet counts at the mean rate of those that have one (all equal
//!   when none has);
//! - each chunk goes to the flow whose expected finish, `(queued + chunk) / r`, is earliest
//!   (`queued`: its bytes posted and not yet completed, by every read under way). So a flow
//!   delivering at half the rate of the others is given about half the bytes, and the total
//!   approaches the sum of the flows' rates instead of `K` times the slowest.
//!
//! `EFA_IP_STRIPE=equal` hands chunks round robin whatever the rates (NCCL's rule, kept to be
//! measured side by side): it runs at `K` times the slowest flow.

use std::time::{Duration, Instant};

use crate::setting::{env_var, SettingError};

/// Smallest chunk a striped read is cut into, in bytes.
pub const CHUNK_MIN: usize = 64 << 10;
/// Largest chunk, in bytes: small enough that a 64 MiB read still gives the scheduler
/// 16 chunks to place.
pub const CHUNK_MAX: usize = 4 << 20;
/// A striped read is cut into about this many chunks per flow (fewer when that would make
/// them smaller than [`CHUNK_MIN`], more when larger than [`CHUNK_MAX`]). One: the
/// scheduler balances the flows over the chunks of every read under way, and each chunk is
/// an RMA read of its own. Measured with osu-bw over lo, 4 flows, on a loaded host: with 4
/// chunks per flow a 1 MiB message (16 chunks of 64 KiB) ran at 0.86 of one flow; with
/// one, at or above one flow's rate from 256 KiB on.
pub const CHUNKS_PER_FLOW: usize = 1;
/// Default of `EFA_IP_STRIPE_MIN`: reads from this many bytes on are striped.
pub const DEFAULT_STRIPE_MIN: usize = 256 << 10;
/// Largest `EFA_IP_FLOWS`.
pub const MAX_FLOWS: usize = 64;
/// Weight of a new rate sample in the smoothed rate (EWMA gain).
pub const GAIN: f64 = 0.25;
/// Shortest busy time a rate sample is measured over.
pub const MIN_SAMPLE: Duration = Duration::from_micros(200);

const FLOWS_FORMS: &str = "an integer from 1 to 64 (default: 8 on an AWS ENA interface, else 1)";
const STRIPE_MIN_FORMS: &str =
    "a size in bytes, at least 65536, with an optional k/m/g suffix (KiB, MiB, GiB; default 256k)";
const STRIPE_FORMS: &str = "adaptive (default) or equal";

/// How chunks are handed to flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StripeMode {
    /// To the flow with the earliest expected finish by its measured rate (module docs).
    #[default]
    Adaptive,
    /// Round robin, whatever the rates.
    Equal,
}

impl std::fmt::Display for StripeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StripeMode::Adaptive => "adaptive",
            StripeMode::Equal => "equal",
        })
    }
}

/// The IP route's striping settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSettings {
    /// Flows (endpoints, so TCP connections) per peer on the IP route, 1 to
    /// [`MAX_FLOWS`]; `None`: detected from the IP interface ([`default_flows`]:
    /// [`ENA_FLOWS`] on an AWS ENA interface, else 1).
    pub flows: Option<usize>,
    /// Reads of at least this many bytes are striped (never below [`CHUNK_MIN`]).
    pub stripe_min: usize,
    /// How chunks are handed to flows.
    pub mode: StripeMode,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            flows: None,
            stripe_min: DEFAULT_STRIPE_MIN,
            mode: StripeMode::Adaptive,
        }
    }
}

impl FlowSettings {
    /// The settings from `EFA_IP_FLOWS`, `EFA_IP_STRIPE_MIN` and `EFA_IP_STRIPE` (each
    /// unset or blank: its default).
    ///
    /// # Errors
    /// [`SettingError`] naming the variable whose value is not accepted.
    pub fn from_env() -> Result<FlowSettings, SettingError> {
        let mut s = FlowSettings::default();
        if let Some(v) = env_var("EFA_IP_FLOWS", FLOWS_FORMS)? {
            s.flows = parse_flows(&v).map(Some).ok_or_else(|| {
                SettingError::env("EFA_IP_FLOWS", v, "is not a flow count", FLOWS_FORMS)
            })?;
        }
        if let Some(v) = env_var("EFA_IP_STRIPE_MIN", STRIPE_MIN_FORMS)? {
            s.stripe_min = parse_stripe_min(&v).ok_or_else(|| {
                SettingError::env(
                    "EFA_IP_STRIPE_MIN",
                    v,
                    "is not a size of at least 64 KiB",
                    STRIPE_MIN_FORMS,
                )
            })?;
        }
        if let Some(v) = env_var("EFA_IP_STRIPE", STRIPE_FORMS)? {
            s.mode = parse_mode(&v).ok_or_else(|| {
                SettingError::env("EFA_IP_STRIPE", v, "is not a striping mode", STRIPE_FORMS)
            })?;
        }
        Ok(s)
    }
}

impl FlowSettings {
    /// Checks settings given to a builder method: the same bounds as the variables.
    ///
    /// # Errors
    /// [`SettingError`] naming `method` for a flow count outside 1 to [`MAX_FLOWS`] or a
    /// threshold below [`CHUNK_MIN`].
    pub(crate) fn check(&self, method: &'static str) -> Result<(), SettingError> {
        if let Some(k) = self.flows.filter(|k| !(1..=MAX_FLOWS).contains(k)) {
            return Err(SettingError::argument(
                method,
                format!("flows: {k}"),
                "is not a flow count",
                FLOWS_FORMS,
            ));
        }
        if self.stripe_min < CHUNK_MIN {
            return Err(SettingError::argument(
                method,
                format!("stripe_min: {}", self.stripe_min),
                "is smaller than a chunk (64 KiB)",
                STRIPE_MIN_FORMS,
            ));
        }
        Ok(())
    }
}

/// PCI vendor id of Amazon's network devices (ENA, EFA), as sysfs gives it.
pub const AMAZON_PCI_VENDOR: &str = "0x1d0f";
/// Flows per peer on an ENA interface when the count is not set (NCCL's socket transport
/// opens 16 on ENA; the best count on EC2 is still to be measured, issue 15 §3).
pub const ENA_FLOWS: usize = 8;

/// The flow count of IP interface `iface` when none is set: [`ENA_FLOWS`] when
/// `SYSFS/class/net/IFACE/device/vendor` names [`AMAZON_PCI_VENDOR`] (an ENA interface,
/// whose flows EC2 caps), else 1 (no such file: loopback, a virtual or another vendor's
/// device). `sysfs` is `/sys` outside tests. The one place that decides.
pub fn default_flows(sysfs: &std::path::Path, iface: &str) -> usize {
    if iface.is_empty() || iface.contains('/') || iface.starts_with('.') {
        return 1;
    }
    let vendor = sysfs.join("class/net").join(iface).join("device/vendor");
    match std::fs::read_to_string(vendor) {
        Ok(v) if v.trim().eq_ignore_ascii_case(AMAZON_PCI_VENDOR) => ENA_FLOWS,
        _ => 1,
    }
}

impl FlowSettings {
    /// The flow count for IP interface `iface`: the one set, else [`default_flows`] under
    /// `/sys`.
    pub fn flows_for(&self, iface: Option<&str>) -> usize {
        self.flows
            .unwrap_or_else(|| default_flows(std::path::Path::new("/sys"), iface.unwrap_or("")))
    }
}

fn parse_flows(v: &str) -> Option<usize> {
    v.trim()
        .parse::<usize>()
        .ok()
        .filter(|k| (1..=MAX_FLOWS).contains(k))
}

fn parse_stripe_min(v: &str) -> Option<usize> {
    let v = v.trim().to_ascii_lowercase();
    let (num, shift) = match v.as_bytes().last()? {
        b'k' => (&v[..v.len() - 1], 10),
        b'm' => (&v[..v.len() - 1], 20),
        b'g' => (&v[..v.len() - 1], 30),
        _ => (&v[..], 0),
    };
    let n: usize = num.trim().parse().ok()?;
    n.checked_mul(1usize << shift).filter(|&b| b >= CHUNK_MIN)
}

fn parse_mode(v: &str) -> Option<StripeMode> {
    match v.trim().to_ascii_lowercase().as_str() {
        "adaptive" => Some(StripeMode::Adaptive),
        "equal" => Some(StripeMode::Equal),
        _ => None,
    }
}

/// Cuts a read of `len` bytes over `flows` flows into chunks `(offset, length)`, in order and
/// contiguous: about [`CHUNKS_PER_FLOW`] per flow, each at least [`CHUNK_MIN`] (when `len`
/// is) and at most [`CHUNK_MAX`] and `max_msg` bytes. Lengths differ by at most one byte.
pub fn chunks(len: usize, flows: usize, max_msg: usize) -> Vec<(usize, usize)> {
    if len == 0 {
        return Vec::new();
    }
    let cap = CHUNK_MAX.min(max_msg.max(1));
    let by_share = len / (flows.max(1) * CHUNKS_PER_FLOW);
    let target = by_share.clamp(CHUNK_MIN.min(cap), cap);
    // As many chunks as fit at `target` or more, but enough that none exceeds `cap`.
    let n = (len / target).max(len.div_ceil(cap)).max(1);
    let (base, extra) = (len / n, len % n);
    let mut out = Vec::with_capacity(n);
    let mut off = 0;
    for i in 0..n {
        let l = base + usize::from(i < extra);
        out.push((off, l));
        off += l;
    }
    out
}

/// One flow's state in a [`Striper`].
#[derive(Debug, Clone, Default)]
struct Flow {
    /// Smoothed delivery rate, bytes per second; `None` before the first sample.
    rate: Option<f64>,
    /// Bytes posted and not yet completed.
    queued: u64,
    /// Bytes completed since `since` (the sample being measured).
    acc: u64,
    /// Start of the busy time the current sample measures; `None` while idle.
    since: Option<Instant>,
    /// Bytes completed in all.
    bytes: u64,
    /// Chunks completed in all.
    chunks: u64,
}

/// What a [`Striper`] knows of one flow ([`Striper::stats`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowStat {
    /// Bytes this flow has carried (striped reads completed on it).
    pub bytes: u64,
    /// Chunks completed on it.
    pub chunks: u64,
    /// Its smoothed delivery rate in bytes per second, once measured.
    pub rate: Option<f64>,
}

/// Hands the chunks of striped reads to flows and learns each flow's delivery rate (module
/// docs: the rule and its constants). Pure: the caller says when things happen.
#[derive(Debug, Clone)]
pub struct Striper {
    mode: StripeMode,
    flows: Vec<Flow>,
    /// Next flow of the round robin ([`StripeMode::Equal`]).
    next: usize,
}

impl Striper {
    /// A scheduler over `flows` flows (at least 1).
    pub fn new(flows: usize, mode: StripeMode) -> Striper {
        Striper {
            mode,
            flows: vec![Flow::default(); flows.max(1)],
            next: 0,
        }
    }

    /// Number of flows.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// The mode.
    pub fn mode(&self) -> StripeMode {
        self.mode
    }

    /// Chooses the flow for a chunk of `len` bytes posted at `now`, and counts it queued
    /// there.
    pub fn assign(&mut self, len: usize, now: Instant) -> usize {
        let f = match self.mode {
            StripeMode::Equal => {
                let f = self.next % self.flows.len();
                self.next = (f + 1) % self.flows.len();
                f
            }
            StripeMode::Adaptive => self.earliest_finish(len),
        };
        let flow = &mut self.flows[f];
        if flow.queued == 0 {
            flow.since = Some(now);
            flow.acc = 0;
        }
        flow.queued += len as u64;
        f
    }

    /// The flow whose expected finish `(queued + len) / rate` is earliest (ties: the lowest
    /// index). Flows without a rate count at the mean of the measured ones.
    fn earliest_finish(&self, len: usize) -> usize {
        let known: Vec<f64> = self.flows.iter().filter_map(|f| f.rate).collect();
        let prior = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let mut best = (0, f64::INFINITY);
        for (i, f) in self.flows.iter().enumerate() {
            let rate = f.rate.unwrap_or(prior).max(f64::MIN_POSITIVE);
            let finish = (f.queued + len as u64) as f64 / rate;
            if finish < best.1 {
                best = (i, finish);
            }
        }
        best.0
    }

    /// A chunk of `len` bytes on `flow` completed (seen at `now`): updates the flow's rate.
    pub fn completed(&mut self, flow: usize, len: usize, now: Instant) {
        let Some(f) = self.flows.get_mut(flow) else {
            return;
        };
        f.queued = f.queued.saturating_sub(len as u64);
        f.bytes += len as u64;
        f.chunks += 1;
        f.acc += len as u64;
        if let Some(since) = f.since {
            let busy = now.saturating_duration_since(since);
            if busy >= MIN_SAMPLE {
                let sample = f.acc as f64 / busy.as_secs_f64();
                f.rate = Some(match f.rate {
                    Some(r) => r + GAIN * (sample - r),
                    None => sample,
                });
                f.acc = 0;
                f.since = Some(now);
            }
        }
        if f.queued == 0 {
            // Idle: the next post starts a new sample (a partial one is dropped).
            f.since = None;
            f.acc = 0;
        }
    }

    /// A chunk of `len` bytes on `flow` will not complete (its read failed or was
    /// abandoned): no longer queued, and no sample.
    pub fn dropped(&mut self, flow: usize, len: usize) {
        if let Some(f) = self.flows.get_mut(flow) {
            f.queued = f.queued.saturating_sub(len as u64);
            if f.queued == 0 {
                f.since = None;
                f.acc = 0;
            }
        }
    }

    /// Per flow: bytes and chunks carried, smoothed rate.
    pub fn stats(&self) -> Vec<FlowStat> {
        self.flows
            .iter()
            .map(|f| FlowStat {
                bytes: f.bytes,
                chunks: f.chunks,
                rate: f.rate,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ena_interfaces_get_several_flows() {
        let root = std::env::temp_dir().join(format!("efa-sysfs-{}", std::process::id()));
        let dev = |name: &str, vendor: &str| {
            let d = root.join("class/net").join(name).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), vendor).unwrap();
        };
        dev("ens5", "0x1d0f\n");
        dev("eth0", "0x8086\n");
        std::fs::create_dir_all(root.join("class/net/lo")).unwrap();
        assert_eq!(default_flows(&root, "ens5"), ENA_FLOWS);
        assert_eq!(default_flows(&root, "eth0"), 1);
        assert_eq!(default_flows(&root, "lo"), 1);
        assert_eq!(default_flows(&root, "missing"), 1);
        assert_eq!(default_flows(&root, "../net/ens5"), 1);
        assert_eq!(default_flows(&root, ""), 1);
        let set = FlowSettings {
            flows: Some(3),
            ..FlowSettings::default()
        };
        assert_eq!(set.flows_for(Some("ens5")), 3);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn settings_parse_and_refuse() {
        assert_eq!(parse_flows("4"), Some(4));
        assert_eq!(parse_flows(" 64 "), Some(64));
        for bad in ["0", "65", "-1", "four", "1.5", ""] {
            assert_eq!(parse_flows(bad), None, "{bad}");
        }
        assert_eq!(parse_stripe_min("256k"), Some(256 << 10));
        assert_eq!(parse_stripe_min("1M"), Some(1 << 20));
        assert_eq!(parse_stripe_min("65536"), Some(65536));
        for bad in ["65535", "32k", "k", "x", "99999999999999999999g"] {
            assert_eq!(parse_stripe_min(bad), None, "{bad}");
        }
        assert_eq!(parse_mode("Equal"), Some(StripeMode::Equal));
        assert_eq!(parse_mode("adaptive"), Some(StripeMode::Adaptive));
        assert_eq!(parse_mode("fair"), None);
    }

    #[test]
    fn chunks_cover_the_read_and_respect_the_bounds() {
        for flows in [1, 2, 4, 8, 64] {
            for len in [
                1,
                1000,
                CHUNK_MIN - 1,
                CHUNK_MIN,
                256 << 10,
                (256 << 10) - 1,
                (4 << 20) + 7,
                64 << 20,
                (64 << 20) + 12345,
            ] {
                for max_msg in [16 << 10, 1 << 20, usize::MAX] {
                    let c = chunks(len, flows, max_msg);
                    let mut off = 0;
                    for &(o, l) in &c {
                        assert_eq!(o, off);
                        assert!(l > 0 && l <= max_msg && l <= CHUNK_MAX, "{len} {flows} {l}");
                        if len >= CHUNK_MIN && max_msg >= CHUNK_MIN {
                            assert!(l >= CHUNK_MIN, "{len}/{flows}: chunk {l}");
                        }
                        off += l;
                    }
                    assert_eq!(off, len);
                    let (lo, hi) = c
                        .iter()
                        .fold((usize::MAX, 0), |(a, b), &(_, l)| (a.min(l), b.max(l)));
                    assert!(hi - lo <= 1);
                }
            }
        }
        assert!(chunks(0, 4, 1 << 20).is_empty());
        // 4 MiB over 4 flows: 4 chunks of 1 MiB; 64 MiB: 16 of 4 MiB; 256 KiB: 4 of 64 KiB.
        assert_eq!(
            chunks(4 << 20, 4, usize::MAX),
            (0..4).map(|i| (i << 20, 1 << 20)).collect::<Vec<_>>()
        );
        assert_eq!(chunks(64 << 20, 4, usize::MAX).len(), 16);
        assert_eq!(
            chunks(256 << 10, 4, usize::MAX),
            (0..4).map(|i| (i << 16, 1 << 16)).collect::<Vec<_>>()
        );
    }

    /// Simulates `msgs` reads of `len` bytes, `window` at a time, over flows serving their
    /// queue in order at `rates` (bytes/s); returns the bytes each flow carried.
    fn simulate(
        mode: StripeMode,
        rates: &[f64],
        len: usize,
        msgs: usize,
        window: usize,
    ) -> Vec<u64> {
        let t0 = Instant::now();
        let mut s = Striper::new(rates.len(), mode);
        // Per flow: when its queue drains, and its queue of (finish time, len).
        let mut busy_until = vec![0.0f64; rates.len()];
        let mut queue: Vec<std::collections::VecDeque<(f64, usize, usize)>> =
            vec![Default::default(); rates.len()];
        let mut now = 0.0f64;
        let at = |t: f64| t0 + Duration::from_secs_f64(t);
        let mut outstanding: Vec<usize> = Vec::new(); // chunks left per read
        let mut posted = 0;
        loop {
            while posted < msgs && outstanding.iter().filter(|&&n| n > 0).count() < window {
                let c = chunks(len, rates.len(), usize::MAX);
                outstanding.push(c.len());
                let id = outstanding.len() - 1;
                for (_, l) in c {
                    let f = s.assign(l, at(now));
                    let start = busy_until[f].max(now);
                    busy_until[f] = start + l as f64 / rates[f];
                    queue[f].push_back((busy_until[f], l, id));
                }
                posted += 1;
            }
            // Next completion.
            let Some((f, _)) = queue
                .iter()
                .enumerate()
                .filter_map(|(f, q)| q.front().map(|&(t, _, _)| (f, t)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
            else {
                break;
            };
            let (t, l, id) = queue[f].pop_front().expect("front seen");
            now = t;
            s.completed(f, l, at(now));
            outstanding[id] -= 1;
        }
        s.stats().iter().map(|f| f.bytes).collect()
    }

    #[test]
    fn adaptive_split_follows_the_rates() {
        // One flow at half the rate of three others gets about half their bytes.
        let rates = [100e6, 100e6, 50e6, 100e6];
        let got = simulate(StripeMode::Adaptive, &rates, 4 << 20, 200, 8);
        let total: u64 = got.iter().sum();
        assert_eq!(total, 200 * (4 << 20));
        let fast = (got[0] + got[1] + got[3]) as f64 / 3.0;
        let ratio = got[2] as f64 / fast;
        assert!(
            (0.4..=0.6).contains(&ratio),
            "slow flow carried {ratio:.2} of a fast one: {got:?}"
        );
        // Rate-proportional within 10% for every flow.
        let sum: f64 = rates.iter().sum();
        for (f, &b) in got.iter().enumerate() {
            let want = total as f64 * rates[f] / sum;
            assert!(
                (b as f64 / want - 1.0).abs() < 0.1,
                "flow {f}: {b} bytes, want {want:.0}: {got:?}"
            );
        }
    }

    #[test]
    fn adaptive_split_with_very_different_rates() {
        let rates = [400e6, 100e6];
        let got = simulate(StripeMode::Adaptive, &rates, 8 << 20, 100, 4);
        let share = got[0] as f64 / (got[0] + got[1]) as f64;
        assert!(
            (0.72..=0.88).contains(&share),
            "fast flow carried {share:.2}: {got:?}"
        );
    }

    #[test]
    fn equal_split_ignores_the_rates() {
        let rates = [100e6, 100e6, 50e6, 100e6];
        let got = simulate(StripeMode::Equal, &rates, 4 << 20, 50, 8);
        assert!(got.iter().all(|&b| b == got[0]), "{got:?}");
        assert_eq!(got[0], 50 * (1 << 20));
    }

    #[test]
    fn rates_are_measured_over_busy_time() {
        let t0 = Instant::now();
        let mut s = Striper::new(2, StripeMode::Adaptive);
        // Flow 0 delivers 1 MB in 10 ms: 100 MB/s.
        let f = s.assign(1_000_000, t0);
        assert_eq!(f, 0);
        s.completed(0, 1_000_000, t0 + Duration::from_millis(10));
        let r = s.stats()[0].rate.unwrap();
        assert!((r - 100e6).abs() < 1.0, "{r}");
        // Completions seen within MIN_SAMPLE of the busy start make no sample.
        let t1 = t0 + Duration::from_secs(1);
        s.assign(1000, t1);
        s.completed(0, 1000, t1 + Duration::from_micros(10));
        assert_eq!(s.stats()[0].rate, Some(r));
        // A second sample of 50 MB/s moves the rate by GAIN of the difference.
        let t2 = t1 + Duration::from_secs(1);
        s.assign(500_000, t2);
        s.completed(0, 500_000, t2 + Duration::from_millis(10));
        let r2 = s.stats()[0].rate.unwrap();
        assert!((r2 - (100e6 - GAIN * 50e6)).abs() < 1.0, "{r2}");
        // A dropped chunk leaves no queue behind: the next goes by rate alone.
        let f = s.assign(100, t2);
        s.dropped(f, 100);
        assert_eq!(s.flows[f].queued, 0);
        assert_eq!(s.stats()[0].chunks, 3);
    }
}
