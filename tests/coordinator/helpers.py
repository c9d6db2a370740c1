"""Helpers of the coordinator tests: an instrumented chain wrapper, a microbatch recorder
and request runners."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from ditserve.chain import ChainOutput, LocalChain
from ditserve.common.status import ServiceError, StatusCode
from ditserve.coordinator.engine import Engine
from ditserve.coordinator.request import Progress, Result
from ditserve.coordinator.scheduler import SchedulerOutput
from ditserve.coordinator.spec import GenerationSpec
from ditserve.model import DiT


class ModelChain:
    """The real in-process LocalChain over a whole DiT, wrapped to record every call, add
    latency and fail calls on purpose."""

    def __init__(self, model: DiT, delay: float = 0.0, stages: int = 1,
                 wire_dtype: str = "fp32"):
        self.inner = LocalChain.from_model(model, stages=stages, wire_dtype=wire_dtype)
        self.delay = delay
        self.calls: list[dict] = []
        self.failures: list[ServiceError] = []
        self.poisoned: set[str] = set()
        """Every call holding one of these request ids fails UNAVAILABLE."""

    async def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      request_ids: Sequence[str] = ()) -> ChainOutput:
        self.calls.append({"ids": list(request_ids), "t": t.tolist(), "rows": len(t),
                           "at": time.monotonic()})
        if self.failures:
            raise self.failures.pop(0)
        if self.poisoned & set(request_ids):
            raise ServiceError(StatusCode.UNAVAILABLE, "injected failure of a poisoned request")
        if self.delay:
            await asyncio.sleep(self.delay)
        return await self.inner.forward(x, t, y, request_ids)

    def fail_next(self, count: int, code: StatusCode = StatusCode.UNAVAILABLE) -> None:
        self.failures += [ServiceError(code, "injected failure")] * count

    async def describe(self) -> list:
        return await self.inner.describe()

    async def close(self) -> None:
        await self.inner.close()


def record_microbatches(engine: Engine) -> list[list[tuple[str, int]]]:
    """Records every microbatch the engine's scheduler plans, as [(request_id, step), ...]
    (the step each request is at), by wrapping `schedule` from the outside."""
    log: list[list[tuple[str, int]]] = []
    schedule = engine.scheduler.schedule

    def recorded(free_slots: int, now: float) -> SchedulerOutput:
        planned = schedule(free_slots, now)
        log.extend([(r.request_id, r.step) for r in mb.requests] for mb in planned.microbatches)
        return planned

    engine.scheduler.schedule = recorded
    return log


def spec(labels: Sequence[int], seed: int = 0, sampler: str = "ddim", steps: int = 6,
         scale: float = 4.0, request_id: str = "", **extra) -> GenerationSpec:
    fields = {"skip_images": True, "return_latents": True, **extra}
    return GenerationSpec(request_id=request_id or f"r{seed}-{sampler}-{steps}",
                          labels=tuple(labels), seed=seed, sampler=sampler, num_steps=steps,
                          guidance_scale=scale, **fields)


@dataclass
class Outcome:
    """What one request's stream produced."""

    progress: list[Progress] = field(default_factory=list)
    result: Result | None = None
    error: ServiceError | None = None


async def collect(engine: Engine, request: GenerationSpec, delay: float = 0.0) -> Outcome:
    """Submits after `delay` seconds and reads the whole stream."""
    await asyncio.sleep(delay)
    outcome = Outcome()
    try:
        async for event in engine.submit(request).events():
            if isinstance(event, Progress):
                outcome.progress.append(event)
            elif isinstance(event, Result):
                outcome.result = event
    except ServiceError as error:
        outcome.error = error
    return outcome
