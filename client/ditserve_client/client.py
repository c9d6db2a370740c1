"""The synchronous client of the coordinator (CoordinatorService).

    with Client("127.0.0.1:50050") as client:
        for event in client.generate(["red circle", 1], seed=0, sampler="ddim"):
            if isinstance(event, Progress):
                print(event.step, "/", event.total)
        result = client.generate_result([0], seed=0)
        result.images[0].save("circle.png")

Retries on UNAVAILABLE are the channel's (channel.py): GetModelInfo always, Generate only
while no event has arrived (the server has not admitted the request yet). A Generate
stream that breaks after Accepted (the coordinator crashed) is sent again, pinned to its
seed, once the coordinator is back, and shows no event twice (resume.py). Request
building and event decoding are shared with the asyncio client (request.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from .channel import ChannelSettings, RetryPolicy
from .errors import DitserveError, from_rpc_error
from .events import Event, Result
from .labels import ClassNames
from .model_info import ModelInfo
from .proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc
from .reflection import list_services, not_the_coordinator
from .request import GenerateOptions
from .resume import RESUME_WINDOW_S, Resumption

Label = int | str


def needs_names(labels: Sequence[Label]) -> bool:
    """Whether resolving `labels` needs the model's class names (any is not an id)."""
    return any(isinstance(x, str) and not x.strip().lstrip("-").isdigit() for x in labels)


def final_result(events: Sequence[Event] | Iterator[Event]) -> Result:
    """The Result that ends a stream of events; an error after a Result carries it."""
    last = None
    try:
        for event in events:
            last = event
    except DitserveError as error:
        if isinstance(last, Result):
            error.result = last
        raise
    if not isinstance(last, Result):
        raise DitserveError("INTERNAL", "the Generate stream ended without a result")
    return last


class Client:
    """Blocking client: `generate` yields Accepted, Progress..., Result."""

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = None, retries: int = 3,
                 resume_window: float = RESUME_WINDOW_S):
        # timeout: deadline of each call (s); resume_window: seconds a broken Generate
        # stream waits for the coordinator to come back (0: never resume).
        self.settings = ChannelSettings(target, tls, root_certificates, token,
                                        RetryPolicy(retries))
        self.timeout, self.resume_window = timeout, resume_window
        self._channel = self.settings.open(grpc)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._info: ModelInfo | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model_info(self, *, refresh: bool = False) -> ModelInfo:
        """The served model, classes, samplers and chain (cached)."""
        if self._info is None or refresh:
            try:
                response = self._stub.GetModelInfo(coordinator_pb2.GetModelInfoRequest(),
                                                   timeout=self.timeout,
                                                   metadata=self.settings.metadata())
            except grpc.RpcError as error:
                raise self._error(error) from None
            self._info = ModelInfo.from_proto(response)
        return self._info

    def class_ids(self, labels: Sequence[Label]) -> list[int]:
        """Ids and names (any case, any ImageNet synonym) → class ids; names need
        GetModelInfo once."""
        classes = self.model_info().classes if needs_names(labels) else ClassNames()
        return classes.resolve_all(labels)

    def generate(self, class_labels_or_names: Sequence[Label], **options: Any) -> Iterator[Event]:
        """One request, one image per label: yields Accepted, Progress per step, Result.
        Options are GenerateOptions' fields (seed, steps, sampler, guidance, ...); unset
        ones take the server's defaults. A stream that breaks after Accepted is resumed."""
        request = GenerateOptions.from_keywords(options).to_proto(
            self.class_ids(class_labels_or_names))
        stream = Resumption(request, self.resume_window, self.timeout)
        while True:
            call = self._stub.Generate(stream.request, timeout=stream.timeout(),
                                       metadata=self.settings.metadata())
            try:
                for message in call:
                    if (event := stream.read(message)) is not None:
                        yield event
                return
            except grpc.RpcError as error:
                delay = stream.retry_delay(error, self.settings.target)
                if delay is None:
                    raise stream.gave_up(self._error(error)) from None
            finally:
                call.cancel()  # the caller stopped early: free the server's slot
            time.sleep(delay)

    def generate_result(self, class_labels_or_names: Sequence[Label], **options: Any) -> Result:
        """`generate` run to its end: the Result (same options)."""
        return final_result(self.generate(class_labels_or_names, **options))

    def _error(self, error: grpc.RpcError) -> DitserveError:
        """The DitserveError of a failed call; UNIMPLEMENTED says what the target serves."""
        if error.code() is grpc.StatusCode.UNIMPLEMENTED:
            services = list_services(self._channel)
            return DitserveError("UNIMPLEMENTED",
                                 not_the_coordinator(self.settings.target, services))
        return from_rpc_error(error, self.settings.target)
