"""The embedded demo model: a small DiT and VAE trained on procedural shapes.

`ditserve train-demo` makes the files under `weights/`: `dit.safetensors` (ditserve
format), `vae/` (a diffusers AutoencoderKL folder), `classifier.safetensors` (the judge
of generated images), `class_names.txt`, `MODEL_CARD.md` and `samples.png`. Importing this
package needs no torch; `classify` imports it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEMO_WEIGHTS = Path(__file__).parent / "weights"
"""Folder of the shipped demo model."""
DEMO_DIT_PATH = DEMO_WEIGHTS / "dit.safetensors"
"""The shipped DiT, ditserve's safetensors format."""
DEMO_VAE_PATH = DEMO_WEIGHTS / "vae"
"""The shipped VAE, a diffusers AutoencoderKL folder (its config holds scaling_factor)."""
DEMO_CLASSIFIER_PATH = DEMO_WEIGHTS / "classifier.safetensors"
"""The shipped shape classifier."""
DEMO_CLASS_NAMES: list[str] = [
    "red circle", "blue square", "green triangle", "yellow star", "purple cross",
    "orange ring", "cyan diamond", "white heart", "pink hexagon", "brown arrow"]
"""Class label → name (shapes.CLASS_NAMES, kept here so that reading it needs no numpy)."""

_classifier = None


def classify(images: np.ndarray) -> np.ndarray:
    """Class labels (N,) of uint8 images (N, 64, 64, 3), by the shipped classifier."""
    global _classifier
    from .classifier import load_classifier, predict
    if _classifier is None:
        _classifier = load_classifier(DEMO_CLASSIFIER_PATH)
    return predict(_classifier, images)
