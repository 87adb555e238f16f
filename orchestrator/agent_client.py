"""The control plane's side of the agent wire: dial an agent, build load headers, send loads.

This is the "agent gateway" adapter of the control plane in its first form: everything the
orchestrator says to an agent goes through gRPC on channels made here (`dial`), and a shard
load is a pre-framed `LoadShard` stream (`protos.load_stream` frames it; `send_load` passes
the messages through an identity serializer, so a chunk is never parsed or copied by
protobuf on the way out).

Digest decision (see `agents.loader`): the shard id is the BLAKE3 of the blob, and an agent
proves it on every load. A header names the shard id and the verification digest; with
"blake3" (the default) the digest is the shard id itself, "sha256" adds an audit digest the
agent checks as well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from protos import agent_pb2
from protos.load_stream import (
    DEFAULT_CHUNK_BYTES,
    LOAD_METHOD,
    MAX_MESSAGE_BYTES,
    frame_chunk,
    header_message,
    load_messages,
)
from security.certs import Credentials
from security.identity import agent_identity
from security.tls import open_channel
from shardformat.address import SHARD_ID_ALGORITHM, file_shard_id, shard_id_of
from shardformat.codec import parse_header
from shardformat.manifest import Manifest, manifest_of_metadata

DIGEST_ALGORITHMS = ("blake3", "sha256")
_MAX_HEADER_READ = 128 << 20  # more than any safetensors header the codec accepts


def channel_options() -> list[tuple[str, int]]:
    """Channel options for agents: messages up to a load chunk plus framing."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def dial(address: str, credentials: Credentials | None, node: str | None = None) -> grpc.Channel:
    """A channel to the agent at `address`: mutual TLS as `credentials`' identity (normally
    the control plane's) checking the agent's certificate names `node` (any agent of the
    cluster when None); plaintext when `credentials` is None (`--insecure`, loopback only)."""
    return open_channel(
        address,
        credentials,
        peer=None if node is None else agent_identity(node),
        options=channel_options(),
    )


# --- headers ---------------------------------------------------------------------------------


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in DIGEST_ALGORITHMS:
        raise ValueError(f"digest algorithm {algorithm!r} is not one of {DIGEST_ALGORITHMS}")


def blob_digest(blob: bytes | memoryview, algorithm: str) -> str:
    """Hex digest of a whole blob (BLAKE3 on all cores: the sender's one pass)."""
    _check_algorithm(algorithm)
    if algorithm == SHARD_ID_ALGORITHM:
        return shard_id_of(blob)
    return hashlib.sha256(blob).hexdigest()


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a blob on disk (BLAKE3 memory-maps it and uses every core)."""
    _check_algorithm(algorithm)
    if algorithm == SHARD_ID_ALGORITHM:
        return file_shard_id(path)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_header(
    blob: bytes | memoryview,
    chip: int,
    *,
    algorithm: str = SHARD_ID_ALGORITHM,
    virtual: bool = False,
    declared_bytes: int = 0,
    shard_id: str | None = None,
) -> agent_pb2.LoadShardHeader:
    """A header for `blob` on `chip`: its shard id (BLAKE3, computed unless given) and the
    chosen verification digest."""
    _check_algorithm(algorithm)
    sid = shard_id or shard_id_of(blob)
    digest = sid if algorithm == SHARD_ID_ALGORITHM else blob_digest(blob, algorithm)
    return agent_pb2.LoadShardHeader(
        shard_id=sid,
        chip=chip,
        size_bytes=len(blob),
        digest_algorithm=algorithm,
        digest=digest,
        virtual=virtual,
        declared_bytes=declared_bytes,
    )


def make_file_header(
    path: str | Path,
    chip: int,
    *,
    shard_id: str,
    algorithm: str = SHARD_ID_ALGORITHM,
    virtual: bool = False,
    declared_bytes: int = 0,
) -> agent_pb2.LoadShardHeader:
    """A header for a blob in the shard store (`shard_id` is its BLAKE3 name there: the file
    is not hashed again for a BLAKE3 load; the agent verifies it)."""
    _check_algorithm(algorithm)
    digest = shard_id if algorithm == SHARD_ID_ALGORITHM else file_digest(path, algorithm)
    return agent_pb2.LoadShardHeader(
        shard_id=shard_id,
        chip=chip,
        size_bytes=Path(path).stat().st_size,
        digest_algorithm=algorithm,
        digest=digest,
        virtual=virtual,
        declared_bytes=declared_bytes,
    )


def blob_manifest(path: str | Path) -> Manifest:
    """The manifest of the shard blob at `path` (read from its header only)."""
    with open(path, "rb") as f:
        length = f.read(8)
        size = int.from_bytes(length, "little") if len(length) == 8 else 0
        prefix = length + f.read(min(size, _MAX_HEADER_READ))
    manifest = manifest_of_metadata(parse_header(prefix).metadata)
    if manifest is None:
        raise ValueError(f"{path}: not a Lockstep shard (no manifest)")
    return manifest


def declared_bytes_of(path: str | Path) -> int:
    """The SRAM bytes the plan budgets for a shard's chip (weights + KV cache + workspace),
    from the manifest of the blob at `path`. A load header declares them, so the agent
    reserves the whole budget (for a virtual, manifest-only shard it must)."""
    return blob_manifest(path).declared_bytes


# --- streams ---------------------------------------------------------------------------------


def blob_messages(
    blob: bytes | memoryview,
    chip: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    algorithm: str = SHARD_ID_ALGORITHM,
    virtual: bool = False,
    declared_bytes: int = 0,
    shard_id: str | None = None,
) -> list[bytes]:
    """The pre-framed stream for an in-memory blob on `chip` (header + chunks)."""
    header = make_header(
        blob,
        chip,
        algorithm=algorithm,
        virtual=virtual,
        declared_bytes=declared_bytes,
        shard_id=shard_id,
    )
    return load_messages(header, blob, chunk_bytes)


def file_messages(
    header: agent_pb2.LoadShardHeader, path: str | Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """The serialized stream for a blob on disk, read chunk by chunk (constant memory, and
    lazily: when the agent answers "already loaded" after the header, the rest is not read)."""
    yield header_message(header)
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            yield frame_chunk(data)


def load_call(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """`LoadShard` taking pre-serialized request messages (identity serializer)."""
    return channel.stream_unary(
        LOAD_METHOD,
        request_serializer=None,
        response_deserializer=agent_pb2.LoadShardResponse.FromString,
    )


def send_load(
    channel: grpc.Channel, messages: Iterable[bytes], *, timeout: float | None = None
) -> agent_pb2.LoadShardResponse:
    """Stream a load; raises `grpc.RpcError` with the agent's status on failure."""
    response: agent_pb2.LoadShardResponse = load_call(channel)(iter(messages), timeout=timeout)
    return response


def load_file(
    channel: grpc.Channel,
    path: str | Path,
    chip: int,
    *,
    shard_id: str,
    virtual: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    algorithm: str = SHARD_ID_ALGORITHM,
    timeout: float | None = None,
) -> agent_pb2.LoadShardResponse:
    """Load the shard-store blob at `path` (named `shard_id`) onto `chip` of the agent behind
    `channel`; the header declares the chip's SRAM budget from the shard's manifest."""
    manifest = blob_manifest(path)  # a virtual blob says so, whatever the caller passed
    header = make_file_header(
        path,
        chip,
        shard_id=shard_id,
        algorithm=algorithm,
        virtual=virtual or manifest.virtual,
        declared_bytes=manifest.declared_bytes,
    )
    return send_load(channel, file_messages(header, path, chunk_bytes), timeout=timeout)
