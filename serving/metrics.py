"""Prometheus metrics and their HTTP endpoint. mnist-bench reads these names (serving/bench/server_metrics.py)
and the Kubernetes autoscaler rule reads mnist_inflight_requests (deploy/kubernetes/).

Each Server gets its own CollectorRegistry so several servers can live in one process (tests). With several
worker processes, prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the supervisor)
keeps every worker's values in files that the supervisor's one endpoint sums; `worker` labels the requests
counter so the share each worker takes is visible, and the gauges say how they combine across workers.
Hot-path updates use label children resolved once per model: a labels() lookup per request costs more
than the observation itself.
"""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, worker: int = 0) -> None:
        self.worker = str(worker)
        self.registry = CollectorRegistry()
        r = self.registry
        # process_cpu_seconds_total and resident memory: mnist-bench reads server CPU per request from it.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "mnist_requests",
            "Requests answered, by model, API, gRPC status, protocol (grpc or http) and worker process.",
            ["model", "api", "status", "protocol", "worker"],
            registry=r,
        )
        self.request_latency = Histogram(
            "mnist_request_latency_seconds", "Total server time per request.", ["model", "api", "protocol"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_latency = Histogram(
            "mnist_queue_latency_seconds", "Time a request waited for its batch.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_latency = Histogram(
            "mnist_compute_latency_seconds", "ONNX Runtime time per batch.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "mnist_batch_size", "Images per ONNX Runtime run.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "mnist_queue_depth", "Images waiting for a batch.", ["model"],
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.inflight = Gauge(
            "mnist_inflight_requests", "Requests being handled.", registry=r, multiprocess_mode="livesum"
        )
        self.dropped = Counter(
            "mnist_requests_dropped", "Requests dropped before compute.", ["model", "reason"], registry=r
        )

        self._children: dict[tuple, tuple] = {}

    def request_done(self, model: str, api: str, status: str, seconds: float, protocol: str = "grpc") -> None:
        """Count one answered request; latency is recorded for successful ones only."""
        key = (model, api, status, protocol)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(model, api, status, protocol, self.worker),
                self.request_latency.labels(model, api, protocol),
            )
            self._children[key] = children
        children[0].inc()
        if status == "OK":
            children[1].observe(seconds)

    def for_model(self, model: str) -> "ModelMetrics":
        return ModelMetrics(
            queue_latency=self.queue_latency.labels(model),
            compute_latency=self.compute_latency.labels(model),
            batch_size=self.batch_size.labels(model),
            queue_depth=self.queue_depth.labels(model),
            deadline_expired=self.dropped.labels(model, "deadline_expired"),
            queue_full=self.dropped.labels(model, "queue_full"),
            cancelled=self.dropped.labels(model, "cancelled"),
        )


@dataclass(frozen=True)
class ModelMetrics:
    """The per-model label children the batcher updates."""

    queue_latency: Histogram
    compute_latency: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    deadline_expired: Counter
    queue_full: Counter
    cancelled: Counter
