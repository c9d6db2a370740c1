"""The numpy-free .npy writer matches numpy.load."""

from __future__ import annotations

import numpy as np
import pytest
from ditserve_client import TypedArray, write_npy
from ditserve_client.npy import npy_header


@pytest.mark.parametrize("shape, dtype, name", [
    ((2, 4, 8, 8), "<f4", "FP32"), ((5,), "<f4", "FP32"), ((), "<f4", "FP32"),
    ((3, 2), "<f2", "FP16"), ((2, 3), "<i8", "INT64"), ((0, 4), "<f4", "FP32"),
])
def test_numpy_loads_what_we_write(tmp_path, shape, dtype, name):
    expected = (np.arange(int(np.prod(shape))) * 0.5 - 3).astype(dtype).reshape(shape)
    path = write_npy(tmp_path / "x.npy", TypedArray(shape, name, expected.tobytes()))
    loaded = np.load(path)
    assert loaded.dtype == expected.dtype and loaded.shape == shape
    np.testing.assert_array_equal(loaded, expected)


def test_header_is_64_byte_aligned():
    for shape in [(1,), (2, 4, 32, 32), (123456, 7)]:
        assert len(npy_header("<f4", shape)) % 64 == 0


def test_bf16_is_refused(tmp_path):
    with pytest.raises(ValueError, match="BF16"):
        write_npy(tmp_path / "x.npy", TypedArray((1,), "BF16", b"\0\0"))
