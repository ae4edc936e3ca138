"""Which asyncio HTTP stack for the REST front end: the same handler on aiohttp and on Starlette under
uvicorn, each in a server process that also runs a grpc.aio server on the same uvloop loop (as mnist-serve
does), loaded by wrk on loopback. The handler reads a binary-tensor infer request (JSON header and 784
bytes), splits it with serving.http.tensors and answers a 40-byte binary output: the stack's own cost,
without the model.

    apt-get install wrk; pip install uvicorn starlette httptools    # for this comparison only
    python benchmarks/http_stack.py --seconds 5 --repeats 3 --connections 16

Prints requests/s and server CPU microseconds per request (the process's user+system time over the
requests it answered), mean ± std over interleaved repeats, with the load average before the run.
"""

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

STACKS = ("aiohttp", "starlette")
HEADER = json.dumps(
    {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [1, 1, 28, 28],
                "parameters": {"binary_data_size": 784},
            }
        ]
    }  # fmt: skip
)
REPLY_HEADER = json.dumps(
    {
        "model_name": "m",
        "model_version": "1",
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [1, 10],
                "parameters": {"binary_data_size": 40},
            }
        ],
    }  # fmt: skip
).encode()
REPLY = REPLY_HEADER + bytes(40)
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{HEADER}' .. string.rep("\\0", 784)
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "{len(HEADER)}"
"""


def answer(body: bytes, header_length: str | None) -> bytes:
    from serving.http.tensors import split_body

    header, binary = split_body(body, header_length)
    assert len(binary) == header["inputs"][0]["parameters"]["binary_data_size"]
    return REPLY


async def serve(stack: str, port: int) -> None:
    import grpc

    beside = grpc.aio.server()
    beside.add_insecure_port("127.0.0.1:0")
    await beside.start()
    headers = {"Inference-Header-Content-Length": str(len(REPLY_HEADER))}
    if stack == "aiohttp":
        from aiohttp import web

        async def infer(request: web.Request) -> web.Response:
            reply = answer(await request.read(), request.headers.get("Inference-Header-Content-Length"))
            return web.Response(body=reply, headers=headers, content_type="application/octet-stream")

        app = web.Application()
        app.router.add_post("/infer", infer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()
    else:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def infer(request: Request) -> Response:
            reply = answer(await request.body(), request.headers.get("Inference-Header-Content-Length"))
            return Response(reply, headers=headers, media_type="application/octet-stream")

        app = Starlette(routes=[Route("/infer", infer, methods=["POST"])])
        config = uvicorn.Config(app, "127.0.0.1", port, http="httptools", lifespan="off", log_level="warning")
        await uvicorn.Server(config).serve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(stack: str, seconds: int, connections: int, script: Path) -> tuple[float, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", stack, "--port", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{stack} server did not start"
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/infer"
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", "-s", str(script), url], capture_output=True, check=True)
        process = psutil.Process(server.pid)
        before = sum(process.cpu_times()[:2])
        done = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        cpu = sum(process.cpu_times()[:2]) - before
        requests = int(re.search(r"(\d+) requests in", done.stdout).group(1))
        assert "Non-2xx" not in done.stdout, done.stdout
        return requests / seconds, cpu / requests * 1e6
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve, args.port))
        return
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results: dict[str, list[tuple[float, float]]] = {stack: [] for stack in STACKS}
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory) / "post.lua"
        script.write_text(WRK_SCRIPT)
        for _ in range(args.repeats):
            for stack in STACKS:  # interleaved, so that drift in the machine's load hits both alike
                results[stack].append(run_once(stack, args.seconds, args.connections, script))
    for stack, runs in results.items():
        rates, costs = [r for r, _ in runs], [c for _, c in runs]
        print(
            f"{stack:10s} {statistics.mean(rates):8.0f} ± {statistics.pstdev(rates):5.0f} requests/s   "
            f"{statistics.mean(costs):6.1f} ± {statistics.pstdev(costs):4.1f} µs server CPU per request"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
