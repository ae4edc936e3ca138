"""The bare gRPC floor: a grpc.aio server on the same stack as mnist-serve that answers every method of
both APIs by echoing the request bytes (same payload size, no parsing, no model).

    python -m serving.bench.echo --port 50051
"""

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving import eventloop
from serving.bench.apis import METHODS


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _echo_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


def _handlers() -> list[grpc.GenericRpcHandler]:
    """No (de)serializers: the handlers see and return raw bytes."""
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for (_, stream), path in METHODS.items():
        service, method = path.strip("/").split("/")
        handler = (
            grpc.stream_stream_rpc_method_handler(_echo_stream)
            if stream
            else grpc.unary_unary_rpc_method_handler(_echo)
        )
        by_service.setdefault(service, {})[method] = handler
    return [grpc.method_handlers_generic_handler(s, m) for s, m in by_service.items()]


async def serve(port: int, max_message_bytes: int = 64 * 1024 * 1024) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    server.add_generic_rpc_handlers(_handlers())
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    eventloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
