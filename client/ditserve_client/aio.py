"""The asyncio client: the same API as `Client`, with `async for` and `await`.

    async with AsyncClient("127.0.0.1:50050") as client:
        async for event in client.generate(["golden retriever"], seed=0):
            ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from .channel import RETRYABLE, Backoff, ChannelSettings
from .client import Label, needs_names
from .errors import DitserveError, from_rpc_error
from .events import Accepted, Event, Result, event_from_proto
from .labels import ClassNames
from .model_info import ModelInfo
from .proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc
from .request import GenerateOptions


class AsyncClient:
    """Non-blocking client: `generate` is an async iterator of events."""

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = None, retries: int = 3):
        self.settings = ChannelSettings(target, tls, root_certificates, token)
        self.timeout = timeout
        self.backoff = Backoff(retries=retries)
        self._channel = self.settings.open(grpc.aio)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._info: ModelInfo | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def model_info(self, *, refresh: bool = False) -> ModelInfo:
        """The served model, classes, samplers and chain (cached; retried on UNAVAILABLE)."""
        if self._info is None or refresh:
            request = coordinator_pb2.GetModelInfoRequest()
            for attempt in range(self.backoff.retries + 1):
                try:
                    response = await self._stub.GetModelInfo(
                        request, timeout=self.timeout, metadata=self.settings.metadata())
                    break
                except grpc.RpcError as error:
                    await self._wait_or_raise(error, attempt)
            self._info = ModelInfo.from_proto(response)
        return self._info

    async def class_ids(self, labels: Sequence[Label]) -> list[int]:
        """Ids and names (any case) → class ids; names need GetModelInfo once."""
        classes = (await self.model_info()).classes if needs_names(labels) else ClassNames()
        return classes.resolve_all(labels)

    async def generate(self, class_labels_or_names: Sequence[Label], *, seed: int | None = None,
                       steps: int = 0, sampler: str | None = "ddpm",
                       guidance: float | None = None, guidance_channels: str = "first3",
                       previews: str | None = None, preview_every: int = 1,
                       image_format: str = "png", quality: int = 0,
                       return_latents: bool = False, skip_images: bool = False,
                       request_id: str = "") -> AsyncIterator[Event]:
        """One request, one image per label: yields Accepted, Progress per step, Result."""
        options = GenerateOptions(seed, steps, sampler, guidance, guidance_channels, previews,
                                  preview_every, image_format, quality, return_latents,
                                  skip_images, request_id)
        request = options.to_proto(await self.class_ids(class_labels_or_names))
        for attempt in range(self.backoff.retries + 1):
            started = False
            call = self._stub.Generate(request, timeout=self.timeout,
                                       metadata=self.settings.metadata())
            try:
                accepted_id = request.request_id
                async for message in call:
                    started = True
                    event = event_from_proto(message, accepted_id)
                    if isinstance(event, Accepted):
                        accepted_id = event.request_id
                    yield event
                return
            except grpc.RpcError as error:
                if started:
                    raise from_rpc_error(error, self.settings.target) from None
                await self._wait_or_raise(error, attempt)
            finally:
                call.cancel()  # the caller stopped early: free the server's slot

    async def generate_result(self, class_labels_or_names: Sequence[Label],
                              **options: Any) -> Result:
        """`generate` run to its end: the Result (same options)."""
        last = None
        async for event in self.generate(class_labels_or_names, **options):
            last = event
        if not isinstance(last, Result):
            raise DitserveError("INTERNAL", "the Generate stream ended without a result")
        return last

    async def _wait_or_raise(self, error: grpc.RpcError, attempt: int) -> None:
        """Sleeps before a retry of an UNAVAILABLE call, or raises DitserveError."""
        mapped = from_rpc_error(error, self.settings.target)
        if error.code() is not RETRYABLE or attempt >= self.backoff.retries:
            raise mapped from None
        await asyncio.sleep(self.backoff.delay(attempt, mapped.retry_after))
