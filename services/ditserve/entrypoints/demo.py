"""`ditserve demo`: the main job of `make demo`, as a user would do it by hand.

Starts the local cluster (`ditserve up`) on the embedded demo model, asks the coordinator
for one image of every class through the client SDK, saves them as a grid and stops the
cluster.
"""

from __future__ import annotations

import argparse

from ditserve.common.status import CommandError

HELP = "start the local cluster on the demo model, generate a grid of every class, stop"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo.png", help="grid PNG to write")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    parser.add_argument("--per-class", type=int, default=3,
                        help="images of each class: rows of the grid (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default=None, help="default: the server's (ddpm, 250 steps)")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--log-dir", default=".ditserve-logs")


def _start_cluster(args: argparse.Namespace, port: int):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "ditserve.cli", "up", "--port", str(port),
            "--stages", str(args.stages), "--log-dir", args.log_dir]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def _wait_ready(process) -> str:
    """The coordinator address `ditserve up` prints once every service is healthy (it
    exits instead if a service cannot start within its --start-timeout)."""
    for line in process.stdout:
        print(line, end="", flush=True)
        if "coordinator at" in line:
            return line.split("coordinator at")[1].split()[0]
    raise RuntimeError(f"ditserve up exited with code {process.wait()} before it was ready "
                       "(see its log directory)")


def _generate(target: str, args: argparse.Namespace) -> tuple[list, int]:
    """One request per grid row, one column per class (the first 10 classes at most)."""
    from ditserve_client import Client

    with Client(target) as client:
        info = client.model_info()
        num_classes = min(10, info.classes.num_classes or 0)
        labels = [c for _ in range(args.per_class) for c in range(num_classes)]  # row by row
        print(f"demo: {info.model_name} over {len(info.stages)} stages; "
              f"{len(labels)} images of {num_classes} classes", flush=True)
        print("demo: grid columns: " + ", ".join(info.classes.name(c) for c in range(num_classes)),
              flush=True)
        images = []
        for first in range(0, len(labels), num_classes):  # one request per grid row
            result = client.generate_result(labels[first:first + num_classes],
                                            seed=args.seed + first,
                                            sampler=args.sampler, steps=args.steps,
                                            guidance=args.guidance)
            images += result.images
            print(f"demo: {len(images)}/{len(labels)} images "
                  f"({result.timings.denoising:.1f} s denoising)", flush=True)
    return images, num_classes


def run(args: argparse.Namespace) -> int:
    import signal
    import socket

    from ditserve_client.grid import save_grid

    if args.per_class < 1:
        raise CommandError(f"--per-class must be at least 1, got {args.per_class}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster = _start_cluster(args, port)
    try:
        target = _wait_ready(cluster)
        images, columns = _generate(target, args)
        save_grid(images, args.out, columns=columns)
        print(f"demo: wrote {args.out}", flush=True)
    finally:
        cluster.send_signal(signal.SIGTERM)
        cluster.wait(timeout=60)
    return 0
