"""k8s/overlays/colocated: one pod per pipeline replica, one container and one GPU per stage.

Rendered with `kubectl kustomize` and validated strictly offline as test_manifests.py does
(`kubernetes-validate --strict`, Kubernetes 1.32); then what a schema cannot check: every
stage of the config is a container of the one pod with its own GPU (limits only), listening
on the port its config address names on loopback; the pod's /dev/shm is a bounded
memory-backed emptyDir mounted in every stage container (containers of a pod share its IPC
namespace, so shared memory and CUDA IPC handles cross containers); nothing outside the pod
reaches a stage port; the ConfigMap is byte for byte pipeline.yaml, whose stages tile the
model and leave `transport` at auto.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess

import pytest
import yaml
from ditserve.chain.remote import INPUT_SLOT_BYTES
from ditserve.config import PipelineConfig, load_config
from ditserve.model.configs import dit_config
from ditserve.model.partition import parse_block_range
from ditserve.wire.shm import DEFAULT_SLOTS

from .test_manifests import (
    GPU,
    K8S,
    Doc,
    _kubernetes_validate,
    host_port,
    named,
    of_kind,
    pipeline_text,
    selects,
)

OVERLAY = K8S / "overlays/colocated"


@functools.cache
def docs() -> tuple[Doc, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAY)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


@pytest.fixture(scope="module")
def config() -> PipelineConfig:
    return load_config(OVERLAY / "pipeline.yaml")


def pod() -> Doc:
    (deployment,) = of_kind(docs(), "Deployment")
    return deployment["spec"]["template"]


def container(name: str) -> Doc:
    (found,) = [c for c in pod()["spec"]["containers"] if c["name"] == name]
    return found


def test_it_validates_strictly_offline(tmp_path):
    path = tmp_path / "colocated.yaml"
    path.write_text(yaml.safe_dump_all(list(docs())))
    result = _kubernetes_validate([path])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configmap_is_pipeline_yaml_and_its_stages_tile_the_model(config):
    assert pipeline_text(docs()) == (OVERLAY / "pipeline.yaml").read_text()
    depth, end = dit_config(config.model.name).depth, 0
    for stage in config.stages:
        start, stop = parse_block_range(stage.blocks, depth)
        assert start == end and stage.device == "cuda"
        end = stop
    assert end == depth
    if "transport" in {f.name for f in dataclasses.fields(PipelineConfig)}:
        assert config.transport == "auto"  # co-located hops: shared memory / CUDA IPC


def test_one_container_per_stage_each_with_its_own_gpu(config):
    names = [c["name"] for c in pod()["spec"]["containers"]]
    assert names == ["coordinator", "decoder", *(f"stage-{k}" for k in range(len(config.stages)))]
    for k, stage in enumerate(config.stages):
        c = container(f"stage-{k}")
        assert c["args"][:5] == ["stage", "--config", "/etc/ditserve/pipeline.yaml", "--stage",
                                 str(k)]
        assert c["resources"]["limits"][GPU] == 1 and GPU not in c["resources"]["requests"]
        host, port = host_port(stage.address)
        assert host == "127.0.0.1"  # the next hop is in the same pod
        assert {p["containerPort"] for p in c["ports"]} >= {port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port
        assert stage.listen_address() == f"[::]:{port}"  # the kubelet probes the pod's IP
    assert container("coordinator")["resources"]["limits"].get(GPU) is None
    assert sum(int(c["resources"]["limits"].get(GPU, 0)) for c in pod()["spec"]["containers"]) \
        == len(config.stages) + 1  # + the decoder's


def test_ports_are_distinct_across_the_pods_containers():
    ports = [p["containerPort"] for c in pod()["spec"]["containers"] for p in c["ports"]]
    names = [p["name"] for c in pod()["spec"]["containers"] for p in c["ports"]]
    assert len(ports) == len(set(ports)) and len(names) == len(set(names))


def test_stages_share_a_bounded_memory_backed_dev_shm(config):
    spec = pod()["spec"]
    assert not spec.get("hostIPC")  # the pod's own IPC namespace, shared by its containers
    (shm,) = [v for v in spec["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    for name in ["coordinator", *(f"stage-{k}" for k in range(len(config.stages)))]:
        mounts = {m["mountPath"]: m["name"] for m in container(name)["volumeMounts"]}
        assert mounts["/dev/shm"] == "shm", name  # one /dev/shm: the probe passes


def test_containers_run_as_non_root_with_requests():
    spec = pod()["spec"]
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        ctx = c["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0
        assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}


def test_clients_reach_the_coordinators_and_nothing_else_reaches_the_pod(config):
    labels = pod()["metadata"]["labels"]
    service = named(docs(), "Service", host_port(config.coordinator.address)[0])
    assert selects(service["spec"]["selector"], labels)
    assert host_port(config.decoder.address)[0] == "127.0.0.1"
    open_ports, scraped = set(), set()
    for policy in of_kind(docs(), "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            for p in rule["ports"]:
                ports = set(range(p["port"], p.get("endPort", p["port"]) + 1))
                if "from" not in rule:
                    open_ports |= ports
                else:
                    assert all("namespaceSelector" in peer for peer in rule["from"])
                    scraped |= ports
    assert open_ports == {host_port(config.coordinator.address)[1]}
    metrics = {p["containerPort"] for c in pod()["spec"]["containers"] for p in c["ports"]
               if p["name"].startswith("metrics")}
    assert scraped == metrics  # Prometheus reaches every metrics port, and only those


def test_the_overlay_is_listed_in_the_readme():
    assert "colocated/" in (K8S / "README.md").read_text()


def test_the_shm_size_bounds_the_activations_in_flight(config):
    """32 rows x 256 tokens x 1152 x 2 bytes = 18 MiB per microbatch at 256 px: the limit
    holds several microbatches per hop at 512 px (4x)."""
    (shm,) = [v for v in pod()["spec"]["volumes"] if v["name"] == "shm"]
    limit = shm["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi")
    model = dit_config(config.model.name)
    per_microbatch = config.max_batch_size * model.num_tokens * model.hidden_size * 2
    hops = len(config.stages) - 1
    coordinators_ring = DEFAULT_SLOTS * INPUT_SLOT_BYTES
    assert int(limit[:-2]) * 2**30 >= hops * 2 * 4 * per_microbatch + coordinators_ring


