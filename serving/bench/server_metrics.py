"""The server-side split of a level (queue time, compute time, batch size) from Prometheus deltas.

The server's /metrics are scraped at the start and the end of the measured window; the difference of
the histogram sums and counts gives the means over exactly that window (warm-up excluded).
"""

import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass

import psutil
from prometheus_client.parser import text_string_to_metric_families

# sample name -> value summed over replicas; the request counter's samples are named by protocol and status:
# mnist_requests_total{grpc,OK}
Sample = dict[str, float]
CPU = "server_cpu_seconds"
REQUESTS = "mnist_requests_total{"
# What reading a server that went away (or a URL that is no metrics page) raises.
SCRAPE_ERRORS = (OSError, ValueError, psutil.Error)


def scrape(urls: list[str], model: str, pid: int | None = None, timeout_s: float = 5.0) -> Sample:
    """Sum the counters and histogram sums/counts for `model` over every replica's /metrics, plus the
    server's CPU seconds: of process `pid` and its workers (a spawned server), or from
    process_cpu_seconds_total (which covers a server's workers too)."""
    totals: Sample = defaultdict(float)
    if pid is not None:  # the server process and its worker processes, if any
        server = psutil.Process(pid)
        for process in (server, *server.children(recursive=True)):
            try:
                cpu = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            totals[CPU] += cpu.user + cpu.system
    for url in urls:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("model", model) != model:
                    continue
                if s.name == "process_cpu_seconds_total" and pid is None:
                    totals[CPU] += s.value
                elif s.name.endswith(("_sum", "_count", "_total")):
                    if status := s.labels.get("status"):  # a server without the label serves gRPC only
                        totals[f"{s.name}{{{s.labels.get('protocol', 'grpc')},{status}}}"] += s.value
                    else:
                        totals[s.name] += s.value
    return dict(totals)


def requests_by_status(before: Sample, after: Sample, protocol: str | None = None) -> Counter:
    """The requests the server counted between two samples, by status (gRPC code name), over `protocol`
    (grpc or http; None: both)."""
    counts = Counter()
    for name, value in after.items():
        if name.startswith(REQUESTS) and (n := round(value - before.get(name, 0.0))):
            over, status = name[len(REQUESTS) : -1].split(",")
            if protocol in (None, over):
                counts[status] += n
    return counts


@dataclass(frozen=True)
class ServerSplit:
    requests: int  # requests the server answered in the window (all APIs and statuses)
    mean_request_ms: float  # total server time per request
    mean_queue_ms: float  # per request: waiting for its batch
    mean_compute_ms: float  # per ORT run (one batch)
    mean_batch_size: float  # images per ORT run
    batches: int
    cpu_s: float  # server CPU seconds in the window (NaN when unknown)
    seconds: float  # wall time between the two scrapes

    @staticmethod
    def between(before: Sample, after: Sample, seconds: float) -> "ServerSplit":
        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        def mean(prefix: str, scale: float = 1.0) -> float:
            count = delta(f"{prefix}_count")
            return scale * delta(f"{prefix}_sum") / count if count else float("nan")

        return ServerSplit(
            requests=requests_by_status(before, after).total(),
            mean_request_ms=mean("mnist_request_latency_seconds", 1e3),
            mean_queue_ms=mean("mnist_queue_latency_seconds", 1e3),
            mean_compute_ms=mean("mnist_compute_latency_seconds", 1e3),
            mean_batch_size=mean("mnist_batch_size"),
            batches=int(delta("mnist_batch_size_count")),
            cpu_s=delta(CPU) if CPU in after else float("nan"),
            seconds=seconds,
        )
