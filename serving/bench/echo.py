"""The bare floors: a grpc.aio server on the same stack as mnist-serve that answers every method of both
APIs by echoing the request bytes (same payload size, no parsing, no model), and beside it on the same
event loop, as mnist-serve's HTTP front end, a bare aiohttp server that answers every request by echoing
its body.

    python -m serving.bench.echo --port 50051 --http-port 50052
"""

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
from aiohttp import web
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


async def _echo_http(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/octet-stream")


async def _serve_http(port: int, max_message_bytes: int) -> web.AppRunner:
    """aiohttp with mnist-serve's front-end settings (serving.http.frontend), and no handler but the echo."""
    app = web.Application(client_max_size=max_message_bytes)
    app.router.add_route("*", "/{path:.*}", _echo_http)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    return runner


async def serve(port: int, http_port: int | None = None, max_message_bytes: int = 64 * 1024 * 1024) -> None:
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
    http = await _serve_http(http_port, max_message_bytes) if http_port is not None else None
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if http is not None:
        await http.cleanup()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True, help="gRPC port on 127.0.0.1")
    parser.add_argument("--http-port", type=int, help="HTTP port on 127.0.0.1 (default: no HTTP)")
    args = parser.parse_args()
    eventloop.run(serve(args.port, args.http_port))


if __name__ == "__main__":
    main()
