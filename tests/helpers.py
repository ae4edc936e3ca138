"""What several test files share: waiting on a condition, the one tolerance for batched results, and small
ONNX models built by hand (to serve without training, or to break the contract one way at a time)."""

import datetime
import io
import ipaddress
import struct
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from serving.contract import IMAGE_PIXELS, INPUT_NAME, LABELS, NUM_CLASSES, OUTPUT_NAME
from serving.mnist import MEAN, STD
from serving.proto.inference import grpc_service_pb2 as kpb

# Batched and unbatched runs of one model on CPU use the same kernels; rows may differ by float rounding.
BATCH_TOLERANCE = 1e-6


def assert_same_probabilities(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=BATCH_TOLERANCE)
    assert (got.argmax(1) == want.argmax(1)).all()


ONE_IMAGE = np.zeros((1, 1, 28, 28), np.uint8)


def infer_request(
    images: np.ndarray = ONE_IMAGE, datatype: str = "UINT8", raw: bool = True, *, version: str = "", **fields
) -> kpb.ModelInferRequest:
    """A KServe v2 ModelInfer request for model `mnist`: `images` [N, 1, 28, 28] as raw bytes (or as typed
    contents when raw is False); `fields` set other request fields (id, parameters, ...)."""
    tensor = kpb.ModelInferRequest.InferInputTensor(
        name="images", datatype=datatype, shape=list(images.shape)
    )
    request = kpb.ModelInferRequest(model_name="mnist", model_version=version, inputs=[tensor], **fields)
    if raw:
        request.raw_input_contents.append(images.astype("<f4" if datatype == "FP32" else np.uint8).tobytes())
    elif datatype == "FP32":
        request.inputs[0].contents.fp32_contents.extend(images.ravel().astype(float).tolist())
    else:
        request.inputs[0].contents.uint_contents.extend(images.ravel().tolist())
    return request


def examples(full: int) -> int:
    """A property's example count: `full` under HYPOTHESIS_PROFILE=full (max_examples 1000), a tenth of it
    but at least 20 under the default "ci" profile (max_examples 100); see conftest.py."""
    return max(20, full * settings().max_examples // 1000)


def scrape(metrics_url: str, name: str, **labels: str) -> list[Sample]:
    """The samples called `name` whose labels include `labels`, read from a /metrics endpoint now."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of those samples' values (0 if there are none)."""
    return sum(sample.value for sample in scrape(metrics_url, name, **labels))


def metric_by(metrics_url: str, name: str, label: str, **labels: str) -> Counter:
    """Those samples' values summed by the value of one label (e.g. by worker, by status)."""
    counts: Counter = Counter()
    for sample in scrape(metrics_url, name, **labels):
        counts[sample.labels[label]] += sample.value
    return counts


def wait_for(condition: Callable[[], object], seconds: float = 30.0, what: str = "condition") -> None:
    """Poll until `condition()` is true: synchronise on an observable state, never on a fixed sleep."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, f"{what} not reached within {seconds:g} s"
        time.sleep(0.02)


CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "images" data_type: TYPE_UINT8 dims: [ 1, 28, 28 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
"""


def server_processes(server: psutil.Process) -> list[psutil.Process]:
    """A running mnist-serve's own processes: itself and, under a supervisor, its workers; not the helpers
    multiprocessing starts beside them (the resource tracker, the fork server the workers are forked from)."""
    helpers = {p.pid for p in server.children() if "from multiprocessing" in " ".join(p.cmdline())}
    return [server, *(p for p in server.children(recursive=True) if p.pid not in helpers)]


def linear_model(
    weights: np.ndarray | None = None,
    *,
    input_name: str = INPUT_NAME,
    input_type: int = TensorProto.UINT8,
    input_shape: tuple = ("N", 1, 28, 28),
    output: str = OUTPUT_NAME,
    classes: int = NUM_CLASSES,
    normalise: bool = False,
) -> onnx.ModelProto:
    """Softmax regression on the pixels: uint8 images -> probabilities, honouring the serving contract
    unless an argument bends it. `weights` [784, classes] (default: zeros, so every class gets 0.1);
    `normalise` applies the MNIST normalisation in the graph, as exported models do."""
    if weights is None:
        weights = np.zeros((IMAGE_PIXELS, classes), np.float32)
    batch = input_shape[0]
    nodes = [helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT)]
    constants = {"flat": np.array([-1, IMAGE_PIXELS], np.int64), "w": weights.astype(np.float32)}
    if normalise:
        nodes += [
            helper.make_node("Div", ["as_float", "scale"], ["unit"]),
            helper.make_node("Sub", ["unit", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["features"]),
        ]
        constants |= {"scale": np.array(255.0, np.float32), "mean": np.array(MEAN, np.float32),
                      "std": np.array(STD, np.float32)}  # fmt: skip
    else:
        nodes.append(helper.make_node("Identity", ["as_float"], ["features"]))
    nodes += [
        helper.make_node("Reshape", ["features", "flat"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["scores"]),
        helper.make_node("Softmax", ["scores"], [output], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info(input_name, input_type, list(input_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"labels": ",".join(LABELS), "arch": "linear", "variant": "fp32"})
    return model


def fitted_weights(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Ridge-regression weights for linear_model(normalise=True): ~85 % on MNIST, fitted in a second."""
    x = (images.reshape(-1, IMAGE_PIXELS) / 255.0 - MEAN) / STD
    y = np.eye(NUM_CLASSES)[labels]
    return np.linalg.solve(x.T @ x + 100.0 * np.eye(IMAGE_PIXELS), x.T @ (y * 8.0 - 4.0)).astype(np.float32)


def fitted_repo(root: Path, mnist, max_batch_size: int = 64) -> Path:
    """A repository whose model `mnist` is linear_model with fitted_weights from 10,000 training digits
    (~85 % right): a real served model without a training run."""
    weights = fitted_weights(mnist.train_images[:10000], mnist.train_labels[:10000])
    add_model(root, "mnist", linear_model(weights, normalise=True), max_batch_size=max_batch_size)
    return root


def slow_model(weights: np.ndarray, width: int = 512, layers: int = 16) -> onnx.ModelProto:
    """linear_model's answers at about 5 M multiply-adds per image: a deep branch whose output is weighted
    by zeros (ONNX Runtime cannot fold it away: it depends on the input), so that a batch takes long enough
    for the queue to fill while it computes."""
    model = linear_model(weights, normalise=True)
    graph = model.graph
    (scores,) = [node for node in graph.node if node.op_type == "MatMul"]
    scores.output[0] = "linear_scores"
    softmax = graph.node.pop()  # keep the softmax last
    deep = [helper.make_node("MatMul", ["x", "deep_in"], ["h0"])]
    for k in range(layers):
        deep += [
            helper.make_node("MatMul", [f"h{k}", "deep_w"], [f"m{k}"]),
            helper.make_node("Relu", [f"m{k}"], [f"h{k + 1}"]),
        ]
    deep += [
        helper.make_node("MatMul", [f"h{layers}", "zeros"], ["nothing"]),
        helper.make_node("Add", ["linear_scores", "nothing"], ["scores"]),
        softmax,
    ]
    graph.node.extend(deep)
    rng = np.random.default_rng(0)  # He-scaled, so that the activations stay finite through the layers
    w_in = rng.standard_normal((784, width)) * np.sqrt(2 / 784)
    w = rng.standard_normal((width, width)) * np.sqrt(2 / width)
    graph.initializer.extend([
        numpy_helper.from_array(w_in.astype(np.float32), "deep_in"),
        numpy_helper.from_array(w.astype(np.float32), "deep_w"),
        numpy_helper.from_array(np.zeros((width, 10), np.float32), "zeros"),
    ])  # fmt: skip
    return model


def add_model(
    repo: Path, name: str, model: onnx.ModelProto | bytes, version: int = 1, config: str = CONFIG,
    max_batch_size: int = 8,
) -> Path:  # fmt: skip
    """Write model (and config.pbtxt) into the repository layout; returns the model file."""
    (repo / name / str(version)).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config.format(name=name, max_batch_size=max_batch_size))
    path = repo / name / str(version) / "model.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


class ClientLoad:
    """Threads that classify real digits through one client until the block ends; counts its answers and its
    errors by status. The client's calls go over all of its connections."""

    def __init__(self, client, images: np.ndarray, threads: int = 4) -> None:
        self.answered = 0
        self.errors: Counter = Counter()
        self._client, self._images = client, images
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> "ClientLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.classify(self._images, top_k=1)
                outcome = None
            except grpc.RpcError as e:
                outcome = e.code().name
            with self._lock:
                if outcome is None:
                    self.answered += 1
                else:
                    self.errors[outcome] += 1


# -- decompression bombs: small files whose header declares a huge image -------------------------------------
def png_header_only(width: int, height: int, mode: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, then a few bytes of IDAT and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type = {"L": 0, "RGB": 2, "RGBA": 6}[mode] if isinstance(mode, str) else mode
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_header_only(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + descriptor + b"\x08\x02\x4c\x01\x00;"


def bmp_header_only(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 256, 0)
    palette = bytes(4 * 256)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset) + info + palette + bytes(64)


def jpeg_header_only(width: int, height: int) -> bytes:
    """A real 8x8 JPEG with the frame header (SOF0) patched to declare width x height."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# -- certificates: a CA, server and client certificates for TLS and mutual TLS on loopback ---------------
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


def pki(directory: Path) -> dict[str, Path]:
    """A test CA; a server certificate for localhost/127.0.0.1 and a client certificate it issued; and a
    client certificate from a rogue CA. Paths of the PEM files written into `directory`."""
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
