"""Ancestral DDPM sampling with learned-range variance, the DiT paper's default sampler.

The reference `GaussianDiffusion.p_sample` (facebookresearch/DiT
`diffusion/gaussian_diffusion.py`, from openai/improved-diffusion) on the respaced
schedule, with the request's own generator for the noise (docs/ARCHITECTURE.md §3) and no clipping of
the predicted x0 (the reference `sample.py` passes clip_denoised=False).
"""

from __future__ import annotations

import torch

from .base import StepOutput
from .respaced import RespacedSampler

DEFAULT_STEPS = 250
"""The paper's FID-50K setting."""


class DDPMSampler(RespacedSampler):
    """x_{t-1} = mean + exp(log_var / 2) * z, z ~ N(0, I) from the request's generator."""

    def __init__(self, num_steps: int = DEFAULT_STEPS):
        super().__init__(num_steps)

    def step(self, step: int, x: torch.Tensor, model_output: torch.Tensor,
             generator: torch.Generator) -> StepOutput:
        t, model_output = self.prepare(step, x, model_output)
        out = self.diffusion.p_mean_variance(model_output, x, t)
        if step == self.num_steps - 1:  # t = 0: the mean is the sample, no draw
            return StepOutput(out.mean, out.pred_xstart)
        # Drawn on the CPU in float32 so a seed gives the same noise on every device.
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        return StepOutput(out.mean + torch.exp(0.5 * out.log_variance) * noise, out.pred_xstart)
