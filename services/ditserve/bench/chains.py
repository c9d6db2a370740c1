"""The variants a scenario compares, behind one call: the in-process monolith
(LocalChain, one stage) and relay chains of stage processes (RemoteChain to stage 0).

A `Variant` owns what it started; `open_variants` starts them all before any timing, so
that the timed rounds can alternate between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ditserve.chain.base import ChainOutput
from ditserve.chain.local import LocalChain
from ditserve.chain.remote import RemoteChain
from ditserve.model import DiT
from ditserve.stage.runner import compute_dtype

from .procs import StageProcesses


@dataclass
class Variant:
    """One way of running the model: `stages` == 1 is the in-process monolith."""

    name: str
    stages: int
    chain: Any
    processes: StageProcesses | None = None
    threads: int = 0
    """torch threads of an in-process variant (0: the process's setting)."""
    busy: list[float] = field(default_factory=list)
    """Compute seconds per stage, summed over the variant's forwards (TimedLocalChain or
    the stages' own reports)."""


class TimedLocalChain(LocalChain):
    """LocalChain that computes with `threads` torch threads (0: the process's setting)."""

    threads: int = 0

    def _run(self, tensors: dict[str, torch.Tensor]) -> ChainOutput:
        # torch's thread count is per OS thread (OpenMP): set it on the compute thread.
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return super()._run(tensors)


async def open_variants(stack: AsyncExitStack, model: DiT, checkpoint: Path,
                        stage_counts: Sequence[int], stage_threads: dict[int, int],
                        device: str = "cpu", wire_dtype: str = "bf16",
                        monolith_threads: Sequence[int] = ()) -> list[Variant]:
    """The monolith (one per thread count in `monolith_threads`, the first named plain
    "monolith") plus one chain per stage count, all started and connected. On a CUDA
    `device` the monolith runs there too, in the stages' compute dtype (bf16), loaded
    from `checkpoint`: `model` is the CPU float32 model the checkpoint was written from,
    and a monolith on it would time the CPU against the stages' GPU."""
    variants = []
    for i, threads in enumerate(monolith_threads or [0]):
        chain = (TimedLocalChain.from_model(model, 1, "fp32") if device == "cpu" else
                 TimedLocalChain.from_checkpoint(checkpoint, 1, "fp32", device=device,
                                                 dtype=compute_dtype(device)))
        chain.threads = threads
        stack.push_async_callback(chain.close)
        variants.append(Variant("monolith" if i == 0 else f"monolith, {threads} thread(s)", 1,
                                chain, threads=threads))
    for stages in stage_counts:
        procs = StageProcesses(checkpoint, stages, stage_threads[stages], wire_dtype, device)
        stack.enter_context(procs)
        chain = RemoteChain(procs.address)
        stack.push_async_callback(chain.close)
        await chain.wait_connected(60.0)
        variants.append(Variant(f"{stages} stages", stages, chain, procs))
    return variants


async def forward(variant: Variant, x: torch.Tensor, t: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """One model call through the variant, adding its stages' compute seconds."""
    return (await forward_seconds(variant, x, t, y))[0]


async def forward_seconds(variant: Variant, x: torch.Tensor, t: torch.Tensor,
                          y: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """As `forward`, also returning each stage's compute seconds for this call."""
    out, seconds = await variant.chain.forward(x, t, y)
    if not variant.busy:
        variant.busy = [0.0] * len(seconds)
    for k, s in enumerate(seconds):
        variant.busy[k] += s
    return out, list(seconds)


def guided_labels(rows: int, num_classes: int) -> torch.Tensor:
    """(rows,) labels of rows/2 images with guidance: class labels, then the null class."""
    half = rows // 2
    return torch.tensor([i % num_classes for i in range(half)] + [num_classes] * (rows - half))
