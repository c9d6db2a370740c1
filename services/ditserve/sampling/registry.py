"""The samplers on offer, by name, with their default step counts (one registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ditserve.config import SamplerName

from . import ddim, ddpm, dpm_solver
from .base import Sampler


@dataclass(frozen=True)
class SamplerSpec:
    """How to build one named sampler."""

    factory: Callable[[int], Sampler]
    """Builds a fresh per-request sampler for a step count."""
    default_steps: int
    """Steps when the request gives none."""
    max_steps: int
    """The largest valid step count (the smallest is 1)."""
    description: str
    """One line for GetModelInfo and --help."""


SAMPLERS: dict[SamplerName, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm.DDPMSampler, ddpm.DEFAULT_STEPS, 1000,
                        "ancestral DDPM, learned-range variance, reference respacing"),
    "ddim": SamplerSpec(ddim.DDIMSampler, ddim.DEFAULT_STEPS, 1000,
                        "DDIM eta=0 on the reference respacing"),
    "dpm-solver++": SamplerSpec(dpm_solver.DPMSolverPPSampler, dpm_solver.DEFAULT_STEPS, 999,
                                "DPM-Solver++(2M), diffusers' linspace spacing"),
}


def make_sampler(name: str, num_steps: int | None = None) -> Sampler:
    """A fresh sampler (per request) by name; num_steps None or 0 means its default."""
    spec = SAMPLERS.get(name)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    steps = num_steps or spec.default_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= spec.max_steps:
        raise ValueError(f"{name} steps must be an integer in 1..{spec.max_steps}, "
                         f"got {num_steps!r}")
    return spec.factory(steps)
