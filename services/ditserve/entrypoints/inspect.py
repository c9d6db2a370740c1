"""`ditserve inspect`: a checkpoint's config, size and per-stage block ranges."""

from __future__ import annotations

import argparse

HELP = "print a checkpoint's config, parameter count and per-stage blocks and bytes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="any supported DiT checkpoint")
    parser.add_argument("--stages", type=int, default=1, help="split into this many stages")
    parser.add_argument("--model", help="config name when the file cannot tell")


def _stage_bytes(reader, blocks: tuple[int, int], depth: int) -> int:
    start, end = blocks
    wanted = [f"blocks.{i}." for i in range(start, end)]
    if start == 0:
        wanted += ["x_embedder.", "t_embedder.", "y_embedder.", "pos_embed"]
    if end == depth:
        wanted.append("final_layer.")
    return sum(reader.nbytes(k) for k in reader if k.startswith(tuple(wanted)))


def run(args: argparse.Namespace) -> int:
    from ditserve.model import open_checkpoint, stage_block_range

    reader = open_checkpoint(args.checkpoint, args.model)
    config = reader.config
    total = sum(reader.nbytes(k) for k in reader)
    params = sum(reader.nbytes(k) // max(1, reader.get(k).element_size()) for k in reader
                 if k != "pos_embed")
    print(f"model       {config.name or '(unnamed)'}")
    print(f"config      {config.to_json()}")
    print(f"parameters  {params:,} ({total / 2**20:.1f} MiB as stored)")
    print(f"tokens      {config.num_tokens} x {config.hidden_size}")
    print(f"weight hash {reader.weight_hash()}")
    for stage in range(args.stages):
        blocks = stage_block_range(config.depth, stage, args.stages)
        size = _stage_bytes(reader, blocks, config.depth)
        print(f"stage {stage}/{args.stages}  blocks {blocks[0]}:{blocks[1]}  "
              f"{size / 2**20:.1f} MiB")
    return 0
