"""POST /v1/models/{name}[/versions/{v}]/classify: images in (one PNG/JPEG/... as the body, or several as
multipart/form-data), digits out as JSON. The request becomes the mnist.v1 ClassifyRequest that the gRPC
servicer answers, so decoding (serving.images), limits and batching are the same.

    curl --data-binary @seven.png 'localhost:8000/v1/models/mnist/classify?top_k=3'
    curl -F a=@seven.png -F b=@two.jpg localhost:8000/v1/models/mnist/classify

Query parameters: top_k (1..10, default 3), timeout_ms (the request's deadline; default none).
"""

import time

from aiohttp import web

from serving.classify import ClassifierServicer
from serving.config import ServerConfig
from serving.contract import NUM_CLASSES
from serving.errors import RequestError
from serving.http.limits import by_deadline, read_images
from serving.http.status import failure
from serving.http.tensors import invalid
from serving.proto.mnist.v1 import classify_pb2 as pb
from serving.rpc import Handling

DEFAULT_TOP_K = 3


class ClassifyApi:
    def __init__(
        self, classifier: ClassifierServicer, handling: Handling, limits: ServerConfig, read_timeout: float
    ) -> None:
        self.classifier = classifier
        self.handling = handling
        self.limits = limits
        self.read_timeout = read_timeout

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(path, self.classify)
            for path in ("/v1/models/{name}/classify", "/v1/models/{name}/versions/{version}/classify")
        ]

    async def classify(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        outcome = await self.handling.run(name, version, self._classify(request, name, version))
        if isinstance(outcome, RequestError):
            return failure(outcome)
        return outcome

    async def _classify(self, request: web.Request, name: str, version: str) -> web.Response:
        top_k = _query_int(request, "top_k", DEFAULT_TOP_K, 1, NUM_CLASSES)
        timeout_ms = _query_int(request, "timeout_ms", 0, 0, 86_400_000)
        self.classifier.repository.get(name, version)  # an unknown model is told so before its body is read
        limits = self.limits
        images = await read_images(
            request, limits.max_image_bytes, limits.max_images_per_request, self.read_timeout
        )
        if not any(data for _, data in images):
            raise invalid("no image in the request body: send a PNG or JPEG, or multipart/form-data files")
        message = pb.ClassifyRequest(
            model=name, version=version, top_k=top_k, images=[pb.Image(encoded=data) for _, data in images]
        )
        timeout = timeout_ms / 1000 if timeout_ms else None
        deadline = None if timeout is None else time.monotonic() + timeout
        answer = await by_deadline(timeout, self.classifier.classify(message, deadline))
        predictions = []
        for (file, _), p in zip(images, answer.predictions, strict=True):
            prediction = {"file": file} if file else {}
            prediction |= {
                "label": p.label,
                "confidence": p.confidence,
                "top_k": [{"label": t.label, "probability": t.probability} for t in p.top_k],
                "probabilities": list(p.probabilities),
            }
            predictions.append(prediction)
        response = web.json_response(
            {
                "model": answer.model,
                "version": answer.version,
                "predictions": predictions,
                "queue_time_us": answer.queue_time_us,
                "compute_time_us": answer.compute_time_us,
            }
        )
        queue_ms, compute_ms = answer.queue_time_us / 1000, answer.compute_time_us / 1000
        response.headers["Server-Timing"] = f"queue;dur={queue_ms:.3f}, compute;dur={compute_ms:.3f}"
        return response


def _query_int(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise invalid(f"query parameter {key} is {text[:20]!r}: expected an integer within {low}..{high}")
    return int(text)
