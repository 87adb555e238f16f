"""The control plane's sending side of a load (`orchestrator.agent_client`) and the shared
framing (`protos.load_stream`), without processes: headers, streams, manifest budgets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from agent_helpers import make_shard, make_virtual_shard

from orchestrator import agent_client
from orchestrator.compiler import ChipBinding, ShardRef
from orchestrator.serving import BringUpError, load_shards
from protos import agent_pb2, load_stream
from shardformat.address import shard_id_of


def test_headers_name_the_blake3_shard_id_and_the_chosen_digest(tmp_path: Path) -> None:
    blob = make_shard(5000, seed=1)
    b3 = agent_client.make_header(blob, 3)
    assert (b3.shard_id, b3.digest, b3.digest_algorithm) == (shard_id_of(blob),) * 2 + ("blake3",)
    assert b3.chip == 3 and b3.size_bytes == len(blob)
    sha = agent_client.make_header(blob, 0, algorithm="sha256")
    assert sha.shard_id == shard_id_of(blob) and sha.digest == hashlib.sha256(blob).hexdigest()
    path = tmp_path / "blob"
    path.write_bytes(blob)
    on_disk = agent_client.make_file_header(path, 0, shard_id=sha.shard_id, algorithm="sha256")
    assert on_disk == sha
    with pytest.raises(ValueError, match="md5"):
        agent_client.make_header(blob, 0, algorithm="md5")


def test_declared_bytes_come_from_the_manifest(tmp_path: Path) -> None:
    virtual = tmp_path / "virtual"
    virtual.write_bytes(make_virtual_shard(7 << 20))
    assert agent_client.declared_bytes_of(virtual) == 7 << 20
    real = tmp_path / "real"
    real.write_bytes(make_shard(100, declared_bytes=12345))
    assert agent_client.declared_bytes_of(real) == 12345
    other = tmp_path / "other"
    other.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="no manifest"):
        agent_client.declared_bytes_of(other)


def test_file_streams_frame_the_same_bytes_as_in_memory_blobs(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 1000
    path = tmp_path / "blob"
    path.write_bytes(blob)
    header = agent_client.make_header(blob, 1)
    from_file = list(agent_client.file_messages(header, path, 64 << 10))
    assert from_file == load_stream.load_messages(header, blob, 64 << 10)
    assert from_file == agent_client.blob_messages(blob, 1, chunk_bytes=64 << 10)
    assert load_stream.parse_header_message(from_file[0]) == header
    assert b"".join(bytes(load_stream.chunk_payload(m)) for m in from_file[1:]) == blob


@pytest.mark.parametrize("chunk", [0, -1, load_stream.MAX_CHUNK_BYTES + 1])
def test_chunks_outside_the_protocol_are_refused(chunk: int) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        load_stream.load_messages(agent_pb2.LoadShardHeader(), b"abc", chunk)


def test_a_load_to_an_unknown_agent_or_chip_is_refused_before_any_rpc(tmp_path: Path) -> None:
    """`where` must place every shard on an agent there is a channel to."""
    blob = make_shard(100)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    binding = ChipBinding("d", "n0/chip-0", 0, 0, 1, 0, 0, 1, ("n0/chip-0",), (), ())
    ref = ShardRef("d/r0/s0", "n0/chip-0", len(blob), shard_id_of(blob), path, False, binding)
    with pytest.raises(ValueError, match="has no agent"):
        load_shards([ref], {}, {})
    with pytest.raises(ValueError, match=r"no channel to agent 10\.0\.0\.1:1"):
        load_shards([ref], {"n0/chip-0": ("10.0.0.1:1", 0)}, {})


def test_a_bring_up_error_says_step_agent_and_code() -> None:
    error = BringUpError("configure", "a:1", grpc.StatusCode.ALREADY_EXISTS, "chip 0 is bound")
    assert str(error) == "configure on agent a:1 failed (ALREADY_EXISTS): chip 0 is bound"
