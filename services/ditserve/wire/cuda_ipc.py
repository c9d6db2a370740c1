"""Co-located CUDA stages: activations handed over as CUDA IPC handles, and pinned host
staging for the paths that must go through host memory (issue 13, part 4;
docs/ARCHITECTURE.md §5, "GPU stages").

When both ends of a hop compute on CUDA and share a host (the shared-memory probe of the
stream proved the host and IPC namespace), a microbatch's tensors need not leave the
GPU: the sender exports each tensor's allocation as a CUDA IPC handle
(`UntypedStorage._share_cuda_`, the machinery `torch.multiprocessing` uses), the frame
carries the handle instead of bytes or a slot (`ForwardRequest.cuda_handles`), and the
receiver maps the allocation (`cudaIpcOpenMemHandle` through torch) and copies it
device-to-device into memory of its own. The microbatch's reply (or error) tells the
sender the allocation may be freed; until then the sender keeps the tensor alive
(`HandoffLedger`), because freeing it would let the caching allocator hand the bytes to
the next microbatch while the receiver still reads them.

Pieces, each usable alone (stage/client.py and stage/servicer.py put them together):
- `choose_path`: which data path a stream uses, from the configured `transport`, where
  each end computes and what the probes proved (pure logic: tested on CPU);
- `CudaHandle`: an exported tensor as a small JSON document, parsed strictly (never
  pickled: a peer's bytes are data, not code);
- `export_tensor` / `import_tensor`: the CUDA calls, guarded by
  `torch.cuda.is_available()`;
- `Handoff`: export and import as a pair the stream is given: `CUDA_IPC`, or
  `CPU_SHARED` (torch's CPU shared memory in place of CUDA IPC: the same protocol
  between CPU processes, so the tests run all of it but the CUDA calls);
- `HandoffLedger`: the sender's keep-alive and acknowledgement bookkeeping, bounded;
- `probe_token` / `check_probe`: the CUDA leg of the stream-open probe (the receiver
  reads back random bytes the sender put on its GPU), so a handle that cannot be opened
  (a GPU not visible in the receiver's container) falls back before any microbatch does;
- `PinnedStaging`: page-locked host buffers for device→host→wire copies made with
  `non_blocking=True`, reused by size and bounded in bytes: the one way a CUDA stage's
  tensors reach host memory (the runner's outputs, the client's fallback).

None of the CUDA calls has run on a GPU yet (the machines this was written on had none);
the bookkeeping, validation, fallbacks and the whole protocol (through CPU_SHARED) are
tested on CPU, and tests marked for CUDA wait for a machine with a GPU.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .codec import DTYPES, MAX_RANK, NAMES, WireError

DataPath = Literal["cuda_ipc", "shm", "grpc"]
"""A stream's data path: CUDA IPC handles, shared-memory slots, or bytes over gRPC."""

MAX_HANDLE_BYTES = 4096
"""Largest serialized CudaHandle a receiver parses (a real one is ~400 bytes)."""
MAX_OUTSTANDING = 64
"""Microbatches a sender keeps alive for their acknowledgement, per stream."""
PROBE_BYTES = 16


class HandoffError(WireError):
    """A CUDA IPC handle that cannot be used: malformed, or not openable here."""


def cuda_ready() -> bool:
    """Whether this process can use CUDA IPC at all."""
    return torch.cuda.is_available()


def choose_path(transport: str, local_device: str, peer_device: str, shm_shared: bool,
                cuda_shared: bool, handoff_device: str = "cuda") -> DataPath:
    """The data path of a stream, from what both ends and the probes say.

    `transport`: the configured "auto", "grpc" or "shm" ("shm" means "not over the
    socket": CUDA IPC counts). `local_device`/`peer_device`: "cpu", "cuda" or "cuda:K" of
    the sender's outputs and the receiver's compute. `shm_shared`: the shared-memory
    probe passed (same host, same IPC namespace). `cuda_shared`: the CUDA probe passed
    (the receiver opened the sender's handle and read the token back). `handoff_device`:
    the device type whose memory the handoff shares ("cuda"; "cpu" for CPU_SHARED, the
    tests' stand-in for CUDA IPC).

    Raises HandoffError when `transport` is "shm" and neither probe passed: a pipeline
    configured for same-host hops fails loudly instead of going slow silently."""
    if transport not in ("auto", "grpc", "shm"):
        raise ValueError(f"transport {transport!r}: expected auto, grpc or shm")
    if transport == "grpc":
        return "grpc"
    both_cuda = (local_device.startswith(handoff_device)
                 and peer_device.startswith(handoff_device))
    if both_cuda and shm_shared and cuda_shared:
        return "cuda_ipc"
    if shm_shared:
        return "shm"
    if transport == "shm":
        raise HandoffError("transport is shm, but the next stage does not share this "
                           "host's memory (the shared-memory probe failed)")
    return "grpc"


@dataclass(frozen=True)
class CudaHandle:
    """One CUDA tensor as another process on the host can open it (the fields of
    `UntypedStorage._share_cuda_`, plus the tensor's view of its storage)."""

    dtype: str
    """Wire name of the element type ("BF16", ...)."""
    shape: tuple[int, ...]
    """Dimensions of the tensor."""
    stride: tuple[int, ...]
    """Strides of the tensor in elements."""
    offset: int
    """Offset of the tensor in its storage, in elements."""
    device: int
    """CUDA device index of the allocation, in the sender's numbering."""
    handle: bytes
    """cudaIpcMemHandle_t of the allocation that holds the storage."""
    storage_bytes: int
    """Size of the storage in bytes."""
    storage_offset_bytes: int
    """Offset of the storage within that allocation."""
    ref_counter_handle: bytes
    """torch's producer-side reference counter (a shared file) the receiver decrements."""
    ref_counter_offset: int
    """Slot of this storage in that counter."""
    event_handle: bytes
    """cudaIpcEventHandle_t of the event recorded after the sender's last write."""
    event_sync_required: bool
    """Whether the receiver must wait on that event before reading."""

    _BYTES_FIELDS = ("handle", "ref_counter_handle", "event_handle")

    def to_bytes(self) -> bytes:
        doc = {k: (v.hex() if k in self._BYTES_FIELDS else v)
               for k, v in self.__dict__.items()}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CudaHandle:
        """Parses and validates a peer's handle (HandoffError when malformed)."""
        if len(data) > MAX_HANDLE_BYTES:
            raise HandoffError(f"CUDA IPC handle of {len(data)} bytes exceeds "
                               f"{MAX_HANDLE_BYTES}")
        try:
            doc = json.loads(data)
            fields = {k: (bytes.fromhex(doc[k]) if k in cls._BYTES_FIELDS else doc[k])
                      for k in cls.__dataclass_fields__ if not k.startswith("_")}
            if set(doc) != set(fields):
                raise KeyError(", ".join(sorted(set(doc) ^ set(fields))))
            handle = cls(**{**fields, "shape": tuple(fields["shape"]),
                            "stride": tuple(fields["stride"])})
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise HandoffError(f"malformed CUDA IPC handle: {error}") from None
        handle._check()
        return handle

    def _check(self) -> None:
        ints = (self.offset, self.device, self.storage_bytes, self.storage_offset_bytes,
                self.ref_counter_offset, *self.shape, *self.stride)
        if not all(type(v) is int and v >= 0 for v in ints):
            raise HandoffError("CUDA IPC handle: sizes, strides and offsets must be "
                               "non-negative integers")
        if type(self.event_sync_required) is not bool:
            raise HandoffError("CUDA IPC handle: event_sync_required must be a boolean")
        if self.event_sync_required and not self.event_handle:
            # torch would fail inside _new_shared_cuda with no message of its own
            raise HandoffError("CUDA IPC handle: event_sync_required without an event handle")
        if self.dtype not in DTYPES:
            raise HandoffError(f"CUDA IPC handle: unknown datatype {self.dtype!r}")
        if len(self.shape) > MAX_RANK or len(self.stride) != len(self.shape):
            raise HandoffError(f"CUDA IPC handle: shape {list(self.shape)} and stride "
                               f"{list(self.stride)} do not describe a tensor")
        # The furthest element must lie inside the storage: a handle may not reach
        # beyond the allocation it names.
        itemsize = DTYPES[self.dtype].itemsize
        if all(self.shape):
            last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride, strict=True))
            if (last + 1) * itemsize > self.storage_bytes:
                raise HandoffError(f"CUDA IPC handle: tensor {list(self.shape)} at offset "
                                   f"{self.offset} reaches past its storage of "
                                   f"{self.storage_bytes} bytes")


def export_tensor(tensor: torch.Tensor) -> CudaHandle:
    """The CUDA IPC handle of a CUDA tensor (keep the tensor alive until acknowledged)."""
    if tensor.device.type != "cuda":
        raise HandoffError(f"CUDA IPC needs a CUDA tensor, got one on {tensor.device}")
    if tensor.dtype not in NAMES:
        raise HandoffError(f"dtype {tensor.dtype} has no wire name")
    (device, handle, storage_bytes, storage_offset_bytes, ref_counter_handle,
     ref_counter_offset, event_handle, event_sync_required
     ) = tensor.untyped_storage()._share_cuda_()
    return CudaHandle(NAMES[tensor.dtype], tuple(tensor.shape), tuple(tensor.stride()),
                      tensor.storage_offset(), int(device), bytes(handle), int(storage_bytes),
                      int(storage_offset_bytes), bytes(ref_counter_handle),
                      int(ref_counter_offset), bytes(event_handle or b""),
                      bool(event_sync_required))


def import_tensor(handle: CudaHandle, device: torch.device | None = None,
                  copy: bool = True) -> torch.Tensor:
    """The tensor a peer exported, mapped from its allocation; with `copy` (the default)
    cloned device-to-device into this process's memory, so the sender may free its
    buffer as soon as this returns (then acknowledge).

    The map and the copy run on a stream of their own (`_import_stream`), waited for
    here: the caller (the event loop) then waits for this copy only, not for the
    forward passes the compute thread has queued on the default stream. The copy is
    recorded on the default stream, where the model reads it, so its memory is not
    reused before those reads are done."""
    if not cuda_ready():
        raise HandoffError("CUDA IPC handle received, but this process has no CUDA")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        stream = _import_stream(handle.device)
        with torch.cuda.stream(stream):  # the sender's event is waited for on it too
            shared = rebuild_cuda_tensor(
                torch.Tensor, torch.Size(handle.shape), handle.stride, handle.offset,
                torch.storage.TypedStorage, DTYPES[handle.dtype], handle.device,
                handle.handle, handle.storage_bytes, handle.storage_offset_bytes, False,
                handle.ref_counter_handle, handle.ref_counter_offset,
                handle.event_handle, handle.event_sync_required)  # bytes: torch refuses None
            if not copy:
                return shared
            out = torch.empty(handle.shape, dtype=shared.dtype, device=device or shared.device)
            out.copy_(shared)  # device-to-device (or peer-to-peer to another GPU)
            stream.synchronize()  # done before the reply acknowledges it and the sender frees it
            # Unmapped here, while the import stream is current: torch's IPC deleter
            # synchronises the *current* stream before it decrements the sender's counter,
            # and after this block that is the default stream, where the compute thread's
            # forward passes queue; the event loop would wait for them on every import.
            del shared
    except (RuntimeError, ValueError, AssertionError, TypeError, SystemError) as error:
        # cudaIpcOpenMemHandle failed (not this host's GPU, a device index not visible
        # here, a stale handle), or torch refused a peer's field (TypeError): the
        # microbatch fails, not the whole stream
        raise HandoffError(f"cannot open the CUDA IPC handle: {error}") from None
    out.record_stream(torch.cuda.default_stream(out.device))
    return out


@functools.cache
def _import_stream(device: int) -> Any:
    """This process's stream for CUDA IPC imports on `device` (created once)."""
    return torch.cuda.Stream(device)


def import_stream(device: torch.device) -> Any:
    """The stream imported tensors on `device` were copied on (complete there), for a
    check of their values that must not queue behind the compute thread's forward
    passes on the default stream; None for a CPU device."""
    if device.type != "cuda":
        return None
    return _import_stream(device.index if device.index is not None else torch.cuda.current_device())


_SHM_FILE = re.compile(rb"/torch_[0-9]+_[0-9]+_[0-9]+")
_SHM_MANAGER = re.compile(rb"/[A-Za-z0-9_./-]{1,255}/manager\.sock")


def export_shared_cpu(tensor: torch.Tensor) -> tuple[CudaHandle, torch.Tensor]:
    """CPU_SHARED's export: a copy of `tensor` in a shared-memory file of torch's own CPU
    sharing (the `file_system` strategy of torch.multiprocessing), described by a
    CudaHandle whose `handle` names the file and `ref_counter_handle` the torch shm
    manager. Returns the handle and the copy to keep alive until acknowledged."""
    if tensor.device.type != "cpu":
        raise HandoffError(f"cpu-shared handoff needs a CPU tensor, got one on {tensor.device}")
    if tensor.dtype not in NAMES:
        raise HandoffError(f"dtype {tensor.dtype} has no wire name")
    kept = tensor.detach().clone(memory_format=torch.contiguous_format)
    manager, name, size = kept.untyped_storage()._share_filename_cpu_()
    return CudaHandle(NAMES[kept.dtype], tuple(kept.shape), tuple(kept.stride()), 0, 0,
                      bytes(name), int(size), 0, bytes(manager), 0, b"", False), kept


def import_shared_cpu(handle: CudaHandle, device: torch.device | None = None) -> torch.Tensor:
    """CPU_SHARED's import: maps the peer's shared file and copies the tensor out."""
    if not (_SHM_FILE.fullmatch(handle.handle)
            and _SHM_MANAGER.fullmatch(handle.ref_counter_handle)):
        raise HandoffError("cpu-shared handle: not a torch shared-memory file and manager")
    try:
        storage = torch.UntypedStorage._new_shared_filename_cpu(
            handle.ref_counter_handle, handle.handle, handle.storage_bytes)
    except RuntimeError as error:  # no such file, or another size: not the sender's memory
        raise HandoffError(f"cannot open the cpu-shared handle: {error}") from None
    dtype = DTYPES[handle.dtype]
    shared = torch.empty(0, dtype=dtype).set_(storage, handle.offset, handle.shape,
                                              handle.stride)
    return torch.empty(handle.shape, dtype=dtype).copy_(shared)  # memory of its own


def _export_cuda(tensor: torch.Tensor) -> tuple[CudaHandle, torch.Tensor]:
    """CUDA_IPC's export, of a tensor whose writes are complete (a stage's outputs: the
    runner synchronises its stream before handing them over; the probe: a blocking
    `.to(device)`). `_share_cuda_` records the event the receiver waits on in the
    *current* stream; on the event loop that is the default stream, which the compute
    thread shares, so the event would also cover the next forward pass queued there and
    the receiver would wait out the sender's next microbatch. An idle stream of its own
    records an event that is complete at once."""
    if tensor.device.type != "cuda":  # refused before any CUDA call (a CPU-only torch)
        return export_tensor(tensor), tensor
    with torch.cuda.stream(_export_stream(tensor.device.index)):
        return export_tensor(tensor), tensor


@functools.cache
def _export_stream(device: int | None) -> Any:
    """This process's idle stream for recording CUDA IPC export events (created once)."""
    return torch.cuda.Stream(device)


def _import_cuda(handle: CudaHandle, device: torch.device | None = None) -> torch.Tensor:
    return import_tensor(handle, device)


@dataclass(frozen=True)
class Handoff:
    """How the cuda_ipc path hands tensors over: CUDA_IPC in production; CPU_SHARED runs
    the same protocol (probe, handles in frames, import and copy, acknowledgement,
    ledger) between CPU processes, so machines without a GPU can test all of it but the
    CUDA calls themselves."""

    name: str
    """Its name in the CudaOffer ("cuda" or "cpu-shared"): both ends must agree."""
    device_type: str
    """The device type of the tensors it hands over ("cuda" or "cpu")."""
    export: Callable[[torch.Tensor], tuple[CudaHandle, torch.Tensor]]
    """A tensor → its handle, and what to keep alive until the receiver acknowledges."""
    open: Callable[[CudaHandle, torch.device | None], torch.Tensor]
    """A peer's handle → a copy of the tensor in this process's memory on that device."""

    def usable(self, device: torch.device | str) -> bool:
        """Whether tensors computed on `device` can be handed over (or received) here."""
        device = torch.device(device)
        return device.type == self.device_type and (device.type != "cuda" or cuda_ready())


CUDA_IPC = Handoff("cuda", "cuda", _export_cuda, _import_cuda)
CPU_SHARED = Handoff("cpu-shared", "cpu", export_shared_cpu, import_shared_cpu)
HANDOFFS: dict[str, Handoff] = {h.name: h for h in (CUDA_IPC, CPU_SHARED)}
"""By name, for `ditserve stage --handoff` (cpu-shared: tests only)."""


def probe_token() -> bytes:
    """Random bytes the sender puts on its GPU for the stream-open probe."""
    return secrets.token_bytes(PROBE_BYTES)


def check_probe(handle: CudaHandle, token: bytes,
                opener: Callable[[CudaHandle], torch.Tensor] = import_tensor) -> bool:
    """The receiver's side of the CUDA probe: opens the sender's probe handle and reads
    the bytes back. False (fall back to shm/bytes) on any failure: a GPU not visible
    here, IPC not permitted, another host."""
    try:
        tensor = opener(handle)
        return bytes(tensor.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()) == token
    except (HandoffError, RuntimeError):
        return False


def accept_probe(handoff: Handoff, device: torch.device, method: str, probe: bytes,
                 token: bytes) -> tuple[Callable[[CudaHandle], torch.Tensor] | None, str]:
    """The receiver's answer to a CudaOffer: (the opener of this stream's handles, "") when
    the probe reads back, else (None, why not). The probe is copied, so it must be small."""
    if method != handoff.name:
        return None, f"handles of method {method!r}; this stage opens {handoff.name!r}"
    if not handoff.usable(device):
        return None, f"this stage computes on {device}, not by {handoff.name!r} handoff"

    def opener(handle: CudaHandle) -> torch.Tensor:
        return handoff.open(handle, device)

    try:
        handle = CudaHandle.from_bytes(probe)
    except HandoffError as error:
        return None, str(error)
    if len(token) != PROBE_BYTES or handle.dtype != "UINT8" or handle.shape != (PROBE_BYTES,):
        return None, (f"the probe must be {PROBE_BYTES} UINT8 bytes, got {handle.dtype} "
                      f"{list(handle.shape)} and a token of {len(token)} bytes")
    if not check_probe(handle, token, opener):
        return None, ("could not open the probe handle and read its token back (a GPU not "
                      "visible here, IPC not permitted?)")
    return opener, ""


class HandoffLedger:
    """The sender's side of CUDA IPC handoff: every exported microbatch's tensors stay
    referenced here until the receiver acknowledges them (it copied them out), so the
    caching allocator cannot reuse their memory while they may be read.

    Bounded: at most `max_outstanding` microbatches at once (`hold` returns False beyond
    that, and the caller sends that microbatch another way). `close` drops everything
    when the stream ends: its receiver is gone or will never acknowledge, and torch's own
    IPC reference counter keeps an allocation a live receiver still maps."""

    def __init__(self, max_outstanding: int = MAX_OUTSTANDING):
        self.max_outstanding = max_outstanding
        self._held: collections.OrderedDict[int, tuple[torch.Tensor, ...]] = (
            collections.OrderedDict())

    def hold(self, microbatch_id: int, tensors: Sequence[torch.Tensor]) -> bool:
        if microbatch_id in self._held:
            raise ValueError(f"microbatch {microbatch_id} is already held")
        if len(self._held) >= self.max_outstanding:
            return False
        self._held[microbatch_id] = tuple(tensors)
        return True

    def acknowledge(self, microbatch_id: int) -> bool:
        """The receiver has its copy: release. False for an id not held (a peer's
        duplicate or unknown acknowledgement, ignored)."""
        return self._held.pop(microbatch_id, None) is not None

    @property
    def outstanding(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._held.values() for t in ts)

    def close(self) -> None:
        self._held.clear()


class PinnedStaging:
    """Page-locked host buffers for the device↔host copies of the gRPC and shm paths.

    `to_host` copies a CUDA tensor into a pinned buffer with `non_blocking=True` and
    returns it with a CUDA event to wait on before its bytes are read (the copy overlaps
    whatever the compute stream does next); `to_device` uploads through a pinned buffer
    with `non_blocking=True`. Buffers are reused by byte size; at most `limit_bytes` stay
    cached (the oldest go first). Without CUDA, tensors pass through unchanged."""

    def __init__(self, limit_bytes: int = 1 << 30):
        self.limit_bytes = limit_bytes
        self._free: collections.OrderedDict[int, list[torch.Tensor]] = (
            collections.OrderedDict())
        self._uploading: collections.deque[tuple[Any, torch.Tensor]] = collections.deque()
        self.cached_bytes = 0

    def _buffer(self, nbytes: int) -> torch.Tensor:
        # Uploads whose copy has finished free their buffer (an event per upload).
        while self._uploading and self._uploading[0][0].query():
            self.give_back(self._uploading.popleft()[1])
        free = self._free.get(nbytes)
        if free:
            self.cached_bytes -= nbytes
            buffer = free.pop()
            if not free:
                del self._free[nbytes]  # no empty lists: eviction takes from real ones
            return buffer
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda_ready())

    def give_back(self, buffer: torch.Tensor) -> None:
        """A staging buffer whose bytes were sent: cached for the next copy of its size."""
        nbytes = buffer.numel()
        if nbytes > self.limit_bytes:
            return
        while self.cached_bytes + nbytes > self.limit_bytes and self._free:
            size, buffers = next(iter(self._free.items()))
            buffers.pop()
            self.cached_bytes -= size
            if not buffers:
                del self._free[size]
        self._free.setdefault(nbytes, []).append(buffer)
        self._free.move_to_end(nbytes)
        self.cached_bytes += nbytes

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(host tensor, its buffer for `give_back`, event or None): the tensor's bytes in
        pinned memory once the event completes (`event.synchronize()`)."""
        if tensor.device.type != "cuda":
            return tensor, torch.empty(0, dtype=torch.uint8), None
        tensor = tensor.contiguous()
        buffer = self._buffer(tensor.numel() * tensor.element_size())
        host = buffer.view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        return host, buffer, event

    def to_host_all(self, tensors: Sequence[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]:
        """`to_host` of each: (host tensors, buffers for `give_back`, events to wait on
        before their bytes are read; none for tensors already on the host)."""
        staged = [self.to_host(tensor) for tensor in tensors]
        return ([host for host, _, _ in staged], [b for _, b, e in staged if e is not None],
                [e for _, _, e in staged if e is not None])

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` on `device`, uploaded from pinned memory without blocking the host
        (the copy is ordered before later work on the current stream)."""
        if torch.device(device).type != "cuda":
            return tensor.to(device)
        if not tensor.is_pinned():
            buffer = self._buffer(tensor.numel() * tensor.element_size())
            staged = buffer.view(tensor.dtype).view(tensor.shape)
            staged.copy_(tensor)
            out = staged.to(device, non_blocking=True)
            # The buffer may be reused once the upload has read it: an event says when.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(out.device))
            self._uploading.append((event, buffer))
            return out
        return tensor.to(device, non_blocking=True)
