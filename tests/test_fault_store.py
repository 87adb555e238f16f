"""Faults in the control plane's shard store, end to end on a real embedded cluster (issue 10).

One `lpuctl up` for the module (the control plane and six agent processes, mutual TLS: the
`cluster` fixture of test_control_plane) and the tiny-llama example.

* A corrupt shard in the store: bytes of a stored blob are flipped while the deployment is
  deleted, then it is applied again (a lookup: the blob is "there"). The agent verifies the
  shard's BLAKE3 id and refuses the load with DATA_LOSS (nothing held); the control plane
  checks its own copy, finds it bad, removes it (event `ShardCorrupt` naming the shard),
  recompiles it from the checkpoint, and the deployment reaches Ready with the reference tokens.
* The store's disk fills: a 16 KiB tmpfs is mounted over the store directory (a real ENOSPC;
  needs root to mount, else the test is skipped) and a second deployment is applied. Its
  compile fails cleanly (an event and the replica's last error name the shard store and the
  OS error; nothing half-written in `tmp/`, every blob whole), the first deployment keeps
  serving, and once the tmpfs is grown (remount) the second reaches Ready with the reference
  tokens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import wait_for
from test_control_plane import EXAMPLE, TINY, Cluster, cluster
from test_failover import _stale_shards

from agents.executor import ReferenceExecutor
from orchestrator.shard_store import ShardStore
from orchestrator.weights import SeededWeights
from protos import admin_pb2

__all__ = ["cluster"]  # the module-scoped embedded cluster of test_control_plane

PROMPT = [4, 8, 15]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference() -> list[int]:
    ref = ReferenceExecutor(TINY, SeededWeights(TINY, 0, "F16"), max_context=256)
    return list(ref.generate(PROMPT, MAX_TOKENS).tokens)


@pytest.fixture(scope="module")
def deployed(cluster: Cluster) -> Iterator[None]:
    run = cluster.lpuctl("apply", "-f", str(EXAMPLE), "--wait", "--timeout", "180")
    assert run.returncode == 0, run.stdout + run.stderr
    yield


def _generate(cluster: Cluster, name: str = "tiny-llama") -> list[int]:
    replies = cluster.stub.Generate(
        admin_pb2.GenerateRequest(deployment=name, prompt_ids=PROMPT, max_tokens=MAX_TOKENS),
        metadata=cluster.viewer,
        timeout=120,
    )
    return [r.token for r in replies]


def _events(cluster: Cluster) -> list[admin_pb2.Event]:
    return list(cluster.stub.Events(admin_pb2.EventsRequest(), metadata=cluster.viewer).events)


def _flip(path: Path) -> None:
    """Flip 16 bytes in the middle of a file (its tensor data), keeping its size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    path.write_bytes(bytes(data))


def test_a_corrupt_shard_in_the_store_is_refused_removed_and_recompiled(
    cluster: Cluster, deployed: None, reference: list[int]
) -> None:
    for _ in range(2):  # fault-free first, on both replicas (round robin)
        assert _generate(cluster) == reference
    run = cluster.lpuctl("delete", "deployment", "tiny-llama", "--wait")
    assert run.returncode == 0, run.stderr
    store = ShardStore(cluster.paths.shards)
    blobs = sorted(store.blobs.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    victim = blobs[-1]  # the largest: a real shard, needed by the deployment
    shard_id = victim.name.removesuffix(".safetensors")
    _flip(victim)
    assert not store.verify(shard_id)

    run = cluster.lpuctl("apply", "-f", str(EXAMPLE), "--wait", "--timeout", "180")
    assert run.returncode == 0, run.stdout + run.stderr
    events = _events(cluster)
    refused = [e for e in events if e.reason == "ActionFailed" and shard_id in e.message]
    assert refused and all("DATA_LOSS" in e.message for e in refused), refused
    corrupt = [e for e in events if e.reason == "ShardCorrupt"]
    assert corrupt and all(shard_id in e.message and e.kind == "Warning" for e in corrupt), (
        corrupt  # one per replica refused (both replicas share the blob); no other blob
    )
    assert store.verify(shard_id), "recompiled from the checkpoint under the same id"
    for _ in range(2):
        assert _generate(cluster) == reference
    assert wait_for(lambda: not _stale_shards(cluster), timeout=30, what="no stale shards")


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


def test_a_full_shard_store_fails_the_compile_cleanly_until_space_returns(
    cluster: Cluster, deployed: None, reference: list[int], tmp_path: Path
) -> None:
    """The disk is a real 16 KiB tmpfs mounted over the store directory (needs root, else
    skipped): writes fail with ENOSPC. It hides the blobs already there, so the second
    deployment's compile must write; the serving deployment holds its shards already."""
    one = tmp_path / "tiny-llama-1.yaml"  # room for the other deployment's 12 chips
    one.write_text(EXAMPLE.read_text().replace("replicas: 2", "replicas: 1"))
    run = cluster.lpuctl("apply", "-f", str(one), "--wait", "--timeout", "180")
    assert run.returncode == 0, run.stdout + run.stderr
    shards = cluster.paths.shards
    mounted = _mount("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(shards))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        other = tmp_path / "tiny-b.yaml"
        other.write_text(
            EXAMPLE.read_text()
            .replace("name: tiny-llama", "name: tiny-b")
            .replace("replicas: 2", "replicas: 1")
            .replace("sparesPerRack: 1", "sparesPerRack: 0")
        )
        run = cluster.lpuctl("apply", "-f", str(other))
        assert run.returncode == 0, run.stdout + run.stderr

        def full() -> list[admin_pb2.Event]:
            return [
                e
                for e in _events(cluster)
                if e.deployment == "tiny-b"
                and e.reason == "ActionFailed"
                and "No space left on device" in e.message
            ]

        (first, *_) = wait_for(full, timeout=60, what="the compile failing for lack of space")
        assert f"shard store {shards}" in first.message and "errno 28" in first.message
        got = cluster.stub.Get(admin_pb2.GetRequest(name="tiny-b"), metadata=cluster.viewer)
        assert got.phase != "Ready"
        (replica,) = got.replica_info  # the replica's last error says the same
        assert "No space left on device" in replica.last_error and str(shards) in replica.last_error
        store = ShardStore(shards)
        assert not list(store.tmp.iterdir()), "a half-written blob was left in tmp/"
        for blob in store.blobs.iterdir():  # whatever fitted is whole
            assert store.verify(blob.name.removesuffix(".safetensors")), blob.name
        assert _generate(cluster) == reference, "the other deployment keeps serving"

        grown = _mount("-o", "remount,size=256m", str(shards))
        assert grown.returncode == 0, grown.stderr

        def ready() -> bool:
            d = cluster.stub.Get(admin_pb2.GetRequest(name="tiny-b"), metadata=cluster.viewer)
            return bool(d.phase == "Ready")

        assert wait_for(ready, timeout=120, interval=0.2, what="tiny-b Ready once space is back")
        assert _generate(cluster, "tiny-b") == reference
        assert _generate(cluster) == reference
    finally:
        cluster.lpuctl("delete", "deployment", "tiny-b", "--wait")
        subprocess.run(["umount", "-l", str(shards)], capture_output=True, timeout=30)
