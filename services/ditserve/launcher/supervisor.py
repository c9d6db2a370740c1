"""Runs services as child processes (common/process.py): starts each wave together and waits
for its health, restarts the ones that die (as Kubernetes restarts a pod, with a backoff that
resets once a service has run well) or stop answering their health checks (Kubernetes'
liveness probe), and stops them all, leaving no orphan."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditserve.common.process import ServiceProcess, stop_all, wait_serving
from ditserve.common.segments import remove_orphans

from .plan import ServiceSpec

log = logging.getLogger("ditserve.up")


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


@dataclass(frozen=True)
class LivenessProbe:
    """Kubernetes' livenessProbe for local processes: each running service's health check
    every `period` s with a `timeout`; after `failures` unanswered in a row (a frozen or
    deadlocked process: ~period x failures s) it is killed with SIGKILL and restarted.
    Any answer counts, NOT_SERVING too (a coordinator whose stage is down is alive). A
    (re)started service is probed only once it has answered SERVING (it may be loading
    weights: Kubernetes' startupProbe)."""

    period: float = 2.0
    timeout: float = 1.0
    failures: int = 3

    def __post_init__(self) -> None:
        if self.period <= 0 or self.timeout <= 0 or self.failures < 1:
            raise ValueError(f"liveness probe needs period and timeout > 0 and failures >= 1, "
                             f"got {self}")


@dataclass
class ManagedService:
    """A planned service, its process and its restart state."""

    spec: ServiceSpec
    process: ServiceProcess
    started_at: float = 0.0
    restarts: int = 0
    next_restart: float | None = None
    """When a dead process is due to be restarted; None while it runs."""
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    serving: bool = False
    """Whether it has answered SERVING since it was (re)started: liveness probes apply."""
    missed: int = 0
    """Liveness probes unanswered in a row."""
    next_probe: float = 0.0

    def start(self, now: float) -> None:
        self.process.start()
        self.started_at, self.next_restart = now, None
        self.serving, self.missed, self.next_probe = False, 0, now


def _remove_segments(service: ManagedService) -> None:
    """Unlinks the shared-memory segments an exited service created but no peer mapped
    (killed between creating one and the peer's answer): its pid is dead, so they are
    orphans whatever their age."""
    process = service.process
    if process.proc is None or process.exited() is None:
        return
    for path in remove_orphans(pids=[process.pid]):
        log.warning("removed %s, left by %s (pid %d)", path, service.spec.name, process.pid)


class Supervisor:
    """Starts the planned services wave by wave and keeps them running until stopped."""

    def __init__(self, specs: list[ServiceSpec], run_dir: Path, start_timeout: float = 300.0,
                 grace: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 health_credentials: Any = None,
                 liveness: LivenessProbe | None = LivenessProbe()):
        # health_credentials: grpc.ChannelCredentials for the health checks of TLS services;
        # liveness: None probes nothing (only exits are restarted).
        self.services = [ManagedService(spec, ServiceProcess(
            spec.name, spec.argv, spec.address, run_dir / f"{spec.name}.log",
            health=spec.health, health_credentials=health_credentials))
                         for spec in specs]
        self.start_timeout, self.grace, self.clock = start_timeout, grace, clock
        self.liveness = liveness
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
            wait_serving([s.process for s in starting], self.start_timeout, self.stop_requested)
            for service in starting:
                service.serving = True
                log.info("%s is serving on %s", service.spec.name, service.spec.address)

    def supervise_once(self) -> None:
        """Restarts any service that died, after its backoff; probes the others' liveness."""
        now = self.clock()
        for service in self.services:
            if self.stop_requested.is_set():
                return
            code = service.process.exited()
            if code is None:
                self._probe(service, now)
                continue
            if service.next_restart is None:
                _remove_segments(service)
                delay = service.backoff.on_exit(now - service.started_at)
                service.next_restart = now + delay
                log.warning("%s exited with code %s; restarting in %.0f s", service.spec.name,
                            code, delay)
            elif now >= service.next_restart:
                service.restarts += 1
                service.start(now)
                log.warning("restarted %s (pid %d, restart #%d)", service.spec.name,
                            service.process.pid, service.restarts)

    def _probe(self, service: ManagedService, now: float) -> None:
        """One liveness probe when due; SIGKILL after `failures` unanswered in a row (the
        next round sees the exit and restarts it)."""
        probe = self.liveness
        if probe is None or now < service.next_probe:
            return
        service.next_probe = now + probe.period
        if not service.serving:  # restarted, still starting: wait for its first SERVING
            service.serving = service.process.serving(probe.timeout)
            return
        if service.process.answers(probe.timeout):
            service.missed = 0
            return
        service.missed += 1
        name, pid = service.spec.name, service.process.pid
        if service.missed < probe.failures:
            log.warning("%s (pid %d) did not answer its health check within %g s (%d of %d)",
                        name, pid, probe.timeout, service.missed, probe.failures)
            return
        log.warning("%s (pid %d) did not answer %d health checks in a row (every %g s); "
                    "killing it (SIGKILL) to restart it", name, pid, probe.failures,
                    probe.period)
        service.process.kill()

    def run_until_stopped(self, poll: float = 0.25) -> None:
        """Supervises until `stop_requested` is set."""
        while not self.stop_requested.wait(poll):
            self.supervise_once()

    def stop_all(self) -> None:
        """SIGTERM to every running service at once (coordinator first; each drains on its
        own), SIGKILL to any still running after the grace."""
        self.stop_requested.set()
        processes = [s.process for s in reversed(self.services)]
        running = sum(p.running() for p in processes)
        stop_all(processes, self.grace)
        for service in self.services:
            _remove_segments(service)
        for process in processes:
            process.close()
        log.info("stopped %d services", running)
