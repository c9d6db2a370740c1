"""`ditserve up`: the whole pipeline on this machine, one process per service.

    # Check:    server extras installed; checkpoint, stage count, VAE and ports usable
    # Run dir:  LOG_DIR/RUN (this run's pipeline.yaml and one log per service)
    # Start:    stages and decoder together, then the coordinator, each waited healthy
    # Serve:    restart what dies, until SIGINT/SIGTERM; then stop everything
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from ditserve.common.status import CommandError
from ditserve.config import WireDtype

if TYPE_CHECKING:
    from ditserve.common.process import ServiceFailed
    from ditserve.config import PipelineConfig
    from ditserve.launcher.pki import RunPki
    from ditserve.launcher.plan import ServiceSpec
    from ditserve.launcher.supervisor import LivenessProbe

HELP = "start every service (stages, decoder, coordinator) as its own process on loopback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML (the same file as the k8s ConfigMap); "
                                         "its addresses are moved to --host")
    parser.add_argument("--checkpoint", default="",
                        help="DiT checkpoint; default: the embedded demo model")
    parser.add_argument("--stages", type=int, default=2, help="number of stages (default 2)")
    parser.add_argument("--vae", default="", help="diffusers AutoencoderKL folder; default: "
                                                  "the embedded demo VAE")
    parser.add_argument("--no-decoder", action="store_true", help="serve latents only")
    parser.add_argument("--wire-dtype", default="bf16", choices=get_args(WireDtype),
                        help="activation dtype between stages (default bf16)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface every service binds (default 127.0.0.1: loopback only; "
                             "the services have no authentication)")
    parser.add_argument("--port", type=int, default=50050,
                        help="coordinator port; the decoder and stages take the next ones")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus /metrics of the coordinator on this port, the decoder "
                             "and stages on the next ones (same offsets as --port)")
    parser.add_argument("--tls", action="store_true",
                        help="serve every port over TLS and every internal hop over mTLS, with a "
                             "throwaway CA made in the run folder; prints what clients need")
    parser.add_argument("--insecure-plaintext", action="store_true",
                        help="allow plaintext without authentication on a --host that is not "
                             "loopback (otherwise refused: use --tls)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also start the HTTP/JSON gateway and its web page on this port "
                             "(same host as the coordinator; default: none)")
    parser.add_argument("--log-dir", default=".ditserve-logs",
                        help="each run gets its own folder in LOG_DIR with its pipeline.yaml "
                             "and one NAME.log per service")
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds the services may take to become healthy")
    parser.add_argument("--probe-period", type=float, default=2.0, metavar="S",
                        help="seconds between liveness probes of each running service: its "
                             "health check, with a timeout of half the period up to 1 s "
                             "(default 2)")
    parser.add_argument("--probe-failures", type=int, default=3, metavar="N",
                        help="unanswered probes in a row after which a service is killed and "
                             "restarted (default 3; 0: never)")


def _config(args: argparse.Namespace) -> PipelineConfig:
    from ditserve.config import load_config, local_config
    from ditserve.launcher.plan import localize

    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if port is not None and not 1 <= port <= 65535 - 64:
            raise CommandError(f"{flag} must be between 1 and {65535 - 64}, got {port}")
    if args.http_port is not None and not 1 <= args.http_port <= 65535:
        raise CommandError(f"--http-port must be between 1 and 65535, got {args.http_port}")
    if args.config:
        config = load_config(args.config)
    else:
        if args.stages < 1:
            raise CommandError(f"--stages must be at least 1, got {args.stages}")
        config = local_config(args.stages, args.port, args.checkpoint, args.wire_dtype, args.vae)
    config = localize(config, args.port, args.host)
    if args.no_decoder:
        config.decoder.address = ""
    return config


def _liveness(args: argparse.Namespace) -> LivenessProbe | None:
    from ditserve.launcher.supervisor import LivenessProbe

    if args.probe_failures < 0 or args.probe_period <= 0:
        raise CommandError("--probe-period must be > 0 and --probe-failures >= 0")
    if args.probe_failures == 0:
        return None
    return LivenessProbe(args.probe_period, min(1.0, args.probe_period / 2),
                         args.probe_failures)


def _run_dir(log_dir: str, port: int) -> Path:
    """A folder of this run's own (the pid makes it unique): two runs from one folder never
    share a config or logs."""
    import os
    import time

    return Path(log_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-port{port}-pid{os.getpid()}"


def _write_config(config: PipelineConfig, run_dir: Path) -> None:
    import dataclasses

    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)  # --tls has made its tls/ already
    path = run_dir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def _report_failure(failure: ServiceFailed) -> None:
    """One line naming the service and the cause, then the end of its log."""
    print(f"ditserve up: {failure}", file=sys.stderr)
    print(f"  last lines of {failure.log_path}:", file=sys.stderr)
    for line in failure.log_tail:
        print(f"    {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ditserve.launcher.preflight import check_server_install

    check_server_install()  # before importing anything that needs the server extras

    import logging

    from ditserve.common.lifecycle import exit_process

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    liveness = _liveness(args)
    config, specs, run_dir, pki = _prepare(args)
    code = _serve(config, specs, run_dir, args.start_timeout, pki, liveness)
    exit_process(code)  # the health checks' gRPC teardown would delay the exit by ~2 s


def _prepare(args: argparse.Namespace) -> tuple[PipelineConfig, list[ServiceSpec], Path,
                                                RunPki | None]:
    """Checks everything before starting anything; writes the run's folder and config
    (and, with --tls, its throwaway CA and certificates)."""
    import dataclasses
    import logging

    from ditserve.launcher import preflight
    from ditserve.launcher.plan import plan

    config = _config(args)
    off_loopback = args.host not in ("127.0.0.1", "::1", "localhost")
    if off_loopback and not (args.tls or args.insecure_plaintext):
        raise CommandError(f"--host {args.host} is not loopback: serve with --tls, or pass "
                           "--insecure-plaintext to serve plaintext without authentication")
    preflight.check_model(config)
    preflight.check_vae(config)
    run_dir = _run_dir(args.log_dir, args.port)
    pki = None
    if args.tls:
        from ditserve.launcher.pki import secure_local_config

        config, pki = secure_local_config(config, run_dir, [args.host])
    elif off_loopback:
        security = dataclasses.replace(config.security, allow_plaintext_off_loopback=True)
        config = dataclasses.replace(config, security=security)
        logging.getLogger("ditserve.up").warning(
            "serving on %s: plaintext gRPC without authentication, reachable from other "
            "hosts (--insecure-plaintext; the default, 127.0.0.1, is loopback only)", args.host)
    specs = plan(config, run_dir / "pipeline.yaml", args.metrics_port, args.http_port,
                 gateway_ca=pki.ca_path if pki else None)
    _check_distinct_ports(specs)
    preflight.check_ports(specs)
    _write_config(config, run_dir)
    return config, specs, run_dir, pki


def _serve(config: PipelineConfig, specs: list[ServiceSpec], run_dir: Path,
           start_timeout: float, pki: RunPki | None = None,
           liveness: LivenessProbe | None = None) -> int:
    """Starts the services, restarts what dies until SIGINT/SIGTERM, stops them all; the
    exit status (2: a service could not start)."""
    import signal

    from ditserve.common.process import Interrupted, ServiceFailed
    from ditserve.launcher.supervisor import Supervisor

    supervisor = Supervisor(specs, run_dir, start_timeout,
                            health_credentials=pki.health_credentials() if pki else None,
                            liveness=liveness)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also while starting: stop promptly
        signal.signal(sig, lambda *_: supervisor.stop_requested.set())
    try:
        print(f"ditserve up: logs in {run_dir}", flush=True)
        supervisor.start_all()
        _print_ready(config, specs)
        if pki is not None:
            print(pki.client_hint(config.coordinator.address), flush=True)
        supervisor.run_until_stopped()
    except ServiceFailed as failure:
        _report_failure(failure)
        return 2
    except Interrupted:
        pass
    finally:
        supervisor.stop_all()
    return 0


def _check_distinct_ports(specs: list[ServiceSpec]) -> None:
    """No two services (or metrics endpoints) are planned on one port: --http-port and
    --metrics-port must stay clear of --port's block."""
    taken: dict[int, str] = {}
    for spec in specs:
        ports = [(int(spec.listen.rpartition(":")[2]), spec.name)]
        if spec.metrics_port:
            ports.append((spec.metrics_port, f"{spec.name}'s metrics"))
        for port, what in ports:
            if port in taken:
                raise CommandError(f"port {port} is planned twice: {taken[port]} and {what} "
                                   "(choose --port, --metrics-port and --http-port apart)")
            taken[port] = what


def _print_ready(config: PipelineConfig, specs: list[ServiceSpec]) -> None:
    if any(spec.metrics_port for spec in specs):
        print("ditserve up: metrics " + ", ".join(
            f"{spec.name} {spec.metrics_url()}" for spec in specs if spec.metrics_port),
            flush=True)
    for spec in specs:
        if spec.health == "http":
            print(f"ditserve up: web page and HTTP API at http://{spec.address}/", flush=True)
    print(f"ditserve up: coordinator at {config.coordinator.address} "
          f"({len(config.stages)} stages{', decoder' if config.decoder.address else ''}); "
          "Ctrl-C stops", flush=True)
