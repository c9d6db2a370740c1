"""FrameAssembler's limits: bytes charged as they arrive, shares, idle expiry, reused ids."""

from __future__ import annotations

import pytest
import torch
from ditserve.wire import ByteBudget, FrameAssembler, WireOverload, WireProtocolError, encode_frames
from ditserve_client.proto.dit.v1 import stage_pb2


def _frames(mb_id: int, rows: int = 4, chunk_bytes: int = 256) -> list:
    x = torch.arange(rows * 256, dtype=torch.float32).reshape(rows, 256)  # 1 KiB per row
    return encode_frames(stage_pb2.ForwardRequest, mb_id, [("h", x)], chunk_bytes=chunk_bytes)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_announced_payload_charges_nothing_until_bytes_arrive():
    budget = ByteBudget(10_000)
    assembler = FrameAssembler(budget=budget)
    first = _frames(1)[0]
    first.chunk, first.offset = b"", 0
    assert assembler.add(first) is None
    assert budget.used == 0 and assembler.held_bytes == 0


def test_bytes_are_charged_per_chunk_and_given_back_in_two_steps():
    budget = ByteBudget(10_000)
    assembler = FrameAssembler(budget=budget)
    frames = _frames(1)
    for frame in frames[:-1]:
        assert assembler.add(frame) is None
    assert budget.used == 256 * (len(frames) - 1)
    done = assembler.add(frames[-1])
    assert done is not None and budget.used == 4 * 1024
    assembler.release_bytes(1)  # computed: bytes back, id still taken
    assert budget.used == 0
    with pytest.raises(WireProtocolError, match="id reused"):
        assembler.add(_frames(1)[0])
    assembler.release(1)  # answered: id free again
    assert assembler.add(_frames(1)[0]) is None


def test_the_budget_is_shared_and_a_stream_keeps_to_its_share():
    budget = ByteBudget(3000)
    greedy = FrameAssembler(budget=budget, stream_limit_bytes=2000)
    other = FrameAssembler(budget=budget, stream_limit_bytes=2500)
    with pytest.raises(WireOverload, match="its share") as refused:
        for frame in _frames(1, rows=3):  # 3 KiB > its 2 KB share
            greedy.add(frame)
    assert refused.value.to_service_error().code.value == "RESOURCE_EXHAUSTED"
    assert budget.used == 0  # the failed microbatch gave its bytes back
    for frame in _frames(2, rows=1):
        greedy.add(frame)  # 1 KiB held
    with pytest.raises(WireOverload, match="receive buffers full"):
        for frame in _frames(3, rows=2):  # 1 + 2 KiB > 3000 across both streams
            other.add(frame)


def test_a_microbatch_that_goes_quiet_expires_and_frees_its_bytes():
    clock, budget = Clock(), ByteBudget(10_000)
    assembler = FrameAssembler(budget=budget, clock=clock)
    frames = _frames(5)
    assembler.add(frames[0])
    clock.now = 20.0
    assembler.add(frames[1])  # progress resets the idle clock
    clock.now = 45.0
    assert assembler.expire(30.0) == []
    clock.now = 51.0
    assert assembler.expire(30.0) == [5]
    assert budget.used == 0 and assembler.pending_ids() == []
    assert assembler.add(frames[2]) is None  # later frames of it are dropped silently


def test_closing_a_stream_gives_everything_back():
    budget = ByteBudget(10_000)
    assembler = FrameAssembler(budget=budget)
    for frame in _frames(1)[:-1] + _frames(2):
        assembler.add(frame)
    assert budget.used > 0
    assembler.close()
    assert budget.used == 0 and assembler.held_bytes == 0
