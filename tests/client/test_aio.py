"""The AsyncClient: the same behaviour as the sync client, under asyncio."""

from __future__ import annotations

import asyncio

import pytest
from ditserve_client import Accepted, AsyncClient, DitserveError, Progress, Result
from google.rpc import code_pb2

from .conftest import error_status


def run(coroutine_function, address: str, **client_options):
    async def main():
        async with AsyncClient(address, timeout=10, **client_options) as client:
            return await coroutine_function(client)
    return asyncio.run(main())


def test_generate_events_and_names(coordinator, fake):
    async def good(client):
        return [event async for event in client.generate(["tench", 88], steps=2, seed=3,
                                                         return_latents=True)]
    events = run(good, coordinator.address)
    assert isinstance(events[0], Accepted) and events[0].seed == 3
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2]
    assert isinstance(events[-1], Result) and [i.label for i in events[-1].images] == [0, 88]
    assert events[-1].latents.shape == (2, 4, 2, 2)


def test_concurrent_generations_share_a_channel(coordinator, fake):
    async def scenario(client):
        return await asyncio.gather(*(client.generate_result([i]) for i in range(4)))
    results = run(scenario, coordinator.address)
    assert [r.images[0].label for r in results] == [0, 1, 2, 3]


def test_retries_before_events_only(coordinator, fake):
    fake.configure(fail_generate=1, fail_info=1)

    async def scenario(client):
        info = await client.model_info()
        return info, await client.generate_result([5])
    info, result = run(scenario, coordinator.address)
    assert info.model_name == "DiT-Tiny/2" and isinstance(result, Result)
    assert (fake.info_calls, fake.generate_calls) == (2, 2)

    fake.configure(fail_after_accepted=True)
    with pytest.raises(DitserveError, match="UNAVAILABLE"):
        run(lambda client: client.generate_result([5]), coordinator.address)
    assert fake.generate_calls == 1


def test_error_mapping_with_retry_info(coordinator, fake):
    fake.configure(generate_error=error_status(code_pb2.RESOURCE_EXHAUSTED, "busy", 0.25))
    with pytest.raises(DitserveError) as err:
        run(lambda client: client.generate_result([1]), coordinator.address)
    assert (err.value.code, err.value.retry_after) == ("RESOURCE_EXHAUSTED", 0.25)


def test_token_metadata(coordinator, fake):
    run(lambda client: client.generate_result([1]), coordinator.address, token="abc")
    assert fake.metadata[0]["authorization"] == "Bearer abc"
