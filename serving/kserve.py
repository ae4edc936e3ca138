"""KServe v2 / Open Inference Protocol servicer (package `inference`, Triton-compatible).

ModelInfer accepts one input `images`, shape [N,1,28,28], datatype UINT8 (or FP32 holding 0..255
pixel values, rounded to uint8), as raw_input_contents (fast path: one np.frombuffer, no copy) or typed
contents; it answers `probabilities` FP32 [N,10] as raw_output_contents, like Triton.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import version as package_version
from typing import TypeVar

import grpc
import numpy as np

from serving.contract import IMAGE_PIXELS, IMAGE_SHAPE, INPUT_NAME, INPUT_SHAPE_TEXT, NUM_CLASSES, OUTPUT_NAME
from serving.errors import RequestError, reject
from serving.metrics import Metrics
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.repository import ModelRepository

SERVER_NAME = "mnist-serve"
EXTENSIONS = ["model_repository", "model_configuration"]
BYTES_PER_IMAGE = {"UINT8": IMAGE_PIXELS, "FP32": 4 * IMAGE_PIXELS}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
Request = TypeVar("Request")
Response = TypeVar("Response")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class StreamReaders:
    """The reading side of every open stream, so that a shutdown can stop them: each stream then
    answers the requests it has read and ends with OK (a request it never read was never accepted).
    Otherwise streams would be read until the grace period ran out, then cancelled mid-request."""

    def __init__(self) -> None:
        self._reading: set[asyncio.Task] = set()
        self.closed = False

    def add(self, reader: asyncio.Task) -> None:
        if self.closed:
            reader.cancel()
            return
        self._reading.add(reader)
        reader.add_done_callback(self._reading.discard)

    def close(self) -> None:
        self.closed = True
        for reader in list(self._reading):
            reader.cancel()


async def pipelined(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Response]],
    readers: StreamReaders,
    depth: int = 64,
) -> AsyncIterator[Response]:
    """Answer a stream's requests concurrently, so a client pipelining on one stream gets batched,
    but yield the responses in request order. At most `depth` requests of one stream are in flight
    (then the stream stops being read: flow control pushes back on the client). `answer` must not raise.
    """
    started: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(depth)

    async def read() -> None:
        # readers.close() cancels this while it waits for a slot or for the next request, never between
        # reading a request and queueing its answer: nothing read goes unanswered.
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    return
                started.put_nowait(asyncio.ensure_future(answer(request)))
        finally:
            started.put_nowait(None)

    reader = asyncio.ensure_future(read())
    readers.add(reader)
    try:
        while (task := await started.get()) is not None:
            yield await task
            slots.release()
        if not reader.cancelled():  # cancelled = stopped by a shutdown: the stream ends with OK
            await reader  # re-raises if the request stream broke
    finally:
        reader.cancel()
        while not started.empty():
            task = started.get_nowait()
            if task is not None:
                task.cancel()


def decode_tensor(request: pb.ModelInferRequest, max_images: int) -> np.ndarray:
    """The request's `images` tensor as uint8 [N,1,28,28]; RequestError(INVALID_ARGUMENT) says what's wrong.

    The declared shape is checked against max_images and the payload size before anything is allocated.
    """
    if len(request.inputs) != 1:
        raise RequestError(INVALID, f"expected exactly 1 input {INPUT_NAME!r}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise RequestError(
            INVALID, f"unknown input {tensor.name[:80]!r}: the model's only input is {INPUT_NAME!r}"
        )
    if tensor.datatype not in BYTES_PER_IMAGE:
        raise RequestError(
            INVALID,
            f"input {INPUT_NAME!r} has datatype {tensor.datatype[:20]!r}: expected UINT8 (or FP32 0..255)",
        )
    shape = list(tensor.shape[:5])  # enough to tell 4 dimensions from any other; never copy millions
    if len(shape) != 4 or shape[1:] != list(IMAGE_SHAPE) or shape[0] < 1:
        raise RequestError(
            INVALID, f"input {INPUT_NAME!r} has shape {shape[:8]}: expected {INPUT_SHAPE_TEXT}, N >= 1"
        )
    n = shape[0]
    if n > max_images:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{n} images in one request, above the limit of {max_images}"
        )
    count = n * IMAGE_PIXELS
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
            raise RequestError(
                INVALID, f"send {INPUT_NAME!r} either in raw_input_contents (one entry) or in contents"
            )
        raw = request.raw_input_contents[0]
        expected = n * BYTES_PER_IMAGE[tensor.datatype]
        if len(raw) != expected:
            raise RequestError(
                INVALID,
                f"raw_input_contents has {len(raw)} bytes; shape {shape} {tensor.datatype} needs {expected}",
            )
        flat = np.frombuffer(raw, np.uint8 if tensor.datatype == "UINT8" else "<f4")
    else:
        values = (
            tensor.contents.uint_contents if tensor.datatype == "UINT8" else tensor.contents.fp32_contents
        )
        field = "uint_contents" if tensor.datatype == "UINT8" else "fp32_contents"
        if len(values) != count:
            raise RequestError(
                INVALID, f"contents.{field} has {len(values)} values; shape {shape} needs {count}"
            )
        flat = np.asarray(values, np.uint32 if tensor.datatype == "UINT8" else np.float32)
    if flat.dtype != np.uint8:
        if not np.all((flat >= 0) & (flat <= 255)):  # also false for NaN
            raise RequestError(INVALID, f"{tensor.datatype} pixel values must be within 0..255 (and finite)")
        flat = np.rint(flat).astype(np.uint8) if flat.dtype.kind == "f" else flat.astype(np.uint8)
    return flat.reshape(n, *IMAGE_SHAPE)


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        metrics: Metrics,
        max_images: int,
        provider: str,
        streams: StreamReaders | None = None,
    ) -> None:
        self.repository = repository
        self.streams = streams or StreamReaders()
        self.metrics = metrics
        self.max_images = max_images
        self.extensions = [*EXTENSIONS, f"onnxruntime_provider:{provider}"]
        self.version = package_version("mnist-serving")
        self.live = True

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.live)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.live and self.repository.ready)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=self.extensions)

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        try:
            loaded = self.repository.get(request.name, request.version)
        except RequestError as e:
            return reject(context, e)
        versions = self.repository.models[loaded.name].versions
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=[str(v) for v in sorted(versions)],
            platform=loaded.config.platform or "onnxruntime_onnx",
            inputs=[tensor(name=INPUT_NAME, datatype="UINT8", shape=[-1, *IMAGE_SHAPE])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, NUM_CLASSES])],
        )

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        try:
            loaded = self.repository.get(request.name, request.version)
        except RequestError as e:
            return reject(context, e)
        return pb.ModelConfigResponse(config=loaded.config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        start = time.perf_counter()
        self.metrics.inflight.inc()
        name = request.model_name
        try:
            response = await self._infer(request, deadline_of(context))
        except RequestError as e:
            self._count(name, e.code.name, start)
            return reject(context, e)
        finally:
            self.metrics.inflight.dec()
        self._count(name, "OK", start)
        return response

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            # A bad request gets error_message and the stream goes on.
            start = time.perf_counter()
            self.metrics.inflight.inc()
            try:
                response = await self._infer(request, deadline)
            except RequestError as e:
                self._count(request.model_name, e.code.name, start)
                return pb.ModelStreamInferResponse(
                    error_message=f"{e.code.name}: {e.message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name[:128], id=request.id),
                )
            finally:
                self.metrics.inflight.dec()
            self._count(request.model_name, "OK", start)
            return pb.ModelStreamInferResponse(infer_response=response)

        async for response in pipelined(requests, answer, self.streams):
            yield response

    async def RepositoryIndex(self, request, context) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse()
        for name in sorted(p.name for p in self.repository.root.iterdir() if p.is_dir()):
            loaded = self.repository.models.get(name)
            if loaded and loaded.versions:
                for v in sorted(loaded.versions):
                    index.models.add(name=name, version=str(v), state="READY")
            elif not request.ready:
                reason = "unloaded" if name in self.repository.unloaded else "no loadable version"
                index.models.add(name=name, state="UNAVAILABLE", reason=reason)
        return index

    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        try:
            await self.repository.load(request.model_name)
        except RequestError as e:
            return reject(context, e)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.repository.unload(request.model_name)
        except RequestError as e:
            return reject(context, e)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        loaded = self.repository.get(request.model_name, request.model_version)
        for output in request.outputs:
            if output.name != OUTPUT_NAME:
                raise RequestError(
                    INVALID, f"unknown output {output.name[:80]!r}: the only output is {OUTPUT_NAME!r}"
                )
        images = decode_tensor(request, self.max_images)
        result = await loaded.batcher.submit(images, deadline)
        probabilities = result.probabilities
        return pb.ModelInferResponse(
            model_name=loaded.name,
            model_version=str(loaded.version),
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=OUTPUT_NAME, datatype="FP32", shape=probabilities.shape
                )
            ],
            raw_output_contents=[probabilities.tobytes()],
        )

    def _count(self, model: str, status: str, start: float) -> None:
        model = model if model in self.repository.models else "unknown"  # bounded label cardinality
        self.metrics.request_done(model, "kserve", status, time.perf_counter() - start)
