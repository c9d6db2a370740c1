"""The asyncio client: the same API as `Client`, with `async for` and `await`.

    async with AsyncClient("127.0.0.1:50050") as client:
        async for event in client.generate(["red circle"], seed=0):
            ...

It shares request building, event decoding, the retry policy and the resumption of a
broken stream (resume.py) with `Client`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from .channel import ChannelSettings, RetryPolicy
from .client import Label, needs_names
from .errors import DitserveError, from_rpc_error
from .events import Event, Result
from .labels import ClassNames
from .model_info import ModelInfo
from .proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc
from .reflection import list_services_async, not_the_coordinator
from .request import GenerateOptions
from .resume import RESUME_WINDOW_S, Resumption


class AsyncClient:
    """Non-blocking client: `generate` is an async iterator of events."""

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = None, retries: int = 3,
                 resume_window: float = RESUME_WINDOW_S):
        self.settings = ChannelSettings(target, tls, root_certificates, token,
                                        RetryPolicy(retries))
        self.timeout, self.resume_window = timeout, resume_window
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
        """The served model, classes, samplers and chain (cached)."""
        if self._info is None or refresh:
            try:
                response = await self._stub.GetModelInfo(
                    coordinator_pb2.GetModelInfoRequest(), timeout=self.timeout,
                    metadata=self.settings.metadata())
            except grpc.RpcError as error:
                raise await self._error(error) from None
            self._info = ModelInfo.from_proto(response)
        return self._info

    async def class_ids(self, labels: Sequence[Label]) -> list[int]:
        """Ids and names (any case, any ImageNet synonym) → class ids."""
        classes = (await self.model_info()).classes if needs_names(labels) else ClassNames()
        return classes.resolve_all(labels)

    async def generate(self, class_labels_or_names: Sequence[Label],
                       **options: Any) -> AsyncIterator[Event]:
        """One request, one image per label: yields Accepted, Progress per step, Result
        (the options of `Client.generate`; a stream that breaks after Accepted is resumed)."""
        request = GenerateOptions.from_keywords(options).to_proto(
            await self.class_ids(class_labels_or_names))
        stream = Resumption(request, self.resume_window, self.timeout)
        while True:
            call = self._stub.Generate(stream.request, timeout=stream.timeout(),
                                       metadata=self.settings.metadata())
            try:
                async for message in call:
                    if (event := stream.read(message)) is not None:
                        yield event
                return
            except grpc.RpcError as error:
                delay = stream.retry_delay(error, self.settings.target)
                if delay is None:
                    raise stream.gave_up(await self._error(error)) from None
            finally:
                call.cancel()  # the caller stopped early: free the server's slot
            await asyncio.sleep(delay)

    async def generate_result(self, class_labels_or_names: Sequence[Label],
                              **options: Any) -> Result:
        """`generate` run to its end: the Result (same options)."""
        last = None
        try:
            async for event in self.generate(class_labels_or_names, **options):
                last = event
        except DitserveError as error:
            if isinstance(last, Result):
                error.result = last  # the latents the decoder never turned into images
            raise
        if not isinstance(last, Result):
            raise DitserveError("INTERNAL", "the Generate stream ended without a result")
        return last

    async def _error(self, error: grpc.RpcError) -> DitserveError:
        if error.code() is grpc.StatusCode.UNIMPLEMENTED:
            services = await list_services_async(self._channel)
            return DitserveError("UNIMPLEMENTED",
                                 not_the_coordinator(self.settings.target, services))
        return from_rpc_error(error, self.settings.target)
