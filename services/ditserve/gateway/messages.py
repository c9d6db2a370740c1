"""JSON ↔ the client SDK: the request body, the events and the errors the gateway speaks.

The body mirrors `dit.v1.GenerateRequest` field for field; enums are the SDK's lowercase
names ("ddim", "approximate", "png"). 64-bit seeds travel as decimal strings in replies
(proto3's JSON mapping; a JavaScript number holds only 53 bits) and are accepted as
numbers or strings. Images are base64 in `data` (with their media type); previews, which
a page shows at once, are `data:` URLs. gRPC status codes map to HTTP ones as Google's
API guidelines and grpc-gateway map them (https://google.aip.dev/193).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, fields
from typing import Any

from ditserve_client import Accepted, DitserveError, EncodedImage, Progress, Result

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
"""gRPC status name → HTTP status; anything else (INTERNAL, UNKNOWN, DATA_LOSS) is 500."""

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_UINT64 = 2**64 - 1


class BadRequest(ValueError):
    """A request body the gateway refuses before calling the coordinator (HTTP 400)."""


@dataclass(frozen=True)
class ApiError:
    """One failure as the gateway replies it: HTTP status, gRPC code name, message."""

    status: int
    code: str
    message: str
    retry_after: float | None = None

    @classmethod
    def from_exception(cls, error: Exception) -> ApiError:
        """A DitserveError keeps its code; a ValueError (bad option, unknown class) is 400."""
        if isinstance(error, DitserveError):
            return cls(HTTP_STATUS.get(error.code, 500), error.code, error.message,
                       error.retry_after)
        if isinstance(error, ValueError):
            return cls(400, "INVALID_ARGUMENT", str(error))
        return cls(500, "INTERNAL", f"{type(error).__name__}: {error}")

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return {"error": body}

    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds (HTTP has no fractions), when the server hinted."""
        if self.retry_after is None or self.status not in (429, 503):
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


@dataclass(frozen=True)
class GenerateBody:
    """`POST /v1/generate`: the JSON body, one field per GenerateRequest field."""

    class_labels: tuple[int | str, ...]
    """Class ids or names (any case), one image each."""
    seed: int | None = None
    """Seed of the request's generator; random when absent."""
    num_steps: int = 0
    """Denoising steps; 0 for the sampler's default."""
    sampler: str | None = None
    """"ddpm", "ddim" or "dpm-solver++"; absent for the server's default."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; absent for the server's default, 1 for none."""
    guidance_channels: str = "first3"
    """"first3" (the reference's) or "all"."""
    preview_mode: str | None = None
    """"approximate" or "decoded" previews in progress events; absent for none."""
    preview_every: int = 1
    """A preview every this many steps."""
    image_format: str = "png"
    """"png", "jpeg" or "webp"."""
    image_quality: int = 0
    """JPEG/WebP quality 1..100; 0 for the server's default."""
    skip_images: bool = False
    """Return no images (latents only)."""
    return_latents: bool = False
    """Return the final latents (N, C, L, L) FP32, base64 of little-endian bytes."""
    request_id: str = ""
    """Caller's id for logs."""
    mode: str | None = None
    """"exact" or "async"; absent for the server's default (exact)."""
    async_warmup_steps: int | None = None
    """Async mode: exact steps before pipelining; absent for the server's default."""

    @classmethod
    def from_json(cls, data: Any) -> GenerateBody:
        """The body, every field type-checked; BadRequest names the first bad one."""
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if "class_labels" not in data:
            raise BadRequest("class_labels is required (class ids or names, one image each)")
        values = {name: _field(name, value) for name, value in data.items()
                  if value is not None}
        return cls(**values)

    def options(self) -> dict[str, Any]:
        """Keyword options of `AsyncClient.generate` (which validates their ranges). The
        body's 0s mean "the server's default", as in the proto; the SDK spells that None."""
        return {"seed": self.seed, "steps": self.num_steps or None, "sampler": self.sampler,
                "guidance": self.guidance_scale, "guidance_channels": self.guidance_channels,
                "previews": self.preview_mode, "preview_every": self.preview_every,
                "image_format": self.image_format, "quality": self.image_quality or None,
                "skip_images": self.skip_images, "return_latents": self.return_latents,
                "request_id": self.request_id, "mode": self.mode,
                "warmup": self.async_warmup_steps}


def _field(name: str, value: Any) -> Any:
    """One body field, converted to its Python type or refused."""
    if name == "class_labels":
        if not isinstance(value, list) or not value:
            raise BadRequest("class_labels must be a non-empty list of class ids or names")
        if not all(isinstance(v, str) or _is_int(v) for v in value):
            raise BadRequest("class_labels must hold class ids (integers) or names (strings)")
        return tuple(value)
    if name == "seed":
        return _seed(value)
    if name in ("num_steps", "preview_every", "image_quality", "async_warmup_steps"):
        if not _is_int(value):
            raise BadRequest(f"{name} must be an integer, got {value!r}")
        return value
    if name == "guidance_scale":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"guidance_scale must be a number, got {value!r}")
        return float(value)
    if name in ("skip_images", "return_latents"):
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seed(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not _is_int(value) or not 0 <= value <= MAX_UINT64:
        raise BadRequest(f"seed must be an integer in 0..2**64-1 (a number or a decimal "
                         f"string), got {value!r}")
    return value


# ---- events → JSON ---------------------------------------------------------------------

def image_json(image: EncodedImage) -> dict[str, Any]:
    return {"media_type": MEDIA_TYPES[image.format], "width": image.width,
            "height": image.height, "label": image.label,
            "data": base64.b64encode(image.data).decode("ascii")}


def data_url(image: EncodedImage) -> str:
    return f"data:{MEDIA_TYPES[image.format]};base64,{base64.b64encode(image.data).decode()}"


def accepted_json(event: Accepted) -> dict[str, Any]:
    return {"request_id": event.request_id, "queue_position": event.queue_position,
            "seed": str(event.seed), "num_steps": event.num_steps, "sampler": event.sampler,
            "guidance_scale": event.guidance_scale, "mode": event.mode,
            "async_warmup_steps": event.async_warmup_steps}


def progress_json(event: Progress) -> dict[str, Any]:
    return {"step": event.step, "total_steps": event.total, "timestep": event.timestep,
            "elapsed_seconds": event.elapsed, "eta_seconds": event.eta,
            "previews": [data_url(p) for p in event.previews],
            "waiting_on": event.waiting_on, "waiting_reason": event.waiting_reason,
            "waiting_seconds": event.waiting_seconds}


def result_json(event: Result) -> dict[str, Any]:
    latents = None
    if event.latents is not None:
        latents = {"shape": list(event.latents.shape), "dtype": event.latents.dtype,
                   "data": base64.b64encode(event.latents.data).decode("ascii")}
    timings = event.timings
    return {"request_id": event.request_id, "seed": str(event.seed),
            "images": [image_json(i) for i in event.images], "latents": latents,
            "timings": {"queued_seconds": timings.queued,
                        "denoising_seconds": timings.denoising,
                        "decoding_seconds": timings.decoding}}


EVENT_NAMES = {Accepted: "accepted", Progress: "progress", Result: "result"}
EVENT_JSON = {Accepted: accepted_json, Progress: progress_json, Result: result_json}


def event_json(event: Accepted | Progress | Result) -> tuple[str, dict[str, Any]]:
    """(SSE event name, JSON data) of one SDK event."""
    return EVENT_NAMES[type(event)], EVENT_JSON[type(event)](event)
