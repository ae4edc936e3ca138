"""KServe v2 / Open Inference Protocol: unary and streaming inference, metadata, repository extension,
and interop with the unmodified tritonclient.grpc client."""

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.runtime import ModelSession, RuntimeOptions

from helpers import assert_same_probabilities, infer_request

HERE = Path(__file__).resolve().parent


def probabilities_of(response: pb.ModelInferResponse) -> np.ndarray:
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert response.outputs[0].datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    return mnist.test_images[:16].reshape(16, 1, 28, 28).copy(), mnist.test_labels[:16]


@pytest.fixture(scope="module")
def expected(trained_repo: Path, digits) -> np.ndarray:
    """The same digits through ONNX Runtime directly, one at a time: the unbatched truth."""
    session = ModelSession(trained_repo / "mnist" / "1" / "model.onnx", RuntimeOptions(device="cpu"))
    return np.concatenate([session.run(image[None]) for image in digits[0]])


@pytest.mark.parametrize(
    ("datatype", "raw"), [("UINT8", True), ("UINT8", False), ("FP32", True), ("FP32", False)]
)
def test_model_infer_matches_onnx_runtime(kserve, digits, expected, datatype, raw) -> None:
    images, labels = digits
    response = kserve.ModelInfer(infer_request(images, datatype, raw, id="req-7"), timeout=10)
    assert (response.model_name, response.model_version, response.id) == ("mnist", "1", "req-7")
    probabilities = probabilities_of(response)
    assert probabilities.shape == (16, 10)
    assert_same_probabilities(probabilities, expected)
    assert (probabilities.argmax(1) == labels).mean() >= 0.8


def test_stream_answers_in_order_and_survives_a_bad_request(kserve, digits, expected) -> None:
    images, _ = digits
    bad = infer_request(images[:2], id="bad")
    bad.inputs[0].shape[:] = [3, 1, 28, 28]  # payload holds 2 images
    requests = [infer_request(images[:1], id="a"), bad, infer_request(images[1:3], id="c")]
    responses = list(kserve.ModelStreamInfer(iter(requests), timeout=10))
    assert [r.infer_response.id for r in responses] == ["a", "bad", "c"]
    assert responses[0].error_message == "" and responses[2].error_message == ""
    assert responses[1].error_message.startswith("INVALID_ARGUMENT")
    assert "needs 2352" in responses[1].error_message
    assert_same_probabilities(probabilities_of(responses[0].infer_response), expected[:1])
    assert_same_probabilities(probabilities_of(responses[2].infer_response), expected[1:3])


def test_metadata_config_and_readiness(kserve) -> None:
    assert kserve.ServerLive(pb.ServerLiveRequest()).live
    assert kserve.ServerReady(pb.ServerReadyRequest()).ready
    assert kserve.ModelReady(pb.ModelReadyRequest(name="mnist")).ready
    assert kserve.ModelReady(pb.ModelReadyRequest(name="mnist", version="1")).ready
    assert not kserve.ModelReady(pb.ModelReadyRequest(name="mnist", version="9")).ready
    server = kserve.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "mnist-serve"
    assert "onnxruntime_provider:CPUExecutionProvider" in server.extensions
    metadata = kserve.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
    assert list(metadata.versions) == ["1"] and metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("images", "UINT8", [-1, 1, 28, 28])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, 10])
    ]
    config = kserve.ModelConfig(pb.ModelConfigRequest(name="mnist")).config
    assert config.max_batch_size == 64 and config.input[0].name == "images"
    index = kserve.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [("mnist", "1", "READY")]


def test_repository_unload_and_load(start_server, repo, digits) -> None:
    running = start_server(repo)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mnist"))
        assert not stub.ModelReady(pb.ModelReadyRequest(name="mnist")).ready
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(digits[0][:1]))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.state, m.reason) for m in index.models] == [("mnist", "UNAVAILABLE", "unloaded")]
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mnist"))
        assert stub.ModelReady(pb.ModelReadyRequest(name="mnist")).ready
        assert probabilities_of(stub.ModelInfer(infer_request(digits[0][:1]))).shape == (1, 10)
        for name, code in [
            ("../mnist", grpc.StatusCode.INVALID_ARGUMENT),
            ("absent", grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.RpcError) as error:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
            assert error.value.code() == code, name


def test_tritonclient_interop(server, digits, expected, tmp_path: Path) -> None:
    images_path = tmp_path / "images.npy"
    np.save(images_path, digits[0][:4])
    done = subprocess.run(
        [sys.executable, str(HERE / "tritonclient_interop.py"), "infer", server.target, str(images_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server"]["name"] == "mnist-serve"
    assert seen["metadata"]["inputs"][0]["name"] == "images"
    assert seen["version"] == "1"
    assert_same_probabilities(np.array(seen["probabilities"], np.float32), expected[:4])
    assert seen["missing_model_status"] == "StatusCode.NOT_FOUND"


def test_reflection_lists_both_apis(server) -> None:
    with server.channel() as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "mnist.v1.Classifier", "grpc.health.v1.Health"} <= services


def triton_statistics(target: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(HERE / "tritonclient_interop.py"), "statistics", target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_model_statistics_count_what_was_served(start_server, repo, digits) -> None:
    running = start_server(repo)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for n in (1, 3, 5):
            stub.ModelInfer(infer_request(digits[0][:n]))
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(infer_request(digits[0][:1], id="x", version="7"))  # no such version
        bad = infer_request(digits[0][:2])
        bad.inputs[0].shape[0] = 3  # payload of 2 images: refused, counted as a failure of mnist/1
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(bad)
    (stats,) = triton_statistics(running.target)["model_stats"]
    assert (stats["name"], stats["version"]) == ("mnist", "1")
    assert int(stats["inference_count"]) == 9 and 1 <= int(stats["execution_count"]) <= 3
    inference = stats["inference_stats"]
    assert int(inference["success"]["count"]) == 3 and int(inference["fail"]["count"]) == 1
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert int(inference[phase]["ns"]) > 0, phase
    batches = stats["batch_stats"]
    assert sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in batches) == 9
    assert int(stats["last_inference"]) > 1_700_000_000_000  # milliseconds since the epoch
