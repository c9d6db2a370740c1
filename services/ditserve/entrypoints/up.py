"""`ditserve up`: the whole pipeline on this machine, one process per service."""

from __future__ import annotations

import argparse
from typing import get_args

from ditserve.common.status import CommandError
from ditserve.config import WireDtype

HELP = "start every service (stages, decoder, coordinator) as its own process on loopback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML (the same file as the k8s ConfigMap); "
                                         "its addresses are moved to loopback")
    parser.add_argument("--checkpoint", default="",
                        help="DiT checkpoint; default: the embedded demo model")
    parser.add_argument("--stages", type=int, default=2, help="number of stages (default 2)")
    parser.add_argument("--vae", default="", help="diffusers AutoencoderKL folder; default: "
                                                  "the embedded demo VAE")
    parser.add_argument("--no-decoder", action="store_true", help="serve latents only")
    parser.add_argument("--wire-dtype", default="bf16", choices=get_args(WireDtype))
    parser.add_argument("--port", type=int, default=50050,
                        help="coordinator port; the decoder and stages take the next ones")
    parser.add_argument("--log-dir", default=".ditserve-logs",
                        help="each service's log goes to LOG_DIR/NAME.log")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds each service may take to become healthy")


def _config(args: argparse.Namespace):
    from ditserve.config import load_config, local_config
    from ditserve.launcher.plan import localize

    if not 1 <= args.port <= 65535 - 64:
        raise CommandError(f"--port must be between 1 and {65535 - 64}, got {args.port}")
    if args.config:
        config = load_config(args.config)
    else:
        if args.stages < 1:
            raise CommandError(f"--stages must be at least 1, got {args.stages}")
        config = local_config(args.stages, args.port, args.checkpoint, args.wire_dtype, args.vae)
    config = localize(config, args.port)
    if args.no_decoder:
        config.decoder.address = ""
    return config


def _write_config(config, log_dir: str):
    import dataclasses
    from pathlib import Path

    import yaml

    path = Path(log_dir) / "pipeline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return path


def run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import time

    from ditserve.launcher.plan import plan
    from ditserve.launcher.supervisor import Supervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = _config(args)
    supervisor = Supervisor(plan(config, _write_config(config, args.log_dir)), args.log_dir,
                            args.start_timeout)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        supervisor.start_all()
        print(f"ditserve up: coordinator at {config.coordinator.address} "
              f"({len(config.stages)} stages{', decoder' if config.decoder.address else ''}); "
              "Ctrl-C stops", flush=True)
        while not stop:
            supervisor.supervise_once()
            time.sleep(0.25)
    finally:
        supervisor.stop_all()
    return 0
