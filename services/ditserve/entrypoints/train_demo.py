"""`ditserve train-demo`: train the embedded demo model (VAE, classifier, DiT) from scratch."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ditserve.common.status import CommandError

HELP = "train the demo model (shapes DiT + VAE + judge classifier) into a folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (the layout of ditserve/demo/weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and training")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run of every stage in seconds (useless weights)")
    parser.add_argument("--card-only", action="store_true",
                        help="train nothing: re-measure the weights already in --out and "
                             "rewrite its samples.png and MODEL_CARD.md")
    parser.add_argument("--dit-only", action="store_true",
                        help="train only the DiT, on the VAE and judges already in --out "
                             "(from a run with the same seed and threads)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (the shipped files come from the default, "
                             "2: another count may sum floats in another order)")


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise CommandError(f"--seed must be non-negative, got {args.seed}")
    if args.threads < 1:
        raise CommandError(f"--threads must be positive, got {args.threads}")
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} exists and is not a folder")
    if args.card_only and not (args.out / "training.json").is_file():
        raise CommandError(f"--card-only: {args.out} holds no training.json from a training run")
    if args.card_only and args.dit_only:
        raise CommandError("--card-only and --dit-only exclude each other")
    import torch

    from ..demo.recipe import FULL, QUICK, finish, train_all
    torch.set_num_threads(args.threads)
    start = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    plan = QUICK if args.quick else FULL
    if args.card_only:
        finish(args.out, plan.eval_settings, plan.eval_per_class, plan.grid_steps, log)
    else:
        try:
            train_all(args.out, args.seed, plan, log, dit_only=args.dit_only)
        except ValueError as error:
            if not args.dit_only:
                raise
            raise CommandError(f"--dit-only: {error}") from None
    print(args.out)
    return 0
