"""The HTTP front end of one server process: an aiohttp application on the process's event loop (uvloop
under mnist-serve, shared with grpc.aio), listening beside the gRPC port with the same address, TLS, token
and limits, and answering from the same repository, control and metrics (serving.server starts and stops
it). Why aiohttp: docs/serving.md.

Every request passes one guard first: the bearer token (except health and the page), the bound on
requests held at once, and JSON errors for whatever aiohttp itself refuses. Inference and classification
requests then count against the process's admission (serving.rpc.Admission), shared with gRPC.
"""

import hmac
import importlib.resources
import logging
import ssl
import time

from aiohttp import web

from serving.classify import ClassifierServicer
from serving.config import ServerConfig
from serving.control import Control
from serving.http.classify import ClassifyApi
from serving.http.inference import InferenceApi
from serving.http.status import error_response
from serving.kserve import KServeServicer
from serving.metrics import Metrics
from serving.repository import ModelRepository
from serving.rpc import Admission, Handling, StreamReaders
from serving.security import SecurityConfigError, read_token

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready"})  # no token needed, as gRPC health
PAGE = importlib.resources.files("serving.http").joinpath("page/index.html")


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """--tls-cert and --tls-key as an ssl context, with client certificates required when --tls-client-ca
    is set (mTLS): the gRPC port's settings."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise SecurityConfigError(f"cannot use the TLS files for HTTP: {e}") from e
    return context


class HttpFrontEnd:
    def __init__(
        self,
        config: ServerConfig,
        repository: ModelRepository,
        control: Control,
        metrics: Metrics,
        provider: str,
        admission: Admission,
    ) -> None:
        self.config = config
        self.repository = repository
        self.port: int | None = None
        self.stopping = False
        # The gRPC servicers' admission: --max-concurrent-rpcs bounds the requests in progress over both
        # protocols, and the excess gets RESOURCE_EXHAUSTED (429 here) at once.
        self.handlings = tuple(
            Handling(api, metrics, repository, "http", admission=admission) for api in ("kserve", "classify")
        )
        kserve_handling, classify_handling = self.handlings
        c = config
        kserve = KServeServicer(
            repository, kserve_handling, control, c.max_images_per_request, provider, StreamReaders()
        )
        classifier = ClassifierServicer(repository, classify_handling, c, StreamReaders())
        read_timeout = c.http.http_read_timeout_seconds
        limits = (c.max_message_bytes, c.max_images_per_request, read_timeout)
        self._token = f"Bearer {read_token(c.auth_token_file)}".encode() if c.auth_token_file else None
        # Requests held at once, of every route (admission counts inference and classification only):
        # beyond --max-concurrent-rpcs + --max-pending-rpcs, 503 unread, so an overload's memory is bounded
        # as gRPC core's bounds do for gRPC.
        self._admitted = 0
        self._admit_limit = c.max_concurrent_rpcs + c.max_pending_rpcs
        self._ssl = tls_context(config)
        self.app = web.Application(middlewares=[self._guard], client_max_size=c.max_message_bytes)
        self.app.add_routes([web.get("/", self.page)])
        self.app.add_routes(InferenceApi(kserve, kserve_handling, limits, self.ready).routes())
        self.app.add_routes(ClassifyApi(classifier, classify_handling, c, read_timeout).routes())
        self._runner: web.AppRunner | None = None
        self._page = PAGE.read_bytes()

    def ready(self) -> bool:
        return self.repository.ready and not self.stopping

    async def start(self, reuse_port: bool) -> int:
        """Listen; returns the port. reuse_port: worker processes share it (the supervisor holds it)."""
        c = self.config
        self._runner = web.AppRunner(
            self.app,
            access_log=None,  # no per-request logging, as for gRPC
            handle_signals=False,
            handler_cancellation=True,  # a client that hangs up cancels its request (dropped if still queued)
            shutdown_timeout=c.grace_seconds,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, c.host, c.http.http_port, ssl_context=self._ssl, reuse_port=reuse_port, backlog=1024
        )
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(f"cannot serve HTTP on {c.host}:{c.http.http_port}: {e.strerror}") from None
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stop listening, close idle connections, let requests in flight finish within --grace."""
        self.stopping = True
        if self._runner is not None:
            await self._runner.cleanup()

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        began = time.perf_counter()
        if self._token is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._token):
                return error_response(
                    401,
                    "missing or invalid 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": 'Bearer realm="mnist-serve"'},
                )
        if self.stopping:
            return _shed("server shutting down; retry")
        if self._admitted >= self._admit_limit:
            return _shed("server overloaded: too many requests at once; retry")
        self._admitted += 1
        try:
            response = await handler(request)
        except web.HTTPException as e:  # aiohttp's own refusals: no such route or method
            reason = f"no such endpoint {request.path[:200]!r}" if e.status == 404 else e.reason
            response = error_response(e.status, reason)
        except Exception as e:  # a bug outside the request wrapper: answer this request, keep serving
            log.error("event=internal_error protocol=http path=%.200r error=%r", request.path, repr(e))
            log.debug("internal error", exc_info=True)
            response = error_response(500, f"internal error ({type(e).__name__}); see the server log")
        finally:
            self._admitted -= 1
        total = f"total;dur={(time.perf_counter() - began) * 1000:.3f}"
        timing = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = f"{timing}, {total}" if timing else total
        return response


def _shed(message: str) -> web.Response:
    """503 without reading the body: this connection closes rather than spend more on it. (Other refusals
    keep aiohttp's lingering close, which reads the rest of a body for a while so that a client still
    sending it gets its status rather than a reset connection.)"""
    response = error_response(503, message, {"Retry-After": "1"})
    response.force_close()
    return response
