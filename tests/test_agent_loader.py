"""Load-stream framing (`protos.load_stream`), header validation and the receiver
(`agents.loader`), without processes."""

from __future__ import annotations

import grpc
import pytest

from agents import loader
from agents.errors import AgentError, DataLoss, InvalidArgument
from agents.status_codes import status_of
from orchestrator import agent_client
from protos import agent_pb2, load_stream
from shardformat.address import shard_id_of


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 4 << 20, 2**40])
def test_chunk_framing_matches_protobuf(n: int) -> None:
    data = b"\x5a" * min(n, 5 << 20)
    wire = load_stream.frame_chunk(data)
    assert wire == agent_pb2.LoadShardRequest(chunk=data).SerializeToString()
    assert bytes(load_stream.chunk_payload(wire)) == data
    assert load_stream.encode_varint(n)[-1] < 0x80


def test_non_canonical_chunk_falls_back_to_a_parse() -> None:
    # An unknown field before the chunk is legal protobuf: parsed, not hand-framed.
    wire = b"\x18\x01" + load_stream.frame_chunk(b"abc")
    assert bytes(load_stream.chunk_payload(wire)) == b"abc"
    header = load_stream.header_message(agent_pb2.LoadShardHeader(shard_id="x"))
    with pytest.raises(load_stream.FramingError) as info:
        load_stream.chunk_payload(header)
    assert status_of(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(load_stream.FramingError):
        load_stream.chunk_payload(b"\x12\xff")  # truncated
    with pytest.raises(load_stream.FramingError, match="must be the header"):
        load_stream.parse_header_message(load_stream.frame_chunk(b"abc"))
    with pytest.raises(load_stream.FramingError, match="malformed"):
        load_stream.parse_header_message(b"\x0a\xff\xff")


def test_header_validation_names_the_field() -> None:
    blob = b"x" * 100
    good = agent_client.make_header(blob, 1)
    assert loader.validate_header(good, 2).reserved_bytes == 100
    cases = {
        "shard_id": agent_pb2.LoadShardHeader(shard_id="ABC", chip=0, size_bytes=1),
        "chip": agent_pb2.LoadShardHeader(shard_id=good.shard_id, chip=2, size_bytes=1),
        "size_bytes": agent_pb2.LoadShardHeader(shard_id=good.shard_id, chip=0),
        "digest_algorithm": agent_pb2.LoadShardHeader(
            shard_id=good.shard_id, chip=0, size_bytes=1, digest_algorithm="crc"
        ),
        "digest": agent_pb2.LoadShardHeader(
            shard_id=good.shard_id, chip=0, size_bytes=1, digest_algorithm="sha256"
        ),
    }
    for field, header in cases.items():
        with pytest.raises(AgentError, match=field):
            loader.validate_header(header, 2)
    # With blake3 the digest is the shard id: any other one could never verify.
    with pytest.raises(InvalidArgument, match=r"header\.digest"):
        loader.validate_header(
            agent_pb2.LoadShardHeader(
                shard_id=good.shard_id, chip=0, size_bytes=1, digest="ab" * 32
            ),
            2,
        )
    assert good.shard_id == shard_id_of(blob)
    default = loader.validate_header(
        agent_pb2.LoadShardHeader(shard_id=good.shard_id, chip=0, size_bytes=100), 1
    )
    assert (default.algorithm, default.digest) == ("blake3", good.shard_id)
    virtual = loader.validate_header(
        agent_pb2.LoadShardHeader(
            shard_id=good.shard_id, chip=0, size_bytes=100, virtual=True, declared_bytes=10_000
        ),
        1,
    )
    assert virtual.reserved_bytes == 10_000


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_receiver_verifies_size_and_digest(algorithm: str) -> None:
    blob = bytes(range(256)) * 64
    header = loader.validate_header(agent_client.make_header(blob, 0, algorithm=algorithm), 1)
    target = bytearray(len(blob))
    receiver = loader.ShardReceiver(header, memoryview(target))
    for i in range(0, len(blob), 1000):
        receiver.write(memoryview(blob)[i : i + 1000])
    assert receiver.finish() == header.digest and bytes(target) == blob

    corrupt = loader.ShardReceiver(header, memoryview(bytearray(len(blob))))
    corrupt.write(memoryview(b"\xff" + blob[1:]))
    with pytest.raises(DataLoss, match="blake3 of the received bytes"):
        corrupt.finish()

    over = loader.ShardReceiver(header, memoryview(bytearray(len(blob))))
    with pytest.raises(AgentError, match="carries more"):
        over.write(memoryview(blob + b"!"))
    over.close()
    over.close()  # idempotent


def test_sha256_load_also_proves_the_blake3_shard_id() -> None:
    """A header whose sha256 matches tampered bytes still fails: the id is BLAKE3-checked."""
    blob = bytes(range(256)) * 64
    tampered = b"\xff" + blob[1:]
    header = agent_client.make_header(tampered, 0, algorithm="sha256", shard_id=shard_id_of(blob))
    receiver = loader.ShardReceiver(
        loader.validate_header(header, 1), memoryview(bytearray(len(blob)))
    )
    receiver.write(memoryview(tampered))
    with pytest.raises(DataLoss, match="the shard id"):
        receiver.finish()


def test_default_chunks_are_small_and_within_the_protocol() -> None:
    # 1 MiB: the low end of the 1-4 MiB the proto names (see "Memory" in agents/loader.py).
    assert (1 << 20) <= load_stream.DEFAULT_CHUNK_BYTES <= loader.TRIM_AFTER_CHUNK_BYTES
    assert load_stream.DEFAULT_CHUNK_BYTES <= 4 << 20 <= load_stream.MAX_CHUNK_BYTES
    blob = b"z" * (3 * load_stream.DEFAULT_CHUNK_BYTES + 5)
    stream = load_stream.load_messages(agent_client.make_header(blob, 0), blob)
    assert len(stream) == 1 + 4
    assert all(
        len(load_stream.chunk_payload(m)) <= load_stream.DEFAULT_CHUNK_BYTES for m in stream[1:]
    )


def test_release_heap_is_safe_to_call() -> None:
    assert loader.release_heap() in (True, False)


@pytest.mark.parametrize(
    ("chunk", "trims"), [(loader.TRIM_AFTER_CHUNK_BYTES, 0), (loader.TRIM_AFTER_CHUNK_BYTES + 1, 1)]
)
def test_heap_is_trimmed_only_after_large_chunks(
    monkeypatch: pytest.MonkeyPatch, chunk: int, trims: int
) -> None:
    calls: list[None] = []
    monkeypatch.setattr(loader, "release_heap", lambda: calls.append(None) or True)
    blob = bytes(range(256)) * (2 * chunk // 256 + 1)
    header = loader.validate_header(agent_client.make_header(blob, 0), 1)
    for ending in ("finish", "close", "bad size"):
        calls.clear()
        receiver = loader.ShardReceiver(header, memoryview(bytearray(len(blob))))
        for i in range(0, len(blob) - (ending == "bad size"), chunk):
            receiver.write(memoryview(blob)[i : min(i + chunk, len(blob) - (ending == "bad size"))])
        if ending == "close":
            receiver.close()
        elif ending == "bad size":
            with pytest.raises(AgentError, match="ended after"):
                receiver.finish()
        else:
            assert receiver.finish() == header.digest
        receiver.close()  # idempotent: at most one trim per load
        assert len(calls) == trims, ending
        assert receiver.trimmed == bool(trims)


def test_receiver_lets_go_of_the_block_when_done() -> None:
    # So `SramArena.free_block` can release the block's view at once (no BufferError).
    blob = b"q" * 10_000
    header = loader.validate_header(agent_client.make_header(blob, 0), 1)
    target = bytearray(len(blob))
    view = memoryview(target)
    receiver = loader.ShardReceiver(header, view)
    receiver.write(memoryview(blob))
    assert receiver.finish() == header.digest and bytes(target) == blob
    view.release()  # would raise BufferError if the receiver still exported it
