"""The peer: diffusers' DiTPipeline against ditserve, same weights, sampler, steps, threads.

diffusers gets the same random DiT converted to `DiTTransformer2DModel` (weights.py), a
small random `AutoencoderKL` and `DDIMScheduler` with DiT's linear betas. It is driven as
its users drive it: one pipeline call per request (concurrent requests wait their turn),
and, at more than one client, one call with a batch of all the labels. ditserve runs its
engine (continuous batching) over the in-process monolith and over 2 stage processes, and
decodes each finished request's latents with the SAME VAE, so both sides do the same work.
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
from ditserve.stage.runner import compute_dtype

from .chains import Variant, open_variants
from .report import Report, spread
from .weights import checkpoint, diffusers_transformer, random_model


@dataclass
class Settings:
    """What `ditserve bench peer` measures."""

    model: str = "DiT-S/2"
    """DiT config by name."""
    latent_size: int = 16
    """Latent side: 16 is 128 px."""
    clients: tuple[int, ...] = (1, 16)
    """Concurrent requests of one image each."""
    steps: int = 20
    """ddim steps."""
    guidance: float = 4.0
    """Guidance scale (both sides run conditional and null rows in one batch)."""
    rounds: int = 2
    """Alternations of all variants (odd rounds in reverse order)."""
    threads: int = 0
    """torch threads of everything in the benchmark process; 0: all cores."""
    stage_counts: tuple[int, ...] = (2,)
    """ditserve chains of stage processes (one thread per stage when 2 on 2 cores)."""
    device: str = "cpu"
    """cpu or cuda."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-Tiny/2", latent_size=8, clients=(1, 2), steps=2, rounds=1,
                   threads=1)


def small_vae(device: str = "cpu"):
    """A small random AutoencoderKL (4 latent channels, 8× upsampling, SD's scaling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=32,
                         scaling_factor=0.18215).to(device).eval().requires_grad_(False)


def pipeline(model, vae, device: str = "cpu"):
    from diffusers import DDIMScheduler, DiTPipeline

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                              beta_schedule="linear", clip_sample=False)
    pipe = DiTPipeline(diffusers_transformer(model).to(device), vae, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """What DiTPipeline does after its loop: (n, 4, L, L) → (n, 3, 8L, 8L) in [0, 1]."""
    with torch.inference_mode():  # in the VAE's dtype: bf16 on a GPU (see _run)
        samples = vae.decode(latents.to(vae.device, vae.dtype)
                             / vae.config.scaling_factor).sample
    return (samples / 2 + 0.5).clamp(0, 1)


def _diffusers_per_request(pipe, clients: int, s: Settings) -> float:
    for i in range(clients):
        pipe([i % 1000], guidance_scale=s.guidance, num_inference_steps=s.steps,
             generator=torch.Generator().manual_seed(i), output_type="pt")
    return clients


def _diffusers_batched(pipe, clients: int, s: Settings) -> float:
    pipe([i % 1000 for i in range(clients)], guidance_scale=s.guidance,
         num_inference_steps=s.steps, generator=torch.Generator().manual_seed(0),
         output_type="pt")
    return clients


async def _ditserve(variant: Variant, vae, clients: int, s: Settings, config) -> float:
    rows = 2 * clients
    engine = Engine(variant.chain, config, CoordinatorConfig(
        max_rows_per_microbatch=max(2, min(32, rows)), max_queued_requests=256,
        microbatches_in_flight=variant.stages), variant.stages)

    async def one(i: int) -> None:
        spec = GenerationSpec(request_id=f"r{i}", labels=(i % 1000,), seed=i, sampler="ddim",
                              num_steps=s.steps, guidance_scale=s.guidance, skip_images=True,
                              return_latents=True)
        async for event in engine.submit(spec).events():
            latents = getattr(event, "latents", None)
        await asyncio.to_thread(decode, vae, latents)

    await asyncio.gather(*(one(i) for i in range(clients)))
    await engine.close()
    return clients


async def _timed(fn, *args) -> float:
    began = time.perf_counter()
    result = fn(*args)
    images = await result if asyncio.iscoroutine(result) else result
    return images / (time.perf_counter() - began)


async def _run(s: Settings) -> Report:
    model = random_model(s.model, s.latent_size)
    vae = small_vae(s.device)
    # diffusers in the stages' compute dtype (bf16 on a GPU, the VAE with it), or the
    # comparison would time fp32 kernels against ditserve's bf16 ones.
    pipe = pipeline(model, vae, s.device).to(s.device, compute_dtype(s.device))
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        path = checkpoint(model, folder)
        async with AsyncExitStack() as stack:
            threads = {n: max(1, s.threads // n) for n in s.stage_counts}
            variants = await open_variants(stack, model, path, s.stage_counts, threads, s.device)
            samples = await _rounds(pipe, variants, vae, model.config, s)
    return _report(samples, s, threads)


async def _rounds(pipe, variants: list[Variant], vae, config, s: Settings) -> dict:
    runs = {"diffusers, one call per request": lambda c: _timed(_diffusers_per_request, pipe, c, s),
            "diffusers, one batched call": lambda c: _timed(_diffusers_batched, pipe, c, s)}
    for v in variants:
        runs[f"ditserve {v.name}"] = lambda c, v=v: _timed(_ditserve, v, vae, c, s, config)
    for run in runs.values():  # warm-up
        await run(1)
    samples: dict[int, dict[str, list[float]]] = {c: {n: [] for n in runs} for c in s.clients}
    for r in range(s.rounds):
        for clients in s.clients:
            for name, run in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
                if clients == 1 and "batched" in name:
                    continue  # the same call as one per request
                samples[clients][name].append(await run(clients))
    return samples


def _report(samples: dict, s: Settings, threads: dict[int, int]) -> Report:
    rows = []
    for clients, by_name in samples.items():
        stats = {n: spread(v) for n, v in by_name.items() if v}
        peer = max(stats[n]["median"] for n in stats if n.startswith("diffusers"))
        for name, st in stats.items():
            rows.append({"clients": clients, "variant": name,
                         "images_per_s": f"{st['median']:.3f} [{st['min']:.3f}–{st['max']:.3f}]",
                         "vs_peer": st["median"] / peer})
    notes = [f"{s.model}, latent {s.latent_size} ({s.latent_size * 8} px), DDIM {s.steps} steps, "
             f"guidance {s.guidance}, 1 image per request, VAE decode included on both sides "
             f"(the same small random AutoencoderKL); {s.rounds} round(s), variants alternated.",
             f"Threads: {s.threads} for diffusers and the in-process ditserve monolith; stage "
             "processes " + ", ".join(f"{n} × {t}" for n, t in threads.items()) + ".",
             "ditserve = its engine in the benchmark process (no gRPC front end); × best "
             "diffusers = median / the faster diffusers way at that client count."]
    columns = [("clients", "clients"), ("variant", "variant"), ("images_per_s", "images/s"),
               ("vs_peer", "× best diffusers")]
    return Report("peer", rows, columns, {str(c): v for c, v in samples.items()}, notes, asdict(s))


def run(s: Settings) -> Report:
    s.threads = s.threads or os.cpu_count() or 1
    torch.set_num_threads(s.threads)
    return asyncio.run(_run(s))
