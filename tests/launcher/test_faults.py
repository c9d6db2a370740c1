"""Faults under `ditserve up` (issue 14), against real processes:

- SIGKILL of the coordinator mid-run (the launcher restarts it): the sync and asyncio SDK
  and the CLI resume every stream; each request's latents equal the undisturbed run's and
  the consumer sees steps 1..N exactly once each.
- SIGSTOP of a stage: the launcher's liveness probe kills and restarts it (new pid), and a
  generation afterwards works.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import UpCluster, descendants, is_alive
from ditserve.common.process import is_serving
from ditserve_client import AsyncClient, Client, Progress, Result
from numerics import assert_scaled_close, sampling_bound

STEPS, GUIDANCE = 120, 4.0
OPTIONS = dict(steps=STEPS, sampler="ddim", guidance=GUIDANCE, return_latents=True,
               skip_images=True)
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_checkpoint):
    """`ditserve up`: 2 stages (fp32 wire), a coordinator, no decoder; default probes."""
    tmp = tmp_path_factory.mktemp("faults")
    up = UpCluster(["--checkpoint", str(tiny_checkpoint), "--stages", "2", "--no-decoder",
                    "--wire-dtype", "fp32"], tmp / "logs")
    try:
        yield up.start(), tmp
    finally:
        up.stop()


@pytest.fixture(scope="module")
def undisturbed(cluster) -> dict[int, np.ndarray]:
    """Latents of each seed from an undisturbed run."""
    up, _ = cluster
    with Client(up.target, timeout=120) as client:
        return {seed: client.generate_result([seed % 10], seed=seed, **OPTIONS)
                .latents.to_numpy() for seed in SEEDS}


def _pid(up: UpCluster, role: str, timeout: float = 30.0) -> int:
    """The pid of the running service whose command line has ` ROLE ` (waits while a
    restarted one is still exec'ing from its start-up wrapper)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [pid for pid in descendants(up.proc.pid) if f" {role} " in f"{_cmdline(pid)} "
                 and is_alive(pid) and "-c" not in _cmdline(pid).split()[1:2]]
        if len(found) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(found) == 1, (role, found)
    return found[0]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_serving(address: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_serving(address):
        assert time.monotonic() < deadline, f"{address} is not serving"
        time.sleep(0.5)


class Seen:
    """What one consumer saw: its events, in order."""

    def __init__(self) -> None:
        self.events: list = []

    @property
    def mid_run(self) -> bool:
        return any(isinstance(e, Progress) for e in self.events) and not self.done

    @property
    def done(self) -> bool:
        return any(isinstance(e, Result) for e in self.events)

    def check(self, expected: np.ndarray, seed: int) -> None:
        """Accepted once, steps 1..N once each in order, then the undisturbed latents."""
        kinds = [type(e).__name__ for e in self.events]
        assert kinds[0] == "Accepted" and kinds.count("Accepted") == 1, kinds
        assert [e.step for e in self.events if isinstance(e, Progress)] == list(
            range(1, STEPS + 1))
        result = self.events[-1]
        assert isinstance(result, Result) and result.seed == seed
        assert_scaled_close(result.latents.to_numpy(), expected,
                            sampling_bound(STEPS, GUIDANCE), f"seed {seed} resumed")


def _kill_coordinator_when(up: UpCluster, seen: list[Seen], timeout: float = 60.0) -> None:
    """SIGKILL the coordinator once every consumer is mid-run."""
    deadline = time.monotonic() + timeout
    while not all(s.mid_run for s in seen):
        assert time.monotonic() < deadline and not any(s.done for s in seen), (
            "requests finished before the coordinator could be killed mid-run")
        time.sleep(0.02)
    os.kill(_pid(up, "coordinator"), signal.SIGKILL)


def test_sync_clients_resume_after_the_coordinator_is_killed(cluster, undisturbed):
    up, _ = cluster
    _wait_serving(up.target)
    seen = {seed: Seen() for seed in SEEDS}
    errors: list[BaseException] = []

    def consume(seed: int) -> None:
        try:
            with Client(up.target, timeout=300) as client:
                for event in client.generate([seed % 10], seed=seed, **OPTIONS):
                    seen[seed].events.append(event)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=consume, args=(seed,)) for seed in SEEDS]
    for thread in threads:
        thread.start()
    _kill_coordinator_when(up, list(seen.values()))
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    for seed in SEEDS:
        seen[seed].check(undisturbed[seed], seed)
    up.read_until("restarted coordinator", 60)


def test_asyncio_clients_resume_after_the_coordinator_is_killed(cluster, undisturbed):
    up, _ = cluster
    _wait_serving(up.target)
    seen = {seed: Seen() for seed in SEEDS}

    async def consume(client: AsyncClient, seed: int) -> None:
        async for event in client.generate([seed % 10], seed=seed, **OPTIONS):
            seen[seed].events.append(event)

    async def main() -> None:
        async with AsyncClient(up.target, timeout=300) as client:
            tasks = [asyncio.create_task(consume(client, seed)) for seed in SEEDS]
            await asyncio.to_thread(_kill_coordinator_when, up, list(seen.values()))
            await asyncio.gather(*tasks)

    asyncio.run(main())
    for seed in SEEDS:
        seen[seed].check(undisturbed[seed], seed)
    up.read_until("restarted coordinator", 60)


def test_the_cli_resumes_after_the_coordinator_is_killed(cluster, undisturbed):
    up, tmp = cluster
    _wait_serving(up.target)
    seed, latents, log = SEEDS[1], tmp / "cli.npy", tmp / "cli.err"
    argv = [sys.executable, "-m", "ditserve.cli", "generate", "--target", up.target,
            "--class", str(seed % 10), "--seed", str(seed), "--steps", str(STEPS),
            "--sampler", "ddim", "--guidance", str(GUIDANCE), "--no-images",
            "--latents-out", str(latents)]
    with open(log, "w") as err:
        cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 60
        while f"step {STEPS // 10}/" not in log.read_text():  # mid-run
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        os.kill(_pid(up, "coordinator"), signal.SIGKILL)
        out, _ = cli.communicate(timeout=300)
    finally:
        cli.kill()
    said = log.read_text()
    assert cli.returncode == 0, said
    resuming = [line for line in said.splitlines() if "resuming" in line]
    assert len(resuming) == 1 and f"seed {seed}" in resuming[0], said
    assert said.count(f"step {STEPS}/{STEPS}") == 1 and "wrote" in out
    assert_scaled_close(np.load(latents), undisturbed[seed], sampling_bound(STEPS, GUIDANCE),
                        "CLI resumed")
    up.read_until("restarted coordinator", 60)


def test_a_frozen_stage_is_killed_and_restarted(cluster):
    """SIGSTOP: the process lives but answers nothing; the liveness probe (3 x 2 s) finds
    it, SIGKILLs it and the launcher starts a new one."""
    up, _ = cluster
    _wait_serving(up.target)
    frozen = _pid(up, "--stage 1")
    os.kill(frozen, signal.SIGSTOP)
    try:
        line = up.read_until("health checks in a row", 60)
        assert "stage-1" in line and str(frozen) in line
        up.read_until("restarted stage-1", 60)
    finally:
        if is_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while is_alive(frozen):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _pid(up, "--stage 1") != frozen
    deadline = time.monotonic() + 120
    with Client(up.target, timeout=60) as client:
        while True:  # the new stage loads; the coordinator retries its microbatches
            try:
                result = client.generate_result([3], seed=9, steps=4, sampler="ddim",
                                                return_latents=True, skip_images=True)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    assert isinstance(result, Result) and result.latents.shape == (1, 4, 8, 8)
    killed = [line for line in up.lines if "killing it (SIGKILL)" in line]
    assert len(killed) == 1 and "stage-1" in killed[0], killed
