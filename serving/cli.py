"""mnist-serve: the command. It parses the flags into a ServerConfig, sets up logging, and runs one server
process (serving.server), or with --workers N > 1 the supervisor (serving.supervisor) with N worker
processes, each running `run_worker`. Every start-up error is one `mnist-serve: error:` line and exit 2.
"""

import argparse
import contextlib
import logging
import sys
from multiprocessing.connection import Connection

from serving import eventloop
from serving.commandline import HelpFormatter, add_flags, build_config
from serving.config import ServerConfig
from serving.control import Failed
from serving.process import STARTUP_ERRORS, configure_logging, die_with_parent
from serving.runtime import resolve_device
from serving.server import serve
from serving.supervisor import Supervisor

log = logging.getLogger("serving")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the ONNX models of a Triton-layout repository over gRPC: the KServe v2 / Open "
        "Inference Protocol (package inference) and the mnist.v1.Classifier image API, dynamically batched; "
        "and over HTTP: the protocol's REST binding, /v1/models/NAME/classify for image files, and a page "
        "to draw digits on at /.",
        formatter_class=HelpFormatter,
    )
    add_flags(p, ServerConfig)
    return p


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """The command line as a checked ServerConfig; a bad value exits 2 with one usage line."""
    parser = build_parser()
    return build_config(parser, ServerConfig, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    configure_logging(config.log_level)
    try:
        workers = config.worker_count(resolve_device(config.runtime.device))
        if workers == 1:
            eventloop.run(serve(config))
            return
        raise SystemExit(Supervisor(config, workers, run_worker).run())
    except STARTUP_ERRORS as e:
        print(f"mnist-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_worker(config: ServerConfig, index: int, link: Connection) -> None:
    """Entry point of worker process `index` (forked by the supervisor's fork server): one whole server on the
    shared port. A failure to start goes to the supervisor as one line, not as a traceback per worker."""
    die_with_parent()
    configure_logging(config.log_level, index)
    try:
        eventloop.run(serve(config, index, link))
    except STARTUP_ERRORS as e:
        _report_failure(link, str(e))
    except Exception as e:  # anything else: one line to the supervisor as well
        log.debug("worker failed", exc_info=True)
        _report_failure(link, f"{type(e).__name__}: {e}")


def _report_failure(link: Connection, message: str) -> None:
    with contextlib.suppress(OSError):
        link.send(Failed(message))
    raise SystemExit(2)


if __name__ == "__main__":
    main()
