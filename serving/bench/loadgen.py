"""The load generator: closed loop (fixed concurrency) and open loop (fixed rate) over grpc.aio.

The hot path only sends pre-serialized request bytes and appends (send time, done time, request index,
status, reply bytes) to a list; decoding and checking every reply happens after the run, outside the
measured window. `run` is the entry point of one generator process; the CLI may start several.
"""

import asyncio
import gc
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from serving import eventloop
from serving.bench.apis import BadResponse, Workload, check, decode
from serving.channels import open_aio_channel

# Unanswered requests are cancelled only this long after their own deadline could have ended them, so a
# late reply is recorded as the DEADLINE_EXCEEDED it got, not as a CANCELLED of the generator's making.
DEADLINE_MARGIN_S = 2.0

Record = tuple[float, float, int, str, bytes | None]  # scheduled/sent, done, request index, status, reply


@dataclass(frozen=True)
class Connection:
    """Where and how to connect: targets, each over `connections` channels (calls go round-robin over all
    of them, see serving.channels), optional TLS and bearer token."""

    targets: tuple[str, ...]
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None
    token: str | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    connections: int = 1

    def channel(self, target: str) -> grpc.aio.Channel:
        credentials = None
        if self.root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(
                self.root_certificates, self.private_key, self.certificate_chain
            )
        return open_aio_channel(target, self.max_message_bytes, credentials, self.server_name)

    def channels(self) -> list[grpc.aio.Channel]:
        return [self.channel(t) for t in self.targets for _ in range(self.connections)]

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


@dataclass(frozen=True)
class Level:
    """One load level: closed loop when concurrency > 0, else open loop at `rate` requests/s."""

    concurrency: int = 0
    rate: float = 0.0
    arrivals: str = "constant"  # or "poisson"
    streams: int = 4  # open loop with --stream: requests are spread over this many streams

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency else f"rate={self.rate:g}"


@dataclass(frozen=True)
class RunSpec:
    workload: Workload
    connection: Connection
    level: Level
    start_at: float  # wall clock (time.time()) at which the warm-up begins, shared by all processes
    warmup_s: float
    duration_s: float  # the measured window, unless max_requests bounds it
    max_requests: int = 0
    timeout_s: float = 10.0
    late_after_s: float = 0.002  # open loop: a send this much after its scheduled time counts as late
    max_outstanding: int = 10_000  # open loop: beyond this many requests in flight, sends are skipped
    seed: int = 0
    phase: float = 0.0  # open loop, constant arrivals: fraction of an interval to shift this process by
    check: bool = True  # False for the echo floor, whose replies are not probabilities


@dataclass
class RunResult:
    latency_s: np.ndarray  # valid replies to requests sent in the measured window
    status: Counter = field(default_factory=Counter)  # outcome of every measured request
    images: int = 0  # images in valid replies
    correct: int = 0  # of those, predicted label == true label
    window_s: float = 0.0
    scheduled: int = 0  # open loop: sends scheduled in the window
    late: int = 0  # open loop: sends that left more than late_after_s after their scheduled time
    unsent: int = 0  # open loop: sends skipped because max_outstanding requests were in flight
    max_lag_s: float = 0.0  # open loop: worst delay between scheduled and actual send
    cpu_s: float = 0.0  # CPU time the generator process(es) used for the level, warm-up included
    sent: int = 0  # requests sent, warm-up included (cpu_s / sent = generator cost per request)

    @staticmethod
    def merge(results: "list[RunResult]") -> "RunResult":
        merged = RunResult(np.concatenate([r.latency_s for r in results]))
        for r in results:
            merged.status.update(r.status)
            merged.images += r.images
            merged.correct += r.correct
            merged.scheduled += r.scheduled
            merged.late += r.late
            merged.unsent += r.unsent
            merged.max_lag_s = max(merged.max_lag_s, r.max_lag_s)
            merged.cpu_s += r.cpu_s
            merged.sent += r.sent
        merged.window_s = max(r.window_s for r in results)
        return merged


class _Window:
    """Decides whether a request may still be sent and whether it is measured (not warm-up)."""

    def __init__(self, t0: float, spec: RunSpec) -> None:
        self.begin = t0 + spec.warmup_s
        self.end = math.inf if spec.max_requests else self.begin + spec.duration_s
        self.left = spec.max_requests or -1

    def may_send(self, now: float) -> bool:
        if now >= self.end:
            return False
        if self.left >= 0 and now >= self.begin:
            if self.left == 0:
                return False
            self.left -= 1
        return True


def run(spec: RunSpec) -> RunResult:
    """Run one load level in this process (blocking) and return its checked figures."""
    # The records list grows by one tuple per request; a full GC pass over it in the middle of the run
    # would stall every client at once, so the collector is off until the level is over.
    gc.collect()
    gc.disable()
    try:
        return eventloop.run(_run(spec))
    finally:
        gc.enable()


async def _run(spec: RunSpec) -> RunResult:
    channels = spec.connection.channels()
    try:
        for channel in channels:
            try:
                await asyncio.wait_for(channel.channel_ready(), spec.timeout_s)
            except TimeoutError:
                targets = ", ".join(spec.connection.targets)
                raise ConnectionError(f"cannot connect to {targets} within {spec.timeout_s:g} s") from None
        # Align with the other generator processes on the wall clock, then work on perf_counter.
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        t0, cpu = time.perf_counter(), time.process_time()
        records: list[Record] = []
        window = _Window(t0, spec)
        result = RunResult(np.empty(0))
        if spec.level.concurrency:
            await _closed_loop(spec, channels, window, records)
        else:
            await _open_loop(spec, channels, window, records, result)
        result.cpu_s = time.process_time() - cpu
    finally:
        for channel in channels:
            await channel.close()
    return _tally(spec, window, records, result)


async def _closed_loop(
    spec: RunSpec, channels: list[grpc.aio.Channel], window: _Window, records: list[Record]
) -> None:
    wl, md = spec.workload, spec.connection.metadata()
    pick = itertools.count(spec.seed * 7919)
    if wl.stream:
        calls = [c.stream_stream(wl.method) for c in channels]
        worker = _closed_stream
    else:
        calls = [c.unary_unary(wl.method) for c in channels]
        worker = _closed_unary
    tasks = [
        asyncio.create_task(
            worker(calls[w % len(calls)], wl.requests, window, pick, records.append, md, spec)
        )
        for w in range(spec.level.concurrency)
    ]
    await _finish(tasks, window, spec)


async def _closed_unary(call, requests, window, pick, record: Callable, md, spec: RunSpec) -> None:
    n, timeout = len(requests), spec.timeout_s
    while window.may_send(t0 := time.perf_counter()):
        i = next(pick) % n
        try:
            reply, status = await call(requests[i], timeout=timeout, metadata=md), "OK"
        except grpc.aio.AioRpcError as error:
            reply, status = None, error.code().name
        except asyncio.CancelledError:  # still unanswered long after the window: count it, then stop
            record((t0, time.perf_counter(), i, "CANCELLED", None))
            raise
        record((t0, time.perf_counter(), i, status, reply))


async def _closed_stream(call, requests, window, pick, record: Callable, md, spec: RunSpec) -> None:
    n, stream = len(requests), None
    while window.may_send(t0 := time.perf_counter()):
        i = next(pick) % n
        try:
            stream = stream or call(metadata=md)
            await stream.write(requests[i])
            reply = await stream.read()
            if reply is grpc.aio.EOF:
                reply, status, stream = None, "STREAM_CLOSED", None
            else:
                status = "OK"
        except grpc.aio.AioRpcError as error:
            reply, status = None, error.code().name
            if stream is not None:
                stream.cancel()
            stream = None  # the next request opens a new stream
        except asyncio.CancelledError:
            record((t0, time.perf_counter(), i, "CANCELLED", None))
            raise
        record((t0, time.perf_counter(), i, status, reply))
    if stream is not None:
        await stream.done_writing()


async def _finish(tasks: list[asyncio.Task], window: _Window, spec: RunSpec) -> None:
    """Wait for the workers; requests still hanging past their deadline after the window are cancelled."""
    while True:
        left = window.end - time.perf_counter() + spec.timeout_s + DEADLINE_MARGIN_S
        done, pending = await asyncio.wait(tasks, timeout=min(left, 3600.0))
        if not pending or left <= 0:
            break
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def schedule(level: Level, seconds: float, seed: int, phase: float = 0.0) -> np.ndarray:
    """Send offsets (s from the start) for an open-loop level: constant spacing or Poisson arrivals."""
    count = int(math.ceil(seconds * level.rate))
    if level.arrivals == "poisson":
        # Enough gaps that their sum surely passes `seconds` (mean count + 6 standard deviations).
        gaps = np.random.default_rng(seed).exponential(
            1.0 / level.rate, size=count + 6 * math.isqrt(count) + 10
        )
        offsets = np.cumsum(gaps) - gaps[0]
    else:
        offsets = (np.arange(count) + phase) / level.rate
    return offsets[offsets < seconds]


async def _open_loop(
    spec: RunSpec, channels: list[grpc.aio.Channel], window: _Window, records: list[Record], result: RunResult
) -> None:
    level, wl = spec.level, spec.workload
    measured_s = spec.max_requests / level.rate if spec.max_requests else spec.duration_s
    offsets = schedule(level, spec.warmup_s + measured_s, spec.seed, spec.phase)
    window.end = window.begin + measured_s
    sender = (
        _StreamSender(wl, channels, spec, records) if wl.stream else _UnarySender(wl, channels, spec, records)
    )
    n, lags = len(wl.requests), []
    t0 = window.begin - spec.warmup_s
    for k, offset in enumerate(offsets):
        due = t0 + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        measured = due >= window.begin
        if sender.outstanding >= spec.max_outstanding:
            result.unsent += measured
            continue
        sender.send(due, (k + spec.seed * 7919) % n)
        if measured:
            result.scheduled += 1
            lags.append(time.perf_counter() - due)
    lag = np.asarray(lags)
    result.late = int((lag > spec.late_after_s).sum())
    result.max_lag_s = float(lag.max()) if len(lag) else 0.0
    await sender.drain(spec.timeout_s + DEADLINE_MARGIN_S)


class _UnarySender:
    """Open loop, unary: one task per request, latency from its scheduled send time."""

    def __init__(self, wl: Workload, channels: list[grpc.aio.Channel], spec: RunSpec, records: list[Record]):
        self.calls = [c.unary_unary(wl.method) for c in channels]
        self.requests, self.md, self.timeout = wl.requests, spec.connection.metadata(), spec.timeout_s
        self.record, self.tasks, self.sent = records.append, set(), 0

    @property
    def outstanding(self) -> int:
        return len(self.tasks)

    def send(self, due: float, i: int) -> None:
        call = self.calls[self.sent % len(self.calls)]
        self.sent += 1
        task = asyncio.create_task(self._one(call, due, i))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, call, due: float, i: int) -> None:
        try:
            reply, status = await call(self.requests[i], timeout=self.timeout, metadata=self.md), "OK"
        except grpc.aio.AioRpcError as error:
            reply, status = None, error.code().name
        except asyncio.CancelledError:
            self.record((due, time.perf_counter(), i, "CANCELLED", None))
            raise
        self.record((due, time.perf_counter(), i, status, reply))

    async def drain(self, timeout_s: float) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout_s)
        for task in list(self.tasks):
            task.cancel()


class _StreamSender:
    """Open loop, streaming: requests go round-robin over a few streams. A stream answers in order, so
    its reader matches replies to the queue of scheduled times (reply ids are checked afterwards)."""

    def __init__(self, wl: Workload, channels: list[grpc.aio.Channel], spec: RunSpec, records: list[Record]):
        calls = [c.stream_stream(wl.method) for c in channels]
        md = spec.connection.metadata()
        self.lanes = [
            _StreamLane(calls[s % len(calls)], md, wl.requests, records.append)
            for s in range(spec.level.streams)
        ]
        self.sent = 0

    @property
    def outstanding(self) -> int:
        return sum(len(lane.pending) for lane in self.lanes)

    def send(self, due: float, i: int) -> None:
        self.lanes[self.sent % len(self.lanes)].send(due, i)
        self.sent += 1

    async def drain(self, timeout_s: float) -> None:
        deadline = time.perf_counter() + timeout_s
        while self.outstanding and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(lane.close() for lane in self.lanes))


class _StreamLane:
    """One stream: a writer task feeding it in order (grpc.aio allows one write at a time) and a reader."""

    def __init__(self, call, md, requests: tuple[bytes, ...], record: Callable) -> None:
        self.call, self.md, self.requests, self.record = call, md, requests, record
        self.pending: deque[tuple[float, int]] = deque()
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.stream = None

    def send(self, due: float, i: int) -> None:
        if self.stream is None:  # first use, or the last stream broke
            self.stream, self.queue = self.call(metadata=self.md), asyncio.Queue()
            self.tasks += [
                asyncio.create_task(self._write(self.stream, self.queue)),
                asyncio.create_task(self._read(self.stream)),
            ]
        self.pending.append((due, i))
        self.queue.put_nowait(i)

    async def _write(self, stream, queue: asyncio.Queue) -> None:
        try:
            while True:
                await stream.write(self.requests[await queue.get()])
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the reader sees the broken stream and fails what is pending

    async def _read(self, stream) -> None:
        status = "STREAM_CLOSED"
        try:
            while (reply := await stream.read()) is not grpc.aio.EOF:
                due, i = self.pending.popleft()
                self.record((due, time.perf_counter(), i, "OK", reply))
        except grpc.aio.AioRpcError as error:
            status = error.code().name
        if self.stream is stream:
            self.stream = None
            now = time.perf_counter()
            while self.pending:
                due, i = self.pending.popleft()
                self.record((due, now, i, status, None))

    async def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        now = time.perf_counter()
        while self.pending:
            due, i = self.pending.popleft()
            self.record((due, now, i, "CANCELLED", None))


def _tally(spec: RunSpec, window: _Window, records: list[Record], result: RunResult) -> RunResult:
    """Check every reply of the measured window and collect latencies of the valid ones."""
    wl, latencies, last_done = spec.workload, [], window.begin
    result.sent = len(records)
    for due, done, i, status, reply in records:
        if due < window.begin or due >= window.end:
            continue
        if status == "OK":
            if spec.check:
                try:
                    labels = wl.labels[i]
                    probabilities, reply_id = decode(wl.api, wl.stream, reply)
                    if reply_id and reply_id != str(i):
                        raise BadResponse("WRONG_REPLY_ID")
                    result.correct += check(probabilities, labels)
                except BadResponse as bad:
                    status = bad.args[0]
            if status == "OK":
                result.images += len(wl.labels[i])
                latencies.append(done - due)
                last_done = max(last_done, done)
        result.status[status] += 1
    result.latency_s = np.asarray(latencies, dtype=np.float64)
    if spec.max_requests and spec.level.concurrency:
        result.window_s = max(last_done - window.begin, 1e-9)
    elif spec.level.concurrency:
        result.window_s = window.end - window.begin
    else:  # open loop: a server that falls behind answers the window's requests later, at a lower rate
        result.window_s = max(window.end, last_done) - window.begin
    return result
