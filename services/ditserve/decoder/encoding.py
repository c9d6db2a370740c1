"""RGB uint8 pixels → PNG, JPEG or WebP bytes with Pillow."""

from __future__ import annotations

import io

import torch
from PIL import Image

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_QUALITY = 90


def encode_image(pixels: torch.Tensor, fmt: str, quality: int = 0) -> bytes:
    """One (H, W, 3) uint8 image in `fmt` ("png", "jpeg", "webp"); quality 0 means 90."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; known: {', '.join(FORMATS)}")
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be 1..100 (0 = {DEFAULT_QUALITY}), got {quality}")
    image = Image.fromarray(pixels.numpy())
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format=FORMATS[fmt], quality=quality or DEFAULT_QUALITY)
    return buffer.getvalue()


def encode_images(pixels: torch.Tensor, fmt: str, quality: int = 0) -> list[bytes]:
    """(N, H, W, 3) uint8 → N encoded images."""
    return [encode_image(p, fmt, quality) for p in pixels]
