"""Classifier-free guidance against the reference `forward_with_cfg`."""

from __future__ import annotations

import pytest
import torch
from ditserve.sampling.guidance import apply_guidance, uses_null_rows, validate_guidance
from numerics import ELEMENTWISE_FP32, FORWARD_FP32, assert_scaled_close


@torch.no_grad()
def test_first3_matches_reference_guided_forward(expected, tiny_model):
    out = tiny_model(torch.from_numpy(expected["cfg_x"]), torch.from_numpy(expected["cfg_t"]),
                     torch.from_numpy(expected["cfg_y"]))  # (6, 8, 8, 8): 3 cond, 3 null rows
    guided = apply_guidance(out[:3], out[3:], 4.0)
    reference = expected["cfg_forward_scale4"]
    # A forward's rounding, multiplied by up to (1 + 2s) = 9 in the guided difference.
    bound = (1 + 2 * 4.0) * FORWARD_FP32
    assert_scaled_close(guided, reference[:3], bound, "guided")
    # The reference repeats the guided channels on its null half.
    assert_scaled_close(guided[:, :3], reference[3:, :3], bound, "guided, null half")


def test_channels_first3_and_all():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn((2, 8, 4, 4), generator=gen), torch.randn((2, 8, 4, 4), generator=gen)
    mixed = uncond + 3.0 * (cond - uncond)
    first3 = apply_guidance(cond, uncond, 3.0)
    assert_scaled_close(first3[:, :3], mixed[:, :3], ELEMENTWISE_FP32)
    assert torch.equal(first3[:, 3:], cond[:, 3:])  # 4th eps channel and sigma: conditional
    every = apply_guidance(cond, uncond, 3.0, channels="all", latent_channels=4)
    assert_scaled_close(every[:, :4], mixed[:, :4], ELEMENTWISE_FP32)
    assert torch.equal(every[:, 4:], cond[:, 4:])
    assert_scaled_close(apply_guidance(cond, uncond, 1.0, channels="all"), cond, ELEMENTWISE_FP32)


def test_null_rows_only_when_guided():
    assert not uses_null_rows(1.0)
    assert uses_null_rows(4.0) and uses_null_rows(1.5)


def test_rejects_bad_scale_channels_and_shapes():
    with pytest.raises(ValueError, match="guidance scale"):
        validate_guidance(float("nan"), "first3")
    with pytest.raises(ValueError, match="guidance scale"):
        validate_guidance(0.5, "first3")
    with pytest.raises(ValueError, match="guidance channels"):
        validate_guidance(4.0, "last2")
    with pytest.raises(ValueError, match="differ in shape"):
        apply_guidance(torch.zeros(2, 8, 4, 4), torch.zeros(1, 8, 4, 4), 4.0)
