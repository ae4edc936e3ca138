"""Hostile input against both gRPC APIs of a live server, property-based.

Each property sends generated requests through the unary RPC and through one long-lived stream of the
same API, and checks them against an oracle written from the documented contract (docs/serving.md,
"Errors" and "Limits"): the status must be one the documentation gives for what is wrong with the
request, the message one short line, the stream must answer with the same status and stay open. A
well-formed client runs beside the whole module and must see no error; the server must stay up.

Examples are derandomized (the same cases on every run), as many as the Hypothesis profile gives
(conftest.py), and counted by kind for docs/reliability.md.
"""

import io
import queue
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.proto.inference import grpc_service_pb2 as kpb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2 as cpb
from serving.proto.mnist.v1 import classify_pb2_grpc
from serving.server import ServerConfig

from helpers import bmp_header_only, examples, gif_header_only, jpeg_header_only, png_header_only, wait_for

OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND, EXHAUSTED = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
LIMITS = ServerConfig(repo=Path())  # the shared server runs with the default limits
MAX_IMAGES = LIMITS.max_images_per_request
MAX_PIXELS = LIMITS.max_image_pixels
PIXELS = 28 * 28
CASES = Counter()
pytestmark = pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning"
)  # inputs tried, by kind (printed at the end of the module for the report)


def fuzz(full: int):
    return settings(
        max_examples=examples(full),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the live server, one channel, one stream per API ----------------------------------------------------
class Stream:
    """One bidirectional stream kept open across examples: ask() writes a request and reads its answer."""

    def __init__(self, method) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = method(iter(self._requests.get, None), timeout=600)

    def ask(self, request):
        self._requests.put(request)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        assert list(self._responses) == []


class Api:
    def __init__(self, channel: grpc.Channel) -> None:
        self.kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.classifier = classify_pb2_grpc.ClassifierStub(channel)
        self.kserve_stream = Stream(self.kserve.ModelStreamInfer)
        self.classify_stream = Stream(self.classifier.ClassifyStream)


def unary(method, request) -> tuple[grpc.StatusCode, str, object]:
    try:
        return OK, "", method(request, timeout=60)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None


def assert_clear(code: grpc.StatusCode, message: str) -> None:
    """A helpful error message: present, one printable line of reasonable length."""
    if code != OK:
        assert message and len(message) <= 400 and "\n" not in message and message.isprintable(), message


@pytest.fixture(scope="module")
def api(server):
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    channel = grpc.insecure_channel(server.target, options=options)
    streams = Api(channel)
    yield streams
    streams.kserve_stream.close()
    streams.classify_stream.close()
    channel.close()


@pytest.fixture(scope="module")
def bystander(server, mnist):
    """A well-formed client on its own channel for the whole module: real digits, both APIs."""
    stop, errors, answered = threading.Event(), [], []
    digits, labels = mnist.test_images[:64], mnist.test_labels[:64]

    def run() -> None:
        with server.channel() as channel:
            kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            classifier = classify_pb2_grpc.ClassifierStub(channel)
            i = 0
            while not stop.is_set():
                digit = digits[i % 64]
                try:
                    if i % 2:
                        reply = kserve.ModelInfer(
                            tensor_request([1, 1, 28, 28], raw=digit.tobytes()), timeout=30
                        )
                        probabilities = np.frombuffer(reply.raw_output_contents[0], np.float32)
                    else:
                        image = cpb.Image(pixels=digit.tobytes())
                        reply = classifier.Classify(
                            cpb.ClassifyRequest(model="mnist", images=[image]), timeout=30
                        )
                        probabilities = np.asarray(reply.predictions[0].probabilities, np.float32)
                    assert probabilities.shape == (10,) and abs(probabilities.sum() - 1) < 1e-3
                    answered.append(int(probabilities.argmax()) == labels[i % 64])
                except (grpc.RpcError, AssertionError, IndexError) as e:
                    errors.append(repr(e)[:200])
                i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield errors, answered
    stop.set()
    thread.join(30)
    assert errors == [], f"the well-formed client saw errors: {errors[:3]}"


# -- KServe v2 tensors -------------------------------------------------------------------------------------
def tensor_request(
    shape, datatype="UINT8", raw=None, name="images", model="mnist", version=""
) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    request = kpb.ModelInferRequest(model_name=model, model_version=version, inputs=[tensor])
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


DATATYPES = ["UINT8", "FP32", "INT8", "UINT16", "UINT32", "UINT64", "INT64", "FP16", "FP64", "BF16", "BOOL"]
DATATYPES += ["BYTES", "", "uint8", "fp32"]
INT64 = st.integers(-(2**63), 2**63 - 1)
valid_shape = st.integers(1, 4).map(lambda n: [n, 1, 28, 28])
huge_shape = st.one_of(st.integers(MAX_IMAGES + 1, 2**63 - 1), st.sampled_from([2**31, 2**32, 2**62])).map(
    lambda n: [n, 1, 28, 28]
)
random_shape = st.lists(st.one_of(INT64, st.integers(-2, 30)), max_size=6)
special_floats = st.one_of(
    st.floats(width=32),
    st.sampled_from(
        [float("nan"), float("inf"), -float("inf"), -0.0, -1e-7, 255.0, 255.4, 255.6, 256.0, 1e30]
    ),
)
parameters = st.dictionaries(
    st.text(max_size=20),
    st.one_of(
        st.booleans().map(lambda b: kpb.InferParameter(bool_param=b)),
        INT64.map(lambda i: kpb.InferParameter(int64_param=i)),
        st.text(max_size=50).map(lambda s: kpb.InferParameter(string_param=s)),
    ),
    max_size=3,
)


@st.composite
def tensor_requests(draw) -> tuple[str, kpb.ModelInferRequest]:
    """Mostly near-valid requests, so the checks past the first one get exercised too."""
    shape = draw(st.one_of(valid_shape, valid_shape, huge_shape, random_shape))
    datatype = draw(st.one_of(st.sampled_from(["UINT8", "FP32"] * 4 + DATATYPES), st.text(max_size=12)))
    name = draw(st.sampled_from(["images"] * 8 + ["", "Images", "probabilities", "images\x00", "x" * 300]))
    count = shape[0] * PIXELS if len(shape) == 4 and 1 <= shape[0] <= MAX_IMAGES else draw(st.integers(0, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.integers(0, 256, count).astype(np.float32 if datatype == "FP32" else np.uint8)
    if datatype == "FP32" and count:
        for position, value in draw(
            st.lists(st.tuples(st.integers(0, count - 1), special_floats), max_size=4)
        ):
            values[position] = value
    payload = values.tobytes() if datatype == "FP32" else values.astype(np.uint8).tobytes()
    mode = draw(
        st.sampled_from(["raw", "raw", "raw", "typed", "raw+typed", "two raw", "none", "cut", "grow"])
    )
    request = kpb.ModelInferRequest(model_name="mnist", model_version=draw(st.sampled_from(["", "", "1"])))
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if mode in ("raw", "raw+typed", "two raw"):
        request.raw_input_contents.append(payload)
    if mode == "two raw":
        request.raw_input_contents.append(payload[:PIXELS])
    if mode == "cut":
        request.raw_input_contents.append(payload[: draw(st.integers(0, max(0, len(payload) - 1)))])
    if mode == "grow":
        request.raw_input_contents.append(payload + draw(st.binary(min_size=1, max_size=64)))
    if mode in ("typed", "raw+typed"):
        if datatype == "FP32":
            tensor.contents.fp32_contents.extend(values.tolist())
        else:
            big = draw(st.lists(st.integers(0, 2**32 - 1), max_size=2))  # uint_contents is uint32
            tensor.contents.uint_contents.extend(values.astype(np.uint32).tolist() + big)
    extra = draw(st.sampled_from(["none"] * 6 + ["duplicate input", "second input", "no input"]))
    if extra == "duplicate input":
        request.inputs.append(tensor)
    elif extra == "second input":
        request.inputs.add(name="mask", datatype="UINT8", shape=[1])
    elif extra == "no input":
        del request.inputs[:]
    for output in draw(
        st.lists(st.sampled_from(["probabilities", "probabilities", "logits", ""]), max_size=2)
    ):
        request.outputs.add(name=output)
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    if request.inputs:
        for key, value in draw(parameters).items():
            request.inputs[0].parameters[key].CopyFrom(value)
    request.id = draw(st.text(max_size=40))
    kind = (
        f"tensor: {mode}, {extra}, {'valid' if shape in ([1, 1, 28, 28], [2, 1, 28, 28]) else 'other'} shape"
    )
    return kind, request


def kserve_expected(request: kpb.ModelInferRequest) -> set[grpc.StatusCode]:
    """The statuses docs/serving.md allows for this request (one per thing wrong with it; OK if none)."""
    problems = set()
    if any(output.name != "probabilities" for output in request.outputs):
        problems.add(INVALID)
    if len(request.inputs) != 1:
        return problems | {INVALID}
    tensor = request.inputs[0]
    if tensor.name != "images" or tensor.datatype not in ("UINT8", "FP32"):
        return problems | {INVALID}
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[1:] != [1, 28, 28] or shape[0] < 1:
        return problems | {INVALID}
    if shape[0] > MAX_IMAGES:
        return problems | {EXHAUSTED}
    count = shape[0] * PIXELS
    fp32 = tensor.datatype == "FP32"
    if request.raw_input_contents:
        raw = request.raw_input_contents
        if len(raw) != 1 or tensor.HasField("contents") or len(raw[0]) != count * (4 if fp32 else 1):
            return problems | {INVALID}
        values = np.frombuffer(raw[0], "<f4" if fp32 else np.uint8)
    else:
        values = np.asarray(
            tensor.contents.fp32_contents if fp32 else tensor.contents.uint_contents, np.float64
        )
        if len(values) != count:
            return problems | {INVALID}
    if not np.all((values >= 0) & (values <= 255)):
        problems.add(INVALID)
    return problems or {OK}


def check_kserve(api: Api, request: kpb.ModelInferRequest, allowed: set[grpc.StatusCode]) -> grpc.StatusCode:
    code, message, reply = unary(api.kserve.ModelInfer, request)
    assert code in allowed, f"{code.name} {message!r}, expected one of {sorted(c.name for c in allowed)}"
    assert_clear(code, message)
    streamed = api.kserve_stream.ask(request)
    if code == OK:
        n = request.inputs[0].shape[0]
        assert not streamed.error_message
        for answer in (reply, streamed.infer_response):
            probabilities = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(-1, 10)
            assert probabilities.shape == (n, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-3)
            assert answer.id == request.id
    else:
        assert streamed.error_message.startswith(f"{code.name}: "), streamed.error_message[:200]
    return code


@fuzz(1000)
@given(case=tensor_requests())
def test_kserve_tensors_get_the_documented_status(api, bystander, case) -> None:
    kind, request = case
    code = check_kserve(api, request, kserve_expected(request))
    CASES[f"{kind} -> {code.name}"] += 1


@fuzz(300)
@given(
    n=st.one_of(st.integers(MAX_IMAGES + 1, 2**63 - 1), st.integers(2, MAX_IMAGES)),
    datatype=st.sampled_from(["UINT8", "FP32"]),
    payload=st.binary(max_size=PIXELS),
    typed=st.booleans(),
)
def test_declared_shapes_far_larger_than_the_payload_allocate_nothing(
    api, bystander, n, datatype, payload, typed
) -> None:
    process = psutil.Process()
    before = process.memory_info().rss
    request = tensor_request([n, 1, 28, 28], datatype, None if typed else payload)
    if typed:
        request.inputs[0].contents.uint_contents.extend(payload)
    code = check_kserve(api, request, {EXHAUSTED} if n > MAX_IMAGES else {INVALID})
    # The largest allocation the shape could justify is MAX_IMAGES FP32 images (3 MiB); anything
    # proportional to a declared 2**62 images would be gigabytes or a MemoryError.
    assert process.memory_info().rss - before < 64 * 2**20
    CASES[f"declared shape larger than payload -> {code.name}"] += 1


# -- mnist.v1 Classifier: images -----------------------------------------------------------------------
WRITABLE_MODES = {
    "PNG": "L RGB RGBA P 1 LA",
    "JPEG": "L RGB",
    "BMP": "L RGB RGBA P 1",
    "GIF": "L P 1",
    "TIFF": "L RGB RGBA P 1 LA",
    "WEBP": "L RGB RGBA",
}
FORMATS = sorted(WRITABLE_MODES)


@st.composite
def real_images(draw) -> tuple[str, bytes]:
    """A small real image (any mode) encoded in one of the formats Pillow writes."""
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "LA"]))
    if mode not in WRITABLE_MODES[fmt].split():
        mode = "L"
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return fmt, buffer.getvalue()


@st.composite
def hostile_images(draw) -> tuple[str, cpb.Image, set[grpc.StatusCode]]:
    """One image of the request: a kind, the Image message, and the statuses it may earn on its own."""
    kind = draw(st.sampled_from(["random bytes", "truncated", "corrupted", "valid", "pixels", "bad pixels"]))
    if kind == "random bytes":
        return kind, cpb.Image(encoded=draw(st.binary(max_size=512))), {OK, INVALID}
    if kind == "pixels":
        return kind, cpb.Image(pixels=draw(st.binary(min_size=PIXELS, max_size=PIXELS))), {OK}
    if kind == "bad pixels":
        data = draw(st.one_of(st.binary(max_size=PIXELS - 1), st.binary(min_size=PIXELS + 1, max_size=2000)))
        return kind, cpb.Image(pixels=data), {INVALID}
    fmt, data = draw(real_images())
    if kind == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "corrupted":
        changed = bytearray(data)
        for position, value in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)
        ):
            changed[position] = value
        data = bytes(changed)
    expected = {OK} if kind == "valid" else {OK, INVALID}
    return f"{kind} {fmt}", cpb.Image(encoded=data), expected


@st.composite
def classify_requests(draw) -> tuple[str, cpb.ClassifyRequest, set[grpc.StatusCode]]:
    images = draw(st.lists(hostile_images(), max_size=4))
    extra = draw(st.sampled_from(["none"] * 8 + ["empty image", "duplicates", "too many"]))
    if extra == "empty image":
        images.append(("empty", cpb.Image(), {INVALID}))
    elif extra == "duplicates" and images:
        images = images * 3
    elif extra == "too many":
        images = [("pixels", cpb.Image(pixels=bytes(PIXELS)), {OK})] * (MAX_IMAGES + 1)
    version = draw(st.sampled_from([""] * 12 + ["1"] * 3 + ["2", "0", "01", "-1", "1.0", "x" * 200]))
    top_k = draw(st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)))
    request = cpb.ClassifyRequest(
        model="mnist",
        version=version,
        top_k=top_k,
        id=draw(st.text(max_size=40)),
        images=[i for _, i, _ in images],
    )
    if version not in ("", "1"):
        allowed = {NOT_FOUND}
    elif not images:
        allowed = {INVALID}
    elif len(images) > MAX_IMAGES:
        allowed = {EXHAUSTED}
    elif top_k > 10:
        allowed = {INVALID}
    else:  # images are decoded in order: the first that fails decides
        allowed = set()
        for _, _, statuses in images:
            allowed |= statuses - {OK}
            if OK not in statuses:
                break
        else:
            allowed.add(OK)
    kinds = sorted({kind.split()[0] for kind, _, _ in images}) or ["no images"]
    return f"classify: {'+'.join(kinds)}, {extra}", request, allowed


def check_classify(api: Api, request: cpb.ClassifyRequest, allowed: set[grpc.StatusCode]) -> grpc.StatusCode:
    code, message, reply = unary(api.classifier.Classify, request)
    assert code in allowed, f"{code.name} {message!r}, expected one of {sorted(c.name for c in allowed)}"
    assert_clear(code, message)
    streamed = api.classify_stream.ask(request)
    assert streamed.id == request.id
    if code == OK:
        assert streamed.WhichOneof("result") == "response"
        top_k = min(request.top_k or 1, 10)
        for answer in (reply, streamed.response):
            assert len(answer.predictions) == len(request.images) and answer.id == request.id
            for p in answer.predictions:
                assert len(p.probabilities) == 10 and abs(sum(p.probabilities) - 1) < 1e-3
                assert len(p.top_k) == top_k and p.top_k[0].label == p.label
    else:
        assert streamed.WhichOneof("result") == "error" and streamed.error.code == code.value[0]
        if code == INVALID and "images[" in message:
            assert message.startswith("images["), message  # names the offending image
    return code


@fuzz(1000)
@given(case=classify_requests())
def test_classify_requests_get_the_documented_status(api, bystander, case) -> None:
    kind, request, allowed = case
    code = check_classify(api, request, allowed)
    CASES[f"{kind} -> {code.name}"] += 1


# -- decompression bombs: small files whose header declares a huge image -------------------------------------
BOMBS = {
    "PNG": (2**31 - 1, lambda w, h, c: png_header_only(w, h, c)),
    "GIF": (2**16 - 1, lambda w, h, c: gif_header_only(w, h)),
    "BMP": (2**31 - 1, lambda w, h, c: bmp_header_only(w, h)),
    "JPEG": (2**16 - 1, lambda w, h, c: jpeg_header_only(w, h)),
}


@fuzz(400)
@given(data=st.data())
def test_decompression_bombs_are_refused_from_the_header(api, bystander, data) -> None:
    fmt = data.draw(st.sampled_from(sorted(BOMBS)))
    largest, build = BOMBS[fmt]
    width = data.draw(st.integers(MAX_PIXELS // largest + 1, largest))
    height = data.draw(st.integers(MAX_PIXELS // width + 1, largest))
    assert width * height > MAX_PIXELS
    bomb = build(width, height, data.draw(st.sampled_from(["L", "RGB", "RGBA"])))
    assert len(bomb) < 2048
    process = psutil.Process()
    before = process.memory_info().rss
    request = cpb.ClassifyRequest(
        model="mnist", images=[cpb.Image(pixels=bytes(PIXELS)), cpb.Image(encoded=bomb)]
    )
    code = check_classify(api, request, {INVALID})
    assert process.memory_info().rss - before < 64 * 2**20  # not one decoded row of a 2**31-wide image
    CASES[f"decompression bomb {fmt} -> {code.name}"] += 1


# -- names, strings and message sizes ------------------------------------------------------------------------
names = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["..", "../mnist", "/etc/passwd", "mnist/1", "mnist\x00", "MNIST", " mnist", ".", "-"]),
    st.integers(129, 20_000).map(lambda n: "a" * n),
)


@fuzz(200)
@given(name=names, version=st.text(max_size=100), request_id=st.text(max_size=2000))
def test_model_names_and_long_strings(api, bystander, name, version, request_id) -> None:
    if name == "mnist":
        return
    request = tensor_request([1, 1, 28, 28], raw=bytes(PIXELS), model=name, version=version)
    request.id = request_id
    code = check_kserve(api, request, {NOT_FOUND, INVALID})
    images = [cpb.Image(pixels=bytes(PIXELS))]
    check_classify(
        api,
        cpb.ClassifyRequest(model=name, version=version, images=images, id=request_id),
        {NOT_FOUND, INVALID},
    )
    for method, message_type in [
        (api.kserve.ModelMetadata, kpb.ModelMetadataRequest),
        (api.kserve.ModelConfig, kpb.ModelConfigRequest),
    ]:
        status, message, _ = unary(method, message_type(name=name, version=version))
        assert status in (NOT_FOUND, INVALID)
        assert_clear(status, message)
    assert not api.kserve.ModelReady(kpb.ModelReadyRequest(name=name, version=version), timeout=30).ready
    CASES[f"model name/strings -> {code.name}"] += 1


def sized(request, size: int):
    """request with its id padded so that the serialized message is exactly `size` bytes."""
    request.id = ""
    request.id = "x" * (size - request.ByteSize() - 5)  # the id field costs a tag byte + 4 length bytes
    assert request.ByteSize() == size
    return request


@pytest.mark.parametrize("api_name", ["kserve", "classify"])
def test_messages_at_and_above_the_size_limit(api, bystander, api_name) -> None:
    limit = LIMITS.max_message_bytes
    if api_name == "kserve":
        at = sized(tensor_request([1, 1, 28, 28], raw=bytes(PIXELS)), limit)
        above = sized(tensor_request([1, 1, 28, 28], raw=bytes(PIXELS)), limit + 1)
        method, stream = api.kserve.ModelInfer, api.kserve.ModelStreamInfer
    else:
        at = sized(cpb.ClassifyRequest(model="mnist", images=[cpb.Image(pixels=bytes(PIXELS))]), limit)
        above = sized(cpb.ClassifyRequest(model="mnist", images=[cpb.Image(pixels=bytes(PIXELS))]), limit + 1)
        method, stream = api.classifier.Classify, api.classifier.ClassifyStream
    code, _, reply = unary(method, at)
    assert code == OK and reply.id == at.id  # the limit itself is allowed, and the 16 MiB id is echoed
    code, message, _ = unary(method, above)
    assert code == EXHAUSTED and "larger than max" in message
    with pytest.raises(grpc.RpcError) as error:
        next(stream(iter([above]), timeout=60))
    assert error.value.code() == EXHAUSTED
    CASES[f"message at the size limit ({api_name}) -> OK"] += 1
    CASES[f"message 1 byte above the size limit ({api_name}) -> RESOURCE_EXHAUSTED"] += 1


def test_the_server_stayed_up_and_the_bystander_saw_no_error(api, bystander, server) -> None:
    errors, answered = bystander
    # Alone, this test runs with no other hostile traffic: the bystander's answers still must come.
    wait_for(lambda: len(answered) > 100 or errors, 60, "100 answers to the well-formed client")
    assert api.kserve.ServerLive(kpb.ServerLiveRequest(), timeout=30).live
    assert api.kserve.ServerReady(kpb.ServerReadyRequest(), timeout=30).ready
    assert errors == [] and len(answered) > 100
    assert sum(answered) / len(answered) > 0.8  # and its answers were right, not just well-formed
    assert server.metric("mnist_inflight_requests") <= 1  # nothing stuck: at most the bystander's call
    by_kind = Counter()
    for kind, count in CASES.items():
        by_kind[f"{kind.split(':')[0].split(' ->')[0]} -> {kind.rsplit('-> ', 1)[1]}"] += count
    total = sum(CASES.values())
    print(
        f"\nhostile inputs tried: {total} (each sent unary and on a stream); "
        f"bystander answered {len(answered)}"
    )
    for kind, count in sorted(by_kind.items()):
        print(f"{count:6d}  {kind}")
    print("in detail:")
    for kind, count in sorted(CASES.items()):
        print(f"{count:6d}  {kind}")
