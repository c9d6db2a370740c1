"""`ditserve bench`: reproducible benchmarks, written as JSON and a Markdown table.

    ditserve bench distribution                 # per-step latency, monolith vs 2/4 stages
    ditserve bench throughput --quick           # tiny sizes, seconds: a smoke test
    ditserve bench peer --set clients=1,16 --out-dir results/

    ditserve bench latency                      # one request: exact vs async mode
    ditserve bench latency --set quality=true   # async's quality table on the demo model

Scenarios: distribution, throughput, load, peer, wire, transport, memory, gpu, forward,
gateway, tls, soak, bursts, latency (ditserve.bench).
`--set FIELD=VALUE` overrides any field of the scenario's Settings (lists comma-separated).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import typing

from ditserve.common.status import CommandError

HELP = "Run a benchmark scenario; write <scenario>.json and <scenario>.md."

SCENARIOS = ("distribution", "throughput", "load", "peer", "wire", "transport", "memory",
             "gpu", "forward", "gateway", "tls", "soak", "bursts", "latency")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", choices=SCENARIOS, help="what to measure")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and few repetitions (a smoke test, not figures)")
    parser.add_argument("--out-dir", default="bench-results", help="folder for JSON and Markdown")
    parser.add_argument("--models", help="comma-separated DiT configs, e.g. DiT-S/2,DiT-B/2")
    parser.add_argument("--latent-size", type=int, help="latent side (image side / 8)")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Settings field of the scenario (repeatable)")


def run(args: argparse.Namespace) -> int:
    from ditserve.bench.report import markdown, write

    module = importlib.import_module(f"ditserve.bench.{args.scenario}")
    settings = module.Settings.quick() if args.quick else module.Settings()
    for key, value in _overrides(args).items():
        settings = _apply(settings, key, value)
    report = module.run(settings)
    command = _command(args)
    json_path, md_path = write(report, args.out_dir, command)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (for the report)."""
    words = ["ditserve", "bench", args.scenario] + (["--quick"] if args.quick else [])
    for flag, value in (("--models", args.models), ("--latent-size", args.latent_size),
                        ("--device", args.device)):
        if value is not None:
            words += [flag, str(value)]
    for item in args.set:
        words += ["--set", item]
    return " ".join(shlex.quote(w) for w in [*words, "--out-dir", args.out_dir])


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    if args.models:
        out["models"] = args.models
    if args.latent_size is not None:
        out["latent_size"] = str(args.latent_size)
    if args.device:
        out["device"] = args.device
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--set {item!r}: expected FIELD=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _apply(settings: typing.Any, key: str, value: str) -> typing.Any:
    """settings with field `key` parsed from `value` by the field's type."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    if key == "models" and "model" in fields:  # a one-model scenario
        if "," in value:
            raise CommandError(f"this scenario measures one model; got --models {value}")
        key = "model"
    if key not in fields:
        raise CommandError(f"{type(settings).__module__.rsplit('.', 1)[-1]} has no setting "
                           f"{key!r}; known: {', '.join(fields)}")
    current = getattr(settings, key)
    try:
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            parsed: typing.Any = tuple(kind(v) for v in value.split(",") if v)
        elif isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes")
        else:
            parsed = type(current)(value)
    except ValueError:
        raise CommandError(f"setting {key}: cannot read {value!r} as {type(current).__name__}") from None
    return dataclasses.replace(settings, **{key: parsed})
