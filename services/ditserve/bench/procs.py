"""Stage worker processes on loopback for a benchmark, started and stopped together.

    with StageProcesses(checkpoint, stages=4, threads=1) as chain:
        RemoteChain(chain.address)   # stage 0
        chain.scrape()               # each stage's Prometheus metrics

Each stage is `ditserve stage ...` in its own process with its own torch thread count
(OMP_NUM_THREADS as well, so that the compute thread gets it). The same idea as the test
suite's launcher, kept here because bench code must not import from tests/. No
`preexec_fn` (such as a parent-death signal): forking in Python while gRPC threads of an
open chain are live broke the child's gRPC event engine ("epoll_wait error: Bad file
descriptor"); cleanup relies on `stop()`, which runs even on Ctrl-C during start-up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ditserve.launcher.supervisor import is_serving

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a child limited to `threads` compute threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class StageProcesses:
    """`stages` stage workers of one checkpoint, chained on free loopback ports."""

    def __init__(self, checkpoint: str | Path, stages: int, threads: int = 1,
                 wire_dtype: str = "bf16", device: str = "cpu", max_batch: int = 64):
        self.checkpoint, self.stages, self.threads = str(checkpoint), stages, threads
        self.wire_dtype, self.device, self.max_batch = wire_dtype, device, max_batch
        self.ports = [free_port() for _ in range(stages)]
        self.metrics_ports = [free_port() for _ in range(stages)]
        self.processes: list[subprocess.Popen] = []
        self.log_dir = Path(tempfile.mkdtemp(prefix="ditserve-bench-"))

    @property
    def address(self) -> str:
        """Stage 0, the chain's entry."""
        return f"127.0.0.1:{self.ports[0]}"

    def _argv(self, k: int) -> list[str]:
        argv = [sys.executable, "-m", "ditserve.cli", "stage", "--checkpoint", self.checkpoint,
                "--stage", str(k), "--stages", str(self.stages),
                "--listen", f"127.0.0.1:{self.ports[k]}", "--wire-dtype", self.wire_dtype,
                "--threads", str(self.threads), "--device", self.device,
                "--max-batch", str(self.max_batch), "--metrics-port", str(self.metrics_ports[k])]
        if k + 1 < self.stages:
            argv += ["--next", f"127.0.0.1:{self.ports[k + 1]}"]
        return argv

    def start(self) -> StageProcesses:
        """Starts every stage at once and waits until all are SERVING."""
        for k in range(self.stages):
            log = open(self.log_dir / f"stage-{k}.log", "wb")  # noqa: SIM115 (child owns it)
            self.processes.append(subprocess.Popen(
                self._argv(k), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=thread_env(self.threads)))
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            for k in range(self.stages):
                self._wait(k, deadline)
        except BaseException:  # Ctrl-C while waiting too: leave no stage behind
            self.stop()
            raise
        return self

    def _wait(self, k: int, deadline: float) -> None:
        while not is_serving(f"127.0.0.1:{self.ports[k]}"):
            if self.processes[k].poll() is not None or time.monotonic() > deadline:
                log = (self.log_dir / f"stage-{k}.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"stage {k} of {self.stages} did not start:\n{log}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to every stage, SIGKILL to those still alive after 10 s."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def scrape(self) -> list[dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        """Each stage's metrics: (sample name, sorted labels) → value."""
        return [scrape(f"http://127.0.0.1:{port}/metrics") for port in self.metrics_ports]

    def __enter__(self) -> StageProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus text endpoint as a flat dict of samples."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))
