"""mnist-bench over HTTP: the two APIs as the REST front end serves them, and the keep-alive connections
that carry them (aiohttp's client, on the generator's event loop).

Requests are built once, before the run, with the codec the server itself uses (serving.http.tensors):
KServe v2 infer with Triton's binary tensors, as tritonclient.http and perf_analyzer send them, or with JSON
tensors (`--http-tensors json`, for servers without the binary extension); /v1 classify with PNG files, one
as the body or several as multipart/form-data. Each request carries its deadline, as a gRPC call does:
Triton's `timeout` parameter, or `timeout_ms`.

Outcomes are named so that the report reads as gRPC's does: "OK" for a 200, HTTP_<status> for any other
answer, UNAVAILABLE for a connection that failed and DEADLINE_EXCEEDED for a request that the generator's
own deadline ended.
"""

import asyncio
import io
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import numpy as np
from PIL import Image
from yarl import URL

from serving.bench.connection import Connection
from serving.http.status import HTTP_STATUS
from serving.http.tensors import HEADER_LENGTH, decode_reply, encode_request

TENSORS = ("binary", "json")
HEALTH_PATH = "/v2/health/live"  # open without a token; answered by the echo floor as by any path

Request = tuple[bytes, dict[str, str]]  # body and headers
Reply = tuple[bytes, str | None]  # body, and its Inference-Header-Content-Length
# Sends one request with a deadline in seconds; returns (reply, "OK") or (None, the failure's status).
Send = Callable[[Request, float], Awaitable[tuple[Reply | None, str]]]


def check_address(target: str) -> None:
    """ValueError unless `target` is HOST:PORT (a bracketed IPv6 host too), as --http-server takes them."""
    try:
        url = URL(f"http://{target}")
    except ValueError as e:
        raise ValueError(f"{target!r}: {e}") from None
    if not url.host or not url.explicit_port or url.path != "/" or url.query_string or url.user:
        raise ValueError(f"{target!r}: expected HOST:PORT")


def status_name(status: int) -> str:
    return f"HTTP_{status}"


def path(api: str, model: str, version: str, timeout_s: float | None) -> str:
    """The endpoint of `api` for the model (and its query, for classify)."""
    model_path = f"/models/{quote(model, safe='')}"
    if version:
        model_path += f"/versions/{quote(version, safe='')}"
    if api == "kserve":
        return f"/v2{model_path}/infer"
    query = "?top_k=1" + (f"&timeout_ms={max(1, round(timeout_s * 1e3))}" if timeout_s else "")
    return f"/v1{model_path}/classify{query}"


def build_requests(
    api: str, batches: list[np.ndarray], tensors: str, timeout_s: float | None
) -> list[Request]:
    """One request per batch of uint8 images [n,28,28]; request k has the id "k" where the API has ids."""
    if api == "kserve":
        parameters = {"timeout": max(1, round(timeout_s * 1e6))} if timeout_s else None
        binary = tensors == "binary"
        return [
            encode_request(
                batch[:, None], binary=binary, binary_output=binary, request_id=f"{k}", parameters=parameters
            )
            for k, batch in enumerate(batches)
        ]
    pngs: dict[bytes, bytes] = {}  # the pool repeats digits: encode each once
    return [_images_request([_png(image, pngs) for image in batch]) for batch in batches]


def _png(image: np.ndarray, cache: dict[bytes, bytes]) -> bytes:
    key = image.tobytes()
    if key not in cache:
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        cache[key] = out.getvalue()
    return cache[key]


def _images_request(pngs: list[bytes]) -> Request:
    """One PNG as the body, or several as multipart/form-data, as `curl --data-binary` and `curl -F` send."""
    if len(pngs) == 1:
        return pngs[0], {"Content-Type": "image/png"}
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png
        + b"\r\n"
        for k, png in enumerate(pngs)
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def decode(api: str, reply: Reply) -> tuple[np.ndarray, str]:
    """(probabilities [n,10], reply id or "") of a 200's body; KeyError, ValueError, TypeError or the codec's
    RequestError for a body that is no answer."""
    body, header_length = reply
    if api == "kserve":
        return decode_reply(body, header_length)
    predictions = json.loads(body)["predictions"]
    if not predictions:
        raise ValueError("no predictions")
    return np.asarray([p["probabilities"] for p in predictions], dtype=np.float32), ""


class HttpClients:
    """`connections` keep-alive connection pools per target (aiohttp sessions), requests round-robin over
    them so that a server's worker processes each get a share, as gRPC's channels do. HTTP/1.1 carries one
    request at a time, so a pool opens another connection while all of its own are busy."""

    def __init__(self, connection: Connection, path: str) -> None:
        self.connection = connection
        scheme = "https" if connection.uses_tls else "http"
        targets = [t for t in connection.targets for _ in range(connection.connections)]
        self.urls = [URL(f"{scheme}://{target}{path}") for target in targets]
        self.sessions: list[aiohttp.ClientSession] = []

    async def open(self, timeout_s: float) -> None:
        """A session per pool, each connected once (GET /v2/health/live) before the run."""
        c = self.connection
        context = c.ssl_context()
        headers = {"Authorization": f"Bearer {c.token}"} if c.token else None
        for url in self.urls:
            connector = aiohttp.TCPConnector(limit=0, ssl=context if context is not None else True)
            session = aiohttp.ClientSession(connector=connector, headers=headers, auto_decompress=False)
            self.sessions.append(session)
            health, timeout = url.with_path(HEALTH_PATH), aiohttp.ClientTimeout(total=timeout_s)
            try:
                async with session.get(health, timeout=timeout, **self._tls_name) as answer:
                    await answer.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                why = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else str(e)
                raise ConnectionError(f"cannot connect to {url.host}:{url.port} over HTTP: {why}") from None

    @property
    def _tls_name(self) -> dict[str, Any]:
        name = self.connection.server_name
        return {"server_hostname": name} if name else {}

    def senders(self) -> list[Send]:
        pools = zip(self.sessions, self.urls, strict=True)
        return [_sender(session, url, self._tls_name) for session, url in pools]

    async def close(self) -> None:
        await asyncio.gather(*(session.close() for session in self.sessions))


def _sender(session: aiohttp.ClientSession, url: URL, options: dict[str, Any]) -> Send:
    async def send(request: Request, timeout_s: float) -> tuple[Reply | None, str]:
        body, headers = request
        # A total of 0 would mean no deadline at all to aiohttp.
        timeout = aiohttp.ClientTimeout(total=max(timeout_s, 1e-3))
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout, **options) as response:
                reply = await response.read()
                if response.status != 200:
                    return None, status_name(response.status)
                return (reply, response.headers.get(HEADER_LENGTH)), "OK"
        except TimeoutError:
            return None, "DEADLINE_EXCEEDED"
        except aiohttp.ClientError:
            return None, "UNAVAILABLE"

    return send


# A gRPC status the server counts, when the front end answers it with one of two HTTP statuses
# (serving.http.status): the other one, and the client's own name for the same outcome.
SPLIT = {
    "RESOURCE_EXHAUSTED": (status_name(413),),  # over a size limit; else 429, the queue is full
    "DEADLINE_EXCEEDED": (status_name(408), "DEADLINE_EXCEEDED"),  # a body too slow; the client's deadline
}


def server_counts_as_http(server: Counter, seen: Counter) -> Counter:
    """The server's request counts (gRPC status names, as mnist_requests_total labels them) under the names
    the generator gives what it received: HTTP_<status> by the front end's mapping. A status answered in
    two ways is split as the generator saw them, so that equal counts mean the same requests."""
    counts = Counter()
    for name, n in server.items():
        if name == "OK":
            counts["OK"] += n
            continue
        for other in SPLIT.get(name, ()):
            if share := min(n, seen[other] - counts[other]):
                counts[other] += share
                n -= share
        if n:
            code = grpc.StatusCode.__members__.get(name)
            counts[status_name(HTTP_STATUS.get(code, 500))] += n
    return counts
