"""From one pipeline config to the processes that serve it (the local launcher's plan).

The same YAML file is the Kubernetes ConfigMap: in a cluster each pod runs one of these
commands with its stage index from the environment; locally every service runs on one
host, so `localize` gives each service its own port on that host (127.0.0.1 by default:
plaintext without authentication stays on loopback, docs/ARCHITECTURE.md §6) keeping the rest of the
config.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from ditserve.common.address import join_host_port
from ditserve.config import PipelineConfig

LOOPBACK = "127.0.0.1"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class ServiceSpec:
    """One service process: its name, command line and the addresses it serves on."""

    name: str
    argv: tuple[str, ...]
    address: str
    """host:port that peers and the launcher's health checks dial."""
    listen: str
    """host:port the service binds."""
    wave: int
    """Start order: every service of a wave starts together, once the previous wave is
    healthy (stages and decoder are independent; the coordinator needs the chain)."""
    metrics_port: int | None = None
    """Port of its Prometheus endpoint, on the listen host; None for none."""
    health: str = "grpc"
    """How the launcher checks it: grpc.health.v1, or "http" (GET /healthz: the gateway)."""

    def metrics_url(self) -> str:
        host = self.address.rpartition(":")[0]
        return f"http://{host}:{self.metrics_port}/metrics" if self.metrics_port else ""


def localize(config: PipelineConfig, base_port: int, host: str = LOOPBACK) -> PipelineConfig:
    """The config with every service on `host`: coordinator at base_port, decoder at +1,
    stage k at +2+k; nothing else changes. A wildcard host (0.0.0.0, ::) binds every
    interface while the services still dial each other on loopback."""
    dial = _WILDCARDS.get(host, host)

    def where(port: int) -> dict[str, str]:
        return {"address": join_host_port(dial, port), "listen": join_host_port(host, port)}

    stages = [dataclasses.replace(s, **where(base_port + 2 + k))
              for k, s in enumerate(config.stages)]
    coordinator = dataclasses.replace(config.coordinator, **where(base_port))
    decoder = dataclasses.replace(config.decoder, **where(base_port + 1))
    return dataclasses.replace(config, stages=stages, coordinator=coordinator, decoder=decoder)


def plan(config: PipelineConfig, config_file: Path, metrics_port: int | None = None,
         http_port: int | None = None, gateway_ca: Path | None = None) -> list[ServiceSpec]:
    """Every service of the pipeline: the stages (last first) and the decoder in wave 0,
    the coordinator in wave 1, the HTTP gateway (with `http_port`, on the coordinator's
    host) in wave 2. With `metrics_port` M the coordinator's metrics are on M, the
    decoder's on M+1 and stage k's on M+2+k (the same offsets as the gRPC ports)."""
    ditserve = (sys.executable, "-m", "ditserve.cli")
    config_arg = ("--config", str(config_file))

    def metrics(offset: int) -> tuple[int | None, tuple[str, ...]]:
        if metrics_port is None:
            return None, ()
        return metrics_port + offset, ("--metrics-port", str(metrics_port + offset))

    specs = []
    for k, stage in reversed(list(enumerate(config.stages))):
        port, flag = metrics(2 + k)
        specs.append(ServiceSpec(f"stage-{k}", (*ditserve, "stage", *config_arg, "--stage", str(k),
                                                *flag),
                                 stage.address, stage.listen_address(), 0, port))
    if config.decoder.address:
        port, flag = metrics(1)
        specs.append(ServiceSpec("decoder", (*ditserve, "decoder", *config_arg, *flag),
                                 config.decoder.address, config.decoder.listen_address(), 0, port))
    port, flag = metrics(0)
    specs.append(ServiceSpec("coordinator", (*ditserve, "coordinator", *config_arg, *flag),
                             config.coordinator.address, config.coordinator.listen_address(), 1,
                             port))
    if http_port is not None:
        listen_host = config.coordinator.listen_address().rpartition(":")[0].strip("[]")
        dial_host = config.coordinator.address.rpartition(":")[0].strip("[]")
        specs.append(ServiceSpec(
            "gateway", (*ditserve, "gateway", "--target", config.coordinator.address,
                        "--listen", join_host_port(listen_host, http_port),
                        *(("--tls", "--ca-file", str(gateway_ca)) if gateway_ca else ())),
            join_host_port(dial_host, http_port), join_host_port(listen_host, http_port), 2,
            health="http"))
    return specs
