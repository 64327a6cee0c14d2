"""Secure gRPC: TLS and mutual TLS refuse the wrong peers, tokens open exactly what they should, health stays open."""

import datetime as dt
import ipaddress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import AttnServeClient
from serving.client.cli import predict_main
from serving.client.connection import Connection
from serving.errors import FailedPrecondition
from serving.frontends.security import SecurityConfig

from .server_harness import start

INFERENCE = ["inference-token-old-0123456789", "inference-token-new-0123456789"]
ADMIN = "admin-token-0123456789abcdef"


def _ca(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca, name: str, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(folder, name: str, pair) -> tuple:
    from cryptography.hazmat.primitives import serialization

    key, cert = pair
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate (localhost, 127.0.0.1) and a client certificate; a rogue CA with its own."""
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = _ca("attnserve test CA"), _ca("rogue CA")
    files = {"ca": _write(folder, "ca", ca)[0], "rogue_ca": _write(folder, "rogue-ca", rogue)[0]}
    files["server_cert"], files["server_key"] = _write(folder, "server", _leaf(ca, "localhost", server=True))
    files["client_cert"], files["client_key"] = _write(folder, "client", _leaf(ca, "client", server=False))
    files["rogue_cert"], files["rogue_key"] = _write(folder, "rogue", _leaf(rogue, "intruder", server=False))
    (folder / "inference.tokens").write_text("# rotate: old and new\n" + "\n".join(INFERENCE) + "\n")
    (folder / "admin.tokens").write_text(ADMIN + "\n")
    (folder / "wrong.token").write_text("not-a-token-the-server-knows-000\n")
    for i, token in enumerate(INFERENCE):
        (folder / f"inference{i}.token").write_text(token + "\n")
    (folder / "admin.token").write_text(ADMIN + "\n")
    files["folder"] = folder
    return files


def _status(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_tls_serves_tls_clients_and_refuses_plaintext_and_strangers(serving_repo, pki):
    s = start(serving_repo, ["tiny"], security=SecurityConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    address = f"localhost:{s.app.port}"
    try:
        with AttnServeClient(address, connection=Connection(tls_ca=pki["ca"])) as c:
            assert c.predict("abc").text
        with AttnServeClient(address, connection=Connection()) as plain:
            assert _status(lambda: plain.predict("abc", timeout=5)) == grpc.StatusCode.UNAVAILABLE
        with AttnServeClient(address, connection=Connection(tls_ca=pki["rogue_ca"])) as wrong_ca:
            assert _status(lambda: wrong_ca.predict("abc", timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_a_plaintext_health_port_beside_tls_serves_health_and_nothing_else(serving_repo, pki):
    """For probes that cannot speak TLS (the kubelet's gRPC probes): health in plaintext, model calls not."""
    s = start(serving_repo, ["tiny"], health_port=0,
              security=SecurityConfig(tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    try:
        assert s.app.health_port not in (None, 0, s.app.port)
        with grpc.insecure_channel(f"127.0.0.1:{s.app.health_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "liveness", "model/tiny"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
            with AttnServeClient(f"127.0.0.1:{s.app.health_port}") as plain:
                assert _status(lambda: plain.predict("abc", timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
            s.call(s.app.stop(0))
            with pytest.raises(grpc.RpcError):  # stopped with the server
                health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=2)
    finally:
        s.stop()


def test_mutual_tls_wants_a_client_certificate_from_its_ca(serving_repo, pki):
    s = start(serving_repo, ["tiny"], security=SecurityConfig(
        tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]))
    address = f"localhost:{s.app.port}"
    try:
        good = Connection(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        with AttnServeClient(address, connection=good) as c:
            assert c.predict("abc").text
        for connection in (Connection(tls_ca=pki["ca"]),  # no client certificate
                           Connection(tls_ca=pki["ca"], tls_cert=pki["rogue_cert"], tls_key=pki["rogue_key"])):
            with AttnServeClient(address, connection=connection) as c:
                assert _status(lambda c=c: c.predict("abc", timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_tokens_open_model_calls_admin_tokens_open_management_health_needs_none(serving_repo, pki):
    folder = pki["folder"]
    s = start(serving_repo, ["tiny"], security=SecurityConfig(auth_token_file=folder / "inference.tokens",
                                                              admin_token_file=folder / "admin.tokens"))
    try:
        with AttnServeClient(s.address, connection=Connection()) as anonymous:
            assert _status(lambda: anonymous.predict("abc")) == grpc.StatusCode.UNAUTHENTICATED
            assert _status(lambda: list(anonymous.generate("abc"))) == grpc.StatusCode.UNAUTHENTICATED
            assert _status(lambda: anonymous.list_models()) == grpc.StatusCode.UNAUTHENTICATED
        with AttnServeClient(s.address, connection=Connection(token_file=folder / "wrong.token")) as wrong:
            assert _status(lambda: wrong.predict("abc")) == grpc.StatusCode.UNAUTHENTICATED
            assert _status(lambda: wrong.reload()) == grpc.StatusCode.UNAUTHENTICATED
        for i in range(2):  # both tokens of the file work: rotation without downtime
            with AttnServeClient(s.address, connection=Connection(token_file=folder / f"inference{i}.token")) as c:
                assert c.predict("abc").text and c.encode("abc").tokens
                with pytest.raises(grpc.RpcError) as e:
                    c.reload()
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin token" in e.value.details()
        with AttnServeClient(s.address, connection=Connection(token_file=folder / "admin.token")) as admin:
            assert [m.name for m in admin.reload().models] == ["tiny"] and admin.predict("abc").text
        with grpc.insecure_channel(s.address) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="model/tiny"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.stop()


def test_management_is_off_without_an_admin_token_file_and_reflection_follows_its_flag(serving_repo, capsys):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    s = start(serving_repo, ["tiny"], security=SecurityConfig(reflection=False))
    try:
        with AttnServeClient(s.address, connection=Connection()) as c:
            assert c.predict("abc").text  # model calls are open: no inference token file
            with pytest.raises(grpc.RpcError) as e:
                c.reload()
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--admin-token-file" in e.value.details()
        with grpc.insecure_channel(s.address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            assert _status(lambda: next(stub.ServerReflectionInfo(request))) == grpc.StatusCode.UNIMPLEMENTED
        assert s.app.cfg.metrics_address == "127.0.0.1"  # metrics stay on loopback unless asked otherwise
    finally:
        s.stop()


def test_bad_security_files_stop_the_start_naming_the_file(serving_repo, pki, tmp_path):
    from serving.frontends.security import Authorizer, server_credentials

    empty = tmp_path / "empty.tokens"
    empty.write_text("# nothing yet\n")
    short = tmp_path / "short.tokens"
    short.write_text("abc\n")
    with pytest.raises(FailedPrecondition, match=r"--tls-key .*missing\.key: cannot read"):
        server_credentials(SecurityConfig(tls_cert=pki["server_cert"], tls_key=tmp_path / "missing.key"))
    with pytest.raises(FailedPrecondition, match="not a PEM"):
        server_credentials(SecurityConfig(tls_cert=empty, tls_key=pki["server_key"]))
    with pytest.raises(FailedPrecondition, match="--tls-client-ca needs --tls-cert"):
        server_credentials(SecurityConfig(tls_client_ca=pki["ca"]))
    with pytest.raises(FailedPrecondition, match=r"empty\.tokens: no token"):
        Authorizer(SecurityConfig(auth_token_file=empty))
    with pytest.raises(FailedPrecondition, match="shorter than 16"):
        Authorizer(SecurityConfig(admin_token_file=short))


def test_the_command_line_client_says_what_failed(serving_repo, pki, capsys):
    folder = pki["folder"]
    s = start(serving_repo, ["tiny"], security=SecurityConfig(
        tls_cert=pki["server_cert"], tls_key=pki["server_key"], auth_token_file=folder / "inference.tokens"))
    address = f"localhost:{s.app.port}"
    try:
        assert predict_main(["abc", "--server", address, "--tls-ca", str(pki["ca"]),
                             "--token-file", str(folder / "inference0.token")]) == 0
        assert predict_main(["abc", "--server", address, "--tls-ca", str(pki["ca"])]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert predict_main(["abc", "--server", address, "--timeout", "5"]) == 1  # plaintext to a TLS port
        err = capsys.readouterr().err
        assert "UNAVAILABLE" in err and ("TLS" in err or "plaintext" in err)
    finally:
        s.stop()
