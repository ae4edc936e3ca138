"""Every bad request gets the right status and a helpful message (the documented wording, case by case),
and the server's admission limits refuse at once. A well-formed client beside hostile requests, the
message size limit and decompression bombs of every format: test_reliability_hostile_input.py."""

import queue
import time

import grpc
import numpy as np
import pytest

from serving.proto.inference import grpc_service_pb2 as kpb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2 as cpb
from serving.proto.mnist.v1 import classify_pb2_grpc

from helpers import png_header_only, wait_for

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
ONE = np.zeros((1, 1, 28, 28), np.uint8)


def tensor_request(
    shape, datatype="UINT8", payload=None, name="images", model="mnist", version=""
) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    request = kpb.ModelInferRequest(model_name=model, model_version=version, inputs=[tensor])
    request.raw_input_contents.append(ONE.tobytes() if payload is None else payload)
    return request


KSERVE_CASES = {
    "wrong shape": (tensor_request([1, 28, 28]), INVALID, "expected [N, 1, 28, 28]"),
    "wrong datatype": (tensor_request([1, 1, 28, 28], "INT64"), INVALID, "expected UINT8"),
    "byte length": (tensor_request([2, 1, 28, 28]), INVALID, "needs 1568"),
    "fp32 length": (tensor_request([1, 1, 28, 28], "FP32"), INVALID, "needs 3136"),
    "fp32 out of range": (
        tensor_request([1, 1, 28, 28], "FP32", np.full(784, np.nan, "<f4").tobytes()),
        INVALID,
        "0..255",
    ),
    "wrong input name": (tensor_request([1, 1, 28, 28], name="pixels"), INVALID, "only input is 'images'"),
    "empty request": (kpb.ModelInferRequest(model_name="mnist"), INVALID, "expected exactly 1 input"),
    "unknown model": (tensor_request([1, 1, 28, 28], model="resnet"), NOT_FOUND, "loaded models: mnist"),
    "unknown version": (tensor_request([1, 1, 28, 28], version="7"), NOT_FOUND, "available: 1"),
    "escaping name": (tensor_request([1, 1, 28, 28], model="../etc"), INVALID, "invalid model name"),
    "too many images": (tensor_request([5000, 1, 28, 28], payload=b""), EXHAUSTED, "limit of 1024"),
    "huge declared shape": (tensor_request([2**40, 1, 28, 28], payload=b""), EXHAUSTED, "limit of 1024"),
}

CLASSIFY_CASES = {
    "undecodable image": (
        cpb.ClassifyRequest(model="mnist", images=[cpb.Image(encoded=b"GIF89a..")]),
        INVALID,
        "cannot",
    ),
    "decompression bomb": (
        cpb.ClassifyRequest(model="mnist", images=[cpb.Image(encoded=png_header_only(20000, 20000, "L"))]),
        INVALID,
        "pixels",
    ),
    "short pixels": (
        cpb.ClassifyRequest(model="mnist", images=[cpb.Image(pixels=b"\0" * 783)]),
        INVALID,
        "expected 784",
    ),
    "empty image": (cpb.ClassifyRequest(model="mnist", images=[cpb.Image()]), INVALID, "images[0] is empty"),
    "no images": (cpb.ClassifyRequest(model="mnist"), INVALID, "at least one"),
    "bad top_k": (
        cpb.ClassifyRequest(model="mnist", top_k=11, images=[cpb.Image(pixels=bytes(784))]),
        INVALID,
        "1..10",
    ),
    "unknown model": (
        cpb.ClassifyRequest(model="lenet", images=[cpb.Image(pixels=bytes(784))]),
        NOT_FOUND,
        "lenet",
    ),
    "too many images": (
        cpb.ClassifyRequest(model="mnist", images=[cpb.Image(pixels=bytes(784))] * 1025),
        EXHAUSTED,
        "limit of 1024",
    ),
}


@pytest.mark.parametrize("case", KSERVE_CASES)
def test_kserve_errors(server, case) -> None:
    request, code, fragment = KSERVE_CASES[case]
    with server.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=10)
        assert error.value.code() == code
        assert fragment in error.value.details()
        response = next(stub.ModelStreamInfer(iter([request]), timeout=10))
        assert response.error_message.startswith(code.name) and fragment in response.error_message
        assert stub.ServerLive(kpb.ServerLiveRequest()).live


@pytest.mark.parametrize("case", CLASSIFY_CASES)
def test_classify_errors(server, case) -> None:
    request, code, fragment = CLASSIFY_CASES[case]
    with server.channel() as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(request, timeout=10)
        assert error.value.code() == code
        assert fragment in error.value.details()
        response = next(stub.ClassifyStream(iter([request]), timeout=10))
        assert response.error.code == code.value[0] and fragment in response.error.message


def test_a_full_server_refuses_at_once_with_resource_exhausted(start_server, repo) -> None:
    # Three requests held in the queue (a batch starts only when 4 images wait, or after 10 s) fill a
    # server that handles at most 3 requests at once.
    running = start_server(repo, max_concurrent_rpcs=3, max_batch_size=4, max_queue_delay_us=10_000_000)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        held = [stub.ModelInfer.future(tensor_request([1, 1, 28, 28]), timeout=60) for _ in range(3)]
        wait_for(lambda: running.metric("mnist_inflight_requests") == 3, what="3 requests in progress")
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(tensor_request([1, 1, 28, 28]), timeout=10)
        assert error.value.code() == EXHAUSTED and "server full" in error.value.details()
        streamed = next(stub.ModelStreamInfer(iter([tensor_request([1, 1, 28, 28])]), timeout=10))
        assert streamed.error_message.startswith("RESOURCE_EXHAUSTED: server full")
        assert not any(f.done() for f in held)  # refused at once, not after waiting for room
        for f in held:
            f.cancel()
        wait_for(lambda: running.metric("mnist_inflight_requests") == 0, what="the cancelled calls gone")
        full_batch = tensor_request([4, 1, 28, 28], payload=np.zeros((4, 1, 28, 28), np.uint8).tobytes())
        assert len(stub.ModelInfer(full_batch, timeout=30).raw_output_contents[0]) == 4 * 10 * 4
    refused = running.metric("mnist_requests_total", model="mnist", api="kserve", status="RESOURCE_EXHAUSTED")
    assert refused == 2  # the server counts what it refused


def test_idle_streams_hold_no_share_of_the_request_limit(start_server, repo) -> None:
    running = start_server(repo, max_concurrent_rpcs=32, max_streams=40)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        outboxes = [Outbox() for _ in range(40)]
        streams = [stub.ModelStreamInfer(iter(outbox), timeout=60) for outbox in outboxes]
        wait_for(lambda: len(running.server.streams) == 40, what="40 open streams")
        for _ in range(5):  # 40 idle streams against a limit of 32 requests: unary calls still get answers
            assert stub.ModelInfer(tensor_request([1, 1, 28, 28]), timeout=10).raw_output_contents
        with pytest.raises(grpc.RpcError) as error:  # a stream beyond --max-streams is refused at once
            next(stub.ModelStreamInfer(iter(()), timeout=10))
        assert error.value.code() == EXHAUSTED and "streams open" in error.value.details()
        outboxes[0].put(tensor_request([1, 1, 28, 28]))  # and every open stream still answers
        assert next(streams[0]).infer_response.raw_output_contents
        for outbox in outboxes:
            outbox.close()
        assert all(list(stream) == [] for stream in streams[1:])


def test_a_stream_left_idle_is_ended_with_deadline_exceeded(start_server, repo) -> None:
    running = start_server(repo, stream_idle_seconds=1.0)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        idle, busy = Outbox(), Outbox()
        idle_stream = stub.ModelStreamInfer(iter(idle), timeout=60)
        busy_stream = stub.ModelStreamInfer(iter(busy), timeout=60)
        for _ in range(6):  # a stream that keeps asking, for longer than the idle timeout, stays open
            busy.put(tensor_request([1, 1, 28, 28]))
            assert next(busy_stream).infer_response.raw_output_contents
            time.sleep(0.4)
        with pytest.raises(grpc.RpcError) as error:  # meanwhile the idle one was ended
            next(idle_stream)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--stream-idle-timeout" in error.value.details()
        busy.close()
        assert list(busy_stream) == []
        idle.close()


class Outbox:
    """A request iterator for a stream that the test feeds one request at a time; close() ends it."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def put(self, request) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while (request := self._queue.get()) is not None:
            yield request
