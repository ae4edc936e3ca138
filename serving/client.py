"""A small client for the mnist.v1 Classifier API, and `mnist-predict`.

    client = MnistClient("localhost:8001")
    result = client.classify(["digit.png", pil_image, numpy_28x28_uint8], top_k=3)
    result.predictions[0].label

Paths and bytes are sent encoded (the server turns them into MNIST form); PIL images and numpy arrays
are converted here with the same rule (serving.images.to_mnist) and sent as 28x28 raw pixels.
"""

import argparse
import itertools
import json
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from serving.channels import DEFAULT_CONNECTIONS, MAX_MESSAGE_BYTES, open_channel
from serving.commandline import HelpFormatter, add_flags, add_former_name, build_config, flag, require, within
from serving.contract import IMAGE_PIXELS, NUM_CLASSES
from serving.images import to_mnist
from serving.proto.mnist.v1 import classify_pb2 as pb
from serving.proto.mnist.v1 import classify_pb2_grpc
from serving.security import SecurityConfigError, channel_credentials, read_token

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
ImageLike = str | Path | bytes | np.ndarray | Image.Image


@dataclass(frozen=True)
class Prediction:
    label: int
    confidence: float
    probabilities: tuple[float, ...]  # digits 0..9
    top_k: tuple[tuple[int, float], ...]  # (label, probability), most probable first


@dataclass(frozen=True)
class Classification:
    model: str
    version: str
    predictions: list[Prediction]
    queue_time_us: int
    compute_time_us: int


def to_image_message(image: ImageLike) -> pb.Image:
    if isinstance(image, str | Path):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.size == IMAGE_PIXELS:
            return pb.Image(pixels=image.tobytes())
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return pb.Image(pixels=to_mnist(image).tobytes())
    raise TypeError(f"cannot classify {type(image).__name__}: pass a path, bytes, numpy array or PIL image")


def from_response(response: pb.ClassifyResponse) -> Classification:
    predictions = [
        Prediction(
            label=p.label,
            confidence=p.confidence,
            probabilities=tuple(p.probabilities),
            top_k=tuple((t.label, t.probability) for t in p.top_k),
        )
        for p in response.predictions
    ]
    return Classification(
        response.model, response.version, predictions, response.queue_time_us, response.compute_time_us
    )


@dataclass(frozen=True)
class StreamError:
    code: str  # gRPC status name, e.g. INVALID_ARGUMENT
    message: str


CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class MnistClient:
    """Thread-safe. Calls go round-robin over `connections` channels (see serving.channels), so the load
    of one client spreads over a server's worker processes and, with a multi-address target, its replicas.

    A call that fails with UNAVAILABLE (its connection's worker or replica went away) is sent again by the
    channel's retry policy, within its throttled budget (serving.channels); every other error is raised as
    grpc.RpcError. Inference is idempotent, so a resend is safe."""

    def __init__(
        self,
        target: str = "localhost:8001",
        *,
        model: str = "mnist",
        timeout: float = 10.0,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls: bool = False,
        server_name: str | None = None,
        token: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        connections: int = DEFAULT_CONNECTIONS,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        credentials = channel_credentials(tls_ca, tls_cert, tls_key) if tls or tls_ca or tls_cert else None
        self.channels = [
            open_channel(target, max_message_bytes, credentials, server_name) for _ in range(connections)
        ]
        self._stubs = itertools.cycle([classify_pb2_grpc.ClassifierStub(c) for c in self.channels])
        self.model = model
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def classify(
        self,
        images: ImageLike | Sequence[ImageLike],
        top_k: int = 3,
        version: str = "",
        timeout: float | None = None,
    ) -> Classification:
        """One request with all images; raises grpc.RpcError on a server error."""
        if isinstance(images, str | Path | bytes | Image.Image) or (
            isinstance(images, np.ndarray) and images.ndim == 2
        ):
            images = [images]
        request = pb.ClassifyRequest(
            model=self.model, version=version, top_k=top_k, images=[to_image_message(i) for i in images]
        )
        stub = next(self._stubs)
        reply = stub.Classify(
            request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata
        )
        return from_response(reply)

    def classify_each(
        self, images: Iterable[ImageLike], top_k: int = 3, version: str = "", timeout: float | None = None
    ) -> Iterator[Classification | StreamError]:
        """One streamed request per image, in order: a Classification, or that image's own error. An image
        whose request would exceed this client's message limit is not sent: it gets a RESOURCE_EXHAUSTED
        StreamError saying so. A failure of the whole stream raises grpc.RpcError."""
        # Images refused here, and a marker per image sent, in order: the reader interleaves the two.
        slots: deque[StreamError | None] = deque()

        def requests() -> Iterator[pb.ClassifyRequest]:
            for image in images:
                request = pb.ClassifyRequest(
                    model=self.model, version=version, top_k=top_k, images=[to_image_message(image)]
                )
                if (size := request.ByteSize()) > self.max_message_bytes:
                    slots.append(StreamError("RESOURCE_EXHAUSTED", self._too_large(size)))
                    continue
                slots.append(None)
                yield request

        stub = next(self._stubs)
        stream = stub.ClassifyStream(
            requests(), timeout=self.timeout if timeout is None else timeout, metadata=self.metadata
        )
        for response in stream:
            # Every slot before this response's own was appended before its request was sent.
            while slots[0] is not None:
                yield slots.popleft()
            slots.popleft()
            if response.HasField("error"):
                yield StreamError(
                    CODE_NAMES.get(response.error.code, str(response.error.code)), response.error.message
                )
            else:
                yield from_response(response.response)
        for slot in slots:  # images refused after the last one sent, or never answered
            yield slot or StreamError("UNAVAILABLE", "the server ended the stream before answering")

    def _too_large(self, size: int) -> str:
        return (
            f"the request would be {size:,} bytes, above this client's message limit of "
            f"{self.max_message_bytes:,} bytes; not sent"
        )

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> "MnistClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_images(paths: list[Path]) -> list[Path]:
    """Files as given; directories expanded to the image files inside them (recursively, sorted)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            found.append(path)
    return found


def format_row(path: Path, prediction: Prediction, as_json: bool) -> str:
    if as_json:
        row = {"path": str(path), **asdict(prediction)}
        row["top_k"] = [{"label": label, "probability": p} for label, p in prediction.top_k]
        return json.dumps(row)
    top = " ".join(f"{label}:{p:.3f}" for label, p in prediction.top_k)
    return f"{path}\t{prediction.label}\t{prediction.confidence:.4f}\t{top}"


@dataclass(frozen=True)
class ClientSecurity:
    """How a client command secures its connection, with the same flags in every client command: TLS (the
    system's CAs, or --tls-ca), a client certificate for mutual TLS, and the bearer token that mnist-serve's
    --auth-token-file requires. The files are read when the client connects."""

    tls: bool = field(default=False, metadata=flag("use TLS, trusting the system's CAs (or --tls-ca)"))
    tls_ca: Path | None = field(
        default=None,
        metadata=flag("PEM CA that signed the server certificate (implies --tls)", metavar="PEM"),
    )
    tls_cert: Path | None = field(
        default=None, metadata=flag("PEM client certificate for mutual TLS (with --tls-key)", metavar="PEM")
    )
    tls_key: Path | None = field(default=None, metadata=flag("PEM private key of --tls-cert", metavar="PEM"))
    tls_server_name: str | None = field(
        default=None,
        metadata=flag("name expected in the server certificate (default: the target's host)", metavar="NAME"),
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata=flag("file holding the bearer token (the server's --auth-token-file)", metavar="FILE"),
    )

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def token(self) -> str | None:
        """The bearer token, read now (SecurityConfigError for a missing or empty file)."""
        return read_token(self.auth_token_file) if self.auth_token_file else None


MAX_TIMEOUT_S = 86_400.0


@dataclass(frozen=True)
class PredictConfig:
    """mnist-predict's settings (its flags are derived from these fields: serving.commandline)."""

    server: str = field(
        default="localhost:8001",
        metadata=flag(
            "gRPC target: HOST:PORT, dns:///NAME:PORT (every address, round-robin) or ipv4:A:PORT,B:PORT",
            metavar="TARGET",
        ),
    )
    model: str = field(
        default="mnist", metadata=flag("model name in the server's repository", metavar="NAME")
    )
    model_version: str = field(
        default="", metadata=flag("model version (default: the newest)", metavar="VERSION")
    )
    top_k: int = field(
        default=3, metadata=flag(f"alternatives listed per image, 1..{NUM_CLASSES}", metavar="K")
    )
    json: bool = field(default=False, metadata=flag("one JSON object per line instead of a table"))
    timeout: float = field(
        default=30.0, metadata=flag("deadline of the whole run, all files, in seconds", metavar="SECONDS")
    )
    security: ClientSecurity = field(default_factory=ClientSecurity)

    def __post_init__(self) -> None:
        c = type(self)
        require(within(self.top_k, 1, NUM_CLASSES), c, "top_k", f"within 1..{NUM_CLASSES}", self.top_k)
        require(within(self.timeout, 0.001, MAX_TIMEOUT_S), c, "timeout", f"within 0.001..{MAX_TIMEOUT_S:g}",
                self.timeout)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-predict",
        description="Classify image files (PNG, JPEG, BMP, ...) with an mnist-serve server. "
        "One row per file: path, digit, confidence, top-k. A file that cannot be classified gets one error "
        "line naming it (and, with --json, a record with the error), and the others are still classified.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="image files or directories")
    add_flags(p, PredictConfig)
    add_former_name(p, "--version", "model_version")
    add_former_name(p, "--token-file", "auth_token_file", Path)
    return p


class RunError(Exception):
    """A failure of the whole run (server unreachable, unknown model, refused token): said once, then stop."""


# A call that failed for what one file holds (the server's own message limit, say): that file's error.
FILE_ERRORS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"}
# An error the server answers for one image that every other image would get too: said once, then stop.
RUN_ERRORS = {"NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"}


class Output:
    """A row per classified file on stdout; one error line per failed file on stderr and, with --json, a
    record with the error on stdout too."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.failed = 0

    def result(self, path: Path, result: Classification) -> None:
        print(format_row(path, result.predictions[0], self.as_json), flush=True)

    def error(self, path: Path, code: str, message: str) -> None:
        self.failed += 1
        print(f"mnist-predict: error: {path}: {message}", file=sys.stderr, flush=True)
        if self.as_json:
            record = {"path": str(path), "error": {"code": code, "message": message}}
            print(json.dumps(record), flush=True)


@dataclass(frozen=True)
class FileError:
    code: str  # a gRPC status name, or UNREADABLE
    message: str


def read_file(path: Path, max_bytes: int) -> bytes | FileError:
    """The file's bytes, or why it cannot be sent: unreadable, or larger than a message may be."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            limit = f"above this client's message limit of {max_bytes:,} bytes; not sent"
            return FileError("RESOURCE_EXHAUSTED", f"{size:,} bytes, {limit}")
        return path.read_bytes()
    except OSError as e:
        return FileError("UNREADABLE", f"cannot read: {e.strerror}")


def _run_error(config: PredictConfig, code: str, details: str) -> RunError:
    if code == "UNAVAILABLE":
        return RunError(f"cannot reach server {config.server}: {details}")
    if code == "DEADLINE_EXCEEDED":
        return RunError(f"the run took longer than --timeout {config.timeout:g} s (server {config.server})")
    return RunError(f"server {config.server} answered {code}: {details}")


def predict(client: MnistClient, paths: list[Path], config: PredictConfig, out: Output) -> None:
    """Classify every file, in order, on one stream per run of readable files. When a stream itself fails
    for a reason a file can cause (the server's own message limit, say), the first file not yet answered is
    sent alone, so that the error is pinned on the file that caused it, and the stream resumes after it."""
    deadline = time.monotonic() + config.timeout
    top_k, version = config.top_k, config.model_version
    pending = deque((path, read_file(path, client.max_message_bytes)) for path in paths)
    while pending:
        while pending and isinstance(pending[0][1], FileError):
            path, problem = pending.popleft()
            out.error(path, problem.code, problem.message)
        run = list(itertools.takewhile(lambda item: isinstance(item[1], bytes), pending))
        if not run:
            continue
        try:
            results = client.classify_each(
                (data for _, data in run), top_k, version, timeout=deadline - time.monotonic()
            )
            for result in results:
                path, _ = pending.popleft()
                if isinstance(result, Classification):
                    out.result(path, result)
                elif result.code in RUN_ERRORS:
                    raise _run_error(config, result.code, result.message)
                else:
                    out.error(path, result.code, f"{result.code}: {result.message}")
        except grpc.RpcError as e:
            if e.code().name not in FILE_ERRORS:
                raise _run_error(config, e.code().name, e.details()) from None
            _classify_alone(client, *pending.popleft(), config, deadline, out)


def _classify_alone(
    client: MnistClient, path: Path, data: bytes, config: PredictConfig, deadline: float, out: Output
) -> None:
    """One file in a request of its own: its result, or its own error."""
    try:
        result = client.classify(
            data, config.top_k, config.model_version, timeout=deadline - time.monotonic()
        )
        out.result(path, result)
    except grpc.RpcError as error:
        if (code := error.code().name) not in FILE_ERRORS:
            raise _run_error(config, code, error.details()) from None
        out.error(path, code, f"{code}: {error.details()}")


def connect(config: PredictConfig) -> MnistClient:
    """A client for the run: one stream at a time, so one connection. SecurityConfigError for a TLS or
    token file that cannot be used."""
    s = config.security
    return MnistClient(
        config.server, model=config.model, timeout=config.timeout, tls=s.tls, tls_ca=s.tls_ca,
        tls_cert=s.tls_cert, tls_key=s.tls_key, server_name=s.tls_server_name, token=s.token(),
        connections=1,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    config = build_config(parser, PredictConfig, namespace)
    paths = find_images(namespace.images)
    if not paths:
        print("mnist-predict: error: no image files found", file=sys.stderr)
        raise SystemExit(1)
    try:
        client = connect(config)
    except SecurityConfigError as e:
        print(f"mnist-predict: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Output(config.json)
    try:
        predict(client, paths, config, out)
    except RunError as e:
        print(f"mnist-predict: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        client.close()
    raise SystemExit(1 if out.failed else 0)
