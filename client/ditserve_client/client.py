"""The synchronous client of the coordinator (CoordinatorService).

    with Client("127.0.0.1:50050") as client:
        for event in client.generate(["golden retriever", 88], seed=0, sampler="ddim"):
            if isinstance(event, Progress):
                print(event.step, "/", event.total)
        result = client.generate_result([207], seed=0)
        result.images[0].save("dog.png")

Retries on UNAVAILABLE only where repeating is safe: GetModelInfo always; Generate only
while no event has arrived (the server has not admitted the request yet).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from .channel import RETRYABLE, Backoff, ChannelSettings
from .errors import DitserveError, from_rpc_error
from .events import Accepted, Event, Result, event_from_proto
from .labels import ClassNames
from .model_info import ModelInfo
from .proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc
from .request import GenerateOptions

Label = int | str


def needs_names(labels: Sequence[Label]) -> bool:
    """Whether resolving `labels` needs the model's class names (any is not an id)."""
    return any(isinstance(x, str) and not x.strip().lstrip("-").isdigit() for x in labels)


def final_result(events: Sequence[Event] | Iterator[Event]) -> Result:
    """The Result that ends a stream of events."""
    last = None
    for event in events:
        last = event
    if not isinstance(last, Result):
        raise DitserveError("INTERNAL", "the Generate stream ended without a result")
    return last


class Client:
    """Blocking client: `generate` yields Accepted, Progress..., Result."""

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = None, retries: int = 3):
        self.settings = ChannelSettings(target, tls, root_certificates, token)
        self.timeout = timeout
        self.backoff = Backoff(retries=retries)
        self._channel = self.settings.open()
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._info: ModelInfo | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model_info(self, *, refresh: bool = False) -> ModelInfo:
        """The served model, classes, samplers and chain (cached; retried on UNAVAILABLE)."""
        if self._info is None or refresh:
            request = coordinator_pb2.GetModelInfoRequest()
            for attempt in range(self.backoff.retries + 1):
                try:
                    response = self._stub.GetModelInfo(
                        request, timeout=self.timeout, metadata=self.settings.metadata())
                    break
                except grpc.RpcError as error:
                    self._wait_or_raise(error, attempt)
            self._info = ModelInfo.from_proto(response)
        return self._info

    def class_ids(self, labels: Sequence[Label]) -> list[int]:
        """Ids and names (any case) → class ids; names need GetModelInfo once."""
        classes = self.model_info().classes if needs_names(labels) else ClassNames()
        return classes.resolve_all(labels)

    def generate(self, class_labels_or_names: Sequence[Label], *, seed: int | None = None,
                 steps: int = 0, sampler: str | None = "ddpm", guidance: float | None = None,
                 guidance_channels: str = "first3", previews: str | None = None,
                 preview_every: int = 1, image_format: str = "png", quality: int = 0,
                 return_latents: bool = False, skip_images: bool = False,
                 request_id: str = "") -> Iterator[Event]:
        """One request, one image per label: yields Accepted, Progress per step, Result."""
        options = GenerateOptions(seed, steps, sampler, guidance, guidance_channels, previews,
                                  preview_every, image_format, quality, return_latents,
                                  skip_images, request_id)
        request = options.to_proto(self.class_ids(class_labels_or_names))
        for attempt in range(self.backoff.retries + 1):
            started = False
            call = self._stub.Generate(request, timeout=self.timeout,
                                       metadata=self.settings.metadata())
            try:
                accepted_id = request.request_id
                for message in call:
                    started = True
                    event = event_from_proto(message, accepted_id)
                    if isinstance(event, Accepted):
                        accepted_id = event.request_id
                    yield event
                return
            except grpc.RpcError as error:
                if started:
                    raise from_rpc_error(error, self.settings.target) from None
                self._wait_or_raise(error, attempt)
            finally:
                call.cancel()  # the caller stopped early: free the server's slot

    def generate_result(self, class_labels_or_names: Sequence[Label], **options: Any) -> Result:
        """`generate` run to its end: the Result (same options)."""
        return final_result(self.generate(class_labels_or_names, **options))

    def _wait_or_raise(self, error: grpc.RpcError, attempt: int) -> None:
        """Sleeps before a retry of an UNAVAILABLE call, or raises DitserveError."""
        mapped = from_rpc_error(error, self.settings.target)
        if error.code() is not RETRYABLE or attempt >= self.backoff.retries:
            raise mapped from None
        time.sleep(self.backoff.delay(attempt, mapped.retry_after))
