"""`ditserve coordinator`: serve the public API, driving the denoising loop over the chain.

    ditserve coordinator --config pipeline.yaml [--listen HOST:PORT] [--stage0 HOST:PORT]
                         [--decoder HOST:PORT] [--metrics-port P]
    ditserve coordinator --local --checkpoint dit.safetensors --listen 127.0.0.1:50050
"""

from __future__ import annotations

import argparse

from ditserve.common.status import CommandError
from ditserve.security.flags import add_arguments as add_security_arguments
from ditserve.security.flags import security_from

HELP = "Serve the coordinator: the denoising loop with step-level batching over the chain."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML (stages, limits, decoder, model)")
    parser.add_argument("--listen", help="host:port to bind (default: the config's)")
    parser.add_argument("--stage0", help="host:port of stage 0 (default: the config's first)")
    parser.add_argument("--decoder", help="host:port of the decoder (default: the config's; "
                        "'' for none)")
    parser.add_argument("--metrics-port", type=int, help="port of the Prometheus endpoint")
    parser.add_argument("--local", action="store_true",
                        help="run the whole model in this process instead of stage workers")
    parser.add_argument("--checkpoint", help="with --local: DiT weights (default: the "
                        "config's model.checkpoint)")
    parser.add_argument("--local-stages", type=int, default=1,
                        help="with --local: stages emulated in process (default 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (with --local)")
    add_security_arguments(parser, public=True)


def run(args: argparse.Namespace) -> int:
    from ditserve.common.logs import configure_logging
    from ditserve.config import Environment
    from ditserve.coordinator.server import run as serve

    env = Environment.read()
    options = _options(args, env)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    configure_logging("coordinator", env.log_level)
    return serve(options)


def _options(args: argparse.Namespace, env):
    from ditserve.config import PipelineConfig, load_config
    from ditserve.coordinator.server import CoordinatorOptions

    path = args.config or env.config
    if not path and not args.local:
        raise CommandError("--config is required (or --local --checkpoint FILE)")
    config = load_config(path) if path else PipelineConfig()
    config.security = security_from(args, config.security)
    if args.local_stages < 1:
        raise CommandError(f"--local-stages must be positive, got {args.local_stages}")
    decoder = args.decoder if args.decoder is not None else config.decoder.address
    return CoordinatorOptions(
        config=config, listen=args.listen or config.coordinator.listen_address(),
        stage0=args.stage0 or _first_stage(config, args.local), decoder=decoder,
        local_checkpoint=_local_checkpoint(args, config), local_stages=args.local_stages,
        metrics_port=args.metrics_port)


def _first_stage(config, local: bool) -> str:
    if local:
        return ""
    if not config.stages:
        raise CommandError("the config lists no stages; give --stage0 HOST:PORT")
    return config.stages[0].address


def _local_checkpoint(args: argparse.Namespace, config) -> str:
    if not args.local:
        if args.checkpoint:
            raise CommandError("--checkpoint needs --local (stages load the weights otherwise)")
        return ""
    from ditserve.entrypoints.stage import resolve_checkpoint

    return resolve_checkpoint(args.checkpoint or config.model.checkpoint)
