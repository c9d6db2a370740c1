"""A shared-memory stream's frames off HTTP/2: the doorbell, a Unix socket beside the ring.

With the payload in a ring slot (wire/shm.py), a microbatch's frame is ~200 bytes, and
carrying it on the gRPC stream cost more than anything else in a same-host hop: a
grpc.aio message leg is ~150-190 us here (grpc core, its poller thread, the event loop's
wake-up, the stream's reader and writer turns), while a whole round trip over a Unix
socket read by the event loop itself, slot copy and NaN check included, is ~0.21 ms
(BENCHMARKS.md §12d, §12e). So once the ring is negotiated, the two ends also open a
doorbell:

- The receiver (a stage) listens on ONE abstract Unix socket per process,
  "\\0ditserve-bell-<pid>-<random>" (abstract: no file to leave behind when killed). With its
  ShmAnswer it sends that name and a fresh random token for this stream.
- The sender connects and writes the token; the receiver attaches the connection to the
  stream that issued the token (single use) and writes one byte, ACK. Only then does the
  sender move its frames there: a doorbell refused or closed before the ACK costs nothing
  but speed. A connection from another user (SO_PEERCRED; the ring is 0600 already), or
  one that does not present a live token within DOORBELL_HELLO_S, is closed. The token only
  ever travelled on the authenticated gRPC stream, so no other local process can attach.
- From then on every frame of the stream, both ways, goes over the doorbell as the same
  protobuf message (ForwardRequest / ForwardResponse, the lean serialisation of wire/lean.py)
  behind a 4-byte little-endian length; the gRPC stream stays open as the stream's
  lifetime, authentication and liveness (keepalive): either one ending ends both.

When the connection cannot be made (another network namespace with a shared /dev/shm, or a
peer that predates the doorbell and answers without one) the frames stay on the gRPC stream:
slower, the same behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import secrets
import socket
import struct
from collections.abc import Callable
from typing import Any

from ditserve.common.logs import log_event

from .lean import serialize

NAME = re.compile(r"ditserve-bell-\d+-[0-9a-f]{16}")
"""An abstract socket name a doorbell may have (without its leading NUL)."""
TOKEN_BYTES = 16
DOORBELL_HELLO_S = 5.0
"""How long a new connection has to present its stream's token."""
MAX_UNATTACHED = 64
"""Connections waiting to present a token at once; more are closed at once."""
ACK = b"\x01"
"""The receiver's first byte on an attached doorbell."""
_LENGTH = struct.Struct("<I")
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
RECV_BYTES = 256 << 10
"""Bytes asked of the socket per read: many frames, or a good part of a chunk."""


class DoorbellError(OSError):
    """The doorbell cannot be opened (the stream's frames stay on gRPC)."""


class Doorbell:
    """One connected doorbell: length-prefixed frames both ways, read and written by the
    event loop itself (no thread, no task per frame).

    `on_frame(frame)` gets each parsed frame; `on_close(reason, violation)` is called once,
    when the peer closes, a read or write fails, a frame is malformed (`violation`: the
    peer broke the protocol), or `close()` is called (then with reason ""). Frames sent
    after the close are dropped: the stream is ending. The sender's end (`on_open` given)
    is `open` once the receiver's ACK came, and `on_open()` is called then."""

    def __init__(self, sock: socket.socket, parse: Callable[[Any], Any],
                 on_frame: Callable[[Any], None], on_close: Callable[[str, bool], None],
                 max_frame_bytes: int, on_open: Callable[[], None] | None = None):
        sock.setblocking(False)
        self.sock = sock
        self.open = on_open is None  # the receiver's end is open when attached
        self._on_open = on_open
        self._parse, self._on_frame, self._on_close = parse, on_frame, on_close
        self._max = max_frame_bytes
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()  # received bytes not yet a whole frame
        self._body: memoryview | None = None  # a large frame being received in place
        self._body_filled = 0
        self._pending: collections.deque[memoryview] = collections.deque()  # unsent
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    # -- sending ---------------------------------------------------------------------

    def send(self, frame: Any) -> None:
        """Queues one frame (a LeanFrame or a message); written at once if the socket
        takes it, else as it drains."""
        if self.closed:
            return
        data = serialize(frame)
        pieces = [_LENGTH.pack(len(data)), data]
        if self._pending:
            self._pending.extend(memoryview(p) for p in pieces)
            return
        try:
            sent = self.sock.sendmsg(pieces)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._fail(f"doorbell write failed: {error.strerror or error}")
            return
        if sent < 4 + len(data):
            head = memoryview(b"".join(pieces))[sent:]
            self._pending.append(head)
            self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        while self._pending:
            try:
                sent = self.sock.sendmsg(list(self._pending)[:64])
            except BlockingIOError:
                return
            except OSError as error:
                self._fail(f"doorbell write failed: {error.strerror or error}")
                return
            while sent and self._pending:
                head = self._pending[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    self._pending.popleft()
                else:
                    self._pending[0] = head[sent:]
                    sent = 0
        self._loop.remove_writer(self.sock.fileno())

    # -- receiving -------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            if self._body is not None:
                self._fill_body()
                return
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as error:
            self._fail(f"doorbell read failed: {error.strerror or error}")
            return
        if not data:
            self._fail("doorbell closed by the peer")
            return
        if not self.open:  # the sender's end: the receiver's ACK comes first
            if data[:1] != ACK:
                self._fail("the doorbell did not acknowledge its token", True)
                return
            self.open, data = True, data[1:]
            self._on_open()
        self._buffer += data
        self._frames_from_buffer()

    def _frames_from_buffer(self) -> None:
        buffer, pos = self._buffer, 0
        view = memoryview(buffer)
        try:
            while len(buffer) - pos >= 4 and not self.closed:
                (size,) = _LENGTH.unpack_from(buffer, pos)
                if size > self._max:
                    self._fail(f"doorbell frame of {size} bytes exceeds {self._max}", True)
                    return
                if len(buffer) - pos - 4 < size:
                    if size > RECV_BYTES:  # a large frame: the rest lands in place
                        body = bytearray(size)
                        have = len(buffer) - pos - 4
                        body[:have] = view[pos + 4:]
                        self._body, self._body_filled = memoryview(body), have
                        pos = len(buffer)
                    break
                self._deliver(bytes(view[pos + 4:pos + 4 + size]))
                pos += 4 + size
        finally:
            view.release()
        del buffer[:pos]

    def _fill_body(self) -> None:
        body = self._body
        received = self.sock.recv_into(body[self._body_filled:])
        if not received:
            self._fail("doorbell closed by the peer")
            return
        self._body_filled += received
        if self._body_filled == body.nbytes:
            self._body = None
            self._deliver(body.obj)

    def _deliver(self, data: Any) -> None:
        try:
            self._on_frame(self._parse(data))
        except Exception as error:  # bytes that are not a frame: the stream is unusable
            self._fail(f"unreadable frame on the doorbell: {error}", True)

    # -- closing ---------------------------------------------------------------------

    def _fail(self, reason: str, violation: bool = False) -> None:
        if not self.closed:
            self._shut()
            self._on_close(reason, violation)

    def close(self) -> None:
        """Closes the connection (the peer sees the doorbell end); `on_close("")`."""
        self._fail("")

    def _shut(self) -> None:
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self._loop.remove_writer(self.sock.fileno())
        self._pending.clear()
        self.sock.close()


def connect(name: str, token: bytes) -> socket.socket:
    """The sender's end: connects to the receiver's doorbell `name` and presents `token`
    (without blocking: a listener whose backlog is full is unavailable)."""
    if not NAME.fullmatch(name) or len(token) != TOKEN_BYTES:
        raise DoorbellError(f"doorbell {name!r} is not a ditserve doorbell")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect("\0" + name)
        if sock.send(token) != TOKEN_BYTES:  # a fresh socket's buffer takes 16 bytes
            raise BlockingIOError("token not sent")
    except OSError as error:
        sock.close()
        raise DoorbellError(f"cannot reach doorbell {name}: {error.strerror or error} "
                            "(another network namespace?)") from None
    return sock


class DoorbellListener:
    """The receiver's end: one listening socket per process; each stream that accepted a
    ring asks `expect()` for a token and gets its connection through the callback."""

    def __init__(self) -> None:
        self.name = f"ditserve-bell-{os.getpid()}-{secrets.token_hex(8)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind("\0" + self.name)
            self._sock.listen(MAX_UNATTACHED)
        except OSError as error:
            self._sock.close()
            raise DoorbellError(f"cannot listen on a doorbell: {error.strerror or error}") from None
        self._sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._expected: dict[bytes, Callable[[socket.socket], None]] = {}
        self._hello: dict[socket.socket, tuple[bytearray, asyncio.TimerHandle]] = {}
        self._loop.add_reader(self._sock.fileno(), self._on_connection)

    def expect(self, attach: Callable[[socket.socket], None]) -> bytes:
        """A fresh token; the connection presenting it goes to `attach` (once)."""
        token = secrets.token_bytes(TOKEN_BYTES)
        self._expected[token] = attach
        return token

    def forget(self, token: bytes) -> None:
        """The stream ended: its token no longer attaches anything."""
        self._expected.pop(token, None)

    def _on_connection(self) -> None:
        try:
            sock, _ = self._sock.accept()
        except OSError:
            return
        if not _same_user(sock) or len(self._hello) >= MAX_UNATTACHED:
            sock.close()
            return
        sock.setblocking(False)
        timer = self._loop.call_later(DOORBELL_HELLO_S, self._drop, sock, "no token in time")
        self._hello[sock] = (bytearray(), timer)
        self._loop.add_reader(sock.fileno(), self._on_hello, sock)

    def _on_hello(self, sock: socket.socket) -> None:
        received, _ = self._hello[sock]
        try:
            data = sock.recv(TOKEN_BYTES - len(received))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock, "closed before its token")
            return
        received += data
        if len(received) < TOKEN_BYTES:
            return
        attach = self._expected.pop(bytes(received), None)
        if attach is None:
            self._drop(sock, "unknown token")
            return
        self._release(sock)
        try:
            sock.send(ACK)  # a fresh socket's buffer takes it
        except OSError:
            sock.close()
            return
        attach(sock)

    def _release(self, sock: socket.socket) -> None:
        _, timer = self._hello.pop(sock)
        timer.cancel()
        self._loop.remove_reader(sock.fileno())

    def _drop(self, sock: socket.socket, reason: str) -> None:
        if sock in self._hello:
            self._release(sock)
            sock.close()
            log_event("doorbell_refused", level=logging.WARNING, reason=reason)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        for sock in list(self._hello):
            self._release(sock)
            sock.close()
        self._expected.clear()
        self._sock.close()


def _same_user(sock: socket.socket) -> bool:
    """Whether the peer runs as this process's user (as the 0600 ring requires anyway)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True  # not Linux: the token alone guards the doorbell
    _, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, option,
                                                    _CREDENTIALS.size))
    return uid == os.geteuid()
