"""`ditserve stage`: serve one pipeline stage (a range of DiT blocks) over gRPC.

    ditserve stage --checkpoint dit.safetensors --stage 1 --stages 3 \\
        --listen 127.0.0.1:50053 --next 127.0.0.1:50054 --wire-dtype bf16
    ditserve stage --config pipeline.yaml [--stage K]   # K defaults to DITSERVE_STAGE_INDEX
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from ditserve.common.status import CommandError
from ditserve.config import TRANSPORTS, WireDtype
from ditserve.security.flags import add_arguments as add_security_arguments
from ditserve.security.flags import security_from

HELP = "Serve one pipeline stage (a contiguous range of DiT blocks) over gRPC."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML; the stage's settings come from it")
    parser.add_argument("--checkpoint", help="DiT weights (.pt, diffusers folder, .safetensors)")
    parser.add_argument("--stage", type=int, help="index of this stage, from 0")
    parser.add_argument("--stages", type=int, help="number of stages in the chain")
    parser.add_argument("--blocks", help="explicit block range START:END (default: equal share)")
    parser.add_argument("--model", help="config name such as DiT-XL/2, if the file cannot tell")
    parser.add_argument("--listen", help="host:port to bind")
    parser.add_argument("--next", help="host:port of the next stage (none on the last)")
    parser.add_argument("--wire-dtype", choices=get_args(WireDtype),
                        help="activation dtype on the wire (default bf16)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="on CUDA, replay the forward as CUDA graphs per padded batch "
                             "size (default on; --no-cuda-graphs runs eagerly)")
    parser.add_argument("--max-batch", type=int, help="most rows per microbatch (default 32)")
    parser.add_argument("--metrics-port", type=int, help="port of the Prometheus endpoint")
    parser.add_argument("--threads", type=int, help="torch CPU threads for compute")
    parser.add_argument("--transport", choices=TRANSPORTS,
                        help="how activations reach the next stage: auto (shared memory when "
                             "it shares this host, else gRPC bytes; the default), grpc or shm")
    parser.add_argument("--relay", action="store_true",
                        help="benchmark only: skip the blocks and pass (h, c) on unchanged "
                             "(no checkpoint; needs --model; see `ditserve bench transport`)")
    parser.add_argument("--latent-size", type=int, default=32,
                        help="with --relay: latent side of the activations (default 32)")
    parser.add_argument("--handoff", choices=("cuda", "cpu-shared"), default="cuda",
                        help="tests only: cpu-shared runs the CUDA IPC handoff protocol "
                             "between CPU stages with torch's CPU shared memory (default "
                             "cuda)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds in-flight calls get to finish on SIGTERM (default 5)")
    add_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ditserve.common.logs import configure_logging
    from ditserve.config import Environment
    from ditserve.stage.server import run as serve

    env = Environment.read()
    options = _from_config(args, env) if args.config else _from_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.grace < 0:
        raise CommandError(f"--grace must not be negative, got {args.grace}")
    options.grace = args.grace
    options.handoff = args.handoff
    configure_logging(f"stage-{options.stage_index}", env.log_level)
    return serve(options)


def _from_flags(args: argparse.Namespace):
    from ditserve.config import SecurityConfig
    from ditserve.model import open_checkpoint, parse_block_range, stage_block_range
    from ditserve.stage.server import StageOptions

    for flag in ("stage", "stages", "listen") if args.relay else ("checkpoint", "stage",
                                                                  "stages", "listen"):
        if getattr(args, flag) is None:
            raise CommandError(f"--{flag} is required (or give --config)")
    if args.relay:
        return _relay_options(args)
    reader = open_checkpoint(args.checkpoint, args.model)  # opened once: passed on below
    depth = reader.config.depth
    blocks = (parse_block_range(args.blocks, depth) if args.blocks
              else stage_block_range(depth, args.stage, args.stages))
    return StageOptions(
        checkpoint=args.checkpoint, stage_index=args.stage, num_stages=args.stages,
        blocks=blocks, listen=args.listen, next_address=args.next or "", model_name=args.model,
        reader=reader, cuda_graphs=getattr(args, "cuda_graphs", None) is not False,
        security=security_from(args, SecurityConfig()), transport=args.transport or "auto",
        **_device_options(args.device or "cpu", args.wire_dtype or "bf16",
                          args.max_batch or 32, args.metrics_port))


def _relay_options(args: argparse.Namespace):
    """A relay stage's options: a model config instead of weights."""
    from ditserve.config import SecurityConfig
    from ditserve.model import dit_config
    from ditserve.stage.server import StageOptions

    if not args.model:
        raise CommandError("--relay needs --model (the width of the activations), e.g. DiT-XL/2")
    if not 0 <= args.stage < args.stages:
        raise CommandError(f"--stage {args.stage} is not in 0..{args.stages - 1}")
    try:
        config = dit_config(args.model, input_size=args.latent_size)
    except (KeyError, ValueError) as error:
        raise CommandError(f"--model {args.model}: {error}") from None
    return StageOptions(
        checkpoint="", stage_index=args.stage, num_stages=args.stages,
        blocks=(args.stage, args.stage + 1), listen=args.listen, next_address=args.next or "",
        model_name=args.model, relay=config, security=security_from(args, SecurityConfig()),
        transport=args.transport or "auto",
        **_device_options("cpu", args.wire_dtype or "bf16", args.max_batch or 32,
                          args.metrics_port))


def _from_config(args: argparse.Namespace, env):
    from ditserve.config import load_config
    from ditserve.model import open_checkpoint, parse_block_range, stage_block_range
    from ditserve.stage.server import StageOptions

    config = load_config(args.config)
    index = args.stage if args.stage is not None else env.stage_index
    if index is None:
        raise CommandError("which stage? give --stage or set DITSERVE_STAGE_INDEX")
    if not 0 <= index < len(config.stages):
        raise CommandError(f"stage {index} is not in the config's {len(config.stages)} stages")
    stage = config.stages[index]
    checkpoint = resolve_checkpoint(config.model.checkpoint)
    reader = open_checkpoint(checkpoint, config.model.name)  # opened once: passed on below
    depth = reader.config.depth
    blocks = (parse_block_range(stage.blocks, depth) if stage.blocks
              else stage_block_range(depth, index, len(config.stages)))
    next_address = config.stages[index + 1].address if index + 1 < len(config.stages) else ""
    return StageOptions(
        checkpoint=checkpoint, stage_index=index, num_stages=len(config.stages), blocks=blocks,
        listen=args.listen or stage.listen_address(), next_address=args.next or next_address,
        address=stage.address, model_name=config.model.name, reader=reader,
        cuda_graphs=_choose(getattr(args, "cuda_graphs", None), stage.cuda_graphs),
        security=security_from(args, config.security),
        transport=args.transport or config.transport,
        **_device_options(args.device or stage.device, args.wire_dtype or config.wire_dtype,
                          args.max_batch or config.max_batch_size, args.metrics_port))


def _choose(flag: bool | None, configured: bool) -> bool:
    """A --[no-]cuda-graphs flag given on the command line wins over the config file."""
    return configured if flag is None else flag


def _device_options(device: str, wire_dtype: str, max_batch: int,
                    metrics_port: int | None) -> dict:
    """float32 on the CPU, bf16 on CUDA (the paper's weights are fp32; bf16 halves memory)."""
    import torch

    from ditserve.stage.runner import compute_dtype

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine")
    if max_batch < 1:
        raise CommandError(f"--max-batch must be positive, got {max_batch}")
    return {"device": device, "dtype": compute_dtype(device), "wire_dtype": wire_dtype,
            "max_batch_size": max_batch, "metrics_port": metrics_port}


def resolve_checkpoint(checkpoint: str) -> str:
    """The config's checkpoint; empty means the embedded demo model."""
    if checkpoint:
        return checkpoint
    try:
        from ditserve.demo import DEMO_DIT_PATH
    except ImportError:
        raise CommandError("model.checkpoint is empty and this install has no embedded demo "
                           "model (ditserve.demo); set model.checkpoint") from None
    if not Path(DEMO_DIT_PATH).exists():
        raise CommandError(f"model.checkpoint is empty and the demo model {DEMO_DIT_PATH} is "
                           "missing; run `ditserve train-demo` or set model.checkpoint")
    return str(DEMO_DIT_PATH)
