"""Writes a TypedArray as a .npy file without numpy: header + raw little-endian bytes.

Format version 1.0 (numpy/lib/format.py, NEP 1): the magic string, the version, a
little-endian uint16 header length, then an ASCII dict literal padded with spaces and a
newline so that the data starts on a 64-byte boundary, then the C-order bytes.
"""

from __future__ import annotations

from pathlib import Path

from .events import NUMPY_DTYPES, TypedArray

MAGIC = b"\x93NUMPY\x01\x00"
ALIGNMENT = 64


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The magic, version, length and padded dict of a C-order array."""
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}"
    unpadded = len(MAGIC) + 2 + len(text) + 1
    text += " " * (-unpadded % ALIGNMENT) + "\n"
    return MAGIC + len(text).to_bytes(2, "little") + text.encode("latin1")


def write_npy(path: str | Path, array: TypedArray) -> Path:
    """Saves `array` so that numpy.load(path) returns it (FP32, FP16, INT64, ...)."""
    if array.dtype not in NUMPY_DTYPES:
        raise ValueError(f"cannot write {array.dtype} as .npy (numpy has no such dtype)")
    path = Path(path)
    path.write_bytes(npy_header(NUMPY_DTYPES[array.dtype], array.shape) + array.data)
    return path
