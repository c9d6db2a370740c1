"""A fake coordinator for the client tests: a real gRPC server (CoordinatorService) that
answers canned events, fails on demand and records what it received.

It tests the client side on its own; the end-to-end test against the real coordinator
(`ditserve up`) lives with the launcher.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from conftest import error_status
from ditserve_client.proto.dit.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    image_pb2,
    stage_pb2,
    tensor_pb2,
)
from google.rpc import code_pb2
from PIL import Image

IMAGE_SIDE = 16
LATENT_SHAPE = (4, 2, 2)


def png_bytes(label: int, side: int = IMAGE_SIDE, fmt: str = "PNG") -> bytes:
    """A solid-colour image (PNG unless `fmt` says), its colour derived from the label."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (label % 256, 40, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def latents_tensor(n: int) -> tensor_pb2.Tensor:
    """FP32 (n, 4, 2, 2) holding 0, 1, 2, ... (little-endian)."""
    count = n * LATENT_SHAPE[0] * LATENT_SHAPE[1] * LATENT_SHAPE[2]
    return tensor_pb2.Tensor(datatype="FP32", shape=[n, *LATENT_SHAPE],
                             raw_contents=struct.pack(f"<{count}f", *range(count)))



@dataclass
class Behaviour:
    """How the fake answers; tests set it through `FakeCoordinator.configure`."""

    fail_generate: int = 0
    """Generate calls that fail UNAVAILABLE before any event."""
    fail_info: int = 0
    """GetModelInfo calls that fail UNAVAILABLE."""
    fail_after_accepted: bool = False
    """Generate sends Accepted, then fails UNAVAILABLE."""
    breaks: int = 0
    """Generate calls whose stream breaks (UNAVAILABLE without status details, as a
    coordinator's dying connection looks) after Accepted and `break_after` steps."""
    break_after: int = 0
    break_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    break_message: str = "Socket closed"
    generate_error: grpc.Status | None = None
    """Generate fails with this status before any event."""
    refuse_after_break: int = 0
    """Generate calls after the first that are refused before any event with this
    code (a restarted coordinator whose queue is full), RetryInfo `refuse_delay` s."""
    refuse_code: int = code_pb2.RESOURCE_EXHAUSTED
    waiting_after: int | None = None
    """After this step, a waiting notice (Progress with waiting_on "stage chain")."""
    error_after_result: grpc.Status | None = None
    """Generate sends its Result (without images), then fails with this status: the
    coordinator's answer when the decoder stayed down."""
    refuse_delay: float = 0.3
    class_names: list[str] = field(default_factory=list)
    num_classes: int = 1000
    steps: int = 4


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Canned answers; records requests, metadata and call counts."""

    def __init__(self):
        self.configure()

    def configure(self, **behaviour) -> FakeCoordinator:
        self.behaviour = Behaviour(**behaviour)
        self.requests: list[coordinator_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.generate_calls = self.info_calls = 0
        self.lock = threading.Lock()
        return self

    def Generate(self, request, context) -> Iterator[coordinator_pb2.GenerateResponse]:
        b = self.behaviour
        with self.lock:
            self.generate_calls += 1
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            failing = self.generate_calls <= b.fail_generate
            breaking = self.generate_calls - b.fail_generate <= b.breaks
            refusing = 1 < self.generate_calls <= 1 + b.refuse_after_break
        if failing:
            context.abort_with_status(error_status(code_pb2.UNAVAILABLE, "warming up", 0.01))
        if b.generate_error is not None:
            context.abort_with_status(b.generate_error)
        if refusing:
            context.abort_with_status(error_status(b.refuse_code, "queue full (64 waiting)",
                                                   b.refuse_delay))
        steps = request.num_steps or b.steps
        yield coordinator_pb2.GenerateResponse(accepted=coordinator_pb2.Accepted(
            request_id=request.request_id or "req-1", queue_position=0,
            seed=request.seed if request.HasField("seed") else 42, num_steps=steps,
            sampler=request.sampler or coordinator_pb2.SAMPLER_DDPM, guidance_scale=4.0,
            mode=request.mode or coordinator_pb2.GENERATION_MODE_EXACT,
            async_warmup_steps=(request.async_warmup_steps
                                if request.HasField("async_warmup_steps") else 2)
            if request.mode == coordinator_pb2.GENERATION_MODE_ASYNC else 0))
        if b.fail_after_accepted:
            context.abort_with_status(error_status(code_pb2.UNAVAILABLE, "stage 1 died"))
        for step in range(1, steps + 1):
            if breaking and step > b.break_after:
                context.abort(b.break_code, b.break_message)
            yield coordinator_pb2.GenerateResponse(progress=self._progress(request, step, steps))
            if step == b.waiting_after:
                yield coordinator_pb2.GenerateResponse(progress=coordinator_pb2.Progress(
                    step=step, total_steps=steps, waiting_on="stage chain",
                    waiting_reason="stage 1 at 127.0.0.1:1 is unavailable",
                    waiting_seconds=5.5))
        if b.error_after_result is not None:
            result = self._result(request)
            del result.images[:]
            yield coordinator_pb2.GenerateResponse(result=result)
            context.abort_with_status(b.error_after_result)
        yield coordinator_pb2.GenerateResponse(result=self._result(request))

    @staticmethod
    def _progress(request, step: int, steps: int) -> coordinator_pb2.Progress:
        progress = coordinator_pb2.Progress(step=step, total_steps=steps, timestep=1000 - step,
                                            elapsed_seconds=0.1 * step,
                                            eta_seconds=0.1 * (steps - step))
        every = request.preview_every or 1
        if request.preview_mode and step % every == 0:  # JPEG, as ditserve sends them
            progress.previews.extend(
                image_pb2.Image(data=png_bytes(label, 8, "JPEG"),
                                format=image_pb2.IMAGE_FORMAT_JPEG,
                                width=8, height=8, class_label=label)
                for label in request.class_labels)
        return progress

    @staticmethod
    def _result(request) -> coordinator_pb2.Result:
        result = coordinator_pb2.Result(queued_seconds=0.01, denoising_seconds=0.5,
                                        decoding_seconds=0.1, seed=request.seed)
        if not request.skip_images:
            result.images.extend(
                image_pb2.Image(data=png_bytes(label), format=image_pb2.IMAGE_FORMAT_PNG,
                                width=IMAGE_SIDE, height=IMAGE_SIDE, class_label=label)
                for label in request.class_labels)
        if request.return_latents:
            result.latents.CopyFrom(latents_tensor(len(request.class_labels)))
        return result

    def GetModelInfo(self, request, context) -> coordinator_pb2.GetModelInfoResponse:
        b = self.behaviour
        with self.lock:
            self.info_calls += 1
            failing = self.info_calls <= b.fail_info
            self.metadata.append(dict(context.invocation_metadata()))
        if failing:
            context.abort_with_status(error_status(code_pb2.UNAVAILABLE, "restarting"))
        return coordinator_pb2.GetModelInfoResponse(
            model_name="DiT-Tiny/2", image_size=IMAGE_SIDE, latent_size=2, latent_channels=4,
            model_config_json=json.dumps({"num_classes": b.num_classes, "depth": 4}),
            classes=[coordinator_pb2.ClassInfo(id=i, name=n)
                     for i, n in enumerate(b.class_names)],
            samplers=[coordinator_pb2.SAMPLER_DDPM, coordinator_pb2.SAMPLER_DDIM],
            default_steps=[250, 50], default_guidance_scale=4.0, has_decoder=True,
            stages=[stage_pb2.StageInfo(stage_index=i, num_stages=2, block_start=2 * i,
                                        block_end=2 * i + 2, depth=4, address=f"s{i}:1",
                                        device="cpu/float32", wire_datatype="BF16",
                                        serving=i == 0) for i in range(2)])


@dataclass
class FakeServer:
    """The fake coordinator serving on 127.0.0.1:port (plaintext)."""

    fake: FakeCoordinator
    address: str


def start_fake(credentials: grpc.ServerCredentials | None = None,
               ) -> tuple[grpc.Server, FakeCoordinator, int]:
    fake = FakeCoordinator()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(fake, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, fake, port


@pytest.fixture(scope="module")
def coordinator() -> Iterator[FakeServer]:
    server, fake, port = start_fake()
    try:
        yield FakeServer(fake, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake(coordinator) -> FakeCoordinator:
    """The fake, reset to its default behaviour for each test."""
    return coordinator.fake.configure()
