"""The model equals the paper's reference implementation, on its own recorded outputs and
on numeric details recomputed here independently."""

from __future__ import annotations

import math

import numpy as np
import torch
from ditserve.model.dit import sincos_pos_embed_2d, timestep_embedding
from numerics import ELEMENTWISE_FP32, FORWARD_FP32, assert_scaled_close


def test_forward_matches_reference(reference_model, expected):
    x, t, y = (torch.from_numpy(expected[k]) for k in ("x", "t", "y"))
    with torch.no_grad():
        out = reference_model(x, t, y)
    assert out.shape == (6, 8, 8, 8)
    assert_scaled_close(out, expected["forward"], FORWARD_FP32, "forward")


def test_conditioning_matches_reference(reference_model, expected):
    x, t, y = (torch.from_numpy(expected[k]) for k in ("x", "t", "y"))
    with torch.no_grad():
        _, c = reference_model.embed(x, t, y)
    assert_scaled_close(c, expected["conditioning_c"], FORWARD_FP32, "conditioning c")


def test_guided_forward_matches_reference(reference_model, expected):
    """The reference's forward_with_cfg, recomputed here from two plain forwards."""
    x, t, y = (torch.from_numpy(expected[k]) for k in ("cfg_x", "cfg_t", "cfg_y"))
    with torch.no_grad():
        out = reference_model(x, t, y)
    cond, uncond = out.chunk(2)
    eps = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    guided = torch.cat([torch.cat([eps, eps]), out[:, 3:]], dim=1)
    # Guidance at s = 4 multiplies a difference of two outputs: error up to (1 + 2s) times one.
    assert_scaled_close(guided, expected["cfg_forward_scale4"], (1 + 2 * 4.0) * FORWARD_FP32,
                        "guided forward")


def test_timestep_embedding_is_cos_then_sin(expected):
    t = torch.from_numpy(expected["t"])
    half = 128
    freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
    manual = np.array([[math.cos(float(s) * f) for f in freqs] + [math.sin(float(s) * f) for f in freqs]
                       for s in t.tolist()], dtype=np.float32)
    ours = timestep_embedding(t, 256).numpy()
    # Values lie in [-1, 1] (scale 1). float32 rounds an angle of up to 999 rad to ~999 u = 6e-5
    # rad, and the float64 recomputation does not: bound 2e-4 of the scale.
    assert_scaled_close(ours, manual, 2e-4, "timestep embedding vs float64")
    assert_scaled_close(ours, expected["timestep_freq_embedding"], ELEMENTWISE_FP32,
                        "timestep embedding vs reference")


def test_position_embedding_is_w_then_h(expected):
    dim, grid = 64, 4
    ours = sincos_pos_embed_2d(dim, grid)
    for token in range(grid * grid):
        row, col = divmod(token, grid)  # tokens are row-major: (h, w)
        for half, coord in ((0, col), (1, row)):  # first half embeds w, second h
            omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
            manual = np.concatenate([np.sin(coord * omega), np.cos(coord * omega)])
            np.testing.assert_allclose(ours[token, half * 32:(half + 1) * 32], manual, atol=1e-12)
    # float64 here, the reference stored float32 (scale 1): one float32 rounding apart.
    assert_scaled_close(ours[None], expected["pos_embed"], ELEMENTWISE_FP32, "pos_embed")


def test_layernorm_eps_is_1e_6(reference_model):
    """With a tiny variance the eps dominates: 1e-6 and diffusers' 1e-5 differ visibly."""
    block = reference_model.blocks["0"]
    x = torch.tensor([[[1e-3, -1e-3] * 32]])
    normed = block.norm1(x)
    expected = x / math.sqrt(1e-6 + 1e-6)
    # eps 1e-5 would give x / sqrt(1.1e-5): 27% off, far outside a few float32 roundings.
    assert_scaled_close(normed, expected, ELEMENTWISE_FP32, "layer norm")
    assert reference_model.final_layer.norm_final.eps == 1e-6
    assert block.norm1.elementwise_affine is False


def test_adaln_chunks_are_shift_scale_gate_attention_then_mlp(reference_config):
    """Drive each of the six adaLN chunks on its own and see which part of the block moves."""
    from ditserve.model.dit import DiTBlock

    d = reference_config.hidden_size
    block = DiTBlock(d, reference_config.num_heads, 4.0).eval()
    torch.nn.init.zeros_(block.adaLN_modulation[1].weight)
    x = torch.randn(1, 4, d, generator=torch.Generator().manual_seed(0))
    c = torch.zeros(1, d)

    def run(chunk: int, value: float) -> torch.Tensor:
        bias = torch.zeros(6 * d)
        bias[chunk * d:(chunk + 1) * d] = value
        block.adaLN_modulation[1].bias.data = bias
        with torch.no_grad():
            return block(x, c)

    normed = torch.nn.functional.layer_norm(x, (d,), eps=1e-6)
    # gates 0 → identity whatever shift/scale say (exactly: the gated branch is multiplied by 0)
    assert torch.equal(run(0, 3.0), x)
    assert torch.equal(run(3, 3.0), x)
    # gate_msa = 1 → x + attn(norm1(x)) ; gate_mlp = 1 → x + mlp(norm2(x))
    with torch.no_grad():
        # The same kernels on the same shapes either way: one forward's worth of rounding.
        assert_scaled_close(run(2, 1.0), x + block.attn(normed), FORWARD_FP32, "gate_msa")
        assert_scaled_close(run(5, 1.0), x + block.mlp(normed), FORWARD_FP32, "gate_mlp")
        # with both gate and scale/shift set, modulate = x * (1 + scale) + shift
        bias = torch.zeros(6 * d)
        bias[0:d], bias[d:2 * d], bias[2 * d:3 * d] = 0.5, 2.0, 1.0
        block.adaLN_modulation[1].bias.data = bias
        assert_scaled_close(block(x, c), x + block.attn(normed * 3.0 + 0.5), FORWARD_FP32,
                            "modulate")
