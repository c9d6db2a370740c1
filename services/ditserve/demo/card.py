"""The demo model's checks and model card: classifier accuracy on generated images per
sampler setting, a sample grid with every class, and MODEL_CARD.md."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ..model import DiT
from .classifier import ShapeClassifier, predict
from .generate import generate_images
from .shapes import CLASS_NAMES


def generation_accuracy(dit: DiT, vae: AutoencoderKL, classifier: ShapeClassifier,
                        sampler: str, steps: int, guidance: float, per_class: int,
                        seed: int) -> float:
    """Fraction of generated images (per_class of each class) the classifier names right."""
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    images = generate_images(dit, vae, labels, sampler, steps, guidance, seed)
    return float((predict(classifier, images) == labels.numpy()).mean())


def evaluate(dit: DiT, vae: AutoencoderKL, classifier: ShapeClassifier,
             settings: tuple[tuple[str, int, float], ...], per_class: int, seed: int,
             log: Callable[[str], None]) -> list[dict]:
    """One row per (sampler, steps, guidance): accuracy and seconds taken."""
    rows = []
    for sampler, steps, guidance in settings:
        start = time.monotonic()
        acc = generation_accuracy(dit, vae, classifier, sampler, steps, guidance, per_class,
                                  seed)
        rows.append({"sampler": sampler, "steps": steps, "guidance": guidance,
                     "accuracy": acc, "images": per_class * len(CLASS_NAMES),
                     "seconds": time.monotonic() - start})
        log(f"generated with {sampler} {steps} guidance {guidance}: accuracy {acc:.3f}")
    return rows


def write_sample_grid(dit: DiT, vae: AutoencoderKL, path: Path, seed: int, steps: int = 50,
                      per_class: int = 8) -> None:
    """A grid, one row per class, of ddim guidance-4 samples, scaled ×2."""
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    images = generate_images(dit, vae, labels, "ddim", steps, 4.0, seed)
    side = images.shape[1]
    grid = images.reshape(len(CLASS_NAMES), per_class, side, side, 3)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(len(CLASS_NAMES) * side, per_class * side, 3)
    Image.fromarray(np.ascontiguousarray(grid)).resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(path)


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def write_card(path: Path, stats: dict, out: Path) -> None:
    """MODEL_CARD.md from the run's measurements."""
    plan = SimpleNamespace(**stats["plan"])
    losses = stats["dit_losses"]
    rows = "\n".join(f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | "
                     f"{100 * r['accuracy']:.1f}% | {r['images']} |"
                     for r in stats["generation"])
    sizes = ", ".join(f"`{name}` {_size_mb(out / name):.2f} MB" for name in
                      ("dit.safetensors", "vae", "classifier.safetensors"))
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    vae_cfg["block_out_channels"] = tuple(vae_cfg["block_out_channels"])
    path.write_text(CARD.format(vae_cfg=vae_cfg,
        classes=", ".join(CLASS_NAMES), plan=plan, stats=stats, rows=rows, sizes=sizes,
        mse=losses["mse"], vb=losses["vb"], minutes=stats["train_s"] / 60,
        vae_min=stats["vae_s"] / 60, cls_min=stats["classifier_s"] / 60,
        dit_min=stats["dit_s"] / 60, acc=100 * stats["classifier_acc"],
        provenance=_provenance(stats)))


def _provenance(stats: dict) -> str:
    """The end of the provenance sentence: how the DiT was trained further, if it was."""
    more = stats.get("dit_continued")
    if not more:
        return "."
    return (f", except that its DiT was then trained {more['steps']} steps further (from the"
            f" shipped EMA weights, AdamW peak lr {more['lr']:g}, batch {more['batch']}, "
            f"seed {more['seed']}, {more['seconds'] / 60:.1f} min, same data, VAE and "
            f"classifier; the losses above are of this second part).")


CARD = """# The ditserve demo model

A small class-conditional DiT and VAE that `ditserve train-demo` trains on this machine,
so that the demo makes real pictures without downloading weights.

## Data
Procedural 64×64 images drawn in code (`ditserve.demo.shapes`, seed {stats[seed]}): one
filled shape per image at a random position, size (radius 11–22 px) and rotation, colour
jittered, on a random dark two-colour gradient with pixel noise. {plan.train_images}
training images, class-balanced. Classes (label order): {classes}.

## Models
- VAE: diffusers `AutoencoderKL`, block_out_channels {vae_cfg[block_out_channels]},
  layers_per_block {vae_cfg[layers_per_block]}, norm_num_groups {vae_cfg[norm_num_groups]},
  4 latent channels, ×8 down: 64×64×3 ↔ (4, 8, 8). (With one channel per norm group the
  full-resolution GroupNorms erase each image's colours.) L1 + 1e-6·KL, AdamW peak lr
  {plan.vae_lr:g} (warm-up, cosine decay), {plan.vae_steps} steps of batch
  {plan.vae_batch}; final L1 (on [-1, 1], mean of the last 50 steps; the data's pixel
  noise is not reproduced)
  {stats[vae_l1]:.4f}. `scaling_factor` = 1/std of the training latents =
  {stats[scaling_factor]:.4f} (in `vae/config.json`).
- DiT: `DiT-Demo/2` — depth 4, hidden 128, 4 heads, patch 2 (16 tokens), learned sigma,
  10 classes + null class (label dropout 0.1). Reference init and hybrid loss (eps MSE +
  VLB), timesteps uniform over 1000, AdamW peak lr {plan.dit_lr:g} (200 warm-up steps, cosine
  decay), {plan.dit_steps} steps of batch
  {plan.dit_batch}; then {plan.dit_finetune_steps} more steps from those EMA weights (as
  float16) at peak lr {plan.dit_finetune_lr:g} (seed + 1); EMA {plan.ema_decay} weights,
  shipped in float16. Final losses (mean of the last 100 steps of the second phase): mse
  {mse:.4f}, vb {vb:.4f}.
- Classifier (the judge): 4-layer CNN, {plan.classifier_steps} steps of batch 64 on the
  drawn images plus the VAE reconstructions of {plan.judge_recon_images} of them (what
  the VAE does to each class), blur/noise augmentation; held-out accuracy {acc:.2f}% on
  {plan.heldout_images} fresh images.

Training time: {minutes:.1f} min in all (VAE {vae_min:.1f}, classifier {cls_min:.1f},
DiT {dit_min:.1f}) with {stats[threads]} CPU threads. Files: {sizes}.
All files come from one run of `ditserve train-demo --out DIR --seed {stats[seed]}`
(the FULL plan of `ditserve.demo.recipe`){provenance}

## Generated images named right by the classifier
{plan.eval_per_class} images per class per setting, in-process (`ditserve.demo.generate`),
reference CFG on the first 3 latent channels.

| sampler | steps | guidance | accuracy | images |
|---|---|---|---|---|
{rows}

`samples.png`: one row per class (label order), ddim 50, guidance 4.
"""

