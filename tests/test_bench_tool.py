"""mnist-bench: end to end against a spawned mnist-serve, the open-loop scheduler, errors by status.

The served model is a ridge-regression softmax classifier fitted on real MNIST digits in a fraction of a
second, written as an ONNX model honouring the serving contract, so these tests need no training run.
"""

import csv
import datetime
import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.bench.apis import build_workload
from serving.bench.cli import build_parser, parse_configs
from serving.bench.loadgen import Connection, Level, RunSpec, run, schedule
from serving.bench.runner import split_spec
from serving.bench.spawn import Spawned, serve_command

from helpers import add_model, fitted_weights, linear_model


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mnist) -> Path:
    root = tmp_path_factory.mktemp("bench-repo")
    weights = fitted_weights(mnist.train_images[:10000], mnist.train_labels[:10000])
    add_model(root, "mnist", linear_model(weights, normalise=True), max_batch_size=256)
    return root


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    spawned = Spawned.mnist_serve(serve_command(), repo, [], tmp_path_factory.mktemp("logs") / "server.log")
    try:
        spawned.wait_serving(Connection((spawned.target,)))
        yield spawned
    finally:
        assert spawned.stop() == 0


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    spawned = Spawned.echo(tmp_path_factory.mktemp("logs") / "echo.log")
    try:
        spawned.wait_serving(Connection((spawned.target,)))
        yield spawned
    finally:
        spawned.stop()


def _bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.bench.cli", *argv], capture_output=True, text=True, timeout=timeout
    )


def _spec(workload, target: str, level: Level, **kw) -> RunSpec:
    kw = {"warmup_s": 0.2, "duration_s": 1.0} | kw
    return RunSpec(workload, Connection((target,)), level, start_at=time.time(), **kw)


def test_end_to_end_outputs_are_consistent(repo, tmp_path):
    out = tmp_path / "out"
    done = _bench(
        "--spawn", "--repo", str(repo), "--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.2",
        "--ceiling-batch-sizes", "1", "--out", str(out), "--no-progress",
        "--compare", "kserve:--max-queue-delay-us 0",
        "classify-stream:-- --api classify --stream --images-per-request 2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    rows, floor = report["results"], report["floor"]
    assert [(r["config"], r["concurrency"]) for r in rows] == [
        ("kserve", 1), ("kserve", 4), ("classify-stream", 1), ("classify-stream", 4)
    ]  # fmt: skip
    assert len(floor) == 4 and all(r["accuracy"] is None for r in floor)
    assert [s["exit_code"] for s in report["servers"]] == [0, 0]
    for row in rows + floor:
        assert row["ok"] > 0
        assert sum(row["status"].values()) == row["requests"] == row["ok"] + row["errors"]
        assert row["images"] == row["ok"] * row["images_per_request"]
        ordered = [row[k] for k in ("p50", "p90", "p95", "p99", "p99_9", "max_ms")]
        assert ordered == sorted(ordered) and row["p50"] > 0
        assert row["req_per_s"] == pytest.approx(row["ok"] / row["window_s"])
    for row in rows:
        assert row["errors"] == 0
        assert 0.7 < row["accuracy"] <= 1.0  # the ridge classifier gets ~0.85 of the test digits
        assert row["of_floor"] > 0 and row["of_ceiling"] > 0
        assert row["server_cpu_us_per_request"] > 0
    # The split comes from /metrics read at the window edges; a starved server may not answer in time.
    split = [r for r in rows if "server_batch_size" in r]
    assert split and all(r["server_requests"] > 0 and r["server_batch_size"] >= 1 for r in split)
    assert report["ceiling"]["mnist"][0]["batch_size"] == 1
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) + len(floor)
    assert [int(r["ok"]) for r in table] == [r["ok"] for r in rows + floor]
    per_level, _, summary = (out / "results.md").read_text().partition("Mean ± std over repeats:")
    assert len(per_level.strip().splitlines()) == 2 + len(rows) + len(floor)
    assert len(summary.strip().splitlines()) == 2 + len(rows) + len(floor)  # one repeat: one line each
    assert report["summary"][0]["vs_first"] == 1.0 and report["load_avg_before"]
    png = (out / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.mark.parametrize("arrivals", ["constant", "poisson"])
def test_open_loop_keeps_the_requested_rate(echo, mnist, arrivals):
    workload = build_workload(
        "kserve", False, "echo", "", mnist.test_images, mnist.test_labels, 1, pool_size=16
    )
    level = Level(rate=200.0, arrivals=arrivals)
    result = run(_spec(workload, echo.target, level, check=False, seed=3))
    offsets = schedule(level, 1.2, seed=3)
    expected = int(((offsets >= 0.2) & (offsets < 1.2)).sum())
    assert expected == pytest.approx(200, abs=0 if arrivals == "constant" else 60)
    # Counts, not speed: which sends fall in the window is fixed by the schedule, and nothing is skipped
    # unless 10,000 requests are outstanding, whatever the machine's load.
    assert result.scheduled == expected and result.unsent == 0
    assert result.status == {"OK": expected} and len(result.latency_s) == expected


def test_open_loop_streaming_matches_replies(echo, mnist):
    workload = build_workload(
        "classify", True, "echo", "", mnist.test_images, mnist.test_labels, 1, pool_size=16
    )
    result = run(_spec(workload, echo.target, Level(rate=100.0, streams=3), check=False))
    assert result.scheduled == 100 and result.status == {"OK": 100}


@pytest.mark.parametrize(("api", "stream"), [("kserve", False), ("kserve", True), ("classify", True)])
def test_errors_are_counted_by_status(server, mnist, api, stream):
    workload = build_workload(api, stream, "no-such-model", "", mnist.test_images, mnist.test_labels, 1, 8)
    result = run(_spec(workload, server.target, Level(concurrency=2), max_requests=20))
    assert result.status == {"NOT_FOUND": 20} and len(result.latency_s) == 0


def test_request_count_bound_and_accuracy(server, mnist):
    workload = build_workload("classify", False, "mnist", "", mnist.test_images, mnist.test_labels, 4, 64)
    result = run(_spec(workload, server.target, Level(concurrency=3), max_requests=50))
    assert result.status == {"OK": 50} and result.images == 200
    assert 0.7 < result.correct / result.images <= 1.0


def test_load_is_shared_between_generator_processes(mnist):
    workload = build_workload("kserve", False, "m", "", mnist.test_images[:8], mnist.test_labels[:8], 1, 4)
    spec = _spec(workload, "x:1", Level(concurrency=5), max_requests=7)
    shares = split_spec(spec, 3)
    assert [s.level.concurrency for s in shares] == [2, 2, 1]
    assert [s.max_requests for s in shares] == [3, 2, 2]
    assert len({s.seed for s in shares}) == 3
    open_shares = split_spec(_spec(workload, "x:1", Level(rate=900.0)), 3)
    assert [s.level.rate for s in open_shares] == [300.0] * 3 and [s.phase for s in open_shares] == [
        0,
        1 / 3,
        2 / 3,
    ]


def test_compare_syntax():
    parser = build_parser()
    args = parser.parse_args(
        ["--spawn", "--repo", "r", "--server-args", "--intra-op-threads 1",
         "--compare", "off:--max-batch-size 1", "int8:-- --model mnist-int8 --stream"]
    )  # fmt: skip
    off, int8 = parse_configs(args, parser)
    assert off.server_args == ("--intra-op-threads", "1", "--max-batch-size", "1") and off.model == "mnist"
    assert int8.server_args == ("--intra-op-threads", "1") and int8.model == "mnist-int8" and int8.stream


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost/127.0.0.1 that is its own CA, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_and_token(repo, mnist, tmp_path):
    cert, key = _self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server_args = f"--tls-cert {cert} --tls-key {key} --auth-token-file {token}"
    out = tmp_path / "out"
    done = _bench(
        "--spawn", "--repo", str(repo), "--server-args", server_args, "--tls-ca", str(cert), "--token-file",
        str(token), "--concurrency", "2", "--requests", "200", "--warmup", "0.2", "--baselines", "none",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((out / "results.json").read_text())["results"]
    # 200 replies: enough that a ~0.85-accurate model cannot fall to 0.7 by which digits were drawn.
    assert row["status"] == {"OK": 200} and row["accuracy"] > 0.7


def test_a_server_that_cannot_start_is_one_line(repo, tmp_path):
    done = _bench(
        "--spawn", "--repo", str(repo), "--server-args=--no-such-flag", "--concurrency", "1",
        "--baselines", "none", "--out", str(tmp_path), "--no-progress",
    )  # fmt: skip
    assert (
        done.returncode == 1 and "server exited with code" in done.stderr and "Traceback" not in done.stderr
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "4"], "give exactly one of --server"),
        (["--spawn", "--concurrency", "4"], "--spawn needs --repo"),
        (["--server", "h:1", "--compare", "nolabel"], "expected LABEL:"),
        (["--server", "h:1", "--compare", "x:--max-batch-size 1"], "server options need --spawn"),
        (["--server", "h:1", "--compare", "x:-- --bogus"], "only the per-configuration options"),
        (["--server", "h:1", "--concurrency", "0"], "must be within 1..100000"),
    ],
)
def test_bad_arguments_exit_with_one_clear_line(argv, message):
    done = _bench(*argv)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
