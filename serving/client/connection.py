"""How a client reaches a server: plaintext or TLS (mutual TLS with a client certificate), and its bearer token.

Shared by the Python client, the command-line client and the health probe; every setting also comes from the
environment (ATTNSERVE_TLS_CA, ATTNSERVE_TLS_CERT, ATTNSERVE_TLS_KEY, ATTNSERVE_TOKEN_FILE).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class Connection:
    tls_ca: Path | None = None  # the CA that signed the server's certificate: use TLS
    tls_cert: Path | None = None  # mutual TLS: this client's certificate chain
    tls_key: Path | None = None  # and its private key
    token_file: Path | None = None  # the bearer token, first non-comment line

    @classmethod
    def from_env(cls) -> Connection:
        def path(name: str) -> Path | None:
            value = os.environ.get(f"ATTNSERVE_{name}")
            return Path(value) if value else None

        return cls(path("TLS_CA"), path("TLS_CERT"), path("TLS_KEY"), path("TOKEN_FILE"))

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def channel(self, address: str, options: list[tuple] | None = None) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            private_key=_read(self.tls_key, "--tls-key") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "--tls-cert") if self.tls_cert else None)
        return grpc.secure_channel(address, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: `authorization: Bearer <token>` when a token file is set."""
        if self.token_file is None:
            return ()
        lines = _read(self.token_file, "--token-file").decode().splitlines()
        tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        if not tokens:
            raise ValueError(f"--token-file {self.token_file}: no token in it")
        return (("authorization", f"Bearer {tokens[0]}"),)


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = Connection.from_env()
    p.add_argument("--tls-ca", type=Path, default=env.tls_ca, help="CA of the server's certificate: connect with TLS")
    p.add_argument("--tls-cert", type=Path, default=env.tls_cert, help="mutual TLS: this client's certificate")
    p.add_argument("--tls-key", type=Path, default=env.tls_key, help="mutual TLS: this client's private key")
    p.add_argument("--token-file", type=Path, default=env.token_file, help="file holding the bearer token")


def from_arguments(args: argparse.Namespace) -> Connection:
    return Connection(args.tls_ca, args.tls_cert, args.tls_key, args.token_file)


def explain(error: grpc.RpcError) -> str:
    """What a person should check, from a failed call's status and details."""
    code, details = error.code(), error.details() or ""
    low = details.lower()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "the server wants a bearer token: pass --token-file (or ATTNSERVE_TOKEN_FILE) with a valid one"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "this token is not allowed to make this call (management calls need an admin token)"
    if code == grpc.StatusCode.UNAVAILABLE:
        if "certificate_verify_failed" in low or "certificate verify failed" in low:
            return "the server's certificate is not signed by --tls-ca (or a client certificate was refused)"
        if "hostname" in low or "subject alternative name" in low or "peer name" in low:
            return "the server's certificate does not name the host in --server; connect by a name it lists"
        if "ssl" in low or "handshake" in low or "tls" in low:
            return ("the TLS handshake failed: a TLS server needs --tls-ca, a plaintext one none, and under "
                    "mutual TLS the client needs --tls-cert and --tls-key signed by the server's client CA")
        return "no server answered at that address (is it running, and is it plaintext or TLS?)"
    return ""
