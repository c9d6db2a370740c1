"""CUDA IPC handoff: path choice, handle validation, keep-alive until acknowledged, the
CUDA probe's fallbacks and pinned staging, on CPU; the handoff itself only where a GPU
exists (skipped otherwise: it has not run on a GPU yet)."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch
from ditserve.wire import ByteBudget, FrameAssembler, lean_frames
from ditserve.wire.codec import WireError
from ditserve.wire.cuda_ipc import (
    CPU_SHARED,
    CUDA_IPC,
    HANDOFFS,
    MAX_HANDLE_BYTES,
    CudaHandle,
    HandoffError,
    HandoffLedger,
    PinnedStaging,
    accept_probe,
    check_probe,
    choose_path,
    export_tensor,
    import_stream,
    import_tensor,
    probe_token,
)
from ditserve_client.proto.dit.v1 import stage_pb2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _handle(**changes) -> CudaHandle:
    fields = dict(dtype="BF16", shape=(2, 256, 1152), stride=(256 * 1152, 1152, 1), offset=0,
                  device=0, handle=bytes(range(64)), storage_bytes=2 * 256 * 1152 * 2,
                  storage_offset_bytes=0, ref_counter_handle=b"/torch_123_456",
                  ref_counter_offset=3, event_handle=bytes(64), event_sync_required=True)
    return CudaHandle(**{**fields, **changes})


# -- which path a stream takes --

@pytest.mark.parametrize(("transport", "local", "peer", "shm", "cuda", "path"), [
    ("grpc", "cuda", "cuda", True, True, "grpc"),       # grpc is always bytes
    ("auto", "cuda:0", "cuda:1", True, True, "cuda_ipc"),
    ("shm", "cuda", "cuda", True, True, "cuda_ipc"),    # shm: "not the socket"
    ("auto", "cuda", "cuda", True, False, "shm"),       # handle not openable there
    ("auto", "cuda", "cpu", True, True, "shm"),         # one end on the CPU
    ("auto", "cpu", "cpu", True, False, "shm"),
    ("auto", "cuda", "cuda", False, False, "grpc"),     # another host
    ("auto", "cpu", "cpu", False, False, "grpc"),
])
def test_choose_path(transport, local, peer, shm, cuda, path):
    assert choose_path(transport, local, peer, shm, cuda) == path


def test_shm_required_but_not_shared_is_an_error_not_a_silent_fallback():
    with pytest.raises(HandoffError, match="shared-memory probe failed"):
        choose_path("shm", "cuda", "cuda", shm_shared=False, cuda_shared=True)
    with pytest.raises(ValueError, match="expected auto, grpc or shm"):
        choose_path("tcp", "cpu", "cpu", True, True)


# -- handles from a peer are data, validated --

def test_handle_round_trips_and_is_small():
    handle = _handle()
    data = handle.to_bytes()
    assert CudaHandle.from_bytes(data) == handle
    assert len(data) < MAX_HANDLE_BYTES // 4


def _doc(**changes) -> bytes:
    doc = json.loads(_handle().to_bytes())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("data", "message"), [
    (b"\x80\x04pickle", "malformed"),
    (b"x" * (MAX_HANDLE_BYTES + 1), "exceeds"),
    (b"[]", "malformed"),
    (_doc(handle="zz"), "malformed"),
    (_doc(extra=1), "malformed"),
    (_doc(offset=-1), "non-negative"),
    (_doc(offset=True), "non-negative"),
    (_doc(storage_bytes=1.5), "non-negative"),
    (_doc(event_sync_required=1), "boolean"),
    (_doc(event_sync_required=True, event_handle=""), "without an event handle"),
    (_doc(dtype="COMPLEX"), "unknown datatype"),
    (_doc(stride=[1]), "do not describe"),
    (_doc(shape=[1] * 9, stride=[1] * 9), "do not describe"),
    (_doc(storage_bytes=16), "reaches past its storage"),
    (_doc(offset=1), "reaches past its storage"),
])
def test_malformed_handles_are_refused(data, message):
    with pytest.raises(HandoffError, match=message) as caught:
        CudaHandle.from_bytes(data)
    assert isinstance(caught.value, WireError)  # → INVALID_ARGUMENT for that microbatch


def test_missing_field_is_refused():
    doc = json.loads(_handle().to_bytes())
    del doc["ref_counter_offset"]
    with pytest.raises(HandoffError, match="malformed"):
        CudaHandle.from_bytes(json.dumps(doc).encode())


def test_empty_tensor_handle_is_valid():
    handle = _handle(shape=(0, 256, 1152), storage_bytes=0)
    assert CudaHandle.from_bytes(handle.to_bytes()).shape == (0, 256, 1152)


# -- without CUDA every path falls back cleanly --

def test_cpu_tensor_cannot_be_exported():
    with pytest.raises(HandoffError, match="needs a CUDA tensor"):
        export_tensor(torch.zeros(4))


def test_the_stage_export_refuses_a_cpu_tensor_before_any_cuda_call():
    # CUDA_IPC.export records its event on a stream of its own: a CPU tensor must still
    # get the HandoffError the client falls back on, not a CUDA error from a CPU torch.
    with pytest.raises(HandoffError, match="needs a CUDA tensor"):
        CUDA_IPC.export(torch.zeros(4))
    assert import_stream(torch.device("cpu")) is None  # a CPU input is checked in place


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA fallback")
def test_import_without_cuda_is_a_handoff_error():
    with pytest.raises(HandoffError, match="no CUDA"):
        import_tensor(_handle())


def test_probe_accepts_only_the_token_it_reads_back():
    token = probe_token()
    assert len(token) == 16 and probe_token() != token

    def opener(_: CudaHandle) -> torch.Tensor:  # what a mapped probe tensor reads as
        return torch.frombuffer(bytearray(token), dtype=torch.uint8)

    def failing(_: CudaHandle) -> torch.Tensor:
        raise HandoffError("cudaIpcOpenMemHandle: invalid device context")

    handle = _handle(dtype="UINT8", shape=(16,), stride=(1,), storage_bytes=16)
    assert check_probe(handle, token, opener)
    assert not check_probe(handle, probe_token(), opener)  # another GPU's bytes
    assert not check_probe(handle, token, failing)
    if not torch.cuda.is_available():
        assert not check_probe(handle, token)  # the real opener, no CUDA here


# -- the sender keeps buffers alive until acknowledged --

def test_ledger_keeps_tensors_alive_until_acknowledged():
    ledger = HandoffLedger(max_outstanding=2)
    h = torch.zeros(2, 4, 8)
    ref = weakref.ref(h)
    assert ledger.hold(7, [h, torch.zeros(2, 8)])
    del h
    assert ref() is not None and ledger.outstanding == 1
    assert ledger.held_bytes == (2 * 4 * 8 + 2 * 8) * 4
    assert not ledger.acknowledge(8)  # unknown id: ignored
    assert ledger.acknowledge(7)
    assert ref() is None and ledger.outstanding == 0
    assert not ledger.acknowledge(7)  # duplicate: ignored


def test_ledger_is_bounded_and_refuses_a_reused_id():
    ledger = HandoffLedger(max_outstanding=2)
    assert ledger.hold(1, [torch.zeros(1)]) and ledger.hold(2, [torch.zeros(1)])
    assert not ledger.hold(3, [torch.zeros(1)])  # full: that microbatch goes another way
    with pytest.raises(ValueError, match="already held"):
        ledger.hold(1, [torch.zeros(1)])
    ledger.close()  # the stream ended: nothing is held for a receiver that is gone
    assert ledger.outstanding == 0 and ledger.hold(3, [torch.zeros(1)])


# -- pinned staging --

def test_staging_passes_cpu_tensors_through():
    staging = PinnedStaging()
    h = torch.randn(2, 3)
    host, _, event = staging.to_host(h)
    assert host is h and event is None
    assert torch.equal(staging.to_device(h, torch.device("cpu")), h)


def test_staging_reuses_buffers_by_size_within_its_limit():
    staging = PinnedStaging(limit_bytes=100)
    a, b = staging._buffer(40), staging._buffer(40)
    staging.give_back(a)
    assert staging._buffer(40) is a  # reused, not reallocated
    staging.give_back(a)
    staging.give_back(b)
    staging.give_back(staging._buffer(30))
    assert staging.cached_bytes <= 100  # the oldest went first
    staging.give_back(torch.empty(200, dtype=torch.uint8))  # larger than the limit
    assert staging.cached_bytes <= 100


def test_staging_evicts_after_a_size_was_taken_out():
    staging = PinnedStaging(limit_bytes=100)
    a, c = staging._buffer(40), staging._buffer(30)
    staging.give_back(a)
    staging.give_back(c)
    assert staging._buffer(40) is a  # the 40-byte size is now empty
    staging.give_back(staging._buffer(80))  # must evict the 30, not trip on the 40
    assert staging.cached_bytes == 80 and staging._buffer(30) is not c


# -- the real handoff (GPU only) --

def _export_child(queue, done) -> None:
    h = torch.arange(2 * 16 * 8, dtype=torch.float32, device="cuda").reshape(2, 16, 8)
    h = h.to(torch.bfloat16)
    queue.put(export_tensor(h).to_bytes())
    done.wait(60)  # keeps h alive until the parent has its copy (the acknowledgement)


@needs_cuda
def test_handoff_between_processes_copies_device_to_device():
    ctx = torch.multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_export_child, args=(queue, done))
    child.start()
    try:
        handle = CudaHandle.from_bytes(queue.get(timeout=60))
        h = import_tensor(handle)
        expected = torch.arange(2 * 16 * 8, dtype=torch.float32).reshape(2, 16, 8)
        assert h.is_cuda and torch.equal(h.cpu(), expected.to(torch.bfloat16))
    finally:
        done.set()
        child.join(60)


# -- the handoff as injected: CPU_SHARED (torch's CPU sharing) stands in for CUDA IPC --

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_cpu_shared_round_trip_copies_the_tensor_out(dtype):
    tensor = torch.arange(2 * 3 * 4).reshape(2, 3, 4).to(dtype).transpose(1, 2)  # strided
    handle, kept = CPU_SHARED.export(tensor)
    parsed = CudaHandle.from_bytes(handle.to_bytes())  # as a receiver gets it
    copy = CPU_SHARED.open(parsed, None)
    assert torch.equal(copy, tensor) and copy.is_contiguous()
    kept.zero_()  # the sender's memory changes after the acknowledgement: the copy does not
    assert torch.equal(copy, tensor)


def test_cpu_shared_refuses_handles_that_name_no_shared_file():
    handle, _ = CPU_SHARED.export(torch.zeros(4))
    for changes in ({"handle": b"/etc/passwd"}, {"ref_counter_handle": b"nowhere"},
                    {"handle": b"/torch_1_2_3"}):
        with pytest.raises(HandoffError, match=r"cpu-shared handle|cannot open"):
            CPU_SHARED.open(dataclasses.replace(handle, **changes), None)
    with pytest.raises(HandoffError, match="needs a CPU tensor"):
        CPU_SHARED.export(torch.zeros(1, device="meta"))


def test_handoffs_say_which_devices_they_serve():
    assert CPU_SHARED.usable("cpu") and not CPU_SHARED.usable("cuda")
    assert not CUDA_IPC.usable("cpu")
    assert CUDA_IPC.usable("cuda:0") == torch.cuda.is_available()
    assert HANDOFFS == {"cuda": CUDA_IPC, "cpu-shared": CPU_SHARED}
    # The emulation's device type counts as "both ends on the handoff's device".
    assert choose_path("auto", "cpu", "cpu", True, True, handoff_device="cpu") == "cuda_ipc"
    assert choose_path("auto", "cpu", "cpu", True, True) == "shm"


def test_the_probe_reads_back_through_cpu_shared():
    token = probe_token()
    handle, kept = CPU_SHARED.export(torch.frombuffer(bytearray(token), dtype=torch.uint8))
    assert check_probe(handle, token, lambda h: CPU_SHARED.open(h, None))
    assert not check_probe(handle, probe_token(), lambda h: CPU_SHARED.open(h, None))
    del kept  # the sender lets go: its shared file goes with the last mapping
    assert not check_probe(handle, token, lambda h: CPU_SHARED.open(h, None))


# -- handles in frames: the FrameAssembler's side --

def _request(mb_id: int, tensors, handles) -> stage_pb2.ForwardRequest:
    return lean_frames(stage_pb2.ForwardRequest, mb_id, tensors, handles=handles)[0].header


def test_assembler_opens_handles_and_charges_the_budget():
    h, c = torch.randn(2, 16, 8).bfloat16(), torch.randn(2, 8).bfloat16()
    exported = [CPU_SHARED.export(t) for t in (h, c)]
    budget = ByteBudget(1 << 20)
    assembler = FrameAssembler(budget=budget)
    assembler.handoff = lambda handle: CPU_SHARED.open(handle, None)
    frame = _request(5, [("h", h), ("c", c)], [handle for handle, _ in exported])
    assert frame.payload_bytes == (2 * 16 * 8 + 2 * 8) * 2 and not frame.chunk
    microbatch = assembler.add(frame)
    assert torch.equal(microbatch.tensors["h"], h) and torch.equal(microbatch.tensors["c"], c)
    assert budget.used == frame.payload_bytes  # the copies count as received bytes
    assembler.release(5)
    assert budget.used == 0


def test_assembler_refuses_handles_it_did_not_negotiate_or_that_do_not_fit():
    h = torch.randn(2, 16, 8)
    handle, _ = CPU_SHARED.export(h)
    frame = _request(1, [("h", h)], [handle])
    assembler = FrameAssembler(budget=ByteBudget(1 << 20))
    with pytest.raises(WireError, match="negotiated no CUDA IPC"):
        assembler.add(frame)
    assembler.handoff = lambda handle: CPU_SHARED.open(handle, None)
    mismatched = _request(2, [("h", h)], [dataclasses.replace(handle, shape=(2, 8, 16),
                                                              stride=(128, 16, 1))])
    del mismatched.tensors[0].shape[:]
    mismatched.tensors[0].shape.extend([2, 16, 8])  # the spec says otherwise
    with pytest.raises(WireError, match=r"cuda_handles\[0\] \(h\): describes FP32 \[2, 8, 16\]"):
        assembler.add(mismatched)
    follower = stage_pb2.ForwardRequest(microbatch_id=3, cuda_handles=[handle.to_bytes()])
    with pytest.raises(WireError, match="not its first"):
        assembler.add(follower)
    both = _request(4, [("h", h)], [handle])
    both.shm_slot = 1
    with pytest.raises(WireError, match="a payload has one place"):
        assembler.add(both)
    assert assembler.budget.used == 0  # nothing failed holds bytes


def test_accept_probe_gives_an_opener_only_for_a_probe_that_reads_back():
    token = probe_token()
    probe, kept = CPU_SHARED.export(torch.frombuffer(bytearray(token), dtype=torch.uint8))
    cpu = torch.device("cpu")
    opener, reason = accept_probe(CPU_SHARED, cpu, "cpu-shared", probe.to_bytes(), token)
    assert reason == "" and torch.equal(opener(probe), torch.tensor(list(token), dtype=torch.uint8))
    good = probe.to_bytes()
    for handoff, method, data, read_back, words in [
            (CUDA_IPC, "cpu-shared", good, token, "this stage opens 'cuda'"),
            (CUDA_IPC, "cuda", good, token, "computes on cpu"),
            (CPU_SHARED, "cpu-shared", b"{}", token, "malformed"),
            (CPU_SHARED, "cpu-shared", good, token[:8], "must be 16 UINT8 bytes"),
            (CPU_SHARED, "cpu-shared", good, probe_token(), "could not open")]:
        opener, reason = accept_probe(handoff, cpu, method, data, read_back)
        assert opener is None and words in reason
    del kept
