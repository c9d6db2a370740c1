"""Faults against real processes (issue #14): a 3-stage tiny chain, a decoder and the
coordinator. Any one service SIGKILLed mid-run and restarted, or a stage SIGSTOPped for
15 s: every request finishes, with the latents of an undisturbed run of its seed. And the
public port refuses a too-large request without costing the coordinator its service."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import find_free_port
from ditserve_client.proto.dit.v1 import coordinator_pb2 as pb
from ditserve_client.proto.dit.v1 import coordinator_pb2_grpc
from numerics import assert_scaled_close, sampling_bound

from .test_service import in_process_latents, latents_of

STEPS = 12
REQUESTS = 4


@pytest.fixture(scope="module")
def cluster(launcher, tiny_checkpoint, tiny_vae_dir, tmp_path_factory):
    """name → process: stage0..stage2, decoder, coordinator."""
    stages = launcher.start_chain(tiny_checkpoint, stages=3, wire_dtype="fp32")
    decoder_port, port = find_free_port(), find_free_port()
    decoder = launcher.start("decoder", ["decoder", "--vae", str(tiny_vae_dir), "--listen",
                                         f"127.0.0.1:{decoder_port}"],
                             f"127.0.0.1:{decoder_port}")
    config = {"model": {"checkpoint": str(tiny_checkpoint)}, "wire_dtype": "fp32",
              "stages": [{"address": s.address} for s in stages],
              "decoder": {"address": decoder.address},
              "coordinator": {"address": f"127.0.0.1:{port}", "default_sampler": "ddim",
                              "max_rows_per_microbatch": 8}}
    path = tmp_path_factory.mktemp("cfg") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    coordinator = launcher.start("coordinator", [
        "coordinator", "--config", str(path), "--listen", f"127.0.0.1:{port}",
        "--decoder", decoder.address], f"127.0.0.1:{port}")
    return {"stage0": stages[0], "stage1": stages[1], "stage2": stages[2],
            "decoder": decoder, "coordinator": coordinator}


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(cluster["coordinator"].address)
    yield coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def expected(tiny_model):
    return [in_process_latents(tiny_model, [i], seed=100 + i, steps=STEPS)
            for i in range(REQUESTS)]


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(class_labels=[i], seed=100 + i, num_steps=STEPS,
                              sampler=pb.SAMPLER_DDIM, return_latents=True)


def run_requests(stub, disturb, at_step: int = 4) -> list[list[pb.GenerateResponse]]:
    """REQUESTS concurrent requests; `disturb(denoised)` runs once one of them reaches
    `at_step`; `denoised` is set once every request has had its last step."""
    reached, denoised, last_steps = threading.Event(), threading.Event(), []

    def one(i):
        events = []
        for event in stub.Generate(request(i), timeout=180):
            events.append(event)
            step = event.progress.step if event.WhichOneof("event") == "progress" else 0
            if step == at_step:
                reached.set()
            if step == STEPS:
                last_steps.append(i)
                if len(last_steps) == REQUESTS:
                    denoised.set()
        return events

    with ThreadPoolExecutor(REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(REQUESTS)]
        assert reached.wait(120)
        disturb(denoised)
        return [f.result() for f in futures]


def check(results, expected) -> None:
    for i, events in enumerate(results):
        assert events[-1].HasField("result"), f"request {i}: {events[-1]}"
        assert len(events[-1].result.images) == 1
        assert_scaled_close(latents_of(events), expected[i], sampling_bound(STEPS, 4.0),
                            f"request {i}")


def restart(process) -> None:
    process.start()
    process.wait_healthy()


@pytest.mark.parametrize("target", ["stage0", "stage1", "stage2"])
def test_a_stage_killed_mid_run_is_waited_for(cluster, stub, expected, target):
    """Down ~9 s or more (longer than the old retry budget of ~7 s), then back."""
    def disturb(_):
        cluster[target].kill()
        time.sleep(8)
        restart(cluster[target])

    check(run_requests(stub, disturb), expected)


def test_the_decoder_killed_mid_run_loses_no_latents(cluster, stub, expected):
    """Killed during denoising, restarted only after every request is denoised: each
    request's decode waits for it."""
    def disturb(denoised):
        cluster["decoder"].kill()
        assert denoised.wait(120)
        time.sleep(2)
        restart(cluster["decoder"])

    check(run_requests(stub, disturb), expected)
    assert "waiting_on_peer" in cluster["coordinator"].log()


def stage_serving(stub) -> list[bool]:
    return [s.serving for s in stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=20).stages]


def test_a_frozen_stage_stalls_requests_then_they_finish(cluster, stub, expected):
    """SIGSTOP stage 1 for 15 s: the coordinator notices within ~10 s (a warning naming
    the wait), GetModelInfo says stage 1 is not serving, and after SIGCONT every request
    finishes with the undisturbed latents."""
    coordinator, frozen = cluster["coordinator"], cluster["stage1"]
    seen = {}

    def disturb(_):
        log_before = len(coordinator.log(1 << 30))
        os.kill(frozen.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            while time.monotonic() - stopped < 14:
                if "waiting_on_peer" in coordinator.log(1 << 30)[log_before:]:
                    seen.setdefault("noticed", time.monotonic() - stopped)
                if "noticed" in seen and "serving" not in seen:
                    seen["serving"] = stage_serving(stub)
                time.sleep(0.2)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)

    results = run_requests(stub, disturb)
    print(f"frozen stage noticed after {seen.get('noticed', -1):.1f} s")
    assert seen.get("noticed", 99) < 12
    assert seen["serving"] == [True, False, True]
    check(results, expected)
    assert stage_serving(stub) == [True, True, True]


def rss_mb(pid: int) -> float:
    status = (Path("/proc") / str(pid) / "status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:"))) / 1024


def test_too_large_requests_are_refused_and_the_coordinator_serves_on(cluster, stub):
    """10 concurrent 60 MB GenerateRequests (the public limit was 64 MiB): each refused
    RESOURCE_EXHAUSTED, the coordinator's memory barely moves, and it serves on."""
    huge = pb.GenerateRequest(class_labels=[1], request_id="x" * (60 << 20))
    before = rss_mb(cluster["coordinator"].pid)

    def send(_):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(huge, timeout=60))
        return refused.value.code()

    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(send, range(10)))
    after = rss_mb(cluster["coordinator"].pid)
    print(f"coordinator RSS {before:.0f} MB -> {after:.0f} MB")
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 10
    # Measured here: +20..115 MB; with the old 64 MiB limit +364 MB (the issue saw +1.3 GB).
    assert after - before < 250
    events = list(stub.Generate(request(1), timeout=60))
    assert events[-1].HasField("result")
