"""Microbatches on the Forward stream: specs first, then ~1 MiB chunks of raw bytes.

A microbatch is one or more frames (ForwardRequest or ForwardResponse) with one id. Its
first frame lists the tensors (TensorSpec) and the payload length; the payload, the
tensors' bytes concatenated in spec order, follows in `chunk`s at byte `offset`s. Frames
of different microbatches may interleave. Chunking (docs/ARCHITECTURE.md §5: ~2x faster than one big
message, and it bounds memory) keeps every message far under the gRPC size limit.

`FrameAssembler` rebuilds microbatches and validates strictly, raising WireError
(→ INVALID_ARGUMENT for that microbatch only; WireOverload → RESOURCE_EXHAUSTED). It
holds the chunks as they arrive, charged to a process-wide ByteBudget, and copies them
once into the tensors' buffer when the last arrives: an announced size reserves nothing.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .codec import WireError, WireOverload, WireProtocolError, check_spec, decode_tensor, encode_tensor
from .cuda_ipc import CudaHandle, HandoffError
from .lean import LeanFrame


class SlotWriter(Protocol):
    """A shared-memory slot taken for one microbatch (wire/shm.py)."""

    number: int
    """1-based slot number, as the frame names it."""

    def write(self, views: Sequence[memoryview]) -> None:
        """Copies the views into the slot, back to back."""


class SlotReader(Protocol):
    """The receiving end of a negotiated ring (wire/shm.py)."""

    slots: int
    slot_bytes: int

    def view(self, number: int, nbytes: int) -> memoryview:
        """The first `nbytes` of slot `number` (1-based), in place."""

class HandleOpener(Protocol):
    """The receiving end of a negotiated CUDA IPC handoff (wire/cuda_ipc.py)."""

    def __call__(self, handle: CudaHandle) -> torch.Tensor:
        """The peer's tensor, copied into this process's memory (HandoffError if not)."""


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
    return [b"".join(parts) for parts in _cut(views, chunk_bytes)]


def _cut(views: list[memoryview], chunk_bytes: int) -> list[list[memoryview]]:
    """The concatenation of `views` cut every `chunk_bytes`: each chunk as the parts of the
    views it spans (views, not copies)."""
    chunks, parts, size = [], [], 0
    for view in views:
        view = view.cast("B")
        start = 0
        while start < view.nbytes:
            take = min(chunk_bytes - size, view.nbytes - start)
            parts.append(view[start:start + take])
            size, start = size + take, start + take
            if size == chunk_bytes:
                chunks.append(parts)
                parts, size = [], 0
    if parts:
        chunks.append(parts)
    return chunks


def _specs(tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[list[dict], list[memoryview]]:
    specs, views = [], []
    for name, tensor in tensors:
        datatype, shape, raw = encode_tensor(tensor)
        specs.append({"name": name, "datatype": datatype, "shape": shape})
        views.append(raw)
    return specs, views


def lean_frames(message_cls: type, microbatch_id: int,
                tensors: Sequence[tuple[str, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES,
                slot: SlotWriter | None = None, handles: Sequence[CudaHandle] | None = None,
                **first_fields: Any) -> list[LeanFrame]:
    """The frames of one microbatch as LeanFrames (wire/lean.py): the payload stays in the
    tensors until gRPC serialises each frame, joined once. With `slot` (a shared-memory
    slot this stream negotiated) the payload is copied into it instead, and the one frame
    names the slot. With `handles` (one per tensor, on a stream that negotiated CUDA IPC)
    the one frame carries them and the payload stays in the sender's device memory."""
    if handles is not None:
        specs = [{"name": name, "datatype": h.dtype, "shape": list(h.shape)}
                 for (name, _), h in zip(tensors, handles, strict=True)]
        total = sum(check_spec(s["name"], s["datatype"], s["shape"]) for s in specs)
        return [LeanFrame(message_cls(
            microbatch_id=microbatch_id, tensors=specs, payload_bytes=total,
            cuda_handles=[h.to_bytes() for h in handles], **first_fields))]
    specs, views = _specs(tensors)
    total = sum(v.nbytes for v in views)
    first = message_cls(microbatch_id=microbatch_id, tensors=specs, payload_bytes=total,
                        **first_fields)
    if slot is not None:
        slot.write(views)
        first.shm_slot = slot.number
        return [LeanFrame(first)]
    chunks = _cut(views, chunk_bytes) or [[]]
    frames, offset = [], 0
    for i, parts in enumerate(chunks):
        header = first if i == 0 else message_cls(microbatch_id=microbatch_id)
        header.offset = offset
        frame = LeanFrame(header, parts)
        offset += frame.size
        frames.append(frame)
    return frames


class ByteBudget:
    """Receive-buffer bytes a process may hold across all its streams.

    Every chunk is charged as it arrives and given back when its microbatch is answered
    or fails, so what a peer can make a stage hold is bounded by bytes it really sent,
    never by sizes it merely announced."""

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError(f"byte budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class _Pending:
    """A microbatch whose chunks are still arriving: the chunks themselves, joined once
    when the last arrives (nothing is allocated up front from the announced size)."""

    def __init__(self, frame: Any, sizes: list[int], now: float):
        self.first_frame = frame
        self.sizes = sizes  # bytes of each tensor, in spec order
        self.total = sum(sizes)
        self.chunks: list[bytes] = []
        self.received = 0
        self.last_progress = now


class FrameAssembler:
    """Reassembles interleaved microbatches, validating every frame.

    `add` returns a Microbatch when its last byte arrives. A WireError names the
    microbatch (`error.microbatch_id`); later frames of a failed microbatch are dropped
    silently, so one bad microbatch yields one error. Ids stay taken from their first
    frame until `release(id)` (the reply was sent): reusing one is a WireProtocolError.
    Received bytes are charged to `budget` (shared by every stream of a process) and to
    this stream's own share (`stream_limit_bytes`, so one stream cannot take the whole
    budget) until `release_bytes`/`release`; a microbatch that does not fit fails with
    WireOverload."""

    def __init__(self, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 max_in_flight: int = 256, budget: ByteBudget | None = None,
                 stream_limit_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_payload_bytes = max_payload_bytes
        self.max_in_flight = max_in_flight
        self.budget = budget
        self.stream_limit_bytes = stream_limit_bytes
        self.held_bytes = 0
        self._clock = clock
        self._pending: dict[int, _Pending] = {}
        self._busy: dict[int, int] = {}  # id → bytes still charged to the budget
        self._failed: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.slots: SlotReader | None = None
        """The stream's shared-memory ring, once negotiated (payloads named by slot)."""
        self.handoff: HandleOpener | None = None
        """The stream's CUDA IPC opener, once negotiated (payloads named by handle)."""

    def add(self, frame: Any) -> Microbatch | None:
        mb_id = frame.microbatch_id
        try:
            handles = getattr(frame, "cuda_handles", ())  # requests only, as slots are
            if frame.tensors:
                self._start(frame)
                if handles:
                    return self._from_handles(frame)
                if getattr(frame, "shm_slot", 0):  # requests only: replies come in chunks
                    return self._from_slot(frame)
            elif handles:
                raise WireError(f"microbatch {mb_id}: cuda_handles on a frame that is not "
                                "its first (no tensors listed)")
            elif mb_id in self._failed:
                return None
            return self._append(frame)
        except WireProtocolError as error:
            error.microbatch_id = mb_id
            raise  # the original keeps its id: its reply must stay unambiguous
        except WireError as error:
            self._fail(mb_id)
            error.microbatch_id = mb_id
            raise

    def _start(self, frame: Any) -> None:
        mb_id = frame.microbatch_id
        if mb_id in self._pending or mb_id in self._busy:
            raise WireProtocolError(f"microbatch {mb_id}: id reused while that microbatch "
                                    "is in flight")
        if len(self._pending) + len(self._busy) >= self.max_in_flight:
            raise WireOverload(f"microbatch {mb_id}: more than {self.max_in_flight} "
                               "microbatches in flight on this stream")
        sizes = [check_spec(s.name, s.datatype, s.shape) for s in frame.tensors]
        total = sum(sizes)
        if total != frame.payload_bytes:
            raise WireError(f"microbatch {mb_id}: payload_bytes {frame.payload_bytes} but "
                            f"the tensors need {total} ({_describe(frame.tensors)})")
        if total > self.max_payload_bytes:
            raise WireError(f"microbatch {mb_id}: payload of {total} bytes exceeds the "
                            f"limit {self.max_payload_bytes}")
        self._failed.pop(mb_id, None)
        self._pending[mb_id] = _Pending(frame, sizes, self._clock())

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
        if end > pending.total:
            raise WireError(f"microbatch {mb_id}: {end} payload bytes, but the tensors "
                            f"need {pending.total}")
        if chunk:
            self._take(mb_id, len(chunk))
            pending.chunks.append(chunk)
            pending.received = end
            pending.last_progress = self._clock()
        return self._finish(mb_id) if end == pending.total else None

    def _from_slot(self, frame: Any) -> Microbatch:
        """A payload in a shared-memory slot: its tensors view the slot in place. The
        sender reuses the slot only once this microbatch is answered (the reply frees it;
        stage/client.py), so the slot stays ours through validation, compute and the
        forward to the next stage: no copy, no frame of its own to free it."""
        mb_id, pending = frame.microbatch_id, self._pending[frame.microbatch_id]
        ring = self.slots
        if ring is None:
            raise WireError(f"microbatch {mb_id}: names shared-memory slot {frame.shm_slot}, "
                            "but this stream negotiated none")
        if not 1 <= frame.shm_slot <= ring.slots:
            raise WireError(f"microbatch {mb_id}: slot {frame.shm_slot} is not in "
                            f"1..{ring.slots}")
        if pending.total > ring.slot_bytes:
            raise WireError(f"microbatch {mb_id}: payload of {pending.total} bytes exceeds "
                            f"the slot size {ring.slot_bytes}")
        self._take(mb_id, pending.total)
        pending.received = pending.total
        return self._finish(mb_id, ring.view(frame.shm_slot, pending.total))

    def _from_handles(self, frame: Any) -> Microbatch:
        """A payload in the sender's device memory: each handle opened and its tensor
        copied into memory of ours (the opener's copy), charged to the budgets like
        received bytes until computed. The reply (or error) of the microbatch is the
        sender's cue to free its tensors."""
        mb_id, pending = frame.microbatch_id, self._pending[frame.microbatch_id]
        if self.handoff is None:
            raise WireError(f"microbatch {mb_id}: carries cuda_handles, but this stream "
                            "negotiated no CUDA IPC")
        specs, handles = pending.first_frame.tensors, frame.cuda_handles
        if frame.shm_slot or len(frame.chunk):
            raise WireError(f"microbatch {mb_id}: cuda_handles with a slot or chunk bytes "
                            "(a payload has one place)")
        if len(handles) != len(specs):
            raise WireError(f"microbatch {mb_id}: cuda_handles: {len(handles)} handles for "
                            f"{len(specs)} tensors")
        self._take(mb_id, pending.total)
        pending.received = pending.total
        tensors = {}
        for i, (spec, data) in enumerate(zip(specs, handles, strict=True)):
            try:
                handle = CudaHandle.from_bytes(data)
                if handle.dtype != spec.datatype or list(handle.shape) != list(spec.shape):
                    raise HandoffError(f"describes {handle.dtype} {list(handle.shape)}, the "
                                       f"tensor is {spec.datatype} {list(spec.shape)}")
                tensors[spec.name] = self.handoff(handle)
            except HandoffError as error:
                raise WireError(f"microbatch {mb_id}: cuda_handles[{i}] ({spec.name}): "
                                f"{error}") from None
        self._pending.pop(mb_id)
        self._busy[mb_id] = pending.received
        return Microbatch(mb_id, tensors, pending.first_frame)

    def _finish(self, mb_id: int, buffer: memoryview | bytearray | None = None) -> Microbatch:
        pending = self._pending.pop(mb_id)
        self._busy[mb_id] = pending.received
        in_place = buffer is not None or len(pending.chunks) == 1
        if buffer is None and len(pending.chunks) == 1:
            # The whole payload came in one frame: its tensors view the received message
            # in place (8-aligned there by wire/lean.py). A fresh 0.5 MiB buffer per
            # microbatch (page faults, zeroing, the copy) was the largest single cost of
            # a stage's receive path.
            buffer = pending.chunks.pop()
        elif buffer is None:
            buffer = bytearray(pending.total)  # the one copy of the payload
            offset = 0
            for chunk in pending.chunks:
                buffer[offset:offset + len(chunk)] = chunk
                offset += len(chunk)
            pending.chunks.clear()
        view, start, tensors = memoryview(buffer), 0, {}
        for spec, size in zip(pending.first_frame.tensors, pending.sizes, strict=True):
            tensors[spec.name] = decode_tensor(spec.datatype, spec.shape,
                                               view[start:start + size], spec.name,
                                               read_only_ok=in_place, nbytes=size)
            start += size
        return Microbatch(mb_id, tensors, pending.first_frame)

    def _fail(self, mb_id: int) -> None:
        pending = self._pending.pop(mb_id, None)
        if pending is not None:
            self._give(pending.received)
        self._failed[mb_id] = None
        while len(self._failed) > self.max_in_flight:
            self._failed.popitem(last=False)

    def _take(self, mb_id: int, size: int) -> None:
        if self.stream_limit_bytes is not None and self.held_bytes + size > self.stream_limit_bytes:
            raise WireOverload(f"microbatch {mb_id}: this stream already holds "
                               f"{self.held_bytes} bytes, its share of the receive buffers "
                               f"({self.stream_limit_bytes}); retry later")
        if self.budget is not None and not self.budget.take(size):
            raise WireOverload(f"microbatch {mb_id}: receive buffers full "
                               f"({self.budget.used} of {self.budget.limit} bytes held "
                               "across all streams); retry later")
        self.held_bytes += size

    def _give(self, size: int) -> None:
        self.held_bytes -= size
        if self.budget is not None:
            self.budget.give(size)

    def release_bytes(self, mb_id: int) -> None:
        """The microbatch's input is no longer needed (computed): its bytes go back, its id
        stays taken until `release`."""
        if mb_id in self._busy:
            self._give(self._busy[mb_id])
            self._busy[mb_id] = 0

    def release(self, mb_id: int) -> None:
        """The microbatch was answered: its bytes go back and its id may be used again."""
        self._give(self._busy.pop(mb_id, 0))
        pending = self._pending.pop(mb_id, None)
        if pending is not None:
            self._give(pending.received)

    def expire(self, idle_seconds: float) -> list[int]:
        """Fails the microbatches that received no byte for `idle_seconds` (a peer that
        announced a payload and went quiet) and returns their ids."""
        now = self._clock()
        stale = [mb_id for mb_id, p in self._pending.items()
                 if now - p.last_progress > idle_seconds]
        for mb_id in stale:
            self._fail(mb_id)
        return stale

    def pending_ids(self) -> list[int]:
        """Microbatches whose payload is incomplete (e.g. when the stream ends)."""
        return list(self._pending)

    def close(self) -> None:
        """The stream ended: give back every byte still charged."""
        for mb_id in list(self._pending):
            self._fail(mb_id)
        for mb_id in list(self._busy):
            self.release(mb_id)


def _describe(specs: Sequence[Any]) -> str:
    return ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in specs)
