"""Shared serving fixtures: a real trained model repository and in-process servers on loopback.

The repository comes from `mnist-train --epochs 1 --train-limit 30000 --label-smoothing 0` on real MNIST: the
default recipe (`small`) for one epoch on half the training set, ~98.5% test accuracy and confident on clear
digits (label smoothing would cap its confidence near 0.9). Training, export, the parity check and the
reports take ~23 s on 2 cores (the full set would double it and add nothing the serving tests need),
so the result is kept in pytest's cache under a key made of the training sources and arguments (edit
training/ and the next run trains again), behind a file lock: with `-n 2` both test processes share one
training.
"""

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from filelock import FileLock
from hypothesis import settings

from serving.config import HttpOptions
from serving.mnist import MNIST, load_mnist
from serving.proto.inference import grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2_grpc
from serving.runtime import RuntimeOptions
from serving.server import Server, ServerConfig

from helpers import metric

ROOT = Path(__file__).resolve().parent.parent

# Hypothesis profiles. "ci" (the default) runs a tenth of each property's examples, at least 20;
# HYPOTHESIS_PROFILE=full runs all of them (about 3,000 across the suite), e.g. before a release.
# Properties size themselves with helpers.examples(full_count).
settings.register_profile("ci", max_examples=100)
settings.register_profile("full", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
TRAIN_ARGS = ["--epochs", "1", "--train-limit", "30000", "--label-smoothing", "0", "--name", "mnist"]


def _training_key() -> str:
    digest = hashlib.sha256(" ".join(TRAIN_ARGS).encode())
    for path in sorted((ROOT / "training").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_once(root: Path, build: Callable[[Path], None]) -> Path:
    """`root`, filled by `build` unless a finished build is there already. Behind a file lock: of
    pytest-xdist's processes the first to ask builds while the others wait. Built where it stays, so the paths
    it printed hold; a marker beside it says it finished, and what a failed build left is removed."""
    done = root.with_name(root.name + ".done")
    with FileLock(f"{root}.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root)
            done.touch()
    return root


def _train_serving_model(repo: Path) -> None:
    for stale in repo.parent.glob("mnist-repo-*"):  # the models of training code as it was
        if stale.name.startswith(repo.name):
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    train = str(Path(sys.executable).with_name("mnist-train"))
    done = subprocess.run([train, *TRAIN_ARGS, "--repo", str(repo)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"mnist-train failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.strip().splitlines()[-1] == f"exported: {repo / 'mnist' / '1'}"


def _trained_root(config: pytest.Config) -> Path:
    return Path(config.cache.mkdir("trained")) / f"mnist-repo-{_training_key()}"


_training_in_background: dict[Path, threading.Thread] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The shuffled order (pytest-randomly shuffles before this hook), regrouped by a stable sort around the
    costly shared builds so that no test process sits waiting for one: the tests that build in their own
    process (built_once) first, the tests that need the serving model, trained in the background from the
    start, last. pytest-xdist hands each process a contiguous share of this order, so the first share builds
    and every share starts with tests that need no build."""

    def group(item: pytest.Item) -> int:
        if "trained_repo" in item.fixturenames:
            return 2
        return 0 if "built_once" in item.fixturenames else 1

    items.sort(key=group)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the serving model's training as soon as the tests are known, beside the first of them: a test
    process that asks for it later waits less, instead of every test process waiting at the first test that
    needs it (about 25 s on 2 cores). Each pytest-xdist process starts one; the file lock lets one train."""
    if any("trained_repo" in item.fixturenames for item in session.items):
        root = _trained_root(session.config)
        training = threading.Thread(target=build_once, args=(root, _train_serving_model), daemon=True)
        training.start()
        _training_in_background[root] = training


@pytest.fixture(scope="session")
def trained_repo(request: pytest.FixtureRequest) -> Path:
    """A model repository with one trained version of `mnist` and its reports, kept in pytest's cache across
    runs (read-only: copy it to modify it)."""
    root = _trained_root(request.config)
    if (training := _training_in_background.get(root)) is not None:
        training.join()  # then build_once finds it built, or builds it here and fails as a test does
    return build_once(root, _train_serving_model)


@pytest.fixture(scope="session")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`built_once(name, build)`: build_once in this test run's own directory, for fixtures too costly to
    repeat in each of pytest-xdist's processes (module fixtures run once per process). Read-only: copy it to
    modify it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: one run's common root
    return lambda name, build: build_once(shared / f"built-{name}", build)


@pytest.fixture
def repo(trained_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the trained repository (model files only) that a test may change."""
    copy = tmp_path / "repo"
    (copy / "mnist" / "1").mkdir(parents=True)
    shutil.copy(trained_repo / "mnist" / "config.pbtxt", copy / "mnist")
    shutil.copy(trained_repo / "mnist" / "1" / "model.onnx", copy / "mnist" / "1")
    return copy


@pytest.fixture(scope="session")
def mnist() -> MNIST:
    return load_mnist()


@pytest.fixture(scope="module")
def short_test_split(mnist: MNIST) -> Iterator[MNIST]:
    """Real MNIST with its test split cut to the first 1,000 digits, which mnist-train run in this process
    (training.cli.main) loads for the module: every export's evaluation and parity check pass over the test
    split, so tests about something else than accuracy pay a tenth of that."""
    short = replace(mnist, test_images=mnist.test_images[:1000], test_labels=mnist.test_labels[:1000])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("training.cli.load_mnist", lambda *args, **kwargs: short)
        yield short


class RunningServer:
    """A Server on its own event loop in a background thread, like mnist-serve but in this process."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._create(config))
        self.port = self.run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _create(config: ServerConfig) -> Server:
        return Server(config)  # on the server's own loop: grpc.aio objects belong to the loop they start on

    def run(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def metric(self, name: str, **labels: str) -> float:
        """Current value of the samples called `name` with these labels on /metrics (0 if absent)."""
        return metric(self.metrics_url, name, **labels)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stop(self) -> None:
        if self.loop.is_running():
            self.run(self.server.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def local_config(repo: Path, **overrides) -> ServerConfig:
    base = ServerConfig(
        repo=repo,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http=HttpOptions(http_port=0),
        runtime=RuntimeOptions(device="cpu"),
        grace_seconds=5.0,
    )
    return replace(base, **overrides)


@pytest.fixture
def start_server() -> Iterator:
    """start_server(repo, **ServerConfig overrides) -> RunningServer, stopped at the end of the test."""
    servers: list[RunningServer] = []

    def start(repo: Path, **overrides) -> RunningServer:
        servers.append(RunningServer(local_config(repo, **overrides)))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(trained_repo: Path) -> Iterator[RunningServer]:
    """The shared server for read-only tests: the trained repository, default settings."""
    running = RunningServer(local_config(trained_repo))
    yield running
    running.stop()


@pytest.fixture
def kserve(server: RunningServer):
    with server.channel() as channel:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def classifier(server: RunningServer):
    with server.channel() as channel:
        yield classify_pb2_grpc.ClassifierStub(channel)
