"""The samplers of the reference's respaced schedule: ddpm and ddim share its timesteps.

As facebookresearch/DiT `sample.py`: `create_diffusion(str(num_steps))`, i.e.
`space_timesteps(1000, str(num_steps))` (one section, evenly spread, rounded), new betas
from the kept alphas_cumprod, and the model called at the original timestep.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .diffusion import NUM_TRAIN_TIMESTEPS, GaussianDiffusion


@lru_cache(maxsize=32)
def respaced_diffusion(num_steps: int) -> GaussianDiffusion:
    """The reference's `create_diffusion(str(num_steps))`; shared, read-only, per step count."""
    if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be in 1..{NUM_TRAIN_TIMESTEPS}, got {num_steps}")
    return GaussianDiffusion.create(str(num_steps))


class RespacedSampler:
    """Step bookkeeping on the respaced schedule: step 0 is the noisiest index."""

    def __init__(self, num_steps: int):
        self.diffusion = respaced_diffusion(num_steps)
        self.num_steps = num_steps

    @property
    def timesteps(self) -> list[int]:
        """Model timesteps (0..999) in step order, noisiest first."""
        return self.diffusion.timestep_map[::-1]

    def model_timestep(self, step: int) -> int:
        return self.diffusion.timestep_map[self.index(step)]

    def index(self, step: int) -> int:
        """The respaced schedule's index of `step` (num_steps-1 down to 0)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in 0..{self.num_steps - 1}, got {step}")
        return self.num_steps - 1 - step

    def prepare(self, step: int, x: torch.Tensor, model_output: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The index tensor t (n,) and the model output as float32 on x's device."""
        check_shapes(x, model_output, learned_sigma=True)
        t = torch.full((x.shape[0],), self.index(step), dtype=torch.long, device=x.device)
        return t, model_output.to(x.device, torch.float32)


def check_shapes(x: torch.Tensor, model_output: torch.Tensor, learned_sigma: bool) -> None:
    """x (n, C, L, L) and a model output (n, 2C, L, L) (or (n, C, ...) without sigma)."""
    if x.ndim != 4:
        raise ValueError(f"x must be (n, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    allowed = [2 * c] if learned_sigma else [c, 2 * c]
    if model_output.ndim != 4 or model_output.shape[0] != n or \
            model_output.shape[1] not in allowed or tuple(model_output.shape[2:]) != (h, w):
        raise ValueError(f"model output {tuple(model_output.shape)} does not match x "
                         f"{tuple(x.shape)} (expected channels {allowed})")
