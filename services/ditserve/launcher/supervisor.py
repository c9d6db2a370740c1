"""Runs services as child processes: starts each wave together and waits for its health,
restarts the ones that die (as Kubernetes restarts a pod, with a backoff that resets once a
service has run well), and stops them all, leaving no orphan."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .plan import ServiceSpec

log = logging.getLogger("ditserve.up")

LOG_TAIL_LINES = 12
"""Lines of a failed service's log shown with its error."""


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


class ServiceFailed(Exception):
    """A service exited or stayed unhealthy while starting: which, why, and its log's tail."""

    def __init__(self, name: str, cause: str, log_path: Path, log_tail: list[str]):
        super().__init__(f"{name} failed to start: {cause}")
        self.name, self.cause, self.log_path, self.log_tail = name, cause, log_path, log_tail


class Interrupted(Exception):
    """A stop was asked for (SIGINT/SIGTERM) while services were starting."""


@dataclass
class RestartBackoff:
    """Delay before restarting a service that died: 1, 2, 4, ... s (at most `cap`), back to
    1 s once a run has lasted `reset_after` s (a crash after a healthy period is not a
    crash loop; Kubernetes resets CrashLoopBackOff the same way)."""

    cap: float = 30.0
    reset_after: float = 10.0
    failures: int = 0
    """Consecutive short runs so far."""

    def on_exit(self, ran_for: float) -> float:
        """The delay before the next start of a process that ran for `ran_for` s."""
        if ran_for >= self.reset_after:
            self.failures = 0
        delay = min(self.cap, 2.0 ** self.failures)
        self.failures += 1
        return delay


@dataclass
class ManagedService:
    """A service, its current process and its log file."""

    spec: ServiceSpec
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_restart: float | None = None
    """When a dead process is due to be restarted; None while it runs."""
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self, now: float) -> None:
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(_with_parent_death_signal(self.spec.argv),
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        self.started_at, self.next_restart = now, None

    def exited(self) -> int | None:
        """The exit code of a process that has ended; None if it runs or never started."""
        return None if self.process is None else self.process.poll()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def failure_cause(code: int, tail: list[str]) -> str:
    """One line: the exit code and the service's own last word (the CLI's one-line error,
    or the last line of a traceback). What Python prints while tearing down after the
    failure ("Exception ignored in ...") is an echo, not the cause."""
    echo = next((i for i, line in enumerate(tail) if line.startswith("Exception ignored in")),
                len(tail))
    said = next((line.strip() for line in reversed(tail[:echo])
                 if line.startswith("ditserve ") or line.split(":")[0].endswith(("Error",
                                                                                "Exception"))),
                tail[echo - 1].strip() if echo else "")
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return f"{how}: {said}" if said else how


class Supervisor:
    """Starts the planned services wave by wave and keeps them running until stopped."""

    def __init__(self, specs: list[ServiceSpec], run_dir: Path, start_timeout: float = 300.0,
                 grace: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.services = [ManagedService(spec, run_dir / f"{spec.name}.log") for spec in specs]
        self.run_dir, self.start_timeout, self.grace, self.clock = (
            run_dir, start_timeout, grace, clock)
        self.stop_requested = threading.Event()
        """Set from a signal handler: start-up waits and the supervise loop end promptly."""

    def start_all(self) -> None:
        """Starts every wave's services together and waits until they all serve; raises
        ServiceFailed (naming the service) or Interrupted."""
        for wave in sorted({service.spec.wave for service in self.services}):
            starting = [s for s in self.services if s.spec.wave == wave]
            for service in starting:
                service.start(self.clock())
                log.info("started %s (pid %d) on %s", service.spec.name, service.process.pid,
                         service.spec.listen)
            self._wait_healthy(starting)

    def _wait_healthy(self, services: list[ManagedService]) -> None:
        deadline = self.clock() + self.start_timeout
        waiting = list(services)
        while waiting:
            for service in list(waiting):
                code = service.exited()
                if code is not None:
                    tail = service.log_tail()
                    raise ServiceFailed(service.spec.name, failure_cause(code, tail),
                                        service.log_path, tail)
                if is_serving(service.spec.address, timeout=0.5):
                    log.info("%s is serving on %s", service.spec.name, service.spec.address)
                    waiting.remove(service)
            if waiting and self.clock() > deadline:
                service = waiting[0]
                raise ServiceFailed(service.spec.name, f"not serving after {self.start_timeout:.0f} s "
                                    "(--start-timeout)", service.log_path, service.log_tail())
            if waiting and self.stop_requested.wait(0.2):
                raise Interrupted

    def supervise_once(self) -> None:
        """Restarts any service that died, after its backoff."""
        now = self.clock()
        for service in self.services:
            code = service.exited()
            if code is None or self.stop_requested.is_set():
                continue
            if service.next_restart is None:
                delay = service.backoff.on_exit(now - service.started_at)
                service.next_restart = now + delay
                log.warning("%s exited with code %s; restarting in %.0f s", service.spec.name,
                            code, delay)
            elif now >= service.next_restart:
                service.restarts += 1
                service.start(now)
                log.warning("restarted %s (pid %d, restart #%d)", service.spec.name,
                            service.process.pid, service.restarts)

    def run_until_stopped(self, poll: float = 0.25) -> None:
        """Supervises until `stop_requested` is set."""
        while not self.stop_requested.wait(poll):
            self.supervise_once()

    def stop_all(self) -> None:
        """SIGTERM to every running service at once (each drains on its own), then SIGKILL
        to any still running after the grace."""
        self.stop_requested.set()
        running = [s for s in reversed(self.services) if s.running()]
        for service in running:
            service.process.send_signal(signal.SIGTERM)
        deadline = self.clock() + self.grace
        for service in running:
            try:
                service.process.wait(timeout=max(0.1, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", service.spec.name, self.grace)
                service.process.kill()
                service.process.wait()
        for service in self.services:
            service.close()
        log.info("stopped %d services", len(running))
