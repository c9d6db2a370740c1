"""The scheduler: which requests ride in the next microbatch, and what a step does to them.

Plain data, synchronous: no asyncio, no clock (the time is an argument), no metrics, no
retries; the engine (engine.py) executes what it plans (vLLM v1's Scheduler under
EngineCore.step: schedule → execute → update).

- `add` admits a request into a bounded FIFO queue (QueueFull beyond it).
- `schedule(free_slots, now)` retires requests asked to stop, starts waiting requests
  while their rows fit the pipeline (max rows per microbatch x slots), and cuts the ready
  ones into at most `free_slots` microbatches. A microbatch holds whole requests (a
  request's conditional and null-class rows are never split) of one latent shape, at
  whatever step each is: the model takes a timestep per row (Orca's iteration-level
  scheduling, StreamDiffusion's stream batching). Ready rows are spread evenly over the
  free slots so that S similar microbatches keep S stages busy (GPipe's bubble
  (S-1)/(m+S-1); docs/ARCHITECTURE.md §4).
- `update(microbatch, out, now)` steps each request of a returned microbatch: guidance,
  then one sampler step drawing from the request's own generator. A request whose latents
  go non-finite fails alone, INVALID_ARGUMENT about its own parameters.
- `fail` ends the requests of a microbatch that failed; `finish` ends a decoded request.

Every count is derived from the sets (`waiting`, `ready`, `in_flight`, `decoding`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import CoordinatorConfig
from ditserve.model import DiTConfig
from ditserve.sampling import Sampler, apply_guidance

from .request import Request, RequestStatus
from .spec import GenerationSpec

QUEUE_RETRY_SECONDS = 1.0
"""Retry hint given to clients refused because the queue is full."""

SamplerFactory = Callable[[str, int], Sampler]


class QueueFull(ServiceError):
    """Admission refused: the queue holds max_queued_requests already."""

    def __init__(self, limit: int, retry_after: float = QUEUE_RETRY_SECONDS):
        super().__init__(StatusCode.RESOURCE_EXHAUSTED,
                         f"the coordinator's queue is full ({limit} requests); retry in "
                         f"{retry_after:g} s", retry_after)


@dataclass(eq=False)
class Microbatch:
    """Requests sharing one model call, and their stacked inputs."""

    requests: list[Request]
    x: torch.Tensor
    """(N, C, L, L) float32 latents: each request's n rows, twice when guided."""
    t: torch.Tensor
    """(N,) int64 model timesteps, one per row."""
    y: torch.Tensor
    """(N,) int64 class labels; the null class (= num_classes) on guidance rows."""
    offsets: list[int]
    """Row where each request's block starts: its n conditional rows, then n null rows."""

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]


@dataclass
class StepOutput:
    """One request after one step (it is RUNNING again, or DECODING after its last)."""

    request: Request
    timestep: int
    """The model timestep of the step just taken."""
    pred_x0: torch.Tensor
    """(n, C, L, L) the predicted clean latents, for previews."""


@dataclass
class SchedulerOutput:
    """What `schedule` or `update` decided."""

    microbatches: list[Microbatch] = field(default_factory=list)
    """To run on the chain, one per free slot at most."""
    stepped: list[StepOutput] = field(default_factory=list)
    """Requests that took a step."""
    finished: list[Request] = field(default_factory=list)
    """Requests that ended now, each with its `error`."""


class Scheduler:
    """Requests by status, and the microbatches planned from them (module docstring)."""

    def __init__(self, model: DiTConfig, config: CoordinatorConfig, slots: int,
                 make_sampler: SamplerFactory):
        self.model, self.config, self.slots = model, config, slots
        self.make_sampler = make_sampler
        self.waiting: deque[Request] = deque()
        self.ready: list[Request] = []
        """RUNNING and between microbatches, in the order they became ready."""
        self.in_flight: set[Request] = set()
        """RUNNING and in a microbatch on the chain."""
        self.decoding: set[Request] = set()

    # -- counts, derived ------------------------------------------------------------------

    @property
    def capacity_rows(self) -> int:
        """Rows denoised at once: every pipeline slot full."""
        return self.config.max_rows_per_microbatch * self.slots

    @property
    def running(self) -> list[Request]:
        return [*self.ready, *self.in_flight]

    @property
    def active_rows(self) -> int:
        return sum(r.spec.rows for r in self.running)

    @property
    def num_admitted(self) -> int:
        """Requests admitted and not finished: what max_queued_requests bounds."""
        return len(self.waiting) + len(self.ready) + len(self.in_flight) + len(self.decoding)

    # -- admission and stopping ---------------------------------------------------------

    def add(self, spec: GenerationSpec, now: float) -> Request:
        """Admits a request (QueueFull at once beyond max_queued_requests; a resumed one
        may also take the max_resumed_requests reserve above it)."""
        limit = self.config.max_queued_requests
        if spec.resumed:  # accepted once, before a restart: not to be lost to the crowd
            limit += self.config.max_resumed_requests
        if self.num_admitted >= limit:
            raise QueueFull(self.config.max_queued_requests)
        shape = (self.model.in_channels, self.model.input_size, self.model.input_size)
        request = Request.create(spec, self.make_sampler(spec.sampler, spec.num_steps), shape,
                                 now)
        self.waiting.append(request)
        return request

    def stop(self, request: Request, why: StatusCode) -> None:
        """Asks a request to stop (CANCELLED or DEADLINE_EXCEEDED) at its next step
        boundary; a request decoding its images already is left to finish."""
        if request.status in (RequestStatus.WAITING, RequestStatus.RUNNING) and not request.stop:
            request.stop = why

    # -- one step: schedule → (the engine runs the chain) → update ------------------------

    def schedule(self, free_slots: int, now: float) -> SchedulerOutput:
        """Retires stopped requests, starts waiting ones while their rows fit, and plans up
        to `free_slots` microbatches of the ready ones."""
        output = SchedulerOutput()
        for request in [r for r in (*self.waiting, *self.ready) if r.stop_error(now)]:
            output.finished.append(self._finish(request, request.stop_error(now)))
        while self.waiting and (self.active_rows + self.waiting[0].spec.rows
                                <= self.capacity_rows or not self.running):
            request = self.waiting.popleft()
            request.status, request.started_at = RequestStatus.RUNNING, now
            self.ready.append(request)
        for slot in range(free_slots):
            group = _plan_group(self.ready, free_slots - slot,
                                self.config.max_rows_per_microbatch)
            if not group:
                break
            for request in group:
                self.ready.remove(request)
                self.in_flight.add(request)
            output.microbatches.append(self._stack(group))
        return output

    def _stack(self, group: list[Request]) -> Microbatch:
        xs, ts, ys, offsets, row = [], [], [], [], 0
        for request in group:
            n, t = request.spec.num_images, request.sampler.model_timestep(request.step)
            copies = 2 if request.spec.guided else 1
            xs += [request.x] * copies
            ys.append(torch.tensor(request.spec.labels, dtype=torch.int64))
            if request.spec.guided:
                ys.append(torch.full((n,), self.model.num_classes, dtype=torch.int64))
            ts.append(torch.full((n * copies,), t, dtype=torch.int64))
            offsets.append(row)
            row += n * copies
        return Microbatch(group, torch.cat(xs), torch.cat(ts), torch.cat(ys), offsets)

    def update(self, microbatch: Microbatch, out: torch.Tensor, now: float) -> SchedulerOutput:
        """Steps each request of a returned microbatch with its rows of the model output
        `out` (N, C_out, L, L)."""
        output = SchedulerOutput()
        for request, start in zip(microbatch.requests, microbatch.offsets, strict=True):
            self.in_flight.discard(request)
            request.steps_used += 1
            if (error := request.stop_error(now)) is not None:
                output.finished.append(self._finish(request, error))
                continue
            spec, n = request.spec, request.spec.num_images
            eps = out[start:start + n]  # (n, C_out, L, L): conditional rows
            if spec.guided:  # the null-class rows follow
                eps = apply_guidance(eps, out[start + n:start + 2 * n], spec.guidance_scale,
                                     spec.guidance_channels, self.model.in_channels)
            timestep = request.sampler.model_timestep(request.step)
            stepped = request.sampler.step(request.step, request.x, eps, request.generator)
            # One float instead of an elementwise test (7 vs 40 us here): the sum is NaN or
            # infinite when an element is, or when the latents near float32's limit anyway.
            if not math.isfinite(float(stepped.prev_sample.sum())):
                output.finished.append(self._finish(request, _non_finite(request)))
                continue
            request.x, request.step = stepped.prev_sample, request.step + 1
            if request.step < request.sampler.num_steps:
                self.ready.append(request)
            else:
                request.status, request.denoised_at = RequestStatus.DECODING, now
                self.decoding.add(request)
            output.stepped.append(StepOutput(request, timestep, stepped.pred_original_sample))
        return output

    # -- ends -----------------------------------------------------------------------------

    def fail(self, microbatch: Microbatch, error: ServiceError,
             now: float | None = None) -> SchedulerOutput:
        """Ends the requests of a microbatch that failed (after the engine's retries); one
        asked to stop (given `now`) ends with its own reason: cancelled, past its deadline."""
        unfinished = [r for r in microbatch.requests if r.status is not RequestStatus.FINISHED]
        return SchedulerOutput(finished=[
            self._finish(r, (r.stop_error(now) if now is not None else None) or error)
            for r in unfinished])

    def finish(self, request: Request, error: ServiceError | None = None) -> Request:
        """Ends a request whose images are made (or failed to be)."""
        return self._finish(request, error)

    def _finish(self, request: Request, error: ServiceError | None) -> Request:
        if request.status is RequestStatus.FINISHED:  # once: the first reason stands
            return request
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.ready:
            self.ready.remove(request)
        self.in_flight.discard(request)
        self.decoding.discard(request)
        request.status, request.error = RequestStatus.FINISHED, error
        return request


def _plan_group(ready: Sequence[Request], free_slots: int, max_rows: int) -> list[Request]:
    """The requests of the next microbatch, oldest first: about 1/free_slots of the ready
    rows (so that the remaining slots get their share), at most max_rows, at least one
    request, only requests of the first one's latent shape."""
    if not ready:
        return []
    key = ready[0].latent_key
    compatible = [r for r in ready if r.latent_key == key]
    target = min(max_rows, math.ceil(sum(r.spec.rows for r in compatible) / free_slots))
    group, rows = [], 0
    for request in compatible:
        if group and rows + request.spec.rows > target:
            break
        group.append(request)
        rows += request.spec.rows
    return group


def _non_finite(request: Request) -> ServiceError:
    """The failure of a request whose latents overflowed: about its own parameters."""
    spec = request.spec
    return ServiceError(
        StatusCode.INVALID_ARGUMENT,
        f"request {spec.request_id}: the latents became NaN or infinite at step "
        f"{request.step + 1} of {request.sampler.num_steps} (sampler {spec.sampler}, guidance "
        f"scale {spec.guidance_scale:g} on {spec.guidance_channels} channels, seed "
        f"{spec.seed}); a smaller guidance scale keeps them finite")
