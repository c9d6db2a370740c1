"""One way to start a ditserve service as a process, used by the launcher (`ditserve up`),
the benchmarks, the demo and the tests.

    process = ServiceProcess("stage-0", ditserve_argv("stage", ...), "127.0.0.1:50052",
                             log_path).start()
    process.wait_serving(timeout=60)   # grpc.health.v1 SERVING, or ServiceFailed
    ...
    process.stop(grace=10)             # SIGTERM (it drains), SIGKILL after the grace

- Ports: `free_port()` and `free_port_block(n)` (n consecutive ports, as `ditserve up
  --port P` uses P..P+n-1) on loopback; the OS may hand a port out again before the
  service binds it, and the service then fails at once naming the port.
- Parent death: the child asks Linux for SIGTERM when its parent thread dies (even by
  SIGKILL), so a killed launcher or test run leaves no service behind.
- Failure: a process that exits or stays unhealthy while starting raises ServiceFailed
  with one line (its name, exit code and its own last word) and the end of its log.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("ditserve.process")

LOG_TAIL_LINES = 12
"""Lines of a failed service's log shown with its error."""

# Runs in the child: ask Linux for SIGTERM when the parent dies, then exec the service. A
# wrapper rather than preexec_fn: forking a process that has gRPC threads and then running
# Python code before exec is unsafe (it broke the child's gRPC event engine in the
# benchmarks). PR_SET_PDEATHSIG follows the parent *thread*: start services from a thread
# that outlives them (the main thread in every caller here).
_EXEC_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('ditserve: the parent process is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """A port P with P..P+count-1 all free on `host` right now."""
    for _ in range(50):
        base = free_port(host)
        if base + count > 65536:
            continue
        try:
            for offset in range(count):
                with socket.socket() as sock:
                    sock.bind((host, base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def ditserve_argv(*args: str) -> tuple[str, ...]:
    """The command line of `ditserve ARGS` with this interpreter."""
    return (sys.executable, "-m", "ditserve.cli", *args)


def thread_env(threads: int) -> dict[str, str]:
    """This environment, with the child's compute limited to `threads` threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def health_status(address: str, timeout: float = 1.0, credentials: Any = None) -> int | None:
    """The grpc.health.v1 status the service at `address` answers (over TLS with
    `credentials`, a grpc.ChannelCredentials); None when it does not answer in time."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return None
    return reply.status


def is_serving(address: str, timeout: float = 1.0, credentials: Any = None) -> bool:
    """Whether the gRPC health service at `address` answers SERVING."""
    from grpc_health.v1 import health_pb2

    status = health_status(address, timeout, credentials)
    return status == health_pb2.HealthCheckResponse.SERVING


class ServiceFailed(Exception):
    """A service exited or stayed unhealthy while starting: which, why, and its log's tail."""

    def __init__(self, name: str, cause: str, log_path: Path, log_tail: list[str]):
        super().__init__(f"{name} failed to start: {cause}")
        self.name, self.cause, self.log_path, self.log_tail = name, cause, log_path, log_tail


class Interrupted(Exception):
    """A stop was asked for while services were starting."""


def failure_cause(code: int, tail: list[str]) -> str:
    """One line: the exit code and the service's own last word (the CLI's one-line error,
    or the last line of a traceback). What Python prints while tearing down after the
    failure ("Exception ignored in ...") is an echo, and indented lines quote others (a
    traceback's frames, `ditserve up` quoting a service's log): not the cause."""
    echo = next((i for i, line in enumerate(tail) if line.startswith("Exception ignored in")),
                len(tail))
    own = [line for line in tail[:echo] if not line[:1].isspace()]  # indented: quoted
    said = next((line.strip() for line in reversed(own)
                 if line.startswith("ditserve ") or line.split(":")[0].endswith(("Error",
                                                                                "Exception"))),
                own[-1].strip() if own else "")
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return f"{how}: {said}" if said else how


class ServiceProcess:
    """A ditserve service in a child process that serves gRPC health at `address` (or, with
    health="http", GET /healthz: the HTTP gateway), with its stdout and stderr appended to
    `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], address: str, log_path: Path,
                 env: Mapping[str, str] | None = None, health: str = "grpc",
                 health_credentials: Any = None):
        if health not in ("grpc", "http"):
            raise ValueError(f"health must be grpc or http, got {health!r}")
        self.name, self.argv, self.address, self.health = name, tuple(argv), address, health
        self.health_credentials = health_credentials
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Spawns it (again, if it had exited); does not wait."""
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *self.argv],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def exited(self) -> int | None:
        """The exit code of a process that has ended; None if it runs or never started."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def serving(self, timeout: float = 1.0) -> bool:
        """Whether it answers its health check now."""
        if self.health == "http":
            from ditserve.gateway.probe import is_serving as http_serving  # stdlib only

            return http_serving(self.address, timeout)
        return is_serving(self.address, timeout, self.health_credentials)

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether its health check answers at all, whatever the status (a liveness probe:
        NOT_SERVING while a peer is down is an answer; a frozen process gives none)."""
        if self.health == "http":
            from ditserve.gateway.probe import answers  # stdlib only

            return answers(self.address, timeout)
        return health_status(self.address, timeout, self.health_credentials) is not None

    def wait_serving(self, timeout: float, stop: threading.Event | None = None) -> None:
        """Returns once it answers SERVING; ServiceFailed if it exits or times out,
        Interrupted as soon as `stop` is set."""
        wait_serving([self], timeout, stop)

    def failed(self, cause: str | None = None) -> ServiceFailed:
        """The error of this process failing to start (its exit code, or `cause`)."""
        tail = self.log_tail()
        code = self.exited()
        return ServiceFailed(self.name, cause or failure_cause(code if code is not None else 0,
                                                               tail), self.log_path, tail)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last non-empty lines of its log."""
        return [line for line in self.log().splitlines() if line.strip()][-lines:]

    def log(self, chars: int = 1 << 16) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def terminate(self, grace: float = 10.0) -> int | None:
        """SIGTERM (the service drains), SIGKILL after `grace` s; its exit code."""
        return stop_all([self], grace)[0] if self.proc is not None else None

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Kills it if still running and closes its log file."""
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_serving(processes: Sequence[ServiceProcess], timeout: float,
                 stop: threading.Event | None = None) -> None:
    """Waits for every process (started together) to answer SERVING: ServiceFailed names
    the first that exits or is not serving after `timeout` s."""
    deadline = time.monotonic() + timeout
    waiting = list(processes)
    while waiting:
        for process in list(waiting):
            if process.exited() is not None:
                raise process.failed()
            if process.serving(timeout=0.5):
                waiting.remove(process)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise waiting[0].failed(f"not serving after {timeout:.0f} s")
        if stop is not None and stop.wait(0.2):
            raise Interrupted
        if stop is None:
            time.sleep(0.2)


def stop_all(processes: Sequence[ServiceProcess], grace: float = 10.0) -> list[int | None]:
    """SIGTERM to every running process at once (each drains on its own), SIGKILL to any
    still running after `grace` s; their exit codes (None for never started)."""
    running = [p for p in processes if p.running()]
    for process in running:
        process.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", process.name, grace)
            process.kill()
    return [p.proc.returncode if p.proc is not None else None for p in processes]
