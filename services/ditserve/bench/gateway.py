"""What the HTTP gateway adds: the same request over gRPC, HTTP/JSON and HTTP/SSE.

One `ditserve up` (the embedded demo model, its VAE decoder) and one `ditserve gateway` in
front of it, as processes on loopback. Each round sends the same request (same seed, so
the same work) once per variant, in rotating order; a variant's figure is the median over
rounds of the client-side wall time, from sending the request to holding the decoded
result, and the time to the first event (`accepted`), which carries no model work. The
gateway's cost is the difference to gRPC, paired by round, and the CPU time the gateway
process spends per request (from /proc: robust to the machine's other load, which the
wall times are not). Clients keep their connection across rounds
(one gRPC channel; one HTTP/1.1 keep-alive connection), as a real client would.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .procs import free_port
from .report import Report, fmt_spread, spread

START_TIMEOUT_S = 300.0


@dataclass
class Settings:
    """What `ditserve bench gateway` measures."""

    steps: int = 20
    """ddim steps of each request."""
    images: int = 1
    """Images (class labels) per request."""
    previews: str = "approximate"
    """Preview mode of the `+previews` variants ("approximate" or "decoded")."""
    rounds: int = 20
    """Requests per variant."""
    warmup: int = 2
    """Rounds run first and discarded."""
    stages: int = 1
    """Stage processes of the pipeline."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(steps=4, rounds=3, warmup=1)


class Processes:
    """`ditserve up` and `ditserve gateway` as children; stopped together."""

    def __init__(self, stages: int):
        self.log_dir = Path(tempfile.mkdtemp(prefix="ditserve-bench-gateway-"))
        self.port = _free_base_port(2 + stages)
        self.target = f"127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.up = self._spawn(["up", "--port", str(self.port), "--stages", str(stages),
                               "--log-dir", str(self.log_dir / "up")], "up.log", env)
        self.gateway: subprocess.Popen | None = None
        self.http_port = 0

    def _spawn(self, args: list[str], log: str, env: dict[str, str]) -> subprocess.Popen:
        with open(self.log_dir / log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "ditserve.cli", *args], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def start(self) -> Processes:
        try:
            self._wait_for("up.log", "coordinator at", self.up)
            self.gateway = self._spawn(["gateway", "--target", self.target, "--listen",
                                        "127.0.0.1:0"], "gateway.log", dict(os.environ))
            line = self._wait_for("gateway.log", "ditserve gateway: serving", self.gateway)
            self.http_port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for(self, log: str, needle: str, process: subprocess.Popen) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = (self.log_dir / log).read_text(errors="replace")
            for line in text.splitlines():
                if needle in line:
                    return line
            if process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"no {needle!r} in {log}:\n{text[-2000:]}")

    def stop(self) -> None:
        for process in (self.gateway, self.up):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _free_base_port(count: int) -> int:
    import socket

    for _ in range(50):
        base = free_port()
        try:
            for offset in range(count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


# ---- the three ways in ------------------------------------------------------------------

Timing = tuple[float, float]
"""(seconds to the first event, seconds to the decoded result) of one request."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def grpc_variant(client, body: dict) -> Callable[[], Timing]:
    options = {"seed": body["seed"], "steps": body["num_steps"], "sampler": "ddim",
               "previews": body.get("preview_mode")}

    def once() -> Timing:
        start, first = time.perf_counter(), None
        for event in client.generate(body["class_labels"], **options):
            first = first or time.perf_counter()
            if hasattr(event, "images"):
                assert len(event.images) == len(body["class_labels"])
        return first - start, time.perf_counter() - start
    return once


def http_variant(connection: http.client.HTTPConnection, body: dict,
                 stream: bool) -> Callable[[], Timing]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json",
               "Accept": "text/event-stream" if stream else "application/json"}

    def once() -> Timing:
        start, first = time.perf_counter(), None
        connection.request("POST", "/v1/generate", body=data, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"gateway answered {response.status}: {response.read()[:300]!r}")
        if not stream:
            result = json.loads(response.read())
            first = time.perf_counter()  # the JSON reply has one event: the result
        else:
            result = None
            for line in response:  # http.client undoes the chunking
                first = first or time.perf_counter()
                if line.startswith(b"data: ") and b'"images"' in line:
                    result = json.loads(line[6:])
            response.read()
        for image in result["images"]:
            base64.b64decode(image["data"])
        return first - start, time.perf_counter() - start
    return once


def run(settings: Settings) -> Report:
    from ditserve_client import Client

    from .report import machine

    body = {"class_labels": list(range(settings.images)), "seed": 0, "sampler": "ddim",
            "num_steps": settings.steps}
    previewed = {**body, "preview_mode": settings.previews}
    processes = Processes(settings.stages).start()
    try:
        with Client(processes.target) as client:
            connection = http.client.HTTPConnection("127.0.0.1", processes.http_port, timeout=600)
            variants = {
                "gRPC": grpc_variant(client, body),
                "HTTP/JSON": http_variant(connection, body, stream=False),
                "HTTP/SSE": http_variant(connection, body, stream=True),
                f"gRPC + {settings.previews} previews": grpc_variant(client, previewed),
                f"HTTP/SSE + {settings.previews} previews": http_variant(connection, previewed,
                                                                         stream=True),
            }
            samples, cpu = _measure(variants, settings, processes.gateway.pid)
            connection.close()
    finally:
        processes.stop()
    return _report(samples, cpu, settings, machine())


def _measure(variants: dict[str, Callable[[], Timing]], settings: Settings,
             gateway_pid: int) -> tuple[dict[str, list[Timing]], dict[str, float]]:
    """Every variant once per round, in an order that rotates each round; with the
    gateway's CPU seconds per request of each variant (mean over the rounds)."""
    names = list(variants)
    samples: dict[str, list[Timing]] = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    for round_ in range(settings.warmup + settings.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            before = cpu_seconds(gateway_pid)
            timing = variants[name]()  # one request at a time: latency, not throughput
            if round_ >= settings.warmup:
                samples[name].append(timing)
                cpu[name] += (cpu_seconds(gateway_pid) - before) / settings.rounds
    return samples, cpu


def _report(samples: dict[str, list[Timing]], cpu: dict[str, float], settings: Settings,
            host: dict) -> Report:
    rows = []
    previewed = next((n for n in samples if n.startswith("gRPC +")), "gRPC")
    for name, timings in samples.items():
        base = samples[previewed if "previews" in name else "gRPC"]
        first, total = spread([f for f, _ in timings]), spread([t for _, t in timings])
        # Paired by round (the two ran back to back), which cancels most of the noise that
        # other load on the machine puts on both.
        added = spread([t - b for (_, t), (_, b) in zip(timings, base, strict=True)])
        rows.append({"variant": name, "first_ms": fmt_spread(first, 1e3, 2),
                     "total_ms": fmt_spread(total, 1e3, 1),
                     "added_ms": f"{added['median'] * 1e3:+.1f} "
                                 f"[{added['q1'] * 1e3:+.1f} to {added['q3'] * 1e3:+.1f}]",
                     "cpu_ms": round(cpu[name] * 1e3, 2)})
    return Report(
        scenario="gateway", rows=rows,
        columns=[("variant", "way in"), ("first_ms", "first event, ms"),
                 ("total_ms", "whole request, ms"), ("added_ms", "added vs gRPC, ms: median [IQR]"),
                 ("cpu_ms", "gateway CPU, ms/request")],
        samples={name: [list(t) for t in timings] for name, timings in samples.items()},
        notes=[f"ditserve up (embedded demo model, {settings.stages} stage(s), decoder) and "
               "ditserve gateway on loopback; the client in this process, one request at a time.",
               f"Each request: {settings.images} image(s), ddim {settings.steps} steps, seed 0; "
               f"{settings.rounds} rounds after {settings.warmup} warm-up, variants in rotating "
               "order; median [min–max].",
               "first event: to `accepted` over gRPC and SSE; to the whole reply for HTTP/JSON "
               "(it has only one). added: per round, this variant's time minus gRPC's (with "
               "previews: minus gRPC with the same previews); median and quartiles.",
               "gateway CPU: user+system time of the gateway process per request, mean over "
               "the rounds (/proc, 10 ms ticks summed over all rounds); ~0 for gRPC, which "
               "bypasses it.",
               f"machine: {host['cpu']}, {host['cores']} cores."],
        settings=asdict(settings))
