"""The `ditserve` command: one subcommand per module of ditserve.entrypoints.

Each entrypoint module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`,
and imports torch (or anything heavy) only inside `run`, so that `ditserve generate` and
`ditserve info` work from the client-only install.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand → module under ditserve.entrypoints, in the order `--help` lists them.
SUBCOMMANDS = {
    "generate": "generate",
    "info": "info",
    "up": "up",
    "demo": "demo",
    "stage": "stage",
    "coordinator": "coordinator",
    "decoder": "decoder",
    "convert": "convert",
    "inspect": "inspect",
    "train-demo": "train_demo",
    "bench": "bench",
    "token": "token",
}


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditserve", description=(
        "Pipeline-parallel inference for Diffusion Transformers over gRPC."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"ditserve.entrypoints.{module_name}")
        except ModuleNotFoundError as missing:
            if not missing.name or not missing.name.startswith("ditserve.entrypoints"):
                raise
            continue  # not built yet
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as missing:
        if missing.name and missing.name.split(".")[0] in {"torch", "safetensors", "diffusers",
                                                             "numpy", "yaml", "prometheus_client"}:
            print(f"ditserve {args.command}: needs the server extras "
                  f"(pip install 'ditserve[server]'): no module {missing.name}", file=sys.stderr)
            return 2
        raise
    except (CommandError, ValueError, FileNotFoundError) as error:
        print(f"ditserve {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m ditserve.cli` runs this file as __main__, a second copy of the module:
    # call the imported one, so that its CommandError is the one subcommands raise.
    from ditserve.cli import main as _main

    sys.exit(_main())
