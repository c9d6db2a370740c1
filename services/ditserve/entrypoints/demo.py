"""`ditserve demo`: the main job of `make demo`, as a user would do it by hand.

Starts the local cluster (`ditserve up`) on the embedded demo model, asks the coordinator
for one image of every class through the client SDK, saves them as a grid and stops the
cluster.
"""

from __future__ import annotations

import argparse

from ditserve.common.status import CommandError

HELP = "start the local cluster on the demo model, generate a grid of every class, stop"
START_TIMEOUT_S = 330.0
"""Longer than `ditserve up`'s own --start-timeout (300 s), which then reports the cause."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo.png", help="grid PNG to write")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    parser.add_argument("--per-class", type=int, default=3,
                        help="images of each class: rows of the grid (default 3)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first row; row k uses seed + k * columns (default 0)")
    parser.add_argument("--sampler", default=None, help="default: the server's (ddpm, 250 steps)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the sampler's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the server's)")
    parser.add_argument("--log-dir", default=".ditserve-logs",
                        help="folder of the services' logs (default .ditserve-logs)")


def _start_cluster(args: argparse.Namespace):
    """`ditserve up` on the demo model, on free loopback ports; its output goes to a log
    file beside the run folders."""
    from pathlib import Path

    from ditserve.common.process import ServiceProcess, ditserve_argv, free_port_block

    port = free_port_block(2 + args.stages)  # coordinator, decoder, stages
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = ditserve_argv("up", "--port", str(port), "--stages", str(args.stages),
                         "--log-dir", str(log_dir))
    print(f"demo: starting the cluster on 127.0.0.1:{port} (log: {log_dir}/up-{port}.log)",
          flush=True)
    return ServiceProcess("ditserve up", argv, f"127.0.0.1:{port}",
                          log_dir / f"up-{port}.log").start()


def _generate(target: str, args: argparse.Namespace) -> tuple[list, list[str]]:
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
    return images, [info.classes.name(c) for c in range(num_classes)]


def run(args: argparse.Namespace) -> int:
    import sys

    from ditserve_client.grid import save_grid

    from ditserve.common.process import ServiceFailed

    if args.per_class < 1:
        raise CommandError(f"--per-class must be at least 1, got {args.per_class}")
    cluster = _start_cluster(args)
    try:
        # The coordinator serves once every other service does; `up` exits (one line in
        # its log) if one cannot start within its --start-timeout.
        cluster.wait_serving(timeout=START_TIMEOUT_S)
        images, names = _generate(cluster.address, args)
        save_grid(images, args.out, columns=len(names), captions=names)  # names under columns
        print(f"demo: wrote {args.out}", flush=True)
    except ServiceFailed as failure:
        print(f"ditserve demo: the cluster did not start: {failure.cause}", file=sys.stderr)
        print(f"  log: {failure.log_path}", file=sys.stderr)
        return 2
    finally:
        cluster.terminate(grace=60)
        cluster.close()
    return 0
