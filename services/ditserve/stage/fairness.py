"""Round-robin admission to a stage's compute thread, one queue per stream.

A stage computes one microbatch at a time. With one FIFO queue, a peer that floods one
stream with valid microbatches delays everyone else's by its whole backlog (a Generate
once took 98 s instead of 0.3 s behind such a flood). `FairGate` lets `slots`
microbatches into the runner's queue at once and, whenever one leaves, admits the next
from the stream after the one last served: each stream gets its turn, so a flood costs
the coordinator's stream a fair share of the stage, never its whole wait.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable


class FairGate:
    """`async with gate.turn(stream):` around a compute; streams take turns."""

    def __init__(self, slots: int = 2):
        # Two slots keep the compute thread fed: one computes while the next waits on it.
        self.slots = slots
        self._running = 0
        self._waiting: dict[Hashable, collections.deque[asyncio.Future]] = {}
        self._order: collections.deque[Hashable] = collections.deque()

    def turn(self, stream: Hashable) -> _Turn:
        return _Turn(self, stream)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def _acquire(self, stream: Hashable) -> None:
        if self._running < self.slots and not self._order:
            self._running += 1
            return
        future = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(stream, collections.deque())
        queue.append(future)
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
            queue = self._waiting[stream]
            future = queue.popleft()
            if queue:
                self._order.append(stream)  # back of the line for its next one
            else:
                del self._waiting[stream]
            if not future.cancelled():
                future.set_result(None)  # the slot passes on: _running unchanged
                return
        self._running -= 1


class _Turn:
    def __init__(self, gate: FairGate, stream: Hashable):
        self.gate, self.stream = gate, stream

    async def __aenter__(self) -> None:
        await self.gate._acquire(self.stream)

    async def __aexit__(self, *exc: object) -> None:
        self.gate._release()
