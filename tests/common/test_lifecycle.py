"""The shared server lifecycle owns its port alone: a second server on a taken port (another
ditserve, or any other program) fails at start with one line naming the port, instead of
sharing it through SO_REUSEPORT (issue 11 §2)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from ditserve.common.grpc_options import server_options
from ditserve.common.lifecycle import ListenError, ServiceLifecycle


def test_servers_turn_so_reuseport_off():
    assert ("grpc.so_reuseport", 0) in server_options()


def test_a_second_server_on_a_taken_port_fails_naming_it(free_port):
    port = free_port()

    async def two_servers() -> None:
        first = ServiceLifecycle("first", f"127.0.0.1:{port}", [])
        await first.start()
        try:
            second = ServiceLifecycle("second", f"127.0.0.1:{port}", [])
            with pytest.raises(ListenError) as failed:
                await second.start()
            assert str(failed.value) == (f"second cannot listen on 127.0.0.1:{port}: "
                                         f"port {port} is already in use")
        finally:
            await first.shutdown()

    asyncio.run(two_servers())


def test_a_port_held_by_another_program_fails_naming_it(free_port):
    port = free_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()

        async def start() -> None:
            await ServiceLifecycle("stage-0", f"127.0.0.1:{port}", []).start()

        with pytest.raises(ListenError, match=f"stage-0 cannot listen on 127.0.0.1:{port}: "
                                              f"port {port} is already in use"):
            asyncio.run(start())
