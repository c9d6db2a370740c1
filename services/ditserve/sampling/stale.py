"""Model outputs computed for older latents, restated for the latents they are used with.

Async mode (docs/ARCHITECTURE.md §4, "Modes") steps latents x_s at step s with a model
output computed for older latents x_r of step r < s. Used as is, the stale eps puts the
sampler's x0 prediction at (x_s - sigma_s eps_r) / alpha_s: the noise estimate of other
latents subtracted from these. Instead, `StaleOutputs` keeps the model's own x0
prediction for x_r, x0_r = (x_r - sigma_r eps_r) / alpha_r, moves it on by
`X0_TREND` x (s - r) times its change over the step before, x0_r - x0_{r-1} (a
damped linear predictor: the model's x0 drifts smoothly along the trajectory), and hands
the sampler the eps that gives that x0 at x_s: eps = (x_s - alpha_s x0) / sigma_s. The
sampler then steps as if the model had been called at x_s; nothing is called twice.

Every sampler here calls the model at timesteps of the training schedule (linear betas,
1000 steps), so alpha and sigma come from it, whatever the sampler's spacing.
"""

from __future__ import annotations

import torch

from .diffusion import GaussianDiffusion

X0_TREND = 0.5
"""Weight of the x0 trend per step of staleness (`coordinator.async_x0_trend`'s default).
Measured on the demo model at 4 stages (three steps stale), RMS distance of the latents
to exact's at the same seeds, W = 0 / 5 (docs/ARCHITECTURE.md §4, "Modes"): ddim 50:
stale eps 0.24 / 0.21, x0 kept 0.19 / 0.17, x0 moved on at 0.5: 0.12 / 0.11 (at 0.75:
0.08 / 0.08); dpm-solver++ 20 at W = 0: stale eps 0.54, x0 kept 0.38, moved on at 0.25 /
0.5 / 0.75 / 1: 0.31 / 0.28 / 0.37 / 0.58; ddpm 250 at W = 5: 0.160, 0.114, 0.070. A full
step overshoots on a fast solver's few large steps; 0.5 is the best weight there and
well inside the gain for the others."""

_TRAINING_SCHEDULE = GaussianDiffusion.create()
"""The training schedule (no respacing), so its index is the model timestep (0..999)."""


def predicted_x0(eps: torch.Tensor, x: torch.Tensor, timestep: int) -> torch.Tensor:
    """x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), for eps and x (n, C, L, L)."""
    t = torch.full((x.shape[0],), timestep, dtype=torch.long)
    return _TRAINING_SCHEDULE.predict_xstart_from_eps(x, t, eps)


def eps_for_x0(x0: torch.Tensor, x: torch.Tensor, timestep: int) -> torch.Tensor:
    """The eps that gives the prediction x0 at latents x and `timestep`."""
    t = torch.full((x.shape[0],), timestep, dtype=torch.long)
    return _TRAINING_SCHEDULE.predict_eps_from_xstart(x, t, x0)


class StaleOutputs:
    """One async request's restating state: its x0 predictions by the step of the latents
    they were computed for (the latest two; the rest is never needed again)."""

    def __init__(self, latent_channels: int, trend: float = X0_TREND):
        self.latent_channels = latent_channels
        self.trend = trend
        """How far the x0 moves on by its last change, per step of staleness (0..1)."""
        self._x0: dict[int, torch.Tensor] = {}
        """(n, C, L, L) x0 predictions by source step."""

    def restate(self, output: torch.Tensor, x_source: torch.Tensor, source: int,
                timestep_source: int, x: torch.Tensor, step: int, timestep: int
                ) -> torch.Tensor:
        """The guided model output (n, C_out, L, L) computed for latents `x_source` of step
        `source` at `timestep_source`, restated for latents `x` of step `step` at
        `timestep` (module docstring). An output for the step's own latents comes back
        as is (its x0 is kept for later steps). Learned-variance channels pass through:
        they depend on the timestep far more than on the latents."""
        c = self.latent_channels
        x0 = self._x0.get(source)
        if x0 is None:
            x0 = predicted_x0(output[:, :c].float(), x_source, timestep_source)
            self._x0 = {k: v for k, v in self._x0.items() if k == source - 1}
            self._x0[source] = x0
        if source == step:
            return output
        before = self._x0.get(source - 1)
        if before is not None and self.trend:
            x0 = x0 + self.trend * (step - source) * (x0 - before)
        return torch.cat([eps_for_x0(x0, x, timestep), output[:, c:].float()], dim=1)
