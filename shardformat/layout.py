"""The layout of a plan into op pieces: which units of which op a stage and a TP rank hold.

A plan cuts the op list (`placement.models.build_ops`) into stages; a stage may start or end
inside an op (a *chunk* cut along query heads, intermediate columns or vocabulary rows), and each
stage is split again among its tensor-parallel (TP) ranks. What one stage runs of one op is a
`PieceSpec`: the op, its chunk range, the unit range `[start, end)` along the cut dimension and
the sub-range of every TP rank. The same specs drive the compiler (which slices the checkpoint
with `piece_tensors`), the stage program (which runs them) and the reference executor (which can
run any plan's pieces in one process), so slicing and execution can never disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from placement.models import (
    ModelConfig,
    Op,
    build_ops,
    chunk_units,
    even_split,
    kv_heads_of,
    split_width,
)
from placement.plan import OpCut, Plan
from shardformat.errors import ExecutionError

EMBEDDING, ATTENTION, MLP, ROUTER, EXPERT, FINAL_NORM, LM_HEAD = (
    "embedding",
    "attention",
    "mlp",
    "router",
    "expert",
    "final_norm",
    "lm_head",
)
REPLICATED_KINDS = (ROUTER, FINAL_NORM)
"""Ops that are not cut: every TP rank holds their (small) weights, rank 0's copy is used."""


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
            "op": self.op,
            "name": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "chunks": self.chunks,
            "chunk_first": self.chunk_first,
            "chunk_last": self.chunk_last,
            "units": [self.start, self.end],
            "width": self.width,
            "ranks": [list(r) for r in self.ranks],
        }


def make_piece(
    cfg: ModelConfig,
    op: int,
    name: str,
    kind: str,
    layer: int,
    chunks: int,
    chunk_first: int,
    chunk_last: int,
    tp: int,
) -> PieceSpec:
    """The spec of chunks `chunk_first..chunk_last` of an op, cut among `tp` ranks."""
    width = split_width(cfg, kind)
    start = chunk_units(cfg, kind, chunks, chunk_first)[0]
    end = chunk_units(cfg, kind, chunks, chunk_last)[1]
    if kind in REPLICATED_KINDS:
        ranks = ((start, end),) * tp
    elif kind == ATTENTION and chunks <= cfg.num_key_value_heads:
        # Whole KV groups: the ranks share out KV heads, so no rank holds a group twice.
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        first, last = start // group, end // group
        ranks = tuple(
            ((first + a) * group, (first + b) * group)
            for a, b in (even_split(last - first, tp, r) for r in range(tp))
        )
    else:
        ranks = tuple(
            (start + a, start + b) for a, b in (even_split(end - start, tp, r) for r in range(tp))
        )
    return PieceSpec(
        op, name, kind, layer, chunks, chunk_first, chunk_last, start, end, width, ranks
    )


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
        specs.append(
            make_piece(cfg, index, op.name, op.kind, op.layer, chunks, chunk_first, chunk_last, tp)
        )
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
    return [
        make_piece(cfg, i, op.name, op.kind, op.layer, 1, 0, 0, 1)
        for i, op in enumerate(model_ops(cfg))
    ]


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
    """Every tensor of a Hugging Face checkpoint of `cfg` with its `[out, in]` shape.

    Llama, Mistral, Mixtral, Qwen2 and Qwen3 name their tensors alike; the flags add q/k/v
    biases (`[out]`), the o bias and Qwen3's per-head q/k norms (`[head_dim]`).
    """
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
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
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
        return _attention_tensors(cfg, spec, p, a, b)
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
        out |= {
            "gate": cut(names[0], 0, a, b),
            "up": cut(names[1], 0, a, b),
            "down": cut(names[2], 1, a, b),
        }
    return out


def _whole(name: str) -> TensorSlice:
    return TensorSlice(name, name)


def _attention_tensors(
    cfg: ModelConfig, spec: PieceSpec, p: str, a: int, b: int
) -> dict[str, TensorSlice]:
    """Attention of query heads `[a, b)`: their q rows and o columns, and the k/v rows of every
    KV head they read (`kv_heads_of`: a rank or chunk holding part of a KV group holds all of
    its k/v rows), with the biases cut alike.

    Replicated (every rank and chunk holds a copy, rank 0's is used): the input norm and
    Qwen3's per-head q/k norms. The o bias is added once per op, so only the piece that ends
    the op holds it (every rank of that piece, like a norm).
    """
    out = {"norm": _whole(p + "input_layernorm.weight")}
    if cfg.qk_norm:
        out["q_norm"] = _whole(p + "self_attn.q_norm.weight")
        out["k_norm"] = _whole(p + "self_attn.k_norm.weight")
    if cfg.o_bias and spec.ends_op:
        out["o_bias"] = _whole(p + "self_attn.o_proj.bias")
    if a < b:
        hd = cfg.head_dim
        first, last = kv_heads_of(cfg, a, b)
        rows = {"q": (a * hd, b * hd), "k": (first * hd, last * hd), "v": (first * hd, last * hd)}
        for role, (lo, hi) in rows.items():
            name = f"{p}self_attn.{role}_proj.weight"
            out[role] = TensorSlice(name, name, 0, lo, hi)
            if cfg.qkv_bias:
                name = f"{p}self_attn.{role}_proj.bias"
                out[role + "_bias"] = TensorSlice(name, name, 0, lo, hi)
        o_name = p + "self_attn.o_proj.weight"
        out["o"] = TensorSlice(o_name, o_name, 1, a * hd, b * hd)
    return out
