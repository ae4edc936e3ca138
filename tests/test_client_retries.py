"""The clients' one retry layer (serving.channels): what is resent, how often, and that a failing server gets
fewer calls, not more; and mnist-bench, which resends only when asked and counts every attempt, over gRPC
and over HTTP.

The servers here are a real gRPC server and a real aiohttp server on loopback that answer every call with
one status and count the calls they received (gRPC's `grpc-previous-rpc-attempts` header marks a resend): a
server that fails every call is the condition under test, and mnist-serve cannot be held in it.
"""

import asyncio
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import pytest
from aiohttp import web

from serving.bench.apis import build_workload
from serving.bench.loadgen import Connection, Level, RunSpec, run
from serving.channels import RETRY_POLICY, RetryPolicy
from serving.client import MnistClient


class RefusingServer:
    """Answers every ModelInfer and Classify call with `code`; records each call's resend number."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.calls: list[int] = []  # per call received: 0 for a first attempt, n for the n-th resend
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(self._refuse)
        self._server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),
            grpc.method_handlers_generic_handler("mnist.v1.Classifier", {"Classify": handler}),
        ])  # fmt: skip
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def _refuse(self, request: bytes, context: grpc.ServicerContext) -> None:
        resend = int(dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts", 0))
        with self._lock:
            self.calls.append(resend)
        context.abort(self.code, "refused by the test server")

    def stop(self) -> None:
        self._server.stop(None)


@pytest.fixture
def refusing(request):
    server = RefusingServer(request.param)
    yield server
    server.stop()


def attempts_under_throttle(policy: RetryPolicy, calls: int) -> list[int]:
    """Attempts per call for `calls` calls on one channel whose every attempt fails with a retryable
    status, by gRFC A6: a failed attempt takes a token; no resend while tokens <= max_tokens / 2."""
    tokens, attempts = float(policy.max_tokens), []
    for _ in range(calls):
        n = 0
        while True:
            n += 1
            tokens -= 1
            if n == policy.max_attempts or tokens <= policy.max_tokens / 2:
                break
        attempts.append(n)
    return attempts


@pytest.mark.parametrize("refusing", [grpc.StatusCode.UNAVAILABLE], indirect=True)
@pytest.mark.parametrize("connections", [1, 4])
def test_the_default_clients_resends_stop_when_the_throttles_tokens_are_gone(refusing, mnist, connections):
    calls_per_channel = 12
    with MnistClient(refusing.target, connections=connections) as client:
        for _ in range(calls_per_channel * connections):
            with pytest.raises(grpc.RpcError) as refused:
                client.classify(mnist.test_images[0])
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    expected = attempts_under_throttle(RETRY_POLICY, calls_per_channel)
    assert expected[0] == RETRY_POLICY.max_attempts and expected[-1] == 1  # retried, then not at all
    # The budget is each channel's own: every channel of the client spends it once.
    assert len(refusing.calls) == sum(expected) * connections
    assert Counter(refusing.calls) == Counter(
        resend for n in expected for resend in range(n) for _ in range(connections)
    )
    # Without the throttle every call would have been sent max_attempts times.
    assert len(refusing.calls) < calls_per_channel * connections * RETRY_POLICY.max_attempts / 2


@pytest.mark.parametrize(
    "refusing",
    [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED],
    indirect=True,
)
def test_the_default_client_never_resends_a_refusal_or_an_ambiguous_failure(refusing, mnist):
    """A full server must not get more calls; CANCELLED and DEADLINE_EXCEEDED may come from a call that a
    model computed."""
    with MnistClient(refusing.target, connections=1) as client:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as refused:
                client.classify(mnist.test_images[0])
            assert refused.value.code() == refusing.code
    assert refusing.calls == [0] * 5


def _spec(target: str, workload, retries: int) -> RunSpec:
    return RunSpec(
        workload, Connection((target,)), Level(concurrency=2), start_at=time.time(), warmup_s=0.0,
        duration_s=10.0, max_requests=40, retries=retries,
    )  # fmt: skip


@pytest.mark.parametrize("refusing", [grpc.StatusCode.UNAVAILABLE], indirect=True)
def test_mnist_bench_resends_only_when_asked_and_counts_every_attempt(refusing, mnist):
    workload = build_workload("kserve", False, "mnist", "", mnist.test_images, mnist.test_labels, 1, 8)

    once = run(_spec(refusing.target, workload, retries=0))
    assert once.status == once.attempts == once.all_attempts == {"UNAVAILABLE": 40}
    assert refusing.calls == [0] * 40  # no resend by gRPC either

    refusing.calls.clear()
    retried = run(_spec(refusing.target, workload, retries=2))
    assert retried.status == {"UNAVAILABLE": 40}  # 40 requests, each failed in the end
    attempts = retried.attempts["UNAVAILABLE"]
    assert attempts == retried.all_attempts["UNAVAILABLE"] == len(refusing.calls)  # every attempt counted
    # Resent, within the clients' retry budget: at most max_tokens / 2 resends before the throttle closes.
    assert 40 < attempts <= 40 + RETRY_POLICY.max_tokens / 2
    assert set(refusing.calls) == {0}  # the generator resends itself: to gRPC each attempt is a first one


class RefusingHttpServer:
    """Answers every POST with the HTTP status `status` and the REST front end's error body, on its own event
    loop in a thread; counts the requests it received. GET (the generator's connection check) answers 200."""

    def __init__(self, status: int) -> None:
        self.status, self.calls = status, 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.target = f"127.0.0.1:{self.runner.addresses[0][1]}"

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._refuse)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    async def _refuse(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.Response()
        await request.read()
        self.calls += 1
        return web.json_response({"error": "refused by the test server"}, status=self.status)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def refusing_http(request):
    server = RefusingHttpServer(request.param)
    yield server
    server.stop()


@pytest.mark.parametrize("refusing_http", [503], indirect=True)
def test_over_http_mnist_bench_resends_a_503_only_when_asked_and_counts_every_attempt(refusing_http, mnist):
    workload = build_workload(
        "kserve", False, "mnist", "", mnist.test_images, mnist.test_labels, 1, 8, protocol="http"
    )
    once = run(_spec(refusing_http.target, workload, retries=0))
    assert once.status == once.attempts == once.all_attempts == {"HTTP_503": 40}
    assert refusing_http.calls == 40  # aiohttp resends nothing either

    refusing_http.calls = 0
    retried = run(_spec(refusing_http.target, workload, retries=2))
    assert retried.status == {"HTTP_503": 40}
    attempts = retried.attempts["HTTP_503"]
    assert attempts == retried.all_attempts["HTTP_503"] == refusing_http.calls
    assert 40 < attempts <= 40 + RETRY_POLICY.max_tokens / 2


@pytest.mark.parametrize("refusing_http", [429, 504], indirect=True)
def test_over_http_mnist_bench_never_resends_a_refusal(refusing_http, mnist):
    workload = build_workload(
        "classify", False, "mnist", "", mnist.test_images, mnist.test_labels, 1, 8, protocol="http"
    )
    result = run(_spec(refusing_http.target, workload, retries=2))
    name = f"HTTP_{refusing_http.status}"
    assert result.status == result.attempts == {name: 40} and refusing_http.calls == 40
