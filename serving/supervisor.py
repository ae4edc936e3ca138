"""mnist-serve --workers N: a supervisor process beside N complete server processes that share one port.

Why processes: one Python server process spends most of a small request in its event loop and protobuf
code, so one process is the ceiling whatever the machine; N processes scale with the cores. Each worker is
a whole server (serving.server.Server: servicers, batchers, ONNX Runtime sessions) listening on the same
address with SO_REUSEPORT; the kernel hands each new TCP connection to one of them, so clients spread
their load by opening several connections (docs/serving.md).

The supervisor:
- reserves the ports, gRPC's and HTTP's (refusing one that another program listens on; the TIME_WAIT
  connections a stopped server leaves do not count), starts the workers from multiprocessing's fork server
  and reports ready once every worker serves; a start-up error is one line and exit status 2. The fork
  server is a fresh process that imports the worker's modules once (gRPC, ONNX Runtime, aiohttp, numpy:
  about 1.4 CPU-seconds) and then forks each worker and each restart from that clean state, so no process
  is ever forked after gRPC, ONNX Runtime or CUDA were initialised, and a worker costs a fork, not a new
  interpreter's imports;
- owns the repository state: it lists the repository once for every change (start-up, --poll, and
  RepositoryModelLoad/Unload received by any worker) and makes the change in two phases (serving.control):
  committed only if every live worker prepared the same state, otherwise aborted in every worker;
- restarts a worker that dies (one log line with its exit code or signal; exponential back-off while it
  keeps dying young); the new worker adopts the committed state before it listens, and one that cannot is
  stopped and started again;
- serves one /metrics for the whole server (prometheus-client multiprocess mode) plus per-worker CPU,
  liveness and restarts;
- on SIGTERM/SIGINT has every worker drain within --grace, then exits 0 with no process left behind.

The worker processes run the function the command gives it (serving.cli.run_worker): the supervisor never
imports the server.
"""

import asyncio
import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from serving import eventloop
from serving.config import ServerConfig
from serving.control import (
    Abort,
    Adopt,
    Ask,
    Change,
    Command,
    Commit,
    Done,
    Error,
    Failed,
    Listening,
    LoadModel,
    Prepare,
    Prepared,
    Reply,
    Scan,
    Started,
    Statistics,
    UnloadModel,
    merge_rows,
)
from serving.process import (
    check_port,
    every,
    listen_address,
    on_stop_signals,
    serve_metrics,
    startup_problem,
    stop_http,
)
from serving.repository import RepositoryState, list_models

log = logging.getLogger("serving.supervisor")

YOUNG_SECONDS = 30.0  # a worker that dies younger than this is crash-looping: back off further
MAX_BACKOFF_SECONDS = 30.0
GONE = object()  # what a command to a worker that died meanwhile returns
METRICS_DIR_PREFIX = "mnist-serve-metrics-"
STARTING_PREFIX = "mnist-serve-starting-"  # a metrics directory before its owner has locked it
OWNER_LOCK = ".owner.lock"  # held (flock) by the supervisor that owns a metrics directory, while it lives

WorkerMain = Callable[[ServerConfig, int, Connection], None]  # a worker process's entry point


class StartupError(RuntimeError):
    """The server could not start; the message is one line for the user."""


@dataclass(eq=False)
class Worker:
    index: int
    process: multiprocessing.Process
    link: Connection
    started: float = field(default_factory=time.monotonic)
    reading: bool = False  # it said Started: it takes commands
    joined: bool = False  # it serves the committed state: every change includes it
    listening: bool = False
    pending: dict[int, asyncio.Future] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal={signal.Signals(-code).name}"
    return f"exit_code={code}"


def describe(change: Change) -> str:
    if isinstance(change, LoadModel | UnloadModel):
        return f"{type(change).__name__} model={change.name}"
    return type(change).__name__


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening socket on host:port: it keeps the port for the workers (and picks one for
    port 0), while the kernel hands connections only to listening sockets. A port another program listens
    on is refused first. Like the workers' own listeners it takes SO_REUSEADDR, so that the TIME_WAIT
    connections of a server that just stopped do not hold up a restart, and SO_REUSEPORT, which they share."""
    if port:
        check_port(host, port)
    family, address = listen_address(host, port)
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind(address)
    return reservation


def remove_stale_metrics_directories() -> None:
    """Remove the metrics directories of supervisors that died without removing theirs (SIGKILL): the lock
    inside a directory is free once its owner is gone."""
    for path in Path(tempfile.gettempdir()).glob(METRICS_DIR_PREFIX + "*"):
        try:
            with open(path / OWNER_LOCK) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner lives (or it is no directory of ours)
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("event=stale_metrics_removed path=%s", path)


@contextlib.contextmanager
def metrics_directory() -> Iterator[str]:
    """A new directory for prometheus-client's multiprocess files, locked by this process, removed at exit."""
    remove_stale_metrics_directories()
    # Made under another name and renamed once locked: no other supervisor ever sees it unlocked.
    staging = Path(tempfile.mkdtemp(prefix=STARTING_PREFIX))
    with open(staging / OWNER_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = staging.with_name(METRICS_DIR_PREFIX + staging.name.removeprefix(STARTING_PREFIX))
        staging.rename(path)
        try:
            yield str(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)


def disagreement(prepared: list[Prepared]) -> Error:
    """What to answer when workers prepared different states: the first error one of them reported, else
    the first refusal that not all of them made."""
    for p in prepared:
        if p.error is not None:
            return p.error
    refusals = [p.state.refused for p in prepared]
    for p in prepared:
        for path, refusal in p.state.refused.items():
            if any(other.get(path) != refusal for other in refusals):
                return Error("INTERNAL", refusal.reason)
    return Error("INTERNAL", "the worker processes prepared different repository states")


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
            up.add_metric(
                [str(index)], float(bool(worker and worker.listening and worker.process.is_alive()))
            )
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
    def __init__(self, config: ServerConfig, count: int, worker_main: WorkerMain) -> None:
        self.config = config
        self.count = count
        self.workers: dict[int, Worker] = {}
        self.restarts = [0] * count
        self.state: RepositoryState | None = None  # committed in every joined worker
        self._worker_main = worker_main
        self._root = config.repo.resolve()
        self._young_deaths = [0] * count
        self._ids = itertools.count()
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([worker_main.__module__])
        self._change_lock: asyncio.Lock | None = None
        self._startup: asyncio.Future | None = None
        self._announced = False
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._metrics_dir = ""
        self._httpd = None
        self._worker_config = config
        self._clean_exit = True

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        return eventloop.run(self._run())

    async def _run(self) -> int:
        self._change_lock, self._stopped = asyncio.Lock(), asyncio.Event()
        self._startup = asyncio.get_running_loop().create_future()
        on_stop_signals(self._stop)
        c = self.config
        if not c.repo.is_dir():
            raise StartupError(f"model repository {c.repo} is not a directory")
        reservations = self._reserve_ports()
        try:
            with metrics_directory() as self._metrics_dir:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir  # the spawned workers inherit it
                self._httpd = self._serve_metrics()
                ports = {end: reservation.getsockname()[1] for end, reservation in reservations.items()}
                http = replace(c.http, http_port=ports.get("http", -1))
                self._worker_config = replace(
                    c, port=ports["grpc"], http=http, metrics_port=-1, workers=1, poll_seconds=None
                )
                for index in range(self.count):
                    self._start_worker(index)
                try:
                    await self._startup
                except StartupError:
                    await self._stop()
                    raise
                if self._stopping:  # a signal arrived during start-up
                    await self._stopped.wait()
                    return 0
                self._announce_ready()
                if c.poll_seconds:
                    self._spawn_task(every(c.poll_seconds, self._poll))
                await self._stopped.wait()
                return 0 if self._clean_exit else 1
        finally:
            stop_http(self._httpd)
            for reservation in reservations.values():
                reservation.close()

    def _reserve_ports(self) -> dict[str, socket.socket]:
        """The ports every worker listens on, kept while the supervisor runs: {front end: reservation}. A
        port another program listens on is one start-up error line, with nothing reserved."""
        c = self.config
        reservations = {"grpc": reserve_port(c.host, c.port)}
        if c.http.enabled:  # the HTTP/REST front end (serving.http), shared by the workers like gRPC's
            try:
                reservations["http"] = reserve_port(c.host, c.http.http_port)
            except OSError:
                reservations["grpc"].close()
                raise
        return reservations

    def _serve_metrics(self):
        c = self.config
        if c.metrics_port < 0:
            return None
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)
        registry.register(ServerCollector(self))
        return serve_metrics(registry, c.metrics_host, c.metrics_port)

    def _announce_ready(self) -> None:
        """event=ready, once every worker listens and serves a model."""
        listening = self._startup.done() and not self._stopping  # start-up sets it once every worker listens
        if self._announced or not listening or not (self.state and self.state.served):
            return
        self._announced = True
        c = self.config
        port, http_port = self._worker_config.port, self._worker_config.http.http_port
        http = f"{c.host}:{http_port}" if c.http.enabled else "off"
        metrics = f"{c.metrics_host}:{self._httpd.server_port}" if self._httpd else "off"
        log.info(
            "event=ready workers=%d address=%s:%d http=%s metrics=%s",
            self.count, c.host, port, http, metrics,
        )  # fmt: skip

    # -- workers ----------------------------------------------------------------------------------------
    def _start_worker(self, index: int) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=self._worker_main,
            args=(self._worker_config, index, theirs),
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
        if isinstance(message, Done):
            future = worker.pending.pop(message.id, None)
            if future is not None and not future.done():
                future.set_result(message.value)
        elif isinstance(message, Ask):
            self._spawn_task(self._answer(worker, message))
        elif isinstance(message, Started):
            worker.reading = True
            if self.state is not None:
                self._spawn_task(self._join(worker))
            elif len(self.workers) == self.count and all(w.reading for w in self.workers.values()):
                self._spawn_task(self._first_change())
        elif isinstance(message, Listening):
            worker.listening = True
            if not self._startup.done() and all(w.listening for w in self.workers.values()):
                self._startup.set_result(None)
        elif isinstance(message, Failed):
            if not self._startup.done():
                self._startup.set_exception(StartupError(message.message))
            else:
                log.error("event=worker_failed worker=%d error=%r", worker.index, message.message)

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
            self._start_worker(index)

    # -- commands to workers ------------------------------------------------------------------------------
    def _command(self, worker: Worker, action) -> asyncio.Future:
        key = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        worker.pending[key] = future
        try:
            worker.link.send(Command(key, action))
        except OSError:
            future.set_result(GONE)
        return future

    async def _tell(self, workers: list[Worker], action) -> dict[Worker, object]:
        """Have each worker do `action`; their answers, in worker order, without those that died meanwhile."""
        futures = {w: self._command(w, action) for w in sorted(workers, key=lambda w: w.index)}
        answers = {w: await future for w, future in futures.items()}
        return {w: answer for w, answer in answers.items() if answer is not GONE}

    async def _two_phase(
        self,
        change: Change,
        workers: list[Worker] | None = None,
        accept: Callable[[RepositoryState], Error | None] | None = None,
    ) -> Error | None:
        """Prepare `change` in `workers` (default: every joined one); commit it only if every one that is
        still alive prepared the same state (and `accept` finds nothing against it), else abort it in all.
        Returns what the RPC that asked for it answers. The caller holds the change lock."""
        if workers is None:
            workers = [w for w in self.workers.values() if w.joined]
        prepared: dict[Worker, Prepared] = await self._tell(workers, Prepare(change))
        if not prepared:
            return Error("UNAVAILABLE", "no worker process is serving")
        first = next(iter(prepared.values()))
        if any(p.state != first.state for p in prepared.values()):
            problem = disagreement(list(prepared.values()))
        else:
            problem = accept(first.state) if accept is not None else None
        if problem is not None:
            await self._tell(list(prepared), Abort())
            log.error(
                "event=change_aborted change=%s workers=%d error=%r",
                describe(change), len(prepared), problem.message,
            )  # fmt: skip
            return problem
        committed = await self._tell(list(prepared), Commit())
        for worker in committed:
            worker.joined = True
        if first.state != self.state or isinstance(change, LoadModel | UnloadModel):
            log.info("event=change_committed change=%s workers=%d", describe(change), len(committed))
        self.state = first.state
        self._announce_ready()
        return first.error

    async def _first_change(self) -> None:
        """Start-up: every worker prepares the same listing; it is committed if they agree and it serves
        something (or --poll may bring something), else start-up fails."""
        async with self._change_lock:
            try:
                listing = await asyncio.to_thread(list_models, self._root)
            except OSError as e:
                error = Error("INTERNAL", f"cannot read the model repository {self.config.repo}: {e}")
            else:
                error = await self._two_phase(Scan(listing), list(self.workers.values()), self._startable)
        if error is not None and not self._startup.done():
            self._startup.set_exception(StartupError(error.message))

    def _startable(self, state: RepositoryState) -> Error | None:
        problem = startup_problem(state, self.config.repo, self.config.poll_seconds)
        return None if problem is None else Error("FAILED_PRECONDITION", problem)

    async def _join(self, worker: Worker) -> None:
        """A restarted worker adopts the committed state before it listens; one that cannot is stopped
        (and started again after a back-off)."""
        async with self._change_lock:
            state = self.state

            def same(prepared: RepositoryState) -> Error | None:
                if prepared == state:
                    return None
                return disagreement([Prepared(prepared, None), Prepared(state, None)])

            error = await self._two_phase(Adopt(state), [worker], same)
        if error is not None and not self._stopping:
            log.error("event=worker_failed worker=%d error=%r", worker.index, error.message)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)

    async def _answer(self, worker: Worker, ask: Ask) -> None:
        request = ask.request
        try:
            if isinstance(request, Statistics):
                per_worker = await self._tell([w for w in self.workers.values() if w.joined], request)
                reply = Reply(ask.id, None, merge_rows(list(per_worker.values())))
            else:
                async with self._change_lock:
                    if isinstance(request, LoadModel):  # listed now, under the lock: what is on disk now
                        listing = await asyncio.to_thread(list_models, self._root, [request.name])
                        request = replace(request, listing=listing)
                    reply = Reply(ask.id, await self._two_phase(request))
        except OSError as e:  # the repository could not be listed
            reply = Reply(ask.id, Error("INTERNAL", f"cannot read the model repository: {e}"))
        with contextlib.suppress(OSError):
            worker.link.send(reply)

    async def _poll(self) -> None:
        async with self._change_lock:
            try:
                listing = await asyncio.to_thread(list_models, self._root)
            except OSError as e:  # the repository directory itself vanished or is unreadable: keep serving
                log.error("event=poll_failed error=%r", str(e))
                return
            await self._two_phase(Scan(listing))

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
