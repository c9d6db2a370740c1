"""The transport bench's warm-up: a relay chain whose stage dialled the next one before it
listened fails calls UNAVAILABLE for a while (grpc's reconnect backoff); the warm-up
waits that out, and refuses anything else at once."""

import asyncio

import pytest
from ditserve.bench.transport import _warm_up
from ditserve.common.status import ServiceError, StatusCode


def _failing(codes: list[StatusCode]):
    calls = []

    async def call() -> None:
        calls.append(None)
        if len(calls) <= len(codes):
            raise ServiceError(codes[len(calls) - 1], "stage-1: connection refused")
    return call, calls


def test_warm_up_retries_unavailable_until_a_call_succeeds():
    call, calls = _failing([StatusCode.UNAVAILABLE, StatusCode.UNAVAILABLE])
    asyncio.run(_warm_up(call))
    assert len(calls) == 3


def test_warm_up_raises_other_errors_and_gives_up_at_its_deadline():
    call, calls = _failing([StatusCode.INVALID_ARGUMENT])
    with pytest.raises(ServiceError, match="connection refused"):
        asyncio.run(_warm_up(call))
    assert len(calls) == 1
    call, calls = _failing([StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(ServiceError) as raised:
        asyncio.run(_warm_up(call, timeout=0.3))
    assert raised.value.code is StatusCode.UNAVAILABLE and 2 <= len(calls) < 100
