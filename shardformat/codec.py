"""A zero-copy safetensors codec for in-memory blobs: shards, activations, checkpoints.

The `safetensors` package writes whole dicts of arrays held in memory (`encode_safetensors`
uses it: activations, small blobs) and reads files (`safetensors.safe_open`: checkpoints). The
rest is here, because shards are written tensor by tensor (the compiler streams, never holding
more than one tensor: `encode_header` gives the reproducible header and the data order), arrive
as buffers (an SRAM arena) to be parsed in place, and may hold BF16 (numpy has none): tensors
are numpy views into the blob, and stored dtypes are widened to float32 only for compute
(`decode_f32`).

Parsing is defensive, because the bytes come from the network: whatever the header holds —
not JSON, not UTF-8, not an object, a `__metadata__` that is not a map of strings, an unknown
dtype, a shape of 2**64 or -1, offsets outside the data, overlapping or leaving holes, a
length prefix beyond the blob — `parse_header` raises `ExecutionError` with a message, never
another exception (tests/test_shardformat.py fuzzes it). The rules are the `safetensors`
package's: the tensors tile the data section exactly, in offset order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import save as save_numpy

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
MAX_DIMS = 16
MAX_TENSOR_BYTES = 1 << 48
"""Bound on one tensor's declared size (256 TiB): far above any chip, far below overflow."""
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors blob; `offsets` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE_DTYPES[self.dtype].itemsize


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
    """An in-memory safetensors blob of numpy arrays (F32/F16/I32/I64/I8/U8), written by the
    `safetensors` package (the arrays are all in memory here, so nothing needs streaming)."""
    arrays = {}
    for name, array in tensors.items():
        little = array.dtype.newbyteorder("<")
        if little not in _TAG_OF_DTYPE:
            raise ExecutionError(f"tensor {name}: cannot encode dtype {array.dtype}")
        arrays[name] = np.ascontiguousarray(array, dtype=little)
    return bytes(save_numpy(arrays, metadata=dict(metadata) if metadata else None))


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
    length) lets offsets be checked against the end of the data. Any malformation raises
    `ExecutionError` (see the module docstring).
    """
    view = memoryview(prefix).cast("B")
    if len(view) < 8:
        raise ExecutionError("not a safetensors blob: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", view[:8])
    if length > _MAX_HEADER_BYTES or 8 + length > len(view):
        raise ExecutionError(
            f"not a safetensors blob: header length {length} is out of range "
            f"(the blob has {len(view) - 8} bytes after the length prefix)"
        )
    try:
        header = json.loads(
            bytes(view[8 : 8 + length]).decode("utf-8"), parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError
        raise ExecutionError(f"not a safetensors blob: header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ExecutionError(
            f"not a safetensors blob: header is a JSON {type(header).__name__}, not an object"
        )
    metadata = _metadata(header.pop("__metadata__", {}))
    data_size = None if total_size is None else total_size - 8 - length
    entries = {name: _entry_from_header(name, raw) for name, raw in header.items()}
    _check_tiling(entries, data_size)
    return SafetensorsView(metadata, entries, {}, 8 + length)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _metadata(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ExecutionError(
            f"safetensors __metadata__ must be an object of strings, got {type(raw).__name__}"
        )
    for key, value in raw.items():
        if not isinstance(value, str):
            raise ExecutionError(
                f"safetensors __metadata__[{key[:80]!r}] must be a string, "
                f"got {type(value).__name__}"
            )
    return raw


def _entry_from_header(name: str, raw: Any) -> TensorEntry:
    label = f"tensor {name[:80]!r}"
    if not isinstance(raw, dict) or set(raw) != _ENTRY_KEYS:
        keys = sorted(k[:20] for k in raw)[:5] if isinstance(raw, dict) else type(raw).__name__
        raise ExecutionError(
            f"{label}: a header entry is an object with dtype, shape and data_offsets, got {keys}"
        )
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        raise ExecutionError(f"{label}: unsupported dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_whole(d) for d in shape):
        raise ExecutionError(
            f"{label}: shape must be a list of at most {MAX_DIMS} non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)):
        raise ExecutionError(f"{label}: data_offsets must be two non-negative integers")
    start, end = offsets
    itemsize = STORAGE_DTYPES[dtype].itemsize
    if any(d > MAX_TENSOR_BYTES for d in shape) or math.prod(shape) * itemsize > MAX_TENSOR_BYTES:
        raise ExecutionError(f"{label}: shape {_show(shape)} exceeds {MAX_TENSOR_BYTES} bytes")
    entry = TensorEntry(name, dtype, tuple(shape), (start, end))
    if end < start or end - start != entry.nbytes:
        raise ExecutionError(
            f"{label}: data offsets {_show([start, end])} do not fit shape {_show(shape)} "
            f"{dtype} ({entry.nbytes} bytes)"
        )
    return entry


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _show(values: Sequence[int]) -> str:
    shown = [v if v < 1 << 64 else f"<{v.bit_length()} bits>" for v in values]
    return str(shown)[:200]


def _check_tiling(entries: Mapping[str, TensorEntry], data_size: int | None) -> None:
    """The tensors must tile the data section in offset order: no overlap, no hole, and end
    exactly at the end of the blob when its size is known (the `safetensors` rule)."""
    cursor = 0
    for entry in sorted(entries.values(), key=lambda e: e.offsets):
        start, end = entry.offsets
        if start != cursor:
            what = "overlaps the previous tensor" if start < cursor else "leaves a hole before it"
            raise ExecutionError(
                f"tensor {entry.name[:80]!r}: data offsets {_show([start, end])} {what} "
                f"(expected to start at {cursor})"
            )
        cursor = end
    if data_size is not None and cursor != data_size:
        raise ExecutionError(
            f"not a safetensors blob: the tensors cover {cursor} bytes of data, "
            f"the blob holds {data_size}"
        )


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
