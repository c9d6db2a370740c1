"""`ditserve train-demo`: data → VAE → classifier → DiT → checks, model card, sample grid.

Every stage is seeded from one seed, so a run is deterministic for a seed and a thread
count (CPU kernels may sum in another order with more threads).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..model import load_dit, save_ditserve
from .card import evaluate, write_card, write_sample_grid
from .classifier import (
    ShapeClassifier,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from .dit import DEMO_DIT_CONFIG, train_dit
from .shapes import CLASS_NAMES, make_dataset
from .vae import decode, encode, set_scaling_factor, train_vae


@dataclass(frozen=True)
class TrainPlan:
    """Sizes of one training run."""

    train_images: int = 10000
    """Procedural training images (class-balanced)."""
    heldout_images: int = 2000
    """Held-out images for the classifier's accuracy (another seed)."""
    vae_steps: int = 1500
    """VAE optimiser steps. The VAE is the first bottleneck of recognisable outlines: no DiT
    draws an outline its decoder cannot. The shape judge named 64% of the reconstructions
    of the earlier ×8 VAE (1200 steps, no edge term, radius 11–22 px), 89% of this ×4 VAE's
    after a trial of 400 steps (see the model card)."""
    vae_batch: int = 16
    """VAE batch size."""
    vae_lr: float = 2e-3
    """VAE AdamW peak learning rate (warm-up, then cosine decay)."""
    vae_edge_weight: float = 1.0
    """Weight of the VAE's edge term (L1 of pixel differences) beside its plain L1: a
    rounded corner costs little plain L1 but is what tells a square from a circle."""
    vae_colour_weight: float = 1.0
    """Weight of the VAE's colour term (L1 of 8×8-pixel cell means): without it a trial run
    tinted dark backgrounds green (the green triangle's shape accuracy: 31%)."""
    classifier_steps: int = 400
    """Classifier optimiser steps (batch 64)."""
    judge_recon_images: int = 3000
    """Training images whose VAE reconstructions the colour judge also learns from."""
    shape_judge_images: int = 8000
    """Images in random colours the shape judge learns from (its own seed; no VAE
    reconstructions, so that it names only outlines it would name in a drawing)."""
    shape_judge_steps: int = 1500
    """Shape judge optimiser steps (batch 64)."""
    dit_upright: bool = True
    """The DiT learns from the training images drawn upright (no shape rotated; positions,
    sizes, colours and backgrounds unchanged), while the VAE and judges still see every
    rotation. Trained on rotated shapes, the DiT drew corners only where a noised drawing
    already held them: its one-step estimate kept them to t = 100, lost them by t = 400,
    and its samples were rounded blobs (shape judge 46%; see the model card's history)."""
    dit_centre_spread: float = 0.2
    """The DiT's training shapes sit at this fraction of their drawn offset from the image
    centre (within ±3.4 px of it at 0.2; 1: where drawn), the VAE's and judges' where
    drawn. Upright anywhere in the frame, the DiT's samples scored 71 % with the shape
    judge at ddpm 250, guidance 4 (the cross 30 %); centred as well, 98 %, every class
    ≥ 90 % (the model card's history)."""
    dit_steps: int = 6000
    """DiT optimiser steps."""
    dit_lr: float = 1e-3
    """DiT AdamW peak learning rate (above the reference's 1e-4: the run is short)."""
    dit_batch: int = 64
    """DiT batch size."""
    dit_label_lr_scale: float = 10.0
    """The class embedding table's learning rate over `dit_lr` (see train_dit: at 1× the
    timestep embedding drowns the label; at 10× the colour judge named 85 % instead of 70 %
    of the samples of a 4000-step trial)."""
    dit_finetune_steps: int = 6000
    """Second DiT phase, if any: steps from the first phase's (float16) EMA weights, seed + 1."""
    dit_finetune_lr: float = 5e-4
    """Peak learning rate of the second phase (warm-up, then cosine decay)."""
    ema_decay: float = 0.999
    """EMA decay of the shipped DiT weights."""
    eval_per_class: int = 10
    """Generated images per class and sampler setting for the model card."""
    eval_settings: tuple[tuple[str, int, float], ...] = field(default=tuple(
        (sampler, steps, guidance) for sampler, steps in (
            ("ddpm", 250), ("ddim", 50), ("dpm-solver++", 20)) for guidance in (1.0, 4.0)))
    """(sampler, steps, guidance) settings measured for the model card."""
    grid_steps: int = 50
    """DDIM steps of the sample grid."""


PLAN_BEFORE_DIT = ("train_images", "heldout_images", "vae_steps", "vae_batch", "vae_lr",
                   "vae_edge_weight", "vae_colour_weight", "classifier_steps",
                   "judge_recon_images", "shape_judge_images", "shape_judge_steps")
"""The plan's fields that shape the VAE and judges: `--dit-only` keeps those of an earlier
run only if they were the same."""

FULL = TrainPlan()
"""The shipped run (its time on 2 threads is in the model card)."""
QUICK = TrainPlan(train_images=200, heldout_images=100, vae_steps=3, vae_batch=8,
                  classifier_steps=3, judge_recon_images=20, shape_judge_images=100,
                  shape_judge_steps=3, dit_steps=3, dit_batch=16,
                  dit_finetune_steps=2,
                  ema_decay=0.5,
                  eval_per_class=1, eval_settings=(("ddim", 2, 4.0),), grid_steps=2)
"""A tiny run that exercises every stage in seconds (its weights are useless)."""


def train_all(out: Path, seed: int, plan: TrainPlan, log: Callable[[str], None],
              dit_only: bool = False) -> dict:
    """Trains everything into `out` (the layout of demo/weights), then checks it and writes
    the card; returns the measurements (also written to `training.json`). `dit_only`:
    the VAE and judges already in `out` (from a run of the same seed, plan and threads)
    are kept as they are and only the DiT is trained again."""
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"seed": seed, "plan": dataclasses.asdict(plan),
                   "threads": torch.get_num_threads()}
    start = time.monotonic()
    if dit_only:
        images, labels = make_dataset(plan.train_images, seed, upright=plan.dit_upright,
                                      centre_spread=plan.dit_centre_spread)
        return train_dit_only(out, stats, images, labels, plan, log)
    images, labels = make_dataset(plan.train_images, seed)
    heldout, heldout_labels = make_dataset(plan.heldout_images, seed + 1_000_003)
    heldout_any, heldout_any_labels = make_dataset(plan.heldout_images, seed + 1_000_004,
                                                   random_colour=True)
    (out / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    # VAE, and the latents of the training set at the data's scale:
    vae, stats["vae_l1"] = train_vae(images, plan.vae_steps, plan.vae_batch, seed, log,
                                     lr=plan.vae_lr, edge_weight=plan.vae_edge_weight,
                                     colour_weight=plan.vae_colour_weight)
    raw = encode(vae, images)  # (N, 4, 16, 16)
    stats["scaling_factor"] = set_scaling_factor(vae, raw)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    stats["vae_s"] = time.monotonic() - start
    log(f"vae done: l1 {stats['vae_l1']:.4f} scale {stats['scaling_factor']:.4f}")
    # The judges: by colour and shape, and by outline alone (grey, shapes in any colour):
    classifier = train_judge(images, labels, vae, plan, seed, log)
    stats["classifier_acc"] = float((predict(classifier, heldout) == heldout_labels).mean())
    save_classifier(classifier, out / "classifier.safetensors")
    any_colour, any_labels = make_dataset(plan.shape_judge_images, seed + 2_000_003,
                                          random_colour=True)
    shape_judge = train_classifier(any_colour, any_labels, plan.shape_judge_steps, seed + 1,
                                   log, in_channels=1)
    stats["shape_judge_acc"] = {
        "any colour": float((predict(shape_judge, heldout_any) == heldout_any_labels).mean()),
        "class colour": float((predict(shape_judge, heldout) == heldout_labels).mean())}
    save_classifier(shape_judge, out / "shape_classifier.safetensors")
    stats["classifier_s"] = time.monotonic() - start - stats["vae_s"]
    log(f"judges' held-out accuracy: colour {stats['classifier_acc']:.4f}, shape "
        f"{stats['shape_judge_acc']}")
    # The ceiling of any DiT on these latents, before spending the DiT's time:
    ceiling = judge_reconstructions(vae, {"shape": shape_judge, "colour": classifier},
                                    plan.heldout_images, seed)
    log(f"judges on VAE reconstructions: {ceiling['accuracy']} per class {ceiling['per_class']}")
    as_drawn = not plan.dit_upright and plan.dit_centre_spread == 1.0
    dit_latents = (raw if as_drawn else encode(vae, make_dataset(
        plan.train_images, seed, upright=plan.dit_upright,
        centre_spread=plan.dit_centre_spread)[0]))
    train_and_save_dit(out, stats, dit_latents * stats["scaling_factor"], labels, plan, log)
    stats["dit_s"] = time.monotonic() - start - stats["vae_s"] - stats["classifier_s"]
    stats["train_s"] = time.monotonic() - start
    return _record_and_finish(out, stats, plan, log, reconstruction=ceiling)


def train_dit_only(out: Path, stats: dict, images: np.ndarray, labels: np.ndarray,
                   plan: TrainPlan, log: Callable[[str], None]) -> dict:
    """The DiT stage alone, on the VAE in `out`; the VAE's and judges' measurements and
    times are carried over from `out`'s training.json, so the card still tells the whole
    run's time."""
    before_path = out / "training.json"
    if not before_path.is_file() or not (out / "vae").is_dir():
        raise ValueError(f"{out} holds no VAE and training.json to train a DiT on")
    before = json.loads(before_path.read_text())
    for key in ("seed", "threads"):
        if before.get(key) != stats[key]:
            raise ValueError(f"{out} was trained with {key} {before.get(key)}, not {stats[key]}")
    for key in PLAN_BEFORE_DIT:  # what made the kept VAE and judges
        was, now = before.get("plan", {}).get(key), getattr(plan, key)
        if was != now:
            raise ValueError(f"{out} was trained with {key} {was}, not {now}")
    for key in ("vae_l1", "scaling_factor", "vae_s", "classifier_acc", "shape_judge_acc",
                "classifier_s"):
        stats[key] = before[key]
    stats["dit_only"] = True
    start = time.monotonic()
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    latents = encode(vae, images) * vae.config.scaling_factor  # (N, 4, 16, 16)
    train_and_save_dit(out, stats, latents, labels, plan, log)
    stats["dit_s"] = time.monotonic() - start
    stats["train_s"] = stats["vae_s"] + stats["classifier_s"] + stats["dit_s"]
    return _record_and_finish(out, stats, plan, log)


def _record_and_finish(out: Path, stats: dict, plan: TrainPlan, log: Callable[[str], None],
                       reconstruction: dict | None = None) -> dict:
    """Writes training.json, then judges the files and writes the card (`finish`);
    `reconstruction`: the judges' scores on the VAE's reconstructions if this run measured
    them already (on the files it saved)."""
    (out / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    log(f"trained in {stats['train_s']:.0f} s (DiT {stats['dit_s']:.0f} s)")
    finish(out, plan.eval_settings, plan.eval_per_class, plan.grid_steps, log, reconstruction)
    return stats


def train_and_save_dit(out: Path, stats: dict, latents: torch.Tensor, labels: np.ndarray,
                       plan: TrainPlan, log: Callable[[str], None]) -> None:
    """The DiT on scaled latents (N, 4, 16, 16), two phases; its EMA weights ship, in
    float16 to halve the file."""
    seed, targets = stats["seed"], torch.from_numpy(labels)
    dit, stats["dit_losses"] = train_dit(latents, targets, plan.dit_steps, plan.dit_batch,
                                         seed, log, lr=plan.dit_lr, ema_decay=plan.ema_decay,
                                         label_lr_scale=plan.dit_label_lr_scale)
    # Second phase: a lower peak lr from the first phase's EMA weights as shipped (float16).
    if plan.dit_finetune_steps:
        shipped = {k: v.half().float() for k, v in dit.state_dict().items()}
        dit, stats["dit_losses"] = train_dit(
            latents, targets, plan.dit_finetune_steps, plan.dit_batch, seed + 1, log,
            lr=plan.dit_finetune_lr, ema_decay=plan.ema_decay, init=shipped,
            label_lr_scale=plan.dit_label_lr_scale)
    save_ditserve(((k, v.half()) for k, v in dit.state_dict().items()), DEMO_DIT_CONFIG,
                  out / "dit.safetensors")


def train_judge(images: np.ndarray, labels: np.ndarray, vae: AutoencoderKL, plan: TrainPlan,
                seed: int, log: Callable[[str], None]) -> ShapeClassifier:
    """The classifier, trained on drawn images and on their VAE reconstructions: generated
    images come through the VAE, so the judge must know what its blur does to each class."""
    count = min(plan.judge_recon_images, len(images))
    recon = decode(vae, encode(vae, images[:count]) * vae.config.scaling_factor)
    both = np.concatenate([images, recon]), np.concatenate([labels, labels[:count]])
    return train_classifier(*both, plan.classifier_steps, seed, log)


def finish(out: Path, settings: tuple[tuple[str, int, float], ...], per_class: int,
           grid_steps: int, log: Callable[[str], None],
           reconstruction: dict | None = None) -> None:
    """Judges the weights in `out` as shipped: generation accuracy per sampler setting,
    the sample grid, and MODEL_CARD.md (with `training.json`'s measurements)."""
    stats = json.loads((out / "training.json").read_text())
    dit = load_dit(out / "dit.safetensors")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    judges = {name: load_classifier(out / f"{prefix}classifier.safetensors")
              for name, prefix in (("shape", "shape_"), ("colour", ""))}
    stats["reconstruction"] = reconstruction or judge_reconstructions(
        vae, judges, stats["plan"]["heldout_images"], stats["seed"])
    log(f"judges on VAE reconstructions: {stats['reconstruction']['accuracy']}")
    stats["generation"] = evaluate(dit, vae, judges, settings, per_class, stats["seed"], log)
    write_sample_grid(dit, vae, out / "samples.png", stats["seed"], grid_steps)
    (out / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    write_card(out / "MODEL_CARD.md", stats, out, dit.config)


def judge_reconstructions(vae: AutoencoderKL, judges: dict[str, ShapeClassifier], count: int,
                          seed: int) -> dict:
    """Each judge's accuracy, overall and per class, on the VAE's reconstructions of `count`
    held-out drawn images (the seed of the colour judge's held-out set): the most any DiT
    on this VAE's latents can reach, since it draws through the same decoder."""
    images, labels = make_dataset(count, seed + 1_000_003)
    recon = decode(vae, encode(vae, images) * vae.config.scaling_factor)
    right = {name: predict(judge, recon) == labels for name, judge in judges.items()}
    return {"images": count,
            "accuracy": {name: float(ok.mean()) for name, ok in right.items()},
            "per_class": {name: [float(ok[labels == c].mean()) for c in range(len(CLASS_NAMES))]
                          for name, ok in right.items()}}
