"""Domain errors raised behind the engine API, each with its neutral code (gRPC's names) and HTTP status: the one
table both front ends read (`status.py` maps the code to grpc.StatusCode, `http_server.py` answers `http`).

`describe` is where any exception becomes what a caller is told: a domain error its own message; anything else
INTERNAL with an error id, logged once with its traceback under that id, so the client can quote it.
"""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base of every error a caller should see with its message; anything else is an internal error."""

    code = "INTERNAL"
    http = 500


class InvalidRequest(ServingError):
    """The request itself is wrong: a field out of range, a missing source, bad UTF-8."""

    code = "INVALID_ARGUMENT"
    http = 400


class NotFound(ServingError):
    """The model or version named is not being served."""

    code = "NOT_FOUND"
    http = 404


class LimitExceeded(ServingError):
    """A server limit (queue, concurrency, message size) refuses the request; retrying later may work."""

    code = "RESOURCE_EXHAUSTED"
    http = 429


class Unavailable(ServingError):
    """The model or server cannot take work now (shutting down, engine restarting); retry."""

    code = "UNAVAILABLE"
    http = 503


class FailedPrecondition(ServingError):
    """The server's own setup cannot do what was asked (e.g. --require-gpu without CUDA)."""

    code = "FAILED_PRECONDITION"
    http = 400


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the request finished."""

    code = "DEADLINE_EXCEEDED"
    http = 504


class PermissionDenied(ServingError):
    """The call is known but not allowed here (e.g. management calls with no admin token configured)."""

    code = "PERMISSION_DENIED"
    http = 403


class ModelFailure(ServingError):
    """The model produced something unusable for this request (NaN or infinite logits); its peers are unaffected."""

    code = "INTERNAL"
    http = 500


class Unauthenticated(ServingError):
    """No credentials, or ones the server does not know (a missing or wrong bearer token)."""

    code = "UNAUTHENTICATED"
    http = 401


class InternalError(ServingError):
    """An unexpected failure already logged with its traceback; its message gives the error id it is logged under."""

    code = "INTERNAL"
    http = 500


def describe(exc: BaseException, where: str) -> tuple[str, int, str]:
    """(neutral code, HTTP status, message) for any exception. Unexpected ones are logged here, once, with their
    traceback and an error id that the message gives the client."""
    if isinstance(exc, ServingError):
        return exc.code, exc.http, str(exc)
    error_id = uuid.uuid4().hex[:12]
    log.error("%s failed with an unexpected %s (error id %s)", where, type(exc).__name__, error_id, exc_info=exc)
    return "INTERNAL", 500, (f"internal error ({type(exc).__name__}); the server log has it under error id "
                             f"{error_id}")


def logged(exc: Exception, where: str) -> ServingError:
    """A domain error as it is; anything else logged now (once, with its id) and returned as an InternalError, so
    whoever answers the client later neither logs it again nor shows its text."""
    if isinstance(exc, ServingError):
        return exc
    return InternalError(describe(exc, where)[2])
