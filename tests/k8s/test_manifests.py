"""k8s/: every variant renders, validates offline, and wires exactly one relay chain.

Renders k8s/base and each overlay with `kubectl kustomize`, validates the output with
`kubernetes-validate --strict` (bundled offline schemas) and the LeaderWorkerSets against the
CRD schema vendored in k8s/crds/, then checks what a schema cannot: addresses name Services of
the same render, probes hit container ports, GPUs sit in limits only, pods run as non-root,
PodDisruptionBudgets cannot block drains, NetworkPolicies admit the chain's hops and nothing
more, and the ConfigMap is byte for byte the YAML file that `ditserve up` reads.
References: Kubernetes gRPC probes, NetworkPolicy semantics, LeaderWorkerSet naming
(sigs.k8s.io/lws: pods GROUP and GROUP-WORKER under a headless Service named after the set).
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ditserve.common.address import split_host_port
from ditserve.config import PipelineConfig, load_config
from ditserve.model.configs import dit_config
from ditserve.model.partition import parse_block_range, stage_block_range

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
VARIANTS = {"base": K8S / "base", "gpu-4stage": K8S / "overlays/gpu-4stage",
            "lws": K8S / "overlays/lws", "cpu-demo": K8S / "overlays/cpu-demo",
            "mtls": K8S / "overlays/mtls"}
KUBERNETES_VERSION = "1.32.0"
GPU = "nvidia.com/gpu"
GRPC_PORT, METRICS_PORTS, GATEWAY_PORT = 50051, {9100, 9101}, 8080
LWS_KIND = "LeaderWorkerSet"
LWS_LABEL = "leaderworkerset.sigs.k8s.io/"
# Installed beside this interpreter by the test extra (kubernetes-validate).
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
Doc = dict[str, Any]


# ---- rendering -------------------------------------------------------------------------

@functools.cache
def render(variant: str) -> tuple[Doc, ...]:
    """The variant's objects, as `kubectl kustomize` renders them."""
    out = subprocess.run(["kubectl", "kustomize", str(VARIANTS[variant])], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@dataclass
class Workload:
    """Pods of one template: a Deployment, or a LeaderWorkerSet's leaders or one worker index."""

    name: str
    role: str  # "coordinator", "decoder" or "stage-K"
    replicas: int
    labels: dict[str, str]
    spec: Doc


def workloads(docs: tuple[Doc, ...]) -> list[Workload]:
    found = []
    for d in of_kind(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        role = labels["app.kubernetes.io/component"]
        if role == "stage":
            role = f"stage-{labels['ditserve.dev/stage-index']}"
        found.append(Workload(d["metadata"]["name"], role, d["spec"].get("replicas", 1),
                              labels, d["spec"]["template"]["spec"]))
    for lws in of_kind(docs, LWS_KIND):
        found += _lws_workloads(lws)
    return found


def _lws_workloads(lws: Doc) -> list[Workload]:
    """Leader = worker index 0 (coordinator + decoder); worker W runs stage W-1."""
    name, spec = lws["metadata"]["name"], lws["spec"]
    template = spec["leaderWorkerTemplate"]
    lws_labels = {LWS_LABEL + "name": name}
    leader = Workload(name, "coordinator", spec["replicas"],
                      {**template["leaderTemplate"]["metadata"]["labels"], **lws_labels,
                       LWS_LABEL + "worker-index": "0"}, template["leaderTemplate"]["spec"])
    workers = [Workload(f"{name}-worker-{w}", f"stage-{w - 1}", spec["replicas"],
                        {**template["workerTemplate"]["metadata"]["labels"], **lws_labels,
                         LWS_LABEL + "worker-index": str(w)}, template["workerTemplate"]["spec"])
               for w in range(1, template["size"])]
    return [leader, *workers]


def containers(docs: tuple[Doc, ...]) -> list[tuple[Workload, Doc]]:
    return [(w, c) for w in workloads(docs) for c in w.spec["containers"]]


def pipeline_text(docs: tuple[Doc, ...]) -> str:
    maps = [d for d in of_kind(docs, "ConfigMap") if "pipeline.yaml" in d.get("data", {})]
    assert len(maps) == 1, "expected one ConfigMap holding pipeline.yaml"
    return maps[0]["data"]["pipeline.yaml"]


def pipeline(docs: tuple[Doc, ...], tmp_path: Path) -> PipelineConfig:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text(docs))
    return load_config(path)


def host_port(address: str) -> tuple[str, int]:
    return split_host_port(address)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- schema validation -----------------------------------------------------------------

def _kubernetes_validate(paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k",
                           KUBERNETES_VERSION, *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def _core_documents(docs: tuple[Doc, ...]) -> list[Doc]:
    """Everything the bundled schemas know, plus each LWS pod template as a v1 PodTemplate
    (the vendored CRD elides those subtrees; they are core/v1 PodTemplateSpecs)."""
    core = [d for d in docs if d["kind"] != LWS_KIND
            and not d["apiVersion"].startswith("cert-manager.io/")]  # test_mtls_overlay.py
    for lws in of_kind(docs, LWS_KIND):
        for part in ("leaderTemplate", "workerTemplate"):
            core.append({"apiVersion": "v1", "kind": "PodTemplate",
                         "metadata": {"name": f"{lws['metadata']['name']}-{part.lower()}"},
                         "template": lws["spec"]["leaderWorkerTemplate"][part]})
    return core


def test_every_variant_validates_strictly_offline(tmp_path):
    paths = []
    for variant in VARIANTS:
        paths.append(tmp_path / f"{variant}.yaml")
        paths[-1].write_text(yaml.safe_dump_all(_core_documents(render(variant))))
    result = _kubernetes_validate(paths)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    docs = copy.deepcopy(list(render("base")))
    of_kind(tuple(docs), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0][
        "gpuCount"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert _kubernetes_validate([path]).returncode != 0


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server's strict field validation applies it: unknown
    fields are errors, except under x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict.setdefault("additionalProperties", False)
    return strict


@functools.cache
def lws_schema() -> Doc:
    crd = yaml.safe_load((K8S / "crds/leaderworkerset.x-k8s.io_leaderworkersets.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def test_leaderworkersets_match_the_vendored_crd():
    (lws,) = of_kind(render("lws"), LWS_KIND)
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    jsonschema.validate(lws, lws_schema())
    typo = copy.deepcopy(lws)
    typo["spec"]["leaderWorkerTemplate"]["sise"] = typo["spec"]["leaderWorkerTemplate"].pop("size")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, lws_schema())


# ---- wiring ----------------------------------------------------------------------------

def _service_for(docs: tuple[Doc, ...], address: str, role: str) -> Doc:
    """The Service an address names; it must select exactly the role's pods, on the port."""
    host, port = host_port(address)
    service = named(docs, "Service", host)
    chosen = {w.role for w in workloads(docs) if selects(service["spec"]["selector"], w.labels)}
    assert chosen == {role}, f"Service {host} selects {chosen}, not {role}"
    assert port in {p["port"] for p in service["spec"]["ports"]}
    return service


def _lws_worker_address(docs: tuple[Doc, ...], address: str, stage: int) -> None:
    """In a LWS group, stage K is worker K+1, reached as SET-{group}-(K+1).SET."""
    (lws,) = of_kind(docs, LWS_KIND)
    name, size = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]["size"]
    assert lws["spec"]["networkConfig"]["subdomainPolicy"] == "Shared"
    host, port = host_port(address)
    assert host == f"{name}-{{group}}-{stage + 1}.{name}" and stage + 1 < size
    assert port in _ports(next(w for w in workloads(docs) if w.role == f"stage-{stage}"))


def _ports(workload: Workload) -> set[int]:
    return {p["containerPort"] for c in workload.spec["containers"] for p in c.get("ports", [])}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_address_names_a_service_of_the_render(variant, tmp_path):
    docs = render(variant)
    config = pipeline(docs, tmp_path)
    for k, stage in enumerate(config.stages):
        if of_kind(docs, LWS_KIND):
            _lws_worker_address(docs, stage.address, k)
        else:
            assert _service_for(docs, stage.address, f"stage-{k}")["spec"]["clusterIP"] == "None"
    _service_for(docs, config.coordinator.address, "coordinator")
    host, port = host_port(config.decoder.address)
    if host in ("127.0.0.1", "localhost"):  # beside the coordinator, in its pod
        assert port in _ports(next(w for w in workloads(docs) if w.role == "coordinator"))
    else:
        _service_for(docs, config.decoder.address, "decoder")


@pytest.mark.parametrize("variant", ["base", "gpu-4stage", "cpu-demo"])
def test_stage_pods_read_their_index_from_their_label(variant):
    for w in workloads(render(variant)):
        if w.role.startswith("stage-"):
            (container,) = w.spec["containers"]
            env = {e["name"]: e for e in container["env"]}
            field = env["DITSERVE_STAGE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == "metadata.labels['ditserve.dev/stage-index']"
            assert w.name == f"dit-{w.role}" and w.labels["ditserve.dev/stage-index"] == w.role[6:]
            assert container["args"][:3] == ["stage", "--config", "/etc/ditserve/pipeline.yaml"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_are_grpc_on_container_ports(variant):
    for workload, container in containers(render(variant)):
        if workload.role == "gateway":
            continue  # HTTP: see test_gateway_fronts_the_coordinator_over_http
        ports = {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] in ports, (workload.name, probe)
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= (600 if workload.role.startswith("stage") else 300), workload.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpus_appear_only_in_limits(variant):
    gpus = 0
    for workload, container in containers(render(variant)):
        assert GPU not in container["resources"].get("requests", {}), workload.name
        gpus += int(container["resources"].get("limits", {}).get(GPU, 0))
        if variant != "cpu-demo" and workload.role.startswith("stage"):
            assert container["resources"]["limits"][GPU] == 1
    assert (gpus == 0) == (variant == "cpu-demo")


@pytest.mark.parametrize("variant", VARIANTS)
def test_containers_have_requests_and_run_as_non_root(variant):
    docs = render(variant)
    for workload, container in containers(docs):
        pod, ctx = workload.spec.get("securityContext", {}), container["securityContext"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), workload.name
        assert "memory" in container["resources"]["limits"]
        assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True
        assert ctx.get("runAsUser", pod.get("runAsUser", 0)) > 0
        assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
        assert workload.spec["automountServiceAccountToken"] is False
    assert all(sa["automountServiceAccountToken"] is False
               for sa in of_kind(docs, "ServiceAccount"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_volumes_refer_to_objects_of_the_render(variant):
    docs = render(variant)
    maps = {d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    for workload in workloads(docs):
        for volume in workload.spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in maps, workload.name
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, workload.name
    assert bool(claims) == (variant != "cpu-demo")  # the demo image carries its model


@pytest.mark.parametrize("variant", VARIANTS)
def test_disruption_budgets_cannot_block_a_drain(variant):
    docs = render(variant)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert "minAvailable" not in pdb["spec"]
        selected = [w for w in workloads(docs)
                    if selects(pdb["spec"]["selector"]["matchLabels"], w.labels)]
        # Evicting all its pods keeps the budget: a drain never waits on it.
        assert len(selected) == 1 and selected[0].replicas <= pdb["spec"]["maxUnavailable"]


# ---- the HTTP gateway ------------------------------------------------------------------

def _gateway(docs: tuple[Doc, ...]) -> Workload | None:
    found = [w for w in workloads(docs) if w.role == "gateway"]
    return found[0] if found else None


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("variant", ["base", "gpu-4stage", "cpu-demo"])
def test_gateway_fronts_the_coordinator_over_http(variant, tmp_path):
    """Dials the config's coordinator address, listens on its named port, probes over HTTP,
    asks for tokens, and is reached through its Service and the example Ingress."""
    docs = render(variant)
    gateway = _gateway(docs)
    assert gateway is not None and gateway.replicas >= 2
    (container,) = gateway.spec["containers"]
    args = container["args"]
    assert args[0] == "gateway"
    assert _flag(args, "--target") == pipeline(docs, tmp_path).coordinator.address
    _service_for(docs, _flag(args, "--target"), "coordinator")
    assert host_port(_flag(args, "--listen"))[1] == GATEWAY_PORT
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": GATEWAY_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for probe in ("startupProbe", "livenessProbe"):  # a coordinator restart restarts no gateway
        assert container[probe]["tcpSocket"]["port"] == "http"
    tokens = _flag(args, "--tokens-file")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (secret,) = [v["secret"] for v in gateway.spec["volumes"]
                 if v["name"] == mounts[tokens.rsplit("/", 1)[0]]]
    assert secret["secretName"] == "ditserve-gateway-tokens"
    service = named(docs, "Service", "ditserve-gateway")
    assert {w.role for w in workloads(docs)
            if selects(service["spec"]["selector"], w.labels)} == {"gateway"}
    (port,) = service["spec"]["ports"]
    (rule,) = named(docs, "Ingress", "ditserve-gateway")["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "ditserve-gateway", "port": {"name": port["name"]}}
    assert port["targetPort"] == "http"


# ---- network policy --------------------------------------------------------------------

def _admitted(docs: tuple[Doc, ...]) -> set[tuple[str, str, int]]:
    """(source, destination role, port) admitted by the policies: source is a role, "any"
    (a rule without `from`) or "namespace:LABELS" (a namespaceSelector)."""
    admitted, pods = set(), workloads(docs)
    for policy in of_kind(docs, "NetworkPolicy"):
        targets = [w for w in pods
                   if selects(policy["spec"]["podSelector"].get("matchLabels", {}), w.labels)]
        for rule in policy["spec"].get("ingress", []):
            for port in (p["port"] for p in rule["ports"]):
                admitted |= {(s, t.role, port) for t in targets for s in _sources(rule, pods)}
    return admitted


def _sources(rule: Doc, pods: list[Workload]) -> set[str]:
    if "from" not in rule:
        return {"any"}
    sources = set()
    for peer in rule["from"]:
        if "namespaceSelector" in peer:
            sources.add(f"namespace:{peer['namespaceSelector']['matchLabels']}")
        else:
            sources |= {w.role for w in pods if selects(peer["podSelector"]["matchLabels"],
                                                          w.labels)}
    return sources


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies_admit_exactly_the_chain(variant, tmp_path):
    docs = render(variant)
    config = pipeline(docs, tmp_path)
    stages = [f"stage-{k}" for k in range(len(config.stages))]
    chain = {("coordinator", stages[0])} | set(itertools.pairwise(stages))
    if of_kind(docs, "Deployment"):
        chain.add(("coordinator", "decoder"))  # else in the coordinator's pod (loopback)
    public = {"coordinator"}
    if _gateway(docs):
        chain.add(("gateway", "coordinator"))
        public.add("gateway")
    admitted = _admitted(docs)
    assert {(s, d) for s, d, p in admitted if p == GRPC_PORT and s != "any"} == chain
    assert {d for s, d, _ in admitted if s == "any"} == public
    assert {p for s, d, p in admitted if d == "gateway" and s == "any"} <= {GATEWAY_PORT}
    scrapers = {(d, p) for s, d, p in admitted if s.startswith("namespace:")}
    assert {p for _, p in scrapers} <= METRICS_PORTS
    assert {d for d, _ in scrapers} == {w.role for w in workloads(docs)}
    deny = [p for p in of_kind(docs, "NetworkPolicy")
            if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]


# ---- one config for `ditserve up` and the cluster ---------------------------------------

def _depth(config: PipelineConfig) -> int:
    if not config.model.checkpoint:
        from ditserve.demo.dit import DEMO_DIT_CONFIG
        return DEMO_DIT_CONFIG.depth
    return dit_config(config.model.name).depth


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_is_the_file_ditserve_up_reads(variant):
    docs = render(variant)
    path = VARIANTS[variant] / "pipeline.yaml"
    assert pipeline_text(docs) == path.read_text()
    config = load_config(path)
    lws = of_kind(docs, LWS_KIND)
    pods = (lws[0]["spec"]["leaderWorkerTemplate"]["size"] - 1 if lws
            else len([w for w in workloads(docs) if w.role.startswith("stage-")]))
    assert len(config.stages) == pods
    depth, end = _depth(config), 0
    for k, stage in enumerate(config.stages):
        start, stop = (parse_block_range(stage.blocks, depth) if stage.blocks
                       else stage_block_range(depth, k, len(config.stages)))
        assert start == end, f"stages[{k}] starts at block {start}, not {end}"
        end = stop
    assert end == depth


def _fake_ditserve(bin_dir: Path, record: Path) -> None:
    """A `ditserve` that records its arguments and the environment it was given."""
    bin_dir.mkdir()
    script = bin_dir / "ditserve"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}.args\nenv > {record}.env\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def _run_lws_entrypoint(tmp_path: Path, role: str, worker: int) -> tuple[list[str], dict]:
    docs = render("lws")
    entrypoint = next(d for d in of_kind(docs, "ConfigMap") if "entrypoint.sh" in d["data"])
    script, template = tmp_path / "entrypoint.sh", tmp_path / "template.yaml"
    script.write_text(entrypoint["data"]["entrypoint.sh"])
    template.write_text(pipeline_text(docs))
    _fake_ditserve(tmp_path / "bin", tmp_path / "record")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "DITSERVE_CONFIG_TEMPLATE": str(template), "DITSERVE_GROUP_INDEX": "3",
           "DITSERVE_WORKER_INDEX": str(worker)}
    subprocess.run([shutil.which("sh") or "/bin/sh", str(script), role, "--metrics-port",
                    "9100"], env=env, check=True, timeout=30)
    given = dict(line.split("=", 1) for line in
                 (tmp_path / "record.env").read_text().splitlines() if "=" in line)
    return (tmp_path / "record.args").read_text().splitlines(), given


def test_lws_stage_derives_index_and_next_hop_from_its_environment(tmp_path):
    args, env = _run_lws_entrypoint(tmp_path, "stage", worker=1)
    config_path = tmp_path / "ditserve-stage.yaml"
    assert args == ["stage", "--metrics-port", "9100", "--config", str(config_path)]
    assert env["DITSERVE_STAGE_INDEX"] == "0" and env["DITSERVE_CONFIG"] == str(config_path)
    config = load_config(config_path)
    # Worker 1 of group 3 serves stage 0 and relays to stage 1, worker 2 of the same group.
    assert config.stages[1].address == "pipeline-3-2.pipeline:50051"
    assert config.stages[0].listen_address() == "[::]:50051"


def test_lws_leader_runs_the_coordinator_against_its_own_group(tmp_path):
    args, env = _run_lws_entrypoint(tmp_path, "coordinator", worker=0)
    assert args[0] == "coordinator" and "DITSERVE_STAGE_INDEX" not in env
    config = load_config(tmp_path / "ditserve-coordinator.yaml")
    assert config.stages[0].address == "pipeline-3-1.pipeline:50051"
    (lws,) = of_kind(render("lws"), LWS_KIND)
    for part in ("leaderTemplate", "workerTemplate"):
        for container in lws["spec"]["leaderWorkerTemplate"][part]["spec"]["containers"]:
            assert container["command"] == ["/bin/sh", "/etc/ditserve-lws/entrypoint.sh"]
            assert "/etc/ditserve-lws" in {m["mountPath"] for m in container["volumeMounts"]}
