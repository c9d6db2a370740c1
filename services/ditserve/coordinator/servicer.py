"""CoordinatorService over gRPC: thin; the Engine does the work (grpc route_guide style)."""

from __future__ import annotations

from typing import Any

import grpc
from ditserve_client.proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc

from ditserve.common.errors import to_grpc_status
from ditserve.common.status import ServiceError

from .engine import Engine
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
        except ServiceError as error:
            await context.abort_with_status(to_grpc_status(error))
        try:
            async for event in handle.events():
                yield event_to_proto(event)
        except ServiceError as error:
            await context.abort_with_status(to_grpc_status(error))
        finally:
            handle.cancel()  # client gone or deadline: free the slot at the next step

    async def GetModelInfo(self, request: coordinator_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext
                           ) -> coordinator_pb2.GetModelInfoResponse:
        """The model, its classes, the samplers and the stage chain with its health."""
        try:
            return await self.info.describe()
        except ServiceError as error:
            await context.abort_with_status(to_grpc_status(error))

