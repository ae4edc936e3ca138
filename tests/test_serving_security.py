"""TLS, mutual TLS and bearer-token authentication, with certificates generated here."""

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.client import MnistClient
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.security import channel_credentials

import helpers

DIGIT = np.zeros((28, 28), np.uint8)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return helpers.pki(tmp_path_factory.mktemp("pki"))


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
