"""Health transitions, hot reload of a new version, refusal of corrupt models and escaping names,
graceful shutdown of a real mnist-serve process with requests in flight."""

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc

from helpers import infer_request, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def add_version(repo: Path, version: int, model_bytes: bytes) -> None:
    """Write a version the way the exporter does: complete in a temporary dir, then one rename."""
    staging = repo / "mnist" / f".tmp-{version}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(model_bytes)
    staging.rename(repo / "mnist" / str(version))


def test_health_follows_model_availability(start_server, repo: Path, tmp_path: Path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    running = start_server(empty, poll_seconds=0.1)
    assert any("event=no_models" in r.getMessage() for r in caplog.records)  # it says it waits for one
    with running.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

        assert status() == NOT_SERVING and not kserve.ServerReady(pb.ServerReadyRequest()).ready
        shutil.copytree(repo / "mnist", tmp_path / "staging")
        (tmp_path / "staging").rename(empty / "mnist")
        wait_for(lambda: status() == SERVING)
        assert kserve.ServerReady(pb.ServerReadyRequest()).ready
        service = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert health.Check(service, timeout=5).status == SERVING
        kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mnist"))
        assert status() == NOT_SERVING
        kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mnist"))
        assert status() == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(), running.loop)
        assert next(watch).status == NOT_SERVING  # announced before the port closes
        watch.cancel()  # an open Watch is an in-flight RPC: shutdown would wait for it up to the grace period
        stopping.result(10)


@pytest.mark.parametrize("policy", ["", "version_policy { latest { num_versions: 1 } }"])
def test_hot_reload_swaps_versions_without_failing_requests(start_server, repo: Path, caplog, policy) -> None:
    caplog.set_level(logging.INFO)
    config = repo / "mnist" / "config.pbtxt"
    config.write_text(config.read_text() + policy)
    running = start_server(repo, poll_seconds=0.1)
    stop, errors, versions = threading.Event(), [], set()

    def keep_asking() -> None:
        with running.channel() as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    versions.add(stub.ModelInfer(infer_request(), timeout=10).model_version)
                except grpc.RpcError as e:
                    errors.append(e)

    thread = threading.Thread(target=keep_asking, daemon=True)
    thread.start()
    try:
        with running.channel() as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(infer_request()).model_version == "1"
            add_version(repo, 2, (repo / "mnist" / "1" / "model.onnx").read_bytes())
            wait_for(lambda: stub.ModelInfer(infer_request()).model_version == "2")
            if policy:  # latest 1: version 1 retired once version 2 serves
                wait_for(lambda: not stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="1")).ready)
            else:  # every version on disk stays addressable
                assert stub.ModelInfer(infer_request(version="1")).model_version == "1"

            add_version(repo, 3, b"\x08\x07 this is not an onnx model")
            wait_for(lambda: any("model_refused" in r.getMessage() for r in caplog.records))
            refused = next(r.getMessage() for r in caplog.records if "model_refused" in r.getMessage())
            assert str(repo / "mnist" / "3" / "model.onnx") in refused
            assert stub.ModelInfer(infer_request()).model_version == "2"  # the corrupt one did not replace it
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(infer_request(version="3"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stop.set()
        thread.join(15)
    assert errors == [] and versions == {"1", "2"}


def test_an_explicit_load_tries_a_refused_file_again(start_server, repo: Path, tmp_path: Path) -> None:
    # Version 2 is refused for a reason outside the file (a link leading out of the repository). Once the
    # link leads inside, to a file of the same size and time, only an explicit load looks at it again.
    outside = tmp_path / "outside.onnx"
    shutil.copy2(repo / "mnist" / "1" / "model.onnx", outside)
    (repo / "mnist" / "2").mkdir()
    (repo / "mnist" / "2" / "model.onnx").symlink_to(outside)
    running = start_server(repo)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(infer_request()).model_version == "1"
        (repo / "mnist" / "2" / "model.onnx").unlink()
        (repo / "mnist" / "2" / "model.onnx").symlink_to(repo / "mnist" / "1" / "model.onnx")
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mnist"))
        assert stub.ModelInfer(infer_request()).model_version == "2"


def test_a_server_without_metrics_says_so(start_server, repo: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    start_server(repo, metrics_port=-1)
    (listening,) = [r.getMessage() for r in caplog.records if "event=listening" in r.getMessage()]
    assert "metrics=off" in listening


def test_names_and_symlinks_escaping_the_repository_are_refused(
    start_server, repo: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(repo / "mnist", outside / "model")
    (repo / "evil").symlink_to(outside / "model")  # a model directory pointing out of the repository
    (repo / "mnist" / "5").mkdir()
    (repo / "mnist" / "5" / "model.onnx").symlink_to(outside / "model" / "1" / "model.onnx")
    running = start_server(repo)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models] == [
            "mnist"
        ]
        assert stub.ModelInfer(infer_request()).model_version == "1"  # version 5 (symlink out) refused
        for name, code in [("evil", grpc.StatusCode.NOT_FOUND), ("..", grpc.StatusCode.INVALID_ARGUMENT)]:
            request = infer_request()
            request.model_name = name
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request)
            assert error.value.code() == code
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="evil"))
        assert (
            error.value.code() == grpc.StatusCode.INTERNAL
            and "outside the repository" in error.value.details()
        )


def test_sigterm_finishes_in_flight_requests_and_exits_zero(repo: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    command = [str(Path(sys.executable).with_name("mnist-serve")), "--repo", str(repo), "--host", "127.0.0.1"]
    command += ["--port", "0", "--metrics-port", "0", "--max-queue-delay-us", "2000000", "--grace", "10"]
    command += ["--workers", "1", "--http-port", "0"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: "event=model_ready" in log_path.read_text(), 60)
        port = re.search(r"address=127\.0\.0\.1:(\d+)", log_path.read_text()).group(1)
        metrics_port = re.search(r"metrics=127\.0\.0\.1:(\d+)", log_path.read_text()).group(1)
        queued = 'mnist_queue_depth{model="mnist"} 8.0'
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, ThreadPoolExecutor(8) as pool:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            in_flight = [pool.submit(stub.ModelInfer, infer_request(), timeout=30) for _ in range(8)]
            # The batch waits up to 2 s for more requests: all 8 are queued, none answered yet.
            wait_for(lambda: queued in urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode())
            process.send_signal(signal.SIGTERM)
            assert all(f.result().model_version == "1" for f in in_flight)
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(infer_request(), timeout=5)  # no longer accepting
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = log_path.read_text()
    assert "event=stopping" in log and "event=stopped" in log and "Traceback" not in log
