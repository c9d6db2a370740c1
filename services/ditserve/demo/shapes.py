"""The procedural dataset of the demo model: ten coloured shapes on random backgrounds.

Every image is drawn in code (numpy + PIL), deterministically from a seed: one filled shape
of a class-specific form and colour (jittered), at a random position, size and rotation,
on a random dark background (a two-colour gradient plus noise). Shapes are drawn at 4× and
downsampled, so their edges are antialiased.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
"""Side of every image, in pixels."""
RADIUS = (14.0, 24.0)
"""Range of a shape's radius, in pixels: large in the frame (up to 48 of 64 px across), so
corners and notches span several of the VAE's 4-pixel latent cells."""
_SUPERSAMPLE = 4

# (name, RGB colour, outline function). The outline maps (radius, angle) → vertices around 0.
Outline = Callable[[float, float], list[tuple[float, float]]]


def _regular(sides: int, start: float = 0.0) -> Outline:
    def outline(r: float, angle: float) -> list[tuple[float, float]]:
        return [(r * math.cos(angle + start + 2 * math.pi * k / sides),
                 r * math.sin(angle + start + 2 * math.pi * k / sides)) for k in range(sides)]
    return outline


def _polar(points: list[tuple[float, float]]) -> Outline:
    """An outline from (radius fraction, angle) pairs, rotated by the draw angle."""
    def outline(r: float, angle: float) -> list[tuple[float, float]]:
        return [(r * f * math.cos(a + angle), r * f * math.sin(a + angle)) for f, a in points]
    return outline


def _cartesian(points: list[tuple[float, float]]) -> Outline:
    """An outline from unit-square (x, y) points, scaled by r and rotated."""
    def outline(r: float, angle: float) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(r * (x * c - y * s), r * (x * s + y * c)) for x, y in points]
    return outline


def _star() -> Outline:
    return _polar([(1.0 if k % 2 == 0 else 0.42, -math.pi / 2 + math.pi * k / 5)
                   for k in range(10)])


def _cross() -> Outline:
    a, b = 0.33, 1.0
    return _cartesian([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                       (-a, a), (-b, a), (-b, -a), (-a, -a)])


def _heart() -> Outline:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17, (y + 3) / 17))
    return _cartesian(pts)


def _arrow() -> Outline:
    return _cartesian([(-1.0, -0.3), (0.1, -0.3), (0.1, -0.75), (1.0, 0.0), (0.1, 0.75),
                       (0.1, 0.3), (-1.0, 0.3)])


CLASSES: list[tuple[str, tuple[int, int, int], Outline]] = [
    ("red circle", (230, 30, 30), _regular(40)),
    ("blue square", (40, 80, 255), _regular(4, math.pi / 4)),
    ("green triangle", (30, 200, 40), _regular(3, -math.pi / 2)),
    ("yellow star", (250, 230, 20), _star()),
    ("purple cross", (170, 50, 230), _cross()),
    ("orange ring", (255, 140, 0), _regular(40)),
    ("cyan diamond", (0, 230, 230), _cartesian([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)])),
    ("white heart", (245, 245, 245), _heart()),
    ("pink hexagon", (255, 105, 190), _regular(6)),
    ("brown arrow", (150, 85, 35), _arrow()),
]
CLASS_NAMES: list[str] = [name for name, _, _ in CLASSES]
"""Class label → name, as the CLI and GetModelInfo show it."""
_RING = CLASS_NAMES.index("orange ring")


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dark two-colour gradient in a random direction, plus pixel noise: (S, S, 3) float."""
    a, b = rng.uniform(0, 90, 3), rng.uniform(0, 90, 3)
    theta = rng.uniform(0, 2 * math.pi)
    grid = np.linspace(-1, 1, IMAGE_SIZE)
    ramp = (np.cos(theta) * grid[None, :] + np.sin(theta) * grid[:, None] + 1.4) / 2.8
    image = a + (b - a) * ramp[..., None]
    return image + rng.normal(0, rng.uniform(0, 10), image.shape)


def _shape_mask(label: int, rng: np.random.Generator, upright: bool = False,
                centre_spread: float = 1.0) -> np.ndarray:
    """The antialiased coverage (S, S) in [0, 1] of one shape of class `label`; `upright`:
    not rotated (the angle is still drawn, so every other draw stays the same);
    `centre_spread`: the shape's centre moved to that fraction of its drawn offset from
    the image's centre (the position is still drawn)."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    radius = rng.uniform(*RADIUS)
    cx, cy = (rng.uniform(radius + 1, IMAGE_SIZE - radius - 1) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    if upright:
        angle = 0.0
    if centre_spread != 1.0:
        cx, cy = (IMAGE_SIZE / 2 + (v - IMAGE_SIZE / 2) * centre_spread for v in (cx, cy))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    vertices = CLASSES[label][2](radius * _SUPERSAMPLE, angle)
    draw.polygon([(cx * _SUPERSAMPLE + x, cy * _SUPERSAMPLE + y) for x, y in vertices], fill=255)
    if label == _RING:  # punch the hole
        inner = _regular(40)(radius * _SUPERSAMPLE * rng.uniform(0.5, 0.65), 0.0)
        draw.polygon([(cx * _SUPERSAMPLE + x, cy * _SUPERSAMPLE + y) for x, y in inner], fill=0)
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """Any colour (3,) that stands out of the dark background: brightest channel ≥ 140."""
    colour = rng.uniform(0, 255, 3)
    return colour * max(1.0, rng.uniform(140, 255) / colour.max())


def draw_image(label: int, rng: np.random.Generator, random_colour: bool = False,
               upright: bool = False, centre_spread: float = 1.0) -> np.ndarray:
    """One (S, S, 3) uint8 image of class `label`, in its class colour (jittered) or, with
    `random_colour`, in any colour (for a judge that must tell classes by outline alone)."""
    background = _background(rng)
    colour = (_random_colour(rng) if random_colour
              else np.clip(np.array(CLASSES[label][1]) + rng.normal(0, 12, 3), 0, 255))
    mask = _shape_mask(label, rng, upright, centre_spread)[..., None]
    shade = 1 + rng.uniform(-0.08, 0.08) * np.linspace(-1, 1, IMAGE_SIZE)[:, None, None]
    image = background * (1 - mask) + colour * shade * mask
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_dataset(count: int, seed: int, random_colour: bool = False, upright: bool = False,
                 centre_spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`count` images (count, S, S, 3) uint8 and labels (count,) int64, class-balanced
    (labels cycle 0..9, then are shuffled), the same for the same seed; `random_colour`
    draws every shape in any colour instead of its class's; `upright` draws the same
    images with no shape rotated, `centre_spread` < 1 with each shape nearer the centre."""
    if count < 1:
        raise ValueError(f"dataset size must be positive, got {count}")
    if not 0.0 <= centre_spread <= 1.0:
        raise ValueError(f"centre_spread must be in [0, 1], got {centre_spread}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(CLASSES)).astype(np.int64)
    images = np.stack([draw_image(int(y), rng, random_colour, upright, centre_spread)
                       for y in labels])
    return images, labels
