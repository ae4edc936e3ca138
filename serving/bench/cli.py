"""mnist-bench: how many images per second, at what latency, and how close to the hardware's ceiling.

    mnist-bench --spawn --repo models --concurrency 1,8,32,64
    mnist-bench --server 10.0.0.5:8001,10.0.0.6:8001 --rate 500,1000 \\
        --metrics-url http://10.0.0.5:8002/metrics,http://10.0.0.6:8002/metrics
    mnist-bench --spawn --repo models --concurrency 64 \\
        --compare "batching=off:--max-batch-size 1" "batching=on:" "classify:-- --api classify"

--compare "LABEL:[SERVER ARGS][ -- BENCH ARGS]" runs one configuration per argument, each against its own
freshly spawned server started with --server-args plus SERVER ARGS; BENCH ARGS may override --model,
--model-version, --api, --stream, --images-per-request and --serve-command for that configuration.

Every request is sent once, unless --retries says otherwise, and every attempt is counted: the figures
are what the server did. Each level gives requests, attempts and failures by status beside the server's
own count; a level that served nothing, or whose server died, is reported failed, and the run exits 1.
"""

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from serving.bench import session
from serving.bench.apis import API_NAMES
from serving.bench.baselines import newest_model
from serving.bench.loadgen import Connection
from serving.bench.session import Config
from serving.bench.spawn import serve_command
from serving.channels import DEFAULT_CONNECTIONS, add_token_flag
from serving.commandline import HelpFormatter, bounded, bounded_list
from serving.runtime import DeviceError, ModelLoadError
from serving.security import SecurityConfigError, read_secret, read_token


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
        help="--spawn runs this plus --repo/--host/--port/--metrics-port/--http-port and the server args, "
        "e.g. 'taskset -c 1 mnist-serve' (default: mnist-serve of this environment)",
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
        "counted. 0 (the default): each request is sent once, and the figures are what the server did",
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
        failures = session.run_all(args, configs, secured, *load_digits())
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


if __name__ == "__main__":
    main()
