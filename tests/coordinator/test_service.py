"""The coordinator as a process over a real 2-stage chain: the gRPC API end to end,
validation, admission, deadlines, and a stage killed and restarted mid-generation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
import yaml
from conftest import find_free_port
from ditserve.config import CoordinatorConfig
from ditserve.coordinator.engine import Engine
from ditserve.wire import decode_tensor
from ditserve_client.proto.dit.v1 import coordinator_pb2 as pb
from ditserve_client.proto.dit.v1 import coordinator_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from numerics import assert_scaled_close, sampling_bound

from .helpers import ModelChain, collect, spec

MAX_QUEUED = 6


@pytest.fixture(scope="module")
def pipeline(launcher, tiny_checkpoint, tmp_path_factory):
    stages = launcher.start_chain(tiny_checkpoint, stages=2, wire_dtype="fp32")
    port = find_free_port()
    config = {"model": {"checkpoint": str(tiny_checkpoint)}, "wire_dtype": "fp32",
              "stages": [{"address": s.address} for s in stages],
              "coordinator": {"address": f"127.0.0.1:{port}", "max_queued_requests": MAX_QUEUED,
                              "max_rows_per_microbatch": 8,
                              "default_sampler": "ddim"}}
    path = tmp_path_factory.mktemp("cfg") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    coordinator = launcher.start("coordinator", ["coordinator", "--config", str(path),
                                                 "--listen", f"127.0.0.1:{port}",
                                                 "--decoder", ""], f"127.0.0.1:{port}")
    return coordinator, stages


@pytest.fixture(scope="module")
def stub(pipeline):
    channel = grpc.insecure_channel(pipeline[0].address)
    yield coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    channel.close()


def request(labels, seed=0, steps=4, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(class_labels=labels, seed=seed, num_steps=steps,
                              sampler=pb.SAMPLER_DDIM, skip_images=True, return_latents=True,
                              **fields)


def generate(stub, message, timeout=60.0) -> list[pb.GenerateResponse]:
    return list(stub.Generate(message, timeout=timeout))


def latents_of(events) -> torch.Tensor:
    tensor = events[-1].result.latents
    return decode_tensor(tensor.datatype, tensor.shape, tensor.raw_contents).clone()


def in_process_latents(model, labels, seed, steps, scale=4.0, stages=1,
                       **fields) -> torch.Tensor:
    async def main():
        engine = Engine(ModelChain(model), model.config, CoordinatorConfig(), num_stages=stages)
        return await collect(engine, spec(labels, seed=seed, steps=steps, scale=scale, **fields))

    return asyncio.run(main()).result.latents


def test_generate_streams_accepted_progress_result(stub, tiny_model):
    events = generate(stub, request([1, 2], seed=5, steps=4,
                                    preview_mode=pb.PREVIEW_MODE_APPROXIMATE, preview_every=2))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["accepted"] + ["progress"] * 4 + ["result"]
    assert events[0].accepted.seed == 5 and events[0].accepted.num_steps == 4
    progress = [e.progress for e in events[1:5]]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert [len(p.previews) for p in progress] == [0, 2, 0, 2]
    assert progress[1].previews[0].data[:2] == b"\xff\xd8"  # JPEG
    # Two stages over an fp32 wire equal one process to float32 rounding.
    expected = in_process_latents(tiny_model, [1, 2], seed=5, steps=4)
    assert_scaled_close(latents_of(events), expected, sampling_bound(4, 4.0), "2 stages vs 1 process")


def test_the_coordinator_reaches_stage_0_through_shared_memory(stub, pipeline):
    """One host and `transport: auto` (the default): the coordinator's hop to stage 0 takes
    the ring and its doorbell, as the stages' hops do (the parity tests of this module run
    over it; the stage's reply says it read the slot)."""
    coordinator, stages = pipeline
    generate(stub, request([1], seed=3))
    log = coordinator.log()
    assert "event=data_path peer=stage-0 path=shm" in log
    assert "event=shm_negotiated peer=stage-0" in log and "event=doorbell_open peer=stage-0" in log
    assert "event=shm_refused" not in stages[0].log()


@pytest.mark.parametrize(("transport", "taken"), [("auto", "auto"), ("shm", "auto"),
                                                  ("grpc", "grpc")])
def test_the_coordinators_hop_follows_the_pipeline_transport(transport, taken):
    """`shm` requires shared memory between stages only: a coordinator on another host
    still reaches stage 0 (auto); `grpc` keeps it to bytes."""
    from ditserve.config import PipelineConfig, StageConfig
    from ditserve.coordinator.server import CoordinatorOptions, build_chain

    async def main() -> str:
        config = PipelineConfig(stages=[StageConfig(address="127.0.0.1:1")],
                                transport=transport)
        chain = build_chain(CoordinatorOptions(config, "127.0.0.1:2", stage0="127.0.0.1:1"))
        await chain.close()
        return chain._client.transport

    assert asyncio.run(main()) == taken


def test_model_info_lists_the_chain_and_classes(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.latent_size == 8 and info.image_size == 64 and len(info.classes) == 10
    assert [(s.block_start, s.block_end, s.serving) for s in info.stages] == [
        (0, 2, True), (2, 4, True)]
    assert pb.SAMPLER_DPM_SOLVER_PP in info.samplers and not info.has_decoder
    assert list(info.modes) == [pb.GENERATION_MODE_EXACT, pb.GENERATION_MODE_ASYNC]
    assert info.default_async_warmup_steps == CoordinatorConfig().default_async_warmup_steps


def test_async_mode_end_to_end_says_which_mode_runs(stub, tiny_model):
    events = generate(stub, request([3, 4], seed=8, steps=6, mode=pb.GENERATION_MODE_ASYNC,
                                    async_warmup_steps=1))
    accepted = events[0].accepted
    assert (accepted.mode, accepted.async_warmup_steps) == (pb.GENERATION_MODE_ASYNC, 1)
    assert [e.progress.step for e in events[1:-1]] == list(range(1, 7))
    # The 2 stages pipeline 2 calls; one process planning the same calls gives the same
    # latents to float32 rounding.
    expected = in_process_latents(tiny_model, [3, 4], seed=8, steps=6, stages=2,
                                  mode="async", async_warmup_steps=1)
    assert_scaled_close(latents_of(events), expected, sampling_bound(6, 4.0), "async, 2 stages")
    exact = generate(stub, request([3, 4], seed=8, steps=6))
    assert exact[0].accepted.mode == pb.GENERATION_MODE_EXACT
    assert not torch.equal(latents_of(exact), latents_of(events))


@pytest.mark.parametrize("fields, field", [
    ({"class_labels": []}, "class_labels"),
    ({"class_labels": [10]}, "class_labels"),
    ({"class_labels": list(range(10)) * 2}, "class_labels"),
    ({"num_steps": 5000}, "num_steps"),
    ({"sampler": 9}, "sampler"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": 1e38}, "guidance_scale: must be a number from 1 to 10000"),
    ({"image_quality": 101}, "image_quality"),
    ({"guidance_channels": 7}, "guidance_channels"),
    ({"preview_mode": 9}, "preview_mode"),
    ({"mode": 5}, "mode: unknown value 5"),
    ({"mode": pb.GENERATION_MODE_ASYNC, "async_warmup_steps": 9}, "async_warmup_steps"),
])
def test_invalid_requests_name_the_field(stub, fields, field):
    message = request([1])
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(message, name)[:]
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    with pytest.raises(grpc.RpcError) as failure:
        generate(stub, message)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.value.details()


def test_images_without_a_decoder_fail_precondition(stub):
    with pytest.raises(grpc.RpcError) as failure:
        generate(stub, pb.GenerateRequest(class_labels=[1], num_steps=2))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_queue_full_is_resource_exhausted_with_retry_info(stub):
    calls = [stub.Generate(request([i % 10], seed=i, steps=300), timeout=60)
             for i in range(MAX_QUEUED)]
    for call in calls:
        next(call)  # accepted: all admitted
    with pytest.raises(grpc.RpcError) as failure:
        generate(stub, request([1], steps=2))
    for call in calls:
        call.cancel()
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(failure.value)
    hints = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert hints, "no RetryInfo in the status details"
    # Cancelled requests free their slots at the next step boundary.
    deadline = time.monotonic() + 10
    while True:
        try:
            generate(stub, request([1], steps=2))
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "slots were not freed after cancellation"
            time.sleep(0.1)


def test_deadline_is_honoured(stub):
    with pytest.raises(grpc.RpcError) as failure:
        generate(stub, request([3], steps=1000), timeout=0.5)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert generate(stub, request([3], steps=2))[-1].HasField("result")


def test_stage_killed_and_restarted_mid_generation(stub, pipeline, launcher, tiny_checkpoint,
                                                   tiny_model):
    _, stages = pipeline
    last = stages[1]
    port = int(last.address.rsplit(":", 1)[1])
    progressed = threading.Event()

    def run(i):
        events = []
        for event in stub.Generate(request([i], seed=i, steps=40), timeout=120):
            events.append(event)
            if event.WhichOneof("event") == "progress" and event.progress.step == 5:
                progressed.set()
        return events

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(run, i) for i in range(4)]
        assert progressed.wait(60)
        last.kill()
        launcher.start_stage(tiny_checkpoint, 1, 2, port, wire_dtype="fp32")
        results = [f.result() for f in futures]
    for i, events in enumerate(results):
        expected = in_process_latents(tiny_model, [i], seed=i, steps=40)
        # 40 steps batched differently (GEMM shapes) compound float32 rounding.
        assert_scaled_close(latents_of(events), expected, sampling_bound(40, 4.0), f"request {i}")


def test_refuses_to_start_on_a_mismatched_chain(pipeline, tmp_path):
    _, stages = pipeline
    # The stages run an fp32 wire; a bf16 pipeline config must fail the handshake.
    config = {"wire_dtype": "bf16", "stages": [{"address": s.address} for s in stages]}
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "ditserve.cli", "coordinator", "--config",
                           str(path), "--listen", f"127.0.0.1:{find_free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "FAILED_PRECONDITION" in done.stderr and "wire dtype" in done.stderr


def test_local_mode_serves_the_whole_model_in_process(launcher, tiny_checkpoint, tiny_model):
    port = find_free_port()
    launcher.start("coordinator-local", ["coordinator", "--local", "--checkpoint",
                                         str(tiny_checkpoint), "--listen", f"127.0.0.1:{port}",
                                         "--local-stages", "2"], f"127.0.0.1:{port}")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        local = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        assert len(local.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).stages) == 2
        events = generate(local, request([4], seed=8, steps=3, guidance_scale=1.0))
    # bf16 between the emulated stages (the default wire): within the documented bound.
    expected = in_process_latents(tiny_model, [4], seed=8, steps=3, scale=1.0)
    relative = (latents_of(events) - expected).abs().max() / expected.abs().max()
    assert relative <= 0.02


def test_cli_without_config_is_a_one_line_error():
    done = subprocess.run([sys.executable, "-m", "ditserve.cli", "coordinator"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--config is required" in done.stderr
