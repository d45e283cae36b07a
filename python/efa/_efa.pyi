"""Type stubs of efa._efa, the Rust extension (python/src/lib.rs), re-exported by ``efa``.

Buffers (``Buffer``) are any C-contiguous buffer-protocol object (numpy array, bytearray,
memoryview, array.array) or DLPack tensor in host memory (torch CPU tensor), used without a
copy; a strided one raises ``BufferError``, a read-only one passed where the call writes
raises ``BufferError``. Shapes are in elements of the buffer's type; ``n`` is ``size``,
``me`` is ``rank``. Element types: reductions take int8, uint8, int32, uint32, int64,
uint64, float16, bfloat16, float32 and float64 (others raise ``TypeError``); data movements
and point-to-point take any type, including bool, (u)int16, complex64 and complex128.

Naming follows efa-core: the plain name works in place on one buffer, ``_into`` is out of
place (``send`` unchanged, ``recv`` gets the result; they may not share memory, and must
have the same element type).

Every blocking call releases the GIL and has the communicator's deadline (``EFA_TIMEOUT``,
seconds, default 60, or ``Communicator(timeout=...)``). Errors are ``efa.Error`` subclasses
whose text is the Rust error's (see ``efa._errors``): ``efa.TimeoutError`` (also a builtin
``TimeoutError``), ``PeerFailedError``, ``TruncatedError``, ``CollectiveError`` (ranks
disagree, or buffers/counts do not fit, on every rank before any data moves),
``ArgumentError`` (bad rank or tag), ``SettingError``, ``BootstrapError``,
``FinalizedError``, ``CancelledError``, ``AlreadyInitializedError``.
"""

import enum
from typing import Any, Optional, Sequence

Buffer = Any  # buffer-protocol object or DLPack CPU tensor

ANY_SOURCE: int
"""Wildcard source of recv/irecv/probe (-1, MPI_ANY_SOURCE)."""
ANY_TAG: int
"""Wildcard tag of recv/irecv/probe (-1, MPI_ANY_TAG)."""
MAX_TAG: int
"""The largest user tag (2**31 - 1); larger tags are reserved (ArgumentError)."""

class ReduceOp(enum.Enum):
    """Built-in reduction operators (efa-core ReduceOp). AVG divides the sum by the number of
    ranks (in the element type; integer AVG truncates)."""

    SUM = 0
    PROD = 1
    MIN = 2
    MAX = 3
    AVG = 4

class Status:
    """What a receive or probe found."""

    source: int
    """The sender (a rank of the communicator)."""
    tag: int
    """The message's tag."""
    nbytes: int
    """The message's length in bytes."""

class Request:
    """A non-blocking send or receive. Dropping an unfinished receive cancels it; an
    unfinished send still completes (its data was copied at isend)."""

    done: bool
    """Whether it has completed (after wait(), or a test() that returned True)."""
    def wait(self) -> Optional[Status]:
        """Waits (GIL released): the receive's Status, None for a send. Raises the
        operation's error (every later wait() raises it again)."""
    def test(self) -> bool:
        """Never blocks: True once complete; a receive's data is then in its buffer."""
    def cancel(self) -> bool:
        """Cancels a receive that no message has matched yet (True); its wait() then raises
        CancelledError. False for a send or a matched receive."""

class Communicator:
    """A communicator (efa-core Communicator): ``Communicator()`` joins the job as the Rust
    ``Communicator::init()`` does (efarun, mpirun, Hydra, srun, torchrun; EFA_STORE,
    MASTER_ADDR/MASTER_PORT), choosing shm, the fabric or IP per peer. One per process
    (AlreadyInitializedError otherwise; use dup()). Finalize it with finalize(), or let it be
    collected (which finalizes, best effort).

    Raises BootstrapError, SettingError, TimeoutError (a rank never joined) or Error."""

    def __init__(self, *, timeout: Optional[float] = None) -> None:
        """timeout: the deadline of every blocking call in seconds (default EFA_TIMEOUT, 60)."""
    rank: int
    size: int
    timeout: float
    """The deadline of every blocking call, in seconds."""
    wait_policy: str
    """How blocking calls wait: "spin", "yield" or "block" (EFA_WAIT; "auto" resolved)."""
    context_id: int
    def world_rank(self, rank: int) -> int:
        """The world rank of this communicator's ``rank``."""
    def route(self, peer: int) -> str:
        """The route to ``peer`` and why (e.g. "shm: same host ...")."""
    def dup(self) -> "Communicator":
        """MPI_Comm_dup: same ranks, own context (collective)."""
    def split(self, color: Optional[int], key: int = 0) -> Optional["Communicator"]:
        """MPI_Comm_split (collective): ranks with the same color, ordered by key; None for
        color None."""
    def finalize(self) -> None:
        """MPI_Finalize (collective on the world; on a dup/split, waits for its sends and
        releases it). Later calls raise FinalizedError."""
    def abort(self, code: int, reason: str) -> None:
        """MPI_Abort: tells every rank, then exits the process with ``code``."""

    # point-to-point
    def send(self, buf: Buffer, dest: int, tag: int = 0) -> None:
        """Sends ``buf`` to ``dest``; returns once it has completed locally."""
    def recv(self, buf: Buffer, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Status:
        """Receives at most len(buf) elements. TruncatedError (nothing written) when the
        message is larger, or not whole elements of buf's type."""
    def isend(self, buf: Buffer, dest: int, tag: int = 0) -> Request:
        """Starts a send; ``buf`` is free at once (eager copy or rendezvous handoff)."""
    def irecv(self, buf: Buffer, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Request:
        """Starts a receive into ``buf``, which stays borrowed until the request completes
        or is dropped."""
    def sendrecv(
        self,
        sendbuf: Buffer,
        dest: int,
        recvbuf: Buffer,
        source: int = ANY_SOURCE,
        sendtag: int = 0,
        recvtag: int = ANY_TAG,
    ) -> Status:
        """MPI_Sendrecv (cannot deadlock)."""
    def sendrecv_replace(
        self, buf: Buffer, dest: int, source: int = ANY_SOURCE, sendtag: int = 0, recvtag: int = ANY_TAG
    ) -> Status:
        """MPI_Sendrecv_replace."""
    def probe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Status:
        """Waits for a matching message without receiving it."""
    def iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG) -> Optional[Status]:
        """Never blocks: the matching message's Status, or None."""

    # collectives: reductions
    def barrier(self) -> None: ...
    def allreduce(self, buf: Buffer, op: ReduceOp = ReduceOp.SUM) -> None:
        """In place, ``count`` elements on every rank (MPI_Allreduce, MPI_IN_PLACE)."""
    def allreduce_into(self, send: Buffer, recv: Buffer, op: ReduceOp = ReduceOp.SUM) -> None: ...
    def reduce(self, buf: Buffer, op: ReduceOp = ReduceOp.SUM, root: int = 0) -> None:
        """In place at ``root``; other ranks' ``buf`` is scratch."""
    def reduce_into(self, send: Buffer, recv: Buffer, op: ReduceOp = ReduceOp.SUM, root: int = 0) -> None:
        """``recv`` (``count``) significant at ``root`` only."""
    def reduce_scatter(self, buf: Buffer, op: ReduceOp = ReduceOp.SUM) -> None:
        """``buf``: n blocks of c; block ``me`` gets the reduction of every rank's block me."""
    def reduce_scatter_into(self, send: Buffer, recv: Buffer, op: ReduceOp = ReduceOp.SUM) -> None:
        """``send``: n * c, ``recv``: c."""
    def scan(self, buf: Buffer, op: ReduceOp = ReduceOp.SUM) -> None: ...
    def scan_into(self, send: Buffer, recv: Buffer, op: ReduceOp = ReduceOp.SUM) -> None: ...
    def exscan(self, buf: Buffer, op: ReduceOp = ReduceOp.SUM) -> None:
        """Rank 0's buffer is left untouched."""
    def exscan_into(self, send: Buffer, recv: Buffer, op: ReduceOp = ReduceOp.SUM) -> None:
        """Rank 0's ``recv`` is not written."""

    # collectives: data movement
    def broadcast(self, buf: Buffer, root: int = 0) -> None: ...
    def allgather(self, buf: Buffer) -> None:
        """``buf``: n blocks of c, this rank's block already at me * c."""
    def allgather_into(self, send: Buffer, recv: Buffer) -> None:
        """``send``: c, ``recv``: n * c."""
    def allgatherv(self, buf: Buffer, counts: Sequence[int]) -> None: ...
    def allgatherv_into(self, send: Buffer, recv: Buffer, counts: Sequence[int]) -> None: ...
    def gather(self, buf: Buffer, root: int = 0) -> None: ...
    def gather_into(self, send: Buffer, recv: Buffer, root: int = 0) -> None:
        """``recv`` (n * c) significant at ``root`` only."""
    def gatherv(self, buf: Buffer, counts: Sequence[int], displs: Sequence[int], root: int = 0) -> None: ...
    def gatherv_into(
        self, send: Buffer, recv: Buffer, counts: Sequence[int], displs: Sequence[int], root: int = 0
    ) -> None: ...
    def scatter(self, buf: Buffer, root: int = 0) -> None: ...
    def scatter_into(self, send: Buffer, recv: Buffer, root: int = 0) -> None:
        """``send`` (n * c) significant at ``root`` only; ``recv``: c."""
    def scatterv(self, buf: Buffer, counts: Sequence[int], displs: Sequence[int], root: int = 0) -> None: ...
    def scatterv_into(
        self, send: Buffer, recv: Buffer, counts: Sequence[int], displs: Sequence[int], root: int = 0
    ) -> None: ...
    def alltoall(self, buf: Buffer) -> None:
        """``buf``: n blocks of c; block r goes to rank r, and is replaced by rank r's block me."""
    def alltoall_into(self, send: Buffer, recv: Buffer) -> None: ...
    def alltoallv(self, buf: Buffer, counts: Sequence[int], displs: Sequence[int]) -> None: ...
    def alltoallv_into(
        self,
        send: Buffer,
        send_counts: Sequence[int],
        send_displs: Sequence[int],
        recv: Buffer,
        recv_counts: Sequence[int],
        recv_displs: Sequence[int],
    ) -> None: ...
