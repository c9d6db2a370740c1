"""Does a VAE belong to the DiT being served? Checked at the decoder's start-up.

A DiT is trained on one VAE's latents, multiplied by that VAE's scaling factor: decoding its
output with another VAE gives garbage without any error. The latent space a DiT expects is
read from its own files, never from weight hashes (weights get retrained):

- the VAE shipped beside the checkpoint, a `vae/` folder next to the DiT file or inside
  the checkpoint folder: the demo model's layout (`weights/dit.safetensors` +
  `weights/vae/`, both written by `ditserve train-demo`) and diffusers' pipeline layout
  (`transformer/` + `vae/`);
- otherwise the DiT paper's convention (docs/ARCHITECTURE.md §3): Stable Diffusion's VAE, latents
  scaled by 0.18215, as many channels as the DiT's input.

A VAE belongs when it has as many latent channels and the same scaling factor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ditserve.common.status import UserError

SD_SCALING_FACTOR = 0.18215
"""Latent scale of Stable Diffusion's VAE, which the official DiT checkpoints use."""
SCALE_RTOL = 1e-3
"""Relative tolerance on scaling factors: they are written to full precision or as SD's
five digits (0.18215), while distinct VAEs differ in the first two (SD 0.18215, SDXL
0.13025, the demo VAE about 0.57)."""


class VaePairingError(UserError, ValueError):
    """The VAE does not decode the latents of the DiT being served."""


@dataclass(frozen=True)
class LatentSpace:
    """The latents a DiT produces, or a VAE decodes."""

    channels: int
    scaling_factor: float
    source: str
    """Where this was read, for messages."""

    def matches(self, other: LatentSpace) -> bool:
        return self.channels == other.channels and math.isclose(
            self.scaling_factor, other.scaling_factor, rel_tol=SCALE_RTOL)

    def describe(self) -> str:
        return f"{self.channels} channels, scaling factor {self.scaling_factor:.5g}"


def vae_latent_space(folder: str | Path) -> LatentSpace:
    """From a diffusers AutoencoderKL folder's config.json (diffusers' defaults when
    absent: 4 channels, 0.18215)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VaePairingError(f"cannot read the VAE config {path}: {error}") from None
    return LatentSpace(int(config.get("latent_channels", 4)),
                       float(config.get("scaling_factor") or SD_SCALING_FACTOR),
                       f"VAE {folder}")


def vae_downscale(folder: str | Path) -> int:
    """Image side / latent side of a diffusers AutoencoderKL folder: its encoder halves the
    side in every down block but the last, one block per entry of `block_out_channels`
    (diffusers' default when absent: one block, ×1). SD's VAE is ×8; the demo VAE ×4."""
    path = Path(folder) / "config.json"
    try:
        blocks = json.loads(path.read_text()).get("block_out_channels", [64])
    except (OSError, json.JSONDecodeError) as error:
        raise VaePairingError(f"cannot read the VAE config {path}: {error}") from None
    if not isinstance(blocks, list) or not blocks:
        raise VaePairingError(f"the VAE config {path} has no block_out_channels list")
    return 2 ** (len(blocks) - 1)


def own_vae(checkpoint: str | Path) -> Path | None:
    """The VAE folder shipped with a checkpoint (see the module docstring), if any."""
    path = Path(checkpoint)
    for folder in (path / "vae", path.parent / "vae"):
        if (folder / "config.json").is_file() and folder.resolve() != path.resolve():
            return folder
    return None


def dit_latent_space(checkpoint: str | Path) -> LatentSpace:
    """The latents the DiT in `checkpoint` was trained on."""
    shipped = own_vae(checkpoint)
    if shipped is not None:
        space = vae_latent_space(shipped)
        return LatentSpace(space.channels, space.scaling_factor, f"its own VAE {shipped}")
    from ditserve.model import open_checkpoint

    channels = open_checkpoint(checkpoint).config.in_channels
    return LatentSpace(channels, SD_SCALING_FACTOR,
                       "Stable Diffusion's VAE, the official DiT checkpoints' convention")


def check_pairing(checkpoint: str | Path, vae: str | Path) -> None:
    """VaePairingError naming both when `vae` does not decode `checkpoint`'s latents."""
    expected, actual = dit_latent_space(checkpoint), vae_latent_space(vae)
    if not expected.matches(actual):
        raise VaePairingError(
            f"VAE {vae} does not belong to the model {checkpoint}: the model was trained on "
            f"the latents of {expected.source} ({expected.describe()}); this VAE has "
            f"{actual.describe()}. Pass the model's own VAE (--vae DIR; for the official DiT "
            "checkpoints: stabilityai/sd-vae-ft-ema or sd-vae-ft-mse)")
