"""What a server allows: its address, its token, its limits; and the rule that an exposed host needs a token."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from captioner.errors import ConfigError

MB = 2**20


@dataclass(frozen=True)
class ServeSettings:
    """The server's address, access rule and limits; validated when built."""

    host: str = "127.0.0.1"  # loopback: only this machine can connect unless the user asks for more
    port: int = 8000
    token: str | None = None  # every /v1 request must carry it as `Authorization: Bearer ...` when set
    no_auth: bool = False  # an explicit choice to expose the API with no token (e.g. behind an authenticating proxy)
    cors: tuple[str, ...] = ()  # origins whose pages may call the API; none: only the server's own page
    max_upload_bytes: int = 20 * MB  # one request's body: a larger one is refused (413) before any decoding
    max_images: int = 32  # files in one request: a bound on the work one request can ask for
    max_batch: int = 32  # images the model captions at once: `captioner caption`'s default batch
    batch_wait_ms: float = 5.0  # how long a batch waits for requests still opening their images
    queue_limit: int = 256  # images accepted and not yet captioned; beyond it 503 with Retry-After
    timeout_s: float = 60.0  # a request still unanswered after this gets 503, so no client hangs on a stuck queue
    decode_threads: int = 4  # threads opening uploads: Pillow releases the GIL while it decodes

    def __post_init__(self) -> None:
        positive = dict(max_upload_bytes=self.max_upload_bytes, max_images=self.max_images,
                        max_batch=self.max_batch, queue_limit=self.queue_limit, timeout_s=self.timeout_s,
                        decode_threads=self.decode_threads)
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token is empty: give a secret, or leave it out on 127.0.0.1")
        if self.token and self.no_auth:
            raise ConfigError("--token and --no-auth contradict each other: give one")
        if not is_loopback(self.host) and not self.token and not self.no_auth:
            raise ConfigError(f"--host {self.host} can be reached from other machines: give --token (or set "
                              "CAPTIONER_TOKEN), or --no-auth to serve without one")


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve to any interface
