"""KServe v2 / Open Inference Protocol servicer (package `inference`, Triton-compatible).

ModelInfer accepts one input `images`, shape [N,1,28,28], datatype UINT8 (or FP32 holding 0..255
pixel values, rounded to uint8), as raw_input_contents (fast path: one np.frombuffer, no copy) or typed
contents; it answers `probabilities` FP32 [N,10] as raw_output_contents, like Triton.
"""

import time
from collections.abc import AsyncIterator
from importlib.metadata import version as package_version

import grpc
import numpy as np

from serving.batcher import BatchResult
from serving.contract import IMAGE_PIXELS, IMAGE_SHAPE, INPUT_NAME, INPUT_SHAPE_TEXT, NUM_CLASSES, OUTPUT_NAME
from serving.control import Control
from serving.errors import RequestError, reject
from serving.proto.inference import grpc_service_pb2 as pb
from serving.proto.inference import grpc_service_pb2_grpc
from serving.repository import LoadedVersion, ModelRepository
from serving.rpc import Handling, StreamReaders, check_image_count, compute, deadline_of
from serving.statistics import to_proto

SERVER_NAME = "mnist-serve"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]
BYTES_PER_IMAGE = {"UINT8": IMAGE_PIXELS, "FP32": 4 * IMAGE_PIXELS}
IMAGE_SHAPE_LIST = list(IMAGE_SHAPE)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def decode_tensor(request: pb.ModelInferRequest, max_images: int) -> np.ndarray:
    """The request's `images` tensor as uint8 [N,1,28,28]; RequestError(INVALID_ARGUMENT) says what's wrong.

    The declared shape is checked against max_images and the payload size before anything is allocated.
    """
    inputs = request.inputs  # each access of a protobuf field builds a new wrapper: read each once
    if len(inputs) != 1:
        raise RequestError(INVALID, f"expected exactly 1 input {INPUT_NAME!r}, got {len(inputs)}")
    tensor = inputs[0]
    name, datatype = tensor.name, tensor.datatype
    if name != INPUT_NAME:
        raise RequestError(INVALID, f"unknown input {name[:80]!r}: the model's only input is {INPUT_NAME!r}")
    if datatype not in BYTES_PER_IMAGE:
        raise RequestError(
            INVALID, f"input {INPUT_NAME!r} has datatype {datatype[:20]!r}: expected UINT8 (or FP32 0..255)"
        )
    shape = tensor.shape[:5]  # a list; enough to tell 4 dimensions from any other; never copy millions
    if len(shape) != 4 or shape[1:] != IMAGE_SHAPE_LIST or shape[0] < 1:
        raise RequestError(
            INVALID, f"input {INPUT_NAME!r} has shape {shape}: expected {INPUT_SHAPE_TEXT}, N >= 1"
        )
    n = shape[0]
    check_image_count(n, max_images)
    count = n * IMAGE_PIXELS
    raws = request.raw_input_contents
    if raws:
        if len(raws) != 1 or tensor.HasField("contents"):
            raise RequestError(
                INVALID, f"send {INPUT_NAME!r} either in raw_input_contents (one entry) or in contents"
            )
        raw = raws[0]
        expected = n * BYTES_PER_IMAGE[datatype]
        if len(raw) != expected:
            raise RequestError(
                INVALID, f"raw_input_contents has {len(raw)} bytes; shape {shape} {datatype} needs {expected}"
            )
        array = np.ndarray((n, *IMAGE_SHAPE), np.uint8 if datatype == "UINT8" else "<f4", raw)  # a view
    else:
        values = tensor.contents.uint_contents if datatype == "UINT8" else tensor.contents.fp32_contents
        field = "uint_contents" if datatype == "UINT8" else "fp32_contents"
        if len(values) != count:
            raise RequestError(
                INVALID, f"contents.{field} has {len(values)} values; shape {shape} needs {count}"
            )
        array = np.asarray(values, np.uint32 if datatype == "UINT8" else np.float32).reshape(n, *IMAGE_SHAPE)
    if array.dtype != np.uint8:
        if not np.all((array >= 0) & (array <= 255)):  # also false for NaN
            raise RequestError(INVALID, f"{datatype} pixel values must be within 0..255 (and finite)")
        array = np.rint(array).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)
    return array


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        handling: Handling,
        control: Control,
        max_images: int,
        provider: str,
        streams: StreamReaders,
    ) -> None:
        self.repository = repository
        self.handling = handling
        self.control = control
        self.streams = streams
        self.max_images = max_images
        self.extensions = [*EXTENSIONS, f"onnxruntime_provider:{provider}"]
        self.version = package_version("mnist-serving")
        self._templates: dict[tuple[str, int], pb.ModelInferResponse] = {}

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # this process answers: it is live

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repository.ready)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.repository.find(request.name, request.version) is not None)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=self.extensions)

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        try:
            loaded = self.repository.get(request.name, request.version)
        except RequestError as e:
            return reject(context, e)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=loaded.name,
            versions=[str(v) for v in self.repository.versions(loaded.name)],
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

    async def ModelStatistics(self, request, context) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                self.repository.get(request.name, request.version)  # NOT_FOUND unless it is served
            rows = await self.control.statistics(request.name, request.version)
        except RequestError as e:
            return reject(context, e)
        return pb.ModelStatisticsResponse(model_stats=[to_proto(*row) for row in rows])

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        return await self.handling.unary(
            context, request.model_name, request.model_version, self.infer(request, deadline_of(context))
        )

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for response in self.handling.stream(requests, context, self.streams, self._answer_in_stream):
            yield response

    async def _answer_in_stream(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        outcome = await self.handling.run(
            request.model_name, request.model_version, self.infer(request, deadline)
        )
        if isinstance(outcome, RequestError):  # a bad request gets error_message and the stream goes on
            return pb.ModelStreamInferResponse(
                error_message=f"{outcome.code.name}: {outcome.message}",
                infer_response=pb.ModelInferResponse(model_name=request.model_name[:128], id=request.id),
            )
        return pb.ModelStreamInferResponse(infer_response=outcome)

    async def RepositoryIndex(self, request, context) -> pb.RepositoryIndexResponse:
        entries = await self.repository.index()
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
                if e.state == "READY" or not request.ready
            ]
        )

    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        try:
            await self.control.load(request.model_name)
        except RequestError as e:
            return reject(context, e)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.control.unload(request.model_name)
        except RequestError as e:
            return reject(context, e)
        return pb.RepositoryModelUnloadResponse()

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        """One inference, whichever front end received it (gRPC here, HTTP in serving.http)."""
        start = time.perf_counter_ns()
        loaded = self.repository.get(request.model_name, request.model_version)
        outputs = request.outputs
        for output in outputs if outputs else ():
            if output.name != OUTPUT_NAME:
                raise RequestError(
                    INVALID, f"unknown output {output.name[:80]!r}: the only output is {OUTPUT_NAME!r}"
                )
        images = decode_tensor(request, self.max_images)

        def respond(result: BatchResult) -> pb.ModelInferResponse:
            response = pb.ModelInferResponse()
            response.CopyFrom(self._response_template(loaded))  # faster than building the fields anew
            response.id = request.id
            response.outputs[0].shape[0] = len(images)
            response.raw_output_contents.append(result.probabilities.tobytes())
            return response

        return await compute(loaded, images, deadline, start, respond)

    def _response_template(self, loaded: LoadedVersion) -> pb.ModelInferResponse:
        """The fields every response of this model version shares, built once."""
        key = (loaded.name, loaded.version)
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) > 1024:  # versions come and go under --poll: stay bounded
                self._templates.clear()
            output = pb.ModelInferResponse.InferOutputTensor(
                name=OUTPUT_NAME, datatype="FP32", shape=[1, NUM_CLASSES]
            )
            template = pb.ModelInferResponse(
                model_name=loaded.name, model_version=str(loaded.version), outputs=[output]
            )
            self._templates[key] = template
        return template
