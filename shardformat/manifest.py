"""The shard manifest: a chip's program, typed and versioned, as its shard blob carries it.

A shard blob (`shardformat.codec`) holds the chip's weight slices and, under the
`__metadata__` key `MANIFEST_KEY`, one JSON document: the `Manifest`. The compiler builds a
`Manifest` and writes `Manifest.to_json()`; the agent's load check, the executor and the shard
store read it with `Manifest.from_json`, which checks every field's type and bounds and raises
`ExecutionError` naming the field — a manifest that is a number, a list, lacks a key, has a
string where a count belongs, an integer of 2**64, or another format version never reaches the
code that uses it. One place writes, one place parses.

Wire shape (format `FORMAT`, canonical JSON: sorted keys, no whitespace):

    format        "lockstep.shard/1"
    model         {name, config: ModelConfig fields}
    precision     the plan's precision; tensors carry their stored dtype
    stage, stages, tick_offset (= stage index)
    tp            {rank, size}
    serving       {max_batch, max_context}  (KV-cache geometry)
    ops           [{op, name, kind, layer, chunks, chunk_first, chunk_last, units [start, end),
                    width, ranks [[start, end) per TP rank], rank_units}]
    tensors       {name: {dtype, shape, source, axis, range, sha256}}
    virtual       false, or true for a manifest-only shard (no tensor data, sha256 null)
    declared_bytes  the plan's SRAM bytes per chip (weights + KV cache + workspace)
    weight_bytes    bytes of the tensors (declared for virtual shards)

The per-tensor sha256 is an audit digest (`agents.executor.verify_shard_tensors`); the blob
as a whole is proven by its content address, the BLAKE3 of its bytes (the shard id).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from placement.models import ModelConfig, split_width
from shardformat.codec import STORAGE_DTYPES, TensorEntry
from shardformat.errors import ExecutionError
from shardformat.layout import PieceSpec

FORMAT = "lockstep.shard/1"
"""The format version this code writes and the only one it reads."""
MANIFEST_KEY = "lockstep.manifest"
"""The `__metadata__` key of a shard blob that holds its manifest."""
MAX_COUNT = 1 << 48
"""Bound on every count, index and byte size in a manifest (far above any real model)."""
MAX_MANIFEST_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIZE_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    }
)
_OP_KEYS = (
    "op",
    "name",
    "kind",
    "layer",
    "chunks",
    "chunk_first",
    "chunk_last",
    "units",
    "width",
    "ranks",
    "rank_units",
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the shard: stored dtype and shape, the checkpoint slice it came from, and
    the sha256 of its bytes (None in a virtual shard, which has no bytes)."""

    dtype: str
    shape: tuple[int, ...]
    source: str
    axis: int | None
    range: tuple[int, int]
    sha256: str | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE_DTYPES[self.dtype].itemsize

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "source": self.source,
            "axis": self.axis,
            "range": list(self.range),
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class Manifest:
    """A chip's program: what it runs (ops for its TP rank) and what its shard holds."""

    model_name: str
    config: ModelConfig
    precision: str
    stage: int
    stages: int
    tick_offset: int
    tp_rank: int
    tp_size: int
    max_batch: int
    max_context: int
    ops: tuple[PieceSpec, ...]
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    virtual: bool = False
    declared_bytes: int = 0
    weight_bytes: int = 0
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model": {"name": self.model_name, "config": self.config.to_dict()},
            "precision": self.precision,
            "stage": self.stage,
            "stages": self.stages,
            "tick_offset": self.tick_offset,
            "tp": {"rank": self.tp_rank, "size": self.tp_size},
            "serving": {"max_batch": self.max_batch, "max_context": self.max_context},
            "ops": [s.to_dict() | {"rank_units": list(s.ranks[self.tp_rank])} for s in self.ops],
            "tensors": {name: info.to_dict() for name, info in self.tensors.items()},
            "virtual": self.virtual,
            "declared_bytes": self.declared_bytes,
            "weight_bytes": self.weight_bytes,
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal manifests give equal bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def with_digests(self, digests: Mapping[str, str] | None) -> Manifest:
        """The manifest with every tensor's sha256 set from `digests` (None: all unset)."""
        tensors = {
            name: TensorInfo(
                i.dtype, i.shape, i.source, i.axis, i.range, digests[name] if digests else None
            )
            for name, i in self.tensors.items()
        }
        return dataclasses.replace(self, tensors=tensors)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check a manifest; `ExecutionError` naming the field when anything is off."""
        if len(text) > MAX_MANIFEST_BYTES:
            raise ExecutionError(f"shard manifest: {len(text)} bytes exceed {MAX_MANIFEST_BYTES}")
        try:
            raw = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ExecutionError(f"shard manifest is not JSON: {exc}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        """`from_json` of an already decoded document."""
        top = _object(raw, "manifest")
        version = top.get("format")
        if version != FORMAT:
            shown = repr(version)[:80]
            raise ExecutionError(
                f"shard manifest: format {shown} is not {FORMAT!r} (unknown version)"
            )
        _no_unknown(
            top,
            "manifest",
            {
                "format",
                "model",
                "precision",
                "stage",
                "stages",
                "tick_offset",
                "tp",
                "serving",
                "ops",
                "tensors",
                "virtual",
                "declared_bytes",
                "weight_bytes",
            },
        )
        model = _object(_key(top, "model", "manifest"), "model")
        _no_unknown(model, "model", {"name", "config"})
        stages = _int(top, "stages", "manifest", low=1)
        stage = _int(top, "stage", "manifest", high=stages - 1)
        tp = _object(_key(top, "tp", "manifest"), "tp")
        _no_unknown(tp, "tp", {"rank", "size"})
        tp_size = _int(tp, "size", "tp", low=1, high=1 << 16)
        tp_rank = _int(tp, "rank", "tp", high=tp_size - 1)
        serving = _object(_key(top, "serving", "manifest"), "serving")
        _no_unknown(serving, "serving", {"max_batch", "max_context"})
        ops_raw = _key(top, "ops", "manifest")
        if not isinstance(ops_raw, list):
            raise ExecutionError(f"shard manifest: ops must be a list, got {_kind(ops_raw)}")
        ops = tuple(_op(op, f"ops[{i}]", tp_rank, tp_size) for i, op in enumerate(ops_raw))
        tensors_raw = _object(_key(top, "tensors", "manifest"), "tensors")
        virtual = _key(top, "virtual", "manifest")
        if not isinstance(virtual, bool):
            raise ExecutionError(f"shard manifest: virtual must be a boolean, got {_kind(virtual)}")
        config = _config(_key(model, "config", "model"), "model.config")
        for i, op in enumerate(ops):
            if op.width != split_width(config, op.kind):
                # E.g. attention cut in KV heads, as shards before query-head cuts were.
                raise ExecutionError(
                    f"shard manifest: ops[{i}].width is {op.width}, but {op.kind} ops of this "
                    f"model are cut in {split_width(config, op.kind)} units"
                )
        return cls(
            model_name=_str(model, "name", "model"),
            config=config,
            precision=_str(top, "precision", "manifest"),
            stage=stage,
            stages=stages,
            tick_offset=_int(top, "tick_offset", "manifest"),
            tp_rank=tp_rank,
            tp_size=tp_size,
            max_batch=_int(serving, "max_batch", "serving", low=1),
            max_context=_int(serving, "max_context", "serving", low=1),
            ops=ops,
            tensors={
                _name(name, "tensors"): _tensor(info, f"tensors.{name[:80]}", virtual)
                for name, info in tensors_raw.items()
            },
            virtual=virtual,
            declared_bytes=_int(top, "declared_bytes", "manifest"),
            weight_bytes=_int(top, "weight_bytes", "manifest"),
        )

    def check_entries(self, entries: Mapping[str, TensorEntry]) -> None:
        """The blob's tensors must be the manifest's (none at all for a virtual shard)."""
        if self.virtual:
            if entries:
                raise ExecutionError("shard manifest says virtual, but the blob holds tensors")
            return
        if set(entries) != set(self.tensors):
            extra = sorted(set(entries) - set(self.tensors))[:5]
            missing = sorted(set(self.tensors) - set(entries))[:5]
            raise ExecutionError(
                f"shard tensors do not match the manifest: not listed {extra}, absent {missing}"
            )
        for name, entry in entries.items():
            info = self.tensors[name]
            if (entry.dtype, entry.shape) != (info.dtype, info.shape):
                raise ExecutionError(
                    f"shard tensor {name[:80]}: the blob has {entry.dtype} {list(entry.shape)}, "
                    f"the manifest {info.dtype} {list(info.shape)}"
                )


def manifest_of_metadata(metadata: Mapping[str, str]) -> Manifest | None:
    """The manifest in a blob's `__metadata__`, or None when it carries none."""
    text = metadata.get(MANIFEST_KEY)
    return None if text is None else Manifest.from_json(text)


# --- field readers: each names the field at fault ----------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ExecutionError(f"shard manifest: {where} must be an object, got {_kind(value)}")
    return value


def _key(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ExecutionError(f"shard manifest lacks {where}.{key}")
    return obj[key]


def _no_unknown(obj: Mapping[str, Any], where: str, known: set[str] | frozenset[str]) -> None:
    unknown = sorted(k[:40] for k in obj if k not in known)
    if unknown:
        raise ExecutionError(f"shard manifest: {where} has unknown keys {unknown[:5]}")


def _check_int(value: Any, where: str, low: int = 0, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExecutionError(f"shard manifest: {where} must be an integer, got {_kind(value)}")
    if not low <= value <= high:
        shown = str(value) if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
        raise ExecutionError(f"shard manifest: {where} is {shown}, not in {low}..{high}")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str, low: int = 0, high: int = MAX_COUNT) -> int:
    return _check_int(_key(obj, key, where), f"{where}.{key}", low, high)


def _str(obj: Mapping[str, Any], key: str, where: str, limit: int = 1024) -> str:
    value = _key(obj, key, where)
    if not isinstance(value, str) or len(value) > limit:
        raise ExecutionError(
            f"shard manifest: {where}.{key} must be a string of at most {limit} characters"
        )
    return value


def _name(value: str, where: str) -> str:
    if len(value) > 1024:
        raise ExecutionError(f"shard manifest: a name in {where} exceeds 1024 characters")
    return value


def _pair(value: Any, where: str, high: int = MAX_COUNT) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ExecutionError(f"shard manifest: {where} must be a list [start, end]")
    start = _check_int(value[0], f"{where}[0]", 0, high)
    end = _check_int(value[1], f"{where}[1]", start, high)
    return start, end


def _op(raw: Any, where: str, tp_rank: int, tp_size: int) -> PieceSpec:
    obj = _object(raw, where)
    _no_unknown(obj, where, set(_OP_KEYS))
    chunks = _int(obj, "chunks", where, low=1)
    chunk_first = _int(obj, "chunk_first", where, high=chunks - 1)
    chunk_last = _int(obj, "chunk_last", where, low=chunk_first, high=chunks - 1)
    width = _int(obj, "width", where)
    start, end = _pair(_key(obj, "units", where), f"{where}.units", width)
    ranks_raw = _key(obj, "ranks", where)
    if not isinstance(ranks_raw, list) or len(ranks_raw) != tp_size:
        raise ExecutionError(
            f"shard manifest: {where}.ranks must list one [start, end] per TP rank ({tp_size})"
        )
    ranks = tuple(_pair(r, f"{where}.ranks[{i}]", width) for i, r in enumerate(ranks_raw))
    if _pair(_key(obj, "rank_units", where), f"{where}.rank_units", width) != ranks[tp_rank]:
        raise ExecutionError(f"shard manifest: {where}.rank_units is not ranks[{tp_rank}]")
    return PieceSpec(
        op=_int(obj, "op", where),
        name=_str(obj, "name", where),
        kind=_str(obj, "kind", where),
        layer=_check_int(_key(obj, "layer", where), f"{where}.layer", -1),
        chunks=chunks,
        chunk_first=chunk_first,
        chunk_last=chunk_last,
        start=start,
        end=end,
        width=width,
        ranks=ranks,
    )


def _tensor(raw: Any, where: str, virtual: Any) -> TensorInfo:
    obj = _object(raw, where)
    _no_unknown(obj, where, {"dtype", "shape", "source", "axis", "range", "sha256"})
    dtype = _key(obj, "dtype", where)
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        raise ExecutionError(f"shard manifest: {where}.dtype {str(dtype)[:20]!r} is unknown")
    shape_raw = _key(obj, "shape", where)
    if not isinstance(shape_raw, list) or len(shape_raw) > 8:
        raise ExecutionError(f"shard manifest: {where}.shape must be a list of at most 8 sizes")
    shape = tuple(_check_int(d, f"{where}.shape[{i}]") for i, d in enumerate(shape_raw))
    if math.prod(shape) * STORAGE_DTYPES[dtype].itemsize > MAX_COUNT:
        raise ExecutionError(f"shard manifest: {where}.shape {list(shape)} is too large")
    axis = _key(obj, "axis", where)
    if axis is not None:
        axis = _check_int(axis, f"{where}.axis", 0, 7)
    digest = _key(obj, "sha256", where)
    if not (digest is None if virtual is True else isinstance(digest, str)) or (
        isinstance(digest, str) and not _HEX64.fullmatch(digest)
    ):
        raise ExecutionError(
            f"shard manifest: {where}.sha256 must be 64 lowercase hex digits"
            + (" (null in a virtual shard)" if virtual is True else "")
        )
    return TensorInfo(
        dtype=dtype,
        shape=shape,
        source=_str(obj, "source", where),
        axis=axis,
        range=_pair(_key(obj, "range", where), f"{where}.range"),
        sha256=digest,
    )


def _config(raw: Any, where: str) -> ModelConfig:
    """A `ModelConfig` from its fields, each checked by its declared type."""
    obj = _object(raw, where)
    known = {f.name: f for f in fields(ModelConfig)}
    _no_unknown(obj, where, set(known))
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in obj:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise ExecutionError(f"shard manifest lacks {where}.{name}")
            continue
        kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
        value, at = obj[name], f"{where}.{name}"
        if kind == "int":
            value = _check_int(value, at, 1 if name in _SIZE_FIELDS else 0)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise ExecutionError(f"shard manifest: {at} must be a boolean, got {_kind(value)}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ExecutionError(f"shard manifest: {at} must be a number, got {_kind(value)}")
            if not (math.isfinite(value) and value > 0):
                raise ExecutionError(f"shard manifest: {at} must be a positive finite number")
            value = float(value)
        elif kind == "str" and (not isinstance(value, str) or len(value) > 1024):
            raise ExecutionError(f"shard manifest: {at} must be a string")
        values[name] = value
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ExecutionError(f"shard manifest: {where} is not a model config: {exc}") from None


def tensor_infos(
    entries: Sequence[TensorEntry], sources: Mapping[str, Mapping[str, Any]]
) -> dict[str, TensorInfo]:
    """The tensor table of a shard before its digests are known (`sha256` unset).

    `sources[name]` is the slice's `{source, axis, range}` (`TensorSlice.to_dict`).
    """
    return {
        e.name: TensorInfo(
            e.dtype,
            tuple(e.shape),
            str(sources[e.name]["source"]),
            sources[e.name]["axis"],
            (int(sources[e.name]["range"][0]), int(sources[e.name]["range"][1])),
            None,
        )
        for e in entries
    }
