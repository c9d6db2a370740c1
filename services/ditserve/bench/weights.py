"""Random DiT weights at the real sizes: speed does not depend on the values.

`checkpoint(name, input_size, folder)` writes ditserve's self-describing safetensors file
(for stage processes); `to_diffusers(state, depth)` maps the official key names to
diffusers' DiTTransformer2DModel (diffusers' scripts/convert_dit_to_diffusers.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.model import DiT, DiTConfig, dit_config, save_ditserve


def random_model(name: str, input_size: int, seed: int = 0) -> DiT:
    """The named DiT with random weights (adaLN-Zero would zero the blocks' outputs)."""
    torch.manual_seed(seed)
    return DiT(dit_config(name, input_size=input_size)).eval().requires_grad_(False)


def checkpoint(model: DiT, folder: str | Path) -> Path:
    """Saves `model` in ditserve's format under `folder`; returns the file."""
    path = Path(folder) / f"{model.config.name.replace('/', '-')}-{model.config.input_size}.safetensors"
    save_ditserve(model.state_dict().items(), model.config, path)
    return path


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official DiT keys → DiTTransformer2DModel keys (every block gets the embedders; q, k,
    v split). pos_embed is a fixed buffer diffusers recomputes."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"],
           "pos_embed.proj.bias": state["x_embedder.proj.bias"],
           "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": state["final_layer.linear.weight"],
           "proj_out_2.bias": state["final_layer.linear.bias"]}
    for i in range(depth):
        out.update(_block_to_diffusers(state, i))
    return out


def _block_to_diffusers(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    b, src, out = f"transformer_blocks.{i}.", f"blocks.{i}.", {}
    for p in ("weight", "bias"):
        out[f"{b}norm1.emb.timestep_embedder.linear_1.{p}"] = state[f"t_embedder.mlp.0.{p}"]
        out[f"{b}norm1.emb.timestep_embedder.linear_2.{p}"] = state[f"t_embedder.mlp.2.{p}"]
        out[f"{b}norm1.linear.{p}"] = state[f"{src}adaLN_modulation.1.{p}"]
        q, k, v = state[f"{src}attn.qkv.{p}"].chunk(3)
        out[f"{b}attn1.to_q.{p}"], out[f"{b}attn1.to_k.{p}"], out[f"{b}attn1.to_v.{p}"] = q, k, v
        out[f"{b}attn1.to_out.0.{p}"] = state[f"{src}attn.proj.{p}"]
        out[f"{b}ff.net.0.proj.{p}"] = state[f"{src}mlp.fc1.{p}"]
        out[f"{b}ff.net.2.{p}"] = state[f"{src}mlp.fc2.{p}"]
    out[f"{b}norm1.emb.class_embedder.embedding_table.weight"] = state[
        "y_embedder.embedding_table.weight"]
    return out


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
