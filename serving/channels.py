"""How the project's clients connect: any gRPC target, balanced and retried, over several connections.

Targets: `host:port`, `dns:///name:port` (e.g. a Kubernetes headless Service: every pod address), or
`ipv4:a:port,b:port`. Every channel uses gRPC's `round_robin` policy over the addresses the target resolves
to, and retries, a bounded number of times with exponential back-off, the calls a replica going away never
answered (inference is idempotent): UNAVAILABLE, and CANCELLED, which gRPC answers for calls it received
during shutdown but never handed to the server. The service config below is the one docs/deploy.md shows
for tritonclient and plain grpc users too.

A server started with --workers N shares its port between N processes, and the kernel hands each TCP
connection to one of them; so a client opens several channels, each with its own connections
(`grpc.use_local_subchannel_pool`), and spreads its calls over them.
"""

import json

import grpc

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}, {"service": "mnist.v1.Classifier"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the server's default --max-message-bytes too
DEFAULT_CONNECTIONS = 16  # per client: enough that a server's workers all get a share (docs/serving.md)


def channel_options(max_message_bytes: int, server_name: str | None = None) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.use_local_subchannel_pool", 1),  # this channel's own connections, not shared ones
        # A connection that broke (its process stopped) is tried again soon: the kernel hands the new one
        # to a process that still listens. gRPC's default first back-off is a whole second.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def open_channel(
    target: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    options = channel_options(max_message_bytes, server_name)
    if credentials is None:
        return grpc.insecure_channel(target, options)
    return grpc.secure_channel(target, credentials, options)


def open_aio_channel(
    target: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    options = channel_options(max_message_bytes, server_name)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
