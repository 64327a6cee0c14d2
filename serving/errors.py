"""Domain errors raised behind the engine API; each front end maps them to its protocol's status in one place."""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error a caller should see with its message; anything else is an internal error."""


class InvalidRequest(ServingError):
    """The request itself is wrong: a field out of range, a missing source, bad UTF-8."""


class NotFound(ServingError):
    """The model or version named is not being served."""


class LimitExceeded(ServingError):
    """A server limit (queue, concurrency, message size) refuses the request; retrying later may work."""


class Unavailable(ServingError):
    """The model or server cannot take work now (shutting down, engine restarting); retry."""


class FailedPrecondition(ServingError):
    """The server's own setup cannot do what was asked (e.g. --require-gpu without CUDA)."""


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the request finished."""


class PermissionDenied(ServingError):
    """The call is known but not allowed here (e.g. management calls with no admin token configured)."""


class ModelFailure(ServingError):
    """The model produced something unusable for this request (NaN or infinite logits); its peers are unaffected."""


class Unauthenticated(ServingError):
    """No credentials, or ones the server does not know (a missing or wrong bearer token)."""
