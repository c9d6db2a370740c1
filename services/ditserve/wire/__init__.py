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
from .framing import (
    CHUNK_BYTES,
    ByteBudget,
    FrameAssembler,
    Microbatch,
    encode_frames,
    lean_frames,
)
from .lean import LeanFrame, parse_request, parse_response, serialize

__all__ = ["CHUNK_BYTES", "DTYPES", "WIRE_DTYPE_NAMES", "ByteBudget", "FrameAssembler",
           "LeanFrame", "Microbatch", "WireError", "WireOverload", "WireProtocolError",
           "decode_tensor", "encode_frames", "encode_tensor", "lean_frames", "parse_request",
           "parse_response", "serialize", "wire_dtype"]
