"""Classifier-free guidance against the reference `forward_with_cfg`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditserve.sampling.guidance import apply_guidance, uses_null_rows, validate_guidance


@torch.no_grad()
def test_first3_matches_reference_guided_forward(expected, tiny_model):
    out = tiny_model(torch.from_numpy(expected["cfg_x"]), torch.from_numpy(expected["cfg_t"]),
                     torch.from_numpy(expected["cfg_y"]))  # (6, 8, 8, 8): 3 cond, 3 null rows
    guided = apply_guidance(out[:3], out[3:], 4.0)
    reference = expected["cfg_forward_scale4"]
    np.testing.assert_allclose(guided.numpy(), reference[:3], rtol=1e-5, atol=1e-5)
    # The reference repeats the guided channels on its null half.
    np.testing.assert_allclose(guided[:, :3].numpy(), reference[3:, :3], rtol=1e-5, atol=1e-5)


def test_channels_first3_and_all():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn((2, 8, 4, 4), generator=gen), torch.randn((2, 8, 4, 4), generator=gen)
    mixed = uncond + 3.0 * (cond - uncond)
    first3 = apply_guidance(cond, uncond, 3.0)
    torch.testing.assert_close(first3[:, :3], mixed[:, :3])
    assert torch.equal(first3[:, 3:], cond[:, 3:])  # 4th eps channel and sigma: conditional
    every = apply_guidance(cond, uncond, 3.0, channels="all", latent_channels=4)
    torch.testing.assert_close(every[:, :4], mixed[:, :4])
    assert torch.equal(every[:, 4:], cond[:, 4:])
    torch.testing.assert_close(apply_guidance(cond, uncond, 1.0, channels="all"), cond)


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
