"""The procedural dataset: deterministic for a seed, class-balanced, valid images."""

import numpy as np
import pytest
from ditserve.demo import DEMO_CLASS_NAMES
from ditserve.demo.shapes import CLASS_NAMES, IMAGE_SIZE, _shape_mask, make_dataset


def test_same_seed_same_images_other_seed_other_images():
    a_images, a_labels = make_dataset(40, seed=3)
    b_images, b_labels = make_dataset(40, seed=3)
    c_images, _ = make_dataset(40, seed=4)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)


def test_classes_are_balanced_and_shuffled():
    images, labels = make_dataset(50, seed=0)
    assert images.shape == (50, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10
    assert labels.tolist() != sorted(labels.tolist())


def test_images_vary_within_a_class():
    images, labels = make_dataset(20, seed=1)
    same = images[labels == 0].astype(np.int32)
    assert np.abs(same[0] - same[1]).mean() > 10


def test_shape_colour_dominates_its_class():
    # The brightest pixels of a red-circle image are red: the shape is drawn, not noise.
    images, labels = make_dataset(10, seed=2)
    red = images[labels == CLASS_NAMES.index("red circle")][0].reshape(-1, 3).astype(int)
    top = red[np.argsort(red.sum(1))[-50:]].mean(0)
    assert top[0] > 150 and top[0] > 2 * top[1] and top[0] > 2 * top[2]


def test_random_colours_keep_the_labels_and_change_the_colours():
    # The shape judge's data: the same labels as the class-colour set of that seed, but the
    # shapes' colours no longer follow the class (two red circles differ in hue).
    _, plain_labels = make_dataset(40, seed=2)
    anyc, any_labels = make_dataset(40, seed=2, random_colour=True)
    np.testing.assert_array_equal(plain_labels, any_labels)
    circles = anyc[any_labels == CLASS_NAMES.index("red circle")].reshape(4, -1, 3)
    brightest = np.stack([c[np.argsort(c.sum(1))[-30:]].mean(0) for c in circles.astype(int)])
    assert np.ptp(brightest, axis=0).max() > 60  # colours spread far beyond the ±12 jitter
    assert brightest.max(1).min() > 120  # and each stands out of the dark background


def _bbox_fill(mask: np.ndarray) -> float:
    """Share of the shape's bounding box it covers (1 for an axis-aligned square)."""
    ys, xs = np.nonzero(mask > 0.5)
    return (mask > 0.5).sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def test_upright_draws_the_same_images_unrotated():
    # The DiT's data: the same labels, positions, sizes, colours and backgrounds, no angle.
    plain, plain_labels = make_dataset(60, seed=3)
    upright, upright_labels = make_dataset(60, seed=3, upright=True)
    np.testing.assert_array_equal(plain_labels, upright_labels)
    circles = plain_labels == CLASS_NAMES.index("red circle")  # rotating it changes nothing
    assert np.abs(plain[circles].astype(int) - upright[circles]).mean() < 1.0
    square = CLASS_NAMES.index("blue square")
    fills = {flag: [_bbox_fill(_shape_mask(square, np.random.default_rng(s), flag))
                    for s in range(8)] for flag in (False, True)}
    assert min(fills[True]) > 0.9  # axis-aligned squares
    assert min(fills[False]) < 0.7  # rotated ones fill far less of their box


def test_names_match_the_package_constant():
    assert CLASS_NAMES == DEMO_CLASS_NAMES and len(set(CLASS_NAMES)) == 10


def test_rejects_an_empty_dataset():
    with pytest.raises(ValueError, match="dataset size"):
        make_dataset(0, seed=0)


def _centre(mask: np.ndarray) -> np.ndarray:
    """The coverage-weighted centre (x, y) of a mask, in pixels."""
    ys, xs = np.indices(mask.shape) + 0.5
    return np.array([(xs * mask).sum(), (ys * mask).sum()]) / mask.sum()


def test_centre_spread_moves_the_same_shapes_towards_the_centre():
    # The DiT's data: the same draws (size, angle, colours), each shape nearer the centre.
    plain, plain_labels = make_dataset(40, seed=5, upright=True)
    same, _ = make_dataset(40, seed=5, upright=True, centre_spread=1.0)
    np.testing.assert_array_equal(plain, same)  # 1: where drawn, bit for bit
    near, near_labels = make_dataset(40, seed=5, upright=True, centre_spread=0.2)
    assert not np.array_equal(plain, near)
    np.testing.assert_array_equal(plain_labels, near_labels)
    middle = np.full(2, IMAGE_SIZE / 2)
    symmetric = [CLASS_NAMES.index(name) for name in (  # their centroid is where they are drawn
        "red circle", "blue square", "purple cross", "orange ring", "cyan diamond")]
    for seed in range(12):
        drawn, moved = (_shape_mask(symmetric[seed % 5], np.random.default_rng(seed), True,
                                    spread) for spread in (1.0, 0.2))
        assert abs(drawn.sum() - moved.sum()) < 0.02 * drawn.sum()  # the same shape, moved
        # The centroid's offset shrinks 5×, up to antialiasing (a fraction of a pixel):
        offset, kept = _centre(drawn) - middle, _centre(moved) - middle
        np.testing.assert_allclose(kept, 0.2 * offset, atol=0.3)
    assert max(np.abs(_centre(_shape_mask(0, np.random.default_rng(s), True, 0.2)) - middle).max()
               for s in range(20)) < 3.6  # ±3.4 px at most for radius 14 (RADIUS)
    with pytest.raises(ValueError, match="centre_spread"):
        make_dataset(4, seed=0, centre_spread=1.5)
