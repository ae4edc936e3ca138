"""The model repository: Triton layout on disk, and the set of loaded, warmed, batched model versions.

    <repo>/<name>/config.pbtxt           text protobuf ModelConfig (unknown fields tolerated)
    <repo>/<name>/<version>/model.onnx   version = positive integer; the newest one is the default

Every version found is loaded (or those config.pbtxt's version_policy selects); versions are immutable
once written (the exporter writes a new one) and config.pbtxt is read when a version loads.
load() / poll() load versions that appeared (load + warm before they become visible, so the swap is one
dict assignment and in-flight requests keep the batcher they started on) and retire versions that
disappeared. A version that fails to load is logged once, remembered, and does not replace anything.
Names are validated and every path is resolved inside the repository, so `..`, absolute names and
symlinks pointing out are refused.
"""

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import text_format

from serving.batcher import Batcher
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
from serving.runtime import DeviceError, ModelLoadError, ModelSession, RuntimeOptions

log = logging.getLogger(__name__)

VERSION = re.compile(r"[1-9][0-9]{0,18}")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


class RepositoryError(Exception):
    """A model directory or config.pbtxt that cannot be served (message names the file)."""


@dataclass(frozen=True)
class Overrides:
    """Command-line settings that replace config.pbtxt values for every model (None = keep)."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_images: int = 4096


@dataclass
class LoadedVersion:
    name: str
    version: int
    config: model_config_pb2.ModelConfig
    session: ModelSession
    batcher: Batcher


@dataclass
class LoadedModel:
    versions: dict[int, LoadedVersion] = field(default_factory=dict)

    @property
    def newest(self) -> LoadedVersion:
        return self.versions[max(self.versions)]


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


def find_versions(model_dir: Path) -> dict[int, Path]:
    """version -> model.onnx path, for every integer subdirectory holding a model file."""
    versions = {}
    for entry in model_dir.iterdir():
        if VERSION.fullmatch(entry.name) and (entry / MODEL_FILE).is_file():
            versions[int(entry.name)] = entry / MODEL_FILE
    return versions


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
        root: Path,
        options: RuntimeOptions,
        overrides: Overrides,
        metrics: Metrics,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {root} is not a directory")
        self.options = options
        self.overrides = overrides
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.failed: dict[Path, str] = {}  # model file or config -> why it was refused (not retried)
        self.unloaded: set[str] = set()  # explicitly unloaded: poll() leaves them alone
        self.on_change = on_change  # awaited with `ready` after every poll/load/unload (health status)
        self._lock = asyncio.Lock()  # one load/poll at a time

    # -- lookups (hot path) --------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> LoadedVersion:
        model = self.models.get(name)
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

    def names(self) -> list[str]:
        return sorted(name for name, model in self.models.items() if model.versions)

    @property
    def ready(self) -> bool:
        return bool(self.names())

    # -- loading --------------------------------------------------------------------------------------
    async def poll(self) -> None:
        """Scan the whole repository: load new models/versions, retire removed ones."""
        async with self._lock:
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_model_name(p.name))
            for name in found:
                if name not in self.unloaded:
                    await self._sync_model(name)
            for name in set(self.models) - set(found):
                await self._retire(name, list(self.models[name].versions))
        await self._changed()

    async def load(self, name: str) -> None:
        """Load (or reload) one model by name, also one that was unloaded."""
        validate_name(name)
        async with self._lock:
            self.unloaded.discard(name)
            if not (self.root / name).is_dir():
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"no model directory {name!r} in the repository"
                )
            await self._sync_model(name)
        await self._changed()
        model_dir = self.root / name
        refused = {path: reason for path, reason in self.failed.items() if path.is_relative_to(model_dir)}
        if name not in self.models or not self.models[name].versions:
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"model {name!r} failed to load: {'; '.join(refused.values())}"
            )
        # The old version keeps serving, but the caller asked for what is on disk: say it was not loaded.
        newest = max(self.models[name].versions)
        newer = [
            reason
            for path, reason in refused.items()
            if path.name == CONFIG_FILE or (path.parent.name.isdigit() and int(path.parent.name) > newest)
        ]
        if newer:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {name!r} still serves version {newest}; refused: {'; '.join(newer)}",
            )

    async def unload(self, name: str) -> None:
        validate_name(name)
        async with self._lock:
            if name not in self.models:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not loaded")
            self.unloaded.add(name)
            await self._retire(name, list(self.models[name].versions))
        await self._changed()

    async def close(self) -> None:
        async with self._lock:
            for name in list(self.models):
                await self._retire(name, list(self.models[name].versions))

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change(self.ready)

    async def _sync_model(self, name: str) -> None:
        model_dir = self.root / name
        config_path = model_dir / CONFIG_FILE
        try:
            inside(self.root, model_dir)
            config = read_config(inside(self.root, config_path))
            on_disk = find_versions(model_dir)
        except (RepositoryError, OSError) as e:
            self._refuse(config_path, str(e))
            return
        self.failed.pop(config_path, None)
        model = self.models.setdefault(name, LoadedModel())
        while True:  # a version that fails to load leaves the candidates, so the policy picks the next one
            loadable = {v for v, path in on_disk.items() if path not in self.failed}
            wanted = select_versions(config.version_policy, loadable)
            missing = sorted(wanted - set(model.versions))
            if not missing:
                break
            for version in missing:
                loaded = await self._load_version(name, version, on_disk[version], config)
                if loaded is not None:
                    # One assignment: a concurrent reader sees the old dict or the new one.
                    model.versions = {**model.versions, version: loaded}
                    provider = loaded.session.provider
                    log.info("event=model_ready model=%s version=%d provider=%s", name, version, provider)
        unwanted = set(model.versions) - wanted
        if unwanted:
            await self._retire(name, sorted(unwanted))

    async def _load_version(
        self, name: str, version: int, path: Path, config: model_config_pb2.ModelConfig
    ) -> LoadedVersion | None:
        max_batch = self.overrides.max_batch_size or config.max_batch_size or 1
        delay = self.overrides.max_queue_delay_us
        if delay is None:
            delay = config.dynamic_batching.max_queue_delay_microseconds
        instances = max([g.count for g in config.instance_group if g.count > 0] or [1])
        try:
            real_path = inside(self.root, path)
            # Loading and warm-up take tens of ms to seconds: off the event loop, which keeps serving.
            session = await asyncio.to_thread(self._open, real_path, max_batch)
        except (RepositoryError, ModelLoadError, DeviceError, OSError) as e:
            self._refuse(path, str(e))
            return None
        batcher = Batcher(
            f"{name}/{version}",
            session.run,
            max_batch_size=max_batch,
            max_queue_delay_us=delay,
            max_queue_images=max(self.overrides.max_queue_images, max_batch),
            metrics=self.metrics.for_model(name),
            instances=instances,
        )
        return LoadedVersion(name, version, config, session, batcher)

    def _open(self, path: Path, max_batch: int) -> ModelSession:
        session = ModelSession(path, self.options)
        sizes = {1, max_batch} | {2**k for k in range(1, 9) if 2**k < max_batch}
        session.warm_up(sorted(sizes))
        return session

    def _refuse(self, path: Path, reason: str) -> None:
        if self.failed.get(path) != reason:
            log.error("event=model_refused path=%s reason=%r", path, reason)
        self.failed[path] = reason

    async def _retire(self, name: str, versions: list[int]) -> None:
        model = self.models[name]
        keep = {v: lv for v, lv in model.versions.items() if v not in versions}
        retired = [model.versions[v] for v in versions if v in model.versions]
        model.versions = keep  # new requests stop finding them; queued ones still finish below
        if not keep:
            del self.models[name]
        for lv in retired:
            await lv.batcher.close()
            log.info("event=model_unloaded model=%s version=%d", name, lv.version)
