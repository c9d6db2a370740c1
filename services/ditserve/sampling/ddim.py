"""DDIM sampling (eta 0, deterministic) on the reference's respaced schedule.

The reference `GaussianDiffusion.ddim_sample` (facebookresearch/DiT
`diffusion/gaussian_diffusion.py`; Song et al. 2021, eq. 12) as `sample.py` would run it:
`create_diffusion(str(num_steps))`, i.e. the same plain respacing as ddpm (not "ddimN"),
no clipping. The previous step is the previous kept timestep of that respacing, so there
is no stride pitfall as in diffusers' DDIMScheduler under linspace spacing.
"""

from __future__ import annotations

import torch

from .base import StepOutput
from .respaced import RespacedSampler

DEFAULT_STEPS = 50
"""A common DDIM setting; quality saturates around 50 steps for DiT."""


class DDIMSampler(RespacedSampler):
    """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with eps re-derived from x0."""

    def __init__(self, num_steps: int = DEFAULT_STEPS):
        super().__init__(num_steps)

    def step(self, step: int, x: torch.Tensor, model_output: torch.Tensor,
             generator: torch.Generator) -> StepOutput:
        t, model_output = self.prepare(step, x, model_output)
        sample, pred_xstart = self.diffusion.ddim_sample(model_output, x, t, eta=0.0)
        return StepOutput(sample, pred_xstart)
