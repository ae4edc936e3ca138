"""The mnist.v1 Classifier servicer: images in (encoded or raw 28x28 pixels), digits out."""

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from serving.batcher import BatchResult
from serving.config import ServerConfig
from serving.contract import IMAGE_PIXELS, IMAGE_SHAPE, IMAGE_SIDE, NUM_CLASSES
from serving.errors import RequestError
from serving.images import ImageError, decode_image
from serving.proto.mnist.v1 import classify_pb2 as pb
from serving.proto.mnist.v1 import classify_pb2_grpc
from serving.repository import ModelRepository
from serving.rpc import Handling, StreamReaders, check_image_count, compute, deadline_of

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
        async for response in self.handling.stream(requests, context, self.streams, self._answer_in_stream):
            yield response

    async def _answer_in_stream(
        self, request: pb.ClassifyRequest, deadline: float | None
    ) -> pb.ClassifyStreamResponse:
        outcome = await self.handling.run(request.model, request.version, self.classify(request, deadline))
        if isinstance(outcome, RequestError):  # a bad request gets `error` and the stream goes on
            return pb.ClassifyStreamResponse(
                error=pb.Error(code=outcome.code.value[0], message=outcome.message), id=request.id
            )
        return pb.ClassifyStreamResponse(response=outcome, id=request.id)

    async def classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        """One classification, whichever front end received it (gRPC here, HTTP in serving.http)."""
        start = time.perf_counter_ns()
        loaded = self.repository.get(request.model, request.version)
        n = len(request.images)
        if n == 0:
            raise RequestError(INVALID, "no images in the request: send at least one")
        check_image_count(n, self.limits.max_images_per_request)
        if request.top_k > NUM_CLASSES:
            raise RequestError(INVALID, f"top_k is {request.top_k}: expected 1..{NUM_CLASSES} (0 means 1)")
        if any(image.WhichOneof("data") == "encoded" for image in request.images):
            # On a thread even when small: 25 KB of PNG can declare 4096x4096 pixels (~0.1-0.4 s to decode).
            images = await asyncio.to_thread(decode_images, request.images, self.limits)
        else:
            images = decode_images(request.images, self.limits)
        top_k = request.top_k or 1

        def respond(result: BatchResult) -> pb.ClassifyResponse:
            return pb.ClassifyResponse(
                model=loaded.name,
                version=str(loaded.version),
                id=request.id,
                predictions=[prediction(p, top_k) for p in result.probabilities],
                queue_time_us=int(result.queue_seconds * 1e6),
                compute_time_us=int(result.compute_seconds * 1e6),
            )

        return await compute(loaded, images, deadline, start, respond)
