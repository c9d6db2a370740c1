"""One lifecycle for every ditserve gRPC service (stage, coordinator, decoder).

A `ServiceLifecycle` owns a `grpc.aio` server configured with explicit message limits and
keepalive (grpc_options.py), the standard health service (grpc.health.v1), server
reflection, an optional Prometheus endpoint, and graceful shutdown on SIGTERM/SIGINT.
References: grpc's Python examples `health_checking`, `reflection`,
`graceful_shutdown` (asyncio variant); Kubernetes native gRPC probes.

    lifecycle = ServiceLifecycle("stage-0", listen="[::]:50052",
                                 services=["dit.v1.StageService"], metrics_port=9100)
    stage_pb2_grpc.add_StageServiceServicer_to_server(servicer, lifecycle.server)
    port = await lifecycle.start()      # bound; health NOT_SERVING; signals handled
    ...load weights, warm up...
    await lifecycle.set_serving()       # health SERVING (overall "" and each service)
    await lifecycle.wait_for_termination()   # returns after SIGTERM/SIGINT + drain

`security` (ditserve.security.ServiceSecurity) chooses TLS or plaintext for the port, the
call checks (tokens, peer identities) and an optional plaintext health-only port; without
it the server is plaintext and refuses any address but loopback.

On a signal (or `await lifecycle.shutdown()`): health → NOT_SERVING, the server stops
accepting calls and in-flight calls get `grace` seconds to finish (`server.stop(grace)`);
then `on_shutdown` callbacks run (close client channels, stop compute threads).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .grpc_options import MAX_MESSAGE_BYTES, server_options
from .logs import log_event
from .metrics import serve_metrics

if TYPE_CHECKING:
    from ditserve.security.service import ServiceSecurity

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceLifecycle:
    """A grpc.aio server with health, reflection, metrics and graceful shutdown."""

    def __init__(self, name: str, listen: str, services: Sequence[str],
                 metrics_port: int | None = None, grace: float = 5.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 security: ServiceSecurity | None = None):
        from ditserve.security.service import ServiceSecurity  # here: it imports ditserve.common

        self.name, self.listen, self.grace = name, listen, grace
        self.services = list(services)
        self.metrics_port = metrics_port
        self.security = security or ServiceSecurity.internal(ServiceSecurity.PLAINTEXT, name, ())
        self.server = grpc.aio.server(options=server_options(max_message_bytes),
                                      interceptors=self.security.interceptors())
        self._health_server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self._on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Binds, registers health and reflection (NOT_SERVING), starts serving calls and
        handling signals; returns the bound port (useful with port 0)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        for service in ["", *self.services]:
            await self.health.set(service, NOT_SERVING)
        port = self.security.bind(self.server, self.listen)
        if port == 0:
            raise OSError(f"{self.name}: cannot listen on {self.listen}")
        await self.server.start()
        self._health_server = await self.security.serve_health(self.health)
        serve_metrics(self.metrics_port)
        self._install_signal_handlers()
        log_event("listening", name=self.name, address=self.listen, port=port,
                  metrics_port=self.metrics_port or "")
        return port

    async def set_serving(self, serving: bool = True) -> None:
        """Health of the whole server and each service: SERVING once ready."""
        for service in ["", *self.services]:
            await self.health.set(service, SERVING if serving else NOT_SERVING)
        log_event("health", name=self.name, status="SERVING" if serving else "NOT_SERVING")

    def on_shutdown(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Runs `callback` after the server has drained (e.g. closing client channels)."""
        self._on_shutdown.append(callback)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log_event("signal", name=self.name, signal=sig.name)
        asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self) -> None:
        """NOT_SERVING, stop accepting, drain in-flight calls for `grace` s, clean up."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.health.enter_graceful_shutdown()
        log_event("draining", name=self.name, grace_seconds=self.grace)
        await self.server.stop(self.grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        for callback in self._on_shutdown:
            await callback()
        log_event("stopped", name=self.name)
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        """Returns once the server has been shut down (by a signal or `shutdown`)."""
        await self._stopped.wait()
