"""`ditserve generate`: one request to the coordinator, images (and latents) to files.

Thin wiring of ditserve_client.cli; imports nothing heavy, so it works from the
client-only install.
"""

from __future__ import annotations

import argparse

from ditserve.common.status import CommandError

HELP = "generate images from class labels via a running coordinator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ditserve_client.cli import add_generate_arguments

    add_generate_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ditserve_client.cli import USER_ERRORS, run_generate

    try:
        return run_generate(args)
    except USER_ERRORS as error:
        raise CommandError(str(error)) from None
