"""A generation request as the engine sees it: validated, defaults filled, no protobuf.

`spec_from_proto` is the one place a `dit.v1.GenerateRequest` is checked; every problem is
an INVALID_ARGUMENT naming the field (docs/ARCHITECTURE.md §5), so a client knows what to
fix.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass

from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import (
    CoordinatorConfig,
    GenerationMode,
    GuidanceChannels,
    PreviewMode,
    SamplerName,
)
from ditserve.model import DiTConfig
from ditserve.sampling import SAMPLERS

DEFAULT_QUALITY = 90
MAX_GUIDANCE_SCALE = 1e4
"""Largest guidance scale admitted. Guidance multiplies the difference of two eps
predictions (each of order 1) by the scale, and the first steps divide by sqrt(alpha_bar)
(about 6e-3 at t=999), so a scale of 1e38 overflows float32 at once; useful scales are
1-10. The SDK checks the same bound before sending."""


@dataclass(frozen=True)
class GenerationSpec:
    """One validated request: n = len(labels) images of one latent size."""

    request_id: str
    labels: tuple[int, ...]
    seed: int
    sampler: SamplerName
    num_steps: int
    guidance_scale: float
    guidance_channels: GuidanceChannels = "first3"
    """"first3" (the reference) or "all": the eps channels guidance applies to."""
    preview: PreviewMode = "none"
    """"none", "approximate" or "decoded"."""
    preview_every: int = 1
    image_format: int = 1
    """dit.v1.ImageFormat value (PNG = 1)."""
    image_quality: int = DEFAULT_QUALITY
    skip_images: bool = False
    return_latents: bool = False
    deadline: float | None = None
    """time.monotonic() after which the request fails DEADLINE_EXCEEDED; None: no limit."""
    resumed: bool = False
    """Sent again after its stream broke: may use the max_resumed_requests reserve."""
    mode: GenerationMode = "exact"
    """"exact", or "async": pipelined steps on stale activations (scheduler.py)."""
    async_warmup_steps: int = 0
    """Async mode: the exact steps before pipelining starts (0..num_steps); 0 in exact."""

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def guided(self) -> bool:
        """Whether the request sends null-class rows (scale 1 means no guidance)."""
        return self.guidance_scale != 1.0

    @property
    def rows(self) -> int:
        """Rows this request puts in a microbatch: n conditional (+ n null-class)."""
        return self.num_images * (2 if self.guided else 1)


def invalid(field: str, message: str) -> ServiceError:
    return ServiceError(StatusCode.INVALID_ARGUMENT, f"{field}: {message}")


def check_labels(labels: list[int], model: DiTConfig, config: CoordinatorConfig) -> None:
    if not labels:
        raise invalid("class_labels", "give at least one class label (one image per label)")
    if len(labels) > config.max_images_per_request:
        raise invalid("class_labels", f"{len(labels)} labels, at most "
                      f"{config.max_images_per_request} images per request")
    for label in labels:
        if not 0 <= label < model.num_classes:
            raise invalid("class_labels", f"label {label} is outside 0..{model.num_classes - 1}")


def check_sampler_steps(sampler: str, steps: int) -> int:
    """The step count to use (0 → the sampler's default), checked against its range."""
    if sampler not in SAMPLERS:
        raise invalid("sampler", f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    steps = steps or SAMPLERS[sampler].default_steps
    if not 1 <= steps <= SAMPLERS[sampler].max_steps:
        raise invalid("num_steps", f"{steps} is outside 1..{SAMPLERS[sampler].max_steps} for "
                      f"sampler {sampler}")
    return steps


def check_guidance(scale: float, model: DiTConfig) -> None:
    if not (math.isfinite(scale) and 1.0 <= scale <= MAX_GUIDANCE_SCALE):
        raise invalid("guidance_scale", f"must be a number from 1 to {MAX_GUIDANCE_SCALE:g} "
                      f"(1 disables guidance), got {scale:g}")
    if scale != 1.0 and not model.has_null_class:
        raise invalid("guidance_scale", "this model has no null class, so only 1 is allowed")


def check_async_warmup(mode: GenerationMode, warmup: int | None, steps: int,
                       config: CoordinatorConfig) -> int:
    """The exact warm-up steps of an async request (None → the configured default, capped
    at its step count); 0 for an exact request, which must not give any."""
    if mode == "exact":
        if warmup is not None:
            raise invalid("async_warmup_steps", "only an async request has warm-up steps "
                          "(set mode to async, or leave async_warmup_steps unset)")
        return 0
    if warmup is None:
        return min(config.default_async_warmup_steps, steps)
    if not 0 <= warmup <= steps:
        raise invalid("async_warmup_steps", f"{warmup} is outside 0..{steps} (the request's "
                      "num_steps)")
    return warmup


def check_rows(spec: GenerationSpec, config: CoordinatorConfig) -> None:
    """A request's rows never split across microbatches, so they must fit in one."""
    if spec.rows > config.max_rows_per_microbatch:
        raise invalid("class_labels", f"{spec.num_images} images "
                      f"{'with guidance ' if spec.guided else ''}need {spec.rows} rows, more "
                      f"than the {config.max_rows_per_microbatch} rows of a microbatch")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def new_seed() -> int:
    return secrets.randbits(63)
