"""Helpers of the security tests: real certificates (made here with `cryptography`),
in-process ditserve servers under the shared lifecycle, and atomic file rotation."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from ditserve.common.lifecycle import ServiceLifecycle
from ditserve.config import SecurityConfig
from ditserve.launcher.pki import Issued, identity_uri, issue, make_ca
from ditserve.security.service import ServiceSecurity
from grpc_health.v1 import health_pb2, health_pb2_grpc

TRUST_DOMAIN = "ditserve.local"


def replace_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` as a Kubernetes Secret update does: all at once."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@dataclass
class Pki:
    """A CA and the certificates issued under it, as files in `folder`."""

    folder: Path
    ca: Issued = field(default_factory=make_ca)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ca.write(self.ca_path)

    @property
    def ca_path(self) -> Path:
        return self.folder / "ca.crt"

    def leaf(self, name: str, file_stem: str | None = None, **options) -> tuple[Path, Path]:
        """A certificate for service `name` (its SPIFFE ID as URI SAN): (cert, key) paths."""
        options.setdefault("uris", [identity_uri(name, TRUST_DOMAIN)])
        issued = issue(self.ca, name, **options)
        stem = self.folder / (file_stem or name)
        cert, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        issued.write(cert, key)
        return cert, key

    def expired_leaf(self, name: str) -> tuple[Path, Path]:
        now = datetime.datetime.now(datetime.UTC)
        return self.leaf(name, f"{name}-expired", not_before=now - datetime.timedelta(days=2),
                         not_after=now - datetime.timedelta(days=1))

    def security(self, service: str, **changes) -> SecurityConfig:
        """TLS settings with `service`'s certificate (made on first use)."""
        if not (self.folder / f"{service}.crt").exists():
            self.leaf(service)
        return SecurityConfig(tls=True, ca=str(self.ca_path), cert=str(self.folder / "{service}.crt"),
                              key=str(self.folder / "{service}.key"), trust_domain=TRUST_DOMAIN,
                              **changes).validate()

    def client_credentials(self, name: str | None = None, ca: Path | None = None
                           ) -> grpc.ChannelCredentials:
        """Channel credentials trusting `ca` (default this CA), presenting `name`'s
        certificate when given."""
        root = (ca or self.ca_path).read_bytes()
        if name is None:
            return grpc.ssl_channel_credentials(root)
        cert, key = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        return grpc.ssl_channel_credentials(root, key.read_bytes(), cert.read_bytes())


@contextlib.asynccontextmanager
async def serving(security: ServiceSecurity, register: Callable[[grpc.aio.Server], None],
                  services: tuple[str, ...] = ()) -> AsyncIterator[ServiceLifecycle]:
    """A ditserve server on a free loopback port, SERVING, stopped at the end; its port is
    `lifecycle.port`."""
    lifecycle = ServiceLifecycle(security.service, "127.0.0.1:0", services, grace=0.5,
                                 security=security)
    register(lifecycle.server)
    lifecycle.port = await lifecycle.start()
    await lifecycle.set_serving()
    try:
        yield lifecycle
    finally:
        await lifecycle.shutdown()


OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
"""Channel option: a connection of its own (grpc otherwise shares one between channels of
equal settings, and a new handshake would not happen)."""


async def health(target: str, credentials: grpc.ChannelCredentials | None,
                 timeout: float = 10.0) -> int:
    """The health status at `target`, over a new connection (raises grpc.RpcError)."""
    channel = (grpc.aio.secure_channel(target, credentials, OWN_CONNECTION) if credentials
               else grpc.aio.insecure_channel(target, OWN_CONNECTION))
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout)
    return reply.status


async def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code an awaitable call ends with (OK if it succeeds)."""
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def run(coroutine) -> object:
    return asyncio.run(coroutine)
