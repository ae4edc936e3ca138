"""Where and how the load generator connects: the targets, how many connections to each, TLS and the
bearer token, for gRPC channels and for HTTP connections alike."""

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.channels import open_aio_channel


@dataclass(frozen=True)
class Connection:
    """Targets, each over `connections` channels (gRPC) or connection pools (HTTP): calls go round-robin
    over all of them (serving.channels); optional TLS and bearer token. The files are read already, so that
    the value can go to the generator processes."""

    targets: tuple[str, ...]
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None
    token: str | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    connections: int = 1
    tls: bool = False  # TLS without root_certificates trusts the system's CAs

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.root_certificates is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel(self, target: str) -> grpc.aio.Channel:
        return open_aio_channel(
            target, self.max_message_bytes, self.credentials(), self.server_name, retries=False
        )

    def channels(self) -> list[grpc.aio.Channel]:
        return [self.channel(t) for t in self.targets for _ in range(self.connections)]

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same TLS settings for HTTPS (None: plain HTTP)."""
        if not self.uses_tls:
            return None
        ca = self.root_certificates.decode() if self.root_certificates is not None else None
        context = ssl.create_default_context(cadata=ca)
        if self.certificate_chain is not None and self.private_key is not None:
            with tempfile.TemporaryDirectory() as folder:  # ssl reads a key pair from files only
                cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
                cert.write_bytes(self.certificate_chain)
                key.write_bytes(self.private_key)
                context.load_cert_chain(cert, key)
        return context
