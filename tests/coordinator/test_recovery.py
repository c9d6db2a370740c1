"""The engine waiting out peers that are down, frozen or overloaded (coordinator/recovery.py):
bounded by time, not attempts; decoding retried like a microbatch; latents never lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import CoordinatorConfig
from ditserve.coordinator import engine as engine_module
from ditserve.coordinator import recovery
from ditserve.coordinator.engine import Engine
from ditserve.coordinator.outputs import OutputMaker
from ditserve.coordinator.recovery import RoundTrips
from ditserve.model import load_dit
from ditserve_client.proto.dit.v1 import image_pb2

from .helpers import ModelChain, collect, spec

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"


@pytest.fixture(scope="module")
def model():
    return load_dit(REFERENCE / "tiny_dit_official_keys.safetensors")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(recovery, "RETRY_BASE_SECONDS", 0.01)
    monkeypatch.setattr(recovery, "RETRY_MAX_SECONDS", 0.02)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def make_engine(model, decoder=None, chain=None, **config) -> tuple[Engine, ModelChain]:
    chain = chain or ModelChain(model)
    settings = {"max_rows_per_microbatch": 16, "microbatches_in_flight": 2, **config}
    return Engine(chain, model.config, CoordinatorConfig(**settings), num_stages=2,
                  outputs=OutputMaker(decoder)), chain


class FlakyDecoder:
    """Fails its first `failures` calls with `code`, then decodes."""

    def __init__(self, failures: int, code: StatusCode = StatusCode.UNAVAILABLE):
        self.failures, self.code, self.calls = failures, code, 0

    async def decode(self, latents, fmt, quality, labels):
        self.calls += 1
        if self.calls <= self.failures:
            raise ServiceError(self.code, "decoder down (injected)")
        return [image_pb2.Image(data=b"img", format=fmt, class_label=label) for label in labels]


class FreezingChain(ModelChain):
    """Hangs (a SIGSTOPped stage) on call number `freeze_at`, answers every other one."""

    def __init__(self, model, freeze_at: int):
        super().__init__(model)
        self.freeze_at = freeze_at

    async def forward(self, x, t, y, request_ids=()):
        if len(self.calls) + 1 == self.freeze_at:
            self.calls.append({"ids": list(request_ids), "frozen": True})
            await asyncio.sleep(3600)
        return await super().forward(x, t, y, request_ids)


def test_many_failures_are_waited_out_while_the_grace_lasts(model):
    """20 failures in a row (the old budget was 5 retries) and the request still finishes
    with the latents of an undisturbed run."""
    async def main():
        engine, chain = make_engine(model, unavailable_grace_seconds=30.0)
        reference = await collect(engine, spec([4], seed=9, steps=3))
        chain.fail_next(20)
        retried = await collect(engine, spec([4], seed=9, steps=3))
        return reference, retried, engine

    reference, retried, engine = run(main())
    assert retried.error is None
    assert torch.equal(retried.result.latents, reference.result.latents)
    assert not engine.chain_outage.down


def test_overload_is_waited_out_and_invalid_argument_is_not(model):
    async def main():
        engine, chain = make_engine(model)
        chain.fail_next(3, StatusCode.RESOURCE_EXHAUSTED)
        overloaded = await collect(engine, spec([1], steps=2))
        calls = len(chain.calls)
        chain.fail_next(1, StatusCode.INVALID_ARGUMENT)
        invalid = await collect(engine, spec([1], steps=2))
        return overloaded, calls, invalid, len(chain.calls) - calls

    overloaded, calls, invalid, invalid_calls = run(main())
    assert overloaded.error is None and calls == 5
    assert invalid.error.code is StatusCode.INVALID_ARGUMENT and invalid_calls == 1


def test_the_wait_ends_after_the_grace(model):
    async def main():
        engine, chain = make_engine(model, unavailable_grace_seconds=0.3)
        chain.fail_next(10_000)
        started = time.monotonic()
        outcome = await collect(engine, spec([1], steps=2))
        return outcome, time.monotonic() - started

    outcome, seconds = run(main())
    assert outcome.error.code is StatusCode.UNAVAILABLE
    assert "stage chain is still unavailable after" in outcome.error.message
    assert seconds < 10


def test_the_wait_ends_at_the_requests_deadline(model):
    async def main():
        engine, chain = make_engine(model, unavailable_grace_seconds=600.0)
        chain.fail_next(10_000)
        outcome = await collect(engine, spec([1], steps=2, deadline=time.monotonic() + 0.5))
        return outcome

    outcome = run(main())
    assert outcome.error.code in (StatusCode.DEADLINE_EXCEEDED, StatusCode.UNAVAILABLE)


class StallingChain(ModelChain):
    """Down: the first call fails at once, each later one only after an hour (a hop that
    waits for a stream to a stage that does not come back)."""

    async def forward(self, x, t, y, request_ids=()):
        self.calls.append({"ids": list(request_ids)})
        if len(self.calls) > 1:
            await asyncio.sleep(3600)
        raise ServiceError(StatusCode.UNAVAILABLE, "stage-1 at A is unreachable (refused)")


def test_a_stalled_attempt_ends_before_the_deadline_with_the_reason(model):
    """The client must hear why the chain failed before its own deadline passes: an attempt
    in an outage may not outlast the request's patience (less a margin)."""
    async def main():
        engine, _ = make_engine(model, chain=StallingChain(model),
                                unavailable_grace_seconds=600.0)
        deadline = time.monotonic() + 1.5
        outcome = await collect(engine, spec([1], steps=2, deadline=deadline))
        return outcome, deadline - time.monotonic()

    outcome, early = asyncio.run(asyncio.wait_for(main(), 30))
    assert outcome.error.code is StatusCode.UNAVAILABLE
    assert "stage chain is still unavailable after" in outcome.error.message
    assert "stage-1 at A is unreachable (refused)" in outcome.error.message
    assert early > 0  # answered before the deadline (by the margin, 0.5 s)


def test_a_cancelled_request_stops_waiting(model):
    async def main():
        engine, chain = make_engine(model, unavailable_grace_seconds=600.0)
        chain.fail_next(10_000)
        handle = engine.submit(spec([1], steps=2))
        asyncio.get_running_loop().call_later(0.3, handle.cancel)
        with pytest.raises(ServiceError) as failure:
            async for _ in handle.events():
                pass
        return failure.value

    assert run(main()).code is StatusCode.CANCELLED


def test_a_frozen_chain_is_found_by_the_microbatch_deadline(model):
    """The third call never returns: after max(floor, 10x p99) it is resent and the
    request finishes with the undisturbed latents."""
    async def main():
        engine, _ = make_engine(model, microbatches_in_flight=1)
        reference = await collect(engine, spec([2], seed=3, steps=4))
        chain = FreezingChain(model, freeze_at=3)
        engine, _ = make_engine(model, chain=chain, microbatches_in_flight=1,
                                microbatch_timeout_seconds=0.2)
        engine.round_trips.add(0.001)  # measured: the first calls were quick
        started = time.monotonic()
        frozen = await collect(engine, spec([2], seed=3, steps=4))
        return reference, frozen, chain.calls, time.monotonic() - started

    reference, frozen, calls, seconds = run(main())
    assert frozen.error is None
    assert torch.equal(frozen.result.latents, reference.result.latents)
    assert calls[2].get("frozen") and len(calls) == 5
    assert seconds < 30


def test_round_trip_limit_follows_the_p99():
    trips = RoundTrips(floor_seconds=5.0)
    assert trips.timeout() == 60.0  # nothing measured yet
    for _ in range(99):
        trips.add(0.1)
    assert trips.timeout() == 5.0  # 10 x 0.1 s is under the floor
    for _ in range(10):
        trips.add(2.0)
    assert trips.timeout() == 20.0


def test_decoding_waits_for_the_decoder_to_come_back(model):
    async def main():
        decoder = FlakyDecoder(failures=6)
        engine, _ = make_engine(model, decoder)
        outcome = await collect(engine, spec([1, 2], steps=2, skip_images=False))
        return outcome, decoder.calls, engine

    outcome, calls, engine = run(main())
    assert outcome.error is None and calls == 7
    assert [image.class_label for image in outcome.result.images] == [1, 2]
    assert not engine.decoder_outage.down


def test_latents_are_kept_when_the_decoder_stays_down(model):
    """Past the grace the request fails, but one that asked for its latents gets them
    first: a Result without images, then the error saying so."""
    async def main():
        engine, _ = make_engine(model, FlakyDecoder(failures=10_000),
                                unavailable_grace_seconds=0.3)
        reference = await collect(engine, spec([1], seed=4, steps=2))
        handle = engine.submit(spec([1], seed=4, steps=2, skip_images=False))
        results = []
        with pytest.raises(ServiceError) as failure:
            async for event in handle.events():
                results.append(event)
        return reference, results[-1], failure.value

    reference, result, error = run(main())
    assert result.images == [] and torch.equal(result.latents, reference.result.latents)
    assert error.code is StatusCode.UNAVAILABLE and "images are missing" in error.message


def test_without_latents_asked_the_decoder_failure_is_the_error(model):
    async def main():
        engine, _ = make_engine(model, FlakyDecoder(failures=10_000),
                                unavailable_grace_seconds=0.2)
        return await collect(engine, spec([1], steps=2, skip_images=False,
                                          return_latents=False))

    outcome = run(main())
    assert outcome.result is None and outcome.error.code is StatusCode.UNAVAILABLE
    assert "decoder is still unavailable" in outcome.error.message


def _notices_and_steps(outcome) -> tuple[list, list[int]]:
    notices = [p for p in outcome.progress if p.waiting_on]
    return notices, [p.step for p in outcome.progress if not p.waiting_on]


def test_a_stalled_request_is_told_what_it_waits_on(model, monkeypatch):
    """Not a silent stream: a notice (a Progress with `waiting_on`) when the wait starts,
    then every WAIT_NOTICE_SECONDS; the steps themselves are unchanged."""
    monkeypatch.setattr(engine_module, "WAIT_NOTICE_SECONDS", 0.05)

    async def main():
        engine, chain = make_engine(model, unavailable_grace_seconds=30.0)
        chain.fail_next(25)  # ~0.4 s of waiting at 0.01-0.02 s backoff
        return await collect(engine, spec([4], seed=9, steps=3))

    outcome = run(main())
    notices, steps = _notices_and_steps(outcome)
    assert outcome.error is None and steps == [1, 2, 3]
    assert len(notices) >= 2  # the start of the wait, then repeated while it lasts
    assert {n.waiting_on for n in notices} == {"stage chain"}
    assert all("injected" in n.waiting_reason and n.step == 0 and not n.previews
               for n in notices)
    assert notices[-1].waiting_seconds > notices[0].waiting_seconds


def test_a_request_waiting_on_the_decoder_is_told_before_its_result(model, monkeypatch):
    """The decode is a task the stream waits on: notices must not queue behind it."""
    monkeypatch.setattr(engine_module, "WAIT_NOTICE_SECONDS", 0.0)

    async def main():
        engine, _ = make_engine(model, FlakyDecoder(failures=4), unavailable_grace_seconds=30)
        events = []
        async for event in engine.submit(spec([1], steps=2, skip_images=False)).events():
            events.append(event)
        return events

    events = run(main())
    waiting = [i for i, e in enumerate(events) if getattr(e, "waiting_on", "")]
    assert waiting and all(events[i].waiting_on == "decoder" and events[i].step == 2
                           for i in waiting)
    assert waiting[-1] < len(events) - 1 and events[-1].images  # all before the Result
