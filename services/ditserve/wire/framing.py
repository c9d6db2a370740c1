"""Microbatches on the Forward stream: specs first, then ~1 MiB chunks of raw bytes.

A microbatch is one or more frames (ForwardRequest or ForwardResponse) with one id. Its
first frame lists the tensors (TensorSpec) and the payload length; the payload, the
tensors' bytes concatenated in spec order, follows in `chunk`s at byte `offset`s. Frames
of different microbatches may interleave. Chunking (docs/ARCHITECTURE.md §5: ~2x faster than one big
message, and it bounds memory) keeps every message far under the gRPC size limit.

`FrameAssembler` rebuilds microbatches into a buffer preallocated from the first frame and
validates strictly, raising WireError (→ INVALID_ARGUMENT for that microbatch only).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .codec import WireError, check_spec, decode_tensor, encode_tensor

CHUNK_BYTES = 1 << 20
"""Payload bytes per frame."""

DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
"""Largest microbatch payload accepted unless the receiver sets a tighter limit."""


@dataclass
class Microbatch:
    """A reassembled microbatch: its tensors by name, in spec order, and the first frame."""

    id: int
    tensors: dict[str, torch.Tensor]
    first_frame: Any = field(repr=False)


def encode_frames(message_cls: type, microbatch_id: int,
                  tensors: Sequence[tuple[str, torch.Tensor]],
                  chunk_bytes: int = CHUNK_BYTES, **first_fields: Any) -> list[Any]:
    """The frames of one microbatch; `first_fields` (request_ids, compute_seconds, ...)
    go on the first frame. Each payload byte is copied once, into its frame."""
    specs, views = [], []
    for name, tensor in tensors:
        datatype, shape, raw = encode_tensor(tensor)
        specs.append({"name": name, "datatype": datatype, "shape": shape})
        views.append(raw)
    total = sum(v.nbytes for v in views)
    frames = [message_cls(microbatch_id=microbatch_id, tensors=specs, payload_bytes=total,
                          **first_fields)]
    chunks = _chunks(views, chunk_bytes)
    offset = 0
    for i, chunk in enumerate(chunks):
        frame = frames[0] if i == 0 else message_cls(microbatch_id=microbatch_id)
        frame.offset, frame.chunk = offset, chunk
        offset += len(chunk)
        if i:
            frames.append(frame)
    return frames


def _chunks(views: list[memoryview], chunk_bytes: int) -> list[bytes]:
    """The concatenation of `views` cut every `chunk_bytes`, joined without a second copy."""
    chunks, parts, size = [], [], 0
    for view in views:
        start = 0
        while start < view.nbytes:
            take = min(chunk_bytes - size, view.nbytes - start)
            parts.append(view[start:start + take])
            size, start = size + take, start + take
            if size == chunk_bytes:
                chunks.append(b"".join(parts))
                parts, size = [], 0
    if parts:
        chunks.append(b"".join(parts))
    return chunks


class _Pending:
    """A microbatch whose chunks are still arriving."""

    def __init__(self, frame: Any, total: int):
        self.first_frame = frame
        self.buffer = bytearray(total)  # preallocated once, filled chunk by chunk
        self.received = 0


class FrameAssembler:
    """Reassembles interleaved microbatches, validating every frame.

    `add` returns a Microbatch when its last byte arrives. A WireError names the
    microbatch (`error.microbatch_id`); later frames of a failed microbatch are dropped
    silently, so one bad microbatch yields one error. Ids stay taken from their first
    frame until `release(id)` (the reply was sent), so a duplicate id is rejected."""

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 max_in_flight: int = 1024):
        self.max_payload_bytes = max_payload_bytes
        self.max_in_flight = max_in_flight
        self._pending: dict[int, _Pending] = {}
        self._busy: set[int] = set()
        self._failed: collections.OrderedDict[int, None] = collections.OrderedDict()

    def add(self, frame: Any) -> Microbatch | None:
        mb_id = frame.microbatch_id
        try:
            if frame.tensors:
                self._start(frame)
            elif mb_id in self._failed:
                return None
            return self._append(frame)
        except WireError as error:
            self._fail(mb_id)
            error.microbatch_id = mb_id
            raise

    def _start(self, frame: Any) -> None:
        mb_id = frame.microbatch_id
        if mb_id in self._pending or mb_id in self._busy:
            raise WireError(f"microbatch {mb_id}: duplicate id (already in flight)")
        if len(self._pending) + len(self._busy) >= self.max_in_flight:
            raise WireError(f"microbatch {mb_id}: more than {self.max_in_flight} in flight")
        total = sum(check_spec(s.name, s.datatype, s.shape) for s in frame.tensors)
        if total != frame.payload_bytes:
            raise WireError(f"microbatch {mb_id}: payload_bytes {frame.payload_bytes} but "
                            f"the tensors need {total} ({_describe(frame.tensors)})")
        if total > self.max_payload_bytes:
            raise WireError(f"microbatch {mb_id}: payload of {total} bytes exceeds the "
                            f"limit {self.max_payload_bytes}")
        self._failed.pop(mb_id, None)
        self._pending[mb_id] = _Pending(frame, total)

    def _append(self, frame: Any) -> Microbatch | None:
        mb_id = frame.microbatch_id
        pending = self._pending.get(mb_id)
        if pending is None:
            raise WireError(f"microbatch {mb_id}: frame for an unknown id (no first frame)")
        chunk = frame.chunk
        if frame.offset != pending.received:
            raise WireError(f"microbatch {mb_id}: chunk at offset {frame.offset}, "
                            f"expected {pending.received}")
        end = pending.received + len(chunk)
        if end > len(pending.buffer):
            raise WireError(f"microbatch {mb_id}: {end} payload bytes, but the tensors "
                            f"need {len(pending.buffer)}")
        pending.buffer[pending.received:end] = chunk
        pending.received = end
        return self._finish(mb_id) if end == len(pending.buffer) else None

    def _finish(self, mb_id: int) -> Microbatch:
        pending = self._pending.pop(mb_id)
        self._busy.add(mb_id)
        view, start, tensors = memoryview(pending.buffer), 0, {}
        for spec in pending.first_frame.tensors:
            size = check_spec(spec.name, spec.datatype, spec.shape)
            tensors[spec.name] = decode_tensor(spec.datatype, spec.shape,
                                               view[start:start + size], spec.name)
            start += size
        return Microbatch(mb_id, tensors, pending.first_frame)

    def _fail(self, mb_id: int) -> None:
        self._pending.pop(mb_id, None)
        self._failed[mb_id] = None
        while len(self._failed) > self.max_in_flight:
            self._failed.popitem(last=False)

    def release(self, mb_id: int) -> None:
        """The microbatch was answered: its id may be used again."""
        self._busy.discard(mb_id)
        self._pending.pop(mb_id, None)

    def pending_ids(self) -> list[int]:
        """Microbatches whose payload is incomplete (e.g. when the stream ends)."""
        return list(self._pending)


def _describe(specs: Sequence[Any]) -> str:
    return ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in specs)
