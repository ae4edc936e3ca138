"""Shape-stable batches: every batch is padded up to one of a few fixed sizes, each with its own session.

Why: ONNX Runtime's cuDNN convolution re-plans whenever its input shape differs from the previous run's, and
a dynamic batcher emits batches of 1, 3, 5, 2... images, so nearly every batch paid for a new plan; concurrent
runs of one session also contend for its convolution state. With buckets each session only ever sees one
shape: plans are made once, at warm-up, and on CUDA each bucket is captured once as a CUDA graph and then
replayed.

Each bucket's session is run by one thread of its own, always the same one: ONNX Runtime keeps a captured
CUDA graph in the per-thread state of the thread that ran the session, and captures on that thread's third
run, so a session run from several threads would capture several graphs, at serving time. The capture
itself runs in CUDA's global capture mode, where a CUDA call from any other thread of the process makes it
fail; the process-wide `CaptureGate` therefore lets a capture happen only while no other bucket runs.

Padding rows are zeros. Images are independent rows of the batch, so padding never changes the real rows'
probabilities; the padded rows are computed and dropped. A batch larger than the largest bucket runs as
chunks of that bucket.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.contract import IMAGE_SHAPE, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from serving.errors import first_line

log = logging.getLogger(__name__)

# ORT captures a bucket's graph on a thread's third run: two regular runs allocate its memory first.
RUNS_TO_CAPTURE = 3


class CaptureGate:
    """Runs share the gate; a CUDA graph capture takes it alone (see the module docstring)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self._capturing = False

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        with self._changed:
            while self._capturing:
                self._changed.wait()
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                if not self._running:
                    self._changed.notify_all()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with self._changed:
            while self._capturing or self._running:
                self._changed.wait()
            self._capturing = True
        try:
            yield
        finally:
            with self._changed:
                self._capturing = False
                self._changed.notify_all()


CUDA_GATE = CaptureGate()  # one per process: CUDA's global capture mode is process-wide


def default_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to max_batch_size, and max_batch_size: padding never wastes half a batch or more."""
    sizes = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k <= max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def chunks(n: int, sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, stop, bucket size) runs covering n images: full chunks of the largest bucket, then the
    smallest bucket that holds the rest."""
    largest = sizes[-1]
    runs = [(start, start + largest, largest) for start in range(0, n - n % largest, largest)]
    rest = n % largest
    if rest:
        runs.append((n - rest, n, next(size for size in sizes if size >= rest)))
    return runs


class FixedBatchSession:
    """One bucket: a session whose batch dimension is fixed to `size`, run on padded input by its own thread.

    On CUDA the input and output live in device buffers allocated once and bound once (IO binding), which a
    CUDA graph requires: the graph replays against fixed addresses. `make_session(size, cuda_graph)` builds
    the ORT session; when graph capture fails, the bucket falls back to a plain CUDA run and logs why.
    """

    def __init__(
        self,
        size: int,
        make_session: Callable[[int, bool], ort.InferenceSession],
        device: str,
        device_id: int,
        cuda_graph: bool,
        path: Path,
    ) -> None:
        self.size = size
        self.cuda_graph = False
        self._host = np.zeros((size, *IMAGE_SHAPE), np.uint8)  # padded input; rows past n stay zero
        self._cuda = device == "cuda"
        self._device_id = device_id
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"bucket-{size}", daemon=True)
        self._thread.start()
        try:
            self._call(self._open, make_session, cuda_graph, path)
        except BaseException:
            self.close()
            raise

    def run(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 [n, 1, 28, 28] with n <= size -> float32 [n, 10], computed on the bucket's thread."""
        return self._call(self._run, images)

    def close(self) -> None:
        self._jobs.put(None)

    # -- on the bucket's own thread --------------------------------------------------------------------
    def _call(self, function: Callable, *args):
        done: Future = Future()
        self._jobs.put((function, args, done))
        return done.result()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, args, done = job
            try:
                done.set_result(function(*args))
            except BaseException as e:  # handed to the caller's thread
                done.set_exception(e)

    def _open(self, make_session: Callable, cuda_graph: bool, path: Path) -> None:
        if not self._cuda:
            self._session = make_session(self.size, False)
            return
        if cuda_graph:
            try:
                with CUDA_GATE.capture():
                    self._bind(make_session(self.size, True))
                    for _ in range(RUNS_TO_CAPTURE):
                        self._run_cuda(self.size)
                self.cuda_graph = True
                return
            except Exception as e:  # ORT raises its own types; any failure means: no graph for this bucket
                reason = first_line(e)
                log.warning(
                    "event=cuda_graph_unavailable model=%s bucket=%d reason=%r; running it without a graph",
                    path, self.size, reason,
                )  # fmt: skip
        self._bind(make_session(self.size, False))

    def _bind(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._device_input = ort.OrtValue.ortvalue_from_shape_and_type(
            self._host.shape, np.uint8, "cuda", self._device_id
        )
        self._device_output = ort.OrtValue.ortvalue_from_shape_and_type(
            (self.size, NUM_CLASSES), np.float32, "cuda", self._device_id
        )
        self._binding = session.io_binding()
        self._binding.bind_ortvalue_input(INPUT_NAME, self._device_input)
        self._binding.bind_ortvalue_output(OUTPUT_NAME, self._device_output)

    def _run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        self._host[:n] = images
        self._host[n:] = 0
        if not self._cuda:
            return self._session.run([OUTPUT_NAME], {INPUT_NAME: self._host})[0][:n]
        with CUDA_GATE.run():
            return self._run_cuda(n)

    def _run_cuda(self, n: int) -> np.ndarray:
        self._device_input.update_inplace(self._host)  # the graph reads this fixed device address
        self._session.run_with_iobinding(self._binding)
        return self._binding.copy_outputs_to_cpu()[0][:n].copy()


class Buckets:
    """A model's bucket sessions; `run` pads each batch into the right one."""

    def __init__(self, sizes: tuple[int, ...], sessions: dict[int, FixedBatchSession]) -> None:
        self.sizes = sizes
        self._sessions = sessions

    def add(self, session: FixedBatchSession) -> None:
        self._sessions[session.size] = session

    def run(self, images: np.ndarray) -> np.ndarray:
        runs = chunks(len(images), self.sizes)
        if len(runs) == 1:
            return self._sessions[runs[0][2]].run(images)
        return np.concatenate([self._sessions[size].run(images[a:b]) for a, b, size in runs])

    def warm_up(self) -> None:
        """Run every bucket once, full: cuDNN plans (and CUDA graphs) are made here, not on a request."""
        for size in self.sizes:
            self._sessions[size].run(np.zeros((size, *IMAGE_SHAPE), np.uint8))

    @property
    def cuda_graphs(self) -> tuple[int, ...]:
        return tuple(size for size in self.sizes if self._sessions[size].cuda_graph)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
