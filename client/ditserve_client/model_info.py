"""What GetModelInfo reports, as plain dataclasses: the model, its classes, the samplers
and the stage chain with each stage's health."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .events import MODE_NAMES, SAMPLER_NAMES
from .labels import ClassNames
from .proto.dit.v1 import coordinator_pb2, stage_pb2


@dataclass(frozen=True)
class StageSummary:
    """One stage of the chain: its blocks [block_start, block_end) and health."""

    index: int
    block_start: int
    block_end: int
    depth: int
    address: str
    device: str
    wire_dtype: str
    serving: bool

    @classmethod
    def from_proto(cls, msg: stage_pb2.StageInfo) -> StageSummary:
        return cls(index=msg.stage_index, block_start=msg.block_start, block_end=msg.block_end,
                   depth=msg.depth, address=msg.address, device=msg.device,
                   wire_dtype=msg.wire_datatype, serving=msg.serving)


@dataclass(frozen=True)
class ModelInfo:
    """The served model and pipeline."""

    model_name: str
    image_size: int
    latent_size: int
    latent_channels: int
    classes: ClassNames
    samplers: dict[str, int]
    """Sampler name → its default number of steps."""
    default_guidance_scale: float
    stages: list[StageSummary]
    has_decoder: bool
    config: dict[str, Any] = field(default_factory=dict)
    modes: list[str] = field(default_factory=list)
    """Generation modes offered: "exact", "async" (empty from an older server)."""
    default_async_warmup_steps: int = 0
    """Exact warm-up steps of an async request that gives none."""

    @classmethod
    def from_proto(cls, msg: coordinator_pb2.GetModelInfoResponse) -> ModelInfo:
        config = json.loads(msg.model_config_json) if msg.model_config_json else {}
        by_id = sorted(msg.classes, key=lambda c: c.id)
        names = [c.name for c in by_id] if [c.id for c in by_id] == list(range(len(by_id))) \
            else []
        num_classes = config.get("num_classes") or len(msg.classes) or None
        steps = list(msg.default_steps) + [0] * (len(msg.samplers) - len(msg.default_steps))
        return cls(model_name=msg.model_name, image_size=msg.image_size,
                   latent_size=msg.latent_size, latent_channels=msg.latent_channels,
                   classes=ClassNames.for_model(names, num_classes),
                   samplers={SAMPLER_NAMES.get(s, str(s)): n
                             for s, n in zip(msg.samplers, steps, strict=True)},
                   default_guidance_scale=msg.default_guidance_scale,
                   stages=[StageSummary.from_proto(s) for s in msg.stages],
                   has_decoder=msg.has_decoder, config=config,
                   modes=[MODE_NAMES.get(m, str(m)) for m in msg.modes],
                   default_async_warmup_steps=msg.default_async_warmup_steps)
