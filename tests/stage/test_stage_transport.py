"""The data plane between real stage processes: shared memory negotiated by the probe
carries exactly the bytes gRPC would, `transport: shm` refuses to fall back, and no
/dev/shm segment survives a stopped chain or a SIGKILLed stage.

Two 3-stage bf16 chains of the tiny model (auto, grpc) and one 2-stage auto chain to kill.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from ditserve.chain import RemoteChain
from ditserve.common.status import ServiceError, StatusCode
from ditserve.stage import client as client_module
from ditserve.stage.client import StageClient
from ditserve.wire.shm import SHM_DIR, ShmRing

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm on this machine")


def _segments(pids: list[int]) -> list[Path]:
    """ditserve segments created by these processes (others' tests may run beside)."""
    return [p for pid in pids for p in SHM_DIR.glob(f"ditserve-{pid}-*")]


def _inputs(n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return (torch.randn(n, 4, 8, 8, generator=gen), torch.randint(0, 1000, (n,), generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


async def _forward(address: str, calls: int = 3) -> list[torch.Tensor]:
    chain = RemoteChain(address)
    try:
        await chain.wait_connected(30)
        x, t, y = _inputs()
        outs = await asyncio.gather(*(chain.forward(x, t, y) for _ in range(calls)))
        return [o.out for o in outs]
    finally:
        await chain.close()


async def _doorbell_open(client: StageClient, timeout: float = 10) -> None:
    """Waits until the client's doorbell took its ACK (frames then go that way)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (client._bell is not None and client._bell.open):
        assert asyncio.get_running_loop().time() < deadline, "the doorbell never opened"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def chains(launcher, tiny_checkpoint):
    auto = launcher.start_chain(tiny_checkpoint, 3, "bf16", extra=["--transport", "auto"])
    grpc = launcher.start_chain(tiny_checkpoint, 3, "bf16", extra=["--transport", "grpc"])
    return auto, grpc


def test_shared_memory_carries_the_same_bytes_as_grpc(chains):
    auto, grpc = chains
    by_shm, by_grpc = asyncio.run(_forward(auto[0].address)), asyncio.run(_forward(grpc[0].address))
    for a, b in zip(by_shm, by_grpc, strict=True):
        assert torch.equal(a, b)  # the same bytes through another path: bit-identical
    for stage in auto[:2]:  # each stage with a next hop negotiated shm, probe and all
        assert "event=shm_negotiated" in stage.log() and "doorbell=True" in stage.log()
        assert "event=data_path peer=stage-" in stage.log() and " path=shm " in stage.log()
    assert not any("shm_negotiated" in stage.log() for stage in grpc)


def test_shm_transport_refuses_a_peer_that_shares_no_memory(chains, tmp_path, monkeypatch,
                                                            caplog):
    auto, _ = chains
    # The ring lives in a folder the stage never looks in: as on another host.
    monkeypatch.setattr(client_module, "ShmRing", functools.partial(ShmRing, directory=tmp_path))
    x, t, y = _inputs(1)

    async def call(transport: str):
        client = StageClient(auto[0].address, peer="stage-0", transport=transport)
        try:
            await client.wait_connected(30)
            out = await client.call([("x", x), ("t", t), ("y", y)])
            return out, client.negotiated
        finally:
            await client.close()

    with pytest.raises(ServiceError) as refused:
        asyncio.run(call("shm"))
    assert refused.value.code == StatusCode.FAILED_PRECONDITION
    assert "shares no memory" in refused.value.message and "cannot open" in refused.value.message
    caplog.set_level(logging.INFO, logger="ditserve")
    (outputs, _), negotiated = asyncio.run(call("auto"))  # auto: the bytes go over gRPC
    assert negotiated == "grpc" and outputs["out"].shape[0] == 1
    [path] = [r for r in caplog.records if r.getMessage() == "data_path"]
    assert path.fields["path"] == "grpc" and "cannot open" in path.fields["reason"]
    assert not list(tmp_path.iterdir())  # the refused ring was unlinked by its writer


def test_no_segment_survives_a_killed_stage_or_a_stopped_chain(launcher, tiny_checkpoint):
    chain = launcher.start_chain(tiny_checkpoint, 2, "bf16", extra=["--transport", "shm"])
    pids = [stage.pid for stage in chain]
    assert len(asyncio.run(_forward(chain[0].address))) == 3
    assert _segments(pids) == []  # unlinked as soon as both ends mapped it
    os.kill(chain[1].pid, signal.SIGKILL)  # the reader dies with the ring mapped
    chain[1].proc.wait()
    assert _segments(pids) == []
    chain[1].start()  # back: stage 0 offers a fresh ring on the new stream
    chain[1].wait_healthy()
    assert len(asyncio.run(_forward(chain[0].address))) == 3
    assert chain[0].log().count("event=shm_negotiated") >= 2
    os.kill(chain[0].pid, signal.SIGKILL)  # now the writer
    chain[0].proc.wait()
    for stage in chain[1:]:
        stage.terminate()
    assert _segments([*pids, chain[1].pid]) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_finite_check_finds_every_nan_and_infinity_and_passes_huge_finite_values(dtype):
    from ditserve.stage.servicer import all_finite

    big = torch.full((4, 8), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows
    assert all_finite(torch.randn(3, 16, 8).to(dtype)) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensor = torch.randn(3, 16, 8).to(dtype)
        tensor[2, 15, 7] = bad
        assert not all_finite(tensor)


def test_a_slot_read_in_place_is_not_reused_before_its_reply(chains):
    """Stage 0 computes from the slot itself; with one slot and four microbatches at once
    the sender must wait for each reply before writing the slot again (the others go as
    gRPC bytes), or a later microbatch's bytes would change an earlier one's input."""
    auto, grpc = chains
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([5, 900]),
                torch.tensor([1, 2])) for _ in range(4)]

    async def outputs(address: str, transport: str) -> list[torch.Tensor]:
        client = StageClient(address, peer="stage-0", transport=transport, slots=1)
        try:
            await client.wait_connected(30)
            replies = await asyncio.gather(*(client.call([("x", x), ("t", t), ("y", y)])
                                             for x, t, y in batches))
            assert client.negotiated == transport
            assert transport == "grpc" or client._ring.in_use == 0  # every slot came back
            return [out["out"] for out, _ in replies]
        finally:
            await client.close()

    by_shm = asyncio.run(outputs(auto[0].address, "shm"))
    by_grpc = asyncio.run(outputs(grpc[0].address, "grpc"))
    for a, b in zip(by_shm, by_grpc, strict=True):
        assert torch.equal(a, b)


def test_frames_on_the_doorbell_or_on_the_stream_give_the_same_bytes(chains):
    """With a ring, the stream's frames go over the doorbell (wire/doorbell.py) unless the
    client keeps them on gRPC; either way the replies are bit-identical to gRPC bytes."""
    auto, grpc = chains
    x, t, y = _inputs(2)

    async def out(address: str, transport: str, doorbell: bool) -> torch.Tensor:
        client = StageClient(address, peer="stage-0", transport=transport, doorbell=doorbell)
        expect_bell = doorbell and transport == "shm"
        try:
            await client.wait_connected(30)
            await client.call([("x", x), ("t", t), ("y", y)])
            if expect_bell:
                await _doorbell_open(client)  # its ACK may come after the first reply
            replies = await asyncio.gather(*(client.call([("x", x), ("t", t), ("y", y)])
                                             for _ in range(3)))
            bell = client._bell
            assert (bell is not None and bell.open) == expect_bell
            assert all(torch.equal(r["out"], replies[0][0]["out"]) for r, _ in replies)
            return replies[0][0]["out"]
        finally:
            await client.close()

    by_bell = asyncio.run(out(auto[0].address, "shm", True))
    assert torch.equal(by_bell, asyncio.run(out(auto[0].address, "shm", False)))
    assert torch.equal(by_bell, asyncio.run(out(grpc[0].address, "grpc", True)))


def test_a_malformed_frame_on_the_doorbell_ends_only_that_stream(chains):
    """Bytes on the doorbell that are not a frame refuse the stream (INVALID_ARGUMENT, as
    on gRPC): the caller's microbatches fail UNAVAILABLE, it reconnects with a fresh ring
    and doorbell, and the stage serves it and everyone else as before."""
    auto, _ = chains
    x, t, y = _inputs(1)

    async def run() -> None:
        client = StageClient(auto[0].address, peer="stage-0", transport="shm")
        try:
            await client.wait_connected(30)
            await client.call([("x", x), ("t", t), ("y", y)])
            await _doorbell_open(client)
            deadline = asyncio.get_running_loop().time() + 10
            bell = client._bell
            bell.sock.sendall(b"\x03\x00\x00\x00\xff\xff\xff")  # a length, then not protobuf
            while client._bell is bell:  # the stage closed it: the stream ends and heals
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            (reply, _) = await client.call([("x", x), ("t", t), ("y", y)])
            assert reply["out"].shape[0] == 1 and client._bell is not None
        finally:
            await client.close()

    asyncio.run(run())
    assert "unreadable frame on the doorbell" in auto[0].log()
    assert len(asyncio.run(_forward(auto[0].address))) == 3
