"""Same-host activations through shared memory: a ring of slots per Forward stream.

The sender of a stream (the StageClient) creates one segment in /dev/shm, named
"ditserve-<pid>-<random>", mode 0600, fully reserved up front (posix_fallocate, so a
full /dev/shm is an error now rather than a SIGBUS later), with a random token in its
first page and `slots` slots of `slot_bytes` after it. It offers the segment on the
stream (ShmOffer). The receiver maps it, checks the token (which proves the two share the
memory: same host and IPC namespace), UNLINKS it and answers (ShmAnswer). From then on a
microbatch's payload may lie in a slot; its frame names the slot, and the receiver's
tensors view the slot in place (no copy) until it answers the microbatch: that reply (or
its error) frees the slot, after which the sender may reuse it. (`shm_released_slot`, a
frame that frees a slot early, is still understood by the sender; receivers no longer send
it: a frame of its own per microbatch cost more than it saved.) A sender writes a slot
only while it is free, so the receiver's view never changes under it.
Once the ring is accepted, the stream's frames themselves usually leave HTTP/2 for the
receiver's doorbell, a Unix socket beside the ring (wire/doorbell.py).

Crash safety: the name exists only between the offer and the receiver's mapping (the
sender unlinks it too when the answer is a refusal, or the stream ends first); after
that the memory lives exactly as long as a mapping does, so a SIGKILL of either end (or
both) leaves nothing in /dev/shm. A sender whose peer dies drops its ring with the stream
and offers a fresh one on the next, so no slot the dead reader held is ever reused.
One window is left: a sender killed between creating its segment and the receiver's
mapping (a few milliseconds; up to the stream's life when the peer never answers) leaves
the name behind. The name carries the creator's pid, so `remove_orphans` finds such
segments: `ditserve up` removes a dead service's segments when it restarts or stops it,
and every new ring sweeps segments of dead pids older than ORPHAN_AGE_S (old enough that
no live offer can still be pending; containers of a pod may share /dev/shm but not pids,
and a sibling's segment then looks orphaned: removing it costs that stream its shared
memory, never its data, since the receiver then refuses the offer and bytes go over gRPC).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from ditserve.common.segments import NAME, PREFIX, SHM_DIR, remove_orphans

HEADER_BYTES = 4096
"""The token's page; slots start after it, page-aligned."""
TOKEN_BYTES = 16
MAX_SLOTS = 64
MAX_SEGMENT_BYTES = 1 << 34
"""Largest segment a receiver maps (16 GiB): a bound on a peer's offer."""
DEFAULT_SLOTS = 4
"""Slots per stream: the receiver frees a slot as soon as it copied it out, so a few
suffice for many microbatches in flight (the next one falls back to gRPC bytes if none
is free)."""


class ShmUnavailable(OSError):
    """No shared memory here (no /dev/shm, full, or not shared with the peer)."""


def _round_up(size: int, step: int = mmap.PAGESIZE) -> int:
    return -(-size // step) * step


def segment_bytes(slot_bytes: int, slots: int) -> int:
    return HEADER_BYTES + slots * _round_up(slot_bytes)


class _Slot:
    """One slot taken by the ring's writer for one microbatch."""

    __slots__ = ("number", "ring")

    def __init__(self, ring: ShmRing, number: int):
        self.ring, self.number = ring, number

    def write(self, views: Sequence[memoryview]) -> None:
        offset = self.ring.offset(self.number)
        for view in views:
            size = view.nbytes
            self.ring.map[offset:offset + size] = view.cast("B")
            offset += size


class ShmRing:
    """The sender's ring (see the module docstring); free slots are tracked here."""

    def __init__(self, slot_bytes: int, slots: int = DEFAULT_SLOTS, directory: Path = SHM_DIR):
        if slot_bytes <= 0 or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"ring of {slots} slots of {slot_bytes} bytes")
        self.slot_bytes, self.slots = slot_bytes, slots
        remove_orphans(directory)  # segments of killed senders from before, if any
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = directory / self.name
        self.token = secrets.token_bytes(TOKEN_BYTES)
        size = segment_bytes(slot_bytes, slots)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise ShmUnavailable(f"cannot create {self.path}: {error.strerror}") from None
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS on a later write
            self.map = mmap.mmap(fd, size)
        except OSError as error:
            self.unlink()
            raise ShmUnavailable(f"cannot reserve {size} bytes in {self.path.parent}: "
                                 f"{error.strerror}") from None
        finally:
            os.close(fd)
        self.map[:TOKEN_BYTES] = self.token
        self._free = list(range(slots, 0, -1))  # 1-based, lowest first off the end

    def offset(self, number: int) -> int:
        return HEADER_BYTES + (number - 1) * _round_up(self.slot_bytes)

    def take(self, nbytes: int) -> _Slot | None:
        """A free slot for a payload of `nbytes`, or None (too big, or all in use)."""
        if nbytes > self.slot_bytes or not self._free:
            return None
        return _Slot(self, self._free.pop())

    def give(self, number: int) -> bool:
        """The reader released slot `number`; False if it was not taken (a bad peer)."""
        if not 1 <= number <= self.slots or number in self._free:
            return False
        self._free.append(number)
        return True

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def unlink(self) -> None:
        """Removes the name (the memory stays while mapped); safe to repeat."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def close(self) -> None:
        """Unlinks and unmaps: the ring is dropped with its stream."""
        self.unlink()
        # A view still exported: the mapping then ends with its last reference.
        with contextlib.suppress(BufferError, AttributeError):
            self.map.close()


class ShmView:
    """The receiver's mapping of an offered ring (unlinked as soon as it is mapped)."""

    def __init__(self, segment: str, token: bytes, slot_bytes: int, slots: int,
                 directory: Path = SHM_DIR):
        if not NAME.fullmatch(segment):
            raise ShmUnavailable(f"segment name {segment!r} is not a ditserve segment")
        if slot_bytes <= 0 or not 1 <= slots <= MAX_SLOTS:
            raise ShmUnavailable(f"ring of {slots} slots of {slot_bytes} bytes "
                                 f"(at most {MAX_SLOTS} slots)")
        size = segment_bytes(slot_bytes, slots)
        if size > MAX_SEGMENT_BYTES:
            raise ShmUnavailable(f"segment of {size} bytes exceeds {MAX_SEGMENT_BYTES}")
        path = directory / segment
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as error:
            raise ShmUnavailable(f"cannot open {path}: {error.strerror} (another host or "
                                 "IPC namespace?)") from None
        try:
            if os.fstat(fd).st_size != size:
                raise ShmUnavailable(f"{path} holds {os.fstat(fd).st_size} bytes, the offer "
                                     f"says {size}")
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if not secrets.compare_digest(bytes(self.map[:TOKEN_BYTES]), token):
            self.map.close()
            raise ShmUnavailable(f"{path} does not hold the offered token: not the "
                                 "sender's memory")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # both ends have mapped it: nothing can outlive them now
        self.slot_bytes, self.slots = slot_bytes, slots

    def view(self, number: int, nbytes: int) -> memoryview:
        """The first `nbytes` of slot `number` (1-based), in place (no copy)."""
        offset = HEADER_BYTES + (number - 1) * _round_up(self.slot_bytes)
        return memoryview(self.map)[offset:offset + nbytes]

    def read(self, number: int, nbytes: int, into: memoryview) -> None:
        """Copies the first `nbytes` of slot `number` into `into`."""
        into[:nbytes] = self.view(number, nbytes)

    def close(self) -> None:
        """Unmaps; while a tensor still views a slot, the mapping ends with it instead."""
        with contextlib.suppress(BufferError):
            self.map.close()

