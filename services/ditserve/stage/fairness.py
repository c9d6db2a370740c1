"""Round-robin admission to a stage's compute thread: by stream, then by origin.

A stage computes one microbatch at a time. With one FIFO queue, a peer that floods one
stream with valid microbatches delays everyone else's by its whole backlog (a Generate
once took 98 s instead of 0.3 s behind such a flood). `FairGate` lets `slots`
microbatches into the runner's queue at once and, whenever one leaves, admits the next
from the stream after the one last served: each stream gets its turn, so a flood costs
the coordinator's stream a fair share of the stage, never its whole wait.

Streams alone are not enough past stage 0: every stage after it sees one relay stream
from its predecessor, carrying the coordinator's microbatches and a flood's alike (a
2-row forward once waited 26 s at stage 1 behind a flood that stage 0 had let through
fairly). So stage 0 stamps each microbatch with its *origin* (the inbound stream it
entered by), the relay carries it, and within a stream the gate takes turns by origin.
Two levels, streams first, so that a peer dialling a later stage directly and inventing
origins still gets only its stream's share. `OriginWindow` then bounds how many
microbatches of one origin a stage holds between its gate and the next stage's reply,
so a flood's backlog waits at the stage it entered by (where its bytes are already
charged to its stream), not in the relay stream's share downstream.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable


class _Line:
    """One stream's waiters, by origin, and the order its origins take turns in."""

    def __init__(self) -> None:
        self.waiting: dict[Hashable, collections.deque[asyncio.Future]] = {}
        self.order: collections.deque[Hashable] = collections.deque()

    def push(self, origin: Hashable, future: asyncio.Future) -> None:
        self.waiting.setdefault(origin, collections.deque()).append(future)
        if origin not in self.order:
            self.order.append(origin)

    def pop(self) -> asyncio.Future:
        origin = self.order.popleft()
        queue = self.waiting[origin]
        future = queue.popleft()
        if queue:
            self.order.append(origin)  # back of the line for its next one
        else:
            del self.waiting[origin]
        return future

    def __len__(self) -> int:
        return sum(len(q) for q in self.waiting.values())


class FairGate:
    """`async with gate.turn(stream, origin):` around a compute; streams take turns, and
    within a stream its origins do."""

    def __init__(self, slots: int = 2):
        # Two slots keep the compute thread fed: one computes while the next waits on it.
        self.slots = slots
        self._running = 0
        self._lines: dict[Hashable, _Line] = {}
        self._order: collections.deque[Hashable] = collections.deque()

    def turn(self, stream: Hashable, origin: Hashable = None) -> _Turn:
        return _Turn(self, stream, origin)

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    async def _acquire(self, stream: Hashable, origin: Hashable) -> None:
        if self._running < self.slots and not self._order:
            self._running += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._lines.setdefault(stream, _Line()).push(origin, future)
        if stream not in self._order:
            self._order.append(stream)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted as we were cancelled: pass the slot on
            raise

    def _release(self) -> None:
        while self._order:
            stream = self._order.popleft()
            line = self._lines[stream]
            future = line.pop()
            if line.order:
                self._order.append(stream)
            else:
                del self._lines[stream]
            if not future.cancelled():
                future.set_result(None)  # the slot passes on: _running unchanged
                return
        self._running -= 1


class _Turn:
    def __init__(self, gate: FairGate, stream: Hashable, origin: Hashable):
        self.gate, self.stream, self.origin = gate, stream, origin

    async def __aenter__(self) -> None:
        await self.gate._acquire(self.stream, self.origin)

    async def __aexit__(self, *exc: object) -> None:
        self.gate._release()


class OriginWindow:
    """`async with window.hold(origin):` around compute-and-forward: at most `size`
    microbatches of one origin inside at once; the rest wait, in arrival order."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"origin window must be at least 1, got {size}")
        self.size = size
        self._held: dict[Hashable, asyncio.Semaphore] = {}
        self._users: collections.Counter[Hashable] = collections.Counter()
        self._inside: collections.Counter[Hashable] = collections.Counter()

    def hold(self, origin: Hashable) -> _Hold:
        return _Hold(self, origin)

    def inside(self, origin: Hashable) -> int:
        """Microbatches of `origin` inside the window now."""
        return self._inside[origin]


class _Hold:
    def __init__(self, window: OriginWindow, origin: Hashable):
        self.window, self.origin = window, origin

    async def __aenter__(self) -> None:
        w = self.window
        w._users[self.origin] += 1  # waiting or inside: the semaphore lives while used
        semaphore = w._held.setdefault(self.origin, asyncio.Semaphore(w.size))
        try:
            await semaphore.acquire()
        except BaseException:
            self._forget()
            raise
        w._inside[self.origin] += 1

    async def __aexit__(self, *exc: object) -> None:
        w = self.window
        w._inside[self.origin] -= 1
        if not w._inside[self.origin]:
            del w._inside[self.origin]
        w._held[self.origin].release()
        self._forget()

    def _forget(self) -> None:
        w = self.window
        w._users[self.origin] -= 1
        if not w._users[self.origin]:
            del w._users[self.origin], w._held[self.origin]
