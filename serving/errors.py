"""The one exception type the serving pipeline raises for a request it cannot answer.

Every stage (repository lookup, validation, image decoding, the batcher) raises RequestError with the
gRPC status the client should see; the servicers turn it into that status, or into a stream error.
"""

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
