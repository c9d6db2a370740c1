"""Typed events of a Generate stream: Accepted, then Progress per step, then Result.

Plain dataclasses built from the wire messages (coordinator.proto), so that callers never
touch protobuf. Latents stay raw bytes with their shape and dtype; `.to_numpy()` needs
numpy, which the client does not depend on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .proto.dit.v1 import coordinator_pb2, image_pb2, tensor_pb2

FORMAT_NAMES = {image_pb2.IMAGE_FORMAT_PNG: "png", image_pb2.IMAGE_FORMAT_JPEG: "jpeg",
                image_pb2.IMAGE_FORMAT_WEBP: "webp", image_pb2.IMAGE_FORMAT_UNSPECIFIED: "png"}
SAMPLER_NAMES = {coordinator_pb2.SAMPLER_DDPM: "ddpm", coordinator_pb2.SAMPLER_DDIM: "ddim",
                 coordinator_pb2.SAMPLER_DPM_SOLVER_PP: "dpm-solver++",
                 coordinator_pb2.SAMPLER_UNSPECIFIED: "default"}
MODE_NAMES = {coordinator_pb2.GENERATION_MODE_EXACT: "exact",
              coordinator_pb2.GENERATION_MODE_ASYNC: "async",
              coordinator_pb2.GENERATION_MODE_UNSPECIFIED: "exact"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
ELEMENT_SIZES = {"FP32": 4, "FP16": 2, "BF16": 2, "FP64": 8, "INT64": 8, "INT32": 4,
                 "UINT8": 1}
NUMPY_DTYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4",
                "UINT8": "u1"}


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image as the server sent it (PNG, JPEG or WebP bytes)."""

    data: bytes
    format: str
    width: int
    height: int
    label: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def save(self, path: str | Path) -> Path:
        """Writes the encoded bytes unchanged."""
        path = Path(path)
        path.write_bytes(self.data)
        return path

    def to_pil(self) -> Any:
        """A PIL.Image (needs Pillow)."""
        from .grid import open_image

        return open_image(self.data)

    @classmethod
    def from_proto(cls, image: image_pb2.Image) -> EncodedImage:
        return cls(data=image.data, format=FORMAT_NAMES.get(image.format, "png"),
                   width=image.width, height=image.height, label=image.class_label)


@dataclass(frozen=True)
class TypedArray:
    """A tensor's raw little-endian row-major bytes with its shape and dtype name."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes

    def to_numpy(self) -> Any:
        """A numpy array (needs numpy; BF16 has no numpy dtype)."""
        import numpy as np

        if self.dtype not in NUMPY_DTYPES:
            raise ValueError(f"{self.dtype} has no numpy dtype")
        return np.frombuffer(self.data, dtype=NUMPY_DTYPES[self.dtype]).reshape(self.shape)

    @classmethod
    def from_proto(cls, tensor: tensor_pb2.Tensor) -> TypedArray:
        shape = tuple(int(d) for d in tensor.shape)
        size = ELEMENT_SIZES.get(tensor.datatype)
        if size is None or math.prod(shape) * size != len(tensor.raw_contents):
            raise ValueError(f"malformed tensor from server: {tensor.datatype} {list(shape)} "
                             f"with {len(tensor.raw_contents)} bytes")
        return cls(shape=shape, dtype=tensor.datatype, data=tensor.raw_contents)


@dataclass(frozen=True)
class Accepted:
    """The request was admitted: its id, queue position and the settings in use."""

    request_id: str
    queue_position: int
    seed: int
    num_steps: int
    sampler: str
    guidance_scale: float
    mode: str = "exact"
    """The mode that runs: "exact" or "async"."""
    async_warmup_steps: int = 0
    """Async mode: the exact steps before pipelining; 0 in exact mode."""

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.Accepted) -> Accepted:
        return cls(request_id=msg.request_id, queue_position=msg.queue_position,
                   seed=msg.seed, num_steps=msg.num_steps,
                   sampler=SAMPLER_NAMES.get(msg.sampler, "unknown"),
                   guidance_scale=msg.guidance_scale,
                   mode=MODE_NAMES.get(msg.mode, "unknown"),
                   async_warmup_steps=msg.async_warmup_steps)


@dataclass(frozen=True)
class Progress:
    """A denoising step done (1-based `step` of `total`), with optional previews; or,
    when `waiting_on` is set, a notice that the request is stalled on that peer ("stage
    chain", "decoder") since `waiting_seconds`, `step` repeating the last step done."""

    step: int
    total: int
    timestep: int
    elapsed: float
    eta: float
    previews: list[EncodedImage] = field(default_factory=list)
    waiting_on: str = ""
    waiting_reason: str = ""
    waiting_seconds: float = 0.0

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.Progress) -> Progress:
        return cls(step=msg.step, total=msg.total_steps, timestep=msg.timestep,
                   elapsed=msg.elapsed_seconds, eta=msg.eta_seconds,
                   previews=[EncodedImage.from_proto(p) for p in msg.previews],
                   waiting_on=msg.waiting_on, waiting_reason=msg.waiting_reason,
                   waiting_seconds=msg.waiting_seconds)


@dataclass(frozen=True)
class Timings:
    """Seconds spent queued, denoising and decoding."""

    queued: float
    denoising: float
    decoding: float


@dataclass(frozen=True)
class Result:
    """The finished request: images in label order, optional latents (N, C, L, L) FP32."""

    images: list[EncodedImage]
    latents: TypedArray | None
    timings: Timings
    seed: int
    request_id: str = ""

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.Result, request_id: str = "") -> Result:
        latents = TypedArray.from_proto(msg.latents) if msg.HasField("latents") else None
        return cls(images=[EncodedImage.from_proto(i) for i in msg.images], latents=latents,
                   timings=Timings(queued=msg.queued_seconds, denoising=msg.denoising_seconds,
                                   decoding=msg.decoding_seconds),
                   seed=msg.seed, request_id=request_id)


Event = Accepted | Progress | Result


def event_from_proto(msg: coordinator_pb2.GenerateResponse, request_id: str = "") -> Event:
    """One GenerateResponse → its typed event."""
    kind = msg.WhichOneof("event")
    if kind == "accepted":
        return Accepted.from_proto(msg.accepted)
    if kind == "progress":
        return Progress.from_proto(msg.progress)
    if kind == "result":
        return Result.from_proto(msg.result, request_id)
    raise ValueError("server sent an empty GenerateResponse")
