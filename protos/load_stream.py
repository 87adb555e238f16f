"""The LoadShard wire framing: build and parse the messages of one load stream.

The wire format is `LoadShardRequest` of `protos/agent.proto`: a `header`, then the blob as
`chunk` messages. Both ends move chunks as raw bytes (identity (de)serializers) instead of
protobuf objects, because parsing a `bytes` field copies it (0.5-1.1 GB/s with protobuf
messages against 1.1-1.5 GB/s passed through). A chunk message is, exactly as protobuf encodes
it, tag 0x12 + varint length + payload; `chunk_payload` reads it as a zero-copy memoryview, so
a standard protobuf client (e.g. `agent_pb2_grpc.AgentStub`) and a pre-framed sender
interoperate.

Why here, in `protos`: the framing is protocol knowledge that both ends need — the control
plane sends loads (`orchestrator.agent_client`), the agent receives them (`agents.loader`) —
and neither may import the other. This module is pure: no I/O, no server or client logic, no
digests (the shard id is the shard format's business). A malformed message raises
`FramingError` (a `ValueError`); the agent maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from protos import agent_pb2

LOAD_METHOD = "/lockstep.agent.v1.Agent/LoadShard"
DEFAULT_CHUNK_BYTES = 1 << 20  # the low end of the 1-4 MiB the proto names (agents/loader.py)
MAX_CHUNK_BYTES = 8 << 20  # the largest chunk an agent accepts
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64  # a chunk plus its framing: both ends' message limit
HEADER_TAG = 0x0A  # field 1 (header), length-delimited
CHUNK_TAG = 0x12  # field 2 (chunk), length-delimited


class FramingError(ValueError):
    """A load-stream message that is not what the protocol allows at its place."""


def encode_varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    if value < 0:
        raise ValueError(f"a varint is non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; `FramingError` when truncated."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise FramingError("truncated varint")


def parse_request(message: bytes, what: str) -> agent_pb2.LoadShardRequest:
    """A protobuf parse of one stream message; a malformed one is a `FramingError`."""
    try:
        return agent_pb2.LoadShardRequest.FromString(message)
    except DecodeError as exc:
        raise FramingError(f"malformed LoadShardRequest {what}: {exc}") from None


def chunk_payload(message: bytes) -> memoryview:
    """The payload of a serialized `LoadShardRequest{chunk}`, without copying it.

    Falls back to a protobuf parse (a copy) for encodings other than the canonical single
    field, so any conforming client works.
    """
    if message[:1] == bytes([CHUNK_TAG]):
        try:
            length, pos = decode_varint(message, 1)
        except FramingError:
            length, pos = -1, 0
        if pos + length == len(message):
            return memoryview(message)[pos:]
    request = parse_request(message, "message")
    kind = request.WhichOneof("kind")
    if kind != "chunk":
        raise FramingError(
            f"expected a chunk message after the header, got {kind or 'an empty message'}"
        )
    return memoryview(request.chunk)


def parse_header_message(message: bytes) -> agent_pb2.LoadShardHeader:
    """The header of the first message of a load stream (fields unchecked: the agent
    validates them against its chips)."""
    request = parse_request(message, "header")
    if request.WhichOneof("kind") != "header":
        raise FramingError("the first LoadShard message must be the header")
    return request.header


def frame_chunk(data: bytes | memoryview) -> bytes:
    """A serialized `LoadShardRequest{chunk: data}` (one copy of `data`)."""
    return b"".join((bytes([CHUNK_TAG]), encode_varint(len(data)), data))


def header_message(header: agent_pb2.LoadShardHeader) -> bytes:
    """A serialized `LoadShardRequest{header}`: the first message of a load stream."""
    return bytes(agent_pb2.LoadShardRequest(header=header).SerializeToString())


def load_messages(
    header: agent_pb2.LoadShardHeader,
    blob: bytes | memoryview,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[bytes]:
    """The serialized stream for one in-memory blob, pre-framed (build once, send many)."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    view = memoryview(blob)
    return [header_message(header)] + [
        frame_chunk(view[i : i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)
    ]
