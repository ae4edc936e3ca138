"""serving.eventloop: uvloop where installed, the standard loop when asked for (a documented switch)."""

import asyncio

import pytest

from serving import eventloop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_runs_the_servers_where_installed(monkeypatch):
    pytest.importorskip("uvloop", reason="uvloop is not built for this platform (e.g. Windows)")
    monkeypatch.delenv("MNIST_SERVING_EVENT_LOOP", raising=False)
    assert eventloop.run(loop_module()).startswith("uvloop")


def test_the_standard_loop_on_request(monkeypatch):
    monkeypatch.setenv("MNIST_SERVING_EVENT_LOOP", "asyncio")
    assert eventloop.run(loop_module()).startswith("asyncio")
