"""Approximate previews without the VAE: a fixed linear map latent (4 ch) → RGB.

The coefficients are the widely used least-squares fit of Stable Diffusion 1.x's VAE
(`latent_rgb_factors` of ComfyUI `comfy/latent_formats.py` class SD15), valid for the
scaled latents the diffusion model sees (DiT's latents are the same: VAE latents times
0.18215). Applied to the predicted clean latents x0, it costs a 4x3 matmul per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LATENT_RGB_FACTORS = (
    #  R        G        B
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
"""Row c: the RGB contribution of latent channel c (SD 1.x VAE)."""

DEFAULT_UPSCALE = 8
"""The VAE's downsampling factor: previews come out at the final image size."""


def latent_preview(x0: torch.Tensor, upscale: int = DEFAULT_UPSCALE) -> torch.Tensor:
    """Predicted clean latents (n, 4, L, L) → approximate images (n, L*s, L*s, 3) uint8."""
    if x0.ndim != 4 or x0.shape[1] != len(LATENT_RGB_FACTORS):
        raise ValueError(f"previews need latents (n, 4, H, W), got {tuple(x0.shape)}")
    if upscale < 1:
        raise ValueError(f"preview upscale must be >= 1, got {upscale}")
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=x0.device)  # (4, 3)
    rgb = torch.einsum("nchw,ck->nkhw", x0.float(), factors)  # (n, 3, H, W), about [-1, 1]
    if upscale > 1:
        rgb = F.interpolate(rgb, scale_factor=upscale, mode="nearest")
    # The image convention of docs/ARCHITECTURE.md §3: clamp(127.5 x + 128).
    pixels = (127.5 * rgb + 128).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu()  # (n, H*s, W*s, 3)
