"""The codec and framing: round trips for every dtype and shape, strict validation.

Property tests (hypothesis): any tensor survives encode → frames → assemble bit for bit
whatever the chunk size and interleaving; any malformed frame raises WireError, never
another exception.
"""

from __future__ import annotations

import math

import pytest
import torch
from ditserve.common.status import StatusCode
from ditserve.wire import DTYPES, FrameAssembler, WireError, decode_tensor, encode_frames
from ditserve.wire.codec import encode_tensor
from ditserve_client.proto.dit.v1 import stage_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

Request = stage_pb2.ForwardRequest

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4)


def _random(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen,
                         dtype=torch.int64).to(dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _assemble(frames: list, assembler: FrameAssembler | None = None) -> dict:
    assembler = assembler or FrameAssembler()
    done = {}
    for frame in frames:
        microbatch = assembler.add(frame)
        if microbatch is not None:
            done[microbatch.id] = microbatch.tensors
    return done


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(DTYPES)), shape=shapes, seed=st.integers(0, 1000))
def test_tensor_round_trip_is_bit_exact(name, shape, seed):
    tensor = _random(DTYPES[name], shape, seed)
    datatype, wire_shape, raw = encode_tensor(tensor)
    assert datatype == name and wire_shape == shape
    assert raw.nbytes == math.prod(shape) * tensor.element_size()
    back = decode_tensor(datatype, wire_shape, bytes(raw))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(_bits(back), _bits(tensor))


@settings(max_examples=40, deadline=None)
@given(specs=st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), shapes), min_size=1,
                      max_size=4),
       chunk=st.integers(1, 300), seed=st.integers(0, 1000))
def test_frames_round_trip_any_chunking_and_interleaving(specs, chunk, seed):
    tensors = [(f"t{i}", _random(DTYPES[d], s, seed + i)) for i, (d, s) in enumerate(specs)]
    a = encode_frames(Request, 1, tensors, chunk_bytes=chunk, request_ids=["r1"])
    b = encode_frames(Request, 2, tensors[::-1], chunk_bytes=chunk + 7)
    interleaved = [f for pair in zip(a, b, strict=False) for f in pair] + a[len(b):] + b[len(a):]
    done = _assemble(interleaved)
    assert set(done) == {1, 2}
    for name, tensor in tensors:
        for got in (done[1][name], done[2][name]):
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(_bits(got), _bits(tensor))


def test_large_tensor_is_chunked_at_one_mebibyte():
    h = torch.randn(2, 256, 1152).bfloat16()  # 1.1 MiB
    frames = encode_frames(Request, 9, [("h", h)])
    assert [len(f.chunk) for f in frames] == [1 << 20, h.nbytes - (1 << 20)]
    assert frames[0].payload_bytes == h.nbytes and not frames[1].tensors
    assert torch.equal(_assemble(frames)[9]["h"], h)


def _first(mb_id=1, datatype="FP32", shape=(2, 3), payload=None, chunk=b"", offset=0):
    nbytes = math.prod(shape) * 4 if payload is None else payload
    return Request(microbatch_id=mb_id, tensors=[{"name": "x", "datatype": datatype,
                                                  "shape": list(shape)}],
                   payload_bytes=nbytes, chunk=chunk, offset=offset)


@pytest.mark.parametrize(("frames", "words"), [
    ([_first(datatype="FP8")], "unknown datatype 'FP8'"),
    ([_first(shape=(1,) * 9)], "rank 9"),
    ([_first(shape=(2, -3), payload=0)], "negative dimension"),
    ([_first(payload=25)], "payload_bytes 25 but the tensors need 24"),
    ([_first(shape=(1 << 20, 1 << 10))], "exceeds the limit"),
    ([_first(chunk=b"\0" * 25)], "25 payload bytes, but the tensors need 24"),
    ([_first(chunk=b"\0" * 8), Request(microbatch_id=1, offset=12, chunk=b"\0" * 4)],
     "chunk at offset 12, expected 8"),
    ([Request(microbatch_id=5, chunk=b"\0")], "unknown id"),
    ([_first(chunk=b"\0" * 8), _first(chunk=b"\0" * 8)], "id reused while that microbatch is in flight"),
])
def test_malformed_frames_raise_wire_error_naming_the_problem(frames, words):
    assembler = FrameAssembler(max_payload_bytes=1 << 20)
    with pytest.raises(WireError, match=words) as caught:
        _assemble(frames, assembler)
    assert caught.value.to_service_error().code is StatusCode.INVALID_ARGUMENT
    assert caught.value.microbatch_id == frames[-1].microbatch_id


def test_failed_microbatch_yields_one_error_and_others_carry_on():
    assembler = FrameAssembler()
    good = encode_frames(Request, 2, [("x", torch.arange(300.0))], chunk_bytes=400)
    bad = [_first(mb_id=1, chunk=b"\0" * 4), Request(microbatch_id=1, offset=99, chunk=b"1"),
           Request(microbatch_id=1, offset=100, chunk=b"2")]
    errors, done = [], {}
    for frame in [bad[0], good[0], bad[1], good[1], bad[2], *good[2:]]:
        try:
            if (mb := assembler.add(frame)) is not None:
                done[mb.id] = mb
        except WireError as error:
            errors.append(error.microbatch_id)
    assert errors == [1]
    assert torch.equal(done[2].tensors["x"], torch.arange(300.0))
    assembler.release(2)
    assert _assemble(good, assembler)[2]["x"].shape == (300,)  # id reusable once released


frame_fields = st.fixed_dictionaries({
    "microbatch_id": st.integers(0, 3),
    "tensors": st.lists(st.fixed_dictionaries({
        "name": st.text(max_size=3),
        "datatype": st.sampled_from([*DTYPES, "FP8", "", "bf16"]),
        "shape": st.lists(st.integers(-2, 1 << 40), max_size=10)}), max_size=3),
    "payload_bytes": st.integers(0, 1 << 62),
    "offset": st.integers(0, 1 << 40),
    "chunk": st.binary(max_size=64)})


@settings(max_examples=200, deadline=None)
@given(st.lists(frame_fields, min_size=1, max_size=6))
def test_arbitrary_frames_never_crash_the_assembler(frames):
    assembler = FrameAssembler(max_payload_bytes=1 << 16)
    for fields in frames:
        try:
            microbatch = assembler.add(Request(**fields))
        except WireError:
            continue
        if microbatch is not None:
            assert all(isinstance(t, torch.Tensor) for t in microbatch.tensors.values())
