"""Load: images/s and stage utilisation of continuous batching through real stage
processes, at each number of simultaneous requests.

    ditserve bench load --set concurrency=1,4,8 --set stages=2

Starts the stages as `ditserve stage` processes on loopback (random weights, procs.py),
drives `concurrency` simultaneous one-image requests through an Engine over RemoteChain,
and reports images/s and each stage's utilisation = its own compute seconds (reported with
every reply) / wall time while the requests ran. (`ditserve bench throughput` compares the
same engine against the monolith.)
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ditserve.config import CoordinatorConfig
from ditserve.coordinator.engine import Engine
from ditserve.coordinator.spec import GenerationSpec
from ditserve.model import DiTConfig

from .procs import StageProcesses
from .report import Report


@dataclass
class Settings:
    """What `ditserve bench load` measures."""

    model: str = "DiT-S/2"
    """DiT config by name (random weights)."""
    latent_size: int = 32
    """Latent side (32 is 256 px)."""
    stages: int = 2
    """Stage processes, 1 compute thread each."""
    steps: int = 20
    """Denoising steps per request."""
    sampler: str = "ddim"
    """Sampler of every request."""
    guidance: float = 4.0
    """Guidance scale of every request (2 rows per image)."""
    wire_dtype: str = "bf16"
    """Activation dtype between stages."""
    concurrency: tuple[int, ...] = (1, 4, 8)
    """Simultaneous one-image requests, one run each."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-S/2", latent_size=8, steps=2, concurrency=(1, 2))


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


def random_checkpoint(name: str, input_size: int, path: Path, num_classes: int = 1000) -> Path:
    import torch

    from ditserve.model import DiT, dit_config, save_ditserve

    torch.manual_seed(0)
    model = DiT(dit_config(name, input_size=input_size, num_classes=num_classes))
    save_ditserve(model.state_dict().items(), model.config, path)
    return path


async def _measure(address: str, model: DiTConfig, s: Settings) -> list[LoadResult]:
    from ditserve.chain.remote import RemoteChain

    chain = RemoteChain(address)
    try:
        await run_load(chain, model, s.stages, 1, steps=2)  # warm the connections
        return [await run_load(chain, model, s.stages, n, s.steps, s.sampler, s.guidance)
                for n in s.concurrency]
    finally:
        await chain.close()


def run(s: Settings) -> Report:
    from ditserve.model import open_checkpoint

    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as tmp:
        checkpoint = random_checkpoint(s.model, s.latent_size, Path(tmp) / "dit.safetensors")
        model = open_checkpoint(checkpoint).config
        with StageProcesses(checkpoint, s.stages, threads=1, wire_dtype=s.wire_dtype) as procs:
            results = asyncio.run(_measure(procs.address, model, s))
    rows = [{"concurrency": r.concurrency, "images_per_s": round(r.images_per_second, 3),
             "wall_s": round(r.wall_seconds, 1),
             "utilisation": " / ".join(f"{u:.0%}" for u in r.utilisation)} for r in results]
    notes = [f"{s.model} at latent {s.latent_size}, {s.stages} stage processes (1 thread "
             f"each), {s.sampler} {s.steps} steps, guidance {s.guidance}, wire {s.wire_dtype}; "
             "one-image requests submitted at once to an Engine in this process.",
             "Utilisation: each stage's compute seconds (reported with every reply) / wall "
             "time, in chain order."]
    columns = [("concurrency", "requests at once"), ("images_per_s", "images/s"),
               ("wall_s", "wall (s)"), ("utilisation", "stage utilisation")]
    return Report("load", rows, columns, {"results": [asdict(r) for r in results]}, notes,
                  asdict(s))
