"""A Generate stream that breaks after Accepted is resumed (resume.py), against the fake
coordinator: pinned to the accepted seed, each event shown once, only for broken
transports, within the resume window and the deadline. The end-to-end test (SIGKILL of a
real coordinator under `ditserve up`) is tests/launcher/test_faults.py."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from ditserve.cli import main
from ditserve_client import Accepted, AsyncClient, Client, DitserveError, Progress, Result
from ditserve_client.proto.dit.v1 import coordinator_pb2
from ditserve_client.resume import Resumption, broken_stream
from google.rpc import code_pb2

from .conftest import error_status


def _shape(events) -> list:
    """Accepted, the step numbers, Result: what a consumer saw, in order."""
    return [e.step if isinstance(e, Progress) else type(e).__name__ for e in events]


def test_a_broken_stream_resumes_with_the_accepted_seed(coordinator, fake):
    fake.configure(breaks=1, break_after=2)
    with Client(coordinator.address, timeout=30) as client:
        events = list(client.generate([1, 2], sampler="ddim", return_latents=True))
    assert _shape(events) == ["Accepted", 1, 2, 3, 4, "Result"]
    assert fake.generate_calls == 2
    first, again = fake.requests
    assert not first.HasField("seed") and again.seed == 42  # the seed the server picked
    assert not first.resumed and again.resumed  # may use the coordinator's reserve
    assert again.request_id == "req-1" and again.num_steps == 4
    assert again.sampler == coordinator_pb2.SAMPLER_DDIM and again.guidance_scale == 4.0
    assert list(again.class_labels) == [1, 2] and again.return_latents
    assert events[-1].seed == 42 and events[-1].request_id == "req-1"


def test_breaking_again_and_again_shows_each_step_once(coordinator, fake):
    fake.configure(breaks=3, break_after=1)
    with Client(coordinator.address, timeout=30) as client:
        events = list(client.generate([1], seed=7))
    assert _shape(events) == ["Accepted", 1, 2, 3, 4, "Result"]
    assert fake.generate_calls == 4 and {r.seed for r in fake.requests} == {7}


def test_a_reset_stream_is_resumed(coordinator, fake):
    """gRPC reports a stream cut off mid-way as UNKNOWN "Stream removed"."""
    fake.configure(breaks=1, break_code=grpc.StatusCode.UNKNOWN, break_message="Stream removed")
    with Client(coordinator.address, timeout=30) as client:
        assert isinstance(client.generate_result([1]), Result)
    assert fake.generate_calls == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.UNKNOWN])
def test_other_failures_after_accepted_are_not_resumed(coordinator, fake, code):
    fake.configure(breaks=1, break_code=code, break_message="no")
    with Client(coordinator.address, timeout=30) as client, pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert err.value.code == code.name and fake.generate_calls == 1


def test_nothing_is_resumed_before_accepted(coordinator, fake):
    fake.configure(fail_generate=10)
    with Client(coordinator.address, retries=1) as client, pytest.raises(DitserveError):
        client.generate_result([1])
    assert fake.generate_calls == 2  # the channel's retry policy, no more


def test_it_gives_up_after_the_resume_window(coordinator, fake):
    fake.configure(breaks=1000, break_after=1)
    with Client(coordinator.address, timeout=30, resume_window=1.2) as client, \
            pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert err.value.code == "UNAVAILABLE" and "not back after" in err.value.message
    assert 2 <= fake.generate_calls <= 5


@pytest.mark.parametrize("code", ["RESOURCE_EXHAUSTED", "UNAVAILABLE"])
def test_a_resumed_request_waits_out_a_full_queue(coordinator, fake, code):
    """Every client of a crashed coordinator comes back at once: a resumed request that the
    restarted one refuses (queue full, chain not ready) asks again after its RetryInfo."""
    fake.configure(breaks=1, break_after=2, refuse_after_break=3,
                   refuse_code=code_pb2.Code.Value(code), refuse_delay=0.3)
    with Client(coordinator.address, timeout=30) as client:
        started = time.monotonic()
        events = list(client.generate([1], seed=9))
        waited = time.monotonic() - started
    assert _shape(events) == ["Accepted", 1, 2, 3, 4, "Result"]
    assert fake.generate_calls == 5 and {r.seed for r in fake.requests} == {9}
    assert waited >= 3 * 0.3  # each refusal's RetryInfo was honoured, not only the backoff


def test_a_fresh_request_refused_by_a_full_queue_still_fails_at_once(coordinator, fake):
    fake.configure(generate_error=error_status(code_pb2.RESOURCE_EXHAUSTED, "queue full", 2.0))
    with Client(coordinator.address, timeout=30) as client, pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.retry_after == 2.0
    assert fake.generate_calls == 1


def test_a_resumed_request_gives_up_when_the_queue_stays_full(coordinator, fake):
    fake.configure(breaks=1, break_after=1, refuse_after_break=1000, refuse_delay=0.2)
    with Client(coordinator.address, timeout=30, resume_window=1.5) as client, \
            pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert err.value.code == "RESOURCE_EXHAUSTED" and "not back after" in err.value.message


def test_the_asyncio_client_waits_out_a_full_queue_too(coordinator, fake):
    fake.configure(breaks=1, break_after=1, refuse_after_break=2, refuse_delay=0.2)

    async def run() -> list:
        async with AsyncClient(coordinator.address, timeout=30) as client:
            return [e async for e in client.generate([3], seed=5)]

    assert _shape(asyncio.run(run())) == ["Accepted", 1, 2, 3, 4, "Result"]
    assert fake.generate_calls == 4


def test_a_zero_window_never_resumes(coordinator, fake):
    fake.configure(breaks=1)
    with Client(coordinator.address, timeout=30, resume_window=0) as client, \
            pytest.raises(DitserveError, match="UNAVAILABLE"):
        client.generate_result([1])
    assert fake.generate_calls == 1


def test_the_asyncio_client_resumes_too(coordinator, fake):
    fake.configure(breaks=2, break_after=3)

    async def scenario():
        async with AsyncClient(coordinator.address, timeout=30) as client:
            return [event async for event in client.generate([3], seed=5)]
    events = asyncio.run(scenario())
    assert _shape(events) == ["Accepted", 1, 2, 3, 4, "Result"]
    assert fake.generate_calls == 3 and {r.seed for r in fake.requests} == {5}


def test_the_cli_says_it_resumes_in_one_line(coordinator, fake, tmp_path, capsys):
    fake.configure(breaks=1, break_after=2)
    code = main(["generate", "--target", coordinator.address, "--class", "1", "--steps", "4",
                 "--out", str(tmp_path / "x.png")])
    assert code == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "resuming" in line]
    assert len(said) == 1 and "seed 42" in said[0] and "step 2/4" in said[0]
    assert err.count("step 4/4") == 1 and (tmp_path / "x.png").exists()


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "Socket closed",
                 trailers: tuple = ()):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_the_coordinators_own_answer_is_not_a_broken_stream():
    """Every ditserve status carries google.rpc.Status details; a transport's does not."""
    assert broken_stream(_Error(grpc.StatusCode.UNAVAILABLE))
    assert not broken_stream(_Error(grpc.StatusCode.UNAVAILABLE, "stage 1 down",
                                    (("grpc-status-details-bin", b""),)))
    assert broken_stream(_Error(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error 2"))
    assert not broken_stream(_Error(grpc.StatusCode.DEADLINE_EXCEEDED))


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _accepted(resumption: Resumption) -> None:
    resumption.read(coordinator_pb2.GenerateResponse(accepted=coordinator_pb2.Accepted(
        request_id="r", seed=3, num_steps=10)))


def test_the_deadline_bounds_the_wait():
    clock = _Clock()
    resumption = Resumption(coordinator_pb2.GenerateRequest(), window=120, timeout=3,
                            clock=clock)
    _accepted(resumption)
    delays = []
    while (delay := resumption.retry_delay(_Error(grpc.StatusCode.UNAVAILABLE), "t")) is not None:
        delays.append(delay)
        clock.now += delay
    assert delays == [0.5, 1.0] and clock.now == 1.5  # the next wait (2 s) passes 3 s


def test_new_progress_restarts_the_window_and_the_backoff():
    clock = _Clock()
    resumption = Resumption(coordinator_pb2.GenerateRequest(), window=2, timeout=None,
                            clock=clock)
    _accepted(resumption)
    broken = _Error(grpc.StatusCode.UNAVAILABLE)
    assert [resumption.retry_delay(broken, "t") for _ in range(2)] == [0.5, 1.0]
    clock.now += 1.9
    assert resumption.read(coordinator_pb2.GenerateResponse(accepted=coordinator_pb2.Accepted(
        request_id="r", seed=3))) is None  # shown already
    event = resumption.read(coordinator_pb2.GenerateResponse(
        progress=coordinator_pb2.Progress(step=1, total_steps=10)))
    assert isinstance(event, Progress) and not resumption.resuming
    assert resumption.retry_delay(broken, "t") == 0.5
    assert isinstance(resumption.accepted, Accepted) and resumption.request.seed == 3


def test_a_resumed_async_request_keeps_its_mode_and_warmup(coordinator, fake):
    fake.configure(breaks=1, break_after=2)
    with Client(coordinator.address, timeout=30) as client:
        events = list(client.generate([1], mode="async"))
    assert _shape(events) == ["Accepted", 1, 2, 3, 4, "Result"]
    first, again = fake.requests
    assert not first.HasField("async_warmup_steps")
    assert again.mode == coordinator_pb2.GENERATION_MODE_ASYNC
    assert again.async_warmup_steps == 2  # the warm-up the server chose, pinned
