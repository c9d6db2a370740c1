"""Random DiT weights at the real sizes: speed does not depend on the values.

`checkpoint(name, input_size, folder)` writes ditserve's self-describing safetensors file
(for stage processes); `to_diffusers(state, depth)` maps the official key names to
diffusers' DiTTransformer2DModel (diffusers' scripts/convert_dit_to_diffusers.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.model import DiT, DiTConfig, dit_config, save_ditserve
from ditserve.model.checkpoint import to_diffusers


def random_model(name: str, input_size: int, seed: int = 0) -> DiT:
    """The named DiT with random weights (adaLN-Zero would zero the blocks' outputs)."""
    torch.manual_seed(seed)
    return DiT(dit_config(name, input_size=input_size)).eval().requires_grad_(False)


def checkpoint(model: DiT, folder: str | Path) -> Path:
    """Saves `model` in ditserve's format under `folder`; returns the file."""
    path = Path(folder) / f"{model.config.name.replace('/', '-')}-{model.config.input_size}.safetensors"
    save_ditserve(model.state_dict().items(), model.config, path)
    return path


def diffusers_transformer(model: DiT):
    """diffusers' DiTTransformer2DModel holding `model`'s weights."""
    from diffusers import DiTTransformer2DModel

    cfg: DiTConfig = model.config
    peer = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes)
    _, unexpected = peer.load_state_dict(to_diffusers(model.state_dict(), cfg.depth), strict=False)
    if unexpected:
        raise RuntimeError(f"diffusers does not know keys {unexpected[:3]}...")
    return peer.eval().requires_grad_(False)
