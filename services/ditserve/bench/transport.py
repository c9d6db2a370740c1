"""The data plane alone: what a stage hop costs when the blocks take no time (issue 13).

S `ditserve stage --relay` processes (blocks skipped: receive, validate, forward, reply;
the servicer, client and framing are the real ones) are chained on loopback; the
benchmark sends them h (N, T, D) and c (N, D) in bf16 as a stage would, with 1..k
microbatches in flight, through each `transport` (grpc: bytes over the stream; shm: the
bytes through shared memory, the stream carrying only the frame). Beside them in the same
run: raw grpc.aio bidi streams of bytes (no protobuf, no ditserve; 1 MiB messages, one
tiny ack per microbatch) through a chain of as many bare relay processes, and a memcpy of
the same bytes.

The ladder (`ladder`, one hop, 1 in flight) climbs from the raw stream to the stage one
layer at a time, each rung measured back to back on its own processes: raw bytes; the
Forward method's lean frames (wire/lean.py: encoded per call, the reply parsed) to a bare
server that only parses each frame and answers it; the StageClient to that bare server;
the StageClient to a relay stage. What each rung adds over the one below is what that
layer costs a hop.

Per hop:
- added latency = round trip at 1 in flight / S (an S-stage relay chain is S hops that
  carry h: bench → stage 0 → … → stage S−1; the reply is the small c);
- throughput = bytes of h × microbatches / wall time: every hop carries every byte, so
  this is what each hop sustains (with k > 1 microbatches overlapping on the hops).
The raw chain has the same shape (S processes; every byte through each; acks climbing back
through each), so each S compares with the raw chain of the same S: the same message
pattern, the same number of processes on the same cores. (Before, one raw process pair was
the baseline of every S: at S = 2 that compared 3 processes with 2 on a 2-core machine.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ditserve.common.process import (
    ServiceProcess,
    ditserve_argv,
    free_port,
    stop_all,
    thread_env,
    wait_serving,
)
from ditserve.common.status import ServiceError, StatusCode

from .report import Report, spread

START_TIMEOUT_S = 120.0
RAW_METHOD = "/ditserve.bench.Raw/Stream"
RAW_MESSAGE_BYTES = 1 << 20
"""Message size of the raw stream: the size the issue's raw figures used."""


@dataclass
class Settings:
    """What `ditserve bench transport` measures."""

    model: str = "DiT-XL/2"
    """Width of the activations (DiT-XL/2: D = 1152)."""
    latent_size: int = 32
    """Latent side: 32 is T = 256 tokens at patch 2 (256 px)."""
    rows: tuple[int, ...] = (1, 8, 32, 64)
    """Rows per microbatch: 1 row of XL/2 h is 576 KiB of bf16."""
    in_flight: tuple[int, ...] = (1, 4)
    """Microbatches in flight at once."""
    stage_counts: tuple[int, ...] = (1, 2, 4)
    """Relay chains measured (1: one hop, the raw stream's peer)."""
    transports: tuple[str, ...] = ("grpc", "shm")
    """Data paths measured (the `transport` of the stages and of the bench's client)."""
    bytes_per_cell: int = 96 << 20
    """Bytes of h sent per (chain, rows, in-flight) cell: its microbatch count."""
    min_calls: int = 6
    """Fewest microbatches per cell, whatever their size."""
    threads: int = 1
    """torch threads of every process."""
    ladder: bool = True
    """Also climb the ladder from the raw stream to the stage (one hop, 1 in flight, each
    of `rows`): see the module docstring."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-S/2", latent_size=8, rows=(1,), in_flight=(1, 2),
                   stage_counts=(2,), bytes_per_cell=1 << 20, min_calls=3)


def _calls(s: Settings, nbytes: int) -> int:
    return max(s.min_calls, s.bytes_per_cell // nbytes)


# -- the ditserve relay chain --

def _relay_chain(s: Settings, stages: int, transport: str, folder: Path) -> list[ServiceProcess]:
    ports = [free_port() for _ in range(stages)]
    processes = []
    for k, port in enumerate(ports):
        argv = ["stage", "--relay", "--model", s.model, "--latent-size", str(s.latent_size),
                "--stage", str(k), "--stages", str(stages), "--listen", f"127.0.0.1:{port}",
                "--wire-dtype", "bf16", "--max-batch", str(max(s.rows)), "--threads",
                str(s.threads), "--transport", transport]
        if k + 1 < stages:
            argv += ["--next", f"127.0.0.1:{ports[k + 1]}"]
        processes.append(ServiceProcess(f"relay-{k}", ditserve_argv(*argv),
                                        f"127.0.0.1:{port}", folder / f"{transport}-{k}.log",
                                        thread_env(s.threads)))
    try:
        for process in processes:
            process.start()
        wait_serving(processes, START_TIMEOUT_S)
    except BaseException:
        _stop(processes)
        raise
    return processes


def _stop(processes: list[ServiceProcess]) -> None:
    stop_all(processes, grace=10.0)
    for process in processes:
        process.close()


async def _drive(call, calls: int, in_flight: int) -> tuple[list[float], float]:
    """`calls` awaits of `call()`, `in_flight` at a time: (each round trip, wall s)."""
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []

    async def one() -> None:
        async with gate:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    await _warm_up(call)
    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    return latencies, time.perf_counter() - began


async def _warm_up(call, timeout: float = START_TIMEOUT_S) -> None:
    """One call that succeeds (connections, first buffers). A relay stage dials the next
    one as it starts, maybe before that one listens; its channel then stays in grpc's
    reconnect backoff for up to 2 s, failing calls at once (UNAVAILABLE, "connection
    refused") though the next stage now serves: those are retried until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call()
            return
        except ServiceError as error:
            if error.code is not StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _ditserve_cells(s: Settings, address: str, transport: str, stages: int,
                          tokens: int, width: int, in_flight: tuple[int, ...] | None = None,
                          ) -> list[dict]:
    from ditserve.stage.client import StageClient

    client = StageClient(address, peer="bench", transport=transport)
    cells = []
    try:
        await client.wait_connected(60)
        for n in s.rows:
            h = torch.randn(n, tokens, width).bfloat16()
            c = torch.randn(n, width).bfloat16()
            for k in in_flight or s.in_flight:
                nbytes = h.numel() * 2
                latencies, wall = await _drive(lambda h=h, c=c: client.call([("h", h), ("c", c)]),
                                               _calls(s, nbytes), k)
                cells.append(_cell(f"ditserve {transport}", stages, n, k, nbytes, latencies,
                                   wall, hops=stages))
        cells[0]["negotiated"] = client.negotiated
    finally:
        await client.close()
    return cells


def _cell(path: str, stages: int, n: int, k: int, nbytes: int, latencies: list[float],
          wall: float, hops: int) -> dict:
    return {"path": path, "stages": stages, "rows": n, "in_flight": k,
            "mib": round(nbytes / 2**20, 2),
            "hop_ms": round(spread(latencies)["median"] / hops * 1e3, 3) if k == 1 else None,
            "gb_per_s": round(nbytes * len(latencies) / wall / 1e9, 3),
            "latencies_s": latencies, "wall_s": wall}


# -- the raw grpc.aio stream --

async def _raw_server(address: str, next_address: str | None = None) -> None:
    """Acks every `size` bytes received (the size comes as call metadata); with
    `next_address`, a bare relay instead: each message goes on to the next raw server as
    it arrives, and the next one's acks come back (no protobuf, no ditserve code: the
    ceiling of a relay chain in grpc.aio)."""
    import grpc

    from ditserve.common.grpc_options import channel_options, server_options

    channel = (grpc.aio.insecure_channel(next_address, options=channel_options())
               if next_address else None)

    async def sink(requests, context):
        size = int(dict(context.invocation_metadata())["size"])
        got = 0
        async for message in requests:
            got += len(message)
            while got >= size:
                got -= size
                yield b"k"

    async def relay(requests, context):
        size = dict(context.invocation_metadata())["size"]
        call = channel.stream_stream(RAW_METHOD)(metadata=(("size", size),),
                                                 wait_for_ready=True)  # it may start later

        async def pump() -> None:
            async for message in requests:
                await call.write(message)
            await call.done_writing()

        pumping = asyncio.create_task(pump())
        try:
            async for ack in call:
                yield ack
        finally:
            pumping.cancel()

    server = grpc.aio.server(options=server_options())
    handler = grpc.stream_stream_rpc_method_handler(relay if channel else sink)  # bytes
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "ditserve.bench.Raw", {"Stream": handler}),))
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def _raw_chain(s: Settings, stages: int) -> tuple[list[subprocess.Popen], str]:
    """`stages` raw servers in a relay chain (the first one is the address to call)."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(stages)]
    processes = []
    for k, address in enumerate(addresses):
        argv = [sys.executable, "-m", "ditserve.bench.transport", address, *addresses[k + 1:k + 2]]
        processes.append(subprocess.Popen(argv, env={**os.environ, **thread_env(s.threads)}))
    return processes, addresses[0]


FRAME_BYTES = 128
"""A shared-memory microbatch's frame on the stream: specs and the slot, ~100 bytes."""


async def _raw_cells(s: Settings, address: str, stages: int, tokens: int, width: int,
                     in_flight: tuple[int, ...] | None = None, floor: bool = True,
                     ) -> list[dict]:
    import grpc

    from ditserve.common.grpc_options import channel_options

    cells = []
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
        for n in s.rows:
            nbytes = n * tokens * width * 2
            for k in in_flight or s.in_flight:
                latencies, wall = await _raw_stream(channel, nbytes, _calls(s, nbytes), k)
                cells.append(_cell("raw grpc.aio bytes", stages, n, k, nbytes, latencies, wall,
                                   stages))
        if not floor:
            return cells
        # The floor of any path that sends a message per microbatch (shm sends its frame).
        latencies, wall = await _raw_stream(channel, FRAME_BYTES, _calls(s, 1 << 20), 1)
        floor = _cell(f"raw grpc.aio {FRAME_BYTES}-byte message", stages, 0, 1, FRAME_BYTES,
                      latencies, wall, stages)
        cells.append({**floor, "mib": None, "gb_per_s": None})  # latency only
    return cells


async def _raw_stream(channel, nbytes: int, calls: int, in_flight: int
                      ) -> tuple[list[float], float]:
    """`calls` microbatches of `nbytes` random bytes on one raw stream, `in_flight` at once."""
    payload = os.urandom(nbytes)
    messages = [payload[i:i + RAW_MESSAGE_BYTES] for i in range(0, nbytes, RAW_MESSAGE_BYTES)]
    call = channel.stream_stream(RAW_METHOD)(metadata=(("size", str(nbytes)),))
    acks: asyncio.Queue = asyncio.Queue()
    lock = asyncio.Lock()

    async def reader() -> None:
        async for _ in call:
            acks.put_nowait(None)

    async def one() -> None:
        async with lock:  # one microbatch's messages are not interleaved
            for message in messages:
                await call.write(message)
        await acks.get()  # acks come in order, one per microbatch

    reading = asyncio.create_task(reader())
    latencies, wall = await _drive(one, calls, in_flight)
    await call.done_writing()
    await reading
    return latencies, wall


# -- the ladder: from the raw stream to the stage, one layer at a time --

LADDER = ("ladder 1: raw grpc.aio bytes", "ladder 2: lean frames, bare server",
          "ladder 3: StageClient, bare server", "ladder 4: StageClient, relay stage")


async def _bare_server(address: str) -> None:
    """A Forward server that only parses each frame (wire/lean.py) and, at a microbatch's
    last byte, answers it with an `out` shaped like its last tensor (c: N × D), from a
    buffer kept for the purpose: the lean framing's floor, without the servicer."""
    import grpc
    from ditserve_client.proto.dit.v1 import stage_pb2

    from ditserve.common.grpc_options import server_options
    from ditserve.wire import LeanFrame, parse_request, serialize
    from ditserve.wire.codec import ELEMENT_SIZES

    zeros: dict[int, memoryview] = {}  # by size: one buffer per reply size

    async def forward(requests, context):
        await context.send_initial_metadata(())
        left: dict[int, tuple[int, Any]] = {}  # microbatch → (bytes still due, last spec)
        async for frame in requests:
            due, last = left.pop(frame.microbatch_id, (frame.payload_bytes, None))
            last = frame.tensors[-1] if frame.tensors else last
            due -= len(frame.chunk)
            if due > 0:
                left[frame.microbatch_id] = (due, last)
                continue
            size = math.prod(last.shape) * ELEMENT_SIZES[last.datatype]
            if size not in zeros:
                zeros[size] = memoryview(bytes(size))
            yield LeanFrame(stage_pb2.ForwardResponse(
                microbatch_id=frame.microbatch_id, payload_bytes=size,
                tensors=[{"name": "out", "datatype": last.datatype, "shape": last.shape}]),
                [zeros[size]])

    server = grpc.aio.server(options=server_options())
    handler = grpc.stream_stream_rpc_method_handler(
        forward, request_deserializer=parse_request, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "dit.v1.StageService", {"Forward": handler}),))
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def _lean_cells(s: Settings, address: str, tokens: int, width: int) -> list[dict]:
    """Rung 2: lean frames encoded per call on one stream (`call.write`, then `read`: no
    client machinery), each reply parsed."""
    import grpc
    from ditserve_client.proto.dit.v1 import stage_pb2

    from ditserve.common.grpc_options import channel_options
    from ditserve.stage.client import FORWARD_METHOD
    from ditserve.wire import lean_frames, parse_response, serialize

    cells = []
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
        call = channel.stream_stream(FORWARD_METHOD, request_serializer=serialize,
                                     response_deserializer=parse_response)()
        ids = itertools.count(1)
        for n in s.rows:
            h = torch.randn(n, tokens, width).bfloat16()
            c = torch.randn(n, width).bfloat16()

            async def one(h=h, c=c) -> None:
                for frame in lean_frames(stage_pb2.ForwardRequest, next(ids), [("h", h), ("c", c)]):
                    await call.write(frame)
                await call.read()

            nbytes = h.numel() * 2
            latencies, wall = await _drive(one, _calls(s, nbytes), 1)
            cells.append(_cell(LADDER[1], 1, n, 1, nbytes, latencies, wall, hops=1))
        await call.done_writing()
    return cells


def _ladder(s: Settings, folder: Path, tokens: int, width: int) -> list[dict]:
    """The four rungs, one after another, each on processes of its own."""
    cells = []
    raw, address = _raw_chain(s, 1)
    try:
        cells += [{**c, "path": LADDER[0]} for c in asyncio.run(
            _raw_cells(s, address, 1, tokens, width, in_flight=(1,), floor=False))]
    finally:
        _terminate(raw)
    bare_address = f"127.0.0.1:{free_port()}"
    bare = subprocess.Popen([sys.executable, "-m", "ditserve.bench.transport", "--bare",
                             bare_address], env={**os.environ, **thread_env(s.threads)})
    try:
        cells += asyncio.run(_lean_cells(s, bare_address, tokens, width))
        cells += [{**c, "path": LADDER[2]} for c in asyncio.run(_ditserve_cells(
            s, bare_address, "grpc", 1, tokens, width, in_flight=(1,)))]
    finally:
        _terminate([bare])
    chain = _relay_chain(s, 1, "grpc", folder)
    try:
        cells += [{**c, "path": LADDER[3]} for c in asyncio.run(_ditserve_cells(
            s, chain[0].address, "grpc", 1, tokens, width, in_flight=(1,)))]
    finally:
        _stop(chain)
    raw_of = {c["rows"]: c["gb_per_s"] for c in cells if c["path"] == LADDER[0]}
    for cell in cells:
        cell.pop("negotiated", None)
        cell["vs_raw"] = round(cell["gb_per_s"] / raw_of[cell["rows"]], 2)
    return cells


def _terminate(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
        process.wait(10)


def _memcpy_cells(s: Settings, tokens: int, width: int) -> list[dict]:
    cells = []
    for n in s.rows:
        h = torch.randn(n, tokens, width).bfloat16()
        target = torch.empty_like(h)
        times = []
        for _ in range(max(s.min_calls, 10)):
            began = time.perf_counter()
            target.copy_(h)
            times.append(time.perf_counter() - began)
        nbytes = h.numel() * 2
        cells.append({"path": "memcpy (torch copy_)", "stages": None, "rows": n,
                      "in_flight": None, "mib": round(nbytes / 2**20, 2),
                      "hop_ms": round(spread(times)["median"] * 1e3, 3),
                      "gb_per_s": round(nbytes / spread(times)["median"] / 1e9, 3),
                      "latencies_s": times})
    return cells


def run(s: Settings) -> Report:
    from ditserve.model import dit_config

    torch.set_num_threads(s.threads)
    config = dit_config(s.model, input_size=s.latent_size)
    tokens, width = config.num_tokens, config.hidden_size
    cells: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        for stages in s.stage_counts:
            raw, address = _raw_chain(s, stages)
            try:
                cells += asyncio.run(_raw_cells(s, address, stages, tokens, width))
            finally:
                _terminate(raw)
        for transport in s.transports:
            for stages in s.stage_counts:
                chain = _relay_chain(s, stages, transport, Path(folder))
                try:
                    cells += asyncio.run(_ditserve_cells(s, chain[0].address, transport,
                                                         stages, tokens, width))
                finally:
                    _stop(chain)
        ladder = _ladder(s, Path(folder), tokens, width) if s.ladder else []
    cells += _memcpy_cells(s, tokens, width)
    _ratios(cells)
    cells += ladder
    samples = {f"{c['path']} S={c['stages']} N={c['rows']} k={c['in_flight']}":
               {"latencies_s": c.pop("latencies_s"), "wall_s": c.pop("wall_s", None)}
               for c in cells}
    notes = [f"Relay stages ({s.model} width: T={tokens}, D={width}, h bf16; blocks skipped), "
             f"{s.threads} torch thread per process, on loopback; every stage and the bench "
             "client use the row's transport (shm: negotiated per stream by a probe).",
             "hop ms = median round trip at 1 in flight / S (the hops in series that carry h); "
             "GB/s = bytes of h × microbatches / wall: what each hop sustains.",
             f"Raw: grpc.aio bidi streams of {RAW_MESSAGE_BYTES >> 20} MiB bytes messages "
             "(no protobuf) through S bare relay processes (each message passed on as it "
             "arrives), one 1-byte ack per microbatch climbing back: S hops.",
             "vs raw = this row's GB/s / the raw chain's GB/s at the same S, rows and "
             "in-flight; measured in the same run, variants one after another."]
    if s.ladder:
        notes.append("Ladder rows (one hop, 1 in flight): raw bytes; lean frames written per "
                     "call to a bare Forward server that only parses each frame and answers "
                     "it; the StageClient to that bare server; the StageClient to a relay "
                     "stage. vs raw = against the ladder's own raw rung, measured just before.")
    columns = [("path", "path"), ("stages", "S"), ("rows", "rows"), ("mib", "MiB of h"),
               ("in_flight", "in flight"), ("hop_ms", "added ms per hop"),
               ("gb_per_s", "GB/s per hop"), ("vs_raw", "vs raw")]
    return Report("transport", cells, columns, samples, notes, asdict(s))


def _ratios(cells: list[dict]) -> None:
    raw = {(c["stages"], c["rows"], c["in_flight"]): c["gb_per_s"] for c in cells
           if c["path"].startswith("raw")}
    for cell in cells:
        base = raw.get((cell["stages"], cell["rows"], cell["in_flight"]))
        cell["vs_raw"] = round(cell["gb_per_s"] / base, 2) if base and cell["gb_per_s"] else None


if __name__ == "__main__":  # a raw server: address [next address]; or --bare address
    with contextlib.suppress(KeyboardInterrupt):
        if sys.argv[1] == "--bare":
            asyncio.run(_bare_server(sys.argv[2]))
        else:
            asyncio.run(_raw_server(sys.argv[1], *sys.argv[2:3]))
