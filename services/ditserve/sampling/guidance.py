"""Classifier-free guidance (Ho & Salimans 2022) as DiT's reference `forward_with_cfg`.

facebookresearch/DiT `models.py` runs conditional rows and null-class rows for the same x
in one forward pass and guides only the first 3 channels: `eps, rest = out[:, :3],
out[:, 3:]`, guided = uncond + s * (cond - uncond), the rest (the 4th eps channel and the
learned sigma) from the conditional rows. That quirk is the default here, so outputs match
the paper's samples; "all" guides every eps channel (sigma still from the conditional rows).
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from ditserve.config import GuidanceChannels

GUIDANCE_CHANNELS: tuple[GuidanceChannels, ...] = get_args(GuidanceChannels)
"""Which eps channels guidance applies to: the reference's first 3, or all of them."""


def validate_guidance(scale: float, channels: str) -> None:
    """A clear ValueError for a scale that is not a finite number >= 1 or unknown channels."""
    if not (math.isfinite(scale) and scale >= 1.0):
        raise ValueError(f"guidance scale must be a finite number >= 1, got {scale}")
    if channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance channels must be one of {GUIDANCE_CHANNELS}, got {channels!r}")


def uses_null_rows(scale: float) -> bool:
    """Whether a request needs null-class rows: at scale 1 guidance is the identity."""
    return scale != 1.0


def apply_guidance(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float,
                   channels: GuidanceChannels = "first3", latent_channels: int = 4
                   ) -> torch.Tensor:
    """Guided output (n, C_out, L, L) from the conditional and null-class rows' outputs."""
    if cond_out.shape != uncond_out.shape:
        raise ValueError(f"conditional {tuple(cond_out.shape)} and null-class "
                         f"{tuple(uncond_out.shape)} outputs differ in shape")
    validate_guidance(scale, channels)
    k = 3 if channels == "first3" else latent_channels
    cond, uncond = cond_out[:, :k], uncond_out[:, :k]
    guided = uncond + scale * (cond - uncond)  # the reference's order of operations
    return torch.cat([guided, cond_out[:, k:]], dim=1)
