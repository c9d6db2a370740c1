"""`ditserve generate` and `ditserve info`: the client side of the command line.

Wired into the `ditserve` command by ditserve.entrypoints.generate / .info; needs only
this package (and Pillow for grids), never torch. User errors surface as
`USER_ERRORS`, which the `ditserve` command prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .channel import read_certificates
from .client import Client
from .errors import DitserveError
from .events import Accepted, EncodedImage, Progress, Result
from .grid import PillowMissingError, save_grid
from .model_info import ModelInfo
from .npy import write_npy
from .progress import ProgressBar
from .request import IMAGE_FORMATS

DEFAULT_TARGET = "127.0.0.1:50050"
USER_ERRORS = (DitserveError, PillowMissingError, ValueError, OSError)
"""Failures the CLI reports in one line: the server's, a missing Pillow, bad input, I/O."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
                       help=f"the coordinator (default {DEFAULT_TARGET})")
    group.add_argument("--timeout", type=float, default=None, metavar="S",
                       help="deadline of each call in seconds (default: none)")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca", default=None, metavar="FILE",
                       help="PEM root certificates for --tls (default: the system's)")
    group.add_argument("--token", default=None,
                       help="bearer token sent with every call (default: $DITSERVE_TOKEN, "
                            "which keeps it out of the process list)")


def connect(args: argparse.Namespace) -> Client:
    return Client(args.target, tls=args.tls, root_certificates=read_certificates(args.ca),
                  token=args.token, timeout=args.timeout, retries=3)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class", dest="classes", action="append", required=True,
                        metavar="ID|NAME", help='class id or name ("207", "golden retriever"); '
                        "repeat for several images")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    parser.add_argument("--steps", type=int, default=0, help="steps (0: the sampler's default)")
    parser.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "dpm-solver++"],
                        help="sampler (default: the server's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (1: none)")
    parser.add_argument("--guidance-channels", default="first3", choices=["first3", "all"])
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="the image, or a grid of several (default out.png)")
    parser.add_argument("--out-dir", default=None, metavar="DIR", help="each image singly")
    parser.add_argument("--format", default=None, choices=["png", "jpeg", "webp"],
                        help="image format (default: from --out's extension, else png)")
    parser.add_argument("--quality", type=int, default=0, help="JPEG/WebP quality 1..100")
    parser.add_argument("--latents-out", default=None, metavar="FILE.npy",
                        help="save the final latents, float32 (n, C, L, L)")
    parser.add_argument("--no-images", action="store_true",
                        help="skip decoding (with --latents-out)")
    parser.add_argument("--preview-dir", default=None, metavar="DIR",
                        help="write previews as step_XXXX.png")
    parser.add_argument("--preview-every", type=int, default=1, metavar="K")
    parser.add_argument("--previews", default="approximate", choices=["approximate", "decoded"],
                        help="preview kind with --preview-dir")
    parser.add_argument("--request-id", default="", metavar="ID")
    add_connection_arguments(parser)


def _image_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.out).suffix.lstrip(".").lower() if args.out else ""
    return "jpeg" if suffix == "jpg" else suffix if suffix in IMAGE_FORMATS else "png"


def _check_outputs(args: argparse.Namespace) -> None:
    """Fails before generating when the outputs asked for cannot be written."""
    if args.no_images and not args.latents_out:
        raise ValueError("--no-images needs --latents-out (nothing would be saved)")
    if len(args.classes) > 1 and args.out and not args.no_images:
        from .grid import require_pillow

        require_pillow()  # a grid needs Pillow: fail now rather than after generating
    for folder in (args.out_dir, args.preview_dir):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)


def run_generate(args: argparse.Namespace) -> int:
    """One request; a progress bar on stderr; images, latents and previews written."""
    if not args.out and not args.out_dir:
        args.out = "out.png"
    _check_outputs(args)
    bar = ProgressBar()
    with connect(args) as client:
        events = client.generate(
            args.classes, seed=args.seed, steps=args.steps, sampler=args.sampler,
            guidance=args.guidance, guidance_channels=args.guidance_channels,
            previews=args.previews if args.preview_dir else None,
            preview_every=args.preview_every, image_format=_image_format(args),
            quality=args.quality, return_latents=bool(args.latents_out),
            skip_images=args.no_images, request_id=args.request_id)
        for event in events:
            if isinstance(event, Accepted):
                bar.message(f"request {event.request_id}: seed {event.seed}, {event.sampler} "
                            f"{event.num_steps} steps, guidance {event.guidance_scale:g}")
            elif isinstance(event, Progress):
                bar.update(event.step, event.total, event.elapsed, event.eta)
                _write_previews(args.preview_dir, event)
            elif isinstance(event, Result):
                bar.finish()
                _write_result(args, event)
    return 0


def _write_previews(folder: str | None, event: Progress) -> None:
    if not folder or not event.previews:
        return
    stem = Path(folder) / f"step_{event.step:04d}"
    if len(event.previews) == 1:
        event.previews[0].save(stem.with_suffix("." + event.previews[0].extension))
        return
    try:
        save_grid(event.previews, stem.with_suffix(".png"))
    except PillowMissingError:  # no grid without Pillow: one file per image
        for i, image in enumerate(event.previews):
            image.save(f"{stem}_{i}.{image.extension}")


def _write_result(args: argparse.Namespace, result: Result) -> None:
    written = _write_images(args, result.images)
    if args.latents_out:
        if result.latents is None:
            raise DitserveError("INTERNAL", "the server returned no latents")
        written.append(str(write_npy(args.latents_out, result.latents)))
    t = result.timings
    print(f"wrote {', '.join(written)} (seed {result.seed}; queued {t.queued:.2f}s, "
          f"denoising {t.denoising:.2f}s, decoding {t.decoding:.2f}s)")


def _write_images(args: argparse.Namespace, images: Sequence[EncodedImage]) -> list[str]:
    written: list[str] = []
    if not images:
        return written
    if args.out:
        if len(images) == 1:
            images[0].save(args.out)
        else:
            save_grid(images, args.out, quality=args.quality or 90)
        written.append(args.out)
    if args.out_dir:
        for i, image in enumerate(images):
            path = Path(args.out_dir) / f"{i:03d}_class{image.label}.{image.extension}"
            written.append(str(image.save(path)))
    return written


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)


def run_info(args: argparse.Namespace) -> int:
    """Prints the model, classes, samplers, decoder and the chain with its health."""
    with connect(args) as client:
        info = client.model_info()
    print(format_info(info))
    return 0


def format_info(info: ModelInfo, first_names: int = 5) -> str:
    classes = info.classes
    count = classes.num_classes if classes.num_classes is not None else "?"
    names = ", ".join(classes.names[:first_names]) if classes.names else "(ids only)"
    more = ", ..." if len(classes.names) > first_names else ""
    samplers = ", ".join(f"{name} ({steps} steps)" for name, steps in info.samplers.items())
    lines = [
        f"model     {info.model_name} ({info.image_size}x{info.image_size} px, latents "
        f"{info.latent_channels}x{info.latent_size}x{info.latent_size})",
        f"classes   {count}: {names}{more}",
        f"samplers  {samplers}; default guidance {info.default_guidance_scale:g}",
        f"decoder   {'yes' if info.has_decoder else 'no (latents only)'}",
        f"stages    {len(info.stages)}",
    ]
    for s in info.stages:
        health = "SERVING" if s.serving else "NOT SERVING"
        lines.append(f"  stage {s.index}: blocks {s.block_start}..{s.block_end - 1} of "
                     f"{s.depth}  {s.address}  {s.device}  wire {s.wire_dtype}  {health}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m ditserve_client.cli generate|info ...` (the same as `ditserve ...`)."""
    parser = argparse.ArgumentParser(prog="ditserve-client")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(gen := commands.add_parser("generate"))
    gen.set_defaults(run=run_generate)
    add_info_arguments(info := commands.add_parser("info"))
    info.set_defaults(run=run_info)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"ditserve {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
