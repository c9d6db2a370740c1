"""Several encoded images → one grid image, with class names as captions (Pillow).

Laid out like torchvision's `save_image` in the reference DiT `sample.py`: rows of up to
`columns` images with a 2-pixel gap. Captions use Pillow's built-in font (no font file to
ship or find): under each image, or once under each column when every row holds the same
classes (the demo's grid).
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
CAPTION_SIZES = (12, 11, 10, 9, 8)
"""Font sizes (px) tried in turn until a caption fits its image's width."""
CAPTION_HEIGHT = 14
"""Pixels of a caption line: the largest font size plus room for descenders."""


class PillowMissingError(ImportError):
    """Pillow is needed for this but not installed (it is a base dependency of ditserve)."""


def require_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise PillowMissingError("Pillow is needed to combine or open images: "
                                 "pip install pillow") from None
    return Image


def open_image(data: bytes) -> Any:
    """Encoded bytes → an RGB PIL.Image."""
    return require_pillow().open(io.BytesIO(data)).convert("RGB")


def _fitted(text: str, width: int) -> tuple[str, Any]:
    """The caption (shortened with "…" if need be) and the largest font it fits in."""
    from PIL import ImageFont

    for size in CAPTION_SIZES:
        font = ImageFont.load_default(size=size)
        if font.getlength(text) <= width:
            return text, font
    while len(text) > 1 and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…", font


def _caption(draw: Any, text: str, left: int, top: int, width: int) -> None:
    """`text` centred in the strip [left, left + width) below `top`."""
    text, font = _fitted(text, width)
    x = left + (width - font.getlength(text)) / 2
    draw.text((x, top + 1), text, fill=(255, 255, 255), font=font)


def make_grid(images: Sequence[EncodedImage], columns: int | None = None,
              captions: Sequence[str] = ()) -> Any:
    """One PIL.Image with the images in rows of `columns` (default: a near-square grid).
    `captions`: one per image (written under each), or one per column (under the grid)."""
    if not images:
        raise ValueError("no images to put in a grid")
    pil = [open_image(image.data) for image in images]
    columns = columns or math.ceil(math.sqrt(len(pil)))
    rows = math.ceil(len(pil) / columns)
    if captions and len(captions) not in (len(pil), columns):
        raise ValueError(f"{len(captions)} captions for {len(pil)} images in {columns} columns")
    per_image = bool(captions) and len(captions) == len(pil)
    width = max(p.width for p in pil) + PADDING
    image_height = max(p.height for p in pil) + PADDING
    height = image_height + (CAPTION_HEIGHT if per_image else 0)
    footer = CAPTION_HEIGHT if captions and not per_image else 0
    Image = require_pillow()
    grid = Image.new("RGB", (columns * width + PADDING, rows * height + PADDING + footer))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(pil):
        left, top = PADDING + (i % columns) * width, PADDING + (i // columns) * height
        grid.paste(image, (left, top))
        if per_image:
            _caption(draw, captions[i], left, top + image.height, width - PADDING)
    for column, text in enumerate(captions if footer else ()):
        _caption(draw, text, PADDING + column * width, rows * height + PADDING, width - PADDING)
    return grid


def save_grid(images: Sequence[EncodedImage], path: str | Path, columns: int | None = None,
              quality: int = 90, captions: Sequence[str] = ()) -> Path:
    """Writes the grid in the format of `path`'s extension (PNG when unknown)."""
    path = Path(path)
    fmt = PIL_FORMATS.get(path.suffix.lstrip(".").lower(), "PNG")
    make_grid(images, columns, captions).save(path, format=fmt, quality=quality)
    return path
