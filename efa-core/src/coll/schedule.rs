//! Collective schedules as plain data: for one rank, a list of [`Step`]s saying which element
//! ranges go to which peer and which arrive from which peer, and how each arrival is applied
//! (copied, or reduced with a fixed operand order). No I/O here; the executor in
//! [`super`] runs the steps over the network, and the tests below run them for every rank
//! in-process.
//!
//! Semantics of a step (the executor and the simulator agree on them):
//! 1. every send of the step is issued, reading the working buffer (or the input buffer,
//!    [`Send::input`]) at that moment (the data is copied when the send is issued);
//! 2. the receives are applied in list order.
//!
//! A send of step `s + 1` whose range equals a receive range of step `s` may be issued
//! chunk by chunk as soon as that chunk has been applied (pipelining); all other sends of
//! step `s + 1` wait for every receive of step `s`.
//!
//! Summation order is fixed by the schedule alone: recursive doubling always combines the
//! lower group's partial first, a ring combines in ring order starting after the block's
//! owner, and trees combine the lower relative rank first.
//!
//! # At scale
//!
//! The schedules are simulated without data or processes at 1,024 to 65,536 ranks (the
//! `scale` module of the tests: every message is matched by its receive, rounds are the
//! longest chain of messages, each waiting for the one before). Sizes are in units of the
//! buffer (`size` elements per rank); ranks are placed on hosts in consecutive blocks of
//! 96 or 192 (p5, hpc7a). "Sent across hosts per host" is what a host's ranks send to other
//! hosts, at most over hosts: the traffic that goes over the network. `cargo test -p
//! efa-core --lib scale_tests -- --nocapture` prints this table (the release build adds
//! 16,384 ranks):
//!
//! | allreduce schedule | ranks | ranks/host | rounds | bound | sent by the busiest rank (× size) | bound | sent across hosts per host (× size) | simulated |
//! |---|---|---|---|---|---|---|---|---|
//! | recursive doubling | 1024 | 96 | 10 | 10 | 10.000 | 10.000 | 416.000 | all ranks |
//! | ring | 1024 | 96 | 2046 | 2046 | 1.998 | 1.998 | 1.998 | all ranks |
//! | hierarchical, rd among hosts | 1024 | 96 | 16 | 19 | 11.000 | 12.000 | 4.000 | all ranks |
//! | hierarchical, ring among hosts | 1024 | 96 | 32 | 34 | 8.818 | 8.818 | 1.818 | all ranks |
//! | hierarchical, rd among hosts | 1024 | 192 | 17 | 20 | 11.000 | 12.000 | 3.000 | all ranks |
//! | hierarchical, ring among hosts | 1024 | 192 | 24 | 26 | 9.667 | 9.667 | 1.667 | all ranks |
//! | recursive doubling | 4096 | 96 | 12 | 12 | 12.000 | 12.000 | 608.000 | all ranks |
//! | ring | 4096 | 96 | 8190 | 8190 | 2.000 | 2.000 | 2.000 | 5 ranks, lock step |
//! | hierarchical, rd among hosts | 4096 | 96 | 18 | 21 | 13.000 | 14.000 | 6.000 | all ranks |
//! | hierarchical, ring among hosts | 4096 | 96 | 96 | 98 | 8.953 | 8.954 | 1.953 | all ranks |
//! | hierarchical, rd among hosts | 4096 | 192 | 19 | 22 | 13.000 | 14.000 | 5.000 | all ranks |
//! | hierarchical, ring among hosts | 4096 | 192 | 56 | 58 | 9.909 | 9.909 | 1.909 | all ranks |
//! | recursive doubling | 65536 | 96 | 16 | 16 | 16.000 | 16.000 | 992.000 | all ranks |
//! | ring | 65536 | 96 | 131070 | 131070 | 2.000 | 2.000 | 2.000 | 5 ranks, lock step |
//! | hierarchical, rd among hosts | 65536 | 96 | 22 | 25 | 17.000 | 18.000 | 10.000 | all ranks |
//! | hierarchical, ring among hosts | 65536 | 96 | 1376 | 1378 | 8.997 | 8.997 | 1.997 | all ranks |
//! | hierarchical, rd among hosts | 65536 | 192 | 23 | 26 | 17.000 | 18.000 | 9.000 | all ranks |
//! | hierarchical, ring among hosts | 65536 | 192 | 696 | 698 | 9.994 | 9.994 | 1.994 | all ranks |
//!
//! What it says: recursive doubling takes `log2 N` rounds but sends `log2 N × size` per
//! rank, almost all of it across hosts; the ring sends the bandwidth-optimal
//! `2 (N-1)/N × size` but needs `2 (N-1)` rounds (131,070 at 65,536 ranks); the
//! hierarchical schedule ([`hierarchical_allreduce`]) with a ring among hosts keeps the
//! network traffic per host at the ring's `2 (H-1)/H × size` in `2 (H-1) + 2 log2 L`
//! rounds, and with recursive doubling among hosts needs 16 to 23 rounds at every size shown. The
//! busiest rank of a hierarchical schedule is the host's leader, which also sends
//! `log2 L × size` within the host (shared memory) for the broadcast. The executor does not
//! choose the hierarchical schedule yet (`EFA_ALLREDUCE_ALGO` offers `rd` and `ring`): it
//! would need the ranks-per-host layout from placement.

use std::ops::Range;

use super::kernel::Order;

/// What to do with received data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Overwrite the range.
    Copy,
    /// Combine into the range with the given operand order.
    Reduce(Order),
}

/// One outgoing transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    /// Destination rank.
    pub peer: u32,
    /// Element range.
    pub range: Range<usize>,
    /// Read from the input buffer instead of the working buffer.
    pub input: bool,
}

/// One incoming transfer into the working buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recv {
    /// Source rank.
    pub peer: u32,
    /// Element range of the working buffer.
    pub range: Range<usize>,
    /// How it is applied.
    pub action: Action,
}

/// One step of a rank's schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Issued first.
    pub sends: Vec<Send>,
    /// Then applied in order.
    pub recvs: Vec<Recv>,
}

fn send(peer: u32, range: Range<usize>) -> Send {
    Send {
        peer,
        range,
        input: false,
    }
}

fn recv(peer: u32, range: Range<usize>, action: Action) -> Recv {
    Recv {
        peer,
        range,
        action,
    }
}

/// Splits `count` elements into `n` contiguous blocks, the first `count % n` one longer.
pub fn even_blocks(count: usize, n: u32) -> Vec<Range<usize>> {
    let n = n as usize;
    let (base, extra) = (count / n, count % n);
    let mut out = Vec::with_capacity(n);
    let mut off = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(off..off + len);
        off += len;
    }
    out
}

/// Contiguous blocks of the given lengths.
pub fn blocks_of(counts: &[usize]) -> Vec<Range<usize>> {
    let mut off = 0;
    counts
        .iter()
        .map(|&c| {
            off += c;
            off - c..off
        })
        .collect()
}

/// Recursive doubling with the non-power-of-two ranks folded in and out: with `p` the largest
/// power of two `<= n` and `r = n - p`, each even rank `< 2r` first hands its data to the odd
/// rank above it, sits out the `log2 p` exchange steps among the `p` remaining ranks, and gets
/// the result back at the end.
///
/// Applies to allreduce (`action = Reduce`) over `0..count`; also used for the argument check
/// and the barrier.
pub fn recursive_doubling(n: u32, rank: u32, count: usize) -> Vec<Step> {
    let p = 1u32 << (31 - n.leading_zeros());
    let r = n - p;
    let all = 0..count;
    let real = |v: u32| if v < r { 2 * v + 1 } else { v + r };
    let mut steps = Vec::new();
    if rank < 2 * r && rank.is_multiple_of(2) {
        // Folded out: send, wait for the result.
        steps.push(Step {
            sends: vec![send(rank + 1, all.clone())],
            recvs: vec![],
        });
        steps.push(Step {
            sends: vec![],
            recvs: vec![recv(rank + 1, all, Action::Copy)],
        });
        return steps;
    }
    let v = if rank < 2 * r { rank / 2 } else { rank - r };
    if rank < 2 * r {
        // The lower (even) rank's data comes first.
        steps.push(Step {
            sends: vec![],
            recvs: vec![recv(rank - 1, all.clone(), Action::Reduce(Order::SrcFirst))],
        });
    }
    let mut mask = 1;
    while mask < p {
        let pv = v ^ mask;
        let order = if v < pv {
            Order::DstFirst
        } else {
            Order::SrcFirst
        };
        steps.push(Step {
            sends: vec![send(real(pv), all.clone())],
            recvs: vec![recv(real(pv), all.clone(), Action::Reduce(order))],
        });
        mask <<= 1;
    }
    if rank < 2 * r {
        steps.push(Step {
            sends: vec![send(rank - 1, all)],
            recvs: vec![],
        });
    }
    steps
}

/// Ring reduce-scatter over `blocks` (one per rank): after `n - 1` steps rank `r` holds the
/// reduction of block `r`. Block `b` is combined in ring order `b+1, b+2, ..., b` (each
/// arriving partial first).
pub fn ring_reduce_scatter(n: u32, rank: u32, blocks: &[Range<usize>]) -> Vec<Step> {
    let next = (rank + 1) % n;
    let prev = (rank + n - 1) % n;
    let b = |k: u32| blocks[(k % n) as usize].clone();
    (0..n.saturating_sub(1))
        .map(|s| Step {
            sends: vec![send(next, b(rank + 2 * n - s - 1))],
            recvs: vec![recv(
                prev,
                b(rank + 2 * n - s - 2),
                Action::Reduce(Order::SrcFirst),
            )],
        })
        .collect()
}

/// Ring allgather over `blocks`: rank `r` starts with block `r` and after `n - 1` steps has
/// them all.
pub fn ring_allgather(n: u32, rank: u32, blocks: &[Range<usize>]) -> Vec<Step> {
    let next = (rank + 1) % n;
    let prev = (rank + n - 1) % n;
    let b = |k: u32| blocks[(k % n) as usize].clone();
    (0..n.saturating_sub(1))
        .map(|s| Step {
            sends: vec![send(next, b(rank + n - s))],
            recvs: vec![recv(prev, b(rank + 2 * n - s - 1), Action::Copy)],
        })
        .collect()
}

/// Ring allreduce: reduce-scatter then allgather over [`even_blocks`]. Rank `r`'s last
/// reduce-scatter receive and its first allgather send are both block `r`, so the executor
/// pipelines across the boundary.
pub fn ring_allreduce(n: u32, rank: u32, count: usize) -> Vec<Step> {
    let blocks = even_blocks(count, n);
    let mut s = ring_reduce_scatter(n, rank, &blocks);
    s.extend(ring_allgather(n, rank, &blocks));
    s
}

/// Binomial-tree broadcast of `0..count` from `root`.
pub fn binomial_bcast(n: u32, rank: u32, root: u32, count: usize) -> Vec<Step> {
    let v = (rank + n - root) % n;
    let real = |x: u32| (x + root) % n;
    let mut steps = Vec::new();
    let mut mask = 1u32;
    while mask < n {
        if v & mask != 0 {
            steps.push(Step {
                sends: vec![],
                recvs: vec![recv(real(v - mask), 0..count, Action::Copy)],
            });
            break;
        }
        mask <<= 1;
    }
    let mut sends = Vec::new();
    mask >>= 1;
    while mask > 0 {
        if v + mask < n {
            sends.push(send(real(v + mask), 0..count));
        }
        mask >>= 1;
    }
    if !sends.is_empty() {
        steps.push(Step {
            sends,
            recvs: vec![],
        });
    }
    steps
}

/// Chain broadcast from `root` (root -> root+1 -> ...); the executor pipelines it in chunks.
pub fn chain_bcast(n: u32, rank: u32, root: u32, count: usize) -> Vec<Step> {
    let v = (rank + n - root) % n;
    let mut steps = Vec::new();
    if v > 0 {
        steps.push(Step {
            sends: vec![],
            recvs: vec![recv((rank + n - 1) % n, 0..count, Action::Copy)],
        });
    }
    if v + 1 < n {
        steps.push(Step {
            sends: vec![send((rank + 1) % n, 0..count)],
            recvs: vec![],
        });
    }
    steps
}

/// Binomial-tree reduction of `0..count` to `root`; the lower relative rank's partial comes
/// first. Other ranks' working buffers hold partial results afterwards.
pub fn binomial_reduce(n: u32, rank: u32, root: u32, count: usize) -> Vec<Step> {
    let v = (rank + n - root) % n;
    let real = |x: u32| (x + root) % n;
    let mut steps = Vec::new();
    let mut mask = 1u32;
    while mask < n {
        if v & mask != 0 {
            steps.push(Step {
                sends: vec![send(real(v - mask), 0..count)],
                recvs: vec![],
            });
            break;
        }
        if v + mask < n {
            steps.push(Step {
                sends: vec![],
                recvs: vec![recv(
                    real(v + mask),
                    0..count,
                    Action::Reduce(Order::DstFirst),
                )],
            });
        }
        mask <<= 1;
    }
    steps
}

/// Reduction to `root` for large counts: ring reduce-scatter, then every rank sends its
/// reduced block to the root.
pub fn ring_reduce(n: u32, rank: u32, root: u32, count: usize) -> Vec<Step> {
    let blocks = even_blocks(count, n);
    let mut steps = ring_reduce_scatter(n, rank, &blocks);
    steps.extend(gather(n, rank, root, &blocks, false));
    steps
}

/// Reduction of `0..count` to `root` in rank order, for non-commutative operators: a
/// [`binomial_reduce`] to rank 0 (whose tree combines contiguous rank ranges, lower first),
/// then rank 0 sends the result to `root`. Other ranks' working buffers hold partial
/// results afterwards.
pub fn ordered_reduce(n: u32, rank: u32, root: u32, count: usize) -> Vec<Step> {
    let mut steps = binomial_reduce(n, rank, 0, count);
    if root != 0 && n > 1 {
        if rank == 0 {
            steps.push(Step {
                sends: vec![send(root, 0..count)],
                recvs: vec![],
            });
        } else if rank == root {
            steps.push(Step {
                sends: vec![],
                recvs: vec![recv(0, 0..count, Action::Copy)],
            });
        }
    }
    steps
}

/// Inclusive prefix reduction (`MPI_Scan`) of `0..count`, by recursive doubling
/// (Hillis-Steele): in step `k` rank `r` sends its partial `x(r-2^k+1) ∘ ... ∘ x(r)` to
/// `r + 2^k` and combines the partial of `r - 2^k` in front of its own. `ceil(log2 n)`
/// steps; operands stay in rank order, so non-commutative operators are fine.
pub fn scan(n: u32, rank: u32, count: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut d = 1u32;
    while d < n {
        let mut st = Step::default();
        if rank + d < n {
            st.sends.push(send(rank + d, 0..count));
        }
        if rank >= d {
            st.recvs
                .push(recv(rank - d, 0..count, Action::Reduce(Order::SrcFirst)));
        }
        if !st.sends.is_empty() || !st.recvs.is_empty() {
            steps.push(st);
        }
        d <<= 1;
    }
    steps
}

/// Exclusive prefix reduction (`MPI_Exscan`): [`scan`], then every rank sends its inclusive
/// result to the next rank, which keeps it (`x0 ∘ ... ∘ x(r-1)`). Rank 0 receives nothing:
/// its working buffer is left as it was.
pub fn exscan(n: u32, rank: u32, count: usize) -> Vec<Step> {
    let mut steps = scan(n, rank, count);
    let mut st = Step::default();
    if rank + 1 < n {
        st.sends.push(send(rank + 1, 0..count));
    }
    if rank > 0 {
        st.recvs.push(recv(rank - 1, 0..count, Action::Copy));
    }
    if !st.sends.is_empty() || !st.recvs.is_empty() {
        steps.push(st);
    }
    steps
}

/// Linear gather of `blocks` to `root` (the root's own block stays in place). With
/// `input`, senders read their block from the start of the input buffer.
pub fn gather(n: u32, rank: u32, root: u32, blocks: &[Range<usize>], input: bool) -> Vec<Step> {
    if n == 1 {
        return Vec::new();
    }
    if rank == root {
        let recvs = (0..n)
            .filter(|&r| r != root && !blocks[r as usize].is_empty())
            .map(|r| recv(r, blocks[r as usize].clone(), Action::Copy))
            .collect();
        vec![Step {
            sends: vec![],
            recvs,
        }]
    } else {
        let b = blocks[rank as usize].clone();
        if b.is_empty() {
            return Vec::new();
        }
        let range = if input { 0..b.len() } else { b };
        vec![Step {
            sends: vec![Send {
                peer: root,
                range,
                input,
            }],
            recvs: vec![],
        }]
    }
}

/// Linear scatter of `blocks` of the root's input buffer; every other rank receives its
/// block into `0..len` of its working buffer.
pub fn scatter(n: u32, rank: u32, root: u32, blocks: &[Range<usize>]) -> Vec<Step> {
    if n == 1 {
        return Vec::new();
    }
    if rank == root {
        let sends = (0..n)
            .filter(|&r| r != root)
            .map(|r| Send {
                peer: r,
                range: blocks[r as usize].clone(),
                input: true,
            })
            .collect();
        vec![Step {
            sends,
            recvs: vec![],
        }]
    } else {
        let len = blocks[rank as usize].len();
        vec![Step {
            sends: vec![],
            recvs: vec![recv(root, 0..len, Action::Copy)],
        }]
    }
}

/// Pairwise all-to-all: in step `s` rank `r` sends input block `(r+s) % n` and receives
/// block `(r-s) % n` into the working buffer. `send_blocks[d]` is the range of the input
/// going to `d`, `recv_blocks[s]` the range of the output coming from `s`. The rank's own
/// block is not part of the schedule (the caller copies it).
pub fn pairwise_alltoall(
    n: u32,
    rank: u32,
    send_blocks: &[Range<usize>],
    recv_blocks: &[Range<usize>],
) -> Vec<Step> {
    (1..n)
        .map(|s| {
            let to = (rank + s) % n;
            let from = (rank + n - s) % n;
            Step {
                sends: vec![Send {
                    peer: to,
                    range: send_blocks[to as usize].clone(),
                    input: true,
                }],
                recvs: vec![recv(from, recv_blocks[from as usize].clone(), Action::Copy)],
            }
        })
        .collect()
}

/// The peers of `steps`, renamed by `to`: a schedule among `k` ranks run by `k` ranks of a
/// larger communicator.
fn renamed(steps: Vec<Step>, to: impl Fn(u32) -> u32) -> Vec<Step> {
    steps
        .into_iter()
        .map(|mut st| {
            st.sends.iter_mut().for_each(|x| x.peer = to(x.peer));
            st.recvs.iter_mut().for_each(|x| x.peer = to(x.peer));
            st
        })
        .collect()
}

/// Hierarchical allreduce for `per_host` consecutive ranks per host (the last host may have
/// fewer): a [`binomial_reduce`] to each host's first rank (its leader) over the host's
/// shared memory, an allreduce among the leaders by `inter` (for example
/// [`recursive_doubling`] or [`ring_allreduce`], among `ceil(n / per_host)` leaders) across
/// the network, then a [`binomial_bcast`] from the leader within the host.
///
/// Rounds: `2 ceil(log2 per_host)` plus `inter`'s among the leaders. Only the leaders send
/// across hosts, each what `inter` sends among `n / per_host` ranks: with a ring,
/// `2 (H - 1) / H × count` elements per host instead of per rank. The summation order is
/// fixed by the schedule (hosts in order, each host's ranks lower first), so every rank
/// gets identical bits.
pub fn hierarchical_allreduce(
    n: u32,
    rank: u32,
    per_host: u32,
    count: usize,
    inter: fn(u32, u32, usize) -> Vec<Step>,
) -> Vec<Step> {
    let per_host = per_host.clamp(1, n.max(1));
    let host = rank / per_host;
    let first = host * per_host;
    let local_n = per_host.min(n - first);
    let hosts = n.div_ceil(per_host);
    let local = move |l: u32| first + l;
    let mut steps = renamed(binomial_reduce(local_n, rank - first, 0, count), local);
    if rank == first {
        steps.extend(renamed(inter(hosts, host, count), |h| h * per_host));
    }
    steps.extend(renamed(
        binomial_bcast(local_n, rank - first, 0, count),
        local,
    ));
    steps
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(crate) mod sim {
    //! Runs the steps of every rank in one process, on plain data.
    use super::*;
    use std::collections::{HashMap, VecDeque};

    /// Runs every rank's schedule; `combine(dst, src, order)` reduces. Returns the working
    /// buffers. Panics on deadlock or on a size mismatch.
    pub fn run<T: Clone + std::fmt::Debug>(
        steps: &[Vec<Step>],
        mut work: Vec<Vec<T>>,
        input: &[Vec<T>],
        combine: &dyn Fn(&mut [T], &[T], Order),
    ) -> Vec<Vec<T>> {
        let n = steps.len();
        let mut pc = vec![(0usize, false, 0usize); n]; // (step, sends done, recvs applied)
        let mut chan: HashMap<(usize, usize), VecDeque<Vec<T>>> = HashMap::new();
        loop {
            let mut moved = false;
            for r in 0..n {
                loop {
                    let (s, sent, applied) = pc[r];
                    if s >= steps[r].len() {
                        break;
                    }
                    let st = &steps[r][s];
                    if !sent {
                        for x in &st.sends {
                            let data = if x.input {
                                input[r][x.range.clone()].to_vec()
                            } else {
                                work[r][x.range.clone()].to_vec()
                            };
                            chan.entry((r, x.peer as usize))
                                .or_default()
                                .push_back(data);
                        }
                        pc[r].1 = true;
                        moved = true;
                        continue;
                    }
                    if applied == st.recvs.len() {
                        pc[r] = (s + 1, false, 0);
                        moved = true;
                        continue;
                    }
                    let rv = &st.recvs[applied];
                    let Some(data) = chan
                        .get_mut(&(rv.peer as usize, r))
                        .and_then(|q| q.pop_front())
                    else {
                        break;
                    };
                    assert_eq!(
                        data.len(),
                        rv.range.len(),
                        "rank {r} step {s}: size mismatch"
                    );
                    let dst = &mut work[r][rv.range.clone()];
                    match rv.action {
                        Action::Copy => dst.clone_from_slice(&data),
                        Action::Reduce(o) => combine(dst, &data, o),
                    }
                    pc[r].2 += 1;
                    moved = true;
                }
            }
            if pc.iter().enumerate().all(|(r, p)| p.0 >= steps[r].len()) {
                assert!(chan.values().all(|q| q.is_empty()), "unreceived messages");
                return work;
            }
            assert!(moved, "deadlock: {pc:?}");
        }
    }
}

#[cfg(test)]
pub(crate) mod scale {
    //! The schedules at 1,024 to 65,536 ranks, without data and without processes: every
    //! message is matched by its receive (same peer pair, same length, in order), and the
    //! rounds and bytes are counted.
    use super::*;
    use std::collections::{HashMap, VecDeque};

    /// What a data-free run found.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Tally {
        /// Rounds: the longest chain of messages, each waiting for the one before (a
        /// message sent at logical time `t` arrives at `t + 1`).
        pub rounds: u32,
        /// Elements sent by the rank that sends most.
        pub max_sent: usize,
        /// Elements that cross from one host to another, per host, at most.
        pub cross_host_per_host: usize,
        /// Messages in all.
        pub messages: u64,
    }

    /// Runs the schedules of all `n` ranks (made by `plan(rank)`) with a worklist: a rank
    /// runs until it waits for a message, and is tried again when one reaches it. Panics on
    /// deadlock, a length mismatch or a message never received. `per_host` groups
    /// consecutive ranks into hosts for the cross-host count.
    pub fn tally(n: u32, per_host: u32, plan: &dyn Fn(u32) -> Vec<Step>) -> Tally {
        let steps: Vec<Vec<Step>> = (0..n).map(plan).collect();
        let mut pc = vec![(0usize, false, 0usize); n as usize];
        let mut clock = vec![0u32; n as usize];
        let mut sent = vec![0usize; n as usize];
        let mut cross = vec![0usize; n.div_ceil(per_host) as usize];
        let mut chan: HashMap<(u32, u32), VecDeque<(usize, u32)>> = HashMap::new();
        let mut ready: VecDeque<u32> = (0..n).collect();
        let mut messages = 0u64;
        while let Some(r) = ready.pop_front() {
            let ru = r as usize;
            loop {
                let (s, done_sends, applied) = pc[ru];
                let Some(st) = steps[ru].get(s) else { break };
                if !done_sends {
                    for x in &st.sends {
                        chan.entry((r, x.peer))
                            .or_default()
                            .push_back((x.range.len(), clock[ru]));
                        sent[ru] += x.range.len();
                        if r / per_host != x.peer / per_host {
                            cross[(r / per_host) as usize] += x.range.len();
                        }
                        messages += 1;
                        ready.push_back(x.peer);
                    }
                    pc[ru].1 = true;
                    continue;
                }
                if applied == st.recvs.len() {
                    pc[ru] = (s + 1, false, 0);
                    continue;
                }
                let rv = &st.recvs[applied];
                let Some((len, stamp)) = chan.get_mut(&(rv.peer, r)).and_then(|q| q.pop_front())
                else {
                    break;
                };
                assert_eq!(len, rv.range.len(), "rank {r} step {s}: length mismatch");
                clock[ru] = clock[ru].max(stamp + 1);
                pc[ru].2 += 1;
            }
        }
        for (r, p) in pc.iter().enumerate() {
            assert!(
                p.0 >= steps[r].len(),
                "deadlock: rank {r} stuck at step {}",
                p.0
            );
        }
        assert!(chan.values().all(VecDeque::is_empty), "unreceived messages");
        Tally {
            rounds: clock.iter().copied().max().unwrap_or(0),
            max_sent: sent.iter().copied().max().unwrap_or(0),
            cross_host_per_host: cross.iter().copied().max().unwrap_or(0),
            messages,
        }
    }

    /// For schedules in lock step (every send of step `s` is received in step `s` of its
    /// peer: the ring), the same counts from the ranks in `sample` and their peers only,
    /// for sizes where every rank's schedule would not fit in memory. Checks that each
    /// sampled rank's sends are received by its peers in the same step with the same
    /// length.
    pub fn tally_lockstep(
        n: u32,
        per_host: u32,
        sample: &[u32],
        plan: &dyn Fn(u32) -> Vec<Step>,
    ) -> Tally {
        let mut t = Tally {
            rounds: 0,
            max_sent: 0,
            cross_host_per_host: 0,
            messages: 0,
        };
        let mut peers: HashMap<u32, Vec<Step>> = HashMap::new();
        for &r in sample {
            let mine = plan(r);
            let mut sent = 0;
            let mut cross = 0;
            for (s, st) in mine.iter().enumerate() {
                for x in &st.sends {
                    let theirs = peers.entry(x.peer).or_insert_with(|| plan(x.peer));
                    let got = theirs[s].recvs.iter().find(|v| v.peer == r);
                    assert_eq!(
                        got.map(|v| v.range.len()),
                        Some(x.range.len()),
                        "rank {r} step {s}: not received in step by {}",
                        x.peer
                    );
                    sent += x.range.len();
                    if r / per_host != x.peer / per_host {
                        cross += x.range.len();
                    }
                }
            }
            t.rounds = t.rounds.max(mine.len() as u32);
            t.max_sent = t.max_sent.max(sent);
            t.cross_host_per_host = t.cross_host_per_host.max(cross);
            t.messages += mine.iter().map(|st| st.sends.len() as u64).sum::<u64>() * u64::from(n)
                / sample.len() as u64;
        }
        t
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::sim::run;
    use super::*;

    /// Symbolic values: each element is the expression tree that produced it, so the tests
    /// check the exact order of operations, not just the value.
    fn sym(dst: &mut [String], src: &[String], o: Order) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = match o {
                Order::DstFirst => format!("({d}+{s})"),
                Order::SrcFirst => format!("({s}+{d})"),
            };
        }
    }

    fn leaves(e: &str) -> Vec<u32> {
        e.split(|c: char| !c.is_ascii_digit() && c != 'x')
            .filter(|t| t.starts_with('x'))
            .map(|t| t[1..].split('_').next().unwrap().parse().unwrap())
            .collect()
    }

    fn inputs(n: u32, count: usize) -> Vec<Vec<String>> {
        (0..n)
            .map(|r| (0..count).map(|i| format!("x{r}_{i}")).collect())
            .collect()
    }

    fn check_allreduce(n: u32, count: usize, plan: fn(u32, u32, usize) -> Vec<Step>) {
        let steps: Vec<_> = (0..n).map(|r| plan(n, r, count)).collect();
        let out = run(&steps, inputs(n, count), &[], &sym);
        for i in 0..count {
            // Identical expression (so bitwise identical results) on every rank ...
            for r in 1..n as usize {
                assert_eq!(out[r][i], out[0][i], "n={n} count={count} elem {i}");
            }
            // ... containing every rank's input exactly once, for this element.
            let mut l = leaves(&out[0][i]);
            l.sort_unstable();
            assert_eq!(l, (0..n).collect::<Vec<_>>(), "n={n} {}", out[0][i]);
            assert!(out[0][i].split('_').skip(1).all(|t| {
                let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse::<usize>().unwrap() == i
            }));
        }
    }

    #[test]
    fn recursive_doubling_all_sizes() {
        for n in 1..=16 {
            for count in [0, 1, 3, 17] {
                check_allreduce(n, count, recursive_doubling);
            }
        }
        // The fold keeps lower ranks first: with 3 ranks, (x0+x1)+x2.
        let steps: Vec<_> = (0..3).map(|r| recursive_doubling(3, r, 1)).collect();
        assert_eq!(
            run(&steps, inputs(3, 1), &[], &sym)[2][0],
            "((x0_0+x1_0)+x2_0)"
        );
    }

    #[test]
    fn ring_allreduce_all_sizes() {
        for n in 1..=16 {
            for count in [0, 1, 2, 7, 16, 17, 50] {
                check_allreduce(n, count, ring_allreduce);
            }
        }
    }

    #[test]
    fn ring_allreduce_pipelines_across_the_boundary() {
        for n in 2..=8 {
            for r in 0..n {
                let s = ring_allreduce(n, r, 100);
                let k = (n - 1) as usize;
                assert_eq!(s[k - 1].recvs[0].range, s[k].sends[0].range);
                for w in s.windows(2).take(k - 1) {
                    assert_eq!(w[0].recvs[0].range, w[1].sends[0].range);
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_and_allgather() {
        for n in 1..=16 {
            for count in [0, 1, 5, 33] {
                let blocks = even_blocks(count, n);
                let steps: Vec<_> = (0..n).map(|r| ring_reduce_scatter(n, r, &blocks)).collect();
                let out = run(&steps, inputs(n, count), &[], &sym);
                for r in 0..n as usize {
                    for i in blocks[r].clone() {
                        let mut l = leaves(&out[r][i]);
                        l.sort_unstable();
                        assert_eq!(l, (0..n).collect::<Vec<_>>());
                    }
                }
                // Allgather with variable blocks.
                let counts: Vec<usize> = (0..n as usize).map(|r| (r * 7 + count) % 5).collect();
                let blocks = blocks_of(&counts);
                let total = counts.iter().sum();
                let work: Vec<Vec<String>> = (0..n as usize)
                    .map(|r| {
                        (0..total)
                            .map(|i| {
                                if blocks[r].contains(&i) {
                                    format!("v{i}")
                                } else {
                                    "?".into()
                                }
                            })
                            .collect()
                    })
                    .collect();
                let steps: Vec<_> = (0..n).map(|r| ring_allgather(n, r, &blocks)).collect();
                let out = run(&steps, work, &[], &sym);
                let want: Vec<String> = (0..total).map(|i| format!("v{i}")).collect();
                assert!(out.iter().all(|o| *o == want), "n={n}");
            }
        }
    }

    #[test]
    fn broadcasts_and_reduce() {
        for n in 1..=16 {
            for root in [0, n / 2, n - 1] {
                for count in [0, 1, 9] {
                    for plan in [binomial_bcast, chain_bcast] {
                        let work: Vec<Vec<String>> = (0..n)
                            .map(|r| {
                                let tag = if r == root { "root" } else { "junk" };
                                vec![tag.to_string(); count]
                            })
                            .collect();
                        let steps: Vec<_> = (0..n).map(|r| plan(n, r, root, count)).collect();
                        let out = run(&steps, work, &[], &sym);
                        assert!(out.iter().all(|o| o.iter().all(|x| x == "root")));
                    }
                    for plan in [binomial_reduce, ring_reduce] {
                        let steps: Vec<_> = (0..n).map(|r| plan(n, r, root, count)).collect();
                        let out = run(&steps, inputs(n, count), &[], &sym);
                        for i in 0..count {
                            let mut l = leaves(&out[root as usize][i]);
                            l.sort_unstable();
                            assert_eq!(l, (0..n).collect::<Vec<_>>(), "n={n} root={root}");
                        }
                    }
                }
            }
        }
    }

    /// Non-commutative operators: every result lists the leaves in rank order.
    #[test]
    fn rank_order_schedules() {
        let in_order = |e: &str, want: &[u32]| assert_eq!(leaves(e), want, "{e}");
        for n in 1..=16u32 {
            for count in [0usize, 1, 3] {
                let steps: Vec<_> = (0..n).map(|r| recursive_doubling(n, r, count)).collect();
                let out = run(&steps, inputs(n, count), &[], &sym);
                let all: Vec<u32> = (0..n).collect();
                for r in 0..n as usize {
                    for e in &out[r] {
                        in_order(e, &all);
                    }
                }
                for root in [0, n / 2, n - 1] {
                    let steps: Vec<_> = (0..n).map(|r| ordered_reduce(n, r, root, count)).collect();
                    let out = run(&steps, inputs(n, count), &[], &sym);
                    for e in &out[root as usize] {
                        in_order(e, &all);
                    }
                }
                let steps: Vec<_> = (0..n).map(|r| scan(n, r, count)).collect();
                let out = run(&steps, inputs(n, count), &[], &sym);
                for r in 0..n {
                    for e in &out[r as usize] {
                        in_order(e, &(0..=r).collect::<Vec<_>>());
                    }
                }
                let steps: Vec<_> = (0..n).map(|r| exscan(n, r, count)).collect();
                let out = run(&steps, inputs(n, count), &[], &sym);
                for r in 0..n {
                    for (i, e) in out[r as usize].iter().enumerate() {
                        if r == 0 {
                            assert_eq!(e, &format!("x0_{i}"), "rank 0 untouched");
                        } else {
                            in_order(e, &(0..r).collect::<Vec<_>>());
                        }
                    }
                }
            }
        }
        // The scan's rounds: log2 n.
        assert_eq!(scan(16, 15, 1).len(), 4);
        assert_eq!(scan(5, 4, 1).len(), 3);
    }

    #[test]
    fn variable_blocks_gather_scatter_alltoall() {
        for n in 1..=9u32 {
            // Displaced, unordered, with gaps and empty blocks.
            let counts: Vec<usize> = (0..n as usize).map(|r| (r * 5 + 2) % 4).collect();
            let mut off = 3;
            let mut blocks = vec![0..0; n as usize];
            for r in (0..n as usize).rev() {
                blocks[r] = off..off + counts[r];
                off += counts[r] + 1;
            }
            let len = off;
            let root = n - 1;
            let input: Vec<Vec<String>> = (0..n as usize)
                .map(|r| (0..counts[r]).map(|i| format!("{r}.{i}")).collect())
                .collect();
            let mut work = vec![vec!["?".to_string(); len]; n as usize];
            work[root as usize][blocks[root as usize].clone()]
                .clone_from_slice(&input[root as usize]);
            // Non-roots know only their own block's length.
            let own = |r: u32| {
                let mut b = vec![0..0; n as usize];
                b[r as usize] = 0..counts[r as usize];
                b
            };
            let steps: Vec<_> = (0..n)
                .map(|r| {
                    gather(
                        n,
                        r,
                        root,
                        &if r == root { blocks.clone() } else { own(r) },
                        true,
                    )
                })
                .collect();
            let out = run(&steps, work, &input, &sym);
            for r in 0..n as usize {
                assert_eq!(out[root as usize][blocks[r].clone()], input[r][..]);
            }
            let mut full = vec!["?".to_string(); len];
            for r in 0..n as usize {
                full[blocks[r].clone()].clone_from_slice(&input[r]);
            }
            let inp = vec![full; n as usize];
            let work: Vec<Vec<String>> = (0..n as usize)
                .map(|r| vec!["?".to_string(); counts[r]])
                .collect();
            let steps: Vec<_> = (0..n)
                .map(|r| scatter(n, r, root, &if r == root { blocks.clone() } else { own(r) }))
                .collect();
            let out = run(&steps, work, &inp, &sym);
            for r in (0..n as usize).filter(|&r| r != root as usize) {
                assert_eq!(out[r], input[r]);
            }
            // All-to-all-v: rank s sends (s + d) % 3 elements to d.
            let c = |s: usize, d: usize| (s + d) % 3;
            let nu = n as usize;
            let sb: Vec<Vec<Range<usize>>> = (0..nu)
                .map(|s| blocks_of(&(0..nu).map(|d| c(s, d)).collect::<Vec<_>>()))
                .collect();
            let rb: Vec<Vec<Range<usize>>> = (0..nu)
                .map(|d| blocks_of(&(0..nu).map(|s| c(s, d)).collect::<Vec<_>>()))
                .collect();
            let inp: Vec<Vec<String>> = (0..nu)
                .map(|s| {
                    (0..nu)
                        .flat_map(|d| (0..c(s, d)).map(move |i| format!("{s}>{d}.{i}")))
                        .collect()
                })
                .collect();
            let mut work: Vec<Vec<String>> = (0..nu)
                .map(|d| vec!["?".to_string(); rb[d].last().map_or(0, |b| b.end)])
                .collect();
            for r in 0..nu {
                let v = inp[r][sb[r][r].clone()].to_vec();
                work[r][rb[r][r].clone()].clone_from_slice(&v);
            }
            let steps: Vec<_> = (0..n)
                .map(|r| pairwise_alltoall(n, r, &sb[r as usize], &rb[r as usize]))
                .collect();
            let out = run(&steps, work, &inp, &sym);
            for d in 0..nu {
                let want: Vec<String> = (0..nu)
                    .flat_map(|s| (0..c(s, d)).map(move |i| format!("{s}>{d}.{i}")))
                    .collect();
                assert_eq!(out[d], want);
            }
        }
    }

    #[test]
    fn gather_scatter_alltoall() {
        for n in 1..=16u32 {
            let root = n / 3;
            let counts: Vec<usize> = (0..n as usize).map(|r| r % 3 + 1).collect();
            let blocks = blocks_of(&counts);
            let total: usize = counts.iter().sum();
            // Gather from inputs.
            let input: Vec<Vec<String>> = (0..n as usize)
                .map(|r| (0..counts[r]).map(|i| format!("{r}.{i}")).collect())
                .collect();
            let mut work = vec![vec!["?".to_string(); total]; n as usize];
            work[root as usize][blocks[root as usize].clone()]
                .clone_from_slice(&input[root as usize]);
            let steps: Vec<_> = (0..n).map(|r| gather(n, r, root, &blocks, true)).collect();
            let out = run(&steps, work, &input, &sym);
            assert_eq!(out[root as usize], input.concat());
            // Scatter it back.
            let inp: Vec<Vec<String>> = vec![input.concat(); n as usize];
            let work = vec![vec!["?".to_string(); 3]; n as usize];
            let steps: Vec<_> = (0..n).map(|r| scatter(n, r, root, &blocks)).collect();
            let out = run(&steps, work, &inp, &sym);
            for r in (0..n as usize).filter(|&r| r != root as usize) {
                assert_eq!(out[r][..counts[r]], input[r][..]);
            }
            // All-to-all, 2 elements per pair.
            let b = even_blocks(2 * n as usize, n);
            let inp: Vec<Vec<String>> = (0..n)
                .map(|r| (0..2 * n).map(|i| format!("{r}>{}", i / 2)).collect())
                .collect();
            let steps: Vec<_> = (0..n).map(|r| pairwise_alltoall(n, r, &b, &b)).collect();
            let mut work = vec![vec!["?".to_string(); 2 * n as usize]; n as usize];
            for r in 0..n as usize {
                let own = b[r].clone();
                work[r][own.clone()].clone_from_slice(&inp[r][own]);
            }
            let out = run(&steps, work, &inp, &sym);
            for r in 0..n {
                let want: Vec<String> = (0..2 * n).map(|i| format!("{}>{r}", i / 2)).collect();
                assert_eq!(out[r as usize], want);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod scale_tests {
    use super::scale::{tally, tally_lockstep, Tally};
    use super::*;

    fn log2(n: u32) -> u32 {
        n.next_power_of_two().trailing_zeros()
    }

    /// Elements per rank in the scale runs: a multiple of every N, so `2 (N-1)/N × count`
    /// is exact.
    const PER_RANK: usize = 64;

    /// One row of the table in the [`super::super`] docs.
    struct Row {
        name: String,
        n: u32,
        per_host: u32,
        t: Tally,
        rounds_bound: u32,
        sent_bound: usize,
        how: &'static str,
    }

    fn rows(sizes: &[u32]) -> Vec<Row> {
        let mut rows = Vec::new();
        for &n in sizes {
            let count = PER_RANK * n as usize;
            let p = 1u32 << (31 - n.leading_zeros());
            let rd_rounds = log2(p) + if p == n { 0 } else { 2 };
            let t = tally(n, 96, &|r| recursive_doubling(n, r, count));
            rows.push(Row {
                name: "recursive doubling".into(),
                n,
                per_host: 96,
                t,
                rounds_bound: rd_rounds,
                sent_bound: log2(p) as usize * count + if p == n { 0 } else { count },
                how: "all ranks",
            });
            let ring = |r| ring_allreduce(n, r, count);
            let (t, how) = if n <= 1024 {
                (tally(n, 96, &ring), "all ranks")
            } else {
                let sample = [0, 1, n / 2, n - 2, n - 1];
                (tally_lockstep(n, 96, &sample, &ring), "5 ranks, lock step")
            };
            rows.push(Row {
                name: "ring".into(),
                n,
                per_host: 96,
                t,
                rounds_bound: 2 * (n - 1),
                sent_bound: 2 * (n as usize - 1) * count / n as usize,
                how,
            });
            for per_host in [96u32, 192] {
                let hosts = n.div_ceil(per_host);
                let intra = 2 * log2(per_host.min(n));
                for (iname, inter, inter_rounds, inter_sent) in [
                    (
                        "rd",
                        recursive_doubling as fn(u32, u32, usize) -> Vec<Step>,
                        {
                            let ph = 1u32 << (31 - hosts.leading_zeros());
                            log2(ph) + if ph == hosts { 0 } else { 2 }
                        },
                        (log2(hosts) as usize + 1) * count,
                    ),
                    (
                        "ring",
                        ring_allreduce,
                        2 * (hosts - 1),
                        2 * (hosts as usize - 1) * count.div_ceil(hosts as usize),
                    ),
                ] {
                    let t = tally(n, per_host, &|r| {
                        hierarchical_allreduce(n, r, per_host, count, inter)
                    });
                    rows.push(Row {
                        name: format!("hierarchical, {iname} among hosts"),
                        n,
                        per_host,
                        t,
                        rounds_bound: intra + inter_rounds,
                        sent_bound: inter_sent + log2(per_host) as usize * count,
                        how: "all ranks",
                    });
                }
            }
        }
        rows
    }

    fn table(rows: &[Row]) -> String {
        let mut out = String::from(
            "| allreduce schedule | ranks | ranks/host | rounds | bound | sent by the busiest rank (× size) | bound | sent across hosts per host (× size) | simulated |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in rows {
            let size = PER_RANK * r.n as usize;
            let x = |v: usize| format!("{:.3}", v as f64 / size as f64);
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.name,
                r.n,
                r.per_host,
                r.t.rounds,
                r.rounds_bound,
                x(r.t.max_sent),
                x(r.sent_bound),
                x(r.t.cross_host_per_host),
                r.how
            ));
        }
        out
    }

    /// Every schedule at 1,024 to 65,536 ranks meets its bound: recursive doubling in
    /// `log2 N` rounds, the ring in `2 (N-1)` rounds sending `2 (N-1)/N × size` (the
    /// bandwidth-optimal amount), the hierarchical ones in `2 log2 L` plus the leaders'
    /// rounds. Prints the table of the docs (`cargo test -p efa-core --lib scale_tests --
    /// --nocapture`).
    #[test]
    fn schedules_at_scale_meet_their_bounds() {
        let sizes: &[u32] = if cfg!(debug_assertions) {
            &[1024, 4096, 65536]
        } else {
            &[1024, 4096, 16384, 65536]
        };
        let rows = rows(sizes);
        for r in &rows {
            assert!(
                r.t.rounds <= r.rounds_bound,
                "{} at {} ranks ({} per host): {} rounds, bound {}",
                r.name,
                r.n,
                r.per_host,
                r.t.rounds,
                r.rounds_bound
            );
            assert!(
                r.t.max_sent <= r.sent_bound,
                "{} at {} ranks ({} per host): {} elements sent, bound {}",
                r.name,
                r.n,
                r.per_host,
                r.t.max_sent,
                r.sent_bound
            );
        }
        // The flat schedules meet their bounds exactly (they are optimal, not just under).
        for r in rows
            .iter()
            .filter(|r| r.name == "ring" || r.name == "recursive doubling")
        {
            assert_eq!(
                (r.t.rounds, r.t.max_sent),
                (r.rounds_bound, r.sent_bound),
                "{}",
                r.name
            );
        }
        let table = table(&rows);
        println!("{table}");
        // The table in the module docs is this one.
        let docs = include_str!("schedule.rs");
        for line in table.lines().filter(|l| !l.contains("| 16384 |")) {
            assert!(
                docs.contains(&format!("//! {line}\n")),
                "the table in schedule.rs's docs is out of date; put in: {line}"
            );
        }
    }

    /// The hierarchical schedule computes the allreduce (every input once, the same
    /// expression on every rank), for hosts of several sizes, the last one short.
    #[test]
    fn hierarchical_allreduce_is_an_allreduce() {
        use super::super::kernel::Order;
        use super::sim::run;
        let sym = |dst: &mut [String], src: &[String], o: Order| {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = match o {
                    Order::DstFirst => format!("({d}+{s})"),
                    Order::SrcFirst => format!("({s}+{d})"),
                };
            }
        };
        for n in 1..=13u32 {
            for per_host in 1..=5u32 {
                for inter in [
                    recursive_doubling as fn(u32, u32, usize) -> Vec<Step>,
                    ring_allreduce,
                ] {
                    let count = 3;
                    let steps: Vec<_> = (0..n)
                        .map(|r| hierarchical_allreduce(n, r, per_host, count, inter))
                        .collect();
                    let input: Vec<Vec<String>> = (0..n)
                        .map(|r| (0..count).map(|i| format!("x{r}_{i}")).collect())
                        .collect();
                    let out = run(&steps, input, &[], &sym);
                    for i in 0..count {
                        for r in 1..n as usize {
                            assert_eq!(out[r][i], out[0][i], "n={n} L={per_host}");
                        }
                        let mut l: Vec<u32> = out[0][i]
                            .split(['(', ')', '+'])
                            .filter(|t| !t.is_empty())
                            .map(|t| t[1..].split('_').next().unwrap().parse().unwrap())
                            .collect();
                        l.sort_unstable();
                        assert_eq!(l, (0..n).collect::<Vec<_>>(), "n={n} L={per_host}");
                    }
                }
            }
        }
    }
}
