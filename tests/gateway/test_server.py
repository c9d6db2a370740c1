"""The gateway's listening socket: events are not held back by Nagle's algorithm."""

from __future__ import annotations

import asyncio
import socket

from ditserve.gateway.config import GatewayConfig
from ditserve.gateway.server import bind, url


def test_accepted_connections_get_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on sockets of proto IPPROTO_TCP; without it each
    small SSE event waits for the client's delayed ACK."""
    sock = bind(GatewayConfig("127.0.0.1:1", "127.0.0.1:0"))
    assert url(sock).startswith("http://127.0.0.1:") and not url(sock).endswith(":0/")

    async def accepted_nodelay() -> int:
        options: asyncio.Future = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport):
                options.set_result(transport.get_extra_info("socket").getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Record, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(options, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
