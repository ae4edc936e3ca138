"""The HTTP/REST front end: the unmodified tritonclient.http client against the server (metadata, config,
inference with binary and JSON tensors, statistics, repository load/unload), the /v1 classify endpoint,
errors and their statuses, the token and TLS, metrics by protocol, and answers equal to gRPC's."""

import http.client
import io
import json
import ssl
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.http as triton
from google.protobuf import json_format
from PIL import Image
from test_serving_security import pki  # noqa: F401 - the certificates the gRPC tests use

from serving.cli import parse_args
from serving.config import HttpOptions
from serving.http.tensors import HEADER_LENGTH, decode_response, encode_request
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc, model_config_pb2
from serving.proto.mnist.v1 import classify_pb2

from helpers import assert_same_probabilities, metric_by, wait_for


def call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, tls=None
) -> tuple[int, dict, bytes]:
    """One HTTP request on its own connection: (status, headers, body)."""
    if tls is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=tls)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def error_of(status_headers_body: tuple[int, dict, bytes]) -> tuple[int, str]:
    """(status, message) of an error answer, which must be JSON {"error": "..."}."""
    status, headers, body = status_headers_body
    assert headers["Content-Type"].startswith("application/json"), headers
    return status, json.loads(body)["error"]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    return mnist.test_images[:16, None].copy(), mnist.test_labels[:16]


@pytest.fixture
def client(server):
    client = triton.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    yield client
    client.close()


def infer_message(images: np.ndarray) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(images.shape))
    return pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[images.tobytes()])


def grpc_infer(server, images: np.ndarray) -> np.ndarray:
    with server.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(infer_message(images), timeout=10)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(-1, 10)


def test_tritonclient_health_metadata_and_config_as_grpc_says(client, server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist") and client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("mnist", "9") and not client.is_model_ready("absent")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "mnist-serve"
    assert "onnxruntime_provider:CPUExecutionProvider" in metadata["extensions"]
    with server.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        grpc_metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
        grpc_config = stub.ModelConfig(pb.ModelConfigRequest(name="mnist")).config
    model = client.get_model_metadata("mnist")
    assert json_format.ParseDict(model, pb.ModelMetadataResponse()) == grpc_metadata
    assert client.get_model_metadata("mnist", "1") == model
    config = client.get_model_config("mnist")
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 28, 28]  # numbers, as Triton
    assert json_format.ParseDict(config, model_config_pb2.ModelConfig()) == grpc_config
    with pytest.raises(triton.InferenceServerException) as error:
        client.get_model_metadata("absent")
    assert error.value.status() == "404" and "absent" in error.value.message()


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_tritonclient_infer_equals_grpc(client, server, digits, datatype, binary_in, binary_out):
    images, labels = digits
    tensor = triton.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images.astype(np.float32 if datatype == "FP32" else np.uint8), binary_in)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary_out)
    result = client.infer("mnist", [tensor], outputs=[output], request_id="r-1")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("mnist", "1", "r-1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (16, 10)
    assert_same_probabilities(probabilities, grpc_infer(server, images))
    assert (probabilities.argmax(1) == labels).mean() >= 0.8


def test_tritonclient_defaults_compression_and_versions(client, server, digits) -> None:
    images = digits[0][:4]
    expected = grpc_infer(server, images)
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    for kwargs in ({}, {"request_compression_algorithm": "gzip"}, {"model_version": "1"}):
        result = client.infer("mnist", [tensor], **kwargs)  # no outputs named: all of them, binary
        assert_same_probabilities(result.as_numpy("probabilities"), expected)
    with pytest.raises(triton.InferenceServerException) as error:
        client.infer("mnist", [tensor], model_version="7")
    assert error.value.status() == "404"


def test_statistics_over_http_equal_grpc_and_count_http_requests(start_server, repo, digits) -> None:
    running = start_server(repo)
    client = triton.InferenceServerClient(f"127.0.0.1:{running.server.http_port}")
    try:
        for n in (1, 3, 5):
            tensor = triton.InferInput("images", [n, 1, 28, 28], "UINT8")
            tensor.set_data_from_numpy(digits[0][:n])
            client.infer("mnist", [tensor])
        with pytest.raises(triton.InferenceServerException):
            client.infer("mnist", [triton.InferInput("images", [2, 1, 28, 28], "UINT8")])  # no data
        http_stats = client.get_inference_statistics("mnist")
        assert (
            client.get_inference_statistics() == http_stats == client.get_inference_statistics("mnist", "1")
        )
    finally:
        client.close()
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        grpc_stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist"))
    assert json_format.ParseDict(http_stats, pb.ModelStatisticsResponse()) == grpc_stats
    (stats,) = http_stats["model_stats"]
    assert stats["inference_count"] == 9 and stats["inference_stats"]["success"]["count"] == 3
    assert stats["inference_stats"]["fail"]["count"] == 1
    assert running.metric("mnist_requests_total", api="kserve", protocol="http", status="OK") == 3
    assert (
        running.metric("mnist_requests_total", api="kserve", protocol="http", status="INVALID_ARGUMENT") == 1
    )
    assert running.metric("mnist_requests_total", protocol="grpc") == 0


def test_tritonclient_repository_index_unload_and_load(start_server, repo, digits) -> None:
    running = start_server(repo)
    client = triton.InferenceServerClient(f"127.0.0.1:{running.server.http_port}")
    tensor = triton.InferInput("images", [1, 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(digits[0][:1])
    try:
        assert client.get_model_repository_index() == [
            {"name": "mnist", "version": "1", "state": "READY", "reason": ""}
        ]
        client.unload_model("mnist")
        assert not client.is_model_ready("mnist") and not client.is_server_ready()
        assert client.get_model_repository_index() == [
            {"name": "mnist", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]
        with pytest.raises(triton.InferenceServerException) as error:
            client.infer("mnist", [tensor])
        assert error.value.status() == "404"
        client.load_model("mnist")
        assert client.is_model_ready("mnist") and client.is_server_ready()
        assert client.infer("mnist", [tensor]).as_numpy("probabilities").shape == (1, 10)
        for name, status in [("../mnist", "404"), ("bad..name", "400"), ("absent", "404")]:
            with pytest.raises(triton.InferenceServerException) as error:
                client.load_model(name)
            assert error.value.status() == status, (name, error.value.message())
        with pytest.raises(triton.InferenceServerException) as error:
            client.load_model("mnist", config='{"max_batch_size": 4}')
        assert error.value.status() == "400" and "not supported" in error.value.message()
    finally:
        client.close()


def test_raw_http_binary_and_json_requests(server, digits) -> None:
    images = digits[0][:3]
    expected = grpc_infer(server, images)
    port = server.server.http_port
    for binary in (True, False):
        body, headers = encode_request(images, binary=binary, binary_output=binary, request_id="x")
        status, answer_headers, answer = call(port, "POST", "/v2/models/mnist/infer", body, headers)
        assert status == 200, answer
        assert (HEADER_LENGTH in answer_headers) == binary
        assert "total;dur=" in answer_headers["Server-Timing"]
        assert_same_probabilities(decode_response(answer, answer_headers), expected)


@pytest.mark.parametrize(
    ("header", "status", "words"),
    [
        ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 783}]},
         400, "needs 784"),
        ({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]},
         400, "unknown input"),
        ({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]},
         400, "expected [N, 1, 28, 28]"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "INT64", "data": [0] * 784}]},
         400, "datatype"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [256] * 784}]},
         400, "0..255"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [-1.0] * 784}]},
         400, "0..255"),
        ({"inputs": [{"name": "images", "shape": [9999, 1, 28, 28], "datatype": "UINT8", "data": [0]}]},
         413, "above the limit of 1024"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": ["a"] * 784}]},
         400, "numbers"),
        ({"inputs": "images"}, 400, "inputs must be a JSON array"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8"}]}, 400, "no data"),
        ({"inputs": []}, 400, "expected exactly 1 input"),
        ({"inputs": [], "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
        ([1, 2], 400, "must be a JSON object"),
    ],
)  # fmt: skip
def test_infer_errors_are_json_with_their_status(server, header, status, words) -> None:
    answer = call(server.server.http_port, "POST", "/v2/models/mnist/infer", json.dumps(header).encode())
    got_status, message = error_of(answer)
    assert (got_status, words in message) == (status, True), message


def test_endpoint_errors(server) -> None:
    port = server.server.http_port
    assert error_of(call(port, "POST", "/v2/models/absent/infer", b"{}"))[0] == 404
    assert error_of(call(port, "GET", "/v2/models/mnist/versions/9"))[0] == 404
    status, message = error_of(call(port, "GET", "/v3/nothing"))
    assert status == 404 and "/v3/nothing" in message
    assert error_of(call(port, "GET", "/v2/models/mnist/infer"))[0] == 405
    assert error_of(call(port, "POST", "/v2/models/mnist/infer", b"{not json"))[0] == 400
    lying = {HEADER_LENGTH: "999", "Content-Type": "application/octet-stream"}
    status, message = error_of(call(port, "POST", "/v2/models/mnist/infer", b"{}", lying))
    assert status == 400 and HEADER_LENGTH in message


def grpc_classify(server, encoded: list[bytes], top_k: int) -> classify_pb2.ClassifyResponse:
    from serving.proto.mnist.v1 import classify_pb2_grpc

    request = classify_pb2.ClassifyRequest(
        model="mnist", top_k=top_k, images=[classify_pb2.Image(encoded=e) for e in encoded]
    )
    with server.channel() as channel:
        return classify_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=10)


def test_classify_one_image_body_as_curl_sends_it(server, digits) -> None:
    images, labels = digits[0][:, 0], digits[1]
    body = png(images[0])
    # curl --data-binary @seven.png sends application/x-www-form-urlencoded unless told otherwise
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, answer_headers, answer = call(
        server.server.http_port, "POST", "/v1/models/mnist/classify", body, headers
    )
    assert status == 200, answer
    result = json.loads(answer)
    (prediction,) = result["predictions"]
    assert (result["model"], result["version"], prediction["label"]) == ("mnist", "1", labels[0])  # a 7
    assert len(prediction["top_k"]) == 3 and len(prediction["probabilities"]) == 10
    assert "queue;dur=" in answer_headers["Server-Timing"] and "total;dur=" in answer_headers["Server-Timing"]
    (same,) = grpc_classify(server, [body], 3).predictions
    assert prediction["probabilities"] == list(same.probabilities)
    assert prediction["top_k"] == [{"label": t.label, "probability": t.probability} for t in same.top_k]


def test_classify_multipart_files_in_order(server, digits) -> None:
    images = digits[0][:, 0]
    encoded = [png(images[0]), jpeg(images[1]), png(images[2])]
    boundary = "mnist-boundary-7"
    parts = []
    for i, data in enumerate(encoded):
        name = f"digit{i}.{'jpg' if i == 1 else 'png'}"
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file{i}"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, answer = call(
        server.server.http_port, "POST", "/v1/models/mnist/versions/1/classify?top_k=10", body, headers
    )
    assert status == 200, answer
    predictions = json.loads(answer)["predictions"]
    assert [p["file"] for p in predictions] == ["digit0.png", "digit1.jpg", "digit2.png"]
    assert all(len(p["top_k"]) == 10 for p in predictions)
    same = grpc_classify(server, encoded, 10).predictions
    assert [p["label"] for p in predictions] == [p.label for p in same]
    assert [p["probabilities"] for p in predictions] == [list(p.probabilities) for p in same]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/models/mnist/classify", b"", 400, "no image"),
        ("/v1/models/mnist/classify", b"not an image", 400, "cannot identify image"),
        ("/v1/models/mnist/classify?top_k=11", b"x", 400, "top_k"),
        ("/v1/models/mnist/classify?timeout_ms=-5", b"x", 400, "timeout_ms"),
        ("/v1/models/absent/classify", b"x", 404, "absent"),
        ("/v1/models/mnist/classify", b"\0" * (4 * 1024 * 1024 + 1), 413, "limit of 4194304"),
    ],
)
def test_classify_errors(server, path, body, status, words) -> None:
    got_status, message = error_of(call(server.server.http_port, "POST", path, body))
    assert (got_status, words in message) == (status, True), message


def test_metrics_count_http_and_grpc_by_protocol(server, digits) -> None:
    def count(protocol: str) -> float:
        return server.metric("mnist_requests_total", api="kserve", protocol=protocol, status="OK")

    before = count("http"), count("grpc")
    body, headers = encode_request(digits[0][:1])
    for _ in range(3):
        assert call(server.server.http_port, "POST", "/v2/models/mnist/infer", body, headers)[0] == 200
    grpc_infer(server, digits[0][:1])
    assert (count("http"), count("grpc")) == (before[0] + 3, before[1] + 1)


def test_token_guards_everything_but_health_and_the_page(start_server, repo, tmp_path, digits) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    running = start_server(repo, auth_token_file=token_file)
    port = running.server.http_port
    assert call(port, "GET", "/v2/health/ready")[0] == 200
    assert call(port, "GET", "/")[0] == 200
    body, headers = encode_request(digits[0][:1])
    for wrong in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        answer = call(port, "POST", "/v2/models/mnist/infer", body, {**headers, **wrong})
        assert error_of(answer)[0] == 401 and answer[1]["WWW-Authenticate"].startswith("Bearer")
        assert error_of(call(port, "GET", "/v2/models/mnist", None, wrong))[0] == 401
    good = {"Authorization": "Bearer s3cret"}
    assert call(port, "POST", "/v2/models/mnist/infer", body, {**headers, **good})[0] == 200
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.get_model_metadata("mnist", headers=good)["name"] == "mnist"
    finally:
        client.close()


def test_tls_and_mutual_tls(start_server, repo, pki, digits) -> None:  # noqa: F811
    body, headers = encode_request(digits[0][:1])
    trusting = ssl.create_default_context(cafile=str(pki["ca"]))
    running = start_server(repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    port = running.server.http_port
    assert call(port, "POST", "/v2/models/mnist/infer", body, headers, tls=trusting)[0] == 200
    with pytest.raises(ssl.SSLError):
        call(port, "GET", "/v2", tls=ssl.create_default_context())  # a CA it does not trust
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        call(port, "GET", "/v2")  # plaintext to a TLS port
    mutual = start_server(
        repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    ).server.http_port
    with pytest.raises((ssl.SSLError, ConnectionError)):
        call(mutual, "GET", "/v2", tls=trusting)  # no client certificate
    rogue = ssl.create_default_context(cafile=str(pki["ca"]))
    rogue.load_cert_chain(pki["rogue_cert"], pki["rogue_key"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        call(mutual, "GET", "/v2", tls=rogue)  # a certificate from a CA it does not trust
    trusting.load_cert_chain(pki["client_cert"], pki["client_key"])
    assert call(mutual, "GET", "/v2", tls=trusting)[0] == 200


def test_http_off_and_flags(start_server, repo) -> None:
    assert start_server(repo, http=HttpOptions(http_port=-1)).server.http_port is None
    config = parse_args(["--http-port", "0", "--http-read-timeout", "2.5"])
    assert (config.http.http_port, config.http.http_read_timeout_seconds) == (0, 2.5)
    assert parse_args([]).http.http_port == 8000
    for bad in (["--http-port", "65536"], ["--http-port", "-2"], ["--http-read-timeout", "0"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2


def test_requests_in_flight_finish_on_shutdown(start_server, repo, digits) -> None:
    running = start_server(repo, max_queue_delay_us=2_000_000)  # a batch waits up to 2 s for more
    port = running.server.http_port
    body, headers = encode_request(digits[0][:1])
    answers = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(call(port, "POST", "/v2/models/mnist/infer", body, headers))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    queued = 'mnist_queue_depth{model="mnist"}'
    wait_for(lambda: running.metric("mnist_queue_depth", model="mnist") == 4, what=f"{queued} == 4")
    running.stop()
    for thread in threads:
        thread.join(10)
    assert [a[0] for a in answers] == [200] * 4
    with pytest.raises(ConnectionError):
        call(port, "GET", "/v2/health/live")


def test_http_and_grpc_share_the_request_limit(start_server, repo, mnist) -> None:
    # A batch starts only when 4 images wait (or after 10 s): the requests sent first stay in progress.
    running = start_server(repo, max_concurrent_rpcs=3, max_batch_size=4, max_queue_delay_us=10_000_000)
    port, images = running.server.http_port, mnist.test_images[:4].reshape(-1, 1, 28, 28)
    body, headers = encode_request(images[:1])
    held_http = []
    waiting = threading.Thread(
        target=lambda: held_http.append(call(port, "POST", "/v2/models/mnist/infer", body, headers))
    )
    waiting.start()
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        one = infer_message(images[1:2])
        held_grpc = [stub.ModelInfer.future(one, timeout=60) for _ in range(2)]
        wait_for(lambda: running.metric("mnist_inflight_requests") == 3, what="3 requests in progress")
        for answer in (
            call(port, "POST", "/v2/models/mnist/infer", body, headers),
            call(port, "POST", "/v1/models/mnist/classify", png(images[0, 0])),
        ):
            status, message = error_of(answer)
            assert status == 429 and "server full" in message and answer[1]["Retry-After"] == "1", message
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(one, timeout=10)
        assert (
            error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "server full" in error.value.details()
        )
        assert not held_http and not any(f.done() for f in held_grpc)  # refused at once, not after waiting
        for f in held_grpc:
            f.cancel()
        wait_for(lambda: running.metric("mnist_inflight_requests") == 1, what="the cancelled calls gone")
        assert (
            len(stub.ModelInfer(infer_message(images[1:]), timeout=30).raw_output_contents[0]) == 3 * 10 * 4
        )
    waiting.join(30)
    assert held_http[0][0] == 200  # the HTTP request held at the limit is answered once its batch runs
    refused = {
        (protocol, api): running.metric(
            "mnist_requests_total", model="mnist", api=api, status="RESOURCE_EXHAUSTED", protocol=protocol
        )
        for protocol in ("http", "grpc")
        for api in ("kserve", "classify")
    }
    assert refused == {
        ("http", "kserve"): 1,
        ("http", "classify"): 1,
        ("grpc", "kserve"): 1,
        ("grpc", "classify"): 0,
    }


def test_full_queue_is_429_and_an_expired_deadline_504(start_server, repo, mnist) -> None:
    # A batch forms only when 256 images are queued (or after 10 s): requests wait until the test fills it.
    running = start_server(repo, max_batch_size=256, max_queue_images=256, max_queue_delay_us=10_000_000)
    port, images = running.server.http_port, mnist.test_images[:355].reshape(-1, 1, 28, 28)

    def infer(batch: np.ndarray, timeout_us: int = 0) -> tuple[int, dict, bytes]:
        body, headers = encode_request(batch)
        if timeout_us:
            header_length = int(headers[HEADER_LENGTH])
            header = json.loads(body[:header_length]) | {"parameters": {"timeout": timeout_us}}
            text = json.dumps(header).encode()
            body, headers = text + body[header_length:], {**headers, HEADER_LENGTH: str(len(text))}
        return call(port, "POST", "/v2/models/mnist/infer", body, headers)

    first = []
    waiting = threading.Thread(target=lambda: first.append(infer(images[:200])))
    waiting.start()
    wait_for(lambda: running.metric("mnist_queue_depth", model="mnist") == 200)
    answer = infer(images[200:300])
    assert error_of(answer)[0] == 429 and "queue full" in error_of(answer)[1]
    assert answer[1]["Retry-After"] == "1" and not first  # refused at once
    began = time.monotonic()
    status, message = error_of(infer(images[:1], timeout_us=200_000))  # expires while queued
    assert status == 504 and not first, message
    seven = png(images[0, 0])
    status, message = error_of(call(port, "POST", "/v1/models/mnist/classify?timeout_ms=200", seven))
    assert status == 504 and not first, message
    assert time.monotonic() - began < 5  # answered at the deadline, not when the batch ran (10 s)
    assert infer(images[300:354])[0] == 200  # 200 + 1 + 1 + 54 = 256: a full batch
    waiting.join(30)
    assert first[0][0] == 200
    assert running.metric("mnist_requests_dropped_total", reason="deadline_expired") == 2
    assert running.metric("mnist_requests_total", protocol="http", status="RESOURCE_EXHAUSTED") == 1


def test_the_http_port_reaches_every_worker_and_one_repository_state(trained_repo, tmp_path, digits) -> None:
    from serving.bench.loadgen import Connection
    from serving.bench.spawn import Spawned, serve_command

    served = Spawned.mnist_serve(
        serve_command(), trained_repo, ["--device", "cpu", "--workers", "2"], tmp_path / "server.log"
    )
    try:
        served.wait_serving(Connection((served.target,)))
        wait_for(lambda: "event=ready" in served.log_path.read_text(), 60, "the supervisor's ready line")
        assert f"http=127.0.0.1:{served.http_port}" in served.log_path.read_text()
        body, headers = encode_request(digits[0][:1])
        for _ in range(40):  # each on a new connection, which the kernel hands to either worker
            assert call(served.http_port, "POST", "/v2/models/mnist/infer", body, headers)[0] == 200
        by_worker = metric_by(served.metrics_url, "mnist_requests_total", "worker", protocol="http")
        assert sum(by_worker.values()) == 40 and set(by_worker) == {"0", "1"}, by_worker
        assert call(served.http_port, "POST", "/v2/repository/models/mnist/unload")[0] == 200
        assert {call(served.http_port, "GET", "/v2/models/mnist/ready")[0] for _ in range(20)} == {400}
        assert call(served.http_port, "POST", "/v2/repository/models/mnist/load")[0] == 200
        assert {call(served.http_port, "GET", "/v2/models/mnist/ready")[0] for _ in range(20)} == {200}
    finally:
        assert served.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_http_port_is_one_error_line(trained_repo, workers) -> None:
    import socket
    import subprocess

    from serving.bench.spawn import free_port, serve_command

    taken = socket.create_server(("127.0.0.1", 0))
    http_port = taken.getsockname()[1]
    try:
        args = ["--repo", str(trained_repo), "--host", "127.0.0.1", "--port", str(free_port())]
        args += ["--metrics-port", "-1", "--http-port", str(http_port), "--workers", workers]
        done = subprocess.run(
            [*serve_command(), *args, "--device", "cpu"], capture_output=True, text=True, timeout=120
        )
    finally:
        taken.close()
    errors = [line for line in done.stderr.splitlines() if line.startswith("mnist-serve: error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(http_port) in errors[0], errors[0]
