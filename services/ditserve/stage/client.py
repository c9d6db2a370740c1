"""The client of one stage's Forward stream: one long-lived multiplexed stream per hop.

`StageClient` is used both by stage i to reach stage i+1 and by the coordinator to reach
stage 0 (through `chain.remote.RemoteChain`):

- ONE bidirectional stream carries many microbatches at once; each call gets a fresh id
  and a future, and replies (any order) are matched to futures by id.
- An in-stream error answers only its microbatch (ServiceError with the sent code).
- If the stream breaks, every microbatch in flight on it fails UNAVAILABLE (stages are
  stateless, so the caller may retry), and the client reconnects with exponential
  backoff: the chain heals by itself when the next stage is back. A call made while
  backing off waits for the next attempt for at most `reconnect_wait` seconds, then
  fails UNAVAILABLE rather than queue behind a dead peer (a stage that started before
  its next hop, or a hop restarting, is then no error at all).
- Each stream negotiates its data path when it opens (docs/ARCHITECTURE.md §5): a
  shared-memory ring (wire/shm.py) and, from a CUDA stage, a CUDA IPC probe
  (wire/cuda_ipc.py); `negotiated` says which path won (cuda_ipc, shm or grpc), a
  `data_path` log line and the dit_data_path_streams gauge say why. A microbatch that
  cannot take the stream's path (a full ledger or ring) goes by the next one down.
  With a ring, the frames themselves move to the peer's doorbell once it acknowledged
  this stream's token (wire/doorbell.py); its breaking breaks the stream like gRPC's.

References: Triton's gRPC streaming inference (in-stream per-request errors), grpc
Python aio bidi streaming examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import torch
from ditserve_client.proto.dit.v1 import stage_pb2, stage_pb2_grpc

from ditserve.common.errors import error_from_rpc, error_from_status
from ditserve.common.grpc_options import MAX_MESSAGE_BYTES, channel_options
from ditserve.common.logs import log_event
from ditserve.common.metrics import DATA_PATH_STREAMS, HANDOFFS_HELD, MICROBATCHES_SENT, WIRE_BYTES
from ditserve.common.status import ServiceError, StatusCode
from ditserve.config import Transport
from ditserve.security.tls import Dialer
from ditserve.wire import (
    CHUNK_BYTES,
    FrameAssembler,
    WireError,
    lean_frames,
    parse_response,
    serialize,
)
from ditserve.wire.cuda_ipc import (
    CUDA_IPC,
    DataPath,
    Handoff,
    HandoffError,
    HandoffLedger,
    PinnedStaging,
    choose_path,
    probe_token,
)
from ditserve.wire.doorbell import Doorbell, DoorbellError, connect
from ditserve.wire.shm import DEFAULT_SLOTS, ShmRing, ShmUnavailable

from .runner import StageDescription

_wire_bytes = functools.cache(WIRE_BYTES.labels)  # per microbatch: the child, cached
_sent = functools.cache(MICROBATCHES_SENT.labels)
_held = functools.cache(HANDOFFS_HELD.labels)

INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
"""Pause between stream attempts while no call waits: doubles from the initial one."""
DEMAND_DIAL_GAP_S = 0.2
"""A call that finds the stream down cuts that pause short, but dials no more often than
this: a peer that came back serves the next call at once, a down one is not hammered."""
RECONNECT_WAIT_S = 2.5
"""How long a call waits for the outcome of a stream attempt made after it arrived."""
DESCRIBE_TIMEOUT_S = 5.0
"""Time limit of a DescribeChain call from the coordinator; each hop asks the next one
with DESCRIBE_HOP_MARGIN_S less, so that a frozen stage's predecessor answers (naming
it) before the callers upstream give up."""
DESCRIBE_HOP_MARGIN_S = 0.5

FORWARD_METHOD = "/dit.v1.StageService/Forward"
DEFAULT_SLOT_BYTES = 48 << 20
"""Shared-memory slot size when the caller gives none: 64 rows of DiT-XL/2 h at 256 px."""
MAX_OUTSTANDING = 64
"""Microbatches a stream keeps alive for their acknowledgement under cuda_ipc."""
NEGOTIATION_WAIT_S = 5.0
"""How long a call waits for the peer's answer to the stream's shared-memory offer."""

Outputs = dict[str, torch.Tensor]


class StageClient:
    """Client of one stage's Forward stream (see the module docstring)."""

    def __init__(self, address: str, peer: str = "stage", chunk_bytes: int = CHUNK_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, dialer: Dialer | None = None,
                 transport: Transport = "grpc", slot_bytes: int | None = None,
                 slots: int = DEFAULT_SLOTS, device: str = "cpu", handoff: Handoff = CUDA_IPC,
                 max_handoffs: int = MAX_OUTSTANDING, doorbell: bool = True):
        """`transport` "auto"/"shm" offers a shared-memory ring of `slots` slots of
        `slot_bytes` (default DEFAULT_SLOT_BYTES) when each stream opens; "grpc" sends
        every byte over the stream. With "shm" a refused offer fails every call
        FAILED_PRECONDITION; with "auto" the bytes then go over gRPC. Beside the ring, a
        client whose tensors live on a `device` the `handoff` serves (CUDA) offers the
        CUDA probe: if the peer passes it, tensors on that device go as handles, at most
        `max_handoffs` microbatches unacknowledged (the rest by the ring or bytes). With
        a ring, `doorbell` asks the peer to move the stream's frames to a Unix socket
        beside it (wire/doorbell.py; False keeps them on the gRPC stream)."""
        self.address, self.peer, self.chunk_bytes = address, peer, chunk_bytes
        self.transport, self.slots = transport, slots
        self.slot_bytes = slot_bytes or DEFAULT_SLOT_BYTES
        self.device, self.handoff, self.max_handoffs = device, handoff, max_handoffs
        self.doorbell = doorbell
        self._bell: Doorbell | None = None  # the current stream's doorbell, once connected
        self._bell_lost: asyncio.Future | None = None  # resolved with why, if it breaks
        self._replies: FrameAssembler | None = None  # the current stream's reply assembler
        self._ring: ShmRing | None = None  # the current stream's ring, once accepted
        self._offered: ShmRing | None = None  # offered, not yet answered
        self._probe: torch.Tensor | None = None  # the CUDA probe's memory, until answered
        self._ledger: HandoffLedger | None = None  # the stream's handoffs, under cuda_ipc
        self._path: DataPath = "grpc"  # the current stream's data path
        self._path_reason = ""  # why it is not cuda_ipc ("" when it is)
        self._announced = False  # the path of the open stream was logged and counted
        self._staging = PinnedStaging()  # device tensors that go as bytes or by slot
        self._refusal = ""  # why the last offer failed ("" while none did)
        self._answered = asyncio.Event()  # the offer of the current stream was answered
        self._slot_of: dict[int, int] = {}  # microbatch id → its ring slot, until released
        self._dialer = dialer or Dialer()  # mTLS under security.tls, else plaintext
        self._options = channel_options(max_message_bytes)
        self._channel = self._dialer.channel(address, self._options)
        self._stub = stage_pb2_grpc.StageServiceStub(self._channel)
        self._forward = self._lean_forward(self._channel)
        self._ids = itertools.count(1)
        self._inflight: dict[int, asyncio.Future] = {}
        self._send: asyncio.Queue | None = None  # frames of the current stream; None: down
        self._connected = asyncio.Event()
        self._attempts_started = self._attempts_ended = 0  # stream attempts so far
        self._progress = asyncio.Event()  # set (and replaced) when a stream opens or ends
        self._wanted = asyncio.Event()  # a call waits for a stream: dial without backoff
        self._down_reason = ""  # why the last stream attempt failed ("" once one opened)
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        """Starts the stream task (called lazily by the first `call`)."""
        if self._task is None:
            self._answered.clear()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def call(self, tensors: Sequence[tuple[str, torch.Tensor]],
                   request_ids: Sequence[str] = (), origin: int = 0,
                   ) -> tuple[Outputs, list[float]]:
        """Sends one microbatch; returns the reply's tensors and per-stage compute seconds.
        `origin`: the sending stage's stamp of where the microbatch entered (fairness.py)."""
        if self._closed:
            raise ServiceError(StatusCode.UNAVAILABLE, f"client of {self.address} is closed")
        self.start()
        await self._queue()
        await self._negotiated()
        queue = await self._queue()  # again: the stream may have changed meanwhile
        mb_id, fields = next(self._ids), {"request_ids": list(request_ids), "origin": origin}
        frames, path, buffers = self._handed_over(mb_id, tensors, fields), "cuda_ipc", []
        if frames is None:  # bytes, by slot or over the stream
            if any(t.device.type != "cpu" for _, t in tensors):
                tensors, buffers = await self._to_host(tensors)
                queue = await self._queue()  # the stream may have changed meanwhile
            nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
            slot = self._ring.take(nbytes) if self._ring is not None else None
            frames = lean_frames(stage_pb2.ForwardRequest, mb_id, tensors, self.chunk_bytes,
                                 slot=slot, **fields)
            path = "grpc" if slot is None else "shm"
            if slot is not None:
                self._slot_of[mb_id] = slot.number
        future = asyncio.get_running_loop().create_future()
        self._inflight[mb_id] = future
        bell = self._bell
        send = bell.send if bell is not None and bell.open else queue.put_nowait
        for frame in frames:
            send(frame)
        _wire_bytes("tx", self.peer).inc(frames[0].payload_bytes)
        _sent(self.peer, path).inc()
        try:
            result = await future
        finally:
            self._inflight.pop(mb_id, None)
        for buffer in buffers:  # the reply came: the peer has every byte of the frames
            self._staging.give_back(buffer)
        return result

    def _handed_over(self, mb_id: int, tensors: Sequence[tuple[str, torch.Tensor]],
                     fields: dict[str, Any]) -> list[Any] | None:
        """The one frame of a microbatch handed over by CUDA IPC handles, its tensors held
        in the ledger until the reply; None when it must go another way (the stream is not
        on cuda_ipc, a tensor is elsewhere, or the ledger is full)."""
        ledger = self._ledger
        if (ledger is None or ledger.outstanding >= ledger.max_outstanding
                or not all(self.handoff.usable(t.device) for _, t in tensors)):
            return None
        try:
            exported = [self.handoff.export(t) for _, t in tensors]
        except (HandoffError, RuntimeError) as error:
            log_event("handoff_failed", level=30, peer=self.peer, error=str(error))
            return None
        ledger.hold(mb_id, [kept for _, kept in exported])
        _held(self.peer).set(ledger.outstanding)
        return lean_frames(stage_pb2.ForwardRequest, mb_id, tensors,
                           handles=[handle for handle, _ in exported], **fields)

    async def _to_host(self, tensors: Sequence[tuple[str, torch.Tensor]],
                       ) -> tuple[list[tuple[str, torch.Tensor]], list[torch.Tensor]]:
        """Device tensors' host copies through the pinned staging buffers (the runner's
        own path; here for a microbatch that could not be handed over), waited for off
        the loop; the buffers go back once the reply shows the bytes were sent."""
        host, buffers, events = self._staging.to_host_all([t for _, t in tensors])
        if events:
            await asyncio.to_thread(lambda: [event.synchronize() for event in events])
        return [(name, t) for (name, _), t in zip(tensors, host, strict=True)], buffers

    @property
    def negotiated(self) -> DataPath:
        """The current stream's data path: "cuda_ipc", "shm" or "grpc"."""
        return self._path

    @property
    def hands_over(self) -> bool:
        """Whether the current stream takes tensors on this client's device by handle
        (a stage then keeps its outputs on the device)."""
        return self._ledger is not None

    async def _negotiated(self) -> None:
        """Waits for the answer to this stream's offer; FAILED_PRECONDITION under
        `transport: shm` when there is no shared memory with the peer."""
        if self.transport == "grpc":
            return
        if not self._answered.is_set():  # (wait_for makes a task: not on every call)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), NEGOTIATION_WAIT_S)
        if self.transport == "shm" and self._ring is None and self._send is not None:
            raise ServiceError(StatusCode.FAILED_PRECONDITION, f"transport is shm, but "
                               f"{self.peer} at {self.address} shares no memory with this "
                               f"process: {self._refusal or 'no answer to the offer'}")

    @staticmethod
    def _lean_forward(channel: grpc.aio.Channel):
        """The Forward method with the lean (de)serializers (wire/lean.py)."""
        return channel.stream_stream(FORWARD_METHOD, request_serializer=serialize,
                                     response_deserializer=parse_response)

    def _offer(self, queue: asyncio.Queue) -> None:
        """Creates this stream's ring and queues the offer (with the CUDA probe when this
        client's tensors can be handed over), ahead of any microbatch (calls wait for the
        answer before they encode)."""
        self._answered.clear()
        if self.transport == "grpc":
            self._settle_path("grpc", "transport is grpc")
            return
        try:
            ring = ShmRing(self.slot_bytes, self.slots)
        except ShmUnavailable as error:
            self._refusal = str(error)
            log_event("shm_unavailable", level=30, peer=self.peer, reason=self._refusal)
            self._settle_path("grpc", self._refusal)
            return
        self._offered = ring
        offer = stage_pb2.ForwardRequest(microbatch_id=0, shm_offer=stage_pb2.ShmOffer(
            segment=ring.name, token=ring.token, slot_bytes=ring.slot_bytes, slots=ring.slots,
            doorbell=self.doorbell))
        if self.handoff.usable(self.device):
            try:
                token = probe_token()
                handle, self._probe = self.handoff.export(torch.frombuffer(
                    bytearray(token), dtype=torch.uint8).to(self.device))
                offer.cuda_offer.CopyFrom(stage_pb2.CudaOffer(
                    method=self.handoff.name, probe=handle.to_bytes(), token=token))
            except (HandoffError, RuntimeError) as error:  # no IPC here: the ring alone
                log_event("cuda_probe_failed", level=30, peer=self.peer, error=str(error))
        queue.put_nowait(offer)

    def _on_answer(self, frame: Any) -> None:
        """The peer's answer to the offer (an error frame: a peer that predates it)."""
        ring, self._offered = self._offered, None
        if ring is None:
            return
        offered_cuda, self._probe = self._probe is not None, None  # answered: freed
        if frame.HasField("shm_answer") and frame.shm_answer.accepted:
            ring.unlink()  # the peer unlinked it already; this covers a peer that did not
            self._ring, self._refusal = ring, ""
            self._ring_doorbell(frame.shm_answer)
            log_event("shm_negotiated", peer=self.peer, segment=ring.name,
                      slots=ring.slots, slot_bytes=ring.slot_bytes,
                      doorbell=self._bell is not None)
        else:
            ring.close()
            self._refusal = (frame.shm_answer.reason if frame.HasField("shm_answer")
                             else f"the peer does not take shared memory ({frame.error.message})")
            log_event("shm_refused", level=30, peer=self.peer, reason=self._refusal)
        cuda = frame.cuda_answer if frame.HasField("cuda_answer") else None
        try:
            path = choose_path(self.transport, str(self.device),
                               cuda.device if cuda is not None else "", self._ring is not None,
                               cuda is not None and cuda.accepted, self.handoff.device_type)
        except HandoffError:  # transport shm, no shared memory: calls fail (_negotiated)
            path = "grpc"
        if path == "cuda_ipc":
            self._ledger = HandoffLedger(self.max_handoffs)
            reason = ""
        elif self._refusal:  # no shared memory, so no CUDA IPC either
            reason = self._refusal
        elif not offered_cuda:
            reason = (f"no CUDA probe offered: tensors on {self.device} are not handed "
                      f"over by {self.handoff.name!r}")
        elif cuda is None:
            reason = "the peer did not answer the CUDA probe (it predates CUDA IPC)"
        else:
            reason = cuda.reason or f"the peer computes on {cuda.device}"
        self._settle_path(path, reason)

    def _ring_doorbell(self, answer: Any) -> None:
        """Connects to the doorbell the peer named (wire/doorbell.py); frames go there from
        now on. Without it (none named, or it cannot be reached) they stay on gRPC."""
        if not (self.doorbell and answer.doorbell):
            return
        try:
            sock = connect(answer.doorbell, answer.doorbell_token)
        except DoorbellError as error:
            log_event("doorbell_unavailable", level=30, peer=self.peer, reason=str(error))
            return
        self._bell = Doorbell(sock, parse_response,
                              lambda frame: self._on_frame(frame, self._replies),
                              self._on_bell_closed, MAX_MESSAGE_BYTES,
                              on_open=lambda: log_event("doorbell_open", peer=self.peer))

    def _on_bell_closed(self, reason: str, violation: bool) -> None:
        """A doorbell refused before its ACK carried nothing: the frames stay on gRPC. One
        that broke after it did: the stream is broken (_stream ends it and reconnects)."""
        bell, self._bell = self._bell, None
        if bell is not None and not bell.open:
            log_event("doorbell_unavailable", level=30, peer=self.peer, reason=reason)
        elif reason and self._bell_lost is not None and not self._bell_lost.done():
            self._bell_lost.set_result(reason)

    def _settle_path(self, path: DataPath, reason: str) -> None:
        """The stream's data path is known: calls may go; announced once connected."""
        self._path, self._path_reason = path, reason
        self._answered.set()
        if self._connected.is_set():
            self._announce_path()

    def _announce_path(self) -> None:
        """Logs and counts the path of a stream that is open (not of every attempt)."""
        if not self._announced:
            self._announced = True
            DATA_PATH_STREAMS.labels(self.peer, self._path).inc()
            log_event("data_path", peer=self.peer, path=self._path, transport=self.transport,
                      reason=self._path_reason or "-")

    def _drop_rings(self) -> None:
        """The stream ended: its ring goes with it (a new stream offers a fresh one), so
        no slot a dead or departed reader may hold is ever written again; the ledger lets
        go of every tensor it held (a receiver that is gone will not acknowledge; a live
        one still mapping an allocation keeps it through torch's IPC reference count)."""
        bell, self._bell = self._bell, None
        if bell is not None:
            bell.close()
        for ring in (self._ring, self._offered):
            if ring is not None:
                ring.close()
        self._ring = self._offered = self._probe = None
        self._slot_of.clear()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
            _held(self.peer).set(0)
        if self._announced:  # a stream whose path was counted: no longer open
            DATA_PATH_STREAMS.labels(self.peer, self._path).dec()
            self._announced = False
        self._path = "grpc"
        self._answered.set()  # waiting calls find the stream down and fail UNAVAILABLE

    def _release(self, mb_id: int) -> None:
        """The peer is done with the microbatch's slot or handed-over tensors."""
        number = self._slot_of.pop(mb_id, None)
        if number is not None and self._ring is not None:
            self._ring.give(number)
        if self._ledger is not None and self._ledger.acknowledge(mb_id):
            _held(self.peer).set(self._ledger.outstanding)

    def _set_queue(self, queue: asyncio.Queue | None) -> None:
        self._send = queue
        self._notify()

    def _notify(self) -> None:
        """Wakes the calls waiting for a stream attempt (see _await_attempt)."""
        self._progress.set()
        self._progress = asyncio.Event()

    async def _queue(self) -> asyncio.Queue:
        """The current stream's send queue, waiting briefly through a reconnection."""
        if self._send is None and not self._closed:
            await self._await_attempt()
        if self._send is None or self._closed:
            why = f" ({self._down_reason})" if self._down_reason else ""
            raise ServiceError(StatusCode.UNAVAILABLE, f"{self.peer} at {self.address} is "
                                                    f"unreachable{why}; reconnecting")
        return self._send

    async def _await_attempt(self) -> None:
        """Waits, at most RECONNECT_WAIT_S, until a stream opens or an attempt that started
        after this call arrived has failed. An earlier attempt's failure says nothing of
        the peer now: a dial made before the peer came up fails with a stale error. The
        wait cuts the reconnection pause short (DEMAND_DIAL_GAP_S), so a peer that came
        back serves its first call without waiting for the backoff."""
        after = self._attempts_started + 1
        self._wanted.set()
        deadline = asyncio.get_running_loop().time() + RECONNECT_WAIT_S
        while self._send is None and self._attempts_ended < after and not self._closed:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)

    async def wait_connected(self, timeout: float) -> None:
        """Waits until the stream is open (the peer answered); TimeoutError otherwise."""
        self.start()
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def _run(self) -> None:
        backoff = INITIAL_BACKOFF_S
        while not self._closed:
            self._wanted.clear()  # calls from now on want the next attempt
            self._attempts_started += 1
            error, was_connected = await self._stream(asyncio.Queue())
            self._attempts_ended += 1
            self._set_queue(None)
            self._connected.clear()
            self._fail_inflight(error)
            if self._closed:
                break
            if was_connected:
                backoff = INITIAL_BACKOFF_S
            log_event("next_hop_down", level=30, peer=self.peer, address=self.address,
                      error=error.message, retry_in=round(backoff, 3))
            await self._pause(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            await self._redial()
            self._answered.clear()

    async def _pause(self, backoff: float) -> None:
        """Sleeps `backoff` after an attempt, less once a call waits: then the next attempt
        comes DEMAND_DIAL_GAP_S after the last one ended (or at once, if that is past)."""
        loop = asyncio.get_running_loop()
        ended = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wanted.wait(), backoff)
        if self._wanted.is_set():
            await asyncio.sleep(max(0.0, ended + min(DEMAND_DIAL_GAP_S, backoff) - loop.time()))

    async def _stream(self, queue: asyncio.Queue) -> tuple[ServiceError, bool]:
        """Runs one stream until it breaks; returns why (UNAVAILABLE) and whether the peer
        had answered (then the backoff starts afresh). Calls get the stream's `queue` only
        once the peer answered: a call never goes into a stream that fails to open (then
        it waits for the next attempt instead: see _await_attempt), so a peer that comes up
        while a dial to it fails costs no request."""
        self._offer(queue)
        call = self._forward(_drain(queue))
        assembler = self._replies = FrameAssembler(max_payload_bytes=1 << 40)
        self._bell_lost = asyncio.get_running_loop().create_future()
        connected, reader = False, None
        try:
            await call.initial_metadata()  # returns (empty) also when the call failed
            if not call.done():
                connected = True
                self._down_reason = ""
                self._set_queue(queue)
                self._connected.set()
                log_event("next_hop_connected", peer=self.peer, address=self.address)
                if self._answered.is_set():  # settled before the stream opened (grpc)
                    self._announce_path()
            # Replies come on the stream, or on its doorbell once that is open: whichever
            # of the two ends first ends both.
            reader = asyncio.ensure_future(self._read_replies(call, assembler))
            await asyncio.wait((reader, self._bell_lost), return_when=asyncio.FIRST_COMPLETED)
            reason = reader.result() if reader.done() else self._bell_lost.result()
        except grpc.RpcError as rpc_error:
            reason = error_from_rpc(rpc_error).message or "stream failed"
        finally:
            if reader is not None:
                reader.cancel()
            queue.put_nowait(None)  # ends the request iterator
            call.cancel()
            self._drop_rings()
        self._down_reason = reason
        error = ServiceError(StatusCode.UNAVAILABLE, f"{self.peer} at {self.address}: {reason}")
        return error, connected

    async def _read_replies(self, call: Any, assembler: FrameAssembler) -> str:
        """Handles the stream's replies until it ends; returns why it ended."""
        try:
            async for frame in call:
                self._on_frame(frame, assembler)
            return "stream closed by the peer"
        except grpc.RpcError as rpc_error:
            return error_from_rpc(rpc_error).message or "stream failed"
        except Exception as error:  # a reply that does not parse: the stream is unusable
            return f"unreadable reply: {error!r}"

    async def _redial(self) -> None:
        """The next stream goes through a new channel when the certificates rotated (a
        channel keeps those it was made with), or when this one is in grpc's reconnect
        backoff: until that ends (up to 2 s) it fails every stream at once with the last
        dial's error, even after the peer came up, so a relay stage that started before
        its next hop refused its first requests. Our own backoff paces the dials."""
        channel = self._dialer.refresh(self.address, self._options)
        if (channel is None and self._channel.get_state()
                is grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            channel = self._dialer.channel(self.address, self._options)
        if channel is not None:
            old, self._channel = self._channel, channel
            self._stub = stage_pb2_grpc.StageServiceStub(channel)
            self._forward = self._lean_forward(channel)
            await old.close()

    def _on_frame(self, frame: Any, assembler: FrameAssembler) -> None:
        if frame.microbatch_id == 0 and self._offered is not None:
            self._on_answer(frame)
            return
        if frame.shm_released_slot:
            self._release(frame.microbatch_id)
            return
        self._release(frame.microbatch_id)  # answered (or failed): the reader is done
        future = self._inflight.get(frame.microbatch_id)
        if frame.HasField("error"):
            assembler.release(frame.microbatch_id)
            _settle(future, error=error_from_status(frame.error))
            return
        try:
            done = assembler.add(frame)
        except WireError as error:
            _settle(future, error=ServiceError(StatusCode.INTERNAL, f"bad reply from "
                                             f"{self.peer} at {self.address}: {error}"))
            return
        if done is not None:
            assembler.release(done.id)
            _wire_bytes("rx", self.peer).inc(done.first_frame.payload_bytes)
            _settle(future, result=(done.tensors, list(done.first_frame.compute_seconds)))

    def _fail_inflight(self, error: ServiceError) -> None:
        for future in list(self._inflight.values()):
            _settle(future, error=ServiceError(error.code, error.message))
        self._inflight.clear()

    async def describe(self, timeout: float = DESCRIBE_TIMEOUT_S) -> list[stage_pb2.StageInfo]:
        """DescribeChain of the stage and every stage after it."""
        try:
            reply = await self._stub.DescribeChain(stage_pb2.DescribeChainRequest(),
                                                   timeout=timeout)
        except grpc.RpcError as rpc_error:
            error = error_from_rpc(rpc_error)
            raise ServiceError(error.code, f"{self.peer} at {self.address}: "
                                         f"{error.message}") from None
        return list(reply.stages)

    async def close(self) -> None:
        self._closed = True
        self._notify()  # calls waiting for a stream fail now
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_inflight(ServiceError(StatusCode.UNAVAILABLE, "client closed"))
        await self._channel.close()


async def _drain(queue: asyncio.Queue) -> AsyncIterator[Any]:
    """The request side of a stream: frames as calls enqueue them."""
    while (frame := await queue.get()) is not None:
        yield frame


def _settle(future: asyncio.Future | None, result: Any = None,
            error: BaseException | None = None) -> None:
    """Resolves a caller's future unless it is gone (cancelled or already failed)."""
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def description_from_info(info: stage_pb2.StageInfo) -> StageDescription:
    return StageDescription(
        stage_index=info.stage_index, num_stages=info.num_stages,
        block_start=info.block_start, block_end=info.block_end, depth=info.depth,
        model_name=info.model_name, model_config_json=info.model_config_json,
        weight_hash=info.weight_hash, wire_dtype=info.wire_datatype, address=info.address,
        device=info.device, max_batch_size=info.max_batch_size, serving=info.serving)


def info_from_description(d: StageDescription) -> stage_pb2.StageInfo:
    return stage_pb2.StageInfo(
        stage_index=d.stage_index, num_stages=d.num_stages, block_start=d.block_start,
        block_end=d.block_end, depth=d.depth, model_name=d.model_name,
        model_config_json=d.model_config_json, weight_hash=d.weight_hash,
        wire_datatype=d.wire_dtype, address=d.address, device=d.device,
        max_batch_size=d.max_batch_size, serving=d.serving)
