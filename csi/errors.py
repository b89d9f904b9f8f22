"""The one place where fusecsi's domain errors become gRPC status codes."""

from __future__ import annotations

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from strategies import errors

_STATUS: dict[type[errors.FusecsiError], Status] = {
    errors.InvalidArgument: Status.INVALID_ARGUMENT,
    errors.NotFound: Status.NOT_FOUND,
    errors.AlreadyExists: Status.ALREADY_EXISTS,
    errors.FailedPrecondition: Status.FAILED_PRECONDITION,
    errors.OutOfRange: Status.OUT_OF_RANGE,
    errors.Unavailable: Status.UNAVAILABLE,
    errors.MountFailed: Status.INTERNAL,
}


def to_grpc(error: errors.FusecsiError) -> GRPCError:
    """The status for a domain error: the closest class in the table wins."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return GRPCError(_STATUS[cls], str(error))
    return GRPCError(Status.INTERNAL, str(error))


def invalid(field: str, problem: str) -> errors.InvalidArgument:
    """Shorthand for request validation: `invalid("target_path", "is required")`."""
    return errors.InvalidArgument(field, problem)
