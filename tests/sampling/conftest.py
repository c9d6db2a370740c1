"""Fixtures of the sampling tests: the reference tiny model, its expected outputs, and a
reference-style guided sampling loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from ditserve.model import DiT, DiTConfig
from ditserve.sampling import Sampler, apply_guidance, uses_null_rows
from safetensors.torch import load_file

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "tiny_dit_expected.npz"))


@pytest.fixture(scope="session")
def tiny_model() -> DiT:
    config = DiTConfig(**json.loads((REFERENCE / "tiny_dit.json").read_text()))
    model = DiT(config)
    model.load_state_dict(load_file(str(REFERENCE / "tiny_dit_official_keys.safetensors")))
    return model.eval()


SampleFn = Callable[..., torch.Tensor]


@pytest.fixture(scope="session")
def sample(tiny_model) -> SampleFn:
    """Run a sampler to the end as the coordinator will: conditional rows plus null-class
    rows in one forward pass (only when guided), guidance, then the sampler's step."""

    @torch.no_grad()
    def run(sampler: Sampler, x: torch.Tensor, labels: torch.Tensor, scale: float,
            generator: torch.Generator, channels: str = "first3") -> torch.Tensor:
        n, null = len(labels), tiny_model.config.num_classes
        for step in range(sampler.num_steps):
            t = torch.full((n,), sampler.model_timestep(step))
            if uses_null_rows(scale):
                out = tiny_model(torch.cat([x, x]), torch.cat([t, t]),
                                 torch.cat([labels, torch.full_like(labels, null)]))
                out = apply_guidance(out[:n], out[n:], scale, channels)
            else:
                out = tiny_model(x, t, labels)
            x = sampler.step(step, x, out, generator).prev_sample
        return x

    return run
