"""One request as the scheduler sees it (plain data), and the events its stream carries.

Seeds follow docs/ARCHITECTURE.md §3: the initial noise is `torch.randn((n, C, L, L),
generator=torch.Generator("cpu").manual_seed(seed))` and every later draw of the request
comes from that same generator, so a request's images do not depend on what it was
batched with.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.common.status import ServiceError, StatusCode
from ditserve.sampling.base import Sampler
from ditserve.sampling.stale import StaleOutputs

from .spec import GenerationSpec


class RequestStatus(enum.Enum):
    """Where a request is; the scheduler keeps one set per status."""

    WAITING = "waiting"
    """Admitted, queued until its rows fit the pipeline's capacity."""
    RUNNING = "running"
    """Holds rows of the capacity: ready for its next step, or in a microbatch."""
    DECODING = "decoding"
    """Denoised; its rows are free again while its images are made."""
    FINISHED = "finished"
    """Its stream has ended, with a result or with `error`."""


@dataclass
class Launch:
    """One model call an async request has ready to send (scheduler.py, "Async mode")."""

    step: int
    """The step whose model output it will be: used for that step, whenever it arrives."""
    x: torch.Tensor
    """(n, C, L, L) float32: the latents it carries, those of step `source`."""
    source: int
    """The step of `x`: `step` - (depth - 1) once pipelining runs, `step` in warm-up."""


@dataclass
class Arrival:
    """An async call's model output, kept until its step is reached."""

    output: torch.Tensor
    """(rows, C_out, L, L): the model output for `x`."""
    x: torch.Tensor
    """(n, C, L, L) float32: the latents the call carried."""
    source: int
    """The step of `x`."""


@dataclass
class Pipeline:
    """An async request's pipelining state: plain data, driven by the scheduler."""

    depth: int
    """Model calls kept in flight once pipelining runs: the chain's stages (S)."""
    warmup_steps: int
    """Steps before pipelining starts; they run exact, one call at a time."""
    stale: StaleOutputs
    """Restates each output for the latents it is used with (sampling/stale.py)."""
    queued: deque[Launch] = field(default_factory=deque)
    """Calls ready to send, in step order (at most `depth`)."""
    in_flight: int = 0
    """Calls on the chain now."""
    arrived: dict[int, Arrival] = field(default_factory=dict)
    """Outputs of calls that returned, by the step they are for, until that step is reached
    (at once, unless a resent call was overtaken by a later one); at most `depth`."""


@dataclass(eq=False)  # identity: two requests may carry the same client-chosen id
class Request:
    """A request being served: its spec, sampler, generator and latents."""

    spec: GenerationSpec
    sampler: Sampler
    generator: torch.Generator
    x: torch.Tensor
    """(n, C, L, L) float32 latents on the CPU: x_T at first, the result at the end."""
    admitted_at: float
    status: RequestStatus = RequestStatus.WAITING
    step: int = 0
    """Sampler steps done; the next model call is at `sampler.model_timestep(step)`."""
    steps_used: int = 0
    """Model calls that returned with this request's rows (for tests and metrics)."""
    stop: StatusCode | None = None
    """CANCELLED or DEADLINE_EXCEEDED once asked to stop; acted on at a step boundary."""
    error: ServiceError | None = None
    """Why it finished, if it failed."""
    started_at: float | None = None
    denoised_at: float | None = None
    pipeline: Pipeline | None = None
    """Async mode's state; None for an exact request."""

    @classmethod
    def create(cls, spec: GenerationSpec, sampler: Sampler,
               latent_shape: tuple[int, int, int], now: float) -> Request:
        """A new request with its initial noise drawn from its own seeded generator."""
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        channels, side, _ = latent_shape
        # (n, C, L, L) float32 on the CPU: the convention of diffusers' DiT pipeline.
        x = torch.randn((spec.num_images, channels, side, side), generator=generator)
        return cls(spec, sampler, generator, x, admitted_at=now)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def latent_key(self) -> tuple[int, ...]:
        """Requests share a microbatch only when their latents have the same shape."""
        return tuple(self.x.shape[1:])

    def stop_error(self, now: float) -> ServiceError | None:
        """Why the request must stop at this step boundary, if it must."""
        if self.stop is StatusCode.CANCELLED:
            return ServiceError(StatusCode.CANCELLED, f"request {self.request_id} was cancelled")
        deadline = self.spec.deadline
        if self.stop is StatusCode.DEADLINE_EXCEEDED or (deadline is not None and now >= deadline):
            return ServiceError(StatusCode.DEADLINE_EXCEEDED,
                                f"request {self.request_id} passed its deadline at step "
                                f"{self.step} of {self.sampler.num_steps}")
        return None

    def eta_seconds(self, now: float) -> float:
        """Time left at this request's own step rate so far."""
        if not self.step or self.started_at is None:
            return 0.0
        per_step = (now - self.started_at) / self.step
        return per_step * (self.sampler.num_steps - self.step)


@dataclass
class Accepted:
    """The request was admitted; `queue_position` requests wait ahead of it."""

    request_id: str
    queue_position: int
    spec: GenerationSpec


@dataclass
class Progress:
    """Step `step` (1-based) of `total_steps` is done."""

    step: int
    total_steps: int
    timestep: int
    elapsed_seconds: float
    eta_seconds: float
    previews: list[Any] = field(default_factory=list)
    """dit.v1.Image messages (approximate or decoded previews), when asked at this step."""
    waiting_on: str = ""
    """Non-empty for a notice, not a step: the peer the request is stalled on."""
    waiting_reason: str = ""
    waiting_seconds: float = 0.0


@dataclass
class Result:
    """The finished request."""

    latents: torch.Tensor | None
    """(n, C, L, L) float32: the sampler's output, before VAE scaling (when asked for)."""
    images: list[Any]
    """dit.v1.Image messages, empty when images were skipped."""
    queued_seconds: float
    denoising_seconds: float
    decoding_seconds: float
    seed: int


Event = Accepted | Progress | Result
