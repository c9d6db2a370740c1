"""The cuda_ipc data path between real stage processes (wire/cuda_ipc.py).

No GPU here: the CUDA calls themselves (cudaIpcGetMemHandle / OpenMemHandle through torch)
never run in these tests. The stages are started with `--handoff cpu-shared`, which runs
the same protocol (the CUDA probe at stream open, handles in frames, import and copy at
the receiver, acknowledgement by the reply, the sender's bounded ledger, fallbacks) with
torch's own CPU shared memory in place of CUDA IPC handles. The tests marked `needs_cuda`
run the real thing on a machine with a GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import time
import urllib.request
import weakref

import grpc
import pytest
import torch
from conftest import find_free_port
from ditserve.chain import RemoteChain
from ditserve.common.status import ServiceError, StatusCode
from ditserve.stage.client import StageClient
from ditserve.wire import lean_frames
from ditserve.wire.cuda_ipc import CPU_SHARED, MAX_HANDLE_BYTES, probe_token
from ditserve.wire.shm import SHM_DIR, ShmRing
from ditserve_client.proto.dit.v1 import stage_pb2, stage_pb2_grpc

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this machine")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EMULATED = ["--transport", "auto", "--handoff", "cpu-shared"]


def _inputs(n: int = 3, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [("x", torch.randn(n, 4, 8, 8, generator=gen)),
            ("t", torch.randint(0, 1000, (n,), generator=gen)),
            ("y", torch.randint(0, 10, (n,), generator=gen))]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for line in text.splitlines()
            if (m := re.match(r"^(dit_[^ ]+) ([0-9.e+-]+)$", line))}


def _paths(log: str) -> list[tuple[str, str]]:
    """(path, reason) of every data_path line of a stage's log."""
    return re.findall(r"event=data_path peer=\S+ path=(\S+) transport=\S+ reason=(\"[^\"]*\"|\S+)",
                      log)


class Recording:
    """CPU_SHARED, remembering every tensor its export keeps alive (as weak references)."""

    def __init__(self):
        self.kept: list[weakref.ref] = []
        self.handoff = dataclasses.replace(CPU_SHARED, export=self.export)

    def export(self, tensor):
        handle, kept = CPU_SHARED.export(tensor)
        self.kept.append(weakref.ref(kept))
        return handle, kept


async def _client_call(address: str, handoff=CPU_SHARED, batches=None, transport="auto",
                       **options):
    """Each batch through one StageClient, at once; returns (outputs, negotiated path,
    microbatches its ledger still holds once every reply is in, before it closes)."""
    client = StageClient(address, peer="stage-0", transport=transport, handoff=handoff,
                         **options)
    try:
        await client.wait_connected(30)
        replies = await asyncio.gather(*(client.call(b) for b in batches or [_inputs()]))
        held = client._ledger.outstanding if client._ledger is not None else None
        return [out for out, _ in replies], client.negotiated, held
    finally:
        await client.close()


# -- a real 3-stage chain on the cuda_ipc path, beside one on gRPC bytes --

@pytest.fixture(scope="module")
def chains(launcher, tiny_checkpoint):
    handed = launcher.start_chain(tiny_checkpoint, 3, "bf16", extra=EMULATED)
    grpc_chain = launcher.start_chain(tiny_checkpoint, 3, "bf16", extra=["--transport", "grpc"])
    return handed, grpc_chain


async def _forward(address: str, calls: int = 3) -> list[torch.Tensor]:
    chain = RemoteChain(address)
    try:
        await chain.wait_connected(30)
        x, t, y = (v for _, v in _inputs())
        outs = await asyncio.gather(*(chain.forward(x, t, y) for _ in range(calls)))
        return [o.out for o in outs]
    finally:
        await chain.close()


def test_the_handoff_path_is_bit_identical_to_grpc_and_every_hop_uses_it(chains):
    handed, by_grpc = chains
    ipc, reference = asyncio.run(_forward(handed[0].address)), asyncio.run(_forward(by_grpc[0].address))
    for a, b in zip(ipc, reference, strict=True):
        assert torch.equal(a, b)  # the same numbers through device handles: bit-identical
    for stage in handed[:2]:  # each hop: stage 0 → 1 and 1 → 2 (1 relays what it received)
        assert [p for p, _ in _paths(stage.log())] == ["cuda_ipc"]
    for stage in handed[1:]:
        assert "event=cuda_ipc_negotiated" in stage.log()
    for stage in by_grpc[:2]:
        assert _paths(stage.log()) == [("grpc", '"transport is grpc"')]


def test_acknowledgements_free_the_senders_tensors(chains):
    handed, by_grpc = chains
    recording = Recording()
    batches = [_inputs(2, seed) for seed in range(4)]

    async def run():
        client = StageClient(handed[0].address, peer="stage-0", transport="auto",
                             handoff=recording.handoff)
        try:
            replies = await asyncio.gather(*(client.call(b) for b in batches))
            # Every reply is in and the stream still open: the acknowledgements alone
            # (not the stream's end) must have let go of every exported tensor.
            alive = [ref() is not None for ref in recording.kept]
            return [out["out"] for out, _ in replies], client.negotiated, alive
        finally:
            await client.close()

    outputs, path, alive = asyncio.run(run())
    reference, grpc_path, _ = asyncio.run(_client_call(by_grpc[0].address, batches=batches,
                                                       transport="grpc"))
    assert path == "cuda_ipc" and grpc_path == "grpc"
    for a, b in zip(outputs, reference, strict=True):
        assert torch.equal(a, b["out"])
    # The probe and 4 microbatches x 3 tensors exported; each freed once answered.
    assert len(alive) == 1 + 4 * 3 and not any(alive)


def test_a_stage_keeps_nothing_held_once_answered(launcher, tiny_checkpoint):
    metrics = find_free_port()
    ports = [find_free_port() for _ in range(2)]
    first = launcher.start_stage(tiny_checkpoint, 0, 2, ports[0], ports[1], "bf16",
                                 [*EMULATED, "--metrics-port", str(metrics)], wait=False)
    second = launcher.start_stage(tiny_checkpoint, 1, 2, ports[1], None, "bf16", EMULATED,
                                  wait=False)
    first.wait_healthy()
    second.wait_healthy()
    assert len(asyncio.run(_forward(first.address, calls=5))) == 5
    samples = _scrape(metrics)
    assert samples['dit_microbatches_sent_total{path="cuda_ipc",peer="stage-1"}'] == 5
    assert samples['dit_data_path_streams{path="cuda_ipc",peer="stage-1"}'] == 1
    assert samples['dit_handoffs_held{peer="stage-1"}'] == 0  # every reply acknowledged


# -- fallbacks, with the reason said --

def test_cpu_stages_without_the_emulation_use_shm_and_say_why(launcher, tiny_checkpoint):
    chain = launcher.start_chain(tiny_checkpoint, 2, "bf16", extra=["--transport", "auto"])
    assert len(asyncio.run(_forward(chain[0].address, calls=2))) == 2
    [(path, reason)] = _paths(chain[0].log())
    assert path == "shm" and "no CUDA probe offered" in reason and "cpu" in reason
    # A sender that offers a handoff the stage does not open: shm, and the stage's reason.
    outputs, negotiated, _ = asyncio.run(_client_call(chain[0].address))
    assert negotiated == "shm" and outputs[0]["out"].shape[0] == 3
    assert "event=cuda_ipc_refused" in chain[0].log()
    assert "this stage opens 'cuda'" in chain[0].log()


@pytest.fixture(scope="module")
def single(launcher, tiny_checkpoint):
    """Stage 0 of 1 with the emulated handoff (a client in the test is its sender)."""
    return launcher.start_stage(tiny_checkpoint, 0, 1, find_free_port(), None, "fp32", EMULATED)


def test_a_full_ledger_sends_the_rest_by_the_fallback_path(single):
    batches = [_inputs(2, seed) for seed in range(4)]

    async def run():
        client = StageClient(single.address, peer="stage-0", transport="auto",
                             handoff=CPU_SHARED, max_handoffs=1)
        try:
            await client.wait_connected(30)
            await client.call(batches[0])  # negotiated, and the stage warm
            assert client.negotiated == "cuda_ipc"
            os.kill(single.pid, signal.SIGSTOP)  # no reply can come: the ledger stays full
            try:
                calls = [asyncio.create_task(client.call(b)) for b in batches]
                await _until(lambda: len(client._inflight) == 4)
                held = client._ledger.outstanding
            finally:
                os.kill(single.pid, signal.SIGCONT)
            replies = await asyncio.gather(*calls)
            return held, [out["out"] for out, _ in replies], client._ledger.outstanding
        finally:
            await client.close()

    async def reference():
        client = StageClient(single.address, peer="stage-0", transport="grpc")
        try:
            return [(await client.call(b))[0]["out"] for b in batches]
        finally:
            await client.close()

    held, outputs, left = asyncio.run(run())
    assert held == 1 and left == 0  # one handed over, three by slot; all acknowledged
    for a, b in zip(outputs, asyncio.run(reference()), strict=True):
        assert torch.equal(a, b)


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_stream_that_dies_releases_every_tensor_it_held(launcher, tiny_checkpoint):
    stage = launcher.start_stage(tiny_checkpoint, 0, 1, find_free_port(), None, "fp32", EMULATED)
    recording = Recording()

    async def run():
        client = StageClient(stage.address, peer="stage-0", transport="auto",
                             handoff=recording.handoff)
        try:
            await client.wait_connected(30)
            await client.call(_inputs(1))
            os.kill(stage.pid, signal.SIGSTOP)
            calls = [asyncio.create_task(client.call(_inputs(2, s))) for s in range(4)]
            await _until(lambda: client._ledger is not None and client._ledger.outstanding == 4)
            os.kill(stage.pid, signal.SIGKILL)  # the receiver dies holding 4 microbatches
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results, client._ledger
        finally:
            await client.close()

    results, ledger = asyncio.run(run())
    assert all(isinstance(r, ServiceError) and r.code == StatusCode.UNAVAILABLE for r in results)
    assert ledger is None  # dropped with its stream
    assert len(recording.kept) == 1 + 3 + 4 * 3 and all(ref() is None for ref in recording.kept)


# -- a peer's handles are data: refused per microbatch, the stream goes on --

def _handle_doc(**changes) -> bytes:
    handle, _ = CPU_SHARED.export(torch.zeros(3, 4, 8, 8))
    doc = json.loads(handle.to_bytes())
    doc.update(changes)
    return json.dumps(doc).encode()


def test_bad_handles_are_refused_by_name_and_the_stream_goes_on(single):
    x, t, y = (v for _, v in _inputs())
    exported = [CPU_SHARED.export(v) for v in (x, t, y)]  # kept alive to the end
    good = lean_frames(stage_pb2.ForwardRequest, 9, [("x", x), ("t", t), ("y", y)],
                       handles=[handle for handle, _ in exported])[0].header
    bad = {
        1: [b"{" + b" " * MAX_HANDLE_BYTES + b"}", good.cuda_handles[1], good.cuda_handles[2]],
        2: [good.cuda_handles[0], _handle_doc(dtype="COMPLEX"), good.cuda_handles[2]],
        3: [good.cuda_handles[0], good.cuda_handles[1], b"\x80\x04pickle"],
        4: [good.cuda_handles[0], good.cuda_handles[1]],
        5: [_handle_doc(handle=b"/torch_1_2_3".hex()), good.cuda_handles[1],
            good.cuda_handles[2]],
    }

    async def run():
        ring = ShmRing(1 << 16, 1)
        token = probe_token()
        probe, kept = CPU_SHARED.export(torch.frombuffer(bytearray(token), dtype=torch.uint8))
        offer = stage_pb2.ForwardRequest(
            shm_offer=stage_pb2.ShmOffer(segment=ring.name, token=ring.token,
                                         slot_bytes=ring.slot_bytes, slots=ring.slots),
            cuda_offer=stage_pb2.CudaOffer(method="cpu-shared", probe=probe.to_bytes(),
                                           token=token))
        frames = [offer]
        for mb_id, handles in bad.items():
            frame = stage_pb2.ForwardRequest()
            frame.CopyFrom(good)
            frame.microbatch_id = mb_id
            del frame.cuda_handles[:]
            frame.cuda_handles.extend(handles)
            frames.append(frame)
        frames.append(good)
        async with grpc.aio.insecure_channel(single.address) as channel:
            call = stage_pb2_grpc.StageServiceStub(channel).Forward(iter(frames))
            replies = {}
            async for reply in call:
                replies[reply.microbatch_id] = reply
                if len(replies) == len(frames):
                    break
            call.cancel()
        ring.close()
        del kept
        return replies

    replies = asyncio.run(run())
    del exported
    assert replies[0].shm_answer.accepted and replies[0].cuda_answer.accepted
    expected = {1: "cuda_handles[0] (x): CUDA IPC handle of", 2: "cuda_handles[1] (t): ",
                3: "cuda_handles[2] (y): malformed", 4: "cuda_handles: 2 handles for 3",
                5: "cuda_handles[0] (x): cannot open"}
    for mb_id, text in expected.items():
        error = replies[mb_id].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], error
        assert text in error.message
    assert "unknown datatype 'COMPLEX'" in replies[2].error.message
    assert not replies[9].HasField("error") and replies[9].tensors[0].name == "out"


def test_a_probe_is_answered_only_when_it_reads_back(single):
    """The probe is opened and copied by the receiver: 16 bytes, or refused."""
    token = probe_token()
    small, kept = CPU_SHARED.export(torch.frombuffer(bytearray(token), dtype=torch.uint8))
    big, big_kept = CPU_SHARED.export(torch.zeros(1 << 20, dtype=torch.uint8))
    other, other_kept = CPU_SHARED.export(torch.zeros(16, dtype=torch.uint8))

    async def answer(probe: bytes, method: str = "cpu-shared") -> stage_pb2.CudaAnswer:
        ring = ShmRing(1 << 16, 1)
        offer = stage_pb2.ForwardRequest(
            shm_offer=stage_pb2.ShmOffer(segment=ring.name, token=ring.token,
                                         slot_bytes=ring.slot_bytes, slots=ring.slots),
            cuda_offer=stage_pb2.CudaOffer(method=method, probe=probe, token=token))
        try:
            async with grpc.aio.insecure_channel(single.address) as channel:
                call = stage_pb2_grpc.StageServiceStub(channel).Forward(iter([offer]))
                reply = await call.read()
                call.cancel()
                return reply.cuda_answer
        finally:
            ring.close()

    assert asyncio.run(answer(small.to_bytes())).accepted
    refusals = {"must be 16 UINT8 bytes": big.to_bytes(),
                "could not open the probe": other.to_bytes(),  # another process's bytes
                "malformed": b"not json", "this stage opens 'cpu-shared'": small.to_bytes()}
    for words, probe in refusals.items():
        refused = asyncio.run(answer(probe, "cuda" if "opens" in words else "cpu-shared"))
        assert not refused.accepted and words in refused.reason and refused.device == "cpu"
    del kept, big_kept, other_kept


# -- the real CUDA IPC path (a GPU machine runs these) --

@needs_cuda
def test_cuda_stages_hand_over_by_cuda_ipc_bit_identical_to_grpc(launcher, tiny_checkpoint):
    device = ["--device", "cuda"]
    handed = launcher.start_chain(tiny_checkpoint, 2, "bf16", extra=[*device, "--transport", "auto"])
    by_grpc = launcher.start_chain(tiny_checkpoint, 2, "bf16", extra=[*device, "--transport", "grpc"])
    ipc, reference = asyncio.run(_forward(handed[0].address)), asyncio.run(_forward(by_grpc[0].address))
    for a, b in zip(ipc, reference, strict=True):
        assert torch.equal(a, b)
    assert [p for p, _ in _paths(handed[0].log())] == ["cuda_ipc"]
    assert "event=cuda_ipc_negotiated" in handed[1].log()


@needs_cuda
def test_a_cuda_client_hands_device_tensors_to_a_cuda_stage(launcher, tiny_checkpoint):
    stage = launcher.start_stage(tiny_checkpoint, 0, 1, find_free_port(), None, "fp32",
                                 ["--device", "cuda", "--transport", "auto"])
    batch = [(name, tensor.cuda()) for name, tensor in _inputs()]
    from ditserve.wire.cuda_ipc import CUDA_IPC

    outputs, path, held = asyncio.run(_client_call(stage.address, CUDA_IPC, [batch],
                                                   device="cuda"))
    reference, _, _ = asyncio.run(_client_call(stage.address, CUDA_IPC, [_inputs()]))
    assert path == "cuda_ipc" and held == 0  # handed over, and acknowledged
    assert torch.equal(outputs[0]["out"], reference[0]["out"])
