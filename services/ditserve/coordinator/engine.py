"""The denoising engine: admission, step-level continuous batching, stepping, decoding.

Plain asyncio, no gRPC. Requests are admitted into a bounded FIFO queue, promoted to the
active set while their rows fit the pipeline (max rows per microbatch x microbatches in
flight), and stepped one model call at a time. `_pump` runs whenever something changes
(a request arrives, a microbatch returns, a request is cancelled or expires): it retires
stopped requests at this step boundary and fills every free pipeline slot with a
microbatch of ready requests, so that as soon as one microbatch returns its requests
are stepped and can ride in the next one, with no global barrier between steps (the
scheme of Orca's iteration-level scheduling and StreamDiffusion's stream batching,
applied to pipeline stages as in GPipe).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from ditserve.chain.base import ChainError, ErrorCode, StageChain
from ditserve.common.logs import log_event
from ditserve.config import CoordinatorConfig
from ditserve.model import DiTConfig
from ditserve.sampling import Sampler, apply_guidance, make_sampler

from . import metrics
from .batching import plan_group, split_output, stack_inputs
from .outputs import OutputMaker
from .request import Accepted, Progress, RequestHandle, RequestState, Result
from .spec import GenerationSpec

RETRY_BASE_SECONDS = 0.2
"""First backoff after an UNAVAILABLE microbatch; doubles each retry."""
RETRY_MAX_SECONDS = 3.0
QUEUE_RETRY_SECONDS = 1.0
"""Retry hint given to clients refused because the queue is full."""

SamplerFactory = Callable[[str, int], Sampler]


class QueueFull(ChainError):
    """Admission refused: the queue holds max_queued_requests already."""

    def __init__(self, limit: int, retry_after: float = QUEUE_RETRY_SECONDS):
        super().__init__(ErrorCode.RESOURCE_EXHAUSTED,
                         f"the coordinator's queue is full ({limit} requests); retry in "
                         f"{retry_after:g} s")
        self.retry_after = retry_after


class Engine:
    """Drives many requests through one stage chain, batching at step granularity."""

    def __init__(self, chain: StageChain, model: DiTConfig, config: CoordinatorConfig,
                 num_stages: int, outputs: OutputMaker | None = None,
                 sampler_factory: SamplerFactory | None = None):
        self.chain, self.model, self.config = chain, model, config
        self.slots = config.microbatches_in_flight or num_stages
        self.outputs = outputs or OutputMaker(None)
        self.make_sampler = sampler_factory or make_sampler
        self._waiting: deque[RequestState] = deque()
        self._ready: list[RequestState] = []
        self._active_rows = 0
        self._active = 0
        self._in_flight = 0
        self._admitted = 0
        self._pump_scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.stage_busy_seconds: list[float] = []
        """Compute seconds of each stage for this engine's microbatches (utilisation)."""
        self.microbatch_log: list[list[tuple[str, int]]] | None = None
        """When a list, each launched microbatch appends [(request_id, step), ...] (tests)."""

    @property
    def capacity_rows(self) -> int:
        """Rows denoised at once: every pipeline slot full."""
        return self.config.max_rows_per_microbatch * self.slots

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, spec: GenerationSpec) -> RequestHandle:
        """Admits a request (or raises QueueFull at once) and starts it when rows free up."""
        if self._admitted >= self.config.max_queued_requests:
            metrics.REQUESTS.labels("RESOURCE_EXHAUSTED").inc()
            raise QueueFull(self.config.max_queued_requests)
        shape = (self.model.in_channels, self.model.input_size, self.model.input_size)
        state = RequestState(spec, self.make_sampler(spec.sampler, spec.num_steps), shape)
        self._admitted += 1
        state.emit(Accepted(spec.request_id, len(self._waiting), spec))
        self._waiting.append(state)
        self._arm_deadline(state)
        log_event("request_admitted", request_id=spec.request_id, images=spec.num_images,
                  sampler=spec.sampler, steps=spec.num_steps, queued=len(self._waiting))
        self._schedule_pump()
        return RequestHandle(state, self.cancel)

    def cancel(self, state: RequestState) -> None:
        """Marks the request; it stops at the next step boundary."""
        if not state.done:
            state.cancelled = True
            self._schedule_pump()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- scheduling ---------------------------------------------------------------------

    def _schedule_pump(self) -> None:
        """Pumps once, after every callback ready now has run: requests arriving (or
        microbatches returning) in the same loop turn are planned together."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Retires stopped requests, promotes waiting ones, fills free pipeline slots."""
        self._pump_scheduled = False
        now = time.monotonic()
        self._retire_stopped(now)
        self._promote(now)
        while self._in_flight < self.slots and self._ready:
            group = plan_group(self._ready, self.slots - self._in_flight,
                               self.config.max_rows_per_microbatch)
            for request in group:
                self._ready.remove(request)
            self._in_flight += 1
            self._spawn(self._run_microbatch(group))
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        metrics.MICROBATCHES_IN_FLIGHT.set(self._in_flight)

    def _retire_stopped(self, now: float) -> None:
        for queue in (self._waiting, self._ready):
            for request in [r for r in queue if r.stopped(now)]:
                queue.remove(request)
                self._finish(request, request.stopped(now))

    def _promote(self, now: float) -> None:
        while self._waiting and (self._active_rows + self._waiting[0].spec.rows
                                 <= self.capacity_rows or not self._active_rows):
            request = self._waiting.popleft()
            request.started_at = now
            self._active_rows += request.spec.rows
            self._active += 1
            self._ready.append(request)
        metrics.ACTIVE_REQUESTS.set(self._active)

    def _arm_deadline(self, state: RequestState) -> None:
        if state.spec.deadline is None:
            return
        delay = max(0.0, state.spec.deadline - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._expire, state)

    def _expire(self, state: RequestState) -> None:
        if not state.done:
            state.expired = True
            self._schedule_pump()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- one microbatch -----------------------------------------------------------------

    async def _run_microbatch(self, group: list[RequestState]) -> None:
        started = time.monotonic()
        try:
            inputs = stack_inputs(group, null_class=self.model.num_classes)
            if self.microbatch_log is not None:
                self.microbatch_log.append([(r.request_id, r.step) for r in group])
            metrics.ROWS_PER_MICROBATCH.observe(len(inputs.t))
            out = await self._forward_with_retries(inputs.x, inputs.t, inputs.y, group)
            metrics.MICROBATCH_SECONDS.observe(time.monotonic() - started)
            parts = split_output(out, group, inputs.offsets)
            for request, (cond, uncond) in zip(group, parts, strict=True):
                self._advance(request, cond, uncond, started)
        except ChainError as error:
            log_event("microbatch_failed", request_ids=[r.request_id for r in group],
                      code=error.code.value, message=error.message)
            for request in group:
                self._finish(request, error)
        except Exception as error:  # a bug must fail these requests, not hang them
            log_event("microbatch_error", request_ids=[r.request_id for r in group],
                      error=repr(error))
            for request in group:
                self._finish(request, ChainError(ErrorCode.INTERNAL, f"internal error: {error}"))
        finally:
            self._in_flight -= 1
            self._schedule_pump()

    async def _forward_with_retries(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                                    group: Sequence[RequestState]) -> torch.Tensor:
        """The chain's output; UNAVAILABLE is retried with exponential backoff (stages are
        stateless per microbatch, so a resend is safe)."""
        ids = [r.request_id for r in group]
        for attempt in range(self.config.max_retries + 1):
            try:
                return await self._forward_once(x, t, y, ids)
            except ChainError as error:
                if not error.retryable or attempt == self.config.max_retries:
                    raise self._final_error(error, attempt) from None
                delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** attempt)
                log_event("microbatch_retry", request_ids=ids, attempt=attempt + 1,
                          delay_seconds=delay, message=error.message)
                metrics.RETRIES.inc()
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _forward_once(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                            ids: list[str]) -> torch.Tensor:
        """One chain call; the stages' own compute seconds are summed when reported."""
        forward_timed = getattr(self.chain, "forward_timed", None)
        if forward_timed is None:
            return await self.chain.forward(x, t, y, ids)
        out, seconds = await forward_timed(x, t, y, ids)
        for stage, busy in enumerate(seconds):
            metrics.STAGE_BUSY_SECONDS.labels(str(stage)).inc(busy)
            while len(self.stage_busy_seconds) <= stage:
                self.stage_busy_seconds.append(0.0)
            self.stage_busy_seconds[stage] += busy
        return out

    def _final_error(self, error: ChainError, attempts: int) -> ChainError:
        if not error.retryable:
            return error
        return ChainError(error.code, f"the stage chain is unavailable after {attempts + 1} "
                          f"attempts: {error.message}")

    def _advance(self, request: RequestState, cond: torch.Tensor,
                 uncond: torch.Tensor | None, launched: float) -> None:
        """One sampler step of a request from its rows of the model output."""
        request.steps_used += 1
        if request.stopped(time.monotonic()):
            return self._finish(request, request.stopped(time.monotonic()))
        output = cond if uncond is None else _guide(request.spec, cond, uncond, self.model.in_channels)
        timestep = request.sampler.model_timestep(request.step)
        stepped = request.sampler.step(request.step, request.x, output, request.generator)
        request.x, request.step = stepped.prev_sample, request.step + 1
        now = time.monotonic()
        metrics.STEP_SECONDS.observe(now - launched)
        progress = Progress(request.step, request.sampler.num_steps, timestep,
                            now - request.started_at, request.eta_seconds(now))
        self._emit_progress(request, progress,
                            self.outputs.previews_due(request, stepped.pred_original_sample))
        if request.finished_denoising:
            request.denoised_at = now
            self._release_rows(request)
            self._spawn(self._decode_and_finish(request, request.pending))
        else:
            self._ready.append(request)

    def _emit_progress(self, request: RequestState, progress: Progress,
                       previews: Awaitable[list[Any]] | None) -> None:
        """Emits in step order; a decoded preview is awaited off the loop, and later events
        of the request queue behind it."""
        if previews is None and request.pending is None:
            return request.emit(progress)

        async def emit_after(before: asyncio.Task | None) -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            if previews is not None:
                progress.previews = await previews
            request.emit(progress)

        request.pending = self._spawn(emit_after(request.pending))

    async def _decode_and_finish(self, request: RequestState,
                                 before: asyncio.Task | None) -> None:
        """Decoding runs beside the denoising of other requests."""
        try:
            images = await self.outputs.final_images(request)
        except ChainError as error:
            return self._finish(request, error)
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        decoded_at = time.monotonic()
        latents = request.x if request.spec.return_latents else None
        request.emit(Result(latents, images, request.started_at - request.admitted_at,
                            request.denoised_at - request.started_at,
                            decoded_at - request.denoised_at, request.spec.seed))
        self._finish(request, None)

    def _release_rows(self, request: RequestState) -> None:
        """Its rows no longer count against the active capacity (done or stopped)."""
        if request.started_at is not None and not request.released:
            self._active_rows -= request.spec.rows
            self._active -= 1
            request.released = True

    def _finish(self, request: RequestState, error: ChainError | None) -> None:
        """Ends the request's stream (with `error` if it failed) and frees its slot."""
        if request.done:
            return
        request.done = True
        self._release_rows(request)
        self._admitted -= 1
        metrics.REQUESTS.labels(error.code.value if error else "ok").inc()
        log_event("request_finished", request_id=request.request_id,
                  outcome=error.code.value if error else "ok", steps=request.step)
        if error is not None:
            request.emit(error)
        request.emit(None)


def _guide(spec: GenerationSpec, cond: torch.Tensor, uncond: torch.Tensor,
           latent_channels: int) -> torch.Tensor:
    return apply_guidance(cond, uncond, spec.guidance_scale, spec.guidance_channels,
                          latent_channels)
