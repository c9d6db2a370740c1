"""The stage chain over gRPC: a relay chain of stage workers, reached through stage 0.

The hop itself (one long-lived multiplexed Forward stream, in-stream errors per
microbatch, reconnection with backoff) is `stage.client.StageClient`; RemoteChain adds
the coordinator's view: (x_t, t, y) in, the model output and each stage's compute
seconds out (docs/ARCHITECTURE.md §1). Its stream takes the pipeline's data path like a
stage's: on one host, the inputs go through a shared-memory ring and the frames through
the stage's doorbell (§5); elsewhere, bytes over gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import Transport
from ditserve.security.tls import Dialer
from ditserve.stage.client import StageClient, description_from_info
from ditserve.stage.runner import StageDescription
from ditserve.wire import CHUNK_BYTES

from .base import ChainOutput

INPUT_SLOT_BYTES = 8 << 20
"""Shared-memory slot size of the coordinator's ring: (x, t, y) of 64 rows of a 64 × 64 × 4
latent (512 px) in float32 is 4 MiB; a larger microbatch goes as gRPC bytes."""


class RemoteChain:
    """The StageChain of a relay chain of stage workers, reached through stage 0."""

    def __init__(self, address: str, chunk_bytes: int = CHUNK_BYTES, dialer: Dialer | None = None,
                 transport: Transport = "grpc"):
        """`transport`: "auto" offers stage 0 a shared-memory ring (taken when the two share
        a host), "grpc" sends bytes; "shm" requires the ring (stage/client.py)."""
        self.address = address
        self._client = StageClient(address, peer="stage-0", chunk_bytes=chunk_bytes,
                                   dialer=dialer, transport=transport,
                                   slot_bytes=INPUT_SLOT_BYTES)

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
