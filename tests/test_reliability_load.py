"""Soak and overload against a real `mnist-serve` subprocess.

The server runs in its own process so psutil sees its memory alone; the load comes from mnist-bench's
generator (serving.bench.loadgen) in this process, over loopback. Capacity is measured first and the
levels are set from it, so the test means the same on a fast and a slow machine; nothing asserts a
time. benchmarks/reliability/soak.py runs the same scenarios for longer and writes the report's figures.
"""

import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import psutil
import pytest

from serving.bench.apis import build_workload
from serving.bench.loadgen import Connection, Level, RunResult, RunSpec, run
from serving.bench.spawn import Spawned, serve_command
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.server import ServerConfig

from helpers import metric, metric_by

QUEUE_IMAGES = ServerConfig().max_queue_images  # the default, 4096
# One process: psutil then reads the memory of the server that holds the requests.
SERVER_ARGS = ["--device", "cpu", "--grace", "10", "--workers", "1"]
SOAK_SECONDS = 6.0  # benchmarks/reliability/soak.py runs 60 s
TIMEOUT_S = 10.0  # every request's deadline


@pytest.fixture(scope="module")
def served(trained_repo: Path, tmp_path_factory):
    log = tmp_path_factory.mktemp("load") / "server.log"
    server = Spawned.mnist_serve(serve_command(), trained_repo, SERVER_ARGS, log)
    server.wait_serving(Connection((server.target,)))
    yield server
    assert server.stop() == 0, server.log_tail()
    assert "Traceback" not in log.read_text()


def load(
    served: Spawned, workload, level: Level, seconds: float, warmup: float = 1.0, timeout_s: float = TIMEOUT_S
) -> RunResult:
    spec = RunSpec(
        workload, Connection((served.target,)), level, start_at=time.time(), warmup_s=warmup,
        duration_s=seconds, timeout_s=timeout_s,
    )  # fmt: skip
    return run(spec)


def capacity(served: Spawned, workload) -> float:
    """Requests/s the server answers with 8 callers always waiting (closed loop)."""
    result = load(served, workload, Level(concurrency=8), seconds=3.0)
    assert set(result.status) == {"OK"}, result.status
    return result.status["OK"] / result.window_s


@contextmanager
def sampling(served: Spawned, every_s: float = 0.2):
    """Sample the server's RSS (and its queue depth gauge) in the background: yields the sample list."""
    process, samples, stop = psutil.Process(served.process.pid), [], threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            queued = metric(served.metrics_url, "mnist_queue_depth")
            samples.append((time.time(), process.memory_info().rss, queued))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(10)


def rss_figures(samples: list, after: float) -> tuple[float, float, float]:
    """(start, end, peak) RSS of the measured window; start and end are medians of 5 samples, so that
    a momentary backlog (the machine is shared) is not mistaken for growth."""
    measured = [rss for t, rss, _ in samples if t >= after]
    assert len(measured) > 10
    return statistics.median(measured[:5]), statistics.median(measured[-5:]), max(measured)


def test_soak_at_half_of_capacity_answers_everything_in_bounded_memory(served, mnist) -> None:
    images, labels = mnist.test_images, mnist.test_labels
    unary = build_workload("kserve", False, "mnist", "", images, labels, 1)
    streamed = build_workload("classify", True, "mnist", "", images, labels, 1)
    # Half, not the benchmark's 80 %: capacity is measured in 3 s with the generator on the same cores, and
    # a test must not fail because that estimate ran high on a busy machine (benchmarks/reliability/soak.py
    # runs 80 % for 60 s).
    rate = 0.5 * capacity(served, unary)
    warmup = 2.0
    with sampling(served) as samples, ThreadPoolExecutor(2) as pool:
        began = time.time() + warmup
        # Both APIs at once: 5/8 of the load as KServe unary calls, 3/8 on 4 mnist.v1 streams.
        kserve = pool.submit(load, served, unary, Level(rate=rate * 5 / 8), SOAK_SECONDS, warmup)
        classify = pool.submit(
            load, served, streamed, Level(rate=rate * 3 / 8, streams=4), SOAK_SECONDS, warmup
        )
        results = [kserve.result(), classify.result()]
    for result in results:
        assert set(result.status) == {"OK"}, result.status  # zero errors, every answer checked
        assert result.unsent == 0 and result.status["OK"] > 0  # every scheduled request was sent
        assert result.correct / result.images > 0.9
    start, end, _ = rss_figures(samples, began)
    assert (end - start) / start < 0.10, f"RSS grew from {start / 2**20:.0f} to {end / 2**20:.0f} MiB"


def server_requests(served: Spawned) -> Counter:
    return metric_by(served.metrics_url, "mnist_requests_total", "status")


def test_overload_is_shed_with_resource_exhausted_and_accepted_requests_finish(served, mnist) -> None:
    # 64-image requests make the model the bottleneck (not this process's CPU, which the load
    # generator shares with the server), so the open loop can really send 4x what the server can do.
    workload = build_workload("kserve", False, "mnist", "", mnist.test_images, mnist.test_labels, 64)
    rate = 4 * capacity(served, workload)
    before = server_requests(served)
    with sampling(served) as samples:
        began = time.time()
        # A generous deadline: what matters is that every request is answered or refused, whatever the
        # machine's speed. No warm-up, so the server's counts and the client's cover the same requests.
        result = load(served, workload, Level(rate=rate), seconds=5.0, warmup=0.0, timeout_s=60.0)
    seen = server_requests(served) - before
    # Every request was answered or refused at once: by the server with RESOURCE_EXHAUSTED (its queue or
    # its limit of requests in progress full), or, when calls came faster than the server could even take
    # them from gRPC core (--max-pending-rpcs), by gRPC core with CANCELLED before the server saw them.
    assert set(result.status) <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"}, result.status
    assert sum(result.status.values()) == result.scheduled and result.status["OK"] > 0
    assert seen == Counter({k: v for k, v in result.status.items() if k != "CANCELLED"}), (
        seen,
        result.status,
    )
    assert result.correct / result.images > 0.9
    assert max(queued for _, _, queued in samples) <= QUEUE_IMAGES
    # Bounded by the limits: at most --max-concurrent-rpcs (1024) requests of 50 KiB in progress at once.
    start, _, peak = rss_figures(samples, began)
    assert peak - start < 64 * 2**20, f"RSS peaked at {peak / 2**20:.0f} MiB from {start / 2**20:.0f} MiB"


def test_rejected_large_requests_do_not_pile_up_in_memory(served) -> None:
    """Ten 11 MiB requests declaring 2 million dimensions, each refused with INVALID_ARGUMENT.

    Defect 1 in docs/reliability.md: an error raised with context.abort() left the request in a
    reference cycle (grpc.aio's AbortError traceback) that only Python's cyclic GC frees, and the GC
    counts objects, not bytes: each refused request kept ~40 MiB, ~115 MiB with the 2 million Python
    ints the shape check built (defect 2), so ten of them cost 300-800 MiB.
    """
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[2**40] * 2_000_000)
    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor]).SerializeToString()
    assert len(request) > 10 * 2**20
    process = psutil.Process(served.process.pid)
    rss = []
    with grpc.insecure_channel(served.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(10):
            with pytest.raises(grpc.RpcError) as error:
                call(request, timeout=TIMEOUT_S)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            rss.append(process.memory_info().rss)
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT_S).live
    # The first refusals grow the allocator's heap (~8 MiB each after the first); before the fix, each
    # refusal kept ~115 MiB, ~900 MiB over these eight.
    assert rss[-1] - rss[1] < 128 * 2**20, f"RSS grew {(rss[-1] - rss[1]) / 2**20:.0f} MiB over 8 refusals"
