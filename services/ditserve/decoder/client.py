"""The coordinator's side of DecoderService: `await DecoderClient(address).decode(...)`.

Latents travel as FP32 (N, C, L, L), unscaled. A failed call raises ServiceError with the
call's canonical code, so the coordinator handles decoder and stage failures alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import torch
from ditserve_client.proto.dit.v1 import decoder_pb2, decoder_pb2_grpc, image_pb2, tensor_pb2

from ditserve.common.errors import error_from_rpc
from ditserve.common.grpc_options import channel_options
from ditserve.security.tls import Dialer
from ditserve.wire.codec import encode_tensor

FORMATS = {"png": image_pb2.IMAGE_FORMAT_PNG, "jpeg": image_pb2.IMAGE_FORMAT_JPEG,
           "webp": image_pb2.IMAGE_FORMAT_WEBP}


def latents_to_proto(latents: torch.Tensor) -> tensor_pb2.Tensor:
    """(N, C, L, L) → an FP32 wire Tensor."""
    datatype, shape, raw = encode_tensor(latents.detach().float().cpu())
    return tensor_pb2.Tensor(datatype=datatype, shape=shape, raw_contents=raw.tobytes())


class DecoderClient:
    """An asyncio channel to one decoder."""

    def __init__(self, address: str, timeout: float | None = 120.0, dialer: Dialer | None = None):
        self.address = address
        self.timeout = timeout
        self._dialer = dialer or Dialer()  # mTLS under security.tls, else plaintext
        self._channel = self._dialer.channel(address, channel_options())
        self._stub = decoder_pb2_grpc.DecoderServiceStub(self._channel)
        self._closing: set[asyncio.Task] = set()

    async def decode(self, latents: torch.Tensor, fmt: int | str = image_pb2.IMAGE_FORMAT_PNG,
                     quality: int = 0, labels: Sequence[int] = (),
                     request_id: str = "") -> list[image_pb2.Image]:
        """Latents (N, C, L, L), unscaled → N encoded images (ServiceError on failure)."""
        request = decoder_pb2.DecodeRequest(
            latents=latents_to_proto(latents), format=FORMATS[fmt] if isinstance(fmt, str)
            else fmt, quality=quality, class_labels=list(labels), request_id=request_id)
        self._redial_if_rotated()
        try:
            response = await self._stub.Decode(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return list(response.images)

    def _redial_if_rotated(self) -> None:
        """New calls go through a channel with the rotated certificates; calls on the old
        one get their timeout to finish before it closes."""
        channel = self._dialer.refresh(self.address, channel_options())
        if channel is not None:
            old, self._channel = self._channel, channel
            self._stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            task = asyncio.get_running_loop().create_task(old.close(grace=self.timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self._channel.close()

