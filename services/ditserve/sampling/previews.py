"""Approximate previews without the VAE: a linear map latent (C channels) → RGB, fit to the
served VAE.

A preview shows the predicted clean latents x0 (scaled, as the DiT sees them) through
`rgb = x0ᵀ A + b` per latent cell, then upsamples to the image size: a (C, 3) matmul per
cell, cheap enough for every step. The map belongs to one VAE: the widely used
coefficients of Stable Diffusion 1.x's VAE (ComfyUI `comfy/latent_formats.py`, class SD15)
paint another VAE's latents (the demo model's) in the wrong colours. So the coordinator
fits A and b to the VAE it serves when it starts (`fit_to_vae`): it decodes random latents
and solves least squares from each latent cell to the mean colour of the pixels it
decodes to (the VAE's own ×8 patch). ComfyUI fits its factors the same way, offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
FIT_SAMPLES = 16
"""Random latents decoded for a fit: 16 x 8 x 8 = 1024 cells for C + 1 unknowns per colour."""
FIT_SIDE = 8
"""Latent side of the fit's samples (64 px through an SD-like VAE: cheap on a CPU)."""


@dataclass(frozen=True)
class LatentRgbMap:
    """rgb (in [-1, 1]) = x0ᵀ factors + bias, per latent cell."""

    factors: torch.Tensor
    """(C, 3): row c is the RGB contribution of latent channel c."""
    bias: torch.Tensor
    """(3,): the RGB of all-zero latents."""
    upscale: int = DEFAULT_UPSCALE
    """Pixels per latent cell side: the VAE's downsampling factor."""

    @property
    def channels(self) -> int:
        return self.factors.shape[0]

    @classmethod
    def sd15(cls) -> LatentRgbMap:
        """The fixed map of Stable Diffusion 1.x's VAE (the official DiT's)."""
        return cls(torch.tensor(LATENT_RGB_FACTORS), torch.zeros(3))

    @classmethod
    def fit(cls, latents: torch.Tensor, images: torch.Tensor) -> LatentRgbMap:
        """Least squares from latents (n, C, h, w) to the images they decode to
        (n, 3, h*f, w*f) in [-1, 1]: each cell's target is the mean of its f x f pixels."""
        c, w = latents.shape[1], latents.shape[3]
        upscale = images.shape[-1] // w
        cells = F.avg_pool2d(images.float(), upscale)  # (n, 3, h, w)
        x = latents.float().permute(0, 2, 3, 1).reshape(-1, c)  # (n*h*w, C)
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)  # (n*h*w, C + 1): with bias
        y = cells.permute(0, 2, 3, 1).reshape(-1, 3)  # (n*h*w, 3)
        solution = torch.linalg.lstsq(x, y).solution  # (C + 1, 3)
        return cls(solution[:c].contiguous(), solution[c].contiguous(), upscale)

    def __call__(self, x0: torch.Tensor, upscale: int | None = None) -> torch.Tensor:
        """Predicted clean latents (n, C, L, L) → approximate images (n, L*s, L*s, 3) uint8."""
        upscale = self.upscale if upscale is None else upscale
        if x0.ndim != 4 or x0.shape[1] != self.channels:
            raise ValueError(f"previews need latents (n, {self.channels}, H, W), "
                             f"got {tuple(x0.shape)}")
        if upscale < 1:
            raise ValueError(f"preview upscale must be >= 1, got {upscale}")
        factors, bias = self.factors.to(x0.device), self.bias.to(x0.device)
        rgb = torch.einsum("nchw,ck->nkhw", x0.float(), factors)  # (n, 3, H, W), about [-1, 1]
        rgb = rgb + bias[None, :, None, None]
        if upscale > 1:  # smooth between cell centres, as a decoded image is
            rgb = F.interpolate(rgb, scale_factor=upscale, mode="bilinear", align_corners=False)
        # The image convention of docs/ARCHITECTURE.md §3: clamp(127.5 x + 128).
        pixels = (127.5 * rgb + 128).clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().cpu()  # (n, H*s, W*s, 3)


@torch.no_grad()
def fit_to_vae(vae: Any, samples: int = FIT_SAMPLES, side: int = FIT_SIDE,
               seed: int = 0) -> LatentRgbMap:
    """The map of a diffusers AutoencoderKL, from `samples` decoded random latents.

    The latents are smooth noise (drawn at a quarter and at half the side, upsampled), at
    unit variance, the scale of the DiT's (scaled) latents: images are mostly smooth
    regions, and on the demo VAE a fit to white noise misses real images' colours by a
    third more (per-cell error 33 vs 25 of 255; a fit to real latents: 22)."""
    generator = torch.Generator().manual_seed(seed)
    channels = int(vae.config.latent_channels)
    scale = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
    coarse = [max(1, side // 4), max(1, side // 2)]
    parts = [torch.randn((count, channels, size, size), generator=generator)
             for count, size in zip((samples // 2, samples - samples // 2), coarse, strict=True)]
    latents = torch.cat([F.interpolate(part, size=(side, side), mode="bilinear",
                                       align_corners=False) for part in parts])
    latents = latents / latents.std()  # (samples, C, side, side), scaled
    parameter = next(vae.parameters())
    images = vae.decode(latents.to(parameter.device, parameter.dtype) / scale).sample
    return LatentRgbMap.fit(latents, images.float().cpu().clamp(-1, 1))


def load_preview_map(vae_folder: str) -> LatentRgbMap:
    """The map fit to the VAE in a diffusers folder (loaded on the CPU, then dropped)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32).eval()
    return fit_to_vae(vae)


def latent_preview(x0: torch.Tensor, upscale: int = DEFAULT_UPSCALE,
                   preview_map: LatentRgbMap | None = None) -> torch.Tensor:
    """Predicted clean latents (n, C, L, L) → approximate images (n, L*s, L*s, 3) uint8,
    through `preview_map` (default: SD 1.x's fixed map)."""
    return (preview_map or LatentRgbMap.sd15())(x0, upscale)
