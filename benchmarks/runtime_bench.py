"""In-process ONNX Runtime throughput of model variants and runtime settings (no gRPC): the serving ceiling.

    python benchmarks/runtime_bench.py variants MODEL.onnx [MODEL.onnx ...]  # images/s at batch 1/64/256
    python benchmarks/runtime_bench.py threads MODEL.onnx         # intra-op threads x spinning x callers
    python benchmarks/runtime_bench.py cuda FP32.onnx FP16.onnx   # fixed buckets, with and without graphs

Each figure is the mean ± std of --repeats timed windows of --seconds after a warm-up run; setup is excluded.
"""

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from serving.mnist import load_mnist
from serving.runtime import ModelSession, RuntimeOptions


def throughput(
    session: ModelSession, images: np.ndarray, callers: int, seconds: float
) -> tuple[float, float]:
    """Images/s with `callers` threads each running `images` back to back, and the process CPU cores used."""
    counts = [0] * callers
    stop = time.perf_counter() + seconds

    def caller(i: int) -> None:
        while time.perf_counter() < stop:
            session.run(images)
            counts[i] += len(images)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    wall, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return sum(counts) / wall, cpu / wall


def measure(session: ModelSession, images: np.ndarray, callers: int, args: argparse.Namespace) -> str:
    session.run(images)  # warm-up: first run at a new shape is slow
    runs = [throughput(session, images, callers, args.seconds) for _ in range(args.repeats)]
    rates = [rate for rate, _ in runs]
    # Images per CPU-second stays meaningful when other jobs share the cores and wall-clock rates swing.
    per_cpu = [rate / cores for rate, cores in runs]
    return (
        f"{statistics.mean(rates):8.0f} ± {statistics.stdev(rates):5.0f} images/s, "
        f"{statistics.mean(per_cpu):8.0f} ± {statistics.stdev(per_cpu):5.0f} images/cpu-s, "
        f"cpu {statistics.mean(c for _, c in runs):.2f} cores"
    )


def idle_cpu(session: ModelSession, images: np.ndarray, rate_hz: float, seconds: float) -> float:
    """CPU cores used while serving a light load of `rate_hz` single runs per second (the spinning cost)."""
    cpu, end = time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < end:
        session.run(images)
        time.sleep(1 / rate_hz)
    return (time.process_time() - cpu) / seconds


def cmd_variants(args: argparse.Namespace) -> None:
    mnist = load_mnist()
    for path in args.models:
        session = ModelSession(path, RuntimeOptions(device="cpu"))
        probs = np.concatenate(
            [session.run(mnist.test_images[i : i + 1000, None]) for i in range(0, 10_000, 1000)]
        )
        accuracy = (probs.argmax(1) == mnist.test_labels).mean()
        print(f"{path}  variant={session.variant}  test accuracy {100 * accuracy:.2f}%")
        for batch in (1, 64, 256):
            print(f"  batch {batch:3d}: {measure(session, mnist.test_images[:batch, None], 1, args)}")


def cmd_threads(args: argparse.Namespace) -> None:
    images = load_mnist().test_images
    for intra in (1, 2):
        for spinning in (False, True):
            options = RuntimeOptions(device="cpu", intra_op_threads=intra, allow_spinning=spinning)
            session = ModelSession(args.models[0], options)
            print(f"intra_op_threads={intra} allow_spinning={spinning}")
            for batch in (1, 64):
                for callers in (1, 4):
                    result = measure(session, images[:batch, None], callers, args)
                    print(f"  batch {batch:3d} callers {callers}: {result}")
            light = idle_cpu(session, images[:1, None], rate_hz=100, seconds=3)
            print(f"  light load (100 runs/s of batch 1): {light:.2f} cores")


def cmd_cuda(args: argparse.Namespace) -> None:
    images = load_mnist().test_images
    settings = {
        "buckets, IO binding": RuntimeOptions(device="cuda", batch_buckets=(1, 64, 256), cuda_graphs=False),
        "buckets, IO binding, CUDA graphs": RuntimeOptions(device="cuda", batch_buckets=(1, 64, 256)),
    }
    for path in args.models:
        for label, options in settings.items():
            session = ModelSession(path, options, max_batch_size=256)
            session.warm_up((1, 64, 256))
            print(f"{path}  variant={session.variant}  {label}")
            for batch in (1, 64, 256):
                print(f"  batch {batch:3d}: {measure(session, images[:batch, None], 1, args)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("variants", "threads", "cuda"))
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="length of one timed window (default: 2.0)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per figure (default: 5)")
    args = parser.parse_args()
    print(f"cpu cores: {os.cpu_count()}")
    {"variants": cmd_variants, "threads": cmd_threads, "cuda": cmd_cuda}[args.command](args)


if __name__ == "__main__":
    main()
