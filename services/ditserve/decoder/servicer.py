"""DecoderService.Decode: wire tensor → VaeDecoder (batched) → encoded images.

Thin: it validates, converts at the edge (wire/codec.py) and delegates; bad input answers
INVALID_ARGUMENT with rich details and never reaches the VAE.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch
from ditserve_client.proto.dit.v1 import decoder_pb2, decoder_pb2_grpc, image_pb2

from ditserve.common.errors import to_grpc_status
from ditserve.common.logs import log_event
from ditserve.common.status import ServiceError, StatusCode
from ditserve.wire.codec import decode_tensor

from . import metrics
from .batching import DecodeBatcher
from .encoding import encode_images

FORMAT_NAMES = {image_pb2.IMAGE_FORMAT_UNSPECIFIED: "png", image_pb2.IMAGE_FORMAT_PNG: "png",
                image_pb2.IMAGE_FORMAT_JPEG: "jpeg", image_pb2.IMAGE_FORMAT_WEBP: "webp"}
FORMAT_ENUMS = {"png": image_pb2.IMAGE_FORMAT_PNG, "jpeg": image_pb2.IMAGE_FORMAT_JPEG,
                "webp": image_pb2.IMAGE_FORMAT_WEBP}


def parse_request(request: decoder_pb2.DecodeRequest) -> tuple[torch.Tensor, str, int]:
    """(latents, format name, quality); ValueError names what is wrong."""
    if not request.HasField("latents"):
        raise ValueError("latents are missing")
    t = request.latents
    latents = decode_tensor(t.datatype, list(t.shape), t.raw_contents, name="latents")
    if request.format not in FORMAT_NAMES:
        raise ValueError(f"unknown image format {request.format}")
    if not 0 <= request.quality <= 100:
        raise ValueError(f"quality must be 1..100 (0 = 90), got {request.quality}")
    if request.class_labels and len(request.class_labels) != latents.shape[0]:
        raise ValueError(f"{len(request.class_labels)} class labels for "
                         f"{latents.shape[0]} latent rows")
    return latents, FORMAT_NAMES[request.format], request.quality


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    """Decodes latents; UNAVAILABLE until `attach` gives it a loaded, warmed-up VAE."""

    def __init__(self, batcher: DecodeBatcher | None = None):
        self.batcher = batcher

    def attach(self, batcher: DecodeBatcher) -> None:
        self.batcher = batcher

    async def Decode(self, request: decoder_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> decoder_pb2.DecodeResponse:
        """Latents (N, C, L, L), unscaled → N images in the requested format."""
        started = time.perf_counter()
        if self.batcher is None:
            await self._abort(context, StatusCode.UNAVAILABLE, "the VAE is still loading")
        try:
            latents, fmt, quality = parse_request(request)
            self.batcher.decoder.validate(latents)
        except ValueError as error:
            await self._abort(context, StatusCode.INVALID_ARGUMENT, str(error), request)
        metrics.QUEUE_ROWS.set(self.batcher.queue_depth + latents.shape[0])
        pixels, seconds = await self.batcher.decode(latents)  # (N, H, W, 3) uint8
        encoded = await asyncio.to_thread(encode_images, pixels, fmt, quality)
        response = self._response(encoded, pixels, request, fmt, seconds)
        self._record(response, fmt, started, request)
        return response

    @staticmethod
    def _response(encoded: list[bytes], pixels: torch.Tensor, request: decoder_pb2.DecodeRequest,
                  fmt: str, seconds: float) -> decoder_pb2.DecodeResponse:
        height, width = pixels.shape[1], pixels.shape[2]
        labels = list(request.class_labels) or [0] * len(encoded)
        images = [image_pb2.Image(data=data, format=FORMAT_ENUMS[fmt], width=width,
                                  height=height, class_label=label)
                  for data, label in zip(encoded, labels, strict=True)]
        return decoder_pb2.DecodeResponse(images=images, decode_seconds=seconds)

    def _record(self, response: decoder_pb2.DecodeResponse, fmt: str, started: float,
                request: decoder_pb2.DecodeRequest) -> None:
        metrics.REQUESTS.labels("ok").inc()
        metrics.DECODE_SECONDS.observe(response.decode_seconds)
        metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
        metrics.IMAGE_BYTES.labels(fmt).inc(sum(len(i.data) for i in response.images))
        metrics.QUEUE_ROWS.set(self.batcher.queue_depth if self.batcher else 0)
        log_event("decoded", request_id=request.request_id, images=len(response.images),
                  format=fmt, seconds=round(response.decode_seconds, 4))

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, code: StatusCode, message: str,
                     request: decoder_pb2.DecodeRequest | None = None) -> None:
        metrics.REQUESTS.labels(code.value).inc()
        log_event("decode_failed", request_id=request.request_id if request else "",
                  code=code.value, message=message)
        await context.abort_with_status(to_grpc_status(ServiceError(code, message)))
