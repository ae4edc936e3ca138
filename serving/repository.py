"""The model repository: Triton layout on disk, and the set of loaded, warmed, batched model versions.

    <repo>/<name>/config.pbtxt           text protobuf ModelConfig (unknown fields tolerated)
    <repo>/<name>/<version>/model.onnx   version = positive integer; the newest one is the default

Every version found is loaded (or those config.pbtxt's version_policy selects); versions are immutable
once written (the exporter writes a new one) and config.pbtxt is read when a version loads.

A change starts from one look at the disk (a Listing: every file with its size and modification time)
and happens in two steps: prepare loads and warms what appeared, without making it visible, and works out
what to retire; commit then publishes it with one dict assignment per model (in-flight requests keep the
batcher they started on) and drains what was retired, or abort drops it. A server with several worker
processes gives every worker the same listing and commits only what every worker prepared alike
(serving.control, serving.supervisor). The result is a RepositoryState, the same in every worker.

A file that fails to load is logged, replaces nothing, and is remembered with its size and modification
time: it is tried again once either changes (a file still being written), or on an explicit load.
Names are validated and every path is resolved inside the repository, so `..`, absolute names and
symlinks pointing out are refused.
"""

import asyncio
import logging
import re
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import text_format

from serving.batcher import Batcher
from serving.config import ServerConfig
from serving.contract import (
    IMAGE_SHAPE,
    INPUT_NAME,
    MODEL_NAME_RULE,
    NUM_CLASSES,
    OUTPUT_NAME,
    is_valid_model_name,
)
from serving.errors import RequestError
from serving.metrics import Metrics
from serving.proto.inference import model_config_pb2
from serving.runtime import DeviceError, ModelLoadError, ModelSession
from serving.statistics import VersionStatistics

log = logging.getLogger(__name__)

VERSION = re.compile(r"[1-9][0-9]{0,18}")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


class RepositoryError(Exception):
    """A model directory or config.pbtxt that cannot be served (message names the file)."""


@dataclass
class LoadedVersion:
    name: str
    version: int
    config: model_config_pb2.ModelConfig
    session: ModelSession
    batcher: Batcher
    statistics: VersionStatistics


@dataclass
class LoadedModel:
    versions: dict[int, LoadedVersion] = field(default_factory=dict)

    @property
    def newest(self) -> LoadedVersion:
        return self.versions[max(self.versions)]


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex: a loaded version (READY), or a model on disk that is not served."""

    name: str
    version: str
    state: str  # READY | UNAVAILABLE
    reason: str = ""


@dataclass(frozen=True)
class Stamp:
    """A file's size and modification time: a file written again, or still being written, gets a new one."""

    size: int
    mtime_ns: int


def stamp_of(path: Path) -> Stamp | None:
    """The stamp of the regular file at path (symlinks followed); None if there is none."""
    try:
        status = path.stat()
    except OSError:
        return None
    return Stamp(status.st_size, status.st_mtime_ns) if stat.S_ISREG(status.st_mode) else None


@dataclass(frozen=True)
class ModelFiles:
    """One model directory as a listing saw it."""

    config: Stamp | None  # config.pbtxt (None: absent or unreadable)
    versions: dict[int, Stamp]  # version -> its model.onnx

    def paths(self, model_dir: Path) -> list[Path]:
        return [model_dir / CONFIG_FILE, *(model_dir / str(v) / MODEL_FILE for v in self.versions)]


Listing = dict[str, ModelFiles]  # model name -> its files, from one look at the repository


@dataclass(frozen=True)
class Refusal:
    """A file that could not be served, with the stamp it had: it is tried again once its stamp changes,
    or when a load asks for its model."""

    stamp: Stamp | None
    reason: str


@dataclass(frozen=True)
class RepositoryState:
    """What a repository serves: the versions of each model, the models explicitly unloaded, the files
    refused. Every worker process of one server holds the same state."""

    served: dict[str, tuple[int, ...]] = field(default_factory=dict)
    unloaded: frozenset[str] = frozenset()
    refused: dict[Path, Refusal] = field(default_factory=dict)

    def reasons(self, model_dir: Path | None = None) -> list[str]:
        """Why each refused file (of model_dir, or of the whole repository) was refused."""
        return [
            r.reason
            for path, r in self.refused.items()
            if model_dir is None or path.is_relative_to(model_dir)
        ]


@dataclass
class Plan:
    """A prepared repository change: new versions loaded and warm but not visible, versions to retire, the
    refusals remembered from now on, and what the request that asked for it (load, unload) must be told
    once it is committed."""

    add: dict[str, dict[int, LoadedVersion]] = field(default_factory=dict)
    retire: dict[str, set[int]] = field(default_factory=dict)
    unload: set[str] = field(default_factory=set)  # names to mark explicitly unloaded
    reload: set[str] = field(default_factory=set)  # names no longer explicitly unloaded
    # The refusals remembered from the commit on (None: those remembered now).
    refused: dict[Path, Refusal] | None = None
    outcome: RequestError | None = None

    def served_after(self, current: dict[str, LoadedModel]) -> dict[str, set[int]]:
        names = set(current) | set(self.add)
        served = {
            name: (set(current[name].versions) if name in current else set()) - self.retire.get(name, set())
            | set(self.add.get(name, {}))
            for name in names
        }
        return {name: versions for name, versions in served.items() if versions}

    def state_after(
        self, current: dict[str, LoadedModel], unloaded: set[str], refused: dict[Path, Refusal]
    ) -> RepositoryState:
        served = self.served_after(current)
        return RepositoryState(
            served={name: tuple(sorted(served[name])) for name in sorted(served)},
            unloaded=frozenset((unloaded - self.reload) | self.unload),
            refused=dict(sorted((refused if self.refused is None else self.refused).items())),
        )


def validate_name(name: str, what: str = "model name") -> str:
    if not is_valid_model_name(name):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"invalid {what} {name[:80]!r}: use {MODEL_NAME_RULE}"
        )
    return name


def inside(root: Path, path: Path) -> Path:
    """path resolved (symlinks followed); RepositoryError if it lands outside root."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise RepositoryError(f"{path} resolves to {resolved}, outside the repository {root}")
    return resolved


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse and check config.pbtxt against the serving contract."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), config, allow_unknown_field=True)
    except (OSError, UnicodeDecodeError, text_format.ParseError) as e:
        raise RepositoryError(f"{path}: cannot parse: {e}") from e
    dt = model_config_pb2.DataType
    expected_in = (INPUT_NAME, dt.TYPE_UINT8, list(IMAGE_SHAPE))
    expected_out = (OUTPUT_NAME, dt.TYPE_FP32, [NUM_CLASSES])
    ins = [(i.name, i.data_type, list(i.dims)) for i in config.input]
    outs = [(o.name, o.data_type, list(o.dims)) for o in config.output]
    if ins and ins != [expected_in]:
        raise RepositoryError(
            f"{path}: input must be {INPUT_NAME} TYPE_UINT8 dims {list(IMAGE_SHAPE)}, found {ins}"
        )
    if outs and outs != [expected_out]:
        raise RepositoryError(
            f"{path}: output must be {OUTPUT_NAME} TYPE_FP32 dims [{NUM_CLASSES}], found {outs}"
        )
    if config.max_batch_size < 0:
        raise RepositoryError(f"{path}: max_batch_size must be >= 0, found {config.max_batch_size}")
    return config


def model_dirs(root: Path) -> list[str]:
    """The names of the model directories in the repository."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_valid_model_name(p.name))


def list_models(root: Path, names: Iterable[str] | None = None) -> Listing:
    """One look at the repository (or at the named models that exist): each model directory's files."""
    listing = {}
    for name in sorted(model_dirs(root) if names is None else names):
        model_dir = root / name
        if not model_dir.is_dir():
            continue
        versions = {}
        for entry in model_dir.iterdir():
            if VERSION.fullmatch(entry.name) and (stamp := stamp_of(entry / MODEL_FILE)) is not None:
                versions[int(entry.name)] = stamp
        listing[name] = ModelFiles(stamp_of(model_dir / CONFIG_FILE), versions)
    return listing


def select_versions(policy: model_config_pb2.ModelVersionPolicy, versions: set[int]) -> set[int]:
    """The versions config.pbtxt's version_policy asks to serve; unset or `all`: every one."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        return set(sorted(versions)[-max(policy.latest.num_versions, 1) :])
    if choice == "specific":
        return versions & set(policy.specific.versions)
    return set(versions)


class ModelRepository:
    def __init__(
        self,
        config: ServerConfig,
        metrics: Metrics,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.root = config.repo.resolve()
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {config.repo} is not a directory")
        self.config = config
        self.metrics = metrics
        self._models: dict[str, LoadedModel] = {}
        self._refused: dict[Path, Refusal] = {}  # model file or config -> why it was refused, at which stamp
        self._unloaded: set[str] = set()  # explicitly unloaded: a scan leaves them alone
        self.on_change = on_change  # awaited with `ready` after every change (health status)
        self.lock = asyncio.Lock()  # one change at a time (prepare + commit)

    # -- lookups (hot path) --------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> LoadedVersion:
        model = self._models.get(name)
        if model is None or not model.versions:
            validate_name(name)
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; loaded models: {', '.join(self.names())}"
            )
        if not version:
            return model.newest
        loaded = model.versions.get(int(version)) if VERSION.fullmatch(version) else None
        if loaded is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} has no loaded version {version[:40]!r}; available: "
                f"{', '.join(str(v) for v in sorted(model.versions))} (empty = newest)",
            )
        return loaded

    def find(self, name: str, version: str = "") -> LoadedVersion | None:
        try:
            return self.get(name, version)
        except RequestError:
            return None

    def known(self, name: str) -> bool:
        return name in self._models

    def versions(self, name: str) -> list[int]:
        model = self._models.get(name)
        return sorted(model.versions) if model else []

    def loaded(self) -> list[LoadedVersion]:
        return [lv for name in sorted(self._models) for _, lv in sorted(self._models[name].versions.items())]

    def names(self) -> list[str]:
        return sorted(name for name, model in self._models.items() if model.versions)

    def state(self, plan: Plan | None = None) -> RepositoryState:
        """What this process serves, has unloaded and has refused; with a prepared plan, what it will once
        the plan is committed."""
        return (plan or Plan()).state_after(self._models, self._unloaded, self._refused)

    @property
    def unloaded(self) -> set[str]:
        return set(self._unloaded)

    @property
    def ready(self) -> bool:
        return bool(self._models)

    async def index(self) -> list[IndexEntry]:
        """Every model directory on disk, with its served versions or why none is served."""
        on_disk = await asyncio.to_thread(model_dirs, self.root)
        state = self.state()
        entries = []
        for name in sorted(set(on_disk) | set(self._models)):
            versions = self.versions(name)
            if versions:
                entries += [IndexEntry(name, str(v), "READY") for v in versions]
            else:
                reason = "unloaded" if name in self._unloaded else "; ".join(state.reasons(self.root / name))
                entries.append(IndexEntry(name, "", "UNAVAILABLE", reason or "no loadable version"))
        return entries

    # -- changes in one process: list the disk, prepare and commit under the lock -------------------------
    async def poll(self) -> None:
        """Scan the whole repository: load new models and versions, retire removed ones."""
        async with self.lock:
            listing = await asyncio.to_thread(list_models, self.root)
            await self.commit(await self.prepare_scan(listing))

    async def load(self, name: str) -> None:
        """Load (or reload) one model by name, also one that was unloaded; RequestError says what failed."""
        validate_name(name)
        async with self.lock:
            listing = await asyncio.to_thread(list_models, self.root, [name])
            await self.commit(await self.prepare_load(name, listing))

    async def unload(self, name: str) -> None:
        async with self.lock:
            await self.commit(await self.prepare_unload(name))

    async def close(self) -> None:
        async with self.lock:
            await self.commit(Plan(retire={name: set(m.versions) for name, m in self._models.items()}))

    # -- the two steps --------------------------------------------------------------------------------
    async def prepare_scan(self, listing: Listing) -> Plan:
        """Every listed model that is not explicitly unloaded; loaded models no longer listed are retired.
        A file refused before is tried again only if its stamp changed."""
        listed = {path for name, files in listing.items() for path in files.paths(self.root / name)}
        plan = Plan(refused={p: r for p, r in self._refused.items() if p in listed})
        for name in sorted(set(listing) - self._unloaded):
            await self._prepare_model(name, listing[name], plan)
        for name in set(self._models) - set(listing):
            plan.retire[name] = set(self._models[name].versions)
        return plan

    async def prepare_load(self, name: str, listing: Listing) -> Plan:
        """One model, every file of it tried again (also those refused before)."""
        validate_name(name)
        model_dir = self.root / name
        plan = Plan(
            reload={name}, refused={p: r for p, r in self._refused.items() if not p.is_relative_to(model_dir)}
        )
        if name not in listing:
            plan.outcome = RequestError(
                grpc.StatusCode.NOT_FOUND, f"no model directory {name!r} in the repository"
            )
            return plan
        refused = await self._prepare_model(name, listing[name], plan)
        served = plan.served_after(self._models).get(name, set())
        if not served:
            plan.outcome = RequestError(
                grpc.StatusCode.INTERNAL, f"model {name!r} failed to load: {'; '.join(refused.values())}"
            )
        elif newer := {v: why for v, why in refused.items() if v is None or v > max(served)}:
            # The old version keeps serving, but the caller asked for what is on disk: say it was not loaded.
            plan.outcome = RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {name!r} still serves version {max(served)}; refused: {'; '.join(newer.values())}",
            )
        return plan

    async def prepare_unload(self, name: str) -> Plan:
        validate_name(name)
        if name not in self._models:
            return Plan(outcome=RequestError(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not loaded"))
        return Plan(retire={name: set(self._models[name].versions)}, unload={name})

    async def prepare_adopt(self, state: RepositoryState) -> Plan:
        """Exactly `state` (a worker process joining the others): its versions loaded, whatever this process
        refused before, everything else retired. A version that cannot be loaded here leaves the prepared
        state different from `state`."""
        names = sorted(state.served)
        listing = await asyncio.to_thread(list_models, self.root, names)
        plan = Plan(unload=set(state.unloaded), reload=self._unloaded - state.unloaded, refused={})
        for name in names:
            files = listing.get(name, ModelFiles(None, {}))
            await self._prepare_model(name, files, plan, pinned=set(state.served[name]))
        for name in set(self._models) - set(names):
            plan.retire[name] = set(self._models[name].versions)
        plan.refused = {**state.refused, **plan.refused}
        return plan

    async def commit(self, plan: Plan) -> None:
        """Publish a prepared plan, then drain what it retires; raises the plan's outcome, if any."""
        self._unloaded = (self._unloaded - plan.reload) | plan.unload
        if plan.refused is not None:
            self._refused = plan.refused
        retired = []
        for name in sorted(set(plan.add) | set(plan.retire)):
            model = self._models.get(name, LoadedModel())
            versions = {v: lv for v, lv in model.versions.items() if v not in plan.retire.get(name, set())}
            retired += [lv for v, lv in model.versions.items() if v not in versions]
            versions.update(plan.add.get(name, {}))
            model.versions = versions  # one assignment: a concurrent reader sees the old dict or the new one
            if versions:
                self._models[name] = model
            else:
                self._models.pop(name, None)
            for v in sorted(plan.add.get(name, {})):
                provider = versions[v].session.provider
                log.info("event=model_ready model=%s version=%d provider=%s", name, v, provider)
        for lv in retired:
            await lv.batcher.close()  # queued requests finish first
            lv.session.close()
            log.info("event=model_unloaded model=%s version=%d", lv.name, lv.version)
        if self.on_change is not None:
            await self.on_change(self.ready)
        if plan.outcome is not None:
            raise plan.outcome

    async def abort(self, plan: Plan) -> None:
        """Drop a prepared plan: close what it loaded; the refusals it found are forgotten."""
        for versions in plan.add.values():
            for lv in versions.values():
                await lv.batcher.close()
                lv.session.close()

    # -- preparing one model ----------------------------------------------------------------------------
    async def _prepare_model(
        self, name: str, files: ModelFiles, plan: Plan, pinned: set[int] | None = None
    ) -> dict[int | None, str]:
        """Load what `name` should serve and is not loaded yet into plan.add; retire the rest. Returns what
        is refused: {version: reason}, with None for the model's config."""
        model_dir = self.root / name
        config_path = model_dir / CONFIG_FILE
        if (known := plan.refused.get(config_path)) is not None and known.stamp == files.config:
            return {None: known.reason}
        try:
            inside(self.root, model_dir)
            config = await asyncio.to_thread(read_config, inside(self.root, config_path))
            if stamp_of(config_path) != files.config:
                raise RepositoryError(f"{config_path}: changed while it was read")
        except (RepositoryError, OSError) as e:
            self._refuse(plan, config_path, files.config, str(e))
            return {None: str(e)}
        plan.refused.pop(config_path, None)
        current = set(self.versions(name))
        added: dict[int, LoadedVersion] = {}

        def refusal(version: int) -> Refusal | None:
            known = plan.refused.get(model_dir / str(version) / MODEL_FILE)
            return known if known is not None and known.stamp == files.versions[version] else None

        while True:  # a version that fails to load leaves the candidates, so the policy picks the next one
            loadable = {v for v in files.versions if refusal(v) is None}
            wanted = (
                loadable & pinned if pinned is not None else select_versions(config.version_policy, loadable)
            )
            missing = sorted(wanted - current - set(added))
            if not missing:
                break
            for version in missing:
                loaded = await self._load_version(name, version, files.versions[version], config, plan)
                if loaded is not None:
                    added[version] = loaded
        if added:
            plan.add[name] = added
        if unwanted := current - wanted:
            plan.retire[name] = unwanted
        return {v: known.reason for v in sorted(files.versions) if (known := refusal(v)) is not None}

    async def _load_version(
        self, name: str, version: int, stamp: Stamp, config: model_config_pb2.ModelConfig, plan: Plan
    ) -> LoadedVersion | None:
        c = self.config
        path = self.root / name / str(version) / MODEL_FILE
        max_batch = c.max_batch_size or config.max_batch_size or 1
        delay = c.max_queue_delay_us
        if delay is None:
            delay = config.dynamic_batching.max_queue_delay_microseconds
        instances = max([g.count for g in config.instance_group if g.count > 0] or [1])
        began = time.monotonic()
        try:
            real_path = inside(self.root, path)
            # Loading and warm-up take tens of ms to seconds: off the event loop, which keeps serving.
            session = await asyncio.to_thread(self._open, real_path, max_batch)
        except (RepositoryError, ModelLoadError, DeviceError, OSError) as e:
            self._refuse(plan, path, stamp, str(e))
            return None
        if stamp_of(path) != stamp:  # written while it loaded: what loaded may be part of it
            session.close()
            self._refuse(plan, path, stamp, f"{path}: changed while it was loaded")
            return None
        plan.refused.pop(path, None)
        log.info(
            "event=model_loaded model=%s version=%d seconds=%.2f", name, version, time.monotonic() - began
        )
        statistics = VersionStatistics()
        batcher = Batcher(
            f"{name}/{version}",
            session.run,
            max_batch_size=max_batch,
            max_queue_delay_us=delay,
            max_queue_images=max(c.max_queue_images, max_batch),
            metrics=self.metrics.for_model(name),
            statistics=statistics,
            instances=instances,
            inline_images=session.inline_images,
        )
        return LoadedVersion(name, version, config, session, batcher, statistics)

    def _open(self, path: Path, max_batch: int) -> ModelSession:
        session = ModelSession(path, self.config.runtime, max_batch)
        sizes = {1, max_batch} | {2**k for k in range(1, 9) if 2**k < max_batch}
        session.warm_up(sorted(sizes))
        return session

    def _refuse(self, plan: Plan, path: Path, stamp: Stamp | None, reason: str) -> None:
        refusal = Refusal(stamp, reason)
        if self._refused.get(path) != refusal:
            log.error("event=model_refused path=%s reason=%r", path, reason)
        plan.refused[path] = refusal
