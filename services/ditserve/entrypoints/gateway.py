"""`ditserve gateway`: HTTP/JSON and the live web page in front of a coordinator.

    ditserve gateway --target 127.0.0.1:50050 --listen 127.0.0.1:8080
    ditserve gateway --target ditserve-coordinator:50051 --listen 0.0.0.0:8080 \
        --tokens-file /etc/ditserve-gateway/tokens --cors-origin https://app.example.com

Needs the gateway extra (`pip install 'ditserve[gateway]'`), not torch.
"""

from __future__ import annotations

import argparse

HELP = "serve HTTP/JSON (with Server-Sent Events) and the live web page in front of a coordinator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="coordinator host:port (gRPC)")
    parser.add_argument("--listen", default="127.0.0.1:8080",
                        help="host:port of the HTTP server (default 127.0.0.1:8080; port 0: "
                             "any free port, printed at start)")
    parser.add_argument("--tokens-file", default="",
                        help="accepted bearer tokens as sha256 hex digests, one a line "
                             "(printf %%s TOKEN | sha256sum); needed off loopback")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve without tokens on a non-loopback address")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="origin whose pages may call the API (repeatable; '*' for any)")
    parser.add_argument("--tls", action="store_true", help="dial the coordinator over TLS")
    parser.add_argument("--ca-file", help="PEM roots of the coordinator's certificate")
    parser.add_argument("--timeout", type=float, help="deadline in seconds of each gRPC call")
    parser.add_argument("--retries", type=int, default=2,
                        help="retries of a call that fails UNAVAILABLE (default 2)")
    parser.add_argument("--heartbeat", type=float, default=15.0,
                        help="seconds between SSE comment lines while a request waits "
                             "(default 15)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds open requests get to finish on SIGTERM (default 5)")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"),
                        help="the gateway's and uvicorn's log level (default info)")


def run(args: argparse.Namespace) -> int:
    from ditserve.cli import CommandError

    try:
        from ditserve.gateway.server import serve
    except ModuleNotFoundError as missing:
        raise CommandError(f"needs the gateway extra (pip install 'ditserve[gateway]'): "
                           f"no module {missing.name}") from None
    from ditserve_client.channel import read_certificates

    from ditserve.gateway.config import GatewayConfig

    config = GatewayConfig(
        target=args.target, listen=args.listen, tokens_file=args.tokens_file,
        allow_unauthenticated=args.allow_unauthenticated,
        cors_origins=tuple(args.cors_origin), tls=args.tls or bool(args.ca_file),
        root_certificates=read_certificates(args.ca_file), timeout=args.timeout,
        retries=args.retries, heartbeat=args.heartbeat, grace=args.grace)
    try:
        return serve(config, args.log_level)
    except OSError as error:  # the port is taken, or not ours to bind
        raise CommandError(str(error)) from None
