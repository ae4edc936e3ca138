"""The serving commands' flags: they reach the configuration, and every numeric flag of mnist-serve,
mnist-predict and mnist-bench is checked before anything starts (one `<command>: error:` line, exit 2).
mnist-train's flags are covered the same way in test_training_cli.py."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from serving import client
from serving.bench.cli import build_parser as bench_parser
from serving.bench.cli import parse_args as parse_bench_args
from serving.cli import build_parser as serve_parser
from serving.cli import parse_args
from serving.config import ServerConfig
from serving.runtime import RuntimeOptions


def test_runtime_flags_reach_runtime_options():
    config = parse_args(
        ["--device", "cpu", "--intra-op-threads", "2", "--inter-op-threads", "2", "--execution-mode",
         "parallel", "--spinning", "--no-cuda-graphs", "--batch-buckets", "64,1,8",
         "--cudnn-conv-algo-search", "EXHAUSTIVE"]
    )  # fmt: skip
    runtime = config.runtime
    assert (runtime.device, runtime.intra_op_threads, runtime.inter_op_threads) == ("cpu", 2, 2)
    assert runtime.execution_mode == "parallel" and runtime.allow_spinning and not runtime.cuda_graphs
    assert runtime.batch_buckets == (1, 8, 64)
    assert runtime.cudnn_conv_algo_search == "EXHAUSTIVE"


def test_server_flags_reach_the_config():
    config = parse_args(
        ["--repo", "r", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--workers", "3",
         "--max-batch-size", "32", "--max-queue-delay-us", "100", "--poll", "2.5", "--grace", "1",
         "--max-images-per-request", "7", "--log-level", "DEBUG"]
    )  # fmt: skip
    assert config.repo == Path("r") and config.host == "127.0.0.1"
    assert (config.port, config.metrics_port) == (0, -1)
    assert (config.workers, config.max_batch_size, config.max_queue_delay_us) == (3, 32, 100)
    assert (config.poll_seconds, config.grace_seconds, config.max_images_per_request) == (2.5, 1.0, 7)
    assert config.log_level == "DEBUG"


def test_defaults_are_stated_once_in_the_dataclasses():
    parsed = parse_args([])
    assert parsed == ServerConfig()
    assert parsed.runtime == RuntimeOptions()
    assert (parsed.runtime.intra_op_threads, parsed.runtime.allow_spinning) == (1, False)  # measured


def test_the_default_worker_count_follows_the_usable_cores(monkeypatch):
    monkeypatch.setattr("serving.config.usable_cores", lambda: 6)
    assert ServerConfig().worker_count("CPUExecutionProvider") == 6
    assert ServerConfig().worker_count("CUDAExecutionProvider") == 4
    assert ServerConfig(workers=3).worker_count("CUDAExecutionProvider") == 3


def numeric_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option whose value is a number or a list of numbers, read off the parser itself."""
    return sorted(
        action.option_strings[0]
        for action in parser._actions
        if action.option_strings
        and getattr(action.type, "__name__", "") in ("int", "float", "int list", "float list")
    )


HUGE = str(10**30)
VALUES = ("0", "-1", HUGE, "1e309", "nan", "seven")

# The values each flag takes besides positive ones; every other value above must be refused.
SERVE_ACCEPTS = {
    "--port": {"0"},
    "--metrics-port": {"0", "-1"},
    "--http-port": {"0", "-1"},
    "--intra-op-threads": {"0"},
    "--inter-op-threads": {"0"},
    "--large-batch-images": {"0"},
    "--large-batch-threads": {"0"},
    "--max-queue-delay-us": {"0"},
    "--grace": {"0"},
}
PREDICT_ACCEPTS: dict[str, set[str]] = {}
BENCH_ACCEPTS = {"--requests": {"0"}, "--warmup": {"0"}, "--seed": {"0"}, "--retries": {"0"}}


def test_every_numeric_flag_is_in_the_tables():
    assert set(numeric_flags(serve_parser())) >= set(SERVE_ACCEPTS)
    assert numeric_flags(serve_parser()) == [
        "--batch-buckets", "--grace", "--http-port", "--http-read-timeout",
        "--inter-op-threads", "--intra-op-threads", "--large-batch-images", "--large-batch-threads",
        "--max-batch-size",
        "--max-concurrent-rpcs", "--max-connection-age", "--max-image-bytes", "--max-image-pixels",
        "--max-images-per-request", "--max-message-bytes", "--max-pending-rpcs", "--max-queue-delay-us",
        "--max-queue-images", "--max-streams",
        "--metrics-port", "--poll", "--port", "--stream-idle-timeout", "--workers",
    ]  # fmt: skip


def one_error_line(stderr: str, command: str) -> bool:
    errors = [line for line in stderr.splitlines() if line.startswith(f"{command}: error:")]
    return len(errors) == 1 and "Traceback" not in stderr


def refuses(stderr: str, command: str, flag: str) -> bool:
    """One error line, and it is about this flag's value (not about some other rule the flag trips)."""
    about_flag = (f"{command}: error: argument {flag}: ", f"{command}: error: {flag} must ")
    return one_error_line(stderr, command) and any(
        line.startswith(about_flag) for line in stderr.splitlines()
    )


def setting(config, parser: argparse.ArgumentParser, flag: str):
    """The value a flag set, found by the flag's destination anywhere in a nested dataclass config."""
    (dest,) = {a.dest for a in parser._actions if flag in a.option_strings}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == dest:
            return value
        if dataclasses.is_dataclass(value):
            try:
                return setting(value, parser, flag)
            except LookupError:
                continue
    raise LookupError(f"{flag} ({dest}) is in no field of {type(config).__name__}")


@pytest.mark.parametrize("flag", numeric_flags(serve_parser()))
@pytest.mark.parametrize("value", VALUES)
def test_mnist_serve_checks_every_numeric_flag(flag, value, capsys):
    if value in SERVE_ACCEPTS.get(flag, set()):
        assert setting(parse_args([flag, value]), serve_parser(), flag) == float(value)
        return
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert refuses(err, "mnist-serve", flag), err


@pytest.mark.parametrize("flag", ["--top-k", "--timeout"])
@pytest.mark.parametrize("value", VALUES)
def test_mnist_predict_checks_every_numeric_flag(flag, value, capsys, tmp_path):
    missing = str(tmp_path / "absent.png")  # accepted flags get as far as reading the images: exit 1
    with pytest.raises(SystemExit) as exit_info:
        client.main([missing, flag, value])
    err = capsys.readouterr().err
    if value in PREDICT_ACCEPTS.get(flag, set()):
        assert exit_info.value.code == 1 and "cannot read" in err
    else:
        assert exit_info.value.code == 2 and refuses(err, "mnist-predict", flag), err


@pytest.mark.parametrize("flag", numeric_flags(bench_parser()))
@pytest.mark.parametrize("value", VALUES)
def test_mnist_bench_checks_every_numeric_flag(flag, value, capsys):
    argv = ["--server", "127.0.0.1:1", flag, value]
    if value in BENCH_ACCEPTS.get(flag, set()):
        bench, _ = parse_bench_args(argv)
        assert setting(bench, bench_parser(), flag) == float(value)
        return
    with pytest.raises(SystemExit) as exit_info:
        parse_bench_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert refuses(err, "mnist-bench", flag), err


def test_every_bench_numeric_flag_is_checked():
    assert numeric_flags(bench_parser()) == [
        "--ceiling-batch-sizes", "--concurrency", "--connections", "--duration", "--images-per-request",
        "--late-ms", "--procs", "--rate", "--repeat", "--requests", "--retries", "--seed", "--streams",
        "--timeout", "--warmup",
    ]  # fmt: skip


def options(parser: argparse.ArgumentParser) -> set[str]:
    """The options --help lists."""
    return {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def test_the_same_setting_has_the_same_flag_in_every_client():
    shared = {"--server", "--model", "--model-version", "--timeout", "--auth-token-file", "--tls", "--tls-ca",
              "--tls-cert", "--tls-key", "--tls-server-name"}  # fmt: skip
    assert shared <= options(client.build_parser()) and shared <= options(bench_parser())
    assert "--auth-token-file" in options(serve_parser())  # the server's name for the same file
    assert not {"--token-file", "--version"} & (options(client.build_parser()) | options(bench_parser()))


def test_former_flag_names_still_work(tmp_path):
    token = tmp_path / "token"
    predict = client.build_parser().parse_args(["a.png", "--version", "2", "--token-file", str(token)])
    assert (predict.model_version, predict.auth_token_file) == ("2", token)
    bench, _ = parse_bench_args(["--server", "h:1", "--token-file", str(token), "--no-progress"])
    assert bench.security.auth_token_file == token and not bench.output.progress


@pytest.mark.parametrize("parser", [serve_parser, client.build_parser, bench_parser])
def test_every_flag_with_a_default_says_it_in_the_help(parser):
    p = parser()
    formatter = p._get_formatter()
    for action in p._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.default is None:
            continue
        if action.default is False or action.default in ("", (), argparse.SUPPRESS):
            continue  # off, empty: nothing to say
        assert "default" in formatter._get_help_string(action), action.option_strings


def test_predict_flags_are_in_the_table():
    parser_flags = {"--top-k", "--timeout"}
    help_text = client.build_parser().format_help()
    assert all(flag in help_text for flag in parser_flags)
    assert numeric_flags(client.build_parser()) == sorted(parser_flags)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
        (["--device", "tpu"], "--device"),
        (["--log-level", "LOUD"], "--log-level"),
    ],
)
def test_other_bad_server_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and one_error_line(err, "mnist-serve")
