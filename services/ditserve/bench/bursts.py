"""Bursts: does memory come back after each abuse probe, or grow burst after burst?

    ditserve bench bursts --set bursts=5

One `ditserve up` (soak.py's Pipeline: a random checkpoint of `model`, `stages` stage
processes, the demo VAE as decoder). After a warm-up request, every service's VmRSS is
the baseline; then `bursts` bursts of each probe of issue #14, in turn:

- large requests: `large_requests` concurrent GenerateRequests of `large_request_mib` MiB
  to the coordinator's public port (each must be refused RESOURCE_EXHAUSTED);
- announced payloads: `announce_streams` raw Forward streams on stage 0, each sending
  `announce_per_stream` first frames that announce the largest microbatch and none of its
  bytes (the last one on each stream must be refused RESOURCE_EXHAUSTED), then closed.

After each burst the harness waits `settle` seconds, sends one real request (which must
complete: the services serve on) and reads every service's VmRSS. A service whose RSS
climbs by a similar step after every burst is leaking; one that jumps once and stays is
its allocator keeping a high-water mark.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from . import soak
from .report import Report

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """What `ditserve bench bursts` runs."""

    model: str = "DiT-S/2"
    """DiT config by name (random weights, 1000 classes)."""
    latent_size: int = 16
    """Latent side (16 is 128 px)."""
    stages: int = 2
    """Stage processes (1 compute thread each)."""
    bursts: int = 5
    """Bursts of each probe."""
    large_requests: int = 10
    """Concurrent oversized GenerateRequests per burst."""
    large_request_mib: int = 60
    """Size of each (its request_id), far above the coordinator's receive limit."""
    announce_streams: int = 8
    """Raw Forward streams on stage 0 per burst."""
    announce_per_stream: int = 257
    """First frames per stream, each announcing the largest microbatch (one past the
    stage's in-flight limit of 256 per stream, so the last is refused)."""
    settle: float = 3.0
    """Seconds after a burst before the probe request and the RSS reading."""
    steps: int = 4
    """ddim steps of the request sent after each burst."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(latent_size=8, bursts=2, large_requests=3, large_request_mib=8,
                   announce_streams=2, settle=1.0, steps=2)


# ---- the probes --------------------------------------------------------------------------

def large_request_burst(target: str, s: Settings) -> dict[str, int]:
    """`large_requests` oversized Generate calls at once; their status codes, counted."""
    from ditserve_client.proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc

    huge = coordinator_pb2.GenerateRequest(class_labels=[1],
                                           request_id="x" * (s.large_request_mib << 20))
    with grpc.insecure_channel(target) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

        def send(_: int) -> str:
            try:
                list(stub.Generate(huge, timeout=120))
            except grpc.RpcError as error:
                return error.code().name
            return "OK"

        with ThreadPoolExecutor(s.large_requests) as pool:
            codes = list(pool.map(send, range(s.large_requests)))
    return {code: codes.count(code) for code in sorted(set(codes))}


def announce_burst(stage_address: str, s: Settings) -> dict[str, int]:
    """`announce_streams` streams of announcements without payload, held open until the
    stage refuses the last one; the code of that last reply per stream, counted."""
    import torch
    from ditserve_client.proto.dit.v1 import stage_pb2, stage_pb2_grpc

    from ditserve.common.errors import error_from_status
    from ditserve.common.grpc_options import channel_options
    from ditserve.wire import encode_frames

    with grpc.insecure_channel(stage_address, options=channel_options()) as channel:
        stub = stage_pb2_grpc.StageServiceStub(channel)
        info = stub.DescribeChain(stage_pb2.DescribeChainRequest(), timeout=30).stages[0]
        n, side = info.max_batch_size, s.latent_size
        largest = [("x", torch.zeros(n, 4, side, side)), ("t", torch.zeros(n, dtype=torch.long)),
                   ("y", torch.zeros(n, dtype=torch.long))]
        first = encode_frames(stage_pb2.ForwardRequest, 0, largest)[0]
        first.chunk, first.offset = b"", 0  # the announcement alone

        def one_stream(_: int) -> str:
            requests: queue.Queue = queue.Queue()
            call = stub.Forward(iter(requests.get, None), timeout=120)
            for mb_id in range(s.announce_per_stream):
                frame = stage_pb2.ForwardRequest()
                frame.CopyFrom(first)
                frame.microbatch_id = mb_id
                requests.put(frame)
            code = "no reply"
            try:
                for reply in call:
                    if reply.microbatch_id == s.announce_per_stream - 1:
                        code = (error_from_status(reply.error).code.value
                                if reply.HasField("error") else "OK")
                        break
            except grpc.RpcError as error:
                code = f"stream {error.code().name}"
            finally:
                requests.put(None)
                call.cancel()
            return code

        with ThreadPoolExecutor(s.announce_streams) as pool:
            codes = list(pool.map(one_stream, range(s.announce_streams)))
    return {code: codes.count(code) for code in sorted(set(codes))}


async def serve_one(target: str, s: Settings) -> float:
    """One real request after a burst; its seconds (raises if it fails)."""
    from ditserve_client import AsyncClient

    started = time.monotonic()
    async with AsyncClient(target, timeout=300) as client:
        await client.generate_result([1], seed=0, steps=s.steps, sampler="ddim",
                                     image_format="jpeg")
    return time.monotonic() - started


# ---- the run -----------------------------------------------------------------------------

def run(s: Settings) -> Report:
    pipeline_settings = soak.Settings(model=s.model, latent_size=s.latent_size,
                                      stages=s.stages, steps=s.steps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-bursts-") as tmp:
        pipeline = soak.Pipeline(pipeline_settings, Path(tmp)).start()
        stage0 = f"127.0.0.1:{pipeline.port + 2}"  # config.local_config's layout
        try:
            asyncio.run(serve_one(pipeline.target, s))
            rows.append(_row(pipeline, "baseline", 0, {}, None))
            probes = (("large requests", lambda: large_request_burst(pipeline.target, s)),
                      ("announced payloads", lambda: announce_burst(stage0, s)))
            for name, burst in probes:
                for i in range(1, s.bursts + 1):
                    codes = burst()
                    time.sleep(s.settle)
                    seconds = asyncio.run(serve_one(pipeline.target, s))
                    rows.append(_row(pipeline, name, i, codes, seconds))
                    log.info("%s burst %d: %s", name, i, rows[-1])
            restarts = pipeline.restarts()
        finally:
            pipeline.stop()
    services = sorted({k for row in rows for k in row if k.startswith("rss ")})
    columns = [("probe", "probe"), ("burst", "burst"), ("codes", "answers")]
    columns += [(k, f"{k.removeprefix('rss ')} RSS MiB") for k in services]
    columns += [("request_s", "request after, s")]
    notes = [f"`ditserve up`: {s.model} (random weights) at latent {s.latent_size}, "
             f"{s.stages} stages (1 thread each), demo VAE decoder; after each burst "
             f"{s.settle:g} s of rest, then one {s.steps}-step request (it completed every "
             "time), then VmRSS of each service.",
             f"large requests: {s.large_requests} concurrent {s.large_request_mib} MiB "
             f"GenerateRequests; announced payloads: {s.announce_streams} streams x "
             f"{s.announce_per_stream} first frames of the largest microbatch on stage 0.",
             "Restarts by the launcher during the run: "
             + (", ".join(f"{n} {c}x" for n, c in sorted(restarts.items())) or "none") + "."]
    return Report("bursts", rows, columns, {"restarts": dict(restarts)}, notes, asdict(s))


def _row(pipeline: soak.Pipeline, probe: str, burst: int, codes: dict[str, int],
         seconds: float | None) -> dict:
    row = {"probe": probe, "burst": burst,
           "codes": ", ".join(f"{n}x {code}" for code, n in codes.items()) or "–",
           "request_s": None if seconds is None else round(seconds, 2)}
    for name, pid in sorted(pipeline.services().items()):
        rss = soak.rss_mib(pid)
        row[f"rss {name}"] = None if rss is None else round(rss)
    return row

