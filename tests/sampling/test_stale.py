"""sampling/stale.py: async calls' outputs restated for the latents they are used with."""

from __future__ import annotations

import torch
from ditserve.sampling import GaussianDiffusion
from ditserve.sampling.stale import StaleOutputs, eps_for_x0, predicted_x0
from numerics import ELEMENTWISE_FP32, assert_scaled_close

BASE = GaussianDiffusion.create()  # the training schedule: index = model timestep


def _x0(x: torch.Tensor, timestep: int, eps: torch.Tensor) -> torch.Tensor:
    return BASE.predict_xstart_from_eps(x, torch.full((x.shape[0],), timestep), eps)


def _tensors(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def test_x0_and_eps_are_the_training_schedules():
    x, eps = _tensors((2, 4, 8, 8), (2, 4, 8, 8))
    x0 = predicted_x0(eps, x, 640)
    assert_scaled_close(x0, _x0(x, 640, eps), 10 * ELEMENTWISE_FP32)
    assert_scaled_close(eps_for_x0(x0, x, 640), eps, 10 * ELEMENTWISE_FP32)


def test_a_stale_output_keeps_the_x0_prediction_of_its_latents_without_a_trend():
    x_source, x, out = _tensors((2, 4, 8, 8), (2, 4, 8, 8), (2, 8, 8, 8))
    restated = StaleOutputs(4).restate(out, x_source, 3, 740, x, 5, 700)
    assert restated.shape == out.shape
    # The same x0 at the new latents and timestep (a few elementwise roundings apart):
    assert_scaled_close(_x0(x, 700, restated[:, :4]), _x0(x_source, 740, out[:, :4]),
                        10 * ELEMENTWISE_FP32)
    # ... which the stale eps as is would not give:
    assert not torch.allclose(_x0(x, 700, out[:, :4]), _x0(x_source, 740, out[:, :4]),
                              rtol=0.05, atol=0.05)
    assert torch.equal(restated[:, 4:], out[:, 4:])  # learned variance passes through


def test_the_x0_moves_on_by_its_trend_over_the_step_before():
    x_before, out_before, x_source, out, x = _tensors(
        (1, 4, 8, 8), (1, 8, 8, 8), (1, 4, 8, 8), (1, 8, 8, 8), (1, 4, 8, 8))
    stale = StaleOutputs(4, trend=0.5)
    # Step 6 ran on its own latents (returned as is; its x0 is kept):
    assert stale.restate(out_before, x_before, 6, 780, x_before, 6, 780) is out_before
    # Step 9 uses the output for step 7's latents, two steps stale:
    restated = stale.restate(out, x_source, 7, 760, x, 9, 720)
    x0_before, x0 = _x0(x_before, 780, out_before[:, :4]), _x0(x_source, 760, out[:, :4])
    assert_scaled_close(_x0(x, 720, restated[:, :4]), x0 + 0.5 * 2 * (x0 - x0_before),
                        20 * ELEMENTWISE_FP32)


def test_only_the_latest_two_sources_are_kept():
    stale = StaleOutputs(4)
    for step in range(10):
        x, out = _tensors((1, 4, 8, 8), (1, 8, 8, 8), seed=step)
        stale.restate(out, x, step, 900 - 10 * step, x, step, 900 - 10 * step)
    assert sorted(stale._x0) == [8, 9]
