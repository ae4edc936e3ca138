"""serving.runtime: contract checks at load, run() semantics, warm-up, provider selection, CUDA path."""

import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from serving.buckets import chunks, default_sizes
from serving.runtime import (
    CPU,
    CUDA,
    INLINE_IMAGES,
    DeviceError,
    ModelLoadError,
    ModelSession,
    RuntimeOptions,
    cuda_device_count,
    cuda_provider_options,
    resolve_device,
)
from training import models
from training.export import to_onnx

import helpers

HAS_CUDA = CUDA in ort.get_available_providers() and cuda_device_count() > 0
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU (CPU-only here)")

TOLERANCE = 1e-6  # batched vs unbatched CPU results: same kernels, float rounding at most
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(37, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real exporter's output for an (untrained) cnn2: the graph the server will run."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "model.onnx"
    path.write_bytes(to_onnx(models.build("cnn2"), {"arch": "cnn2"}))
    return path


def linear_model(path: Path, weight: float = 0.01, **bend) -> Path:
    """A tiny softmax-regression graph whose I/O `bend` can break one way at a time (helpers.linear_model)."""
    classes = bend.get("classes", 10)
    model = helpers.linear_model(RNG.normal(size=(784, classes)).astype(np.float32) * weight, **bend)
    helper.set_model_props(model, {"variant": "int8"})
    onnx.save(model, path)
    return path


def test_conformant_model_loads_on_cpu_with_metadata(tmp_path: Path) -> None:
    session = ModelSession(linear_model(tmp_path / "m.onnx"), RuntimeOptions(device="cpu"))
    assert session.provider == CPU
    assert session.variant == "int8"
    assert session.metadata_props == {"variant": "int8"}
    probs = session.run(IMAGES)
    assert probs.shape == (37, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


@pytest.mark.parametrize(
    ("bend", "message"),
    [
        ({"input_name": "pixels"}, "one input named 'images'"),
        ({"input_type": TensorProto.FLOAT}, "must be uint8"),
        ({"input_shape": (1, 1, 28, 28)}, "dynamic N"),
        ({"input_shape": ("N", 28, 28)}, r"uint8 \[N, 1, 28, 28\]"),
        ({"classes": 5}, r"float32 \[N, 10\]"),
        # Right signature, NaN probabilities: only the probe run at load can tell.
        ({"weight": float("nan")}, "probe run"),
    ],
)
def test_contract_violations_are_refused_at_load(tmp_path: Path, bend: dict, message: str) -> None:
    path = linear_model(tmp_path / "bad.onnx", **bend)
    with pytest.raises(ModelLoadError, match=message) as err:
        ModelSession(path, RuntimeOptions(device="cpu"))
    assert str(path) in str(err.value)


def test_corrupt_and_missing_files_are_refused(tmp_path: Path) -> None:
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf model")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model") as err:
        ModelSession(corrupt, RuntimeOptions(device="cpu"))
    assert str(corrupt) in str(err.value)
    with pytest.raises(ModelLoadError, match="not found"):
        ModelSession(tmp_path / "absent.onnx", RuntimeOptions(device="cpu"))


def test_results_do_not_depend_on_batch_size(cnn_path: Path) -> None:
    session = ModelSession(cnn_path, RuntimeOptions(device="cpu"))
    session.warm_up([1, 8, 37])
    whole = session.run(IMAGES)
    one_by_one = np.concatenate([session.run(IMAGES[i : i + 1]) for i in range(len(IMAGES))])
    chunks = np.concatenate([session.run(IMAGES[i : i + 8]) for i in range(0, len(IMAGES), 8)])
    for other in (one_by_one, chunks):
        np.testing.assert_allclose(other, whole, atol=TOLERANCE)
        assert (other.argmax(1) == whole.argmax(1)).all()


def intra_op_threads(session: ort.InferenceSession | None) -> int | None:
    return session.get_session_options().intra_op_num_threads if session is not None else None


@pytest.mark.parametrize(
    ("options", "small", "large"),
    [
        ({}, 1, 2),  # the defaults: from 16 images, two threads
        ({"large_batch_images": 8, "large_batch_threads": 3}, 1, 3),
        ({"large_batch_images": 0}, 1, None),  # off
        ({"large_batch_threads": 1}, 1, None),  # the same threads as every run: nothing to switch to
        ({"intra_op_threads": 0}, 0, None),  # every run has a thread per core already
        ({"batch_buckets": (4, 64)}, 1, None),  # padded buckets run in their own sessions
    ],
)
def test_large_batches_run_with_their_own_threads(cnn_path: Path, options: dict, small, large) -> None:
    """A second session of the same graph, with --large-batch-threads, runs the batches of at least
    --large-batch-images, and answers as the one-thread session does."""
    session = ModelSession(cnn_path, RuntimeOptions(device="cpu", **options))
    one_thread, large_batches = session._session, session._large_batch_session
    assert intra_op_threads(one_thread) == small and intra_op_threads(large_batches) == large
    if large_batches is None:
        return
    ran: list[str] = []
    session._session = Recorded(one_thread, "one thread", ran)
    session._large_batch_session = Recorded(large_batches, "large batches", ran)
    threshold = session.options.large_batch_images
    for n in (threshold - 1, threshold, len(IMAGES)):
        session.run(IMAGES[:n])
    assert ran == ["one thread", "large batches", "large batches"]
    feed = {"images": IMAGES}
    np.testing.assert_allclose(
        large_batches.run(None, feed)[0], one_thread.run(None, feed)[0], atol=TOLERANCE
    )


class Recorded:
    """A real ORT session that notes its name in `ran` at every run: which one ModelSession chose."""

    def __init__(self, session: ort.InferenceSession, name: str, ran: list[str]) -> None:
        self.session, self.name, self.ran = session, name, ran

    def run(self, *args, **kwargs):
        self.ran.append(self.name)
        return self.session.run(*args, **kwargs)


@pytest.mark.parametrize("buckets", [(), (2, 4)], ids=["dynamic-batch", "buckets"])
def test_concurrent_callers_get_their_own_results(cnn_path: Path, buckets: tuple) -> None:
    session = ModelSession(cnn_path, RuntimeOptions(device="cpu", batch_buckets=buckets))
    want = [session.run(IMAGES[i : i + 3]) for i in range(8)]
    got: list = [None] * 8

    def call(i: int) -> None:
        for _ in range(5):
            got[i] = session.run(IMAGES[i : i + 3])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, atol=TOLERANCE)


def test_run_rejects_off_contract_arrays(cnn_path: Path) -> None:
    session = ModelSession(cnn_path, RuntimeOptions(device="cpu"))
    for bad in (IMAGES.astype(np.float32), IMAGES[:, 0], IMAGES[:0], IMAGES.reshape(37, 1, 784)):
        with pytest.raises(ValueError, match=r"uint8 \[N, 1, 28, 28\]"):
            session.run(bad)
    # Non-contiguous views are fine: run() makes them contiguous.
    np.testing.assert_allclose(session.run(IMAGES[::2]), session.run(IMAGES[::2].copy()), atol=TOLERANCE)


def test_provider_selection_here() -> None:
    # ONNX Runtime's own name for its CPU provider, one this installation has, whatever GPU is present.
    assert resolve_device("cpu") == "CPUExecutionProvider" in ort.get_available_providers()
    assert resolve_device("auto") == ("CUDAExecutionProvider" if HAS_CUDA else "CPUExecutionProvider")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without a usable GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="--device cuda.*(onnxruntime-gpu|no CUDA GPU)"):
        resolve_device("cuda")
    with pytest.raises(DeviceError):
        ModelSession(linear_model(tmp_path / "m.onnx"), RuntimeOptions(device="cuda"))


def test_cuda_only_options_are_ignored_on_cpu(cnn_path: Path) -> None:
    session = ModelSession(cnn_path, RuntimeOptions(device="cpu", cuda_graphs=True))
    assert session.provider == CPU and session.bucket_sizes == () and session.cuda_graph_sizes == ()
    assert session.run(IMAGES).shape == (37, 10)


def test_default_buckets_are_powers_of_two_up_to_the_max_batch() -> None:
    assert default_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_sizes(1) == (1,)
    assert default_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)


@pytest.mark.parametrize(
    ("n", "sizes", "expected"),
    [
        (1, (1, 2, 4, 8), [(0, 1, 1)]),
        (3, (1, 2, 4, 8), [(0, 3, 4)]),
        (8, (1, 2, 4, 8), [(0, 8, 8)]),
        (19, (1, 2, 4, 8), [(0, 8, 8), (8, 16, 8), (16, 19, 4)]),
        (16, (1, 2, 4, 8), [(0, 8, 8), (8, 16, 8)]),
        (5, (8,), [(0, 5, 8)]),
    ],
)
def test_chunks_pad_each_batch_into_the_smallest_bucket_that_holds_it(n, sizes, expected) -> None:
    runs = chunks(n, sizes)
    assert runs == expected
    covered = [i for start, stop, _ in runs for i in range(start, stop)]
    assert covered == list(range(n))  # every image once, in order
    assert all(stop - start <= size for start, stop, size in runs)


def test_buckets_on_cpu_give_the_unbucketed_results_in_order(cnn_path: Path) -> None:
    plain = ModelSession(cnn_path, RuntimeOptions(device="cpu"))
    bucketed = ModelSession(cnn_path, RuntimeOptions(device="cpu", batch_buckets=(8, 1, 4, 8)))
    assert bucketed.bucket_sizes == (1, 4, 8) and bucketed.provider == CPU
    bucketed.warm_up([])
    for n in (1, 3, 4, 5, 8, 19, 37):  # exact fits, padded, and chunked past the largest bucket
        np.testing.assert_allclose(bucketed.run(IMAGES[:n]), plain.run(IMAGES[:n]), atol=TOLERANCE)
    # Padding rows never leak: a batch padded with real images first and zeros later answers the same.
    np.testing.assert_allclose(bucketed.run(IMAGES[5:8]), plain.run(IMAGES[5:8]), atol=TOLERANCE)


def test_cuda_provider_options_name_the_gpu_only_when_it_is_not_the_default() -> None:
    default = cuda_provider_options(RuntimeOptions(device="cpu"), enable_cuda_graph=True)
    assert "device_id" not in default  # ORT 1.31 logs a warning for every session given one
    assert default == {"cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"}
    second = cuda_provider_options(RuntimeOptions(device_id=1, cudnn_conv_algo_search="EXHAUSTIVE"), False)
    assert second == {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "0", "device_id": "1"}


@pytest.mark.parametrize(
    "bad",
    [
        {"device": "gpu"},
        {"intra_op_threads": -1},
        {"execution_mode": "eager"},
        {"cudnn_conv_algo_search": "FAST"},
        {"batch_buckets": (0, 8)},
        {"device_id": -1},
    ],
)
def test_options_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        RuntimeOptions(**bad)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "options",
    [
        RuntimeOptions(device="cuda"),
        RuntimeOptions(device="cuda", cuda_graphs=False),
        RuntimeOptions(device="cuda", cudnn_conv_algo_search="EXHAUSTIVE"),
        RuntimeOptions(device="cuda", batch_buckets=(1, 8, 16)),
    ],
    ids=["graphs", "no-graphs", "exhaustive", "custom-buckets"],
)
def test_cuda_matches_cpu(cnn_path: Path, options: RuntimeOptions) -> None:
    want = ModelSession(cnn_path, RuntimeOptions(device="cpu")).run(IMAGES)
    session = ModelSession(cnn_path, options, max_batch_size=16)
    assert session.provider == CUDA
    assert session.bucket_sizes == (options.batch_buckets or (1, 2, 4, 8, 16))
    assert session.cuda_graph_sizes == (session.bucket_sizes if options.cuda_graphs else ())
    session.warm_up([])
    # 37 > the largest bucket (16): chunked; 5 pads up to 8; the same buffers are reused across calls.
    for _ in range(2):
        np.testing.assert_allclose(session.run(IMAGES), want, atol=1e-4)
        np.testing.assert_allclose(session.run(IMAGES[:5]), want[:5], atol=1e-4)
        np.testing.assert_allclose(session.run(IMAGES[5:6]), want[5:6], atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_buckets_serve_concurrent_callers_correctly(cnn_path: Path) -> None:
    """Several threads at once, as the batcher's instances call it: each bucket is run (and was captured)
    by its own thread, so no capture happens at serving time and every caller gets its own rows."""
    want = ModelSession(cnn_path, RuntimeOptions(device="cpu")).run(IMAGES)
    session = ModelSession(cnn_path, RuntimeOptions(device="cuda"), max_batch_size=16)
    assert session.cuda_graph_sizes == session.bucket_sizes
    errors: list = []

    def call(k: int) -> None:
        for i in range(40):
            n = 1 + (k + i) % 16
            start = (k * 3 + i) % (len(IMAGES) - n)
            got = session.run(IMAGES[start : start + n])
            if not np.allclose(got, want[start : start + n], atol=1e-4):
                errors.append((k, i, n))

    threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.cuda
@needs_cuda
def test_auto_picks_cuda_when_present(cnn_path: Path) -> None:
    assert resolve_device("auto") == CUDA
    session = ModelSession(cnn_path, RuntimeOptions())
    assert session.provider == CUDA and session.bucket_sizes == (1, 2, 4, 8, 16, 32, 64)


def test_only_a_model_that_runs_a_few_images_quickly_runs_them_on_the_event_loop(tmp_path, mnist):
    """warm_up times a run of INLINE_IMAGES images: a small model runs its small batches on the caller's
    thread; a model slow enough to hold every other request up (here ~2 ms for 4 images) never does."""
    weights = helpers.fitted_weights(mnist.train_images[:2000], mnist.train_labels[:2000])
    fast = helpers.add_model(tmp_path / "fast", "fast", helpers.linear_model(weights, normalise=True))
    slow = helpers.add_model(tmp_path / "slow", "slow", helpers.slow_model(weights, width=1024))
    sessions = {name: ModelSession(path, RuntimeOptions(device="cpu")) for name, path in
                (("fast", fast), ("slow", slow))}  # fmt: skip
    assert {name: s.inline_images for name, s in sessions.items()} == {"fast": 0, "slow": 0}  # not yet warm
    for session in sessions.values():
        session.warm_up([1, 8])
    assert sessions["fast"].inline_images == INLINE_IMAGES
    assert sessions["slow"].inline_images == 0
