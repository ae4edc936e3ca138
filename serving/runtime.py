"""ONNX Runtime sessions for serving: provider choice, threads, contract checks at load, warm-up.

CPU: a plain `InferenceSession.run` on the dynamic-batch graph, one ORT thread for small batches and a
second session of the same graph with --large-batch-threads for large ones, unless --batch-buckets asks for
padding.
CUDA: shape-stable batch buckets (serving.buckets), each a fixed-shape session with IO binding and, where
capture succeeds, a CUDA graph. Defaults were chosen by measurement; see benchmarks/serving.md.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.buckets import Buckets, FixedBatchSession, default_sizes
from serving.config import RuntimeOptions
from serving.contract import IMAGE_SHAPE, INPUT_NAME, INPUT_SHAPE_TEXT, NUM_CLASSES, OUTPUT_NAME
from serving.errors import first_line

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}


# The largest batch the batcher runs on the event loop thread rather than hand to its threads
# (serving.batcher): on CPU an ORT run of a few images of an MNIST-sized model costs less than the hand-offs
# (measured: benchmarks/serving.md).
INLINE_IMAGES = 4
# ...but only for a model whose run of INLINE_IMAGES images takes at most this long (the lower quartile of
# 25 runs at warm-up, where the other worker processes warm up on the same cores: contention only lengthens
# runs, and on an AVX2-only CPU the default model's median sat at the budget itself, so the choice flipped
# between workers): while it runs, the loop reads no request, so a slower model (a wide network, an
# ensemble) would hold every other request up and leave the queue to gRPC core instead of the batcher's
# limits.
INLINE_BUDGET_SECONDS = 250e-6


class ModelLoadError(Exception):
    """The file is not a loadable ONNX model or violates the serving I/O contract."""


class DeviceError(Exception):
    """The requested device cannot be used here."""


def cuda_device_count() -> int:
    """GPUs visible to the CUDA driver (honours CUDA_VISIBLE_DEVICES), 0 without one; no torch import."""
    try:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(device: str) -> str:
    """Map auto|cpu|cuda to an execution provider name; `cuda` without a usable GPU is a DeviceError."""
    if device == "cpu":
        return CPU
    if device not in ("auto", "cuda"):
        raise DeviceError(f"unknown device {device!r}: expected auto, cpu or cuda")
    has_cuda_ep = CUDA in ort.get_available_providers()
    gpus = cuda_device_count() if has_cuda_ep else 0
    if has_cuda_ep and gpus > 0:
        return CUDA
    if device == "auto":
        return CPU
    if not has_cuda_ep:
        raise DeviceError(
            f"--device cuda needs onnxruntime-gpu, but the installed onnxruntime {ort.__version__} has only "
            f"{', '.join(ort.get_available_providers())}; install the gpu extra (onnxruntime-gpu) instead of "
            "onnxruntime, or use --device cpu"
        )
    raise DeviceError(
        "--device cuda: onnxruntime-gpu is installed but no CUDA GPU is visible; use --device cpu"
    )


def _session_options(options: RuntimeOptions, intra_op_threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = options.intra_op_threads if intra_op_threads is None else intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = EXECUTION_MODES[options.execution_mode]
    spin = "1" if options.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3  # ORT warnings (e.g. nodes placed on CPU) would flood the server log
    return so


def cuda_provider_options(options: RuntimeOptions, enable_cuda_graph: bool) -> dict[str, str]:
    provider = {
        "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
        "enable_cuda_graph": "1" if enable_cuda_graph else "0",
    }
    if options.device_id:  # passing the default makes ORT 1.31 log a warning for every session
        provider["device_id"] = str(options.device_id)
    return provider


def _check_contract(session: ort.InferenceSession, path: Path) -> str | None:
    """Refuse a model that breaks the I/O contract; returns the batch dimension's name (None if unnamed)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        names = ", ".join(i.name for i in inputs)
        raise ModelLoadError(f"{path}: expected exactly one input named {INPUT_NAME!r}, found: {names}")
    image = inputs[0]
    batch, *rest = image.shape or [None]
    if image.type != "tensor(uint8)" or tuple(rest) != IMAGE_SHAPE or isinstance(batch, int):
        raise ModelLoadError(
            f"{path}: input {INPUT_NAME!r} must be uint8 {INPUT_SHAPE_TEXT} with dynamic N, "
            f"found {image.type} {image.shape}"
        )
    probs = next((o for o in outputs if o.name == OUTPUT_NAME), None)
    if probs is None:
        raise ModelLoadError(
            f"{path}: no output named {OUTPUT_NAME!r} (found {', '.join(o.name for o in outputs)})"
        )
    # A symbolic class dimension is accepted here; the probe run at load checks the real shape.
    fixed_wrong = len(probs.shape) == 2 and isinstance(probs.shape[1], int) and probs.shape[1] != NUM_CLASSES
    if probs.type != "tensor(float)" or len(probs.shape) != 2 or fixed_wrong:
        raise ModelLoadError(
            f"{path}: output {OUTPUT_NAME!r} must be float32 [N, {NUM_CLASSES}], "
            f"found {probs.type} {probs.shape}"
        )
    return batch if isinstance(batch, str) else None


class _CudaUnavailable(Exception):
    """A session asked for CUDA came up on CPU (ORT falls back when CUDA/cuDNN fail to load)."""


class ModelSession:
    """A loaded model that honours the serving contract. `run` is thread-safe; ORT releases the GIL.

    max_batch_size is the largest batch the server will run (config.pbtxt): it sets the default buckets.
    """

    def __init__(
        self, model_path: Path, options: RuntimeOptions = RuntimeOptions(), max_batch_size: int = 64
    ) -> None:
        self.path = Path(model_path)
        self.options = options
        self._inline_images = 0
        requested = resolve_device(options.device)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: model file not found")
        if requested == CUDA and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed that way
        try:
            self._load(requested, max_batch_size)
        except _CudaUnavailable:
            # ORT silently falls back to CPU when the CUDA/cuDNN libraries fail to load.
            if options.device == "cuda":
                raise DeviceError(
                    f"CUDAExecutionProvider failed to initialise for {self.path} (see ORT log)"
                ) from None
            log.warning("event=cuda_unavailable model=%s; serving it on CPU", self.path)
            self._load(CPU, max_batch_size)
        meta = self._session.get_modelmeta()
        self.metadata_props: dict[str, str] = dict(meta.custom_metadata_map)
        self.variant: str = self.metadata_props.get("variant", "fp32")

        # One probe run at load: a model whose declared I/O lies fails here, not on a user's request.
        probe = self.run(np.zeros((1, *IMAGE_SHAPE), np.uint8))
        if probe.shape != (1, NUM_CLASSES) or probe.dtype != np.float32 or not np.isfinite(probe).all():
            self.close()
            raise ModelLoadError(
                f"{self.path}: probe run on a blank image returned {probe.dtype} {list(probe.shape)} "
                f"{probe.ravel()[:NUM_CLASSES]}, expected finite float32 [1, {NUM_CLASSES}] probabilities"
            )

    def _load(self, provider: str, max_batch_size: int) -> None:
        """Open the sessions for `provider`."""
        sizes = self.options.batch_buckets or (default_sizes(max_batch_size) if provider == CUDA else ())
        # The dynamic-batch session checks the contract and reads metadata; it runs batches only when there
        # are no buckets (on CUDA every run goes through a bucket).
        cuda = [(CUDA, cuda_provider_options(self.options, False)), CPU]
        self._session = self._open(cuda if provider == CUDA and not sizes else [CPU])
        batch_dim = _check_contract(self._session, self.path)
        self._buckets: Buckets | None = None
        self._large_batch_session: ort.InferenceSession | None = None
        if provider == CPU and not sizes and self._large_batches_get_other_threads():
            so = _session_options(self.options, self.options.large_batch_threads)
            self._large_batch_session = self._open([CPU], so)
        if sizes:
            if batch_dim is None:
                raise ModelLoadError(
                    f"{self.path}: batch buckets need a named batch dimension on {INPUT_NAME!r}"
                )
            self._buckets = self._open_buckets(sizes, batch_dim, provider)
        elif self._session.get_providers()[0] != provider:
            raise _CudaUnavailable
        self.provider = provider

    def _large_batches_get_other_threads(self) -> bool:
        """Whether --large-batch-threads differs from what every run has: not when turned off, nor when the
        runs already have a thread per core (--intra-op-threads 0)."""
        o = self.options
        return (
            bool(o.large_batch_images)
            and o.intra_op_threads != 0
            and o.large_batch_threads != o.intra_op_threads
        )

    @property
    def inline_images(self) -> int:
        """The largest batch worth running on the caller's thread, decided by warm_up: INLINE_IMAGES for a
        model that runs them within INLINE_BUDGET_SECONDS; 0 before warm-up, for a slower model, and with
        buckets (CUDA), whose runs go to a bucket's own thread anyway and may wait for the GPU."""
        return self._inline_images

    @property
    def bucket_sizes(self) -> tuple[int, ...]:
        return self._buckets.sizes if self._buckets else ()

    @property
    def cuda_graph_sizes(self) -> tuple[int, ...]:
        return self._buckets.cuda_graphs if self._buckets else ()

    def _open(self, providers: list, so: ort.SessionOptions | None = None) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(self.path), so or _session_options(self.options), providers=providers
            )
        except Exception as e:  # ORT raises several types (Fail, InvalidGraph, InvalidProtobuf...)
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model: {first_line(e)}") from e

    def _open_buckets(self, sizes: tuple[int, ...], batch_dim: str, requested: str) -> Buckets:
        def make_session(size: int, cuda_graph: bool) -> ort.InferenceSession:
            so = _session_options(self.options)
            # The batch dimension fixed: shape arithmetic folds away and every node can land on the GPU.
            so.add_free_dimension_override_by_name(batch_dim, size)
            if requested != CUDA:
                return self._open([CPU], so)
            session = self._open([(CUDA, cuda_provider_options(self.options, cuda_graph)), CPU], so)
            if session.get_providers()[0] != CUDA:
                raise _CudaUnavailable
            return session

        device = "cuda" if requested == CUDA else "cpu"
        gpu, graphs, buckets = self.options.device_id, self.options.cuda_graphs, Buckets(sizes, {})
        try:
            for size in sizes:
                buckets.add(FixedBatchSession(size, make_session, device, gpu, graphs, self.path))
        except BaseException:
            buckets.close()  # the buckets opened so far: their threads end
            raise
        return buckets

    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,1,28,28] -> float32 probabilities [N,10]."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or not len(images):
            raise ValueError(
                f"expected uint8 {INPUT_SHAPE_TEXT} with N >= 1, got {images.dtype} {list(images.shape)}"
            )
        if self._buckets is not None:
            return self._buckets.run(images)
        session = self._session
        if self._large_batch_session is not None and len(images) >= self.options.large_batch_images:
            session = self._large_batch_session
        return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})[0]

    def close(self) -> None:
        """Stop the bucket threads; the session is not run afterwards."""
        if self._buckets is not None:
            self._buckets.close()

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run every bucket, or else each given batch size, once: the first run at a new shape is slow."""
        if self._buckets is not None:
            self._buckets.warm_up()
            return
        for n in sorted(set(batch_sizes)):
            self.run(np.zeros((n, *IMAGE_SHAPE), np.uint8))
        self._inline_images = INLINE_IMAGES if self._inline_run_seconds() <= INLINE_BUDGET_SECONDS else 0

    def _inline_run_seconds(self, runs: int = 25) -> float:
        images = np.zeros((INLINE_IMAGES, *IMAGE_SHAPE), np.uint8)
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            self.run(images)
            times.append(time.perf_counter() - began)
        return statistics.quantiles(times, n=4)[0]
