"""Concurrent decode requests batched into few VAE calls on one compute thread.

Requests that arrive while the VAE is busy (or together) wait in a queue; the worker takes
the oldest and every other waiting request with the same latent shape, up to
`max_batch_size` rows, and decodes them in one call on a single-thread executor, so the
event loop (health checks, other RPCs) never waits for a forward pass (docs/ARCHITECTURE.md §6).
Reference: dynamic batching as in Triton's dynamic batcher, without a delay window.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import metrics
from .decoder import VaeDecoder


@dataclass(eq=False)  # identity: `in` must not compare tensors
class _Pending:
    latents: torch.Tensor  # (n, C, L, L)
    future: asyncio.Future = field(repr=False)


class DecodeBatcher:
    """Gathers concurrent `decode` calls into batched VAE calls; one at a time."""

    def __init__(self, decoder: VaeDecoder):
        self.decoder = decoder
        self.batches = 0
        """VAE batches run so far (for tests and metrics)."""
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Fails whatever still waits, stops the worker and the compute thread."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("decoder shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return sum(item.latents.shape[0] for item in self._pending)

    async def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(n, C, L, L) latents → ((n, H, W, 3) uint8, seconds of the VAE call that decoded
        them), batched with concurrent calls."""
        if self._worker is None:
            raise RuntimeError("DecodeBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(latents, future))
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[_Pending]:
        """The oldest request and the later ones of its shape that fit in a batch."""
        first = self._pending[0]
        batch, rows = [first], first.latents.shape[0]
        for item in self._pending[1:]:
            n = item.latents.shape[0]
            if item.latents.shape[1:] == first.latents.shape[1:] and \
                    rows + n <= self.decoder.max_batch_size:
                batch.append(item)
                rows += n
        self._pending = [item for item in self._pending if item not in batch]
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [item for item in self._take_batch() if not item.future.cancelled()]
            if not batch:
                continue
            latents = torch.cat([item.latents.float() for item in batch])  # (rows, C, L, L)
            self.batches += 1
            metrics.BATCH_ROWS.observe(latents.shape[0])
            started = time.perf_counter()
            try:
                pixels = await loop.run_in_executor(self._executor, self.decoder.decode, latents)
            except Exception as error:  # the VAE failed: every request of the batch fails
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            seconds = time.perf_counter() - started
            for item, rows in zip(batch, pixels.split([i.latents.shape[0] for i in batch]),
                                  strict=True):
                if not item.future.done():
                    item.future.set_result((rows, seconds))
