"""mnist-serve: wiring of the gRPC server (both APIs, health, reflection), metrics, polling, shutdown.

Start-up order: listen first (health NOT_SERVING, ServerReady false), load and warm every model, then
health SERVING. Shutdown (SIGTERM/SIGINT): health NOT_SERVING, stop accepting, let in-flight requests
finish within --grace seconds, drain the batchers, exit 0.
"""

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.classify import ClassifierServicer, Limits
from serving.client import HelpFormatter
from serving.kserve import KServeServicer, StreamReaders
from serving.metrics import Metrics
from serving.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from serving.proto.mnist.v1 import classify_pb2, classify_pb2_grpc
from serving.repository import ModelRepository, Overrides, RepositoryError
from serving.runtime import DeviceError, RuntimeOptions, resolve_device
from serving.security import SecurityConfigError, TokenAuthInterceptor, read_token, server_credentials

log = logging.getLogger("serving")

SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
)


@dataclass(frozen=True)
class ServerConfig:
    repo: Path
    host: str = "0.0.0.0"
    port: int = 8001  # 0 = pick a free port (tests)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 8002  # None = no metrics endpoint; 0 = pick a free port
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    max_batch_size: int | None = None  # None = config.pbtxt
    max_queue_delay_us: int | None = None  # None = config.pbtxt
    max_queue_images: int = 4096
    max_images_per_request: int = 1024
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int = 1024  # RPCs handled at once; more wait in gRPC core, unread
    poll_seconds: float | None = None
    grace_seconds: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.provider = resolve_device(config.runtime.device)
        overrides = Overrides(config.max_batch_size, config.max_queue_delay_us, config.max_queue_images)
        self.repository = ModelRepository(
            config.repo, config.runtime, overrides, self.metrics, self._set_health
        )
        self.health = health.aio.HealthServicer()
        self.streams = StreamReaders()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = None
        self._poller: asyncio.Task | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Listen, load and warm the models, report SERVING; returns the gRPC port."""
        c = self.config
        interceptors = [TokenAuthInterceptor(read_token(c.auth_token_file))] if c.auth_token_file else []
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            # Bounds the per-RPC state (tasks, parsed requests) an overload can pile up in this process.
            maximum_concurrent_rpcs=c.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        limits = Limits(c.max_images_per_request, c.max_image_bytes, c.max_image_pixels)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(
                self.repository, self.metrics, c.max_images_per_request, self.provider, self.streams
            ),
            self._grpc,
        )
        classify_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(self.repository, self.metrics, limits, self.streams), self._grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        address = f"{c.host}:{c.port}"
        if c.tls_cert or c.tls_key:
            if not (c.tls_cert and c.tls_key):
                raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
            creds = server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
            self.port = self._grpc.add_secure_port(address, creds)
        elif c.tls_client_ca:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        else:
            self.port = self._grpc.add_insecure_port(address)
        await self._set_health(False)
        await self._grpc.start()
        if c.metrics_port is not None:
            try:
                self._metrics_http = self.metrics.serve_http(c.metrics_host, c.metrics_port)
            except OSError as e:
                raise OSError(
                    f"cannot serve metrics on {c.metrics_host}:{c.metrics_port}: {e.strerror}"
                ) from e
            self.metrics_port = self._metrics_http.server_port
        tls = "mtls" if c.tls_client_ca else "tls" if c.tls_cert else "off"
        log.info(
            "event=listening address=%s:%d tls=%s auth=%s metrics=%s:%s provider=%s",
            c.host, self.port, tls, "token" if c.auth_token_file else "off",
            c.metrics_host, self.metrics_port, self.provider,
        )  # fmt: skip
        await self.repository.poll()  # sets health SERVING once a model is loaded and warm
        if not self.repository.ready:
            log.warning("event=no_models repo=%s", self.repository.root)
        if c.poll_seconds:
            self._poller = asyncio.create_task(self._poll_forever(c.poll_seconds))
        return self.port

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
        if self._grpc is not None:
            await self._grpc.stop(self.config.grace_seconds)
        await self.repository.close()
        if self._metrics_http:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("event=stopped")

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


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    d, r = ServerConfig(repo=Path("models")), RuntimeOptions()  # the defaults, stated once
    p = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the ONNX models of a Triton-layout repository over gRPC (KServe v2 + mnist.v1).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--repo", type=Path, default=d.repo, help="model repository directory")
    p.add_argument("--host", default=d.host, help="gRPC listen address")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0 = any free port)")
    p.add_argument("--metrics-host", default=d.metrics_host, help="Prometheus /metrics listen address")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus port (-1 = disabled)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=r.device, help="ONNX Runtime device")
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=r.intra_op_threads,
        help="ORT threads per run (0 = one per core)",
    )
    p.add_argument(
        "--inter-op-threads", type=int, default=r.inter_op_threads, help="ORT threads across graph branches"
    )
    p.add_argument(
        "--execution-mode",
        choices=["sequential", "parallel"],
        default=r.execution_mode,
        help="ORT execution mode",
    )
    p.add_argument(
        "--spinning", action="store_true", help="let idle ORT threads spin (burns a core at low load)"
    )
    p.add_argument(
        "--io-binding",
        action=argparse.BooleanOptionalAction,
        default=r.io_binding,
        help="CUDA: bind inputs/outputs to device buffers allocated once per batch size",
    )
    p.add_argument(
        "--cuda-graph-batch-sizes",
        type=batch_sizes,
        default=r.cuda_graph_batch_sizes,
        metavar="N,N,...",
        help="CUDA: capture a CUDA graph per batch bucket; batches pad up to the next (e.g. 1,8,64,256)",
    )
    p.add_argument(
        "--cudnn-conv-algo-search",
        choices=["HEURISTIC", "EXHAUSTIVE", "DEFAULT"],
        default=r.cudnn_conv_algo_search,
        help="CUDA: how cuDNN picks convolution algorithms (EXHAUSTIVE stalls each first-seen batch size)",
    )
    p.add_argument("--max-batch-size", type=int, help="images per ORT run (default: config.pbtxt)")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        help="wait for more requests up to this long (default: config.pbtxt)",
    )
    p.add_argument(
        "--max-queue-images",
        type=int,
        default=d.max_queue_images,
        help="queued images per model before RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--max-images-per-request", type=int, default=d.max_images_per_request, help="images in one request"
    )
    p.add_argument(
        "--max-image-bytes", type=int, default=d.max_image_bytes, help="bytes of one encoded image"
    )
    p.add_argument(
        "--max-image-pixels", type=int, default=d.max_image_pixels, help="declared pixels of an encoded image"
    )
    p.add_argument(
        "--max-message-bytes", type=int, default=d.max_message_bytes, help="gRPC message size limit"
    )
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=d.max_concurrent_rpcs,
        help="RPCs handled at once (a stream counts as one); more wait, unread",
    )
    p.add_argument(
        "--poll",
        type=float,
        metavar="SECONDS",
        help="rescan the repository this often for new versions (default: only at start)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=d.grace_seconds,
        help="seconds to finish in-flight requests on shutdown",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (default: plaintext)")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates it signed (mTLS)")
    p.add_argument(
        "--auth-token-file",
        type=Path,
        help="require 'authorization: Bearer <token in file>' (default: no auth)",
    )
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level"
    )
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    if not 0 <= a.port <= 65535 or not -1 <= a.metrics_port <= 65535:
        p.error("--port must be 0..65535 and --metrics-port -1..65535")
    positive = (
        "max_queue_images",
        "max_images_per_request",
        "max_image_bytes",
        "max_image_pixels",
        "max_message_bytes",
        "max_concurrent_rpcs",
    )
    for name in positive:
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        runtime = RuntimeOptions(
            device=a.device, intra_op_threads=a.intra_op_threads, inter_op_threads=a.inter_op_threads,
            execution_mode=a.execution_mode, allow_spinning=a.spinning, io_binding=a.io_binding,
            cuda_graph_batch_sizes=a.cuda_graph_batch_sizes, cudnn_conv_algo_search=a.cudnn_conv_algo_search,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    return ServerConfig(
        repo=a.repo, host=a.host, port=a.port, metrics_host=a.metrics_host,
        metrics_port=None if a.metrics_port < 0 else a.metrics_port, runtime=runtime,
        max_batch_size=a.max_batch_size,
        max_queue_delay_us=a.max_queue_delay_us, max_queue_images=a.max_queue_images,
        max_images_per_request=a.max_images_per_request, max_image_bytes=a.max_image_bytes,
        max_image_pixels=a.max_image_pixels, max_message_bytes=a.max_message_bytes, poll_seconds=a.poll,
        max_concurrent_rpcs=a.max_concurrent_rpcs,
        grace_seconds=a.grace, tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca,
        auth_token_file=a.auth_token_file,
    )  # fmt: skip


async def serve(config: ServerConfig) -> None:
    server = Server(config)
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
    try:
        asyncio.run(serve(config))
    except (RepositoryError, DeviceError, SecurityConfigError, OSError, RuntimeError) as e:
        print(f"mnist-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
