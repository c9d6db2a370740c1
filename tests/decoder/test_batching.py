"""DecodeBatcher: concurrent requests share VAE calls; each gets its own rows back."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ditserve.decoder.batching import DecodeBatcher
from ditserve.decoder.decoder import VaeDecoder

from .conftest import random_latents


@pytest.fixture(scope="module")
def decoder(tiny_vae_dir) -> VaeDecoder:
    return VaeDecoder.load(tiny_vae_dir, max_batch_size=8)


def count_vae_calls(decoder: VaeDecoder) -> list[int]:
    """Rows of every VAE call from now on."""
    calls: list[int] = []
    original = decoder.decode
    decoder.decode = lambda latents: calls.append(latents.shape[0]) or original(latents)
    return calls


async def decode_concurrently(decoder: VaeDecoder, requests: list[torch.Tensor]):
    batcher = DecodeBatcher(decoder)
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.decode(r) for r in requests)), batcher.batches
    finally:
        await batcher.stop()


def test_concurrent_requests_share_one_vae_call(tiny_vae_dir):
    decoder = VaeDecoder.load(tiny_vae_dir, max_batch_size=8)
    requests = [random_latents(n, seed=i) for i, n in enumerate([1, 2, 1, 3])]
    calls = count_vae_calls(decoder)
    results, batches = asyncio.run(decode_concurrently(decoder, requests))
    assert calls == [7] and batches == 1
    for latents, (pixels, seconds) in zip(requests, results, strict=True):
        assert seconds > 0
        alone = VaeDecoder.decode(decoder, latents)  # unpatched: the request on its own
        assert pixels.shape == (latents.shape[0], 16, 16, 3)
        assert (pixels.int() - alone.int()).abs().max() <= 1


def test_batches_respect_max_rows_and_shape(tiny_vae_dir):
    decoder = VaeDecoder.load(tiny_vae_dir, max_batch_size=4)
    requests = [random_latents(3), random_latents(2), random_latents(1, side=6),
                random_latents(1)]
    calls = count_vae_calls(decoder)
    results, _ = asyncio.run(decode_concurrently(decoder, requests))
    # 3 + 1 rows of 8x8 fit in one call; 2 rows more do not; 6x6 never mixes with 8x8.
    assert sorted(calls) == [1, 2, 4]
    assert [r[0].shape[1] for r in results] == [16, 16, 12, 16]


def test_vae_failure_fails_the_batch_and_worker_survives(tiny_vae_dir):
    decoder = VaeDecoder.load(tiny_vae_dir)

    async def scenario():
        batcher = DecodeBatcher(decoder)
        batcher.start()
        original = decoder.decode
        decoder.decode = lambda latents: (_ for _ in ()).throw(RuntimeError("out of memory"))
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.decode(random_latents(1))
        decoder.decode = original
        pixels, _ = await batcher.decode(random_latents(1))
        await batcher.stop()
        return pixels

    assert asyncio.run(scenario()).shape == (1, 16, 16, 3)
