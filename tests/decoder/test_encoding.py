"""Image encoding: valid PNG/JPEG/WebP files of the decoded size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ditserve.decoder.encoding import encode_image, encode_images
from PIL import Image


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"),
                                             ("webp", "WEBP")])
def test_formats_decode_to_the_right_size(fmt, pil_format):
    pixels = torch.randint(0, 256, (2, 24, 40, 3), dtype=torch.uint8)  # (N, H, W, 3)
    encoded = encode_images(pixels, fmt, quality=80)
    assert len(encoded) == 2
    for data, original in zip(encoded, pixels, strict=True):
        image = Image.open(io.BytesIO(data))
        assert image.format == pil_format and image.size == (40, 24) and image.mode == "RGB"
        if fmt == "png":  # lossless
            assert torch.equal(torch.from_numpy(np.array(image)), original)


def test_quality_changes_jpeg_size():
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    assert len(encode_image(pixels, "jpeg", 10)) < len(encode_image(pixels, "jpeg", 95))


@pytest.mark.parametrize("fmt, quality, message", [("gif", 0, "unknown image format"),
                                                   ("jpeg", 101, "quality")])
def test_bad_options_are_rejected(fmt, quality, message):
    with pytest.raises(ValueError, match=message):
        encode_image(torch.zeros(4, 4, 3, dtype=torch.uint8), fmt, quality)
