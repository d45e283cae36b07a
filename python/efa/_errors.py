"""The exceptions of efa. ``str(exc)`` is the Rust error's text; ``exc.report`` its readable
report (with causes and a hint); ``exc.rank`` the failed or finalized peer where there is one.

The class follows the error's class in efa-core (``efa_core::ErrorClass``, which sorts the
Rust errors); ``python/src/error.rs`` maps each of those classes to one of these. Errors of
the classes without a narrower one here (no route to a peer, a fabric failure, foreign
traffic, RMA, an exhausted resource, an internal bug) are plain ``Error``.
"""

import builtins


class Error(Exception):
    """Every error of efa-core (communication, bootstrap, settings)."""

    report: str = ""
    rank = None


class TimeoutError(Error, builtins.TimeoutError):
    """A blocking call passed its deadline (``EFA_TIMEOUT`` or ``Communicator(timeout=...)``),
    or during start-up a rank never joined, or the rendezvous store did not answer or did not
    hear from every rank, in time."""


class PeerFailedError(Error):
    """A peer exited, became unreachable, aborted, or stopped answering (``exc.rank``)."""


class PeerFinalizedError(Error):
    """The peer (``exc.rank``) has finalized: it sends and receives no more."""


class TruncatedError(Error):
    """The message was larger than the receive buffer, or not a whole number of the receive
    buffer's elements; nothing was written."""


class CollectiveError(Error, ValueError):
    """Ranks called different collectives or with different arguments, or a rank's buffers
    or counts do not fit the call (every rank gets it, before any data moves)."""


class ArgumentError(Error, ValueError):
    """A rank out of range, or a reserved tag."""


class SettingError(Error, ValueError):
    """An ``EFA_*`` variable or a constructor argument has a value that cannot be used."""


class BootstrapError(Error):
    """Finding rank, size or rendezvous failed (the message names the variable), a peer's
    address card could not be read, or this host's id could not be found."""


class FinalizedError(Error):
    """The communicator was finalized; no operation may follow."""


class CancelledError(Error):
    """The receive was cancelled before a message matched it."""


class AlreadyInitializedError(Error):
    """This process already has a live communicator of this job: reuse it, or ``dup()`` it."""
