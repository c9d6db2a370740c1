"""VaeDecoder (the plain class): parity with AutoencoderKL, tiling, validation."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from ditserve.decoder.decoder import VaeDecoder

from .conftest import LATENT_CHANNELS, TILE_LATENT, make_tiny_vae, random_latents


@pytest.fixture(scope="module")
def decoder(tiny_vae_dir) -> VaeDecoder:
    return VaeDecoder.load(tiny_vae_dir, max_batch_size=4)


def reference_images(folder, latents: torch.Tensor) -> torch.Tensor:
    """What the reference DiT sample.py does: vae.decode(z / 0.18215), then save_image's
    rounding; (N, H, W, 3) uint8."""
    vae = AutoencoderKL.from_pretrained(folder).eval()
    with torch.no_grad():
        x = vae.decode(latents / 0.18215).sample
    return x.mul(127.5).add(128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def test_decode_matches_autoencoderkl(decoder, tiny_vae_dir):
    latents = random_latents(3)
    images = decoder.decode(latents)
    assert images.shape == (3, 16, 16, 3) and images.dtype == torch.uint8
    expected = reference_images(tiny_vae_dir, latents)
    assert (images.int() - expected.int()).abs().max() <= 1  # float rounding at .5 edges
    assert images.float().std() > 5  # not a constant image


def test_decode_splits_rows_beyond_max_batch(decoder):
    latents = random_latents(6, seed=1)  # max_batch_size 4 → two VAE calls
    calls = []
    original = decoder.vae.decode
    decoder.vae.decode = lambda z: calls.append(z.shape[0]) or original(z)
    try:
        images = decoder.decode(latents)
    finally:
        decoder.vae.decode = original
    assert calls == [4, 2]
    assert torch.equal(images[4:], decoder.decode(latents[4:]))


def test_scaling_factor_from_config(tmp_path):
    decoder = VaeDecoder.load(make_tiny_vae(tmp_path / "vae", scaling_factor=0.5))
    assert decoder.scaling_factor == 0.5
    assert decoder.latent_channels == LATENT_CHANNELS and decoder.downsample == 2


def test_tiled_decode_approximates_untiled(tiny_vae_dir):
    tiled = VaeDecoder.load(tiny_vae_dir)  # tiles above 16 latents
    untiled = VaeDecoder.load(tiny_vae_dir, tile_latent_size=64)
    latents = random_latents(1, side=TILE_LATENT + 8, seed=2)
    calls = []
    original = tiled.vae.tiled_decode
    tiled.vae.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    a, b = tiled.decode(latents), untiled.decode(latents)
    assert calls, "large latents did not take the tiled path"
    assert a.shape == b.shape == (1, 48, 48, 3)
    difference = (a.float() - b.float()).abs()
    assert difference.mean() < 8 and torch.corrcoef(
        torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1] > 0.9


@pytest.mark.parametrize("latents, message", [
    (torch.zeros(1, 4, 8, 8, dtype=torch.int64), "FP32, BF16 or FP16"),
    (torch.zeros(4, 8, 8), "(N, C, L, L)"),
    (torch.zeros(1, 3, 8, 8), "3 channels; this VAE takes 4"),
    (torch.zeros(0, 4, 8, 8), "1..64 rows"),
    (torch.zeros(1, 4, 8, 1024), "latent sides"),
    (torch.full((1, 4, 8, 8), float("nan")), "NaN"),
])
def test_validate_rejects_bad_latents(decoder, latents, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decoder.validate(latents)


def test_validate_accepts_half_precision(decoder):
    decoder.validate(random_latents(1).to(torch.bfloat16))
    decoder.validate(random_latents(1).to(torch.float16))
