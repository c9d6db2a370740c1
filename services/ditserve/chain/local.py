"""The stage chain in one process: a list of StageRunners, run back to back.

Same interface as RemoteChain (StageChain) and numerically the same: each runner casts
its activations to the wire dtype exactly as a stage worker does before sending. All
compute runs on one worker thread, so the caller's event loop never stalls. Used by
tests and by a single-process mode (vLLM's InprocClient to RemoteChain's AsyncMPClient).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ditserve.config import WireDtype
from ditserve.model import DiT, load_stage, open_checkpoint, stage_block_range
from ditserve.stage.runner import StageDescription, StageRunner
from ditserve.wire import WireError

from .base import ChainOutput


class LocalChain:
    """StageChain over in-process runners (one per emulated stage)."""

    def __init__(self, runners: Sequence[StageRunner]):
        self.runners = list(runners)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-chain")

    @classmethod
    def from_model(cls, model: DiT, stages: int = 1, wire_dtype: WireDtype = "fp32",
                   weight_hash: str = "", max_batch_size: int = 32) -> LocalChain:
        """Emulated stages over ONE whole model (the runners share its modules)."""
        depth = model.config.depth
        return cls([StageRunner(model, stage_block_range(depth, i, stages), i, stages,
                                wire_dtype, max_batch_size, weight_hash, f"local:{i}")
                    for i in range(stages)])

    @classmethod
    def from_checkpoint(cls, path: str | Path, stages: int = 1, wire_dtype: WireDtype = "bf16",
                        model_name: str | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32,
                        max_batch_size: int = 32) -> LocalChain:
        """One slice per stage, each reading only its own tensors of the file, which is
        opened once for all of them."""
        reader = open_checkpoint(path, model_name)
        depth, weight_hash = reader.config.depth, reader.weight_hash()
        runners = []
        for i in range(stages):
            blocks = stage_block_range(depth, i, stages)
            model = load_stage(reader, blocks, device=device, dtype=dtype)
            runners.append(StageRunner(model, blocks, i, stages, wire_dtype, max_batch_size,
                                       weight_hash, f"local:{i}"))
        return cls(runners)

    def _run(self, tensors: dict[str, torch.Tensor]) -> ChainOutput:
        seconds = []
        for runner in self.runners:
            try:
                inputs = runner.validate(tensors)
            except WireError as error:
                raise error.to_service_error() from None
            outputs, busy = runner.compute_timed(inputs)
            tensors = dict(outputs)
            seconds.append(busy)
        return ChainOutput(tensors["out"], tuple(seconds))  # (N, C_out, H, W) float32

    async def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      request_ids: Sequence[str] = ()) -> ChainOutput:
        """x (N, C, H, W), t (N,), y (N,) → output (N, C_out, H, W) float32 and each
        emulated stage's compute seconds."""
        tensors = {"x": x.float().cpu(), "t": t.cpu(), "y": y.long().cpu()}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, tensors)

    async def describe(self) -> list[StageDescription]:
        return [runner.describe() for runner in self.runners]

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
        for runner in self.runners:
            runner.close()
