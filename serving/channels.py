"""How the project's clients connect: any gRPC target, balanced, over several connections, with one
throttled retry policy.

Targets: `host:port`, `dns:///name:port` (e.g. a Kubernetes headless Service: every pod address), or
`ipv4:a:port,b:port`. Every channel uses gRPC's `round_robin` policy over the addresses the target resolves
to.

Retries are gRPC's own (its service config, so other clients can use exactly the same: docs/deploy.md):
a call that fails with UNAVAILABLE (a connection that broke or never came up, a process going away) is sent
again, at most twice, after a jittered exponential back-off. Nothing else is resent: RESOURCE_EXHAUSTED says
the server is full, and resending would only add to its load; DEADLINE_EXCEEDED has no time left; CANCELLED
cannot be told apart from a call cancelled while a model computed it, and gRPC core also answers it to the
calls it refuses under overload (--max-pending-rpcs). Retries are throttled by a token bucket per channel
(`retryThrottling`): every failed attempt takes a token, every success gives back a tenth of one, and while
half the bucket is gone the channel sends every call once, so a failing server receives fewer calls, not
more. A request larger than gRPC's retry buffer (256 KiB) is never resent.

A server started with --workers N shares its port between N processes, and the kernel hands each TCP
connection to one of them; so a client opens several channels, each with its own connections
(`grpc.use_local_subchannel_pool`), and spreads its calls over them.
"""

import json
from dataclasses import dataclass

import grpc

SERVICES = ("inference.GRPCInferenceService", "mnist.v1.Classifier")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retryPolicy and retryThrottling (gRFC A6) as one value: what the clients' channels do, and
    what `mnist-bench --retries` does in the open, attempt by attempt."""

    max_attempts: int = 3  # the first send and at most two resends
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2
    retryable: tuple[str, ...] = ("UNAVAILABLE",)
    max_tokens: int = 10  # retryThrottling: no retries while tokens <= max_tokens / 2
    token_ratio: float = 0.1  # tokens a success gives back (a failed attempt takes 1)

    def backoff_s(self, retry: int) -> float:
        """The upper bound of the random delay before resend number `retry` (1 for the first resend)."""
        return min(self.initial_backoff_s * self.backoff_multiplier ** (retry - 1), self.max_backoff_s)

    def service_config(self) -> dict:
        return {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": service} for service in SERVICES],
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": f"{self.initial_backoff_s:g}s",
                        "maxBackoff": f"{self.max_backoff_s:g}s",
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": list(self.retryable),
                    },
                }
            ],
            "retryThrottling": {"maxTokens": self.max_tokens, "tokenRatio": self.token_ratio},
        }


RETRY_POLICY = RetryPolicy()
SERVICE_CONFIG = RETRY_POLICY.service_config()  # docs/deploy.md shows exactly this
NO_RETRY_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}]}  # a measuring tool sends each call once
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the server's default --max-message-bytes too
DEFAULT_CONNECTIONS = 16  # per client: enough that a server's workers all get a share (docs/serving.md)


def channel_options(
    max_message_bytes: int, server_name: str | None = None, retries: bool = True
) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG if retries else NO_RETRY_CONFIG)),
        ("grpc.enable_retries", int(retries)),
        ("grpc.use_local_subchannel_pool", 1),  # this channel's own connections, not shared ones
        # A connection that broke (its process stopped) is tried again soon: the kernel hands the new one
        # to a process that still listens. gRPC's default first back-off is a whole second, and a channel
        # fails its calls at once while it waits: a resend must not fall into that window.
        ("grpc.initial_reconnect_backoff_ms", 20),
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
    retries: bool = True,
) -> grpc.Channel:
    options = channel_options(max_message_bytes, server_name, retries)
    if credentials is None:
        return grpc.insecure_channel(target, options)
    return grpc.secure_channel(target, credentials, options)


def open_aio_channel(
    target: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    retries: bool = True,
) -> grpc.aio.Channel:
    options = channel_options(max_message_bytes, server_name, retries)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
