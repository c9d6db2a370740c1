"""Fixtures of the decoder tests: a tiny random AutoencoderKL saved as a diffusers folder
(nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

LATENT_CHANNELS = 4
TILE_LATENT = 16
"""The tiny VAE's tile size in latents: sample_size 32 / downsample 2."""


def make_tiny_vae(folder: Path, scaling_factor: float = 0.18215) -> Path:
    """A 2-level AutoencoderKL (downsample 2) with random, perturbed weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=2 * TILE_LATENT, scaling_factor=scaling_factor)
    with torch.no_grad():  # spread the outputs over the pixel range
        for param in vae.parameters():
            param.add_(0.05 * torch.randn_like(param))
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def random_latents(n: int, side: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, 4, side, side) latents on the scale DiT produces (about unit variance / 0.18215
    after scaling is undone)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, LATENT_CHANNELS, side, side), generator=generator)
