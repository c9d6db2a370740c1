"""In-process class-conditional generation with the demo model, to check it.

Uses the service's own samplers (`sampling.make_sampler`: ddpm, ddim, dpm-solver++) and
guidance (`sampling.apply_guidance`: the reference's `forward_with_cfg`, conditional and
null-class rows in one batch, guidance on the first 3 latent channels), with the seed
convention of docs/ARCHITECTURE.md §3: the initial noise and every later draw come from one CPU
generator seeded with `seed`.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..model import DiT
from ..sampling import apply_guidance, make_sampler, uses_null_rows
from .vae import decode


def guided_output(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    """Model output (N, 2C, H, W) for latents x (N, C, H, W) at original timesteps t (N,)."""
    if not uses_null_rows(guidance):
        return model(x, t, y)
    null = torch.full_like(y, model.config.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    return apply_guidance(cond, uncond, guidance, "first3", model.config.in_channels)


@torch.no_grad()
def sample_latents(model: DiT, labels: torch.Tensor, sampler: str, steps: int,
                   guidance: float, seed: int) -> torch.Tensor:
    """Final latents (N, C, L, L) for class labels (N,) with a named sampler."""
    cfg = model.config
    state = make_sampler(sampler, steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((len(labels), cfg.in_channels, cfg.input_size, cfg.input_size), generator=gen)
    for step in range(state.num_steps):
        t = torch.full((len(labels),), state.model_timestep(step), dtype=torch.long)
        x = state.step(step, x, guided_output(model, x, t, labels, guidance), gen).prev_sample
    return x


def generate_images(model: DiT, vae: AutoencoderKL, labels: torch.Tensor, sampler: str = "ddim",
                    steps: int = 25, guidance: float = 4.0, seed: int = 0) -> np.ndarray:
    """uint8 images (N, 64, 64, 3) of the given classes."""
    return decode(vae, sample_latents(model, labels, sampler, steps, guidance, seed))
