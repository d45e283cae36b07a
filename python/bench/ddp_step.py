"""A DDP step of a 25M-parameter model (an MLP, float32, CPU), ms per step with the
"efa" backend and with "gloo", alternating, in one job:

    efarun -n 2 python python/bench/ddp_step.py [--steps 10] [--rounds 3] [--batch 8]

Both run the same model, data and DistributedDataParallel settings (``--bucket-mb``,
default DDP's 25 MB); only the process group differs. A third column is the same step
without DDP (no communication). Prints, on rank 0, each round's ms per step, the medians
and their ratio.
"""

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

import efa.torch  # noqa: F401  (registers "efa")

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--width", type=int, default=2500)
ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb (25: DDP's default)")
a = ap.parse_args()

dist.init_process_group("efa")
groups = {"efa": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
torch.manual_seed(0)
w = a.width
model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(w, w), torch.nn.ReLU())])
nparams = sum(p.numel() for p in model.parameters())
# One copy of the model per backend (a DDP wrapper hooks its model's parameters).
ddps, opts = {}, {}
for k, g in groups.items():
    m = copy.deepcopy(model)
    ddps[k] = torch.nn.parallel.DistributedDataParallel(
        m, process_group=g, bucket_cap_mb=a.bucket_mb
    )
    opts[k] = torch.optim.SGD(m.parameters(), lr=1e-4)
x = torch.randn(a.batch, w)


def step(k):
    opts[k].zero_grad()
    ddps[k](x).square().mean().backward()
    opts[k].step()


# The same step without DDP (no communication), for the breakdown.
local = copy.deepcopy(model)
ddps["local"], opts["local"] = local, torch.optim.SGD(local.parameters(), lr=1e-4)
groups["local"] = None
times = {k: [] for k in ddps}
for r in range(a.rounds):
    for k in ddps:
        step(k)  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(k)
        dist.barrier()
        times[k].append((time.perf_counter() - t0) / a.steps * 1e3)
        if dist.get_rank() == 0:
            print(f"round {r} {k:5} {times[k][-1]:8.1f} ms/step", flush=True)
if dist.get_rank() == 0:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"DDP {nparams / 1e6:.1f}M params, batch {a.batch}, buckets {a.bucket_mb} MB, "
        f"{dist.get_world_size()} ranks: efa {med['efa']:.1f} ms/step, gloo {med['gloo']:.1f} "
        f"ms/step, gloo/efa = {med['gloo'] / med['efa']:.2f}x (the step without DDP: "
        f"{med['local']:.1f} ms)"
    )
dist.destroy_process_group()
