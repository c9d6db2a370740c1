"""Soak: many clients above capacity for minutes, with cancellations and one SIGKILL of
each kind of service, on a `ditserve up` pipeline. Does anything get lost, and does
memory stay put?

    ditserve bench soak --set minutes=10 --set clients=32

One `ditserve up` (a random checkpoint of `model`, `stages` stage processes, the embedded
demo VAE as decoder, `max_queued` admitted requests) and `clients` asyncio SDK clients,
each sending one-image requests back to back (no think time) until `minutes` have passed.
A `cancel_fraction` of the requests is cancelled by its client after a random wait. At
evenly spaced moments one process of each kind in `kills` (stage 0, the last stage, the
decoder, the coordinator) is SIGKILLed; the launcher restarts it and the SDK resumes
streams the coordinator took down (client/ditserve_client/resume.py).

Every request sent ends as exactly one of: completed; cancelled (by its client); refused
(failed before the server accepted it: a full queue, RESOURCE_EXHAUSTED, or no
coordinator, UNAVAILABLE), by code; failed (after it was accepted), by code; lost (no
answer when the run and a drain period are over). Latency percentiles are over the
completed requests, send to result. RSS (VmRSS of /proc/PID/status) of every service is
read after a warm-up request and at the end, by service name (a restarted service is a
new process: its RSS at the end is the new one's).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import signal
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ditserve.common.process import (
    ServiceProcess,
    ditserve_argv,
    free_port_block,
    thread_env,
)

from .load import random_checkpoint
from .report import Report

START_TIMEOUT_S = 300.0


@dataclass
class Settings:
    """What `ditserve bench soak` runs."""

    model: str = "DiT-S/2"
    """DiT config by name (random weights, 1000 classes)."""
    latent_size: int = 16
    """Latent side (16 is 128 px)."""
    stages: int = 3
    """Stage processes (1 compute thread each)."""
    steps: int = 20
    """ddim steps of every request."""
    guidance: float = 4.0
    """Guidance scale of every request."""
    clients: int = 32
    """Clients sending back to back."""
    minutes: float = 10.0
    """How long the clients send."""
    max_queued: int = 16
    """The coordinator's max_queued_requests: beyond it requests are refused."""
    cancel_fraction: float = 0.1
    """Share of requests their client cancels after a random wait (up to cancel_within s)."""
    cancel_within: float = 5.0
    kills: tuple[str, ...] = ("stage-0", "stage-last", "decoder", "coordinator")
    """Services SIGKILLed once each, evenly spread over the run ("stage-last": the last)."""
    request_timeout: float = 600.0
    """Deadline of each request (s)."""
    drain: float = 600.0
    """Seconds the requests still open at the end may take; then they count as lost. As
    long as `request_timeout`: by then every request admitted must have been answered
    (its deadline ends it), so "lost" means never answered, not slow (a 120 s drain once
    counted 29 requests still being served on a machine at load 20 as lost)."""
    seed: int = 0
    """Seed of the clients' random choices (labels, seeds, cancellations)."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-S/2", latent_size=8, stages=2, steps=4, clients=6,
                   minutes=0.5, max_queued=3, cancel_within=1.0, drain=60.0)


@dataclass
class Tally:
    """Outcomes of every request sent."""

    sent: int = 0
    completed: int = 0
    cancelled: int = 0
    refused: collections.Counter = field(default_factory=collections.Counter)
    failed: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    messages: dict[str, list[str]] = field(default_factory=dict)
    """The first few distinct messages of each failure (by "refused/failed CODE")."""
    pending: set[tuple[int, int]] = field(default_factory=set)
    """(client, request) of the requests not answered yet: lost if still open at the end."""

    def note(self, outcome: str, message: str, keep: int = 3) -> None:
        seen = self.messages.setdefault(outcome, [])
        if len(seen) < keep and message not in seen:
            seen.append(message)


class _CountResumes(logging.Handler):
    """Counts the SDK's "resuming" warnings (one per broken stream) instead of printing."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "resuming" in record.getMessage()


# ---- the pipeline ------------------------------------------------------------------------

class Pipeline:
    """`ditserve up --config` of the settings, as a child process (common/process.py)."""

    def __init__(self, s: Settings, folder: Path):
        from ditserve.config import local_config

        self.port = free_port_block(2 + s.stages)
        self.target = f"127.0.0.1:{self.port}"
        from ditserve.demo import DEMO_VAE_PATH

        checkpoint = random_checkpoint(s.model, s.latent_size, folder / "dit.safetensors")
        (folder / "vae").symlink_to(DEMO_VAE_PATH)  # ships with the checkpoint: it pairs
        config = local_config(s.stages, self.port, str(checkpoint), vae=str(folder / "vae"))
        config = dataclasses.replace(config, coordinator=dataclasses.replace(
            config.coordinator, max_queued_requests=s.max_queued))
        config_path = folder / "pipeline.yaml"
        _write_yaml(config, config_path)
        self.up = ServiceProcess("ditserve up", ditserve_argv(
            "up", "--config", str(config_path), "--port", str(self.port),
            "--log-dir", str(folder / "logs")), self.target, folder / "up.log",
            {**thread_env(1), "PYTHONUNBUFFERED": "1"})

    def start(self) -> Pipeline:
        self.up.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while "coordinator at" not in self.up.log():
            if self.up.exited() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ditserve up did not start:\n{self.up.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        self.up.terminate(60)
        self.up.close()

    def services(self) -> dict[str, int]:
        """{service name: pid} of the running services (the launcher's children)."""
        found = {}
        for pid in _children(self.up.pid):
            argv = _cmdline(pid)
            if "ditserve.cli" not in argv:
                continue  # not exec'd yet
            if "coordinator" in argv:
                found["coordinator"] = pid
            elif "decoder" in argv:
                found["decoder"] = pid
            elif "--stage" in argv:
                found[f"stage-{argv[argv.index('--stage') + 1]}"] = pid
        return found

    def restarts(self) -> collections.Counter:
        """Restarts by service, from the launcher's log."""
        return collections.Counter(line.split("restarted ", 1)[1].split()[0]
                                   for line in self.up.log(1 << 24).splitlines()
                                   if " restarted " in line)


def _write_yaml(config, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(asdict(config), sort_keys=False))


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---- the clients -------------------------------------------------------------------------

async def client_loop(k: int, target: str, s: Settings, until: float, tally: Tally) -> None:
    """Client k: one request after another until `until` (monotonic)."""
    from ditserve_client import Accepted, AsyncClient, DitserveError, Result

    rng = random.Random(s.seed * 1000 + k)
    async with AsyncClient(target, timeout=s.request_timeout) as client:
        n = 0
        while time.monotonic() < until:
            n += 1
            key, accepted = (k, n), False
            tally.sent += 1
            tally.pending.add(key)
            started = time.monotonic()

            async def one() -> Result | None:
                nonlocal accepted
                last = None
                async for event in client.generate([rng.randrange(1000)],
                                                   seed=rng.randrange(2**32), steps=s.steps,
                                                   sampler="ddim", guidance=s.guidance,
                                                   image_format="jpeg"):
                    accepted = accepted or isinstance(event, Accepted)
                    last = event
                return last

            cancel = (rng.uniform(0.05, s.cancel_within) if rng.random() < s.cancel_fraction
                      else None)
            pause = 0.0
            try:
                await asyncio.wait_for(one(), cancel)
                tally.completed += 1
                tally.latencies.append(time.monotonic() - started)
            except TimeoutError:
                tally.cancelled += 1
            except DitserveError as error:
                (tally.failed if accepted else tally.refused)[error.code] += 1
                tally.note(f"{'failed' if accepted else 'refused'} {error.code}", error.message)
                pause = error.retry_after or 1.0
            except Exception as error:  # a bug of the client or the harness: count it too
                tally.failed[type(error).__name__] += 1
                tally.note(f"failed {type(error).__name__}", str(error))
                pause = 1.0
            tally.pending.discard(key)
            if pause:
                await asyncio.sleep(min(pause, 5.0))


async def inject(pipeline: Pipeline, s: Settings, started: float, kills: list[dict]) -> None:
    """SIGKILL each service of `kills` once, evenly spread over the run."""
    names = [f"stage-{s.stages - 1}" if k == "stage-last" else k for k in s.kills]
    span = s.minutes * 60
    for i, name in enumerate(names):
        at = started + span * (i + 1) / (len(names) + 1)
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        pid = pipeline.services().get(name)
        if pid is None:
            kills.append({"service": name, "at_s": round(time.monotonic() - started, 1),
                          "pid": None, "note": "not running"})
            continue
        os.kill(pid, signal.SIGKILL)
        kills.append({"service": name, "at_s": round(time.monotonic() - started, 1),
                      "pid": pid})


async def soak(pipeline: Pipeline, s: Settings) -> tuple[Tally, list[dict], float]:
    tally, kills = Tally(), []
    started = time.monotonic()
    until = started + s.minutes * 60
    clients = [asyncio.create_task(client_loop(k, pipeline.target, s, until, tally))
               for k in range(s.clients)]
    faults = asyncio.create_task(inject(pipeline, s, started, kills))
    await asyncio.wait(clients, timeout=s.minutes * 60 + s.drain)
    wall = time.monotonic() - started
    for task in [*clients, faults]:
        task.cancel()
    await asyncio.gather(*clients, faults, return_exceptions=True)
    return tally, kills, wall


async def warm_up(target: str, s: Settings) -> None:
    from ditserve_client import AsyncClient

    async with AsyncClient(target, timeout=s.request_timeout) as client:
        await client.generate_result([1], seed=0, steps=s.steps, sampler="ddim",
                                     guidance=s.guidance, image_format="jpeg")


# ---- the run -----------------------------------------------------------------------------

def run(s: Settings) -> Report:
    sdk = logging.getLogger("ditserve_client")
    resumes, propagate = _CountResumes(), sdk.propagate
    sdk.addHandler(resumes)
    sdk.propagate = False
    try:
        with tempfile.TemporaryDirectory(prefix="ditserve-bench-soak-") as tmp:
            pipeline = Pipeline(s, Path(tmp)).start()
            try:
                asyncio.run(warm_up(pipeline.target, s))
                before = {name: rss_mib(pid) for name, pid in pipeline.services().items()}
                tally, kills, wall = asyncio.run(soak(pipeline, s))
                after = {name: rss_mib(pid) for name, pid in pipeline.services().items()}
                restarts = pipeline.restarts()
            finally:
                pipeline.stop()
    finally:
        sdk.removeHandler(resumes)
        sdk.propagate = propagate
    return _report(s, tally, kills, wall, before, after, restarts, resumes.count)


def _report(s: Settings, tally: Tally, kills: list[dict], wall: float,
            before: dict[str, float | None], after: dict[str, float | None],
            restarts: collections.Counter, resumed: int) -> Report:
    lost = len(tally.pending)
    rows = [{"what": "sent", "value": tally.sent},
            {"what": "completed", "value": tally.completed},
            {"what": "cancelled by the client", "value": tally.cancelled}]
    rows += [{"what": f"refused {code}", "value": n} for code, n in sorted(tally.refused.items())]
    rows += [{"what": f"failed {code}", "value": n} for code, n in sorted(tally.failed.items())]
    rows += [{"what": "lost (never answered)", "value": lost},
             {"what": "streams resumed by the SDK", "value": resumed}]
    latency = _percentiles(tally.latencies)
    rows += [{"what": "latency p50 (s)", "value": latency.get("p50")},
             {"what": "latency p90 (s)", "value": latency.get("p90")},
             {"what": "completed per minute",
              "value": round(60 * tally.completed / (s.minutes * 60), 1)}]
    for name in sorted(set(before) | set(after)):
        rows.append({"what": f"RSS {name} (MiB)",
                     "value": f"{_mib(before.get(name))} → {_mib(after.get(name))}"
                              + (f" (restarted {restarts[name]}x)" if restarts[name] else "")})
    answered = tally.completed + tally.cancelled + sum(tally.refused.values()) + sum(
        tally.failed.values())
    notes = [f"{s.clients} clients back to back for {s.minutes:g} min on `ditserve up`: "
             f"{s.model} (random weights) at latent {s.latent_size}, {s.stages} stages "
             f"(1 thread each), demo VAE decoder, max_queued_requests {s.max_queued}; "
             f"one-image ddim {s.steps}-step requests at guidance {s.guidance:g}, JPEG.",
             f"{s.cancel_fraction:.0%} of requests cancelled by their client within "
             f"{s.cancel_within:g} s; refused = failed before Accepted, failed = after; "
             f"lost = no answer {s.drain:g} s after the clients stopped "
             f"(sent {tally.sent} = answered {answered} + lost {lost}).",
             "SIGKILLs: " + ", ".join(f"{k['service']} at {k['at_s']:g} s" for k in kills)
             + "; the launcher restarted " + (", ".join(f"{n} {c}x" for n, c in
                                                      sorted(restarts.items())) or "nothing")
             + ".",
             "RSS: VmRSS after a warm-up request → at the end (a restarted service is a new "
             "process)."]
    samples = {"latencies_s": [round(x, 3) for x in tally.latencies], "kills": kills,
               "rss_mib": {"start": before, "end": after}, "restarts": dict(restarts),
               "refused": dict(tally.refused), "failed": dict(tally.failed),
               "messages": tally.messages,
               "wall_s": round(wall, 1)}
    return Report("soak", rows, [("what", "what"), ("value", "figure")], samples, notes,
                  asdict(s))


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": round(values[0], 2), "p90": round(values[0], 2)}
    deciles = statistics.quantiles(values, n=10)
    return {"p50": round(statistics.median(values), 2), "p90": round(deciles[8], 2)}


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"
