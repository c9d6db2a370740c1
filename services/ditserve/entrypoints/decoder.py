"""`ditserve decoder`: serve the VAE decoder (DecoderService).

    ditserve decoder --vae DIR --listen HOST:PORT [--device cpu|cuda] [--max-batch N]
    ditserve decoder --config FILE        # uses config.decoder; flags override it

An empty VAE path means the embedded demo VAE (ditserve.demo.DEMO_VAE_PATH).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ditserve.common.status import CommandError
from ditserve.security.flags import add_arguments as add_security_arguments
from ditserve.security.flags import security_from

if TYPE_CHECKING:
    from ditserve.decoder.server import DecoderServerConfig

HELP = "serve the VAE decoder: latents to PNG/JPEG/WebP images"
DEFAULT_LISTEN = "[::]:50051"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="pipeline YAML (default: $DITSERVE_CONFIG); uses its decoder section")
    parser.add_argument("--vae", default=None, metavar="DIR",
                        help="diffusers AutoencoderKL folder (default: the embedded demo VAE)")
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="the DiT this VAE decodes for: a VAE that does not belong to it is "
                        "refused (default: the config's model.checkpoint; unchecked without "
                        "--config or --checkpoint)")
    parser.add_argument("--listen", default=None, metavar="HOST:PORT",
                        help=f"address to bind (default {DEFAULT_LISTEN})")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--max-batch", type=int, default=None, metavar="N",
                        help="most latent rows per VAE call (default 8)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="P",
                        help="serve Prometheus metrics on this port")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    add_security_arguments(parser)


def demo_vae_path() -> str:
    """The embedded demo VAE's folder, or a clear error when this build has none."""
    try:
        from ditserve.demo import DEMO_VAE_PATH
    except ImportError:
        raise CommandError("no --vae given and this build has no embedded demo VAE "
                           "(ditserve.demo.DEMO_VAE_PATH); pass --vae DIR") from None
    return str(DEMO_VAE_PATH)


def server_config(args: argparse.Namespace) -> DecoderServerConfig:
    """The config file's decoder section (if any) overridden by the flags."""
    from ditserve.config import DecoderConfig, Environment, SecurityConfig, load_config
    from ditserve.decoder.server import DecoderServerConfig

    path = args.config or Environment.read().config
    pipeline = load_config(path) if path else None
    section = pipeline.decoder if pipeline else DecoderConfig()
    listen = args.listen or (section.listen_address() if section.address or section.listen
                             else DEFAULT_LISTEN)
    max_batch = args.max_batch if args.max_batch is not None else section.max_batch_size
    if max_batch < 1:
        raise CommandError(f"--max-batch must be positive, got {max_batch}")
    vae = args.vae or section.vae or demo_vae_path()
    if not (Path(vae) / "config.json").is_file():
        raise CommandError(f"VAE folder {vae} has no config.json (a diffusers "
                           "AutoencoderKL folder is needed)")
    checkpoint = args.checkpoint if args.checkpoint is not None else (
        pipeline.model.checkpoint if pipeline else None)
    if checkpoint is not None:  # as the stages resolve it: empty means the demo model
        from ditserve.entrypoints.stage import resolve_checkpoint

        checkpoint = resolve_checkpoint(checkpoint)
    return DecoderServerConfig(vae=vae, listen=listen, device=args.device or section.device,
                               max_batch_size=max_batch, metrics_port=args.metrics_port,
                               checkpoint=checkpoint,
                               security=security_from(args, pipeline.security if pipeline
                                                      else SecurityConfig()))


def run(args: argparse.Namespace) -> int:
    from ditserve.common.lifecycle import run_service
    from ditserve.common.logs import configure_logging
    from ditserve.config import Environment
    from ditserve.decoder.server import serve

    config = server_config(args)
    configure_logging("decoder", args.log_level or Environment.read().log_level)
    run_service(serve(config))  # ends the process once stopped
