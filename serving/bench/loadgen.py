"""The load generator: closed loop (fixed concurrency) and open loop (fixed rate) over grpc.aio, or over
HTTP with aiohttp's client (serving.bench.rest).

The hot path only sends pre-serialized request bytes and appends one record per attempt to a list;
decoding and checking every reply happens after the run, outside the measured window. Each call is sent
once: gRPC's retries are off (aiohttp has none), and a request is resent only with `RunSpec.retries`
(serving.bench.retries), each attempt recorded. `run` is the entry point of one generator process; the CLI
may start several.
"""

import asyncio
import gc
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from serving import eventloop
from serving.bench.apis import BadResponse, InBandError, Workload, check, decode
from serving.bench.connection import Connection
from serving.bench.rest import HttpClients
from serving.bench.retries import STREAM_CLOSED, Retrier

# Unanswered requests are cancelled only this long after their own deadline could have ended them, so a
# late reply is recorded as the DEADLINE_EXCEEDED it got, not as a CANCELLED of the generator's making.
DEADLINE_MARGIN_S = 2.0

# One attempt: the request's scheduled/first send time, done, request index, status, reply (bytes over gRPC,
# body and header over HTTP), attempt number (0: the first send), and whether it is the request's last.
Record = tuple[float, float, int, str, Any, int, bool]
# Sends one request with a deadline in seconds; returns (reply, "OK") or (None, the failure's status).
Send = Callable[[Any, float], Awaitable[tuple[Any, str]]]


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
    retries: int = 0  # resends of a request that failed with a retryable status (serving.bench.retries)


@dataclass
class RunResult:
    latency_s: np.ndarray  # valid replies to requests sent in the measured window, first send to answer
    status: Counter = field(default_factory=Counter)  # final outcome of every measured request
    attempts: Counter = field(default_factory=Counter)  # every attempt of the measured requests, by status
    all_attempts: Counter = field(default_factory=Counter)  # every attempt of the level, warm-up included
    images: int = 0  # images in valid replies
    correct: int = 0  # of those, predicted label == true label
    window_s: float = 0.0
    scheduled: int = 0  # open loop: sends scheduled in the window
    late: int = 0  # open loop: sends that left more than late_after_s after their scheduled time
    unsent: int = 0  # open loop: sends skipped because max_outstanding requests were in flight
    max_lag_s: float = 0.0  # open loop: worst delay between scheduled and actual send
    cpu_s: float = 0.0  # CPU time the generator process(es) used for the level, warm-up included
    sent: int = 0  # attempts sent, warm-up included (cpu_s / sent = generator cost per attempt)
    # From the window's start: when the last measured request succeeded, and when the failures began that
    # nothing succeeded after (None: the last request answered succeeded). A dead server shows as both.
    answered_until_s: float | None = None
    failing_since_s: float | None = None

    @staticmethod
    def merge(results: "list[RunResult]") -> "RunResult":
        merged = RunResult(np.concatenate([r.latency_s for r in results]))
        for r in results:
            for counts in ("status", "attempts", "all_attempts"):
                getattr(merged, counts).update(getattr(r, counts))
            merged.images += r.images
            merged.correct += r.correct
            merged.scheduled += r.scheduled
            merged.late += r.late
            merged.unsent += r.unsent
            merged.max_lag_s = max(merged.max_lag_s, r.max_lag_s)
            merged.cpu_s += r.cpu_s
            merged.sent += r.sent
        merged.window_s = max(r.window_s for r in results)
        answered = [r.answered_until_s for r in results if r.answered_until_s is not None]
        merged.answered_until_s = max(answered) if answered else None
        failing = [r.failing_since_s for r in results]
        # Failing only if every process ended failing: one that still got answers saw a live server.
        merged.failing_since_s = None if None in failing else max(failing)
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


class _GrpcClients:
    """gRPC: `connections` channels per target (serving.channels), each call on the next one."""

    def __init__(self, connection: Connection, method: str) -> None:
        self.connection, self.method = connection, method
        self.channels = connection.channels()

    async def open(self, timeout_s: float) -> None:
        for channel in self.channels:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout_s)
            except TimeoutError:
                targets = ", ".join(self.connection.targets)
                raise ConnectionError(f"cannot connect to {targets} within {timeout_s:g} s") from None

    def senders(self) -> list[Send]:
        return [_grpc_sender(c.unary_unary(self.method), self.connection.metadata()) for c in self.channels]

    def streams(self) -> list:
        return [c.stream_stream(self.method) for c in self.channels]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def _grpc_sender(call, metadata) -> Send:
    async def send(request: bytes, timeout_s: float) -> tuple[bytes | None, str]:
        try:
            return await call(request, timeout=timeout_s, metadata=metadata), "OK"
        except grpc.aio.AioRpcError as error:
            return None, error.code().name

    return send


Clients = _GrpcClients | HttpClients


def _clients(spec: RunSpec) -> Clients:
    """The connections of the workload's protocol, not open yet."""
    if spec.workload.protocol == "http":
        return HttpClients(spec.connection, spec.workload.method)
    return _GrpcClients(spec.connection, spec.workload.method)


async def _run(spec: RunSpec) -> RunResult:
    clients = _clients(spec)
    try:
        await clients.open(spec.timeout_s)
        # Align with the other generator processes on the wall clock, then work on perf_counter.
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        t0, cpu = time.perf_counter(), time.process_time()
        records: list[Record] = []
        window = _Window(t0, spec)
        result = RunResult(np.empty(0))
        retry = Retrier(spec.retries, seed=spec.seed)
        if spec.level.concurrency:
            await _closed_loop(spec, clients, window, records, retry)
        else:
            await _open_loop(spec, clients, window, records, result, retry)
        result.cpu_s = time.process_time() - cpu
    finally:
        await clients.close()
    return _tally(spec, window, records, result)


async def _closed_loop(
    spec: RunSpec, clients: Clients, window: _Window, records: list[Record], retry: Retrier
) -> None:
    pick = itertools.count(spec.seed * 7919)
    if spec.workload.stream:
        calls, worker = clients.streams(), _closed_stream
    else:
        calls, worker = clients.senders(), _closed_unary
    tasks = [
        asyncio.create_task(worker(calls[w % len(calls)], window, pick, records.append, spec, retry))
        for w in range(spec.level.concurrency)
    ]
    await _finish(tasks, window, spec)


async def _closed_unary(send: Send, window, pick, record: Callable, spec: RunSpec, retry: Retrier) -> None:
    requests = spec.workload.requests
    n = len(requests)
    while window.may_send(t0 := time.perf_counter()):
        i = next(pick) % n
        await _unary_request(send, requests[i], t0, i, record, spec.timeout_s, retry)


async def _unary_request(
    send: Send, request, due: float, i: int, record: Callable, timeout_s: float, retry: Retrier
) -> None:
    """One request: its attempts, each recorded, within one deadline counted from the first send."""
    attempt, deadline = 0, time.perf_counter() + timeout_s
    try:
        while True:
            reply, status = await send(request, deadline - time.perf_counter())
            delay = retry.after(status, attempt, deadline - time.perf_counter())
            record((due, time.perf_counter(), i, status, reply, attempt, delay is None))
            if delay is None:
                return
            attempt += 1
            await asyncio.sleep(delay)
    except asyncio.CancelledError:  # still unanswered long after the window: count it, then stop
        record((due, time.perf_counter(), i, "CANCELLED", None, attempt, True))
        raise


async def _closed_stream(call, window, pick, record: Callable, spec: RunSpec, retry: Retrier) -> None:
    requests, md = spec.workload.requests, spec.connection.metadata()
    n, stream = len(requests), None
    while window.may_send(t0 := time.perf_counter()):
        i, attempt = next(pick) % n, 0
        while True:
            try:
                stream = stream or call(metadata=md)
                await stream.write(requests[i])
                reply = await stream.read()
                if reply is grpc.aio.EOF:
                    reply, status, stream = None, STREAM_CLOSED, None
                else:
                    status = "OK"
            except grpc.aio.AioRpcError as error:
                reply, status = None, error.code().name
                if stream is not None:
                    stream.cancel()
                stream = None  # the next attempt opens a new stream
            except asyncio.CancelledError:
                record((t0, time.perf_counter(), i, "CANCELLED", None, attempt, True))
                raise
            delay = retry.after(status, attempt)
            record((t0, time.perf_counter(), i, status, reply, attempt, delay is None))
            if delay is None:
                break
            attempt += 1
            await asyncio.sleep(delay)
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
    spec: RunSpec,
    clients: Clients,
    window: _Window,
    records: list[Record],
    result: RunResult,
    retry: Retrier,
) -> None:
    level, wl = spec.level, spec.workload
    measured_s = spec.max_requests / level.rate if spec.max_requests else spec.duration_s
    offsets = schedule(level, spec.warmup_s + measured_s, spec.seed, spec.phase)
    window.end = window.begin + measured_s
    if wl.stream:
        sender = _StreamSender(clients.streams(), spec, records, retry)
    else:
        sender = _UnarySender(clients.senders(), spec, records, retry)
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
    """Open loop, unary: one task per request (its attempts included), latency from its scheduled time."""

    def __init__(self, senders: list[Send], spec: RunSpec, records: list[Record], retry: Retrier) -> None:
        self.senders, self.requests, self.timeout = senders, spec.workload.requests, spec.timeout_s
        self.record, self.retry, self.tasks, self.sent = records.append, retry, set(), 0

    @property
    def outstanding(self) -> int:
        return len(self.tasks)

    def send(self, due: float, i: int) -> None:
        send = self.senders[self.sent % len(self.senders)]
        self.sent += 1
        task = asyncio.create_task(
            _unary_request(send, self.requests[i], due, i, self.record, self.timeout, self.retry)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout_s)
        for task in list(self.tasks):
            task.cancel()


class _StreamSender:
    """Open loop, streaming: requests go round-robin over a few streams. A stream answers in order, so
    its reader matches replies to the queue of scheduled times (reply ids are checked afterwards)."""

    def __init__(self, calls: list, spec: RunSpec, records: list[Record], retry: Retrier) -> None:
        md, requests = spec.connection.metadata(), spec.workload.requests
        self.lanes = [
            _StreamLane(calls[s % len(calls)], md, requests, records.append, retry)
            for s in range(spec.level.streams)
        ]
        self.sent = 0

    @property
    def outstanding(self) -> int:
        return sum(len(lane.pending) + len(lane.waiting) for lane in self.lanes)

    def send(self, due: float, i: int) -> None:
        self.lanes[self.sent % len(self.lanes)].send(due, i)
        self.sent += 1

    async def drain(self, timeout_s: float) -> None:
        deadline = time.perf_counter() + timeout_s
        while self.outstanding and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(lane.close() for lane in self.lanes))


class _StreamLane:
    """One stream: a writer task feeding it in order (grpc.aio allows one write at a time) and a reader.
    When the stream breaks, the requests it had not answered are resent on a new one (with retries)."""

    def __init__(self, call, md, requests: tuple[bytes, ...], record: Callable, retry: Retrier) -> None:
        self.call, self.md, self.requests, self.record, self.retry = call, md, requests, record, retry
        self.pending: deque[tuple[float, int, int]] = deque()  # (due, request index, attempt) in order
        self.waiting: dict[tuple[float, int], tuple[asyncio.TimerHandle, int]] = {}  # resends in back-off
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.stream = None

    def send(self, due: float, i: int, attempt: int = 0) -> None:
        if self.stream is None:  # first use, or the last stream broke
            self.stream, self.queue = self.call(metadata=self.md), asyncio.Queue()
            self.tasks += [
                asyncio.create_task(self._write(self.stream, self.queue)),
                asyncio.create_task(self._read(self.stream)),
            ]
        self.pending.append((due, i, attempt))
        self.queue.put_nowait(i)

    def _resend(self, due: float, i: int, attempt: int) -> None:
        del self.waiting[(due, i)]
        self.send(due, i, attempt)

    async def _write(self, stream, queue: asyncio.Queue) -> None:
        try:
            while True:
                await stream.write(self.requests[await queue.get()])
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the reader sees the broken stream and fails what is pending

    async def _read(self, stream) -> None:
        status = STREAM_CLOSED
        try:
            while (reply := await stream.read()) is not grpc.aio.EOF:
                due, i, attempt = self.pending.popleft()
                self.retry.after("OK", attempt)
                self.record((due, time.perf_counter(), i, "OK", reply, attempt, True))
        except grpc.aio.AioRpcError as error:
            status = error.code().name
        if self.stream is stream:
            self.stream = None
            now, loop = time.perf_counter(), asyncio.get_running_loop()
            while self.pending:
                due, i, attempt = self.pending.popleft()
                delay = self.retry.after(status, attempt)
                self.record((due, now, i, status, None, attempt, delay is None))
                if delay is not None:
                    handle = loop.call_later(delay, self._resend, due, i, attempt + 1)
                    self.waiting[(due, i)] = (handle, attempt + 1)

    async def close(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        now = time.perf_counter()
        for (due, i), (handle, attempt) in self.waiting.items():
            handle.cancel()  # a resend still in its back-off is never sent: its request ends here
            self.record((due, now, i, "CANCELLED", None, attempt, True))
        self.waiting.clear()
        while self.pending:
            due, i, attempt = self.pending.popleft()
            self.record((due, now, i, "CANCELLED", None, attempt, True))


def _tally(spec: RunSpec, window: _Window, records: list[Record], result: RunResult) -> RunResult:
    """Check every reply, count every attempt, and collect the latencies of the measured window's valid
    replies."""
    wl, latencies, last_done = spec.workload, [], window.begin
    result.sent = len(records)
    outcomes = []  # (done, ok) of the measured requests
    for due, done, i, status, reply, _attempt, final in records:
        measured = window.begin <= due < window.end
        answered = status  # what the server answered, as its own metrics count it
        if status == "OK" and (measured or wl.stream):  # in-band stream errors count for the server too
            try:
                probabilities, reply_id = decode(wl, reply) if spec.check else (None, "")
                if reply_id and reply_id != str(i):
                    raise BadResponse("WRONG_REPLY_ID")
                if spec.check and measured:
                    result.correct += check(probabilities, wl.labels[i])
            except InBandError as error:  # the server answered this request of the stream with an error
                status = answered = error.args[0]
            except BadResponse as bad:  # the server answered OK, but not with a valid answer
                status = bad.args[0]
        result.all_attempts[answered] += 1
        if not measured:
            continue
        result.attempts[status] += 1
        if not final:
            continue
        result.status[status] += 1
        outcomes.append((done, status == "OK"))
        if status == "OK":
            result.images += len(wl.labels[i])
            latencies.append(done - due)
            last_done = max(last_done, done)
    result.latency_s = np.asarray(latencies, dtype=np.float64)
    if spec.max_requests and spec.level.concurrency:
        result.window_s = max(last_done - window.begin, 1e-9)
    elif spec.level.concurrency:
        result.window_s = window.end - window.begin
    else:  # open loop: a server that falls behind answers the window's requests later, at a lower rate
        result.window_s = max(window.end, last_done) - window.begin
    _liveness(result, outcomes, window.begin)
    return result


def _liveness(result: RunResult, outcomes: list[tuple[float, bool]], begin: float) -> None:
    """When the last request succeeded, and since when nothing has (see RunResult)."""
    outcomes.sort()
    ok_times = [done for done, ok in outcomes if ok]
    result.answered_until_s = ok_times[-1] - begin if ok_times else None
    after = [done for done, ok in outcomes if not ok and (not ok_times or done > ok_times[-1])]
    result.failing_since_s = after[0] - begin if after else None
