"""Shared fixtures: free loopback ports, a tiny ditserve checkpoint, real service processes.

Fixtures (use them from any test module):

- `free_port()`          → a free TCP port on 127.0.0.1 (function fixture returning a callable).
- `tiny_config`          → DiTConfig of the tiny test model (DiT-Tiny/2, 8x8 latents, 10 classes).
- `tiny_checkpoint`      → Path of a ditserve .safetensors of that model (session-scoped):
                           reference init, then perturbed so that every output is nonzero.
- `tiny_model`           → the whole model loaded from it (float32, eval).
- `error_status(code, message, retry_delay)` → a grpc.Status (google.rpc code, optional
                           RetryInfo) for fakes to abort with, as a real server would.
- `UpCluster`            → `ditserve up` as a subprocess on free ports: `start()` waits for
                           its "coordinator at" line; `stop()` leaves no process behind.
- `launcher`             → a module-scoped `Launcher`: starts `ditserve ...` subprocesses,
                           waits for gRPC health SERVING, and kills every one at teardown
                           (even when a test fails).

    def test_x(launcher, tiny_checkpoint):
        chain = launcher.start_chain(tiny_checkpoint, stages=2, wire_dtype="fp32")
        address = chain[0].address   # stage 0, SERVING

`Launcher.start(name, args, port)` runs any subcommand (`ditserve coordinator ...`) and
`wait_healthy` polls grpc.health.v1 until SERVING; `ServiceProcess.terminate()` sends
SIGTERM and returns the exit code.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch
from ditserve.common import process as procs
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

torch.set_num_threads(1)

STARTUP_TIMEOUT_S = 60.0


def error_status(code: int | str, message: str,
                 retry_delay: float | None = None) -> grpc.Status:
    """A rich status as ditserve's servers send it: `code` a google.rpc code (number or
    name), with RetryInfo when `retry_delay` (s) is given."""
    number = code_pb2.Code.Value(code) if isinstance(code, str) else code
    status = status_pb2.Status(code=number, message=message)
    if retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_delay * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS may hand it out again later)."""
    return procs.free_port()


@pytest.fixture
def free_port():
    return find_free_port


def make_tiny_checkpoint(path: Path, depth: int = 4, seed: int = 0) -> Path:
    """Writes a tiny DiT (random, nonzero outputs) in ditserve's format."""
    from ditserve.model import DiT, dit_config, save_ditserve

    config = dit_config("DiT-Tiny/2", input_size=8, num_classes=10, depth=depth)
    torch.manual_seed(seed)
    model = DiT(config)
    model.initialize_weights()
    with torch.no_grad():  # adaLN-Zero init outputs zeros: perturb every weight
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    save_ditserve(model.state_dict().items(), config, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_config(tiny_checkpoint):
    from ditserve.model import open_checkpoint
    return open_checkpoint(tiny_checkpoint).config


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from ditserve.model import load_dit
    return load_dit(tiny_checkpoint)


def make_tiny_vae(folder: Path, scaling_factor: float = 0.18215) -> Path:
    """A 2-level AutoencoderKL (downsample 2) with random, perturbed weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=32, scaling_factor=scaling_factor)
    with torch.no_grad():  # spread the outputs over the pixel range
        for param in vae.parameters():
            param.add_(0.05 * torch.randn_like(param))
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


class ServiceProcess(procs.ServiceProcess):
    """A `ditserve` subcommand (`args`) running as a child process, listening on `address`
    (the one service-process helper, ditserve.common.process, with one compute thread)."""

    def __init__(self, name: str, args: Sequence[str], address: str, log_path: Path):
        self.args = list(args)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        super().__init__(name, procs.ditserve_argv(*self.args), address, log_path, env)
        self.start()

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Polls health until SERVING; fails with the process log if it dies or times out."""
        try:
            self.wait_serving(timeout)
        except procs.ServiceFailed as failed:
            raise RuntimeError(f"{failed}:\n{self.log()[-4000:]}") from None

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL if it hangs)."""
        return super().terminate(timeout)

    def stop(self) -> None:
        self.close()


class Launcher:
    """Starts service processes on free loopback ports and stops them all at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.processes: list[ServiceProcess] = []

    def start(self, name: str, args: Sequence[str], address: str,
              wait: bool = True) -> ServiceProcess:
        log_path = self.log_dir / f"{name}-{len(self.processes)}.log"
        process = ServiceProcess(name, args, address, log_path)
        self.processes.append(process)
        if wait:
            process.wait_healthy()
        return process

    def stage_args(self, checkpoint: Path, stage: int, stages: int, port: int,
                   next_port: int | None = None, wire_dtype: str = "fp32",
                   extra: Sequence[str] = ()) -> list[str]:
        args = ["stage", "--checkpoint", str(checkpoint), "--stage", str(stage),
                "--stages", str(stages), "--listen", f"127.0.0.1:{port}",
                "--wire-dtype", wire_dtype, "--threads", "1", *extra]
        return [*args, "--next", f"127.0.0.1:{next_port}"] if next_port else args

    def start_stage(self, checkpoint: Path, stage: int, stages: int, port: int,
                    next_port: int | None = None, wire_dtype: str = "fp32",
                    extra: Sequence[str] = (), wait: bool = True) -> ServiceProcess:
        args = self.stage_args(checkpoint, stage, stages, port, next_port, wire_dtype, extra)
        return self.start(f"stage{stage}of{stages}", args, f"127.0.0.1:{port}", wait)

    def start_chain(self, checkpoint: Path, stages: int, wire_dtype: str = "fp32",
                    extra: Sequence[str] = ()) -> list[ServiceProcess]:
        """A whole relay chain, started concurrently; stage 0 first in the list."""
        ports = [find_free_port() for _ in range(stages)]
        chain = [self.start_stage(checkpoint, i, stages, ports[i],
                                  ports[i + 1] if i + 1 < stages else None, wire_dtype,
                                  extra, wait=False) for i in range(stages)]
        for process in chain:
            process.wait_healthy()
        return chain

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path_factory.mktemp("logs"))
    try:
        yield launcher
    finally:
        launcher.stop_all()


def free_base_port(count: int = 4) -> int:
    """A port P with P..P+count-1 all free on loopback (`ditserve up --port P` uses them)."""
    return procs.free_port_block(count)


def descendants(pid: int) -> set[int]:
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


def is_alive(pid: int) -> bool:
    """Whether pid runs (a zombie counts as gone)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class UpCluster:
    """`ditserve up ARGS --port P` as a subprocess (common/process.py); its output goes to
    LOG_DIR/up-P.log, read line by line."""

    def __init__(self, args: Sequence[str], log_dir: Path, stages: int = 2):
        self.port = free_base_port(2 + stages)
        self.target = f"127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        argv = procs.ditserve_argv("up", *args, "--port", str(self.port),
                                     "--log-dir", str(log_dir))
        self.up = procs.ServiceProcess("ditserve up", argv, self.target,
                                         log_dir / f"up-{self.port}.log",
                                         {**os.environ, "OMP_NUM_THREADS": "1"}).start()
        self.proc = self.up.proc
        self._seen = 0

    @property
    def lines(self) -> list[str]:
        """Its output so far, line by line (stdout and stderr together)."""
        return self.up.log_path.read_text(errors="replace").splitlines(keepends=True)

    def read_until(self, needle: str, timeout: float) -> str:
        """Waits for an output line (after those already matched) holding `needle`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines
            while self._seen < len(lines):
                line = lines[self._seen]
                self._seen += 1
                if needle in line:
                    return line
            if self.proc.poll() is not None and self._seen == len(self.lines):
                break
            time.sleep(0.1)
        raise AssertionError(f"no {needle!r} from ditserve up:\n{''.join(self.lines)}")

    def start(self, timeout: float = 240.0) -> UpCluster:
        self.read_until("coordinator at", timeout)
        return self

    def stop(self) -> None:
        """SIGTERM (then SIGKILL), and SIGKILL any descendant still alive."""
        children = descendants(self.proc.pid)
        self.up.terminate(60)
        self.up.close()
        for pid in children:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
