"""What every mnist-serve process does alike: the log format, the stop signals, the /metrics endpoint, a
periodic task, the port check, and the rules for starting at all. The server process (serving.server) and
the supervisor (serving.supervisor) both build on this module and never on each other.
"""

import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from serving.repository import RepositoryError, RepositoryState
from serving.runtime import DeviceError
from serving.security import SecurityConfigError

log = logging.getLogger("serving")

LOG_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
# What stops a server before it serves: one `mnist-serve: error:` line and exit status 2, never a traceback.
STARTUP_ERRORS = (RepositoryError, DeviceError, SecurityConfigError, OSError, RuntimeError)


def configure_logging(level: str, worker: int | None = None) -> None:
    """One key=value line per event on stderr; a worker's lines carry worker=K."""
    fmt = LOG_FORMAT if worker is None else LOG_FORMAT.replace("%(message)s", f"worker={worker} %(message)s")
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


def on_stop_signals(stop: Callable[[], Awaitable[None]]) -> None:
    """SIGTERM and SIGINT start `stop()` on the running event loop (a graceful stop, not an exception)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(stop()))


def die_with_parent() -> None:
    """Linux: the kernel sends this process SIGTERM when its parent dies, even by SIGKILL: no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not log lines
        pass


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> ThreadingWSGIServer:
    """Prometheus /metrics for `registry` on a daemon thread; returns the HTTP server (server_port).

    prometheus_client's own start_http_server polls for shutdown every 0.5 s, which every stop of a server
    then waits out; this is the same WSGI app and server class with a 50 ms poll."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
    threading.Thread(target=httpd.serve_forever, args=(0.05,), name="metrics", daemon=True).start()
    return httpd


def stop_http(httpd) -> None:
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()


async def every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
    """Run `action` every `seconds` (after each one ends) until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        await action()


def listen_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """The socket family and address that host:port names for listening (an IPv6 host may be bracketed)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return family, address


def check_port(host: str, port: int) -> None:
    """OSError naming host:port if gRPC could not listen there: something else listens on it. The probe
    binds as gRPC does (SO_REUSEADDR), so the TIME_WAIT connections a stopped server leaves behind do not
    keep it from starting again at once."""
    family, address = listen_address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def startup_problem(state: RepositoryState, repo: Path, poll_seconds: float | None) -> str | None:
    """Why a server whose repository loaded as `state` must not start, or None. A repository with nothing
    in it is only worth waiting on with --poll, which will bring models in."""
    if state.served:
        return None
    if reasons := state.reasons():
        return f"no model could be loaded: {reasons[0]}"
    if poll_seconds is None:
        return (
            f"model repository {repo} has no model version to serve (<name>/<version>/model.onnx beside "
            "<name>/config.pbtxt); add one, or pass --poll SECONDS to wait for one"
        )
    log.warning("event=no_models repo=%s poll_seconds=%g: waiting for a model to appear", repo, poll_seconds)
    return None
