"""DPM-Solver++(2M): the multistep second-order solver in data (x0) prediction.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2 (multistep, midpoint form), as diffusers' DPMSolverMultistepScheduler
runs it with its defaults (solver_order=2, algorithm_type="dpmsolver++",
solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero").

Spacing (the solver's usual one, not the reference's respacing): diffusers' default
"linspace" timesteps, `linspace(0, 999, n + 1).round()` reversed without its final 0, e.g.
999, 949, ..., 50 for 20 steps, and a final step to sigma = 0 (the result is the last x0
prediction). The first and the last step are first order (= DDIM), the others second order.
Only the eps channels of the model output are used: the learned sigma has no place in an
ODE solver (diffusers' own learned-variance handling keeps 3 channels, wrong for 4).
The schedule is the linear-beta one, computed in float64; parity with diffusers is tested.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import StepOutput
from .diffusion import NUM_TRAIN_TIMESTEPS, linear_betas
from .respaced import check_shapes

DEFAULT_STEPS = 20
"""DPM-Solver++(2M) is near converged at 20 steps for guided sampling."""


def dpm_timesteps(num_steps: int) -> list[int]:
    """diffusers' "linspace" spacing: model timesteps in step order, noisiest first."""
    if not 1 <= num_steps < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"dpm-solver++ num_steps must be in 1..{NUM_TRAIN_TIMESTEPS - 1}, "
                         f"got {num_steps}")
    ts = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, num_steps + 1).round()[::-1][:-1]
    return [int(t) for t in ts]


class DPMSolverPPSampler:
    """One request's DPM-Solver++(2M) state: the previous step's x0 prediction."""

    def __init__(self, num_steps: int = DEFAULT_STEPS):
        self.num_steps = num_steps
        self.timesteps = dpm_timesteps(num_steps)
        abar = np.cumprod(1.0 - linear_betas())[self.timesteps]
        # alpha_t, sigma_t of x_t = alpha_t x0 + sigma_t eps; the final point is sigma = 0.
        self._alpha = [*np.sqrt(abar).tolist(), 1.0]
        self._sigma = [*np.sqrt(1.0 - abar).tolist(), 0.0]
        self._prev: tuple[int, torch.Tensor] | None = None
        """(step, x0 prediction) of the latest step taken, for the multistep update."""

    def model_timestep(self, step: int) -> int:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in 0..{self.num_steps - 1}, got {step}")
        return self.timesteps[step]

    def _lambda(self, i: int) -> float:
        """log-SNR / 2 at point i: log(alpha) - log(sigma); +inf at the final sigma = 0."""
        return math.inf if self._sigma[i] == 0 else math.log(self._alpha[i] / self._sigma[i])

    def step(self, step: int, x: torch.Tensor, model_output: torch.Tensor,
             generator: torch.Generator) -> StepOutput:
        self.model_timestep(step)
        check_shapes(x, model_output, learned_sigma=False)
        eps = model_output[:, : x.shape[1]].to(x.device, torch.float32)  # (n, C, L, L)
        x0 = (x - self._sigma[step] * eps) / self._alpha[step]
        prev, self._prev = self._prev, (step, x0)
        if prev is None or prev[0] != step - 1 or step == self.num_steps - 1:
            return StepOutput(self._first_order(step, x, x0), x0)
        return StepOutput(self._second_order(step, x, x0, prev[1]), x0)

    def _first_order(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """DDIM from point i to i+1 in exponential-integrator form."""
        h = self._lambda(i + 1) - self._lambda(i)
        return (self._sigma[i + 1] / self._sigma[i]) * x - self._alpha[i + 1] * math.expm1(-h) * x0

    def _second_order(self, i: int, x: torch.Tensor, x0: torch.Tensor,
                      prev_x0: torch.Tensor) -> torch.Tensor:
        """Multistep midpoint update with the finite difference of x0 over lambda."""
        h = self._lambda(i + 1) - self._lambda(i)
        r0 = (self._lambda(i) - self._lambda(i - 1)) / h
        d1 = (1.0 / r0) * (x0 - prev_x0)
        phi = self._alpha[i + 1] * math.expm1(-h)
        return (self._sigma[i + 1] / self._sigma[i]) * x - phi * x0 - 0.5 * phi * d1
