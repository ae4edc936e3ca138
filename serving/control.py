"""Repository changes and statistics that must cover the whole server, whichever process gets the RPC, and
the protocol between the supervisor and its worker processes.

In one process, LocalControl acts on the repository directly. In a worker process of `mnist-serve
--workers N`, WorkerControl forwards RepositoryModelLoad/Unload and ModelStatistics to the supervisor
(serving.supervisor), which asks every worker and answers once all have done it; it also carries out the
supervisor's commands in this worker.

A repository change is decided once, by the supervisor, which lists the repository itself (one look at the
disk for every worker), and made in two phases: every live worker prepares it (loaded, warm, invisible)
and reports the state it would serve; only if all report the same state does the supervisor commit it
everywhere, otherwise it aborts it everywhere and the RPC gets the first error. A worker that starts (or
restarts) adopts the committed state the same way before it listens.

The link is a multiprocessing pipe: in a worker a thread reads it and hands each message to the event loop,
and only the event loop writes to it. Every message is one of the dataclasses below:

    worker -> supervisor  Started | Listening | Failed | Ask(id, LoadModel | UnloadModel | Statistics) | Done
    supervisor -> worker  Command(id, Prepare(change) | Commit | Abort | Statistics) | Reply(id, error, value)
    change                Scan(listing) | LoadModel(name, listing) | UnloadModel(name) | Adopt(state)
"""

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import grpc

from serving.errors import RequestError
from serving.repository import Listing, ModelRepository, Plan, RepositoryState, validate_name
from serving.statistics import Snapshot, merge

log = logging.getLogger(__name__)

StatisticsRow = tuple[str, int, Snapshot]  # model name, version, figures


# -- ModelStatistics: a worker asks the supervisor, which asks every worker ---------------------------------
@dataclass(frozen=True)
class Statistics:
    """Figures of the selected versions (empty name: every model; empty version: every served version)."""

    name: str
    version: str


# -- repository changes: decided once, by the supervisor --------------------------------------------------
@dataclass(frozen=True)
class Scan:
    """Serve what the listing shows (--poll, and the start-up of the server)."""

    listing: Listing


@dataclass(frozen=True)
class LoadModel:
    """RepositoryModelLoad: one model, every file of it tried again. A worker asks without a listing; the
    supervisor lists the model's files and sends the change with it."""

    name: str
    listing: Listing | None = None


@dataclass(frozen=True)
class UnloadModel:
    name: str


@dataclass(frozen=True)
class Adopt:
    """Serve exactly the committed state (a worker joining the others)."""

    state: RepositoryState


Change = Scan | LoadModel | UnloadModel | Adopt


@dataclass(frozen=True)
class Error:
    """A RequestError on the link: the gRPC status by name, and the message."""

    code: str
    message: str

    @classmethod
    def of(cls, error: RequestError | None) -> "Error | None":
        return None if error is None else cls(error.code.name, error.message)

    def request_error(self) -> RequestError:
        return RequestError(grpc.StatusCode[self.code], self.message)


# -- supervisor -> worker --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepare:
    change: Change


@dataclass(frozen=True)
class Commit:
    pass


@dataclass(frozen=True)
class Abort:
    pass


@dataclass(frozen=True)
class Command:
    """Do `action` here; answered with Done(id, ...): Prepared for Prepare, rows for Statistics."""

    id: int
    action: Prepare | Commit | Abort | Statistics


@dataclass(frozen=True)
class Reply:
    """The answer to a worker's Ask: the error the RPC gets, or the value (statistics rows)."""

    id: int
    error: Error | None
    value: Any = None


# -- worker -> supervisor --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """The worker reads its link: it can be given the committed state."""


@dataclass(frozen=True)
class Listening:
    """The worker serves the committed state and accepts connections."""


@dataclass(frozen=True)
class Failed:
    """The worker could not start; the message is one line for the user."""

    message: str


@dataclass(frozen=True)
class Ask:
    """An RPC this worker received that concerns every worker."""

    id: int
    request: LoadModel | UnloadModel | Statistics


@dataclass(frozen=True)
class Prepared:
    """A worker's outcome of Prepare: the state it would serve on Commit, and what the RPC would be told."""

    state: RepositoryState
    error: Error | None


@dataclass(frozen=True)
class Done:
    id: int
    value: Prepared | list[StatisticsRow] | None = None


# -- both ends -------------------------------------------------------------------------------------------
class Control(Protocol):
    async def load(self, name: str) -> None: ...
    async def unload(self, name: str) -> None: ...
    async def statistics(self, name: str, version: str) -> list[StatisticsRow]: ...


def local_statistics(repository: ModelRepository, name: str, version: str) -> list[StatisticsRow]:
    """This process's figures for the selected versions (empty name: every model; empty version: every
    served version of the model)."""
    return [
        (lv.name, lv.version, lv.statistics.snapshot())
        for lv in repository.loaded()
        if (not name or lv.name == name) and (not version or str(lv.version) == version)
    ]


def merge_rows(per_worker: list[list[StatisticsRow]]) -> list[StatisticsRow]:
    by_version: dict[tuple[str, int], list[Snapshot]] = {}
    for rows in per_worker:
        for name, version, snapshot in rows:
            by_version.setdefault((name, version), []).append(snapshot)
    return [(name, version, merge(snapshots)) for (name, version), snapshots in sorted(by_version.items())]


class LocalControl:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def load(self, name: str) -> None:
        await self.repository.load(name)

    async def unload(self, name: str) -> None:
        await self.repository.unload(name)

    async def statistics(self, name: str, version: str) -> list[StatisticsRow]:
        return local_statistics(self.repository, name, version)


class WorkerControl:
    """This worker's end of the link to the supervisor."""

    def __init__(
        self, link: Connection, repository: ModelRepository, on_supervisor_gone: Callable[[], None]
    ) -> None:
        self.link = link
        self.repository = repository
        self._on_gone = on_supervisor_gone
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self._plan: Plan | None = None
        self._joined: asyncio.Future[bool] = self._loop.create_future()
        threading.Thread(target=self._read, name="supervisor-link", daemon=True).start()

    def send(self, message: Started | Listening | Failed | Ask | Done) -> None:
        self.link.send(message)

    async def join(self) -> bool:
        """Wait until this worker serves the committed state; False if it is stopped first."""
        self.send(Started())
        return await self._joined

    def close(self) -> None:
        """The server stops: stop waiting to join, and answer what waits on the supervisor."""
        if not self._joined.done():
            self._joined.set_result(False)
        for key, future in self._waiting.items():
            if not future.done():
                future.set_result(Reply(key, Error("UNAVAILABLE", "the server is shutting down")))

    # -- Control: ask the supervisor, which asks every worker ---------------------------------------------
    async def load(self, name: str) -> None:
        await self._ask(LoadModel(validate_name(name)))

    async def unload(self, name: str) -> None:
        await self._ask(UnloadModel(validate_name(name)))

    async def statistics(self, name: str, version: str) -> list[StatisticsRow]:
        return await self._ask(Statistics(name, version))

    async def _ask(self, request: LoadModel | UnloadModel | Statistics):
        key = next(self._ids)
        answer = self._waiting[key] = self._loop.create_future()
        try:
            self.send(Ask(key, request))
            reply: Reply = await answer
        finally:
            del self._waiting[key]
        if reply.error is not None:
            raise reply.error.request_error()
        return reply.value

    # -- the supervisor's commands ----------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self.link.recv()
            except (EOFError, OSError):  # the supervisor is gone: stop serving rather than linger
                self._loop.call_soon_threadsafe(self._on_gone)
                return
            self._loop.call_soon_threadsafe(self._dispatch, message)

    def _dispatch(self, message: Command | Reply) -> None:
        if isinstance(message, Reply):
            future = self._waiting.get(message.id)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            asyncio.ensure_future(self._do(message))

    async def _do(self, command: Command) -> None:
        try:
            value = await self._carry_out(command.action)
        except Exception as e:  # answered all the same: the supervisor must not wait for it forever
            log.exception("event=command_failed command=%s", type(command.action).__name__)
            error = Error("INTERNAL", f"{type(e).__name__}: {e}")
            value = Prepared(self.repository.state(), error) if isinstance(command.action, Prepare) else None
        self.send(Done(command.id, value))

    async def _carry_out(self, action: Prepare | Commit | Abort | Statistics):
        r = self.repository
        if isinstance(action, Statistics):
            return local_statistics(r, action.name, action.version)
        plan, self._plan = self._plan, None
        if isinstance(action, Prepare):
            if plan is not None:  # never committed nor aborted (the supervisor sends one change at a time)
                await r.abort(plan)
            self._plan = plan = await self._prepare(action.change)
            return Prepared(r.state(plan), Error.of(plan.outcome))
        if plan is None:
            return None
        if isinstance(action, Abort):
            await r.abort(plan)
            return None
        with contextlib.suppress(RequestError):  # the outcome went back with Prepared
            await r.commit(plan)
        if not self._joined.done():
            self._joined.set_result(True)
        return None

    async def _prepare(self, change: Change) -> Plan:
        r = self.repository
        if isinstance(change, Scan):
            return await r.prepare_scan(change.listing)
        if isinstance(change, LoadModel):
            return await r.prepare_load(change.name, change.listing)
        if isinstance(change, UnloadModel):
            return await r.prepare_unload(change.name)
        return await r.prepare_adopt(change.state)
