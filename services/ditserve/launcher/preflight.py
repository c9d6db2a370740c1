"""Checks `ditserve up` makes before it starts anything, so that a wrong path, count or port
is one clear line instead of a service dying in a log file.

Each check raises `PreflightError` naming the input and what is wrong.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ditserve.common.address import join_host_port
from ditserve.common.status import UserError
from ditserve.config import PipelineConfig

from .plan import ServiceSpec

SERVER_MODULES = ("torch", "safetensors", "diffusers", "numpy", "yaml", "grpc_health",
                  "grpc_reflection", "prometheus_client")
"""What the services import beyond the client install (pyproject's `server` extra)."""


class PreflightError(UserError, ValueError):
    """An input of `ditserve up` that cannot work, found before starting anything."""


def check_server_install() -> None:
    """The server extras are installed (a client-only install has none of them)."""
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise PreflightError("serving needs the server extras: pip install 'ditserve[server]' "
                             f"(missing: {', '.join(missing)})")


def check_model(config: PipelineConfig) -> None:
    """The checkpoint opens, and the stages' block ranges fit its depth."""
    from ditserve.entrypoints.stage import resolve_checkpoint
    from ditserve.model import open_checkpoint, parse_block_range, stage_block_range

    checkpoint = resolve_checkpoint(config.model.checkpoint)
    try:
        depth = open_checkpoint(checkpoint, config.model.name).config.depth
    except ValueError as error:  # CheckpointError and the config registry's errors
        raise PreflightError(str(error)) from None
    except Exception as error:  # torch.load of a foreign file raises anything (KeyError...)
        raise PreflightError(f"checkpoint {checkpoint} cannot be read as a DiT "
                             f"({type(error).__name__}: {error})") from None
    stages = len(config.stages)
    if stages > depth:
        raise PreflightError(f"--stages {stages}: the model at {checkpoint} has only {depth} "
                             f"blocks, so at most {depth} stages")
    ranges = [parse_block_range(s.blocks, depth) if s.blocks
              else stage_block_range(depth, k, stages) for k, s in enumerate(config.stages)]
    covered = [block for start, end in ranges for block in range(start, end)]
    if covered != list(range(depth)):
        raise PreflightError(f"stages' blocks {[f'{a}:{b}' for a, b in ranges]} must tile "
                             f"0:{depth} in order, each block once")


def check_vae(config: PipelineConfig) -> None:
    """The decoder's VAE is a diffusers AutoencoderKL folder (or the embedded demo VAE)."""
    if not config.decoder.address or not config.decoder.vae:
        return
    vae = Path(config.decoder.vae)
    if not vae.is_dir():
        raise PreflightError(f"--vae {vae}: no such folder (a diffusers AutoencoderKL folder "
                             "with config.json is needed)")
    if not (vae / "config.json").is_file():
        raise PreflightError(f"--vae {vae}: no config.json in it (a diffusers AutoencoderKL "
                             "folder is needed)")


def check_ports(specs: list[ServiceSpec]) -> None:
    """Every service's gRPC and metrics port can be bound now: a second `ditserve up` on
    the same ports, or another program holding one, fails here by name."""
    from ditserve.common.lifecycle import bind_error, split_host_port

    for spec in specs:
        addresses = [(spec.listen, "--port")]
        if spec.metrics_port:
            host = split_host_port(spec.listen)[0]
            addresses.append((join_host_port(host, spec.metrics_port), "--metrics-port"))
        for address, flag in addresses:
            cause = bind_error(address)
            if cause and "already in use" in cause:
                cause += f" (choose other ports with {flag})"
            if cause:
                raise PreflightError(f"{spec.name} cannot listen on {address}: {cause}")
