"""The Forward stream's messages without protobuf copies of their payload.

A frame's `chunk` (field 4 of both ForwardRequest and ForwardResponse) is most of its
bytes. The generated serializers copy it three times on the way out (join into a chunk,
into the message, serialise) and twice on the way in (parse, then `frame.chunk` makes a
new bytes object). The stream's methods are therefore registered with these instead:

- `serialize`: a `LeanFrame` is the frame's other fields serialised by protobuf, then
  the chunk's tag, length and bytes, joined ONCE straight from the tensors' memory. The
  bytes on the wire are the same protobuf message (a parser takes fields in any order),
  so peers built from the .proto interoperate unchanged.
- `parse_request` / `parse_response`: walk the message's top-level fields; the chunk
  becomes a memoryview of the received bytes (no copy), the rest is parsed by protobuf.

The receiver's one copy is the FrameAssembler's, into the microbatch's buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ditserve_client.proto.dit.v1 import stage_pb2

CHUNK_FIELD = 4
"""Field number of `chunk` in ForwardRequest and ForwardResponse."""
_CHUNK_TAG = bytes([CHUNK_FIELD << 3 | 2])  # length-delimited


class LeanFrame:
    """A frame to send: `header` (a ForwardRequest/ForwardResponse without its chunk) and
    the chunk as a list of memoryviews (parts of tensors, joined only when serialised)."""

    __slots__ = ("header", "parts", "size")

    def __init__(self, header: Any, parts: list[memoryview] | None = None):
        self.header = header
        self.parts = parts or []
        self.size = sum(p.nbytes for p in self.parts)

    def __getattr__(self, name: str) -> Any:  # reads as the message it stands for
        if name == "chunk":
            return b"".join(self.parts)
        return getattr(self.header, name)

    def SerializeToString(self) -> bytes:
        return serialize(self)


class ParsedFrame:
    """A received frame: the message without its chunk, and the chunk as a memoryview of
    the received bytes."""

    __slots__ = ("chunk", "message")

    def __init__(self, message: Any, chunk: memoryview):
        self.message, self.chunk = message, chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


_ALIGN_PREFIX = bytes([1 << 3, 0])
"""`microbatch_id = 0` (field 1, a varint), overridden by the header's own, which follows:
two bytes that, with the chunk's tag and a length padded to 5 bytes, put the payload 8
bytes into the message, so it starts 8-aligned in the receiver's buffer and a one-chunk
microbatch's tensors are viewed in place there (FrameAssembler), not copied to align
them."""
_LENGTH_BYTES = 5
"""The longest varint protobuf parsers take for a length (a 32-bit size)."""


def serialize(frame: Any) -> bytes:
    """Wire bytes of a LeanFrame (one join) or of a plain message."""
    if not isinstance(frame, LeanFrame):
        return frame.SerializeToString()
    head = frame.header.SerializeToString()
    if not frame.size:
        return head
    return b"".join([_ALIGN_PREFIX, _CHUNK_TAG, _varint(frame.size, _LENGTH_BYTES),
                     *frame.parts, head])


def _varint(value: int, width: int = 0) -> bytes:
    """`value` as a protobuf varint, padded to `width` bytes with continuation bytes (a
    longer encoding of the same number, which protobuf parsers accept)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    while len(out) < width:
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(data: memoryview, pos: int, wire_type: int) -> int:
    """The position after a field's value (protobuf wire types 0, 1, 2, 5)."""
    if wire_type == 0:
        return _read_varint(data, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    if wire_type == 2:
        length, pos = _read_varint(data, pos)
        return pos + length
    raise ValueError(f"unsupported protobuf wire type {wire_type}")


def _parser(message_cls: type) -> Callable[[bytes], ParsedFrame]:
    def parse(data: bytes) -> ParsedFrame:
        view = memoryview(data)
        pos, chunk, rest = 0, view[0:0], []
        start = 0  # of the current run of non-chunk fields
        while pos < len(view):
            field_start = pos
            key, pos = _read_varint(view, pos)
            if key >> 3 == CHUNK_FIELD and key & 7 == 2:
                length, pos = _read_varint(view, pos)
                if pos + length > len(view):
                    raise ValueError("chunk runs past the end of the message")
                rest.append(view[start:field_start])
                chunk = view[pos:pos + length]  # the last one wins, as in protobuf
                pos += length
                start = pos
            else:
                pos = _skip(view, pos, key & 7)
        if pos != len(view):
            raise ValueError("field runs past the end of the message")
        rest.append(view[start:])
        header = rest[0] if len(rest) == 1 else b"".join(rest)
        return ParsedFrame(message_cls.FromString(bytes(header)), chunk)
    return parse


parse_request: Callable[[bytes], ParsedFrame] = _parser(stage_pb2.ForwardRequest)
parse_response: Callable[[bytes], ParsedFrame] = _parser(stage_pb2.ForwardResponse)
