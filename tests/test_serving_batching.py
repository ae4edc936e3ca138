"""Dynamic batching: concurrent requests merge, results equal unbatched ones, big requests split, the
queue is bounded, expired requests are dropped before compute, a failed batch fails all its requests."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.batcher import Batcher
from serving.errors import RequestError
from serving.metrics import Metrics
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.runtime import ModelSession, RuntimeOptions
from serving.statistics import VersionStatistics

from helpers import assert_same_probabilities, infer_request, wait_for


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(-1, 10)


@pytest.fixture(scope="module")
def images(mnist) -> np.ndarray:
    return mnist.test_images[:600, None].copy()


@pytest.fixture(scope="module")
def unbatched(trained_repo: Path, images) -> np.ndarray:
    session = ModelSession(trained_repo / "mnist" / "1" / "model.onnx", RuntimeOptions(device="cpu"))
    return np.concatenate([session.run(image[None]) for image in images])


def batch_sizes(running) -> dict[str, float]:
    """The server's batch size histogram: runs per bucket (cumulative, as Prometheus counts them)."""
    return {le: running.metric("mnist_batch_size_bucket", model="mnist", le=le) for le in ("4.0", "8.0")}


def test_concurrent_requests_are_batched_and_equal_unbatched(start_server, repo, images, unbatched) -> None:
    # A batch starts only when 8 images wait (or after 10 s): 96 concurrent single-image requests must
    # form 12 full batches, each answered with its own rows.
    running = start_server(repo, max_batch_size=8, max_queue_delay_us=10_000_000)
    with running.channel() as channel, ThreadPoolExecutor(32) as pool:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        futures = [
            pool.submit(stub.ModelInfer, infer_request(images[i : i + 1]), timeout=30) for i in range(96)
        ]
        results = np.concatenate([probabilities(f.result()) for f in futures])
    assert_same_probabilities(results, unbatched[:96])
    assert running.metric("mnist_batch_size_sum", model="mnist") == 96
    assert running.metric("mnist_batch_size_count", model="mnist") == 12
    assert batch_sizes(running) == {"4.0": 0, "8.0": 12}  # every run had exactly 8 images


def test_large_request_is_split_into_max_batch_size_runs(start_server, repo, images, unbatched) -> None:
    running = start_server(repo, max_batch_size=128)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert_same_probabilities(
            probabilities(stub.ModelInfer(infer_request(images), timeout=30)), unbatched
        )
    assert running.metric("mnist_batch_size_count", model="mnist") >= 5  # 600 images, at most 128 per run
    assert running.metric("mnist_batch_size_bucket", model="mnist", le="128.0") == running.metric(
        "mnist_batch_size_count", model="mnist"
    )


def test_full_queue_rejects_at_once_and_expired_requests_are_dropped(start_server, repo, images) -> None:
    # A batch forms only when 256 images are queued (or after 10 s): requests wait until the test fills it.
    running = start_server(repo, max_batch_size=256, max_queue_images=256, max_queue_delay_us=10_000_000)
    with running.channel() as channel, ThreadPoolExecutor(2) as pool:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        first = pool.submit(stub.ModelInfer, infer_request(images[:200]), timeout=60)
        wait_for(lambda: running.metric("mnist_queue_depth", model="mnist") == 200)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(images[200:300]), timeout=60)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in error.value.details()
        assert not first.done()  # rejected at once, not after waiting for room in the queue
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(infer_request(images[:1]), timeout=0.2)  # expires while queued
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not first.done()
        rest = stub.ModelInfer(infer_request(images[300:355]), timeout=60)  # 200 + 1 + 55 = 256: a full batch
        assert probabilities(first.result()).shape == (200, 10) and probabilities(rest).shape == (55, 10)
    assert running.metric("mnist_requests_dropped_total", reason="deadline_expired") == 1
    assert running.metric("mnist_requests_dropped_total", reason="queue_full") == 1
    assert running.metric("mnist_batch_size_sum", model="mnist") == 255  # the expired image was not computed


def test_a_failed_batch_fails_every_request_in_it() -> None:
    def broken(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    def wrong_count(images: np.ndarray) -> np.ndarray:
        return np.zeros((len(images) + 1, 10), np.float32)

    async def submit_concurrently(run) -> list:
        batcher = Batcher(
            "t", run, max_batch_size=8, max_queue_delay_us=50_000, max_queue_images=64,
            metrics=Metrics().for_model("t"), statistics=VersionStatistics(),
        )  # fmt: skip
        one = np.zeros((1, 1, 28, 28), np.uint8)
        results = await asyncio.gather(*(batcher.submit(one) for _ in range(5)), return_exceptions=True)
        await batcher.close()
        return results

    for run, message in [(broken, "device lost"), (wrong_count, "returned shape")]:
        results = asyncio.run(submit_concurrently(run))
        assert len(results) == 5 and all(isinstance(r, RequestError) for r in results)
        assert all(r.code == grpc.StatusCode.INTERNAL and message in r.message for r in results)


def test_one_stream_is_pipelined_into_batches(start_server, repo, images, unbatched) -> None:
    # As above, batches of exactly 8 or none: one stream's 48 requests must be in flight together.
    running = start_server(repo, max_batch_size=8, max_queue_delay_us=10_000_000)
    with running.channel() as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = list(
            stub.ModelStreamInfer(iter([infer_request(images[i : i + 1]) for i in range(48)]), timeout=30)
        )
    results = np.concatenate([probabilities(r.infer_response) for r in responses])
    assert_same_probabilities(results, unbatched[:48])  # in request order
    assert running.metric("mnist_batch_size_count", model="mnist") == 6
    assert batch_sizes(running) == {"4.0": 0, "8.0": 6}


def recording_batcher(runs: list, **settings) -> Batcher:
    """A Batcher whose model records (thread, batch size) for every run and answers zeros."""

    def run(images: np.ndarray) -> np.ndarray:
        runs.append((threading.get_ident(), len(images)))
        return np.zeros((len(images), 10), np.float32)

    settings = {"max_batch_size": 8, "max_queue_delay_us": 0, "max_queue_images": 64, **settings}
    return Batcher("t", run, metrics=Metrics().for_model("t"), statistics=VersionStatistics(), **settings)


def test_requests_of_one_loop_iteration_ride_one_batch_on_the_event_loop_when_small() -> None:
    one = np.zeros((1, 1, 28, 28), np.uint8)

    async def scenario() -> tuple[list, int]:
        runs: list = []
        batcher = recording_batcher(runs, inline_images=4, instances=2)
        # Three requests handled in one iteration of the loop: one batch, run on the loop's own thread.
        await asyncio.gather(*(batcher.submit(one) for _ in range(3)))
        # Six single images: more than inline_images, so one of the batcher's threads runs them.
        await asyncio.gather(*(batcher.submit(one) for _ in range(6)))
        # A request larger than max_batch_size is split; its chunks run on the threads.
        result = await batcher.submit(np.zeros((20, 1, 28, 28), np.uint8))
        assert result.probabilities.shape == (20, 10)
        await batcher.close()
        return runs, threading.get_ident()

    runs, loop_thread = asyncio.run(scenario())
    assert runs[0] == (loop_thread, 3)
    assert runs[1][0] != loop_thread and runs[1][1] == 6
    assert sorted(size for _, size in runs[2:]) == [4, 8, 8] and all(t != loop_thread for t, _ in runs[2:])


def test_with_a_queue_delay_batches_wait_on_the_threads_for_more_requests() -> None:
    one = np.zeros((1, 1, 28, 28), np.uint8)

    async def scenario() -> tuple[list, int]:
        runs: list = []
        # A delay long enough that only a full batch starts it: the 4 requests must wait for each other.
        batcher = recording_batcher(runs, max_batch_size=4, max_queue_delay_us=10_000_000, inline_images=4)
        first = asyncio.ensure_future(batcher.submit(one))
        await asyncio.sleep(0)
        assert not first.done()
        await asyncio.gather(first, *(batcher.submit(one) for _ in range(3)))
        await batcher.close()
        return runs, threading.get_ident()

    runs, loop_thread = asyncio.run(scenario())
    assert len(runs) == 1 and runs[0][1] == 4 and runs[0][0] != loop_thread
