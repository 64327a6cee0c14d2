"""Domain errors and the one place where they become gRPC status codes."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class LimitExceeded(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to (code, message); unknown errors are INTERNAL with their type, never a traceback."""
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
