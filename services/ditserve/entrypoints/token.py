"""`ditserve token`: bearer tokens for the public API, stored as sha256 hashes.

    ditserve token new --tokens tokens.txt --name gateway   # prints the new token once,
                                                            # appends its hash to the file
    printf %s "$TOKEN" | ditserve token hash --name alice    # the line to store for a token

The coordinator reads the file given by `security.tokens` (or --tokens) and re-reads it when
it changes: add or remove a line to grant or revoke, no restart. In Kubernetes the file is a
Secret (`kubectl create secret generic ditserve-tokens --from-file=tokens=tokens.txt`).
The token travels on stdin and stdout only, never as an argument (argv is public in `ps`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ditserve.common.status import CommandError

HELP = "make a bearer token for the public API, or hash one for the tokens file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="print a new random token; append its hash to --tokens")
    new.add_argument("--tokens", required=True, metavar="FILE",
                     help="tokens file to append the hash to (created 0600 if missing)")
    new.add_argument("--name", default="", help="label of the token in the file and the logs")
    hashed = actions.add_parser("hash", help="read a token on stdin, print its line")
    hashed.add_argument("--name", default="", help="label of the token in the file and the logs")


def _line(token: str, name: str) -> str:
    from ditserve.security.tokens import hash_token

    if name and not re.fullmatch(r"\S+", name):
        raise CommandError(f"--name must be one word without spaces, got {name!r}")
    return f"{hash_token(token)} {name}".rstrip()


def run(args: argparse.Namespace) -> int:
    from ditserve.security.tokens import new_token

    if args.action == "hash":
        token = sys.stdin.read().strip()
        if not token:
            raise CommandError("no token on stdin")
        print(_line(token, args.name))
        return 0
    token = new_token()
    line = _line(token, args.name)
    fd = os.open(args.tokens, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as tokens:
        tokens.write(line + "\n")
    print(token)
    return 0
