"""Domain errors raised by strategies and the volume store.

Each class stands for one outcome a CSI caller must be able to tell apart; `csi.errors` maps
them to gRPC status codes in one table. Messages are written for the person reading a
Kubernetes Event: they name the field or parameter and say what would be accepted.
"""

from __future__ import annotations


class FusecsiError(Exception):
    """Base of every error fusecsi raises on purpose."""


class InvalidArgument(FusecsiError):
    """The request or a volume parameter is malformed; retrying the same input cannot succeed."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(FusecsiError):
    """The volume or target the caller names does not exist (here)."""


class AlreadyExists(FusecsiError):
    """The name or target is taken by something incompatible with this request."""


class FailedPrecondition(FusecsiError):
    """The node or filesystem does not allow the operation now (e.g. the root is not mounted)."""


class OutOfRange(FusecsiError):
    """A capacity cannot be honoured."""


class Unavailable(FusecsiError):
    """A transient failure (a hung filesystem, a client still starting); retrying may succeed."""


class MountFailed(FusecsiError):
    """A mount or unmount system call failed for a reason that is not the caller's input."""
