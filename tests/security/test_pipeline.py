"""A whole pipeline over TLS, as real processes: two stages, the decoder and the coordinator
started with the security section that `ditserve up --tls` writes (launcher/pki.py), each
with a plaintext health-only port for the readiness checks (as the Kubernetes probes).

Generations through the CLI and the SDK; refused clients and peers; a certificate and token
rotation with requests in flight; and no token in any log. The rotation test changes the
pipeline's files, so it runs after the others (file order), and the log check last.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import find_free_port
from ditserve.launcher.pki import identity_uri, issue, make_ca, make_run_pki
from ditserve.security.tokens import hash_token, new_token
from ditserve_client import Client
from ditserve_client.errors import DitserveError
from ditserve_client.events import Progress, Result
from ditserve_client.proto.dit.v1 import stage_pb2, stage_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .helpers import OWN_CONNECTION, replace_atomically

SERVICES = ("coordinator", "decoder", "stage-0", "stage-1")
WRONG_TOKEN = new_token()
pytestmark = pytest.mark.slow


@dataclasses.dataclass
class Pipeline:
    target: str
    addresses: dict[str, str]
    tls: Path
    token: str
    launcher: object
    used_tokens: list[str]

    def client(self, token: str | None = None, ca: bytes | None = None, retries: int = 0) -> Client:
        self.used_tokens.append(token or self.token)
        return Client(self.target, tls=True, root_certificates=ca or (self.tls / "ca.crt").read_bytes(),
                      token=token or self.token, timeout=120, retries=retries)

    def credentials(self, name: str | None, ca: bytes | None = None) -> grpc.ChannelCredentials:
        root = ca or (self.tls / "ca.crt").read_bytes()
        if name is None:
            return grpc.ssl_channel_credentials(root)
        return grpc.ssl_channel_credentials(root, (self.tls / f"{name}.key").read_bytes(),
                                            (self.tls / f"{name}.crt").read_bytes())


@pytest.fixture(scope="module")
def pipeline(launcher, tmp_path_factory) -> Pipeline:
    run_dir = tmp_path_factory.mktemp("run")
    pki = make_run_pki(run_dir, SERVICES)
    addresses = {name: f"127.0.0.1:{find_free_port()}" for name in SERVICES}
    config = {"model": {"checkpoint": ""},  # the embedded demo model and VAE
              "stages": [{"address": addresses[f"stage-{k}"], "listen": addresses[f"stage-{k}"]}
                         for k in range(2)],
              "coordinator": {"address": addresses["coordinator"],
                              "listen": addresses["coordinator"], "default_sampler": "ddim"},
              "decoder": {"address": addresses["decoder"], "listen": addresses["decoder"]},
              "security": dataclasses.asdict(pki.security)}
    path = run_dir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(name: str, args: list[str], wait: bool):
        health = f"127.0.0.1:{find_free_port()}"
        return launcher.start(name, [*args, "--config", str(path), "--health-listen", health],
                              health, wait=wait)

    started = [start(f"stage-{k}", ["stage", "--stage", str(k), "--threads", "1"], False)
               for k in range(2)]
    started.append(start("decoder", ["decoder"], False))
    for process in started:
        process.wait_healthy()
    start("coordinator", ["coordinator"], True)
    return Pipeline(addresses["coordinator"], addresses, run_dir / "tls", pki.token, launcher,
                    [])


def _cli(*args: str, token_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DITSERVE_TOKEN"}
    if token_env is not None:
        env["DITSERVE_TOKEN"] = token_env
    return subprocess.run([sys.executable, "-m", "ditserve.cli", *args], capture_output=True,
                          text=True, timeout=180, env=env)


def test_cli_generates_over_tls_with_a_token(pipeline, tmp_path):
    out = tmp_path / "out.png"
    done = _cli("generate", "--target", pipeline.target, "--tls", "--ca",
                str(pipeline.tls / "ca.crt"), "--token", pipeline.token, "--class", "0",
                "--class", "1", "--steps", "4", "--sampler", "ddim", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The token from the environment (out of the process list), for `info` too.
    info = _cli("info", "--target", pipeline.target, "--tls", "--ca",
                str(pipeline.tls / "ca.crt"), token_env=pipeline.token)
    assert info.returncode == 0, info.stderr
    assert "stage 1: blocks" in info.stdout


@pytest.mark.parametrize(("token", "expected"), [
    (WRONG_TOKEN, "UNAUTHENTICATED: unknown bearer token"),
    (None, "UNAUTHENTICATED: missing bearer token")])
def test_cli_without_a_valid_token_is_one_line(pipeline, token, expected, tmp_path):
    args = ["--token", token] if token else []
    done = _cli("generate", "--target", pipeline.target, "--tls", "--ca",
                str(pipeline.tls / "ca.crt"), "--class", "0", "--out", str(tmp_path / "x.png"),
                *args)
    assert done.returncode == 2
    assert expected in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert WRONG_TOKEN not in done.stderr and pipeline.token not in done.stderr


def test_cli_in_plaintext_is_refused_by_the_tls_coordinator(pipeline):
    done = _cli("info", "--target", pipeline.target)
    assert done.returncode == 2 and "UNAVAILABLE" in done.stderr
    assert "Traceback" not in done.stderr


def test_sdk_generates_over_tls(pipeline):
    with pipeline.client() as client:
        result = client.generate_result([2, 3], seed=7, steps=4, sampler="ddim")
    assert len(result.images) == 2 and result.seed == 7


def _describe_code(address: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    with grpc.secure_channel(address, credentials, OWN_CONNECTION) as channel:
        try:
            stage_pb2_grpc.StageServiceStub(channel).DescribeChain(
                stage_pb2.DescribeChainRequest(), timeout=20)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_internal_ports_admit_only_the_previous_hop(pipeline):
    stage0, stage1 = pipeline.addresses["stage-0"], pipeline.addresses["stage-1"]
    # No client certificate: the handshake fails (a stage serves only its chain's peers).
    assert _describe_code(stage0, pipeline.credentials(None)) == grpc.StatusCode.UNAVAILABLE
    # A certificate of the pipeline, but not the hop before: refused by identity.
    assert _describe_code(stage1, pipeline.credentials("coordinator")) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert _describe_code(stage0, pipeline.credentials("decoder")) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert _describe_code(stage0, pipeline.credentials("coordinator")) == grpc.StatusCode.OK


def _health(address: str, credentials: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(address, credentials, OWN_CONNECTION) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=20).status


def test_rotation_without_restart_while_requests_are_in_flight(pipeline, tmp_path):
    """Every certificate but the decoder's moves to a new CA (the CA file bundles both) and
    the tokens file to a new token, while a generation streams on a connection opened
    before. It finishes; new connections get the new certificates and the new token."""
    old_ca = (pipeline.tls / "ca.crt").read_bytes()
    new_ca, new = make_ca("rotated CA"), new_token()
    with pipeline.client() as before:
        events = before.generate([4], seed=1, steps=60, sampler="ddim")
        assert not isinstance(next(events), Result)  # Accepted: admitted, running

        replace_atomically(pipeline.tls / "ca.crt", old_ca + new_ca.cert_pem)
        for name in ("coordinator", "stage-0", "stage-1"):
            issued = issue(new_ca, name, uris=[identity_uri(name, "ditserve.local")])
            replace_atomically(pipeline.tls / f"{name}.key", issued.key_pem)
            replace_atomically(pipeline.tls / f"{name}.crt", issued.cert_pem)
        replace_atomically(pipeline.tls / "tokens", f"{hash_token(new)} rotated\n".encode())

        # New connections: the new CA alone verifies the coordinator, with the new token.
        with pipeline.client(token=new, ca=new_ca.cert_pem) as after:
            assert len(after.generate_result([5], steps=4).images) == 1
        with pipeline.client(ca=new_ca.cert_pem) as stale_token, \
                pytest.raises(DitserveError) as refused:
            stale_token.model_info()
        assert refused.value.code == "UNAUTHENTICATED"
        with pipeline.client(token=new, ca=old_ca) as stale_ca, \
                pytest.raises(DitserveError) as refused:
            stale_ca.model_info()
        assert refused.value.code == "UNAVAILABLE"
        # Stage 1 serves its new certificate to a new connection (stage 0's new one).
        assert _health(pipeline.addresses["stage-1"],
                       pipeline.credentials("stage-0", ca=new_ca.cert_pem)) == \
            health_pb2.HealthCheckResponse.SERVING

        # The generation admitted before the rotation completes on its connection.
        rest = list(events)
        assert any(isinstance(e, Progress) for e in rest)
        assert isinstance(rest[-1], Result) and len(rest[-1].images) == 1


def test_no_token_appears_in_any_log(pipeline):
    logs = "".join(p.log_path.read_text(errors="replace") for p in pipeline.launcher.processes)
    assert "call_refused" in logs and "tls_reloaded" in logs  # the logs did see them
    for token in {*pipeline.used_tokens, pipeline.token, WRONG_TOKEN}:
        assert token not in logs
