"""Streaming shard loading: the wire framing, digest verification, and the sending side.

The wire format is `LoadShardRequest` of `protos/agent.proto`: a `header`, then the blob as
`chunk` messages. Both ends move chunks as raw bytes (identity (de)serializers) instead of
protobuf objects, because parsing a `bytes` field copies it (machine-facts.md: 0.5-1.1 GB/s
with protobuf messages against 1.1-1.5 GB/s passed through). A chunk message is, exactly as
protobuf encodes it, tag 0x12 + varint length + payload; `chunk_payload` reads it as a
zero-copy memoryview, so a standard protobuf client (e.g. `agent_pb2_grpc.AgentStub`) and
this module's pre-framed sender interoperate.

Digest decision. The content address of a shard stays the sha256 of its blob (the shard
store names blobs by it). For verifying a load the header names the algorithm:

* "blake3" (the default of `make_header` and `make_file_header`): on this 2-core machine the
  receiving agent's CPU is the limit of a load (gRPC's own receive copies, the copy into the
  arena and the digest all share it with the sender), so the digest must be cheap. BLAKE3
  runs at 3.4-4.9 GB/s on one core against hashlib sha256's 1.4-1.6 GB/s; in
  bench/shard_load.py a load verifies at 1.1-1.3 GB/s with BLAKE3 and 0.95-1.05 GB/s with
  sha256, so only BLAKE3 meets the 1.0 GB/s target reliably. The sender computes the BLAKE3
  digest of a blob once (`blob_digest`, `file_digest`: all cores); the store may cache it.
  It proves the agent holds exactly the bytes the sender read from the store.
* "sha256": verifies against the content address itself — the end-to-end audit option, at
  the cost above.

Hashing runs in a helper thread pipelined with the receive loop (hashlib and blake3 release
the GIL on large buffers): the receive loop copies chunk k into the arena while chunk k-1 is
hashed from the arena — the bytes hashed are the bytes that will be committed.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import grpc
import numpy as np
from google.protobuf.message import DecodeError

from protos import agent_pb2

DIGEST_ALGORITHMS = ("sha256", "blake3")
DEFAULT_CHUNK_BYTES = 4 << 20
MAX_CHUNK_BYTES = 8 << 20
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64
LOAD_METHOD = "/lockstep.agent.v1.Agent/LoadShard"
_HEADER_TAG = 0x0A  # field 1, length-delimited
_CHUNK_TAG = 0x12  # field 2, length-delimited
_HEX64 = re.compile(r"[0-9a-f]{64}")


class LoadError(Exception):
    """A load that must end with a gRPC status; the message names chip, shard and numbers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- framing ---------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def chunk_payload(message: bytes) -> memoryview:
    """The payload of a serialized `LoadShardRequest{chunk}`, without copying it.

    Falls back to a protobuf parse (a copy) for encodings other than the canonical single
    field, so any conforming client works.
    """
    if message[:1] == bytes([_CHUNK_TAG]):
        try:
            length, pos = _decode_varint(message, 1)
        except ValueError:
            length, pos = -1, 0
        if pos + length == len(message):
            return memoryview(message)[pos:]
    try:
        request = agent_pb2.LoadShardRequest.FromString(message)
    except DecodeError as exc:
        raise LoadError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"malformed LoadShardRequest message: {exc}") from None
    if request.WhichOneof("kind") != "chunk":
        raise LoadError(grpc.StatusCode.INVALID_ARGUMENT,
                        "expected a chunk message after the header, got "
                        f"{request.WhichOneof('kind') or 'an empty message'}")
    return memoryview(request.chunk)


def parse_header_message(message: bytes) -> agent_pb2.LoadShardHeader:
    """The header of the first message of a load stream."""
    try:
        request = agent_pb2.LoadShardRequest.FromString(message)
    except DecodeError as exc:
        raise LoadError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"malformed LoadShardRequest header: {exc}") from None
    if request.WhichOneof("kind") != "header":
        raise LoadError(grpc.StatusCode.INVALID_ARGUMENT,
                        "the first LoadShard message must be the header")
    return request.header


def frame_chunk(data: bytes | memoryview) -> bytes:
    """A serialized `LoadShardRequest{chunk: data}` (one copy of `data`)."""
    return b"".join((bytes([_CHUNK_TAG]), encode_varint(len(data)), data))


def header_message(header: agent_pb2.LoadShardHeader) -> bytes:
    return bytes(agent_pb2.LoadShardRequest(header=header).SerializeToString())


# --- header validation -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardHeader:
    """A validated load header; `reserved_bytes` is what the chip accounts for the shard."""

    shard_id: str
    chip: int
    size_bytes: int
    algorithm: str
    digest: str
    virtual: bool
    declared_bytes: int

    @property
    def reserved_bytes(self) -> int:
        return max(self.size_bytes, self.declared_bytes)

    @property
    def label(self) -> str:
        return f"shard {self.shard_id[:12]}"


def validate_header(raw: agent_pb2.LoadShardHeader, chips: int) -> ShardHeader:
    """Check a header's fields; INVALID_ARGUMENT naming the field when one is wrong."""

    def bad(message: str) -> LoadError:
        return LoadError(grpc.StatusCode.INVALID_ARGUMENT, message)

    if not _HEX64.fullmatch(raw.shard_id):
        raise bad(f"header.shard_id must be the blob's lowercase sha256 hex, got "
                  f"{raw.shard_id[:80]!r}")
    if raw.chip >= chips:
        raise bad(f"header.chip {raw.chip} does not exist (this node has chips 0..{chips - 1})")
    if raw.size_bytes <= 0:
        raise bad("header.size_bytes must be positive")
    algorithm = raw.digest_algorithm or "sha256"
    if algorithm not in DIGEST_ALGORITHMS:
        raise bad(f"header.digest_algorithm {algorithm!r} is not one of "
                  f"{', '.join(DIGEST_ALGORITHMS)}")
    digest = raw.digest or (raw.shard_id if algorithm == "sha256" else "")
    if not _HEX64.fullmatch(digest):
        raise bad(f"header.digest must be 64 lowercase hex digits of the {algorithm} digest, "
                  f"got {raw.digest[:80]!r}")
    return ShardHeader(raw.shard_id, raw.chip, raw.size_bytes, algorithm, digest, raw.virtual,
                       raw.declared_bytes)


# --- digest ----------------------------------------------------------------------------------


def new_hash(algorithm: str) -> Any:
    """A fresh incremental hash object (`update`, `hexdigest`) of the named algorithm."""
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


class Digester:
    """Hashes buffers in submission order on a helper thread, overlapping the receive loop."""

    _DONE = object()

    def __init__(self, algorithm: str) -> None:
        self._hash = new_hash(algorithm)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"digest-{algorithm}",
                                        daemon=True)
        self._thread.start()

    def update(self, view: memoryview) -> None:
        self._queue.put(view)

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            if not self._cancelled:
                self._hash.update(item)

    def hexdigest(self) -> str:
        """Wait for every submitted buffer and return the digest."""
        self._queue.put(self._DONE)
        self._thread.join()
        return str(self._hash.hexdigest())

    def close(self) -> None:
        """Stop hashing and wait for the thread, so no buffer is read after this returns."""
        if self._thread.is_alive():
            self._cancelled = True
            self._queue.put(self._DONE)
            self._thread.join()


class ShardReceiver:
    """Writes a load's chunks into its arena block in order, digesting what was written.

    `bytes_loaded` is read by Status from other threads (an int: atomic under the GIL).
    """

    def __init__(self, header: ShardHeader, target: memoryview) -> None:
        self.header = header
        self.bytes_loaded = 0
        self._target = target
        # numpy's copy releases the GIL (a memoryview slice assignment does not), so gRPC's
        # thread can assemble the next message while this one is copied.
        self._target_array = np.frombuffer(target, dtype=np.uint8)
        self._digester = Digester(header.algorithm)

    def write(self, payload: memoryview) -> None:
        start, end = self.bytes_loaded, self.bytes_loaded + len(payload)
        if end > self.header.size_bytes:
            raise LoadError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chip {self.header.chip}: {self.header.label} declared {self.header.size_bytes}"
                f" bytes but the stream carries more (at least {end})",
            )
        if len(payload) > MAX_CHUNK_BYTES:
            raise LoadError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"chunk of {len(payload)} bytes exceeds {MAX_CHUNK_BYTES}")
        np.copyto(self._target_array[start:end], np.frombuffer(payload, dtype=np.uint8))
        self._digester.update(self._target[start:end])
        self.bytes_loaded = end

    def finish(self) -> str:
        """Check the size and the digest once the stream has ended; the verified digest."""
        header = self.header
        if self.bytes_loaded != header.size_bytes:
            self._digester.close()
            raise LoadError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chip {header.chip}: {header.label} declared {header.size_bytes} bytes, the "
                f"stream ended after {self.bytes_loaded}",
            )
        actual = self._digester.hexdigest()
        if actual != header.digest:
            raise LoadError(
                grpc.StatusCode.DATA_LOSS,
                f"chip {header.chip}: {header.label} failed verification: {header.algorithm} "
                f"of the received bytes is {actual}, the header declares {header.digest}",
            )
        return actual

    def close(self) -> None:
        """Abort: stop the digest thread (idempotent)."""
        self._digester.close()
        self._target_array = np.empty(0, dtype=np.uint8)


# --- the sending side ------------------------------------------------------------------------


def blob_digest(blob: bytes | memoryview, algorithm: str) -> str:
    """Hex digest of a whole blob (BLAKE3 on all cores: this is the sender's one pass)."""
    if algorithm == "blake3":
        return blake3.blake3(blob, max_threads=blake3.blake3.AUTO).hexdigest()
    return new_hash_hex(blob, algorithm)


def new_hash_hex(blob: bytes | memoryview, algorithm: str) -> str:
    h = new_hash(algorithm)
    h.update(blob)
    return str(h.hexdigest())


def make_header(blob: bytes | memoryview, chip: int, *, algorithm: str = "blake3",
                virtual: bool = False, declared_bytes: int = 0,
                shard_id: str | None = None) -> agent_pb2.LoadShardHeader:
    """A header for `blob`: its sha256 content address and the chosen verification digest."""
    sha = shard_id or new_hash_hex(blob, "sha256")
    digest = sha if algorithm == "sha256" else blob_digest(blob, algorithm)
    return agent_pb2.LoadShardHeader(
        shard_id=sha, chip=chip, size_bytes=len(blob), digest_algorithm=algorithm,
        digest=digest, virtual=virtual, declared_bytes=declared_bytes,
    )


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a blob on disk (BLAKE3 memory-maps it and uses every core)."""
    if algorithm == "blake3":
        return str(blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest())
    h = new_hash(algorithm)
    with open(path, "rb") as f:
        while data := f.read(DEFAULT_CHUNK_BYTES):
            h.update(data)
    return str(h.hexdigest())


def make_file_header(path: str | Path, chip: int, *, shard_id: str,
                     algorithm: str = "blake3", virtual: bool = False,
                     declared_bytes: int = 0) -> agent_pb2.LoadShardHeader:
    """A header for a blob in the shard store (`shard_id` is its sha256 name there)."""
    digest = shard_id if algorithm == "sha256" else file_digest(path, algorithm)
    return agent_pb2.LoadShardHeader(
        shard_id=shard_id, chip=chip, size_bytes=Path(path).stat().st_size,
        digest_algorithm=algorithm, digest=digest, virtual=virtual,
        declared_bytes=declared_bytes,
    )


def load_messages(header: agent_pb2.LoadShardHeader, blob: bytes | memoryview,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """The serialized stream for one load, pre-framed (build once, send many times)."""
    view = memoryview(blob)
    return [header_message(header)] + [
        frame_chunk(view[i : i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)
    ]


def file_messages(header: agent_pb2.LoadShardHeader, path: str | Path,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The serialized stream for a blob on disk, read chunk by chunk (constant memory)."""
    yield header_message(header)
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            yield frame_chunk(data)


def load_call(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """`LoadShard` taking pre-serialized request messages (identity serializer)."""
    return channel.stream_unary(
        LOAD_METHOD, request_serializer=None,
        response_deserializer=agent_pb2.LoadShardResponse.FromString,
    )


def send_load(channel: grpc.Channel, messages: Iterable[bytes], *,
              timeout: float | None = None) -> agent_pb2.LoadShardResponse:
    """Stream a load; raises `grpc.RpcError` with the agent's status on failure."""
    response: agent_pb2.LoadShardResponse = load_call(channel)(iter(messages), timeout=timeout)
    return response


def channel_options() -> list[tuple[str, int]]:
    """Channel options for loads: messages up to a chunk plus framing."""
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
