"""CoordinatorService over gRPC: thin; the Engine does the work (grpc route_guide style)."""

from __future__ import annotations

from typing import Any

import grpc
from ditserve_client.proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ditserve.chain.base import ChainError, ErrorCode
from ditserve.common.errors import status_proto, to_grpc_status

from .engine import Engine, QueueFull
from .model_info import ModelInfo
from .protocol import event_to_proto, spec_from_proto


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Generate streams the engine's events; GetModelInfo describes model and chain."""

    def __init__(self, engine: Engine, info: ModelInfo):
        self.engine, self.info = engine, info

    async def Generate(self, request: coordinator_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> Any:
        """One request: Accepted, Progress per step, Result; failures as status."""
        try:
            spec = spec_from_proto(request, self.engine.model, self.engine.config,
                                   self.info.has_decoder, context.time_remaining())
            handle = self.engine.submit(spec)
        except ChainError as error:
            await context.abort_with_status(_status(error))
        try:
            async for event in handle.events():
                yield event_to_proto(event)
        except ChainError as error:
            await context.abort_with_status(_status(error))
        finally:
            handle.cancel()  # client gone or deadline: free the slot at the next step

    async def GetModelInfo(self, request: coordinator_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext
                           ) -> coordinator_pb2.GetModelInfoResponse:
        """The model, its classes, the samplers and the stage chain with its health."""
        try:
            return await self.info.describe()
        except ChainError as error:
            await context.abort_with_status(_status(error))


def _status(error: ChainError) -> grpc.Status:
    """Rich status; a full queue carries RetryInfo with the delay to wait."""
    if not isinstance(error, QueueFull):
        return to_grpc_status(error)
    status = status_proto(ChainError(ErrorCode.RESOURCE_EXHAUSTED, error.message))
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(error.retry_after * 1e9))
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)
