"""mnist-bench: how many images per second, at what latency, and how close to the hardware's ceiling.

    mnist-bench --spawn --repo models --concurrency 1,8,32,64
    mnist-bench --server 10.0.0.5:8001,10.0.0.6:8001 --rate 500,1000 \\
        --metrics-url http://10.0.0.5:8002/metrics,http://10.0.0.6:8002/metrics
    mnist-bench --spawn --repo models --concurrency 64 \\
        --compare "batching=off:--max-batch-size 1" "batching=on:" "classify:-- --api classify"
    mnist-bench --spawn --repo models --concurrency 1,32 --compare "grpc:" "http:-- --protocol http"

--compare "LABEL:[SERVER ARGS][ -- BENCH ARGS]" runs one configuration per argument, each against its own
freshly spawned server started with --server-args plus SERVER ARGS; BENCH ARGS may override the request
options (--protocol, --model, --model-version, --api, --stream, --images-per-request, --http-tensors and
--serve-command) for that configuration and, without --spawn, the running servers (--server, --http-server,
--metrics-url), so that different servers are compared in one run.

Every request is sent once, unless --retries says otherwise, and every attempt is counted: the figures
are what the server did. Each level gives requests, attempts and failures by status (gRPC status names;
over HTTP, HTTP_<status>) beside the server's own count; a level that served nothing, or whose server died,
is reported failed, and the run exits 1.
"""

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from serving.bench import session
from serving.bench.baselines import newest_model
from serving.bench.config import BenchConfig, RequestOptions, RunningServers
from serving.bench.loadgen import Connection
from serving.bench.session import Config
from serving.client import ClientSecurity
from serving.commandline import HelpFormatter, add_flags, add_former_name, build_config, from_flags
from serving.runtime import DeviceError, ModelLoadError
from serving.security import SecurityConfigError, read_secret

# The sections of --help, in order: a title and BenchConfig's field holding that section's options.
SECTIONS = (
    ("server", "target"),
    ("requests", "request"),
    ("load", "load"),
    ("baselines and output", "output"),
    ("security", "security"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnist-bench", description=__doc__, formatter_class=HelpFormatter)
    kinds = {f.name: f.default_factory for f in fields(BenchConfig)}
    for title, name in SECTIONS:
        add_flags(p.add_argument_group(title), kinds[name])
    add_former_name(p, "--token-file", "auth_token_file", Path)
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="LABEL:ARGS",
        help="configurations to run side by side (see above; default: one, from the options given)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, list[Config]]:
    """The checked settings and the configurations to run; a bad value exits 2 with one usage line."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    settings = build_config(parser, BenchConfig, namespace)
    return settings, parse_configs(settings, namespace.compare, parser)


def parse_configs(
    settings: BenchConfig, compare: list[str] | None, parser: argparse.ArgumentParser
) -> list[Config]:
    base = tuple(shlex.split(settings.target.server_args))
    if not compare:
        return [Config("default", base, settings.request, settings.target.running)]
    configs = [_compare_config(settings, spec, base, parser) for spec in compare]
    if len({c.label for c in configs}) != len(configs):
        parser.error("--compare labels must be distinct")
    return configs


def _compare_config(
    settings: BenchConfig, spec: str, base: tuple[str, ...], parser: argparse.ArgumentParser
) -> Config:
    """One --compare "LABEL:[SERVER ARGS][ -- BENCH ARGS]": BENCH ARGS override the request options."""
    label, sep, rest = spec.partition(":")
    label = label.strip()
    if not sep or not label:
        parser.error(f"--compare {spec!r}: expected LABEL:[SERVER ARGS][ -- BENCH ARGS]")
    words = shlex.split(rest)
    cut = words.index("--") if "--" in words else len(words)
    server_args, bench_args = words[:cut], words[cut + 1 :]
    if server_args and not settings.target.spawn:
        parser.error(f"--compare {label!r}: server options need --spawn")
    sub = argparse.ArgumentParser(prog="--compare", add_help=False, exit_on_error=False)
    add_flags(sub, RequestOptions, settings.request)
    running = settings.target.running
    if not settings.target.spawn:  # which running servers: a configuration may name others
        add_flags(sub, RunningServers, running)
    try:
        own, unknown = sub.parse_known_args(bench_args)
        request = from_flags(RequestOptions, own)
        if not settings.target.spawn:
            running = from_flags(RunningServers, own)
            running.targets(request.protocol)
    except (argparse.ArgumentError, ValueError) as e:
        parser.error(f"--compare {label!r}: {e}")
    if unknown:
        parser.error(f"--compare {label!r}: after '--' only the per-configuration options, got {unknown}")
    return Config(label, base + tuple(server_args), request, running)


def connection(settings: BenchConfig) -> Connection:
    """TLS and token as given, read and checked now (a missing or empty file is an error before anything
    starts); the targets are filled in per configuration."""
    s: ClientSecurity = settings.security

    def read(path: Path | None, what: str) -> bytes | None:
        return read_secret(path, what) if path else None

    return Connection(
        (),
        read(s.tls_ca, "TLS CA"),
        read(s.tls_key, "TLS key"),
        read(s.tls_cert, "TLS certificate"),
        s.tls_server_name,
        s.token(),
        connections=settings.target.connections,
        tls=s.uses_tls,
    )


def main(argv: list[str] | None = None) -> None:
    settings, configs = parse_args(argv)
    try:
        secured = connection(settings)
    except SecurityConfigError as e:
        print(f"mnist-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        if settings.target.spawn:  # a server with nothing to serve would only wait for it
            for model, version in dict.fromkeys((c.request.model, c.request.model_version) for c in configs):
                newest_model(settings.target.repo, model, version)
        failures = session.run_all(settings, configs, secured, *load_digits())
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
            f"{settings.output.out}/results.json",
            file=sys.stderr,
        )
        sys.exit(1)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from serving.mnist import DataError, load_mnist

    try:
        mnist = load_mnist()
    except DataError as e:
        raise OSError(str(e)) from None
    return mnist.test_images, mnist.test_labels


if __name__ == "__main__":
    main()
