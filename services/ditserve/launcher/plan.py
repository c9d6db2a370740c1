"""From one pipeline config to the processes that serve it (the local launcher's plan).

The same YAML file is the Kubernetes ConfigMap: in a cluster each pod runs one of these
commands with its stage index from the environment; locally every service runs on
loopback, so `localize` moves each address to 127.0.0.1 keeping the rest of the config.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from ditserve.config import PipelineConfig


@dataclass(frozen=True)
class ServiceSpec:
    """One service process: its name, command line and the address it serves on."""

    name: str
    argv: tuple[str, ...]
    address: str


def localize(config: PipelineConfig, base_port: int) -> PipelineConfig:
    """The config with every service on 127.0.0.1: coordinator at base_port, decoder at +1,
    stage k at +2+k; nothing else changes."""
    # Bind loopback, not every interface: a plaintext server off loopback refuses to start.
    def here(port: int) -> dict[str, str]:
        return {"address": f"127.0.0.1:{port}", "listen": f"127.0.0.1:{port}"}

    stages = [dataclasses.replace(s, **here(base_port + 2 + k)) for k, s in enumerate(config.stages)]
    coordinator = dataclasses.replace(config.coordinator, **here(base_port))
    decoder = dataclasses.replace(config.decoder, **here(base_port + 1))
    return dataclasses.replace(config, stages=stages, coordinator=coordinator, decoder=decoder)


def plan(config: PipelineConfig, config_file: Path) -> list[ServiceSpec]:
    """Every service of the pipeline, last stage first so that each stage's next hop is up
    before it (they reconnect anyway), the coordinator last."""
    ditserve = (sys.executable, "-m", "ditserve.cli")
    config_arg = ("--config", str(config_file))
    specs = [ServiceSpec(f"stage-{k}", (*ditserve, "stage", *config_arg, "--stage", str(k)),
                         stage.address)
             for k, stage in reversed(list(enumerate(config.stages)))]
    if config.decoder.address:
        specs.append(ServiceSpec("decoder", (*ditserve, "decoder", *config_arg),
                                 config.decoder.address))
    specs.append(ServiceSpec("coordinator", (*ditserve, "coordinator", *config_arg),
                             config.coordinator.address))
    return specs
