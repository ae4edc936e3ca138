"""Repository changes and statistics that must cover the whole server, whichever process gets the RPC.

In one process, LocalControl acts on the repository directly. In a worker process of `mnist-serve
--workers N`, WorkerControl forwards RepositoryModelLoad/Unload and ModelStatistics to the supervisor
(serving.supervisor), which asks every worker and answers once all have done it; it also carries out the
supervisor's commands in this worker: prepare a change, commit it, report statistics. A change is
prepared (loaded, warm, invisible) in every worker before any worker commits it, so every worker serves
the same versions from then on.

The link is a multiprocessing pipe: a thread reads it and hands each message to the event loop; only the
event loop writes to it. Messages are plain tuples:
    worker -> supervisor   ("ready", served, unloaded) | ("failed", message) | ("ask", id, op, argument)
                           | ("done", id, payload)
    supervisor -> worker   ("answer", id, payload) | ("do", id, op, argument)
"""

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Protocol

import grpc

from serving.errors import RequestError
from serving.repository import ModelRepository, Plan, validate_name
from serving.statistics import Snapshot, merge

log = logging.getLogger(__name__)

StatisticsRow = tuple[str, int, Snapshot]  # model name, version, figures


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


def error_payload(error: RequestError | None) -> tuple[str, str] | None:
    return None if error is None else (error.code.name, error.message)


def error_from(payload: tuple[str, str] | None) -> RequestError | None:
    return None if payload is None else RequestError(grpc.StatusCode[payload[0]], payload[1])


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
        threading.Thread(target=self._read, name="supervisor-link", daemon=True).start()

    def send(self, message: tuple) -> None:
        self.link.send(message)

    # -- Control: ask the supervisor, which asks every worker ---------------------------------------------
    async def load(self, name: str) -> None:
        validate_name(name)
        await self._ask("load", name)

    async def unload(self, name: str) -> None:
        validate_name(name)
        await self._ask("unload", name)

    async def statistics(self, name: str, version: str) -> list[StatisticsRow]:
        return await self._ask("statistics", (name, version))

    async def _ask(self, op: str, argument):
        key = next(self._ids)
        answer = self._waiting[key] = self._loop.create_future()
        try:
            self.send(("ask", key, op, argument))
            error, payload = await answer
        finally:
            del self._waiting[key]
        if error is not None:
            raise error_from(error)
        return payload

    # -- the supervisor's commands ----------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self.link.recv()
            except (EOFError, OSError):  # the supervisor is gone: stop serving rather than linger
                self._loop.call_soon_threadsafe(self._on_gone)
                return
            self._loop.call_soon_threadsafe(self._dispatch, message)

    def _dispatch(self, message: tuple) -> None:
        kind, key, *rest = message
        if kind == "answer":
            future = self._waiting.get(key)
            if future is not None and not future.done():
                future.set_result(rest[0])
        else:
            asyncio.ensure_future(self._do(key, *rest))

    async def _do(self, key: int, op: str, argument) -> None:
        self.send(("done", key, await self._carry_out(op, argument)))

    async def _carry_out(self, op: str, argument):
        r = self.repository
        if op == "statistics":
            return local_statistics(r, *argument)
        if op == "commit":
            plan, self._plan = self._plan, None
            if plan is not None:
                with contextlib.suppress(RequestError):  # the outcome went back with "prepare"
                    await r.commit(plan)
            return r.served(), sorted(r.unloaded)
        if op == "abort":
            plan, self._plan = self._plan, None
            if plan is not None:
                await r.abort(plan)
            return None
        # prepare: ("scan", None) | ("load", name) | ("unload", name) | ("restore", (served, unloaded))
        kind, detail = argument
        try:
            if kind == "scan":
                plan = await r.prepare_scan()
            elif kind == "load":
                plan = await r.prepare_load(detail)
            elif kind == "unload":
                plan = await r.prepare_unload(detail)
            else:
                served, unloaded = detail
                plan = await r.prepare_scan(served)
                plan.unload, plan.reload = set(unloaded), set(r.unloaded) - set(unloaded)
        except RequestError as e:
            plan = Plan(outcome=e)
        self._plan = plan
        return error_payload(plan.outcome)
