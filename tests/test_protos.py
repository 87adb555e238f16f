"""Generated protobuf/gRPC code is committed: it must match a fresh generation."""

from __future__ import annotations

import filecmp
from pathlib import Path

from protos import agent_pb2, agent_pb2_grpc, interconnect_pb2, interconnect_pb2_grpc
from protos.generate import REPO_ROOT, generate


def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "no .proto sources found"
    stale = [
        str(p.relative_to(tmp_path))
        for p in fresh
        if not filecmp.cmp(p, REPO_ROOT / p.relative_to(tmp_path), shallow=False)
    ]
    assert not stale, f"stale generated code, run `python -m protos.generate`: {stale}"


def test_generated_modules_import_as_a_package() -> None:
    service = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
    assert service.full_name == "lockstep.agent.v1.Agent"
    assert {m.name for m in service.methods} == {
        "LoadShard",
        "UnloadShard",
        "Status",
        "Execute",
        "MarkChipFailed",
        "ConfigureReplica",
        "StartEpoch",
        "Halt",
        "RemoveReplica",
        "Generate",
        "LinkPing",
        "StageDigests",
        "InjectFault",
    }
    assert hasattr(agent_pb2_grpc, "AgentStub")
    link = interconnect_pb2.DESCRIPTOR.services_by_name["Link"]
    assert link.full_name == "lockstep.interconnect.v1.Link"
    assert [m.name for m in link.methods] == ["Exchange"]
    assert hasattr(interconnect_pb2_grpc, "LinkStub")


def test_chunk_wire_format_is_what_the_agent_parses() -> None:
    from protos.load_stream import chunk_payload, frame_chunk

    payload = bytes(range(256)) * 1000
    wire = agent_pb2.LoadShardRequest(chunk=payload).SerializeToString()
    assert wire == frame_chunk(payload)
    assert bytes(chunk_payload(wire)) == payload
