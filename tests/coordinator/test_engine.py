"""The engine over an in-process chain: reference parity, determinism under batching,
continuous batching, cancellation, deadlines, admission and retries."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import CoordinatorConfig
from ditserve.coordinator.engine import Engine
from ditserve.coordinator.outputs import OutputMaker
from ditserve.coordinator.scheduler import QueueFull
from ditserve.model import load_dit
from ditserve.sampling import GaussianDiffusion, apply_guidance, make_sampler
from ditserve.sampling.stale import X0_TREND
from ditserve_client.proto.dit.v1 import image_pb2
from numerics import assert_scaled_close, sampling_bound

from .helpers import ModelChain, collect, record_microbatches, spec

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return load_dit(REFERENCE / "tiny_dit_official_keys.safetensors")


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(REFERENCE / "tiny_dit_expected.npz"))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def make_engine(model, delay: float = 0.0, **config) -> tuple[Engine, ModelChain]:
    chain = ModelChain(model, delay)
    settings = {"max_rows_per_microbatch": 16, "microbatches_in_flight": 2,
                "unavailable_grace_seconds": 10.0,
                **config}
    return Engine(chain, model.config, CoordinatorConfig(**settings), num_stages=2), chain


@pytest.mark.parametrize("scale, key", [(4.0, "ddim10_cfg4_latents"), (1.0, "ddim10_cfg1_latents")])
def test_ddim10_matches_the_reference(model, expected, scale, key):
    labels = expected["ddim10_labels"].tolist()

    async def main():
        engine, _ = make_engine(model)
        return await collect(engine, spec(labels, seed=0, steps=10, scale=scale))

    outcome = run(main())
    assert outcome.error is None
    # Latents reach ~360 at the first DDIM steps; rounding is judged against that scale.
    assert_scaled_close(outcome.result.latents, expected[key], sampling_bound(10, scale),
                        f"ddim10 at guidance {scale}")
    assert [p.step for p in outcome.progress] == list(range(1, 11))


def test_same_latents_alone_and_batched_with_others_at_other_steps(model):
    target = spec([1, 7], seed=42, sampler="ddpm", steps=8)
    others = [spec([i % 10], seed=100 + i, sampler=("ddim", "ddpm")[i % 2], steps=6 + i,
                   scale=(1.0, 3.0)[i % 2]) for i in range(7)]

    async def alone():
        engine, _ = make_engine(model)
        return await collect(engine, target)

    async def batched():
        engine, _ = make_engine(model, max_rows_per_microbatch=32)
        log = record_microbatches(engine)
        outcomes = await asyncio.gather(*[collect(engine, s, delay=0.004 * i)
                                          for i, s in enumerate(others)],
                                        collect(engine, target, delay=0.01))
        return outcomes, log

    single = run(alone())
    outcomes, log = run(batched())
    assert all(o.error is None for o in outcomes)
    # Batched with others the GEMMs have other shapes, so other blockings: rounding only.
    assert_scaled_close(outcomes[-1].result.latents, single.result.latents, sampling_bound(8, 4.0),
                        "alone vs batched")
    with_target = [mb for mb in log if any(rid == target.request_id for rid, _ in mb)]
    assert any(len(mb) > 1 for mb in with_target), "the request never shared a microbatch"


@pytest.mark.parametrize("wire, tolerance", [("fp32", sampling_bound(8, 4.0)), ("bf16", 0.02)])
def test_same_latents_through_1_and_3_stages(model, wire, tolerance):
    """Tolerance: largest difference / largest magnitude of the latents. fp32: rounding
    only. bf16 activations between stages (docs/ARCHITECTURE.md §5) round each hop to 8 bits of
    mantissa; this random-weight model amplifies that to ~0.6% after 8 guided ddpm steps
    (its latents grow to ~500), so the documented bf16 bound is 2%."""
    request = spec([2, 5], seed=3, sampler="ddpm", steps=8)

    async def through(stages: int, wire_dtype: str):
        chain = ModelChain(model, stages=stages, wire_dtype=wire_dtype)
        engine = Engine(chain, model.config, CoordinatorConfig(), num_stages=stages)
        return (await collect(engine, request)).result.latents

    one = run(through(1, "fp32"))
    three = run(through(3, wire))
    relative = ((three - one).abs().max() / one.abs().max()).item()
    assert relative <= tolerance
    if wire == "bf16":
        assert relative > 0  # the wire dtype really was bf16


def test_microbatches_mix_requests_at_different_steps(model):
    async def main():
        engine, chain = make_engine(model, delay=0.01)
        log = record_microbatches(engine)
        await asyncio.gather(*[collect(engine, spec([i], seed=i, steps=10), delay=0.03 * i)
                               for i in range(4)])
        return log, chain.calls

    log, calls = run(main())
    mixed = [mb for mb in log if len({step for _, step in mb}) > 1]
    assert mixed, f"no microbatch mixed steps: {log}"
    # t is per row: the chain saw several timesteps in one call.
    assert any(len(set(call["t"])) > 1 for call in calls)


def test_microbatches_respect_max_rows_and_keep_requests_whole(model):
    async def main():
        engine, chain = make_engine(model, max_rows_per_microbatch=6, microbatches_in_flight=3)
        outcomes = await asyncio.gather(*[collect(engine, spec([1, 2], seed=i, steps=3))
                                          for i in range(5)])
        return outcomes, chain.calls

    outcomes, calls = run(main())
    assert all(o.error is None for o in outcomes)
    assert max(call["rows"] for call in calls) <= 6
    assert all(call["rows"] % 4 == 0 for call in calls)  # 2 images x (cond + null) each


def test_keeps_the_pipeline_slots_full(model):
    async def main():
        engine, chain = make_engine(model, delay=0.02, max_rows_per_microbatch=8)
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.in_flight)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*[collect(engine, spec([i], seed=i, steps=5)) for i in range(4)])
        watcher.cancel()
        return peak, chain.calls

    peak, calls = run(main())
    assert peak == 2
    assert len(calls) == 10  # 4 requests x 5 steps in groups of 2: no fragmentation


def test_cancelled_request_stops_within_one_step(model):
    async def main():
        engine, _ = make_engine(model, delay=0.01)
        handle = engine.submit(spec([3], seed=1, steps=50))
        events = handle.events()
        await anext(events)  # accepted
        await anext(events)  # step 1
        handle.cancel()
        steps_at_cancel = handle.steps_used
        with pytest.raises(ServiceError) as failure:
            async for _ in events:
                pass
        await asyncio.sleep(0.1)
        return failure.value, steps_at_cancel, handle.steps_used, engine

    error, at_cancel, final, engine = run(main())
    assert error.code is StatusCode.CANCELLED
    assert final <= at_cancel + 1
    assert engine.scheduler.num_admitted == 0 and engine.scheduler.active_rows == 0


def test_deadline_is_honoured(model):
    async def main():
        engine, _ = make_engine(model, delay=0.01)
        outcome = await collect(engine, spec([3], steps=500, deadline=time.monotonic() + 0.3))
        return outcome

    # No wall-clock bound (the suite runs on loaded machines): the request must stop at a
    # step boundary long before its 500 steps.
    outcome = run(main())
    assert outcome.error.code is StatusCode.DEADLINE_EXCEEDED
    assert 0 < len(outcome.progress) < 500


def test_queue_full_fails_fast_with_a_retry_hint(model):
    async def main():
        engine, _ = make_engine(model, delay=0.01, max_queued_requests=2)
        first = [engine.submit(spec([i], seed=i, steps=3)) for i in range(2)]
        with pytest.raises(QueueFull) as refused:
            engine.submit(spec([5], steps=3))
        for handle in first:
            async for _ in handle.events():
                pass
        # Slots are free again once those finished.
        again = await collect(engine, spec([5], steps=3))
        return refused.value, again

    refused, again = run(main())
    assert refused.code is StatusCode.RESOURCE_EXHAUSTED and refused.retry_after > 0
    assert again.error is None


def test_resumed_requests_have_a_reserve_beyond_the_full_queue(model):
    """After a coordinator restart every client comes back at once: fresh requests fill
    max_queued_requests, and requests sent again (resumed) still get in, up to
    max_resumed_requests more; beyond that they are refused like the others."""
    async def main():
        engine, _ = make_engine(model, delay=0.01, max_queued_requests=2,
                                max_resumed_requests=1)
        admitted = [engine.submit(spec([i], seed=i, steps=3)) for i in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(spec([5], steps=3))
        admitted.append(engine.submit(dataclasses.replace(spec([6], seed=6, steps=3),
                                                          resumed=True)))
        with pytest.raises(QueueFull):
            engine.submit(dataclasses.replace(spec([7], steps=3), resumed=True))
        results = []
        for handle in admitted:
            async for event in handle.events():
                last = event
            results.append(type(last).__name__)
        return results

    assert run(main()) == ["Result", "Result", "Result"]


def test_requests_beyond_capacity_wait_in_the_queue(model):
    async def main():
        engine, _ = make_engine(model, delay=0.005, max_rows_per_microbatch=2,
                                microbatches_in_flight=1)
        handles = [engine.submit(spec([i], seed=i, steps=3)) for i in range(3)]
        firsts = [await anext(h.events()) for h in handles]
        return [f.queue_position for f in firsts], await asyncio.gather(
            *[_drain(h) for h in handles])

    positions, results = run(main())
    assert positions == [0, 1, 2]
    assert results[2].queued_seconds > results[0].queued_seconds


async def _drain(handle):
    result = None
    async for event in handle.events():
        result = event
    return result


def test_unavailable_microbatch_is_retried_transparently(model):
    async def main():
        engine, chain = make_engine(model)
        reference = await collect(engine, spec([4], seed=9, steps=4))
        chain.fail_next(2)
        retried = await collect(engine, spec([4], seed=9, steps=4))
        return reference, retried

    reference, retried = run(main())
    assert retried.error is None
    # A retried microbatch recomputes the same rows in the same shapes: identical.
    assert torch.equal(retried.result.latents, reference.result.latents)


def test_failures_hit_only_the_microbatch_that_failed(model):
    async def main():
        # 2 rows per microbatch: each request (cond + null row) rides alone.
        engine, chain = make_engine(model, max_rows_per_microbatch=2,
                                    unavailable_grace_seconds=0.5)
        chain.poisoned.add("victim")
        return await asyncio.gather(
            collect(engine, spec([1], seed=1, steps=4, request_id="victim")),
            collect(engine, spec([2], seed=2, steps=4, request_id="bystander")))

    victim, bystander = run(main())
    assert victim.error.code is StatusCode.UNAVAILABLE
    assert "stage chain is still unavailable after" in victim.error.message
    assert bystander.error is None and bystander.result is not None


def test_non_finite_latents_fail_only_that_request(model):
    """A guidance scale past the admission bound (specs built here skip that check)
    overflows float32 at the first step. That request fails alone, with a message about
    its own parameters; the one sharing its microbatch finishes."""
    async def main():
        engine, chain = make_engine(model, microbatches_in_flight=1)
        outcomes = await asyncio.gather(
            collect(engine, spec([1], seed=1, steps=4, scale=1e38, request_id="victim")),
            collect(engine, spec([2], seed=2, steps=4, request_id="bystander")))
        return outcomes, chain.calls

    (victim, bystander), calls = run(main())
    assert calls[0]["ids"] == ["victim", "bystander"]  # they shared a microbatch
    assert victim.error.code is StatusCode.INVALID_ARGUMENT
    assert "request victim" in victim.error.message
    assert "guidance scale 1e+38" in victim.error.message
    assert bystander.error is None and len(bystander.progress) == 4
    assert bool(torch.isfinite(bystander.result.latents).all())


def test_non_retryable_error_fails_its_requests_at_once(model):
    async def main():
        engine, chain = make_engine(model)
        chain.fail_next(1, StatusCode.INVALID_ARGUMENT)
        failed = await collect(engine, spec([1], steps=3))
        return failed, len(chain.calls)

    failed, calls = run(main())
    assert failed.error.code is StatusCode.INVALID_ARGUMENT and calls == 1


def test_a_bug_in_a_step_fails_its_requests_and_the_engine_serves_on(model):
    from ditserve.sampling import make_sampler

    def sampler_factory(name: str, steps: int):
        sampler = make_sampler(name, steps)
        if steps == 3:  # the broken request's sampler
            def broken(*args, **kwargs):
                raise RuntimeError("sampler bug")
            sampler.step = broken
        return sampler

    async def main():
        chain = ModelChain(model)
        engine = Engine(chain, model.config, CoordinatorConfig(), 1,
                        sampler_factory=sampler_factory)
        broken = await collect(engine, spec([1], steps=3))
        fine = await collect(engine, spec([2], steps=4))
        return broken, fine, engine

    broken, fine, engine = run(main())
    assert broken.error.code is StatusCode.INTERNAL and "sampler bug" in broken.error.message
    assert fine.error is None and len(fine.progress) == 4
    assert engine.scheduler.num_admitted == 0


class SlowDecoder:
    """A decoder taking 0.3 s per call, recording what it was asked."""

    def __init__(self):
        self.calls: list[tuple[tuple[int, ...], list[int]]] = []

    async def decode(self, latents, fmt, quality, labels):
        self.calls.append((tuple(latents.shape), list(labels)))
        await asyncio.sleep(0.3)
        return [image_pb2.Image(data=b"img", format=fmt, class_label=label) for label in labels]


def test_decoding_overlaps_the_denoising_of_others(model):
    async def main():
        decoder = SlowDecoder()
        chain = ModelChain(model, delay=0.01)
        engine = Engine(chain, model.config, CoordinatorConfig(), 1, OutputMaker(decoder))
        stamps: list[float] = []

        async def watch_long():
            async for _ in engine.submit(spec([1], seed=1, steps=40)).events():
                stamps.append(time.monotonic())

        long_task = asyncio.create_task(watch_long())
        short = await collect(engine, spec([2, 3], seed=2, steps=2, skip_images=False))
        finished_at = time.monotonic()
        await long_task
        return short, decoder.calls, stamps, finished_at

    short, calls, stamps, finished_at = run(main())
    assert calls == [((2, 4, 8, 8), [2, 3])]
    assert [image.class_label for image in short.result.images] == [2, 3]
    assert short.result.decoding_seconds >= 0.3
    during = [s for s in stamps if finished_at - 0.3 <= s <= finished_at]
    assert len(during) >= 3, "the other request stopped stepping while one was decoding"


def test_approximate_previews_every_k_steps(model):
    async def main():
        engine, _ = make_engine(model)
        return await collect(engine, spec([1, 2], steps=6, preview="approximate",
                                          preview_every=3))

    outcome = run(main())
    assert [len(p.previews) for p in outcome.progress] == [0, 0, 2, 0, 0, 2]
    assert outcome.progress[2].previews[0].width == 64  # 8x8 latents, VAE factor 8
    assert outcome.progress[-1].eta_seconds == 0.0


# -- async mode ---------------------------------------------------------------------------


def _async(labels, seed, warmup=0, **fields):
    return spec(labels, seed=seed, mode="async", async_warmup_steps=warmup, **fields)


def test_async_is_deterministic_alone_and_beside_exact_and_async_requests(model):
    """An async request rides alone in its calls and uses each output for the step it was
    sent for, so nothing else served changes its latents, not even rounding."""
    target = _async([1, 7], seed=42, warmup=1, sampler="ddpm", steps=8)
    others = [spec([i], seed=100 + i, steps=5 + i) for i in range(3)] + [
        _async([i], seed=200 + i, warmup=i, steps=6) for i in range(3)]

    async def alone():
        engine, _ = make_engine(model, delay=0.002)
        return await collect(engine, target)

    async def beside():
        engine, _ = make_engine(model, delay=0.002, max_rows_per_microbatch=32)
        outcomes = await asyncio.gather(*[collect(engine, s, delay=0.003 * i)
                                          for i, s in enumerate(others)],
                                        collect(engine, target, delay=0.005))
        return outcomes

    single = run(alone())
    outcomes = run(beside())
    assert single.error is None and all(o.error is None for o in outcomes)
    assert torch.equal(outcomes[-1].result.latents, single.result.latents)
    assert [p.step for p in single.progress] == list(range(1, 9))


def test_exact_requests_beside_async_ones_are_unchanged(model):
    exact = spec([3], seed=5, steps=6)

    async def main(with_async: bool):
        engine, _ = make_engine(model, max_rows_per_microbatch=2)  # each request alone
        extra = [collect(engine, _async([4], seed=6, steps=6))] if with_async else []
        return (await asyncio.gather(collect(engine, exact), *extra))[0]

    alone, beside = run(main(False)), run(main(True))
    assert torch.equal(beside.result.latents, alone.result.latents)


def test_async_runs_stale_steps_and_stays_near_exact(model):
    """Over 2 stages each step uses the output of the latents one step before: not the
    exact latents, but close to them; with warm-up covering every step, exact."""
    async def main(**fields):
        engine, _ = make_engine(model)  # 2 stages: calls for 2 steps in flight
        return (await collect(engine, spec([2, 5], seed=3, steps=10, **fields))).result.latents

    exact = run(main())
    stale = run(main(mode="async", async_warmup_steps=2))
    all_warmup = run(main(mode="async", async_warmup_steps=10))
    assert torch.equal(all_warmup, exact)
    distance = ((stale - exact).abs().max() / exact.abs().max()).item()
    assert 0 < distance < 0.5


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm-solver++"])
def test_async_latents_follow_the_schedule_written_out(model, sampler):
    """The engine's async latents equal the schedule written out by hand: step s uses the
    model output of x_r, r = max(W, s - D + 1), called at r's timestep, restated for x_s:
    its x0 prediction moved on by X0_TREND x (s - r) x its change since x_{r-1}'s
    (docs/ARCHITECTURE.md §4, "Modes")."""
    steps, warmup, depth, labels = 9, 2, 2, [2, 5]

    async def main():
        engine, _ = make_engine(model)  # 2 stages, 2 slots: D = 2
        return await collect(engine, _async(labels, seed=11, warmup=warmup, sampler=sampler,
                                            steps=steps))

    outcome = run(main())
    assert outcome.error is None
    base, n, channels = GaussianDiffusion.create(), len(labels), model.config.in_channels
    scheduler = make_sampler(sampler, steps)
    generator = torch.Generator("cpu").manual_seed(11)
    size = model.config.input_size
    xs = [torch.randn((n, channels, size, size), generator=generator)]
    y = torch.tensor(labels + [model.config.num_classes] * n)
    x0s = {}  # x0 predictions by the step of the latents they were computed for
    for s in range(steps):
        r = s if s < warmup else max(warmup, s - depth + 1)
        t_r, t_s = scheduler.model_timestep(r), scheduler.model_timestep(s)
        with torch.no_grad():
            out = model(torch.cat([xs[r], xs[r]]), torch.full((2 * n,), t_r), y)
        eps = apply_guidance(out[:n], out[n:], 4.0, "first3", channels)
        x0 = x0s[r] = base.predict_xstart_from_eps(xs[r], torch.full((n,), t_r),
                                                   eps[:, :channels])
        if r != s:
            if r - 1 in x0s:
                x0 = x0 + X0_TREND * (s - r) * (x0 - x0s[r - 1])
            eps = torch.cat([base.predict_eps_from_xstart(xs[s], torch.full((n,), t_s), x0),
                             eps[:, channels:]], dim=1)
        xs.append(scheduler.step(s, xs[s], eps, generator).prev_sample)
    assert_scaled_close(outcome.result.latents, xs[-1], sampling_bound(steps, 4.0),
                        f"async {sampler} vs the schedule written out")


def test_async_calls_survive_retries_with_the_same_latents(model):
    async def main(failures: int):
        engine, chain = make_engine(model)
        chain.fail_next(failures)
        return await collect(engine, _async([4], seed=9, steps=6))

    reference, retried = run(main(0)), run(main(3))
    assert retried.error is None
    assert torch.equal(retried.result.latents, reference.result.latents)


def test_a_cancelled_async_request_stops_with_calls_in_flight(model):
    async def main():
        engine, _ = make_engine(model, delay=0.05)
        handle = engine.submit(_async([1], seed=1, steps=50))
        seen = 0
        with pytest.raises(ServiceError) as stopped:
            async for _ in handle.events():
                seen += 1
                if seen == 3:
                    handle.cancel()
        await asyncio.sleep(0.2)  # the calls still in flight come back and are ignored
        return stopped.value, handle, engine

    error, handle, engine = run(main())
    assert error.code is StatusCode.CANCELLED
    assert handle.steps_used < 10 and engine.scheduler.num_admitted == 0
