"""What every RPC of both APIs shares: admission, deadlines, the per-request bookkeeping, pipelined streams.

`Handling.run` wraps one request's work: admission (RESOURCE_EXHAUSTED at once when this process already
handles its limit of requests), the in-flight gauge, the latency timer, the request counter by status, and
the outcome. A RequestError becomes its own status; any other exception becomes INTERNAL with one log line,
and is counted like any failure, so a bug answers one request with an error instead of breaking a stream or
skipping the metrics. `compute` is the batched middle of every inference request: the batcher, the
response, and Triton's statistics. `Handling.stream` runs a stream: pipelined, bounded, ended when idle.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np

from serving.batcher import BatchResult
from serving.errors import RequestError, reject
from serving.metrics import Metrics
from serving.repository import LoadedVersion, ModelRepository

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def check_image_count(n: int, limit: int) -> None:
    """The per-request image limit (--max-images-per-request) of every API."""
    if n > limit:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{n} images in one request, above the limit of {limit}"
        )


class Admission:
    """How many requests this process handles at once, over every API, stream and protocol
    (--max-concurrent-rpcs).

    Requests are counted, not calls: a unary call from its handler's start to its answer, a stream's request
    from its reading to its answer. An idle stream holds none of the budget (gRPC's own
    maximum_concurrent_rpcs counts calls, so idle streams could lock every unary call out). Past the limit
    a request is refused at once with RESOURCE_EXHAUSTED: the server is full, and an automatic resend
    would only add to it (HTTP: 429). Shared by the APIs and front ends of one process.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.inflight = 0

    def full(self) -> RequestError:
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server full: {self.inflight} requests in progress (limit {self.limit}); retry later, back off",
        )


class Handling:
    """The bookkeeping around each request of one API (`api` labels the metrics) arriving over one
    protocol (`protocol`: grpc, or http for the REST front end in serving.http)."""

    def __init__(
        self,
        api: str,
        metrics: Metrics,
        repository: ModelRepository,
        protocol: str = "grpc",
        *,
        admission: Admission | None = None,
    ) -> None:
        self.api = api
        self.protocol = protocol
        self.metrics = metrics
        self.repository = repository
        self.admission = admission or Admission()
        # Requests this API began and answered (OK or an error status): the log of a shutdown states both,
        # so that no accepted request can go unanswered unseen.
        self.started = 0
        self.answered = 0

    async def run(self, model: str, version: str, work: Awaitable[Response]) -> Response | RequestError:
        """Await `work`; return its response, or the RequestError the client must get."""
        start = time.perf_counter()
        self.started += 1
        admission = self.admission
        if admission.limit is not None and admission.inflight >= admission.limit:
            _discard(work)
            outcome: Response | RequestError = admission.full()
        else:
            admission.inflight += 1
            self.metrics.inflight.inc()
            try:
                outcome = await work
            except RequestError as e:
                # Without its traceback: the traceback holds this frame, which holds the error, a reference
                # cycle that only the cyclic garbage collector frees, and it would keep the request's
                # message (megabytes, for a refused large request) alive until it runs (docs/reliability.md,
                # defect 1).
                outcome = e.with_traceback(None)
            except Exception as e:  # a bug: answer this request, keep serving the others
                what = f"{type(e).__name__}: {e}"
                log.error("event=internal_error api=%s model=%.80r error=%r", self.api, model, what)
                log.debug("internal error", exc_info=True)
                outcome = RequestError(
                    grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); see the server log"
                )
            finally:
                admission.inflight -= 1
                self.metrics.inflight.dec()
        self.answered += 1
        seconds = time.perf_counter() - start
        failed = isinstance(outcome, RequestError)
        known = self.repository.known(model)
        status = outcome.code.name if failed else "OK"
        model_label = model if known else "unknown"  # bounded labels
        self.metrics.request_done(model_label, self.api, status, seconds, self.protocol)
        if failed and known:
            loaded = self.repository.find(model, version)
            if loaded is not None:
                loaded.statistics.record_failure(int(seconds * 1e9))
        return outcome

    async def unary(
        self, context: grpc.aio.ServicerContext, model: str, version: str, work: Awaitable[Response]
    ) -> Response | None:
        """`run` for a unary RPC: an error ends the call with its status (the handler then returns None)."""
        outcome = await self.run(model, version, work)
        if isinstance(outcome, RequestError):
            return reject(context, outcome)
        return outcome

    async def stream(
        self,
        requests: AsyncIterator[Request],
        context: grpc.aio.ServicerContext,
        readers: "StreamReaders",
        answer: Callable[[Request, float | None], Awaitable[Response]],
    ) -> AsyncIterator[Response]:
        """A streaming RPC: `answer(request, deadline)` makes each response (it goes through `run`, so a
        failed request becomes a stream message and the stream goes on), pipelined (see `pipelined`). A
        stream beyond `readers.limit` is refused; one left idle past `readers.idle_seconds` is ended."""
        if readers.limit is not None and len(readers) >= readers.limit:
            reject(context, RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server full: {len(readers)} streams open (limit {readers.limit}); retry later, back off",
            ))  # fmt: skip
            return
        deadline = deadline_of(context)
        try:
            async for response in pipelined(requests, lambda request: answer(request, deadline), readers):
                yield response
        except RequestError as e:
            reject(context, e.with_traceback(None))


async def compute(
    loaded: LoadedVersion,
    images: np.ndarray,
    deadline: float | None,
    started_ns: int,
    respond: Callable[[BatchResult], Response],
) -> Response:
    """Run validated `images` through the model's batcher and build the response with `respond`; record the
    request in Triton's statistics (total, queue, input = validation since `started_ns`, infer, output)."""
    decoded = time.perf_counter_ns()
    result = await loaded.batcher.submit(images, deadline)
    answered = time.perf_counter_ns()
    response = respond(result)
    done = time.perf_counter_ns()
    loaded.statistics.record_success(
        len(images), done - started_ns, int(result.queue_seconds * 1e9), decoded - started_ns,
        int(result.compute_seconds * 1e9), done - answered,
    )  # fmt: skip
    return response


class _GenericOnly:
    """A server as the generated add_*Servicer_to_server functions see it: handlers become generic ones."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        pass  # the same handlers were added as generic ones


def generic_only(server: grpc.aio.Server) -> _GenericOnly:
    """Pass this instead of the server to add_*Servicer_to_server: the service's methods are served through
    generic handlers only. grpc.aio keeps one pending request per registered method and, for every call it
    accepts, waits on all of them at once (asyncio.wait): with the 16 methods of both APIs and health, every
    call paid for 17 futures (benchmarks/serving.md). A generic handler costs one dict lookup."""
    return _GenericOnly(server)


def _discard(work: Awaitable) -> None:
    """Drop work that will never be awaited (a coroutine: close it, a future: cancel it)."""
    close = getattr(work, "close", None) or getattr(work, "cancel", None)
    if close is not None:
        close()


class StreamReaders:
    """The reading side of every open stream, so that a shutdown can stop them: each stream then
    answers the requests it has read and ends with OK (a request it never read was never accepted).
    Otherwise streams would be read until the grace period ran out, then cancelled mid-request.

    `idle_seconds`: a stream with nothing in flight that sends no request for that long is ended (with
    DEADLINE_EXCEEDED), so that forgotten or dead clients' streams do not stay open forever. None: never.
    `limit`: streams open at once; a stream beyond it is refused at once with RESOURCE_EXHAUSTED.
    """

    def __init__(self, idle_seconds: float | None = None, limit: int | None = None) -> None:
        self.idle_seconds = idle_seconds
        self.limit = limit
        self._reading: set[asyncio.Task] = set()
        self.closed = False

    def add(self, reader: asyncio.Task) -> None:
        if self.closed:
            reader.cancel()
            return
        self._reading.add(reader)
        reader.add_done_callback(self._reading.discard)

    def __len__(self) -> int:
        return len(self._reading)  # streams open and being read

    def close(self) -> None:
        self.closed = True
        for reader in list(self._reading):
            reader.cancel()


class _IdleTimer:
    """Ends a stream's reading once nothing was in flight for `seconds`: one timer per stream, re-armed
    lazily, so that each request costs two assignments."""

    def __init__(self, seconds: float, reader: asyncio.Task) -> None:
        self.seconds = seconds
        self.reader = reader
        self.unanswered = 0
        self.expired = False
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._handle = self._loop.call_later(seconds, self._check)

    def _check(self) -> None:
        remaining = self.last + self.seconds - self._loop.time()
        if self.unanswered or remaining > 0:
            self._handle = self._loop.call_later(remaining if remaining > 0 else self.seconds, self._check)
            return
        self.expired = True
        self.reader.cancel()

    def answered(self) -> None:
        self.unanswered -= 1
        self.last = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()


async def pipelined(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Response]],
    readers: StreamReaders,
    depth: int = 64,
) -> AsyncIterator[Response]:
    """Answer a stream's requests concurrently, so a client pipelining on one stream gets batched,
    but yield the responses in request order. At most `depth` requests of one stream are in flight
    (then the stream stops being read: flow control pushes back on the client). `answer` turns every
    failure into a response (through Handling.run), so one bad request never ends the stream. A stream
    idle for `readers.idle_seconds` raises RequestError(DEADLINE_EXCEEDED) once everything read is answered.
    """
    started: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(depth)
    idle: _IdleTimer | None = None

    async def read() -> None:
        # readers.close() or the idle timer cancels this while it waits for a slot or for the next request,
        # never between reading a request and queueing its answer: nothing read goes unanswered.
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    return
                if idle is not None:
                    idle.unanswered += 1
                started.put_nowait(asyncio.ensure_future(answer(request)))
        finally:
            started.put_nowait(None)

    reader = asyncio.ensure_future(read())
    readers.add(reader)
    if readers.idle_seconds is not None:
        idle = _IdleTimer(readers.idle_seconds, reader)
    try:
        while (task := await started.get()) is not None:
            yield await task
            slots.release()
            if idle is not None:
                idle.answered()
        if idle is not None and idle.expired:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"stream idle for {idle.seconds:g} s (--stream-idle-timeout): ended; open a new stream",
            )
        if not reader.cancelled():  # cancelled = stopped by a shutdown: the stream ends with OK
            await reader  # re-raises if the request stream broke
    finally:
        reader.cancel()
        if idle is not None:
            idle.cancel()
        while not started.empty():
            task = started.get_nowait()
            if task is not None:
                task.cancel()
