"""The shipped demo model: loads in the formats users load, is small, and makes pictures
of the class asked for (judged by the shipped classifier)."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from ditserve.demo import (
    DEMO_CLASS_NAMES,
    DEMO_CLASSIFIER_PATH,
    DEMO_DIT_PATH,
    DEMO_SHAPE_CLASSIFIER_PATH,
    DEMO_VAE_PATH,
    DEMO_WEIGHTS,
    classify,
)
from ditserve.demo.card import write_card
from ditserve.demo.generate import generate_images
from ditserve.demo.shapes import make_dataset
from ditserve.model import load_dit


@pytest.fixture(scope="module")
def dit():
    torch.set_num_threads(1)
    return load_dit(DEMO_DIT_PATH)


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_pretrained(DEMO_VAE_PATH).eval()


def test_all_files_ship_under_20_mb():
    names = ["dit.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "classifier.safetensors", "shape_classifier.safetensors", "class_names.txt",
             "MODEL_CARD.md", "samples.png", "training.json"]
    for name in names:
        assert (DEMO_WEIGHTS / name).is_file(), name
    total = sum(p.stat().st_size for p in DEMO_WEIGHTS.rglob("*") if p.is_file())
    assert total < 20e6


def test_class_names_file_matches():
    names = (DEMO_WEIGHTS / "class_names.txt").read_text().splitlines()
    assert names == DEMO_CLASS_NAMES


def test_dit_and_vae_shapes_fit_together(dit, vae):
    cfg = dit.config
    assert (cfg.num_classes, cfg.in_channels, cfg.input_size) == (10, 4, 16)
    assert cfg.learn_sigma and cfg.has_null_class and cfg.depth >= 2
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 3  # ×4 down
    assert 0.05 < vae.config.scaling_factor < 20  # measured from the data, not SD's default


def test_classifier_recognises_fresh_procedural_images():
    assert DEMO_CLASSIFIER_PATH.is_file()
    images, labels = make_dataset(500, seed=987_654)
    assert (classify(images) == labels).mean() >= 0.98


def test_shape_judge_names_outlines_in_any_colour():
    # Trained on the outlines in random colours, it needs no class colour...
    assert DEMO_SHAPE_CLASSIFIER_PATH.is_file()
    images, labels = make_dataset(500, seed=987_655, random_colour=True)
    assert (classify(images, "shape") == labels).mean() >= 0.95
    # ...and recolouring the class-coloured shapes (RGB → BGR: a red circle turns blue, a
    # blue square red) leaves its answers right.
    images, labels = make_dataset(300, seed=987_656)
    assert (classify(np.ascontiguousarray(images[..., ::-1]), "shape") == labels).mean() >= 0.95


def test_classify_rejects_float_images_and_unknown_judges():
    with pytest.raises(ValueError, match="uint8"):
        classify(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no judge"):
        classify(np.zeros((1, 64, 64, 3), dtype=np.uint8), "smell")


# The shipped model reaches 95-98% with guidance 4 over 100 images (MODEL_CARD.md) and
# 27/30 with these settings and seed; the bar leaves one image of slack for other CPUs'
# float order. The pipeline test (tests/launcher) holds the server's defaults, and issue 17's
# shape-judge bars as a strict xfail.
GENERATION_ACCURACY_BAR = 0.85


def test_generated_images_show_the_requested_class(dit, vae):
    labels = torch.arange(10).repeat_interleave(3)
    images = generate_images(dit, vae, labels, "ddim", 25, 4.0, seed=11)
    assert images.shape == (30, 64, 64, 3) and images.dtype == np.uint8
    assert (classify(images) == labels.numpy()).mean() >= GENERATION_ACCURACY_BAR


def test_guidance_changes_the_output(dit, vae):
    labels = torch.tensor([0, 5])
    plain = generate_images(dit, vae, labels, "ddim", 5, 1.0, seed=3)
    guided = generate_images(dit, vae, labels, "ddim", 5, 4.0, seed=3)
    assert not np.array_equal(plain, guided)


def test_model_card_is_what_the_recipe_writes_from_the_shipped_run(tmp_path, dit):
    """The card is rendered from training.json (`train-demo --card-only`): a template edit
    must come with the regenerated card, never a hand-edited one that drifts."""
    stats = json.loads((DEMO_WEIGHTS / "training.json").read_text())
    write_card(tmp_path / "MODEL_CARD.md", stats, DEMO_WEIGHTS, dit.config)
    assert (tmp_path / "MODEL_CARD.md").read_text() == (DEMO_WEIGHTS / "MODEL_CARD.md").read_text()
