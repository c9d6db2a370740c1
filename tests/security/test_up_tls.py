"""`ditserve up --tls`: the whole local pipeline over TLS/mTLS with a throwaway CA
(launcher/pki.py), used through the CLI and the SDK."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import UpCluster
from ditserve_client import Client
from ditserve_client.errors import DitserveError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = UpCluster(["--tls"], tmp_path_factory.mktemp("up-tls"))
    try:
        cluster.start()
        ca = re.search(r"--ca (\S+)", cluster.read_until("--ca", 30))[1]
        yield cluster, Path(ca), Path(re.search(r"cat ([^)]+)\)", "".join(cluster.lines))[1])
    finally:
        cluster.stop()


def test_cli_and_sdk_generate_through_up_tls(cluster, tmp_path):
    up, ca, token_file = cluster
    token = token_file.read_text().strip()
    out = tmp_path / "x.png"
    done = subprocess.run([sys.executable, "-m", "ditserve.cli", "generate", "--target",
                           up.target, "--tls", "--ca", str(ca), "--class", "0", "--steps", "4",
                           "--sampler", "ddim", "--out", str(out)], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "DITSERVE_TOKEN": token})
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    with Client(up.target, tls=True, root_certificates=ca.read_bytes(), token=token) as client:
        assert len(client.generate_result([1], steps=4, sampler="ddim").images) == 1
    assert token not in "".join(up.lines)  # printed by file, never in the clear
    with Client(up.target, retries=0, token="") as plaintext, pytest.raises(DitserveError):
        plaintext.model_info()
