"""Content addresses: a shard's id is the BLAKE3 digest (lowercase hex) of its whole blob.

Why BLAKE3 and not sha256: a load must prove that the bytes an agent commits are the bytes
the id names, and that proof is on the load's critical path (the receiving agent's CPU is the
limit of a load on a 2-core machine). BLAKE3 hashes at 3.4-4.9 GB/s on one core against
sha256's 1.4-1.6 GB/s, so one BLAKE3 pass over the received bytes both verifies the transfer
and proves the id, and loads stay above 1.0 GB/s (bench/shard_load.py). sha256 stays
available as an audit digest (per tensor in the manifest, per blob on request); an agent asked
to verify a load with sha256 checks it AND the BLAKE3 id.
"""

from __future__ import annotations

import re
from pathlib import Path

import blake3

SHARD_ID_ALGORITHM = "blake3"
SHARD_ID = re.compile(r"[0-9a-f]{64}")
"""A well-formed shard id: 64 lowercase hex digits (256 bits of BLAKE3)."""


def shard_id_of(blob: bytes | bytearray | memoryview) -> str:
    """The shard id of a blob held in memory (BLAKE3 on every core)."""
    return str(blake3.blake3(blob, max_threads=blake3.blake3.AUTO).hexdigest())


def file_shard_id(path: str | Path) -> str:
    """The shard id of a blob on disk (memory-mapped, BLAKE3 on every core)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    return str(hasher.update_mmap(path).hexdigest())
