"""Faults: clients that cancel, break streams and connections or let deadlines pass
while queued; SIGTERM under load to a real `mnist-serve`; corrupt and contract-breaking model files.

Requests are counted, not timed: every request sent is either answered or cleanly refused, and what is
dropped before compute shows in mnist_requests_dropped_total while the batch histogram stays still.
"""

import logging
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from onnx import TensorProto

from serving.bench.loadgen import Connection
from serving.bench.spawn import Spawned, serve_command
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2 as cpb
from serving.proto.mnist.v1 import classify_pb2_grpc

import helpers
from helpers import add_model, infer_request, linear_model, server_processes, wait_for

GATE = 21  # images that start a batch (or 10 s): requests sit in the queue until the test fills it


def classify_request(n: int = 1) -> cpb.ClassifyRequest:
    return cpb.ClassifyRequest(model="mnist", images=[cpb.Image(pixels=bytes(784))] * n)


@pytest.fixture
def gated(start_server, repo):
    """A server whose batches start only once GATE images are queued (or after 10 s, a failure here): the
    test holds requests in the queue for as long as it needs, then fills the batch to release them."""
    return start_server(repo, max_batch_size=GATE, max_queue_delay_us=10_000_000)


def computed_batches(running) -> float:
    return running.metric("mnist_batch_size_count", model="mnist")


def computed_images(running) -> float:
    return running.metric("mnist_batch_size_sum", model="mnist")


def dropped(running, reason: str) -> float:
    return running.metric("mnist_requests_dropped_total", model="mnist", reason=reason)


def images(n: int) -> np.ndarray:
    return np.zeros((n, 1, 28, 28), np.uint8)


# -- client faults ---------------------------------------------------------------------------------------
def test_cancelled_calls_are_dropped_before_compute(gated) -> None:
    running = gated
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(infer_request(), timeout=60) for _ in range(20)]
        wait_for(lambda: running.metric("mnist_queue_depth", model="mnist") == 20)
        for call in calls:
            assert call.cancel()
        wait_for(lambda: running.metric("mnist_inflight_requests") == 0, what="the cancelled calls gone")
        assert computed_batches(running) == 0  # still queued: cancelled, not computed
        # One image fills the batch: the 20 cancelled requests are dropped, only this one is computed.
        assert stub.ModelInfer(infer_request(), timeout=30).model_name == "mnist"
    assert dropped(running, "cancelled") == 20 and dropped(running, "deadline_expired") == 0
    assert (computed_batches(running), computed_images(running)) == (1, 1)  # none reached ONNX Runtime
    assert running.metric("mnist_queue_depth", model="mnist") == 0
    wait_for(lambda: running.metric("mnist_inflight_requests") == 0)


def test_deadlines_that_expire_while_queued_are_dropped_before_compute(gated) -> None:
    running = gated
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # Deadlines long enough for every request to reach the queue on a loaded machine; the batch they
        # wait for starts only when the test fills it, after they have all expired.
        calls = [stub.ModelInfer.future(infer_request(), timeout=3) for _ in range(20)]
        sent = time.monotonic()
        wait_for(lambda: running.metric("mnist_queue_depth", model="mnist") == 20, what="20 queued requests")
        codes = [call.exception().code() for call in calls]
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 20
        wait_for(lambda: running.metric("mnist_inflight_requests") == 0, what="the expired calls gone")
        # The client's deadline ends each call first; the server's own (its clock, from the grpc-timeout it
        # received) ends a moment later. Past both, the queue can only say the deadline expired.
        time.sleep(max(0.0, sent + 3 + 0.5 - time.monotonic()))
        assert computed_batches(running) == 0
        assert stub.ModelInfer(infer_request(), timeout=30).model_name == "mnist"  # fills the batch
    assert dropped(running, "deadline_expired") == 20 and dropped(running, "cancelled") == 0
    assert (computed_batches(running), computed_images(running)) == (1, 1)
    wait_for(lambda: running.metric("mnist_inflight_requests") == 0)


def test_streams_broken_mid_request_are_cleaned_up(gated) -> None:
    """Streams of both APIs cancelled while their request waits in the queue, and a stream whose client
    stops writing mid-way and goes away: nothing leaks (in-flight gauge, queue), nothing is computed."""
    running = gated
    with running.channel() as channel:
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        classifier = classify_pb2_grpc.ClassifierStub(channel)
        streams = [kserve.ModelStreamInfer(iter([infer_request()] * 3), timeout=60) for _ in range(3)]
        streams += [classifier.ClassifyStream(iter([classify_request()] * 3), timeout=60) for _ in range(3)]
        wait_for(lambda: running.metric("mnist_queue_depth", model="mnist") == 18)  # streams are pipelined
        for stream in streams:
            stream.cancel()
        wait_for(lambda: running.metric("mnist_inflight_requests") == 0)
        assert computed_batches(running) == 0
        stalled: queue.SimpleQueue = queue.SimpleQueue()  # writes one request, then nothing, then leaves
        stalled.put(classify_request(GATE - 18))  # fills the batch: the 18 cancelled ones are dropped
        stream = classifier.ClassifyStream(iter(stalled.get, None), timeout=60)
        assert next(stream).WhichOneof("result") == "response"
        assert dropped(running, "cancelled") == 18
        assert (computed_batches(running), computed_images(running)) == (1, GATE - 18)
        stream.cancel()
        assert kserve.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        assert kserve.ModelInfer(infer_request(images(GATE)), timeout=30).model_name == "mnist"
    wait_for(lambda: running.metric("mnist_inflight_requests") == 0)
    assert running.metric("mnist_queue_depth", model="mnist") == 0


def http2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_call_headers(path: str) -> bytes:
    """HPACK 'literal header field without indexing, new name' for each header: no tables, no Huffman."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost")]
    headers += [("content-type", "application/grpc"), ("te", "trailers")]
    block = b""
    for name, value in headers:
        block += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return block


@pytest.mark.parametrize(
    "declared, sent",
    [(1_000_000, 100), (2**32 - 1, 100), (16, 0)],
    ids=["1MB-declared-100B-sent", "4GiB-declared", "headers-only"],
)
def test_connections_dropped_mid_message_are_survived(server, declared: int, sent: int) -> None:
    """A raw HTTP/2 client opens a Classify call, sends a gRPC message prefix declaring `declared`
    bytes, `sent` bytes of it, and drops the connection. The server must neither wait for nor
    allocate the declared size, and keeps serving."""
    host, port = server.target.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + http2_frame(4, 0, 0, b""))
        raw.sendall(http2_frame(1, 0x4, 1, grpc_call_headers("/mnist.v1.Classifier/Classify")))
        if sent:
            raw.sendall(http2_frame(0, 0, 1, b"\x00" + struct.pack(">I", declared) + bytes(sent)))
    with server.channel() as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        assert stub.Classify(classify_request(), timeout=30).predictions[0].label in range(10)
    wait_for(lambda: server.metric("mnist_inflight_requests") == 0)


def test_a_request_larger_than_the_queue_is_not_told_to_retry(start_server, repo) -> None:
    """With --max-queue-images below --max-images-per-request, a 300-image request can never be queued:
    "queue full; retry later" (defect 7 in docs/reliability.md) would have the client retry forever."""
    running = start_server(repo, max_queue_images=256)
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[300, 1, 28, 28])
    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor], raw_input_contents=[bytes(300 * 784)])
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "256" in error.value.details() and "retry" not in error.value.details()
        request.inputs[0].shape[0] = 256
        request.raw_input_contents[0] = bytes(256 * 784)
        assert (
            len(np.frombuffer(stub.ModelInfer(request, timeout=30).raw_output_contents[0], np.float32))
            == 2560
        )


# -- SIGTERM under load ----------------------------------------------------------------------------------
class Tally:
    """Outcome of every request the clients sent, by kind."""

    def __init__(self) -> None:
        self.lock, self.counts, self.details = threading.Lock(), Counter(), Counter()

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if detail:
                self.details[f"{outcome}: {detail[:80]}"] += 1


def unary_client(target: str, stop: threading.Event, tally: Tally) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            try:
                stub.ModelInfer(infer_request(), timeout=30)
                tally.add("answered")
            except grpc.RpcError as e:
                tally.add(f"unary {e.code().name}", e.details() or "")
                time.sleep(0.02)


def stream_client(target: str, stop: threading.Event, tally: Tally) -> None:
    """Lock-step on one stream (one request outstanding), reopening it when it ends."""
    with grpc.insecure_channel(target) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        while not stop.is_set():
            requests: queue.SimpleQueue = queue.SimpleQueue()
            responses = stub.ClassifyStream(iter(requests.get, None), timeout=60)
            try:
                while not stop.is_set():
                    requests.put(classify_request())
                    reply = next(responses)
                    tally.add("answered" if reply.WhichOneof("result") == "response" else "stream error")
            except StopIteration:  # the server ended the stream with OK before reading the request
                tally.add("refused: stream ended before it was read")
            except grpc.RpcError as e:
                tally.add(f"stream {e.code().name}", e.details() or "")
                time.sleep(0.02)
            finally:
                requests.put(None)


REFUSED = {
    # The port is closed: never reached the server.
    "unary UNAVAILABLE",
    "stream UNAVAILABLE",
    # grpc core answers CANCELLED, not UNAVAILABLE, for calls it received during shutdown but never
    # handed to the application (grpc/grpc#41785); they were never accepted. That no accepted call was
    # cut off is shown by the server's own counts (below).
    "unary CANCELLED",
    "stream CANCELLED",
    "refused: stream ended before it was read",
}


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def seconds_between(log_text: str, first: str, last: str) -> float:
    """Seconds between the first log line holding `first` and the last holding `last` (server clock)."""
    stamps = [
        (time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000, line)
        for line in log_text.splitlines()
        if line[:4].isdigit()
    ]
    start = next(t for t, line in stamps if first in line)
    end = max(t for t, line in stamps if last in line)
    return end - start


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_answers_every_accepted_request(
    trained_repo: Path, tmp_path: Path, workers
) -> None:
    grace = 10.0
    log = tmp_path / "server.log"
    args = ["--device", "cpu", "--grace", str(grace), "--workers", str(workers)]
    served = Spawned.mnist_serve(serve_command(), trained_repo, args, log)
    served.wait_serving(Connection((served.target,)))
    server = psutil.Process(served.process.pid)
    processes = [server, *server.children(recursive=True)]  # multiprocessing's helpers too: all must go
    servers = server_processes(server)
    assert len(servers) == (workers + 1 if workers > 1 else 1)  # a supervisor only above one worker
    tally, stop = Tally(), threading.Event()
    clients = [threading.Thread(target=unary_client, args=(served.target, stop, tally)) for _ in range(6)]
    clients += [threading.Thread(target=stream_client, args=(served.target, stop, tally)) for _ in range(2)]
    try:
        for client in clients:
            client.start()
        wait_for(lambda: tally.counts["answered"] > 200, 60, "200 answers")
        served.process.send_signal(signal.SIGTERM)
        try:
            exit_code = served.process.wait(timeout=grace + 60)  # generous: the order is checked below
        except subprocess.TimeoutExpired:
            exit_code = None
        after_exit = sum(tally.counts.values())
        # The clients go on sending to the closed port: each gets at least one more refusal.
        wait_for(lambda: sum(tally.counts.values()) >= after_exit + len(clients), 30, "refusals after exit")
    finally:
        stop.set()
        for client in clients:
            client.join(60)
        served.stop()
    sent = sum(tally.counts.values())
    lost = {outcome: n for outcome, n in tally.counts.items() if outcome not in REFUSED | {"answered"}}
    print(f"\nSIGTERM under load: sent {sent} = {dict(tally.counts)}; details {dict(tally.details)}")
    assert exit_code == 0, f"no clean exit: {exit_code}"
    assert lost == {}, f"requests lost: {lost}; {dict(tally.details)}"
    # UNAVAILABLE only from the closed port, or for a call gRPC core held without handing it to the
    # servicers ("Cancelling all calls" once the grace period ends; rare): "Socket closed" would be an
    # accepted call cut off.
    refusals = (
        "unary CANCELLED: CANCELLED",
        "stream CANCELLED: CANCELLED",
        "unary UNAVAILABLE: failed to connect",
        "stream UNAVAILABLE: failed to connect",
        "unary UNAVAILABLE: Cancelling all calls",
        "stream UNAVAILABLE: Cancelling all calls",
    )
    assert all(detail.startswith(refusals) for detail in tally.details), tally.details
    text = log.read_text()
    assert "event=stopping" in text and "event=stopped" in text and "Traceback" not in text
    assert text.count("event=stopped") == (workers + 1 if workers > 1 else 1)
    # Every request a servicer took was answered, and every answer reached its client: nothing accepted
    # was lost, whatever gRPC core refused on its own.
    counts = re.findall(r"event=stopped requests_started=(\d+) requests_answered=(\d+)", text)
    assert len(counts) == workers, text
    started, answered = (sum(int(c[i]) for c in counts) for i in (0, 1))
    assert started == answered == tally.counts["answered"], (started, answered, dict(tally.counts))
    # Each process stopped on its own within the grace period, unless gRPC core held such a call: then
    # the grace period ran out with no request of the servicers' unanswered, and it stopped right after.
    expired = re.findall(r"event=grace_expired unanswered_requests=(\d+)", text)
    assert all(n == "0" for n in expired), expired
    assert seconds_between(text, "event=stopping", "event=stopped") < (grace + 5 if expired else grace)
    wait_for(lambda: not any(alive(p) for p in processes), 30, "every server process gone")


# -- model files -------------------------------------------------------------------------------------------
def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=model_refused" in r.getMessage()]


def test_corrupt_model_files_at_startup_are_named_and_the_others_still_load(
    start_server, repo, caplog
) -> None:
    caplog.set_level(logging.INFO)
    good = (repo / "mnist" / "1" / "model.onnx").read_bytes()
    broken = {
        "truncated": add_model(repo, "truncated", good[: len(good) // 2]),
        "empty": add_model(repo, "empty", b""),
        "garbage": add_model(repo, "garbage", bytes(range(256)) * 64),
    }
    add_model(repo, "tiny", linear_model())  # a healthy second model beside them
    running = start_server(repo)
    messages = refusals(caplog)
    for path in broken.values():
        assert sum(str(path) in m for m in messages) == 1, messages  # named once, clearly
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        for name in ("mnist", "tiny"):
            request = infer_request()
            request.model_name = name
            assert stub.ModelInfer(request, timeout=30).model_name == name
        for name, path in broken.items():
            assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=30).ready
            with pytest.raises(grpc.RpcError) as error:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
            assert error.value.code() == grpc.StatusCode.INTERNAL and str(path) in error.value.details()


def test_a_corrupt_new_version_at_reload_leaves_the_old_one_serving(start_server, repo, caplog) -> None:
    caplog.set_level(logging.INFO)
    running = start_server(repo)
    good = (repo / "mnist" / "1" / "model.onnx").read_bytes()
    staging = repo / "mnist" / ".staging-2"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(good[: len(good) * 3 // 4])  # a copy cut short
    staging.rename(repo / "mnist" / "2")
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:  # the caller learns the new version was refused...
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mnist"), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "still serves version 1" in error.value.details()
        assert str(repo / "mnist" / "2" / "model.onnx") in error.value.details()
        assert any(str(repo / "mnist" / "2" / "model.onnx") in m for m in refusals(caplog))
        # ...and the old one serves on.
        assert stub.ModelInfer(infer_request(), timeout=30).model_version == "1"
        assert not stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="2"), timeout=30).ready


CONTRACT_BREAKERS = {
    "float-input": (dict(input_type=TensorProto.FLOAT), "uint8"),
    "fixed-batch": (dict(input_shape=(1, 1, 28, 28)), "dynamic N"),
    "renamed-output": (dict(output="logits"), "probabilities"),
    "five-classes": (dict(classes=5), "[N, 10]"),
}


def test_models_that_break_the_io_contract_are_refused_at_load(start_server, repo, caplog) -> None:
    caplog.set_level(logging.INFO)
    paths = {
        name: add_model(repo, name, linear_model(**kwargs)) for name, (kwargs, _) in CONTRACT_BREAKERS.items()
    }
    bad_config = helpers.CONFIG.replace("TYPE_UINT8", "TYPE_FP32")
    config_path = (
        add_model(repo, "fp32-config", linear_model(), config=bad_config).parent.parent / "config.pbtxt"
    )
    add_model(repo, "tiny", linear_model())  # the same graph, honouring the contract: loads
    running = start_server(repo)
    messages = refusals(caplog)
    for name, (_, reason) in CONTRACT_BREAKERS.items():
        found = [m for m in messages if str(paths[name]) in m]
        assert len(found) == 1 and reason in found[0], (name, messages)
    assert any(str(config_path) in m for m in messages)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = {
            m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=30).models
        }
        assert ready == {"mnist", "tiny"}  # refused at load, not at the first request
