"""Throughput under load: images/s with 1, 4 and 16 concurrent clients.

The coordinator's engine (continuous batching at step granularity) runs in the benchmark
process and drives each variant's chain; clients are asyncio tasks that submit requests
(1 image, guidance 4, ddim) straight to the engine, so the gRPC front end of the
coordinator is left out of every variant alike. Variants:

- one at a time: the monolith serving one request at a time (a microbatch of its 2 rows);
- monolith: the in-process chain with the engine batching every active request into one
  microbatch (the best a single process does on these cores);
- N stages: N stage processes on loopback, N microbatches in flight.

Stage utilisation is each stage's compute seconds (as the stages report them with every
reply) over the wall time; the bubble is 1 − the mean utilisation (GPipe).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass

import torch

from ditserve.config import CoordinatorConfig
from ditserve.coordinator.engine import Engine
from ditserve.coordinator.spec import GenerationSpec
from ditserve.model import DiTConfig

from .chains import Variant, open_variants
from .report import Report, spread
from .weights import checkpoint, random_model


@dataclass
class Settings:
    """What `ditserve bench throughput` measures."""

    model: str = "DiT-S/2"
    """DiT config by name."""
    latent_size: int = 16
    """Latent side: 16 is 128 px (32, i.e. 256 px, takes ~4× longer on a CPU)."""
    clients: tuple[int, ...] = (1, 4, 16)
    """Concurrent clients, each with one request at a time."""
    requests_per_client: int = 1
    """Requests each client sends back to back."""
    steps: int = 20
    """ddim steps per request."""
    stage_counts: tuple[int, ...] = (2, 4)
    """Chains of stage processes."""
    rounds: int = 2
    """Alternations of all variants at each client count (odd rounds in reverse order, so
    that a drift in the machine's load does not favour the variant that runs first)."""
    threads: int = 0
    """torch threads of the in-process variants; 0: all cores."""
    stage_threads: int = 0
    """threads per stage process; 0: cores / stages (at least 1)."""
    monolith_threads: tuple[int, ...] = (0, 1)
    """Thread counts of the in-process monolith (0: `threads`): on a shared machine one
    thread can beat two (a descheduled OpenMP thread stalls every parallel region), so the
    best single process is looked for, not assumed."""
    one_at_a_time_requests: int = 4
    """Requests the one-at-a-time server runs at each client count (its rate does not
    depend on the number of clients; more would only take longer)."""
    max_rows: int = 32
    """Most rows per microbatch (32 = 16 guided images)."""
    device: str = "cpu"
    """cpu or cuda."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-Tiny/2", latent_size=8, clients=(1, 4), steps=3,
                   stage_counts=(2,), rounds=1, threads=1, monolith_threads=(0,))


def _engine(variant: Variant, config: DiTConfig, s: Settings, one_at_a_time: bool) -> Engine:
    rows = 2 if one_at_a_time else s.max_rows
    coordinator = CoordinatorConfig(max_rows_per_microbatch=rows, max_queued_requests=256,
                                    microbatches_in_flight=variant.stages)
    return Engine(variant.chain, config, coordinator, variant.stages)


async def _client(engine: Engine, index: int, s: Settings) -> None:
    for k in range(s.requests_per_client):
        spec = GenerationSpec(request_id=f"c{index}-{k}", labels=(index % 1000,), seed=index,
                              sampler="ddim", num_steps=s.steps, guidance_scale=4.0,
                              skip_images=True)
        async for _ in engine.submit(spec).events():
            pass


async def _measure(variant: Variant, config: DiTConfig, s: Settings, clients: int,
                   one_at_a_time: bool = False) -> dict:
    engine = _engine(variant, config, s, one_at_a_time)
    if one_at_a_time:
        clients = min(clients, s.one_at_a_time_requests)
    began = time.perf_counter()
    await asyncio.gather(*(_client(engine, i, s) for i in range(clients)))
    wall = time.perf_counter() - began
    await engine.close()
    busy = engine.stage_busy_seconds or [0.0]
    return {"images_per_s": clients * s.requests_per_client / wall, "wall_s": wall,
            "utilisation": [b / wall for b in busy],
            "bubble": 1 - sum(busy) / (len(busy) * wall)}


async def _run(s: Settings) -> Report:
    model = random_model(s.model, s.latent_size)
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        path = checkpoint(model, folder)
        async with AsyncExitStack() as stack:
            threads = {n: s.stage_threads or max(1, (os.cpu_count() or 1) // n)
                       for n in s.stage_counts}
            mono = tuple(t or s.threads for t in s.monolith_threads)
            variants = await open_variants(stack, model, path, s.stage_counts, threads,
                                           s.device, monolith_threads=mono)
            samples = await _rounds(variants, model.config, s)
    return _report(samples, s, threads)


async def _rounds(variants: list[Variant], config: DiTConfig, s: Settings) -> dict:
    """samples[clients][variant name] = [measurement per round]."""
    named = [("one at a time", variants[0], True)] + [(v.name, v, False) for v in variants]
    await _measure(variants[0], config, Settings(**{**asdict(s), "steps": 1}), 1)  # warm-up
    samples: dict[int, dict[str, list[dict]]] = {c: {n: [] for n, _, _ in named} for c in s.clients}
    for r in range(s.rounds):
        for clients in s.clients:
            for name, variant, one in (named if r % 2 == 0 else named[::-1]):
                samples[clients][name].append(await _measure(variant, config, s, clients, one))
    return samples


def _threads(name: str, stage_threads: dict[int, int], s: Settings) -> str:
    if "stages" in name:
        n = int(name.split()[0])
        return f"{n}×{stage_threads[n]}"
    return name.rsplit(", ", 1)[1].split()[0] if ", " in name else str(s.threads)


def _report(samples: dict, s: Settings, threads: dict[int, int]) -> Report:
    rows = []
    for clients, by_variant in samples.items():
        medians = {n: spread([m["images_per_s"] for m in ms]) for n, ms in by_variant.items()}
        best_single = max(st["median"] for n, st in medians.items() if "stages" not in n)
        for name, stats in medians.items():
            last = by_variant[name][-1]
            rows.append({"clients": clients, "variant": name,
                         "images_per_s": f"{stats['median']:.3f} [{stats['min']:.3f}–{stats['max']:.3f}]",
                         "vs_batched": stats["median"] / medians["monolith"]["median"],
                         "vs_one": stats["median"] / medians["one at a time"]["median"],
                         "vs_best_single": stats["median"] / best_single,
                         "threads": _threads(name, threads, s),
                         "utilisation": " / ".join(f"{u:.2f}" for u in last["utilisation"]),
                         "bubble": round(last["bubble"], 3)})
    cores = os.cpu_count()
    notes = [f"{s.model}, latent {s.latent_size} ({s.latent_size * 8} px), ddim {s.steps} steps, "
             f"1 image per request with guidance 4 (2 rows), {s.requests_per_client} request(s) "
             f"per client, {s.rounds} round(s), variants alternated at each client count.",
             "Engine (continuous batching) in the benchmark process, clients submit to it "
             "directly (no coordinator gRPC front end, in every variant alike).",
             f"Threads: in-process variants {s.threads} on {cores} cores; stage processes "
             + ", ".join(f"{n} stages × {t}" for n, t in threads.items()) + ".",
             "utilisation = each stage's compute seconds / wall (last round); bubble = 1 − "
             "mean utilisation. images/s = median [min–max] over rounds.",
             f"one at a time = the monolith ({s.threads} threads) with room for one request "
             f"(2 rows), measured over min(clients, {s.one_at_a_time_requests}) requests. "
             "best single process = the best in-process variant at that client count."]
    columns = [("clients", "clients"), ("variant", "variant"), ("threads", "threads"),
               ("images_per_s", "images/s"), ("vs_one", "× one at a time"),
               ("vs_batched", "× monolith"), ("vs_best_single", "× best single process"),
               ("utilisation", "stage utilisation"), ("bubble", "bubble")]
    raw = {str(c): v for c, v in samples.items()}
    return Report("throughput", rows, columns, raw, notes, asdict(s))


def run(s: Settings) -> Report:
    s.threads = s.threads or os.cpu_count() or 1
    torch.set_num_threads(s.threads)
    return asyncio.run(_run(s))
