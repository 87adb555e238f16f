"""Stage programs: run a compiled shard's slice of the model on numpy, bit-deterministically.

A plan cuts the op list (`placement.models.build_ops`) into stages; a stage may start or end
inside an op (a *chunk* cut along KV heads, intermediate columns or vocabulary rows), and each
stage is split again among its tensor-parallel (TP) ranks. What one stage runs of one op is a
`PieceSpec`: the op, its chunk range, the unit range `[start, end)` along the cut dimension and
the sub-range of every TP rank. The same specs drive the compiler (which slices the checkpoint
with `piece_tensors`), the stage program (which runs them) and the reference executor (which can
run any plan's pieces in one process), so slicing and execution can never disagree.

Between ops and pieces travels an `Activation`: the rows' slots/positions/tokens, the hidden
state entering the current op, the partial sum of the op so far, MoE routing and the logits
prefix, and a cursor naming the next piece. `to_bytes()` is a safetensors blob (versioned).

Determinism — the contract of DESIGN.md "Lockstep and determinism":

* Every reduction runs per row with shapes fixed by the model and the row's position
  (`agents.kernels`), so a row's bits do not depend on the other rows of the batch, nor on
  whether a prompt was prefilled in one step or token by token.
* TP partial sums are added in rank order (0, 1, 2, …), chunk partial sums in chunk order, MoE
  experts in ascending expert id; the sum starts at zero at the op's first piece.
* BLAS runs single-threaded (`pin_blas_threads`; agent processes should also export
  `OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=MKL_NUM_THREADS=1` before numpy is imported).
* Hence: a plan whose stage boundaries fall between whole ops with TP=1 is bit-identical to the
  whole-model `ReferenceExecutor`. A plan with chunk cuts or TP>1 sums matrix products in
  pieces; it is bit-identical to `ReferenceExecutor(..., layout=plan_layout(cfg, plan))`, and
  within `CHUNKED_LOGITS_RTOL` (relative to the largest logit) of the whole-model reference.
* Bits are reproducible on the same CPU architecture with the same numpy/OpenBLAS build;
  different SIMD paths on other machines may change the last bits of exp/sin/BLAS results.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from agents.kernels import (
    F32,
    apply_rope,
    as_f32,
    attend,
    matvec,
    mlp_partial,
    rms_norm,
    rope_table,
    route,
)
from placement.models import ModelConfig, Op, build_ops, split_width
from placement.plan import OpCut, Plan

MANIFEST_KEY = "lockstep.manifest"
SHARD_FORMAT = "lockstep.shard/1"
ACTIVATION_KEY = "lockstep.activation"
ACTIVATION_VERSION = 1
CHUNKED_LOGITS_RTOL = 1e-4
"""Bound on max |Δlogit| / max |logit| between a chunked or TP plan and the whole-model
reference (measured ≤ 3.5e-7 — a few float32 ulps — on tiny-llama and a tiny Mixtral at TP 1,
2 and 4; see tests/test_executor.py). Deeper models accumulate more, hence the margin."""

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ExecutionError(ValueError):
    """A malformed manifest, shard, activation or batch; the message names what is wrong."""


# --- BLAS threads --------------------------------------------------------------------------


def pin_blas_threads() -> int | None:
    """Make BLAS single-threaded, for this process and the processes it starts.

    A threaded gemv splits output rows among threads and the split changes a row's bits, so
    executors must run BLAS on one thread. The environment variables only take effect before
    numpy is imported (agent entrypoints set them first); for numpy's bundled OpenBLAS this
    also sets the count at run time through its C API. Returns the thread count OpenBLAS
    reports afterwards, or None when the BLAS library cannot be queried.
    """
    for var in BLAS_THREAD_VARS:
        os.environ[var] = "1"
    api = _openblas_api()
    if api is None:
        return None
    setter, getter = api
    setter(1)
    return int(getter())


@functools.cache
def _openblas_api() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*"))):
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_", "64_"), ("", "64_"), ("", "")):
                setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


# --- safetensors codec ---------------------------------------------------------------------
# The library reads files; shards arrive as buffers (an SRAM arena) and activations as bytes,
# and numpy has no bfloat16, so the (tiny) format is encoded and parsed here, zero-copy.

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
_TAG_OF_DTYPE = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i4"): "I32",
                 np.dtype("<i8"): "I64", np.dtype("i1"): "I8", np.dtype("u1"): "U8"}
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
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, end]}
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
        return as_f32(raw) if raw.flags.aligned else raw.astype(F32)
    if dtype == "F16":
        return raw.astype(F32)
    if dtype == "BF16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(F32)
    raise ExecutionError(f"dtype {dtype} cannot be executed (only F32, F16 and BF16)")


# --- layout: which units of which op a stage and a TP rank hold -----------------------------

EMBEDDING, ATTENTION, MLP, ROUTER, EXPERT, FINAL_NORM, LM_HEAD = (
    "embedding", "attention", "mlp", "router", "expert", "final_norm", "lm_head",
)
REPLICATED_KINDS = (ROUTER, FINAL_NORM)
"""Ops that are not cut: every TP rank holds their (small) weights, rank 0's copy is used."""


def even_split(width: int, parts: int, index: int) -> tuple[int, int]:
    """Units `[start, end)` of piece `index` of `width` cut in `parts` as evenly as possible.

    The first `width % parts` pieces get one unit more — the rule the partitioner sizes
    chunks with.
    """
    base, extra = divmod(width, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass(frozen=True)
class PieceSpec:
    """The part of op `op` one stage runs: chunks `chunk_first..chunk_last` of `chunks`.

    That is units `[start, end)` of the op's `width`; `ranks[r]` is TP rank r's sub-range.
    """

    op: int
    name: str
    kind: str
    layer: int
    chunks: int
    chunk_first: int
    chunk_last: int
    start: int
    end: int
    width: int
    ranks: tuple[tuple[int, int], ...]

    @property
    def starts_op(self) -> bool:
        return self.chunk_first == 0

    @property
    def ends_op(self) -> bool:
        return self.chunk_last == self.chunks - 1

    @property
    def cursor(self) -> tuple[int, int]:
        """Where the activation must stand for this piece to run."""
        return self.op, self.chunk_first

    @property
    def next_cursor(self) -> tuple[int, int]:
        return (self.op + 1, 0) if self.ends_op else (self.op, self.chunk_last + 1)

    @property
    def expert(self) -> int:
        return int(self.name.rsplit(".", 1)[1]) if self.kind == EXPERT else -1

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op, "name": self.name, "kind": self.kind, "layer": self.layer,
            "chunks": self.chunks, "chunk_first": self.chunk_first,
            "chunk_last": self.chunk_last, "units": [self.start, self.end],
            "width": self.width, "ranks": [list(r) for r in self.ranks],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PieceSpec:
        try:
            start, end = (int(u) for u in raw["units"])
            return cls(
                op=int(raw["op"]), name=str(raw["name"]), kind=str(raw["kind"]),
                layer=int(raw["layer"]), chunks=int(raw["chunks"]),
                chunk_first=int(raw["chunk_first"]), chunk_last=int(raw["chunk_last"]),
                start=start, end=end, width=int(raw["width"]),
                ranks=tuple((int(a), int(b)) for a, b in raw["ranks"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExecutionError(f"malformed op entry {dict(raw)!r}: {exc}") from None


def make_piece(
    cfg: ModelConfig, op: int, name: str, kind: str, layer: int,
    chunks: int, chunk_first: int, chunk_last: int, tp: int,
) -> PieceSpec:
    """The spec of chunks `chunk_first..chunk_last` of an op, cut among `tp` ranks."""
    width = split_width(cfg, kind)
    start = even_split(width, chunks, chunk_first)[0]
    end = even_split(width, chunks, chunk_last)[1]
    if kind in REPLICATED_KINDS:
        ranks = ((start, end),) * tp
    else:
        ranks = tuple(
            (start + a, start + b) for a, b in (even_split(end - start, tp, r) for r in range(tp))
        )
    return PieceSpec(op, name, kind, layer, chunks, chunk_first, chunk_last, start, end, width,
                     ranks)


@functools.lru_cache(maxsize=8)
def model_ops(cfg: ModelConfig) -> tuple[Op, ...]:
    """The model's op list — the one plans index into (names, kinds and layers only)."""
    return tuple(build_ops(cfg, "fp16"))


def stage_pieces(cfg: ModelConfig, first: OpCut, last: OpCut, tp: int) -> list[PieceSpec]:
    """The pieces of the stage running from `first` to `last` (inclusive) at TP width `tp`."""
    ops = model_ops(cfg)
    specs = []
    for index in range(first.op, last.op + 1):
        op = ops[index]
        chunks = first.chunks if index == first.op else last.chunks if index == last.op else 1
        chunk_first = first.chunk if index == first.op else 0
        chunk_last = last.chunk if index == last.op else chunks - 1
        specs.append(make_piece(cfg, index, op.name, op.kind, op.layer, chunks, chunk_first,
                                chunk_last, tp))
    return specs


def plan_layout(cfg: ModelConfig, plan: Plan, replica: int = 0) -> list[PieceSpec]:
    """Every piece of one replica of `plan`, in execution order (for the reference executor)."""
    return [
        spec
        for stage in plan.replica_stages(replica)
        for spec in stage_pieces(cfg, stage.first, stage.last, len(stage.chips))
    ]


def whole_layout(cfg: ModelConfig) -> list[PieceSpec]:
    """One whole piece per op on one chip: the unpartitioned model."""
    return [make_piece(cfg, i, op.name, op.kind, op.layer, 1, 0, 0, 1)
            for i, op in enumerate(model_ops(cfg))]


@dataclass(frozen=True)
class TensorSlice:
    """Rows or columns `[start, end)` along `axis` of checkpoint tensor `source`.

    `axis` None means the whole tensor (replicated). `name` is the tensor's name in the shard:
    the Hugging Face name, except the LM head of tied embeddings, stored as `lm_head.weight`.
    """

    name: str
    source: str
    axis: int | None = None
    start: int = 0
    end: int = 0

    def shape(self, full: Sequence[int]) -> tuple[int, ...]:
        out = list(full)
        if self.axis is not None:
            out[self.axis] = self.end - self.start
        return tuple(out)

    def take(self, array: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return array
        index: list[slice] = [slice(None)] * array.ndim
        index[self.axis] = slice(self.start, self.end)
        return array[tuple(index)]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "axis": self.axis, "range": [self.start, self.end]}


def checkpoint_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face Llama/Mixtral checkpoint with its `[out, in]` shape."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.is_moe:
            shapes[p + "block_sparse_moe.gate.weight"] = (cfg.num_local_experts, h)
            for e in range(cfg.num_local_experts):
                ep = f"{p}block_sparse_moe.experts.{e}."
                shapes[ep + "w1.weight"] = (inter, h)
                shapes[ep + "w2.weight"] = (h, inter)
                shapes[ep + "w3.weight"] = (inter, h)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
            shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def piece_tensors(cfg: ModelConfig, spec: PieceSpec, rank: int) -> dict[str, TensorSlice]:
    """The weight slices TP rank `rank` needs for `spec`, by role (norm, q, k, gate, …).

    Column-parallel matrices (q/k/v, gate/up, w1/w3, embedding and LM head rows) are cut along
    their output rows, row-parallel ones (o, down, w2) along their input columns. A rank whose
    unit range is empty holds only the replicated norm and contributes nothing.
    """
    a, b = spec.ranks[rank]
    p = f"model.layers.{spec.layer}."

    def cut(name: str, axis: int, lo: int, hi: int, source: str | None = None) -> TensorSlice:
        return TensorSlice(name, source or name, axis, lo, hi)

    if spec.kind == EMBEDDING:
        return {"table": cut("model.embed_tokens.weight", 0, a, b)}
    if spec.kind == LM_HEAD:
        source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return {"weight": cut("lm_head.weight", 0, a, b, source)}
    if spec.kind == FINAL_NORM:
        return {"norm": TensorSlice("model.norm.weight", "model.norm.weight")}
    if spec.kind == ATTENTION:
        out = {"norm": TensorSlice(p + "input_layernorm.weight", p + "input_layernorm.weight")}
        if a < b:
            q = cfg.num_attention_heads // cfg.num_key_value_heads * cfg.head_dim
            hd = cfg.head_dim
            out["q"] = cut(p + "self_attn.q_proj.weight", 0, a * q, b * q)
            out["k"] = cut(p + "self_attn.k_proj.weight", 0, a * hd, b * hd)
            out["v"] = cut(p + "self_attn.v_proj.weight", 0, a * hd, b * hd)
            out["o"] = cut(p + "self_attn.o_proj.weight", 1, a * q, b * q)
        return out
    norm = TensorSlice(p + "post_attention_layernorm.weight", p + "post_attention_layernorm.weight")
    if spec.kind == ROUTER:
        gate = p + "block_sparse_moe.gate.weight"
        return {"norm": norm, "router": TensorSlice(gate, gate)}
    if spec.kind == MLP:
        names = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight")
    elif spec.kind == EXPERT:
        ep = f"{p}block_sparse_moe.experts.{spec.expert}."
        names = (ep + "w1.weight", ep + "w3.weight", ep + "w2.weight")
    else:
        raise ExecutionError(f"op {spec.name}: unknown kind {spec.kind!r}")
    out = {"norm": norm}
    if a < b:
        out |= {"gate": cut(names[0], 0, a, b), "up": cut(names[1], 0, a, b),
                "down": cut(names[2], 1, a, b)}
    return out


# --- activations ---------------------------------------------------------------------------


@dataclass
class Activation:
    """What flows between pieces and stages for a batch of rows (one row = slot + position).

    `hidden` is the hidden state entering the op at `cursor` (None before the embedding has
    started); `partial` the sum of that op's pieces so far (inside an attention, MLP or MoE
    block); `route_ids/route_weights` the MoE routing of the current layer; `logits` the
    vocabulary prefix `[0, n)` produced so far by the LM head; `cursor` (op, chunk) the next
    piece to run — `(len(ops), 0)` once the model is done. Tokens travel along so stages cut
    inside the embedding can look their rows up.
    """

    slots: np.ndarray
    positions: np.ndarray
    tokens: np.ndarray
    hidden: np.ndarray | None = None
    partial: np.ndarray | None = None
    route_ids: np.ndarray | None = None
    route_weights: np.ndarray | None = None
    logits: np.ndarray | None = None
    cursor: tuple[int, int] = (0, 0)

    @classmethod
    def for_tokens(
        cls, slots: Sequence[int], positions: Sequence[int], tokens: Sequence[int]
    ) -> Activation:
        """Stage 0's input: token ids of `(slot, position)` rows."""
        return cls(np.asarray(slots, np.int32), np.asarray(positions, np.int32),
                   np.asarray(tokens, np.int32))

    @property
    def rows(self) -> int:
        return int(self.slots.shape[0])

    def _arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "cursor" and getattr(self, f.name) is not None}

    def copy(self) -> Activation:
        return Activation(**{k: v.copy() for k, v in self._arrays().items()}, cursor=self.cursor)

    def to_bytes(self) -> bytes:
        """A safetensors blob: one tensor per present field, the cursor in the metadata."""
        meta = {"version": ACTIVATION_VERSION, "cursor": list(self.cursor)}
        return encode_safetensors(self._arrays(), {ACTIVATION_KEY: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Activation:
        view = parse_safetensors(data)
        try:
            meta = json.loads(view.metadata[ACTIVATION_KEY])
            version, cursor = meta["version"], tuple(int(c) for c in meta["cursor"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            raise ExecutionError("not an activation blob: missing or bad metadata") from None
        if version != ACTIVATION_VERSION:
            raise ExecutionError(f"activation format version {version} is not supported "
                                 f"(this executor reads version {ACTIVATION_VERSION})")
        known = {f.name for f in fields(cls)} - {"cursor"}
        unknown = set(view.tensors) - known
        if unknown or not {"slots", "positions", "tokens"} <= set(view.tensors):
            raise ExecutionError(f"activation blob has unexpected tensors {sorted(unknown)} "
                                 "or lacks slots/positions/tokens")
        arrays = {k: np.array(v) for k, v in view.tensors.items()}
        act = cls(**arrays, cursor=(cursor[0], cursor[1]))
        _check_shapes(act)
        return act


def _check_shapes(act: Activation) -> None:
    rows = act.rows
    for name, array in act._arrays().items():
        if array.shape[:1] != (rows,):
            raise ExecutionError(f"activation field {name} has {array.shape[:1]} rows, "
                                 f"expected {rows}")


# --- executable pieces ---------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """KV-cache geometry: sequence slots and positions per slot, preallocated."""

    max_batch: int
    max_context: int


TensorGetter = Callable[[TensorSlice], np.ndarray]


class _AttentionPart:
    """One rank's KV heads of one layer's attention, with their KV cache."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], kv_heads: int,
                 serving: Serving, rope: tuple[np.ndarray, np.ndarray]) -> None:
        self.norm = weights["norm"]
        self.kv_heads = kv_heads
        self.head_dim = cfg.head_dim
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scale = F32(1.0 / np.sqrt(cfg.head_dim))
        self.cos, self.sin = rope
        if kv_heads:
            self.wq, self.wk, self.wv, self.wo = (weights[r] for r in ("q", "k", "v", "o"))
            shape = (serving.max_batch, kv_heads, serving.max_context, cfg.head_dim)
            self.cache_k = np.zeros(shape, F32)
            self.cache_v = np.zeros(shape, F32)

    def partial(self, xn: np.ndarray, slot: int, pos: int) -> np.ndarray | None:
        if not self.kv_heads:
            return None
        hd, g = self.head_dim, self.group
        cos, sin = self.cos[pos], self.sin[pos]
        q = apply_rope(matvec(self.wq, xn).reshape(-1, hd), cos, sin)
        self.cache_k[slot, :, pos] = apply_rope(matvec(self.wk, xn).reshape(-1, hd), cos, sin)
        self.cache_v[slot, :, pos] = matvec(self.wv, xn).reshape(-1, hd)
        out = np.empty_like(q)
        for j in range(self.kv_heads):
            out[j * g:(j + 1) * g] = attend(q[j * g:(j + 1) * g], self.cache_k[slot, j, :pos + 1],
                                            self.cache_v[slot, j, :pos + 1], self.scale)
        return matvec(self.wo, out.reshape(-1))


class _MlpPart:
    """One rank's intermediate columns of an MLP or expert (SwiGLU)."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.norm = weights["norm"]
        self.weights: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if "gate" in weights:  # else this rank holds no columns of the op
            self.weights = (weights["gate"], weights["up"], weights["down"])

    def partial(self, xn: np.ndarray) -> np.ndarray | None:
        return None if self.weights is None else mlp_partial(xn, *self.weights)


@dataclass
class _RowsPart:
    """Embedding or LM-head rows `[start, end)` of the vocabulary."""

    weight: np.ndarray
    start: int
    end: int


@dataclass
class _NormPart:
    """Replicated weights (final norm; router norm and gate)."""

    norm: np.ndarray
    router: np.ndarray | None = None


@dataclass
class _Piece:
    spec: PieceSpec
    parts: list[Any]  # one per TP rank, rank order


def _build_part(cfg: ModelConfig, spec: PieceSpec, rank: int, get: TensorGetter,
                serving: Serving, rope: tuple[np.ndarray, np.ndarray]) -> Any:
    weights = {role: get(ts) for role, ts in piece_tensors(cfg, spec, rank).items()}
    a, b = spec.ranks[rank]
    if spec.kind == ATTENTION:
        return _AttentionPart(cfg, weights, b - a, serving, rope)
    if spec.kind in (MLP, EXPERT):
        return _MlpPart(weights)
    if spec.kind == EMBEDDING:
        return _RowsPart(weights["table"], a, b)
    if spec.kind == LM_HEAD:
        return _RowsPart(weights["weight"], a, b)
    return _NormPart(weights["norm"], weights.get("router"))


def _rank_sum(partials: Iterable[np.ndarray | None]) -> np.ndarray | None:
    """Sum the ranks' partials in rank order, skipping ranks that hold nothing."""
    total = None
    for p in partials:
        if p is not None:
            total = p if total is None else total + p
    return total


def _run_embedding(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    if piece.spec.starts_op:
        act.hidden = np.zeros((act.rows, cfg.hidden_size), F32)
    assert act.hidden is not None
    for i, token in enumerate(act.tokens.tolist()):
        for part in piece.parts:
            if part.start <= token < part.end:
                act.hidden[i] = part.weight[token - part.start]


def _open_partial(piece: _Piece, act: Activation, cfg: ModelConfig) -> np.ndarray:
    """The op's running partial sum: zero at the first piece of an attention, an MLP or a
    MoE block (its router); experts keep adding to the block's sum."""
    if piece.spec.starts_op and piece.spec.kind != EXPERT:
        act.partial = np.zeros((act.rows, cfg.hidden_size), F32)
    if act.partial is None or act.hidden is None:
        raise ExecutionError(f"{piece.spec.name}: activation lacks the hidden state or the "
                             "partial sum of the op so far")
    return act.partial


def _close_partial(act: Activation) -> None:
    assert act.hidden is not None and act.partial is not None
    act.hidden = act.hidden + act.partial
    act.partial = None


def _run_attention(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    partial = _open_partial(piece, act, cfg)
    assert act.hidden is not None
    norm = piece.parts[0].norm
    for i, (slot, pos) in enumerate(zip(act.slots.tolist(), act.positions.tolist(), strict=True)):
        xn = rms_norm(act.hidden[i], norm, cfg.rms_norm_eps)
        total = _rank_sum(part.partial(xn, slot, pos) for part in piece.parts)
        if total is not None:
            partial[i] += total
    if piece.spec.ends_op:
        _close_partial(act)


def _run_mlp(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    partial = _open_partial(piece, act, cfg)
    assert act.hidden is not None
    norm = piece.parts[0].norm
    for i in range(act.rows):
        xn = rms_norm(act.hidden[i], norm, cfg.rms_norm_eps)
        total = _rank_sum(part.partial(xn) for part in piece.parts)
        if total is not None:
            partial[i] += total
    if piece.spec.ends_op:
        _close_partial(act)


def _run_router(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    _open_partial(piece, act, cfg)
    assert act.hidden is not None
    part = piece.parts[0]
    k = cfg.num_experts_per_tok
    act.route_ids = np.zeros((act.rows, k), np.int32)
    act.route_weights = np.zeros((act.rows, k), F32)
    for i in range(act.rows):
        xn = rms_norm(act.hidden[i], part.norm, cfg.rms_norm_eps)
        act.route_ids[i], act.route_weights[i] = route(matvec(part.router, xn), k)


def _run_expert(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    partial = _open_partial(piece, act, cfg)
    if act.route_ids is None or act.route_weights is None or act.hidden is None:
        raise ExecutionError(f"{piece.spec.name}: activation lacks the layer's routing")
    expert = piece.spec.expert
    norm = piece.parts[0].norm
    for i in range(act.rows):
        chosen = np.flatnonzero(act.route_ids[i] == expert)
        if not chosen.size:
            continue
        xn = rms_norm(act.hidden[i], norm, cfg.rms_norm_eps)
        total = _rank_sum(part.partial(xn) for part in piece.parts)
        if total is not None:
            partial[i] += act.route_weights[i, chosen[0]] * total
    if piece.spec.ends_op and expert == cfg.num_local_experts - 1:
        _close_partial(act)
        act.route_ids = act.route_weights = None


def _run_final_norm(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    assert act.hidden is not None
    norm = piece.parts[0].norm
    act.hidden = np.stack([rms_norm(row, norm, cfg.rms_norm_eps) for row in act.hidden]) \
        if act.rows else act.hidden


def _run_lm_head(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    if piece.spec.starts_op:
        act.logits = np.zeros((act.rows, 0), F32)
    if act.logits is None or act.logits.shape[1] != piece.spec.start or act.hidden is None:
        raise ExecutionError(f"{piece.spec.name}: activation holds logits up to "
                             f"{None if act.logits is None else act.logits.shape[1]}, this "
                             f"piece starts at vocabulary row {piece.spec.start}")
    new = np.zeros((act.rows, piece.spec.end - piece.spec.start), F32)
    for i in range(act.rows):
        new[i] = np.concatenate([matvec(part.weight, act.hidden[i]) for part in piece.parts])
    act.logits = np.concatenate([act.logits, new], axis=1)


_RUNNERS: dict[str, Callable[[_Piece, Activation, ModelConfig], None]] = {
    EMBEDDING: _run_embedding, ATTENTION: _run_attention, MLP: _run_mlp, ROUTER: _run_router,
    EXPERT: _run_expert, FINAL_NORM: _run_final_norm, LM_HEAD: _run_lm_head,
}


def _check_batch(act: Activation, cfg: ModelConfig, serving: Serving) -> None:
    """Rows must name valid slots, positions and tokens; per slot, positions increase."""
    _check_shapes(act)
    slots, positions, tokens = act.slots.tolist(), act.positions.tolist(), act.tokens.tolist()
    last: dict[int, int] = {}
    for slot, pos, token in zip(slots, positions, tokens, strict=True):
        if not 0 <= slot < serving.max_batch:
            raise ExecutionError(f"slot {slot} is outside 0..{serving.max_batch - 1} (maxBatch)")
        if not 0 <= pos < serving.max_context:
            raise ExecutionError(f"position {pos} is outside 0..{serving.max_context - 1} "
                                 "(maxContext)")
        if not 0 <= token < cfg.vocab_size:
            raise ExecutionError(f"token {token} is outside the vocabulary "
                                 f"(0..{cfg.vocab_size - 1})")
        if pos <= last.get(slot, -1):
            raise ExecutionError(f"slot {slot}: positions must increase within a batch "
                                 f"({pos} after {last[slot]})")
        last[slot] = pos


def _run_pieces(pieces: Sequence[_Piece], batch: Activation, cfg: ModelConfig,
                serving: Serving) -> Activation:
    _check_batch(batch, cfg, serving)
    act = batch.copy()
    for piece in pieces:
        if act.cursor != piece.spec.cursor:
            raise ExecutionError(f"activation is at op/chunk {act.cursor}, but the next piece "
                                 f"is {piece.spec.name} chunk {piece.spec.chunk_first} "
                                 f"{piece.spec.cursor}: stages out of order?")
        _RUNNERS[piece.spec.kind](piece, act, cfg)
        act.cursor = piece.spec.next_cursor
    return act


# --- stage programs ------------------------------------------------------------------------


class Stepper(Protocol):
    def step(self, batch: Activation) -> Activation: ...


StageInput = Activation
StageOutput = Activation


@dataclass
class StageProgram:
    """One chip's program: its TP rank's slice of the pieces of one pipeline stage.

    Weights are float32 views or widened copies of the shard's tensors; KV caches are
    preallocated for `serving`. A TP=1 program steps on its own; TP ranks step together
    through `TensorParallelGroup` (a TP group lives on one node, in one agent process).
    """

    cfg: ModelConfig
    manifest: dict[str, Any]
    stage: int
    tp_rank: int
    tp_size: int
    serving: Serving
    pieces: list[_Piece] = field(repr=False)

    @property
    def specs(self) -> list[PieceSpec]:
        return [p.spec for p in self.pieces]

    def step(self, batch: StageInput) -> StageOutput:
        """Run this stage's pieces on `batch`; the input is not modified."""
        if self.tp_size != 1:
            raise ExecutionError(f"stage {self.stage} is tensor-parallel ({self.tp_size} ranks): "
                                 "step it through TensorParallelGroup")
        return _run_pieces(self.pieces, batch, self.cfg, self.serving)


class TensorParallelGroup:
    """The TP ranks of one stage stepping together; partial sums are reduced in rank order."""

    def __init__(self, programs: Sequence[StageProgram]) -> None:
        ranks = sorted(programs, key=lambda p: p.tp_rank)
        size = len(ranks)
        if [p.tp_rank for p in ranks] != list(range(size)) or any(p.tp_size != size
                                                                  for p in ranks):
            raise ExecutionError(f"a TP group needs ranks 0..{size - 1} of a {size}-wide stage, "
                                 f"got {[(p.tp_rank, p.tp_size) for p in ranks]}")
        if any(p.specs != ranks[0].specs or p.stage != ranks[0].stage for p in ranks):
            raise ExecutionError("TP ranks disagree on the stage or its pieces")
        self.cfg, self.serving = ranks[0].cfg, ranks[0].serving
        self.pieces = [_Piece(spec, [p.pieces[i].parts[0] for p in ranks])
                       for i, spec in enumerate(ranks[0].specs)]

    def step(self, batch: StageInput) -> StageOutput:
        return _run_pieces(self.pieces, batch, self.cfg, self.serving)


def run_pipeline(stages: Sequence[Stepper], batch: Activation, *, via_bytes: bool = False
                 ) -> Activation:
    """Step `batch` through the stages in order (in-process); `via_bytes` round-trips every
    hand-off through `Activation.to_bytes`, as a network hop would."""
    for stage in stages:
        batch = stage.step(batch)
        if via_bytes:
            batch = Activation.from_bytes(batch.to_bytes())
    return batch


def _manifest_field(manifest: Mapping[str, Any], *path: str) -> Any:
    value: Any = manifest
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            raise ExecutionError(f"shard manifest lacks {'.'.join(path)}")
        value = value[key]
    return value


def load_stage_program(manifest: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
                       ) -> StageProgram:
    """Build a chip's program from its shard manifest and tensors (views into the shard).

    F32 tensors are used in place; F16/BF16 ones are widened to float32 once, here.
    """
    if manifest.get("format") != SHARD_FORMAT:
        raise ExecutionError(f"shard format {manifest.get('format')!r} is not {SHARD_FORMAT!r}")
    if manifest.get("virtual"):
        raise ExecutionError("a virtual shard has no weights: account its declared_bytes of "
                             "SRAM, it cannot be executed")
    pin_blas_threads()
    cfg = ModelConfig(**_manifest_field(manifest, "model", "config"))
    serving = Serving(int(_manifest_field(manifest, "serving", "max_batch")),
                      int(_manifest_field(manifest, "serving", "max_context")))
    table = _manifest_field(manifest, "tensors")
    shapes = checkpoint_tensor_shapes(cfg)

    def get(ts: TensorSlice) -> np.ndarray:
        if ts.name not in tensors or ts.name not in table:
            raise ExecutionError(f"shard lacks tensor {ts.name}")
        raw, expected = tensors[ts.name], ts.shape(shapes[ts.source])
        if tuple(raw.shape) != expected:
            raise ExecutionError(f"shard tensor {ts.name} has shape {list(raw.shape)}, its op "
                                 f"needs {list(expected)}")
        return decode_f32(raw, table[ts.name]["dtype"])

    rank = int(_manifest_field(manifest, "tp", "rank"))
    size = int(_manifest_field(manifest, "tp", "size"))
    rope = rope_table(cfg.head_dim, cfg.rope_theta, serving.max_context)
    specs = [PieceSpec.from_dict(raw) for raw in _manifest_field(manifest, "ops")]
    if not 0 <= rank < size or any(len(s.ranks) != size for s in specs):
        raise ExecutionError(f"shard manifest: TP rank {rank} of {size} does not match its ops")
    pieces = [_Piece(s, [_build_part(cfg, s, rank, get, serving, rope)]) for s in specs]
    return StageProgram(cfg, dict(manifest), int(_manifest_field(manifest, "stage")), rank, size,
                        serving, pieces)


def read_shard(blob: bytes | bytearray | memoryview | Any
               ) -> tuple[dict[str, Any], SafetensorsView]:
    """The manifest and tensor views of a shard blob held in memory (e.g. an SRAM arena)."""
    view = parse_safetensors(blob)
    if MANIFEST_KEY not in view.metadata:
        raise ExecutionError(f"not a Lockstep shard: no {MANIFEST_KEY} in the metadata")
    try:
        manifest = json.loads(view.metadata[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise ExecutionError(f"shard manifest is not JSON: {exc}") from None
    return manifest, view


def verify_shard_tensors(manifest: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
                         ) -> list[str]:
    """Names of tensors whose sha256 differs from the manifest's (empty when all match)."""
    bad = []
    for name, info in _manifest_field(manifest, "tensors").items():
        raw = tensors.get(name)
        if raw is None or hashlib.sha256(raw.tobytes()).hexdigest() != info.get("sha256"):
            bad.append(name)
    return bad


def load_shard(blob: bytes | bytearray | memoryview | Any) -> StageProgram:
    """`load_stage_program` of a shard blob, zero-copy for F32 weights."""
    manifest, view = read_shard(blob)
    return load_stage_program(manifest, view.tensors)


# --- reference executor, sampling, generation ----------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0; otherwise softmax sampling seeded per request."""

    temperature: float = 0.0
    seed: int = 0


def sample_token(logits: np.ndarray, sampling: Sampling, index: int) -> int:
    """The token to put at sequence position `index`, from the logits of the row before it.

    Seeded sampling draws from `PCG64([seed, index])`, so a request's tokens depend only on
    its seed and its logits — not on timing, batch or replica.
    """
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([sampling.seed, index])))
    z = logits.astype(np.float64) / sampling.temperature
    cdf = np.cumsum(np.exp(z - z.max()))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


@dataclass(frozen=True)
class Request:
    """A sequence to generate: prompt token ids, how many tokens to add, in which slot."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    slot: int = 0


@dataclass(frozen=True)
class Generation:
    """Generated token ids and the logits each was sampled from (`[steps, vocab]`)."""

    tokens: tuple[int, ...]
    logits: np.ndarray

    @property
    def final_logits(self) -> np.ndarray:
        last: np.ndarray = self.logits[-1]
        return last


def generate(step: Callable[[Activation], Activation], requests: Sequence[Request]
             ) -> list[Generation]:
    """Prefill every prompt in one batch, then decode one row per unfinished request per step.

    `step` maps a token batch to the last stage's output (a pipeline or a reference executor).
    """
    if len({r.slot for r in requests}) != len(requests):
        raise ExecutionError("requests of one batch must use distinct slots")
    if any(not r.prompt or r.max_new_tokens < 1 for r in requests):
        raise ExecutionError("every request needs a prompt and max_new_tokens >= 1")
    rows = [(r.slot, p, t) for r in requests for p, t in enumerate(r.prompt)]
    out = step(Activation.for_tokens(*zip(*rows, strict=True)))
    ends = np.cumsum([len(r.prompt) for r in requests]) - 1
    tokens: list[list[int]] = [[] for _ in requests]
    logits: list[list[np.ndarray]] = [[] for _ in requests]
    live = list(range(len(requests)))
    last_logits = {i: _logits(out)[ends[i]] for i in live}
    while live:
        for i in live:
            r = requests[i]
            logits[i].append(last_logits[i])
            index = len(r.prompt) + len(tokens[i])
            tokens[i].append(sample_token(last_logits[i], r.sampling, index))
        live = [i for i in live if len(tokens[i]) < requests[i].max_new_tokens]
        if not live:
            break
        batch = Activation.for_tokens(
            [requests[i].slot for i in live],
            [len(requests[i].prompt) + len(tokens[i]) - 1 for i in live],
            [tokens[i][-1] for i in live],
        )
        out_logits = _logits(step(batch))
        last_logits = {i: out_logits[j] for j, i in enumerate(live)}
    return [Generation(tuple(t), np.stack(lg)) for t, lg in zip(tokens, logits, strict=True)]


def _logits(out: Activation) -> np.ndarray:
    if out.logits is None:
        raise ExecutionError(f"the pipeline stopped at op/chunk {out.cursor} without logits")
    return out.logits


class ReferenceExecutor:
    """The whole model in one process: the oracle stage-by-stage execution is checked against.

    `tensors` maps Hugging Face names to arrays (a checkpoint reader, seeded weights, or a
    dict). With `layout` (e.g. `plan_layout(cfg, plan)`) it runs the plan's pieces and TP
    ranks in the same order as the pipeline and is bit-identical to it; without, it runs whole
    ops, which a plan cut only between whole ops at TP=1 matches bit for bit.
    """

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *,
                 max_batch: int = 1, max_context: int | None = None,
                 layout: Sequence[PieceSpec] | None = None) -> None:
        pin_blas_threads()
        self.cfg = cfg
        self.serving = Serving(max_batch, max_context or cfg.max_position_embeddings)
        shapes = checkpoint_tensor_shapes(cfg)
        full: dict[str, np.ndarray] = {}

        def get(ts: TensorSlice) -> np.ndarray:
            if ts.source not in full:
                array = tensors[ts.source]
                if tuple(array.shape) != shapes[ts.source]:
                    raise ExecutionError(f"tensor {ts.source} has shape {list(array.shape)}, "
                                         f"the model needs {list(shapes[ts.source])}")
                full[ts.source] = as_f32(array)
            return np.ascontiguousarray(ts.take(full[ts.source]))

        rope = rope_table(cfg.head_dim, cfg.rope_theta, self.serving.max_context)
        specs = list(layout) if layout is not None else whole_layout(cfg)
        self.pieces = [_Piece(s, [_build_part(cfg, s, r, get, self.serving, rope)
                                  for r in range(len(s.ranks))]) for s in specs]

    def step(self, batch: Activation) -> Activation:
        return _run_pieces(self.pieces, batch, self.cfg, self.serving)

    def prefill(self, tokens: Sequence[int], slot: int = 0, start: int = 0) -> np.ndarray:
        """Logits `[len(tokens), vocab]` of a prompt placed at positions `start…` of `slot`."""
        n = len(tokens)
        return _logits(self.step(Activation.for_tokens([slot] * n, range(start, start + n),
                                                       tokens)))

    def decode(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]
               ) -> np.ndarray:
        """Logits of one step for rows `(slot, position, token)`."""
        return _logits(self.step(Activation.for_tokens(slots, positions, tokens)))

    def generate(self, prompt: Sequence[int], max_new_tokens: int,
                 sampling: Sampling = Sampling(), slot: int = 0) -> Generation:
        return generate(self.step, [Request(tuple(prompt), max_new_tokens, sampling, slot)])[0]
