"""Hostile HTTP input: random and malformed bodies, wrong shapes and datatypes, lying
Inference-Header-Content-Length, huge, compressed and slow bodies, a full server, more clients than it holds.
Each gets its documented status with a JSON error, and the server keeps serving."""

import contextlib
import gzip
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_http_api import call, error_of, png

from serving.config import HttpOptions
from serving.errors import RequestError
from serving.http.tensors import HEADER_LENGTH, encode_request, infer_request

from helpers import examples, jpeg_header_only, png_header_only, wait_for

MAX_BODY = 256 * 1024
MAX_IMAGES = 8
READ_TIMEOUT = 1.0
EXAMPLES = settings(
    max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ERROR_STATUSES = {400, 404, 413}


@pytest.fixture(scope="module")
def port(trained_repo: Path):
    from conftest import RunningServer, local_config

    running = RunningServer(
        local_config(
            trained_repo,
            max_message_bytes=MAX_BODY,
            max_images_per_request=MAX_IMAGES,
            max_concurrent_rpcs=2,
            max_pending_rpcs=1,
            http=HttpOptions(http_port=0, http_read_timeout_seconds=READ_TIMEOUT),
        )
    )
    yield running.server.http_port
    running.stop()


def still_serving(port: int) -> None:
    body, headers = encode_request(np.zeros((1, 1, 28, 28), np.uint8))
    assert call(port, "POST", "/v2/models/mnist/infer", body, headers)[0] == 200


def refused(answer: tuple[int, dict, bytes], statuses: set[int] = ERROR_STATUSES) -> int:
    status, message = error_of(answer)
    assert status in statuses and message, (status, message)
    return status


header_values = st.one_of(
    st.none(),
    st.integers(-3, 5000).map(str),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12),
)


@EXAMPLES
@given(body=st.binary(max_size=3000), header_length=header_values)
def test_random_bodies_are_400(port, body, header_length) -> None:
    headers = {} if header_length is None else {HEADER_LENGTH: header_length}
    refused(call(port, "POST", "/v2/models/mnist/infer", body, headers), {400})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@EXAMPLES
@given(header=json_values | st.fixed_dictionaries({"inputs": json_values, "outputs": json_values}))
def test_any_json_that_is_no_inference_request_is_400(port, header) -> None:
    refused(call(port, "POST", "/v2/models/mnist/infer", json.dumps(header).encode()), {400})


@EXAMPLES
@given(
    name=st.sampled_from(["images", "image", ""]),
    datatype=st.sampled_from(["UINT8", "FP32", "INT8", "BYTES", "uint8"]),
    shape=st.one_of(
        st.lists(st.integers(0, 2**40), max_size=6),
        st.tuples(st.integers(0, 12), st.just(1), st.just(28), st.just(28)).map(list),
    ),
    extra_bytes=st.sampled_from([0, 0, 0, -1, 1, 784]),
    lie=st.sampled_from([0, 0, 0, -1, 1, 10**6]),
)
@example(name="images", datatype="FP32", shape=[2, 1, 28, 28], extra_bytes=0, lie=0)  # always one valid
def test_tensors_get_200_exactly_when_valid(port, name, datatype, shape, extra_bytes, lie) -> None:
    """Any name, datatype and shape, with binary data of about the right size and a header length that may
    lie: the answer is 200 only for a valid request, else its documented status."""
    width = {"UINT8": 1, "FP32": 4}.get(datatype, 1)
    images = shape[0] if len(shape) == 4 and shape[1:] == [1, 28, 28] else 1
    size = max(0, min(images, MAX_IMAGES + 1) * 784 * width + extra_bytes)
    header = {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                          "parameters": {"binary_data_size": size}}]}  # fmt: skip
    text = json.dumps(header).encode()
    headers = {HEADER_LENGTH: str(len(text) + lie)}
    answer = call(port, "POST", "/v2/models/mnist/infer", text + bytes(size), headers)
    valid_shape = len(shape) == 4 and shape[1:] == [1, 28, 28] and shape[0] >= 1
    if lie:
        expected = 400
    elif valid_shape and shape[0] > MAX_IMAGES:
        expected = 413
    elif name == "images" and datatype in ("UINT8", "FP32") and valid_shape and extra_bytes == 0:
        expected = 200
    else:
        expected = 400
    if expected == 200:
        assert answer[0] == 200, answer[2][:300]
        length = int(answer[1].get(HEADER_LENGTH, len(answer[2])))  # outputs are JSON unless asked binary
        assert json.loads(answer[2][:length])["outputs"][0]["shape"] == [shape[0], 10]
    else:
        assert refused(answer) == expected, (expected, answer[2][:300])


pixel_like = st.integers(-2, 257) | st.booleans() | st.floats(-1, 256, allow_nan=False) | st.text(max_size=2)


@settings(max_examples=examples(400), deadline=None)
@given(
    data=st.lists(pixel_like, min_size=1, max_size=12)
    | st.lists(st.integers(0, 255), min_size=1, max_size=12)
    | st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=3), min_size=1, max_size=3)
)
def test_json_pixels_are_read_as_numpy_reads_them(data) -> None:
    """Flat pixel lists take a faster way than NumPy; what it accepts, and the bytes, are NumPy's: integers
    within 0..255, evenly nested; floats, strings and a tensor of booleans alone refused."""
    header = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": data}]}
    try:
        got = infer_request("mnist", "", header, memoryview(b""))[0].raw_input_contents[0]
    except RequestError:
        got = None
    try:
        values = np.asarray(data)
    except ValueError:  # ragged
        values = np.asarray([1.5])
    in_range = values.dtype.kind in "iu" and values.min() >= 0 and values.max() <= 255
    assert got == (values.astype(np.uint8).tobytes() if in_range else None)


def test_json_nested_past_any_reason_is_400(port) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs": ' * 20_000):
        refused(call(port, "POST", "/v2/models/mnist/infer", body), {400})
    still_serving(port)


def raw(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send a request by hand (head without the blank line) from a thread, as a client that goes on sending
    whatever the server answers, and return the server's first response (head and body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        sender = threading.Thread(target=send_quietly, args=(s, head.encode() + b"\r\n\r\n" + body))
        sender.start()
        try:
            return read_response(s)
        finally:
            s.shutdown(socket.SHUT_RDWR)
            sender.join(timeout)


def send_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server may close the connection first
        s.sendall(data)


def read_response(s: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        received += s.recv(65536) or b"(closed)"
        assert not received.endswith(b"(closed)"), received
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_a_declared_huge_body_is_413_before_it_is_sent(port) -> None:
    head = f"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {2**40}"
    began = time.monotonic()
    answer = raw(port, head, b"{", timeout=5)
    assert status_of(answer) == 413 and b"above the limit" in answer
    assert time.monotonic() - began < 3  # answered at once, and the connection closed
    still_serving(port)


def test_a_chunked_body_past_the_limit_is_413(port) -> None:
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 2))
    head = "POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
    answer = raw(port, head, body + b"0\r\n\r\n")
    assert status_of(answer) == 413
    still_serving(port)


def test_a_compression_bomb_is_413(port) -> None:
    bomb = gzip.compress(b"\0" * (64 * MAX_BODY))  # a few KB that inflate to 64 times the limit
    assert len(bomb) < MAX_BODY
    answer = call(port, "POST", "/v2/models/mnist/infer", bomb, {"Content-Encoding": "gzip"})
    assert refused(answer, {413}) == 413
    image = gzip.compress(b"\0" * (64 * 1024 * 1024))  # the same for one image of /v1 classify
    answer = call(port, "POST", "/v1/models/mnist/classify", image, {"Content-Encoding": "gzip"})
    assert refused(answer, {413}) == 413
    still_serving(port)


def test_a_slow_body_is_408(port) -> None:
    head = "POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000"
    began = time.monotonic()
    answer = raw(port, head, b'{"inputs": [', timeout=READ_TIMEOUT + 10)  # and nothing more
    assert status_of(answer) == 408 and b"not received within" in answer
    assert READ_TIMEOUT <= time.monotonic() - began < READ_TIMEOUT + 5
    still_serving(port)


def test_a_full_server_is_429_and_more_clients_than_it_holds_get_503_at_once(port) -> None:
    """Two classify requests in progress fill this server (--max-concurrent-rpcs 2): another is refused at
    once with 429. Requests of any endpoint held at once are bounded by that plus --max-pending-rpcs (1):
    with a repository request held as well, a fourth request is refused at once with 503, unread."""
    stalled_head = "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        for s in stalled[:2]:
            s.sendall(stalled_head.format("/v1/models/mnist/classify").encode() + b"\x89PNG")
        digit = png(np.zeros((28, 28), np.uint8))
        wait_for(
            lambda: call(port, "POST", "/v1/models/mnist/classify", digit)[0] == 429, what="a full server"
        )
        answer = call(port, "POST", "/v1/models/mnist/classify", digit)
        assert refused(answer, {429}) == 429 and "server full" in error_of(answer)[1]
        assert answer[1]["Retry-After"] == "1"
        assert call(port, "GET", "/v2/models/mnist")[0] == 200  # metadata is no inference: not refused
        stalled[2].sendall(stalled_head.format("/v2/repository/index").encode() + b"{")
        wait_for(lambda: call(port, "GET", "/v2/models/mnist")[0] == 503, what="the three to be held")
        answer = call(port, "GET", "/v2/models/mnist")
        assert refused(answer, {503}) == 503 and answer[1]["Retry-After"] == "1"
        answers = [read_response(s) for s in stalled]
        assert sorted(status_of(a) for a in answers) == [408, 408, 408]
    finally:
        for s in stalled:
            s.close()
    wait_for(lambda: call(port, "GET", "/v2/models/mnist")[0] == 200, what="requests to be taken again")
    still_serving(port)


def test_image_decompression_bombs_to_classify_are_400(port) -> None:
    for bomb in (
        png_header_only(5000, 5000, "L"),
        jpeg_header_only(5000, 5000),
    ):  # over 4096², under Pillow's own limit
        assert len(bomb) < 2048
        status, message = error_of(call(port, "POST", "/v1/models/mnist/classify?top_k=1", bomb))
        assert status == 400 and "above the limit" in message, message
    still_serving(port)
