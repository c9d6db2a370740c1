"""GetModelInfo's content: the model, its class names, samplers and the chain's stages.

Class names are read once at start-up, from the first of: the config's
`model.class_names` file; the names the checkpoint ships with (`class_names.txt` beside
it, as the demo model has them); the ImageNet-1k names of the client package for
1000-class models; otherwise "class N".
"""

from __future__ import annotations

from pathlib import Path

from ditserve_client.labels import imagenet_class_names
from ditserve_client.proto.dit.v1 import coordinator_pb2

from ditserve.chain.base import StageChain
from ditserve.config import ConfigError, CoordinatorConfig
from ditserve.model import DiTConfig
from ditserve.model.checkpoint import read_class_names
from ditserve.sampling import SAMPLERS
from ditserve.stage.client import info_from_description

from .protocol import SAMPLER_ENUMS

VAE_DOWNSCALE = 8
"""Image side / latent side of the Stable Diffusion VAE."""


def class_names(model: DiTConfig, names_file: str = "", checkpoint: str = "") -> list[str]:
    """One name per class of `model` (module docstring); ConfigError when a file's count
    differs from the model's."""
    n = model.num_classes
    if names_file:
        try:
            names = [line.strip() for line in Path(names_file).read_text("utf-8").splitlines()
                     if line.strip()]
        except OSError as error:
            raise ConfigError(f"model.class_names: cannot read {names_file}: "
                              f"{error.strerror}") from None
        where = f"model.class_names {names_file}"
    elif checkpoint and (names := read_class_names(checkpoint)) is not None:
        where = f"the class names beside checkpoint {checkpoint}"
    elif n == 1000:
        return list(imagenet_class_names())
    else:
        return [f"class {i}" for i in range(n)]
    if len(names) != n:
        raise ConfigError(f"{where} has {len(names)} names, the model has {n} classes")
    return names


class ModelInfo:
    """Answers GetModelInfo from the model config, the class names and the live chain."""

    def __init__(self, model: DiTConfig, chain: StageChain, config: CoordinatorConfig,
                 class_names: list[str], has_decoder: bool = False):
        self.model, self.chain, self.config = model, chain, config
        self.class_names, self.has_decoder = class_names, has_decoder

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
