"""Stage worker processes on loopback for a benchmark, started and stopped together.

    with StageProcesses(checkpoint, stages=4, threads=1) as chain:
        RemoteChain(chain.address)   # stage 0
        chain.scrape()               # each stage's Prometheus metrics

Each stage is `ditserve stage ...` in its own process (common/process.py, the one way
every service process is started) with its own torch thread count (OMP_NUM_THREADS as
well, so that the compute thread gets it). `stop()` runs even on Ctrl-C during start-up.
"""

from __future__ import annotations

import tempfile
import urllib.request
from pathlib import Path

from ditserve.common.process import (
    ServiceProcess,
    ditserve_argv,
    free_port,
    stop_all,
    thread_env,
    wait_serving,
)

START_TIMEOUT_S = 300.0


class StageProcesses:
    """`stages` stage workers of one checkpoint, chained on free loopback ports."""

    def __init__(self, checkpoint: str | Path, stages: int, threads: int = 1,
                 wire_dtype: str = "bf16", device: str = "cpu", max_batch: int = 64):
        self.checkpoint, self.stages, self.threads = str(checkpoint), stages, threads
        self.wire_dtype, self.device, self.max_batch = wire_dtype, device, max_batch
        self.ports = [free_port() for _ in range(stages)]
        self.metrics_ports = [free_port() for _ in range(stages)]
        self.log_dir = Path(tempfile.mkdtemp(prefix="ditserve-bench-"))
        self.processes = [ServiceProcess(f"stage-{k}", self._argv(k), f"127.0.0.1:{port}",
                                         self.log_dir / f"stage-{k}.log", thread_env(threads))
                          for k, port in enumerate(self.ports)]

    @property
    def address(self) -> str:
        """Stage 0, the chain's entry."""
        return f"127.0.0.1:{self.ports[0]}"

    def _argv(self, k: int) -> tuple[str, ...]:
        argv = ["stage", "--checkpoint", self.checkpoint, "--stage", str(k),
                "--stages", str(self.stages), "--listen", f"127.0.0.1:{self.ports[k]}",
                "--wire-dtype", self.wire_dtype, "--threads", str(self.threads),
                "--device", self.device, "--max-batch", str(self.max_batch),
                "--metrics-port", str(self.metrics_ports[k])]
        if k + 1 < self.stages:
            argv += ["--next", f"127.0.0.1:{self.ports[k + 1]}"]
        return ditserve_argv(*argv)

    def start(self) -> StageProcesses:
        """Starts every stage at once and waits until all are SERVING."""
        try:
            for process in self.processes:
                process.start()
            wait_serving(self.processes, START_TIMEOUT_S)
        except BaseException:  # Ctrl-C while waiting too: leave no stage behind
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to every stage, SIGKILL to those still alive after 10 s."""
        stop_all(self.processes, grace=10.0)
        for process in self.processes:
            process.close()

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
