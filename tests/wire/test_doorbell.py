"""The doorbell (wire/doorbell.py) on its own: a listener and its connections in one event
loop, the frames the Forward stream carries, and what a wrong peer gets."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import torch
from ditserve.wire import doorbell as doorbell_module
from ditserve.wire import lean_frames, parse_request
from ditserve.wire.doorbell import Doorbell, DoorbellError, DoorbellListener, connect
from ditserve_client.proto.dit.v1 import stage_pb2

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets")

MAX_FRAME = 8 << 20


class _Pair:
    """A listener, a sender's Doorbell and the receiver's, attached by a token."""

    def __init__(self) -> None:
        self.received: list = []
        self.closed: list[tuple[str, bool]] = []
        self.sender_closed: list[tuple[str, bool]] = []

    async def open(self) -> _Pair:
        self.listener = DoorbellListener()
        attached: asyncio.Future = asyncio.get_running_loop().create_future()
        token = self.listener.expect(attached.set_result)
        sock = connect(self.listener.name, token)
        self.receiver = Doorbell(await asyncio.wait_for(attached, 5), parse_request,
                                 self.received.append,
                                 lambda reason, bad: self.closed.append((reason, bad)),
                                 MAX_FRAME)
        opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sender = Doorbell(sock, parse_request, lambda frame: None,
                               lambda reason, bad: self.sender_closed.append((reason, bad)),
                               MAX_FRAME, on_open=lambda: opened.set_result(True))
        await asyncio.wait_for(opened, 5)  # the receiver acknowledged the token
        assert self.sender.open
        return self

    async def wait(self, predicate, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.005)

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.listener.close()


async def _closed_by_listener(sock: socket.socket) -> bool:
    """Whether the listener closed the connection (EOF, or a reset when it closed with the
    token unread) without acknowledging anything."""
    sock.setblocking(False)
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), 2) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_frames_arrive_whole_and_in_order_small_and_chunked():
    async def run():
        pair = await _Pair().open()
        h = torch.randn(2, 64, 32).bfloat16()
        big = torch.randn(600_000)  # 2.4 MB: one frame larger than a read
        frames = [lean_frames(stage_pb2.ForwardRequest, i, [("h", h)], shm_slot=0)[0]
                  for i in range(1, 40)]
        frames += lean_frames(stage_pb2.ForwardRequest, 40, [("big", big)], chunk_bytes=4 << 20)
        for frame in frames:
            pair.sender.send(frame)
        await pair.wait(lambda: len(pair.received) == len(frames))
        assert [f.microbatch_id for f in pair.received] == list(range(1, 41))
        assert bytes(pair.received[0].chunk) == h.view(torch.uint8).numpy().tobytes()
        got = torch.frombuffer(bytearray(pair.received[-1].chunk), dtype=torch.float32)
        assert torch.equal(got, big)
        assert pair.closed == []
        pair.sender.close()  # the receiver sees the end, as the peer's, not a violation
        await pair.wait(lambda: pair.closed)
        assert pair.closed == [("doorbell closed by the peer", False)]
        pair.close()

    asyncio.run(run())


def test_a_malformed_or_oversized_frame_is_a_violation():
    async def run():
        for payload, why in ((struct.pack("<I", 3) + b"\xff\xff\xff", "unreadable frame"),
                             (struct.pack("<I", MAX_FRAME + 1), "exceeds")):
            pair = await _Pair().open()
            pair.sender.sock.sendall(payload)
            await pair.wait(lambda pair=pair: pair.closed)
            reason, violation = pair.closed[0]
            assert why in reason and violation
            assert pair.receiver.closed
            pair.close()

    asyncio.run(run())


def test_only_a_live_token_attaches_and_strangers_are_dropped(monkeypatch):
    monkeypatch.setattr(doorbell_module, "DOORBELL_HELLO_S", 0.2)

    async def run():
        listener = DoorbellListener()
        attached: list[socket.socket] = []
        token = listener.expect(attached.append)
        dropped = _closed_by_listener
        stranger = connect(listener.name, b"x" * 16)  # a wrong token
        assert await dropped(stranger)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect("\0" + listener.name)  # says nothing: dropped after the hello time
        assert await dropped(silent)
        listener.forget(token)  # the stream ended: its token attaches nothing any more
        late = connect(listener.name, token)
        assert await dropped(late)
        assert attached == []
        token = listener.expect(attached.append)
        good = connect(listener.name, token)
        ack = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(good, 1), 5)
        assert ack == doorbell_module.ACK and len(attached) == 1
        again = connect(listener.name, token)  # single use
        assert await dropped(again)
        good.close()
        attached[0].close()
        listener.close()

    asyncio.run(run())


def test_the_senders_end_opens_only_on_the_receivers_ack():
    """A doorbell refused before its ACK is closed without ever having been open, so the
    stream keeps its frames on gRPC (stage/client.py) instead of losing them."""
    async def run():
        listener = DoorbellListener()
        closed: asyncio.Future = asyncio.get_running_loop().create_future()
        bell = Doorbell(connect(listener.name, b"y" * 16), parse_request, lambda frame: None,
                        lambda reason, bad: closed.set_result(reason), MAX_FRAME,
                        on_open=lambda: pytest.fail("opened without an ACK"))
        assert not bell.open
        assert await asyncio.wait_for(closed, 5) == "doorbell closed by the peer"
        assert not bell.open
        listener.close()

    asyncio.run(run())


def test_another_user_cannot_even_wait_at_the_door(monkeypatch):
    """SO_PEERCRED: a connection from another uid is closed before it may present a token
    (and before it counts against MAX_UNATTACHED)."""
    monkeypatch.setattr(doorbell_module.os, "geteuid", lambda: 4242)  # "we" are someone else

    async def run():
        listener = DoorbellListener()
        attached: list = []
        token = listener.expect(attached.append)
        assert await _closed_by_listener(connect(listener.name, token))
        assert attached == [] and not listener._hello
        listener.close()

    asyncio.run(run())


def test_connect_refuses_a_name_that_is_not_a_doorbell():
    with pytest.raises(DoorbellError, match="not a ditserve doorbell"):
        connect("../../etc/passwd", b"x" * 16)
    with pytest.raises(DoorbellError, match="cannot reach"):
        connect("ditserve-bell-1-0123456789abcdef", b"x" * 16)  # nobody listens there
