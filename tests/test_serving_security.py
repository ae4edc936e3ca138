"""TLS, mutual TLS and bearer-token authentication, with certificates generated here."""

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.client import MnistClient
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.security import channel_credentials

DIGIT = np.zeros((28, 28), np.uint8)


def issue(name: str, issuer_key=None, issuer_name=None, usage=None, ca: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage == "server":
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        builder = builder.add_extension(san, critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    elif usage == "client":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def write_pem(directory: Path, name: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = issue("test CA", ca=True)
    _, ca_path = write_pem(directory, "ca", ca_key, ca_cert)
    server_key, server_cert = write_pem(
        directory, "server", *issue("localhost", ca_key, ca_cert.subject, "server")
    )
    client_key, client_cert = write_pem(
        directory, "client", *issue("client", ca_key, ca_cert.subject, "client")
    )
    rogue_ca_key, rogue_ca = issue("rogue CA", ca=True)
    rogue_key, rogue_cert = write_pem(
        directory, "rogue", *issue("rogue", rogue_ca_key, rogue_ca.subject, "client")
    )
    return {
        "ca": ca_path, "server_cert": server_cert, "server_key": server_key, "client_cert": client_cert,
        "client_key": client_key, "rogue_cert": rogue_cert, "rogue_key": rogue_key,
    }  # fmt: skip


def live(channel: grpc.Channel) -> bool:
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


def test_tls(start_server, repo, pki) -> None:
    running = start_server(repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    with grpc.secure_channel(running.target, channel_credentials(pki["ca"])) as channel:
        assert live(channel)
    with running.channel() as plaintext, pytest.raises(grpc.RpcError) as error:
        live(plaintext)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with MnistClient(running.target, tls_ca=pki["ca"]) as client:
        assert client.classify(DIGIT).predictions[0].label in range(10)


def test_mutual_tls(start_server, repo, pki) -> None:
    running = start_server(
        repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    )
    trusted = channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
    with grpc.secure_channel(running.target, trusted) as channel:
        assert live(channel)
    for credentials in [
        channel_credentials(pki["ca"]),
        channel_credentials(pki["ca"], pki["rogue_cert"], pki["rogue_key"]),
    ]:
        with (
            grpc.secure_channel(running.target, credentials) as channel,
            pytest.raises(grpc.RpcError) as error,
        ):
            live(channel)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_token_auth(start_server, repo, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    running = start_server(repo, auth_token_file=token_file)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for metadata in [None, [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")]]:
            with pytest.raises(grpc.RpcError) as error:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=5, metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            next(stub.ModelStreamInfer(iter([pb.ModelInferRequest()]), timeout=5))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mnist"), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = [("authorization", "Bearer s3cret-token")]
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5, metadata=good).live
        health = health_pb2_grpc.HealthStub(channel)  # health stays open for probes
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    with MnistClient(running.target, token="s3cret-token") as client:
        assert len(client.classify([DIGIT, DIGIT]).predictions) == 2


def test_mnist_predict_over_tls_with_token(start_server, repo, pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc")
    running = start_server(
        repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"], auth_token_file=token_file
    )
    image = tmp_path / "digit.png"
    Image.fromarray(DIGIT).save(image)
    predict = [str(Path(sys.executable).with_name("mnist-predict")), str(image), "--server", running.target]
    done = subprocess.run(
        [*predict, "--tls-ca", str(pki["ca"]), "--token-file", str(token_file)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(image))
    refused = subprocess.run([*predict, "--tls-ca", str(pki["ca"])], capture_output=True, text=True)
    assert (
        refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
    )
