"""The coordinator's view of the pipeline: one interface, in-process or over gRPC.

A chain takes a microbatch of (x_t, t, y) and returns the model output with the compute
seconds of each stage; where its stages run (one process, or a relay chain of gRPC stage
workers) is the implementation's affair (docs/ARCHITECTURE.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

from ditserve.stage.runner import StageDescription


class ChainOutput(NamedTuple):
    """One microbatch's answer from the chain."""

    out: torch.Tensor
    """(N, C_out, H, W) float32: the model output (eps, and the learned sigma if any)."""
    stage_seconds: tuple[float, ...]
    """Seconds each stage spent computing this microbatch, in chain order (utilisation)."""


class StageChain(Protocol):
    """A pipeline of stages that turns (x_t, t, y) into the model output."""

    async def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      request_ids: Sequence[str] = ()) -> ChainOutput:
        """x (N, C, H, W) float32, t (N,), y (N,) int64 → the output (N, C_out, H, W) and
        each stage's compute seconds.

        Many calls may be in flight at once; raises ServiceError for this microbatch only."""
        ...

    async def describe(self) -> list[StageDescription]:
        """Every stage in chain order (the handshake)."""
        ...

    async def close(self) -> None:
        """Releases connections and threads."""
        ...
