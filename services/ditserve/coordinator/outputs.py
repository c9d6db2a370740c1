"""What a request gets besides progress: previews during denoising and final images.

Approximate previews are a linear latent→RGB map fit to the served VAE at start-up
(sampling/previews.py), cheap enough for every step; decoded previews and final images go
to the decoder service, awaited off the denoising loop so that decoding overlaps the denoising of others
(PipeDiT's decoupled VAE decode).
"""

from __future__ import annotations

import asyncio
import inspect
import io
from collections.abc import Awaitable
from typing import Any

import torch
from ditserve_client.proto.dit.v1 import image_pb2

from ditserve.common.logs import log_event
from ditserve.common.status import ServiceError, StatusCode
from ditserve.sampling.previews import LatentRgbMap

from .request import Request

JPEG = image_pb2.IMAGE_FORMAT_JPEG
PREVIEW_QUALITY = 75


class OutputMaker:
    """Previews and images of requests; `decoder` is a DecoderClient or None, `preview_map`
    the served VAE's latent→RGB map, or a future of it while it is being fit (None: SD
    1.x's map)."""

    def __init__(self, decoder: Any | None,
                 preview_map: LatentRgbMap | Awaitable[LatentRgbMap | None] | None = None):
        self.decoder = decoder
        self._preview_map = preview_map

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def previews_due(self, request: Request,
                     pred_x0: torch.Tensor) -> Awaitable[list[Any]] | None:
        """Previews of the predicted clean latents (n, C, L, L) if this step wants them."""
        spec = request.spec
        if spec.preview == "none" or request.step % spec.preview_every:
            return None
        if spec.preview == "approximate":
            return self._approximate_previews(pred_x0, spec.labels)
        return self._decoded_previews(pred_x0, request)

    async def _approximate_previews(self, pred_x0: torch.Tensor,
                                    labels: tuple[int, ...]) -> list[Any]:
        """Waits for the map's fit only the first time (requests in the first seconds)."""
        if inspect.isawaitable(self._preview_map):
            self._preview_map = await self._preview_map
        return approximate_previews(pred_x0, labels, self._preview_map or LatentRgbMap.sd15())

    async def _decoded_previews(self, pred_x0: torch.Tensor, request: Request) -> list[Any]:
        """VAE-decoded previews; a failure costs the preview, not the request."""
        try:
            return await self._decode(pred_x0, request, PREVIEW_QUALITY, JPEG)
        except ServiceError as error:
            log_event("preview_failed", request_id=request.request_id, message=error.message)
            return []

    async def final_images(self, request: Request) -> list[Any]:
        if request.spec.skip_images:
            return []
        return await self._decode(request.x, request, request.spec.image_quality,
                                  request.spec.image_format)

    async def _decode(self, latents: torch.Tensor, request: Request, quality: int,
                      image_format: int) -> list[Any]:
        if self.decoder is None:
            raise ServiceError(StatusCode.FAILED_PRECONDITION, "no decoder is configured")
        call = self.decoder.decode
        args = (latents, image_format, quality, list(request.spec.labels))
        if inspect.iscoroutinefunction(call):
            return list(await call(*args))
        return list(await asyncio.to_thread(call, *args))


def approximate_previews(pred_x0: torch.Tensor, labels: tuple[int, ...],
                         preview_map: LatentRgbMap) -> list[Any]:
    """(n, C, L, L) predicted clean latents → one JPEG Image message per row."""
    pixels = preview_map(pred_x0)  # (n, H, W, 3) uint8
    return [_jpeg(image.numpy(), label) for image, label in zip(pixels, labels, strict=True)]


def _jpeg(pixels: Any, label: int) -> image_pb2.Image:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return image_pb2.Image(data=buffer.getvalue(), format=JPEG, width=pixels.shape[1],
                           height=pixels.shape[0], class_label=label)
