"""mnist-serve --workers N: a supervisor and N server processes on one port, as users run it.

Every server here is a real `mnist-serve` subprocess on 127.0.0.1 with the trained test model; the
workers are checked through what a user sees: the one /metrics endpoint, the log, the gRPC answers.
"""

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from test_serving_kserve import triton_statistics

from serving.bench.loadgen import Connection
from serving.bench.spawn import Spawned, free_port, serve_command
from serving.channels import open_channel
from serving.client import MnistClient
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc

from helpers import ClientLoad, infer_request, metric_by, scrape, wait_for


def start(repo: Path, tmp_path: Path, workers: int = 2, *extra: str) -> Spawned:
    served = Spawned.mnist_serve(
        serve_command(), repo, ["--device", "cpu", "--workers", str(workers), *extra], tmp_path / "server.log"
    )
    try:
        served.wait_serving(Connection((served.target,)))
        wait_for(lambda: "event=ready" in served.log_path.read_text(), 60, "the supervisor's ready line")
        log = served.log_path.read_text()  # ready once every worker listens
        assert log.count("event=listening") == workers
        assert log.index("event=ready") > log.rindex("event=listening")
    except BaseException:
        served.stop()
        raise
    return served


def requests_by_worker(served: Spawned) -> Counter:
    return metric_by(served.metrics_url, "mnist_requests_total", "worker")


def worker_value(served: Spawned, name: str, worker: int) -> float:
    return next(sample.value for sample in scrape(served.metrics_url, name, worker=str(worker)))


def worker_pid(served: Spawned, worker: int) -> int:
    started = re.findall(rf"event=worker_started worker={worker} pid=(\d+)", served.log_path.read_text())
    return int(started[-1])


def copy_of(trained_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repo / "mnist", repo / "mnist", ignore=shutil.ignore_patterns("*.pt", "*.png"))
    return repo


def publish_version(repo: Path, version: int) -> None:
    """A copy of version 1 as a new version, written aside and renamed in, as the exporter does."""
    staging = repo / "mnist" / ".staging"
    shutil.copytree(repo / "mnist" / "1", staging)
    staging.rename(repo / "mnist" / str(version))


class Connections:
    """Plain gRPC channels to one server, each with a connection of its own, so that together they reach
    every worker; `workers[i]` is the worker channel i reached (read off the per-worker request counts)."""

    def __init__(self, served: Spawned, count: int = 16) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.insecure_channel(served.target, options) for _ in range(count)]
        self.stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        self.workers: list[str] = []
        for stub in self.stubs:
            before = requests_by_worker(served)
            stub.ModelInfer(infer_request(), timeout=30)
            wait_for(lambda b=before: requests_by_worker(served) - b, 10, "the request counted")
            (worker,) = requests_by_worker(served) - before
            self.workers.append(worker)

    def on_worker(self, worker: int):
        return self.stubs[self.workers.index(str(worker))]

    def views(self) -> set[tuple]:
        """What each connection's worker says it serves: the distinct answers (one if all agree)."""
        answers = set()
        for stub in self.stubs:
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
            ready = [stub.ModelReady(pb.ModelReadyRequest(name="mnist", version=v), timeout=30).ready
                     for v in ("1", "2")]  # fmt: skip
            newest = stub.ModelInfer(infer_request(), timeout=30).model_version
            answers.add((tuple((m.name, m.version, m.state, m.reason) for m in index), tuple(ready), newest))
        return answers

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class PlainClient:
    """A client for ClientLoad over plain connections, one per thread's call in turn, with no retries and no
    resends: what a call gets is what the server did."""

    def __init__(self, target: str, connections: int = 8) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.insecure_channel(target, options) for _ in range(connections)]
        self._stubs = itertools.cycle(
            [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        )

    def classify(self, images: np.ndarray, top_k: int) -> None:
        try:
            next(self._stubs).ModelInfer(infer_request(), timeout=10)
        except grpc.RpcError:
            time.sleep(0.01)  # a stopped server refuses at once: do not spin on it
            raise

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in itertools.count() if n not in used)


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


def fork_server_of(supervisor: psutil.Process) -> psutil.Process:
    (fork_server,) = [p for p in supervisor.children() if "forkserver" in " ".join(p.cmdline())]
    return fork_server


def test_workers_lost_with_their_fork_server_come_back_from_a_new_one(trained_repo, tmp_path, mnist) -> None:
    served = start(trained_repo, tmp_path)
    try:
        supervisor = psutil.Process(served.process.pid)
        fork_server = fork_server_of(supervisor)
        lost = {worker_pid(served, w) for w in (0, 1)}
        assert {p.pid for p in fork_server.children()} == lost
        fork_server.kill()  # its workers stop with it (they die with their parent)
        wait_for(lambda: not {worker_pid(served, w) for w in (0, 1)} & lost, 60, "both workers restarted")
        log = served.log_path
        wait_for(lambda: log.read_text().count("event=listening") == 4, 60, "both listening again")
        assert fork_server_of(supervisor).pid != fork_server.pid
        with MnistClient(served.target, connections=16) as client:
            answers = [client.classify(mnist.test_images[i]).predictions[0].label for i in range(32)]
        assert sum(a == label for a, label in zip(answers, mnist.test_labels[:32], strict=True)) >= 30
        assert set(requests_by_worker(served)) == {"0", "1"}
    finally:
        assert served.stop() == 0


def test_a_version_loaded_through_one_worker_is_served_by_every_worker(trained_repo, tmp_path) -> None:
    repo = copy_of(trained_repo, tmp_path)
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
    repo = copy_of(trained_repo, tmp_path)
    served = start(repo, tmp_path, 2, "--poll", "0.2")
    try:
        publish_version(repo, 2)
        channels = [open_channel(served.target, 2**24) for _ in range(16)]
        stubs = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
        for stub in stubs:  # whichever worker each connection reached, it comes to serve version 2
            wait_for(lambda s=stub: s.ModelInfer(infer_request(), timeout=30).model_version == "2", 60, "v2")
        assert set(requests_by_worker(served)) == {"0", "1"}
        for channel in channels:
            channel.close()
    finally:
        assert served.stop() == 0


def test_a_change_one_worker_cannot_prepare_is_aborted_in_every_worker(trained_repo, tmp_path) -> None:
    repo = copy_of(trained_repo, tmp_path)
    served = start(repo, tmp_path)
    connections = Connections(served)
    try:
        assert set(connections.workers) == {"0", "1"}
        publish_version(repo, 2)
        # Worker 1 alone runs out of file descriptors: it cannot open the new version's files, worker 0 can.
        victim = psutil.Process(worker_pid(served, 1))
        limits = victim.rlimit(psutil.RLIMIT_NOFILE)
        victim.rlimit(psutil.RLIMIT_NOFILE, (lowest_free_fd(victim.pid), limits[1]))
        try:
            with pytest.raises(grpc.RpcError) as refused:
                connections.on_worker(0).RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name="mnist"), timeout=60
                )
        finally:
            victim.rlimit(psutil.RLIMIT_NOFILE, limits)
        # The call got worker 1's error, though it reached worker 0, and nothing changed anywhere.
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
        assert "Too many open files" in refused.value.details()
        index = (("mnist", "1", "READY", ""),)
        assert connections.views() == {(index, (True, False), "1")}
        assert "event=change_aborted" in served.log_path.read_text()
        # An explicit load tries again: with its descriptors back, worker 1 loads version 2 like worker 0.
        connections.on_worker(0).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="mnist"), timeout=60
        )
        index = (("mnist", "1", "READY", ""), ("mnist", "2", "READY", ""))
        assert connections.views() == {(index, (True, True), "2")}
    finally:
        connections.close()
        assert served.stop() == 0


def test_a_worker_killed_during_a_change_comes_back_serving_what_was_committed(
    trained_repo, tmp_path
) -> None:
    repo = copy_of(trained_repo, tmp_path)
    served = start(repo, tmp_path)
    connections = Connections(served)
    try:
        publish_version(repo, 2)
        victim = psutil.Process(worker_pid(served, 1))
        victim.suspend()  # it will not answer the change
        with ThreadPoolExecutor(1) as pool:
            request = pb.RepositoryModelLoadRequest(model_name="mnist")
            loading = pool.submit(connections.on_worker(0).RepositoryModelLoad, request, timeout=60)
            prepared = r"worker=0 event=model_loaded model=mnist version=2"
            wait_for(lambda: re.search(prepared, served.log_path.read_text()), 60, "worker 0 prepared")
            victim.kill()  # mid-change: worker 0 prepared, worker 1 never will
            loading.result()  # committed in the worker that lives
        wait_for(lambda: worker_pid(served, 1) != victim.pid, 60, "worker 1 restarted")
        wait_for(lambda: worker_value(served, "mnist_worker_up", 1) == 1.0, 60, "worker 1 up again")
        connections.close()
        connections = Connections(served)  # new connections: the restarted worker takes some of them
        assert set(connections.workers) == {"0", "1"}
        index = (("mnist", "1", "READY", ""), ("mnist", "2", "READY", ""))
        assert connections.views() == {(index, (True, True), "2")}
    finally:
        connections.close()
        assert served.stop() == 0


def test_an_empty_repository_with_poll_waits_then_serves_a_model_written_slowly_in_place(
    trained_repo, tmp_path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    args = ["--device", "cpu", "--workers", "2", "--poll", "0.2"]
    served = Spawned.mnist_serve(serve_command(), repo, args, tmp_path / "server.log")
    log = served.log_path.read_text
    try:
        wait_for(lambda: log().count("event=listening") == 2, 60, "both workers listening")
        assert "event=no_models" in log() and "event=ready" not in log()
        (repo / "mnist" / "1").mkdir(parents=True)
        shutil.copy(trained_repo / "mnist" / "config.pbtxt", repo / "mnist")
        model = (trained_repo / "mnist" / "1" / "model.onnx").read_bytes()
        refused = lambda: len(re.findall(r"event=model_refused path=\S*mnist/1/model.onnx", log()))  # noqa: E731
        with open(repo / "mnist" / "1" / "model.onnx", "wb") as file:  # written in place, in quarters
            for quarter in range(4):
                seen = refused()
                file.write(model[len(model) * quarter // 4 : len(model) * (quarter + 1) // 4])
                file.flush()
                if quarter < 3:
                    wait_for(lambda s=seen: refused() > s, 60, f"{quarter + 1}/4 of the file refused")
        wait_for(lambda: "event=ready" in log(), 60, "the supervisor's ready line")
        connections = Connections(served)
        assert set(connections.workers) == {"0", "1"}
        connections.close()
        # Each worker loaded it exactly once: once it was complete.
        assert sorted(re.findall(r"worker=(\d) event=model_ready model=mnist version=1", log())) == ["0", "1"]
    finally:
        assert served.stop() == 0


def test_a_server_starts_again_on_its_port_at_once_after_a_stop_under_load(
    trained_repo, tmp_path, mnist
) -> None:
    port = free_port()
    args = ["--repo", str(trained_repo), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1"]
    args += ["--http-port", "0", "--device", "cpu", "--workers", "2"]

    def launch(name: str) -> Spawned:
        served = Spawned([*serve_command(), *args], port, None, tmp_path / f"{name}.log")
        served.wait_serving(Connection((served.target,)))
        return served

    first, client = launch("first"), None
    try:
        client = PlainClient(first.target)
        with ClientLoad(client, mnist.test_images[:1], threads=8) as load:
            wait_for(lambda: load.answered > 100, 60, "load")
            assert first.stop() == 0
    finally:
        first.stop()
        if client is not None:
            client.close()
    server_side = [
        c for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT
    ]
    assert server_side, "the stop left no connection in TIME_WAIT"
    second = launch("second")  # at once, beside those connections
    try:
        with MnistClient(second.target, connections=4) as client:
            assert client.classify(mnist.test_images[:4]).predictions[0].label in range(10)
    finally:
        assert second.stop() == 0


def test_the_metrics_directory_a_killed_supervisor_left_is_removed_at_the_next_start(
    trained_repo, tmp_path, monkeypatch
) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))  # where the servers started below keep their metrics files
    killed = start(trained_repo, tmp_path / "killed")
    workers = psutil.Process(killed.process.pid).children(recursive=True)
    killed.process.kill()
    killed.process.wait()
    psutil.wait_procs(workers, timeout=60)  # they stop when their supervisor dies
    (stale,) = temporary.glob("mnist-serve-metrics-*")
    assert list(stale.glob("*.db")), "the killed supervisor's workers left their metrics files"
    served = start(trained_repo, tmp_path / "next")
    try:
        assert not stale.exists() and len(list(temporary.glob("mnist-serve-metrics-*"))) == 1
    finally:
        assert served.stop() == 0
    assert list(temporary.glob("mnist-serve-*")) == []  # a stopped server removes its own


def test_one_client_reaches_every_worker_and_the_statistics_count_every_image(trained_repo, tmp_path, mnist):
    served = start(trained_repo, tmp_path)
    try:
        with MnistClient(served.target, connections=16) as client:
            sizes = [1, 2, 3, 4] * 16
            for i, n in enumerate(sizes):
                assert client.classify(mnist.test_images[i : i + n]).predictions[0].label in range(10)
        counts = requests_by_worker(served)
        assert sum(counts.values()) == len(sizes) and set(counts) == {"0", "1"}
        assert all(n > 0 for n in counts.values()), counts  # per connection, so both workers took a share
        assert [worker_value(served, "mnist_worker_up", w) for w in (0, 1)] == [1.0, 1.0]
        (stats,) = triton_statistics(served.target)["model_stats"]  # answered by any one worker
        assert int(stats["inference_count"]) == sum(sizes)
        assert int(stats["inference_stats"]["success"]["count"]) == len(sizes)
        executed = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in stats["batch_stats"])
        assert executed == sum(sizes)
    finally:
        assert served.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "problem", ["missing repository", "empty repository", "only a corrupt model", "port in use"]
)
def test_start_up_errors_are_one_line_and_a_non_zero_exit(trained_repo, tmp_path, problem, workers) -> None:
    repo, port = tmp_path / "repo", free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1", "--http-port", "0"]
    args += ["--workers", str(workers)]
    if problem == "empty repository":
        repo.mkdir()
    elif problem == "only a corrupt model":
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
    # Nothing else but the server's own log lines: no traceback, no line of gRPC core's.
    assert [line for line in done.stderr.splitlines() if "level=" not in line] == errors, done.stderr[-3000:]
    assert "event=ready" not in done.stderr
    expected = {
        "missing repository": str(repo),
        "empty repository": "--poll",
        "only a corrupt model": "model.onnx",
        "port in use": str(port),
    }
    assert expected[problem] in errors[0], errors[0]
