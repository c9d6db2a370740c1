"""The demo's judge: a small CNN that names the shape class of a 64×64 image.

Trained by `ditserve train-demo` on the procedural data with blur and noise augmentation
(generated images are smoother than drawn ones), it measures whether generated images
show the class that was asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .shapes import CLASS_NAMES


class ShapeClassifier(nn.Module):
    """uint8-derived images (N, 3, 64, 64) in [-1, 1] → class logits (N, 10)."""

    def __init__(self, num_classes: int = len(CLASS_NAMES)):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 24), (24, 48), (48, 64), (64, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU()]
        self.features = nn.Sequential(*layers)  # (N, 64, 4, 4)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur half the batch (3×3 box) and add noise, so decoded images look in-distribution."""
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(
        x.shape, generator=gen)


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int, seed: int,
                     log: Callable[[str], None], batch: int = 64) -> ShapeClassifier:
    """Trains on uint8 images (N, H, W, 3) and labels (N,); returns the model in eval mode."""
    torch.manual_seed(seed)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen).numpy()
        loss = F.cross_entropy(model(_augment(_unit(images[idx]), gen)),
                               torch.from_numpy(labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {float(loss.detach()):.4f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: ShapeClassifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class labels (N,) int64 of uint8 images (N, H, W, 3)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"classify needs uint8 images (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    return np.concatenate([model(_unit(images[i:i + batch])).argmax(1).numpy()
                           for i in range(0, len(images), batch)])


def save_classifier(model: ShapeClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path) -> ShapeClassifier:
    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
