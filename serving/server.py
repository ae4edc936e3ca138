"""One server process: the gRPC server (both APIs, health, reflection), the HTTP/REST front end beside it
(serving.http), its metrics, polling and shutdown.
`mnist-serve` (serving.cli) runs one of these, or with --workers N a supervisor (serving.supervisor) that
runs N of them side by side, each a worker joined to it by a link (serving.control).

Start-up of a single process: listen first (health NOT_SERVING, ServerReady false), load and warm every
model, then health SERVING. A worker process adopts the repository state the supervisor commits first and
listens after, so the kernel never hands a connection to a worker that cannot answer it yet. Shutdown
(SIGTERM/SIGINT): health NOT_SERVING, stop accepting, let in-flight requests finish within --grace seconds,
drain the batchers, exit 0.
"""

import asyncio
import gc
import logging
import time
from multiprocessing.connection import Connection

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.classify import ClassifierServicer
from serving.config import ServerConfig
from serving.control import Listening, LocalControl, WorkerControl
from serving.http.frontend import HttpFrontEnd
from serving.kserve import KServeServicer
from serving.metrics import Metrics
from serving.process import check_port, every, on_stop_signals, serve_metrics, startup_problem, stop_http
from serving.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2, classify_pb2_grpc
from serving.repository import ModelRepository, RepositoryError
from serving.rpc import Admission, Handling, StreamReaders, generic_only
from serving.runtime import resolve_device
from serving.security import TokenAuthInterceptor, read_token, server_credentials

log = logging.getLogger("serving")

SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Server:
    """One process's server. `link` makes it worker number `worker` of the supervisor: it then serves the
    repository state the supervisor commits in every worker, and leaves /metrics and --poll to it."""

    def __init__(self, config: ServerConfig, worker: int = 0, link: Connection | None = None) -> None:
        self.config = config
        self.worker = worker
        self.metrics = Metrics(worker)
        self.provider = resolve_device(config.runtime.device)
        self.repository = ModelRepository(config, self.metrics, self._set_health)
        self.health = health.aio.HealthServicer()
        self.streams = StreamReaders(config.stream_idle_seconds, config.max_streams)
        self.admission = Admission(config.max_concurrent_rpcs)  # shared by every API of this process
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._link = link
        self._control: LocalControl | WorkerControl | None = None
        self._grpc: grpc.aio.Server | None = None
        self._handlings: tuple[Handling, ...] = ()
        self._metrics_http = None
        self._http: HttpFrontEnd | None = None
        self._poller: asyncio.Task | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Listen, load and warm the models, report SERVING; returns the gRPC port (None for a worker
        stopped before it joined)."""
        c = self.config
        await self._set_health(False)
        if self._link is not None:
            stop = lambda: asyncio.ensure_future(self.stop())  # noqa: E731 - the supervisor went away
            self._control = WorkerControl(self._link, self.repository, stop)
            if not await self._control.join():
                return self.port
            freeze_startup_heap()
            await self._open_front_ends(reuse_port=True)
            self._log_listening()
            self._control.send(Listening())
            return self.port
        self._control = LocalControl(self.repository)
        await self._open_front_ends(reuse_port=False)
        if c.metrics_port >= 0:
            self._metrics_http = serve_metrics(self.metrics.registry, c.metrics_host, c.metrics_port)
            self.metrics_port = self._metrics_http.server_port
        self._log_listening()
        await self.repository.poll()  # sets health SERVING once a model is loaded and warm
        if problem := startup_problem(self.repository.state(), self.repository.root, c.poll_seconds):
            raise RepositoryError(problem)
        freeze_startup_heap()
        if c.poll_seconds:
            self._poller = asyncio.create_task(every(c.poll_seconds, self._poll))
        return self.port

    async def _poll(self) -> None:
        try:
            await self.repository.poll()
        except OSError as e:  # the repository directory itself vanished or is unreadable: keep serving
            log.error("event=poll_failed error=%r", str(e))

    # -- front ends: each starts accepting requests here and stops in _close_front_ends --------------------
    async def _open_front_ends(self, reuse_port: bool) -> None:
        c = self.config
        if not reuse_port:  # clean errors, before gRPC core logs its own about a taken port
            for port in (c.port, c.http.http_port if c.http.enabled else 0):
                if port:
                    check_port(c.host, port)
        self._listen(reuse_port)
        await self._grpc.start()
        if c.http.enabled:
            # The HTTP/REST front end (serving.http): same repository, control, limits and metrics as gRPC.
            self._http = HttpFrontEnd(
                c, self.repository, self._control, self.metrics, self.provider, self.admission
            )
            self.http_port = await self._http.start(reuse_port)
            self._handlings += self._http.handlings

    async def _close_front_ends(self) -> None:
        http_stopped = asyncio.ensure_future(self._http.stop()) if self._http else None  # beside gRPC's
        if self._grpc is not None:
            began = time.monotonic()
            await self._grpc.stop(self.config.grace_seconds)
            if time.monotonic() - began >= self.config.grace_seconds:
                # gRPC cancels what it still holds. A call that gRPC core received but never handed to the
                # servicers (rare, under load) also holds the grace period: its client gets UNAVAILABLE.
                unanswered = sum(h.started - h.answered for h in self._handlings)
                log.warning("event=grace_expired unanswered_requests=%d", unanswered)
        if http_stopped is not None:
            await http_stopped

    def _listen(self, reuse_port: bool) -> None:
        c = self.config
        interceptors = [TokenAuthInterceptor(read_token(c.auth_token_file))] if c.auth_token_file else []
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            # Admission bounds requests and StreamReaders streams; gRPC's own bound on calls (which refuses
            # before a message is read) only stops what comes faster than they can refuse it.
            maximum_concurrent_rpcs=c.max_concurrent_rpcs + c.max_streams,
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                # Workers share the port; a lone server must fail on a port that is already taken.
                ("grpc.so_reuseport", int(reuse_port)),
                *self._connection_age_options(),
                # Calls received but not yet taken by the server wait in gRPC core, each with its message;
                # bounded, so that an overload cannot grow memory without limit (docs/reliability.md).
                ("grpc.server.max_pending_requests", c.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", c.max_pending_rpcs),
                # Ping idle connections, so that a client gone without closing (host down, network cut)
                # frees its connection and streams within minutes.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
            ],
        )
        streams = self.streams
        kserve, classify = (
            Handling(api, self.metrics, self.repository, admission=self.admission)
            for api in ("kserve", "classify")
        )
        self._handlings = (kserve, classify)
        generic = generic_only(self._grpc)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(
                self.repository, kserve, self._control, c.max_images_per_request, self.provider, streams
            ),
            generic,
        )
        classify_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(self.repository, classify, c, streams), generic
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic)
        reflection.enable_server_reflection((*SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), self._grpc)
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            self.port = self._grpc.add_secure_port(
                address, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
            )
        else:
            self.port = self._grpc.add_insecure_port(address)

    def _connection_age_options(self) -> list[tuple[str, int]]:
        age = self.config.max_connection_age_seconds
        if age is None:
            return []
        # After the age, gRPC sends GOAWAY; calls in flight get up to --grace to finish.
        grace_ms = int(self.config.grace_seconds * 1000)
        return [
            ("grpc.max_connection_age_ms", int(age * 1000)),
            ("grpc.max_connection_age_grace_ms", grace_ms),
        ]

    def _log_listening(self) -> None:
        c = self.config
        if self.metrics_port is not None:
            metrics = f"{c.metrics_host}:{self.metrics_port}"
        else:  # a worker's figures are on the supervisor's endpoint
            metrics = "supervisor" if self._link is not None else "off"
        log.info(
            "event=listening address=%s:%d http=%s tls=%s auth=%s metrics=%s provider=%s",
            c.host, self.port, f"{c.host}:{self.http_port}" if self._http else "off", c.tls,
            "token" if c.auth_token_file else "off", metrics, self.provider,
        )  # fmt: skip

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, finish in-flight ones (up to the grace period)."""
        if self._stopping:
            return
        self._stopping = True
        log.info("event=stopping grace_seconds=%s", self.config.grace_seconds)
        if self._poller:
            self._poller.cancel()
        if isinstance(self._control, WorkerControl):
            self._control.close()
        await self.health.enter_graceful_shutdown()
        self.streams.close()  # open streams answer what they have read, then end: none holds the grace
        await self._close_front_ends()
        await self.repository.close()
        stop_http(self._metrics_http)
        self._stopped.set()
        log.info(
            "event=stopped requests_started=%d requests_answered=%d",
            sum(h.started for h in self._handlings), sum(h.answered for h in self._handlings),
        )  # fmt: skip

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _set_health(self, serving: bool) -> None:
        if self._stopping:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *SERVICES):
            await self.health.set(service, status)


def freeze_startup_heap() -> None:
    """What start-up built (modules, sessions: tens of thousands of objects) lives as long as the process:
    the cyclic garbage collector's full collections need not walk it again (benchmarks/serving.md)."""
    gc.collect()
    gc.freeze()


async def serve(config: ServerConfig, worker: int = 0, link: Connection | None = None) -> None:
    """Run one server process until SIGTERM/SIGINT has stopped it (see Server for worker and link)."""
    server = Server(config, worker, link)
    on_stop_signals(server.stop)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    await server.wait_stopped()
