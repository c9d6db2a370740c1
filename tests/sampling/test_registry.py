"""The sampler registry and factory; the three samplers on a point mass."""

from __future__ import annotations

import pytest
import torch
from ditserve.sampling import SAMPLERS, make_sampler
from ditserve.sampling.ddim import DDIMSampler
from ditserve.sampling.ddpm import DDPMSampler
from ditserve.sampling.dpm_solver import DPMSolverPPSampler
from numerics import assert_scaled_close


def test_names_defaults_and_fresh_instances():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm-solver++"}
    assert isinstance(make_sampler("ddpm"), DDPMSampler) and make_sampler("ddpm").num_steps == 250
    assert isinstance(make_sampler("ddim", 20), DDIMSampler)
    assert make_sampler("dpm-solver++").num_steps == 20
    assert isinstance(make_sampler("dpm-solver++", 0), DPMSolverPPSampler)
    assert make_sampler("ddim", 1000).num_steps == 1000
    assert make_sampler("dpm-solver++") is not make_sampler("dpm-solver++")


@pytest.mark.parametrize(("name", "steps", "match"), [
    ("euler", None, "unknown sampler 'euler'"),
    ("ddpm", 1001, r"1\.\.1000"),
    ("ddim", -3, r"1\.\.1000"),
    ("ddim", 2.5, "integer"),
    ("dpm-solver++", 1000, r"1\.\.999"),
])
def test_invalid_requests(name, steps, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(name, steps)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 7])
def test_every_sampler_recovers_a_point_mass(name, steps):
    """With data = one point c the exact eps predicts c everywhere, so every sampler must end
    at c (ddpm's last step has no noise and its posterior mean at t=0 is x0)."""
    c = torch.full((2, 4, 4, 4), -0.25)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    sampler = make_sampler(name, steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(c.shape, generator=generator)
    for step in range(steps):
        a = abar[sampler.model_timestep(step)]
        eps = ((x.double() - a.sqrt() * c) / (1 - a).sqrt()).float()
        out = sampler.step(step, x, torch.cat([eps, torch.zeros_like(eps)], 1), generator)
        # float32 eps divided by sqrt(abar) >= 1/160 at the noisiest step: ~1e-5 of |x| ~ 4, i.e.
        # ~2e-4 of c's scale 0.25 (seen <= 1.2e-4); later steps shrink it. Bound 1e-3.
        assert_scaled_close(out.pred_original_sample, c, 1e-3, f"{name} x0 at step {step}")
        x = out.prev_sample
    assert_scaled_close(x, c, 1e-3, f"{name} final sample")
