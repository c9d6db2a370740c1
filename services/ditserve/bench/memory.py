"""Memory: peak resident memory of each stage of DiT-XL/2 against the whole model.

Two measurements:

- isolated: each part is built and run (one forward after a warm-up) in a fresh Python
  process (forward.py), so ru_maxrss is that of one model part plus the interpreter and
  torch; a process that only imports torch is measured too, as the floor every stage pays.
- serving: the real `ditserve stage` processes, loading their blocks from one
  safetensors file, after serving a forward: VmHWM (peak) and VmRSS from /proc.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

from .chains import guided_labels
from .forward import run_isolated
from .procs import StageProcesses
from .report import Report
from .weights import checkpoint, random_model


@dataclass
class Settings:
    """What `ditserve bench memory` measures."""

    model: str = "DiT-XL/2"
    """DiT config by name."""
    image_size: int = 256
    """Image side in pixels."""
    stages: int = 4
    """Stages the model is cut into."""
    batch: int = 2
    """Rows per forward (1 image with guidance)."""
    threads: int = 1
    """torch threads of each measuring process."""
    device: str = "cpu"
    """cpu only (host memory)."""
    serving: bool = True
    """Also measure real stage processes serving the model."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-Tiny/2", image_size=64, stages=2, serving=False)


def torch_floor_mib() -> float:
    """Peak RSS of a Python process that imports torch and ditserve.model, nothing else."""
    code = ("import json, resource, torch, ditserve.model; "
            "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _proc_status(pid: int) -> dict[str, float]:
    """VmHWM and VmRSS of a process, in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def serving_rss(s: Settings) -> list[dict]:
    """Peak and current RSS of each `ditserve stage` process after one forward."""
    from ditserve.chain.remote import RemoteChain

    with tempfile.TemporaryDirectory(prefix="ditserve-bench-") as folder:
        model = random_model(s.model, s.image_size // 8)
        path, cfg = checkpoint(model, folder), model.config
        del model
        gc.collect()
        with StageProcesses(path, s.stages, threads=s.threads) as procs:
            async def one_forward() -> None:
                chain = RemoteChain(procs.address)
                x = torch.randn(s.batch, cfg.in_channels, cfg.input_size, cfg.input_size)
                await chain.forward(x, torch.full((s.batch,), 500),
                                    guided_labels(s.batch, cfg.num_classes))
                await chain.close()
            asyncio.run(one_forward())
            return [{"model": s.model, "stage": f"serving {k}/{s.stages}",
                     "peak_rss_mib": st["VmHWM"], "rss_mib": st["VmRSS"]}
                    for k, st in enumerate(_proc_status(p.pid) for p in procs.processes)]


def run(s: Settings) -> Report:
    parts = [run_isolated(s.model, s.batch, s.image_size, s.stages, stage, 1, s.threads)
             for stage in (None, *range(s.stages))]
    floor = torch_floor_mib()
    whole = parts[0]["peak_rss_mib"]
    rows = [{**p, "vs_whole": p["peak_rss_mib"] / whole,
             "above_floor": p["peak_rss_mib"] - floor} for p in parts]
    if s.serving:
        rows += [{**r, "vs_whole": r["peak_rss_mib"] / whole,
                  "above_floor": r["peak_rss_mib"] - floor} for r in serving_rss(s)]
    rows.append({"model": "-", "stage": "torch import only", "blocks": "-", "params_m": 0.0,
                 "peak_rss_mib": floor, "vs_whole": floor / whole, "above_floor": 0.0})
    stage_sum = sum(p["peak_rss_mib"] for p in parts[1:])
    notes = [f"{s.model}, {s.image_size} px, {s.stages} stages, float32 weights, batch {s.batch}; "
             "each part in a fresh process (peak RSS = ru_maxrss after one forward).",
             f"Largest stage / whole = {max(p['peak_rss_mib'] for p in parts[1:]) / whole:.2f}; "
             f"sum of the stages = {stage_sum / whole:.2f}× the whole (each pays the "
             f"{floor:.0f} MiB floor of Python + torch).",
             "serving k/S rows: the real `ditserve stage` processes (weights loaded from a "
             "safetensors file, gRPC server, one forward served): peak RSS = VmHWM."]
    columns = [("model", "model"), ("stage", "part"), ("blocks", "blocks"),
               ("params_m", "params (M)"), ("peak_rss_mib", "peak RSS (MiB)"),
               ("above_floor", "above torch floor (MiB)"), ("vs_whole", "× whole")]
    return Report("memory", rows, columns, {"parts": parts, "floor_mib": floor}, notes, asdict(s))
