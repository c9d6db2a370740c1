"""How long the engine waits for a peer that does not answer (docs/ARCHITECTURE.md §4).

- `RoundTrips` keeps recent microbatch round trips; a microbatch that takes longer than
  max(floor, 10x their p99) is deemed lost (a frozen stage) and resent, so a stopped
  process turns into a retry within seconds rather than when TCP gives up.
- `Outage` is what the engine knows about a peer that is down (the stage chain or the
  decoder): since when, why; it logs one warning when an outage starts and one when it
  ends, and feeds the `dit_coordinator_peer_up` gauge and GetModelInfo's health.
- `backoff_delays` are the waits between resends: exponential, capped.

Waiting is bounded by time, not by a count of attempts: a request waits as long as its
deadline allows, or `CoordinatorConfig.unavailable_grace_seconds` when it has none.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator

from ditserve.common.logs import log_event
from ditserve.common.status import ServiceError, StatusCode

from . import metrics

RETRY_BASE_SECONDS = 0.2
"""First wait after a failure that may heal; doubles each time."""
RETRY_MAX_SECONDS = 2.0
"""Longest wait between two resends: a peer that is back is used within this."""
TIMEOUT_FACTOR = 10.0
"""A microbatch is lost after this many times the p99 of recent round trips."""
FIRST_TIMEOUT_FACTOR = 12.0
"""Before any round trip is measured, the limit is this many times the floor."""
WINDOW = 256
"""Round trips the p99 is taken over."""

WAITABLE = (StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED)
"""Failures worth waiting out: a peer down or restarting, or a stage overloaded."""


def waitable(error: ServiceError) -> bool:
    return error.code in WAITABLE


def backoff_delays() -> Iterator[float]:
    """0.2, 0.4, 0.8, 1.6, 2, 2, ... seconds."""
    delay = RETRY_BASE_SECONDS
    while True:
        yield delay
        delay = min(RETRY_MAX_SECONDS, delay * 2)


class RoundTrips:
    """Recent round-trip seconds of microbatches, and the time limit they imply."""

    def __init__(self, floor_seconds: float):
        self.floor = floor_seconds
        self._seconds: deque[float] = deque(maxlen=WINDOW)

    def add(self, seconds: float) -> None:
        self._seconds.append(seconds)

    @property
    def p99(self) -> float | None:
        if not self._seconds:
            return None
        ordered = sorted(self._seconds)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def timeout(self) -> float:
        """Seconds a microbatch may take before it is deemed lost."""
        p99 = self.p99
        if p99 is None:
            return self.floor * FIRST_TIMEOUT_FACTOR
        return max(self.floor, TIMEOUT_FACTOR * p99)


class Outage:
    """Whether one peer ("stage chain", "decoder") is down, since when and why."""

    def __init__(self, peer: str):
        self.peer = peer
        self.since: float | None = None
        self.reason = ""
        metrics.PEER_UP.labels(peer).set(1)

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, error: ServiceError) -> None:
        self.reason = error.message
        if self.since is None:
            self.since = time.monotonic()
            metrics.PEER_UP.labels(self.peer).set(0)
            log_event("peer_unavailable", level=logging.WARNING, peer=self.peer,
                      code=error.code.value, message=error.message)

    def recovered(self) -> None:
        if self.since is not None:
            log_event("peer_recovered", level=logging.WARNING, peer=self.peer,
                      down_seconds=round(time.monotonic() - self.since, 2))
            self.since, self.reason = None, ""
            metrics.PEER_UP.labels(self.peer).set(1)
