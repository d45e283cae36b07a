"""The torch.distributed backend ``"efa"``: ``import efa.torch``, then
``torch.distributed.init_process_group("efa")``.

It is a ``torch.distributed.ProcessGroup`` written in Python (registered with
``torch.distributed.Backend.register_backend``, as PyTorch's own test_c10d_pypg.py and
multi_threaded_pg.py do) over the efa communicator, for CPU tensors:

* all_reduce (SUM, AVG, MIN, MAX, PRODUCT; AVG of floating-point tensors only, as with
  gloo: other dtypes raise ValueError), broadcast, all_gather (list and
  ``all_gather_into_tensor``), reduce_scatter (list and ``reduce_scatter_tensor``),
  all_to_all (list and ``all_to_all_single``, with split sizes), reduce, gather, scatter,
  barrier, send, recv (also from any source).
* Element types: what efa reduces (int8, uint8, int32, int64, float16, bfloat16, float32,
  float64; also uint32/uint64) and, for data movements, any type.
* Every call returns one ``torch.distributed.Work`` whose ``get_future()`` holds the output
  tensors (DDP's reducer reads them); a coalesced call (``allreduce_coalesced``,
  ``all_gather_coalesced``, and ``all_gather_into_tensor``/``reduce_scatter_tensor`` under
  ``_coalescing_manager``) returns one for the whole group of tensors, holding every output
  and failing if any of its operations failed (the rest are then not run). Operations run
  in order on one worker thread per process group (the GIL is released while efa works),
  so ``async_op=True`` and DDP overlap communication with computation as with Gloo;
  ``wait()`` raises the operation's error (an ``efa.Error`` with the Rust text;
  ``efa.TimeoutError`` is a ``TimeoutError``).
* Tensors need not be contiguous (a contiguous copy is used and copied back) nor detached.

Bootstrap: the efa world communicator joins the job the way ``efa.Communicator()`` does
(efarun, torchrun, mpirun, srun). Under torchrun, torch's rendezvous is torchrun's. Under
efarun (which sets ``EFA_RANK``/``EFA_WORLD_SIZE``/``EFA_STORE`` and nothing of torch's),
importing this module joins the efa job at once, and rank 0 serves a torch ``TCPStore`` on a
free port whose address it sends to the others; it then sets ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and
``TORCHELASTIC_USE_AGENT_STORE=True`` (every rank a client of that store), so that the
default ``init_method="env://"`` works unchanged.

Process groups: the default group uses the world communicator; ``new_group`` over all ranks
gets a ``dup()`` of it. A group over a subset of the ranks is refused with an error: torch
creates a group's backend only on its members, while efa's ``split`` is collective over the
parent.
"""

import atexit
import os
import queue
import threading

import torch
import torch.distributed as dist

import efa

__all__ = ["ProcessGroupEFA", "world"]

_RED = dist.ReduceOp.RedOpType if hasattr(dist.ReduceOp, "RedOpType") else dist.ReduceOp
_OPS = {
    _RED.SUM: efa.SUM,
    _RED.AVG: efa.AVG,
    _RED.MIN: efa.MIN,
    _RED.MAX: efa.MAX,
    _RED.PRODUCT: efa.PROD,
}

_world = None
_world_lock = threading.Lock()
_store_server = None  # rank 0's TCPStore under efarun, kept alive for the job


def world():
    """The process's efa world communicator (joining the job on first use)."""
    global _world
    with _world_lock:
        if _world is None:
            _world = efa.Communicator()
        return _world


def _finalize_world():
    global _world
    with _world_lock:
        w, _world = _world, None
    if w is not None:
        try:
            w.finalize()
        except efa.Error as e:
            import sys

            print(f"efa.torch: finalize at exit: {e}", file=sys.stderr)


atexit.register(_finalize_world)


def _set_torch_env_under_efarun():
    """Under efarun, gives torch's env:// rendezvous what it needs (see the module docs)."""
    global _store_server
    env = os.environ
    if "EFA_RANK" not in env or "MASTER_ADDR" in env or "RANK" in env:
        return
    comm = world()
    host = env.get("EFA_STORE", "127.0.0.1:0").rsplit(":", 1)[0]
    if host.startswith("file://") or not host:
        host = "127.0.0.1"
    port = torch.zeros(1, dtype=torch.int64)
    if comm.rank == 0:
        _store_server = dist.TCPStore(
            host, 0, comm.size, True, wait_for_workers=False
        )
        port[0] = _store_server.port
    comm.broadcast(port, 0)
    env["MASTER_ADDR"] = host
    env["MASTER_PORT"] = str(int(port[0]))
    env["RANK"] = str(comm.rank)
    env["WORLD_SIZE"] = str(comm.size)
    env.setdefault("LOCAL_RANK", env.get("EFA_LOCAL_RANK", str(comm.rank)))
    env.setdefault("LOCAL_WORLD_SIZE", env.get("EFA_LOCAL_SIZE", str(comm.size)))
    env["TORCHELASTIC_USE_AGENT_STORE"] = "True"


class _Work(dist._Work):
    """A queued operation: complete when the worker has run it."""

    def __init__(self, result):
        super().__init__()
        self._fut = torch.futures.Future()
        self._result = result
        self._done = threading.Event()

    def _run(self, fn):
        try:
            fn()
        except BaseException as e:  # reported by wait(), as torch's Work does
            self._fut.set_exception(e)
        else:
            self._fut.set_result(self._result)
        self._done.set()

    def wait(self, timeout=None):
        """Waits until the operation has run; re-raises its error.

        ``timeout`` (a ``datetime.timedelta`` or seconds; ``None`` or zero: no limit, as
        torch's ``kNoTimeout``) bounds this wait: past it, ``TimeoutError`` is raised and
        the operation stays queued (its own efa deadline, ``EFA_TIMEOUT``, still applies)."""
        secs = getattr(timeout, "total_seconds", lambda: timeout)()
        if secs and not self._done.wait(secs):
            raise TimeoutError(
                f"efa backend: the operation did not finish within {secs:g} s (Work.wait)"
            )
        self._fut.wait()
        return True

    def is_completed(self):
        return self._fut.done()

    def is_success(self):
        if not self._fut.done():
            return False
        try:
            self._fut.value()
            return True
        except Exception:
            return False

    def exception(self):
        try:
            self._fut.value()
            return None
        except Exception as e:
            return e

    def get_future(self):
        return self._fut

    def result(self):
        self._fut.wait()
        return self._result


def _op(opts, tensors):
    """efa's operator for torch's ``opts.reduceOp`` (or a ``ReduceOp``; SUM when ``opts`` is
    None) over ``tensors``: the one place that decides which reductions the backend does.

    ValueError, before any data moves, for an operator efa lacks and for AVG of tensors that
    are not floating point: gloo refuses integer AVG too (its sum cannot be divided in
    place), where efa itself would truncate."""
    if opts is None:
        return efa.SUM
    op = getattr(opts, "reduceOp", opts)
    kind = getattr(op, "op", op)
    try:
        red = _OPS[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"efa backend: reduce op {getattr(kind, 'name', kind)} is not supported; efa "
            "reduces with SUM, AVG, MIN, "
            "MAX and PRODUCT"
        ) from None
    if red == efa.AVG:
        for t in tensors:
            if not t.is_floating_point():
                raise ValueError(
                    f"efa backend: ReduceOp.AVG of {t.dtype} tensors is not supported (as "
                    "with gloo): an average of integers is in general not an integer; reduce "
                    "a floating-point tensor, or use SUM and divide"
                )
    return red


def _flat(t):
    """A contiguous, detached tensor sharing ``t``'s memory when it can, and a function that
    copies the result back into ``t`` when it could not."""
    d = t.detach()
    if d.is_contiguous():
        return d, lambda: None
    c = d.contiguous()
    return c, lambda: d.copy_(c)


def _check_pairs(call, outputs, inputs):
    if len(outputs) != len(inputs):
        raise ValueError(
            f"efa backend: {call}: {len(outputs)} outputs for {len(inputs)} inputs; each "
            "input needs its own output"
        )


def _check_cpu(tensors):
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(
                f"efa backend: tensors must be on the CPU, got one on {t.device}; use "
                "init_process_group(\"cpu:efa,cuda:nccl\") for GPU tensors"
            )


class ProcessGroupEFA(dist.ProcessGroup):
    """A process group over an efa communicator (see the module docs)."""

    def __init__(self, comm, rank, size):
        super().__init__(rank, size)
        if comm.rank != rank or comm.size != size:
            raise RuntimeError(
                f"efa backend: torch says rank {rank} of {size}, efa's bootstrap says rank "
                f"{comm.rank} of {comm.size}; both must come from the same launcher "
                "(efarun, torchrun, mpirun or srun)"
            )
        self._comm = comm
        self._queue = queue.SimpleQueue()
        self._worker = threading.Thread(
            target=self._serve, name=f"efa-pg-{comm.context_id}", daemon=True
        )
        self._worker.start()

    # -- machinery ----------------------------------------------------------------------

    def _serve(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, fn = item
            work._run(fn)

    def _submit(self, result, fn):
        w = _Work(result)
        self._queue.put((w, fn))
        return w

    def getBackendName(self):
        return "efa"

    def name(self):
        return "efa"

    def shutdown(self):
        self._queue.put(None)

    def __repr__(self):
        return f"ProcessGroupEFA(rank={self.rank()}, size={self.size()})"

    # -- collectives --------------------------------------------------------------------

    def allreduce(self, tensors, opts=None):
        _check_cpu(tensors)
        op = _op(opts, tensors)

        def run():
            for t in tensors:
                f, back = _flat(t)
                self._comm.allreduce(f.reshape(-1), op)
                back()

        return self._submit(tensors, run)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors, opts):
        _check_cpu(tensors)
        root = opts.rootRank

        def run():
            for t in tensors:
                f, back = _flat(t)
                self._comm.broadcast(f, root)
                back()

        return self._submit(tensors, run)

    def reduce(self, tensors, opts):
        _check_cpu(tensors)
        op, root = _op(opts, tensors), opts.rootRank

        def run():
            for t in tensors:
                f, back = _flat(t)
                if self.rank() == root:
                    self._comm.reduce(f, op, root)
                    back()
                else:  # efa uses the buffer as scratch; torch leaves non-roots' input alone
                    self._comm.reduce(f.clone(), op, root)

        return self._submit(tensors, run)

    def allgather(self, output_lists, inputs, opts=None):
        _check_pairs("allgather", output_lists, inputs)
        _check_cpu(inputs)
        for outs, inp in zip(output_lists, inputs):
            if len(outs) != self.size():
                raise ValueError(
                    f"efa backend: allgather: {len(outs)} output tensors for {self.size()} "
                    "ranks; give one per rank"
                )
            for o in outs:
                if o.numel() != inp.numel() or o.dtype != inp.dtype:
                    raise ValueError(
                        f"efa backend: allgather: an output of {o.numel()} {o.dtype} "
                        f"elements for an input of {inp.numel()} {inp.dtype}; each must "
                        "match the input"
                    )
            _check_cpu(outs)

        def run():
            for outs, inp in zip(output_lists, inputs):
                src, _ = _flat(inp)
                flat = torch.empty(
                    (self.size(),) + tuple(src.shape), dtype=src.dtype
                )
                self._comm.allgather_into(src.reshape(-1), flat.reshape(-1))
                for i, o in enumerate(outs):
                    o.detach().copy_(flat[i].view_as(o))

        return self._submit(output_lists, run)

    allgather_coalesced = allgather  # one Work for every (outputs, input) pair already

    def _allgather_base(self, output, input, opts=None):
        return self.allgather_into_tensor_coalesced([output], [input], opts)

    all_gather_single = _allgather_base

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        _check_pairs("allgather_into_tensor_coalesced", outputs, inputs)
        _check_cpu(list(outputs) + list(inputs))

        def run():
            for output, input in zip(outputs, inputs):
                o, back = _flat(output)
                i, _ = _flat(input)
                self._comm.allgather_into(i.reshape(-1), o.reshape(-1))
                back()

        return self._submit(list(outputs), run)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        _check_pairs("reduce_scatter", outputs, input_lists)
        _check_cpu(outputs)
        op = _op(opts, outputs)

        def run():
            for out, ins in zip(outputs, input_lists):
                flat = torch.cat([t.detach().reshape(-1) for t in ins])
                o, back = _flat(out)
                self._comm.reduce_scatter_into(flat, o.reshape(-1), op)
                back()

        return self._submit(outputs, run)

    def _reduce_scatter_base(self, output, input, opts=None):
        return self.reduce_scatter_tensor_coalesced([output], [input], opts)

    reduce_scatter_single = _reduce_scatter_base

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        _check_pairs("reduce_scatter_tensor_coalesced", outputs, inputs)
        _check_cpu(list(outputs) + list(inputs))
        op = _op(opts, outputs)

        def run():
            for output, input in zip(outputs, inputs):
                o, back = _flat(output)
                i, _ = _flat(input)
                self._comm.reduce_scatter_into(i.reshape(-1), o.reshape(-1), op)
                back()

        return self._submit(list(outputs), run)

    def alltoall(self, outputs, inputs, opts=None):
        _check_cpu(list(outputs) + list(inputs))

        def run():
            send = torch.cat([t.detach().reshape(-1) for t in inputs])
            counts_s = [t.numel() for t in inputs]
            counts_r = [t.numel() for t in outputs]
            recv = torch.empty(sum(counts_r), dtype=send.dtype)
            self._comm.alltoallv_into(
                send, counts_s, _displs(counts_s), recv, counts_r, _displs(counts_r)
            )
            off = 0
            for t, n in zip(outputs, counts_r):
                t.detach().copy_(recv[off : off + n].view_as(t))
                off += n

        return self._submit(outputs, run)

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        _check_cpu([output, input])
        n = self.size()

        def run():
            o, back = _flat(output)
            i, _ = _flat(input)
            if not output_split_sizes and not input_split_sizes:
                self._comm.alltoall_into(i.reshape(-1), o.reshape(-1))
            else:
                in_row = i[0].numel() if i.dim() > 0 and i.shape[0] else 1
                out_row = o[0].numel() if o.dim() > 0 and o.shape[0] else 1
                ins = list(input_split_sizes) or [i.shape[0] // n] * n
                outs = list(output_split_sizes) or [o.shape[0] // n] * n
                cs = [x * in_row for x in ins]
                cr = [x * out_row for x in outs]
                self._comm.alltoallv_into(
                    i.reshape(-1), cs, _displs(cs), o.reshape(-1), cr, _displs(cr)
                )
            back()

        return self._submit([output], run)

    all_to_all_single = alltoall_base

    def gather(self, output_lists, inputs, opts):
        _check_cpu(inputs)
        root = opts.rootRank

        def run():
            for idx, inp in enumerate(inputs):
                src, _ = _flat(inp)
                if self.rank() == root:
                    flat = torch.empty((self.size(),) + tuple(src.shape), dtype=src.dtype)
                    self._comm.gather_into(src.reshape(-1), flat.reshape(-1), root)
                    for i, o in enumerate(output_lists[idx]):
                        o.detach().copy_(flat[i].view_as(o))
                else:
                    self._comm.gather_into(src.reshape(-1), src.new_empty(0), root)

        return self._submit(output_lists, run)

    def scatter(self, outputs, input_lists, opts):
        _check_cpu(outputs)
        root = opts.rootRank

        def run():
            for idx, out in enumerate(outputs):
                o, back = _flat(out)
                if self.rank() == root:
                    flat = torch.cat([t.detach().reshape(-1) for t in input_lists[idx]])
                else:
                    flat = o.new_empty(0)
                self._comm.scatter_into(flat, o.reshape(-1), root)
                back()

        return self._submit(outputs, run)

    def barrier(self, opts=None):
        return self._submit([], self._comm.barrier)

    def monitored_barrier(self, opts=None, wait_all_ranks=False):
        return self.barrier(opts).wait()

    # -- point-to-point -----------------------------------------------------------------

    def send(self, tensors, dst, tag=0):
        _check_cpu(tensors)

        def run():
            for t in tensors:
                f, _ = _flat(t)
                self._comm.send(f, dst, tag)

        return self._submit(tensors, run)

    def recv(self, tensors, src, tag=0):
        _check_cpu(tensors)

        def run():
            for t in tensors:
                f, back = _flat(t)
                self._comm.recv(f, src, tag)
                back()

        return self._submit(tensors, run)

    def recv_anysource(self, tensors, tag=0):
        _check_cpu(tensors)
        w = None

        def run():
            for t in tensors:
                f, back = _flat(t)
                st = self._comm.recv(f, efa.ANY_SOURCE, tag)
                back()
                w._source = st.source

        w = self._submit(tensors, run)
        w._source = -1
        # torch's recv() reads the sender with work._source_rank() (in Python, so this
        # attribute answers it).
        w._source_rank = lambda: w._source
        return w


def _displs(counts):
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out


_groups = 0


def _create(store, rank, size, timeout):
    """The backend constructor torch calls (``Backend.register_backend``)."""
    global _groups
    comm = world()
    if size != comm.size:
        raise RuntimeError(
            f"efa backend: a process group of {size} of the {comm.size} ranks is not "
            "supported: torch creates a group's backend only on its members, and efa's "
            "split() is collective over the parent; use new_group(backend=\"gloo\") for "
            "groups over a subset of the ranks"
        )
    if _groups > 0:
        comm = comm.dup()  # a group over every rank: its own context
    _groups += 1
    return ProcessGroupEFA(comm, rank, size)


dist.Backend.register_backend("efa", _create, devices=["cpu"])
_set_torch_env_under_efarun()
