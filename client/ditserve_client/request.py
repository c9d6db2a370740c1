"""What both clients share: keyword options of `generate` → a validated GenerateRequest,
and the Generate stream's messages → typed events.

An option left unset (None) is left unset on the wire, so the server's configured default
applies (its sampler, step count, guidance scale, image format and quality).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .events import Accepted, Event, event_from_proto
from .proto.dit.v1 import coordinator_pb2, image_pb2

SAMPLERS = {None: coordinator_pb2.SAMPLER_UNSPECIFIED, "ddpm": coordinator_pb2.SAMPLER_DDPM,
            "ddim": coordinator_pb2.SAMPLER_DDIM,
            "dpm-solver++": coordinator_pb2.SAMPLER_DPM_SOLVER_PP}
GUIDANCE_CHANNELS = {None: coordinator_pb2.GUIDANCE_CHANNELS_UNSPECIFIED,
                     "first3": coordinator_pb2.GUIDANCE_CHANNELS_FIRST_THREE,
                     "all": coordinator_pb2.GUIDANCE_CHANNELS_ALL}
PREVIEWS = {None: coordinator_pb2.PREVIEW_MODE_UNSPECIFIED,
            "approximate": coordinator_pb2.PREVIEW_MODE_APPROXIMATE,
            "decoded": coordinator_pb2.PREVIEW_MODE_DECODED}
MODES = {None: coordinator_pb2.GENERATION_MODE_UNSPECIFIED,
         "exact": coordinator_pb2.GENERATION_MODE_EXACT,
         "async": coordinator_pb2.GENERATION_MODE_ASYNC}
IMAGE_FORMATS = {None: image_pb2.IMAGE_FORMAT_UNSPECIFIED, "png": image_pb2.IMAGE_FORMAT_PNG,
                 "jpeg": image_pb2.IMAGE_FORMAT_JPEG, "jpg": image_pb2.IMAGE_FORMAT_JPEG,
                 "webp": image_pb2.IMAGE_FORMAT_WEBP}
MAX_SEED = 2**64 - 1
MAX_GUIDANCE = 1e4
"""Largest guidance scale sent. Guidance extrapolates eps_u + s (eps_c - eps_u); DiT uses
1.5..4 and useful values stay below ~20, while scales near float32's range overflow the
latents. 1e4 is far above any useful value and keeps s * |eps| (|eps| ~ 1..10) finite."""


def _choice(kind: str, value: object, table: dict) -> int:
    key = value.lower() if isinstance(value, str) else value
    if key not in table:
        known = ", ".join(repr(k) for k in table if k is not None)
        raise ValueError(f"unknown {kind} {value!r}; choose one of {known}")
    return table[key]


@dataclass(frozen=True)
class GenerateOptions:
    """Everything of a request except its class labels; None means the server's default."""

    seed: int | None = None
    """Seed of the request's generator (0..2**64-1); None: the server picks one."""
    steps: int | None = None
    """Denoising steps (>= 1); None: the sampler's default."""
    sampler: str | None = None
    """"ddpm", "ddim" or "dpm-solver++"; None: the server's default sampler."""
    guidance: float | None = None
    """Classifier-free guidance scale, 1 (none) .. 1e4; None: the server's default."""
    guidance_channels: str | None = None
    """"first3" (the reference's) or "all"; None: the server's default (first3)."""
    previews: str | None = None
    """"approximate" or "decoded" previews during denoising; None: none."""
    preview_every: int | None = None
    """A preview every this many steps (>= 1); None: every step."""
    image_format: str | None = None
    """"png", "jpeg" or "webp"; None: the server's default (png)."""
    quality: int | None = None
    """JPEG/WebP quality 1..100; None: the server's default (90)."""
    return_latents: bool = False
    """Also return the final latents (N, C, L, L) as FP32."""
    skip_images: bool = False
    """Return no images (with return_latents)."""
    request_id: str = ""
    """Caller's id for the server's logs; empty: the server makes one."""
    mode: str | None = None
    """"exact" or "async" (all stages work on this request at once, each on activations
    one step stale); None: the server's default (exact)."""
    warmup: int | None = None
    """Async mode: exact steps before pipelining starts (0..steps); None: the server's."""

    @classmethod
    def from_keywords(cls, options: dict[str, Any]) -> GenerateOptions:
        """From `generate`'s keyword arguments; ValueError names an unknown one."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} of generate; known: "
                             f"{', '.join(known)}")
        return cls(**options)

    def validate(self) -> None:
        """ValueError naming the first bad option; 0 never stands for a default here."""
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..2**64-1, got {self.seed}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1 (leave it unset for the sampler's "
                             f"default), got {self.steps}")
        if self.guidance is not None and not (
                math.isfinite(self.guidance) and 1.0 <= self.guidance <= MAX_GUIDANCE):
            raise ValueError(f"guidance scale must be in 1..{MAX_GUIDANCE:g} (1 = none), "
                             f"got {self.guidance}")
        if self.preview_every is not None and self.preview_every < 1:
            raise ValueError(f"preview_every must be at least 1, got {self.preview_every}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1..100, got {self.quality}")
        if self.warmup is not None:
            if (self.mode or "").lower() != "async":
                raise ValueError("warmup is for async mode only (mode='async')")
            if not 0 <= self.warmup <= (self.steps or self.warmup):
                raise ValueError(f"warmup must be 0..steps, got {self.warmup}")

    def to_proto(self, class_ids: Sequence[int]) -> coordinator_pb2.GenerateRequest:
        """The wire request; ValueError names the first bad option."""
        self.validate()
        if not class_ids:
            raise ValueError("at least one class label is needed (one image per label)")
        request = coordinator_pb2.GenerateRequest(
            class_labels=list(class_ids), num_steps=self.steps or 0,
            sampler=_choice("sampler", self.sampler, SAMPLERS),
            guidance_channels=_choice("guidance channels", self.guidance_channels,
                                      GUIDANCE_CHANNELS),
            preview_mode=_choice("preview mode", self.previews, PREVIEWS),
            preview_every=self.preview_every or 0,
            image_format=_choice("image format", self.image_format, IMAGE_FORMATS),
            image_quality=self.quality or 0, skip_images=self.skip_images,
            return_latents=self.return_latents, request_id=self.request_id,
            mode=_choice("mode", self.mode, MODES))
        if self.seed is not None:
            request.seed = self.seed
        if self.guidance is not None:
            request.guidance_scale = self.guidance
        if self.warmup is not None:
            request.async_warmup_steps = self.warmup
        return request


class EventReader:
    """GenerateResponse messages → events; Result carries the id Accepted reported."""

    def __init__(self, request: coordinator_pb2.GenerateRequest):
        self.request_id = request.request_id

    def read(self, message: coordinator_pb2.GenerateResponse) -> Event:
        event = event_from_proto(message, self.request_id)
        if isinstance(event, Accepted):
            self.request_id = event.request_id
        return event
