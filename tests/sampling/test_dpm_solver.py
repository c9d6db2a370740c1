"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler on the tiny model."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from ditserve.sampling.dpm_solver import DPMSolverPPSampler, dpm_timesteps
from numerics import SAMPLING_FP32, assert_scaled_close

# diffusers' numpy-2 DeprecationWarning in set_timesteps is not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _diffusers_scheduler(num_steps: int) -> DPMSolverMultistepScheduler:
    """Its defaults (2M, dpmsolver++, midpoint, linspace, final sigma 0) on DiT's betas."""
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4,
                                            beta_end=0.02, beta_schedule="linear")
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("num_steps", [20, 10, 25])
def test_timesteps_are_diffusers_linspace(num_steps):
    assert dpm_timesteps(num_steps) == _diffusers_scheduler(num_steps).timesteps.tolist()


def test_twenty_step_spacing_documented():
    assert dpm_timesteps(20)[:3] == [999, 949, 899] and dpm_timesteps(20)[-1] == 50


@torch.no_grad()
@pytest.mark.parametrize("num_steps", [20, 8])
def test_guided_run_matches_diffusers(tiny_model, sample, num_steps):
    labels = torch.tensor([1, 7])
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    ours = sample(DPMSolverPPSampler(num_steps), noise, labels, 4.0, torch.Generator())

    # The same guided model, eps channels only (diffusers' learned-variance path keeps 3).
    def eps_fn(x, t):
        null = torch.full_like(labels, 10)
        both = tiny_model(torch.cat([x, x]), torch.full((4,), int(t)), torch.cat([labels, null]))
        cond, uncond = both[:2], both[2:]
        guided = cond.clone()
        guided[:, :3] = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
        return guided[:, :4]

    scheduler, x = _diffusers_scheduler(num_steps), noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, t), t, x).prev_sample
    assert_scaled_close(ours, x, SAMPLING_FP32, "ours vs diffusers")


def test_recovers_a_point_mass_with_the_oracle_eps():
    """For data that is a single point c, the exact eps makes every x0 prediction c."""
    c = torch.full((1, 4, 8, 8), 0.5)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    sampler = DPMSolverPPSampler(20)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for step in range(20):
        a = abar[sampler.model_timestep(step)]
        eps = ((x.double() - a.sqrt() * c) / (1 - a).sqrt()).float()
        x = sampler.step(step, x, eps, torch.Generator()).prev_sample
    # eps is rounded to float32 and x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies that by
    # up to 1/sqrt(abar_999) ~ 160 at the noisiest step: ~1e-5 of |x| ~ 4; later steps shrink it.
    assert_scaled_close(x, c, 2e-4, "recovered point")


def test_accepts_sigma_channels_and_rejects_bad_input():
    sampler = DPMSolverPPSampler(5)
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    with_sigma = torch.cat([eps, torch.randn(2, 4, 8, 8)], dim=1)
    a = DPMSolverPPSampler(5).step(0, x, eps, torch.Generator()).prev_sample
    b = sampler.step(0, x, with_sigma, torch.Generator()).prev_sample
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="model output"):
        sampler.step(1, x, torch.randn(2, 3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="step must be"):
        sampler.step(5, x, eps, torch.Generator())
    with pytest.raises(ValueError, match=r"1\.\.999"):
        DPMSolverPPSampler(1000)
