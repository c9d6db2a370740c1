"""One request's state inside the engine: its latents, sampler, RNG and event stream.

Seeds follow DESIGN §3: the initial noise is `torch.randn((n, C, L, L), generator=
torch.Generator("cpu").manual_seed(seed))` and every later draw of the request comes from
that same generator, so a request's images do not depend on what it was batched with.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.chain.base import ChainError, ErrorCode
from ditserve.sampling.base import Sampler

from .spec import GenerationSpec


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


class RequestState:
    """A request being served: spec, per-request sampler/generator, latents, events."""

    def __init__(self, spec: GenerationSpec, sampler: Sampler, latent_shape: tuple[int, int, int]):
        self.spec = spec
        self.sampler = sampler
        self.generator = torch.Generator("cpu").manual_seed(spec.seed)
        channels, side, _ = latent_shape
        # (n, C, L, L) float32 on the CPU: the convention of diffusers' DiT pipeline.
        self.x = torch.randn((spec.num_images, channels, side, side), generator=self.generator)
        self.step = 0
        self.cancelled = False
        self.expired = False
        self.done = False
        self.released = False
        """Whether its rows were given back to the active capacity."""
        self.pending: asyncio.Task | None = None
        """The last event still being prepared (a decoded preview); later ones wait."""
        """Whether its rows were given back to the active capacity."""
        self.events: asyncio.Queue[Event | ChainError | None] = asyncio.Queue()
        self.admitted_at = time.monotonic()
        self.started_at: float | None = None
        self.denoised_at: float | None = None
        self.steps_used = 0
        """Model steps taken (microbatches this request's rows were in), for tests/metrics."""

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def latent_key(self) -> tuple[int, ...]:
        """Requests share a microbatch only when their latents have the same shape."""
        return tuple(self.x.shape[1:])

    @property
    def finished_denoising(self) -> bool:
        return self.step >= self.sampler.num_steps

    def stopped(self, now: float) -> ChainError | None:
        """Why the request must stop at this step boundary, if it must."""
        if self.cancelled:
            return ChainError(ErrorCode.CANCELLED, f"request {self.request_id} was cancelled")
        if self.expired or (self.spec.deadline is not None and now >= self.spec.deadline):
            return ChainError(ErrorCode.DEADLINE_EXCEEDED,
                              f"request {self.request_id} passed its deadline at step "
                              f"{self.step} of {self.sampler.num_steps}")
        return None

    def emit(self, event: Event | ChainError | None) -> None:
        self.events.put_nowait(event)

    def eta_seconds(self, now: float) -> float:
        """Time left at this request's own step rate so far."""
        if not self.step or self.started_at is None:
            return 0.0
        per_step = (now - self.started_at) / self.step
        return per_step * (self.sampler.num_steps - self.step)


class RequestHandle:
    """What a caller holds: the request's events, and a way to cancel it."""

    def __init__(self, state: RequestState, cancel: Any):
        self._state = state
        self._cancel = cancel

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def steps_used(self) -> int:
        return self._state.steps_used

    def cancel(self) -> None:
        """Stops the request at the next step boundary (the client went away)."""
        self._cancel(self._state)

    async def events(self):
        """Accepted, Progress..., Result; a failure is raised as ChainError."""
        while True:
            event = await self._state.events.get()
            if event is None:
                return
            if isinstance(event, ChainError):
                raise event
            yield event
