"""Clients past one machine: three mnist-serve replicas on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (one port,
as pods behind a headless Service), reached through one `ipv4:` target with round_robin and the clients'
throttled retries (serving.channels).

The replicas are real `mnist-serve` processes; the loopback addresses stand in for pod addresses.
"""

import re
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.bench.loadgen import Connection
from serving.bench.spawn import Spawned, free_port, serve_command
from serving.client import MnistClient

from helpers import ClientLoad, wait_for

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def answered_by(replica: Spawned) -> int:
    text = urllib.request.urlopen(replica.metrics_url, timeout=10).read().decode()
    return sum(
        int(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "mnist_requests_total" and s.labels["status"] == "OK"
    )


@pytest.fixture
def replicas(trained_repo, tmp_path):
    port = free_port()
    started = []
    try:
        for i, host in enumerate(HOSTS):
            command = [
                *serve_command(),
                "--repo",
                str(trained_repo),
                "--host",
                host,
                "--port",
                str(port),
                "--metrics-port",
                str(free_port()),
                "--http-port",
                "0",
                "--workers",
                "1",
                "--device",
                "cpu",
                "--grace",
                "10",
            ]
            replica = Spawned(command, port, int(command[command.index("--metrics-port") + 1]),
                              tmp_path / f"replica{i}.log")  # fmt: skip
            replica.target = f"{host}:{port}"
            started.append(replica)
        for replica in started:
            replica.wait_serving(Connection((replica.target,)))
        yield started, "ipv4:" + ",".join(f"{host}:{port}" for host in HOSTS)
    finally:
        for replica in started:
            replica.stop()


def test_one_target_spreads_over_every_replica(replicas, mnist) -> None:
    servers, target = replicas
    with MnistClient(target, connections=1) as client:  # one channel: round_robin alone spreads the calls
        for i in range(60):
            assert client.classify(mnist.test_images[i]).predictions[0].label in range(10)
    counts = [answered_by(s) for s in servers]
    assert sum(counts) == 60 and min(counts) >= 15, counts  # round robin: about 20 each


@pytest.mark.parametrize("stop_signal", ["SIGKILL", "SIGTERM"])
def test_the_client_moves_to_the_other_replicas_when_one_stops(replicas, mnist, stop_signal) -> None:
    """What the client saw, with its default retries, and what the replicas saw.

    SIGKILL: the calls in flight on the killed replica (at most one per client thread) failed with
    UNAVAILABLE and were resent to the others by the retry policy: the client saw no error, and every
    answer it got is one a replica counted. SIGTERM: the replica drains; every call it started it answered
    (its `event=stopped` line), the client got exactly the answers the three counted, and the only error it
    may see is CANCELLED, for a call gRPC received during the shutdown but never started (grpc/grpc#41785):
    not resent, as the client cannot tell it from a call cancelled while a model computed it.
    """
    servers, target = replicas
    victim, others = servers[1], (servers[0], servers[2])
    threads = 4
    with (
        MnistClient(target, connections=2) as client,
        ClientLoad(client, mnist.test_images[:2], threads=threads) as load,
    ):
        wait_for(lambda: min(answered_by(s) for s in servers) > 10, 60, "load on every replica")
        victim_before = answered_by(victim)
        if stop_signal == "SIGKILL":
            victim.process.kill()
        else:
            victim.process.terminate()  # drains: answers what it accepted, then exits 0
        exit_code = victim.process.wait(60)
        before = [answered_by(s) for s in others]
        wait_for(
            lambda: all(answered_by(s) > n + 30 for s, n in zip(others, before, strict=True)),
            60,
            "the other replicas taking the load",
        )
    survivors = sum(answered_by(s) for s in others)  # final: the load has stopped
    from_victim = load.answered - survivors  # answers the client got from the stopped replica
    seen = f"client: {load.answered} answered, errors {dict(load.errors)}"
    print(f"{stop_signal}: {seen}; replicas: {survivors} + {from_victim} ({victim_before} before the signal)")
    if stop_signal == "SIGKILL":
        assert exit_code == -9
        assert load.errors == Counter(), load.errors  # cut-off calls were resent to the others
        # Every answer counted before the kill reached the client, but for the calls then in flight.
        assert victim_before - threads <= from_victim, (victim_before, from_victim)
    else:
        assert exit_code == 0
        started, answered = map(int, re.search(
            r"event=stopped requests_started=(\d+) requests_answered=(\d+)", victim.log_path.read_text()
        ).groups())  # fmt: skip
        assert started == answered == from_victim  # nothing accepted was lost; nothing answered twice
        assert set(load.errors) <= {"CANCELLED"}, load.errors
