"""The gateway's typed settings (flags of `ditserve gateway`; no environment of its own)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ditserve.common.address import split_host_port
from ditserve.common.status import CommandError


@dataclass(frozen=True)
class GatewayConfig:
    """What one gateway process serves, and where it forwards."""

    target: str
    """host:port of the coordinator (its public gRPC API)."""
    listen: str = "127.0.0.1:8080"
    """host:port the HTTP server binds."""
    tokens_file: str = ""
    """File of accepted bearer tokens as sha256 hex digests, one a line; empty: no check."""
    allow_unauthenticated: bool = False
    """Serve without tokens on a non-loopback address (only when asked for explicitly)."""
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    """Origins whose pages may call the API from a browser ("*" for any); none by default."""
    tls: bool = False
    """Dial the coordinator over TLS."""
    root_certificates: bytes | None = None
    """PEM roots for the coordinator's certificate; None for the system's."""
    timeout: float | None = None
    """Deadline in seconds of each gRPC call; None for none."""
    retries: int = 2
    """Retries of a call that fails UNAVAILABLE before any event (the SDK's backoff)."""
    heartbeat: float = 15.0
    """Seconds between SSE comment lines while a request waits, so proxies keep it open."""
    grace: float = 5.0
    """Seconds open requests get to finish on SIGTERM."""

    def __post_init__(self) -> None:
        host_port("--target", self.target)
        host_port("--listen", self.listen)
        if self.retries < 0:
            raise CommandError(f"--retries must be >= 0, got {self.retries}")
        if self.timeout is not None and self.timeout <= 0:
            raise CommandError(f"--timeout must be positive, got {self.timeout}")
        if self.grace < 0:
            raise CommandError(f"--grace must be >= 0, got {self.grace}")
        if self.heartbeat <= 0:
            raise CommandError(f"--heartbeat must be positive, got {self.heartbeat}")
        if not self.tokens_file and not self.allow_unauthenticated and not self.loopback:
            raise CommandError(f"--listen {self.listen} is not loopback: give --tokens-file "
                             "(or --allow-unauthenticated to serve anyone)")

    @property
    def host(self) -> str:
        return host_port("--listen", self.listen)[0]

    @property
    def port(self) -> int:
        return host_port("--listen", self.listen)[1]

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the listening address."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def host_port(flag: str, address: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" → (host, port); CommandError naming the flag otherwise."""
    host, port = split_host_port(address, flag, CommandError)
    if not host:
        raise CommandError(f"{flag} must be HOST:PORT, got {address!r}")
    return host, port
