"""The mnist.v1 Classifier servicer: images in (encoded or raw 28x28 pixels), digits out."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np

from serving.contract import IMAGE_PIXELS, IMAGE_SHAPE, IMAGE_SIDE
from serving.errors import RequestError, reject
from serving.images import ImageError, decode_image
from serving.kserve import StreamReaders, deadline_of, pipelined
from serving.metrics import Metrics
from serving.proto.mnist.v1 import classify_pb2 as pb
from serving.proto.mnist.v1 import classify_pb2_grpc
from serving.repository import ModelRepository

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Limits:
    max_images: int = 1024  # per request
    max_image_bytes: int = 4 * 1024 * 1024  # per encoded image
    max_image_pixels: int = 4096 * 4096  # declared width x height of an encoded image


def decode_images(images, limits: Limits) -> np.ndarray:
    """Request images -> uint8 [N,1,28,28]; RequestError names the offending image index."""
    batch = np.empty((len(images), *IMAGE_SHAPE), np.uint8)
    for i, image in enumerate(images):
        kind = image.WhichOneof("data")
        if kind == "pixels":
            if len(image.pixels) != IMAGE_PIXELS:
                raise RequestError(
                    INVALID,
                    f"images[{i}].pixels has {len(image.pixels)} bytes: "
                    f"expected {IMAGE_PIXELS} ({IMAGE_SIDE}x{IMAGE_SIDE} uint8)",
                )
            batch[i, 0] = np.frombuffer(image.pixels, np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)
        elif kind == "encoded":
            if len(image.encoded) > limits.max_image_bytes:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"images[{i}].encoded is {len(image.encoded)} bytes, above the limit of "
                    f"{limits.max_image_bytes}",
                )
            try:
                batch[i, 0] = decode_image(image.encoded, limits.max_image_pixels)
            except ImageError as e:
                raise RequestError(INVALID, f"images[{i}]: {e}") from e
        else:
            raise RequestError(
                INVALID,
                f"images[{i}] is empty: set `encoded` (PNG, JPEG...) or `pixels` ({IMAGE_PIXELS} bytes)",
            )
    return batch


def prediction(probabilities: np.ndarray, top_k: int) -> pb.Prediction:
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return pb.Prediction(
        probabilities=probabilities.tolist(),
        label=int(order[0]),
        confidence=float(probabilities[order[0]]),
        top_k=[pb.LabelProbability(label=int(k), probability=float(probabilities[k])) for k in order],
    )


class ClassifierServicer(classify_pb2_grpc.ClassifierServicer):
    def __init__(
        self,
        repository: ModelRepository,
        metrics: Metrics,
        limits: Limits,
        streams: StreamReaders | None = None,
    ) -> None:
        self.repository = repository
        self.streams = streams or StreamReaders()
        self.metrics = metrics
        self.limits = limits

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        start = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            response = await self._classify(request, deadline_of(context))
        except RequestError as e:
            self._count(request.model, e.code.name, start)
            return reject(context, e)
        finally:
            self.metrics.inflight.dec()
        self._count(request.model, "OK", start)
        return response

    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        deadline = deadline_of(context)

        async def answer(request: pb.ClassifyRequest) -> pb.ClassifyStreamResponse:
            # A bad request gets `error` and the stream goes on.
            start = time.perf_counter()
            self.metrics.inflight.inc()
            try:
                response = await self._classify(request, deadline)
            except RequestError as e:
                self._count(request.model, e.code.name, start)
                return pb.ClassifyStreamResponse(
                    error=pb.Error(code=e.code.value[0], message=e.message), id=request.id
                )
            finally:
                self.metrics.inflight.dec()
            self._count(request.model, "OK", start)
            return pb.ClassifyStreamResponse(response=response, id=request.id)

        async for response in pipelined(requests, answer, self.streams):
            yield response

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        loaded = self.repository.get(request.model, request.version)
        n = len(request.images)
        if n == 0:
            raise RequestError(INVALID, "no images in the request: send at least one")
        if n > self.limits.max_images:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{n} images in one request, above the limit of {self.limits.max_images}",
            )
        if request.top_k > 10:
            raise RequestError(INVALID, f"top_k is {request.top_k}: expected 1..10 (0 means 1)")
        if any(image.WhichOneof("data") == "encoded" for image in request.images):
            # On a thread even when small: 25 KB of PNG can declare 4096x4096 pixels (~0.1-0.4 s to decode).
            images = await asyncio.to_thread(decode_images, request.images, self.limits)
        else:
            images = decode_images(request.images, self.limits)
        result = await loaded.batcher.submit(images, deadline)
        top_k = request.top_k or 1
        return pb.ClassifyResponse(
            model=loaded.name,
            version=str(loaded.version),
            id=request.id,
            predictions=[prediction(p, top_k) for p in result.probabilities],
            queue_time_us=int(result.queue_seconds * 1e6),
            compute_time_us=int(result.compute_seconds * 1e6),
        )

    def _count(self, model: str, status: str, start: float) -> None:
        model = model if model in self.repository.models else "unknown"  # bounded label cardinality
        self.metrics.request_done(model, "classify", status, time.perf_counter() - start)
