"""HTTP statuses for the serving pipeline's errors: the one mapping from RequestError's gRPC codes (the
statuses gRPC clients get) to the HTTP statuses of the REST front end, and the error body the Open
Inference Protocol defines, `{"error": "<message>"}`. docs/serving.md shows this table beside the gRPC one.

The mapping is the usual one (as in grpc-gateway and Google's API design guide), with one refinement:
RESOURCE_EXHAUSTED is 429 when the server is full (--max-concurrent-rpcs requests in progress, or a model's
queue) but 413 when the request itself is over a size limit; the front end detects those while it reads the
request and raises PayloadTooLarge.
"""

import json

import grpc
from aiohttp import web

from serving.errors import RequestError

Code = grpc.StatusCode

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INTERNAL: 500,
    Code.DATA_LOSS: 500,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
PAYLOAD_TOO_LARGE = 413
REQUEST_TIMEOUT = 408  # the client took longer than --http-read-timeout to send its body


class PayloadTooLarge(RequestError):
    """RESOURCE_EXHAUSTED because the request is over a size limit (413), not because the server is full."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.RESOURCE_EXHAUSTED, message)


class BodyTooSlow(RequestError):
    """The body did not arrive within --http-read-timeout (408; the gRPC code labels the metrics)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(Code.DEADLINE_EXCEEDED, f"request body not received within {seconds:g} s")


def http_status(error: RequestError) -> int:
    if isinstance(error, PayloadTooLarge):
        return PAYLOAD_TOO_LARGE
    if isinstance(error, BodyTooSlow):
        return REQUEST_TIMEOUT
    return HTTP_STATUS.get(error.code, 500)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": message}).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def failure(error: RequestError) -> web.Response:
    status = http_status(error)
    return error_response(status, error.message, {"Retry-After": "1"} if status in (429, 503) else None)
