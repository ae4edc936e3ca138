"""ONNX Runtime sessions for serving: provider choice, threads, contract checks, warm-up, CUDA fast path.

CPU: a plain `InferenceSession.run`. CUDA: IO binding (the input is copied to the GPU once, the output is
written into a buffer pre-allocated per batch size) and, optionally, CUDA graphs for fixed batch buckets.
Defaults were chosen by measurement; see benchmarks/variants.md.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.contract import IMAGE_SHAPE, INPUT_NAME, INPUT_SHAPE_TEXT, NUM_CLASSES, OUTPUT_NAME

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}
CUDNN_CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


class ModelLoadError(Exception):
    """The file is not a loadable ONNX model or violates the serving I/O contract."""


class DeviceError(Exception):
    """The requested device cannot be used here."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    # One intra-op thread per session: on a tiny CNN the pool's hand-off costs more than it saves, and the
    # server gets its parallelism from concurrent batches (measured: benchmarks/variants.md).
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    execution_mode: str = "sequential"  # the graph is a chain; "parallel" has nothing to overlap
    # Spinning threads wait hot for the next op and burn a core at low load; off unless measured to help.
    allow_spinning: bool = False
    # CUDA only (ignored on CPU):
    device_id: int = 0
    io_binding: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = ()  # e.g. (1, 8, 32, 128, 256); empty = no CUDA graphs
    # EXHAUSTIVE (ORT's default) benchmarks every new input shape, so with dynamic batching each first-seen
    # batch size stalls a request; HEURISTIC picks at once. EXHAUSTIVE pays off with fixed CUDA-graph buckets.
    cudnn_conv_algo_search: str = "HEURISTIC"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = one per core)")
        if self.execution_mode not in EXECUTION_MODES:
            raise ValueError(f"execution_mode must be sequential or parallel, got {self.execution_mode!r}")
        if self.cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCHES:
            raise ValueError(f"cudnn_conv_algo_search must be one of {', '.join(CUDNN_CONV_ALGO_SEARCHES)}")
        if any(size < 1 for size in self.cuda_graph_batch_sizes):
            raise ValueError(f"cuda_graph_batch_sizes must be positive, got {self.cuda_graph_batch_sizes}")
        object.__setattr__(self, "cuda_graph_batch_sizes", tuple(sorted(set(self.cuda_graph_batch_sizes))))


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


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = EXECUTION_MODES[options.execution_mode]
    spin = "1" if options.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    so.log_severity_level = 3  # ORT warnings (e.g. nodes placed on CPU) would flood the server log
    return so


def _cuda_provider_options(options: RuntimeOptions, enable_cuda_graph: bool) -> dict[str, str]:
    return {
        "device_id": str(options.device_id),
        "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
        "enable_cuda_graph": "1" if enable_cuda_graph else "0",
    }


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


class _CudaGraphBucket:
    """One captured CUDA graph for a fixed batch size: static device buffers, bound once, replayed per run.

    Each bucket has its own session with the batch dimension fixed, so the shape arithmetic of a dynamic
    graph folds away and every node lands on the GPU (a CUDA-graph requirement).
    """

    def __init__(self, model_path: Path, options: RuntimeOptions, batch_dim: str, size: int) -> None:
        so = _session_options(options)
        so.add_free_dimension_override_by_name(batch_dim, size)
        self.session = ort.InferenceSession(
            str(model_path), so, providers=[(CUDA, _cuda_provider_options(options, enable_cuda_graph=True))]
        )
        self.size = size
        self.host_input = np.zeros((size, *IMAGE_SHAPE), np.uint8)
        dev = ("cuda", options.device_id)
        self.device_input = ort.OrtValue.ortvalue_from_shape_and_type(self.host_input.shape, np.uint8, *dev)
        self.device_output = ort.OrtValue.ortvalue_from_shape_and_type((size, NUM_CLASSES), np.float32, *dev)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(INPUT_NAME, self.device_input)
        self.binding.bind_ortvalue_output(OUTPUT_NAME, self.device_output)
        self.lock = threading.Lock()  # one set of static buffers: replays must not interleave

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        with self.lock:
            # Pad up to the bucket; rows are independent, the padding rows are computed and dropped.
            self.host_input[:n] = images
            self.host_input[n:] = 0
            self.device_input.update_inplace(self.host_input)  # the graph reads this fixed device address
            self.session.run_with_iobinding(self.binding)
            return self.binding.copy_outputs_to_cpu()[0][:n].copy()


class ModelSession:
    """A loaded model that honours the serving contract. `run` is thread-safe; ORT releases the GIL."""

    def __init__(self, model_path: Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        self.path = Path(model_path)
        self.options = options
        requested = resolve_device(options.device)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: model file not found")
        providers: list = [CPU]
        if requested == CUDA:
            providers = [(CUDA, _cuda_provider_options(options, enable_cuda_graph=False)), CPU]
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed that way
        try:
            self._session = ort.InferenceSession(
                str(self.path), _session_options(options), providers=providers
            )
        except Exception as e:  # ORT raises several types (Fail, InvalidGraph, InvalidProtobuf...)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model: {first_line}") from e
        batch_dim = _check_contract(self._session, self.path)

        # ORT silently falls back to CPU when the CUDA/cuDNN libraries fail to load.
        self.provider: str = self._session.get_providers()[0]
        if requested == CUDA and self.provider != CUDA:
            if options.device == "cuda":
                raise DeviceError(f"CUDAExecutionProvider failed to initialise for {self.path} (see ORT log)")
            log.warning("CUDA unavailable at session creation, serving %s on CPU", self.path)

        meta = self._session.get_modelmeta()
        self.metadata_props: dict[str, str] = dict(meta.custom_metadata_map)
        self.variant: str = self.metadata_props.get("variant", "fp32")

        self._lock = threading.Lock()  # guards the shared IO binding and output buffers (CUDA only)
        self._binding = self._session.io_binding() if self.provider == CUDA and options.io_binding else None
        self._outputs: dict[int, ort.OrtValue] = {}
        self._buckets: list[_CudaGraphBucket] = []
        if options.cuda_graph_batch_sizes and self.provider == CUDA:
            if batch_dim is None:
                raise ModelLoadError(
                    f"{self.path}: CUDA graphs need a named batch dimension on {INPUT_NAME!r}"
                )
            try:
                self._buckets = [
                    _CudaGraphBucket(self.path, options, batch_dim, size)
                    for size in options.cuda_graph_batch_sizes
                ]
            except Exception as e:  # e.g. a node ORT cannot place on the GPU: capture is refused
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelLoadError(
                    f"{self.path}: CUDA graphs unavailable for this model ({first_line}); serve without them"
                ) from e
        elif options.cuda_graph_batch_sizes:
            log.info("cuda_graph_batch_sizes ignored: %s runs on %s", self.path, self.provider)

        # One probe run at load: a model whose declared I/O lies fails here, not on a user's request.
        probe = self.run(np.zeros((1, *IMAGE_SHAPE), np.uint8))
        if probe.shape != (1, NUM_CLASSES) or probe.dtype != np.float32 or not np.isfinite(probe).all():
            raise ModelLoadError(
                f"{self.path}: probe run on a blank image returned {probe.dtype} {list(probe.shape)} "
                f"{probe.ravel()[:NUM_CLASSES]}, expected finite float32 [1, {NUM_CLASSES}] probabilities"
            )

    def run(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,1,28,28] -> float32 probabilities [N,10]."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or not len(images):
            raise ValueError(
                f"expected uint8 {INPUT_SHAPE_TEXT} with N >= 1, got {images.dtype} {list(images.shape)}"
            )
        images = np.ascontiguousarray(images)
        if self._buckets:
            return self._run_graphs(images)
        if self._binding is not None:
            return self._run_bound(images)
        return self._session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    def _run_graphs(self, images: np.ndarray) -> np.ndarray:
        largest = self._buckets[-1]
        if len(images) > largest.size:  # beyond the largest bucket: run it in bucket-sized chunks
            chunks = range(0, len(images), largest.size)
            return np.concatenate([largest.run(images[i : i + largest.size]) for i in chunks])
        bucket = next(b for b in self._buckets if b.size >= len(images))
        return bucket.run(images)

    def _run_bound(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        with self._lock:
            if n not in self._outputs:  # at most max_batch_size small buffers, kept for reuse
                self._outputs[n] = ort.OrtValue.ortvalue_from_shape_and_type(
                    (n, NUM_CLASSES), np.float32, "cuda", self.options.device_id
                )
            self._binding.bind_cpu_input(INPUT_NAME, images)  # one host->device copy, no staging
            self._binding.bind_ortvalue_output(OUTPUT_NAME, self._outputs[n])
            self._session.run_with_iobinding(self._binding)
            return self._binding.copy_outputs_to_cpu()[0]

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run each batch size (and every CUDA-graph bucket) once: the first run at a new shape is slow."""
        for bucket in self._buckets:
            # ORT captures a CUDA graph only after a few regular runs; repeat so capture happens here.
            for _ in range(3):
                bucket.run(np.zeros((bucket.size, *IMAGE_SHAPE), np.uint8))
        for n in sorted(set(batch_sizes)):
            self.run(np.zeros((n, *IMAGE_SHAPE), np.uint8))
