"""The `ditserve` command: one subcommand per module of ditserve.entrypoints.

Each entrypoint module defines `HELP`, `add_arguments(parser)` and `run(args) -> int`,
and imports torch (or anything heavy) only inside `run`, so that `ditserve generate` and
`ditserve info` work from the client-only install.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ditserve.common.status import CommandError, UserError

# Subcommand → module under ditserve.entrypoints, in the order `--help` lists them.
SUBCOMMANDS = {
    "generate": "generate",
    "info": "info",
    "up": "up",
    "demo": "demo",
    "stage": "stage",
    "coordinator": "coordinator",
    "decoder": "decoder",
    "gateway": "gateway",
    "convert": "convert",
    "inspect": "inspect",
    "train-demo": "train_demo",
    "bench": "bench",
    "token": "token",
}


__all__ = ["CommandError", "UserError", "main"]


def _parser() -> argparse.ArgumentParser:
    from ditserve import __version__

    parser = argparse.ArgumentParser(prog="ditserve", description=(
        "Pipeline-parallel inference for Diffusion Transformers over gRPC."))
    parser.add_argument("--version", action="version", version=f"ditserve {__version__}")
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
        sub.set_defaults(run=module.run, parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ditserve_client.cli import parse_with_subcommand_errors

    args = parse_with_subcommand_errors(_parser(), argv)
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
    except UserError as error:  # configuration, checkpoint, start-up or command: one line
        print(f"ditserve {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
