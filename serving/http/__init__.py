"""The HTTP/REST front end of mnist-serve, beside gRPC in the same processes: the Open Inference Protocol's
REST binding (with Triton's binary-tensor extension), the /v1 image classification endpoint and the drawing
page. It translates HTTP to the requests the gRPC servicers answer and back; the repository, batchers,
limits and metrics are the server's own (docs/serving.md, "HTTP/REST").

Importing the package costs nothing: serving.http.tensors (the request and response codec, which clients
use too) needs no web framework; serving.http.frontend brings aiohttp.
"""
