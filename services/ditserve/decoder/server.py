"""The decoder's server: DecoderService on the shared lifecycle (health, reflection,
metrics, graceful SIGTERM).

Recipe: check that the VAE belongs to the model (pairing.py) → bind (health NOT_SERVING)
→ load the VAE off the event loop → one warm-up decode → SERVING → serve until a signal
→ drain → stop the compute thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ditserve_client.proto.dit.v1 import decoder_pb2, decoder_pb2_grpc

from ditserve.common.lifecycle import ServiceLifecycle
from ditserve.common.logs import log_event
from ditserve.config import SecurityConfig
from ditserve.security.service import ServiceSecurity

from .batching import DecodeBatcher
from .decoder import VaeDecoder
from .pairing import check_pairing
from .servicer import DecoderServicer

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


@dataclass
class DecoderServerConfig:
    """What `ditserve decoder` serves and where."""

    vae: str
    """A diffusers AutoencoderKL folder."""
    listen: str = "[::]:50051"
    """host:port to bind."""
    device: str = "cpu"
    """Compute device of the VAE."""
    max_batch_size: int = 8
    """Most latent rows decoded in one VAE call."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint; None for none."""
    grace: float = 5.0
    """Seconds in-flight calls get to finish on SIGTERM."""
    checkpoint: str | None = None
    """The DiT whose latents this decoder decodes; a VAE that does not belong to it is
    refused at start-up. None: unknown (a decoder started on its own), not checked."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """TLS/mTLS of its port; only the coordinator may call."""


async def serve(config: DecoderServerConfig) -> None:
    """Runs the decoder until SIGTERM/SIGINT; VaePairingError before binding when the VAE
    does not belong to the model."""
    if config.checkpoint is not None:
        await asyncio.to_thread(check_pairing, config.checkpoint, config.vae)
    security = ServiceSecurity.internal(config.security, "decoder", ["coordinator"])
    lifecycle = ServiceLifecycle("decoder", config.listen, [SERVICE_NAME],
                                 metrics_port=config.metrics_port, grace=config.grace,
                                 security=security)
    servicer = DecoderServicer()
    decoder_pb2_grpc.add_DecoderServiceServicer_to_server(servicer, lifecycle.server)
    await lifecycle.start()
    # Load the VAE:
    decoder = await asyncio.to_thread(VaeDecoder.load, config.vae, config.device,
                                      config.max_batch_size)
    # Warm up, then serve:
    await asyncio.to_thread(decoder.warm_up)
    batcher = DecodeBatcher(decoder)
    batcher.start()
    lifecycle.on_shutdown(batcher.stop)
    servicer.attach(batcher)
    log_event("vae_loaded", vae=config.vae, device=config.device, model=config.checkpoint,
              latent_channels=decoder.latent_channels, scaling_factor=decoder.scaling_factor,
              tile_latent_size=decoder.tile_latent_size)
    await lifecycle.set_serving()
    await lifecycle.wait_for_termination()
