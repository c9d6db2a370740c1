"""`ditserve convert`: any supported DiT checkpoint → ditserve's self-describing file."""

from __future__ import annotations

import argparse

from ditserve.common.status import CommandError

HELP = "convert an official .pt, a diffusers folder or a ditserve file to a ditserve file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official .pt, diffusers (pipeline or transformer) folder, "
                                    "or ditserve .safetensors")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--model", help="config name (e.g. DiT-XL/2) when the file cannot tell")


def run(args: argparse.Namespace) -> int:
    from ditserve.model import convert

    if not args.out.endswith(".safetensors"):
        raise CommandError(f"--out must end in .safetensors, got {args.out!r}")
    config = convert(args.src, args.out, args.model)
    print(f"wrote {args.out}: {config.name or 'DiT'} depth {config.depth}, "
          f"hidden {config.hidden_size}, patch {config.patch_size}, input {config.input_size}")
    return 0
