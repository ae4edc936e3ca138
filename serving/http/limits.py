"""Requests within the server's limits. The size limits (--max-message-bytes for a body,
--max-image-bytes and --max-images-per-request for images) are enforced while the bytes arrive, never
after buffering them, and on the decompressed bytes of a gzip or deflate body; the whole body must arrive
within --http-read-timeout (a slow or stalled client would otherwise hold its connection and buffer for as
long as it liked); and a request's deadline is answered when it passes, as gRPC does.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from aiohttp import BodyPartReader, web

from serving.errors import RequestError
from serving.http.status import BodyTooSlow, PayloadTooLarge
from serving.http.tensors import invalid

CHUNK = 64 * 1024
T = TypeVar("T")


async def by_deadline(timeout_seconds: float | None, work: Awaitable[T]) -> T:
    """Await `work`; past the deadline, cancel it (the batcher drops a request still queued) and answer
    DEADLINE_EXCEEDED then, not when the queue would have got to it."""
    if timeout_seconds is None:
        return await work
    try:
        async with asyncio.timeout(timeout_seconds):
            return await work
    except TimeoutError:
        raise RequestError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {timeout_seconds:g} s exceeded"
        ) from None


async def read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes, above the limit of {limit}")
    try:
        async with asyncio.timeout(timeout):
            return await _read_up_to(request.content.read, limit, "request body")
    except TimeoutError:
        raise BodyTooSlow(timeout) from None


async def read_images(
    request: web.Request, max_bytes: int, max_images: int, timeout: float
) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of each image: every part of a multipart/form-data body (named by its file
    name, else its field name), or else the whole body as one image, whatever its content type (so that
    `curl --data-binary @seven.png` works without naming one)."""
    try:
        async with asyncio.timeout(timeout):
            if request.content_type.startswith("multipart/"):
                return await _read_parts(request, max_bytes, max_images)
            return [("", await _read_up_to(request.content.read, max_bytes, "image"))]
    except TimeoutError:
        raise BodyTooSlow(timeout) from None


async def _read_parts(request: web.Request, max_bytes: int, max_images: int) -> list[tuple[str, bytes]]:
    images: list[tuple[str, bytes]] = []
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise invalid("nested multipart bodies are not supported: send each image as one part")
            if len(images) == max_images:
                raise PayloadTooLarge(f"more than {max_images} images in one request, above the limit")
            name = part.filename or part.name or str(len(images))
            images.append((name, await _read_up_to(part.read_chunk, max_bytes, f"image {name[:80]!r}")))
    except RequestError:
        raise
    except (ValueError, AssertionError, RuntimeError) as e:  # what aiohttp raises for a broken multipart body
        raise invalid(f"malformed multipart body: {str(e)[:200] or type(e).__name__}") from None
    return images


async def _read_up_to(read: Callable[[int], Awaitable[bytes]], limit: int, what: str) -> bytes:
    chunks, size = [], 0
    while chunk := await read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
