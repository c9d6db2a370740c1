"""`ditserve train-demo --quick` trains every stage end to end and writes the weights
layout, deterministically for a seed."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from ditserve.demo.classifier import load_classifier
from ditserve.demo.dit import train_dit
from ditserve.demo.shapes import make_dataset
from ditserve.demo.vae import train_vae
from ditserve.model import load_dit
from safetensors.torch import load_file

CLI = [sys.executable, "-m", "ditserve.cli", "train-demo"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "weights"
    done = subprocess.run([*CLI, "--out", str(out), "--quick", "--seed", "5", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def test_quick_run_writes_loadable_weights(quick_run):
    dit = load_dit(quick_run / "dit.safetensors")
    assert dit.config.num_classes == 10
    vae = AutoencoderKL.from_pretrained(quick_run / "vae")
    assert vae.config.scaling_factor != 0.18215  # measured, not the default
    load_classifier(quick_run / "classifier.safetensors")
    assert (quick_run / "samples.png").stat().st_size > 0
    assert (quick_run / "training.json").is_file()
    card = (quick_run / "MODEL_CARD.md").read_text()
    assert "| ddim | 2 | 4 |" in card and "red circle" in card


def test_same_seed_gives_the_same_weights(quick_run):
    # Deterministic for a seed: training twice in-process gives the same VAE and DiT.
    torch.set_num_threads(1)
    images, _ = make_dataset(40, seed=5)
    first, _ = train_vae(images, 2, 4, seed=5, log=lambda _: None)
    second, _ = train_vae(images, 2, 4, seed=5, log=lambda _: None)
    latents, labels = torch.randn(32, 4, 16, 16), torch.arange(32) % 10
    dit_a, _ = train_dit(latents, labels, 2, 8, seed=5, log=lambda _: None)
    dit_b, _ = train_dit(latents, labels, 2, 8, seed=5, log=lambda _: None)
    for a, b in ((first, second), (dit_a, dit_b)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), k
    assert load_file(quick_run / "dit.safetensors")  # the CLI's file is non-empty


def test_rejects_a_negative_seed(tmp_path):
    done = subprocess.run([*CLI, "--out", str(tmp_path / "x"), "--seed", "-1", "--quick"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--seed" in done.stderr


def test_card_only_needs_a_training_run(tmp_path):
    done = subprocess.run([*CLI, "--out", str(tmp_path), "--card-only", "--quick"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "training.json" in done.stderr


def test_card_only_rewrites_the_card(quick_run):
    (quick_run / "MODEL_CARD.md").unlink()
    done = subprocess.run([*CLI, "--out", str(quick_run), "--card-only", "--quick",
                           "--threads", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| ddim | 2 | 4 |" in (quick_run / "MODEL_CARD.md").read_text()


def test_dit_only_needs_a_vae_of_the_same_seed(quick_run, tmp_path):
    done = subprocess.run([*CLI, "--out", str(tmp_path), "--dit-only", "--quick"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--dit-only" in done.stderr and "no VAE" in done.stderr
    done = subprocess.run([*CLI, "--out", str(quick_run), "--dit-only", "--quick", "--seed", "6",
                           "--threads", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "seed 5, not 6" in done.stderr


def test_dit_only_refuses_a_vae_made_by_another_plan(quick_run, tmp_path):
    """The kept VAE and judges must come from the plan this run has before the DiT."""
    shutil.copytree(quick_run / "vae", tmp_path / "vae")
    before = json.loads((quick_run / "training.json").read_text())
    before["plan"]["vae_steps"] += 1
    (tmp_path / "training.json").write_text(json.dumps(before))
    done = subprocess.run([*CLI, "--out", str(tmp_path), "--dit-only", "--quick", "--seed", "5",
                           "--threads", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--dit-only" in done.stderr and "vae_steps 4, not 3" in done.stderr


def test_dit_only_trains_the_dit_again_and_keeps_the_vae(quick_run):
    vae_before = load_file(quick_run / "vae" / "diffusion_pytorch_model.safetensors")
    dit_before = load_file(quick_run / "dit.safetensors")
    (quick_run / "dit.safetensors").unlink()
    done = subprocess.run([*CLI, "--out", str(quick_run), "--dit-only", "--quick", "--seed", "5",
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    vae_after = load_file(quick_run / "vae" / "diffusion_pytorch_model.safetensors")
    dit_after = load_file(quick_run / "dit.safetensors")
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    # The same seed, plan and threads as the full run: the same DiT as that run trained.
    assert dit_before.keys() == dit_after.keys()
    assert all(torch.equal(dit_before[k], dit_after[k]) for k in dit_before)
