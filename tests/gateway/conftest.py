"""Fixtures of the gateway tests: a fake coordinator and `ditserve gateway` as a process.

- `FakeCoordinator`: a real gRPC server (CoordinatorService + grpc.health.v1) in this
  process that answers canned events, fails with any status on demand, streams slowly when
  asked, and records the metadata it received and the calls that were cancelled.
- `GatewayProcess`: `ditserve gateway --target T --listen 127.0.0.1:PORT ...` as a child
  process; `start()` waits for its start line; `stop()` leaves nothing behind.

The end-to-end tests against a real `ditserve up` are in test_live.py and test_browser.py.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import find_free_port
from ditserve.gateway.server import START_LINE
from ditserve_client.proto.dit.v1 import coordinator_pb2, coordinator_pb2_grpc, image_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

CLASS_NAMES = ["red circle", "blue square", "green triangle"]


def png_bytes(label: int, side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (80 * label % 256, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()



@dataclass
class Behaviour:
    """How the fake answers Generate."""

    error: grpc.Status | None = None
    """Fail with this status before any event."""
    error_after_accepted: grpc.Status | None = None
    """Send Accepted, then fail with this status."""
    step_seconds: float = 0.0
    """Pause between progress events (a slow request, to be cancelled)."""
    steps: int = 3


@dataclass
class Calls:
    """What the fake saw."""

    requests: list[coordinator_pb2.GenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Canned answers, failures on demand; records requests, metadata and cancellations."""

    def __init__(self) -> None:
        self.configure()

    def configure(self, **behaviour: Any) -> FakeCoordinator:
        self.behaviour, self.calls = Behaviour(**behaviour), Calls()
        return self

    def Generate(self, request, context):
        b, calls = self.behaviour, self.calls
        calls.requests.append(request)
        calls.metadata.append(dict(context.invocation_metadata()))
        # A cancelled call's generator is simply not resumed by grpc's server: the callback,
        # run when the call ends for any reason, tells a cancellation by `ended` unset.
        ended = threading.Event()
        context.add_callback(lambda: None if ended.is_set() else calls.cancelled.set())
        calls.started.set()
        if b.error is not None:
            ended.set()
            context.abort_with_status(b.error)
        steps = request.num_steps or b.steps
        yield coordinator_pb2.GenerateResponse(accepted=coordinator_pb2.Accepted(
            request_id=request.request_id or "req-1", seed=request.seed if
            request.HasField("seed") else 2**63 + 5, num_steps=steps,
            sampler=request.sampler or coordinator_pb2.SAMPLER_DDPM, guidance_scale=4.0))
        if b.error_after_accepted is not None:
            ended.set()
            context.abort_with_status(b.error_after_accepted)
        for step in range(1, steps + 1):
            if b.step_seconds:
                time.sleep(b.step_seconds)
            if not context.is_active():  # the gateway cancelled the call
                return
            progress = coordinator_pb2.Progress(step=step, total_steps=steps, timestep=999 - step,
                                                elapsed_seconds=0.1 * step)
            if request.preview_mode:
                progress.previews.extend(image_pb2.Image(data=png_bytes(label, 4), width=4,
                                                         height=4, class_label=label,
                                                         format=image_pb2.IMAGE_FORMAT_PNG)
                                         for label in request.class_labels)
            yield coordinator_pb2.GenerateResponse(progress=progress)
        result = coordinator_pb2.Result(seed=request.seed, denoising_seconds=0.5)
        result.images.extend(image_pb2.Image(data=png_bytes(label), width=16, height=16,
                                             class_label=label, format=image_pb2.IMAGE_FORMAT_PNG)
                             for label in request.class_labels)
        yield coordinator_pb2.GenerateResponse(result=result)
        ended.set()

    def GetModelInfo(self, request, context):
        self.calls.metadata.append(dict(context.invocation_metadata()))
        if self.behaviour.error is not None:
            context.abort_with_status(self.behaviour.error)
        return coordinator_pb2.GetModelInfoResponse(
            model_name="DiT-Fake/2", image_size=16, latent_size=2, latent_channels=4,
            model_config_json=json.dumps({"num_classes": len(CLASS_NAMES)}),
            classes=[coordinator_pb2.ClassInfo(id=i, name=n) for i, n in enumerate(CLASS_NAMES)],
            samplers=[coordinator_pb2.SAMPLER_DDPM, coordinator_pb2.SAMPLER_DDIM],
            default_steps=[250, 50], default_guidance_scale=4.0, has_decoder=True)


@dataclass
class FakeServer:
    fake: FakeCoordinator
    health: health.HealthServicer
    address: str


@pytest.fixture(scope="module")
def coordinator() -> Iterator[FakeServer]:
    fake, checker = FakeCoordinator(), health.HealthServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(fake, server)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeServer(fake, checker, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake(coordinator: FakeServer) -> FakeCoordinator:
    """The fake, reset to its default behaviour for each test."""
    coordinator.health.set("", health_pb2.HealthCheckResponse.SERVING)
    return coordinator.fake.configure()


def gateway_argv(target: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "ditserve.cli", "gateway", "--target", target,
            "--listen", f"127.0.0.1:{port}", "--retries", "0", *extra]


class GatewayProcess:
    """`ditserve gateway` as a child process on a free loopback port."""

    def __init__(self, target: str, log_path: Path, extra: Sequence[str] = ()):
        self.port = find_free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(gateway_argv(target, self.port, extra), stdout=self._log,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while START_LINE not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connection(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers in lower case, body) of one request; a dict body is sent as JSON."""
        connection = self.connection()
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        try:
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            connection.close()

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each Server-Sent Event in a whole stream; comments skipped."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines()
                     if line and not line.startswith(":"))
        if "data" in lines:
            events.append((lines.get("event", "message"), json.loads(lines["data"])))
    return events


@pytest.fixture(scope="module")
def gateway(coordinator: FakeServer, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway without a token check in front of the fake coordinator."""
    process = GatewayProcess(coordinator.address, tmp_path_factory.mktemp("gw") / "gw.log")
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def guarded(coordinator: FakeServer, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway that accepts the token "s3cret" (its sha256 in the tokens file)."""
    folder = tmp_path_factory.mktemp("guarded")
    tokens = folder / "tokens"
    tokens.write_text(f"# gateway tokens\n{hashlib.sha256(b's3cret').hexdigest()}  # ci\n"
                      f"{hashlib.sha256(b'other').hexdigest()}\n")
    process = GatewayProcess(coordinator.address, folder / "gw.log",
                             ["--tokens-file", str(tokens), "--cors-origin",
                              "https://app.example"])
    try:
        yield process.start()
    finally:
        process.stop()


@dataclass
class Live:
    """A real `ditserve up` (tiny model, 2 stages, decoder) and a gateway in front of it."""

    up: Any
    gateway: GatewayProcess


@pytest.fixture(scope="package")
def live(tmp_path_factory, tiny_checkpoint, tiny_vae_dir) -> Iterator[Live]:
    from conftest import UpCluster

    tmp = tmp_path_factory.mktemp("live")
    up = UpCluster(["--checkpoint", str(tiny_checkpoint), "--vae", str(tiny_vae_dir),
                    "--stages", "2", "--wire-dtype", "fp32"], tmp / "logs")
    gateway = None
    try:
        up.start()
        gateway = GatewayProcess(up.target, tmp / "gateway.log").start()
        yield Live(up, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        up.stop()
