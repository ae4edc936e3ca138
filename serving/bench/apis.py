"""The two served APIs as the load generator sees them: a method path, pre-serialized requests, and a
decoder that turns a raw response back into probabilities so every answer can be checked. Over gRPC here;
over HTTP in serving.bench.rest.

Requests are serialized once, before the run: the hot loop only sends bytes and keeps the reply bytes.
"""

from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from serving.bench import rest
from serving.contract import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from serving.errors import RequestError
from serving.proto.inference import grpc_service_pb2 as kserve_pb2
from serving.proto.mnist.v1 import classify_pb2

METHODS = {
    ("kserve", False): "/inference.GRPCInferenceService/ModelInfer",
    ("kserve", True): "/inference.GRPCInferenceService/ModelStreamInfer",
    ("classify", False): "/mnist.v1.Classifier/Classify",
    ("classify", True): "/mnist.v1.Classifier/ClassifyStream",
}
API_NAMES = ("kserve", "classify")


class BadResponse(Exception):
    """A reply that arrived with gRPC status OK but is not a valid answer; args[0] is the status to count."""


class InBandError(BadResponse):
    """A stream's reply that carries the server's error for that request; args[0] is its status name."""


@dataclass(frozen=True)
class Workload:
    """Pre-built requests: requests[i] carries the digits labels[i] (images_per_request of them). Over gRPC
    `method` is the RPC's path and a request its serialized message; over HTTP (serving.bench.rest), the
    endpoint's path and a request its body and headers."""

    method: str
    stream: bool
    api: str
    requests: tuple
    labels: tuple[np.ndarray, ...]
    protocol: str = "grpc"


def build_workload(
    api: str,
    stream: bool,
    model: str,
    version: str,
    images: np.ndarray,
    labels: np.ndarray,
    images_per_request: int,
    pool_size: int = 512,
    *,
    protocol: str = "grpc",
    http_tensors: str = "binary",
    timeout_s: float | None = None,
) -> Workload:
    """Cut `images` (uint8 [N,28,28]) into `pool_size` requests of consecutive digits, wrapping around. Over
    HTTP each request carries `timeout_s` as its deadline, and KServe tensors are `http_tensors` (binary or
    json)."""
    count = len(images)
    batches, request_labels = [], []
    for r in range(pool_size):
        idx = (np.arange(images_per_request) + r * images_per_request) % count
        batches.append(np.ascontiguousarray(images[idx], dtype=np.uint8))
        request_labels.append(labels[idx].astype(np.int64))
    if protocol == "http":
        method = rest.path(api, model, version, timeout_s)
        requests = rest.build_requests(api, batches, http_tensors, timeout_s)
    else:
        method = METHODS[(api, stream)]
        build = _kserve_request if api == "kserve" else _classify_request
        requests = [build(model, version, batch, f"{r}") for r, batch in enumerate(batches)]
    return Workload(method, stream, api, tuple(requests), tuple(request_labels), protocol)


def _kserve_request(model: str, version: str, batch: np.ndarray, rid: str) -> bytes:
    tensor = kserve_pb2.ModelInferRequest.InferInputTensor(
        name=INPUT_NAME, datatype="UINT8", shape=[len(batch), *IMAGE_SHAPE]
    )
    request = kserve_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        id=rid,
        inputs=[tensor],
        outputs=[kserve_pb2.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_NAME)],
        raw_input_contents=[batch.tobytes()],
    )
    return request.SerializeToString()


def _classify_request(model: str, version: str, batch: np.ndarray, rid: str) -> bytes:
    images = [classify_pb2.Image(pixels=image.tobytes()) for image in batch]
    return classify_pb2.ClassifyRequest(
        model=model, version=version, images=images, top_k=1, id=rid
    ).SerializeToString()


def decode(workload: Workload, reply) -> tuple[np.ndarray, str]:
    """(probabilities float32 [n,10], reply id) from a raw reply; BadResponse for errors and garbage."""
    try:
        if workload.protocol == "http":
            return rest.decode(workload.api, reply)
        return _decode(workload.api, workload.stream, reply)
    except (DecodeError, ValueError, KeyError, TypeError, RequestError) as error:
        raise BadResponse("UNDECODABLE_RESPONSE") from error


def _decode(api: str, stream: bool, reply: bytes) -> tuple[np.ndarray, str]:
    if api == "kserve":
        if stream:
            wrapped = kserve_pb2.ModelStreamInferResponse.FromString(reply)
            if wrapped.error_message:
                raise InBandError(_kserve_stream_status(wrapped.error_message))
            response = wrapped.infer_response
        else:
            response = kserve_pb2.ModelInferResponse.FromString(reply)
        if response.raw_output_contents:
            probabilities = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
            return probabilities.reshape(-1, 10), response.id
        if response.outputs and response.outputs[0].contents.fp32_contents:
            probabilities = np.asarray(response.outputs[0].contents.fp32_contents, dtype=np.float32)
            return probabilities.reshape(-1, 10), response.id
        raise BadResponse("EMPTY_RESPONSE")
    if stream:
        wrapped = classify_pb2.ClassifyStreamResponse.FromString(reply)
        if wrapped.WhichOneof("result") == "error":
            raise InBandError(_code_name(wrapped.error.code))
        response = wrapped.response
    else:
        response = classify_pb2.ClassifyResponse.FromString(reply)
    if not response.predictions:
        raise BadResponse("EMPTY_RESPONSE")
    probabilities = np.asarray([p.probabilities for p in response.predictions], dtype=np.float32)
    return probabilities.reshape(-1, 10), response.id


def check(probabilities: np.ndarray, labels: np.ndarray) -> int:
    """Number of correct predictions; raises BadResponse unless each row is 10 probabilities summing to 1."""
    if probabilities.shape != (len(labels), 10):
        raise BadResponse("WRONG_SHAPE")
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0:
        raise BadResponse("NOT_PROBABILITIES")
    if np.abs(probabilities.sum(axis=1) - 1.0).max() > 1e-3:
        raise BadResponse("NOT_PROBABILITIES")
    return int((probabilities.argmax(axis=1) == labels).sum())


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return f"CODE_{code}"


def _kserve_stream_status(message: str) -> str:
    # KServe streams report failures as text only; count them under the status name the server put
    # first in the message when it did (e.g. "NOT_FOUND: unknown model"), else as STREAM_ERROR.
    head = message.split(":", 1)[0].strip()
    return head if head in grpc.StatusCode.__members__ else "STREAM_ERROR"
