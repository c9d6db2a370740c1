"""End to end: `ditserve up` starts every service as its own process; `ditserve generate`
(the client CLI) gets a PNG of the right size and latents of the right shape; stopping
`ditserve up` leaves no process behind; a service that dies is restarted. Every service
listens on loopback only and owns its ports; each run has its own folder (issue 11 §2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import UpCluster, descendants, free_base_port, is_alive
from ditserve.common.status import CommandError
from ditserve.config import load_config
from ditserve.launcher.plan import localize, plan
from ditserve_client import Client
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_checkpoint, tiny_vae_dir):
    """`ditserve up` with 2 stages, a coordinator and a decoder, on free loopback ports."""
    tmp = tmp_path_factory.mktemp("up")
    up = UpCluster(["--checkpoint", str(tiny_checkpoint), "--vae", str(tiny_vae_dir),
                    "--stages", "2", "--wire-dtype", "fp32",
                    "--metrics-port", str(free_base_port(4)),
                    "--http-port", str(free_base_port(1))], tmp / "logs")
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


def test_every_service_listens_on_loopback_only(cluster):
    """gRPC and metrics ports alike (they were on [::], every interface)."""
    up, _ = cluster
    ports = {up.port + k for k in range(4)} | set(_metrics_ports(up).values())
    listening = _listening_sockets()
    assert ports <= {port for _, port in listening}
    assert {host for host, port in listening if port in ports} == {"127.0.0.1"}


def test_each_service_serves_metrics_on_its_own_port(cluster):
    up, _ = cluster
    ports = _metrics_ports(up)
    assert sorted(ports) == ["coordinator", "decoder", "stage-0", "stage-1"]
    assert len(set(ports.values())) == 4
    for name, port in ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert "dit_" in text, name


def test_http_port_starts_the_gateway_and_its_page(cluster):
    """`up --http-port P`: the gateway starts after the coordinator, on loopback, its
    /healthz follows the coordinator and / is the web page; the ready line says where."""
    up, _ = cluster
    line = next(line for line in up.lines if "web page and HTTP API at" in line)
    url = line.split(" at ", 1)[1].strip()
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url + "healthz", timeout=10) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert b"<html" in reply.read().lower()
    with urllib.request.urlopen(url + "v1/model", timeout=10) as reply:
        assert b'"num_classes": 10' in reply.read().replace(b'":10', b'": 10')
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert {host for host, p in _listening_sockets() if p == port} == {"127.0.0.1"}


def test_ports_planned_twice_are_refused(tmp_path):
    from ditserve.entrypoints.up import _check_distinct_ports

    config = localize(load_config(REPO / "k8s" / "base" / "pipeline.yaml"), 50050)
    specs = plan(config, tmp_path / "p.yaml", http_port=50051)  # the decoder's port
    with pytest.raises(CommandError, match="port 50051 is planned twice: decoder and gateway"):
        _check_distinct_ports(specs)


def test_stages_and_decoder_start_together(cluster):
    """Every independent service is started before the first is waited for; the
    coordinator, which needs the chain, after all of them serve."""
    up, _ = cluster
    events = [line.split("ditserve.up ", 1)[1].strip() for line in up.lines
              if "ditserve.up " in line and ("started " in line or " is serving" in line)]
    first_serving = next(i for i, e in enumerate(events) if "is serving" in e)
    started_first = {e.split()[1] for e in events[:first_serving] if e.startswith("started")}
    assert started_first == {"stage-0", "stage-1", "decoder"}
    coordinator = next(i for i, e in enumerate(events) if e.startswith("started coordinator"))
    assert sum("is serving" in e for e in events[:coordinator]) == 3


def test_a_second_up_on_the_same_ports_fails_fast_naming_the_port(cluster, tmp_path):
    """It used to share the ports (SO_REUSEPORT) and report "serving" at once."""
    up, _ = cluster
    done = subprocess.run([sys.executable, "-m", "ditserve.cli", "up", "--port", str(up.port),
                           "--log-dir", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1, error
    taken = [p for p in range(up.port, up.port + 4) if f"127.0.0.1:{p}: port {p} is already in use"
             in error]
    assert taken, error
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_two_runs_from_one_folder_keep_their_own_config(cluster, tiny_checkpoint):
    """A second run with the same --log-dir (other ports) serves its own pipeline and the
    first keeps its own (they shared LOG_DIR/pipeline.yaml, and the second hung)."""
    first, tmp = cluster
    log_dir = tmp / "logs"
    second = UpCluster(["--checkpoint", str(tiny_checkpoint), "--stages", "1", "--no-decoder",
                        "--wire-dtype", "fp32"], log_dir, stages=1)
    try:
        second.start()
        configs = {load_config(path).coordinator.address: load_config(path)
                   for path in log_dir.glob("*/pipeline.yaml")}
        assert sorted(configs) == sorted([first.target, second.target])
        assert len(configs[second.target].stages) == 1
        assert len(configs[first.target].stages) == 2
        for up, stages in ((first, 2), (second, 1)):
            with Client(up.target) as client:
                assert len(client.model_info(refresh=True).stages) == stages
    finally:
        second.stop()


def test_stopping_up_leaves_no_process(cluster):
    """SIGINT from outside (not the terminal's process group): every service stops by
    itself, none is killed."""
    up, _ = cluster
    children = descendants(up.proc.pid)
    assert len(children) >= 4  # 2 stages, decoder, coordinator
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0
    assert not [pid for pid in children if is_alive(pid)]
    output = "".join(up.lines)
    assert "stopped 5 services" in output and "killing it" not in output


def _metrics_ports(up: UpCluster) -> dict[str, int]:
    """{service: metrics port} from the line `ditserve up` prints when ready."""
    line = next(line for line in up.lines if line.startswith("ditserve up: metrics"))
    entries = line.split("metrics ", 1)[1].split(", ")
    return {entry.split()[0]: int(entry.split(":")[-1].split("/")[0]) for entry in entries}


def _listening_sockets() -> set[tuple[str, int]]:
    """(host, port) of every TCP socket in LISTEN state, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("tcp", "tcp6"):
        for row in (Path("/proc/net") / table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            found.add((_host(address), int(port, 16)))
    return found


def _host(hex_address: str) -> str:
    """/proc/net's hex address (32-bit words in little-endian order) → text: IPv4, an
    IPv4-mapped IPv6 address as its IPv4 (gRPC binds 127.0.0.1 so), other IPv6 as hex."""
    if len(hex_address) == 32 and hex_address.startswith("0000000000000000FFFF0000"):
        hex_address = hex_address[24:]
    if len(hex_address) == 8:
        return ".".join(str(int(hex_address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return "ipv6:" + hex_address


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
