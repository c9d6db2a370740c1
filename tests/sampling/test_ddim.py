"""DDIM (eta 0): whole runs of the reference tiny model, and one step from the definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditserve.sampling.ddim import DDIMSampler
from numerics import ELEMENTWISE_FP32, SAMPLING_FP32, assert_scaled_close


@pytest.mark.parametrize(("scale", "key"), [(4.0, "ddim10_cfg4_latents"),
                                            (1.0, "ddim10_cfg1_latents")])
def test_ten_steps_match_reference(expected, sample, scale, key):
    x = torch.from_numpy(expected["ddim10_noise_seed0"])
    # The recorded noise is torch.randn of seed 0. Bit-equal where torch vectorises its
    # Box-Muller transform (AVX2 / AVX-512); the scalar kernel's log/cos round differently.
    assert_scaled_close(x, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)),
                        ELEMENTWISE_FP32, "seed-0 noise")
    sampler = DDIMSampler(10)
    assert sampler.timesteps == expected["respaced_timesteps_10"][::-1].tolist()
    out = sample(sampler, x, torch.from_numpy(expected["ddim10_labels"]), scale,
                 torch.Generator().manual_seed(0))
    # Scale 1 skips the null rows the reference computes anyway: float32 rounding apart.
    assert_scaled_close(out, expected[key], SAMPLING_FP32, f"ddim10 at guidance {scale}")


def test_one_step_from_definition(expected):
    sampler = DDIMSampler(25)
    step = 10
    index = 24 - step
    kept = expected["respaced_timesteps_25"]
    assert sampler.model_timestep(step) == kept[index]
    x = torch.from_numpy(expected["x"])
    model_output = torch.from_numpy(expected["forward"])
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = sampler.step(step, x, model_output, generator)
    assert torch.equal(generator.get_state(), state)  # deterministic: no draw
    abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    abar, abar_prev = abar_all[kept[index]], abar_all[kept[index - 1]]
    x64, eps = x.double().numpy(), model_output[:, :4].double().numpy()
    x0 = (x64 - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    expected_prev = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * eps
    assert_scaled_close(out.pred_original_sample, x0, ELEMENTWISE_FP32, "x0")
    assert_scaled_close(out.prev_sample, expected_prev, ELEMENTWISE_FP32, "x_prev")


def test_last_step_returns_predicted_x0(expected):
    x = torch.from_numpy(expected["x"])
    out = DDIMSampler(10).step(9, x, torch.from_numpy(expected["forward"]), torch.Generator())
    assert_scaled_close(out.prev_sample, out.pred_original_sample, ELEMENTWISE_FP32)
