"""Transport security and bearer tokens for the gRPC port: TLS / mutual TLS credentials and the token check.

Files are read once, when the server starts (restart the process to rotate certificates); a file that cannot be
used stops the start with a message naming it. Tokens: one per line (blank lines and `#` comments ignored), so
a file can hold the old and the new token while clients move over. Inference tokens open the model calls;
admin tokens open those and the management calls (ReloadModels), which are off unless an admin token file is
configured. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FailedPrecondition, PermissionDenied, Unauthenticated

MANAGEMENT_METHODS = frozenset({"ReloadModels"})  # every later management call joins this set
MIN_TOKEN_CHARS = 16  # a shorter token is guessable; refused at start


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: Path | None = None  # PEM certificate chain of the server
    tls_key: Path | None = None  # its PEM private key
    tls_client_ca: Path | None = None  # mutual TLS: clients must present a certificate signed by this CA
    auth_token_file: Path | None = None  # inference tokens; None: model calls need no token
    admin_token_file: Path | None = None  # management tokens; None: management calls are refused
    reflection: bool = True  # server reflection (grpcurl list/describe)


def _read(path: Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FailedPrecondition(f"{flag} {path}: cannot read it ({e.strerror or e})") from e
    if not data.strip():
        raise FailedPrecondition(f"{flag} {path}: the file is empty")
    return data


def _pem(path: Path, flag: str, kind: str) -> bytes:
    data = _read(path, flag)
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise FailedPrecondition(f"{flag} {path}: not a PEM {kind.lower()} (no '-----BEGIN ... {kind}' block)")
    return data


def server_credentials(cfg: SecurityConfig):
    """TLS (or mutual TLS) grpc.ServerCredentials for the gRPC port, or None for plaintext (grpc imported here:
    the HTTP front end, which shares this module, does not need it)."""
    import grpc

    if cfg.tls_cert is None and cfg.tls_key is None:
        if cfg.tls_client_ca is not None:
            raise FailedPrecondition("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        return None
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise FailedPrecondition("TLS needs both --tls-cert and --tls-key")
    cert = _pem(cfg.tls_cert, "--tls-cert", "CERTIFICATE")
    key = _pem(cfg.tls_key, "--tls-key", "PRIVATE KEY")
    ca = _pem(cfg.tls_client_ca, "--tls-client-ca", "CERTIFICATE") if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def read_tokens(path: Path, flag: str) -> tuple[str, ...]:
    lines = _read(path, flag).decode("utf-8", errors="replace").splitlines()
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise FailedPrecondition(f"{flag} {path}: no token in it (one per line; '#' starts a comment)")
    short = [i for i, t in enumerate(tokens, 1) if len(t) < MIN_TOKEN_CHARS]
    if short:
        raise FailedPrecondition(f"{flag} {path}: token {short[0]} is shorter than {MIN_TOKEN_CHARS} characters; "
                                 "use a random one, e.g. `openssl rand -hex 32`")
    return tokens


def _known(token: str, tokens: Sequence[str]) -> bool:
    """Constant time in the token's content: every configured token is compared, whatever matched."""
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


class Authorizer:
    """Who may call what, from the `authorization: Bearer <token>` metadata of a call."""

    def __init__(self, cfg: SecurityConfig) -> None:
        self.inference = read_tokens(cfg.auth_token_file, "--auth-token-file") if cfg.auth_token_file else ()
        self.admin = read_tokens(cfg.admin_token_file, "--admin-token-file") if cfg.admin_token_file else ()

    @staticmethod
    def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                return token.strip() if scheme.lower() == "bearer" else ""
        return None

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """Raise Unauthenticated (no or unknown token) or PermissionDenied (known token, not allowed here)."""
        if method in MANAGEMENT_METHODS:
            if not self.admin:
                raise PermissionDenied(f"{method} is disabled on this server: start it with --admin-token-file to "
                                       "allow management calls (the model repository is still polled)")
            token = self._bearer(metadata)
            if token and _known(token, self.admin):
                return
            if token and _known(token, self.inference):
                raise PermissionDenied(f"this token may call the model methods only; {method} needs an admin token")
            raise Unauthenticated(f"{method} needs 'authorization: Bearer <admin token>' metadata; "
                                  f"{'the token given is not known' if token else 'none was sent'}")
        if not self.inference:
            return  # model calls are open when no inference token is configured
        token = self._bearer(metadata)
        if token and (_known(token, self.inference) or _known(token, self.admin)):
            return
        raise Unauthenticated(f"{method} needs 'authorization: Bearer <token>' metadata; "
                              f"{'the token given is not known' if token else 'none was sent'}")
