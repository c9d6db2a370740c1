from ditserve_client.proto.dit.v1 import image_pb2 as _image_pb2
from ditserve_client.proto.dit.v1 import stage_pb2 as _stage_pb2
from ditserve_client.proto.dit.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_DDPM: _ClassVar[Sampler]
    SAMPLER_DDIM: _ClassVar[Sampler]
    SAMPLER_DPM_SOLVER_PP: _ClassVar[Sampler]

class GuidanceChannels(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_CHANNELS_UNSPECIFIED: _ClassVar[GuidanceChannels]
    GUIDANCE_CHANNELS_FIRST_THREE: _ClassVar[GuidanceChannels]
    GUIDANCE_CHANNELS_ALL: _ClassVar[GuidanceChannels]

class PreviewMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREVIEW_MODE_UNSPECIFIED: _ClassVar[PreviewMode]
    PREVIEW_MODE_APPROXIMATE: _ClassVar[PreviewMode]
    PREVIEW_MODE_DECODED: _ClassVar[PreviewMode]

class GenerationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATION_MODE_UNSPECIFIED: _ClassVar[GenerationMode]
    GENERATION_MODE_EXACT: _ClassVar[GenerationMode]
    GENERATION_MODE_ASYNC: _ClassVar[GenerationMode]
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_DDPM: Sampler
SAMPLER_DDIM: Sampler
SAMPLER_DPM_SOLVER_PP: Sampler
GUIDANCE_CHANNELS_UNSPECIFIED: GuidanceChannels
GUIDANCE_CHANNELS_FIRST_THREE: GuidanceChannels
GUIDANCE_CHANNELS_ALL: GuidanceChannels
PREVIEW_MODE_UNSPECIFIED: PreviewMode
PREVIEW_MODE_APPROXIMATE: PreviewMode
PREVIEW_MODE_DECODED: PreviewMode
GENERATION_MODE_UNSPECIFIED: GenerationMode
GENERATION_MODE_EXACT: GenerationMode
GENERATION_MODE_ASYNC: GenerationMode

class GenerateRequest(_message.Message):
    __slots__ = ("class_labels", "seed", "num_steps", "sampler", "guidance_scale", "guidance_channels", "preview_mode", "preview_every", "image_format", "image_quality", "skip_images", "return_latents", "request_id", "resumed", "mode", "async_warmup_steps")
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_MODE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_QUALITY_FIELD_NUMBER: _ClassVar[int]
    SKIP_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ASYNC_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    class_labels: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    num_steps: int
    sampler: Sampler
    guidance_scale: float
    guidance_channels: GuidanceChannels
    preview_mode: PreviewMode
    preview_every: int
    image_format: _image_pb2.ImageFormat
    image_quality: int
    skip_images: bool
    return_latents: bool
    request_id: str
    resumed: bool
    mode: GenerationMode
    async_warmup_steps: int
    def __init__(self, class_labels: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., num_steps: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., guidance_scale: _Optional[float] = ..., guidance_channels: _Optional[_Union[GuidanceChannels, str]] = ..., preview_mode: _Optional[_Union[PreviewMode, str]] = ..., preview_every: _Optional[int] = ..., image_format: _Optional[_Union[_image_pb2.ImageFormat, str]] = ..., image_quality: _Optional[int] = ..., skip_images: _Optional[bool] = ..., return_latents: _Optional[bool] = ..., request_id: _Optional[str] = ..., resumed: _Optional[bool] = ..., mode: _Optional[_Union[GenerationMode, str]] = ..., async_warmup_steps: _Optional[int] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("request_id", "queue_position", "seed", "num_steps", "sampler", "guidance_scale", "mode", "async_warmup_steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ASYNC_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queue_position: int
    seed: int
    num_steps: int
    sampler: Sampler
    guidance_scale: float
    mode: GenerationMode
    async_warmup_steps: int
    def __init__(self, request_id: _Optional[str] = ..., queue_position: _Optional[int] = ..., seed: _Optional[int] = ..., num_steps: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., guidance_scale: _Optional[float] = ..., mode: _Optional[_Union[GenerationMode, str]] = ..., async_warmup_steps: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "timestep", "elapsed_seconds", "eta_seconds", "previews", "waiting_on", "waiting_reason", "waiting_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    WAITING_ON_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    WAITING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    timestep: int
    elapsed_seconds: float
    eta_seconds: float
    previews: _containers.RepeatedCompositeFieldContainer[_image_pb2.Image]
    waiting_on: str
    waiting_reason: str
    waiting_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., timestep: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[_image_pb2.Image, _Mapping]]] = ..., waiting_on: _Optional[str] = ..., waiting_reason: _Optional[str] = ..., waiting_seconds: _Optional[float] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("images", "latents", "queued_seconds", "denoising_seconds", "decoding_seconds", "seed")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DENOISING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_image_pb2.Image]
    latents: _tensor_pb2.Tensor
    queued_seconds: float
    denoising_seconds: float
    decoding_seconds: float
    seed: int
    def __init__(self, images: _Optional[_Iterable[_Union[_image_pb2.Image, _Mapping]]] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., queued_seconds: _Optional[float] = ..., denoising_seconds: _Optional[float] = ..., decoding_seconds: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("accepted", "progress", "result")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    progress: Progress
    result: Result
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClassInfo(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_config_json", "image_size", "latent_size", "latent_channels", "classes", "samplers", "default_steps", "default_guidance_scale", "stages", "has_decoder", "modes", "default_async_warmup_steps")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    HAS_DECODER_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ASYNC_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_config_json: str
    image_size: int
    latent_size: int
    latent_channels: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassInfo]
    samplers: _containers.RepeatedScalarFieldContainer[Sampler]
    default_steps: _containers.RepeatedScalarFieldContainer[int]
    default_guidance_scale: float
    stages: _containers.RepeatedCompositeFieldContainer[_stage_pb2.StageInfo]
    has_decoder: bool
    modes: _containers.RepeatedScalarFieldContainer[GenerationMode]
    default_async_warmup_steps: int
    def __init__(self, model_name: _Optional[str] = ..., model_config_json: _Optional[str] = ..., image_size: _Optional[int] = ..., latent_size: _Optional[int] = ..., latent_channels: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassInfo, _Mapping]]] = ..., samplers: _Optional[_Iterable[_Union[Sampler, str]]] = ..., default_steps: _Optional[_Iterable[int]] = ..., default_guidance_scale: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[_stage_pb2.StageInfo, _Mapping]]] = ..., has_decoder: _Optional[bool] = ..., modes: _Optional[_Iterable[_Union[GenerationMode, str]]] = ..., default_async_warmup_steps: _Optional[int] = ...) -> None: ...
