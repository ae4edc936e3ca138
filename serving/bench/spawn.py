"""Start a server on loopback for the benchmark (`mnist-serve`, or the echo floor), wait until it
serves, and stop it with SIGTERM at the end."""

import fcntl
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.bench.connection import Connection
from serving.channels import open_channel


class SpawnError(Exception):
    """The server did not come up; the message quotes the end of its log."""


RELAYED = ("level=WARNING", "level=ERROR", "level=CRITICAL", "error:")  # log lines worth saying at once


LOWEST_PORT = 10_000
_PORTS = random.SystemRandom()  # not the global generator, which test runners reseed alike in every process


def ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default; elsewhere a port below it is as good a guess as any


def free_port() -> int:
    """A port free on 127.0.0.1 now, chosen at random below the kernel's ephemeral range: a port the kernel
    picks itself (bind to port 0) is one it may hand to any other process's outgoing connection before the
    spawned server binds it, which happened under concurrent test processes. Below the range only another
    explicit choice can take it, so the ports handed out in the last minute, by every process on this
    machine, are kept in a shared file (HANDED_OUT) and never handed out twice."""
    highest = ephemeral_range_start() - 1
    with _handed_out() as recent:
        for _ in range(100):
            port = _PORTS.randint(LOWEST_PORT, highest)
            if port in recent:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            recent[port] = time.time()
            return port
    with socket.socket() as s:  # every try taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HANDED_OUT = Path(tempfile.gettempdir()) / "mnist-serving-ports"
HANDED_OUT_FOR_S = 60.0  # long enough for a spawned server to bind what it was given


@contextmanager
def _handed_out() -> Iterator[dict[int, float]]:
    """The ports free_port gave out recently ({port: when}), read and written under an exclusive lock; an
    empty dict, shared with nobody, where the file cannot be opened (e.g. another user's)."""
    try:
        f = open(HANDED_OUT, "a+")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield {}
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        now, recent = time.time(), {}
        for line in f.read().split():
            port, _, when = line.partition("@")
            try:
                if now - float(when) < HANDED_OUT_FOR_S:
                    recent[int(port)] = float(when)
            except ValueError:  # a torn line: forget it
                continue
        yield recent
        f.seek(0)
        f.truncate()
        f.write("".join(f"{port}@{when:.3f}\n" for port, when in recent.items()))


def serve_command() -> list[str]:
    """`mnist-serve` from this interpreter's environment (works without activating the venv)."""
    script = Path(sys.executable).parent / "mnist-serve"
    return [str(script)] if script.exists() else ["mnist-serve"]


class Spawned:
    """A server subprocess on 127.0.0.1 with its gRPC, HTTP and metrics ports and a log file."""

    def __init__(self, command: list[str], port: int, metrics_port: int | None, log_path: Path) -> None:
        self.command, self.port, self.metrics_port, self.log_path = command, port, metrics_port, log_path
        self.http_port: int | None = None  # mnist-serve's HTTP/REST port, where it has one
        self.target = f"127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    @classmethod
    def mnist_serve(cls, command: list[str], repo: Path, extra_args: list[str], log_path: Path) -> "Spawned":
        """`command` is mnist-serve, possibly behind a wrapper that execs it (taskset, env, nice)."""
        port, metrics_port, http_port = free_port(), free_port(), free_port()
        command = [*command, "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--metrics-port", str(metrics_port), "--http-port", str(http_port), *extra_args]
        spawned = cls(command, port, metrics_port, log_path)
        spawned.http_port = http_port
        return spawned

    @classmethod
    def echo(cls, log_path: Path) -> "Spawned":
        """The floors (serving.bench.echo): gRPC on its port, HTTP on its http_port."""
        port, http_port = free_port(), free_port()
        command = [
            sys.executable,
            "-m",
            "serving.bench.echo",
            "--port",
            str(port),
            "--http-port",
            str(http_port),
        ]
        spawned = cls(command, port, None, log_path)
        spawned.http_port = http_port
        return spawned

    def target_for(self, protocol: str) -> str:
        """HOST:PORT of the gRPC or the HTTP port."""
        return f"127.0.0.1:{self.http_port}" if protocol == "http" else self.target

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def wait_serving(
        self, connection: Connection, timeout_s: float = 120.0, say: Callable[[str], None] | None = None
    ) -> None:
        """Block until grpc.health.v1 says SERVING (models loaded and warm). What the server logs as a
        warning or an error meanwhile is passed to `say` at once (e.g. that it has no model to serve)."""
        deadline = time.monotonic() + timeout_s
        channel = _sync_channel(connection, self.target)
        stub = health_pb2_grpc.HealthStub(channel)
        read = 0  # how far the log has been relayed
        try:
            while time.monotonic() < deadline:
                if say is not None:
                    read = self._relay(read, say)
                if self.process.poll() is not None:
                    raise SpawnError(f"server exited with code {self.process.returncode}: {self.log_tail()}")
                try:
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0, metadata=connection.metadata()
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        finally:
            channel.close()
        self.stop()
        raise SpawnError(f"server not SERVING after {timeout_s:.0f} s: {self.log_tail()}")

    def _relay(self, offset: int, say: Callable[[str], None]) -> int:
        """Pass the log's complete new warning and error lines to `say`; returns the new offset."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read()
        except OSError:
            return offset
        complete = text[: text.rfind(b"\n") + 1]
        for line in complete.decode(errors="replace").splitlines():
            if any(level in line for level in RELAYED):
                say(line.strip())
        return offset + len(complete)

    def stop(self, grace_s: float = 15.0) -> int:
        """SIGTERM, wait for the graceful shutdown, SIGKILL if it hangs; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def __str__(self) -> str:
        return shlex.join(self.command)


def exit_status(code: int) -> str:
    """'exited with code 2', or 'was killed by SIGKILL' for a process a signal ended."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


def _sync_channel(connection: Connection, target: str) -> grpc.Channel:
    c = connection
    return open_channel(target, c.max_message_bytes, c.credentials(), c.server_name)
