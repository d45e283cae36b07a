//! Collective benchmarks on an efa-core [`Communicator`], printed as nccl-tests prints them
//! (`all_reduce_perf` and friends, out-of-place section).
//!
//! Process model: under a launcher (efarun, mpirun, mpiexec.hydra, srun, torchrun) every
//! rank runs [`run_rank`] and rank 0 prints. Without one, [`crate::job::spawn_local`]
//! starts `-N` copies of this binary with `efarun`'s variables and a private file store, and
//! fails if any fails.
//!
//! Timing, as nccl-tests: per size, `-w` untimed iterations, then `-n` timed ones; the time
//! reported is the max over ranks of the mean per-iteration time (an allreduce of the
//! measured times, outside the timed loop). algbw and busbw use nccl-tests' formulas
//! ([`Collective::bandwidth`]).
//!
//! Checking (`-c 1`): every rank's input is a deterministic function of (rank, index) with
//! small integer values, so every sum, product, min and max is exact in every type (below
//! 64 ranks for bf16 sums) and the expected result, computed locally by efa-core's serial
//! reference (`coll::kernel::reference`, which does not use the reduction kernels), must
//! match bit for bit. `#wrong` is the number of
//! elements of the last iteration's result that differ, summed over ranks.

use std::io::Write;
use std::time::Instant;

use efa_core::coll::kernel::reference;
use efa_core::{Communicator, Element, ReduceOp};
use half::{bf16, f16};

use crate::opts::{CollArgs, Collective, DataType, Op};
use crate::output::{nccl_header, nccl_row, percentiles, CollRecord};
use crate::{err, Result};

impl Collective {
    pub fn name(self) -> &'static str {
        match self {
            Collective::Allreduce => "allreduce",
            Collective::Broadcast => "broadcast",
            Collective::Allgather => "allgather",
            Collective::ReduceScatter => "reduce-scatter",
            Collective::Alltoall => "alltoall",
        }
    }

    fn nccl_name(self) -> &'static str {
        match self {
            Collective::Allreduce => "all_reduce_perf",
            Collective::Broadcast => "broadcast_perf",
            Collective::Allgather => "all_gather_perf",
            Collective::ReduceScatter => "reduce_scatter_perf",
            Collective::Alltoall => "alltoall_perf",
        }
    }

    fn reduces(self) -> bool {
        matches!(self, Collective::Allreduce | Collective::ReduceScatter)
    }

    /// nccl-tests' `getCollByteCount`: (send count, recv count, param count) per rank for a
    /// sweep size of `count` elements. The `size` column is the larger buffer, the `count`
    /// column the param count.
    pub fn counts(self, count: usize, n: usize) -> (usize, usize, usize) {
        let per = count / n;
        match self {
            Collective::Allreduce | Collective::Broadcast => (count, count, count),
            Collective::Allgather => (per, per * n, per),
            Collective::ReduceScatter => (per * n, per, per),
            Collective::Alltoall => (per * n, per * n, per),
        }
    }

    /// nccl-tests' `*GetBw`: (algbw, busbw) in GB/s for `param` elements of `elem` bytes in
    /// `sec` seconds on `n` ranks.
    pub fn bandwidth(self, param: usize, elem: usize, sec: f64, n: usize) -> (f64, f64) {
        let nf = n as f64;
        let base = (param * elem) as f64 / 1e9 / sec;
        let (alg, factor) = match self {
            Collective::Allreduce => (base, 2.0 * (nf - 1.0) / nf),
            Collective::Broadcast => (base, 1.0),
            Collective::Allgather | Collective::ReduceScatter | Collective::Alltoall => {
                (base * nf, (nf - 1.0) / nf)
            }
        };
        (alg, alg * factor)
    }
}

impl Op {
    fn reduce_op(self) -> ReduceOp {
        match self {
            Op::Sum => ReduceOp::Sum,
            Op::Prod => ReduceOp::Prod,
            Op::Min => ReduceOp::Min,
            Op::Max => ReduceOp::Max,
            Op::Avg => ReduceOp::Avg,
        }
    }
}

/// An element type the benchmark can fill with small exact integers.
trait BenchElem: Element {
    fn small(v: u32) -> Self;
}

macro_rules! bench_elem {
    ($($t:ty => $e:expr),*) => {$(
        impl BenchElem for $t {
            fn small(v: u32) -> Self {
                #[allow(clippy::redundant_closure_call)]
                ($e)(v)
            }
        }
    )*};
}
bench_elem!(
    i8 => |v| v as i8, u8 => |v| v as u8, i32 => |v| v as i32, u32 => |v| v,
    i64 => |v: u32| v as i64, u64 => |v: u32| v as u64, f32 => |v| v as f32,
    f64 => |v: u32| v as f64, f16 => |v| f16::from_f32(v as f32),
    bf16 => |v| bf16::from_f32(v as f32)
);

/// Rank `r`'s input at global index `i`: 1..=4 (products: 1 or 2, so that they stay exact).
fn input(op: Op, r: usize, i: usize) -> u32 {
    match op {
        Op::Prod => 1 + ((i + r) % 2) as u32,
        _ => 1 + ((i + 3 * r) % 4) as u32,
    }
}

/// Expected reduction of all `n` ranks' inputs at global indices `start..start + out.len()`,
/// from efa-core's serial reference (rank 0 first), which shares no code with the reduction
/// kernels that the collective itself uses.
fn reduced<T: BenchElem>(op: Op, n: usize, start: usize, out: &mut [T]) {
    let inputs: Vec<Vec<T>> = (0..n)
        .map(|r| {
            (0..out.len())
                .map(|k| T::small(input(op, r, start + k)))
                .collect()
        })
        .collect();
    out.copy_from_slice(&reference(&inputs, op.reduce_op()));
}

fn same<T: BenchElem>(a: &T, b: &T) -> bool {
    bytemuck::bytes_of(a) == bytemuck::bytes_of(b)
}

/// Elements of `recv` that differ from the expected result of `coll` on rank `me`.
fn count_wrong<T: BenchElem>(
    coll: Collective,
    op: Op,
    root: usize,
    n: usize,
    me: usize,
    param: usize,
    recv: &[T],
) -> u64 {
    const BLOCK: usize = 4096;
    let mut wrong = 0u64;
    let mut exp = [T::zeroed(); BLOCK];
    match coll {
        Collective::Allreduce | Collective::ReduceScatter => {
            let base = if coll == Collective::Allreduce {
                0
            } else {
                me * param
            };
            for (b, chunk) in recv.chunks(BLOCK).enumerate() {
                let e = &mut exp[..chunk.len()];
                reduced(op, n, base + b * BLOCK, e);
                wrong += chunk
                    .iter()
                    .zip(e.iter())
                    .filter(|(a, b)| !same(*a, *b))
                    .count() as u64;
            }
        }
        Collective::Broadcast => {
            for (i, x) in recv.iter().enumerate() {
                wrong += u64::from(!same(x, &T::small(input(op, root, i))));
            }
        }
        Collective::Allgather | Collective::Alltoall => {
            for (i, x) in recv.iter().enumerate() {
                let (src, k) = (i / param.max(1), i % param.max(1));
                // Allgather: rank src's whole send buffer; all-to-all: block `me` of it.
                let idx = if coll == Collective::Allgather {
                    k
                } else {
                    me * param + k
                };
                wrong += u64::from(!same(x, &T::small(input(op, src, idx))));
            }
        }
    }
    wrong
}

/// One call of the collective.
fn once<T: BenchElem>(
    comm: &Communicator,
    coll: Collective,
    op: ReduceOp,
    root: u32,
    send: &[T],
    recv: &mut [T],
) -> efa_core::Result<()> {
    match coll {
        Collective::Allreduce => comm.allreduce_into(send, recv, op),
        Collective::Broadcast => comm.broadcast(recv, root),
        Collective::Allgather => comm.allgather_into(send, recv),
        Collective::ReduceScatter => comm.reduce_scatter_into(send, recv, op),
        Collective::Alltoall => comm.alltoall_into(send, recv),
    }
}

/// What every rank tells rank 0 about itself, for the header and the provenance.
struct RankInfo {
    pid: u32,
    host: String,
    /// (peer, transport, provider)
    routes: Vec<(u32, String, String)>,
}

fn gather_info(comm: &Communicator) -> Result<Vec<RankInfo>> {
    let n = comm.size() as usize;
    let me = comm.rank();
    let mut s = format!("{}\t{}\t", std::process::id(), crate::host_name());
    for p in (0..comm.size()).filter(|&p| p != me) {
        let t = comm.route(p)?.transport;
        let prov = comm.provider(t).unwrap_or("?");
        s.push_str(&format!("{p} {t} {prov},"));
    }
    // A fixed-size blob per rank (allgather needs equal lengths); long lists are cut.
    let len = 128 + 48 * n;
    let mut blob = s.into_bytes();
    blob.resize(len, 0);
    let mut all = vec![0u8; len * n];
    comm.allgather_into(&blob, &mut all)?;
    Ok(all
        .chunks(len)
        .map(|b| {
            let text = String::from_utf8_lossy(b);
            let text = text.trim_end_matches('\0');
            let mut f = text.splitn(3, '\t');
            let pid = f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            let host = f.next().unwrap_or("?").to_string();
            let routes = f
                .next()
                .unwrap_or("")
                .split(',')
                .filter_map(|r| {
                    let mut w = r.split(' ');
                    Some((
                        w.next()?.parse().ok()?,
                        w.next()?.to_string(),
                        w.next()?.to_string(),
                    ))
                })
                .collect();
            RankInfo { pid, host, routes }
        })
        .collect())
}

/// `shm/shm x2, ip/tcp;ofi_rxm x4`: the distinct (transport, provider) pairs of `routes`.
fn route_summary<'a>(routes: impl Iterator<Item = &'a (u32, String, String)>) -> String {
    let mut v: Vec<(String, usize)> = Vec::new();
    for (_, t, p) in routes {
        let k = format!("{t}/{p}");
        match v.iter_mut().find(|(x, _)| *x == k) {
            Some((_, c)) => *c += 1,
            None => v.push((k, 1)),
        }
    }
    if v.is_empty() {
        return "self".into();
    }
    v.iter()
        .map(|(k, c)| format!("{k} x{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the benchmark as one rank of a launched job; rank 0 prints.
pub fn run_rank(coll: Collective, a: &CollArgs) -> Result<()> {
    let comm = crate::job::join(a.timeout, None)?;
    if let Some(want) = a.nranks {
        if want != comm.size() as usize && comm.rank() == 0 {
            eprintln!(
                "efa-bench: note: -N {want} ignored under a launcher (world size {})",
                comm.size()
            );
        }
    }
    if coll == Collective::Broadcast && a.root >= comm.size() {
        return Err(err(format!(
            "-r/--root {} is not a rank (world size {})",
            a.root,
            comm.size()
        )));
    }
    match a.dtype {
        DataType::Int8 => run_typed::<i8>(&comm, coll, a),
        DataType::Uint8 => run_typed::<u8>(&comm, coll, a),
        DataType::Int32 => run_typed::<i32>(&comm, coll, a),
        DataType::Uint32 => run_typed::<u32>(&comm, coll, a),
        DataType::Int64 => run_typed::<i64>(&comm, coll, a),
        DataType::Uint64 => run_typed::<u64>(&comm, coll, a),
        DataType::Half => run_typed::<f16>(&comm, coll, a),
        DataType::Float => run_typed::<f32>(&comm, coll, a),
        DataType::Double => run_typed::<f64>(&comm, coll, a),
        DataType::Bfloat16 => run_typed::<bf16>(&comm, coll, a),
    }
}

fn print_header(
    coll: Collective,
    a: &CollArgs,
    n: usize,
    info: &[RankInfo],
    algo: &str,
    libfabric: &str,
) {
    let mut s = String::new();
    s.push_str(&format!(
        "# efa-bench {} ({} format, out-of-place section)\n",
        coll.name(),
        coll.nccl_name()
    ));
    s.push_str(&format!(
        "# nRanks {n} minBytes {} maxBytes {} step: {}(factor) warmup iters: {} iters: {} \
         validation: {}\n",
        a.minbytes, a.maxbytes, a.stepfactor, a.warmup, a.iters, a.check
    ));
    s.push_str(&format!(
        "# efa-rs {} libfabric {libfabric} EFA_ALLREDUCE_ALGO={algo}\n#\n# Using ranks\n",
        env!("EFA_BENCH_GIT_REV")
    ));
    for (r, i) in info.iter().enumerate() {
        s.push_str(&format!(
            "#  Rank {r:>2} Pid {:>6} on {:>10} routes: {}\n",
            i.pid,
            i.host,
            route_summary(i.routes.iter())
        ));
    }
    s.push_str("#\n");
    s.push_str(&nccl_header());
    s.push('\n');
    print!("{s}");
    let _ = std::io::stdout().flush();
}

fn run_typed<T: BenchElem>(comm: &Communicator, coll: Collective, a: &CollArgs) -> Result<()> {
    let n = comm.size() as usize;
    let me = comm.rank() as usize;
    let op = a.op;
    let rop = op.reduce_op();
    let elem = std::mem::size_of::<T>();
    let root = a.root as usize;
    let check = a.check == 1;
    let info = gather_info(comm)?;
    let (maj, min) = efa_fabric::libfabric_version();
    let libfabric = format!("{maj}.{min}");
    let algo = std::env::var("EFA_ALLREDUCE_ALGO").unwrap_or_else(|_| "auto".into());
    let printer = me == 0;
    if printer && !a.json {
        print_header(coll, a, n, &info, &algo, &libfabric);
    }
    let routes: Vec<String> = info
        .iter()
        .enumerate()
        .flat_map(|(r, i)| {
            i.routes
                .iter()
                .map(move |(p, t, prov)| format!("{r}->{p} {t} {prov}"))
        })
        .collect();
    let route = route_summary(info.iter().flat_map(|i| i.routes.iter()));
    let host = crate::host_name();
    let (redop, root_col) = match coll {
        Collective::Allreduce | Collective::ReduceScatter => (op.name(), -1),
        Collective::Broadcast => ("none", a.root as i64),
        _ => ("none", -1),
    };
    let mut samples: Vec<u64> = Vec::with_capacity(a.iters);
    let mut wrong_total = 0u64;
    let mut busbw_sum = 0.0;
    let mut rows = 0usize;
    for size in a.sizes() {
        let (sc, rc, pc) = coll.counts(size / elem, n);
        // Input pattern: for collectives that do not reduce, the sum pattern.
        let pat = if coll.reduces() { op } else { Op::Sum };
        let send: Vec<T> = (0..sc).map(|i| T::small(input(pat, me, i))).collect();
        let mut recv = vec![T::zeroed(); rc];
        if coll == Collective::Broadcast && me == root {
            recv.copy_from_slice(&send);
        }
        for _ in 0..a.warmup {
            once(comm, coll, rop, a.root, &send, &mut recv)?;
        }
        comm.barrier()?;
        samples.clear();
        let t0 = Instant::now();
        for _ in 0..a.iters {
            let t = Instant::now();
            once(comm, coll, rop, a.root, &send, &mut recv)?;
            samples.push(t.elapsed().as_nanos() as u64);
        }
        let mean_ns = t0.elapsed().as_nanos() as f64 / a.iters as f64;
        let (p50, p99, max) = percentiles(&mut samples);
        let mut times = [mean_ns, p50 as f64, p99 as f64, max as f64];
        comm.allreduce(&mut times, ReduceOp::Max)?;
        let wrong = if check {
            let mut w = [count_wrong(coll, pat, root, n, me, pc, &recv)];
            comm.allreduce(&mut w, ReduceOp::Sum)?;
            Some(w[0])
        } else {
            None
        };
        let sec = times[0] / 1e9;
        let (algbw, busbw) = coll.bandwidth(pc, elem, sec, n);
        let bytes = sc.max(rc) * elem;
        wrong_total += wrong.unwrap_or(0);
        busbw_sum += busbw;
        rows += 1;
        if !printer {
            continue;
        }
        let line = if a.json {
            let rec = CollRecord {
                bench: coll.name().into(),
                size: bytes as u64,
                count: pc as u64,
                dtype: a.dtype.name().into(),
                redop: redop.into(),
                root: root_col,
                nranks: n as u32,
                iters: a.iters as u64,
                warmup: a.warmup as u64,
                time_us: times[0] / 1e3,
                algbw,
                busbw,
                wrong,
                p50: times[1] / 1e3,
                p99: times[2] / 1e3,
                max: times[3] / 1e3,
                algorithm: algo.clone(),
                routes: routes.clone(),
                route: route.clone(),
                libfabric: libfabric.clone(),
                host: host.clone(),
                git_rev: env!("EFA_BENCH_GIT_REV").into(),
            };
            serde_json::to_string(&rec)?
        } else {
            nccl_row(
                bytes,
                pc,
                a.dtype.name(),
                redop,
                root_col,
                times[0] / 1e3,
                algbw,
                busbw,
                wrong,
            )
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    if printer && !a.json {
        let ok = if !check {
            "N/A"
        } else if wrong_total == 0 {
            "OK"
        } else {
            "FAILED"
        };
        println!("# Out of bounds values : {wrong_total} {ok}");
        println!(
            "# Avg bus bandwidth    : {:.6} \n#",
            busbw_sum / rows.max(1) as f64
        );
    }
    comm.barrier()?;
    if wrong_total > 0 {
        return Err(err(format!(
            "{wrong_total} wrong elements in {} results",
            coll.name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_formulas_are_nccl_tests() {
        // allreduce: busbw = algbw * 2(n-1)/n
        let (a, b) = Collective::Allreduce.bandwidth(1 << 18, 4, 1e-3, 4);
        assert!((a - 1.048576).abs() < 1e-9 && (b - a * 1.5).abs() < 1e-9);
        let (a, b) = Collective::Broadcast.bandwidth(1000, 1, 1e-6, 8);
        assert!((a - 1.0).abs() < 1e-9 && (b - a).abs() < 1e-9);
        // allgather: algbw counts all n blocks, busbw = algbw * (n-1)/n
        let (a, b) = Collective::Allgather.bandwidth(1000, 1, 1e-6, 4);
        assert!((a - 4.0).abs() < 1e-9 && (b - 3.0).abs() < 1e-9);
        assert_eq!(Collective::Allgather.counts(10, 4), (2, 8, 2));
        assert_eq!(Collective::ReduceScatter.counts(10, 4), (8, 2, 2));
        assert_eq!(Collective::Allreduce.counts(10, 4), (10, 10, 10));
    }

    #[test]
    fn expected_values_are_exact() {
        // Two ranks, sum: 1+(i%4) + 1+((i+3)%4).
        let mut out = vec![0f32; 8];
        reduced(Op::Sum, 2, 0, &mut out);
        assert_eq!(out, [5.0, 3.0, 5.0, 7.0, 5.0, 3.0, 5.0, 7.0]);
        // Three ranks, max: rank r has 1+((i+3r)%4), i.e. [1,2,3,4], [4,1,2,3], [3,4,1,2].
        let mut out = vec![bf16::ZERO; 4];
        reduced(Op::Max, 3, 0, &mut out);
        assert_eq!(out, [4.0f32, 4.0, 3.0, 4.0].map(bf16::from_f32));
        reduced(Op::Min, 3, 0, &mut out);
        assert_eq!(out, [1.0f32, 1.0, 1.0, 2.0].map(bf16::from_f32));
        // Products: 1+((i+r)%2): [1,2,1,2] and [2,1,2,1].
        let mut m = vec![0u8; 4];
        reduced(Op::Prod, 2, 0, &mut m);
        assert_eq!(m, [2, 2, 2, 2]);
        // Integer averages round toward zero: (1+4+3)/3, (2+1+4)/3, (3+2+1)/3, (4+3+2)/3.
        let mut a = vec![0i32; 4];
        reduced(Op::Avg, 3, 0, &mut a);
        assert_eq!(a, [2, 2, 2, 3]);
        // An offset window: 2 ranks at index 3 have 4 and 3.
        let mut w = vec![0u8; 1];
        reduced(Op::Sum, 2, 3, &mut w);
        assert_eq!(w, [7]);
        let mut recv = vec![0f32; 8];
        reduced(Op::Sum, 2, 0, &mut recv);
        recv[3] += 1.0;
        assert_eq!(
            count_wrong(Collective::Allreduce, Op::Sum, 0, 2, 0, 8, &recv),
            1
        );
    }
}
