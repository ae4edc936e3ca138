"""mnist-serve's configuration: every setting, its default, its flag and its valid range, in one dataclass.

The command line is derived from these fields (serving.commandline), so a default or a range is written once;
tests and embedding programs build ServerConfig directly and get the same checks. Building one imports
nothing heavy (no ONNX Runtime, no gRPC): the supervisor and the tools read it as plain data.
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from serving.commandline import flag, require, within

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_PORT = 65535
DAY_SECONDS = 86_400.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the gRPC message limit of the server and, by default, of the clients
DEVICES = ("auto", "cpu", "cuda")
EXECUTION_MODES = ("sequential", "parallel")  # ONNX Runtime's ExecutionMode, by name (serving.runtime)
CUDNN_CONV_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = field(default="auto", metadata=flag("ONNX Runtime device", choices=DEVICES))
    # One intra-op thread per session: on a tiny CNN the pool's hand-off costs more than it saves, and the
    # server gets its parallelism from concurrent batches (measured: benchmarks/variants.md).
    intra_op_threads: int = field(default=1, metadata=flag("ORT threads per run (0 = one per core)"))
    inter_op_threads: int = field(default=1, metadata=flag("ORT threads across graph branches"))
    # A large batch is another matter: one client sending 32 images waits on one run at a time, and two
    # threads cut that run by a third while costing no more CPU per request under load; single images keep
    # one thread, where two cost 5-11 % more CPU per request (benchmarks/serving.md, "Large batches").
    large_batch_images: int = field(
        default=16,
        metadata=flag("CPU: batches of at least this many images run with --large-batch-threads (0 = never)"),
    )
    large_batch_threads: int = field(default=2, metadata=flag("CPU: ORT threads per run of a large batch"))
    # The graph is a chain: "parallel" has nothing to overlap.
    execution_mode: str = field(
        default="sequential", metadata=flag("ORT execution mode", choices=EXECUTION_MODES)
    )
    # Spinning threads wait hot for the next op and burn a core at low load; off unless measured to help.
    allow_spinning: bool = field(
        default=False,
        metadata=flag("let idle ORT threads spin (burns a core at low load)", name="--spinning"),
    )
    batch_buckets: tuple[int, ...] = field(
        default=(),
        metadata=flag(
            "pad every batch up to the next of these sizes, each run by its own fixed-shape session "
            "(default: on CUDA powers of two up to the model's max batch size; on CPU no padding)",
            metavar="N,N,...",
        ),
    )
    cuda_graphs: bool = field(
        default=True, metadata=flag("CUDA: capture each batch bucket as a CUDA graph and replay it")
    )
    # EXHAUSTIVE benchmarks every convolution algorithm once per shape; with fixed buckets that happens at
    # warm-up only. HEURISTIC picks at once.
    cudnn_conv_algo_search: str = field(
        default="HEURISTIC",
        metadata=flag("CUDA: how cuDNN picks convolution algorithms", choices=CUDNN_CONV_ALGO_SEARCHES),
    )
    # Which GPU. Prefer CUDA_VISIBLE_DEVICES: ORT warns about every session given a device_id.
    device_id: int = 0

    def __post_init__(self) -> None:
        c = type(self)
        require(self.device in DEVICES, c, "device", " or ".join(DEVICES), self.device)
        for name in ("intra_op_threads", "inter_op_threads", "large_batch_threads"):
            value = getattr(self, name)
            require(within(value, 0, 1024), c, name, "within 0..1024 (0 = one per core)", value)
        require(within(self.large_batch_images, 0, 65536), c, "large_batch_images", "within 0..65536",
                self.large_batch_images)  # fmt: skip
        require(self.execution_mode in EXECUTION_MODES, c, "execution_mode", " or ".join(EXECUTION_MODES),
                self.execution_mode)  # fmt: skip
        require(self.cudnn_conv_algo_search in CUDNN_CONV_ALGO_SEARCHES, c, "cudnn_conv_algo_search",
                " or ".join(CUDNN_CONV_ALGO_SEARCHES), self.cudnn_conv_algo_search)  # fmt: skip
        require(all(within(size, 1, 65536) for size in self.batch_buckets), c, "batch_buckets",
                "sizes within 1..65536", self.batch_buckets)  # fmt: skip
        object.__setattr__(self, "batch_buckets", tuple(sorted(set(self.batch_buckets))))
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP/REST front end (serving.http). Its listen address, TLS, token and size limits are the gRPC
    ones: one server, two front ends."""

    http_port: int = field(
        default=8000,
        metadata=flag(
            "HTTP/REST port: the Open Inference Protocol's REST binding, /v1 classify and the drawing page "
            "at / (0 = any free port, -1 = off)"
        ),
    )
    http_read_timeout_seconds: float = field(
        default=30.0,
        metadata=flag(
            "seconds an HTTP client may take to send one request body; a slower one gets 408 and its "
            "connection is closed",
            name="--http-read-timeout",
            metavar="SECONDS",
        ),
    )

    def __post_init__(self) -> None:
        c = type(self)
        port = self.http_port
        require(within(port, -1, MAX_PORT), c, "http_port", f"within -1..{MAX_PORT}", port)
        require(within(self.http_read_timeout_seconds, 0.1, 3600), c, "http_read_timeout_seconds",
                "within 0.1..3600", self.http_read_timeout_seconds)  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.http_port >= 0


@dataclass(frozen=True)
class ServerConfig:
    repo: Path = field(default=Path("models"), metadata=flag("model repository directory (Triton layout)"))
    host: str = field(default="0.0.0.0", metadata=flag("gRPC listen address"))
    port: int = field(default=8001, metadata=flag("gRPC port (0 = any free port)"))
    metrics_host: str = field(default="127.0.0.1", metadata=flag("Prometheus /metrics listen address"))
    metrics_port: int = field(default=8002, metadata=flag("Prometheus port (0 = any free port, -1 = off)"))
    workers: int | None = field(
        default=None,
        metadata=flag(
            "server processes sharing the port (SO_REUSEPORT), each with its own batchers and sessions; "
            "default: one per CPU core this process may use (os.sched_getaffinity, a container's CPU limit), "
            "at most 4 on CUDA",
            metavar="N",
        ),
    )
    http: HttpOptions = field(default_factory=HttpOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    max_batch_size: int | None = field(
        default=None, metadata=flag("images per ONNX Runtime run (default: config.pbtxt's max_batch_size)")
    )
    max_queue_delay_us: int | None = field(
        default=None,
        metadata=flag("wait up to this long for a fuller batch (default: config.pbtxt's dynamic_batching)"),
    )
    max_queue_images: int = field(
        default=4096, metadata=flag("images queued per model version before RESOURCE_EXHAUSTED")
    )
    max_images_per_request: int = field(default=1024, metadata=flag("images in one request"))
    max_image_bytes: int = field(default=4 * 1024 * 1024, metadata=flag("bytes of one encoded image"))
    max_image_pixels: int = field(
        default=4096 * 4096, metadata=flag("declared width x height of one encoded image")
    )
    max_message_bytes: int = field(default=MAX_MESSAGE_BYTES, metadata=flag("gRPC message size limit"))
    max_concurrent_rpcs: int = field(
        default=1024,
        metadata=flag(
            "requests handled at once per process: gRPC unary calls and stream requests, and HTTP inference "
            "requests, in progress (an idle stream holds none); beyond it, refused at once with "
            "RESOURCE_EXHAUSTED (HTTP 429)"
        ),
    )
    max_pending_rpcs: int = field(
        default=256,
        metadata=flag(
            "calls gRPC core holds while the process is too busy to take them; beyond that, gRPC core "
            "refuses new calls (HTTP: requests held beyond --max-concurrent-rpcs plus this many get 503): "
            "with it, the memory an overload can take is bounded"
        ),
    )
    max_streams: int = field(
        default=1024,
        metadata=flag(
            "streams open at once per process, over both APIs; beyond it, a new stream is refused at once "
            "with RESOURCE_EXHAUSTED"
        ),
    )
    stream_idle_seconds: float = field(
        default=300.0,
        metadata=flag(
            "end a stream with DEADLINE_EXCEEDED once it had nothing in progress and sent no request for "
            "this long, so that forgotten or dead clients hold no stream open",
            name="--stream-idle-timeout",
            metavar="SECONDS",
        ),
    )
    poll_seconds: float | None = field(
        default=None,
        metadata=flag(
            "rescan the repository this often for new versions (default: only at start)",
            name="--poll",
            metavar="SECONDS",
        ),
    )
    max_connection_age_seconds: float | None = field(
        default=None,
        metadata=flag(
            "close each client connection after this long, so clients reconnect and re-resolve their target "
            "and replicas added since get a share (default: connections stay open)",
            name="--max-connection-age",
            metavar="SECONDS",
        ),
    )
    grace_seconds: float = field(
        default=10.0,
        metadata=flag("seconds to finish in-flight requests on shutdown", name="--grace", metavar="SECONDS"),
    )
    tls_cert: Path | None = field(
        default=None, metadata=flag("PEM certificate chain: serve TLS (default: plaintext)")
    )
    tls_key: Path | None = field(default=None, metadata=flag("PEM private key for --tls-cert"))
    tls_client_ca: Path | None = field(
        default=None, metadata=flag("PEM CA: require client certificates it signed (mTLS)")
    )
    auth_token_file: Path | None = field(
        default=None, metadata=flag("require 'authorization: Bearer <token in file>' (default: no auth)")
    )
    log_level: str = field(default="INFO", metadata=flag("log level", choices=LOG_LEVELS))

    def __post_init__(self) -> None:
        c = type(self)
        require(within(self.port, 0, MAX_PORT), c, "port", f"within 0..{MAX_PORT}", self.port)
        require(within(self.metrics_port, -1, MAX_PORT), c, "metrics_port", f"within -1..{MAX_PORT}",
                self.metrics_port)  # fmt: skip
        if self.workers is not None:
            require(within(self.workers, 1, 1024), c, "workers", "within 1..1024", self.workers)
        if self.max_batch_size is not None:
            require(within(self.max_batch_size, 1, 65536), c, "max_batch_size", "within 1..65536",
                    self.max_batch_size)  # fmt: skip
        if self.max_queue_delay_us is not None:
            require(within(self.max_queue_delay_us, 0, 10_000_000), c, "max_queue_delay_us",
                    "within 0..10000000 (10 s)", self.max_queue_delay_us)  # fmt: skip
        for name, high in (
            ("max_queue_images", 10_000_000),
            ("max_images_per_request", 1_000_000),
            ("max_image_bytes", 2**31 - 1),
            ("max_image_pixels", 2**31 - 1),
            ("max_message_bytes", 2**31 - 1),  # gRPC's limits are 32-bit signed
            ("max_concurrent_rpcs", 1_000_000),
            ("max_pending_rpcs", 1_000_000),
            ("max_streams", 1_000_000),
        ):
            value = getattr(self, name)
            require(within(value, 1, high), c, name, f"within 1..{high}", value)
        if self.poll_seconds is not None:
            require(within(self.poll_seconds, 0.01, DAY_SECONDS), c, "poll_seconds",
                    "within 0.01..86400 (omit it to scan only at start)", self.poll_seconds)  # fmt: skip
        if self.max_connection_age_seconds is not None:
            require(within(self.max_connection_age_seconds, 1, DAY_SECONDS), c, "max_connection_age_seconds",
                    "within 1..86400", self.max_connection_age_seconds)  # fmt: skip
        require(within(self.grace_seconds, 0, 3600), c, "grace_seconds", "within 0..3600", self.grace_seconds)
        require(within(self.stream_idle_seconds, 1, DAY_SECONDS), c, "stream_idle_seconds", "within 1..86400",
                self.stream_idle_seconds)  # fmt: skip
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        require(self.log_level in LOG_LEVELS, c, "log_level", " or ".join(LOG_LEVELS), self.log_level)
        object.__setattr__(self, "repo", Path(self.repo))

    @property
    def tls(self) -> str:
        return "mtls" if self.tls_client_ca else "tls" if self.tls_cert else "off"

    def worker_count(self, provider: str) -> int:
        """--workers, or the default: one per usable core (measured: benchmarks/serving.md). At most 4 on
        CUDA: every worker holds its own CUDA context on the one GPU, and without CUDA MPS the GPU switches
        between contexts, so beyond 4 more workers served less (measured: benchmarks/cuda.md)."""
        if self.workers is not None:
            return self.workers
        cores = usable_cores()
        return min(cores, 4) if provider == "CUDAExecutionProvider" else cores


def usable_cores() -> int:
    """The cores this process may run on, capped by a cgroup v2 CPU quota (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here: the affinity mask is the limit
    return cores
