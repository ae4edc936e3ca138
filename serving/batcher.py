"""Dynamic batching: concurrent requests for one model version merged into one ONNX Runtime run.

submit() puts a request's images in a bounded queue and awaits its slice of the batch result. Batches are
whole requests, oldest first, up to max_batch_size images, and at most `instances` run at once.

With max_queue_delay 0 (Triton's default) a batch starts at once. The event loop forms it: the first
request queued in a loop iteration schedules one batch for the end of that iteration, so the requests
handled in the same iteration ride together. A batch of at most `inline_images` images runs right there
on the event loop thread: for a small batch of a fast model one ONNX Runtime run costs less than the two
thread hand-offs and GIL exchanges it would otherwise take (benchmarks/serving.md), and the requests that
arrive meanwhile wait in gRPC and form the next batch. A larger batch, or any batch while every instance
is busy, goes to one of the model's threads (one per instance), which run ORT (it releases the GIL) while
the event loop keeps accepting, and hand the results back with one call_soon_threadsafe per batch.

With max_queue_delay > 0 the threads wait for more requests until max_batch_size images are queued or the
oldest has waited max_queue_delay (to the microsecond; the event loop's timers have millisecond
resolution), then run the batch.

Requests larger than max_batch_size are split into max_batch_size chunks that batch like any other
request; the results are put back together in order. Requests whose deadline passed or whose caller
went away are dropped before compute. A failed run fails every request in it.
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from serving.contract import NUM_CLASSES
from serving.errors import RequestError
from serving.metrics import ModelMetrics
from serving.statistics import VersionStatistics


@dataclass(frozen=True)
class BatchResult:
    probabilities: np.ndarray  # float32 [n, NUM_CLASSES]
    queue_seconds: float  # enqueue -> start of the run (the slowest chunk for a split request)
    compute_seconds: float  # the ORT run (summed over chunks for a split request)


@dataclass(eq=False)
class _Pending:
    images: np.ndarray  # uint8 [n, 1, 28, 28]
    future: asyncio.Future
    deadline: float | None  # time.monotonic() value
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """Create it on the event loop that will call submit()."""

    def __init__(
        self,
        name: str,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_images: int,
        metrics: ModelMetrics,
        statistics: VersionStatistics,
        instances: int = 1,
        inline_images: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"{name}: max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_us < 0:
            raise ValueError(f"{name}: max_queue_delay must be >= 0 us, got {max_queue_delay_us}")
        if max_queue_images < max_batch_size:
            raise ValueError(
                f"{name}: a queue of {max_queue_images} images cannot hold a batch of {max_batch_size}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.max_queue_images = max_queue_images
        self.instances = instances
        # Batches the event loop runs itself; none when a delay asks the threads to wait for fuller ones.
        self.inline_images = min(inline_images, max_batch_size) if max_queue_delay_us == 0 else 0
        self._run = run
        self._metrics = metrics
        self._statistics = statistics
        self._loop = asyncio.get_running_loop()
        self._pending: deque[_Pending] = deque()
        self._pending_images = 0
        self._ready = threading.Condition()  # guards _pending, _pending_images, _closing, _running
        self._closing = False
        self._running = 0  # batches being computed, by the threads or the event loop
        self._flush_scheduled = False  # (event loop only)
        self._threads = [
            threading.Thread(target=self._work, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(instances)
        ]
        for thread in self._threads:
            thread.start()

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> BatchResult:
        """images: uint8 C-contiguous [n, 1, 28, 28]. Raises RequestError (RESOURCE_EXHAUSTED, ...)."""
        n = len(images)
        if n > self.max_queue_images:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{n} images in one request, above the {self.max_queue_images} that model {self.name}'s "
                "queue holds (--max-queue-images): send fewer per request",
            )
        chunks = [
            _Pending(images[i : i + self.max_batch_size], self._loop.create_future(), deadline)
            for i in range(0, n, self.max_batch_size)
        ]
        with self._ready:
            if self._closing or self._pending_images + n > self.max_queue_images:
                waiting, closing = self._pending_images, self._closing
            else:
                waiting = None
                self._pending.extend(chunks)
                self._pending_images += n
                self._metrics.queue_depth.inc(n)
                if not self.inline_images:
                    self._ready.notify()
                elif not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._flush)
        if waiting is not None:
            if closing:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {self.name} is being unloaded; retry")
            self._metrics.queue_full.inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {self.name}: queue full ({waiting} images waiting, limit {self.max_queue_images}); "
                "retry later",
            )
        if len(chunks) == 1:
            return await chunks[0].future
        parts = await asyncio.gather(*(c.future for c in chunks))
        return BatchResult(
            np.concatenate([p.probabilities for p in parts]),
            max(p.queue_seconds for p in parts),
            sum(p.compute_seconds for p in parts),
        )

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the threads."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        await asyncio.to_thread(lambda: [thread.join() for thread in self._threads])

    # -- on the event loop ------------------------------------------------------------------------------
    def _flush(self) -> None:
        """The end of a loop iteration in which requests were queued: run what is queued here if it is a
        small batch and an instance is free, else wake a thread to take it."""
        self._flush_scheduled = False
        with self._ready:
            if not self._pending:
                return  # a thread that came free took it
            if self._pending_images > self.inline_images or self._running >= self.instances:
                batches = -(-self._pending_images // self.max_batch_size)
                self._ready.notify(min(batches, self.instances))
                return
            batch, expired = self._take_batch()
            self._running += 1
        try:
            if expired:
                self._expire(expired)
            if batch:
                self._compute(batch, on_loop=True)
        finally:
            with self._ready:
                self._running -= 1

    # -- the batching threads ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closing:
                    self._ready.wait()
                if not self._pending:
                    return  # closing and drained
                if self.max_queue_delay > 0:
                    self._wait_for_more()
                batch, expired = self._take_batch()
                self._running += 1
            try:
                if expired:
                    self._loop.call_soon_threadsafe(self._expire, expired)
                if batch:
                    self._compute(batch)
            finally:
                with self._ready:
                    self._running -= 1

    def _wait_for_more(self) -> None:
        """(Holding the lock.) Wait until a full batch is queued or the oldest has waited max_queue_delay."""
        until = self._pending[0].enqueued + self.max_queue_delay
        while self._pending_images < self.max_batch_size and not self._closing:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._ready.wait(remaining)

    def _take_batch(self) -> tuple[list[_Pending], list[_Pending]]:
        """(Holding the lock.) Pop whole requests, oldest first, up to max_batch_size images.

        Returns (batch, expired); requests whose caller is gone are dropped and counted here.
        """
        batch: list[_Pending] = []
        expired: list[_Pending] = []
        size = taken = 0
        now = time.monotonic()
        while self._pending and size + len(self._pending[0].images) <= self.max_batch_size:
            p = self._pending.popleft()
            n = len(p.images)
            self._pending_images -= n
            taken += n
            late = p.deadline is not None and now > p.deadline
            if p.future.done():  # gRPC cancelled the call: the client went away or its deadline passed
                (self._metrics.deadline_expired if late else self._metrics.cancelled).inc()
            elif late:
                self._metrics.deadline_expired.inc()
                expired.append(p)
            else:
                batch.append(p)
                size += n
        self._metrics.queue_depth.dec(taken)  # once per batch: in multiprocess mode each update writes a file
        return batch, expired

    def _compute(self, batch: list[_Pending], on_loop: bool = False) -> None:
        started = time.monotonic()
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        concatenated = time.monotonic()
        try:
            probabilities = self._run(images)
            if probabilities.shape != (len(images), NUM_CLASSES):
                raise RuntimeError(f"model returned shape {probabilities.shape} for {len(images)} images")
        except Exception as e:
            error = RequestError(grpc.StatusCode.INTERNAL, f"model {self.name}: inference failed: {e}")
            if on_loop:
                self._fail(batch, error)
            else:
                self._loop.call_soon_threadsafe(self._fail, batch, error)
            return
        computed = time.monotonic()
        compute = computed - concatenated
        self._metrics.compute_latency.observe(compute)
        self._metrics.batch_size.observe(len(images))
        for p in batch:
            self._metrics.queue_latency.observe(started - p.enqueued)
        input_ns = int((concatenated - started) * 1e9)
        if on_loop:
            self._deliver(batch, probabilities, started, compute, input_ns)
        else:
            self._loop.call_soon_threadsafe(self._deliver, batch, probabilities, started, compute, input_ns)

    # -- back on the event loop -------------------------------------------------------------------------
    def _deliver(
        self, batch: list[_Pending], probabilities: np.ndarray, started: float, compute: float, input_ns: int
    ) -> None:
        split = time.perf_counter_ns()
        offset = 0
        for p in batch:
            n = len(p.images)
            if not p.future.done():
                p.future.set_result(
                    BatchResult(probabilities[offset : offset + n], started - p.enqueued, compute)
                )
            offset += n
        output_ns = time.perf_counter_ns() - split
        self._statistics.record_batch(len(probabilities), input_ns, int(compute * 1e9), output_ns)

    @staticmethod
    def _fail(batch: list[_Pending], error: RequestError) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(error)

    @staticmethod
    def _expire(expired: list[_Pending]) -> None:
        error = RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued; not computed")
        for p in expired:
            if not p.future.done():
                p.future.set_exception(error)
