"""DDIM (eta 0): whole runs of the reference tiny model, and one step from the definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditserve.sampling.ddim import DDIMSampler


@pytest.mark.parametrize(("scale", "key"), [(4.0, "ddim10_cfg4_latents"),
                                            (1.0, "ddim10_cfg1_latents")])
def test_ten_steps_match_reference(expected, sample, scale, key):
    x = torch.from_numpy(expected["ddim10_noise_seed0"])
    assert torch.equal(x, torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
    sampler = DDIMSampler(10)
    assert sampler.timesteps == expected["respaced_timesteps_10"][::-1].tolist()
    out = sample(sampler, x, torch.from_numpy(expected["ddim10_labels"]), scale,
                 torch.Generator().manual_seed(0))
    # Scale 1 skips the null rows the reference computes anyway: float32 rounding apart.
    np.testing.assert_allclose(out.numpy(), expected[key], rtol=1e-5, atol=1e-3)


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
    np.testing.assert_allclose(out.pred_original_sample.numpy(), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.prev_sample.numpy(), expected_prev, rtol=1e-4, atol=1e-4)


def test_last_step_returns_predicted_x0(expected):
    x = torch.from_numpy(expected["x"])
    out = DDIMSampler(10).step(9, x, torch.from_numpy(expected["forward"]), torch.Generator())
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample)
