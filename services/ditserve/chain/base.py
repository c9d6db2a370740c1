"""The coordinator's view of the pipeline: one interface, in-process or over gRPC.

A chain takes a microbatch of (x_t, t, y) and returns the model output; where its stages
run (one process, or a relay chain of gRPC stage workers) is the implementation's affair.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class ErrorCode(enum.Enum):
    """Canonical status codes (the gRPC names), without depending on grpc here."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class ChainError(Exception):
    """A microbatch (or the chain) failed; UNAVAILABLE is safe to retry (stages are
    stateless per microbatch)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.code is ErrorCode.UNAVAILABLE


@dataclass(frozen=True)
class StageDescription:
    """What one stage serves, as the handshake reports it."""

    stage_index: int
    num_stages: int
    block_start: int
    block_end: int
    depth: int
    model_name: str
    model_config_json: str
    weight_hash: str
    wire_dtype: str
    address: str = ""
    device: str = "cpu/float32"
    max_batch_size: int = 0
    serving: bool = True


@dataclass(frozen=True)
class MicrobatchTiming:
    """Seconds each stage spent computing one microbatch, in chain order."""

    compute_seconds: tuple[float, ...]


class StageChain(Protocol):
    """A pipeline of stages that turns (x_t, t, y) into the model output."""

    async def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      request_ids: Sequence[str] = ()) -> torch.Tensor:
        """x (N, C, H, W) float32, t (N,), y (N,) int64 → output (N, C_out, H, W) float32.

        Many calls may be in flight at once; raises ChainError for this microbatch only."""
        ...

    async def describe(self) -> list[StageDescription]:
        """Every stage in chain order (the handshake)."""
        ...

    async def close(self) -> None:
        """Releases connections and threads."""
        ...
