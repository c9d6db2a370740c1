"""dit.v1 messages ↔ the engine's plain types, at the edge of the coordinator service.

`spec_from_proto` validates a GenerateRequest completely (INVALID_ARGUMENT naming the
field); `event_to_proto` turns engine events into GenerateResponse messages.
"""

from __future__ import annotations

import time

from ditserve_client.proto.dit.v1 import coordinator_pb2, image_pb2, tensor_pb2

from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import (
    CoordinatorConfig,
    GenerationMode,
    GuidanceChannels,
    PreviewMode,
    SamplerName,
)
from ditserve.model import DiTConfig
from ditserve.wire import encode_tensor

from .request import Accepted, Event, Progress, Result
from .spec import (
    DEFAULT_QUALITY,
    GenerationSpec,
    check_async_warmup,
    check_guidance,
    check_labels,
    check_rows,
    check_sampler_steps,
    invalid,
    new_request_id,
    new_seed,
)

# dit.v1 enum value → the spelling of config.py's Literal aliases.
SAMPLER_NAMES: dict[int, SamplerName] = {
    coordinator_pb2.SAMPLER_DDPM: "ddpm", coordinator_pb2.SAMPLER_DDIM: "ddim",
    coordinator_pb2.SAMPLER_DPM_SOLVER_PP: "dpm-solver++"}
SAMPLER_ENUMS: dict[SamplerName, int] = {name: value for value, name in SAMPLER_NAMES.items()}
PREVIEWS: dict[int, PreviewMode] = {
    coordinator_pb2.PREVIEW_MODE_UNSPECIFIED: "none",
    coordinator_pb2.PREVIEW_MODE_APPROXIMATE: "approximate",
    coordinator_pb2.PREVIEW_MODE_DECODED: "decoded"}
CHANNELS: dict[int, GuidanceChannels] = {
    coordinator_pb2.GUIDANCE_CHANNELS_UNSPECIFIED: "first3",
    coordinator_pb2.GUIDANCE_CHANNELS_FIRST_THREE: "first3",
    coordinator_pb2.GUIDANCE_CHANNELS_ALL: "all"}
MODES: dict[int, GenerationMode] = {
    coordinator_pb2.GENERATION_MODE_UNSPECIFIED: "exact",
    coordinator_pb2.GENERATION_MODE_EXACT: "exact",
    coordinator_pb2.GENERATION_MODE_ASYNC: "async"}
MODE_ENUMS: dict[GenerationMode, int] = {
    "exact": coordinator_pb2.GENERATION_MODE_EXACT,
    "async": coordinator_pb2.GENERATION_MODE_ASYNC}
MAX_REQUEST_ID_CHARS = 128


def spec_from_proto(request: coordinator_pb2.GenerateRequest, model: DiTConfig,
                    config: CoordinatorConfig, has_decoder: bool,
                    timeout: float | None = None) -> GenerationSpec:
    """A validated GenerationSpec, defaults filled; raises ServiceError INVALID_ARGUMENT
    (FAILED_PRECONDITION for images or decoded previews without a decoder)."""
    labels = list(request.class_labels)
    check_labels(labels, model, config)
    sampler = _sampler_name(request.sampler, config)
    steps = check_sampler_steps(sampler, request.num_steps)
    scale = (request.guidance_scale if request.HasField("guidance_scale")
             else config.default_guidance_scale)
    check_guidance(scale, model)
    if request.mode not in MODES:
        raise invalid("mode", f"unknown value {request.mode}; choose GENERATION_MODE_EXACT "
                      "(1) or GENERATION_MODE_ASYNC (2)")
    mode = MODES[request.mode]
    warmup = check_async_warmup(
        mode, request.async_warmup_steps if request.HasField("async_warmup_steps") else None,
        steps, config)
    spec = GenerationSpec(
        request_id=_request_id(request.request_id), labels=tuple(labels),
        seed=request.seed if request.HasField("seed") else new_seed(),
        sampler=sampler, num_steps=steps, guidance_scale=float(scale),
        guidance_channels=_enum(CHANNELS, request.guidance_channels, "guidance_channels"),
        preview=_enum(PREVIEWS, request.preview_mode, "preview_mode"),
        preview_every=request.preview_every or 1,
        image_format=_image_format(request.image_format),
        image_quality=_quality(request.image_quality), skip_images=request.skip_images,
        return_latents=request.return_latents, resumed=request.resumed,
        deadline=None if timeout is None else time.monotonic() + timeout,
        mode=mode, async_warmup_steps=warmup)
    check_rows(spec, config)
    _check_outputs(spec, has_decoder)
    return spec


def _sampler_name(value: int, config: CoordinatorConfig) -> str:
    if value == coordinator_pb2.SAMPLER_UNSPECIFIED:
        return config.default_sampler
    return _enum(SAMPLER_NAMES, value, "sampler")


def _enum(table: dict[int, str], value: int, field: str) -> str:
    if value not in table:
        raise invalid(field, f"unknown value {value}")
    return table[value]


def _image_format(value: int) -> int:
    if value == image_pb2.IMAGE_FORMAT_UNSPECIFIED:
        return image_pb2.IMAGE_FORMAT_PNG
    if value not in image_pb2.ImageFormat.values():
        raise invalid("image_format", f"unknown value {value}")
    return value


def _quality(value: int) -> int:
    if value > 100:
        raise invalid("image_quality", f"must be 1..100 (0 for {DEFAULT_QUALITY}), got {value}")
    return value or DEFAULT_QUALITY


def _request_id(value: str) -> str:
    if len(value) > MAX_REQUEST_ID_CHARS or not value.isprintable():
        raise invalid("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable "
                      "characters")
    return value or new_request_id()


def _check_outputs(spec: GenerationSpec, has_decoder: bool) -> None:
    if has_decoder:
        return
    if not spec.skip_images:
        raise ServiceError(StatusCode.FAILED_PRECONDITION, "skip_images: no decoder is "
                         "configured, so images are not available; set skip_images and "
                         "return_latents")
    if spec.preview == "decoded":
        raise ServiceError(StatusCode.FAILED_PRECONDITION, "preview_mode: no decoder is "
                         "configured for decoded previews; use approximate previews")


def event_to_proto(event: Event) -> coordinator_pb2.GenerateResponse:
    if isinstance(event, Accepted):
        spec = event.spec
        return coordinator_pb2.GenerateResponse(accepted=coordinator_pb2.Accepted(
            request_id=event.request_id, queue_position=event.queue_position, seed=spec.seed,
            num_steps=spec.num_steps, sampler=SAMPLER_ENUMS[spec.sampler],
            guidance_scale=spec.guidance_scale, mode=MODE_ENUMS[spec.mode],
            async_warmup_steps=spec.async_warmup_steps))
    if isinstance(event, Progress):
        return coordinator_pb2.GenerateResponse(progress=coordinator_pb2.Progress(
            step=event.step, total_steps=event.total_steps, timestep=event.timestep,
            elapsed_seconds=event.elapsed_seconds, eta_seconds=event.eta_seconds,
            previews=event.previews, waiting_on=event.waiting_on,
            waiting_reason=event.waiting_reason, waiting_seconds=event.waiting_seconds))
    return coordinator_pb2.GenerateResponse(result=_result(event))


def _result(event: Result) -> coordinator_pb2.Result:
    result = coordinator_pb2.Result(
        images=event.images, queued_seconds=event.queued_seconds,
        denoising_seconds=event.denoising_seconds, decoding_seconds=event.decoding_seconds,
        seed=event.seed)
    if event.latents is not None:
        datatype, shape, raw = encode_tensor(event.latents.float())
        result.latents.CopyFrom(tensor_pb2.Tensor(datatype=datatype, shape=shape,
                                                  raw_contents=bytes(raw)))
    return result
