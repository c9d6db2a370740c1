"""Runs services as child processes: waits for their health, restarts the ones that die
(as Kubernetes restarts a pod), and stops them all, leaving no orphan."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .plan import ServiceSpec

log = logging.getLogger("ditserve.up")


# Runs in the child: ask Linux for SIGTERM when the launcher dies (even by SIGKILL), then
# exec the service. A wrapper rather than preexec_fn: forking a process that has gRPC
# threads and then running Python code before exec is unsafe.
_EXEC_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('ditserve up: the launcher is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def _with_parent_death_signal(argv: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *argv]


def is_serving(address: str, timeout: float = 1.0) -> bool:
    """Whether the gRPC health service at `address` answers SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class ManagedService:
    """A service and its current process."""

    spec: ServiceSpec
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_restart: float = 0.0
    log_file: object = field(default=None, repr=False)

    def start(self) -> None:
        self.process = subprocess.Popen(_with_parent_death_signal(self.spec.argv),
                                        stdout=self.log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


class Supervisor:
    """Starts the planned services in order and keeps them running until stopped."""

    def __init__(self, specs: list[ServiceSpec], log_dir: str | None = None,
                 start_timeout: float = 300.0, grace: float = 10.0):
        self.services = [ManagedService(spec) for spec in specs]
        self.log_dir, self.start_timeout, self.grace = log_dir, start_timeout, grace
        self.stopping = False

    def start_all(self) -> None:
        """Starts every service, waiting for each to be healthy before the next."""
        for service in self.services:
            if self.log_dir:
                os.makedirs(self.log_dir, exist_ok=True)
                service.log_file = open(os.path.join(self.log_dir, f"{service.spec.name}.log"), "ab")  # noqa: SIM115
            service.start()
            log.info("started %s (pid %d) on %s", service.spec.name, service.process.pid,
                     service.spec.address)
            self._wait_healthy(service)

    def _wait_healthy(self, service: ManagedService) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not is_serving(service.spec.address):
            code = service.exited()
            if code is not None:
                raise RuntimeError(f"{service.spec.name} exited with code {code} while starting"
                                   + self._log_hint(service))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service.spec.name} not healthy after {self.start_timeout:.0f} s"
                                   + self._log_hint(service))
            time.sleep(0.2)
        log.info("%s is serving on %s", service.spec.name, service.spec.address)

    def _log_hint(self, service: ManagedService) -> str:
        return f" (log: {self.log_dir}/{service.spec.name}.log)" if self.log_dir else ""

    def supervise_once(self) -> None:
        """Restarts any service that died, with backoff (1, 2, 4, ... s, at most 30 s)."""
        now = time.monotonic()
        for service in self.services:
            code = service.exited()
            if code is None or self.stopping:
                continue
            if service.next_restart == 0.0:
                delay = min(30.0, 2.0 ** service.restarts)
                service.next_restart = now + delay
                log.warning("%s exited with code %s; restarting in %.0f s", service.spec.name,
                            code, delay)
            elif now >= service.next_restart:
                service.restarts += 1
                service.next_restart = 0.0
                service.start()
                log.warning("restarted %s (pid %d, restart #%d)", service.spec.name,
                            service.process.pid, service.restarts)

    def stop_all(self) -> None:
        """SIGTERM to every service (coordinator first), then SIGKILL after the grace."""
        self.stopping = True
        running = [s for s in reversed(self.services) if s.exited() is None]
        for service in running:
            service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for service in running:
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", service.spec.name, self.grace)
                service.process.kill()
                service.process.wait()
        for service in self.services:
            if service.log_file:
                service.log_file.close()
        log.info("stopped %d services", len(self.services))
