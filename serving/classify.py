"""The mnist.v1 Classifier servicer: images in (encoded or raw 28x28 pixels), digits out."""

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from serving.config import ServerConfig
from serving.contract import IMAGE_PIXELS, IMAGE_SHAPE, IMAGE_SIDE
from serving.errors import RequestError
from serving.images import ImageError, decode_image
from serving.proto.mnist.v1 import classify_pb2 as pb
from serving.proto.mnist.v1 import classify_pb2_grpc
from serving.repository import ModelRepository
from serving.rpc import Handling, StreamReaders, deadline_of, pipelined

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def decode_images(images, limits: ServerConfig) -> np.ndarray:
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
        self, repository: ModelRepository, handling: Handling, limits: ServerConfig, streams: StreamReaders
    ) -> None:
        self.repository = repository
        self.handling = handling
        self.limits = limits
        self.streams = streams

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        return await self.handling.unary(
            context, request.model, request.version, self.classify(request, deadline_of(context))
        )

    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        deadline = deadline_of(context)

        async def answer(request: pb.ClassifyRequest) -> pb.ClassifyStreamResponse:
            # A bad request gets `error` and the stream goes on.
            work = self.classify(request, deadline)
            outcome = await self.handling.run(request.model, request.version, work)
            if isinstance(outcome, RequestError):
                return pb.ClassifyStreamResponse(
                    error=pb.Error(code=outcome.code.value[0], message=outcome.message), id=request.id
                )
            return pb.ClassifyStreamResponse(response=outcome, id=request.id)

        async for response in pipelined(requests, answer, self.streams):
            yield response

    async def classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        """One classification, whichever front end received it (gRPC here, HTTP in serving.http)."""
        start = time.perf_counter_ns()
        loaded = self.repository.get(request.model, request.version)
        n = len(request.images)
        if n == 0:
            raise RequestError(INVALID, "no images in the request: send at least one")
        if n > self.limits.max_images_per_request:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{n} images in one request, above the limit of {self.limits.max_images_per_request}",
            )
        if request.top_k > 10:
            raise RequestError(INVALID, f"top_k is {request.top_k}: expected 1..10 (0 means 1)")
        if any(image.WhichOneof("data") == "encoded" for image in request.images):
            # On a thread even when small: 25 KB of PNG can declare 4096x4096 pixels (~0.1-0.4 s to decode).
            images = await asyncio.to_thread(decode_images, request.images, self.limits)
        else:
            images = decode_images(request.images, self.limits)
        decoded = time.perf_counter_ns()
        result = await loaded.batcher.submit(images, deadline)
        answered = time.perf_counter_ns()
        top_k = request.top_k or 1
        response = pb.ClassifyResponse(
            model=loaded.name,
            version=str(loaded.version),
            id=request.id,
            predictions=[prediction(p, top_k) for p in result.probabilities],
            queue_time_us=int(result.queue_seconds * 1e6),
            compute_time_us=int(result.compute_seconds * 1e6),
        )
        done = time.perf_counter_ns()
        loaded.statistics.record_success(
            n, done - start, int(result.queue_seconds * 1e9), decoded - start,
            int(result.compute_seconds * 1e9), done - answered,
        )  # fmt: skip
        return response
