"""Run one load level on the generator processes and read the server at the edges of its window."""

import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any

from serving.bench import loadgen
from serving.bench.loadgen import RunResult, RunSpec
from serving.bench.rest import server_counts_as_http
from serving.bench.server_metrics import SCRAPE_ERRORS, Sample, ServerSplit, requests_by_status, scrape


def split_spec(spec: RunSpec, procs: int) -> list[RunSpec]:
    """Share one level between generator processes: concurrency, rate and request count are divided."""
    specs = []
    for k in range(procs):
        level = spec.level
        if level.concurrency:
            level = replace(level, concurrency=_share(level.concurrency, procs, k))
            if not level.concurrency:
                continue
        else:
            level = replace(level, rate=level.rate / procs, streams=max(1, _share(level.streams, procs, k)))
        max_requests = _share(spec.max_requests, procs, k)
        if spec.max_requests and not max_requests:
            continue
        specs.append(
            replace(spec, level=level, max_requests=max_requests, seed=spec.seed * 1000 + k, phase=k / procs)
        )
    return specs


def _share(total: int, parts: int, k: int) -> int:
    return total // parts + (k < total % parts)


@dataclass(frozen=True)
class Probe:
    """What to read from the server at the window edges: its /metrics and, when spawned, its CPU."""

    metrics_urls: tuple[str, ...] = ()
    model: str = ""
    pid: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.metrics_urls) or self.pid is not None

    def read(self) -> tuple[float, Sample]:
        """(the middle of the read's wall time, the sample)"""
        t0 = time.time()
        sample = scrape(list(self.metrics_urls), self.model, self.pid)
        return (t0 + time.time()) / 2, sample

    def read_at(self, when: float) -> Future:
        """Read at wall time `when` on a thread of its own, so a slow /metrics (the server is busy) delays
        neither the other edge of the window nor the progress display."""
        future: Future = Future()

        def read() -> None:
            time.sleep(max(0.0, when - time.time()))
            try:
                future.set_result(self.read())
            except Exception as e:  # handed to the caller's thread through the future
                future.set_exception(e)

        threading.Thread(target=read, daemon=True).start()
        return future


@dataclass
class LevelRun:
    """One level's figures: the generators' merged result, the server's split over the measured window,
    and the requests the server counted by status over the whole level (warm-up and drain included: the
    same requests as RunResult.all_attempts). None where the server has no metrics to read."""

    result: RunResult
    split: ServerSplit | None
    server_status: Counter | None


def run_level(
    pool: ProcessPoolExecutor, procs: int, spec: RunSpec, probe: Probe, label: str, progress: bool = True
) -> LevelRun:
    """Run one level on the generator processes; read the server's metrics at the window edges, and its
    request counts before the first send and after the last answer."""
    level_before = _read_or_none(probe) if probe.metrics_urls else None
    start_at = time.time() + 0.3
    futures = [pool.submit(loadgen.run, s) for s in split_spec(replace(spec, start_at=start_at), procs)]
    begin = start_at + spec.warmup_s
    end = None if spec.max_requests else begin + spec.duration_s
    before = probe.read_at(begin) if probe.active else None
    after = probe.read_at(end) if probe.active and end else None
    total = spec.warmup_s + (spec.duration_s if end else 0)
    with progress_bar(progress, total, f"{label} {spec.level.label}") as bar:
        while not all(f.done() for f in futures):
            if bar is not None:
                now = time.time()
                bar.n = round(min(max(0.0, now - start_at), total or now - start_at), 1)
                bar.refresh()
            wait(futures, timeout=0.1)
    result = RunResult.merge([f.result() for f in futures])
    split = served = None
    try:  # a server that went away during the level has no figures to give: the caller says why
        if before is not None:
            (t0, first), (t1, last) = before.result(), after.result() if after else probe.read()
            split = ServerSplit.between(first, last, t1 - t0)
        if level_before is not None:
            protocol = spec.workload.protocol
            served = requests_by_status(level_before, probe.read()[1], protocol)
            if protocol == "http":  # in the generator's words: HTTP statuses
                served = server_counts_as_http(served, result.all_attempts)
    except SCRAPE_ERRORS:
        pass
    return LevelRun(result, split, served)


@contextlib.contextmanager
def progress_bar(wanted: bool, total: float, desc: str) -> Iterator[Any]:
    """A tqdm bar on a terminal; None into a log file (a redrawn bar is noise there) or without the bench
    extra, which brings tqdm: the run is the same without it."""
    try:
        from tqdm import tqdm
    except ImportError:
        wanted = False
    if not (wanted and sys.stderr.isatty()):
        yield None
        return
    with tqdm(total=round(total, 1) or None, desc=desc, unit="s", leave=False,
              bar_format="{desc}: {bar} {n:.1f}/{total}s") as bar:  # fmt: skip
        yield bar


def _read_or_none(probe: Probe) -> Sample | None:
    try:
        return probe.read()[1]
    except SCRAPE_ERRORS:
        return None
