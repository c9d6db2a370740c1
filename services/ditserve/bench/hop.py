"""One stage hop's overhead on loopback: what a hop costs beyond the block it runs.

A `ditserve stage` process serves the last stage (1 block + final layer) of a DiT-XL-width
model (T=256, D=1152, MLP narrowed so that compute stays small); the benchmark sends it h
(N, T, D) bf16 and c (N, D) as stage N-2 would, and overhead = round trip − the compute
seconds the stage reports in its reply. So it counts encode, transfer, reassembly,
validation and the small FP32 reply, not the block. (The codec's GB/s against a plain copy
is `ditserve bench wire`.)
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ditserve.common.process import ServiceProcess, ditserve_argv, free_port, thread_env

from .report import Report, spread

START_TIMEOUT_S = 300.0


@dataclass
class Settings:
    """What `ditserve bench hop` measures."""

    model: str = "DiT-XL/2"
    """Width of the activations (DiT-XL/2: D = 1152); 2 blocks, MLP ratio `mlp_ratio`."""
    latent_size: int = 32
    """Latent side: 32 is T = 256 tokens at patch 2 (256 px)."""
    mlp_ratio: float = 0.25
    """Narrow MLP: less compute in the block, which is excluded anyway."""
    rows: tuple[int, ...] = (1, 8)
    """Rows per call: 1 (576 KiB of bf16 h at XL/2, 256 px) and 8 (4.6 MiB)."""
    repeats: int = 5
    """Calls per row count (the median is reported)."""
    threads: int = 1
    """torch threads of the stage process and of the calling side."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-S/2", latent_size=8, rows=(1,), repeats=2)


def _write_model(s: Settings, folder: Path) -> Path:
    from ditserve.model import DiT, dit_config, save_ditserve

    config = dit_config(s.model, input_size=s.latent_size, depth=2, mlp_ratio=s.mlp_ratio)
    path = folder / "hop.safetensors"
    save_ditserve(DiT(config).state_dict().items(), config, path)
    return path


def _start_last_stage(checkpoint: Path, s: Settings, folder: Path) -> ServiceProcess:
    address = f"127.0.0.1:{free_port()}"
    argv = ditserve_argv("stage", "--checkpoint", str(checkpoint), "--stage", "1", "--stages",
                         "2", "--listen", address, "--wire-dtype", "bf16", "--threads",
                         str(s.threads))
    stage = ServiceProcess("stage-1", argv, address, folder / "stage-1.log",
                           thread_env(s.threads)).start()
    try:
        stage.wait_serving(START_TIMEOUT_S)
    except BaseException:
        stage.close()
        raise
    return stage


async def hop_overhead(address: str, rows: int, tokens: int, width: int,
                       repeats: int) -> tuple[list[float], list[float]]:
    """(overhead s, compute s) of each call carrying h (rows, tokens, width) bf16."""
    from ditserve.chain.remote import StageClient

    client = StageClient(address, peer="bench")
    await client.wait_connected(60)
    h = torch.randn(rows, tokens, width).bfloat16()
    c = torch.randn(rows, width).bfloat16()
    overheads, computes = [], []
    try:
        await client.call([("h", h), ("c", c)])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            _, seconds = await client.call([("h", h), ("c", c)])
            wall = time.perf_counter() - start
            overheads.append(wall - seconds[0])
            computes.append(seconds[0])
    finally:
        await client.close()
    return overheads, computes


def run(s: Settings) -> Report:
    from ditserve.model import dit_config

    torch.set_num_threads(s.threads)  # the client's side of the hop gets the same threads
    config = dit_config(s.model, input_size=s.latent_size)
    tokens, width = config.num_tokens, config.hidden_size
    rows, samples = [], {}
    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        stage = _start_last_stage(_write_model(s, Path(folder)), s, Path(folder))
        try:
            for n in s.rows:
                overheads, computes = asyncio.run(hop_overhead(stage.address, n, tokens, width,
                                                               s.repeats))
                mib = n * tokens * width * 2 / 2**20
                samples[f"{n} rows"] = {"overhead_s": overheads, "compute_s": computes}
                rows.append({"rows": n, "h": f"{mib:.2f} MiB bf16",
                             "overhead_ms": round(spread(overheads)["median"] * 1e3, 2),
                             "compute_ms": round(spread(computes)["median"] * 1e3, 1),
                             "gb_per_s": round(n * tokens * width * 2
                                               / spread(overheads)["median"] / 1e9, 3)})
        finally:
            stage.terminate()
            stage.close()
    notes = [f"One `ditserve stage` process (last stage of a 2-block {s.model}-width model, "
             f"T={tokens}, D={width}, {s.threads} thread), called on loopback with h and c as "
             "the previous stage would; overhead = round trip − the compute seconds the stage "
             f"reports; median of {s.repeats} calls after one warm-up.",
             "GB/s = bytes of h / overhead: the hop's effective rate for the activation."]
    columns = [("rows", "rows"), ("h", "h"), ("overhead_ms", "overhead (ms)"),
               ("compute_ms", "block compute (ms, excluded)"), ("gb_per_s", "GB/s")]
    return Report("hop", rows, columns, samples, notes, asdict(s))
