"""Real `ditserve stage` processes on loopback: parity, multiplexing, bad input, failures.

One set of chains per module (started lazily, killed at the end by the launcher):
1, 2, 3 and 4 fp32 stages and 3 bf16 stages of the tiny test model (4 blocks).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections import defaultdict

import grpc
import pytest
import torch
from conftest import find_free_port
from ditserve.chain import check_chain
from ditserve.chain.remote import RemoteChain
from ditserve.common.errors import error_from_status
from ditserve.common.grpc_options import channel_options
from ditserve.common.status import ServiceError, StatusCode
from ditserve.stage import client as client_module
from ditserve.stage.client import StageClient
from ditserve.wire import FrameAssembler, encode_frames
from ditserve_client.proto.dit.v1 import stage_pb2, stage_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import FORWARD_BF16_WIRE, FORWARD_FP32, assert_scaled_close

MAX_BATCH = 8


@pytest.fixture(scope="module")
def chains(launcher, tiny_checkpoint):
    """(stages, wire dtype) → the chain's processes, started on first use."""
    started: dict = {}

    def get(stages: int, wire: str = "fp32"):
        if (stages, wire) not in started:
            started[stages, wire] = launcher.start_chain(
                tiny_checkpoint, stages, wire,
                extra=["--max-batch", str(MAX_BATCH), "--grace", "1"])
        return started[stages, wire]
    return get


def _inputs(config, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, config.in_channels, config.input_size, config.input_size,
                        generator=gen),
            torch.randint(0, 1000, (n,), generator=gen),
            torch.randint(0, config.num_classes + 1, (n,), generator=gen))


async def _with_chain(address, work):
    chain = RemoteChain(address)
    try:
        return await work(chain)
    finally:
        await chain.close()


@pytest.mark.parametrize(("stages", "wire", "bound"), [
    (1, "fp32", FORWARD_FP32), (2, "fp32", FORWARD_FP32), (3, "fp32", FORWARD_FP32),
    (4, "fp32", FORWARD_FP32), (3, "bf16", FORWARD_BF16_WIRE)])
def test_chain_equals_monolithic_forward(chains, tiny_model, stages, wire, bound):
    address = chains(stages, wire)[0].address
    x, t, y = _inputs(tiny_model.config, 4, seed=stages)

    async def work(chain):
        check_chain(await chain.describe(), expected_wire_dtype=wire.upper())
        return (await chain.forward(x, t, y)).out
    out = asyncio.run(_with_chain(address, work))
    reference = tiny_model(x, t, y)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert_scaled_close(out, reference, bound, f"{stages} stages, {wire} wire")


def test_32_microbatches_in_flight_come_back_matched_by_id(chains, tiny_model):
    address = chains(3)[0].address
    batches = [_inputs(tiny_model.config, 1 + i % 4, seed=100 + i) for i in range(32)]

    async def work(chain):
        return await asyncio.gather(*(chain.forward(*b, request_ids=[f"r{i}"])
                                      for i, b in enumerate(batches)))
    results = asyncio.run(_with_chain(address, work))
    for (out, seconds), batch in zip(results, batches, strict=True):
        assert_scaled_close(out, tiny_model(*batch), FORWARD_FP32)
        assert len(seconds) == 3 and all(s > 0 for s in seconds)


# -- malformed messages against live stages --------------------------------------------

def _stream(address: str, frames: list) -> dict[int, list]:
    """Sends frames on one Forward stream, half-closes, returns replies by microbatch id."""
    replies = defaultdict(list)
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        for reply in stage_pb2_grpc.StageServiceStub(channel).Forward(iter(frames), timeout=30):
            replies[reply.microbatch_id].append(reply)
    return replies


def _outcome(frames: list):
    """'INVALID_ARGUMENT' etc. for an error reply, else the reply's tensors."""
    if frames[0].HasField("error"):
        return error_from_status(frames[0].error).code
    assembler, done = FrameAssembler(), None
    for frame in frames:
        done = assembler.add(frame) or done
    return done.tensors


def _spec_frame(mb_id, specs, payload, chunk=b"", offset=0):
    return stage_pb2.ForwardRequest(microbatch_id=mb_id, payload_bytes=payload, offset=offset,
                                    tensors=[{"name": n, "datatype": d, "shape": s}
                                             for n, d, s in specs], chunk=chunk)


def _first_stage_bad(kind: str, mb_id: int) -> list:
    """One malformed stage-0 microbatch of the given kind."""
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])
    good = [("x", x), ("t", t), ("y", y)]
    if kind == "label":
        return encode_frames(stage_pb2.ForwardRequest, mb_id, [*good[:2], ("y", y + 20)])
    if kind == "timestep":
        return encode_frames(stage_pb2.ForwardRequest, mb_id, [good[0], ("t", t * 1000), good[2]])
    if kind == "batch":
        big = torch.randn(MAX_BATCH + 1, 4, 8, 8)
        n = MAX_BATCH + 1
        return encode_frames(stage_pb2.ForwardRequest, mb_id, [
            ("x", big), ("t", torch.zeros(n, dtype=torch.long)), ("y", torch.zeros(n).long())])
    if kind == "shape":
        return encode_frames(stage_pb2.ForwardRequest, mb_id, [("x", x[:, :3]), *good[1:]])
    frames = encode_frames(stage_pb2.ForwardRequest, mb_id, good, chunk_bytes=256)
    spec = [(s.name, s.datatype, list(s.shape)) for s in frames[0].tensors]
    if kind == "byte_count":
        frames[0].payload_bytes += 4
    elif kind == "dtype":
        return [_spec_frame(mb_id, [("x", "FP12", [2, 4, 8, 8]), *spec[1:]],
                            frames[0].payload_bytes)]
    elif kind == "negative_dim":
        return [_spec_frame(mb_id, [("x", "FP32", [2, -4, 8, 8]), *spec[1:]], 0)]
    elif kind == "offset":
        frames[2].offset += 1
    elif kind == "overflow":
        frames[-1].chunk += b"\0\0\0\0"
    return frames


BAD_KINDS = ["label", "timestep", "batch", "shape", "byte_count", "dtype", "negative_dim",
             "offset", "overflow"]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(kinds=st.lists(st.sampled_from(BAD_KINDS), min_size=1, max_size=4),
       interleave=st.booleans())
def test_malformed_microbatches_get_invalid_argument_and_others_carry_on(
        chains, tiny_model, kinds, interleave):
    address = chains(3)[0].address
    x, t, y = _inputs(tiny_model.config, 2, seed=7)
    good = encode_frames(stage_pb2.ForwardRequest, 1000, [("x", x), ("t", t), ("y", y)],
                         chunk_bytes=300)
    bad = [_first_stage_bad(kind, i) for i, kind in enumerate(kinds)]
    frames = [f for group in [good, *bad] for f in group]
    if interleave:  # round-robin over microbatches, keeping each one's frame order
        queues = [list(g) for g in [good, *bad]]
        frames = [q.pop(0) for _ in range(max(map(len, queues))) for q in queues if q]
    replies = _stream(address, frames)
    assert set(replies) == {1000, *range(len(kinds))}
    for i, kind in enumerate(kinds):
        assert len(replies[i]) == 1, kind
        assert _outcome(replies[i]) is StatusCode.INVALID_ARGUMENT, kind
    assert_scaled_close(_outcome(replies[1000])["out"], tiny_model(x, t, y), FORWARD_FP32)


def test_error_message_names_the_problem(chains):
    replies = _stream(chains(3)[0].address, _first_stage_bad("label", 5))
    assert replies[5][0].error.message.startswith("y: class labels must lie in [0, 10]")


def test_middle_stage_rejects_bad_activations_and_still_serves(chains, tiny_model):
    middle = chains(3)[1].address
    h, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    frames = [*encode_frames(stage_pb2.ForwardRequest, 1, [("h", h.bfloat16()), ("c", c)]),
              *encode_frames(stage_pb2.ForwardRequest, 2, [("h", h[:, :15]), ("c", c)]),
              *encode_frames(stage_pb2.ForwardRequest, 3, [("h", h), ("c", c)])]
    replies = _stream(middle, frames)
    assert "h: datatype BF16, expected FP32" in replies[1][0].error.message
    assert "h: shape [2, 15, 64], this model needs [2, 16, 64]" in replies[2][0].error.message
    assert _outcome(replies[3])["out"].shape == (2, 8, 8, 8)


def test_stage_serves_after_malformed_input(chains, tiny_model):
    address = chains(3)[0].address
    x, t, y = _inputs(tiny_model.config, 3, seed=11)
    out = asyncio.run(_with_chain(address, lambda chain: chain.forward(x, t, y)))[0]
    assert_scaled_close(out, tiny_model(x, t, y), FORWARD_FP32)


# -- failures: a stage dies and comes back; graceful stop ------------------------------

def test_killed_middle_stage_fails_in_flight_then_chain_heals(chains, launcher, tiny_model):
    chain = chains(3)
    middle = chain[1]
    x, t, y = _inputs(tiny_model.config, 2, seed=21)

    async def in_flight_then_kill(remote):
        await remote.forward(x, t, y)  # the chain works
        os.kill(middle.proc.pid, signal.SIGSTOP)  # freeze it: microbatches stay in flight
        calls = [asyncio.ensure_future(remote.forward(x, t, y)) for _ in range(8)]
        await asyncio.sleep(0.5)
        assert not any(call.done() for call in calls)
        middle.kill()
        return await asyncio.gather(*calls, return_exceptions=True)
    results = asyncio.run(_with_chain(chain[0].address, in_flight_then_kill))
    assert all(isinstance(r, ServiceError) and r.code is StatusCode.UNAVAILABLE for r in results)

    restarted = launcher.start(middle.name, middle.args, middle.address)  # same port
    chain[1] = restarted

    async def until_healed(remote):
        deadline = time.monotonic() + 15
        while True:
            try:
                return (await remote.forward(x, t, y)).out
            except ServiceError as error:
                assert error.code is StatusCode.UNAVAILABLE
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    out = asyncio.run(_with_chain(chain[0].address, until_healed))
    assert_scaled_close(out, tiny_model(x, t, y), FORWARD_FP32)


def _wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@pytest.mark.parametrize("pause_s", [None, 60.0], ids=["backoff", "long-pause"])
def test_a_next_hop_that_starts_late_costs_no_request(launcher, tiny_checkpoint, tiny_model,
                                                      monkeypatch, pause_s):
    """A stage dials its next hop as it starts, maybe before that one listens: the dials
    fail and grpc's channel backs off. A call made once the next hop serves must wait for
    the next dial, not fail at once with the last dial's stale error (as it did before,
    also through a fresh channel, which shared the old one's subchannel). With a pause
    between attempts far longer than a call waits (`pause_s`), the call must cut the pause
    short and dial at once."""
    if pause_s is not None:
        monkeypatch.setattr(client_module, "INITIAL_BACKOFF_S", pause_s)
        monkeypatch.setattr(client_module, "MAX_BACKOFF_S", pause_s)
    port = find_free_port()
    address = f"127.0.0.1:{port}"
    x, t, y = _inputs(tiny_model.config, 2, seed=23)
    tensors = [("x", x), ("t", t), ("y", y)]

    async def call_once_loaded(client):
        """The stage listens before it has loaded its weights, and refuses streams until
        then (UNAVAILABLE, "loading its weights", slow on a loaded machine): those calls
        are made again; any other failure is the test's."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return await client.call(tensors)
            except ServiceError as error:
                if "loading its weights" not in error.message or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def scenario():
        client = StageClient(address, peer="stage-0", transport="grpc")
        try:
            with pytest.raises(ServiceError) as down:  # nobody listens: a clear error
                await client.call(tensors)
            await asyncio.sleep(1.0)  # more failed dials: the channel is backing off
            launcher.start_stage(tiny_checkpoint, 0, 1, port, wait=False)
            await asyncio.to_thread(_wait_listening, port)  # call as soon as it listens
            up = await asyncio.gather(*(call_once_loaded(client) for _ in range(4)),
                                      return_exceptions=True)
            return down.value, up
        finally:
            await client.close()
    down, up = asyncio.run(scenario())
    assert down.code is StatusCode.UNAVAILABLE
    assert f"stage-0 at {address} is unreachable (" in down.message  # with the dial's error
    assert not [o for o in up if isinstance(o, BaseException)], up
    for outputs, _ in up:
        assert_scaled_close(outputs["out"], tiny_model(x, t, y), FORWARD_FP32)


def test_sigterm_goes_not_serving_and_exits_zero(chains):
    stage = chains(1)[0]  # the 1-stage chain's last use: this test stops it
    statuses = []
    watching = threading.Event()

    def watch():
        with grpc.insecure_channel(stage.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="dit.v1.StageService"), timeout=20)
            try:
                for reply in stream:
                    statuses.append(reply.status)
                    watching.set()
            except grpc.RpcError:
                pass
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)
    assert stage.terminate() == 0
    watcher.join(10)
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    assert statuses[0] == serving and not_serving in statuses[1:]
    assert "event=draining" in stage.log() and "event=stopped" in stage.log()


def test_payload_limit_scales_with_max_batch(chains):
    # A microbatch larger than max_batch rows of x is refused before any byte is buffered.
    n = MAX_BATCH * 100
    frame = _spec_frame(1, [("x", "FP32", [n, 4, 8, 8]), ("t", "INT64", [n]),
                            ("y", "INT64", [n])], n * (4 * 64 * 4 + 16))
    replies = _stream(chains(3)[0].address, [frame])
    assert "exceeds the limit" in replies[1][0].error.message
