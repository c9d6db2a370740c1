"""k8s/overlays/mtls: cert-manager objects valid against the vendored CRDs, and wired to the
pipeline config: one CA Issuer, one Certificate per service naming what its peers dial and
check, each pod mounting its own Secret read-only where `security` looks, tokens in the
coordinator only, probes on the health-only port that no NetworkPolicy admits.

The generic checks (strict core/v1 validation, probes on container ports, network policy,
ConfigMap = pipeline.yaml) run on this variant too, in test_manifests.py.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml
from ditserve.security.tokens import parse_tokens

from .test_manifests import K8S, Doc, _strict, containers, host_port, of_kind, pipeline, render

CERT_MANAGER = "cert-manager.io/v1"
HEALTH_PORT = 50052


@functools.cache
def crd_schema(kind: str) -> Doc:
    crd = yaml.safe_load((K8S / f"crds/cert-manager.io_{kind.lower()}s.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def docs() -> tuple[Doc, ...]:
    return render("mtls")


@pytest.fixture
def config(docs, tmp_path):
    return pipeline(docs, tmp_path)


def test_cert_manager_objects_match_the_vendored_crds(docs):
    objects = [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    assert {d["kind"] for d in objects} == {"Issuer", "Certificate"}
    for obj in objects:
        assert obj["apiVersion"] == CERT_MANAGER
        jsonschema.validate(obj, crd_schema(obj["kind"]))
    typo = copy.deepcopy(of_kind(docs, "Certificate")[0])
    typo["spec"]["dnsName"] = typo["spec"].pop("dnsNames")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, crd_schema("Certificate"))


def _certificates(docs) -> dict[str, Doc]:
    return {c["spec"]["secretName"]: c for c in of_kind(docs, "Certificate")}


def test_one_ca_issuer_signs_every_service_certificate(docs):
    ca_issuers = [i for i in of_kind(docs, "Issuer") if "ca" in i["spec"]]
    assert len(ca_issuers) == 1
    (ca,) = [c for c in of_kind(docs, "Certificate") if c["spec"].get("isCA")]
    assert ca_issuers[0]["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    leaves = [c for c in of_kind(docs, "Certificate") if not c["spec"].get("isCA")]
    assert leaves and all(c["spec"]["issuerRef"]["name"] == ca_issuers[0]["metadata"]["name"]
                          for c in leaves)
    for leaf in leaves:
        assert {"server auth", "client auth"} <= set(leaf["spec"]["usages"])
        assert leaf["spec"]["privateKey"]["rotationPolicy"] == "Always"


def _mounted_secret(workload, container, mount_dir: PurePosixPath) -> str:
    (mount,) = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == mount_dir]
    assert mount.get("readOnly") is True and "subPath" not in mount  # renewals reach the pod
    (volume,) = [v for v in workload.spec["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]["secretName"]


def _address_of(config, role: str) -> str:
    if role.startswith("stage-"):
        return config.stages[int(role[6:])].address
    return getattr(config, role).address


def test_each_pod_mounts_its_own_certificate_where_the_config_looks(docs, config):
    security = config.security
    assert security.tls and security.verify_peer_identity
    tls_dir = PurePosixPath(security.cert).parent
    assert {PurePosixPath(p).parent for p in (security.ca, security.key)} == {tls_dir}
    certificates, seen = _certificates(docs), set()
    for workload, container in _grpc_containers(docs):
        certificate = certificates[_mounted_secret(workload, container, tls_dir)]
        host, _ = host_port(_address_of(config, workload.role))
        # Its peers dial the Service name (verified against the DNS SANs) and check the
        # SPIFFE ID (the URI SAN) of the role it plays.
        assert host in certificate["spec"]["dnsNames"], workload.name
        assert certificate["spec"]["uris"] == [
            f"spiffe://{security.trust_domain}/{workload.role}"], workload.name
        seen.add(certificate["metadata"]["name"])
    assert len(seen) == len(_grpc_containers(docs)) == 4


def test_the_gateway_dials_the_coordinator_over_tls_trusting_the_pipeline_ca(docs, config):
    ((workload, container),) = [(w, c) for w, c in containers(docs) if w.role == "gateway"]
    args = container["args"]
    assert "--tls" in args
    ca_file = PurePosixPath(args[args.index("--ca-file") + 1])
    secret = _mounted_secret(workload, container, ca_file.parent)
    assert ca_file.name == "ca.crt" and secret in _certificates(docs)
    assert args[args.index("--target") + 1] == config.coordinator.address


def _grpc_containers(docs):
    """The pipeline's gRPC services (the HTTP gateway is a client of the public API)."""
    return [(w, c) for w, c in containers(docs) if w.role != "gateway"]


def test_tokens_reach_the_coordinator_only_and_admit_nobody_by_default(docs, config):
    tokens_dir = PurePosixPath(config.security.tokens).parent
    (secret,) = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "ditserve-tokens"]
    for workload, container in containers(docs):
        mounts = {PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]}
        assert (tokens_dir in mounts) == (workload.role == "coordinator"), workload.name
        if workload.role == "coordinator":
            assert _mounted_secret(workload, container, tokens_dir) == "ditserve-tokens"
    import base64

    text = base64.b64decode(secret["data"][PurePosixPath(config.security.tokens).name]).decode()
    assert parse_tokens(text, "tokens") == []
    assert text == (K8S / "overlays/mtls/tokens").read_text()


def test_probes_use_the_health_port_which_no_policy_admits(docs, config):
    assert host_port(config.security.health_listen)[1] == HEALTH_PORT
    for workload, container in _grpc_containers(docs):
        assert HEALTH_PORT in {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == HEALTH_PORT, (workload.name, probe)
    for policy in of_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert HEALTH_PORT not in {p["port"] for p in rule.get("ports", [])}


def test_no_service_claims_cleartext_http2(docs):
    for service in of_kind(docs, "Service"):
        for port in service["spec"]["ports"]:
            assert port.get("appProtocol") != "kubernetes.io/h2c", service["metadata"]["name"]


def test_plaintext_variants_say_so(tmp_path):
    for variant in ("base", "gpu-4stage", "lws", "cpu-demo"):
        text = Path(K8S / ("base" if variant == "base" else f"overlays/{variant}")
                    / "pipeline.yaml").read_text()
        assert yaml.safe_load(text)["security"] == {"allow_plaintext_off_loopback": True}
