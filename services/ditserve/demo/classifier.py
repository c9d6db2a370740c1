"""The demo's judges: small CNNs that name the shape class of a 64×64 image.

Trained by `ditserve train-demo` on the procedural data with blur and noise augmentation
(generated images are smoother than drawn ones), they measure whether generated images
show the class that was asked for. Two kinds: the colour judge sees RGB and may tell the
classes apart by colour alone; the shape judge sees a grey image normalised per image and
is trained on shapes in random colours, so only the outline can tell it the class.
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
    """Prepared images (N, C, 64, 64) → class logits (N, 10): C = 3 for the colour judge
    (RGB in [-1, 1]), C = 1 for the shape judge (grey, zero mean and unit std per image)."""

    def __init__(self, num_classes: int = len(CLASS_NAMES), in_channels: int = 3):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"a judge sees 3 (colour) or 1 (grey) channels, got {in_channels}")
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, 24), (24, 48), (48, 64), (64, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU()]
        self.features = nn.Sequential(*layers)  # (N, 64, 4, 4)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """RGB (N, 3, H, W) in [-1, 1] → this judge's input (N, C, H, W)."""
        return x if self.in_channels == 3 else grey(x)


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def grey(x: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) → luminance (N, 1, H, W) with zero mean and unit std per image: what
    is left tells shapes apart by outline, not by colour or brightness. The 0.05 floor (on the
    [-1, 1] scale, about 6 grey levels) keeps a flat image from blowing its noise up."""
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    centred = lum - lum.mean(dim=(2, 3), keepdim=True)
    return centred / centred.std(dim=(2, 3), keepdim=True).clamp_min(0.05)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur half the batch (3×3 box) and add noise, so decoded images look in-distribution."""
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(
        x.shape, generator=gen)


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int, seed: int,
                     log: Callable[[str], None], batch: int = 64,
                     in_channels: int = 3) -> ShapeClassifier:
    """Trains on uint8 images (N, H, W, 3) and labels (N,) a colour judge (in_channels 3) or
    a shape judge (1); returns the model in eval mode."""
    torch.manual_seed(seed)
    model = ShapeClassifier(in_channels=in_channels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen).numpy()
        loss = F.cross_entropy(model(model.prepare(_augment(_unit(images[idx]), gen))),
                               torch.from_numpy(labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier ({in_channels} channels) step {step}/{steps} "
                f"loss {float(loss.detach()):.4f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: ShapeClassifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class labels (N,) int64 of uint8 images (N, H, W, 3)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"classify needs uint8 images (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    return np.concatenate([model(model.prepare(_unit(images[i:i + batch]))).argmax(1).numpy()
                           for i in range(0, len(images), batch)])


def save_classifier(model: ShapeClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path) -> ShapeClassifier:
    """A saved judge; its first convolution's weight (24, C, 3, 3) tells which kind."""
    state = load_file(str(path))
    model = ShapeClassifier(in_channels=state["features.0.weight"].shape[1])
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
