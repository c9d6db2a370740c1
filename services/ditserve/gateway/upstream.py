"""The gateway's side of the coordinator: one SDK client per caller's token, and health.

Each accepted token gets its own `AsyncClient` (its own channel), so the token rides on
every call as `authorization: Bearer …` through the SDK's public API. Only tokens that
passed the gateway's check get a client, so there are at most as many as the tokens
file lists; with the check off, one client calls without a token.
"""

from __future__ import annotations

import grpc
from ditserve_client import AsyncClient
from ditserve_client.channel import ChannelSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .config import GatewayConfig

HEALTH_TIMEOUT_S = 2.0


class Upstream:
    """Clients of the coordinator, made on first use inside the server's event loop."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self._clients: dict[str | None, AsyncClient] = {}
        self._health_channel: grpc.aio.Channel | None = None

    def client(self, token: str | None) -> AsyncClient:
        """The client that calls with `token` (already checked by the caller)."""
        if token not in self._clients:
            self._clients[token] = AsyncClient(
                self.config.target, tls=self.config.tls,
                root_certificates=self.config.root_certificates, token=token,
                timeout=self.config.timeout, retries=self.config.retries)
        return self._clients[token]

    async def health(self) -> str:
        """The coordinator's grpc.health.v1 status name, or "UNREACHABLE"."""
        if self._health_channel is None:
            settings = ChannelSettings(self.config.target, self.config.tls,
                                       self.config.root_certificates)
            self._health_channel = settings.open(grpc.aio)
        stub = health_pb2_grpc.HealthStub(self._health_channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        if self._health_channel is not None:
            await self._health_channel.close()
