"""The baseline of `ditserve bench transport`: a raw grpc.aio bidi stream of bytes.

No protobuf, no validation: each microbatch is an 8-byte header (its length) then its
bytes in `CHUNK_BYTES` messages; the server answers an 8-byte acknowledgement once it
has them all. What Python gRPC itself allows on this machine, for the ratio of part 2.

    python -m ditserve.bench.rawgrpc 127.0.0.1:42001     # the server (until SIGTERM)
"""

from __future__ import annotations

import asyncio
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator

import grpc

from ditserve.common.grpc_options import channel_options
from ditserve.wire import CHUNK_BYTES

METHOD = "/ditserve.bench.RawBytes/Stream"


async def _serve_stream(requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
    expected, received = None, 0
    async for message in requests:
        if expected is None:
            (expected,) = struct.unpack("<Q", message)
            received = 0
        else:
            received += len(message)
        if received == expected:
            yield struct.pack("<Q", expected)
            expected = None


async def serve(address: str) -> None:
    server = grpc.aio.server(options=channel_options())
    handler = grpc.method_handlers_generic_handler("ditserve.bench.RawBytes", {
        "Stream": grpc.stream_stream_rpc_method_handler(_serve_stream)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


class RawClient:
    """One bidi stream to a raw server; `call` sends a payload and waits for its ack
    (acks come back in order: one stream, one server task)."""

    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address, options=channel_options())
        self._stream = self.channel.stream_stream(METHOD)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._waiters: asyncio.Queue = asyncio.Queue()
        self._call = None
        self._reader: asyncio.Task | None = None

    async def open(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        await asyncio.wait_for(self.channel.channel_ready(), max(0.1, deadline - time.monotonic()))
        self._call = self._stream(self._drain())
        self._reader = asyncio.create_task(self._read())

    async def _drain(self) -> AsyncIterator[bytes]:
        while (message := await self._queue.get()) is not None:
            yield message

    async def _read(self) -> None:
        async for _ack in self._call:
            self._waiters.get_nowait().set_result(None)

    async def call(self, chunks: list[bytes], total: int) -> None:
        """Sends one payload, already cut into `chunks` of CHUNK_BYTES."""
        done = asyncio.get_running_loop().create_future()
        self._waiters.put_nowait(done)
        self._queue.put_nowait(struct.pack("<Q", total))
        for chunk in chunks:
            self._queue.put_nowait(chunk)
        await done

    async def close(self) -> None:
        self._queue.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self.channel.close()


def cut(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    return [payload[i:i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)]


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
