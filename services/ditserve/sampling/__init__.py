"""Samplers (ddpm, ddim, dpm-solver++), guidance and previews: math on tensors only."""

from .base import Sampler, StepOutput
from .diffusion import GaussianDiffusion, SpacedDiffusion, space_timesteps
from .guidance import apply_guidance, uses_null_rows, validate_guidance
from .previews import latent_preview
from .registry import SAMPLERS, make_sampler

__all__ = ["SAMPLERS", "GaussianDiffusion", "Sampler", "SpacedDiffusion", "StepOutput",
           "apply_guidance", "latent_preview", "make_sampler", "space_timesteps",
           "uses_null_rows", "validate_guidance"]
