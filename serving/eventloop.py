"""The event loop every process of the product runs on: uvloop where it is installed (Linux, macOS).

grpc.aio spends most of a small request's server CPU in event-loop callbacks; uvloop's loop runs them with
less overhead (measured in benchmarks/serving.md). The standard asyncio loop is the fallback, with the same
behaviour; MNIST_SERVING_EVENT_LOOP=asyncio chooses it even where uvloop is installed.
"""

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # e.g. Windows: the standard loop
    uvloop = None


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the fastest available loop."""
    if uvloop is not None and os.environ.get("MNIST_SERVING_EVENT_LOOP") != "asyncio":
        return uvloop.run(main)
    return asyncio.run(main)
