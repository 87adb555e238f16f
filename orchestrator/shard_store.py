"""Content-addressed shard store: one safetensors blob per distinct shard, named by its sha256.

Layout of `store_dir`:

    sha256/<hex>.safetensors   the blobs; <hex> is the sha256 of the whole file
    recipes/<hex>.json         recipe key -> blob digest (what makes re-compiling a no-op)
    tmp/                       blobs being written; renamed into sha256/ once complete

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

from agents.executor import MANIFEST_KEY
from agents.safetensors_codec import STORAGE_DTYPES, TensorEntry, encode_header, parse_header

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
    sha256: str
    size_bytes: int
    path: Path


ManifestFor = Callable[[Mapping[str, str]], dict[str, Any]]
"""Builds a shard manifest from tensor digests (placeholders first, then the real ones)."""


class ShardStore:
    """A directory of content-addressed shard blobs (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "sha256"
        self.recipes = self.root / "recipes"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.recipes, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"{digest}.safetensors"

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put(
        self,
        entries: Sequence[TensorEntry],
        manifest_for: ManifestFor,
        produce: Callable[[TensorEntry], np.ndarray],
    ) -> StoredBlob:
        """Stream a shard into the store; returns its address (an existing blob is kept)."""
        placeholders = {e.name: PLACEHOLDER_DIGEST for e in entries}
        with staged_file(self.tmp) as (out, staged):
            writer = SafetensorsFileWriter(
                out, entries, _shard_metadata(manifest_for(placeholders))
            )
            digests = writer.write_all(produce)
            writer.rewrite_header(entries, _shard_metadata(manifest_for(digests)))
        try:
            return self._adopt(staged)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    def put_bytes(self, blob: bytes) -> StoredBlob:
        """Store a blob held in memory (small manifest-only shards)."""
        digest = hashlib.sha256(blob).hexdigest()
        final = self.blob_path(digest)
        if not final.is_file():
            with atomic_file(final, self.tmp) as out:
                out.write(blob)
        return StoredBlob(digest, len(blob), final)

    def _adopt(self, staged: Path) -> StoredBlob:
        digest = file_sha256(staged)
        final = self.blob_path(digest)
        size = staged.stat().st_size
        if final.is_file():
            staged.unlink()
        else:
            os.replace(staged, final)
        return StoredBlob(digest, size, final)

    def verify(self, digest: str) -> bool:
        """Whether the blob exists and still hashes to its name."""
        path = self.blob_path(digest)
        return path.is_file() and file_sha256(path) == digest

    def manifest(self, digest: str) -> dict[str, Any]:
        """The shard manifest of a stored blob, reading only its header."""
        metadata, _, _ = read_safetensors_header(self.blob_path(digest))
        if MANIFEST_KEY not in metadata:
            raise StoreError(f"blob {digest} has no {MANIFEST_KEY} metadata")
        manifest: dict[str, Any] = json.loads(metadata[MANIFEST_KEY])
        return manifest

    def read(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    # --- recipes: what was compiled from what ---------------------------------------------

    def lookup(self, recipe: str) -> StoredBlob | None:
        """The blob a recipe key compiled to, if it is still in the store at its size."""
        path = self.recipes / f"{recipe}.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            blob = StoredBlob(str(raw["sha256"]), int(raw["size"]), self.blob_path(raw["sha256"]))
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            return None
        try:
            if blob.path.stat().st_size == blob.size_bytes:
                return blob
        except FileNotFoundError:
            pass
        return None

    def remember(self, recipe: str, blob: StoredBlob) -> None:
        path = self.recipes / f"{recipe}.json"
        text = json.dumps({"sha256": blob.sha256, "size": blob.size_bytes}, sort_keys=True)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        with atomic_file(path, self.tmp) as out:
            out.write(text.encode("utf-8"))


def _shard_metadata(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The one metadata key of a shard: its manifest as canonical JSON."""
    return {MANIFEST_KEY: canonical_json(manifest)}


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
