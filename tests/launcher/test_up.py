"""End to end: `ditserve up` starts every service as its own process; `ditserve generate`
(the client CLI) gets a PNG of the right size and latents of the right shape; stopping
`ditserve up` leaves no process behind; a service that dies is restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import UpCluster, descendants, is_alive
from ditserve.config import load_config
from ditserve.launcher.plan import localize, plan
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_checkpoint, tiny_vae_dir):
    """`ditserve up` with 2 stages, a coordinator and a decoder, on free loopback ports."""
    tmp = tmp_path_factory.mktemp("up")
    up = UpCluster(["--checkpoint", str(tiny_checkpoint), "--vae", str(tiny_vae_dir),
                    "--stages", "2", "--wire-dtype", "fp32"], tmp / "logs")
    try:
        yield up.start(), tmp
    finally:
        up.stop()


def _generate(target: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "ditserve.cli", "generate", "--target", target,
            "--class", "1", "--class", "7", "--seed", "0", "--steps", "5", "--sampler", "ddim",
            "--guidance", "4", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_generate_writes_images_and_latents(cluster):
    up, tmp = cluster
    target = up.target
    out, latents = tmp / "out.png", tmp / "x.npy"
    done = _generate(target, tmp, "--out", str(out), "--out-dir", str(tmp / "single"),
                     "--latents-out", str(latents))
    assert done.returncode == 0, done.stderr
    singles = sorted((tmp / "single").glob("*.png"))
    assert len(singles) == 2
    for path in singles:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (16, 16)  # latent 8 x VAE factor 2
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size[0] >= 32
    x = np.load(latents)
    assert x.shape == (2, 4, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()


def test_same_config_plans_the_same_pipeline_as_kubernetes(cluster):
    """The k8s ConfigMap's file, localized, plans one process per stage of that file."""
    config = load_config(REPO / "k8s" / "base" / "pipeline.yaml")
    local = localize(config, 40000)
    specs = plan(local, Path("pipeline.yaml"))
    stage_specs = [s for s in specs if s.name.startswith("stage-")]
    assert len(stage_specs) == len(config.stages)
    assert [s.blocks for s in local.stages] == [s.blocks for s in config.stages]
    assert local.model == config.model and local.wire_dtype == config.wire_dtype
    assert all(s.address.startswith("127.0.0.1:") for s in specs)


def test_a_dead_stage_is_restarted_and_serves_again(cluster):
    up, tmp = cluster
    target = up.target
    stages = [pid for pid in descendants(up.proc.pid) if " stage " in _cmdline(pid)]
    assert len(stages) == 2
    os.kill(stages[0], signal.SIGKILL)
    up.read_until("restarted stage-", timeout=60)
    deadline = time.monotonic() + 120
    while True:  # the coordinator retries; the restarted stage needs a moment to load
        done = _generate(target, tmp, "--out", str(tmp / "again.png"))
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done.returncode == 0, done.stderr


def test_stopping_up_leaves_no_process(cluster):
    up, _ = cluster
    children = descendants(up.proc.pid)
    assert len(children) >= 4  # 2 stages, decoder, coordinator
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    time.sleep(0.5)
    assert not [pid for pid in children if is_alive(pid)]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
