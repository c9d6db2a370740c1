"""torch ↔ wire: the one place tensors become bytes and back (docs/ARCHITECTURE.md §5)."""

from .codec import (
    DTYPES,
    WIRE_DTYPE_NAMES,
    WireError,
    WireOverload,
    WireProtocolError,
    decode_tensor,
    encode_tensor,
    wire_dtype,
)
from .framing import CHUNK_BYTES, ByteBudget, FrameAssembler, Microbatch, encode_frames

__all__ = ["CHUNK_BYTES", "DTYPES", "WIRE_DTYPE_NAMES", "ByteBudget", "FrameAssembler",
           "Microbatch", "WireError", "WireOverload", "WireProtocolError", "decode_tensor",
           "encode_frames", "encode_tensor", "wire_dtype"]
