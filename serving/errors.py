"""The one exception type the serving pipeline raises for a request it cannot answer.

Every stage (repository lookup, validation, image decoding, the batcher) raises RequestError with the
gRPC status the client should see; the servicers turn it into that status (reject), or into a stream error.
"""

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def reject(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    """End the call with `error`'s status; the handler then returns None.

    Not context.abort(): the exception it raises ties the request message into a reference cycle
    (grpc.aio's call state and the traceback) that only the cyclic garbage collector frees, and that
    runs by object count, not bytes, so refused large requests piled up in memory.
    """
    context.set_code(error.code)
    context.set_details(error.message)


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (ONNX Runtime's run to dozens of lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
