"""The diffusion math against the reference outputs and against formulas computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditserve.sampling.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)
from numerics import ELEMENTWISE_FP32, assert_scaled_close


@pytest.mark.parametrize("n", [250, 50, 25, 10])
def test_respaced_timesteps_match_reference_and_even_spread(expected, n):
    kept = sorted(space_timesteps(1000, str(n)))
    assert kept == expected[f"respaced_timesteps_{n}"].tolist()
    # Independently: n points evenly over 0..999, rounded.
    assert kept == [round(i * 999 / (n - 1)) for i in range(n)]
    assert GaussianDiffusion.create(str(n)).timestep_map == kept


def test_space_timesteps_sections_and_ddim_stride():
    assert sorted(space_timesteps(300, [10, 15, 20]))[:3] == [0, 11, 22]
    assert len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(1000, "1001")
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")


def _independent_schedule(kept: list[int]) -> dict[str, np.ndarray]:
    """The respaced posterior coefficients in float64, from the definitions."""
    abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    abar = abar_all[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    return {"abar": abar, "abar_prev": abar_prev, "beta": beta,
            "min_log": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
            "coef1": beta * np.sqrt(abar_prev) / (1 - abar),
            "coef2": (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)}


def test_ddpm250_step_matches_reference_and_definitions(expected):
    diffusion = GaussianDiffusion.create("250")
    x = torch.from_numpy(expected["x"])
    t = torch.from_numpy(expected["ddpm250_index"])
    model_output = torch.from_numpy(expected["ddpm250_model_output"])
    out = diffusion.p_mean_variance(model_output, x, t)
    for name in ("mean", "log_variance", "pred_xstart"):
        assert_scaled_close(getattr(out, name), expected[f"ddpm250_{name}"], ELEMENTWISE_FP32, name)
    # The same in float64 from the definitions (Nichol & Dhariwal eqs. 10-15).
    s = {k: v[t.numpy()][:, None, None, None]
         for k, v in _independent_schedule(expected["respaced_timesteps_250"].tolist()).items()}
    x64, eps, v = x.double().numpy(), model_output[:, :4].double().numpy(), \
        model_output[:, 4:].double().numpy()
    x0 = (x64 - np.sqrt(1 - s["abar"]) * eps) / np.sqrt(s["abar"])
    frac = (v + 1) / 2
    assert_scaled_close(out.pred_xstart, x0, ELEMENTWISE_FP32, "pred_xstart")
    assert_scaled_close(out.mean, s["coef1"] * x0 + s["coef2"] * x64, ELEMENTWISE_FP32, "mean")
    assert_scaled_close(out.log_variance, frac * np.log(s["beta"]) + (1 - frac) * s["min_log"],
                        ELEMENTWISE_FP32, "log_variance")


def test_spaced_diffusion_keeps_alphas_cumprod():
    full = GaussianDiffusion.create()
    spaced = SpacedDiffusion(space_timesteps(1000, "25"))
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map],
                               rtol=1e-12)
    assert full.timestep_map == list(range(1000))
    np.testing.assert_array_equal(full.betas, linear_betas())
    t = torch.tensor([0, 24, 3])
    assert spaced.model_timesteps(t).tolist() == [spaced.timestep_map[i] for i in (0, 24, 3)]


def test_q_sample_and_eps_xstart_round_trip():
    diffusion = GaussianDiffusion.create("50")
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn((3, 4, 8, 8), generator=gen), torch.randn((3, 4, 8, 8), generator=gen)
    t = torch.tensor([0, 25, 49])
    x_t = diffusion.q_sample(x0, t, noise)
    # Inverting q_sample at t = 49 (abar ~ 4e-5) divides by sqrt(abar): x_t's float32 rounding
    # (u of |x_t| ~ 4) comes back ~160x larger, ~4e-5 absolute on x0 of scale ~3.
    assert_scaled_close(diffusion.predict_xstart_from_eps(x_t, t, noise), x0, 1e-4, "x0")
    assert_scaled_close(diffusion.predict_eps_from_xstart(x_t, t, x0), noise, 1e-4, "eps")


def test_normal_kl_and_discretized_likelihood():
    m, lv = torch.randn(10), torch.randn(10)
    # Terms of size ~1 (-1 + exp(0) + ...) cancel: zero to a few float32 roundings.
    assert normal_kl(m, lv, m, lv).abs().max().item() <= 1e-6
    # KL(N(1, 1) || N(0, 1)) = 1/2.
    assert normal_kl(torch.ones(1), torch.zeros(1), torch.zeros(1), torch.zeros(1)).item() == 0.5
    # The 256 bins of [-1, 1] hold (almost) all the probability.
    bins = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(
        bins, means=torch.full_like(bins, 0.1), log_scales=torch.full_like(bins, -2.0))
    assert abs(logp.exp().sum().item() - 1.0) < 1e-3


def test_training_losses_hybrid_and_mean_detached_in_vb():
    diffusion = GaussianDiffusion.create()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn((4, 4, 8, 8), generator=gen).clamp(-1, 1)
    noise = torch.randn((4, 4, 8, 8), generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    out = torch.randn((4, 8, 8, 8), generator=gen, requires_grad=True)
    seen: list[torch.Tensor] = []

    def model_fn(x_t, ts):
        seen.append(ts)
        return out

    terms = diffusion.training_losses(model_fn, x0, t, noise)
    assert seen[0].tolist() == [0, 1, 500, 999]
    assert_scaled_close(terms["mse"].detach(), ((noise - out[:, :4]) ** 2).mean(dim=(1, 2, 3)),
                        ELEMENTWISE_FP32, "mse")
    assert_scaled_close(terms["loss"].detach(), terms["mse"] + terms["vb"], ELEMENTWISE_FP32, "loss")
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"][1:] >= 0).all()
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert grad[:, :4].abs().max() == 0  # vb trains the variance only
    assert grad[:, 4:].abs().max() > 0


def test_p_mean_variance_rejects_output_without_sigma():
    diffusion = GaussianDiffusion.create("10")
    with pytest.raises(ValueError, match="2C"):
        diffusion.p_mean_variance(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8),
                                  torch.tensor([1, 2]))
