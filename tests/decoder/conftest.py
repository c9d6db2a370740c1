"""Fixtures of the decoder tests: a tiny random AutoencoderKL saved as a diffusers folder
(nothing is downloaded)."""

from __future__ import annotations

import torch
from conftest import make_tiny_vae  # the shared tests/conftest.py

LATENT_CHANNELS = 4
TILE_LATENT = 16
"""The tiny VAE's tile size in latents: sample_size 32 / downsample 2."""

__all__ = ["LATENT_CHANNELS", "TILE_LATENT", "make_tiny_vae", "random_latents"]


def random_latents(n: int, side: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, 4, side, side) latents on the scale DiT produces (about unit variance / 0.18215
    after scaling is undone)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, LATENT_CHANNELS, side, side), generator=generator)
