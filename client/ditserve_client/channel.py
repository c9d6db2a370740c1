"""Channels to the coordinator: TLS or plaintext, bearer token, keepalive, retries.

The token travels as `authorization: Bearer <token>`: as call credentials on a TLS
channel (grpc refuses them on plaintext), as call metadata on a plaintext one (for a
TLS-terminating proxy on loopback, or tests); never in plaintext to another host. Without
an explicit token the SDK and the CLI take `DITSERVE_TOKEN` from the environment.
Reference: grpc auth guide.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV = "DITSERVE_TOKEN"
"""Environment variable holding the bearer token when none is given (keeps it out of argv)."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message received: a Result holds every image of a request."""

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),  # notices a dead server during a long generation
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class ChannelSettings:
    """Where and how to connect."""

    target: str
    tls: bool = False
    root_certificates: bytes | None = None
    token: str | None = None
    """Bearer token; None: $DITSERVE_TOKEN if set; "": none."""

    def __post_init__(self) -> None:
        host, _, port = self.target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"target must be HOST:PORT, got {self.target!r}")
        if self.root_certificates is not None and not self.tls:
            raise ValueError("root certificates given without tls")
        if self.token is None:
            object.__setattr__(self, "token", os.environ.get(TOKEN_ENV) or None)
        if self.token and not self.tls and not _is_loopback(host):
            raise ValueError(f"refusing to send a bearer token in plaintext to {host}; "
                             "connect with tls")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials for TLS (with the token as call credentials), else None."""
        if not self.tls:
            return None
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
        if self.token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(self.token))
        return creds

    def open(self, api=grpc):
        """A channel of `api` (grpc, or grpc.aio for the asyncio client) with these settings."""
        creds = self.credentials()
        if creds is not None:
            return api.secure_channel(self.target, creds, CHANNEL_OPTIONS)
        return api.insecure_channel(self.target, CHANNEL_OPTIONS)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the token, on a plaintext channel only."""
        if self.token and not self.tls:
            return (("authorization", f"Bearer {self.token}"),)
        return ()


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_certificates(path: str | Path | None) -> bytes | None:
    """PEM root certificates from a file, or None for the system's."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read CA certificates {path}: {error.strerror}") from None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between retries of a call that failed UNAVAILABLE."""

    retries: int = 3
    initial: float = 0.2
    multiplier: float = 2.0
    maximum: float = 5.0

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """Seconds before retry number `attempt` (0-based); the server's hint wins if longer."""
        delay = min(self.maximum, self.initial * self.multiplier**attempt)
        return max(delay, hint or 0.0)


RETRYABLE = grpc.StatusCode.UNAVAILABLE
