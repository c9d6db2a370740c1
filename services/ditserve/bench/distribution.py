"""Cost of distribution: per-step latency of ONE request through 1, 2 and 4 stages.

One request of 2 images with guidance is a microbatch of 4 rows; a step is one model call.
The coordinator's engine is left out (it adds the same sampler arithmetic to every
variant): the benchmark calls the chain directly, the in-process monolith (LocalChain) or
stage 0 of a relay chain of stage processes on loopback (RemoteChain, bf16 wire).

Threads: one request keeps one stage busy at a time (step k+1 needs step k), so each stage
gets as many threads as the monolith (all the machine's cores by default): at any moment
the same cores compute, and the difference is the cost of the hops.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass

import torch

from .chains import Variant, forward, forward_seconds, guided_labels, open_variants
from .report import Report, fmt_spread, spread
from .weights import checkpoint, random_model


@dataclass
class Settings:
    """What `ditserve bench distribution` measures."""

    models: tuple[str, ...] = ("DiT-S/2", "DiT-B/2")
    """DiT configs, by name."""
    latent_size: int = 32
    """Latent side (image side / 8): 32 is 256 px."""
    stage_counts: tuple[int, ...] = (2, 4)
    """Chains of stage processes compared with the monolith."""
    rows: int = 4
    """Rows per step: 2 images with guidance."""
    rounds: int = 4
    """Alternations of all variants."""
    steps: int = 3
    """Timed steps per variant per round."""
    threads: int = 0
    """torch threads of the monolith; 0: all cores."""
    stage_threads: int = 0
    """torch threads of each stage process; 0: same as the monolith."""
    device: str = "cpu"
    """cpu or cuda."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(models=("DiT-Tiny/2",), latent_size=8, stage_counts=(2,), rounds=2, steps=2,
                   threads=1)


async def _measure_model(name: str, s: Settings, folder: str) -> tuple[list[dict], dict]:
    model = random_model(name, s.latent_size)
    path = checkpoint(model, folder)
    threads = s.stage_threads or s.threads
    x = torch.randn(s.rows, model.config.in_channels, s.latent_size, s.latent_size)
    t, y = torch.full((s.rows,), 500), guided_labels(s.rows, model.config.num_classes)
    async with AsyncExitStack() as stack:
        variants = await open_variants(stack, model, path, s.stage_counts,
                                       dict.fromkeys(s.stage_counts, threads), s.device)
        times = await _alternate(variants, s, x, t, y)
    base = spread(times["monolith"])["median"]
    rows = [{"model": name, "variant": v.name,
             "threads": f"{s.threads}" if v.stages == 1 else f"{v.stages}×{threads}",
             "step_ms": fmt_spread(spread(times[v.name]), 1e3),
             "ratio": spread(times[v.name])["median"] / base,
             "overhead_ms": fmt_spread(spread(times[f"{v.name} overhead"]), 1e3, 2),
             "ratio_spread": _round_ratios(times[v.name], times["monolith"], s.steps)}
            for v in variants]
    return rows, {f"{name} {k}": v for k, v in times.items()}


async def _alternate(variants: list[Variant], s: Settings, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor) -> dict[str, list[float]]:
    """Rounds of (each variant: `steps` timed calls), after two warm-up calls each."""
    for variant in variants:
        for _ in range(2):
            await forward(variant, x, t, y)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    times.update({f"{v.name} overhead": [] for v in variants})
    for r in range(s.rounds):
        for variant in (variants if r % 2 == 0 else variants[::-1]):
            for _ in range(s.steps):
                began = time.perf_counter()
                _, compute = await forward_seconds(variant, x, t, y)
                wall = time.perf_counter() - began
                times[variant.name].append(wall)
                times[f"{variant.name} overhead"].append(wall - sum(compute))
    return times


def _round_ratios(times: list[float], base: list[float], steps: int) -> str:
    """min–max over rounds of (round median / monolith's round median)."""
    import statistics
    ratios = [statistics.median(times[i:i + steps]) / statistics.median(base[i:i + steps])
              for i in range(0, len(times), steps)]
    return f"{min(ratios):.3f}–{max(ratios):.3f}"


async def _run(s: Settings) -> Report:
    rows, samples = [], {}
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        for name in s.models:
            model_rows, model_samples = await _measure_model(name, s, folder)
            rows += model_rows
            samples.update(model_samples)
    threads = s.stage_threads or s.threads
    notes = [f"One request, {s.rows} rows per step (2 images with guidance), latent "
             f"{s.latent_size} ({s.latent_size * 8} px), {s.device}; {s.rounds} rounds × "
             f"{s.steps} steps per variant, variants alternated within each round (odd rounds "
             "in reverse order).",
             "Chain driven directly (no coordinator): monolith = LocalChain in the benchmark "
             "process; N stages = RemoteChain to stage 0 of N `ditserve stage` processes on "
             "loopback, bf16 wire.",
             f"Threads: monolith {s.threads}; each stage {threads} (one request keeps one "
             "stage busy at a time, so the same cores compute at any moment).",
             "step ms = median [min–max] over all timed steps; ratio = median / monolith's "
             "median; ratio spread = min–max over rounds of the per-round ratio.",
             "not computing = step wall time − the sum of the stages' own compute seconds "
             "(reported with every reply): the hops, codec and scheduling, free of the noise "
             "that other processes add to the compute itself."]
    columns = [("model", "model"), ("variant", "variant"), ("threads", "threads"),
               ("step_ms", "step ms"), ("ratio", "× monolith"), ("ratio_spread", "ratio spread"),
               ("overhead_ms", "not computing, ms")]
    return Report("distribution", rows, columns, samples, notes, asdict(s))


def run(s: Settings) -> Report:
    s.threads = s.threads or os.cpu_count() or 1
    torch.set_num_threads(s.threads)
    return asyncio.run(_run(s))
