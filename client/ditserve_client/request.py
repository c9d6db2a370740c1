"""Keyword options of `generate` → a validated GenerateRequest (shared by both clients)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .proto.dit.v1 import coordinator_pb2, image_pb2

SAMPLERS = {None: coordinator_pb2.SAMPLER_UNSPECIFIED, "ddpm": coordinator_pb2.SAMPLER_DDPM,
            "ddim": coordinator_pb2.SAMPLER_DDIM,
            "dpm-solver++": coordinator_pb2.SAMPLER_DPM_SOLVER_PP}
GUIDANCE_CHANNELS = {"first3": coordinator_pb2.GUIDANCE_CHANNELS_FIRST_THREE,
                     "all": coordinator_pb2.GUIDANCE_CHANNELS_ALL}
PREVIEWS = {None: coordinator_pb2.PREVIEW_MODE_UNSPECIFIED,
            "approximate": coordinator_pb2.PREVIEW_MODE_APPROXIMATE,
            "decoded": coordinator_pb2.PREVIEW_MODE_DECODED}
IMAGE_FORMATS = {"png": image_pb2.IMAGE_FORMAT_PNG, "jpeg": image_pb2.IMAGE_FORMAT_JPEG,
                 "jpg": image_pb2.IMAGE_FORMAT_JPEG, "webp": image_pb2.IMAGE_FORMAT_WEBP}
MAX_SEED = 2**64 - 1


def _choice(kind: str, value: object, table: dict) -> int:
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        known = ", ".join(repr(k) for k in table if k is not None)
        raise ValueError(f"unknown {kind} {value!r}; choose one of {known}")
    return table[key]


@dataclass(frozen=True)
class GenerateOptions:
    """Everything of a request except its class labels, as `generate` takes it."""

    seed: int | None = None
    steps: int = 0
    sampler: str | None = "ddpm"
    guidance: float | None = None
    guidance_channels: str = "first3"
    previews: str | None = None
    preview_every: int = 1
    image_format: str = "png"
    quality: int = 0
    return_latents: bool = False
    skip_images: bool = False
    request_id: str = ""

    def validate(self) -> None:
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**64-1, got {self.seed}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0 (0 = the sampler's default), got {self.steps}")
        if self.guidance is not None and not self.guidance >= 1.0:
            raise ValueError(f"guidance scale must be >= 1 (1 = none), got {self.guidance}")
        if self.preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {self.preview_every}")
        if not 0 <= self.quality <= 100:
            raise ValueError(f"quality must be 1..100 (0 = server default), got {self.quality}")

    def to_proto(self, class_ids: Sequence[int]) -> coordinator_pb2.GenerateRequest:
        """The wire request; ValueError names the first bad option."""
        self.validate()
        if not class_ids:
            raise ValueError("at least one class label is needed (one image per label)")
        request = coordinator_pb2.GenerateRequest(
            class_labels=list(class_ids), num_steps=self.steps,
            sampler=_choice("sampler", self.sampler, SAMPLERS),
            guidance_channels=_choice("guidance channels", self.guidance_channels,
                                      GUIDANCE_CHANNELS),
            preview_mode=_choice("preview mode", self.previews, PREVIEWS),
            preview_every=self.preview_every,
            image_format=_choice("image format", self.image_format, IMAGE_FORMATS),
            image_quality=self.quality, skip_images=self.skip_images,
            return_latents=self.return_latents, request_id=self.request_id)
        if self.seed is not None:
            request.seed = self.seed
        if self.guidance is not None:
            request.guidance_scale = self.guidance
        return request
