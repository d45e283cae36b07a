"""efa: kernel-bypass messaging (libfabric: EFA, verbs, shm, TCP) for Python.

The Rust library efa-rs (``efa-core``) wrapped one to one::

    import numpy as np, efa
    comm = efa.Communicator()            # under efarun, mpirun, srun or torchrun
    x = np.full(1024, comm.rank, dtype=np.float32)
    comm.allreduce(x, efa.SUM)           # in place; allreduce_into(send, recv) out of place
    if comm.rank == 0:
        comm.send(x, 1, tag=7)
    elif comm.rank == 1:
        st = comm.recv(x, source=0, tag=7)

Buffers are any C-contiguous buffer-protocol object (numpy arrays, bytearray, memoryview)
or DLPack CPU tensor (torch), used without a copy. Every blocking call releases the GIL and
has a deadline (``EFA_TIMEOUT``, seconds); errors are ``efa.Error`` subclasses carrying the
Rust error's text (``efa.TimeoutError`` is also a builtin ``TimeoutError``).

``import efa.torch`` registers the torch.distributed backend ``"efa"``.
"""

import os as _os

# Debian's libfabric links PSM (libpsm_infinipath), whose libinfinipath installs handlers for
# SIGINT, SIGTERM, SIGSEGV, ... when it is loaded (with _efa below) that call exit(1): Ctrl-C
# would end the interpreter silently with status 1 instead of raising KeyboardInterrupt.
# IPATH_NO_BACKTRACE (read by its constructor) keeps Python's handlers.
_os.environ.setdefault("IPATH_NO_BACKTRACE", "1")

from . import _efa
from ._efa import ANY_SOURCE, ANY_TAG, MAX_TAG, Communicator, ReduceOp, Request, Status
from ._errors import (
    AlreadyInitializedError,
    ArgumentError,
    BootstrapError,
    CancelledError,
    CollectiveError,
    Error,
    FinalizedError,
    PeerFailedError,
    PeerFinalizedError,
    SettingError,
    TimeoutError,
    TruncatedError,
)

SUM = ReduceOp.SUM
PROD = ReduceOp.PROD
MIN = ReduceOp.MIN
MAX = ReduceOp.MAX
AVG = ReduceOp.AVG

def wait_all(requests):
    """Waits for every request (``MPI_Waitall``); returns their results in order (the
    Status of a receive, None for a send). The first error is raised after all were waited
    for."""
    results, first = [], None
    for r in requests:
        try:
            results.append(r.wait())
        except Error as e:
            results.append(None)
            first = first or e
    if first is not None:
        raise first
    return results


__all__ = [
    "ANY_SOURCE",
    "ANY_TAG",
    "AVG",
    "AlreadyInitializedError",
    "ArgumentError",
    "BootstrapError",
    "CancelledError",
    "CollectiveError",
    "Communicator",
    "Error",
    "FinalizedError",
    "MAX",
    "MAX_TAG",
    "MIN",
    "PROD",
    "PeerFailedError",
    "PeerFinalizedError",
    "ReduceOp",
    "Request",
    "SUM",
    "SettingError",
    "Status",
    "TimeoutError",
    "TruncatedError",
    "wait_all",
]
