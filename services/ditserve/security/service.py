"""One service's security: how its server is bound, who may call it, how it dials its peers.

    security = ServiceSecurity.internal(config.security, "stage-1", callers=["stage-0"])
    lifecycle = ServiceLifecycle("stage-1", listen, services, security=security)
    next_hop = StageClient(address, dialer=security.dialer())

- TLS (`security.tls`): every server is bound with grpcio's dynamic SSL credentials. The
  public API (coordinator) asks for no client certificate and checks bearer tokens; the
  internal services (stages, decoder) require a client certificate of the pipeline's CA and,
  with `verify_peer_identity`, the SPIFFE ID of the service before them.
- Plaintext: allowed on loopback; elsewhere only with `allow_plaintext_off_loopback`, and
  then with a warning in the log.
- `health_listen`: a second, plaintext server answering only grpc.health.v1, sharing the
  main server's health statuses, for probes that cannot speak TLS. It exposes SERVING or
  not and nothing else: no model, no chain, no reflection.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from ditserve.common.grpc_options import server_options
from ditserve.common.logs import log_event
from ditserve.config import ConfigError, SecurityConfig

from .auth import AuthInterceptor, bearer_check, identity_check
from .tls import Dialer, PemFiles, server_credentials
from .tokens import TokenFile

HEALTH_MAX_CALLS = 32
"""Concurrent calls the plaintext health-only port serves (beyond: RESOURCE_EXHAUSTED)."""


def is_loopback(address: str) -> bool:
    """Whether a host:port binds loopback only ('[::]', '0.0.0.0' and names other than
    localhost do not)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServiceSecurity:
    """The pipeline's `security` section as one service applies it."""

    config: SecurityConfig
    """The pipeline's section."""
    service: str
    """This service's name: coordinator, decoder or stage-K."""
    callers: tuple[str, ...] = ()
    """Services that may call this one (internal services); empty on the public API."""
    public: bool = False
    """The public API: server-only TLS and bearer tokens instead of mTLS."""

    PLAINTEXT: ClassVar[SecurityConfig] = SecurityConfig()
    """The default section: plaintext, on loopback only."""

    @classmethod
    def public_api(cls, config: SecurityConfig, service: str = "coordinator") -> ServiceSecurity:
        return cls(config.validate(), service, public=True)

    @classmethod
    def internal(cls, config: SecurityConfig, service: str,
                 callers: Sequence[str]) -> ServiceSecurity:
        return cls(config.validate(), service, tuple(callers))

    def files(self) -> PemFiles:
        c = self.config
        return PemFiles.of(c.ca, c.cert, c.key, self.service)

    def identity(self, service: str) -> str:
        return f"spiffe://{self.config.trust_domain}/{service}"

    def preflight(self) -> None:
        """Reads the TLS files and the tokens file once: ValueError now if unusable."""
        if self.config.tls:
            self.files().read()
        if self.public and self.config.tokens:
            TokenFile(self.config.tokens)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The call checks of this service (the tokens file is read now: errors early)."""
        if self.public and self.config.tokens:
            return [AuthInterceptor(self.service, bearer_check(TokenFile(self.config.tokens)))]
        if not self.public and self.config.tls and self.config.verify_peer_identity:
            allowed = [self.identity(c) for c in self.callers]
            return [AuthInterceptor(self.service, identity_check(self.service, allowed))]
        return []

    def bind(self, server: grpc.aio.Server, listen: str) -> int:
        """Adds the listening port: TLS, or plaintext where that is allowed."""
        if self.config.tls:
            if self.public and not self.config.tokens:
                log_event("no_tokens", level=logging.WARNING, name=self.service,
                          message="TLS without security.tokens: any client may call")
            credentials = server_credentials(self.files(), self.service,
                                             require_client_certificate=not self.public)
            return server.add_secure_port(listen, credentials)
        if not is_loopback(listen):
            if not self.config.allow_plaintext_off_loopback:
                raise ConfigError(
                    f"refusing to serve {self.service} in plaintext on {listen}, which is "
                    "not loopback; configure security.tls, or allow it explicitly "
                    "(security.allow_plaintext_off_loopback, --insecure-plaintext)")
            log_event("plaintext_off_loopback", level=logging.WARNING, name=self.service,
                      address=listen, message="no TLS, no peer authentication on this port")
        return server.add_insecure_port(listen)

    async def serve_health(self, health: health_pb2_grpc.HealthServicer) -> grpc.aio.Server | None:
        """The plaintext health-only server on `health_listen`, started; None without one."""
        if not self.config.health_listen:
            return None
        # Small messages and few calls: a probe sends one tiny Check at a time, and an
        # unauthenticated port must not hold many Watch streams open.
        server = grpc.aio.server(options=server_options(64 * 1024),
                                 maximum_concurrent_rpcs=HEALTH_MAX_CALLS)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        try:
            port = server.add_insecure_port(self.config.health_listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(f"{self.service} cannot serve health on "
                             f"{self.config.health_listen} (port taken or address not here)")
        await server.start()
        log_event("health_listening", name=self.service, address=self.config.health_listen,
                  port=port)
        return server

    def dialer(self) -> Dialer:
        """Channels to this service's peers: mTLS with its certificate under TLS."""
        return Dialer(self.files() if self.config.tls else None)


