"""Python cost per small allreduce: µs per call of efa.Communicator.allreduce_into (float32,
out of place, as efa-bench's) for the given sizes, to lay beside ``efa-bench allreduce`` (the Rust API, same
sizes). Run both in one session, alternating:

    efarun -n 2 python python/bench/allreduce_latency.py [--iters 20000] [--bytes 8,64,1024]
    efarun -n 2 target/release/efa-bench allreduce -b 8 -e 1024 -f 8 -n 20000

Build the package with ``maturin develop --release`` first (a debug build measures Rust's
debug code). Prints, on rank 0, one line per size: bytes, µs per call (mean of the iters).
"""

import argparse
import time

import numpy as np

import efa

ap = argparse.ArgumentParser()
ap.add_argument("--iters", type=int, default=20000)
ap.add_argument("--warmup", type=int, default=1000)
ap.add_argument("--bytes", default="8,64,1024")
a = ap.parse_args()
comm = efa.Communicator()
for nbytes in [int(b) for b in a.bytes.split(",")]:
    x = np.ones(nbytes // 4, dtype=np.float32)
    y = np.empty_like(x)
    for _ in range(a.warmup):
        comm.allreduce_into(x, y)
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        comm.allreduce_into(x, y)
    us = (time.perf_counter() - t0) / a.iters * 1e6
    if comm.rank == 0:
        print(f"python allreduce {nbytes:>8} B {us:9.2f} us")
comm.finalize()
