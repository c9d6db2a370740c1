"""`ditserve generate` and `ditserve info`: the client side of the command line.

Wired into the `ditserve` command by ditserve.entrypoints.generate / .info; needs only
this package and its base dependencies (grpcio, protobuf, Pillow), never torch. User errors surface as
`USER_ERRORS`, which the `ditserve` command prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .channel import read_certificates
from .client import Client
from .errors import DitserveError
from .events import Accepted, EncodedImage, Progress, Result
from .grid import PillowMissingError, save_grid
from .model_info import ModelInfo
from .npy import write_npy
from .progress import ProgressBar
from .request import MAX_GUIDANCE
from .resume import RESUME_WINDOW_S

DEFAULT_TARGET = "127.0.0.1:50050"
USER_ERRORS = (DitserveError, PillowMissingError, ValueError, OSError)
"""Failures the CLI reports in one line: the server's, a missing Pillow, bad input, I/O."""
OUT_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
"""--out's extension → the image format asked of the server."""


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
                       help=f"the coordinator, as `ditserve up` prints it (default "
                       f"{DEFAULT_TARGET})")
    group.add_argument("--timeout", type=float, default=None, metavar="S",
                       help="deadline of each call in seconds (default: none)")
    group.add_argument("--resume-window", type=float, default=RESUME_WINDOW_S, metavar="S",
                       help="seconds to wait for a restarted coordinator when a generation's "
                       "stream breaks; it is then resumed with the same seed (default "
                       f"{RESUME_WINDOW_S:g}; 0: fail at once)")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca", default=None, metavar="FILE",
                       help="PEM root certificates for --tls (default: the system's)")
    group.add_argument("--token", default=None,
                       help="bearer token sent with every call (default: $DITSERVE_TOKEN, "
                            "which keeps it out of the process list; a token that starts "
                            "with '-' goes as --token=VALUE)")


def connect(args: argparse.Namespace) -> Client:
    """A client for the connection flags (the target is checked here, before any call)."""
    return Client(args.target, tls=args.tls, root_certificates=read_certificates(args.ca),
                  token=args.token, timeout=args.timeout, retries=3,
                  resume_window=args.resume_window)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 is never a hidden "default" on the command line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--class", dest="classes", action="append", required=True,
                        metavar="ID|NAME", help='class id or name ("0", "red circle" on the '
                        'demo model; "207", "golden retriever" on ImageNet); repeat for '
                        "several images")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="denoising steps (default: the sampler's)")
    parser.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "dpm-solver++"],
                        help="sampler (default: the server's)")
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"classifier-free guidance scale, 1 (none) to {MAX_GUIDANCE:g} "
                        "(default: the server's)")
    parser.add_argument("--guidance-channels", default=None, choices=["first3", "all"],
                        help="latent channels guidance applies to (default: the server's, "
                        "first3 as the reference)")
    parser.add_argument("--mode", default=None, choices=["exact", "async"],
                        help="exact (default), or async: every stage works on this request "
                        "at once, each on activations one step stale (lower latency, "
                        "approximate)")
    parser.add_argument("--warmup", type=int, default=None, metavar="W",
                        help="with --mode async: exact steps before pipelining starts "
                        "(default: the server's)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="the image, or a captioned grid of several; .png, .jpg, .jpeg or "
                        ".webp (default out.png)")
    parser.add_argument("--out-dir", default=None, metavar="DIR", help="each image singly")
    parser.add_argument("--format", default=None, choices=["png", "jpeg", "webp"],
                        help="image format (default: --out's extension, else png)")
    parser.add_argument("--quality", type=int, default=None, metavar="Q",
                        help="JPEG/WebP quality 1..100 (default: the server's, 90)")
    parser.add_argument("--latents-out", default=None, metavar="FILE.npy",
                        help="save the final latents, float32 (n, C, L, L)")
    parser.add_argument("--no-images", action="store_true",
                        help="skip decoding (with --latents-out)")
    parser.add_argument("--preview-dir", default=None, metavar="DIR",
                        help="write previews as DIR/step_XXXX.EXT, in the format the server "
                        "sends (ditserve sends JPEG: .jpg); several images make a grid")
    parser.add_argument("--preview-every", type=positive_int, default=None, metavar="K",
                        help="a preview every K steps (default 1)")
    parser.add_argument("--previews", default="approximate", choices=["approximate", "decoded"],
                        help="preview kind with --preview-dir: a linear map of the latents "
                        "(cheap) or VAE-decoded (default approximate)")
    parser.add_argument("--request-id", default="", metavar="ID",
                        help="id of the request in the server's logs (default: the server's)")
    add_connection_arguments(parser)


def _image_format(args: argparse.Namespace) -> str:
    """The format of the result images: --out's extension decides, else --format, else png."""
    if args.out:
        suffix = Path(args.out).suffix.lstrip(".").lower()
        if suffix not in OUT_FORMATS:
            raise ValueError(f"--out {args.out}: unknown image extension "
                             f"{'.' + suffix if suffix else '(none)'}; use "
                             f"{', '.join('.' + s for s in OUT_FORMATS)}")
        if args.format and args.format != OUT_FORMATS[suffix]:
            raise ValueError(f"--format {args.format} does not match --out {args.out}")
        return OUT_FORMATS[suffix]
    return args.format or "png"


def _check_writable(path: str, what: str) -> None:
    """Fails now, not after the generation, when `path` cannot be written."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (
            target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{what} {path}: not writable")


def _check_outputs(args: argparse.Namespace) -> str:
    """Fails before generating when the outputs cannot be written; the image format."""
    if args.no_images and not args.latents_out:
        raise ValueError("--no-images needs --latents-out (nothing would be saved)")
    if args.latents_out:
        _check_writable(args.latents_out, "--latents-out")
    image_format = _image_format(args)
    if args.out and not args.no_images:
        _check_writable(args.out, "--out")
    for folder in (args.out_dir, args.preview_dir):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    return image_format


def run_generate(args: argparse.Namespace) -> int:
    """One request; a progress bar on stderr; images, latents and previews written."""
    if not args.out and not args.out_dir:
        args.out = "out.png"
    image_format = _check_outputs(args)
    bar = ProgressBar()
    with connect(args) as client, _sdk_warnings_on(bar):
        events = client.generate(
            args.classes, seed=args.seed, steps=args.steps, sampler=args.sampler,
            guidance=args.guidance, guidance_channels=args.guidance_channels,
            previews=args.previews if args.preview_dir else None,
            preview_every=args.preview_every, image_format=image_format,
            quality=args.quality, return_latents=bool(args.latents_out),
            skip_images=args.no_images, request_id=args.request_id, mode=args.mode,
            warmup=args.warmup)
        for event in events:
            if isinstance(event, Accepted):
                mode = (f", async after {event.async_warmup_steps} exact steps"
                        if event.mode == "async" else "")
                bar.message(f"request {event.request_id}: seed {event.seed}, {event.sampler} "
                            f"{event.num_steps} steps, guidance {event.guidance_scale:g}{mode}")
            elif isinstance(event, Progress) and event.waiting_on:
                bar.message(f"waiting on the {event.waiting_on} for "
                            f"{event.waiting_seconds:.0f} s: {event.waiting_reason}")
            elif isinstance(event, Progress):
                bar.update(event.step, event.total, event.elapsed, event.eta)
                _write_previews(args.preview_dir, event)
            elif isinstance(event, Result):
                bar.finish()
                _write_result(args, event, client)
    return 0


class _BarLogHandler(logging.Handler):
    """The SDK's warnings (a stream resuming) as a line of their own above the bar."""

    def __init__(self, bar: ProgressBar):
        super().__init__(logging.WARNING)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.message(f"ditserve generate: {record.getMessage()}")


@contextlib.contextmanager
def _sdk_warnings_on(bar: ProgressBar) -> Iterator[None]:
    sdk = logging.getLogger("ditserve_client")
    handler, propagate = _BarLogHandler(bar), sdk.propagate
    sdk.addHandler(handler)
    sdk.propagate = False
    try:
        yield
    finally:
        sdk.removeHandler(handler)
        sdk.propagate = propagate


def _write_previews(folder: str | None, event: Progress) -> None:
    if not folder or not event.previews:
        return
    path = Path(folder) / f"step_{event.step:04d}.{event.previews[0].extension}"
    if len(event.previews) == 1:
        event.previews[0].save(path)
    else:
        save_grid(event.previews, path)


def _write_result(args: argparse.Namespace, result: Result, client: Client) -> None:
    written = _write_images(args, result.images, client)
    if args.latents_out:
        if result.latents is None:
            raise DitserveError("INTERNAL", "the server returned no latents")
        written.append(str(write_npy(args.latents_out, result.latents)))
    t = result.timings
    print(f"wrote {', '.join(written)} (seed {result.seed}; queued {t.queued:.2f}s, "
          f"denoising {t.denoising:.2f}s, decoding {t.decoding:.2f}s)")


def _write_images(args: argparse.Namespace, images: Sequence[EncodedImage],
                  client: Client) -> list[str]:
    written: list[str] = []
    if not images:
        return written
    if args.out:
        if len(images) == 1:
            images[0].save(args.out)
        else:  # a grid, each image captioned with its class's name
            classes = client.model_info().classes
            save_grid(images, args.out, quality=args.quality or 90,
                      captions=[classes.name(image.label) for image in images])
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
        f"modes     {', '.join(info.modes) or 'exact'}"
        + (f"; async warm-up {info.default_async_warmup_steps} steps by default"
           if "async" in info.modes else ""),
        f"stages    {len(info.stages)}",
    ]
    for s in info.stages:
        health = "SERVING" if s.serving else "NOT SERVING"
        lines.append(f"  stage {s.index}: blocks {s.block_start}..{s.block_end - 1} of "
                     f"{s.depth}  {s.address}  {s.device}  wire {s.wire_dtype}  {health}")
    return "\n".join(lines)


def parse_with_subcommand_errors(parser: argparse.ArgumentParser,
                                 argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown option is reported by the subcommand's parser
    (its usage, and the closest option it has), not the top-level one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub: argparse.ArgumentParser = getattr(args, "parser", parser)
        options = [o for action in sub._actions for o in action.option_strings]
        close = difflib.get_close_matches(extra[0].split("=")[0], options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    """`python -m ditserve_client.cli generate|info ...` (the same as `ditserve ...`)."""
    parser = argparse.ArgumentParser(prog="ditserve-client")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(gen := commands.add_parser("generate", help="generate images"))
    gen.set_defaults(run=run_generate, parser=gen)
    add_info_arguments(info := commands.add_parser("info", help="describe the served model"))
    info.set_defaults(run=run_info, parser=info)
    args = parse_with_subcommand_errors(parser, argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"ditserve {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
