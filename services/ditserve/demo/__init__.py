"""The embedded demo model: a small DiT and VAE trained on procedural shapes.

`ditserve train-demo` makes the files under `weights/`: `dit.safetensors` (ditserve
format), `vae/` (a diffusers AutoencoderKL folder), `classifier.safetensors` and
`shape_classifier.safetensors` (the judges of generated images: by colour and shape, and by
outline alone), `class_names.txt`, `MODEL_CARD.md` and `samples.png`. Importing this
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
"""The shipped colour judge: sees RGB, so colour alone may tell it the class."""
DEMO_SHAPE_CLASSIFIER_PATH = DEMO_WEIGHTS / "shape_classifier.safetensors"
"""The shipped shape judge: sees grey images normalised per image, trained on the outlines
in random colours, so only a recognisable outline tells it the class."""
DEMO_CLASS_NAMES: list[str] = [
    "red circle", "blue square", "green triangle", "yellow star", "purple cross",
    "orange ring", "cyan diamond", "white heart", "pink hexagon", "brown arrow"]
"""Class label → name (shapes.CLASS_NAMES, kept here so that reading it needs no numpy)."""

JUDGES = {"colour": DEMO_CLASSIFIER_PATH, "shape": DEMO_SHAPE_CLASSIFIER_PATH}
"""The shipped judges by name."""
_loaded: dict = {}


def classify(images: np.ndarray, judge: str = "colour") -> np.ndarray:
    """Class labels (N,) of uint8 images (N, 64, 64, 3), by the shipped judge named
    `judge` ("colour" or "shape")."""
    from .classifier import load_classifier, predict
    if judge not in JUDGES:
        raise ValueError(f"no judge {judge!r}; there are {sorted(JUDGES)}")
    if judge not in _loaded:
        _loaded[judge] = load_classifier(JUDGES[judge])
    return predict(_loaded[judge], images)
