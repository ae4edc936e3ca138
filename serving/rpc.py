"""What every RPC of both APIs shares: deadlines, the per-request bookkeeping, and pipelined streams.

`Handling.run` wraps one request's work: the in-flight gauge, the latency timer, the request counter by
status, and the outcome. A RequestError becomes its own status; any other exception becomes INTERNAL with
one log line, and is counted like any failure, so a bug answers one request with an error instead of
breaking a stream or skipping the metrics.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from serving.errors import RequestError, reject
from serving.metrics import Metrics
from serving.repository import ModelRepository

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Handling:
    """The bookkeeping around each request of one API (`api` labels the metrics) arriving over one
    protocol (`protocol`: grpc, or http for the REST front end in serving.http)."""

    def __init__(
        self, api: str, metrics: Metrics, repository: ModelRepository, protocol: str = "grpc"
    ) -> None:
        self.api = api
        self.protocol = protocol
        self.metrics = metrics
        self.repository = repository
        # Requests this API began and answered (OK or an error status): the log of a shutdown states both,
        # so that no accepted request can go unanswered unseen.
        self.started = 0
        self.answered = 0

    async def run(self, model: str, version: str, work: Awaitable[Response]) -> Response | RequestError:
        """Await `work`; return its response, or the RequestError the client must get."""
        start = time.perf_counter()
        self.started += 1
        self.metrics.inflight.inc()
        try:
            outcome = await work
        except RequestError as e:
            # Without its traceback: the traceback holds this frame, which holds the error, a reference
            # cycle that only the cyclic garbage collector frees, and it would keep the request's message
            # (megabytes, for a refused large request) alive until it runs (docs/reliability.md, defect 1).
            outcome = e.with_traceback(None)
        except Exception as e:  # a bug: answer this request, keep serving the others
            what = f"{type(e).__name__}: {e}"
            log.error("event=internal_error api=%s model=%.80r error=%r", self.api, model, what)
            log.debug("internal error", exc_info=True)
            outcome = RequestError(
                grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); see the server log"
            )
        finally:
            self.metrics.inflight.dec()
        self.answered += 1
        seconds = time.perf_counter() - start
        status = outcome.code.name if isinstance(outcome, RequestError) else "OK"
        known = self.repository.known(model)
        model_label = model if known else "unknown"  # bounded labels
        self.metrics.request_done(model_label, self.api, status, seconds, self.protocol)
        if isinstance(outcome, RequestError) and known:
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


class StreamReaders:
    """The reading side of every open stream, so that a shutdown can stop them: each stream then
    answers the requests it has read and ends with OK (a request it never read was never accepted).
    Otherwise streams would be read until the grace period ran out, then cancelled mid-request."""

    def __init__(self) -> None:
        self._reading: set[asyncio.Task] = set()
        self.closed = False

    def add(self, reader: asyncio.Task) -> None:
        if self.closed:
            reader.cancel()
            return
        self._reading.add(reader)
        reader.add_done_callback(self._reading.discard)

    def close(self) -> None:
        self.closed = True
        for reader in list(self._reading):
            reader.cancel()


async def pipelined(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Response]],
    readers: StreamReaders,
    depth: int = 64,
) -> AsyncIterator[Response]:
    """Answer a stream's requests concurrently, so a client pipelining on one stream gets batched,
    but yield the responses in request order. At most `depth` requests of one stream are in flight
    (then the stream stops being read: flow control pushes back on the client). `answer` turns every
    failure into a response (through Handling.run), so one bad request never ends the stream.
    """
    started: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(depth)

    async def read() -> None:
        # readers.close() cancels this while it waits for a slot or for the next request, never between
        # reading a request and queueing its answer: nothing read goes unanswered.
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    return
                started.put_nowait(asyncio.ensure_future(answer(request)))
        finally:
            started.put_nowait(None)

    reader = asyncio.ensure_future(read())
    readers.add(reader)
    try:
        while (task := await started.get()) is not None:
            yield await task
            slots.release()
        if not reader.cancelled():  # cancelled = stopped by a shutdown: the stream ends with OK
            await reader  # re-raises if the request stream broke
    finally:
        reader.cancel()
        while not started.empty():
            task = started.get_nowait()
            if task is not None:
                task.cancel()
