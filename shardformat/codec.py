"""A zero-copy safetensors codec for in-memory blobs: shards, activations, checkpoints.

The `safetensors` library reads files; shards arrive as buffers (an SRAM arena) and
activations as bytes, and numpy has no bfloat16, so the (tiny) format is encoded and parsed
here: headers are encoded byte-for-byte reproducibly, tensors are numpy views into the blob,
and stored dtypes are widened to float32 only for compute (`decode_f32`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardformat.errors import ExecutionError

F32 = np.float32

STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; see decode_f32
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"),  # raw bits, declared sizes of virtual int8/fp8 shards only
}
_TAG_OF_DTYPE = {
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<i4"): "I32",
    np.dtype("<i8"): "I64",
    np.dtype("i1"): "I8",
    np.dtype("u1"): "U8",
}
_MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors blob; `offsets` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * STORAGE_DTYPES[self.dtype].itemsize


def encode_header(
    entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[TensorEntry]]:
    """The length prefix and JSON header of a safetensors blob, and the entries in data order.

    Entries are laid out by descending item size (stable), which keeps every tensor aligned
    to its item size; callers write the data in the returned order. The JSON is compact with
    keys in a fixed order, so equal inputs give equal bytes.
    """
    for entry in entries:
        if entry.dtype not in STORAGE_DTYPES:
            raise ExecutionError(f"tensor {entry.name}: unsupported dtype {entry.dtype}")
    ordered = sorted(entries, key=lambda e: -STORAGE_DTYPES[e.dtype].itemsize)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    placed: list[TensorEntry] = []
    offset = 0
    for entry in ordered:
        end = offset + entry.nbytes
        placed.append(TensorEntry(entry.name, entry.dtype, tuple(entry.shape), (offset, end)))
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, placed


def encode_safetensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """An in-memory safetensors blob of numpy arrays (F32/F16/I32/I64/I8/U8)."""
    entries = []
    for name, array in tensors.items():
        tag = _TAG_OF_DTYPE.get(array.dtype.newbyteorder("<"))
        if tag is None:
            raise ExecutionError(f"tensor {name}: cannot encode dtype {array.dtype}")
        entries.append(TensorEntry(name, tag, tuple(array.shape)))
    prefix, placed = encode_header(entries, metadata)
    parts = [prefix]
    for entry in placed:
        array = tensors[entry.name]
        parts.append(np.ascontiguousarray(array, dtype=STORAGE_DTYPES[entry.dtype]).tobytes())
    return b"".join(parts)


@dataclass(frozen=True)
class SafetensorsView:
    """A parsed safetensors blob: its metadata and zero-copy views of its tensors."""

    metadata: dict[str, str]
    entries: dict[str, TensorEntry]
    tensors: dict[str, np.ndarray]
    data_start: int


def parse_header(prefix: bytes | memoryview, total_size: int | None = None) -> SafetensorsView:
    """Parse the header at the start of a safetensors blob (no tensor views).

    `prefix` must hold at least the 8-byte length and the header; `total_size` (the blob's
    length) lets offsets be checked against the end of the data.
    """
    view = memoryview(prefix)
    if len(view) < 8:
        raise ExecutionError("not a safetensors blob: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", view[:8])
    if length > _MAX_HEADER_BYTES or 8 + length > len(view):
        raise ExecutionError(f"not a safetensors blob: header length {length} is out of range")
    try:
        header = json.loads(bytes(view[8 : 8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExecutionError(f"not a safetensors blob: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ExecutionError("not a safetensors blob: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = None if total_size is None else total_size - 8 - length
    entries = {name: _entry_from_header(name, raw, data_size) for name, raw in header.items()}
    return SafetensorsView(dict(metadata), entries, {}, 8 + length)


def _entry_from_header(name: str, raw: Any, data_size: int | None) -> TensorEntry:
    try:
        dtype = str(raw["dtype"])
        shape = tuple(int(d) for d in raw["shape"])
        start, end = (int(o) for o in raw["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ExecutionError(f"tensor {name}: malformed header entry {raw!r}") from None
    if dtype not in STORAGE_DTYPES:
        raise ExecutionError(f"tensor {name}: unsupported dtype {dtype}")
    entry = TensorEntry(name, dtype, shape, (start, end))
    if end - start != entry.nbytes or start < 0 or (data_size is not None and end > data_size):
        raise ExecutionError(
            f"tensor {name}: data offsets {start}..{end} do not fit shape {list(shape)} "
            f"{dtype} within the blob"
        )
    return entry


def parse_safetensors(buffer: bytes | bytearray | memoryview | Any) -> SafetensorsView:
    """Parse a whole safetensors blob held in memory; tensors are views into `buffer`."""
    view = memoryview(buffer).cast("B")
    parsed = parse_header(view, len(view))
    tensors = {}
    for name, entry in parsed.entries.items():
        start = parsed.data_start + entry.offsets[0]
        dtype = STORAGE_DTYPES[entry.dtype]
        count = entry.nbytes // dtype.itemsize
        tensors[name] = np.frombuffer(view, dtype=dtype, count=count, offset=start).reshape(
            entry.shape
        )
    return SafetensorsView(parsed.metadata, parsed.entries, tensors, parsed.data_start)


def decode_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored weights as float32 for compute: F32 zero-copy, F16 and BF16 widened exactly."""
    if dtype == "F32":
        # numpy runs unaligned arrays through its own loops instead of BLAS (other bits).
        return np.ascontiguousarray(raw, dtype=F32) if raw.flags.aligned else raw.astype(F32)
    if dtype == "F16":
        return raw.astype(F32)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(F32)
    raise ExecutionError(f"dtype {dtype} cannot be executed (only F32, F16 and BF16)")
