"""Content-addressed shard store: one safetensors blob per distinct shard, named by its shard id.

The shard id is the BLAKE3 digest of the whole blob (`shardformat.address`: why BLAKE3). Layout
of `store_dir`:

    blake3/<hex>.safetensors   the blobs; <hex> is the shard id, the BLAKE3 of the whole file
    recipes/<hex>.json         recipe key -> shard id and size (what makes re-compiling a no-op)
    tmp/                       blobs being written; renamed into blake3/ once complete

Blobs are written to `tmp/` and renamed into place (atomic on one filesystem), so a reader never
sees a half-written shard, and two compilers racing to write the same blob are harmless. An
existing blob is never rewritten.

`SafetensorsFileWriter` streams tensors into a file one at a time, so neither the compiler nor the
checkpoint generator ever holds more than one tensor in memory. The header (which carries the
shard manifest with every tensor's sha256) is written first with placeholder digests of the same
length and rewritten once the data is in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from shardformat.address import SHARD_ID, file_shard_id, shard_id_of
from shardformat.codec import STORAGE_DTYPES, TensorEntry, encode_header, parse_header
from shardformat.errors import ExecutionError
from shardformat.manifest import MANIFEST_KEY, Manifest

PLACEHOLDER_DIGEST = "0" * 64
_READ_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """The store holds something it should not (a truncated or altered blob)."""


class SafetensorsFileWriter:
    """Write a safetensors file tensor by tensor, in the order `order` gives."""

    def __init__(
        self, out: IO[bytes], entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None
    ) -> None:
        self._out = out
        prefix, self.order = encode_header(entries, metadata)
        self._header_len = len(prefix)
        out.write(prefix)

    def write_all(self, produce: Callable[[TensorEntry], np.ndarray]) -> dict[str, str]:
        """Write every tensor `produce(entry)` returns; their sha256 digests by name."""
        digests = {}
        for entry in self.order:
            array = np.ascontiguousarray(produce(entry), dtype=STORAGE_DTYPES[entry.dtype])
            if tuple(array.shape) != entry.shape:
                raise ValueError(
                    f"tensor {entry.name}: produced shape {list(array.shape)}, "
                    f"declared {list(entry.shape)}"
                )
            data = array.reshape(-1).view(np.uint8).data
            digests[entry.name] = hashlib.sha256(data).hexdigest()
            self._out.write(data)
        return digests

    def rewrite_header(self, entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> None:
        """Replace the header with one of the same length (e.g. real digests for placeholders)."""
        prefix, _ = encode_header(entries, metadata)
        if len(prefix) != self._header_len:
            raise ValueError("the final header must have the length of the placeholder header")
        self._out.seek(0)
        self._out.write(prefix)
        self._out.seek(0, os.SEEK_END)


@contextlib.contextmanager
def staged_file(tmp_dir: Path) -> Iterator[tuple[IO[bytes], Path]]:
    """A fresh temporary file in `tmp_dir`, synced on success and removed unless moved away."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=".partial-")
    path = Path(name)
    try:
        with os.fdopen(fd, "w+b") as out:
            yield out, path
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise


@contextlib.contextmanager
def atomic_file(final: Path, tmp_dir: Path | None = None) -> Iterator[IO[bytes]]:
    """A file that appears at `final` only once fully written and synced (else not at all)."""
    with staged_file(tmp_dir or final.parent) as (out, path):
        yield out
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, final)


def write_safetensors(
    path: Path,
    entries: Sequence[TensorEntry],
    metadata: Mapping[str, str] | None,
    produce: Callable[[TensorEntry], np.ndarray],
) -> dict[str, str]:
    """Stream a safetensors file to `path` atomically; returns the tensors' sha256 digests."""
    with atomic_file(path) as out:
        return SafetensorsFileWriter(out, entries, metadata).write_all(produce)


def file_sha256(path: Path) -> str:
    """The sha256 of a file: the audit digest (the store names blobs by their BLAKE3)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, TensorEntry], int]:
    """Metadata, tensor entries and data offset of a safetensors file, reading only its header."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        parsed = parse_header(head + f.read(min(length, size)), size)
    return parsed.metadata, parsed.entries, parsed.data_start


@dataclass(frozen=True)
class StoredBlob:
    shard_id: str
    size_bytes: int
    path: Path


ManifestFor = Callable[[Mapping[str, str]], Manifest]
"""Builds a shard manifest from tensor digests (placeholders first, then the real ones)."""


class ShardStore:
    """A directory of content-addressed shard blobs (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blake3"
        self.recipes = self.root / "recipes"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.recipes, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, shard_id: str) -> Path:
        if not SHARD_ID.fullmatch(shard_id):
            raise StoreError(f"not a shard id (64 lowercase hex digits): {shard_id[:80]!r}")
        return self.blobs / f"{shard_id}.safetensors"

    def has(self, shard_id: str) -> bool:
        return self.blob_path(shard_id).is_file()

    def put(
        self,
        entries: Sequence[TensorEntry],
        manifest_for: ManifestFor,
        produce: Callable[[TensorEntry], np.ndarray],
        extra_metadata: Mapping[str, str] | None = None,
    ) -> StoredBlob:
        """Stream a shard into the store; returns its address (an existing blob is kept).

        `extra_metadata`: more `__metadata__` keys beside the manifest (stage 0's tokenizer)."""
        placeholders = {e.name: PLACEHOLDER_DIGEST for e in entries}
        extra = dict(extra_metadata or {})
        with staged_file(self.tmp) as (out, staged):
            writer = SafetensorsFileWriter(
                out, entries, extra | _shard_metadata(manifest_for(placeholders))
            )
            digests = writer.write_all(produce)
            writer.rewrite_header(entries, extra | _shard_metadata(manifest_for(digests)))
        try:
            return self._adopt(staged)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    def put_bytes(self, blob: bytes) -> StoredBlob:
        """Store a blob held in memory (small manifest-only shards)."""
        digest = shard_id_of(blob)
        final = self.blob_path(digest)
        if not final.is_file():
            with atomic_file(final, self.tmp) as out:
                out.write(blob)
        return StoredBlob(digest, len(blob), final)

    def _adopt(self, staged: Path) -> StoredBlob:
        digest = file_shard_id(staged)
        final = self.blob_path(digest)
        size = staged.stat().st_size
        if final.is_file():
            staged.unlink()
        else:
            os.replace(staged, final)
        return StoredBlob(digest, size, final)

    def verify(self, shard_id: str) -> bool:
        """Whether the blob exists and still hashes to its name (its BLAKE3)."""
        path = self.blob_path(shard_id)
        return path.is_file() and file_shard_id(path) == shard_id

    def remove(self, shard_id: str) -> None:
        """Delete a blob (one that failed `verify`); its recipes then miss, so a compile
        writes it again. Missing already: nothing to do."""
        with contextlib.suppress(FileNotFoundError):
            self.blob_path(shard_id).unlink()

    def sha256(self, shard_id: str) -> str:
        """The sha256 of a stored blob: the audit digest, for tools that want one."""
        return file_sha256(self.blob_path(shard_id))

    def manifest(self, shard_id: str) -> Manifest:
        """The shard manifest of a stored blob, reading only its header (checked in full)."""
        try:
            metadata, _, _ = read_safetensors_header(self.blob_path(shard_id))
            if MANIFEST_KEY not in metadata:
                raise StoreError(f"blob {shard_id} has no {MANIFEST_KEY} metadata")
            return Manifest.from_json(metadata[MANIFEST_KEY])
        except ExecutionError as exc:
            raise StoreError(f"blob {shard_id}: {exc}") from None

    def read(self, shard_id: str) -> bytes:
        return self.blob_path(shard_id).read_bytes()

    # --- recipes: what was compiled from what ---------------------------------------------

    def lookup(self, recipe: str) -> StoredBlob | None:
        """The blob a recipe key compiled to, if it is still in the store at its size."""
        path = self.recipes / f"{recipe}.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            shard_id = str(raw["shard_id"])
            blob = StoredBlob(shard_id, int(raw["size"]), self.blob_path(shard_id))
        except (FileNotFoundError, KeyError, ValueError, TypeError, StoreError):
            return None
        try:
            if blob.path.stat().st_size == blob.size_bytes:
                return blob
        except FileNotFoundError:
            pass
        return None

    def remember(self, recipe: str, blob: StoredBlob) -> None:
        path = self.recipes / f"{recipe}.json"
        text = json.dumps({"shard_id": blob.shard_id, "size": blob.size_bytes}, sort_keys=True)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        with atomic_file(path, self.tmp) as out:
            out.write(text.encode("utf-8"))


def _shard_metadata(manifest: Manifest) -> dict[str, str]:
    """The one metadata key of a shard: its manifest as canonical JSON."""
    return {MANIFEST_KEY: manifest.to_json()}


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
