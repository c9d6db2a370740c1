"""What the coordinator needs of a sampler: per-request state stepped one step at a time.

A sampler knows nothing of the model or the network: the coordinator feeds it the model
output of each step, so requests at different steps (and samplers) share microbatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class StepOutput:
    """The result of one denoising step."""

    prev_sample: torch.Tensor
    """x_{t-1} (n, C, L, L) float32: the next step's input (the final latents after the last)."""
    pred_original_sample: torch.Tensor
    """The predicted clean latents x_0 (n, C, L, L), for previews."""


class Sampler(Protocol):
    """One request's denoising state. Not shared between requests."""

    num_steps: int

    def model_timestep(self, step: int) -> int:
        """The timestep (0..999, the model's scale) at which step `step` (0-based, from the
        noisiest) calls the model."""
        ...

    def step(self, step: int, x: torch.Tensor, model_output: torch.Tensor,
             generator: torch.Generator) -> StepOutput:
        """Advance x (n, C, L, L) given the (guided) model output (n, C_out, L, L); any random
        draw comes from `generator` (the request's own, on the CPU)."""
        ...
