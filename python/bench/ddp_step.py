"""A DDP step of a 25M-parameter model (an MLP, float32, CPU), ms per step with the
"efa" backend and with "gloo", alternating, in one job:

    efarun -n 2 python python/bench/ddp_step.py [--steps 10] [--rounds 3] [--batch 8]

Both run the same model, data and DistributedDataParallel settings (defaults: 25 MB
buckets); only the process group differs. Prints, on rank 0, each round's ms per step and
the medians and their ratio.
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
    ddps[k] = torch.nn.parallel.DistributedDataParallel(m, process_group=g)
    opts[k] = torch.optim.SGD(m.parameters(), lr=1e-4)
x = torch.randn(a.batch, w)


def step(k):
    opts[k].zero_grad()
    ddps[k](x).square().mean().backward()
    opts[k].step()


times = {k: [] for k in ddps}
for r in range(a.rounds):
    for k in ddps:
        step(k)  # warm-up
        dist.barrier(group=groups[k])
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(k)
        dist.barrier(group=groups[k])
        times[k].append((time.perf_counter() - t0) / a.steps * 1e3)
        if dist.get_rank() == 0:
            print(f"round {r} {k:5} {times[k][-1]:8.1f} ms/step", flush=True)
if dist.get_rank() == 0:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"DDP {nparams / 1e6:.1f}M params, batch {a.batch}, 2 ranks: efa {med['efa']:.1f} ms/step, "
        f"gloo {med['gloo']:.1f} ms/step, gloo/efa = {med['gloo'] / med['efa']:.2f}x"
    )
dist.destroy_process_group()
