"""Runs the gateway: bind, announce, serve under uvicorn until SIGTERM/SIGINT.

The socket is bound here, before uvicorn starts, so that a port in use fails as one line
and `--listen HOST:0` serves on a port the OS picks (printed in the start line, which
`ditserve up` and the tests read). uvicorn owns the signals: on SIGTERM it stops
accepting, lets open requests finish for `grace` seconds, then cancels them (each
cancellation cancels its gRPC call) and runs the app's shutdown (closing the channels).
"""

from __future__ import annotations

import signal
import socket

import uvicorn

from ..common.logs import configure_logging
from .auth import TokenCheck
from .config import GatewayConfig

START_LINE = "ditserve gateway: serving"


def bind(config: GatewayConfig) -> socket.socket:
    """A listening socket on config.listen (no SO_REUSEPORT: a port is never shared)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that
    # say so, and without it Nagle holds each small event until the client's delayed ACK
    # (measured: ~40 ms per event on loopback).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {config.listen}: {error.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(config: GatewayConfig, log_level: str = "info") -> int:
    """Serves until a signal; returns the exit status."""
    from .app import build_app

    configure_logging("gateway", log_level)
    tokens = TokenCheck.from_file(config.tokens_file)
    sock = bind(config)

    async def announce() -> None:
        auth = f"{len(tokens.digests)} tokens" if tokens.enabled else "no token check"
        print(f"{START_LINE} {url(sock)} -> coordinator {config.target} ({auth})", flush=True)

    app = build_app(config, tokens, on_startup=announce)
    server = uvicorn.Server(uvicorn.Config(
        app, http="h11", loop="asyncio", lifespan="on", log_level=log_level.lower(),
        timeout_graceful_shutdown=config.grace))
    # uvicorn re-raises a SIGTERM it drained for once it is done; handled as a no-op here,
    # a drained stop exits 0 like every other ditserve service.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    return 0 if server.started else 1
