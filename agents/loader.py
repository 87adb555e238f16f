"""Receiving a shard load: header validation, the receiver that writes chunks into the arena,
and digest verification — the agent's side of `LoadShard`.

The wire framing (header and chunk messages, zero-copy chunk parsing) is protocol knowledge
both ends share: it lives in `protos.load_stream`, and the sending side (headers with the
shard id, file streams, the pre-framed call) in `orchestrator.agent_client`. This module
re-exports the framing names the service uses (`chunk_payload`, `parse_header_message`, the
size limits) so the server imports its load path from one place.

Digest decision. The content address of a shard — its shard id — is the BLAKE3 of its blob
(`shardformat.address`; the shard store names blobs by it), and every load proves it: the
receiver hashes the bytes it committed with BLAKE3 and refuses the load with DATA_LOSS, nothing
held, unless the digest equals the shard id. One pass both verifies the transfer and proves
the id. On this 2-core machine the receiving agent's CPU is the limit of a load (gRPC's own
receive copies, the copy into the arena and the digest all share it with the sender), so the
digest must be cheap: BLAKE3 runs at 3.4-4.9 GB/s on one core against hashlib sha256's
1.4-1.6 GB/s; in bench/shard_load.py a load verifies at 1.1-1.3 GB/s with BLAKE3 and
0.95-1.05 GB/s with sha256, so only BLAKE3 meets the 1.0 GB/s target reliably. The header's
`digest_algorithm`:

* "blake3" (the default, also when empty): the digest is the shard id (an empty `digest`
  means it; any other value can never verify and is refused up front).
* "sha256": an audit digest on top — the agent checks the sha256 the header declares AND the
  BLAKE3 shard id (two digest threads), at the cost above.

"Already loaded" is answered only for a shard id the chip holds, and every held shard was
verified under its id at commit, so the id alone proves what the chip holds.

Hashing runs in a helper thread pipelined with the receive loop (hashlib and blake3 release
the GIL on large buffers): the receive loop copies chunk k into the arena while chunk k-1 is
hashed from the arena — the bytes hashed are the bytes that will be committed.

Memory (why chunks are 1 MiB, and when a finished load trims the heap). The agent's RSS is its
arenas (their pages are reused by every reload: resting RSS stays at arenas + ~57 MiB) plus
what gRPC and Python hold of the stream, all of it glibc heap (`agents.main.tune_malloc`: one
malloc arena, 16 MiB mmap/trim thresholds). Python holds little: after a load 8-17 MB of heap
are in use, the receive loop keeps at most two messages and the digest queue holds views of
the arena, not of messages. The transport holds the rest: each message exists several times
over while it is handed up (read slices, the assembled message, the Python `bytes`), and
gRPC's HTTP/2 flow-control window — grown by BDP probing on a long-lived connection — lets it
read ahead while the Python side, sharing two cores with the sender, is still copying and
hashing. Measured in the agent (`mallinfo2` sampled during 256 MiB loads, 4 MiB chunks): heap
in use peaked at 46-213 MB per load, and the heap extent ratcheted from 18 to 80 MB over 40
loads with 30-57 MB of it free but resident — freed near-4 MiB holes below live blocks are
never returned by the top-only trim threshold and fit the next, slightly differently sized
4 MiB requests badly. VmHWM keeps the worst load: that is the creep of the agent's peak RSS.

With 1 MiB chunks heap in use peaks at 16-27 MB and the heap levels off at 30-45 MB, and loads
are faster, not slower (a 1 MiB message stays in cache through the transport's copies, the
copy into the arena and the digest): bench/shard_load.py, same run, 1.25 against 1.05 GB/s,
peak RSS 325 → 330 MiB over 22 loads against 343 → 406 MiB. 1 MiB is the low end of the
"1-4 MiB" the protocol names; the agent still accepts chunks up to `MAX_CHUNK_BYTES`. What the
chunk size cannot bound is the flow-control window itself: under heavy CPU contention, 100
back-to-back loads still stepped from ~350 to ~400 MiB and 200 loads reached 549 MiB. That
bound belongs in the server's options (`grpc.http2.bdp_probe` 0 with an 8 MiB
`grpc.http2.lookahead_bytes`: same runs flat at 340-356 MiB, same throughput).

A client may still send larger chunks (old clients, other tools). After such a load
`ShardReceiver` trims the heap (`release_heap`, glibc `malloc_trim(0)`), so the freed buffers'
pages go back to the OS instead of ratcheting the resting RSS up load after load (4 MiB chunks,
40 loads: resting RSS 311-333 MiB with the trim against 322 → 367 MiB without). The call takes
1-6 ms, but on this VM re-faulting the trimmed pages during the next load cost about 8% of load
throughput (interleaved A/B, 1 MiB chunks: 1.07 against 1.16 GB/s), so loads in chunks of at
most `TRIM_AFTER_CHUNK_BYTES`, whose heap levels off by itself, are not followed by a trim. A
trim does not lower the peak *during* a load, which is set by the flow-control window.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import queue
import re
import threading
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np

from agents.errors import DataLoss, InvalidArgument
from protos import agent_pb2
from protos.load_stream import MAX_CHUNK_BYTES as MAX_CHUNK_BYTES
from protos.load_stream import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from protos.load_stream import chunk_payload as chunk_payload
from protos.load_stream import parse_header_message as parse_header_message
from shardformat.address import SHARD_ID_ALGORITHM

DIGEST_ALGORITHMS = ("sha256", "blake3")
TRIM_AFTER_CHUNK_BYTES = 1 << 20  # a load with a larger chunk ends with `release_heap`
_HEX64 = re.compile(r"[0-9a-f]{64}")


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

    def bad(message: str) -> InvalidArgument:
        return InvalidArgument(message)

    if not _HEX64.fullmatch(raw.shard_id):
        raise bad(
            f"header.shard_id must be the blob's lowercase BLAKE3 hex, got {raw.shard_id[:80]!r}"
        )
    if raw.chip >= chips:
        raise bad(f"header.chip {raw.chip} does not exist (this node has chips 0..{chips - 1})")
    if raw.size_bytes <= 0:
        raise bad("header.size_bytes must be positive")
    algorithm = raw.digest_algorithm or SHARD_ID_ALGORITHM
    if algorithm not in DIGEST_ALGORITHMS:
        raise bad(
            f"header.digest_algorithm {algorithm[:40]!r} is not one of "
            f"{', '.join(DIGEST_ALGORITHMS)}"
        )
    digest = raw.digest or (raw.shard_id if algorithm == SHARD_ID_ALGORITHM else "")
    if algorithm == SHARD_ID_ALGORITHM and digest != raw.shard_id:
        raise InvalidArgument(
            f"header.digest {digest[:80]!r} is not the shard id: with blake3 the digest is "
            "the shard id (leave it empty)"
        )
    if not _HEX64.fullmatch(digest):
        raise bad(
            f"header.digest must be 64 lowercase hex digits of the {algorithm} digest, "
            f"got {raw.digest[:80]!r}"
        )
    return ShardHeader(
        raw.shard_id, raw.chip, raw.size_bytes, algorithm, digest, raw.virtual, raw.declared_bytes
    )


# --- heap release ----------------------------------------------------------------------------


def _load_malloc_trim() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        trim = ctypes.CDLL("libc.so.6").malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return trim
    return None


_MALLOC_TRIM = _load_malloc_trim()


def release_heap() -> bool:
    """Return free heap pages to the OS (glibc `malloc_trim(0)`); False where unavailable.

    Called once a load in chunks larger than `TRIM_AFTER_CHUNK_BYTES` has ended (committed or
    not): the stream's message buffers are free by then, and without this their pages stay
    resident (see "Memory" in the module docstring).
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


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
        self.algorithm = algorithm
        self._hash = new_hash(algorithm)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"digest-{algorithm}", daemon=True)
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
    """Writes a load's chunks into its arena block in order, digesting what was written:
    always with BLAKE3 (the shard id), and with sha256 as well when the header asks for it.

    `bytes_loaded` is read by Status from other threads (an int: atomic under the GIL).
    """

    def __init__(self, header: ShardHeader, target: memoryview) -> None:
        self.header = header
        self.bytes_loaded = 0
        self._target = target
        # numpy's copy releases the GIL (a memoryview slice assignment does not), so gRPC's
        # thread can assemble the next message while this one is copied.
        self._target_array = np.frombuffer(target, dtype=np.uint8)
        algorithms = dict.fromkeys((SHARD_ID_ALGORITHM, header.algorithm))
        self._digesters = [Digester(a) for a in algorithms]
        self._released = False
        self.largest_chunk = 0
        self.trimmed = False

    def write(self, payload: memoryview) -> None:
        start, end = self.bytes_loaded, self.bytes_loaded + len(payload)
        if end > self.header.size_bytes:
            raise InvalidArgument(
                f"chip {self.header.chip}: {self.header.label} declared {self.header.size_bytes}"
                f" bytes but the stream carries more (at least {end})",
            )
        if len(payload) > MAX_CHUNK_BYTES:
            raise InvalidArgument(
                f"chunk of {len(payload)} bytes exceeds {MAX_CHUNK_BYTES}",
            )
        np.copyto(self._target_array[start:end], np.frombuffer(payload, dtype=np.uint8))
        for digester in self._digesters:
            digester.update(self._target[start:end])
        self.largest_chunk = max(self.largest_chunk, len(payload))
        self.bytes_loaded = end

    def finish(self) -> str:
        """Check the size and the digests once the stream has ended: the BLAKE3 must be the
        shard id, and a sha256 asked for must be the header's. Returns the header's digest.

        Either way the receiver then lets go of the block's memory and, after a load in large
        chunks, trims the heap (`release_heap`): the stream's buffers are all free by then.
        """
        header = self.header
        try:
            if self.bytes_loaded != header.size_bytes:
                self._close_digesters()
                raise InvalidArgument(
                    f"chip {header.chip}: {header.label} declared {header.size_bytes} bytes, "
                    f"the stream ended after {self.bytes_loaded}",
                )
            actual = {d.algorithm: d.hexdigest() for d in self._digesters}
        finally:
            self._release()
        expected = {SHARD_ID_ALGORITHM: header.shard_id, header.algorithm: header.digest}
        for algorithm, digest in expected.items():
            if actual[algorithm] != digest:
                what = "the shard id" if algorithm == SHARD_ID_ALGORITHM else "the header's"
                raise DataLoss(
                    f"chip {header.chip}: {header.label} failed verification: {algorithm} of "
                    f"the received bytes is {actual[algorithm]}, {what} is {digest}; "
                    "nothing was committed"
                )
        return actual[header.algorithm]

    def close(self) -> None:
        """Abort: stop the digest threads and release memory (idempotent)."""
        self._close_digesters()
        self._release()

    def _close_digesters(self) -> None:
        for digester in self._digesters:
            digester.close()

    def _release(self) -> None:
        """Drop the receiver's views of the block (so `SramArena.free_block` can release its
        view at once) and, after large chunks, trim the heap; once."""
        if self._released:
            return
        self._released = True
        self._target_array = np.empty(0, dtype=np.uint8)
        self._target = memoryview(b"")
        if self.largest_chunk > TRIM_AFTER_CHUNK_BYTES:
            self.trimmed = release_heap()
