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

A service process runs its `serve` coroutine with `run_service`, which ends the process as
soon as the shutdown above is done (see there why).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .address import split_host_port as address_split
from .grpc_options import MAX_MESSAGE_BYTES, server_options
from .logs import log_event
from .metrics import serve_metrics
from .status import UserError

if TYPE_CHECKING:
    from ditserve.security.service import ServiceSecurity

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


_STARTED: contextvars.ContextVar[list[ServiceLifecycle] | None] = contextvars.ContextVar(
    "ditserve_started_lifecycles", default=None)
"""The lifecycles started under `run_service`, which stops them if `serve` fails."""


class ListenError(UserError, ValueError):
    """The server cannot bind its address (port taken, address not on this host): a
    UserError, so the CLI prints it as one line."""


def split_host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:50051' → ('127.0.0.1', 50051); ListenError if it is not HOST:PORT."""
    return address_split(address, f"address {address!r}", ListenError)


def bind_error(address: str) -> str | None:
    """Why `address` cannot be bound right now (as gRPC would bind it, with SO_REUSEADDR
    and without SO_REUSEPORT), or None if it can."""
    host, port = split_host_port(address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        return f"unknown host {host!r} ({error.strerror})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"port {port} is already in use"
            return f"{error.strerror or error}"
    return None


class ServiceLifecycle:
    """A grpc.aio server with health, reflection, metrics and graceful shutdown."""

    def __init__(self, name: str, listen: str, services: Sequence[str],
                 metrics_port: int | None = None, grace: float = 5.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 security: ServiceSecurity | None = None, max_receive_bytes: int | None = None):
        from ditserve.security.service import ServiceSecurity  # here: it imports ditserve.common

        self.name, self.listen, self.grace = name, listen, grace
        self.services = list(services)
        self.metrics_port = metrics_port
        self.security = security or ServiceSecurity.internal(ServiceSecurity.PLAINTEXT, name, ())
        self.server = grpc.aio.server(options=server_options(max_message_bytes, max_receive_bytes),
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
        port = self._bind()
        await self.server.start()
        self._health_server = await self.security.serve_health(self.health)
        started = _STARTED.get()
        if started is not None:
            started.append(self)
        self._serve_metrics()
        self._install_signal_handlers()
        log_event("listening", name=self.name, address=self.listen, port=port,
                  metrics_port=self.metrics_port or "")
        return port

    def _bind(self) -> int:
        """Binds the listen address; one clear line when it is taken (grpc only says
        "Failed to bind")."""
        try:
            port = self.security.bind(self.server, self.listen)
        except RuntimeError:
            cause = bind_error(self.listen) or "gRPC could not bind it"
            raise ListenError(f"{self.name} cannot listen on {self.listen}: {cause}") from None
        if port == 0:
            raise ListenError(f"{self.name} cannot listen on {self.listen}")
        return port

    def _serve_metrics(self) -> None:
        """The Prometheus endpoint, on the same interface as the service."""
        host = split_host_port(self.listen)[0] or "0.0.0.0"
        try:
            serve_metrics(self.metrics_port, host)
        except OSError as error:
            raise ListenError(f"{self.name} cannot serve metrics on {host}:{self.metrics_port}: "
                              f"{error.strerror or error}") from None

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


def run_service(serve: Coroutine[Any, Any, None]) -> NoReturn:
    """Runs a service's `serve()` coroutine to its end, then ends the process at once.

    By the time `serve` returns, the lifecycle has drained the server, closed the channels
    and stopped the compute threads. If `serve` fails (weights that do not load), its
    started servers are stopped before the event loop closes, then the error raises (and
    prints) normally: a gRPC server left running past its loop is torn down by the
    garbage collector on a closed loop ("Event loop is closed"; once, a SIGSEGV)."""
    asyncio.run(_stopping_on_failure(serve))
    exit_process(0)


async def _stopping_on_failure(serve: Coroutine[Any, Any, None]) -> None:
    started: list[ServiceLifecycle] = []
    _STARTED.set(started)
    try:
        await serve
    except BaseException:
        for lifecycle in started:
            if not lifecycle._stopped.is_set():
                await lifecycle.server.stop(0)
        raise


def exit_process(code: int) -> NoReturn:
    """Flushes stdout and stderr and ends the process, skipping the interpreter's teardown.

    For a process whose gRPC work is done: gRPC core's teardown at interpreter exit waits
    up to 2 s for its OpenSSL cleanup even without TLS (grpc/grpc#38679, #39297), so a
    stopped service lingered ~2 s after logging "stopped" (measured), and the launcher
    waited on it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
