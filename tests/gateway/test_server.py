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


def test_the_gateway_needs_no_torch():
    """It runs from the client SDK and the gateway extra: torch, numpy, the server parts
    blocked, it still imports and builds its app."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('torch', 'numpy', 'safetensors', 'diffusers', 'prometheus_client'):\n"
            "    sys.modules[name] = None\n"
            "from ditserve.gateway.app import build_app\n"
            "from ditserve.gateway.auth import TokenCheck\n"
            "from ditserve.gateway.config import GatewayConfig\n"
            "import ditserve.gateway.server\n"
            "build_app(GatewayConfig('127.0.0.1:1'), TokenCheck())\n"
            "from ditserve.cli import main\n"
            "main(['gateway', '--help'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--tokens-file" in done.stdout
