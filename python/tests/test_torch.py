"""The torch.distributed backend "efa" (efa.torch): each operation against values computed
locally, and DDP with "efa" against DDP with "gloo" from the same seed. Run under efarun
(``efarun -n 2 python -m pytest python/tests/test_torch.py``) or torchrun
(``torchrun --nproc-per-node 2 -m pytest python/tests/test_torch.py``)."""

import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import efa  # noqa: E402
import efa.torch  # noqa: E402,F401


@pytest.fixture(scope="module")
def pg():
    if "RANK" not in os.environ:
        pytest.skip("not under a launcher: run with efarun -n 2 or torchrun")
    dist.init_process_group("efa")
    gloo = dist.new_group(backend="gloo")
    yield dist.group.WORLD, gloo
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_size(pg):
    return dist.get_world_size()


def rank_size():
    return dist.get_rank(), dist.get_world_size()


@pytest.mark.parametrize("op,fn", [
    (dist.ReduceOp.SUM, lambda xs: sum(xs)),
    (dist.ReduceOp.AVG, lambda xs: sum(xs) / len(xs)),
    (dist.ReduceOp.MIN, lambda xs: torch.stack(xs).min(0).values),
    (dist.ReduceOp.MAX, lambda xs: torch.stack(xs).max(0).values),
    (dist.ReduceOp.PRODUCT, lambda xs: torch.stack(xs).prod(0)),
], ids=["sum", "avg", "min", "max", "product"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_all_reduce(pg, op, fn, dtype):
    r, n = rank_size()
    xs = [(torch.arange(12) % 5 + k).to(dtype) for k in range(n)]
    t = xs[r].clone()
    if op == dist.ReduceOp.AVG and not dtype.is_floating_point:
        _, gloo = pg
        with pytest.raises(RuntimeError, match="can't be cast"):  # gloo refuses it
            dist.all_reduce(t.clone(), op=op, group=gloo)
        refused = rf"ReduceOp.AVG of {dtype} tensors is not supported"
        with pytest.raises(ValueError, match=refused):
            dist.all_reduce(t, op=op, async_op=True)
        assert torch.equal(t, xs[r])  # refused before any data moved
        with pytest.raises(ValueError, match=refused):  # the same rule for every reduction
            dist.reduce_scatter_tensor(torch.zeros(2, dtype=dtype), torch.ones(2 * n, dtype=dtype), op=op)
        dist.barrier()  # and no rank is left inside a collective
        return
    w = dist.all_reduce(t, op=op, async_op=True)
    assert w.wait()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(t.double(), fn([x.double() for x in xs]).to(dtype).double(), rtol=tol, atol=tol)


def test_broadcast_allgather_reduce_scatter_all_to_all(pg):
    r, n = rank_size()
    t = torch.full((5,), float(r))
    dist.broadcast(t, src=n - 1)
    assert torch.all(t == n - 1)
    outs = [torch.zeros(2, 3) for _ in range(n)]
    dist.all_gather(outs, torch.full((2, 3), float(r)))
    assert all(torch.all(o == k) for k, o in enumerate(outs))
    big = torch.zeros(n * 4, dtype=torch.int32)
    dist.all_gather_into_tensor(big, torch.full((4,), r, dtype=torch.int32))
    assert big.tolist() == [k for k in range(n) for _ in range(4)]
    inp = [torch.full((3,), float(r * 10 + k)) for k in range(n)]
    out = torch.zeros(3)
    dist.reduce_scatter(out, inp)
    assert torch.all(out == sum(q * 10 + r for q in range(n)))
    out = torch.zeros(2)
    dist.reduce_scatter_tensor(out, torch.arange(2.0 * n) + r)
    assert out.tolist() == [float(sum(2 * r + i + q for q in range(n))) for i in range(2)]
    ins = [torch.full((k + 1,), float(r * 100 + k)) for k in range(n)]
    outs = [torch.zeros(r + 1) for _ in range(n)]
    dist.all_to_all(outs, ins)
    assert all(torch.all(o == k * 100 + r) for k, o in enumerate(outs))
    o = torch.zeros(n)
    dist.all_to_all_single(o, torch.arange(float(n)) + 10 * r)
    assert o.tolist() == [float(k * 10 + r) for k in range(n)]
    # split sizes: rank k sends k + 1 rows to everyone
    rows_in = [r + 1] * n
    rows_out = [k + 1 for k in range(n)]
    src = torch.full((sum(rows_in), 2), float(r))
    dst = torch.zeros(sum(rows_out), 2)
    dist.all_to_all_single(dst, src, rows_out, rows_in)
    assert dst[:, 0].tolist() == [float(k) for k in range(n) for _ in range(k + 1)]
    # a non-contiguous tensor is handled (copied and written back)
    m = torch.zeros(3, 4)
    col = m[:, 1]
    col.fill_(1.0)
    dist.all_reduce(col)
    assert torch.all(m[:, 1] == n) and torch.all(m[:, 0] == 0)


def test_coalesced_ops_return_one_work(pg):
    """A coalesced call is one Work for all its tensors: its future holds every output, and
    it fails when any of its operations failed, not only the last."""
    r, n = rank_size()
    backend, _ = pg  # the efa group itself: torch uses the ProcessGroup the backend returns
    assert isinstance(backend, efa.torch.ProcessGroupEFA), backend

    def pairs():
        outs = [torch.zeros(2 * n), torch.zeros(3 * n, dtype=torch.int64)]
        ins = [torch.full((2,), float(r)), torch.full((3,), r + 10, dtype=torch.int64)]
        return outs, ins

    gathered = [torch.arange(n).repeat_interleave(2).float(),
                (torch.arange(n) + 10).repeat_interleave(3)]
    outs, ins = pairs()
    w = backend.allgather_into_tensor_coalesced(outs, ins)
    assert w.wait()
    got = w.get_future().value()
    assert len(got) == 2 and all(torch.equal(g, e) for g, e in zip(got, gathered)), got
    assert all(torch.equal(o, e) for o, e in zip(outs, gathered))

    rs_outs = [torch.zeros(2), torch.zeros(1, dtype=torch.int64)]
    rs_ins = [torch.arange(2.0 * n) + r, torch.arange(n) + r]
    w = backend.reduce_scatter_tensor_coalesced(rs_outs, rs_ins, dist.ReduceScatterOptions())
    assert w.wait()
    assert len(w.get_future().value()) == 2
    assert rs_outs[0].tolist() == [float(sum(2 * r + i + q for q in range(n))) for i in range(2)]
    assert rs_outs[1].tolist() == [sum(r + q for q in range(n))]

    # torch's own coalescing: one Work for the group, with every result
    outs, ins = pairs()
    with dist._coalescing_manager(async_ops=True) as cm:
        for o, i in zip(outs, ins):
            dist.all_gather_into_tensor(o, i)
    cm.wait()
    assert all(torch.equal(o, e) for o, e in zip(outs, gathered))

    # the first of two fails (an output of the wrong size, on every rank): the one Work
    # reports it
    outs, ins = pairs()
    outs[0] = torch.zeros(2 * n + 1)
    w = backend.allgather_into_tensor_coalesced(outs, ins)
    with pytest.raises(efa.CollectiveError):
        w.wait()
    assert not w.is_success() and isinstance(w.exception(), efa.CollectiveError)

    # all_gather_coalesced: lists of outputs, one Work
    lists = [[torch.zeros(2) for _ in range(n)], [torch.zeros(3, dtype=torch.int64) for _ in range(n)]]
    w = backend.allgather_coalesced(lists, [torch.full((2,), float(r)), torch.full((3,), r, dtype=torch.int64)])
    assert w.wait() and len(w.get_future().value()) == 2
    assert [[int(t[0]) for t in ts] for ts in lists] == [list(range(n))] * 2

    with pytest.raises(ValueError, match="2 outputs for 1 inputs"):
        backend.allgather_into_tensor_coalesced(outs, ins[:1])


@pytest.mark.min_ranks(2, "rank 0 sends to the others and receives from rank 1")
def test_barrier_send_recv(pg):
    r, n = rank_size()
    dist.barrier()
    if r == 0:
        for k in range(1, n):
            dist.send(torch.full((3,), float(k * 7)), k, tag=4)
    else:
        t = torch.zeros(3)
        dist.recv(t, 0, tag=4)
        assert torch.all(t == r * 7)
    if r == 0:
        t = torch.zeros(1)
        src = dist.recv(t)  # any source
        assert src == int(t.item()) and 1 <= src < n
    elif r == 1:
        dist.send(torch.tensor([1.0]), 0)
    dist.barrier()


@pytest.mark.min_ranks(2, "rank 0 receives what rank 1 sends late")
def test_work_wait_timeout(pg):
    import datetime
    import time

    r, n = rank_size()
    dist.barrier()
    if r == 0:
        t = torch.zeros(4)
        w = dist.irecv(t, src=1, tag=9)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
            w.wait(datetime.timedelta(milliseconds=200))
        assert time.monotonic() - start < 0.9  # bounded by the timeout, not by the send
        assert w.wait() and torch.all(t == 5.0)  # then it completes normally
    elif r == 1:
        time.sleep(1.0)
        dist.send(torch.full((4,), 5.0), 0, tag=9)
    dist.barrier()


def test_allgather_output_lists_are_checked(pg):
    r, n = rank_size()
    with pytest.raises(ValueError, match=f"{n + 1} output tensors for {n} ranks"):
        dist.all_gather([torch.zeros(2) for _ in range(n + 1)], torch.ones(2))
    with pytest.raises(ValueError, match="each must match the input"):
        dist.all_gather([torch.zeros(3) for _ in range(n)], torch.ones(2))
    outs = [torch.zeros(2) for _ in range(n)]
    dist.all_gather(outs, torch.full((2,), float(r)))  # nothing was left queued by the refusals
    assert [int(o[0]) for o in outs] == list(range(n))


def test_errors_are_raised(pg):
    with pytest.raises(ValueError, match="op BAND is not supported"):
        dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.BAND)


def _train(group, steps=20, seed=1234):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group, bucket_cap_mb=0.01)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1 + dist.get_rank())  # each rank its own data
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen)
        y = torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_ddp_matches_gloo(pg):
    world, gloo = pg
    with_efa = _train(world)
    with_gloo = _train(gloo)
    untrained = _train(world, steps=0)
    # the runs moved the parameters, and the same way with both backends
    assert (with_efa - untrained).abs().max() > 1e-2
    torch.testing.assert_close(with_efa, with_gloo, rtol=1e-5, atol=1e-6)
    # and every rank holds the same parameters (the gradients were averaged)
    other = with_efa.clone()
    dist.broadcast(other, 0)
    torch.testing.assert_close(with_efa, other, rtol=0, atol=0)
