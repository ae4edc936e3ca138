"""Inference requests and responses of the Open Inference Protocol's REST binding, both sides.

A body is a JSON header, optionally followed by binary tensor data (Triton's binary-tensor extension, what
tritonclient.http sends by default): the `Inference-Header-Content-Length` HTTP header gives the JSON's
length, and each tensor whose `parameters.binary_data_size` is set takes that many bytes of the rest, in
order. Without the header the whole body is JSON and tensors carry `data` (flat or nested, row-major).

The server turns a request into the ModelInferRequest the gRPC servicer answers (binary data as it came,
JSON numbers as the raw bytes of their datatype), so both protocols share one validation
(serving.kserve.decode_tensor) and one inference path; only what is particular to JSON is checked here. The
client half (encode_request, decode_response) is what load generators and tests send and read. No web
framework is imported. JSON is read and written with orjson: a 32-image request's 25,088 numbers parse in
about a quarter of the standard library's time (benchmarks/serving.md, HTTP).
"""

import json
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
import orjson

from serving.contract import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from serving.errors import RequestError
from serving.proto.inference import grpc_service_pb2 as pb

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_DIMENSION = 2**62  # shapes are int64 on the wire; anything near that is refused by decode_tensor anyway


class InferOptions:
    """What an HTTP request asks beyond the tensors: which outputs come as binary data (each output's
    `binary_data`, else the request's `binary_data_output`), and its deadline (Triton's `timeout`
    parameter, in microseconds; 0 or absent: none)."""

    __slots__ = ("binary_default", "binary_outputs", "timeout_seconds")

    def __init__(self, binary_default: bool, binary_outputs: dict[str, bool], timeout_seconds: float | None):
        self.binary_default = binary_default
        self.binary_outputs = binary_outputs
        self.timeout_seconds = timeout_seconds

    def binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_default)


def invalid(message: str) -> RequestError:
    return RequestError(INVALID, message)


def parse_json(data: bytes | memoryview, what: str = "request body") -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:  # also bad UTF-8, integers past 64 bits, nesting past 1,024 levels
        raise invalid(f"{what} is not valid JSON: {str(e)[:200]}") from None


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON header (parsed) and the binary part that follows it."""
    view = memoryview(body)
    if header_length is None:
        return parse_json(view), view[len(view) :]
    if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
        raise invalid(
            f"{HEADER_LENGTH} is {header_length[:40]!r}: expected the JSON header's length in bytes, "
            f"1..{len(body)} (the body's length)"
        )
    n = int(header_length)
    return parse_json(view[:n], "the JSON header"), view[n:]


JSON_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a string"}


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise invalid(f"{what} must be {JSON_KINDS[kind]}, got {type(value).__name__}")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{what} must be true or false, got {json.dumps(value)[:40]}")
    return value


def _whole(value: Any, what: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise invalid(f"{what} must be an integer within 0..{high}, got {json.dumps(value)[:40]}")
    return value


def _json_bytes(datatype: str, data: Any, what: str) -> bytes | None:
    """A tensor's JSON numbers as the raw little-endian bytes of its datatype (UINT8 or FP32; None for
    another datatype, which decode_tensor refuses along with counts and FP32 ranges). Raw bytes, not typed
    protobuf contents: a request waiting in the queue holds a quarter of the memory."""
    if datatype == "UINT8" and type(data) is list:
        # The common case, a flat list of pixels (what tritonclient and mnist-bench send): bytes() reads it
        # in C, refusing anything but integers within 0..255, in a quarter of NumPy's time. JSON true and
        # false pass as 1 and 0, so a tensor of those alone goes the general way, which refuses it.
        try:
            raw = bytes(data)
        except (TypeError, ValueError):
            pass  # nested, or not all pixel values: the general way says which
        else:
            if raw.strip(b"\x00\x01") or not any(type(v) is bool for v in data):
                return raw
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise invalid(f"{what}.data must be an array of numbers, nested evenly") from None
    if values.dtype.kind not in "iuf":
        raise invalid(f"{what}.data must hold numbers only")
    if datatype == "UINT8":
        if values.dtype.kind == "f" or (values.size and not 0 <= values.min() <= values.max() <= 255):
            raise invalid(f"{what}.data: UINT8 values must be integers within 0..255")
        return values.astype(np.uint8).tobytes()
    return values.astype("<f4").tobytes() if datatype == "FP32" else None


def infer_request(
    model: str, version: str, header: Any, binary: memoryview
) -> tuple[pb.ModelInferRequest, InferOptions]:
    """The ModelInferRequest an HTTP request stands for; RequestError(INVALID_ARGUMENT) says what is wrong."""
    header = _expect(header, dict, "the request")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in header:
        request.id = _expect(header["id"], str, "id")
    parameters = _expect(header.get("parameters", {}), dict, "parameters")
    timeout_us = _whole(parameters.get("timeout", 0), "parameters.timeout (microseconds)", 86_400 * 10**6)
    binary_default = _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    inputs = _expect(header.get("inputs"), list, "inputs")
    offset = 0
    for i, given in enumerate(inputs):
        what = f"inputs[{i}]"
        given = _expect(given, dict, what)
        shape = _expect(given.get("shape"), list, f"{what}.shape")
        tensor = request.inputs.add(
            name=_expect(given.get("name"), str, f"{what}.name"),
            datatype=_expect(given.get("datatype"), str, f"{what}.datatype"),
            shape=[_whole(d, f"{what}.shape[{j}]", MAX_DIMENSION) for j, d in enumerate(shape)],
        )
        tensor_parameters = _expect(given.get("parameters", {}), dict, f"{what}.parameters")
        if "binary_data_size" in tensor_parameters:
            size = _whole(tensor_parameters["binary_data_size"], f"{what}.parameters.binary_data_size",
                          len(binary))  # fmt: skip
            if "data" in given:
                raise invalid(f"{what} has both data and parameters.binary_data_size: send one")
            if offset + size > len(binary):
                raise invalid(f"{what}.parameters.binary_data_size is {size}: past the binary data's end")
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        elif "data" in given:
            raw = _json_bytes(tensor.datatype, given["data"], what)
            if raw is not None:
                request.raw_input_contents.append(raw)
        else:
            raise invalid(f"{what} has no data: set data, or parameters.binary_data_size with binary data")
    if offset != len(binary):
        raise invalid(f"{len(binary)} bytes of binary data, but the inputs' binary_data_size sum to {offset}")
    binary_outputs = {}
    for i, given in enumerate(_expect(header.get("outputs", []), list, "outputs")):
        what = f"outputs[{i}]"
        given = _expect(given, dict, what)
        name = _expect(given.get("name"), str, f"{what}.name")
        output_parameters = _expect(given.get("parameters", {}), dict, f"{what}.parameters")
        if "classification" in output_parameters:
            raise invalid("the classification extension is not supported: POST /v1/models/{name}/classify")
        request.outputs.add(name=name)
        if "binary_data" in output_parameters:
            binary_outputs[name] = _flag(output_parameters["binary_data"], f"{what}.parameters.binary_data")
    timeout = timeout_us / 1e6 if timeout_us else None
    return request, InferOptions(binary_default, binary_outputs, timeout)


def declared_images(request: pb.ModelInferRequest) -> int:
    """N of a [N,1,28,28] input as declared (0 for any other request, which decode_tensor refuses): checked
    against the limit before anything else reads the tensor."""
    if len(request.inputs) != 1 or len(shape := request.inputs[0].shape) != 1 + len(IMAGE_SHAPE):
        return 0
    return shape[0] if tuple(shape[1:]) == IMAGE_SHAPE else 0


def infer_response(response: pb.ModelInferResponse, options: InferOptions) -> tuple[bytes, int | None]:
    """The HTTP body for a ModelInferResponse, and the JSON header's length when binary data follows."""
    outputs, binary = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if options.binary(output.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, "<f4").tolist()  # each float32 exactly, as a JSON number
        outputs.append(entry)
    header = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    text = orjson.dumps(header)
    if not binary:
        return text, None
    return b"".join([text, *binary]), len(text)


# -- the client's half --------------------------------------------------------------------------------------
def encode_request(
    images: np.ndarray,
    *,
    binary: bool = True,
    binary_output: bool = True,
    request_id: str = "",
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer request for uint8 images [N,1,28,28] (binary: as tritonclient.http
    sends them); `parameters` are the request's, e.g. {"timeout": microseconds}."""
    images = np.ascontiguousarray(images, np.uint8)
    tensor: dict[str, Any] = {"name": INPUT_NAME, "shape": list(images.shape), "datatype": "UINT8"}
    if binary:
        tensor["parameters"] = {"binary_data_size": images.nbytes}
    else:
        tensor["data"] = images.ravel()
    header: dict[str, Any] = {
        "inputs": [tensor],
        "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": binary_output}}],
    }
    if request_id:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    text = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return text, {"Content-Type": JSON_TYPE}
    return text + images.tobytes(), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(text))}


def decode_response(body: bytes, headers: Mapping[str, str]) -> np.ndarray:
    """The probabilities [N,10] of an infer response body, binary or JSON."""
    return decode_reply(body, headers.get(HEADER_LENGTH))[0]


def decode_reply(body: bytes, header_length: str | None) -> tuple[np.ndarray, str]:
    """(probabilities [N,10], the response's id or "") of an infer response body and the value of its
    Inference-Header-Content-Length header (None: all JSON)."""
    header, binary = split_body(body, header_length)
    (output,) = (o for o in header["outputs"] if o["name"] == OUTPUT_NAME)
    shape = output["shape"]
    if "data" in output:
        probabilities = np.asarray(output["data"], np.float32)
    else:
        probabilities = np.frombuffer(binary[: output["parameters"]["binary_data_size"]], "<f4")
    return probabilities.reshape(shape), header.get("id", "")
