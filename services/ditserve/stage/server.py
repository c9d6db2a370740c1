"""Serves one stage: load its blocks, warm up, then SERVING until SIGTERM.

    # Load the slice:      StageRunner.from_checkpoint(...)  (only this stage's tensors)
    # Start the server:    ServiceLifecycle (health NOT_SERVING, reflection, metrics)
    # Warm up:             one forward on the compute thread
    # Serve:               health SERVING; on SIGTERM NOT_SERVING, drain, stop
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch
from ditserve_client.proto.dit.v1 import stage_pb2

from ditserve.common.lifecycle import ServiceLifecycle, run_service
from ditserve.common.logs import log_event
from ditserve.config import SecurityConfig, Transport
from ditserve.model.checkpoint import CheckpointReader
from ditserve.model.configs import DiTConfig
from ditserve.security.service import ServiceSecurity
from ditserve.wire.cuda_ipc import HANDOFFS

from .client import StageClient
from .runner import RelayRunner, StageRunner
from .servicer import StageServicer, add_to_server

SERVICE_NAME = stage_pb2.DESCRIPTOR.services_by_name["StageService"].full_name


@dataclass
class StageOptions:
    """Everything one stage process needs (from flags or the pipeline config)."""

    checkpoint: str
    """Weights file or folder (any supported format)."""
    stage_index: int
    """Position of this stage in the chain, from 0."""
    num_stages: int
    """Stages in the chain."""
    blocks: tuple[int, int]
    """Blocks [start, end) this stage runs."""
    listen: str
    """host:port to bind."""
    next_address: str = ""
    """host:port of the next stage; empty on the last stage."""
    address: str = ""
    """Address others dial, reported by the handshake; defaults to `listen`."""
    model_name: str | None = None
    """Config name, for checkpoints that cannot tell their head count."""
    wire_dtype: str = "bf16"
    """Activation dtype sent to the next stage: bf16, fp16 or fp32."""
    device: str = "cpu"
    """Compute device."""
    dtype: torch.dtype = torch.float32
    """Compute dtype of the weights."""
    max_batch_size: int = 32
    """Most rows per microbatch."""
    cuda_graphs: bool = True
    """On CUDA, replay the forward as CUDA graphs per padded batch size."""
    metrics_port: int | None = None
    """Port of the Prometheus endpoint; None for none."""
    grace: float = 5.0
    """Seconds in-flight microbatches get to finish on SIGTERM."""
    reader: CheckpointReader | None = None
    """`checkpoint` already opened (to read its depth), so the file is opened only once."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """TLS/mTLS of its port and of the hop to the next stage."""
    transport: Transport = "auto"
    """How activations reach the next stage (PipelineConfig.transport)."""
    relay: DiTConfig | None = None
    """Benchmark only: serve a RelayRunner of this config (no weights, blocks skipped)."""
    handoff: str = "cuda"
    """How device tensors are handed over on a cuda_ipc stream, in both directions:
    "cuda" (CUDA IPC), or "cpu-shared" (tests only: torch's CPU shared memory in place of
    CUDA IPC, so CPU stages run the whole protocol; wire/cuda_ipc.HANDOFFS)."""


async def serve(options: StageOptions) -> None:
    """Runs the stage until SIGTERM/SIGINT."""
    name = f"stage-{options.stage_index}"
    # Only the chain's previous hop may call: stage K-1, or the coordinator for stage 0.
    caller = f"stage-{options.stage_index - 1}" if options.stage_index else "coordinator"
    security = ServiceSecurity.internal(options.security, name, [caller])
    lifecycle = ServiceLifecycle(name, options.listen, [SERVICE_NAME],
                                 options.metrics_port, options.grace, security=security)
    handoff = HANDOFFS[options.handoff]
    next_hop = None
    if options.next_address:
        next_hop = StageClient(options.next_address, peer=f"stage-{options.stage_index + 1}",
                               dialer=security.dialer(), transport=options.transport,
                               handoff=handoff)
        lifecycle.on_shutdown(next_hop.close)
    servicer = StageServicer(None, next_hop, handoff=handoff)
    lifecycle.on_shutdown(servicer.close)
    add_to_server(servicer, lifecycle.server)
    await lifecycle.start()  # health answers NOT_SERVING while the weights load
    runner = await asyncio.to_thread(_load, options)
    lifecycle.on_shutdown(_closer(runner))
    seconds = await runner.warm_up()
    log_event("warmed_up", name=name, blocks=f"{options.blocks[0]}:{options.blocks[1]}",
              seconds=round(seconds, 4), next=options.next_address or "-")
    if next_hop is not None:
        next_hop.slot_bytes = runner.max_output_bytes()  # a slot holds the largest output
        next_hop.device = str(runner.device)  # where its outputs live: CUDA ones by handle
        next_hop.start()  # connect early; the stream reconnects by itself if it fails
    servicer.runner = runner
    servicer.serving = True
    await lifecycle.set_serving()
    await lifecycle.wait_for_termination()


def _load(options: StageOptions) -> StageRunner:
    if options.relay is not None:
        return RelayRunner(options.relay, options.stage_index, options.num_stages,
                           options.wire_dtype, options.max_batch_size,
                           options.address or options.listen)
    return StageRunner.from_checkpoint(
        options.reader or options.checkpoint, options.blocks, options.model_name,
        options.device, options.dtype,
        stage_index=options.stage_index, num_stages=options.num_stages,
        wire_dtype=options.wire_dtype, max_batch_size=options.max_batch_size,
        cuda_graphs=options.cuda_graphs, address=options.address or options.listen)


def _closer(runner: StageRunner):
    async def close() -> None:
        runner.close()
    return close


def run(options: StageOptions) -> int:
    run_service(serve(options))  # ends the process once stopped
