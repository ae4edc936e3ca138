"""TLS / mutual TLS credentials and bearer-token authentication.

With --auth-token-file every RPC except grpc.health.v1 needs `authorization: Bearer <token>` metadata;
the token is compared in constant time (hmac.compare_digest). Health stays open so load balancers and
orchestrators can probe without the secret.
"""

import hmac
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class SecurityConfigError(Exception):
    """A certificate, key or token file that cannot be used (message names the file)."""


def read_secret(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"cannot read {what} {path}: {e.strerror}") from e
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


def read_token(path: Path) -> str:
    return read_secret(path, "token file").decode().strip()


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS with cert/key; with client_ca, clients must present a certificate signed by it (mTLS)."""
    pair = (read_secret(key, "TLS key"), read_secret(cert, "TLS certificate"))
    ca = read_secret(client_ca, "client CA") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client side: trust `ca` (None = system roots); cert+key for mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_secret(ca, "TLS CA") if ca else None,
        private_key=read_secret(key, "TLS key") if key else None,
        certificate_chain=read_secret(cert, "TLS certificate") if cert else None,
    )


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading the request."""

    async def unary(request, context):
        # set_code, not context.abort(): an abort keeps the (unauthenticated!) request in a reference
        # cycle until the next full garbage collection (see serving.errors.reject)
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details("missing or invalid 'authorization: Bearer <token>'")

    async def streaming(request, context):
        await unary(request, context)
        return
        yield  # pragma: no cover - makes this an async generator, as grpc expects for streaming responses

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return handler
                break
        return _deny(handler)
