"""TLS material of one service, re-read when it changes, as grpcio credentials.

- `server_credentials`: grpcio's dynamic SSL server credentials. grpc calls the fetcher
  before every new handshake; it `stat`s the three files and, when they have changed,
  returns the new key, chain and CA, so that a rotated certificate (cert-manager renewal, a
  CA roll-over) serves new connections without a restart while established connections and
  their calls carry on.
- `Dialer`: channels to the next hop with mTLS (this service's certificate as client
  certificate). A channel keeps the credentials it was made with, so a client asks
  `changed()` when it reconnects and then dials afresh.

Everything cryptographic is grpc's (BoringSSL); `cryptography` only parses the files to
refuse, with one clear line, a key that does not match its certificate or an expired one.
References: grpc `dynamic_ssl_server_credentials`; Kubernetes Secret volumes (updated by an
atomic symlink swap).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ditserve.common.logs import log_event
from ditserve.config import ConfigError

Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Pem:
    """One version of the files' contents."""

    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class PemFiles:
    """Paths of the CA bundle, this service's certificate chain and its key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, ca: str, cert: str, key: str, service: str) -> PemFiles:
        """The config's paths with "{service}" replaced by the service's name."""
        return cls(*(Path(p.replace("{service}", service)) for p in (ca, cert, key)))

    def stamp(self) -> Stamp:
        """Changes when any file is rewritten or replaced (`stat` follows symlinks)."""
        stats = [os.stat(p) for p in (self.ca, self.cert, self.key)]
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def read(self) -> Pem:
        """The files' contents, checked (ValueError naming the file otherwise)."""
        contents = []
        for what, path in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            try:
                contents.append(path.read_bytes())
            except OSError as error:
                raise ConfigError(f"cannot read the TLS {what} {path}: {error.strerror}") from None
        pem = Pem(*contents)
        check_pem(pem, self)
        return pem


def check_pem(pem: Pem, files: PemFiles) -> None:
    """Refuses what would only fail later, in every handshake: unparsable PEM, a key that is
    not the certificate's, a certificate past its end."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        x509.load_pem_x509_certificates(pem.ca)
    except ValueError:
        raise ConfigError(f"TLS CA {files.ca}: no PEM certificate in it") from None
    try:
        chain = x509.load_pem_x509_certificates(pem.cert)
    except ValueError:
        raise ConfigError(f"TLS certificate {files.cert}: no PEM certificate in it") from None
    try:
        key = load_pem_private_key(pem.key, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"TLS key {files.key}: not an unencrypted PEM private key") from None
    if key.public_key() != chain[0].public_key():
        raise ConfigError(f"TLS key {files.key} does not belong to the certificate {files.cert}")
    if chain[0].not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise ConfigError(f"TLS certificate {files.cert} expired on "
                         f"{chain[0].not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _certificate_configuration(pem: Pem) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)],
                                                     root_certificates=pem.ca)


class _Fetcher:
    """grpc's certificate configuration fetcher: None while the files are unchanged."""

    def __init__(self, files: PemFiles, service: str, stamp: Stamp):
        self.files, self.service, self._stamp = files, service, stamp
        self._failed: Stamp | None = None  # a bad version, logged once

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            before = self.files.stamp()
            if before in (self._stamp, self._failed):
                return None
            pem = self.files.read()
            if self.files.stamp() != before:
                return None  # written while we read: take it at the next handshake
        except (OSError, ValueError) as error:
            # A half-rotated or broken set keeps the current certificate serving.
            if "before" in locals() and self._failed != before:
                self._failed = before
                log_event("tls_reload_failed", level=30, name=self.service,
                          error=getattr(error, "strerror", None) or str(error))
            return None
        self._stamp = before
        log_event("tls_reloaded", name=self.service, cert=str(self.files.cert))
        return _certificate_configuration(pem)


def server_credentials(files: PemFiles, service: str,
                       require_client_certificate: bool) -> grpc.ServerCredentials:
    """Dynamic server credentials from `files` (ValueError now if they are unusable)."""
    try:
        stamp = files.stamp()  # before reading: a change meanwhile is picked up next
    except OSError:
        stamp = ()  # `read` says which file is missing
    pem = files.read()
    return grpc.dynamic_ssl_server_credentials(
        _certificate_configuration(pem), _Fetcher(files, service, stamp),
        require_client_authentication=require_client_certificate)


class Dialer:
    """Opens channels to internal peers: mTLS with `files`, or plaintext when None."""

    def __init__(self, files: PemFiles | None = None):
        self.files = files
        self._stamp: Stamp | None = None

    def channel(self, address: str, options: Sequence[tuple[str, int]]) -> grpc.aio.Channel:
        """A new channel to `address` with the current files."""
        if self.files is None:
            return grpc.aio.insecure_channel(address, options=options)
        self._stamp = self.files.stamp()
        pem = self.files.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert)
        return grpc.aio.secure_channel(address, credentials, options=options)

    def refresh(self, address: str, options: Sequence[tuple[str, int]]
                ) -> grpc.aio.Channel | None:
        """A new channel if the files changed since the last one, else None (also while a
        rotation is half done: the channel we have keeps working)."""
        if self.files is None:
            return None
        try:
            if self.files.stamp() == self._stamp:
                return None
            channel = self.channel(address, options)
        except (OSError, ValueError) as error:
            log_event("tls_reload_failed", level=30, peer=address,
                      error=getattr(error, "strerror", None) or str(error))
            return None
        log_event("tls_reloaded", peer=address, cert=str(self.files.cert))
        return channel
