"""Message size limits, keepalive and port ownership, the same on every server and channel
(docs/ARCHITECTURE.md §5, §6).

Limits are explicit so that a peer's misconfiguration fails loudly with RESOURCE_EXHAUSTED
rather than at grpc's 4 MiB default. Keepalive pings detect a dead peer (a killed pod) in
seconds instead of waiting for TCP; the server permits the client's ping rate so it does
not answer GOAWAY "too_many_pings" (grpc/doc/keepalive.md). Servers own their port
alone: gRPC turns SO_REUSEPORT on by default on Linux, which lets a second server bind the
same port and silently take half of the connections.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest single gRPC message sent or received. Tensors travel in ~1 MiB chunks, so this
bounds a frame, not a tensor."""

KEEPALIVE_TIME_MS = 10_000
"""Idle time after which a side pings its peer."""

KEEPALIVE_TIMEOUT_MS = 5_000
"""How long a ping may go unanswered before the connection is declared dead."""


def _common(max_message_bytes: int, max_receive_bytes: int | None = None
            ) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            # grpc-core enforces a ping's timeout from this one (default 60 s), not from
            # keepalive_timeout_ms (grpc/grpc#39239): without it a frozen peer went
            # unnoticed for ~66 s.
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES,
                   max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
    """Options for `grpc.aio.server(options=...)`; `max_receive_bytes` (default: the same
    as sent) sizes what callers may send, e.g. KiB on the coordinator's public port."""
    return [*_common(max_message_bytes, max_receive_bytes),
            # A port held by another server (even another ditserve) must fail the bind, not
            # be shared with it.
            ("grpc.so_reuseport", 0),
            # Accept the clients' pings (every KEEPALIVE_TIME_MS, even when idle).
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2)]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for `grpc.aio.insecure_channel(address, options=...)`."""
    return [*_common(max_message_bytes),
            # Reconnect quickly after a peer restarts (the chain heals on its own).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # Its own connections: by default channels to one address share grpc's global
            # subchannels, so a fresh channel made to cut a reconnect backoff short (as
            # the stage client's does) took over the old one's backoff and failed at once
            # with its stale "Connection refused", even after the peer came up.
            ("grpc.use_local_subchannel_pool", 1)]
