"""The shared-memory ring and the lean (de)serializers, in one process: the probe proves
sharing, names are unlinked once mapped, slots are never handed out twice, and the lean
frames are the same protobuf messages as the generated code's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ditserve.wire import FrameAssembler, WireError, encode_frames, lean_frames, parse_request, serialize
from ditserve.wire.shm import ShmRing, ShmUnavailable, ShmView
from ditserve_client.proto.dit.v1 import stage_pb2
from google.protobuf.message import DecodeError

Request = stage_pb2.ForwardRequest


def _tensors(n: int = 3) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(n)
    return [("h", torch.randn(n, 16, 64, generator=gen).bfloat16()),
            ("c", torch.randn(n, 64, generator=gen).bfloat16())]


def test_lean_frames_are_the_generated_messages_and_parse_back_to_the_tensors():
    tensors = _tensors()
    lean = [serialize(f) for f in lean_frames(Request, 5, tensors, 1000, request_ids=["r"])]
    plain = [f.SerializeToString() for f in encode_frames(Request, 5, tensors, 1000,
                                                          request_ids=["r"])]
    assert len(lean) == len(plain) > 2
    assert [Request.FromString(b) for b in lean] == [Request.FromString(b) for b in plain]
    assembler = FrameAssembler()
    for data in plain:  # a peer using the generated serializer is read just the same
        done = assembler.add(parse_request(data))
    for name, tensor in tensors:
        assert torch.equal(done.tensors[name], tensor)


def test_a_one_frame_microbatch_is_read_in_place_and_aligned():
    tensors = [("x", torch.randn(3, 5, dtype=torch.float64)), *_tensors()]  # 8-byte dtype
    (frame,) = lean_frames(Request, 9, tensors, request_ids=["r"], origin=4)
    data = serialize(frame)
    parsed = parse_request(data)
    assert parsed.microbatch_id == 9 and parsed.origin == 4  # the header wins the prefix
    assert Request.FromString(data).microbatch_id == 9  # so does protobuf's own parser
    done = FrameAssembler().add(parsed)
    start = np.frombuffer(data, np.uint8).ctypes.data
    for name, tensor in tensors:
        assert torch.equal(done.tensors[name], tensor)
        # A view of the received message itself (no copy), aligned for its dtype.
        offset = done.tensors[name].data_ptr() - start
        assert 0 < offset < len(data) and offset % tensor.element_size() == 0


@pytest.mark.parametrize("data", [b"\x22\x10abc", b"\x08", b"\x0b",
                                  b"\x22" + b"\xff" * 10 + b"\x01"])
def test_lean_parser_refuses_truncated_or_malformed_messages(data):
    with pytest.raises((ValueError, DecodeError)):  # the servicer then ends the stream
        parse_request(data)


def test_probe_proves_sharing_and_the_name_is_gone_once_mapped(tmp_path):
    ring = ShmRing(4096, 2, directory=tmp_path)
    assert ring.path.exists() and ring.path.stat().st_mode & 0o777 == 0o600
    view = ShmView(ring.name, ring.token, 4096, 2, directory=tmp_path)
    assert not ring.path.exists()  # both ends mapped: a kill of both leaves nothing
    slot = ring.take(10)
    slot.write([memoryview(b"hello"), memoryview(b"world")])
    out = bytearray(10)
    view.read(slot.number, 10, memoryview(out))
    assert out == b"helloworld"
    ring.close()
    view.close()


def test_an_offer_that_is_not_shared_memory_is_refused(tmp_path):
    ring = ShmRing(4096, 2, directory=tmp_path)
    with pytest.raises(ShmUnavailable, match="token"):
        ShmView(ring.name, b"x" * 16, 4096, 2, directory=tmp_path)
    with pytest.raises(ShmUnavailable, match="holds"):
        ShmView(ring.name, ring.token, 8192, 2, directory=tmp_path)
    with pytest.raises(ShmUnavailable, match="not a ditserve segment"):
        ShmView("../etc/passwd", ring.token, 4096, 2, directory=tmp_path)
    with pytest.raises(ShmUnavailable, match="cannot open"):  # another host's name
        ShmView("ditserve-1-0123456789abcdef", ring.token, 4096, 2, directory=tmp_path)
    with pytest.raises(ShmUnavailable, match="slots"):
        ShmView(ring.name, ring.token, 4096, 1000, directory=tmp_path)
    ring.close()
    assert not list(tmp_path.iterdir())


def test_slots_are_never_handed_out_twice_until_released(tmp_path):
    ring = ShmRing(100, 2, directory=tmp_path)
    a, b = ring.take(100), ring.take(1)
    assert {a.number, b.number} == {1, 2} and ring.take(1) is None  # all in use: use gRPC
    assert ring.give(a.number)
    assert ring.take(101) is None  # too big for a slot: that microbatch goes over gRPC
    assert not ring.give(a.number) and not ring.give(7)  # released twice, or not a slot
    assert ring.take(5).number == a.number
    ring.close()


def test_assembler_views_a_slot_in_place_and_checks_it(tmp_path):
    ring = ShmRing(1 << 16, 2, directory=tmp_path)
    view = ShmView(ring.name, ring.token, 1 << 16, 2, directory=tmp_path)
    tensors = _tensors(2)
    (frame,) = lean_frames(Request, 3, tensors, slot=ring.take(1 << 16))
    plain = FrameAssembler()
    with pytest.raises(WireError, match="negotiated none"):
        plain.add(parse_request(serialize(frame)))
    assembler = FrameAssembler()
    assembler.slots = view
    done = assembler.add(parse_request(serialize(frame)))
    for name, tensor in tensors:
        assert torch.equal(done.tensors[name], tensor)
    # No copy: the tensors are the slot's bytes (so the sender must, and does, leave the
    # slot alone until the microbatch is answered: test_stage_transport).
    first = tensors[0][0]
    ring.map[ring.offset(frame.shm_slot):ring.offset(frame.shm_slot) + 64] = bytes(64)
    assert not torch.equal(done.tensors[first], tensors[0][1])
    bad = Request.FromString(serialize(frame))
    bad.microbatch_id, bad.shm_slot = 4, 3
    with pytest.raises(WireError, match=r"not in 1\.\.2"):
        assembler.add(parse_request(bad.SerializeToString()))
    ring.close()
    view.close()
