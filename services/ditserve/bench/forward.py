"""Forward time and peak memory of a whole DiT and of one stage, each in a fresh process.

    ditserve bench forward --models DiT-S/2,DiT-B/2,DiT-XL/2 --set batch=2 --set stages=4

Random weights at the real sizes (speed does not depend on the values). Each measurement
runs in its own subprocess so that peak resident memory (ru_maxrss) is that of one model.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .report import Report


def measure(model: str, batch: int, image_size: int, stages: int, stage: int | None,
            repeats: int, threads: int) -> dict:
    """In this process: build the model (or stage `stage` of `stages`), time its forward."""
    import torch

    from ditserve.model import DiT, dit_config, stage_block_range

    torch.set_num_threads(threads)
    config = dit_config(model, input_size=image_size // 8)
    blocks = stage_block_range(config.depth, stage, stages) if stage is not None else None
    start, end = blocks or (0, config.depth)
    dit = DiT(config, blocks, start == 0, end == config.depth).eval().requires_grad_(False)
    x = torch.randn(batch, 4, config.input_size, config.input_size)
    t, y = torch.full((batch,), 500), torch.zeros(batch, dtype=torch.long)
    h = torch.randn(batch, config.num_tokens, config.hidden_size)
    c = torch.randn(batch, config.hidden_size)

    def step() -> None:
        with torch.inference_mode():
            hh, cc = dit.embed(x, t, y) if dit.has_embedders else (h, c)
            hh = dit.run_blocks(hh, cc)
            if dit.has_final_layer:
                dit.head(hh, cc)

    step()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return {"model": model, "stage": "whole" if stage is None else f"{stage}/{stages}",
            "blocks": f"{start}:{end}", "batch": batch, "image_size": image_size,
            "params_m": sum(p.numel() for p in dit.parameters()) / 1e6,
            "forward_ms_median": 1e3 * statistics.median(times),
            "forward_ms_min": 1e3 * min(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def forward_flops(config) -> float:
    """FLOPs of one row's whole forward, counting a multiply-add as 2 (the usual MFU
    convention): DiT-XL/2 at 256 px (T = 256, D = 1152) is 237 GFLOP. Per block: qkv and
    projection 4·T·D², QKᵀ and attention·V 2·T²·D, the MLP 2·r·T·D², adaLN 6·D²; plus the
    patch embedding, the timestep MLP and the final layer."""
    t, d, p = config.num_tokens, config.hidden_size, config.patch_size
    mlp = int(d * config.mlp_ratio)
    block = t * (4 * d * d + 2 * d * mlp) + 2 * t * t * d + 6 * d * d
    ends = (t * p * p * config.in_channels * d + 256 * d + d * d  # embedders
            + 2 * d * d + t * d * p * p * config.out_channels)  # final layer
    return 2.0 * (config.depth * block + ends)


def run_isolated(model: str, batch: int, image_size: int, stages: int, stage: int | None,
                 repeats: int, threads: int) -> dict:
    """measure() in a fresh Python process."""
    args = json.dumps([model, batch, image_size, stages, stage, repeats, threads])
    code = ("import json,sys; from ditserve.bench.forward import measure; "
            f"print(json.dumps(measure(*json.loads({args!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | part | blocks | params (M) | forward ms (median) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['stage']} | {r['blocks']} | {r['params_m']:.1f} | "
              f"{r['forward_ms_median']:.1f} | {r['peak_rss_mib']:.0f} |" for r in rows]
    return "\n".join(lines)


@dataclass
class Settings:
    """What `ditserve bench forward` measures."""

    models: tuple[str, ...] = ("DiT-S/2", "DiT-B/2")
    """DiT configs by name."""
    batch: int = 2
    """Rows per forward."""
    image_size: int = 256
    """Image side in pixels (latent = image / 8)."""
    stages: int = 4
    """Stages the model is cut into; every stage is measured, as well as the whole."""
    repeats: int = 3
    """Timed forwards per measurement (after one warm-up)."""
    threads: int = 1
    """torch threads of each measuring process."""
    device: str = "cpu"
    """cpu only (the measurement is of host memory)."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(models=("DiT-Tiny/2",), image_size=64, stages=2, repeats=1)


def run(s: Settings) -> Report:
    rows = []
    for model in s.models:
        for stage in (None, *range(s.stages)):
            rows.append(run_isolated(model, s.batch, s.image_size, s.stages, stage, s.repeats,
                                     s.threads))
    columns = [("model", "model"), ("stage", "part"), ("blocks", "blocks"),
               ("params_m", "params (M)"), ("forward_ms_median", "forward ms (median)"),
               ("peak_rss_mib", "peak RSS (MiB)")]
    notes = [f"Each row in a fresh process, batch {s.batch}, {s.image_size} px, {s.threads} "
             f"thread(s), median of {s.repeats} forwards after a warm-up."]
    return Report("forward", rows, columns, {"rows": rows}, notes, asdict(s))
