"""The engine: the async driver around the Scheduler (vLLM v1's EngineCore).

It owns what the scheduler must not: the event loop, the chain, retries, the decoder,
metrics and each request's event stream. Whenever something changes (a request arrives,
a microbatch returns, a request is cancelled or its deadline passes) it asks the
scheduler for microbatches to fill the free pipeline slots, runs each on the chain, and
hands the output back to `Scheduler.update`; as soon as a microbatch returns, its
requests can ride in the next one, with no barrier between steps.

A request's stream is a queue of events in step order: an event that takes time (a
decoded preview, the final images) is queued as a task at its step, and the reader
awaits each in turn, so the order holds by construction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import torch

from ditserve.chain.base import StageChain
from ditserve.common.logs import log_event
from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import CoordinatorConfig
from ditserve.model import DiTConfig
from ditserve.sampling import make_sampler

from . import metrics
from .outputs import OutputMaker
from .recovery import Outage, RoundTrips, backoff_delays, waitable
from .request import Accepted, Event, Progress, Request, RequestStatus, Result
from .scheduler import Microbatch, QueueFull, SamplerFactory, Scheduler, StepOutput
from .spec import GenerationSpec

StreamItem = Event | ServiceError | asyncio.Task | None
"""What a request's queue holds: an event, a task making one, its failure, or None (end)."""

__all__ = ["Engine", "QueueFull", "RequestHandle"]

ANSWER_MARGIN_SECONDS = 0.5
"""During an outage, a microbatch's attempt ends this long before its requests' patience,
so that the final error reaches their clients before their deadlines do."""
WAIT_NOTICE_SECONDS = 5.0
"""While a request is stalled on a peer, a waiting notice is sent this often."""


class RequestHandle:
    """What a caller holds: the request's events, and a way to cancel it."""

    def __init__(self, request: Request, stream: asyncio.Queue[StreamItem],
                 cancel: Callable[[Request], None],
                 notices: asyncio.Queue[Progress] | None = None):
        self._request, self._stream, self._cancel = request, stream, cancel
        self._notices: asyncio.Queue[Progress] = notices or asyncio.Queue()

    @property
    def request_id(self) -> str:
        return self._request.request_id

    @property
    def steps_used(self) -> int:
        return self._request.steps_used

    def cancel(self) -> None:
        """Stops the request at the next step boundary (the client went away)."""
        self._cancel(self._request)

    async def events(self) -> AsyncIterator[Event]:
        """Accepted, Progress..., Result; a failure is raised as ServiceError. Waiting
        notices (a Progress with `waiting_on`) come as soon as they are sent, also while
        the stream itself waits on a step or on the decoder."""
        while True:
            if not self._stream.empty():  # the common case: no task, no wait
                item = self._stream.get_nowait()
            else:
                getter = asyncio.ensure_future(self._stream.get())
                try:
                    async for notice in self._notices_until(getter):
                        yield notice
                finally:
                    getter.cancel()  # a reader gone mid-wait must not swallow a later item
                item = getter.result()
            if item is None:
                return
            if isinstance(item, asyncio.Task):
                # asyncio.wait never cancels `item`: a reader that goes away must not
                # cancel a decode others wait for
                async for notice in self._notices_until(item):
                    yield notice
                event = item.result()
            else:
                event = item
            if isinstance(event, tuple):  # latents without images, then why (Engine._decode)
                result, event = event
                yield result
            if isinstance(event, ServiceError):
                raise event
            yield event

    async def _notices_until(self, future: asyncio.Future) -> AsyncIterator[Progress]:
        """The notices sent until `future` is done."""
        while not future.done():
            notice = asyncio.ensure_future(self._notices.get())
            try:
                done, _ = await asyncio.wait({future, notice},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not notice.done():
                    notice.cancel()
            if notice in done:
                yield notice.result()


class Engine:
    """Drives many requests through one stage chain, batching at step granularity."""

    def __init__(self, chain: StageChain, model: DiTConfig, config: CoordinatorConfig,
                 num_stages: int, outputs: OutputMaker | None = None,
                 sampler_factory: SamplerFactory | None = None):
        self.chain, self.model, self.config = chain, model, config
        self.slots = config.microbatches_in_flight or num_stages
        self.scheduler = Scheduler(model, config, self.slots, sampler_factory or make_sampler,
                                   stages=num_stages)
        self.outputs = outputs or OutputMaker(None)
        self._streams: dict[Request, asyncio.Queue[StreamItem]] = {}
        self._wait_notices: dict[Request, float] = {}  # when each stalled one was told
        self._notices: dict[Request, asyncio.Queue[Progress]] = {}
        self._microbatches: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()
        self._wake_pending = False
        self.round_trips = RoundTrips(config.microbatch_timeout_seconds)
        self.chain_outage, self.decoder_outage = Outage("stage chain"), Outage("decoder")
        self.stage_busy_seconds: list[float] = []
        """Compute seconds of each stage for this engine's microbatches (utilisation)."""

    @property
    def in_flight(self) -> int:
        """Microbatches on the chain now."""
        return len(self._microbatches)

    def submit(self, spec: GenerationSpec) -> RequestHandle:
        """Admits a request (or raises QueueFull at once) and starts it when rows free up."""
        now = time.monotonic()
        try:
            request = self.scheduler.add(spec, now)
        except QueueFull:
            metrics.REQUESTS.labels(StatusCode.RESOURCE_EXHAUSTED.value).inc()
            raise
        position = len(self.scheduler.waiting) - 1
        stream = self._streams[request] = asyncio.Queue()
        notices = self._notices[request] = asyncio.Queue()
        stream.put_nowait(Accepted(spec.request_id, position, spec))
        if spec.deadline is not None:
            asyncio.get_running_loop().call_later(
                max(0.0, spec.deadline - now), self._stop, request, StatusCode.DEADLINE_EXCEEDED)
        log_event("request_admitted", request_id=spec.request_id, images=spec.num_images,
                  sampler=spec.sampler, steps=spec.num_steps, mode=spec.mode,
                  queued=position + 1)
        self._wake()
        return RequestHandle(request, stream, self.cancel, notices)

    def cancel(self, request: Request) -> None:
        """The request stops at the next step boundary."""
        self._stop(request, StatusCode.CANCELLED)

    def _stop(self, request: Request, why: StatusCode) -> None:
        self.scheduler.stop(request, why)
        self._wake()

    async def close(self) -> None:
        for task in [*self._tasks, *self._microbatches]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._microbatches, return_exceptions=True)

    # -- the loop: schedule → run on the chain → update -------------------------------

    def _wake(self) -> None:
        """Schedules once, after every callback ready now has run: requests arriving (or
        microbatches returning) in the same loop turn are planned together."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._schedule)

    def _schedule(self) -> None:
        self._wake_pending = False
        planned = self.scheduler.schedule(self.slots - self.in_flight, time.monotonic())
        self._end(planned.finished)
        for microbatch in planned.microbatches:
            task = asyncio.get_running_loop().create_task(self._run(microbatch))
            self._microbatches.add(task)
            task.add_done_callback(self._microbatch_done)
        metrics.QUEUE_DEPTH.set(len(self.scheduler.waiting))
        metrics.ACTIVE_REQUESTS.set(len(self.scheduler.running))
        metrics.MICROBATCHES_IN_FLIGHT.set(self.in_flight)

    def _microbatch_done(self, task: asyncio.Task) -> None:
        self._microbatches.discard(task)
        self._wake()

    async def _run(self, microbatch: Microbatch) -> None:
        """One microbatch through the chain, then one step of each of its requests."""
        launched = time.monotonic()
        metrics.ROWS_PER_MICROBATCH.observe(len(microbatch.t))
        try:
            out = await self._forward(microbatch)  # (N, C_out, L, L)
            metrics.MICROBATCH_SECONDS.observe(time.monotonic() - launched)
            updated = self.scheduler.update(microbatch, out, time.monotonic())
            for step in updated.stepped:
                self._emit_step(step, launched)
        except ServiceError as error:
            log_event("microbatch_failed", request_ids=microbatch.request_ids,
                      code=error.code.value, message=error.message)
            self.scheduler.fail(microbatch, error, time.monotonic())
        except Exception as error:  # a bug must fail these requests, not hang them
            log_event("microbatch_error", request_ids=microbatch.request_ids, error=repr(error))
            self.scheduler.fail(microbatch, ServiceError(StatusCode.INTERNAL,
                                                         f"internal error: {error}"))
        self._end([r for r in microbatch.requests if r.status is RequestStatus.FINISHED])

    async def _forward(self, microbatch: Microbatch) -> torch.Tensor:
        """The chain's output. A failure that may heal (a stage down, restarting or
        overloaded; a microbatch lost to a frozen stage) is resent with backoff for as long
        as its requests may wait (`_patience`): stages are stateless per microbatch, so a
        resend is safe."""
        ids, started = microbatch.request_ids, time.monotonic()
        for attempt, delay in enumerate(backoff_delays(), start=1):
            sent, timeout = time.monotonic(), self.round_trips.timeout()
            healthy = not self.chain_outage.down
            # In an outage an attempt may wait (a hop waits up to 2.5 s for its next stream),
            # but not past its requests' patience: their clients must hear why before their
            # own deadlines pass, not DEADLINE_EXCEEDED with no reason.
            left = None if healthy else (self._patience(microbatch.requests, started)
                                         - ANSWER_MARGIN_SECONDS - sent)
            try:
                out, seconds = await asyncio.wait_for(
                    self.chain.forward(microbatch.x, microbatch.t, microbatch.y, ids),
                    timeout if left is None else max(0.0, min(timeout, left)))
            except TimeoutError:
                if left is not None and left < timeout:
                    raise self._gave_up("stage chain", started, attempt,
                                        self.chain_outage.reason) from None
                error = ServiceError(StatusCode.UNAVAILABLE, f"no answer from the stage chain "
                                     f"within {timeout:.1f} s (a stage is frozen or cut off)")
            except ServiceError as failure:
                error = failure
            else:
                if healthy and not self.chain_outage.down:  # not a reconnection's wait
                    self.round_trips.add(time.monotonic() - sent)
                self.chain_outage.recovered()
                for request in microbatch.requests:  # a later wait is told from its start
                    self._wait_notices.pop(request, None)
                self._count_busy(seconds)
                return out
            await self._wait_out(error, "stage chain", self.chain_outage, microbatch.requests,
                                 started, attempt, delay, request_ids=ids)
        raise AssertionError("unreachable")

    async def _wait_out(self, error: ServiceError, peer: str, outage: Outage,
                        requests: list[Request], started: float, attempt: int, delay: float,
                        **fields: Any) -> None:
        """Sleeps `delay` before the next attempt, or raises the final error when the
        failure cannot heal or the requests cannot wait that long."""
        now = time.monotonic()
        if not waitable(error):
            raise error
        if now + delay > self._patience(requests, started):
            raise self._gave_up(peer, started, attempt, error.message, error.code)
        outage.failed(error)
        self._notify_waiting(requests, peer, error, now - started, now)
        log_event("waiting_on_peer", level=logging.WARNING, peer=peer, attempt=attempt,
                  waited_seconds=round(now - started, 2), retry_in=delay, code=error.code.value,
                  message=error.message, **fields)
        metrics.RETRIES.inc()
        await asyncio.sleep(delay)

    @staticmethod
    def _gave_up(peer: str, started: float, attempt: int, reason: str,
                 code: StatusCode = StatusCode.UNAVAILABLE) -> ServiceError:
        """The final error of a wait for `peer` that its requests cannot wait out."""
        return ServiceError(code, f"the {peer} is still unavailable after "
                            f"{time.monotonic() - started:.1f} s and {attempt} attempts: {reason}")

    def _notify_waiting(self, requests: list[Request], peer: str, error: ServiceError,
                        waited: float, now: float) -> None:
        """Tells each stalled request's client what it waits on: when the wait starts,
        then every WAIT_NOTICE_SECONDS (a Progress notice repeating the last step)."""
        for request in requests:
            notices = self._notices.get(request)
            last = self._wait_notices.get(request)
            if notices is None or request.stop is not None or (
                    last is not None and now - last < WAIT_NOTICE_SECONDS):
                continue
            self._wait_notices[request] = now
            started = request.started_at if request.started_at is not None else now
            notices.put_nowait(Progress(
                request.step, request.sampler.num_steps, 0, now - started,
                request.eta_seconds(now), waiting_on=peer, waiting_reason=error.message,
                waiting_seconds=round(waited, 3)))

    def _patience(self, requests: list[Request], started: float) -> float:
        """When to stop waiting for a peer: the latest end any of `requests` still wants
        (its deadline, or `started` + the configured grace without one). Requests asked to
        stop (cancelled, past their deadline) want nothing."""
        grace = started + self.config.unavailable_grace_seconds
        ends = [grace if r.spec.deadline is None else r.spec.deadline
                for r in requests if r.stop is None]
        return max(ends, default=started)

    def _count_busy(self, seconds: tuple[float, ...]) -> None:
        """Adds the stages' own compute seconds (utilisation = busy / wall)."""
        for stage, busy in enumerate(seconds):
            metrics.STAGE_BUSY_SECONDS.labels(str(stage)).inc(busy)
            while len(self.stage_busy_seconds) <= stage:
                self.stage_busy_seconds.append(0.0)
            self.stage_busy_seconds[stage] += busy

    # -- a request's stream -------------------------------------------------------------

    def _emit_step(self, step: StepOutput, launched: float) -> None:
        """Progress of one step (with previews when due), then the final images once the
        request is denoised; both in step order on the request's stream."""
        request, now = step.request, time.monotonic()
        metrics.STEP_SECONDS.observe(now - launched)
        progress = Progress(request.step, request.sampler.num_steps, step.timestep,
                            now - request.started_at, request.eta_seconds(now))
        previews = self.outputs.previews_due(request, step.pred_x0)
        stream = self._streams[request]
        stream.put_nowait(progress if previews is None
                          else self._spawn(_with_previews(progress, previews)))
        if request.status is RequestStatus.DECODING:
            stream.put_nowait(self._spawn(self._decode(request)))

    async def _decode(self, request: Request) -> Result | ServiceError | tuple[Result, ServiceError]:
        """The final images; decoding runs beside the denoising of other requests. A
        decoder that is down is waited for like a stage (`_final_images`); if it stays
        down, a request that asked for its latents still gets them: a Result without
        images, then the error that says the images are missing."""
        try:
            images = await self._final_images(request)
        except ServiceError as error:
            self._end([self.scheduler.finish(request, error)], announced=False)
            if not request.spec.return_latents:
                return error
            missing = ServiceError(error.code, f"images are missing, the latents were sent "
                                   f"in the Result: {error.message}")
            return self._result(request, []), missing
        self._end([self.scheduler.finish(request)])
        return self._result(request, images)

    async def _final_images(self, request: Request) -> list[Any]:
        """The decoder's images, asked again with backoff while the decoder is down, for
        as long as the request may wait: its latents are never lost to a restart."""
        started = time.monotonic()
        for attempt, delay in enumerate(backoff_delays(), start=1):
            left = max(0.0, self._patience([request], started) - time.monotonic())
            try:
                images = await asyncio.wait_for(self.outputs.final_images(request), left)
            except TimeoutError:
                error = ServiceError(StatusCode.UNAVAILABLE, "the decoder did not answer")
            except ServiceError as failure:
                error = failure
            else:
                self.decoder_outage.recovered()
                return images
            await self._wait_out(error, "decoder", self.decoder_outage, [request], started,
                                 attempt, delay, request_id=request.request_id)
        raise AssertionError("unreachable")

    def _result(self, request: Request, images: list[Any]) -> Result:
        return Result(request.x if request.spec.return_latents else None, images,
                      request.started_at - request.admitted_at,
                      request.denoised_at - request.started_at,
                      time.monotonic() - request.denoised_at, request.spec.seed)

    def _end(self, finished: list[Request], announced: bool = True) -> None:
        """Ends the streams of finished requests: their error (unless `announced` is
        False: the stream carries it already), then the end."""
        for request in finished:
            stream = self._streams.pop(request, None)
            self._wait_notices.pop(request, None)
            self._notices.pop(request, None)
            if stream is None:  # ended already
                continue
            outcome = request.error.code.value if request.error else "ok"
            metrics.REQUESTS.labels(outcome).inc()
            log_event("request_finished", request_id=request.request_id, outcome=outcome,
                      steps=request.step)
            if request.error is not None and announced:
                stream.put_nowait(request.error)
            stream.put_nowait(None)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _with_previews(progress: Progress, previews: Awaitable[list[Any]]) -> Progress:
    progress.previews = await previews
    return progress

