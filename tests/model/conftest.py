"""Fixtures of the model tests: the reference tiny model and its expected outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ditserve.model import DiT, DiTConfig
from safetensors.torch import load_file

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"


@pytest.fixture(scope="session")
def reference_config() -> DiTConfig:
    return DiTConfig(**json.loads((REFERENCE / "tiny_dit.json").read_text()))


@pytest.fixture(scope="session")
def reference_state() -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE / "tiny_dit_official_keys.safetensors"))


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "tiny_dit_expected.npz"))


@pytest.fixture(scope="session")
def reference_model(reference_config, reference_state) -> DiT:
    model = DiT(reference_config)
    model.load_state_dict(reference_state)
    return model.eval()


@pytest.fixture()
def official_pt(tmp_path, reference_state) -> Path:
    """The reference weights as an official-format checkpoint (a raw state dict)."""
    path = tmp_path / "DiT-Tiny-2-8x8.pt"
    torch.save(reference_state, path)
    return path
