"""The VAE decoder, a plain class: latents (N, C, L, L) → RGB uint8 (N, H, W, 3).

Loads diffusers' `AutoencoderKL` from a folder (a Stable Diffusion VAE such as
stabilityai/sd-vae-ft-ema works unchanged). As in the reference DiT `sample.py`:
`x = vae.decode(latents / 0.18215).sample` then `clamp(127.5 * x + 128, 0, 255)` as
uint8 (torchvision's save_image rounding). Latents wider than the VAE's tile size are
decoded in overlapping tiles blended at the seams (diffusers' `enable_tiling`), so memory
stays bounded for large images.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_SCALING_FACTOR = 0.18215
MAX_ROWS = 64
"""Most latents one request may carry."""
MAX_LATENT_SIDE = 512
"""Largest latent side (4096 px with the SD VAE)."""
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class VaeDecoder:
    """Decodes latents with an AutoencoderKL; knows nothing of gRPC."""

    def __init__(self, vae: torch.nn.Module, device: str = "cpu", max_batch_size: int = 8,
                 tile_latent_size: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.scaling_factor = float(getattr(config, "scaling_factor", None)
                                    or DEFAULT_SCALING_FACTOR)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self._enable_tiling(tile_latent_size)

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", max_batch_size: int = 8,
             tile_latent_size: int | None = None) -> VaeDecoder:
        """From a diffusers AutoencoderKL folder (config.json + weights)."""
        from diffusers import AutoencoderKL

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a diffusers VAE folder (no config.json)")
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
        return cls(vae, device, max_batch_size, tile_latent_size)

    def _enable_tiling(self, tile_latent_size: int | None) -> None:
        """Tiles above `tile_latent_size` (default: the VAE's training size, 64 for SD)."""
        self.vae.enable_tiling()
        if tile_latent_size is not None:
            self.vae.tile_latent_min_size = tile_latent_size
            self.vae.tile_sample_min_size = tile_latent_size * self.downsample
        self.tile_latent_size = int(self.vae.tile_latent_min_size)

    def validate(self, latents: torch.Tensor) -> None:
        """ValueError naming what is wrong with a request's latents."""
        if latents.dtype not in FLOAT_DTYPES:
            raise ValueError(f"latents must be FP32, BF16 or FP16, got {latents.dtype}")
        if latents.dim() != 4:
            raise ValueError(f"latents must be (N, C, L, L), got shape {list(latents.shape)}")
        n, c, h, w = latents.shape
        if c != self.latent_channels:
            raise ValueError(f"latents have {c} channels; this VAE takes {self.latent_channels}")
        if not 1 <= n <= MAX_ROWS:
            raise ValueError(f"latents must hold 1..{MAX_ROWS} rows, got {n}")
        if not (1 <= h <= MAX_LATENT_SIDE and 1 <= w <= MAX_LATENT_SIDE):
            raise ValueError(f"latent sides must be 1..{MAX_LATENT_SIDE}, got {h}x{w}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, L, L) latents, unscaled → (N, L*f, L*f, 3) uint8 on the CPU, in chunks
        of max_batch_size rows."""
        outputs = [self._decode_chunk(chunk) for chunk in latents.split(self.max_batch_size)]
        return torch.cat(outputs)

    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, torch.float32) / self.scaling_factor  # (n, C, L, L)
        x = self.vae.decode(z).sample  # (n, 3, H, W) in about [-1, 1]
        pixels = torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu()  # (n, H, W, 3)

    def warm_up(self, side: int = 8) -> None:
        """One small decode, so the first request does not pay for lazy initialisation."""
        side = max(1, min(side, self.tile_latent_size))
        self.decode(torch.zeros(1, self.latent_channels, side, side))

    def image_side(self, latent_side: int) -> int:
        return latent_side * self.downsample
