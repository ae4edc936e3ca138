"""mnist-serve --workers N: a supervisor process beside N complete server processes that share one port.

Why processes: one Python server process spends most of a small request in its event loop and protobuf
code, so one process is the ceiling whatever the machine; N processes scale with the cores. Each worker is
today's whole server (serving.server.Server: servicers, batchers, ONNX Runtime sessions) listening on the
same address with SO_REUSEPORT; the kernel hands each new TCP connection to one of them, so clients spread
their load by opening several connections (docs/serving.md).

The supervisor:
- reserves the port (and refuses one that is taken), then starts the workers with the `spawn` method (never
  fork after gRPC, ONNX Runtime or CUDA are initialised) and reports ready once every worker is SERVING;
  a start-up error is one line and exit status 2;
- restarts a worker that dies (one log line with its exit code or signal; exponential back-off while it
  keeps dying young), restoring exactly the versions the other workers serve;
- keeps the repository consistent: RepositoryModelLoad/Unload received by any worker, and --poll, are
  prepared in every worker before any commits (serving.control), so all workers serve the same versions
  when the call returns; ModelStatistics sums every worker's figures;
- serves one /metrics for the whole server (prometheus-client multiprocess mode) plus per-worker CPU,
  liveness and restarts;
- on SIGTERM/SIGINT has every worker drain within --grace, then exits 0 with no process left behind.
"""

import asyncio
import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from serving import eventloop
from serving.config import ServerConfig
from serving.control import error_from, merge_rows
from serving.server import STARTUP_ERRORS, Restore, configure_logging, serve

log = logging.getLogger("serving.supervisor")

YOUNG_SECONDS = 30.0  # a worker that dies younger than this is crash-looping: back off further
MAX_BACKOFF_SECONDS = 30.0
GONE = object()  # what a command to a worker that died meanwhile returns


class StartupError(RuntimeError):
    """A worker could not start; the message is the worker's own one-line reason."""


@dataclass(eq=False)
class Worker:
    index: int
    process: multiprocessing.Process
    link: Connection
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    pending: dict[int, asyncio.Future] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal={signal.Signals(-code).name}"
    return f"exit_code={code}"


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket on host:port: it keeps the port for the workers (and
    picks one for port 0) while the kernel hands connections only to listening sockets."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # without SO_REUSEPORT: fails if taken
            try:
                probe.bind(address)
            except OSError as e:
                raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind(address)
    return reservation


class ServerCollector:
    """The supervisor's own figures on the /metrics it serves, beside the workers' summed ones."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor

    def collect(self):
        s = self.supervisor
        cpu = CounterMetricFamily(
            "mnist_worker_cpu_seconds", "CPU seconds of each worker process (resets when it restarts).",
            labels=["worker"],
        )  # fmt: skip
        up = GaugeMetricFamily("mnist_worker_up", "1 while the worker process serves.", labels=["worker"])
        restarts = CounterMetricFamily("mnist_worker_restarts", "Restarts of each worker.", labels=["worker"])
        total_cpu, total_rss = self._usage(os.getpid())
        for index in range(s.count):
            worker = s.workers.get(index)
            seconds, rss = self._usage(worker.pid) if worker and worker.process.is_alive() else (0.0, 0)
            total_cpu, total_rss = total_cpu + seconds, total_rss + rss
            cpu.add_metric([str(index)], seconds)
            up.add_metric([str(index)], float(bool(worker and worker.ready and worker.process.is_alive())))
            restarts.add_metric([str(index)], s.restarts[index])
        yield cpu
        yield up
        yield restarts
        yield CounterMetricFamily(
            "process_cpu_seconds", "CPU seconds of the whole server: supervisor and live workers.", total_cpu
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory of the supervisor and its workers.", total_rss
        )

    @staticmethod
    def _usage(pid: int) -> tuple[float, int]:
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
            return times.user + times.system, process.memory_info().rss
        except psutil.Error:
            return 0.0, 0


class Supervisor:
    def __init__(self, config: ServerConfig, count: int) -> None:
        self.config = config
        self.count = count
        self.workers: dict[int, Worker] = {}
        self.restarts = [0] * count
        self.served: dict[str, list[int]] = {}
        self.unloaded: list[str] = []
        self._young_deaths = [0] * count
        self._ids = itertools.count()
        self._context = multiprocessing.get_context("spawn")
        self._change_lock: asyncio.Lock | None = None
        self._startup: asyncio.Future | None = None
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._metrics_dir = ""
        self._worker_config = config
        self._clean_exit = True

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        return eventloop.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._change_lock, self._stopped = asyncio.Lock(), asyncio.Event()
        self._startup = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: self._spawn_task(self._stop()))
        c = self.config
        if not c.repo.is_dir():
            raise StartupError(f"model repository {c.repo} is not a directory")
        reservation = reserve_port(c.host, c.port)
        port = reservation.getsockname()[1]
        # The HTTP front end's port (serving.http), shared by the workers the same way.
        http_reservation = reserve_port(c.host, c.http.http_port) if c.http.enabled else None
        http = replace(c.http, http_port=http_reservation.getsockname()[1]) if http_reservation else c.http
        self._metrics_dir = tempfile.mkdtemp(prefix="mnist-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir  # the spawned workers inherit it
        httpd = None
        try:
            httpd = self._serve_metrics()
            self._worker_config = replace(
                c, port=port, http=http, metrics_port=-1, workers=1, poll_seconds=None
            )
            for index in range(self.count):
                self._start_worker(index, restore=None)
            try:
                await self._startup
            except StartupError:
                await self._stop()
                raise
            if self._stopping:  # a signal arrived during start-up
                await self._stopped.wait()
                return 0
            metrics = f"{c.metrics_host}:{httpd.server_port}" if httpd else "off"
            http_address = f"{c.host}:{http.http_port}" if http_reservation else "off"
            log.info(
                "event=ready workers=%d address=%s:%d http=%s metrics=%s",
                self.count, c.host, port, http_address, metrics,
            )  # fmt: skip
            if c.poll_seconds:
                self._spawn_task(self._poll_forever(c.poll_seconds))
            await self._stopped.wait()
            return 0 if self._clean_exit else 1
        finally:
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            reservation.close()
            if http_reservation is not None:
                http_reservation.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _serve_metrics(self):
        c = self.config
        if c.metrics_port < 0:
            return None
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)
        registry.register(ServerCollector(self))
        try:
            httpd, _ = start_http_server(c.metrics_port, addr=c.metrics_host, registry=registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {c.metrics_host}:{c.metrics_port}: {e.strerror}") from e
        return httpd

    # -- workers ----------------------------------------------------------------------------------------
    def _start_worker(self, index: int, restore: Restore | None) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=run_worker,
            args=(self._worker_config, index, theirs, restore),
            name=f"mnist-serve-worker-{index}",
        )
        process.start()
        theirs.close()
        worker = Worker(index, process, ours)
        self.workers[index] = worker
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._on_message, worker)
        loop.add_reader(process.sentinel, self._on_exit, worker)
        log.info("event=worker_started worker=%d pid=%d", index, worker.pid)

    def _on_message(self, worker: Worker) -> None:
        try:
            message = worker.link.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.link.fileno())
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            served, unloaded = message[1], message[2]
            if not self._startup.done():
                self.served, self.unloaded = served, unloaded
                if all(w.ready for w in self.workers.values()) and len(self.workers) == self.count:
                    self._startup.set_result(None)
            elif (served, unloaded) != (self.served, self.unloaded):  # a change committed while it started
                self._spawn_task(self._resync(worker))
        elif kind == "failed":
            if not self._startup.done():
                self._startup.set_exception(StartupError(message[1]))
            else:
                log.error("event=worker_failed worker=%d error=%r", worker.index, message[1])
        elif kind == "ask":
            self._spawn_task(self._answer(worker, message[1], message[2], message[3]))
        elif kind == "done":
            future = worker.pending.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message[2])

    def _on_exit(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(worker.link.fileno())
        worker.process.join()
        worker.link.close()
        code = worker.process.exitcode
        mark_process_dead(worker.pid, self._metrics_dir)
        for future in worker.pending.values():
            if not future.done():
                future.set_result(GONE)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            self._clean_exit = self._clean_exit and code == 0
            if not self.workers:
                self._stopped.set()
            return
        if not self._startup.done():
            self._startup.set_exception(
                StartupError(f"worker {worker.index} exited during start-up ({describe_exit(code)})")
            )
        if self._startup.exception() is not None:
            return  # start-up failed: _run stops the others
        age = time.monotonic() - worker.started
        # A worker that keeps dying young is crash-looping: wait 1, 2, 4... s before each next try.
        young = self._young_deaths[worker.index] + 1 if age < YOUNG_SECONDS else 0
        self._young_deaths[worker.index] = young
        delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2**young) if young else 0.0
        log.error(
            "event=worker_exited worker=%d pid=%d %s uptime_s=%.1f restart_in_s=%.1f",
            worker.index, worker.pid, describe_exit(code), age, delay,
        )  # fmt: skip
        self._spawn_task(self._restart(worker.index, delay))

    async def _restart(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopping:
            self.restarts[index] += 1
            self._start_worker(index, restore=(self.served, self.unloaded))

    # -- commands to every worker -------------------------------------------------------------------------
    def _command(self, worker: Worker, op: str, argument) -> asyncio.Future:
        key = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        worker.pending[key] = future
        try:
            worker.link.send(("do", key, op, argument))
        except OSError:
            future.set_result(GONE)
        return future

    async def _broadcast(self, op: str, argument, workers: list[Worker] | None = None) -> dict[int, object]:
        targets = [w for w in (workers or list(self.workers.values())) if w.ready]
        futures = {w.index: self._command(w, op, argument) for w in targets}
        results = {index: await future for index, future in futures.items()}
        return {index: result for index, result in results.items() if result is not GONE}

    async def _change(self, what: tuple, workers: list[Worker] | None = None) -> dict[int, object]:
        """Prepare `what` in every worker, then commit it in every worker; returns each one's outcome."""
        async with self._change_lock:
            outcomes = await self._broadcast("prepare", what, workers)
            committed = await self._broadcast("commit", None, workers)
            if committed and workers is None:
                self.served, self.unloaded = next(iter(committed.values()))
            return outcomes

    async def _resync(self, worker: Worker) -> None:
        await self._change(("restore", (self.served, self.unloaded)), [worker])

    async def _answer(self, worker: Worker, key: int, op: str, argument) -> None:
        if op == "statistics":
            per_worker = await self._broadcast("statistics", argument)
            payload = (None, merge_rows(list(per_worker.values())))
        else:  # load | unload
            outcomes = await self._change((op, argument))
            error = outcomes.get(worker.index, next(iter(outcomes.values()), None))
            payload = (error, None)
        with contextlib.suppress(OSError):
            worker.link.send(("answer", key, payload))

    async def _poll_forever(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            outcomes = await self._change(("scan", None))
            for error in filter(None, outcomes.values()):
                log.error("event=poll_failed error=%r", str(error_from(error)))

    # -- shutdown ---------------------------------------------------------------------------------------
    async def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if not self._startup.done():
            self._startup.set_result(None)
        log.info("event=stopping workers=%d grace_seconds=%s", len(self.workers), self.config.grace_seconds)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if not self.workers:
            self._stopped.set()
            return
        for worker in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        # Each worker drains within --grace; past that (and a margin for closing) it is killed.
        try:
            await asyncio.wait_for(self._stopped.wait(), self.config.grace_seconds + 10)
        except TimeoutError:
            for worker in list(self.workers.values()):
                log.error(
                    "event=worker_killed worker=%d pid=%d reason=grace_exceeded", worker.index, worker.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            await self._stopped.wait()
            self._clean_exit = False
        log.info("event=stopped")

    def _spawn_task(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# -- the worker process ---------------------------------------------------------------------------------
def _die_with_supervisor() -> None:
    """Linux: the kernel sends this process SIGTERM if the supervisor dies, even by SIGKILL: no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_worker(config: ServerConfig, index: int, link: Connection, restore: Restore | None) -> None:
    """Entry point of a worker process (spawned): one whole server on the shared port."""
    _die_with_supervisor()
    configure_logging(config.log_level, index)
    try:
        eventloop.run(serve(config, index, link, restore))
    except STARTUP_ERRORS as e:
        _report_failure(link, str(e))
    except Exception as e:  # anything else: one line to the supervisor, not a traceback per worker
        log.debug("worker failed", exc_info=True)
        _report_failure(link, f"{type(e).__name__}: {e}")


def _report_failure(link: Connection, message: str) -> None:
    with contextlib.suppress(OSError):
        link.send(("failed", message))
    sys.exit(2)
