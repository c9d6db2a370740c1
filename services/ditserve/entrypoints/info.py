"""`ditserve info`: the served model, its classes and samplers, and the stage chain.

Thin wiring of ditserve_client.cli; imports nothing heavy.
"""

from __future__ import annotations

import argparse

from ditserve.common.status import CommandError

HELP = "describe the model and pipeline a coordinator serves"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ditserve_client.cli import add_info_arguments

    add_info_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ditserve_client.cli import USER_ERRORS, run_info

    try:
        return run_info(args)
    except USER_ERRORS as error:
        raise CommandError(str(error)) from None
