"""mnist-bench: how many images per second, at what latency, and how close to the hardware's ceiling.

    mnist-bench --spawn --repo models --concurrency 1,8,32,64
    mnist-bench --server 10.0.0.5:8001,10.0.0.6:8001 --rate 500,1000 \\
        --metrics-url http://10.0.0.5:8002/metrics,http://10.0.0.6:8002/metrics
    mnist-bench --spawn --repo models --concurrency 64 \\
        --compare "batching=off:--max-batch-size 1" "batching=on:" "classify:-- --api classify"

--compare "LABEL:[SERVER ARGS][ -- BENCH ARGS]" runs one configuration per argument, each against its own
freshly spawned server started with --server-args plus SERVER ARGS; BENCH ARGS may override --model,
--model-version, --api, --stream, --images-per-request and --serve-command for that configuration.
"""

import argparse
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from serving.bench import report
from serving.bench.apis import API_NAMES, build_workload
from serving.bench.baselines import newest_model, ort_ceiling
from serving.bench.loadgen import Connection, Level, RunSpec
from serving.bench.runner import Probe, run_level
from serving.bench.spawn import Spawned, SpawnError, exit_status, serve_command
from serving.channels import DEFAULT_CONNECTIONS, add_token_flag
from serving.commandline import HelpFormatter, bounded, bounded_list
from serving.runtime import DeviceError, ModelLoadError, RuntimeOptions
from serving.security import SecurityConfigError, read_secret, read_token


@dataclass(frozen=True)
class Config:
    """One column of a comparison: how the server is started (spawn only) and what the client sends."""

    label: str
    server_args: tuple[str, ...]
    serve_command: str
    model: str
    version: str
    api: str
    stream: bool
    images_per_request: int

    @staticmethod
    def from_args(label: str, server_args: tuple[str, ...], ns: argparse.Namespace) -> "Config":
        return Config(
            label, server_args, ns.serve_command, ns.model, ns.model_version, ns.api, ns.stream,
            ns.images_per_request,
        )  # fmt: skip

    @property
    def setup(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "api": self.api,
            "stream": self.stream,
            "images_per_request": self.images_per_request,
            "server_args": shlex.join(self.server_args),
            "serve_command": self.serve_command,
        }


def _config_options(p: argparse.ArgumentParser) -> None:
    """The options a --compare configuration may override (after its '--')."""
    p.add_argument("--model", default="mnist", help="model name")
    p.add_argument("--model-version", default="", help="model version (default: the newest)")
    p.add_argument("--api", choices=API_NAMES, default="kserve", help="API to load")
    p.add_argument("--stream", action="store_true", help="bidirectional streaming RPC instead of unary")
    p.add_argument(
        "--images-per-request", type=bounded(int, 1, 1_000_000), default=1, help="images per request"
    )
    p.add_argument(
        "--serve-command",
        default=shlex.join(serve_command()),
        help="--spawn runs this plus --repo/--host/--port/--metrics-port and the server args, e.g. "
        "'taskset -c 1 mnist-serve' (default: mnist-serve of this environment)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnist-bench", description=__doc__, formatter_class=HelpFormatter)
    _server_options(p.add_argument_group("server"))
    _config_options(p.add_argument_group("requests"))
    _load_options(p.add_argument_group("load"))
    _output_options(p.add_argument_group("baselines and output"))
    _security_options(p.add_argument_group("security"))
    return p


def _server_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--server",
        help="running server(s): HOST:PORT[,HOST:PORT...] (each its own target), or one gRPC target such as "
        "dns:///NAME:PORT or ipv4:A:PORT,B:PORT (round-robin over its addresses)",
    )
    group.add_argument(
        "--connections",
        type=bounded(int, 1, 1024),
        default=DEFAULT_CONNECTIONS,
        help="channels per target in each generator process: a server's worker processes each get a share",
    )
    group.add_argument(
        "--metrics-url", help="their Prometheus URL(s), comma-separated, for the server-side split"
    )
    group.add_argument(
        "--spawn", action="store_true", help="start mnist-serve on 127.0.0.1 for the run, then stop it"
    )
    group.add_argument("--repo", type=Path, help="model repository (for --spawn and the ORT ceiling)")
    group.add_argument(
        "--server-args",
        default="",
        help='extra mnist-serve options for --spawn, one string: --server-args="--max-batch-size 1"',
    )
    group.add_argument(
        "--compare", nargs="+", metavar="LABEL:ARGS", help="configurations to run side by side"
    )


def _load_options(group: argparse._ArgumentGroup) -> None:
    levels = group.add_mutually_exclusive_group()
    levels.add_argument(
        "--concurrency",
        type=bounded_list(int, 1, 100_000),
        help="closed loop: clients in flight, e.g. 1,8,32,64 (default: 1,8,32,64)",
    )
    levels.add_argument(
        "--rate", type=bounded_list(float, 0.01, 10_000_000), help="open loop: requests/s, e.g. 500,1000,2000"
    )
    group.add_argument(
        "--arrivals", choices=["constant", "poisson"], default="constant", help="open loop arrivals"
    )
    group.add_argument(
        "--streams", type=bounded(int, 1, 10_000), default=4, help="open loop with --stream: streams"
    )
    group.add_argument(
        "--duration", type=bounded(float, 0.01, 86_400), default=5.0, help="measured seconds per level"
    )
    group.add_argument(
        "--requests",
        type=bounded(int, 0, 1_000_000_000),
        default=0,
        help="measure this many requests per level instead of --duration (0: use --duration)",
    )
    group.add_argument(
        "--warmup", type=bounded(float, 0, 3600), default=1.0, help="unmeasured seconds before each level"
    )
    group.add_argument("--procs", type=bounded(int, 1, 256), default=1, help="load generator processes")
    group.add_argument(
        "--repeat",
        type=bounded(int, 1, 100),
        default=1,
        help="run every configuration (and the floor) this many times, interleaved; the summary gives mean "
        "± std over the repeats and each configuration's throughput relative to the first",
    )
    group.add_argument(
        "--timeout", type=bounded(float, 0.001, 86_400), default=10.0, help="per-request deadline, seconds"
    )
    group.add_argument(
        "--retries",
        type=bounded(int, 0, 10),
        default=0,
        help="resend a request that failed with UNAVAILABLE (or whose stream ended unanswered) up to this "
        "many times, with the back-off and the retry budget of the project's clients; every attempt is "
        "counted. 0: each request is sent once, and the figures are what the server did",
    )
    group.add_argument(
        "--late-ms",
        type=bounded(float, 0.001, 60_000),
        default=2.0,
        help="open loop: a send this late counts as late (asyncio's timers have 1 ms resolution)",
    )
    group.add_argument(
        "--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="arrival times and digit order"
    )


def _output_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--baselines", choices=["all", "ceiling", "floor", "none"], default="all", help="which"
    )
    group.add_argument(
        "--ceiling-device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device of the in-process ONNX Runtime ceiling (cuda: the server's CUDA path with its buckets)",
    )
    group.add_argument(
        "--ceiling-batch-sizes",
        type=bounded_list(int, 1, 65_536),
        help="ORT ceiling batch sizes (default: 1,8,32,64,128 and the images per request)",
    )
    group.add_argument("--out", type=Path, default=Path("bench-results"), help="JSON/CSV/PNG directory")
    group.add_argument(
        "--no-progress", action="store_true", help="no progress bars (off anyway when stderr is no terminal)"
    )


def _security_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server certificate: use TLS")
    group.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    group.add_argument("--tls-key", type=Path, help="PEM client key (mTLS)")
    group.add_argument(
        "--tls-server-name", help="expected name in the server certificate (default: the host)"
    )
    add_token_flag(group)


def parse_configs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Config]:
    base = tuple(shlex.split(args.server_args))
    if not args.compare:
        return [Config.from_args("default", base, args)]
    sub = argparse.ArgumentParser(prog="--compare", add_help=False, exit_on_error=False)
    _config_options(sub)
    configs = []
    for spec in args.compare:
        label, sep, rest = spec.partition(":")
        if not sep or not label.strip():
            parser.error(f"--compare {spec!r}: expected LABEL:[SERVER ARGS][ -- BENCH ARGS]")
        words = shlex.split(rest)
        cut = words.index("--") if "--" in words else len(words)
        server_args, bench_args = words[:cut], words[cut + 1 :]
        if server_args and not args.spawn:
            parser.error(f"--compare {label!r}: server options need --spawn")
        try:
            own, unknown = sub.parse_known_args(bench_args, argparse.Namespace(**vars(args)))
        except argparse.ArgumentError as e:
            parser.error(f"--compare {label!r}: {e}")
        if unknown:
            parser.error(f"--compare {label!r}: after '--' only the per-configuration options, got {unknown}")
        configs.append(Config.from_args(label.strip(), base + tuple(server_args), own))
    if len({c.label for c in configs}) != len(configs):
        parser.error("--compare labels must be distinct")
    return configs


def connection(args: argparse.Namespace) -> Connection:
    """TLS and token as given (read and checked now: a missing or empty file is a usage error); the
    targets are filled in per configuration."""

    def read(path: Path | None, what: str) -> bytes | None:
        return read_secret(path, what) if path else None

    token = read_token(args.auth_token_file) if args.auth_token_file else None
    ca, key, cert = (
        read(args.tls_ca, "TLS CA"),
        read(args.tls_key, "TLS key"),
        read(args.tls_cert, "TLS certificate"),
    )
    return Connection((), ca, key, cert, args.tls_server_name, token, connections=args.connections)


def split_targets(text: str) -> tuple[str, ...]:
    """`--server A,B` is two targets; a target with a gRPC scheme (dns:, ipv4:...) is one, commas included."""
    if text.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return (text,)
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spawn == bool(args.server):
        parser.error("give exactly one of --server HOST:PORT[,...] and --spawn")
    if args.spawn and not args.repo:
        parser.error("--spawn needs --repo")
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert and not args.tls_ca):
        parser.error("mTLS needs --tls-ca, --tls-cert and --tls-key together")
    configs = parse_configs(args, parser)
    try:
        secured = connection(args)
    except SecurityConfigError as e:
        print(f"mnist-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        if args.spawn:  # a server with nothing to serve would only wait for it
            for model, version in dict.fromkeys((c.model, c.version) for c in configs):
                newest_model(args.repo, model, version)
        failures = run_all(args, configs, secured)
    except (OSError, ModelLoadError, DeviceError) as e:
        print(f"mnist-bench: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("mnist-bench: interrupted", file=sys.stderr)
        sys.exit(130)
    if failures:
        for failure in failures:
            print(f"mnist-bench: failed: {failure}", file=sys.stderr)
        print(
            f"mnist-bench: error: {len(failures)} failure(s); the results of every configuration are in "
            f"{args.out}/results.json",
            file=sys.stderr,
        )
        sys.exit(1)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from training.data import DataError, load_mnist

    try:
        mnist = load_mnist()
    except DataError as e:
        raise OSError(str(e)) from None
    return mnist.test_images, mnist.test_labels


def say(text: str) -> None:
    """Progress on stderr, at once; the results table goes to stdout at the end."""
    print(text, file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace, configs: list[Config], secured: Connection) -> list[str]:
    """Every configuration, the floor and the ceiling; writes the outputs and returns what failed."""
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    say(f"load average before the run: {load_before}")
    images, labels = load_digits()
    if args.rate:
        levels = [Level(rate=r, arrivals=args.arrivals, streams=args.streams) for r in args.rate]
    else:
        levels = [Level(concurrency=c) for c in args.concurrency or (1, 8, 32, 64)]
    args.out.mkdir(parents=True, exist_ok=True)
    ceilings = {}
    if args.baselines in ("all", "ceiling") and args.repo:
        sizes = sorted(
            set(args.ceiling_batch_sizes or [1, 8, 32, 64, 128]) | {c.images_per_request for c in configs}
        )
        for model, version in dict.fromkeys((c.model, c.version) for c in configs):
            say(f"ORT ceiling: {model} at batch sizes {sizes}")
            options = RuntimeOptions(device=args.ceiling_device)
            ceilings[model] = ort_ceiling(
                newest_model(args.repo, model, version), images, sizes, options=options
            )

    run = Run(args, levels, images, labels, secured)
    rows, floor_rows = [], []
    context = get_context("spawn")  # never fork a process that has live gRPC channels
    with ProcessPoolExecutor(args.procs, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.2] * args.procs))  # start the generator processes now, not in a level
        for repeat in range(args.repeat):  # configurations interleaved: drift hits all of them alike
            for config in configs:
                rows += [row | {"repeat": repeat} for row in run.config(pool, config)]
            if args.baselines in ("all", "floor"):
                floor_rows += [row | {"repeat": repeat} for row in run.floor(pool, configs)]
    report.add_ratios(rows, floor_rows, ceilings)
    write_outputs(args, configs, rows, floor_rows, ceilings, run.servers, load_before)
    return run.failures


class Run:
    """What every configuration's levels share: the settings, the digits, the generator pool, and the
    record of spawned servers and of failures."""

    def __init__(self, args: argparse.Namespace, levels: list[Level], images, labels, secured: Connection):
        self.args, self.levels, self.images, self.labels, self.secured = args, levels, images, labels, secured
        self.servers: list[dict] = []
        self.failures: list[str] = []

    def config(self, pool, config: Config) -> list[dict]:
        """Every level for one configuration, against its own spawned server or the given ones. A server
        that cannot start, or dies, fails this configuration only: the others still run."""
        rows: list[dict] = []
        spawned = self._spawn(config) if self.args.spawn else None
        try:
            if spawned is not None:
                conn = replace(self.secured, targets=(spawned.target,))
                spawned.wait_serving(conn, say=lambda line: say(f"[{config.label}] server: {line}"))
                probe = Probe((spawned.metrics_url,), config.model, spawned.process.pid)
            else:
                conn = replace(self.secured, targets=split_targets(self.args.server))
                urls = self.args.metrics_url
                probe = Probe(tuple(urls.split(",")) if urls else (), config.model)
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
        log = self.args.out / f"server-{_slug(config.label)}.log"
        command = shlex.split(config.serve_command)
        spawned = Spawned.mnist_serve(command, self.args.repo, list(config.server_args), log)
        say(f"[{config.label}] spawned: {spawned}")
        return spawned

    def _levels(self, pool, config: Config, conn: Connection, probe: Probe, spawned: Spawned | None,
                rows: list[dict]) -> None:  # fmt: skip
        """The levels in turn, into `rows`, until the spawned server (if any) has exited."""
        setup = config.setup | {"retries": self.args.retries}
        workload = build_workload(
            config.api, config.stream, config.model, config.version, self.images, self.labels,
            config.images_per_request,
        )  # fmt: skip
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
        args, rows = self.args, []
        echo = Spawned.echo(args.out / "server-echo.log")
        try:
            conn = Connection((echo.target,))
            echo.wait_serving(conn)
            shapes = dict.fromkeys((c.api, c.stream, c.images_per_request) for c in configs)
            for api, stream, ipr in shapes:
                workload = build_workload(api, stream, "echo", "", self.images, self.labels, ipr)
                setup = {"model": "echo", "version": "", "api": api, "stream": stream,
                         "images_per_request": ipr, "server_args": "", "checked": False,
                         "retries": args.retries}  # fmt: skip
                label = report.floor_label(api, stream, ipr)
                probe = Probe(pid=echo.process.pid)
                for level in self.levels:
                    rows.append(self._level(pool, label, setup, workload, conn, level, probe, check=False))
                    self._account(label, rows[-1])
        except (SpawnError, ConnectionError) as e:
            self.failures.append(f"[echo floor] {e}")
        finally:
            echo.stop()
        return rows

    def _level(self, pool, label: str, setup: dict, workload, conn: Connection, level: Level, probe: Probe,
               check: bool) -> dict:  # fmt: skip
        a = self.args
        spec = RunSpec(
            workload, conn, level, start_at=0.0, warmup_s=a.warmup, duration_s=a.duration,
            max_requests=a.requests, timeout_s=a.timeout, late_after_s=a.late_ms / 1e3, seed=a.seed,
            check=check, retries=a.retries,
        )  # fmt: skip
        measured = run_level(pool, a.procs, spec, probe, label, not a.no_progress)
        return report.summarize(label, setup, level, measured.result, measured.split, measured.server_status)

    def _account(self, label: str, row: dict) -> None:
        say(report.progress_line(row))
        if row["failed"]:
            self.failures.append(f"[{label}] {report.level_name(row)}: {row['failed']}")


def write_outputs(args, configs, rows, floor_rows, ceilings, servers, load_before) -> None:
    title = f"mnist-bench: {', '.join(c.label for c in configs)} on {report.machine()['cpu']}"
    out = args.out
    summary = report.repeat_summary(rows + floor_rows)
    report.write_json(
        out / "results.json",
        {
            "command": ["mnist-bench", *sys.argv[1:]],
            "machine": report.machine(),
            "load_avg_before": load_before,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "servers": servers,
            "ceiling": ceilings,
            "floor": floor_rows,
            "results": rows,
            "summary": summary,
        },
    )
    report.write_csv(out / "results.csv", rows + floor_rows)
    tables = [report.markdown(rows + floor_rows)]
    if args.repeat > 1:
        tables += [f"Mean ± std over {args.repeat} repeats:", report.summary_markdown(summary)]
    (out / "results.md").write_text("\n\n".join(tables) + "\n")
    report.plot(out / "latency.png", rows, floor_rows, title)
    lines = [report.ceiling_table(ceilings), ""] if ceilings else []
    lines += [report.table(rows + floor_rows), *report.notes(rows + floor_rows)]
    retried = "each request sent once" if not args.retries else f"up to {args.retries} resend(s) per request"
    lines.append(f"\n{retried}; load average before the run: {load_before}")
    if args.repeat > 1:
        lines += [f"mean ± std over {args.repeat} repeats:", report.summary_table(summary)]
    lines.append(f"wrote {out}/results.json, results.csv, results.md, latency.png")
    print("\n".join(lines), flush=True)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


if __name__ == "__main__":
    main()
