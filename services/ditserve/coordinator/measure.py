"""Throughput and stage utilisation of continuous batching through real stage processes.

    python -m ditserve.coordinator.measure --model DiT-S/2 --input-size 32 --stages 2 \\
        --steps 20 --guidance 4 --concurrency 1 4 8

Starts the stages as `ditserve stage` subprocesses on loopback (random weights), drives
`concurrency` simultaneous one-image requests through an Engine over RemoteChain, and
reports images/s and each stage's utilisation = its own compute seconds (reported with
every reply) / wall time while the requests ran.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ditserve.config import CoordinatorConfig
from ditserve.model import DiTConfig

from .engine import Engine
from .spec import GenerationSpec


@dataclass
class LoadResult:
    """One measured run."""

    concurrency: int
    images: int
    wall_seconds: float
    images_per_second: float
    utilisation: list[float]
    """Busy fraction of each stage, in chain order."""


async def run_load(chain, model: DiTConfig, num_stages: int, concurrency: int,
                   steps: int = 20, sampler: str = "ddim", guidance: float = 4.0,
                   config: CoordinatorConfig | None = None) -> LoadResult:
    """`concurrency` one-image requests at once through `chain`; waits for all."""
    engine = Engine(chain, model, config or CoordinatorConfig(max_rows_per_microbatch=32),
                    num_stages)
    specs = [GenerationSpec(f"load-{i}", (i % model.num_classes,), seed=i, sampler=sampler,
                            num_steps=steps, guidance_scale=guidance, skip_images=True)
             for i in range(concurrency)]
    started = time.monotonic()
    handles = [engine.submit(spec) for spec in specs]
    for handle in handles:
        async for _ in handle.events():
            pass
    wall = time.monotonic() - started
    busy = engine.stage_busy_seconds
    return LoadResult(concurrency, concurrency, wall, concurrency / wall,
                      [b / wall for b in busy])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_checkpoint(name: str, input_size: int, path: Path, num_classes: int = 1000) -> Path:
    import torch

    from ditserve.model import DiT, dit_config, save_ditserve

    torch.manual_seed(0)
    model = DiT(dit_config(name, input_size=input_size, num_classes=num_classes))
    save_ditserve(model.state_dict().items(), model.config, path)
    return path


def start_stages(checkpoint: Path, stages: int, log_dir: Path,
                 wire_dtype: str = "bf16") -> tuple[list[subprocess.Popen], str]:
    """`stages` stage processes (1 compute thread each), chained; returns them and the
    address of stage 0 once every one is SERVING."""
    ports = [free_port() for _ in range(stages)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i, port in enumerate(ports):
        args = [sys.executable, "-m", "ditserve.cli", "stage", "--checkpoint", str(checkpoint),
                "--stage", str(i), "--stages", str(stages), "--listen", f"127.0.0.1:{port}",
                "--wire-dtype", wire_dtype, "--threads", "1"]
        if i + 1 < stages:
            args += ["--next", f"127.0.0.1:{ports[i + 1]}"]
        log = open(log_dir / f"stage{i}.log", "wb")  # noqa: SIM115 (lives with the process)
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env))
    for port in ports:
        _wait_serving(f"127.0.0.1:{port}")
    return procs, f"127.0.0.1:{ports[0]}"


def _wait_serving(address: str, timeout: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"stage at {address} not SERVING after {timeout} s")


async def _measure(address: str, model: DiTConfig, stages: int, args) -> list[LoadResult]:
    from ditserve.chain.remote import RemoteChain

    chain = RemoteChain(address)
    try:
        await run_load(chain, model, stages, 1, steps=2)  # warm the connections
        return [await run_load(chain, model, stages, n, args.steps, args.sampler,
                               args.guidance) for n in args.concurrency]
    finally:
        await chain.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--wire-dtype", default="bf16")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = random_checkpoint(args.model, args.input_size, Path(tmp) / "dit.safetensors")
        from ditserve.model import open_checkpoint

        model = open_checkpoint(checkpoint).config
        procs, address = start_stages(checkpoint, args.stages, Path(tmp), args.wire_dtype)
        try:
            results = asyncio.run(_measure(address, model, args.stages, args))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    print(f"{args.model} input {args.input_size}, {args.stages} stages, {args.sampler} "
          f"{args.steps} steps, guidance {args.guidance}, wire {args.wire_dtype}")
    for r in results:
        util = " ".join(f"{u:.0%}" for u in r.utilisation)
        print(f"concurrency {r.concurrency:2d}: {r.images_per_second:.3f} images/s "
              f"({r.wall_seconds:.1f} s), stage utilisation {util}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
