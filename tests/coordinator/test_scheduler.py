"""The Scheduler alone: no event loop, no network, no clock (the time is an argument).

Direct tests of admission, FIFO start, microbatch layout, stepping, stopping and
decoding, then a property-based state machine that drives it with random arrivals,
cancellations, deadlines, failures and non-finite outputs and checks its invariants
after every step.
"""

from __future__ import annotations

import pytest
import torch
from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import CoordinatorConfig
from ditserve.coordinator.request import Request, RequestStatus
from ditserve.coordinator.scheduler import Microbatch, QueueFull, Scheduler
from ditserve.coordinator.spec import GenerationSpec
from ditserve.model import DiTConfig
from ditserve.sampling import make_sampler
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

MODEL = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                  num_heads=2, num_classes=10)
"""Only the shapes matter: the scheduler never runs the model."""


def _scheduler(max_rows: int = 4, slots: int = 2, queue: int = 8, stages: int = 1) -> Scheduler:
    config = CoordinatorConfig(max_rows_per_microbatch=max_rows, max_queued_requests=queue)
    return Scheduler(MODEL, config, slots, make_sampler, stages=stages)


def _spec(name: str, images: int = 1, steps: int = 3, guided: bool = True,
          deadline: float | None = None, warmup: int | None = None) -> GenerationSpec:
    """An exact request, or an async one with `warmup` exact steps."""
    return GenerationSpec(request_id=name, labels=tuple(range(images)), seed=len(name),
                          sampler="ddim", num_steps=steps,
                          guidance_scale=4.0 if guided else 1.0, deadline=deadline,
                          skip_images=True, mode="exact" if warmup is None else "async",
                          async_warmup_steps=warmup or 0)


def _output(microbatch: Microbatch) -> torch.Tensor:
    """A model output (N, C_out, L, L) of zeros: eps = 0, a finite step."""
    return torch.zeros(len(microbatch.t), MODEL.out_channels, MODEL.input_size,
                       MODEL.input_size)


def test_counts_are_derived_from_the_sets():
    scheduler = _scheduler(max_rows=2, slots=1)  # capacity: 2 rows, one guided image
    first, second = (scheduler.add(_spec(n), now=0.0) for n in ("a", "b"))
    assert scheduler.num_admitted == 2 and list(scheduler.waiting) == [first, second]
    planned = scheduler.schedule(free_slots=1, now=1.0)
    assert [mb.requests for mb in planned.microbatches] == [[first]]
    assert first.status is RequestStatus.RUNNING and first.started_at == 1.0
    assert second.status is RequestStatus.WAITING  # its 2 rows do not fit beside a's 2
    assert scheduler.active_rows == 2 and scheduler.in_flight == {first}
    assert scheduler.num_admitted == 2


def test_queue_full_refuses_at_once_with_a_retry_hint():
    scheduler = _scheduler(queue=2)
    scheduler.add(_spec("a"), 0.0)
    scheduler.add(_spec("b"), 0.0)
    with pytest.raises(QueueFull) as refused:
        scheduler.add(_spec("c"), 0.0)
    assert refused.value.code is StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.retry_after > 0


def test_a_request_larger_than_the_capacity_still_runs_alone():
    scheduler = _scheduler(max_rows=4, slots=1)
    big = scheduler.add(_spec("big", images=2), 0.0)  # 4 rows = all the capacity
    small = scheduler.add(_spec("small"), 0.0)
    planned = scheduler.schedule(1, 0.0)
    assert [mb.requests for mb in planned.microbatches] == [[big]]
    assert small.status is RequestStatus.WAITING


def test_microbatch_layout_conditional_then_null_rows_one_timestep_per_row():
    scheduler = _scheduler(max_rows=8, slots=1)
    guided = scheduler.add(_spec("g", images=2, steps=4), 0.0)
    plain = scheduler.add(_spec("p", images=1, steps=2, guided=False), 0.0)
    (microbatch,) = scheduler.schedule(1, 0.0).microbatches
    assert microbatch.requests == [guided, plain] and microbatch.offsets == [0, 4]
    assert microbatch.y.tolist() == [0, 1, 10, 10, 0]  # 10 = the null class
    t_guided, t_plain = (r.sampler.model_timestep(0) for r in (guided, plain))
    assert microbatch.t.tolist() == [t_guided] * 4 + [t_plain]
    torch.testing.assert_close(microbatch.x[:2], guided.x, rtol=0, atol=0)
    torch.testing.assert_close(microbatch.x[2:4], guided.x, rtol=0, atol=0)


def test_update_steps_each_request_once_then_it_decodes():
    scheduler = _scheduler()
    request = scheduler.add(_spec("a", steps=2), 0.0)
    for step in (1, 2):
        (microbatch,) = scheduler.schedule(2, float(step)).microbatches
        updated = scheduler.update(microbatch, _output(microbatch), float(step))
        assert [s.request for s in updated.stepped] == [request] and not updated.finished
        assert request.step == step and request.steps_used == step
    assert request.status is RequestStatus.DECODING and request.denoised_at == 2.0
    assert scheduler.active_rows == 0 and scheduler.num_admitted == 1
    scheduler.finish(request)
    assert request.status is RequestStatus.FINISHED and request.error is None
    assert scheduler.num_admitted == 0


def test_stop_takes_effect_at_the_next_step_boundary():
    scheduler = _scheduler(max_rows=2, slots=1)
    running = scheduler.add(_spec("run"), 0.0)
    waiting = scheduler.add(_spec("wait"), 0.0)
    (microbatch,) = scheduler.schedule(1, 0.0).microbatches
    scheduler.stop(running, StatusCode.CANCELLED)
    scheduler.stop(waiting, StatusCode.CANCELLED)
    assert running.status is RequestStatus.RUNNING  # in flight: it finishes its step
    retired = scheduler.schedule(1, 0.0).finished
    assert retired == [waiting] and waiting.error.code is StatusCode.CANCELLED
    updated = scheduler.update(microbatch, _output(microbatch), 0.0)
    assert updated.finished == [running] and not updated.stepped
    assert running.error.code is StatusCode.CANCELLED and scheduler.num_admitted == 0


def test_deadline_is_checked_against_the_time_given():
    scheduler = _scheduler()
    request = scheduler.add(_spec("late", steps=50, deadline=5.0), 0.0)
    (microbatch,) = scheduler.schedule(2, 1.0).microbatches
    assert not scheduler.update(microbatch, _output(microbatch), 4.9).finished
    assert scheduler.schedule(2, 5.0).finished == [request]
    assert request.error.code is StatusCode.DEADLINE_EXCEEDED
    assert "at step 1 of 50" in request.error.message


def test_non_finite_latents_fail_only_their_request_naming_its_parameters():
    scheduler = _scheduler(max_rows=8, slots=1)
    victim = scheduler.add(_spec("victim"), 0.0)
    bystander = scheduler.add(_spec("bystander"), 0.0)
    (microbatch,) = scheduler.schedule(1, 0.0).microbatches
    out = _output(microbatch)
    out[0] = float("inf")  # the victim's conditional row
    updated = scheduler.update(microbatch, out, 0.0)
    assert updated.finished == [victim] and [s.request for s in updated.stepped] == [bystander]
    assert victim.error.code is StatusCode.INVALID_ARGUMENT
    assert "request victim" in victim.error.message
    assert "guidance scale 4" in victim.error.message and "seed 6" in victim.error.message
    assert bool(torch.isfinite(bystander.x).all())


def test_fail_ends_every_request_of_the_microbatch_and_frees_its_rows():
    scheduler = _scheduler(max_rows=8, slots=1)
    requests = [scheduler.add(_spec(n), 0.0) for n in ("a", "b")]
    (microbatch,) = scheduler.schedule(1, 0.0).microbatches
    error = ServiceError(StatusCode.UNAVAILABLE, "chain down")
    assert scheduler.fail(microbatch, error).finished == requests
    assert all(r.error is error for r in requests) and scheduler.num_admitted == 0


# -- async mode ---------------------------------------------------------------------------


def _calls(planned) -> list[tuple[int, int]]:
    """(step the output is for, model timestep carried) of each planned microbatch."""
    return [(mb.step, int(mb.t[0])) for mb in planned.microbatches]


def _answer(scheduler: Scheduler, microbatch: Microbatch, now: float = 0.0):
    return scheduler.update(microbatch, _output(microbatch), now)


def test_async_warms_up_exact_then_keeps_one_call_per_stage_in_flight():
    scheduler = _scheduler(max_rows=4, slots=3, stages=3)
    request = scheduler.add(_spec("a", steps=8, warmup=2), 0.0)
    t = request.sampler.model_timestep
    for step in (0, 1):  # warm-up: one exact call at a time, for its own step
        planned = scheduler.schedule(3, 0.0)
        assert _calls(planned) == [(step, t(step))]
        _answer(scheduler, planned.microbatches[0])
    # Step 2 = W: the latents x_2 go out for steps 2, 3 and 4, all at x_2's timestep.
    planned = scheduler.schedule(3, 0.0)
    assert _calls(planned) == [(2, t(2)), (3, t(2)), (4, t(2))]
    x2 = request.x
    for microbatch in planned.microbatches:
        torch.testing.assert_close(microbatch.x[:1], x2, rtol=0, atol=0)
        assert microbatch.requests == [request]
    assert scheduler.schedule(3, 0.0).microbatches == []  # nothing more until one returns
    first, *rest = planned.microbatches
    _answer(scheduler, first)  # step 2 taken with x_2's output; x_3 goes out for step 5
    assert request.step == 3 and request.pipeline.in_flight == 2
    (fifth,) = scheduler.schedule(3, 0.0).microbatches
    assert (fifth.step, int(fifth.t[0])) == (5, t(3))
    for microbatch in [*rest, fifth]:
        _answer(scheduler, microbatch)
    assert request.step == 6
    # Steps 6 and 7 were sent with x_4 and x_5; nothing is sent past the last step.
    calls = scheduler.schedule(3, 0.0).microbatches
    assert [(mb.step, int(mb.t[0])) for mb in calls] == [(6, t(4)), (7, t(5))]
    for microbatch in calls:
        _answer(scheduler, microbatch)
    assert request.status is RequestStatus.DECODING and request.steps_used == 8
    assert request.pipeline.in_flight == 0 and not scheduler.pipelined


def test_async_outputs_are_used_by_their_step_not_by_arrival():
    scheduler = _scheduler(slots=2, stages=2)
    request = scheduler.add(_spec("a", steps=4, warmup=0), 0.0)
    first, second = scheduler.schedule(2, 0.0).microbatches
    assert (first.step, second.step) == (0, 1)
    early = _answer(scheduler, second)  # step 1's output before step 0's: it waits
    assert not early.stepped and request.step == 0 and list(request.pipeline.arrived) == [1]
    late = _answer(scheduler, first)
    assert [s.timestep for s in late.stepped] == [request.sampler.model_timestep(i)
                                                  for i in (0, 1)]
    assert request.step == 2 and not request.pipeline.arrived


def test_async_over_one_stage_plans_exactly_the_exact_calls():
    exact, pipelined = _scheduler(stages=1), _scheduler(stages=1)
    a = exact.add(_spec("a", steps=4), 0.0)
    b = pipelined.add(_spec("a", steps=4, warmup=0), 0.0)
    for _ in range(4):
        (mb_a,) = exact.schedule(2, 0.0).microbatches
        (mb_b,) = pipelined.schedule(2, 0.0).microbatches
        assert torch.equal(mb_a.x, mb_b.x) and torch.equal(mb_a.t, mb_b.t)
        _answer(exact, mb_a)
        _answer(pipelined, mb_b)
    assert torch.equal(a.x, b.x)


def test_exact_and_async_share_the_slots_and_never_share_a_microbatch():
    scheduler = _scheduler(max_rows=8, slots=2, stages=2)
    exact = scheduler.add(_spec("exact", steps=4), 0.0)
    pipelined = scheduler.add(_spec("async", steps=4, warmup=0), 0.0)
    planned = scheduler.schedule(2, 0.0).microbatches
    assert sorted(mb.step is None for mb in planned) == [False, True]  # one slot each
    assert all(len(mb.requests) == 1 for mb in planned)
    assert {r for mb in planned for r in mb.requests} == {exact, pipelined}
    assert scheduler.active_rows == 2 + 2 * 2  # the async request holds a row pair per call


def test_a_stopped_async_request_ends_at_once_and_late_outputs_are_ignored():
    scheduler = _scheduler(slots=2, stages=2)
    request = scheduler.add(_spec("a", steps=6, warmup=0), 0.0)
    calls = scheduler.schedule(2, 0.0).microbatches
    scheduler.stop(request, StatusCode.CANCELLED)
    assert scheduler.schedule(2, 0.0).finished == [request]
    assert request.error.code is StatusCode.CANCELLED and scheduler.num_admitted == 0
    for microbatch in calls:
        updated = _answer(scheduler, microbatch)
        assert not updated.stepped and not updated.finished
    assert request.step == 0 and not request.pipeline.arrived


def test_a_failed_async_call_fails_its_request_only_once():
    scheduler = _scheduler(slots=2, stages=2)
    request = scheduler.add(_spec("a", steps=6, warmup=0), 0.0)
    first, second = scheduler.schedule(2, 0.0).microbatches
    error = ServiceError(StatusCode.UNAVAILABLE, "chain down")
    assert scheduler.fail(first, error).finished == [request]
    assert scheduler.fail(second, error).finished == [] and request.error is error
    assert not _answer(scheduler, second).stepped


# -- properties under random traffic -----------------------------------------------------

SLOTS, MAX_ROWS, QUEUE = 2, 4, 6


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, cancellations, deadlines, failures and non-finite outputs."""

    def __init__(self) -> None:
        super().__init__()
        config = CoordinatorConfig(max_rows_per_microbatch=MAX_ROWS, max_queued_requests=QUEUE)
        self.scheduler = Scheduler(MODEL, config, SLOTS, make_sampler, stages=SLOTS)
        self.now = 0.0
        self.admitted: list[Request] = []
        self.on_chain: list[Microbatch] = []
        self.started: list[Request] = []

    def _unfinished(self) -> list[Request]:
        return [r for r in self.admitted if r.status is not RequestStatus.FINISHED]

    @rule(images=st.integers(1, 2), guided=st.booleans(), steps=st.integers(1, 4),
          deadline=st.none() | st.floats(0.5, 20.0), warmup=st.none() | st.integers(0, 4))
    def arrive(self, images, guided, steps, deadline, warmup):
        spec = _spec(f"r{len(self.admitted)}", images, steps, guided,
                     None if deadline is None else self.now + deadline,
                     None if warmup is None else min(warmup, steps))
        before = self.scheduler.num_admitted
        try:
            self.admitted.append(self.scheduler.add(spec, self.now))
        except QueueFull:
            assert before == QUEUE

    @rule()
    def schedule(self):
        free = SLOTS - len(self.on_chain)
        planned = self.scheduler.schedule(free, self.now)
        assert len(planned.microbatches) <= free
        assert all(r.status is RequestStatus.FINISHED and r.error for r in planned.finished)
        seen: set[int] = set()
        for microbatch in planned.microbatches:
            rows = sum(r.spec.rows for r in microbatch.requests)
            assert len(microbatch.t) == rows == len(microbatch.y) == len(microbatch.x)
            assert rows <= MAX_ROWS or len(microbatch.requests) == 1
            if microbatch.step is not None:  # an async call: its request alone, maybe
                (request,) = microbatch.requests  # in several calls (one per step)
                assert request.pipeline and request.step <= microbatch.step < request.spec.num_steps
                continue
            assert not seen & {id(r) for r in microbatch.requests}  # no request twice
            seen |= {id(r) for r in microbatch.requests}
            for request, start in zip(microbatch.requests, microbatch.offsets, strict=True):
                assert request.status is RequestStatus.RUNNING and request.pipeline is None
                t = request.sampler.model_timestep(request.step)
                assert microbatch.t[start:start + request.spec.rows].eq(t).all()
        # A request asked to stop (or past its deadline) never outlives a step boundary.
        planned_requests = [r for mb in planned.microbatches for r in mb.requests]
        s = self.scheduler
        assert not any(r.stop_error(self.now) for r in (*s.waiting, *s.ready, *s.pipelined,
                                                         *planned_requests))
        self.on_chain += planned.microbatches
        newly = [r for r in self.admitted if r.started_at is not None and r not in self.started]
        self.started += newly

    @precondition(lambda self: self.on_chain)
    @rule(data=st.data(), poison=st.booleans())
    def chain_answers(self, data, poison):
        microbatch = self.on_chain.pop(data.draw(st.integers(0, len(self.on_chain) - 1)))
        out = _output(microbatch)
        if poison:
            out[0] = float("nan")  # the first request's first row
        steps = {id(r): r.step for r in microbatch.requests}
        updated = self.scheduler.update(microbatch, out, self.now)
        if microbatch.step is not None:  # an async call: zero or more steps, in order
            (request,) = microbatch.requests
            taken = [s.timestep for s in updated.stepped]
            assert taken == [request.sampler.model_timestep(i)
                             for i in range(steps[id(request)], request.step)][:len(taken)]
            assert bool(torch.isfinite(request.x).all())
            return
        stepped = [s.request for s in updated.stepped]
        assert sorted(map(id, stepped + updated.finished)) == sorted(steps)
        for request in stepped:
            assert request.step == steps[id(request)] + 1
            assert bool(torch.isfinite(request.x).all())
        for request in updated.finished:
            assert request.error.code in (StatusCode.CANCELLED, StatusCode.DEADLINE_EXCEEDED,
                                          StatusCode.INVALID_ARGUMENT)
            if request.error.code is StatusCode.INVALID_ARGUMENT:  # only the poisoned one
                assert poison and request is microbatch.requests[0]

    @precondition(lambda self: self.on_chain)
    @rule(data=st.data())
    def chain_fails(self, data):
        microbatch = self.on_chain.pop(data.draw(st.integers(0, len(self.on_chain) - 1)))
        error = ServiceError(StatusCode.UNAVAILABLE, "injected")
        unfinished = [r for r in microbatch.requests if r.status is not RequestStatus.FINISHED]
        failed = self.scheduler.fail(microbatch, error).finished
        assert failed == unfinished and all(r.error is error for r in failed)

    @precondition(lambda self: self._unfinished())
    @rule(data=st.data())
    def cancel(self, data):
        request = data.draw(st.sampled_from(self._unfinished()))
        self.scheduler.stop(request, StatusCode.CANCELLED)

    @rule(seconds=st.floats(0.1, 5.0))
    def time_passes(self, seconds):
        self.now += seconds

    @precondition(lambda self: self.scheduler.decoding)
    @rule(data=st.data(), ok=st.booleans())
    def decoded(self, data, ok):
        request = data.draw(st.sampled_from(sorted(self.scheduler.decoding, key=id)))
        error = None if ok else ServiceError(StatusCode.UNAVAILABLE, "decoder down")
        assert self.scheduler.finish(request, error).error is error

    @invariant()
    def every_request_is_where_its_status_says(self):
        s = self.scheduler
        places = {RequestStatus.WAITING: list(s.waiting), RequestStatus.DECODING: list(s.decoding),
                  RequestStatus.RUNNING: s.ready + list(s.in_flight) + s.pipelined}
        for request in self.admitted:
            homes = [status for status, members in places.items()
                     if any(m is request for m in members)]
            if request.status is RequestStatus.FINISHED:
                assert homes == []
            else:
                assert homes == [request.status]  # exactly one set, the right one
        assert s.num_admitted == len(self._unfinished()) <= QUEUE
        assert s.in_flight == {r for mb in self.on_chain if mb.step is None for r in mb.requests}
        for request in s.pipelined:  # its calls: counted, bounded, each for a step ahead
            calls = [mb for mb in self.on_chain if mb.requests == [request]]
            pipeline = request.pipeline
            assert pipeline.in_flight == len(calls)
            assert len(pipeline.queued) + pipeline.in_flight <= pipeline.depth
            assert len(pipeline.arrived) <= pipeline.depth
            assert all(mb.step >= request.step for mb in calls)

    @invariant()
    def rows_fit_the_capacity_and_steps_their_sampler(self):
        s = self.scheduler
        assert s.active_rows <= s.capacity_rows or len(s.running) == 1
        for request in self._unfinished():
            limit = request.sampler.num_steps
            if request.status is RequestStatus.DECODING:
                assert request.step == limit
            else:
                assert request.step < limit

    @invariant()
    def requests_start_in_admission_order(self):
        order = [self.admitted.index(r) for r in self.started]
        assert order == sorted(order)

    def teardown(self):
        """Liveness: with the chain answering, every request finishes, and one that was
        neither stopped nor failed finishes without an error."""
        for _ in range(200):
            if not self._unfinished():
                break
            self.schedule()
            while self.on_chain:
                microbatch = self.on_chain.pop()
                self.scheduler.update(microbatch, _output(microbatch), self.now)
            for request in list(self.scheduler.decoding):
                self.scheduler.finish(request)
        assert not self._unfinished()
        for request in self.admitted:
            if request.stop is None and request.error is None:
                assert request.step == request.sampler.num_steps


SchedulerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_scheduler_invariants_under_random_traffic = SchedulerMachine.TestCase
