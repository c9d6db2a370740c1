"""Tensors on the wire: Open Inference Protocol dtype names, raw little-endian row-major
bytes, at most one copy each way.

- encode: `tensor.contiguous()` (free when already contiguous) viewed as bytes through
  numpy without copying; the one copy is made when the bytes are put in a message.
- decode: `torch.frombuffer` over the received buffer (no copy), reshaped; the one copy
  was made when the chunks were written into the preallocated buffer (framing.py).

Reference: KServe/Open Inference Protocol v2 tensor data types and `raw_*_contents`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import get_args

import numpy as np
import torch

from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import WireDtype

if sys.byteorder != "little":  # torch has no byte-swapping views; every target is LE
    raise ImportError("ditserve's wire codec needs a little-endian machine")

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "FP16": torch.float16, "FP32": torch.float32,
    "FP64": torch.float64, "INT64": torch.int64, "INT32": torch.int32, "UINT8": torch.uint8}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
ELEMENT_SIZES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}
WIRE_DTYPE_NAMES: dict[WireDtype, str] = {name: name.upper() for name in get_args(WireDtype)}
"""Config/CLI spelling of an activation dtype → its wire name ("bf16" → "BF16")."""

MAX_RANK = 8


class WireError(ValueError):
    """A malformed tensor or frame; the peer gets INVALID_ARGUMENT with this message."""

    code: StatusCode = StatusCode.INVALID_ARGUMENT
    """The status the peer gets for that microbatch."""
    microbatch_id: int | None = None
    """The microbatch it concerns, when known (set by the FrameAssembler)."""

    def to_service_error(self) -> ServiceError:
        return ServiceError(self.code, str(self))


class WireOverload(WireError):
    """A well-formed microbatch the receiver has no room for now: RESOURCE_EXHAUSTED, so
    the sender can tell overload (retry later) from a malformed request (never retry)."""

    code = StatusCode.RESOURCE_EXHAUSTED


class WireProtocolError(WireError):
    """The stream itself cannot be trusted (a microbatch id reused while in flight): the
    receiver ends the stream with INVALID_ARGUMENT, since no reply could name the right
    microbatch."""


def wire_dtype(name: str) -> torch.dtype:
    """"bf16"/"BF16" (config or wire spelling) → torch dtype."""
    key = WIRE_DTYPE_NAMES.get(name, name)
    if key not in DTYPES:
        raise WireError(f"unknown datatype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[key]


def check_spec(name: str, datatype: str, shape: Sequence[int]) -> int:
    """Validates a tensor's dtype and shape; returns its byte count."""
    if datatype not in DTYPES:
        raise WireError(f"tensor {name!r}: unknown datatype {datatype!r}; "
                        f"known: {', '.join(DTYPES)}")
    if len(shape) > MAX_RANK:
        raise WireError(f"tensor {name!r}: rank {len(shape)} exceeds {MAX_RANK}")
    if min(shape, default=0) < 0:
        raise WireError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
    return math.prod(shape) * ELEMENT_SIZES[datatype]


def encode_tensor(tensor: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """(datatype, shape, bytes view) of a CPU tensor, without copying a contiguous one."""
    if tensor.dtype not in NAMES:
        raise WireError(f"dtype {tensor.dtype} has no wire name")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
    return NAMES[tensor.dtype], list(tensor.shape), memoryview(raw)


# decode_tensor(read_only_ok=True) views read-only bytes on purpose (its callers never write
# their inputs): torch's warning about it says nothing to act on. (A filter once, here: a
# catch_warnings per tensor cost more than the rest of the decode.)
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)


def decode_tensor(datatype: str, shape: Sequence[int], data: bytes | bytearray | memoryview,
                  name: str = "tensor", read_only_ok: bool = False,
                  nbytes: int | None = None) -> torch.Tensor:
    """A tensor viewing `data` (no copy when the data is aligned, one copy otherwise).

    The tensor shares memory with `data`: keep it alive and do not reuse the buffer.
    `read_only_ok`: view read-only data (a received message's bytes) in place too, for a
    receiver that never writes its inputs (a stage: the model's ops are out of place);
    otherwise read-only data is copied once. `nbytes`: check_spec's answer for this spec,
    when the caller has it already."""
    if nbytes is None:
        nbytes = check_spec(name, datatype, shape)
    view = memoryview(data).cast("B")
    if view.nbytes != nbytes:
        raise WireError(f"tensor {name!r}: {view.nbytes} bytes, but {datatype} "
                        f"{list(shape)} needs {nbytes}")
    dtype = DTYPES[datatype]
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    if view.readonly and not read_only_ok:  # torch.frombuffer wants a writable buffer
        view = memoryview(bytearray(view))
    raw = torch.frombuffer(view, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()  # unaligned start (a tensor after an odd-sized one): copy once
    return raw.view(dtype).reshape(tuple(shape))
