"""What TLS costs: plaintext and TLS side by side, per hop and for 16 clients.

1. Per hop: two `ditserve stage` processes serving the same last stage (1 block + final
   layer of a DiT-XL-width model, T=256, D=1152), one plaintext, one TLS with mTLS and the
   identity check. A client (`StageClient`, as a previous stage dials) sends h (rows, T, D)
   bf16 and c; overhead = round trip − the compute seconds the stage reports, so it counts
   encryption, transfer and framing, not the block. Also the connect time of a fresh
   client (TCP, the TLS handshake, the stream), which a long-lived hop pays once.
2. 16 clients: two whole pipelines (2 stages + coordinator, no decoder), one plaintext, one
   with TLS on every port, mTLS on both internal hops and a bearer token on the public API;
   `clients` concurrent SDK clients (`AsyncClient`) each send one request through the
   coordinator's gRPC front end; images/s.

Both variants run at once and are measured alternately (odd rounds in reverse order), so
the machine's load hits both alike. Certificates: the throwaway CA of `ditserve up --tls`
(launcher/pki.py, P-256 ECDSA).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch
import yaml

from ditserve.common.process import is_serving
from ditserve.launcher.pki import make_run_pki

from .procs import free_port, thread_env
from .report import Report, fmt_spread, spread
from .weights import checkpoint, random_model

START_TIMEOUT_S = 300.0


@dataclass
class Settings:
    """What `ditserve bench tls` measures."""

    hop_rows: tuple[int, ...] = (1, 8)
    """Rows of h per hop call: 1 = 576 KiB, 8 = 4.6 MiB of bf16 activations."""
    hop_repeats: int = 25
    """Calls per variant and round of the hop measurement."""
    hop_rounds: int = 4
    """Alternations of the two hop variants (each with a fresh client)."""
    model: str = "DiT-S/2"
    """DiT config of the two pipelines."""
    latent_size: int = 16
    """Latent side of the pipelines' requests (16: 128 px)."""
    clients: int = 16
    """Concurrent clients, one request each."""
    steps: int = 10
    """DDIM steps per request (guidance 4: 2 rows per image)."""
    rounds: int = 2
    """Alternations of the two variants (both measurements)."""
    threads: int = 1
    """torch threads of each stage process."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(hop_rows=(1,), hop_repeats=3, hop_rounds=1, model="DiT-Tiny/2",
                   latent_size=8, clients=2, steps=2, rounds=1)


class Services:
    """Service processes with plaintext health-only ports, stopped together."""

    def __init__(self, folder: Path):
        self.folder, self.processes = folder, []

    def start(self, name: str, args: list[str], threads: int) -> None:
        health = f"127.0.0.1:{free_port()}"
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 (the child owns it)
        process = subprocess.Popen(
            [sys.executable, "-m", "ditserve.cli", *args, "--health-listen", health],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=thread_env(threads))
        log.close()
        self.processes.append((name, process, health))

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for name, process, health in self.processes:
            while not is_serving(health):
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} did not start:\n{log}")
                time.sleep(0.2)

    def stop(self) -> None:
        for _, process, _ in self.processes:
            if process.poll() is None:
                process.terminate()
        for _, process, _ in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---- 1. per hop --------------------------------------------------------------------------

def _xl_width_checkpoint(folder: Path) -> Path:
    from ditserve.model import DiT, dit_config, save_ditserve

    config = dit_config("DiT-XL/2", depth=2, mlp_ratio=0.25)  # narrow MLP: less compute
    path = folder / "xl-width.safetensors"
    save_ditserve(DiT(config).state_dict().items(), config, path)
    return path


def _last_stage_args(path: Path, port: int, tls: list[str]) -> list[str]:
    return ["stage", "--checkpoint", str(path), "--stage", "1", "--stages", "2", "--listen",
            f"127.0.0.1:{port}", "--wire-dtype", "bf16", "--threads", "1", *tls]


async def _hop(address: str, dialer, rows: int, repeats: int) -> tuple[list[float], float]:
    """(overhead ms per call, connect ms) of one fresh client."""
    from ditserve.stage.client import StageClient

    started = time.perf_counter()
    client = StageClient(address, peer="bench", dialer=dialer)
    await client.wait_connected(60)
    connect_ms = (time.perf_counter() - started) * 1e3
    h, c = torch.randn(rows, 256, 1152).bfloat16(), torch.randn(rows, 1152).bfloat16()
    overheads = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            _, seconds = await client.call([("h", h), ("c", c)])
            overheads.append((time.perf_counter() - start - seconds[0]) * 1e3)
    finally:
        await client.close()
    return overheads, connect_ms


def _measure_hops(s: Settings, folder: Path, rows_out: list[dict], samples: dict) -> None:
    from ditserve.security.tls import Dialer, PemFiles

    pki = make_run_pki(folder, ["stage-0", "stage-1"])
    tls = folder / "tls"
    path = _xl_width_checkpoint(folder)
    ports = {"plaintext": free_port(), "TLS": free_port()}
    flags = {"plaintext": [], "TLS": ["--tls-ca", str(pki.ca_path), "--tls-cert",
                                      str(tls / "stage-1.crt"), "--tls-key", str(tls / "stage-1.key")]}
    dialers = {"plaintext": Dialer(), "TLS": Dialer(PemFiles(pki.ca_path, tls / "stage-0.crt",
                                                             tls / "stage-0.key"))}
    services = Services(folder)
    try:
        for name in ports:
            services.start(f"hop-{name}", _last_stage_args(path, ports[name], flags[name]), 1)
        services.wait()
        for rows in s.hop_rows:
            overhead: dict[str, list[float]] = {n: [] for n in ports}
            connect: dict[str, list[float]] = {n: [] for n in ports}
            for r in range(s.hop_rounds):
                for name in (list(ports) if r % 2 == 0 else list(reversed(ports))):
                    calls, connect_ms = asyncio.run(_hop(f"127.0.0.1:{ports[name]}",
                                                         dialers[name], rows, s.hop_repeats))
                    overhead[name] += calls
                    connect[name].append(connect_ms)
            base = spread(overhead["plaintext"])
            for name in ports:
                samples[f"hop {rows} rows {name}"] = {"overhead_ms": overhead[name],
                                                      "connect_ms": connect[name]}
                o = spread(overhead[name])
                # The minimum is the cost without the machine's interference; the median
                # is what a call met under it.
                rows_out.append({
                    "measure": f"hop, {rows * 576} KiB bf16 h", "variant": name,
                    "value": f"{fmt_spread(o, digits=2)} ms overhead per call",
                    "ratio": round(o["median"] / base["median"], 3),
                    "extra": f"median {o['median'] - base['median']:+.2f} ms, min "
                             f"{o['min'] - base['min']:+.2f} ms; connect "
                             f"{statistics.median(connect[name]):.1f} ms"})
    finally:
        services.stop()


# ---- 2. clients through the coordinator --------------------------------------------------

def _pipeline_config(s: Settings, folder: Path, ckpt: Path, security: dict) -> Path:
    ports = [free_port() for _ in range(3)]
    config = {"model": {"checkpoint": str(ckpt)}, "wire_dtype": "bf16",
              "stages": [{"address": f"127.0.0.1:{p}", "listen": f"127.0.0.1:{p}"}
                         for p in ports[1:]],
              "coordinator": {"address": f"127.0.0.1:{ports[0]}", "listen": f"127.0.0.1:{ports[0]}",
                              "max_queued_requests": max(64, s.clients)},
              "decoder": {"address": ""}, "security": security}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start_pipeline(services: Services, name: str, config: Path, threads: int) -> None:
    for k in (1, 0):
        services.start(f"{name}-stage-{k}", ["stage", "--config", str(config), "--stage", str(k),
                                             "--threads", str(threads)], threads)
    services.start(f"{name}-coordinator", ["coordinator", "--config", str(config)], 1)


async def _clients(target: str, tls: dict, s: Settings, round_: int) -> float:
    """images/s of `clients` concurrent one-image requests."""
    from ditserve_client.aio import AsyncClient

    async def one(i: int) -> None:
        async with AsyncClient(target, **tls, timeout=600) as client:
            await client.generate_result([i % 10], seed=1000 * round_ + i, steps=s.steps,
                                         sampler="ddim", guidance=4.0, skip_images=True)
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(s.clients)))
    return s.clients / (time.perf_counter() - start)


def _plaintext_refused(target: str) -> bool:
    """The TLS coordinator refuses a plaintext client (so the variant is what it says)."""
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=5)
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except (grpc.RpcError, grpc.FutureTimeoutError):
            return True
    return False


def _measure_clients(s: Settings, folder: Path, rows_out: list[dict], samples: dict,
                     notes: list[str]) -> None:
    ckpt = checkpoint(random_model(s.model, s.latent_size), folder)
    pki = make_run_pki(folder / "pki", ["coordinator", "stage-0", "stage-1"])
    configs = {"plaintext": _pipeline_config(s, _mkdir(folder / "plain"), ckpt, {}),
               "TLS": _pipeline_config(s, _mkdir(folder / "tls"), ckpt, asdict(pki.security))}
    targets = {n: yaml.safe_load(p.read_text())["coordinator"]["address"]
               for n, p in configs.items()}
    tls_options = {"plaintext": {"tls": False, "token": ""},
                   "TLS": {"tls": True, "root_certificates": pki.ca_path.read_bytes(),
                           "token": pki.token}}
    services = Services(folder)
    try:
        for name, config in configs.items():
            _start_pipeline(services, name, config, s.threads)
        services.wait()
        if not _plaintext_refused(targets["TLS"]):
            raise RuntimeError("the TLS coordinator answered a plaintext client")
        notes.append("Checked before measuring: the TLS coordinator refuses a plaintext client.")
        rates: dict[str, list[float]] = {n: [] for n in configs}
        for r in range(s.rounds):
            for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):
                rates[name].append(asyncio.run(_clients(targets[name], tls_options[name], s, r)))
        base = statistics.median(rates["plaintext"])
        for name in configs:
            samples[f"{s.clients} clients {name}"] = rates[name]
            stats = spread(rates[name])
            rows_out.append({"measure": f"{s.clients} clients, {s.model} via the coordinator",
                             "variant": name, "value": f"{fmt_spread(stats, digits=3)} images/s",
                             "ratio": round(stats["median"] / base, 3), "extra": ""})
    finally:
        services.stop()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(s: Settings) -> Report:
    rows: list[dict] = []
    samples: dict = {}
    notes = [
        "Per hop: a last-stage process per variant (1 block + final layer of a DiT-XL-width "
        "model, T=256, D=1152), called as a previous stage calls it; overhead = round trip − "
        "the stage's own compute seconds; connect = a fresh client's TCP + handshake + stream.",
        f"Clients: 2 stages ({s.threads} thread(s) each) + coordinator per variant, no decoder "
        f"(latents only); {s.clients} SDK clients, 1 image each, DDIM {s.steps} steps, guidance "
        f"4, latent {s.latent_size}.",
        "TLS = TLS on every port, mTLS with the SPIFFE identity check on every internal hop, a "
        "bearer token per call on the public API (P-256 ECDSA certificates; TLS 1.3 as grpc "
        "negotiates it).",
        f"Variants run at once, measured alternately ({s.hop_rounds} hop rounds of "
        f"{s.hop_repeats} calls, {s.rounds} client rounds); ratio = median / plaintext's median; "
        "difference = TLS − plaintext, of the medians and of the minimums.",
    ]
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-tls-") as folder:
        torch.set_num_threads(1)
        _measure_hops(s, _mkdir(Path(folder) / "hop"), rows, samples)
        _measure_clients(s, _mkdir(Path(folder) / "clients"), rows, samples, notes)
    return Report("tls", rows, [("measure", "measure"), ("variant", "variant"),
                                ("value", "measured"), ("ratio", "× plaintext"),
                                ("extra", "TLS − plaintext")],
                  samples=samples, notes=notes, settings=dataclasses.asdict(s))
