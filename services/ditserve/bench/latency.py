"""Latency of one request: exact vs async mode on the same stage processes (issue 18).

A lone exact request keeps one of S stages busy at a time; an async one (scheduler.py,
"Async mode") keeps all S busy on stale activations. Variants, each serving one request
at a time through the coordinator's engine in the benchmark process:

- monolith: the in-process chain with `monolith_threads` torch threads (exact);
- N stages, exact / N stages, async: the SAME N stage processes (one thread each), the
  two modes alternated request by request, so both see the same load.

The goal of the issue: async ≤ 1/S + 0.15 of exact's latency. It needs S free cores: with
more stage processes than cores, the stages take turns at the cores and async can only
use the cores there are.

`--set quality=true` measures quality instead, on the embedded demo model (whatever
weights the checkout holds): for each stage count and warm-up W, the judges' class
accuracy over `quality_per_class` images of each class and the distance of the latents
to exact's at the same seeds, through an in-process chain (numerically a remote one:
chain/local.py) with the bf16 wire.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass

import torch

from ditserve.chain.local import LocalChain
from ditserve.config import CoordinatorConfig
from ditserve.coordinator.engine import Engine
from ditserve.coordinator.spec import GenerationSpec
from ditserve.model import DiT, load_dit

from .chains import Variant, open_variants
from .report import Report, fmt_spread, spread
from .weights import checkpoint, random_model

DEMO = "demo"
"""`model` naming the embedded demo model (its weights, not random ones)."""


@dataclass
class Settings:
    """What `ditserve bench latency` measures."""

    model: str = "DiT-S/2"
    """DiT config by name (random weights), or "demo" for the embedded demo model."""
    latent_size: int = 16
    """Latent side of a random model (16 is 128 px); the demo model has its own (8)."""
    runs: tuple[str, ...] = ("ddim:50", "ddpm:250")
    """sampler:steps of each measured request (guidance `guidance`)."""
    guidance: float = 4.0
    """Guidance scale: 2 rows per image."""
    stage_counts: tuple[int, ...] = (2, 4)
    """Chains of stage processes (one torch thread each)."""
    warmup: int = 5
    """Exact warm-up steps of the async requests."""
    rounds: int = 3
    """Requests per variant and run, alternated between the variants."""
    monolith_threads: int = 2
    """torch threads of the in-process monolith."""
    device: str = "cpu"
    """cpu or cuda."""
    quality: bool = False
    """Measure quality on the demo model instead of latency (module docstring)."""
    quality_warmups: tuple[int, ...] = (0, 2, 5, 10)
    """Warm-up steps W of the quality table."""
    quality_stages: tuple[int, ...] = (2, 4)
    """Stage counts of the quality table (the depth of the pipelining)."""
    quality_runs: tuple[str, ...] = ("ddim:50",)
    """sampler:steps of the quality table."""
    quality_x0_trends: tuple[float, ...] = (0.5,)
    """`coordinator.async_x0_trend` values of the quality table (sampling/stale.py)."""
    quality_per_class: int = 40
    """Images of each of the demo model's 10 classes per table row: 400 images put one
    standard error of an accuracy near 90 % at 1.5 points (100 images: 3 points, as large
    as the gap between exact and async)."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-Tiny/2", latent_size=8, runs=("ddim:6",), stage_counts=(2,),
                   warmup=1, rounds=1, monolith_threads=1, quality_warmups=(0, 2),
                   quality_stages=(2,), quality_runs=("ddim:6",), quality_per_class=1)


def _run_settings(runs: tuple[str, ...]) -> list[tuple[str, int]]:
    out = []
    for run in runs:
        sampler, _, steps = run.partition(":")
        out.append((sampler, int(steps)))
    return out


def _spec(name: str, labels: tuple[int, ...], seed: int, sampler: str, steps: int,
          guidance: float, mode: str, warmup: int) -> GenerationSpec:
    return GenerationSpec(request_id=name, labels=labels, seed=seed, sampler=sampler,
                          num_steps=steps, guidance_scale=guidance, skip_images=True,
                          return_latents=True, mode=mode,
                          async_warmup_steps=warmup if mode == "async" else 0)


async def _generate(engine: Engine, spec: GenerationSpec) -> torch.Tensor:
    """The request's final latents (n, C, L, L); a failure is raised."""
    latents = None
    async for event in engine.submit(spec).events():
        latents = getattr(event, "latents", latents)
    assert latents is not None
    return latents


def _engine(variant: Variant, model: DiT) -> Engine:
    config = CoordinatorConfig(max_rows_per_microbatch=32, microbatches_in_flight=variant.stages)
    return Engine(variant.chain, model.config, config, variant.stages)


# -- latency ------------------------------------------------------------------------------


async def _latency(variant: Variant, model: DiT, spec: GenerationSpec) -> float:
    engine = _engine(variant, model)
    began = time.perf_counter()
    await _generate(engine, spec)
    seconds = time.perf_counter() - began
    await engine.close()
    return seconds


async def _latency_rounds(variants: list[Variant], model: DiT, s: Settings) -> dict:
    """samples[run][variant name] = [seconds per round]."""
    named = [("monolith", variants[0], "exact")]
    for v in variants[1:]:
        named += [(f"{v.stages} stages, exact", v, "exact"), (f"{v.stages} stages, async", v,
                                                               "async")]
    warm = _spec("warm", (0,), 0, "ddim", 2, s.guidance, "exact", 0)
    for _, variant, _ in named:
        await _latency(variant, model, warm)
    samples: dict[str, dict[str, list[float]]] = {}
    for sampler, steps in _run_settings(s.runs):
        run = samples[f"{sampler} {steps}"] = {name: [] for name, _, _ in named}
        for r in range(s.rounds):
            for name, variant, mode in (named if r % 2 == 0 else named[::-1]):
                spec = _spec(f"{name}-{r}", (1,), r, sampler, steps, s.guidance, mode, s.warmup)
                run[name].append(await _latency(variant, model, spec))
    return samples


def _load_model(s: Settings) -> tuple[DiT, str | None]:
    """The model, and its checkpoint when it has one already (the demo model)."""
    if s.model == DEMO:
        from ditserve.demo import DEMO_DIT_PATH

        return load_dit(DEMO_DIT_PATH), str(DEMO_DIT_PATH)
    return random_model(s.model, s.latent_size), None


async def _run_latency(s: Settings) -> Report:
    model, path = _load_model(s)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        path = path or checkpoint(model, folder)
        async with AsyncExitStack() as stack:
            variants = await open_variants(stack, model, path, s.stage_counts,
                                           dict.fromkeys(s.stage_counts, 1), s.device,
                                           monolith_threads=(s.monolith_threads,))
            samples = await _latency_rounds(variants, model, s)
    return _latency_report(samples, s, model, load_before, os.getloadavg())


def _latency_report(samples: dict, s: Settings, model: DiT, load_before: tuple,
                    load_after: tuple) -> Report:
    rows = []
    for run, by_variant in samples.items():
        median = {name: statistics.median(v) for name, v in by_variant.items()}
        for name, values in by_variant.items():
            stages = int(name.split()[0]) if "stages" in name else 1
            exact = median.get(f"{stages} stages, exact", median["monolith"])
            row = {"run": run, "variant": name, "seconds": fmt_spread(spread(values), digits=2),
                   "vs_monolith": median[name] / median["monolith"]}
            if name.endswith("async"):
                row["vs_exact"] = median[name] / exact
                row["goal"] = f"≤ {1 / stages + 0.15:.2f}"
            rows.append(row)
    cores = os.cpu_count()
    notes = [f"{model.config.name}{' (demo weights)' if s.model == DEMO else ' (random weights)'}, "
             f"latent {model.config.input_size}, one request of 1 image at guidance "
             f"{s.guidance:g} (2 rows), async warm-up W = {s.warmup}; {s.rounds} request(s) "
             "per variant and run, variants alternated (odd rounds reversed).",
             f"Stage processes: 1 torch thread each, bf16 wire, loopback; monolith: "
             f"{s.monolith_threads} threads in-process (fp32). {cores} cores.",
             "seconds = median [min–max] from submit to the last event (no images); "
             "× exact = async / exact on the same processes; × monolith = / the monolith.",
             f"Load average (1, 5, 15 min) before: {_load(load_before)}; after: "
             f"{_load(load_after)}."]
    columns = [("run", "run"), ("variant", "variant"), ("seconds", "seconds"),
               ("vs_exact", "× exact (same stages)"), ("goal", "goal"),
               ("vs_monolith", "× monolith")]
    return Report("latency", rows, columns, samples, notes, asdict(s))


def _load(load: tuple) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


# -- quality ------------------------------------------------------------------------------


async def _quality_latents(model: DiT, stages: int, sampler: str, steps: int, s: Settings,
                           mode: str, warmup: int, trend: float = 0.0) -> torch.Tensor:
    """Latents (10 x per_class, C, L, L) of `per_class` requests of the 10 classes."""
    chain = LocalChain.from_model(model, stages, "bf16")
    engine = Engine(chain, model.config, CoordinatorConfig(max_rows_per_microbatch=32,
                                                           async_x0_trend=trend), stages)
    labels = tuple(range(model.config.num_classes))
    latents = await asyncio.gather(*[
        _generate(engine, _spec(f"q{i}", labels, 1000 + i, sampler, steps, s.guidance, mode,
                                warmup)) for i in range(s.quality_per_class)])
    await engine.close()
    await chain.close()
    return torch.cat(latents)


def _judged(latents: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from diffusers import AutoencoderKL

    from ditserve.demo import DEMO_VAE_PATH, JUDGES, classify
    from ditserve.demo.vae import decode

    vae = AutoencoderKL.from_pretrained(DEMO_VAE_PATH).eval()
    with torch.no_grad():
        images = decode(vae, latents)
    return {judge: float((classify(images, judge) == labels.numpy()).mean()) for judge in JUDGES}


async def _run_quality(s: Settings) -> Report:
    model, _ = _load_model(Settings(model=DEMO))
    labels = torch.arange(model.config.num_classes).repeat(s.quality_per_class)
    rows: list[dict] = []
    for sampler, steps in _run_settings(s.quality_runs):
        run = f"{sampler} {steps}"
        for stages in s.quality_stages:
            exact = await _quality_latents(model, stages, sampler, steps, s, "exact", 0)
            rows.append({"run": run, "variant": f"exact, {stages} stages",
                         **_accuracy(_judged(exact, labels))})
            for trend in s.quality_x0_trends:
                for warmup in s.quality_warmups:
                    latents = await _quality_latents(model, stages, sampler, steps, s, "async",
                                                     min(warmup, steps), trend)
                    variant = f"async, {stages} stages, W = {warmup}" + (
                        f", x0 trend {trend:g}" if len(s.quality_x0_trends) > 1 else "")
                    rows.append({"run": run, "variant": variant,
                                 **_accuracy(_judged(latents, labels)),
                                 **_distance(latents, exact)})
    images = len(labels)
    notes = [f"Embedded demo model ({model.config.name}, the weights in this checkout), "
             f"{s.quality_per_class} images of each of its {model.config.num_classes} classes "
             f"at guidance {s.guidance:g}, seeds 1000.. (one request of one image per class "
             "per seed), the same seeds in every row.",
             "Through an in-process chain of S stages with the bf16 wire (numerically the "
             "stage processes'); async is compared with exact through the same chain.",
             "accuracy: the fraction of images the judge names as the class asked for "
             "(colour judge: sees RGB; shape judge: the outline alone); the exact row is the "
             f"bar async must meet. Over {images} images one standard error of an accuracy "
             f"p is sqrt(p (1 - p) / {images}): {100 * (0.09 / images) ** 0.5:.1f} points "
             "at 90 %.",
             "max rel = max|async − exact| / max|exact|; rms rel = RMS(async − exact) / "
             "RMS(exact), over all latents."]
    columns = [("run", "run"), ("variant", "variant"), ("colour", "colour judge"),
               ("shape", "shape judge"), ("max_rel", "max rel"), ("rms_rel", "rms rel")]
    return Report("latency-quality", rows, columns, {"rows": rows}, notes, asdict(s))


def _accuracy(accuracy: dict[str, float]) -> dict[str, str]:
    return {judge: f"{value:.1%}" for judge, value in accuracy.items()}


def _distance(latents: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    difference = latents - exact
    return {"max_rel": float(difference.abs().max() / exact.abs().max()),
            "rms_rel": float(difference.pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())}


def run(s: Settings) -> Report:
    torch.set_num_threads(1 if s.quality else s.monolith_threads)
    return asyncio.run(_run_quality(s) if s.quality else _run_latency(s))
