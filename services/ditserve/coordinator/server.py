"""Serves the coordinator: connect the chain, check it, then SERVING until SIGTERM.

    # Connect the chain:   RemoteChain to stage 0 (or LocalChain over the whole model)
    # Handshake:           describe + check_chain, retried while stages start up;
    #                      a mismatch (FAILED_PRECONDITION) refuses to start
    # Connect the decoder: DecoderClient when an address is configured
    # Fit previews:        the approximate previews' latent→RGB map, to the served VAE
    # Serve:               Engine + CoordinatorServicer under the shared lifecycle
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditserve_client.proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc

from ditserve.chain import LocalChain, RemoteChain, StageChain, check_chain
from ditserve.common.lifecycle import ServiceLifecycle, run_service
from ditserve.common.logs import log_event
from ditserve.common.status import ServiceError, UserError
from ditserve.config import PipelineConfig
from ditserve.decoder.client import DecoderClient
from ditserve.model import DiTConfig
from ditserve.sampling.previews import LatentRgbMap
from ditserve.security.service import ServiceSecurity
from ditserve.security.tls import Dialer
from ditserve.stage.runner import StageDescription

from .engine import Engine
from .model_info import ModelInfo, class_names, served_vae_downscale, watch_stages
from .outputs import OutputMaker
from .servicer import CoordinatorServicer

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
HANDSHAKE_RETRY_SECONDS = 0.5


class StartupError(UserError):
    """The coordinator cannot serve this chain (printed as one line, exit 2)."""


@dataclass
class CoordinatorOptions:
    """Everything the coordinator process needs (the pipeline config plus flag overrides)."""

    config: PipelineConfig
    """The pipeline: model, stages, coordinator limits, decoder."""
    listen: str
    """host:port to bind."""
    stage0: str = ""
    """host:port of stage 0; empty with `local_checkpoint`."""
    decoder: str = ""
    """host:port of the decoder; empty for none (latents only)."""
    local_checkpoint: str = ""
    """Run the whole model in this process (LocalChain) instead of dialing stages."""
    local_stages: int = 1
    """Emulated stages of the local chain (microbatches kept in flight)."""
    metrics_port: int | None = None
    """Port of the Prometheus endpoint; None for none."""
    startup_timeout: float = 120.0
    """Seconds to wait for the chain to answer the handshake."""
    grace: float = 5.0
    """Seconds in-flight requests get to finish on SIGTERM."""


def build_chain(options: CoordinatorOptions) -> StageChain:
    if options.local_checkpoint:
        return LocalChain.from_checkpoint(options.local_checkpoint, options.local_stages,
                                          options.config.wire_dtype,
                                          options.config.model.name)
    # `transport: shm` requires shared memory between stages; the coordinator's hop takes
    # it where it can (auto) rather than fail a coordinator that runs on another host.
    transport = "grpc" if options.config.transport == "grpc" else "auto"
    return RemoteChain(options.stage0, dialer=_security(options).dialer(), transport=transport)


async def handshake(chain: StageChain, wire_dtype: str | None,
                    timeout: float) -> list[StageDescription]:
    """The checked chain. A chain still starting (a stage unreachable, or one that
    reports it is not serving yet) is asked again until `timeout`; any other mismatch
    fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stages = await chain.describe()
            check_chain(stages, wire_dtype, require_serving=False)
            if all(stage.serving for stage in stages) or time.monotonic() > deadline:
                check_chain(stages, wire_dtype)
                return stages
            why = "a stage is not serving yet"
        except ServiceError as error:
            if not error.retryable or time.monotonic() > deadline:
                raise StartupError(f"the stage chain failed the handshake: {error}") from None
            why = error.message
        log_event("handshake_retry", message=why)
        await asyncio.sleep(HANDSHAKE_RETRY_SECONDS)


def connect_decoder(address: str, dialer: Dialer | None = None) -> DecoderClient | None:
    return DecoderClient(address, dialer=dialer) if address else None


def _security(options: CoordinatorOptions) -> ServiceSecurity:
    """TLS and tokens on the public API; mTLS to stage 0 and the decoder."""
    return ServiceSecurity.public_api(options.config.security)


async def serve(options: CoordinatorOptions) -> None:
    _security(options).preflight()  # bad TLS files or tokens fail now, not after the handshake
    chain = build_chain(options)
    wire = None if options.local_checkpoint else options.config.wire_dtype
    # The preview fit (seconds: it loads the VAE) runs beside the handshake and serving;
    # only the first approximate previews wait for it.
    previews = asyncio.ensure_future(asyncio.to_thread(fit_previews, options.config.decoder.vae))
    try:
        stages = await handshake(chain, wire, options.startup_timeout)
    except BaseException:
        await chain.close()
        raise
    model = DiTConfig.from_json(stages[0].model_config_json)
    names = class_names(model, options.config.model.class_names, _checkpoint(options))
    decoder = connect_decoder(options.decoder, _security(options).dialer())
    engine = Engine(chain, model, options.config.coordinator, len(stages),
                    OutputMaker(decoder, previews))
    info = ModelInfo(model, chain, options.config.coordinator, names,
                     has_decoder=decoder is not None, stages=stages,
                     vae_downscale=served_vae_downscale(options.config.decoder.vae,
                                                        _checkpoint(options)))
    lifecycle = ServiceLifecycle("coordinator", options.listen, [SERVICE_NAME],
                                 options.metrics_port, options.grace, security=_security(options),
                                 max_receive_bytes=options.config.coordinator.max_receive_bytes)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(engine, info), lifecycle.server)
    lifecycle.on_shutdown(_closer(engine, chain, decoder))
    await lifecycle.start()
    log_event("chain_ready", stages=len(stages), model=model.name, decoder=options.decoder)
    await lifecycle.set_serving()
    interval = options.config.coordinator.stage_health_interval_seconds
    watcher = asyncio.create_task(watch_stages(info, interval)) if interval > 0 else None
    try:
        await lifecycle.wait_for_termination()
    finally:
        if watcher is not None:
            watcher.cancel()


def fit_previews(vae: str) -> LatentRgbMap | None:
    """The latent→RGB map of the served VAE (empty: the demo VAE); None (SD 1.x's map)
    when this process cannot read the VAE's folder."""
    from ditserve.sampling.previews import load_preview_map

    if not vae:
        try:
            from ditserve.demo import DEMO_VAE_PATH
        except ImportError:
            return None
        vae = str(DEMO_VAE_PATH)
    if not (Path(vae) / "config.json").is_file():
        log_event("previews_unfitted", vae=vae, reason="no VAE folder here; SD 1.x's map")
        return None
    started = time.perf_counter()
    try:
        preview_map = load_preview_map(vae)
    except Exception as error:  # a preview map is a nicety: never a reason not to serve
        log_event("previews_unfitted", vae=vae, reason=f"{type(error).__name__}: {error}")
        return None
    log_event("previews_fitted", vae=vae, seconds=round(time.perf_counter() - started, 2))
    return preview_map


def _checkpoint(options: CoordinatorOptions) -> str:
    """The served checkpoint's path as the config names it; empty means the embedded
    demo model (config.py), "" when this install has none."""
    checkpoint = options.local_checkpoint or options.config.model.checkpoint
    if checkpoint:
        return checkpoint
    try:
        from ditserve.demo import DEMO_DIT_PATH
    except ImportError:
        return ""
    return str(DEMO_DIT_PATH)


def _closer(engine: Engine, chain: StageChain, decoder: Any):
    async def close() -> None:
        await engine.close()
        await chain.close()
        if decoder is not None and hasattr(decoder, "close"):
            await decoder.close()
    return close


def run(options: CoordinatorOptions) -> int:
    run_service(serve(options))  # ends the process once stopped
