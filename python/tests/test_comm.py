"""The efa package on numpy arrays (and torch CPU tensors through DLPack), 2 or 4 ranks."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import efa

ALL = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
       np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128]
REDUCIBLE = [np.int8, np.uint8, np.int32, np.uint32, np.int64, np.uint64, np.float16,
             np.float32, np.float64]
NOT_REDUCIBLE = [np.bool_, np.int16, np.uint16, np.complex64, np.complex128]


@pytest.fixture(scope="session")
def world_size(comm):
    return comm.size


def data(rank, n, dtype, salt=0):
    """Rank-specific values that fit every dtype (small, so sums stay exact)."""
    v = (np.arange(n) * 3 + rank * 7 + salt) % 11
    if dtype is np.bool_:
        return (v % 2).astype(np.bool_)
    if np.issubdtype(dtype, np.complexfloating):
        return (v + 1j * (v + 1)).astype(dtype)
    return v.astype(dtype)


def everyone(comm, n, dtype, salt=0):
    return [data(r, n, dtype, salt) for r in range(comm.size)]


OPS = {
    efa.SUM: lambda xs: np.sum(np.stack(xs), axis=0),
    efa.PROD: lambda xs: np.prod(np.stack(xs), axis=0),
    efa.MIN: lambda xs: np.min(np.stack(xs), axis=0),
    efa.MAX: lambda xs: np.max(np.stack(xs), axis=0),
}


def expected(op, xs, dtype):
    return OPS[op](xs).astype(dtype)


@pytest.mark.parametrize("dtype", REDUCIBLE, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", list(OPS), ids=lambda o: str(o).split(".")[-1])
def test_allreduce_in_place(comm, dtype, op):
    x = data(comm.rank, 37, dtype)
    comm.allreduce(x, op)
    np.testing.assert_array_equal(x, expected(op, everyone(comm, 37, dtype), dtype))


@pytest.mark.parametrize("dtype", REDUCIBLE, ids=lambda d: np.dtype(d).name)
def test_allreduce_out_of_place(comm, dtype):
    send = data(comm.rank, 1000, dtype)
    before = send.copy()
    recv = np.zeros_like(send)
    comm.allreduce_into(send, recv, efa.MAX)
    np.testing.assert_array_equal(send, before)
    np.testing.assert_array_equal(recv, expected(efa.MAX, everyone(comm, 1000, dtype), dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_allreduce_avg(comm, dtype):
    x = data(comm.rank, 64, dtype)
    comm.allreduce(x, efa.AVG)
    want = np.mean(np.stack(everyone(comm, 64, np.float64)), axis=0)
    np.testing.assert_allclose(x.astype(np.float64), want, rtol=1e-2 if dtype is np.float16 else 1e-6)


def test_allreduce_large(comm):
    n = 3 * 1024 * 1024 + 5  # above the ring threshold, not a multiple of anything
    x = np.full(n, comm.rank + 1, dtype=np.float32)
    comm.allreduce(x)
    assert np.all(x == sum(range(1, comm.size + 1)))


@pytest.mark.parametrize("dtype", NOT_REDUCIBLE, ids=lambda d: np.dtype(d).name)
def test_reduction_of_unreducible_type_is_a_type_error(comm, dtype):
    with pytest.raises(TypeError, match="cannot be reduced; efa reduces int8"):
        comm.allreduce(data(comm.rank, 4, dtype))


def test_zero_copy_views(comm):
    base = np.zeros(10, dtype=np.int64)
    view = base[2:6]  # contiguous, at an offset: results must land in base
    view[:] = comm.rank + 1
    comm.allreduce(view)
    total = sum(range(1, comm.size + 1))
    np.testing.assert_array_equal(base, [0, 0] + [total] * 4 + [0] * 4)


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: np.dtype(d).name)
def test_broadcast(comm, dtype):
    root = comm.size - 1
    x = data(comm.rank, 50, dtype)
    comm.broadcast(x, root)
    np.testing.assert_array_equal(x, data(root, 50, dtype))


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: np.dtype(d).name)
def test_allgather(comm, dtype):
    n, c = comm.size, 5
    want = np.concatenate(everyone(comm, c, dtype))
    buf = np.zeros(n * c, dtype=dtype)
    buf[comm.rank * c:(comm.rank + 1) * c] = data(comm.rank, c, dtype)
    comm.allgather(buf)
    np.testing.assert_array_equal(buf, want)
    out = np.zeros(n * c, dtype=dtype)
    comm.allgather_into(data(comm.rank, c, dtype), out)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: np.dtype(d).name)
def test_alltoall(comm, dtype):
    n, c = comm.size, 3
    send = data(comm.rank, n * c, dtype)
    want = np.concatenate([data(r, n * c, dtype)[comm.rank * c:(comm.rank + 1) * c] for r in range(n)])
    recv = np.zeros_like(send)
    comm.alltoall_into(send, recv)
    np.testing.assert_array_equal(recv, want)
    comm.alltoall(send)
    np.testing.assert_array_equal(send, want)


@pytest.mark.parametrize("dtype", REDUCIBLE, ids=lambda d: np.dtype(d).name)
def test_reduce_scatter(comm, dtype):
    n, c = comm.size, 4
    full = expected(efa.SUM, everyone(comm, n * c, dtype), dtype)
    mine = full[comm.rank * c:(comm.rank + 1) * c]
    recv = np.zeros(c, dtype=dtype)
    comm.reduce_scatter_into(data(comm.rank, n * c, dtype), recv)
    np.testing.assert_array_equal(recv, mine)
    buf = data(comm.rank, n * c, dtype)
    comm.reduce_scatter(buf)
    np.testing.assert_array_equal(buf[comm.rank * c:(comm.rank + 1) * c], mine)


@pytest.mark.parametrize("dtype", REDUCIBLE, ids=lambda d: np.dtype(d).name)
def test_reduce_scan_exscan(comm, dtype):
    xs = everyone(comm, 9, dtype)
    out = np.zeros(9, dtype=dtype)
    comm.reduce_into(xs[comm.rank], out, efa.SUM, 0)
    if comm.rank == 0:
        np.testing.assert_array_equal(out, expected(efa.SUM, xs, dtype))
    x = xs[comm.rank].copy()
    comm.scan(x)
    np.testing.assert_array_equal(x, expected(efa.SUM, xs[:comm.rank + 1], dtype))
    out = np.zeros(9, dtype=dtype)
    comm.exscan_into(xs[comm.rank], out)
    if comm.rank > 0:
        np.testing.assert_array_equal(out, expected(efa.SUM, xs[:comm.rank], dtype))


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.complex128], ids=lambda d: np.dtype(d).name)
def test_gather_scatter(comm, dtype):
    n, c, root = comm.size, 6, 0
    recv = np.zeros(n * c, dtype=dtype)
    comm.gather_into(data(comm.rank, c, dtype), recv, root)
    if comm.rank == root:
        np.testing.assert_array_equal(recv, np.concatenate(everyone(comm, c, dtype)))
    src = data(99, n * c, dtype)
    out = np.zeros(c, dtype=dtype)
    comm.scatter_into(src, out, root)
    np.testing.assert_array_equal(out, src[comm.rank * c:(comm.rank + 1) * c])


def test_v_collectives(comm):
    n, me = comm.size, comm.rank
    counts = [r + 1 for r in range(n)]
    displs = list(np.cumsum([0] + counts[:-1]))
    mine = np.full(counts[me], me, dtype=np.int32)
    want = np.concatenate([np.full(counts[r], r, dtype=np.int32) for r in range(n)])
    out = np.zeros(sum(counts), dtype=np.int32)
    comm.allgatherv_into(mine, out, counts)
    np.testing.assert_array_equal(out, want)
    out = np.zeros(sum(counts), dtype=np.int32)
    comm.gatherv_into(mine, out, counts, displs, 0)
    if me == 0:
        np.testing.assert_array_equal(out, want)
    got = np.zeros(counts[me], dtype=np.int32)
    comm.scatterv_into(want, got, counts, displs, 0)
    np.testing.assert_array_equal(got, mine)
    # alltoallv: rank r sends r + 1 elements of value 100 * r + d to rank d
    scount = [me + 1] * n
    rcount = [r + 1 for r in range(n)]
    send = np.concatenate([np.full(me + 1, 100 * me + d, dtype=np.int64) for d in range(n)])
    recv = np.zeros(sum(rcount), dtype=np.int64)
    comm.alltoallv_into(send, scount, list(np.cumsum([0] + scount[:-1])), recv, rcount,
                        list(np.cumsum([0] + rcount[:-1])))
    np.testing.assert_array_equal(recv, np.concatenate([np.full(r + 1, 100 * r + me) for r in range(n)]))


@pytest.mark.parametrize("dtype", ALL, ids=lambda d: np.dtype(d).name)
def test_send_recv_ring(comm, dtype):
    n, me = comm.size, comm.rank
    right, left = (me + 1) % n, (me - 1) % n
    got = np.zeros(33, dtype=dtype)
    req = comm.irecv(got, left, 5)
    comm.send(data(me, 33, dtype), right, 5)
    st = req.wait()
    assert (st.source, st.tag, st.nbytes) == (left, 5, got.nbytes)
    np.testing.assert_array_equal(got, data(left, 33, dtype))
    sreq = comm.isend(data(me, 33, dtype, salt=1), right, 6)
    st = comm.recv(got, efa.ANY_SOURCE, efa.ANY_TAG)
    assert sreq.wait() is None and st.source == left and st.tag == 6
    np.testing.assert_array_equal(got, data(left, 33, dtype, salt=1))


def test_request_test_fills_buffer(comm):
    n, me = comm.size, comm.rank
    got = np.zeros(4, dtype=np.float64)
    req = comm.irecv(got, (me - 1) % n, 9)
    comm.barrier()
    comm.send(np.full(4, me, dtype=np.float64), (me + 1) % n, 9)
    deadline = time.monotonic() + 30
    while not req.test():
        assert time.monotonic() < deadline
    assert req.done and np.all(got == (me - 1) % n)
    assert req.wait().source == (me - 1) % n


def test_sendrecv_probe_cancel(comm):
    n, me = comm.size, comm.rank
    right, left = (me + 1) % n, (me - 1) % n
    got = np.zeros(3, dtype=np.int64)
    st = comm.sendrecv(np.full(3, me, dtype=np.int64), right, got, left, 1, 1)
    assert st.source == left and np.all(got == left)
    buf = np.full(3, me, dtype=np.int64)
    comm.sendrecv_replace(buf, right, left, 2, 2)
    assert np.all(buf == left)
    comm.send(np.arange(7, dtype=np.int16), right, 3)
    st = comm.probe(left, 3)
    assert st.nbytes == 14 and comm.iprobe(left, 3) is not None
    comm.recv(np.zeros(7, dtype=np.int16), left, 3)
    pending = comm.irecv(np.zeros(1), left, 4)
    assert pending.cancel()
    with pytest.raises(efa.CancelledError):
        pending.wait()
    comm.barrier()


@pytest.mark.min_ranks(2, "rank 0 sends to rank 1")
def test_truncated(comm):
    if comm.rank > 1:
        comm.barrier()
        return
    if comm.rank == 0:
        comm.send(np.arange(8, dtype=np.int32), 1, 11)
        comm.send(np.arange(3, dtype=np.int16), 1, 12)  # 6 bytes: 1.5 int32s
    else:
        with pytest.raises(efa.TruncatedError, match="does not fit the 16-byte receive buffer"):
            comm.recv(np.zeros(4, dtype=np.int32), 0, 11)
        got = np.full(4, -1, dtype=np.int32)
        with pytest.raises(efa.TruncatedError, match="not a whole number of 4-byte elements"):
            comm.recv(got, 0, 12)
        assert np.all(got == -1), got  # nothing written
    comm.barrier()


@pytest.mark.parametrize("call", ["send", "recv", "allreduce", "allreduce_into", "broadcast", "isend", "irecv"])
def test_non_contiguous_is_rejected(comm, call):
    strided = np.zeros((4, 4), dtype=np.float32)[:, 1]
    args = {
        "send": (strided, 0), "recv": (strided, 0), "allreduce": (strided,),
        "allreduce_into": (np.zeros(4, dtype=np.float32), strided), "broadcast": (strided, 0),
        "isend": (strided, 0), "irecv": (strided, 0),
    }[call]
    with pytest.raises(BufferError, match=r"is not C-contiguous \(shape \[4\], strides \[16\] bytes\).*ascontiguousarray"):
        getattr(comm, call)(*args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.complex128],
                         ids=lambda d: np.dtype(d).name)
def test_zero_length_buffers(comm, dtype):
    """Empty arrays are no elements, whatever their address: every call accepts them."""
    e = np.zeros(0, dtype)
    if dtype is not np.complex128:
        comm.allreduce(e, efa.SUM)
        comm.allreduce_into(np.zeros(0, dtype), e, efa.SUM)
    comm.broadcast(e, 0)
    comm.allgather(e)
    nxt, prv = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    req = comm.irecv(np.zeros(0, dtype), prv, 21)
    comm.send(e, nxt, 21)
    assert req.wait().nbytes == 0
    st = comm.sendrecv(e, nxt, np.zeros(0, dtype), prv, 22, 22)
    assert st.source == prv and st.nbytes == 0
    comm.barrier()


def test_bad_arguments(comm):
    ro = np.zeros(4, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(BufferError, match="read-only"):
        comm.recv(ro, 0)
    with pytest.raises(TypeError, match="same"):
        comm.allreduce_into(np.zeros(4, np.float32), np.zeros(4, np.float64))
    x = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        comm.allreduce_into(x[:4], x[2:6])
    with pytest.raises(TypeError, match="buffer-protocol"):
        comm.send([1, 2, 3], 0)
    with pytest.raises(efa.ArgumentError, match="out of range") as e:
        comm.send(np.zeros(1), comm.size)
    assert isinstance(e.value, ValueError) and e.value.report
    with pytest.raises(efa.ArgumentError, match="reserved"):
        comm.send(np.zeros(1), 0, efa.MAX_TAG + 1)
    n = comm.size
    with pytest.raises(efa.CollectiveError, match=f"receive buffer holds {2 * n + 1} elements; it must hold {2 * n}"):
        comm.allgather_into(np.zeros(2, np.int32), np.zeros(comm.size * 2 + 1, np.int32))


@pytest.mark.min_ranks(2, "with 1 rank every length is a whole number of blocks")
def test_allgather_in_place_needs_whole_blocks(comm):
    with pytest.raises(efa.CollectiveError, match="not a whole number of blocks for"):
        comm.allgather(np.zeros(comm.size * 2 + 1, np.int32))


@pytest.mark.min_ranks(2, "rank 0 waits for a message that rank 1 sends late")
def test_gil_is_released_while_blocked(comm):
    if comm.rank > 1:
        comm.barrier()
        return
    if comm.rank == 1:
        time.sleep(0.5)
        comm.send(np.ones(1), 0, 12)
    else:
        count, stop = [0], threading.Event()

        def spin():
            while not stop.is_set():
                count[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        time.sleep(0.05)
        before = count[0]
        comm.recv(np.zeros(1), 1, 12)
        during = count[0] - before
        stop.set()
        t.join()
        # While recv waited ~0.45 s the other thread ran Python: with the GIL held it
        # could not have counted at all.
        assert during > 10000, during
    comm.barrier()


def test_torch_tensors_through_dlpack(comm):
    torch = pytest.importorskip("torch")
    t = torch.arange(10, dtype=torch.bfloat16) + comm.rank
    comm.allreduce(t)
    want = sum(torch.arange(10, dtype=torch.float32) + r for r in range(comm.size))
    assert torch.equal(t.float(), want)
    g = torch.zeros(comm.size * 2, dtype=torch.int64)
    comm.allgather_into(torch.full((2,), comm.rank, dtype=torch.int64), g)
    assert g.tolist() == [r for r in range(comm.size) for _ in range(2)]
    with pytest.raises(BufferError, match="not C-contiguous.*contiguous"):
        comm.allreduce(torch.zeros(4, 4).t())
    with pytest.raises(BufferError, match="detach"):
        comm.allreduce(torch.zeros(3, requires_grad=True))


def test_timeout_is_a_timeout_error(comm, tmp_path):
    if comm.rank != 0:
        return
    script = tmp_path / "t.py"
    script.write_text(
        "import numpy as np, efa, time\n"
        "c = efa.Communicator(timeout=0.5)\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    c.recv(np.zeros(1), efa.ANY_SOURCE, 3)\n"
        "except TimeoutError as e:\n"
        "    assert isinstance(e, efa.TimeoutError) and isinstance(e, efa.Error)\n"
        "    assert 'did not complete within' in str(e), str(e)\n"
        "    print('TIMEOUT', round(time.monotonic() - t0, 2))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("EFA_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC"))}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "TIMEOUT" in out.stdout, out.stdout + out.stderr
    assert float(out.stdout.split()[-1]) < 5


def test_ctrl_c_raises_keyboard_interrupt(comm, tmp_path):
    """SIGINT after `import efa` and a communicator is Python's KeyboardInterrupt (PSM's
    libinfinipath, loaded with libfabric, would otherwise exit(1) silently)."""
    if comm.rank != 0:
        return
    script = tmp_path / "sigint.py"
    script.write_text(
        "import os, signal, time, efa\n"
        "c = efa.Communicator(timeout=5)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    c.barrier()\n"
        "    print('INTERRUPTED')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("EFA_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC",
                                "IPATH_"))}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "INTERRUPTED" in out.stdout, (out.returncode, out.stdout + out.stderr)


def test_dup_split_route(comm):
    d = comm.dup()
    assert (d.rank, d.size) == (comm.rank, comm.size) and d.context_id != comm.context_id
    x = np.ones(2)
    d.allreduce(x)
    assert np.all(x == comm.size)
    half = comm.split(comm.rank % 2, comm.rank)
    assert half.size == len(range(comm.rank % 2, comm.size, 2))
    d.finalize()  # MPI_Comm_disconnect: waits for d's sends, releases it


@pytest.mark.min_ranks(2, "the route to another rank on this host")
def test_route_to_a_local_peer_is_shm(comm):
    assert comm.route((comm.rank + 1) % comm.size).startswith("shm")
