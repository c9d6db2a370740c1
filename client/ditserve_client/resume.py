"""Resuming a Generate stream that broke after Accepted, shared by `Client` and `AsyncClient`.

A coordinator that crashes (and is restarted by `ditserve up` or Kubernetes) takes every
open stream with it. A request is deterministic by its seed (docs/ARCHITECTURE.md §3), so
the client sends it again once the coordinator is back, pinned to what Accepted reported
(seed, request id, steps, sampler, guidance), and shows only the events it has not shown:
the caller sees Accepted once, each step once and in order, then the same Result an
undisturbed stream would have ended with.

What counts as broken: UNAVAILABLE, or a reset stream (UNKNOWN/INTERNAL "Stream removed",
"RST_STREAM"), without the google.rpc.Status details every answer of the coordinator
carries. A status the coordinator itself sent is its answer: it has already retried its
stages for as long as the request allows, and INVALID_ARGUMENT, CANCELLED, ... never
change on a second try. Nothing is resumed before Accepted (the channel's retry policy
covers that: channel.py).

While resuming, a coordinator that answers RESOURCE_EXHAUSTED (its queue is full: every
client of the crashed one is coming back at once) or UNAVAILABLE (its chain is not ready
yet) is asked again too, no sooner than its RetryInfo says: that request was accepted
once and must not be lost to the crowd at the door. It is also marked
`GenerateRequest.resumed`, which admits it into a reserve of the coordinator's beyond
the queue that fresh requests fill (`coordinator.max_resumed_requests`). A fresh request
gets those answers as errors, as before.

How long: a break is retried with backoff (0.5 s doubling to 5 s) for up to `window`
seconds (default 120), within the call's own deadline; the window starts again once a
resumed stream shows something new.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from .errors import DitserveError, has_status_details, retry_info_delay
from .events import Accepted, Event, Progress
from .proto.dit.v1 import coordinator_pb2
from .request import MODES, SAMPLERS, EventReader

log = logging.getLogger("ditserve_client")

RESUME_WINDOW_S = 120.0
"""Default seconds to wait for a coordinator to come back after a stream broke."""
INITIAL_DELAY_S, MAX_DELAY_S = 0.5, 5.0
"""Backoff between attempts to send a broken request again."""
REFUSALS_WHILE_RESUMING = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
"""The coordinator's answers that a resumed request waits out rather than fails on."""
RESET_MARKERS = ("Stream removed", "RST_STREAM", "Socket closed", "Connection reset")
"""Details of UNKNOWN/INTERNAL statuses that gRPC makes up for a stream cut off mid-way."""


def broken_stream(error: grpc.RpcError) -> bool:
    """Whether `error` is the transport failing (resumable), not the coordinator's answer."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = (error.details() if callable(getattr(error, "details", None)) else "") or ""
    if has_status_details(error):
        return False
    if code is grpc.StatusCode.UNAVAILABLE:
        return True
    return code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and any(
        marker in details for marker in RESET_MARKERS)


class Resumption:
    """One `generate` call across its attempts: pins the request once accepted, drops the
    events already shown, and says whether (and after how long) a broken stream is sent
    again. Plain state, no gRPC calls: both clients drive it."""

    def __init__(self, request: coordinator_pb2.GenerateRequest, window: float,
                 timeout: float | None, clock: Callable[[], float] = time.monotonic):
        self.request, self.window, self.clock = request, window, clock
        self.deadline = None if timeout is None else clock() + timeout
        self.reader = EventReader(request)
        self.accepted: Accepted | None = None
        self.step = 0
        """The last step shown."""
        self.broken_at: float | None = None
        """When the stream broke; None while it flows."""
        self.delay = INITIAL_DELAY_S
        self.resumes = 0

    @property
    def resuming(self) -> bool:
        return self.broken_at is not None

    def timeout(self) -> float | None:
        """Seconds left of the call's deadline, for the next attempt (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - self.clock())

    def read(self, message: coordinator_pb2.GenerateResponse) -> Event | None:
        """The event to show, or None when it was shown before the stream broke."""
        event = self.reader.read(message)
        if isinstance(event, Accepted):
            if self.accepted is not None:
                return None
            self.accepted = event
            self._pin(event)
            return event
        if isinstance(event, Progress) and event.waiting_on:
            return event  # a notice, not a step: always shown
        if isinstance(event, Progress):
            if event.step <= self.step:
                return None
            self.step = event.step
        if self.broken_at is not None:
            log.info("request %s resumed at step %d", self.reader.request_id, self.step)
        self.broken_at, self.delay = None, INITIAL_DELAY_S
        return event

    def _pin(self, accepted: Accepted) -> None:
        """The request as accepted: what the server chose for unset options is fixed now."""
        pinned = coordinator_pb2.GenerateRequest()
        pinned.CopyFrom(self.request)
        pinned.seed, pinned.request_id = accepted.seed, accepted.request_id
        pinned.num_steps, pinned.guidance_scale = accepted.num_steps, accepted.guidance_scale
        if accepted.sampler in SAMPLERS:
            pinned.sampler = SAMPLERS[accepted.sampler]
        if accepted.mode in MODES:  # async results depend on the warm-up: pin it too
            pinned.mode = MODES[accepted.mode]
            if accepted.mode == "async":
                pinned.async_warmup_steps = accepted.async_warmup_steps
        self.request = pinned

    def retry_delay(self, error: grpc.RpcError, target: str) -> float | None:
        """Seconds to wait before sending the request again; None: give up on `error`."""
        if self.accepted is None or self.window <= 0:
            return None
        refused = self.resuming and _code(error) in REFUSALS_WHILE_RESUMING
        if not (refused or broken_stream(error)):
            return None
        now = self.clock()
        if self.broken_at is None:
            self.broken_at = now
            log.warning("the stream of request %s from %s broke at step %d/%d (%s: %s); "
                        "resuming it with seed %d once the coordinator is back (for up to "
                        "%.0f s)", self.accepted.request_id, target, self.step,
                        self.accepted.num_steps, error.code().name, error.details(),
                        self.accepted.seed, self.window)
        end = self.broken_at + self.window
        if self.deadline is not None:
            end = min(end, self.deadline)
        delay, self.delay = self.delay, min(MAX_DELAY_S, 2 * self.delay)
        if refused:
            delay = max(delay, retry_info_delay(error) or 0.0)
            log.info("request %s: the coordinator answered %s (%s); asking again in %.1f s",
                     self.accepted.request_id, error.code().name, error.details(), delay)
        if now + delay >= end:
            return None
        self.resumes += 1
        self.request.resumed = True  # may take the coordinator's reserve for resumed ones
        return delay

    def gave_up(self, error: DitserveError) -> DitserveError:
        """`error`, saying how long the client waited when it had been resuming."""
        if self.broken_at is None or error.code not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
            return error
        waited = self.clock() - self.broken_at
        return DitserveError(error.code, f"{error.message} (the stream broke at step "
                             f"{self.step}; not back after {waited:.0f} s of resuming)",
                             error.retry_after)


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if callable(getattr(error, "code", None)) else None
