"""The HTTP front end's settings: fields of ServerConfig (nested, like the runtime options), so that each is
a flag of mnist-serve with its default and range written once. Listen address, TLS, the token and the size
limits are the gRPC ones: one server, two front ends."""

from dataclasses import dataclass, field

from serving.commandline import flag, require, within

MAX_PORT = 65535
OFF = -1


@dataclass(frozen=True)
class HttpOptions:
    http_port: int = field(
        default=8000,
        metadata=flag(
            "HTTP/REST port: the Open Inference Protocol's REST binding, /v1 classify and the drawing page "
            "at / (0 = any free port, -1 = off)"
        ),
    )
    http_read_timeout_seconds: float = field(
        default=30.0,
        metadata=flag(
            "seconds an HTTP client may take to send one request body; a slower one gets 408 and its "
            "connection is closed",
            name="--http-read-timeout",
            metavar="SECONDS",
        ),
    )

    def __post_init__(self) -> None:
        c = type(self)
        port = self.http_port
        require(within(port, OFF, MAX_PORT), c, "http_port", f"within {OFF}..{MAX_PORT}", port)
        require(within(self.http_read_timeout_seconds, 0.1, 3600), c, "http_read_timeout_seconds",
                "within 0.1..3600", self.http_read_timeout_seconds)  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.http_port != OFF
