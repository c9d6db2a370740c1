"""Channels to the coordinator: TLS or plaintext, bearer token, keepalive, retries.

The token travels as `authorization: Bearer <token>`: as call credentials on a TLS
channel (grpc refuses them on plaintext), as call metadata on a plaintext one (for a
TLS-terminating proxy on loopback, or tests); never in plaintext to another host. Without
an explicit token the SDK and the CLI take `DITSERVE_TOKEN` from the environment.

Retries are gRPC's own (a retryPolicy in the channel's service config), shared by the sync
and asyncio clients: a call that fails UNAVAILABLE is retried with exponential backoff
while no response has arrived. gRPC commits a streaming call at its first message, so
Generate is retried only before the server admitted the request (no event seen), and
every attempt lies within the call's one deadline. References: grpc auth guide, gRFC A6
(client retries), grpc's `retry` example.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "DITSERVE_TOKEN"
"""Environment variable holding the bearer token when none is given (keeps it out of argv)."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message received: a Result holds every image of a request."""

COORDINATOR_SERVICE = "dit.v1.CoordinatorService"
MAX_RETRIES = 4
"""gRPC caps a retry policy at 5 attempts (gRFC A6): the first call and 4 retries."""

KEEPALIVE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),  # notices a dead server during a long generation
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect at least every 5 s (gRPC's default backoff grows to 120 s): a restarted
    # coordinator is found soon, and a broken stream resumes (resume.py).
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between attempts of a call that failed UNAVAILABLE."""

    retries: int = 3
    """Retries after the first attempt (0..4)."""
    initial: float = 0.2
    """Seconds before the first retry (gRPC draws the actual wait uniformly below it)."""
    multiplier: float = 2.0
    maximum: float = 5.0
    """Longest wait between attempts, in seconds."""

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(f"retries must be 0..{MAX_RETRIES} (gRPC makes at most 5 "
                             f"attempts), got {self.retries}")

    def service_config(self) -> str:
        """The channel's service config (JSON): this policy on every coordinator method."""
        method: dict[str, Any] = {"name": [{"service": COORDINATOR_SERVICE}]}
        if self.retries:
            method["retryPolicy"] = {
                "maxAttempts": self.retries + 1, "initialBackoff": f"{self.initial}s",
                "maxBackoff": f"{self.maximum}s", "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"]}
        return json.dumps({"methodConfig": [method]})


def parse_target(target: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) → (host, port); ValueError names the target as given."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"target {target}: port {port} is outside 1..65535")
    return host, int(port)


@dataclass(frozen=True)
class ChannelSettings:
    """Where and how to connect."""

    target: str
    tls: bool = False
    root_certificates: bytes | None = None
    token: str | None = None
    """Bearer token; None: $DITSERVE_TOKEN if set; "": none."""
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        host, _ = parse_target(self.target)
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

    def options(self) -> list[tuple[str, Any]]:
        return [*KEEPALIVE_OPTIONS, ("grpc.enable_retries", 1),
                ("grpc.service_config", self.retry.service_config())]

    def open(self, api: Any = grpc) -> Any:
        """A channel of `api` (grpc, or grpc.aio for the asyncio client) with these settings."""
        creds = self.credentials()
        if creds is not None:
            return api.secure_channel(self.target, creds, self.options())
        return api.insecure_channel(self.target, self.options())

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
