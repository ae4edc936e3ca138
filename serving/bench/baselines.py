"""The in-process ONNX Runtime ceiling: what the hardware does with the model and no gRPC at all.

Measured with the server's default RuntimeOptions, at each batch size: latency of one caller, and the
throughput of `callers` threads running the same session at once (ORT releases the GIL; the server gets
its parallelism the same way, from concurrent batches).
The other baseline, the bare gRPC floor, is the load generator run against serving.bench.echo.
"""

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import IMAGE_SHAPE
from serving.runtime import ModelSession, RuntimeOptions


@dataclass(frozen=True)
class CeilingPoint:
    batch_size: int
    callers: int
    images_per_s: float  # with `callers` threads
    p50_ms: float  # one caller, one run of `batch_size` images
    p99_ms: float


def newest_model(repo: Path, name: str, version: str = "") -> Path:
    """<repo>/<name>/<version or newest>/model.onnx"""
    model_dir = repo / name
    if version:
        path = model_dir / version / "model.onnx"
    else:
        versions = [d for d in model_dir.iterdir() if d.name.isdigit()] if model_dir.is_dir() else []
        if not versions:
            raise FileNotFoundError(f"no versions of model {name!r} under {repo}")
        path = max(versions, key=lambda d: int(d.name)) / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path


def ort_ceiling(
    model_path: Path,
    images: np.ndarray,
    batch_sizes: list[int],
    seconds: float = 0.5,
    callers: int | None = None,
    options: RuntimeOptions | None = None,
) -> list[CeilingPoint]:
    # On CUDA the session pads to the same buckets the server uses, up to the largest size measured.
    session = ModelSession(model_path, options or RuntimeOptions(device="cpu"), max(batch_sizes))
    callers = callers or os.cpu_count() or 1
    points = []
    for size in batch_sizes:
        batch = np.ascontiguousarray(images[np.arange(size) % len(images)].reshape(size, *IMAGE_SHAPE))
        session.warm_up([size])
        single = _time_runs(session, batch, seconds)
        total = _parallel_images_per_s(session, batch, seconds, callers)
        points.append(
            CeilingPoint(
                batch_size=size,
                callers=callers,
                images_per_s=max(total, size / np.mean(single)),
                p50_ms=float(np.percentile(single, 50) * 1e3),
                p99_ms=float(np.percentile(single, 99) * 1e3),
            )
        )
    return points


def _time_runs(session: ModelSession, batch: np.ndarray, seconds: float) -> np.ndarray:
    times, end = [], time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        session.run(batch)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def _parallel_images_per_s(session: ModelSession, batch: np.ndarray, seconds: float, callers: int) -> float:
    counts = [0] * callers
    start = threading.Barrier(callers + 1)

    def caller(k: int) -> None:
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            session.run(batch)
            counts[k] += 1

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(counts) * len(batch) / (time.perf_counter() - t0)
