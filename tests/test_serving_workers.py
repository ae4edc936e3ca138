"""mnist-serve --workers N: a supervisor and N server processes on one port, as users run it.

Every server here is a real `mnist-serve` subprocess on 127.0.0.1 with the trained test model; the
workers are checked through what a user sees: the one /metrics endpoint, the log, the gRPC answers.
"""

import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serving_kserve import triton_statistics

from serving.bench.loadgen import Connection
from serving.bench.spawn import Spawned, free_port, serve_command
from serving.channels import open_channel
from serving.client import MnistClient
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc

from helpers import ClientLoad, wait_for

ONE = np.zeros((1, 1, 28, 28), np.uint8)


def start(repo: Path, tmp_path: Path, workers: int = 2, *extra: str) -> Spawned:
    served = Spawned.mnist_serve(
        serve_command(), repo, ["--device", "cpu", "--workers", str(workers), *extra], tmp_path / "server.log"
    )
    served.wait_serving(Connection((served.target,)))
    wait_for(lambda: "event=ready" in served.log_path.read_text(), 60, "the supervisor's ready line")
    return served


def samples(served: Spawned, name: str) -> list:
    text = urllib.request.urlopen(served.metrics_url, timeout=10).read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def requests_by_worker(served: Spawned) -> Counter:
    counts: Counter = Counter()
    for s in samples(served, "mnist_requests_total"):
        counts[s.labels["worker"]] += int(s.value)
    return counts


def worker_value(served: Spawned, name: str, worker: int) -> float:
    return next(s.value for s in samples(served, name) if s.labels["worker"] == str(worker))


def worker_pid(served: Spawned, worker: int) -> int:
    started = re.findall(rf"event=worker_started worker={worker} pid=(\d+)", served.log_path.read_text())
    return int(started[-1])


def infer_request(version: str = "") -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 1, 28, 28])
    return pb.ModelInferRequest(
        model_name="mnist", model_version=version, inputs=[tensor], raw_input_contents=[ONE.tobytes()]
    )


def test_one_client_reaches_every_worker(trained_repo, tmp_path, mnist) -> None:
    served = start(trained_repo, tmp_path)
    try:
        with MnistClient(served.target, connections=16) as client:
            for i in range(64):
                assert client.classify(mnist.test_images[i]).predictions[0].label in range(10)
        counts = requests_by_worker(served)
        assert sum(counts.values()) == 64 and set(counts) == {"0", "1"}
        assert all(n > 0 for n in counts.values()), counts  # per connection, so both workers took a share
        assert [worker_value(served, "mnist_worker_up", w) for w in (0, 1)] == [1.0, 1.0]
    finally:
        assert served.stop() == 0


def test_a_killed_worker_is_restarted_while_the_others_answer(trained_repo, tmp_path, mnist) -> None:
    served = start(trained_repo, tmp_path)
    try:
        with (
            MnistClient(served.target, connections=16) as client,
            ClientLoad(client, mnist.test_images[:2]) as load,
        ):
            wait_for(lambda: load.answered > 50, 60, "load")
            victim = worker_pid(served, 0)
            psutil.Process(victim).send_signal(signal.SIGKILL)
            wait_for(lambda: worker_pid(served, 0) != victim, 60, "worker 0 restarted")
            wait_for(lambda: worker_value(served, "mnist_worker_up", 0) == 1.0, 60, "worker 0 up again")
            during = load.answered
            wait_for(lambda: load.answered > during + 50, 60, "answers after the restart")
        log = served.log_path.read_text()
        assert re.search(rf"event=worker_exited worker=0 pid={victim} signal=SIGKILL", log), log[-2000:]
        assert worker_value(served, "mnist_worker_restarts_total", 0) == 1
        # Calls cut off by the kill were sent again on another connection (UNAVAILABLE).
        assert load.errors == Counter(), load.errors
        with MnistClient(served.target, connections=16) as client:  # new connections reach both again
            before = requests_by_worker(served)
            for i in range(64):
                client.classify(mnist.test_images[i])
            grew = requests_by_worker(served) - before
            assert set(grew) == {"0", "1"}, grew
    finally:
        assert served.stop() == 0


def test_a_version_loaded_through_one_worker_is_served_by_every_worker(trained_repo, tmp_path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repo / "mnist", repo / "mnist", ignore=shutil.ignore_patterns("*.pt", "*.png"))
    served = start(repo, tmp_path)
    try:
        shutil.copytree(repo / "mnist" / "1", repo / "mnist" / "2")  # no --poll: nobody sees it yet
        channels = [open_channel(served.target, 2**24) for _ in range(16)]
        stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
        stubs[0].RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mnist"), timeout=60)
        # Loaded in every worker before the call returned: every connection, whichever worker it
        # reached, serves version 2 and lists the same index.
        for stub in stubs:
            assert stub.ModelInfer(infer_request(), timeout=30).model_version == "2"
            assert stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="2"), timeout=30).ready
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
            assert [(m.name, m.version, m.state) for m in index] == [
                ("mnist", "1", "READY"),
                ("mnist", "2", "READY"),
            ]
        assert set(requests_by_worker(served)) == {"0", "1"}  # the 16 connections did reach both workers
        stubs[5].RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mnist"), timeout=60)
        for stub in stubs:
            assert not stub.ModelReady(pb.ModelReadyRequest(name="mnist"), timeout=30).ready
        for channel in channels:
            channel.close()
    finally:
        assert served.stop() == 0


def test_poll_brings_a_new_version_into_every_worker(trained_repo, tmp_path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repo / "mnist", repo / "mnist", ignore=shutil.ignore_patterns("*.pt", "*.png"))
    served = start(repo, tmp_path, 2, "--poll", "0.2")
    try:
        staging = repo / "mnist" / ".staging"
        shutil.copytree(repo / "mnist" / "1", staging)
        staging.rename(repo / "mnist" / "2")  # published atomically, as the exporter does
        channels = [open_channel(served.target, 2**24) for _ in range(16)]
        stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
        for stub in stubs:  # whichever worker each connection reached, it comes to serve version 2
            wait_for(lambda s=stub: s.ModelInfer(infer_request(), timeout=30).model_version == "2", 60, "v2")
        assert set(requests_by_worker(served)) == {"0", "1"}
        for channel in channels:
            channel.close()
    finally:
        assert served.stop() == 0


def test_model_statistics_count_every_image_across_workers(trained_repo, tmp_path, mnist) -> None:
    served = start(trained_repo, tmp_path)
    try:
        with MnistClient(served.target, connections=16) as client:
            sizes = [1, 2, 3, 4] * 10
            for i, n in enumerate(sizes):
                client.classify(mnist.test_images[i : i + n])
        assert set(requests_by_worker(served)) == {"0", "1"}
        (stats,) = triton_statistics(served.target)["model_stats"]  # answered by any one worker
        assert int(stats["inference_count"]) == sum(sizes)
        assert int(stats["inference_stats"]["success"]["count"]) == len(sizes)
        executed = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats["batch_stats"])
        assert executed == sum(sizes)
    finally:
        assert served.stop() == 0


@pytest.mark.parametrize("problem", ["missing repository", "only a corrupt model", "port in use"])
def test_start_up_errors_are_one_line_and_a_non_zero_exit(trained_repo, tmp_path, problem) -> None:
    repo, port = tmp_path / "repo", free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1", "--http-port", "0"]
    args += ["--workers", "3"]
    if problem == "only a corrupt model":
        (repo / "broken" / "1").mkdir(parents=True)
        shutil.copy(trained_repo / "mnist" / "config.pbtxt", repo / "broken")
        (repo / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    elif problem == "port in use":
        shutil.copytree(trained_repo / "mnist", repo / "mnist")
    taken = None
    if problem == "port in use":
        taken = socket.create_server(("127.0.0.1", port))
    try:
        done = subprocess.run(
            [*serve_command(), "--repo", str(repo), *args], capture_output=True, text=True, timeout=120
        )
    finally:
        if taken is not None:
            taken.close()
    errors = [line for line in done.stderr.splitlines() if line.startswith("mnist-serve: error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    expected = {
        "missing repository": str(repo),
        "only a corrupt model": "model.onnx",
        "port in use": str(port),
    }
    assert expected[problem] in errors[0], errors[0]
