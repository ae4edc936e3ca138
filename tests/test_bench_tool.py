"""mnist-bench: end to end against a spawned mnist-serve, the open-loop scheduler, errors by status.

The served model is a ridge-regression softmax classifier fitted on real MNIST digits in a fraction of a
second, written as an ONNX model honouring the serving contract, so these tests need no training run.
"""

import csv
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

from serving.bench import report
from serving.bench.apis import build_workload
from serving.bench.cli import main as bench_main
from serving.bench.cli import parse_args
from serving.bench.loadgen import Connection, Level, RunResult, RunSpec, run, schedule
from serving.bench.rest import server_counts_as_http
from serving.bench.runner import split_spec
from serving.bench.spawn import Spawned, ephemeral_range_start, serve_command

from helpers import add_model, fitted_repo, fitted_weights, metric, metric_by, pki, slow_model, wait_for


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mnist) -> Path:
    return fitted_repo(tmp_path_factory.mktemp("bench-repo"), mnist, max_batch_size=256)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    spawned = Spawned.mnist_serve(serve_command(), repo, ["--workers", "1"], log)
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
        "--spawn", "--repo", str(repo), "--server-args=--workers 1", "--concurrency", "1,4",
        "--duration", "0.3", "--warmup", "0.1", "--ceiling-batch-sizes", "1", "--out", str(out),
        "--no-progress", "--compare", "kserve:--max-queue-delay-us 0",
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
        assert row["ok"] > 0 and row["failed"] is None
        assert sum(row["status"].values()) == row["requests"] == row["ok"] + row["errors"]
        assert row["attempts"] == row["requests"] and row["attempt_status"] == row["status"]  # no resends
        assert row["images"] == row["ok"] * row["images_per_request"]
        ordered = [row[k] for k in ("p50", "p90", "p95", "p99", "p99_9", "max_ms")]
        assert ordered == sorted(ordered) and row["p50"] > 0
        assert row["req_per_s"] == pytest.approx(row["ok"] / row["window_s"])
    for row in rows:
        assert row["errors"] == 0
        # Every request of the level, warm-up included, is one the server counted, and nothing else.
        assert row["server_level_status"] == row["level_status"] and row["level_status"]["OK"] >= row["ok"]
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
    per_level = (out / "results.md").read_text()
    assert len(per_level.strip().splitlines()) == 2 + len(rows) + len(floor)  # one repeat: no summary
    assert [s["repeats"] for s in report["summary"]] == [1] * (len(rows) + len(floor))
    assert report["summary"][0]["vs_first"] == 1.0 and report["load_avg_before"]
    assert done.stdout.count("ORT ceiling (in-process") == 1 and "mean ± std" not in done.stdout
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


@pytest.mark.parametrize(
    ("protocol", "api", "stream", "status"),
    [
        ("grpc", "kserve", False, "NOT_FOUND"),
        ("grpc", "kserve", True, "NOT_FOUND"),
        ("grpc", "classify", True, "NOT_FOUND"),
        ("http", "kserve", False, "HTTP_404"),
        ("http", "classify", False, "HTTP_404"),
    ],
)
def test_errors_are_counted_by_status(server, mnist, protocol, api, stream, status):
    workload = build_workload(
        api, stream, "no-such-model", "", mnist.test_images, mnist.test_labels, 1, 8, protocol=protocol
    )
    result = run(_spec(workload, server.target_for(protocol), Level(concurrency=2), max_requests=20))
    assert result.status == {status: 20} and len(result.latency_s) == 0


@pytest.mark.parametrize(
    ("protocol", "api", "tensors"),
    [("grpc", "classify", "binary"), ("http", "kserve", "json"), ("http", "classify", "binary")],
)
def test_request_count_bound_and_accuracy(server, mnist, protocol, api, tensors):
    workload = build_workload(
        api, False, "mnist", "", mnist.test_images, mnist.test_labels, 4, 64, protocol=protocol,
        http_tensors=tensors, timeout_s=10.0,
    )  # fmt: skip
    result = run(_spec(workload, server.target_for(protocol), Level(concurrency=3), max_requests=50))
    assert result.status == {"OK": 50} and result.images == 200
    assert 0.7 < result.correct / result.images <= 1.0


def test_over_http_every_request_is_counted_as_the_server_counts_it(repo, tmp_path):
    """A --spawn run over HTTP, both APIs: every request answered and checked, the server's own count of
    its HTTP requests equal to the generator's, and the bare aiohttp echo floor beside each shape."""
    out = tmp_path / "out"
    done = _bench(
        "--spawn", "--repo", str(repo), "--server-args=--workers 1", "--protocol", "http",
        "--concurrency", "3", "--duration", "0.3", "--warmup", "0.1", "--baselines", "floor",
        "--out", str(out), "--no-progress",
        "--compare", "kserve:", "classify:-- --api classify --images-per-request 2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    rows, floor = report["results"], report["floor"]
    assert [(r["config"], r["protocol"], r["http_tensors"]) for r in rows] == [
        ("kserve", "http", "binary"), ("classify", "http", None)
    ]  # fmt: skip
    assert [r["config"] for r in floor] == ["echo-floor http kserve x1", "echo-floor http classify x2"]
    for row in rows + floor:
        assert row["ok"] > 0 and row["status"] == {"OK": row["ok"]} and row["failed"] is None
        assert row["images"] == row["ok"] * row["images_per_request"]
    for row in rows:
        # Every request of the level, warm-up included, is one the server counted over HTTP, and no other.
        assert row["server_level_status"] == row["level_status"] and row["level_status"]["OK"] >= row["ok"]
        assert 0.7 < row["accuracy"] <= 1.0
        assert row["of_floor"] > 0 and row["server_cpu_us_per_request"] > 0
    assert all(row["accuracy"] is None for row in floor)


def test_http_requests_are_spread_over_every_worker_process(repo, mnist, tmp_path):
    """Over HTTP, as over gRPC, a generator's requests go round-robin over its connections, each its own TCP
    connection, so the kernel hands them to both of the server's worker processes."""
    spawned = Spawned.mnist_serve(serve_command(), repo, ["--workers", "2"], tmp_path / "server.log")
    try:
        spawned.wait_serving(Connection((spawned.target,)))
        workload = build_workload(
            "kserve", False, "mnist", "", mnist.test_images, mnist.test_labels, 1, 16, protocol="http"
        )
        connection = Connection((spawned.target_for("http"),), connections=32)
        spec = RunSpec(
            workload, connection, Level(rate=200.0), start_at=time.time(), warmup_s=0.0, duration_s=1.0
        )
        assert run(spec).status == {"OK": 200}
        by_worker = metric_by(spawned.metrics_url, "mnist_requests_total", "worker", protocol="http")
    finally:
        assert spawned.stop() == 0
    assert set(by_worker) == {"0", "1"} and by_worker.total() == 200, by_worker


def test_the_servers_http_counts_read_as_the_statuses_the_client_received():
    server = Counter(OK=5, RESOURCE_EXHAUSTED=4, DEADLINE_EXCEEDED=3, NOT_FOUND=2, UNAVAILABLE=1)
    seen = Counter(OK=5, HTTP_413=1, HTTP_429=3, DEADLINE_EXCEEDED=2, HTTP_504=1, HTTP_404=2, HTTP_503=1)
    assert server_counts_as_http(server, seen) == seen
    assert server_counts_as_http(Counter(RESOURCE_EXHAUSTED=2), Counter()) == {"HTTP_429": 2}
    invalid = Counter(INVALID_ARGUMENT=1, FAILED_PRECONDITION=1)
    assert server_counts_as_http(invalid, Counter()) == {"HTTP_400": 2}


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
    _, (off, int8) = parse_args(
        ["--spawn", "--repo", "r", "--server-args", "--intra-op-threads 1",
         "--compare", "off:--max-batch-size 1", "int8:-- --model mnist-int8 --stream"]
    )  # fmt: skip
    assert off.server_args == ("--intra-op-threads", "1", "--max-batch-size", "1")
    assert off.request.model == "mnist" and not off.request.stream
    assert int8.server_args == ("--intra-op-threads", "1")
    assert int8.request.model == "mnist-int8" and int8.request.stream


def test_compare_runs_different_running_servers_side_by_side():
    _, (ours, other) = parse_args(
        ["--server", "a:1", "--metrics-url", "http://a:2/metrics", "--compare", "ours:",
         "other:-- --protocol http --http-tensors json --http-server b:3 --metrics-url="]
    )  # fmt: skip
    assert (ours.running.server, ours.running.metrics_url, ours.request.protocol) == (
        "a:1",
        "http://a:2/metrics",
        "grpc",
    )
    assert (other.running.http_server, other.running.metrics_url) == ("b:3", "")
    assert (other.request.protocol, other.request.tensors) == ("http", "json")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tls_and_token(repo, mnist, tmp_path, protocol):
    certificates = pki(tmp_path)
    cert, key, ca = certificates["server_cert"], certificates["server_key"], certificates["ca"]
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server_args = f"--tls-cert {cert} --tls-key {key} --auth-token-file {token} --workers 1"
    out = tmp_path / "out"
    done = _bench(
        "--spawn", "--repo", str(repo), "--server-args", server_args, "--tls-ca", str(ca),
        "--auth-token-file", str(token), "--concurrency", "2", "--requests", "200", "--warmup", "0.2",
        "--baselines", "none", "--protocol", protocol,
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
        (["--server", "h:1", "--protocol", "http"], "--protocol http needs --http-server"),
        (["--http-server", "h:1"], "--protocol grpc needs --server"),
        (["--server", "h:1", "--compare", "x:-- --protocol http"], "'x': --protocol http needs"),
        (["--spawn", "--repo", "r", "--protocol", "http", "--stream"], "--stream is gRPC's"),
        (["--protocol", "http", "--http-server", "h:99999"], "--http-server 'h:99999'"),
        (["--protocol", "http", "--http-server", "http://h:1"], "expected HOST:PORT"),
        (["--spawn", "--repo", "r", "--compare", "x:-- --server h:1"], "only the per-configuration options"),
    ],
)
def test_bad_arguments_exit_with_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("mnist-bench: error:")] == [
        err.splitlines()[-1]
    ]


def test_output_into_one_pipe_reads_in_order(repo, tmp_path):
    """stdout and stderr into one file, as `mnist-bench ... > log 2>&1` does: the table's rows come after its
    header, the ceiling once."""
    done = subprocess.run(
        [sys.executable, "-m", "serving.bench.cli", "--spawn", "--repo", str(repo),
         "--server-args=--workers 1", "--concurrency", "1",
         "--requests", "50", "--warmup", "0", "--baselines", "ceiling", "--ceiling-batch-sizes", "1",
         "--out", str(tmp_path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    lines = done.stdout.splitlines()
    rows = [k for k, line in enumerate(lines) if re.match(r"default\s+c=1\s", line)]
    headers = [k for k, line in enumerate(lines) if line.startswith("config ")]
    assert len(rows) == 1 and len(headers) == 1 and headers[0] < rows[0], done.stdout
    assert done.stdout.count("ORT ceiling (in-process") == 1, done.stdout


def _row(**figures) -> dict:
    """A result row as report.summarize makes it (two requests answered in 1 s), for the tables alone."""
    answered = Counter(OK=2)
    result = RunResult(np.asarray([0.001, 0.002]), answered, answered, answered, images=2, window_s=1.0)
    setup = {"model": "mnist", "api": "kserve", "stream": False, "images_per_request": 1}
    return report.summarize("a", setup, Level(concurrency=1), result, None) | figures


def test_small_ratios_keep_their_digits_and_one_run_shows_no_spread():
    row = _row(of_ceiling=0.0031, of_floor=0.8123)
    text = report.table([row])
    assert "0.31 %" in text and "81.2 %" in text
    (one,) = report.repeat_summary([row])
    assert "±" not in report.summary_table([one])
    (two,) = report.repeat_summary([row, _row(images_per_s=5.0)])
    assert two["repeats"] == 2 and "±" in report.summary_table([two])


def test_a_configuration_that_served_nothing_fails_alone(server, tmp_path):
    """Every request of the first configuration fails (an unknown model): the report still compares the
    others, keeps every row, and the run exits non-zero."""
    out = tmp_path / "out"
    done = _bench(
        "--server", server.target, "--concurrency", "1", "--requests", "20", "--warmup", "0",
        "--baselines", "none", "--out", str(out), "--no-progress",
        "--compare", "missing:-- --model no-such-model", "present:",
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    missing, present = json.loads((out / "results.json").read_text())["results"]
    assert missing["status"] == {"NOT_FOUND": 20} and "no request succeeded" in missing["failed"]
    assert present["status"] == {"OK": 20} and present["failed"] is None
    assert "mnist-bench: failed: [missing] c=1: no request succeeded" in done.stderr
    assert "FAILED missing c=1" in done.stdout


def test_a_running_server_over_both_protocols_in_one_run(server, tmp_path):
    """--server and --http-server name the same running server's two ports; each configuration's requests are
    compared with what the server counted over that protocol."""
    out = tmp_path / "out"
    done = _bench(
        "--server", server.target, "--http-server", server.target_for("http"), "--metrics-url",
        server.metrics_url, "--concurrency", "2", "--requests", "30", "--warmup", "0", "--baselines", "none",
        "--out", str(out), "--no-progress", "--compare", "grpc:", "http:-- --protocol http",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["protocol"] for r in rows] == ["grpc", "http"]
    for row in rows:
        assert row["status"] == {"OK": 30} and row["server_level_status"] == row["level_status"] == {"OK": 30}


def test_a_server_killed_midway_fails_its_configuration_and_the_next_one_runs(repo, tmp_path):
    out = tmp_path / "out"
    bench = subprocess.Popen(
        [sys.executable, "-m", "serving.bench.cli", "--spawn", "--repo", str(repo),
         "--server-args=--workers 1", "--concurrency", "2", "--duration", "3", "--warmup", "0",
         "--baselines", "none", "--out", str(out), "--no-progress", "--compare", "doomed:", "next:"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in bench.stderr:
            if line.startswith("[doomed] spawned:"):
                break
        port = re.search(r"--port (\d+)", line).group(1)
        metrics = re.search(r"--metrics-port (\d+)", line).group(1)
        url = f"http://127.0.0.1:{metrics}/metrics"

        def answering() -> bool:
            try:
                return metric(url, "mnist_requests_total", status="OK") >= 100
            except OSError:  # not listening yet
                return False

        wait_for(answering, 120, "the doomed server answering the load")
        (victim,) = [p for p in psutil.Process(bench.pid).children(recursive=True) if port in p.cmdline()]
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = bench.communicate(timeout=120)
    finally:
        bench.kill()
    assert bench.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    doomed, following = results["results"]
    assert doomed["failed"].startswith("the server was killed by SIGKILL during this level")
    assert doomed["ok"] > 0 and doomed["status"].get("UNAVAILABLE", 0) > 0  # what the dead server left
    assert following["config"] == "next" and following["failed"] is None and following["errors"] == 0
    assert [s["exit_code"] for s in results["servers"]] == [-9, 0]
    assert "FAILED doomed c=2: the server was killed by SIGKILL" in stdout


def test_a_spawned_server_with_nothing_to_serve_is_said_at_once(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _bench(
        "--spawn", "--repo", str(empty), "--concurrency", "1", "--baselines", "none", "--out", str(tmp_path),
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"mnist-bench: error: no versions of model 'mnist' under {empty}"
    )


@pytest.mark.parametrize(("protocol", "refusal"), [("grpc", "RESOURCE_EXHAUSTED"), ("http", "HTTP_429")])
def test_under_overload_the_server_counts_exactly_what_the_client_sent(mnist, tmp_path, protocol, refusal):
    """32 clients against a queue of 2 images and batches of 2 that take a while: most are refused at once.
    Every request is sent once, and the server's count (mnist_requests_total by status, over the protocol
    used) over the level equals the generator's, refusals included, by the status the client received.
    A queue delay keeps the batches on the batcher's thread (the event loop runs none itself), so that
    requests keep arriving, and the queue fills, while one computes."""
    repo = tmp_path / "repo"
    add_model(
        repo, "mnist", slow_model(fitted_weights(mnist.train_images[:10000], mnist.train_labels[:10000]))
    )
    out = tmp_path / "out"
    done = _bench(
        "--spawn", "--repo", str(repo),
        "--server-args=--workers 1 --max-queue-images 2 --max-batch-size 2 --max-queue-delay-us 1",
        "--concurrency", "32",
        "--requests", "400", "--warmup", "0", "--baselines", "none", "--out", str(out), "--no-progress",
        "--protocol", protocol,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads((out / "results.json").read_text())["results"]
    refused = {status: n for status, n in row["level_status"].items() if status != "OK"}
    assert refused.get(refusal) and row["ok"] > 0, row["level_status"]
    assert row["server_level_status"] == row["level_status"]
    assert row["requests"] == row["attempts"] == 400
    assert 0.7 < row["accuracy"] <= 1.0  # the slow model answers as the linear one does
    for status, n in row["attempt_status"].items():  # the table shows every refusal with its status
        assert status == "OK" or f"{status}={n}" in done.stdout


def test_the_token_file_is_checked_like_the_servers(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    done = _bench("--server", "127.0.0.1:1", "--auth-token-file", str(empty))
    assert done.returncode == 2 and done.stderr.strip() == f"mnist-bench: error: token file {empty} is empty"


def test_processes_choosing_ports_at_once_never_get_the_same_one():
    """Each of two processes takes 300 ports while the other does: at random alone, a shared one would be
    all but certain (birthday odds over ~23,000 ports); none is, and none is in the kernel's own range."""
    take = "from serving.bench.spawn import free_port; print(*(free_port() for _ in range(300)))"
    runs = [subprocess.Popen([sys.executable, "-c", take], stdout=subprocess.PIPE, text=True) for _ in "ab"]
    first, second = ({int(p) for p in run.communicate(timeout=60)[0].split()} for run in runs)
    assert len(first) == len(second) == 300 and not first & second
    assert max(first | second) < ephemeral_range_start()
