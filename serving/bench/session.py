"""One mnist-bench run: every configuration at every load level, repeated and interleaved, the echo floor
and the ORT ceiling beside them; what failed; and the outputs (tables, JSON, CSV, plot)."""

import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from serving.bench import report
from serving.bench.apis import Workload, build_workload
from serving.bench.baselines import newest_model, ort_ceiling
from serving.bench.config import BenchConfig, RequestOptions, RunningServers
from serving.bench.loadgen import Connection, Level, RunSpec
from serving.bench.runner import Probe, run_level
from serving.bench.spawn import Spawned, SpawnError, exit_status
from serving.runtime import RuntimeOptions


@dataclass(frozen=True)
class Config:
    """One column of a comparison: how the server is started (spawn only) and what the client sends."""

    label: str
    server_args: tuple[str, ...]
    request: RequestOptions
    running: RunningServers = field(default_factory=RunningServers)  # without --spawn: whom to load

    @property
    def setup(self) -> dict:
        r = self.request
        return {
            "model": r.model,
            "version": r.model_version,
            "protocol": r.protocol,
            "api": r.api,
            "stream": r.stream,
            "images_per_request": r.images_per_request,
            "http_tensors": r.tensors,
            "server_args": shlex.join(self.server_args),
            "serve_command": r.serve_command,
        }


def split_targets(text: str) -> tuple[str, ...]:
    """`--server A,B` is two targets; a target with a gRPC scheme (dns:, ipv4:...) is one, commas included."""
    if text.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return (text,)
    return tuple(t.strip() for t in text.split(",") if t.strip())


def say(text: str) -> None:
    """Progress on stderr, at once; the results table goes to stdout at the end."""
    print(text, file=sys.stderr, flush=True)


def run_all(
    settings: BenchConfig,
    configs: list[Config],
    secured: Connection,
    images: np.ndarray,
    labels: np.ndarray,
) -> list[str]:
    """Every configuration, the floor and the ceiling; writes the outputs and returns what failed.
    `secured` holds the TLS files and token; `images` and `labels` are the digits to send."""
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    say(f"load average before the run: {load_before}")
    output = settings.output
    output.out.mkdir(parents=True, exist_ok=True)
    ceilings = {}
    if output.baselines in ("all", "ceiling") and settings.target.repo:
        sizes = output.ceiling_sizes({c.request.images_per_request for c in configs})
        for model, version in dict.fromkeys((c.request.model, c.request.model_version) for c in configs):
            say(f"ORT ceiling: {model} at batch sizes {sizes}")
            options = RuntimeOptions(device=output.ceiling_device)
            ceilings[model] = ort_ceiling(
                newest_model(settings.target.repo, model, version), images, sizes, options=options
            )

    run = Run(settings, images, labels, secured)
    rows, floor_rows = [], []
    procs = settings.load.procs
    context = get_context("spawn")  # never fork a process that has live gRPC channels
    with ProcessPoolExecutor(procs, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.2] * procs))  # start the generator processes now, not in a level
        for repeat in range(settings.load.repeat):  # configurations interleaved: drift hits all of them alike
            for each in configs:
                rows += [row | {"repeat": repeat} for row in run.config(pool, each)]
            if output.baselines in ("all", "floor"):
                floor_rows += [row | {"repeat": repeat} for row in run.floor(pool, configs)]
    report.add_ratios(rows, floor_rows, ceilings)
    write_outputs(settings, configs, rows, floor_rows, ceilings, run.servers, load_before)
    return run.failures


class Run:
    """What every configuration's levels share: the settings, the digits, the generator pool, and the
    record of spawned servers and of failures."""

    def __init__(self, settings: BenchConfig, images, labels, secured: Connection):
        self.settings, self.images, self.labels, self.secured = settings, images, labels, secured
        self.levels = settings.load.levels
        self.servers: list[dict] = []
        self.failures: list[str] = []

    def config(self, pool, config: Config) -> list[dict]:
        """Every level for one configuration, against its own spawned server or the given ones. A server
        that cannot start, or dies, fails this configuration only: the others still run."""
        rows: list[dict] = []
        target = self.settings.target
        spawned = self._spawn(config) if target.spawn else None
        try:
            protocol = config.request.protocol
            if spawned is not None:
                conn = replace(self.secured, targets=(spawned.target_for(protocol),))
                spawned.wait_serving(conn, say=lambda line: say(f"[{config.label}] server: {line}"))
                probe = Probe((spawned.metrics_url,), config.request.model, spawned.process.pid)
            else:
                conn = replace(self.secured, targets=split_targets(config.running.targets(protocol)))
                urls = config.running.metrics_url
                probe = Probe(tuple(urls.split(",")) if urls else (), config.request.model)
            self._levels(pool, config, conn, probe, spawned, rows)
        except (SpawnError, ConnectionError) as e:
            self.failures.append(f"[{config.label}] {e}")
        finally:
            if spawned is not None:
                running = spawned.process.poll() is None  # else its exit is already told
                code = spawned.stop()
                self.servers.append({"config": config.label, "command": str(spawned), "exit_code": code})
                if running and code != 0:
                    self.failures.append(f"[{config.label}] the server {exit_status(code)} when stopped")
        return rows

    def _spawn(self, config: Config) -> Spawned:
        log = self.settings.output.out / f"server-{_slug(config.label)}.log"
        command = shlex.split(config.request.serve_command)
        spawned = Spawned.mnist_serve(command, self.settings.target.repo, list(config.server_args), log)
        say(f"[{config.label}] spawned: {spawned}")
        return spawned

    def _levels(self, pool, config: Config, conn: Connection, probe: Probe, spawned: Spawned | None,
                rows: list[dict]) -> None:  # fmt: skip
        """The levels in turn, into `rows`, until the spawned server (if any) has exited."""
        setup = config.setup | {"retries": self.settings.load.retries}
        workload = self._workload(config.request)
        for k, level in enumerate(self.levels):
            row = self._level(pool, config.label, setup, workload, conn, level, probe, check=True)
            code = spawned.process.poll() if spawned is not None else None
            if code is not None:
                row["failed"] = f"the server {exit_status(code)} during this level (log: {spawned.log_path})"
            rows.append(row)
            self._account(config.label, row)
            if code is not None:
                if rest := self.levels[k + 1 :]:
                    names = ", ".join(level.label for level in rest)
                    self.failures.append(f"[{config.label}] {names}: not run, the server had exited")
                return

    def floor(self, pool, configs: list[Config]) -> list[dict]:
        """The same levels against the echo server, once per distinct request shape."""
        rows = []
        echo = Spawned.echo(self.settings.output.out / "server-echo.log")
        try:
            echo.wait_serving(Connection((echo.target,)))
            for shape in dict.fromkeys(_echo_shape(c.request) for c in configs):
                workload = self._workload(shape)
                setup = Config("", (), shape).setup | {
                    "checked": False,
                    "retries": self.settings.load.retries,
                }
                label = report.floor_label(setup)
                conn, probe = Connection((echo.target_for(shape.protocol),)), Probe(pid=echo.process.pid)
                for level in self.levels:
                    rows.append(self._level(pool, label, setup, workload, conn, level, probe, check=False))
                    self._account(label, rows[-1])
        except (SpawnError, ConnectionError) as e:
            self.failures.append(f"[echo floor] {e}")
        finally:
            echo.stop()
        return rows

    def _workload(self, r: RequestOptions) -> Workload:
        return build_workload(
            r.api, r.stream, r.model, r.model_version, self.images, self.labels, r.images_per_request,
            protocol=r.protocol, http_tensors=r.http_tensors, timeout_s=self.settings.load.timeout,
        )  # fmt: skip

    def _level(self, pool, label: str, setup: dict, workload, conn: Connection, level: Level, probe: Probe,
               check: bool) -> dict:  # fmt: skip
        a = self.settings.load
        spec = RunSpec(
            workload, conn, level, start_at=0.0, warmup_s=a.warmup, duration_s=a.duration,
            max_requests=a.requests, timeout_s=a.timeout, late_after_s=a.late_ms / 1e3, seed=a.seed,
            check=check, retries=a.retries,
        )  # fmt: skip
        measured = run_level(pool, a.procs, spec, probe, label, self.settings.output.progress)
        return report.summarize(label, setup, level, measured.result, measured.split, measured.server_status)

    def _account(self, label: str, row: dict) -> None:
        say(report.progress_line(row))
        if row["failed"]:
            self.failures.append(f"[{label}] {report.level_name(row)}: {row['failed']}")


def write_outputs(settings: BenchConfig, configs, rows, floor_rows, ceilings, servers, load_before) -> None:
    title = f"mnist-bench: {', '.join(c.label for c in configs)} on {report.machine()['cpu']}"
    out, repeats = settings.output.out, settings.load.repeat
    summary = report.repeat_summary(rows + floor_rows)
    report.write_json(
        out / "results.json",
        {
            "command": ["mnist-bench", *sys.argv[1:]],
            "machine": report.machine(),
            "load_avg_before": load_before,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": flat_settings(settings, configs),
            "servers": servers,
            "ceiling": ceilings,
            "floor": floor_rows,
            "results": rows,
            "summary": summary,
        },
    )
    report.write_csv(out / "results.csv", rows + floor_rows)
    tables = [report.markdown(rows + floor_rows)]
    if repeats > 1:
        tables += [f"Mean ± std over {repeats} repeats:", report.summary_markdown(summary)]
    (out / "results.md").write_text("\n\n".join(tables) + "\n")
    plotted = report.plot(out / "latency.png", rows, floor_rows, title)
    lines = [report.ceiling_table(ceilings), ""] if ceilings else []
    lines += [report.table(rows + floor_rows), *report.notes(rows + floor_rows)]
    retries = settings.load.retries
    retried = "each request sent once" if not retries else f"up to {retries} resend(s) per request"
    lines.append(f"\n{retried}; load average before the run: {load_before}")
    if repeats > 1:
        lines += [f"mean ± std over {repeats} repeats:", report.summary_table(summary)]
    written = "results.json, results.csv, results.md" + (", latency.png" if plotted else "")
    lines.append(f"wrote {out}/{written}")
    if not plotted:
        lines.append("latency.png not written: the plot needs matplotlib (the bench extra)")
    print("\n".join(lines), flush=True)


def flat_settings(settings: BenchConfig, configs: list[Config]) -> dict:
    """Every setting of the run by its flag's name (files as paths, not contents), and each configuration."""
    flat = {}
    for section in fields(settings):
        flat |= asdict(getattr(settings, section.name))
    flat["compare"] = [{"label": c.label, **c.setup, **asdict(c.running)} for c in configs]
    return {k: str(v) if isinstance(v, Path) else v for k, v in flat.items()}


def _echo_shape(request: RequestOptions) -> RequestOptions:
    """The request as the echo floor gets it: the same payload, for no model."""
    return replace(
        request, model="echo", model_version="", serve_command="", http_tensors=request.tensors or ""
    )


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
