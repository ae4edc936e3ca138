"""The longer reliability runs behind docs/reliability.md: capacity, soak, overload, SIGTERM under load.

    .venv/bin/python benchmarks/reliability/soak.py --repo models --soak-seconds 60 \
        --out benchmarks/reliability/results.json

Each scenario gets a fresh `mnist-serve` subprocess on 127.0.0.1 (psutil reads its memory alone) and load
from mnist-bench's generator (serving.bench.loadgen) in this process: on a small machine the server and
the generator share the cores, which the report states next to the figures.
"""

import argparse
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

from serving.bench.apis import build_workload
from serving.bench.loadgen import Connection, Level, RunResult, RunSpec, run
from serving.bench.spawn import Spawned, serve_command
from serving.mnist import load_mnist
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2 as cpb
from serving.proto.mnist.v1 import classify_pb2_grpc

MiB = 2**20
TIMEOUT_S = 10.0


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


class Sampler:
    """RSS, CPU and queue depth of the server every `every_s` seconds, in a background thread."""

    def __init__(self, served: Spawned, every_s: float = 0.5) -> None:
        self.process, self.url, self.every_s = psutil.Process(served.process.pid), served.metrics_url, every_s
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            queued = metric(self.url, "mnist_queue_depth")
            self.samples.append((time.time(), self.process.memory_info().rss, queued))

    def memory(self, after: float) -> dict:
        """RSS over the measured window: start and end are medians of 5 samples, peak the largest."""
        measured = [rss for t, rss, _ in self.samples if t >= after]
        start, end, peak = statistics.median(measured[:5]), statistics.median(measured[-5:]), max(measured)
        return {
            "rss_start_mib": round(start / MiB, 1),
            "rss_end_mib": round(end / MiB, 1),
            "rss_peak_mib": round(peak / MiB, 1),
            "rss_growth_end_pct": round(100 * (end - start) / start, 2),
            "rss_growth_peak_pct": round(100 * (peak - start) / start, 2),
            "max_queue_depth_images": max(q for _, _, q in self.samples),
        }


def spawn(repo: Path, logs: Path, name: str, *args: str) -> Spawned:
    args = ("--device", "cpu", "--workers", "1", *args)  # one process: psutil reads its memory alone
    served = Spawned.mnist_serve(serve_command(), repo, list(args), logs / f"{name}.log")
    served.wait_serving(Connection((served.target,)))
    return served


def load(served: Spawned, workload, level: Level, seconds: float, warmup: float = 1.0) -> RunResult:
    spec = RunSpec(
        workload, Connection((served.target,)), level, start_at=time.time(), warmup_s=warmup,
        duration_s=seconds, timeout_s=TIMEOUT_S,
    )  # fmt: skip
    return run(spec)


def summary(result: RunResult) -> dict:
    latency = result.latency_s * 1e3
    return {
        "status": dict(result.status),
        "scheduled": int(result.scheduled),
        "unsent": int(result.unsent),
        "answered_per_s": round(result.status["OK"] / result.window_s, 1),
        "accuracy": round(result.correct / max(result.images, 1), 4),
        "p50_ms": round(float(sorted(latency)[len(latency) // 2]), 1) if len(latency) else None,
        "max_ms": round(float(latency.max()), 1) if len(latency) else None,
    }


def capacity(served: Spawned, workload) -> float:
    result = load(served, workload, Level(concurrency=8), seconds=5.0)
    return result.status["OK"] / result.window_s


def soak(repo: Path, logs: Path, digits, seconds: float) -> dict:
    served = spawn(repo, logs, "soak")
    try:
        unary = build_workload("kserve", False, "mnist", "", *digits, 1)
        streamed = build_workload("classify", True, "mnist", "", *digits, 1)
        cap = capacity(served, unary)
        rate, warmup = 0.8 * cap, 5.0
        with Sampler(served) as sampler, ThreadPoolExecutor(2) as pool:
            began = time.time() + warmup
            kserve = pool.submit(load, served, unary, Level(rate=rate * 5 / 8), seconds, warmup)
            classify = pool.submit(
                load, served, streamed, Level(rate=rate * 3 / 8, streams=4), seconds, warmup
            )
            results = {
                "kserve unary": summary(kserve.result()),
                "classify stream": summary(classify.result()),
            }
        dropped = metric(served.metrics_url, "mnist_requests_dropped_total")
    finally:
        exit_code = served.stop()
    return {
        "capacity_req_per_s": round(cap, 1),
        "rate_req_per_s": round(rate, 1),
        "seconds": seconds,
        "warmup_s": warmup,
        "results": results,
        "dropped_total": dropped,
        "memory": sampler.memory(began),
        "exit_code": exit_code,
    }


def time_replies(served: Spawned, request: bytes, method: str, after: float, done: threading.Event) -> dict:
    """One extra caller during the overload: median reply time by status (how fast refusals come)."""
    times: dict[str, list[float]] = {}
    time.sleep(max(0.0, after - time.time()))
    with grpc.insecure_channel(served.target) as channel:
        call = channel.unary_unary(method)
        while not done.is_set():
            start = time.perf_counter()
            try:
                call(request, timeout=TIMEOUT_S)
                status = "OK"
            except grpc.RpcError as e:
                status = e.code().name
            times.setdefault(status, []).append(1e3 * (time.perf_counter() - start))
            time.sleep(0.05)
    return {status: round(statistics.median(ms), 1) for status, ms in times.items()}


def overload(repo: Path, logs: Path, digits, seconds: float, factor: float, images: int) -> dict:
    served = spawn(repo, logs, f"overload-{images}")
    try:
        workload = build_workload("kserve", False, "mnist", "", *digits, images)
        cap = capacity(served, workload)
        with Sampler(served, every_s=0.25) as sampler, ThreadPoolExecutor(1) as pool:
            began = time.time() + 1.0
            done = threading.Event()
            probe = pool.submit(time_replies, served, workload.requests[0], workload.method, began, done)
            result = load(served, workload, Level(rate=factor * cap), seconds)
            done.set()
            reply_ms = probe.result()
        dropped = {
            reason: metric(served.metrics_url, "mnist_requests_dropped_total", reason=reason)
            for reason in ("queue_full", "deadline_expired", "cancelled")
        }
    finally:
        exit_code = served.stop()
    return {
        "images_per_request": images,
        "capacity_req_per_s": round(cap, 1),
        "rate_req_per_s": round(factor * cap, 1),
        "seconds": seconds,
        "result": summary(result),
        "probe_median_reply_ms_by_status": reply_ms,
        "dropped": dropped,
        "memory": sampler.memory(began),
        "exit_code": exit_code,
    }


def rejected_large_requests(repo: Path, logs: Path, count: int = 10) -> dict:
    """RSS of the server after each of `count` refused 11 MiB requests (defect 1 and 2)."""
    served = spawn(repo, logs, "rejected")
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[2**40] * 2_000_000)
    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor]).SerializeToString()
    process, rss = psutil.Process(served.process.pid), []
    try:
        before = process.memory_info().rss
        with grpc.insecure_channel(served.target) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for _ in range(count):
                try:
                    call(request, timeout=TIMEOUT_S)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                rss.append(round((process.memory_info().rss - before) / MiB, 1))
    finally:
        served.stop()
    return {"message_mib": round(len(request) / MiB, 1), "rss_growth_mib_after_each": rss}


def shutdown_under_load(
    repo: Path, logs: Path, grace: float = 10.0, unary: int = 6, streams: int = 2
) -> dict:
    """SIGTERM while `unary` unary clients and `streams` lock-step stream clients keep sending."""
    served = spawn(repo, logs, "shutdown", "--grace", str(grace))
    counts, details, lock, stop = Counter(), Counter(), threading.Lock(), threading.Event()
    one = pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 1, 28, 28])],
        raw_input_contents=[bytes(784)],
    )
    image = cpb.ClassifyRequest(model="mnist", images=[cpb.Image(pixels=bytes(784))])

    def add(outcome: str, detail: str = "") -> None:
        with lock:
            counts[outcome] += 1
            if detail:
                details[f"{outcome}: {detail[:60]}"] += 1

    def unary_client() -> None:
        with grpc.insecure_channel(served.target) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ModelInfer(one, timeout=30)
                    add("answered")
                except grpc.RpcError as e:
                    add(f"unary {e.code().name}", e.details() or "")
                    time.sleep(0.02)

    def stream_client() -> None:
        with grpc.insecure_channel(served.target) as channel:
            stub = classify_pb2_grpc.ClassifierStub(channel)
            while not stop.is_set():
                requests: queue.SimpleQueue = queue.SimpleQueue()
                responses = stub.ClassifyStream(iter(requests.get, None), timeout=60)
                try:
                    while not stop.is_set():
                        requests.put(image)
                        next(responses)
                        add("answered")
                except StopIteration:
                    add("stream ended by the server before reading the request")
                except grpc.RpcError as e:
                    add(f"stream {e.code().name}", e.details() or "")
                    time.sleep(0.02)
                finally:
                    requests.put(None)

    clients = [threading.Thread(target=unary_client) for _ in range(unary)]
    clients += [threading.Thread(target=stream_client) for _ in range(streams)]
    for client in clients:
        client.start()
    time.sleep(5.0)
    signalled = time.time()
    served.process.send_signal(signal.SIGTERM)
    try:
        exit_code = served.process.wait(timeout=grace + 20)
    except subprocess.TimeoutExpired:
        exit_code = None
    exit_after = time.time() - signalled
    time.sleep(0.5)
    stop.set()
    for client in clients:
        client.join(60)
    served.stop()
    return {
        "clients": {"unary": unary, "stream": streams},
        "grace_s": grace,
        "sent": sum(counts.values()),
        "outcomes": dict(counts),
        "details": dict(details),
        "exit_code": exit_code,
        "exit_after_s": round(exit_after, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, required=True, help="model repository with an `mnist` model")
    p.add_argument("--soak-seconds", type=float, default=60.0, help="measured soak duration")
    p.add_argument("--overload-seconds", type=float, default=20.0, help="measured overload duration")
    p.add_argument("--out", type=Path, default=Path("benchmarks/reliability/results.json"), help="JSON file")
    args = p.parse_args()
    mnist = load_mnist()
    digits = (mnist.test_images, mnist.test_labels)
    with tempfile.TemporaryDirectory() as logs_dir:
        logs = Path(logs_dir)
        figures = {
            "machine": {
                "cpus": os.cpu_count(),
                "cpu": platform.processor() or platform.machine(),
                "load_average_at_start": os.getloadavg(),
                "note": "server and load generator share these cores",
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        steps = {
            "soak": lambda: soak(args.repo, logs, digits, args.soak_seconds),
            "overload_64_images_4x": lambda: overload(
                args.repo, logs, digits, args.overload_seconds, 4.0, 64
            ),
            "overload_1_image_3x": lambda: overload(args.repo, logs, digits, args.overload_seconds, 3.0, 1),
            "rejected_large_requests": lambda: rejected_large_requests(args.repo, logs),
            "shutdown_under_load": lambda: shutdown_under_load(args.repo, logs),
        }
        for name, step in steps.items():
            print(f"== {name}", flush=True)
            figures[name] = step()
            print(json.dumps(figures[name], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
