"""A throwaway certificate authority for `ditserve up --tls` (and the tests).

`make_run_pki(run_dir, services)` writes, under RUN_DIR/tls/:

    ca.crt                      the pipeline's CA (clients pass it as --ca)
    coordinator.crt/.key        one certificate per service, signed by the CA, valid as
    decoder.crt/.key            server AND client (mTLS on every internal hop), with the
    stage-0.crt/.key ...        SANs localhost, 127.0.0.1, ::1 and its identity URI
    tokens                      sha256 hash of one random bearer token
    client-token                the token itself (0600), for the user: never printed, so it
                                stays out of terminal logs and the process list

and returns the `SecurityConfig` that points every service at its own files through the
`{service}` placeholder, so one pipeline.yaml serves them all. The CA key is written nowhere:
it lives only in this process and signs the run's certificates once.

`ditserve up --tls` (entrypoints/up.py) wires it in three steps:

    config, pki = secure_local_config(config, run_dir, [args.host])  # before pipeline.yaml
    Supervisor(..., health_credentials=pki.health_credentials())      # mTLS health checks
    print(pki.client_hint(config.coordinator.address))

The certificates are made with the `cryptography` package (no hand-written crypto); the
identity of a service is the URI SAN spiffe://TRUST_DOMAIN/SERVICE, as SPIFFE/Istio name
workloads, which the services check per hop (security/auth.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ditserve.config import PipelineConfig, SecurityConfig
from ditserve.security.tokens import hash_token, new_token

LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")
VALIDITY = datetime.timedelta(days=7)
"""Lifetime of a throwaway run's certificates: long enough for any local run."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, cert_path: Path, key_path: Path | None = None) -> None:
        """Writes the certificate (0644) and, if asked, the key (0600)."""
        cert_path.write_bytes(self.cert_pem)
        if key_path is not None:
            key_path.touch(mode=0o600)
            key_path.write_bytes(self.key_pem)


def identity_uri(service: str, trust_domain: str) -> str:
    """The URI SAN naming `service` (e.g. spiffe://ditserve.local/stage-1)."""
    return f"spiffe://{trust_domain}/{service}"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    return Issued(certificate.public_bytes(serialization.Encoding.PEM),
                  key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()),
                  certificate, key)


def make_ca(common_name: str = "ditserve throwaway CA", not_before: datetime.datetime | None = None,
            not_after: datetime.datetime | None = None) -> Issued:
    """A self-signed CA (P-256, may sign certificates only)."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(_name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
               .not_valid_after(not_after or now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    return _pem(builder.sign(key, hashes.SHA256()), key)


def issue(ca: Issued, common_name: str, dns_names: Sequence[str] = LOCAL_NAMES,
          ips: Sequence[str] = LOCAL_IPS, uris: Sequence[str] = (),
          not_before: datetime.datetime | None = None,
          not_after: datetime.datetime | None = None) -> Issued:
    """A leaf certificate signed by `ca`, usable for TLS server and client authentication."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca.certificate.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
               .not_valid_after(not_after or now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _pem(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class RunPki:
    """What `make_run_pki` made: the settings every service takes, and what a client needs."""

    security: SecurityConfig
    """The pipeline's `security` section ({service} in the certificate paths)."""
    ca_path: Path
    """The CA certificate: clients pass it as --ca."""
    token: str
    """The bearer token of this run (its hash is in `security.tokens`)."""

    token_path: Path
    """The file holding `token` (0600)."""

    def client_hint(self, target: str) -> str:
        """What `ditserve up --tls` prints: how a client connects (the token by its file)."""
        return (f"TLS with a throwaway CA; clients need the CA and the token:\n"
                f"  export DITSERVE_TOKEN=$(cat {self.token_path})\n"
                f"  ditserve generate --target {target} --tls --ca {self.ca_path} --class 0")

    def health_credentials(self) -> grpc.ChannelCredentials:
        """For the launcher's health checks: the CA and the coordinator's certificate (every
        internal port asks for a client certificate; health is open to any of the CA)."""
        folder = self.ca_path.parent
        return grpc.ssl_channel_credentials(
            self.ca_path.read_bytes(), (folder / "coordinator.key").read_bytes(),
            (folder / "coordinator.crt").read_bytes())


def _san_lists(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(DNS names, IPs) for the certificates: loopback plus `hosts` (wildcards skipped)."""
    names, ips = list(LOCAL_NAMES), list(LOCAL_IPS)
    for host in hosts:
        host = host.strip("[]")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            names += [host] if host and host not in names else []
            continue
        if not address.is_unspecified and str(address) not in ips:
            ips.append(str(address))
    return names, ips


def make_run_pki(run_dir: Path, services: Sequence[str], trust_domain: str = "ditserve.local",
                 hosts: Sequence[str] = ()) -> RunPki:
    """A CA, one certificate per service and one token, under RUN_DIR/tls (see the module
    docstring). `hosts`: names or IPs clients dial besides loopback (`up --host`)."""
    folder = Path(run_dir).resolve() / "tls"  # absolute: services may run elsewhere
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca()
    ca.write(folder / "ca.crt")
    names, ips = _san_lists(hosts)
    for service in services:
        issue(ca, service, names, ips, uris=[identity_uri(service, trust_domain)]).write(
            folder / f"{service}.crt", folder / f"{service}.key")
    token = new_token()
    tokens, token_path = folder / "tokens", folder / "client-token"
    for path in (tokens, token_path):
        path.touch(mode=0o600)
    tokens.write_text(f"{hash_token(token)} ditserve-up\n")
    token_path.write_text(token + "\n")
    security = SecurityConfig(
        tls=True, ca=str(folder / "ca.crt"), cert=str(folder / "{service}.crt"),
        key=str(folder / "{service}.key"), tokens=str(tokens), trust_domain=trust_domain)
    return RunPki(security.validate(), folder / "ca.crt", token, token_path)


def service_names(config: PipelineConfig) -> list[str]:
    """The services of a pipeline, by the names their certificates carry."""
    names = ["coordinator", *(f"stage-{k}" for k in range(len(config.stages)))]
    return names + (["decoder"] if config.decoder.address else [])


def secure_local_config(config: PipelineConfig, run_dir: Path, hosts: Sequence[str] = ()
                        ) -> tuple[PipelineConfig, RunPki]:
    """`config` served over TLS/mTLS with a throwaway CA made in RUN_DIR/tls (every other
    field unchanged), and what clients need. `hosts`: extra SANs (`up --host`)."""
    pki = make_run_pki(run_dir, service_names(config), config.security.trust_domain, hosts)
    return dataclasses.replace(config, security=pki.security), pki
