"""What a server allows: its address, its token, its limits; and the rule that an exposed host needs a token."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from captioner.config import DecodeSettings, check_bounds, option
from captioner.errors import ConfigError

MB = 2**20


@dataclass(frozen=True)
class ServeSettings:
    """The server's address, access rule and limits; validated when built. The limits declare their flags (`option`)."""

    host: str = "127.0.0.1"  # loopback: only this machine can connect unless the user asks for more
    port: int = option(8000, "Port to listen on (0: any free one).", low=0, high=65535)
    token: str | None = None  # every /v1 request must carry it as `Authorization: Bearer ...` when set
    no_auth: bool = False  # an explicit choice to expose the API with no token (e.g. behind an authenticating proxy)
    cors: tuple[str, ...] = ()  # origins whose pages may call the API; none: only the server's own page
    # One request's body: a larger one is refused (413) before any decoding.
    max_upload_mb: float = option(20.0, "Largest request body, in MB.", low=0.001, high=1024.0)
    max_images: int = option(32, "Files in one request: a bound on the work one request can ask for.",
                             low=1, high=1024)
    max_batch: int = option(32, "Images captioned at once (captioner caption's default batch).", low=1, high=1024)
    batch_wait_ms: float = option(5.0, "How long a batch waits for requests still opening their images.",
                                  low=0.0, high=1000.0)
    queue_limit: int = option(256, "Images accepted and not yet captioned; beyond it, 503 with Retry-After.", low=1)
    # A request still unanswered after this gets 503, so no client hangs on a stuck queue.
    timeout_s: float = option(60.0, "Seconds before an unanswered request gets 503.", low=0.001, high=86400.0,
                              flag="--timeout")
    decode_threads: int = option(4, "Threads opening uploads (Pillow releases the GIL while it decodes).",
                                 low=1, high=64)
    # The event loop's Python and the model's share one GIL in one process, and under load the model waits on it.
    model_process: bool = option(True, "Caption in a process of its own, so the model never waits on the web "
                                       "server for Python's lock (--in-process: one process).",
                                 flag="--model-process/--in-process")
    decoding: DecodeSettings = field(default_factory=DecodeSettings)  # each request's search, but for its beam etc.

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token is empty: give a secret, or leave it out on 127.0.0.1")
        if self.token and self.no_auth:
            raise ConfigError("--token and --no-auth contradict each other: give one")
        if not is_loopback(self.host) and not self.token and not self.no_auth:
            raise ConfigError(f"--host {self.host} can be reached from other machines: give --token (or set "
                              "CAPTIONER_TOKEN), or --no-auth to serve without one")

    @property
    def max_upload_bytes(self) -> int:
        """The body limit in bytes."""
        return int(self.max_upload_mb * MB)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve to any interface
