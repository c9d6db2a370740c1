"""Continuous batching keeps a 2-stage pipeline busy: 8 concurrent requests through two
real `ditserve stage` processes, utilisation from the stages' own compute seconds."""

from __future__ import annotations

import asyncio

import pytest
from ditserve.bench.load import random_checkpoint, run_load
from ditserve.chain.remote import RemoteChain
from ditserve.model import open_checkpoint


@pytest.fixture(scope="module")
def s2_chain(launcher, tmp_path_factory):
    """DiT-S/2 at 16x16 latents: big enough that compute dominates the hops."""
    path = random_checkpoint("DiT-S/2", 16, tmp_path_factory.mktemp("s2") / "s2.safetensors",
                             num_classes=10)
    stages = launcher.start_chain(path, stages=2, wire_dtype="bf16")
    return stages[0].address, open_checkpoint(path).config


def test_eight_requests_keep_both_stages_busy(s2_chain):
    address, model = s2_chain

    async def main():
        chain = RemoteChain(address)
        try:
            await run_load(chain, model, 2, concurrency=1, steps=1)  # connect, warm up
            return await run_load(chain, model, 2, concurrency=8, steps=6)
        finally:
            await chain.close()

    result = asyncio.run(main())
    print(f"8 requests: {result.images_per_second:.2f} images/s, stage utilisation "
          f"{[round(u, 2) for u in result.utilisation]}")
    assert len(result.utilisation) == 2
    assert min(result.utilisation) >= 0.8, result
