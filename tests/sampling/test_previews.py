"""Approximate latent → RGB previews."""

from __future__ import annotations

import pytest
import torch
from ditserve.sampling.previews import LATENT_RGB_FACTORS, latent_preview


def test_shape_dtype_and_nearest_upsampling():
    x0 = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    image = latent_preview(x0)
    assert image.shape == (3, 64, 64, 3) and image.dtype == torch.uint8
    assert torch.equal(image[:, ::8, ::8], latent_preview(x0, upscale=1))
    assert torch.equal(image[:, 7::8, 7::8], latent_preview(x0, upscale=1))


def test_linear_map_values():
    x0 = torch.zeros((1, 4, 2, 2))
    x0[0, 0] = 1.0  # channel 0 only: RGB = its row of factors
    pixel = latent_preview(x0, upscale=1)[0, 0, 0].tolist()
    want = [int(min(255, max(0, 127.5 * f + 128))) for f in LATENT_RGB_FACTORS[0]]
    assert pixel == want
    assert latent_preview(torch.zeros((1, 4, 2, 2)), upscale=1).unique().tolist() == [128]
    x0[0, 0], x0[0, 3] = 0.0, -100.0  # far out of range: clamped
    assert latent_preview(x0, upscale=1)[0, 0, 0].tolist() == [255, 255, 255]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="latents"):
        latent_preview(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="upscale"):
        latent_preview(torch.zeros(1, 4, 8, 8), upscale=0)
