"""Clients past one machine: three mnist-serve replicas on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (one port,
as pods behind a headless Service), reached through one `ipv4:` target with round_robin and the clients'
throttled retries (serving.channels).

The replicas are real `mnist-serve` processes; the loopback addresses stand in for pod addresses.
"""

import re
from collections import Counter

import pytest

from serving.bench.loadgen import Connection
from serving.bench.spawn import Spawned, free_port, serve_command
from serving.client import MnistClient

from helpers import ClientLoad, metric, wait_for

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def answered_by(replica: Spawned) -> float:
    return metric(replica.metrics_url, "mnist_requests_total", status="OK")


def start_replica(repo, host: str, port: int, log) -> Spawned:
    metrics_port = free_port()
    command = [*serve_command(), "--repo", str(repo), "--host", host, "--port", str(port), "--http-port", "0"]
    command += ["--metrics-port", str(metrics_port), "--workers", "1", "--device", "cpu", "--grace", "10"]
    replica = Spawned(command, port, metrics_port, log)
    replica.target = f"{host}:{port}"
    return replica


@pytest.fixture(scope="module")
def replica_set(trained_repo, tmp_path_factory):
    """Three replicas for the module (the current one on each host); replicas() restarts a stopped one."""
    port, logs = free_port(), tmp_path_factory.mktemp("replicas")
    current: list[Spawned] = []
    stopped: list[Spawned] = []

    def restart(i: int) -> None:
        stopped.append(current[i])
        current[i] = start_replica(trained_repo, HOSTS[i], port, logs / f"replica{i}-{len(stopped)}.log")

    try:
        current += [
            start_replica(trained_repo, host, port, logs / f"replica{i}.log") for i, host in enumerate(HOSTS)
        ]
        yield current, restart, "ipv4:" + ",".join(f"{host}:{port}" for host in HOSTS)
    finally:
        for replica in current + stopped:
            replica.stop()


@pytest.fixture
def replicas(replica_set):
    """(the three replicas, every one serving; the one target that names them all)."""
    current, restart, target = replica_set
    for i, replica in enumerate(current):
        if replica.process.poll() is not None:  # stopped by an earlier test
            restart(i)
    for replica in current:
        replica.wait_serving(Connection((replica.target,)))
    return list(current), target


def test_one_target_spreads_over_every_replica(replicas, mnist) -> None:
    servers, target = replicas
    before = [answered_by(s) for s in servers]
    with MnistClient(target, connections=1) as client:  # one channel: round_robin alone spreads the calls
        for i in range(60):
            assert client.classify(mnist.test_images[i]).predictions[0].label in range(10)
    counts = [answered_by(s) - n for s, n in zip(servers, before, strict=True)]
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
    # The replicas serve the whole module: count from here. Every call an earlier test started was answered.
    victim_start = answered_by(victim)
    others_start = sum(answered_by(s) for s in others)
    with (
        MnistClient(target, connections=2) as client,
        ClientLoad(client, mnist.test_images[:2], threads=threads) as load,
    ):
        start = [answered_by(s) for s in servers]
        wait_for(
            lambda: all(answered_by(s) > n + 10 for s, n in zip(servers, start, strict=True)),
            60,
            "load on every replica",
        )
        victim_before = answered_by(victim) - victim_start
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
    survivors = sum(answered_by(s) for s in others) - others_start  # final: the load has stopped
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
        # Nothing accepted was lost; nothing answered twice.
        assert started - victim_start == answered - victim_start == from_victim
        assert set(load.errors) <= {"CANCELLED"}, load.errors
