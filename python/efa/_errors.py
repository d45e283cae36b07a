"""The exceptions of efa. ``str(exc)`` is the Rust error's text; ``exc.report`` its readable
report (with causes and a hint); ``exc.rank`` the failed or finalized peer where there is one.

Which efa-core error becomes which class is decided in one place, ``python/src/error.rs``.
"""

import builtins


class Error(Exception):
    """Every error of efa-core (communication, bootstrap, settings)."""

    report: str = ""
    rank = None


class TimeoutError(Error, builtins.TimeoutError):
    """A blocking call passed its deadline (``EFA_TIMEOUT`` or ``Communicator(timeout=...)``),
    or a rank never joined the job in time."""


class PeerFailedError(Error):
    """A peer exited, became unreachable, aborted, or stopped answering (``exc.rank``)."""


class PeerFinalizedError(Error):
    """The peer (``exc.rank``) has finalized: it sends and receives no more."""


class TruncatedError(Error):
    """The message was larger than the receive buffer; nothing was written."""


class CollectiveError(Error, ValueError):
    """Ranks called different collectives or with different arguments, or a rank's buffers
    or counts do not fit the call (every rank gets it, before any data moves)."""


class ArgumentError(Error, ValueError):
    """A rank out of range, a reserved tag, or a message that is not a whole number of the
    receive buffer's elements."""


class SettingError(Error, ValueError):
    """An ``EFA_*`` variable or a constructor argument has a value that cannot be used."""


class BootstrapError(Error):
    """Finding rank, size or rendezvous failed (the message names the variable)."""


class FinalizedError(Error):
    """The communicator was finalized; no operation may follow."""


class CancelledError(Error):
    """The receive was cancelled before a message matched it."""


class AlreadyInitializedError(Error):
    """This process already has a live communicator of this job: reuse it, or ``dup()`` it."""
