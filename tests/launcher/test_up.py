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
from conftest import find_free_port
from ditserve.config import load_config
from ditserve.launcher.plan import localize, plan
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    """Every descendant process of pid (from /proc)."""
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and int(entry.name) not in found:
                found.add(int(entry.name))
                frontier.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _free_base_port() -> int:
    """A port P with P..P+3 all free on loopback (coordinator, decoder, 2 stages)."""
    import socket

    for _ in range(50):
        base = find_free_port()
        try:
            for offset in range(4):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no 4 consecutive free ports")


def _start_up(tmp: Path, checkpoint: Path, vae: Path, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ditserve.cli", "up", "--checkpoint", str(checkpoint),
            "--vae", str(vae), "--stages", "2", "--wire-dtype", "fp32", "--port", str(port),
            "--log-dir", str(tmp / "logs")]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _read_until(process: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    import select

    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            lines.append(line)
            if needle in line:
                return lines
        if process.poll() is not None:
            break
    raise AssertionError(f"no {needle!r} from ditserve up:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_checkpoint, tiny_vae_dir):
    """`ditserve up` with 2 stages, a coordinator and a decoder, on free loopback ports."""
    tmp = tmp_path_factory.mktemp("up")
    port = _free_base_port()
    process = _start_up(tmp, tiny_checkpoint, tiny_vae_dir, port)
    try:
        _read_until(process, "coordinator at", timeout=240)
        yield process, f"127.0.0.1:{port}", tmp
    finally:
        descendants = _children(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in descendants:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _generate(target: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "ditserve.cli", "generate", "--target", target,
            "--class", "1", "--class", "7", "--seed", "0", "--steps", "5", "--sampler", "ddim",
            "--guidance", "4", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_generate_writes_images_and_latents(cluster):
    _, target, tmp = cluster
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
    process, target, tmp = cluster
    stages = [pid for pid in _children(process.pid) if "stage" in _cmdline(pid)]
    assert len(stages) == 2
    os.kill(stages[0], signal.SIGKILL)
    _read_until(process, "restarted stage-", timeout=60)
    deadline = time.monotonic() + 120
    while True:  # the coordinator retries; the restarted stage needs a moment to load
        done = _generate(target, tmp, "--out", str(tmp / "again.png"))
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done.returncode == 0, done.stderr


def test_stopping_up_leaves_no_process(cluster):
    process, _, _ = cluster
    descendants = _children(process.pid)
    assert len(descendants) >= 4  # 2 stages, decoder, coordinator
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    time.sleep(0.5)
    assert not [pid for pid in descendants if _alive(pid)]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
