"""Ancestral DDPM: one step against the reference, the noise from the request's generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditserve.sampling.ddpm import DDPMSampler
from numerics import ELEMENTWISE_FP32, assert_scaled_close


def _rows(expected, index: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rows = expected["ddpm250_index"] == index
    return (torch.from_numpy(expected["x"][rows]),
            torch.from_numpy(expected["ddpm250_model_output"][rows]), rows)


def test_default_is_250_steps_on_reference_timesteps(expected):
    sampler = DDPMSampler()
    assert sampler.num_steps == 250
    assert sampler.timesteps == expected["respaced_timesteps_250"][::-1].tolist()
    assert sampler.model_timestep(0) == 999 and sampler.model_timestep(249) == 0


@pytest.mark.parametrize("index", [200, 100])
def test_one_step_is_reference_mean_plus_scaled_generator_noise(expected, index):
    sampler = DDPMSampler(250)
    x, model_output, rows = _rows(expected, index)
    step = 249 - index
    assert sampler.model_timestep(step) == expected["respaced_timesteps_250"][index]
    out = sampler.step(step, x, model_output, torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    mean = torch.from_numpy(expected["ddpm250_mean"][rows])
    std = torch.exp(0.5 * torch.from_numpy(expected["ddpm250_log_variance"][rows]))
    assert_scaled_close(out.prev_sample, mean + std * noise, ELEMENTWISE_FP32, "x_prev")
    torch.testing.assert_close(out.pred_original_sample,
                               torch.from_numpy(expected["ddpm250_pred_xstart"][rows]))


def test_last_step_is_the_mean_and_draws_nothing(expected):
    x, model_output, rows = _rows(expected, 0)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    out = DDPMSampler(250).step(249, x, model_output, generator)
    torch.testing.assert_close(out.prev_sample, torch.from_numpy(expected["ddpm250_mean"][rows]))
    assert torch.equal(generator.get_state(), state)


def test_full_run_deterministic_per_seed_and_global_rng_untouched(expected, sample):
    labels = torch.from_numpy(expected["ddim10_labels"])

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((2, 4, 8, 8), generator=generator)
        return sample(DDPMSampler(250), x, labels, 4.0, generator)

    global_state = torch.get_rng_state()
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.isfinite(first).all()


def test_rejects_bad_step_and_shapes():
    sampler = DDPMSampler(10)
    x, gen = torch.zeros(2, 4, 8, 8), torch.Generator()
    with pytest.raises(ValueError, match=r"step must be in 0\.\.9"):
        sampler.step(10, x, torch.zeros(2, 8, 8, 8), gen)
    with pytest.raises(ValueError, match="model output"):
        sampler.step(0, x, torch.zeros(2, 4, 8, 8), gen)  # no sigma channels
    with pytest.raises(ValueError, match="num_steps"):
        DDPMSampler(1001)
