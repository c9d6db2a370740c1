"""GetModelInfo's content: the model, its class names, samplers and the chain's stages.

Class names are loaded lazily, in this order: the config's `model.class_names` file; the
ImageNet-1k names shipped with the client package for 1000-class models; the demo model's
names when the demo checkpoint is served; otherwise "class N".
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ditserve_client.proto.dit.v1 import coordinator_pb2

from ditserve.chain.base import StageChain
from ditserve.chain.remote import info_from_description
from ditserve.config import CoordinatorConfig
from ditserve.model import DiTConfig
from ditserve.sampling import SAMPLERS

from .protocol import SAMPLER_ENUMS

VAE_DOWNSCALE = 8
"""Image side / latent side of the Stable Diffusion VAE."""


class ModelInfo:
    """Answers GetModelInfo from the model config, the class names and the live chain."""

    def __init__(self, model: DiTConfig, chain: StageChain, config: CoordinatorConfig,
                 class_names_file: str = "", is_demo: bool = False, has_decoder: bool = False):
        self.model, self.chain, self.config = model, chain, config
        self.class_names_file, self.is_demo, self.has_decoder = (
            class_names_file, is_demo, has_decoder)

    @cached_property
    def class_names(self) -> list[str]:
        n = self.model.num_classes
        if self.class_names_file:
            names = [line.strip() for line in Path(self.class_names_file).read_text(
                "utf-8").splitlines() if line.strip()]
            if len(names) != n:
                raise ValueError(f"model.class_names {self.class_names_file} has "
                                 f"{len(names)} names, the model has {n} classes")
            return names
        if n == 1000:
            from ditserve_client.labels import imagenet_class_names

            return list(imagenet_class_names())
        if self.is_demo:
            from ditserve.demo import DEMO_CLASS_NAMES

            return list(DEMO_CLASS_NAMES)
        return [f"class {i}" for i in range(n)]

    async def describe(self) -> coordinator_pb2.GetModelInfoResponse:
        stages = [info_from_description(d) for d in await self.chain.describe()]
        samplers = list(SAMPLERS)
        return coordinator_pb2.GetModelInfoResponse(
            model_name=self.model.name, model_config_json=self.model.to_json(),
            image_size=self.model.input_size * VAE_DOWNSCALE,
            latent_size=self.model.input_size, latent_channels=self.model.in_channels,
            classes=[coordinator_pb2.ClassInfo(id=i, name=name)
                     for i, name in enumerate(self.class_names)],
            samplers=[SAMPLER_ENUMS[name] for name in samplers],
            default_steps=[SAMPLERS[name].default_steps for name in samplers],
            default_guidance_scale=self.config.default_guidance_scale, stages=stages,
            has_decoder=self.has_decoder)
