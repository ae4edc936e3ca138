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
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from serving.bench import report
from serving.bench.apis import API_NAMES, build_workload
from serving.bench.baselines import newest_model, ort_ceiling
from serving.bench.loadgen import Connection, Level, RunSpec
from serving.bench.runner import Probe, run_level
from serving.bench.spawn import Spawned, SpawnError, serve_command
from serving.channels import DEFAULT_CONNECTIONS
from serving.commandline import HelpFormatter, bounded, bounded_list
from serving.runtime import DeviceError, ModelLoadError, RuntimeOptions


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
    where = p.add_argument_group("server")
    where.add_argument(
        "--server",
        help="running server(s): HOST:PORT[,HOST:PORT...] (each its own target), or one gRPC target such as "
        "dns:///NAME:PORT or ipv4:A:PORT,B:PORT (round-robin over its addresses)",
    )
    where.add_argument(
        "--connections",
        type=bounded(int, 1, 1024),
        default=DEFAULT_CONNECTIONS,
        help="channels per target in each generator process: a server's worker processes each get a share",
    )
    where.add_argument(
        "--metrics-url", help="their Prometheus URL(s), comma-separated, for the server-side split"
    )
    where.add_argument(
        "--spawn", action="store_true", help="start mnist-serve on 127.0.0.1 for the run, then stop it"
    )
    where.add_argument("--repo", type=Path, help="model repository (for --spawn and the ORT ceiling)")
    where.add_argument(
        "--server-args",
        default="",
        help='extra mnist-serve options for --spawn, one string: --server-args="--max-batch-size 1"',
    )
    where.add_argument(
        "--compare", nargs="+", metavar="LABEL:ARGS", help="configurations to run side by side"
    )
    client = p.add_argument_group("requests")
    _config_options(client)
    load = p.add_argument_group("load")
    levels = load.add_mutually_exclusive_group()
    levels.add_argument(
        "--concurrency",
        type=bounded_list(int, 1, 100_000),
        help="closed loop: clients in flight, e.g. 1,8,32,64 (default: 1,8,32,64)",
    )
    levels.add_argument(
        "--rate", type=bounded_list(float, 0.01, 10_000_000), help="open loop: requests/s, e.g. 500,1000,2000"
    )
    load.add_argument(
        "--arrivals", choices=["constant", "poisson"], default="constant", help="open loop arrivals"
    )
    load.add_argument(
        "--streams", type=bounded(int, 1, 10_000), default=4, help="open loop with --stream: streams"
    )
    load.add_argument(
        "--duration", type=bounded(float, 0.01, 86_400), default=5.0, help="measured seconds per level"
    )
    load.add_argument(
        "--requests",
        type=bounded(int, 0, 1_000_000_000),
        default=0,
        help="measure this many requests per level instead of --duration (0: use --duration)",
    )
    load.add_argument(
        "--warmup", type=bounded(float, 0, 3600), default=1.0, help="unmeasured seconds before each level"
    )
    load.add_argument("--procs", type=bounded(int, 1, 256), default=1, help="load generator processes")
    load.add_argument(
        "--repeat",
        type=bounded(int, 1, 100),
        default=1,
        help="run every configuration (and the floor) this many times, interleaved; the summary gives mean "
        "± std over the repeats and each configuration's throughput relative to the first",
    )
    load.add_argument(
        "--timeout", type=bounded(float, 0.001, 86_400), default=10.0, help="per-request deadline, seconds"
    )
    load.add_argument(
        "--late-ms",
        type=bounded(float, 0.001, 60_000),
        default=2.0,
        help="open loop: a send this late counts as late (asyncio's timers have 1 ms resolution)",
    )
    load.add_argument(
        "--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="arrival times and digit order"
    )
    base = p.add_argument_group("baselines and output")
    base.add_argument("--baselines", choices=["all", "ceiling", "floor", "none"], default="all", help="which")
    base.add_argument(
        "--ceiling-device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device of the in-process ONNX Runtime ceiling (cuda: the server's CUDA path with its buckets)",
    )
    base.add_argument(
        "--ceiling-batch-sizes",
        type=bounded_list(int, 1, 65_536),
        help="ORT ceiling batch sizes (default: 1,8,32,64,128 and the images per request)",
    )
    base.add_argument("--out", type=Path, default=Path("bench-results"), help="JSON/CSV/PNG directory")
    base.add_argument(
        "--no-progress", action="store_true", help="no progress bars (off anyway when stderr is no terminal)"
    )
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server certificate: use TLS")
    sec.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    sec.add_argument("--tls-key", type=Path, help="PEM client key (mTLS)")
    sec.add_argument("--tls-server-name", help="expected name in the server certificate (default: the host)")
    sec.add_argument("--token-file", type=Path, help="file holding the bearer token")
    return p


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


def connection(args: argparse.Namespace, targets: tuple[str, ...]) -> Connection:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    token = args.token_file.read_text().strip() if args.token_file else None
    return Connection(
        targets, read(args.tls_ca), read(args.tls_key), read(args.tls_cert), args.tls_server_name, token,
        connections=args.connections,
    )  # fmt: skip


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
        for path in (args.tls_ca, args.tls_cert, args.tls_key, args.token_file):
            if path is not None:
                path.read_bytes()
        run_all(args, configs)
    except (OSError, SpawnError, ModelLoadError, DeviceError) as e:
        print(f"mnist-bench: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("mnist-bench: interrupted", file=sys.stderr)
        sys.exit(130)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from serving.mnist import DataError, load_mnist

    try:
        mnist = load_mnist()
    except DataError as e:
        raise OSError(str(e)) from None
    return mnist.test_images, mnist.test_labels


def run_all(args: argparse.Namespace, configs: list[Config]) -> None:
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    print(f"load average before the run: {load_before}", file=sys.stderr)
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
            print(f"ORT ceiling: {model} at batch sizes {sizes}", file=sys.stderr)
            options = RuntimeOptions(device=args.ceiling_device)
            ceilings[model] = ort_ceiling(
                newest_model(args.repo, model, version), images, sizes, options=options
            )
        print(report.ceiling_table(ceilings))

    rows, floor_rows, servers = [], [], []
    context = get_context("spawn")  # never fork a process that has live gRPC channels
    with ProcessPoolExecutor(args.procs, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.2] * args.procs))  # start the generator processes now, not in a level
        for repeat in range(args.repeat):  # configurations interleaved: drift hits all of them alike
            for config in configs:
                for row in run_config(pool, args, config, levels, images, labels, servers):
                    rows.append(row | {"repeat": repeat})
            if args.baselines in ("all", "floor"):
                floor_rows += [
                    row | {"repeat": repeat} for row in run_floor(pool, args, configs, levels, images, labels)
                ]
    report.add_ratios(rows, floor_rows, ceilings)
    write_outputs(args, configs, rows, floor_rows, ceilings, servers, load_before)


def run_config(pool, args, config: Config, levels: list[Level], images, labels, servers: list) -> list[dict]:
    """Every level for one configuration, against its own spawned server or the given ones."""
    rows, spawned = [], None
    try:
        if args.spawn:
            log = args.out / f"server-{_slug(config.label)}.log"
            command = shlex.split(config.serve_command)
            spawned = Spawned.mnist_serve(command, args.repo, list(config.server_args), log)
            print(f"[{config.label}] spawned: {spawned}", file=sys.stderr)
            conn = connection(args, (spawned.target,))
            spawned.wait_serving(conn)
            probe = Probe((spawned.metrics_url,), config.model, spawned.process.pid)
        else:
            conn = connection(args, split_targets(args.server))
            probe = Probe(tuple(args.metrics_url.split(",")) if args.metrics_url else (), config.model)
        workload = build_workload(
            config.api, config.stream, config.model, config.version, images, labels, config.images_per_request
        )
        for level in levels:
            spec = _spec(args, workload, conn, level, check=True)
            result, split = run_level(pool, args.procs, spec, probe, config.label, not args.no_progress)
            rows.append(report.summarize(config.label, config.setup, level, result, split))
            print(report.table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    finally:
        if spawned:
            code = spawned.stop()
            servers.append({"config": config.label, "command": str(spawned), "exit_code": code})
    return rows


def run_floor(pool, args, configs: list[Config], levels: list[Level], images, labels) -> list[dict]:
    """The same levels against the echo server, once per distinct request shape."""
    rows = []
    echo = Spawned.echo(args.out / "server-echo.log")
    try:
        conn = Connection((echo.target,))
        echo.wait_serving(conn)
        shapes = dict.fromkeys((c.api, c.stream, c.images_per_request) for c in configs)
        for api, stream, ipr in shapes:
            workload = build_workload(api, stream, "echo", "", images, labels, ipr)
            setup = {"model": "echo", "version": "", "api": api, "stream": stream, "images_per_request": ipr,
                     "server_args": "", "checked": False}  # fmt: skip
            for level in levels:
                spec = _spec(args, workload, conn, level, check=False)
                label = report.floor_label(api, stream, ipr)
                result, split = run_level(
                    pool, args.procs, spec, Probe(pid=echo.process.pid), label, not args.no_progress
                )
                rows.append(report.summarize(label, setup, level, result, split))
    finally:
        echo.stop()
    return rows


def _spec(args, workload, conn: Connection, level: Level, check: bool) -> RunSpec:
    return RunSpec(
        workload, conn, level, start_at=0.0, warmup_s=args.warmup, duration_s=args.duration,
        max_requests=args.requests, timeout_s=args.timeout, late_after_s=args.late_ms / 1e3,
        seed=args.seed, check=check,
    )  # fmt: skip


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
    tables = [
        report.markdown(rows + floor_rows),
        "Mean ± std over repeats:",
        report.summary_markdown(summary),
    ]
    (out / "results.md").write_text("\n\n".join(tables) + "\n")
    report.plot(out / "latency.png", rows, floor_rows, title)
    if ceilings:
        print(report.ceiling_table(ceilings))
    print(report.table(rows + floor_rows))
    print(f"\nmean ± std over {args.repeat} repeat(s); load average before the run: {load_before}")
    print(report.summary_table(summary))
    print(f"wrote {out}/results.json, results.csv, results.md, latency.png")


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


if __name__ == "__main__":
    main()
