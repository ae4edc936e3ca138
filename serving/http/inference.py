"""The Open Inference Protocol's REST binding (KServe v2, with Triton's extensions that tritonclient.http
uses): health, metadata, config, statistics, inference and the model repository, answered by the same
repository, control and KServe servicer as gRPC.

    GET  /v2                                           server metadata
    GET  /v2/health/live | /v2/health/ready            200, or 400 when not ready (open without a token)
    GET  /v2/models/{name}[/versions/{v}]              model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready        200, or 400
    GET  /v2/models/{name}[/versions/{v}]/config       config.pbtxt as JSON
    GET  /v2/models[/{name}[/versions/{v}]]/stats      Triton's statistics extension
    POST /v2/models/{name}[/versions/{v}]/infer        JSON tensors, or the binary-tensor extension
    POST /v2/repository/index                          {"ready": bool} optional
    POST /v2/repository/models/{name}/load | unload
"""

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from serving.contract import IMAGE_SHAPE, INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from serving.errors import RequestError
from serving.http.limits import by_deadline, read_body
from serving.http.status import PayloadTooLarge, failure
from serving.http.tensors import (
    BINARY_TYPE,
    HEADER_LENGTH,
    JSON_TYPE,
    declared_images,
    infer_request,
    infer_response,
    invalid,
    parse_json,
    split_body,
)
from serving.kserve import KServeServicer
from serving.rpc import Handling
from serving.statistics import to_proto

NOT_READY = 400  # the protocol: 200 means true, a 4xx false; Triton answers 400
Limits = tuple[int, int, float]  # body bytes, images per request, read timeout (s)
INT64_TYPES = {
    descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status)


def message_json(message: Message) -> dict:
    """A protobuf message as JSON with its field names, 64-bit integers as numbers (as Triton answers;
    protobuf's own mapping writes them as strings)."""
    return _numbers(
        json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        ),
        message.DESCRIPTOR,
    )


def _numbers(value: dict, kind: descriptor.Descriptor) -> dict:
    for name, item in value.items():
        field = kind.fields_by_name.get(name)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for entry in item.values():
                    _numbers(entry, value_field.message_type)
        elif field.message_type is not None:
            for entry in item if isinstance(item, list) else [item]:
                _numbers(entry, field.message_type)
        elif field.type in INT64_TYPES:
            value[name] = [int(v) for v in item] if isinstance(item, list) else int(item)
    return value


class InferenceApi:
    """The routes, on the gRPC servicer's repository and control; `ready` is the front end's readiness."""

    def __init__(
        self, kserve: KServeServicer, handling: Handling, limits: Limits, ready: Callable[[], bool]
    ) -> None:
        self.kserve = kserve
        self.handling = handling
        self.repository = kserve.repository
        self.control = kserve.control
        self.max_body_bytes, self.max_images, self.read_timeout = limits
        self.ready = ready

    def routes(self) -> list[web.RouteDef]:
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        return [
            web.get("/v2", self.server_metadata),
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.server_ready),
            web.get("/v2/models/stats", self.statistics),  # before {name}: "stats" is no model here
            *(web.get(base, self.metadata) for base in (model, version)),
            *(web.get(base + "/ready", self.model_ready) for base in (model, version)),
            *(web.get(base + "/config", self.config) for base in (model, version)),
            *(web.get(base + "/stats", self.statistics) for base in (model, version)),
            *(web.post(base + "/infer", self.infer) for base in (model, version)),
            web.post("/v2/repository/index", self.repository_index),
            web.post("/v2/repository/models/{name}/load", self.load),
            web.post("/v2/repository/models/{name}/unload", self.unload),
        ]

    # -- health and metadata ------------------------------------------------------------------------------
    async def server_metadata(self, request: web.Request) -> web.Response:
        k = self.kserve
        return json_response({"name": "mnist-serve", "version": k.version, "extensions": k.extensions})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response()  # this process answers: it is live

    async def server_ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready() else NOT_READY)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        ready = self.ready() and self.repository.find(name, version) is not None
        return web.Response(status=200 if ready else NOT_READY)

    async def metadata(self, request: web.Request) -> web.Response:
        try:
            loaded = self.repository.get(*_model(request))
        except RequestError as e:
            return failure(e)
        return json_response(
            {
                "name": loaded.name,
                "versions": [str(v) for v in self.repository.versions(loaded.name)],
                "platform": loaded.config.platform or "onnxruntime_onnx",
                "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *IMAGE_SHAPE]}],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
            }
        )

    async def config(self, request: web.Request) -> web.Response:
        try:
            loaded = self.repository.get(*_model(request))
        except RequestError as e:
            return failure(e)
        return json_response(message_json(loaded.config))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            if name:
                self.repository.get(name, version)  # NOT_FOUND unless it is served
            rows = await self.control.statistics(name, version)
        except RequestError as e:
            return failure(e)
        return json_response({"model_stats": [message_json(to_proto(*row)) for row in rows]})

    # -- inference ----------------------------------------------------------------------------------------
    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        outcome = await self.handling.run(name, version, self._infer(request, name, version))
        if isinstance(outcome, RequestError):
            return failure(outcome)
        return outcome

    async def _infer(self, request: web.Request, name: str, version: str) -> web.Response:
        self.repository.get(name, version)  # an unknown model is told so before its body is read
        body = await read_body(request, self.max_body_bytes, self.read_timeout)
        header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        message, options = infer_request(name, version, header, binary)
        if declared_images(message) > self.max_images:
            raise PayloadTooLarge(
                f"{declared_images(message)} images in one request, above the limit of {self.max_images}"
            )
        timeout = options.timeout_seconds
        deadline = None if timeout is None else time.monotonic() + timeout
        answer = await by_deadline(timeout, self.kserve.infer(message, deadline))
        content, header_length = infer_response(answer, options)
        if header_length is None:
            return web.Response(body=content, content_type=JSON_TYPE)
        return web.Response(
            body=content, content_type=BINARY_TYPE, headers={HEADER_LENGTH: str(header_length)}
        )

    # -- the model repository -----------------------------------------------------------------------------
    async def repository_index(self, request: web.Request) -> web.Response:
        try:
            options = await self._options(request)
        except RequestError as e:
            return failure(e)
        ready_only = options.get("ready", False) is True
        entries = await self.repository.index()
        return json_response(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in entries
                if e.state == "READY" or not ready_only
            ]
        )

    async def load(self, request: web.Request) -> web.Response:
        try:
            parameters = (await self._options(request)).get("parameters", {})
            if not isinstance(parameters, dict):
                raise invalid("parameters must be a JSON object")
            if "config" in parameters or any(key.startswith("file:") for key in parameters):
                raise invalid(
                    "loading with an overriding config or files is not supported: publish the model in the "
                    "repository, then load it by name"
                )
            await self.control.load(request.match_info["name"])
        except RequestError as e:
            return failure(e)
        return json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        try:
            await self._options(request)
            await self.control.unload(request.match_info["name"])
        except RequestError as e:
            return failure(e)
        return json_response({})

    async def _options(self, request: web.Request) -> dict:
        """The optional JSON object of a repository request (an empty body is an empty object)."""
        body = await read_body(request, self.max_body_bytes, self.read_timeout)
        if not body.strip():
            return {}
        options = parse_json(body)
        if not isinstance(options, dict):
            raise invalid("request body must be a JSON object")
        return options


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("name", ""), request.match_info.get("version", "")
