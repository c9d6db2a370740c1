"""GetModelInfo's content: the model, its class names, samplers and the chain's stages.

Class names are read once at start-up, from the first of: the config's
`model.class_names` file; the names the checkpoint ships with (`class_names.txt` beside
it, as the demo model has them); the ImageNet-1k names of the client package for
1000-class models; otherwise "class N".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import replace
from pathlib import Path

from ditserve_client.labels import imagenet_class_names
from ditserve_client.proto.dit.v1 import coordinator_pb2

from ditserve.chain.base import StageChain
from ditserve.common.logs import log_event
from ditserve.common.status import ServiceError
from ditserve.config import ConfigError, CoordinatorConfig
from ditserve.decoder.pairing import VaePairingError, own_vae, vae_downscale
from ditserve.model import DiTConfig
from ditserve.model.checkpoint import read_class_names
from ditserve.sampling import SAMPLERS
from ditserve.stage.client import info_from_description
from ditserve.stage.runner import StageDescription

from . import metrics
from .protocol import MODE_ENUMS, SAMPLER_ENUMS

VAE_DOWNSCALE = 8
"""Image side / latent side of the Stable Diffusion VAE (the official DiT checkpoints')."""


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


def served_vae_downscale(vae: str = "", checkpoint: str = "") -> int:
    """Image side / latent side of the VAE that decodes the served model, from the first
    readable of: the config's `decoder.vae` folder; the VAE shipped beside the checkpoint
    (the demo model's ×4 `weights/vae/`); otherwise Stable Diffusion's ×8 (a decoder on
    another host, whose folder this process cannot read, is taken to follow the DiT
    paper's convention)."""
    folders = [Path(vae)] if vae else []
    if checkpoint and (shipped := own_vae(checkpoint)) is not None:
        folders.append(shipped)
    for folder in folders:
        try:
            return vae_downscale(folder)
        except VaePairingError as error:
            log_event("vae_downscale_unread", level=logging.WARNING, vae=str(folder),
                      reason=str(error))
    return VAE_DOWNSCALE


class ModelInfo:
    """Answers GetModelInfo from the model config, the class names and the live chain."""

    def __init__(self, model: DiTConfig, chain: StageChain, config: CoordinatorConfig,
                 class_names: list[str], has_decoder: bool = False,
                 stages: list[StageDescription] | None = None,
                 vae_downscale: int = VAE_DOWNSCALE):
        self.model, self.chain, self.config = model, chain, config
        self.class_names, self.has_decoder = class_names, has_decoder
        self.vae_downscale = vae_downscale
        """Image side / latent side of the served VAE (`served_vae_downscale`)."""
        self.known_stages = list(stages or [])
        """The chain as last described (the handshake's at first)."""

    async def describe(self) -> coordinator_pb2.GetModelInfoResponse:
        stages = [info_from_description(d) for d in await self.stages()]
        samplers = list(SAMPLERS)
        return coordinator_pb2.GetModelInfoResponse(
            model_name=self.model.name, model_config_json=self.model.to_json(),
            image_size=self.model.input_size * self.vae_downscale,
            latent_size=self.model.input_size, latent_channels=self.model.in_channels,
            classes=[coordinator_pb2.ClassInfo(id=i, name=name)
                     for i, name in enumerate(self.class_names)],
            samplers=[SAMPLER_ENUMS[name] for name in samplers],
            default_steps=[SAMPLERS[name].default_steps for name in samplers],
            default_guidance_scale=self.config.default_guidance_scale, stages=stages,
            has_decoder=self.has_decoder, modes=list(MODE_ENUMS.values()),
            default_async_warmup_steps=self.config.default_async_warmup_steps)

    async def stages(self) -> list[StageDescription]:
        """The live chain; while a stage cannot be reached, the chain as last described
        with that stage (named by the innermost error, else every stage) not serving."""
        try:
            stages = await self.chain.describe()
        except ServiceError as error:
            if not self.known_stages:
                raise
            down = _unreachable_stage(error.message)
            stages = [replace(d, serving=False) if down in (None, d.stage_index) else d
                      for d in self.known_stages]
            log_event("stage_unhealthy", level=logging.WARNING,
                      stage="all" if down is None else down, message=error.message)
        else:
            self.known_stages = stages
        for d in stages:
            metrics.STAGE_SERVING.labels(str(d.stage_index)).set(int(d.serving))
        return stages


async def watch_stages(info: ModelInfo, interval: float) -> None:
    """Describes the chain every `interval` seconds until cancelled, so a stage that goes
    down shows as not serving (metrics, logs) without anyone calling GetModelInfo."""
    while True:
        await asyncio.sleep(interval)
        # ServiceError: no chain described yet; the handshake's error was logged already
        with contextlib.suppress(ServiceError):
            await info.stages()


def _unreachable_stage(message: str) -> int | None:
    """The stage an error names last: hops prefix the error of the next hop with their
    own peer's name ("stage-1 at A: stage-2 at B: Deadline Exceeded" names stage 2)."""
    found = re.findall(r"stage-(\d+) at ", message)
    return int(found[-1]) if found else None
