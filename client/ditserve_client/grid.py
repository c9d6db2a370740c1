"""Several encoded images → one grid image (needs Pillow, an optional dependency).

Laid out like torchvision's `save_image` in the reference DiT `sample.py`: rows of up to
`columns` images with a 2-pixel gap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .events import EncodedImage

PADDING = 2
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


class PillowMissingError(ImportError):
    """Pillow is needed for this (grids, decoding images) but not installed."""


def require_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise PillowMissingError("Pillow is needed to combine or open images: "
                                 "pip install 'ditserve[images]' (or pillow)") from None
    return Image


def open_image(data: bytes) -> Any:
    """Encoded bytes → an RGB PIL.Image."""
    return require_pillow().open(io.BytesIO(data)).convert("RGB")


def make_grid(images: Sequence[EncodedImage], columns: int | None = None) -> Any:
    """One PIL.Image with the images in rows of `columns` (default: a near-square grid)."""
    if not images:
        raise ValueError("no images to put in a grid")
    pil = [open_image(image.data) for image in images]
    columns = columns or math.ceil(math.sqrt(len(pil)))
    rows = math.ceil(len(pil) / columns)
    width = max(p.width for p in pil) + PADDING
    height = max(p.height for p in pil) + PADDING
    grid = require_pillow().new("RGB", (columns * width + PADDING, rows * height + PADDING))
    for i, image in enumerate(pil):
        grid.paste(image, (PADDING + (i % columns) * width, PADDING + (i // columns) * height))
    return grid


def save_grid(images: Sequence[EncodedImage], path: str | Path, columns: int | None = None,
              quality: int = 90) -> Path:
    """Writes the grid in the format of `path`'s extension (PNG when unknown)."""
    path = Path(path)
    fmt = PIL_FORMATS.get(path.suffix.lstrip(".").lower(), "PNG")
    make_grid(images, columns).save(path, format=fmt, quality=quality)
    return path
