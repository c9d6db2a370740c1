"""Serves the coordinator: connect the chain, check it, then SERVING until SIGTERM.

    # Connect the chain:   RemoteChain to stage 0 (or LocalChain over the whole model)
    # Handshake:           describe + check_chain, retried while stages start up;
    #                      a mismatch (FAILED_PRECONDITION) refuses to start
    # Connect the decoder: DecoderClient when an address is configured
    # Serve:               Engine + CoordinatorServicer under the shared lifecycle
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditserve_client.proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc

from ditserve.chain.base import ChainError, ErrorCode, StageChain, StageDescription
from ditserve.chain.handshake import check_chain
from ditserve.common.lifecycle import ServiceLifecycle
from ditserve.common.logs import log_event
from ditserve.config import PipelineConfig
from ditserve.model import DiTConfig
from ditserve.security.service import ServiceSecurity
from ditserve.security.tls import Dialer

from .engine import Engine
from .model_info import ModelInfo
from .outputs import OutputMaker
from .servicer import CoordinatorServicer

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
HANDSHAKE_RETRY_SECONDS = 0.5


class StartupError(RuntimeError):
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
        from ditserve.chain.local import LocalChain

        return LocalChain.from_checkpoint(options.local_checkpoint, options.local_stages,
                                          options.config.wire_dtype,
                                          options.config.model.name)
    from ditserve.chain.remote import RemoteChain

    return RemoteChain(options.stage0, dialer=_security(options).dialer())


async def handshake(chain: StageChain, wire_dtype: str | None,
                    timeout: float) -> list[StageDescription]:
    """The checked chain; UNAVAILABLE (or a stage not yet serving) is retried until
    `timeout`, any other mismatch fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stages = await chain.describe()
            check_chain(stages, wire_dtype)
            return stages
        except ChainError as error:
            starting = error.code is ErrorCode.UNAVAILABLE or "not serving" in error.message
            if not starting or time.monotonic() > deadline:
                raise StartupError(f"the stage chain failed the handshake: {error}") from None
            log_event("handshake_retry", message=error.message)
            await asyncio.sleep(HANDSHAKE_RETRY_SECONDS)


def connect_decoder(address: str, dialer: Dialer | None = None) -> Any | None:
    if not address:
        return None
    from ditserve.decoder.client import DecoderClient

    return DecoderClient(address, dialer=dialer)


def _security(options: CoordinatorOptions) -> ServiceSecurity:
    """TLS and tokens on the public API; mTLS to stage 0 and the decoder."""
    return ServiceSecurity.public_api(options.config.security)


async def serve(options: CoordinatorOptions) -> None:
    _security(options).preflight()  # bad TLS files or tokens fail now, not after the handshake
    chain = build_chain(options)
    wire = None if options.local_checkpoint else options.config.wire_dtype
    try:
        stages = await handshake(chain, wire, options.startup_timeout)
    except BaseException:
        await chain.close()
        raise
    model = DiTConfig.from_json(stages[0].model_config_json)
    decoder = connect_decoder(options.decoder, _security(options).dialer())
    engine = Engine(chain, model, options.config.coordinator, len(stages), OutputMaker(decoder))
    info = ModelInfo(model, chain, options.config.coordinator, options.config.model.class_names,
                     _is_demo(options, stages[0]), has_decoder=decoder is not None)
    lifecycle = ServiceLifecycle("coordinator", options.listen, [SERVICE_NAME],
                                 options.metrics_port, options.grace, security=_security(options))
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(engine, info), lifecycle.server)
    lifecycle.on_shutdown(_closer(engine, chain, decoder))
    await lifecycle.start()
    log_event("chain_ready", stages=len(stages), model=model.name, decoder=options.decoder)
    await lifecycle.set_serving()
    await lifecycle.wait_for_termination()


def _is_demo(options: CoordinatorOptions, stage0: StageDescription) -> bool:
    """Whether the served weights are the embedded demo model's."""
    try:
        from ditserve.demo import DEMO_DIT_PATH
        from ditserve.model import open_checkpoint
    except ImportError:
        return False
    checkpoint = options.local_checkpoint or options.config.model.checkpoint
    if not checkpoint:
        return True  # an empty checkpoint means the demo model (config.py)
    if not Path(DEMO_DIT_PATH).exists():
        return False
    return open_checkpoint(DEMO_DIT_PATH).weight_hash() == stage0.weight_hash


def _closer(engine: Engine, chain: StageChain, decoder: Any):
    async def close() -> None:
        await engine.close()
        await chain.close()
        if decoder is not None and hasattr(decoder, "close"):
            await decoder.close()
    return close


def run(options: CoordinatorOptions) -> int:
    try:
        asyncio.run(serve(options))
    except StartupError as error:
        raise ValueError(str(error)) from None
    return 0
