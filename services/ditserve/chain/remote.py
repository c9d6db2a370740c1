"""The stage chain over gRPC: a relay chain of stage workers, reached through stage 0.

The hop itself (one long-lived multiplexed Forward stream, in-stream errors per
microbatch, reconnection with backoff) is `stage.client.StageClient`; RemoteChain adds
the coordinator's view: (x_t, t, y) in, the model output and each stage's compute
seconds out (docs/ARCHITECTURE.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditserve.common.status import ServiceError, StatusCode
from ditserve.security.tls import Dialer
from ditserve.stage.client import StageClient, description_from_info
from ditserve.stage.runner import StageDescription
from ditserve.wire import CHUNK_BYTES

from .base import ChainOutput


class RemoteChain:
    """The StageChain of a relay chain of stage workers, reached through stage 0."""

    def __init__(self, address: str, chunk_bytes: int = CHUNK_BYTES, dialer: Dialer | None = None):
        self.address = address
        self._client = StageClient(address, peer="stage-0", chunk_bytes=chunk_bytes,
                                   dialer=dialer)

    async def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      request_ids: Sequence[str] = ()) -> ChainOutput:
        """x (N, C, H, W), t (N,), y (N,) → model output (N, C_out, H, W) float32, with
        the seconds each stage computed (the stages report them with the reply)."""
        tensors = [("x", x.float()), ("t", t), ("y", y.long())]
        outputs, seconds = await self._client.call(tensors, request_ids)
        if set(outputs) != {"out"}:
            raise ServiceError(StatusCode.INTERNAL, f"stage 0 replied with tensors "
                                                    f"{sorted(outputs)}, expected 'out'")
        return ChainOutput(outputs["out"], tuple(seconds))

    async def describe(self) -> list[StageDescription]:
        return [description_from_info(info) for info in await self._client.describe()]

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await self._client.wait_connected(timeout)

    async def close(self) -> None:
        await self._client.close()
