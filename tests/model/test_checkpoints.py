"""Every checkpoint format loads to the same model; ditserve's own file round-trips."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from ditserve.model import CheckpointError, convert, load_dit, open_checkpoint
from numerics import FORWARD_FP32, assert_scaled_close
from safetensors.torch import save_file


def _outputs(model, expected) -> np.ndarray:
    x, t, y = (torch.from_numpy(expected[k]) for k in ("x", "t", "y"))
    with torch.no_grad():
        return model(x, t, y).numpy()


def _to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The mapping of diffusers' scripts/convert_dit_to_diffusers.py, written out here."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"],
           "pos_embed.proj.bias": state["x_embedder.proj.bias"],
           "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": state["final_layer.linear.weight"],
           "proj_out_2.bias": state["final_layer.linear.bias"]}
    for i in range(depth):
        b, src = f"transformer_blocks.{i}.", f"blocks.{i}."
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


@pytest.fixture(params=["safetensors", "bin"])
def diffusers_pipeline(request, tmp_path, reference_state, reference_config):
    """A pipeline folder whose transformer/ is written by diffusers' own class."""
    cfg = reference_config
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes)
    missing, unexpected = model.load_state_dict(_to_diffusers(reference_state, cfg.depth),
                                                strict=False)
    assert not unexpected and all(k.startswith("pos_embed.") is False for k in missing)
    model.save_pretrained(tmp_path / "transformer",
                          safe_serialization=request.param == "safetensors")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return tmp_path


def test_official_raw_state_dict(official_pt, reference_config, expected):
    model = load_dit(official_pt)
    assert model.config == reference_config.__class__(**{**reference_config.__dict__,
                                                         "name": "DiT-Tiny/2"})
    assert_scaled_close(_outputs(model, expected), expected["forward"], FORWARD_FP32)


def test_official_training_checkpoint_uses_ema(tmp_path, reference_state, expected):
    """As train.py saves them: model, ema, optimizer state and the argparse Namespace."""
    noise = {k: torch.randn_like(v) for k, v in reference_state.items()}
    path = tmp_path / "0400000.pt"
    args = argparse.Namespace(model="DiT-Tiny/2", image_size=64)
    torch.save({"model": noise, "ema": reference_state, "opt": {}, "args": args}, path)
    assert_scaled_close(_outputs(load_dit(path), expected), expected["forward"], FORWARD_FP32)


def test_diffusers_folder_equals_official(diffusers_pipeline, official_pt, expected):
    official = _outputs(load_dit(official_pt), expected)
    for path in (diffusers_pipeline, diffusers_pipeline / "transformer"):
        np.testing.assert_array_equal(_outputs(load_dit(path), expected), official)


def test_convert_round_trips(tmp_path, official_pt, diffusers_pipeline, expected):
    official = _outputs(load_dit(official_pt), expected)
    first, second, from_diffusers = (tmp_path / n for n in ("a.safetensors", "b.safetensors",
                                                            "c.safetensors"))
    config = convert(official_pt, first)
    assert convert(first, second) == config
    assert convert(diffusers_pipeline, from_diffusers).depth == config.depth
    for path in (first, second, from_diffusers):
        reader = open_checkpoint(path)
        assert reader.config == config  # the file describes itself
        np.testing.assert_array_equal(_outputs(load_dit(path), expected), official)
    hashes = {open_checkpoint(p).weight_hash() for p in (official_pt, first, diffusers_pipeline)}
    assert len(hashes) == 1, "the same weights hash the same in every format"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "absent.pt", "does not exist"),
    (lambda d: _write(d / "x.pt", {"foo": torch.zeros(1)}), "not a DiT state dict"),
    (lambda d: _write(d / "x.pt", [1, 2, 3]), "not a DiT state dict"),
    (lambda d: _save_plain_safetensors(d / "x.safetensors"), "not a DiT state dict"),
    (lambda d: _garbage(d / "x.safetensors"), "not a readable safetensors file"),
    (lambda d: (d / "folder").mkdir() or d / "folder", "no config.json"),
    (lambda d: _garbage(d / "x.pt"), "not a loadable torch checkpoint"),
])
def test_bad_checkpoints_say_what_is_wrong(tmp_path, make, message):
    with pytest.raises(CheckpointError, match=message):
        load_dit(make(tmp_path))


def test_plain_safetensors_of_official_keys_loads(expected):
    reference = Path(__file__).resolve().parents[1] / "data" / "reference"
    model = load_dit(reference / "tiny_dit_official_keys.safetensors")
    assert_scaled_close(_outputs(model, expected), expected["forward"], FORWARD_FP32)


def test_wrong_model_name_is_refused(official_pt):
    with pytest.raises(CheckpointError, match="DiT-S/2 has 12, 384, 2"):
        load_dit(official_pt, model="DiT-S/2")


def test_unknown_shape_needs_a_model_name(tmp_path, reference_state):
    state = dict(reference_state)
    for k in [k for k in state if k.startswith("blocks.3.")]:
        del state[k]  # depth 3 at width 64 is no named config
    with pytest.raises(CheckpointError, match="pass the config name"):
        load_dit(_write(tmp_path / "odd.pt", state))


def _write(path, obj):
    torch.save(obj, path)
    return path


def _save_plain_safetensors(path):
    save_file({"w": torch.zeros(2)}, str(path))
    return path


def _garbage(path):
    path.write_bytes(b"\x00not a checkpoint" * 10)
    return path


def test_to_diffusers_is_the_inverse_of_reading_diffusers(reference_state, reference_config):
    """The library's export equals the mapping written out independently above, and
    diffusers' own class accepts it without a missing or unexpected key."""
    from ditserve.model.checkpoint import to_diffusers

    ours = to_diffusers(reference_state, reference_config.depth)
    theirs = _to_diffusers(reference_state, reference_config.depth)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
