"""mnist-bench's settings: one small dataclass per section of its --help, each flag declared once on its field
with its default (serving.commandline derives the command line), every value checked in __post_init__.
"""

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from serving.bench import rest
from serving.bench.apis import API_NAMES
from serving.bench.loadgen import Level
from serving.bench.spawn import serve_command
from serving.channels import DEFAULT_CONNECTIONS
from serving.client import MAX_TIMEOUT_S, ClientSecurity
from serving.commandline import flag, require, within

DEFAULT_CONCURRENCY = (1, 8, 32, 64)
PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class RunningServers:
    """Servers already running: their gRPC and HTTP targets, and their metrics. A --compare configuration may
    name others (after its '--'), to compare different servers in one run."""

    server: str | None = field(
        default=None,
        metadata=flag(
            "running server(s) over gRPC: HOST:PORT[,HOST:PORT...] (each its own target), or one gRPC target "
            "such as dns:///NAME:PORT or ipv4:A:PORT,B:PORT (round-robin over its addresses)",
            metavar="TARGET",
        ),
    )
    http_server: str | None = field(
        default=None,
        metadata=flag(
            "running server(s) over HTTP, for --protocol http: HOST:PORT[,HOST:PORT...] of their HTTP ports",
            metavar="TARGET",
        ),
    )
    metrics_url: str | None = field(
        default=None,
        metadata=flag(
            "their Prometheus URL(s), comma-separated, for the server's own counts and the server-side split",
            metavar="URL",
        ),
    )

    def __post_init__(self) -> None:
        for target in filter(None, (t.strip() for t in (self.http_server or "").split(","))):
            try:
                rest.check_address(target)
            except ValueError as e:
                raise ValueError(f"--http-server {e}") from None

    @property
    def given(self) -> bool:
        return bool(self.server or self.http_server)

    def targets(self, protocol: str) -> str:
        """HOST:PORT[,...] of the servers for `protocol`; ValueError when there are none."""
        targets, name = (
            (self.http_server, "--http-server") if protocol == "http" else (self.server, "--server")
        )
        if not targets:
            raise ValueError(f"--protocol {protocol} needs {name} HOST:PORT[,...] (or --spawn)")
        return targets


@dataclass(frozen=True)
class TargetOptions:
    """Which server: running ones, or one spawned for each configuration."""

    running: RunningServers = field(default_factory=RunningServers)
    connections: int = field(
        default=DEFAULT_CONNECTIONS,
        metadata=flag(
            "connections per target in each generator process, requests round-robin over them, so that a "
            "server's worker processes each get a share: gRPC channels; over HTTP keep-alive pools, each "
            "opening another connection while its others are busy (HTTP/1.1 carries one request at a time)"
        ),
    )
    spawn: bool = field(
        default=False, metadata=flag("start mnist-serve on 127.0.0.1 for each configuration, then stop it")
    )
    repo: Path | None = field(
        default=None, metadata=flag("model repository (for --spawn and the ORT ceiling)", metavar="DIR")
    )
    server_args: str = field(
        default="",
        metadata=flag(
            'extra mnist-serve options for --spawn, one string: --server-args="--max-batch-size 1"',
            metavar="ARGS",
        ),
    )

    def __post_init__(self) -> None:
        c = type(self)
        require(within(self.connections, 1, 1024), c, "connections", "within 1..1024", self.connections)


@dataclass(frozen=True)
class RequestOptions:
    """What each request is. A --compare configuration may override these (after its '--')."""

    protocol: str = field(
        default="grpc",
        metadata=flag(
            "gRPC, or HTTP: the Open Inference Protocol's REST binding (kserve) and /v1 classify (PNG files)",
            choices=PROTOCOLS,
        ),
    )
    model: str = field(default="mnist", metadata=flag("model name", metavar="NAME"))
    model_version: str = field(
        default="", metadata=flag("model version (default: the newest)", metavar="VERSION")
    )
    api: str = field(default="kserve", metadata=flag("API to load", choices=API_NAMES))
    stream: bool = field(default=False, metadata=flag("bidirectional streaming RPC instead of unary"))
    images_per_request: int = field(default=1, metadata=flag("images per request", metavar="N"))
    http_tensors: str = field(
        default="binary",
        metadata=flag(
            "HTTP kserve tensors: Triton's binary tensor extension (as tritonclient.http sends them), or "
            "JSON (for servers without the extension)",
            choices=rest.TENSORS,
        ),
    )
    serve_command: str = field(
        default_factory=lambda: shlex.join(serve_command()),
        metadata=flag(
            "--spawn runs this plus --repo/--host/--port/--metrics-port/--http-port and the server args, "
            "e.g. 'taskset -c 1 mnist-serve' (default: mnist-serve of this environment)",
            metavar="COMMAND",
        ),
    )

    def __post_init__(self) -> None:
        c = type(self)
        require(within(self.images_per_request, 1, 1_000_000), c, "images_per_request", "within 1..1000000",
                self.images_per_request)  # fmt: skip
        if self.stream and self.protocol == "http":
            raise ValueError("--stream is gRPC's: HTTP requests are unary")

    @property
    def tensors(self) -> str | None:
        """How KServe tensors travel over HTTP (None: not an HTTP KServe request)."""
        return self.http_tensors if (self.protocol, self.api) == ("http", "kserve") else None


@dataclass(frozen=True)
class LoadOptions:
    """How much load, for how long: the levels, and what each request may take."""

    concurrency: tuple[int, ...] = field(
        default=(),
        metadata=flag(
            "closed loop: clients in flight, e.g. 1,8,32,64 (default: 1,8,32,64 unless --rate)",
            metavar="N,N,...",
        ),
    )
    rate: tuple[float, ...] = field(
        default=(),
        metadata=flag("open loop: requests/s, e.g. 500,1000,2000 (default: closed loop)", metavar="R,R,..."),
    )
    arrivals: str = field(
        default="constant", metadata=flag("open loop arrivals", choices=("constant", "poisson"))
    )
    streams: int = field(default=4, metadata=flag("open loop with --stream: streams"))
    duration: float = field(default=5.0, metadata=flag("measured seconds per level", metavar="SECONDS"))
    requests: int = field(
        default=0,
        metadata=flag("measure this many requests per level instead of --duration (0: use --duration)"),
    )
    warmup: float = field(
        default=1.0, metadata=flag("unmeasured seconds before each level", metavar="SECONDS")
    )
    procs: int = field(default=1, metadata=flag("load generator processes"))
    repeat: int = field(
        default=1,
        metadata=flag(
            "run every configuration (and the floor) this many times, interleaved; the summary gives mean "
            "± std over the repeats and each configuration's throughput relative to the first"
        ),
    )
    timeout: float = field(
        default=10.0, metadata=flag("deadline of each request, in seconds", metavar="SECONDS")
    )
    retries: int = field(
        default=0,
        metadata=flag(
            "resend a request that failed with UNAVAILABLE (or whose stream ended unanswered; over HTTP, a "
            "503 or a failed connection) up to this many times, with the back-off and the retry budget of "
            "the project's clients; every attempt is counted. 0 (the default): each request is sent once, "
            "and the figures are what the server did"
        ),
    )
    late_ms: float = field(
        default=2.0,
        metadata=flag(
            "open loop: a send this late counts as late (asyncio's timers have 1 ms resolution)", metavar="MS"
        ),
    )
    seed: int = field(default=0, metadata=flag("arrival times and digit order"))

    def __post_init__(self) -> None:
        c = type(self)
        if self.concurrency and self.rate:
            raise ValueError("give --concurrency (closed loop) or --rate (open loop), not both")
        require(all(within(n, 1, 100_000) for n in self.concurrency), c, "concurrency",
                "within 1..100000", self.concurrency)  # fmt: skip
        require(all(within(r, 0.01, 10_000_000) for r in self.rate), c, "rate",
                "within 0.01..10000000", self.rate)  # fmt: skip
        for name, low, high in (
            ("streams", 1, 10_000),
            ("duration", 0.01, MAX_TIMEOUT_S),
            ("requests", 0, 1_000_000_000),
            ("warmup", 0, 3600),
            ("procs", 1, 256),
            ("repeat", 1, 100),
            ("timeout", 0.001, MAX_TIMEOUT_S),
            ("retries", 0, 10),
            ("late_ms", 0.001, 60_000),
            ("seed", 0, 2**32 - 1),
        ):
            value = getattr(self, name)
            require(within(value, low, high), c, name, f"within {low:g}..{high:g}", value)

    @property
    def levels(self) -> list[Level]:
        if self.rate:
            return [Level(rate=r, arrivals=self.arrivals, streams=self.streams) for r in self.rate]
        return [Level(concurrency=n) for n in self.concurrency or DEFAULT_CONCURRENCY]


@dataclass(frozen=True)
class OutputOptions:
    """The baselines beside the served figures, and where the results go."""

    baselines: str = field(
        default="all", metadata=flag("which to measure", choices=("all", "ceiling", "floor", "none"))
    )
    ceiling_device: str = field(
        default="cpu",
        metadata=flag(
            "device of the in-process ONNX Runtime ceiling (cuda: the server's CUDA path with its buckets)",
            choices=("cpu", "cuda"),
        ),
    )
    ceiling_batch_sizes: tuple[int, ...] = field(
        default=(),
        metadata=flag(
            "ORT ceiling batch sizes (default: 1,8,32,64,128 and the images per request)", metavar="N,N,..."
        ),
    )
    out: Path = field(default=Path("bench-results"), metadata=flag("JSON/CSV/PNG directory", metavar="DIR"))
    progress: bool = field(
        default=True, metadata=flag("progress bars (off anyway when stderr is no terminal)")
    )

    def __post_init__(self) -> None:
        require(all(within(n, 1, 65_536) for n in self.ceiling_batch_sizes), type(self),
                "ceiling_batch_sizes", "within 1..65536", self.ceiling_batch_sizes)  # fmt: skip

    def ceiling_sizes(self, images_per_request: set[int]) -> list[int]:
        return sorted(set(self.ceiling_batch_sizes or (1, 8, 32, 64, 128)) | images_per_request)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs but its --compare configurations (serving.bench.cli parses those)."""

    target: TargetOptions = field(default_factory=TargetOptions)
    request: RequestOptions = field(default_factory=RequestOptions)
    load: LoadOptions = field(default_factory=LoadOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    security: ClientSecurity = field(default_factory=ClientSecurity)

    def __post_init__(self) -> None:
        t = self.target
        if t.spawn == t.running.given:
            raise ValueError("give exactly one of --server HOST:PORT[,...] (or --http-server) and --spawn")
        if t.spawn and t.repo is None:
            raise ValueError("--spawn needs --repo")
        if not t.spawn:
            t.running.targets(self.request.protocol)
