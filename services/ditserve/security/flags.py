"""Command-line flags of the service commands (stage, coordinator, decoder): they override
the pipeline config's `security` section, field by field."""

from __future__ import annotations

import argparse
import dataclasses

from ditserve.common.status import CommandError
from ditserve.config import SecurityConfig


def add_arguments(parser: argparse.ArgumentParser, public: bool = False) -> None:
    """The security flags; `public` adds --tokens (the coordinator's public API)."""
    group = parser.add_argument_group("security (override the config's security section)")
    group.add_argument("--tls-ca", metavar="FILE",
                       help="PEM CA of the pipeline; with --tls-cert and --tls-key: TLS on this "
                            "port, mTLS on internal hops")
    group.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain of this service")
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    if public:
        group.add_argument("--tokens", metavar="FILE",
                           help="sha256 hashes of the admitted bearer tokens (`ditserve token`)")
    group.add_argument("--health-listen", metavar="HOST:PORT",
                       help="also answer grpc.health.v1 (only) in plaintext here, for probes")
    group.add_argument("--insecure-plaintext", action="store_true",
                       help="allow plaintext on a non-loopback address (logged as a warning)")


def security_from(args: argparse.Namespace, section: SecurityConfig) -> SecurityConfig:
    """The config's section with the flags given applied."""
    files = (args.tls_ca, args.tls_cert, args.tls_key)
    changes: dict[str, object] = {}
    if any(files):
        if not all(files):
            raise CommandError("--tls-ca, --tls-cert and --tls-key go together")
        changes.update(tls=True, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    if getattr(args, "tokens", None):
        changes["tokens"] = args.tokens
    if args.health_listen:
        changes["health_listen"] = args.health_listen
    if args.insecure_plaintext:
        changes["allow_plaintext_off_loopback"] = True
    return dataclasses.replace(section, **changes).validate()
