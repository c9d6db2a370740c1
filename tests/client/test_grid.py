"""Grids: images in rows with 2-px gaps, class names written under each image or column."""

from __future__ import annotations

import numpy as np
import pytest
from ditserve_client.events import EncodedImage
from ditserve_client.grid import CAPTION_HEIGHT, PADDING, make_grid

from .conftest import IMAGE_SIDE, png_bytes


def images(labels: list[int]) -> list[EncodedImage]:
    return [EncodedImage(png_bytes(label), "png", IMAGE_SIDE, IMAGE_SIDE, label)
            for label in labels]


def footer_cell(grid, column: int) -> np.ndarray:
    """The caption under `column` of a grid with one caption line per column."""
    pixels = np.asarray(grid)
    left = PADDING + column * (IMAGE_SIDE + PADDING)
    return pixels[-CAPTION_HEIGHT:, left:left + IMAGE_SIDE]


def test_the_demo_grid_names_each_column_once():
    """`ditserve demo`: rows of the same classes, each class's name under its column."""
    names = ["red circle", "blue square", "green triangle"]
    grid = make_grid(images([0, 1, 2] * 2), columns=3, captions=names)
    assert grid.size == (3 * (IMAGE_SIDE + PADDING) + PADDING,
                         2 * (IMAGE_SIDE + PADDING) + PADDING + CAPTION_HEIGHT)
    cells = [footer_cell(grid, c) for c in range(3)]
    assert all(cell.max() > 128 for cell in cells)  # light text on the dark strip
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])
    same = make_grid(images([0, 1, 2] * 2), columns=3, captions=["red circle", "x", "y"])
    assert np.array_equal(footer_cell(same, 0), cells[0])  # the text is the name's


def test_no_captions_no_strip():
    grid = make_grid(images([0, 1, 2, 3]))
    assert grid.size == (2 * (IMAGE_SIDE + PADDING) + PADDING,) * 2


def test_a_long_name_is_shortened_to_fit_its_column():
    grid = make_grid(images([0, 1]), columns=2, captions=["a" * 200, "b"])
    assert grid.width == 2 * (IMAGE_SIDE + PADDING) + PADDING
    gap = np.asarray(grid)[-CAPTION_HEIGHT:, PADDING + IMAGE_SIDE:2 * PADDING + IMAGE_SIDE]
    assert gap.max() == 0  # nothing spills into the gap between the columns


def test_caption_count_must_fit():
    with pytest.raises(ValueError, match="2 captions for 3 images in 3 columns"):
        make_grid(images([0, 1, 2]), columns=3, captions=["a", "b"])
