"""mnist-serve: one server process. Wiring of the gRPC server (both APIs, health, reflection), the HTTP
front end beside it (serving.http), metrics, polling and shutdown; with --workers N the supervisor
(serving.supervisor) runs N of these side by side.

Start-up order of a single process: listen first (health NOT_SERVING, ServerReady false), load and warm every
model, then health SERVING. A worker process loads first and listens after, so the kernel never hands a
connection to a worker that cannot answer it yet. Shutdown (SIGTERM/SIGINT): health NOT_SERVING, stop
accepting, let in-flight requests finish within --grace seconds, drain the batchers, exit 0.
"""

import argparse
import asyncio
import logging
import signal
import sys
import time
from multiprocessing.connection import Connection

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import eventloop
from serving.classify import ClassifierServicer
from serving.commandline import HelpFormatter, add_flags, build_config
from serving.config import ServerConfig
from serving.control import LocalControl, WorkerControl
from serving.http.frontend import HttpFrontEnd
from serving.kserve import KServeServicer
from serving.metrics import Metrics
from serving.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2, classify_pb2_grpc
from serving.repository import ModelRepository, RepositoryError
from serving.rpc import Handling, StreamReaders
from serving.runtime import DeviceError, resolve_device
from serving.security import SecurityConfigError, TokenAuthInterceptor, read_token, server_credentials

log = logging.getLogger("serving")

SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
STARTUP_ERRORS = (RepositoryError, DeviceError, SecurityConfigError, OSError, RuntimeError)
LOG_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"

Restore = tuple[dict[str, list[int]], list[str]]  # (name -> served versions, explicitly unloaded names)


class Server:
    """One process's server. `link` makes it a worker of the supervisor; `restore` (a restarted worker)
    serves exactly what the other workers serve instead of scanning the repository afresh."""

    def __init__(
        self,
        config: ServerConfig,
        worker: int = 0,
        link: Connection | None = None,
        restore: Restore | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self.metrics = Metrics(worker)
        self.provider = resolve_device(config.runtime.device)
        self.repository = ModelRepository(config, self.metrics, self._set_health)
        self.health = health.aio.HealthServicer()
        self.streams = StreamReaders()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._link = link
        self._restore = restore
        self._control: LocalControl | WorkerControl | None = None
        self._grpc: grpc.aio.Server | None = None
        self._handlings: tuple[Handling, ...] = ()
        self._metrics_http = None
        self._http: HttpFrontEnd | None = None
        self._poller: asyncio.Task | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Listen, load and warm the models, report SERVING; returns the gRPC port."""
        c = self.config
        await self._set_health(False)
        if self._link is not None:
            stop = lambda: asyncio.ensure_future(self.stop())  # noqa: E731 - the supervisor went away
            self._control = WorkerControl(self._link, self.repository, stop)
            await self._load_models()
            self._listen(reuse_port=True)
            await self._grpc.start()
            await self._start_http(reuse_port=True)
            self._log_listening()
            self._control.send(("ready", self.repository.served(), sorted(self.repository.unloaded)))
            return self.port
        self._control = LocalControl(self.repository)
        self._listen(reuse_port=False)
        await self._grpc.start()
        await self._start_http(reuse_port=False)
        self._serve_metrics()
        self._log_listening()
        await self._load_models()
        if c.poll_seconds:
            self._poller = asyncio.create_task(self._poll_forever(c.poll_seconds))
        return self.port

    async def _load_models(self) -> None:
        if self._restore is None:
            await self.repository.poll()  # sets health SERVING once a model is loaded and warm
        else:
            served, unloaded = self._restore
            plan = await self.repository.prepare_scan(served)
            plan.unload = set(unloaded)
            await self.repository.commit(plan)
        if not self.repository.ready:
            refused = self.repository.refusals()
            if refused:  # models are there and none can be served: say so rather than idle NOT_SERVING
                raise RepositoryError(f"no model could be loaded: {refused[0]}")
            log.warning("event=no_models repo=%s", self.repository.root)

    def _listen(self, reuse_port: bool) -> None:
        c = self.config
        interceptors = [TokenAuthInterceptor(read_token(c.auth_token_file))] if c.auth_token_file else []
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            # Bounds the per-RPC state (tasks, parsed requests) an overload can pile up in this process.
            maximum_concurrent_rpcs=c.max_concurrent_rpcs,
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
            ],
        )
        streams = self.streams
        kserve, classify = (Handling(api, self.metrics, self.repository) for api in ("kserve", "classify"))
        self._handlings = (kserve, classify)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(
                self.repository, kserve, self._control, c.max_images_per_request, self.provider, streams
            ),
            self._grpc,
        )
        classify_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(self.repository, classify, c, streams), self._grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((*SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), self._grpc)
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            self.port = self._grpc.add_secure_port(
                address, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
            )
        else:
            self.port = self._grpc.add_insecure_port(address)

    async def _start_http(self, reuse_port: bool) -> None:
        """The HTTP/REST front end (serving.http): same repository, control, limits and metrics as gRPC."""
        if not self.config.http.enabled:
            return
        self._http = HttpFrontEnd(self.config, self.repository, self._control, self.metrics, self.provider)
        self.http_port = await self._http.start(reuse_port)
        self._handlings += self._http.handlings

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

    def _serve_metrics(self) -> None:
        c = self.config
        if c.metrics_port < 0:
            return
        try:
            self._metrics_http = self.metrics.serve_http(c.metrics_host, c.metrics_port)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {c.metrics_host}:{c.metrics_port}: {e.strerror}") from e
        self.metrics_port = self._metrics_http.server_port

    def _log_listening(self) -> None:
        c = self.config
        log.info(
            "event=listening address=%s:%d http=%s tls=%s auth=%s metrics=%s provider=%s",
            c.host, self.port, f"{c.host}:{self.http_port}" if self._http else "off", c.tls,
            "token" if c.auth_token_file else "off",
            f"{c.metrics_host}:{self.metrics_port}" if self.metrics_port is not None else "supervisor",
            self.provider,
        )  # fmt: skip

    async def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, finish in-flight ones (up to the grace period)."""
        if self._stopping:
            return
        self._stopping = True
        log.info("event=stopping grace_seconds=%s", self.config.grace_seconds)
        if self._poller:
            self._poller.cancel()
        await self.health.enter_graceful_shutdown()
        self.streams.close()  # open streams answer what they have read, then end: none holds the grace
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
        await self.repository.close()
        if self._metrics_http:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
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

    async def _poll_forever(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.repository.poll()
            except OSError as e:  # the repository directory itself vanished or is unreadable: keep serving
                log.error("event=poll_failed error=%r", str(e))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the ONNX models of a Triton-layout repository over gRPC: the KServe v2 / Open "
        "Inference Protocol (package inference) and the mnist.v1.Classifier image API, dynamically batched; "
        "and over HTTP: the protocol's REST binding, /v1/models/NAME/classify for image files, and a page "
        "to draw digits on at /.",
        formatter_class=HelpFormatter,
    )
    add_flags(p, ServerConfig)
    return p


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """The command line as a checked ServerConfig; a bad value exits 2 with one usage line."""
    parser = build_parser()
    return build_config(parser, ServerConfig, parser.parse_args(argv))


def configure_logging(level: str, worker: int | None = None) -> None:
    fmt = LOG_FORMAT if worker is None else LOG_FORMAT.replace("%(message)s", f"worker={worker} %(message)s")
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


async def serve(
    config: ServerConfig, worker: int = 0, link: Connection | None = None, restore: Restore | None = None
) -> None:
    """Run one server process until SIGTERM/SIGINT has stopped it (see Server for worker, link, restore)."""
    server = Server(config, worker, link, restore)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    await server.wait_stopped()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    configure_logging(config.log_level)
    try:
        workers = config.worker_count(resolve_device(config.runtime.device))
        if workers == 1:
            eventloop.run(serve(config))
            return
        from serving.supervisor import Supervisor  # only a supervising process needs it

        raise SystemExit(Supervisor(config, workers).run())
    except STARTUP_ERRORS as e:
        print(f"mnist-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
