"""Stage programs: run a compiled shard's slice of the model on numpy, bit-deterministically.

A stage program runs the `PieceSpec`s of its stage (`shardformat.layout`) for one TP rank, on
`Activation`s (`agents.activation`); a `TensorParallelGroup` steps a stage's ranks together,
and the `ReferenceExecutor` runs the whole model — or any plan's layout — in one process, as
the oracle stage-by-stage execution is checked against. Shards are safetensors blobs
(`shardformat.codec`) with a typed manifest (`shardformat.manifest`) in their metadata.

Determinism — the contract of DESIGN.md "Lockstep and determinism":

* Every reduction runs per row with shapes fixed by the model and the row's position
  (`agents.kernels`), so a row's bits do not depend on the other rows of the batch, nor on
  whether a prompt was prefilled in one step or token by token.
* TP partial sums are added in rank order (0, 1, 2, …), chunk partial sums in chunk order, MoE
  experts in ascending expert id; the sum starts at zero at the op's first piece.
* BLAS runs single-threaded (`agents.blas_threads.pin_blas_threads`; agent processes should
  also export `OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=MKL_NUM_THREADS=1` before numpy is
  imported).
* Hence: a plan whose stage boundaries fall between whole ops with TP=1 is bit-identical to the
  whole-model `ReferenceExecutor`. A plan with chunk cuts or TP>1 sums matrix products in
  pieces; it is bit-identical to `ReferenceExecutor(..., layout=plan_layout(cfg, plan))`, and
  within `CHUNKED_LOGITS_RTOL` (relative to the largest logit) of the whole-model reference.
* Bits are reproducible on the same CPU architecture with the same numpy/OpenBLAS build;
  different SIMD paths on other machines may change the last bits of exp/sin/BLAS results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agents.activation import Activation
from agents.blas_threads import pin_blas_threads
from agents.kernels import (
    F32,
    apply_rope,
    as_f32,
    attend,
    matvec,
    mlp_partial,
    model_rope_table,
    rms_norm,
    rms_norm_rows,
    route,
)
from agents.sampling import GREEDY, Generation, Request, Sampling, generate
from placement.models import ModelConfig, kv_heads_of
from shardformat.codec import SafetensorsView, decode_f32, parse_safetensors
from shardformat.errors import ExecutionError
from shardformat.layout import (
    ATTENTION,
    EMBEDDING,
    EXPERT,
    FINAL_NORM,
    LM_HEAD,
    MLP,
    ROUTER,
    PieceSpec,
    TensorSlice,
    checkpoint_tensor_shapes,
    piece_tensors,
    whole_layout,
)
from shardformat.manifest import MANIFEST_KEY, Manifest
from shardformat.precision import QUANTIZED_DTYPES, dequantize, scale_name
from shardformat.text import TextSpec

CHUNKED_LOGITS_RTOL = 1e-4
"""Bound on max |Δlogit| / max |logit| between a chunked or TP plan and the whole-model
reference (measured ≤ 3.5e-7 — a few float32 ulps — on tiny-llama and a tiny Mixtral at TP 1,
2 and 4; see tests/test_executor.py). Deeper models accumulate more, hence the margin."""


# --- executable pieces ---------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """KV-cache geometry: sequence slots and positions per slot, preallocated."""

    max_batch: int
    max_context: int


TensorGetter = Callable[[TensorSlice], np.ndarray]


class _AttentionPart:
    """One rank's query heads of one layer's attention, with the KV heads they read and their
    KV cache (a rank holding part of a KV group projects and caches the whole KV head).

    Biases (Qwen2 q/k/v, Llama `attention_bias`) are added to the projections as transformers'
    `nn.Linear` does; Qwen3's q/k norms run per head before rotation. A layer with a sliding
    window keeps `min(window, max_context)` positions per slot in a ring (position p at row
    p % size), the KV cache the plan charges (`Op.cached_positions`); a row at position p
    attends to positions p - window + 1 … p in position order, as transformers' mask allows.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        weights: dict[str, np.ndarray],
        heads: tuple[int, int],
        serving: Serving,
        rope: tuple[np.ndarray, np.ndarray],
    ) -> None:
        self.norm = weights["norm"]
        self.o_bias = weights.get("o_bias")
        self.q_norm, self.k_norm = weights.get("q_norm"), weights.get("k_norm")
        self.eps = cfg.rms_norm_eps
        first, last = kv_heads_of(cfg, *heads)
        self.kv_heads = last - first
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        # Per KV head held, the local rows of the query heads that read it.
        self.reads = [
            (max(heads[0], j * group) - heads[0], min(heads[1], (j + 1) * group) - heads[0])
            for j in range(first, last)
        ]
        self.head_dim = cfg.head_dim
        self.scale = F32(1.0 / np.sqrt(cfg.head_dim))
        self.cos, self.sin = rope
        window = cfg.window_of_layer(layer)
        self.window = window if window and window < serving.max_context else 0
        self.positions = self.window or serving.max_context
        if self.kv_heads:
            self.wq, self.wk, self.wv, self.wo = (weights[r] for r in ("q", "k", "v", "o"))
            self.bq, self.bk, self.bv = (weights.get(r + "_bias") for r in ("q", "k", "v"))
            shape = (serving.max_batch, self.kv_heads, self.positions, cfg.head_dim)
            self.cache_k = np.zeros(shape, F32)
            self.cache_v = np.zeros(shape, F32)

    def _project(self, weight: np.ndarray, bias: np.ndarray | None, xn: np.ndarray) -> np.ndarray:
        out = matvec(weight, xn)
        return (out if bias is None else out + bias).reshape(-1, self.head_dim)

    def _cached(self, cache: np.ndarray, slot: int, j: int, pos: int) -> np.ndarray:
        """KV head j's cached rows of positions max(0, pos - window + 1) … pos, in order."""
        if not self.window or pos < self.window:
            return cache[slot, j, : pos + 1]
        cut = (pos + 1) % self.window
        return np.concatenate([cache[slot, j, cut:], cache[slot, j, :cut]])

    def partial(self, xn: np.ndarray, slot: int, pos: int) -> np.ndarray | None:
        if not self.kv_heads:
            return None
        cos, sin = self.cos[pos], self.sin[pos]
        q = self._project(self.wq, self.bq, xn)
        k = self._project(self.wk, self.bk, xn)
        if self.q_norm is not None and self.k_norm is not None:
            q = rms_norm_rows(q, self.q_norm, self.eps)
            k = rms_norm_rows(k, self.k_norm, self.eps)
        q = apply_rope(q, cos, sin)
        row = pos % self.window if self.window else pos
        self.cache_k[slot, :, row] = apply_rope(k, cos, sin)
        self.cache_v[slot, :, row] = self._project(self.wv, self.bv, xn)
        out = np.empty_like(q)
        for j, (lo, hi) in enumerate(self.reads):
            out[lo:hi] = attend(
                q[lo:hi],
                self._cached(self.cache_k, slot, j, pos),
                self._cached(self.cache_v, slot, j, pos),
                self.scale,
            )
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


def _build_part(
    cfg: ModelConfig,
    spec: PieceSpec,
    rank: int,
    get: TensorGetter,
    serving: Serving,
    rope: tuple[np.ndarray, np.ndarray],
) -> Any:
    weights = {role: get(ts) for role, ts in piece_tensors(cfg, spec, rank).items()}
    a, b = spec.ranks[rank]
    if spec.kind == ATTENTION:
        return _AttentionPart(cfg, spec.layer, weights, (a, b), serving, rope)
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
        raise ExecutionError(
            f"{piece.spec.name}: activation lacks the hidden state or the "
            "partial sum of the op so far"
        )
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
        o_bias = piece.parts[0].o_bias
        if o_bias is not None:  # once per op, after every head's share: W·x + b
            act.partial = partial + o_bias
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
    act.hidden = (
        np.stack([rms_norm(row, norm, cfg.rms_norm_eps) for row in act.hidden])
        if act.rows
        else act.hidden
    )


def _run_lm_head(piece: _Piece, act: Activation, cfg: ModelConfig) -> None:
    if piece.spec.starts_op:
        act.logits = np.zeros((act.rows, 0), F32)
    if act.logits is None or act.logits.shape[1] != piece.spec.start or act.hidden is None:
        raise ExecutionError(
            f"{piece.spec.name}: activation holds logits up to "
            f"{None if act.logits is None else act.logits.shape[1]}, this "
            f"piece starts at vocabulary row {piece.spec.start}"
        )
    new = np.zeros((act.rows, piece.spec.end - piece.spec.start), F32)
    for i in range(act.rows):
        new[i] = np.concatenate([matvec(part.weight, act.hidden[i]) for part in piece.parts])
    act.logits = np.concatenate([act.logits, new], axis=1)


_RUNNERS: dict[str, Callable[[_Piece, Activation, ModelConfig], None]] = {
    EMBEDDING: _run_embedding,
    ATTENTION: _run_attention,
    MLP: _run_mlp,
    ROUTER: _run_router,
    EXPERT: _run_expert,
    FINAL_NORM: _run_final_norm,
    LM_HEAD: _run_lm_head,
}


def _check_batch(act: Activation, cfg: ModelConfig, serving: Serving) -> None:
    """Rows must name valid slots, positions and tokens; per slot, positions increase."""
    act.check_rows()
    slots, positions, tokens = act.slots.tolist(), act.positions.tolist(), act.tokens.tolist()
    last: dict[int, int] = {}
    for slot, pos, token in zip(slots, positions, tokens, strict=True):
        if not 0 <= slot < serving.max_batch:
            raise ExecutionError(f"slot {slot} is outside 0..{serving.max_batch - 1} (maxBatch)")
        if not 0 <= pos < serving.max_context:
            raise ExecutionError(
                f"position {pos} is outside 0..{serving.max_context - 1} (maxContext)"
            )
        if not 0 <= token < cfg.vocab_size:
            raise ExecutionError(
                f"token {token} is outside the vocabulary (0..{cfg.vocab_size - 1})"
            )
        if pos <= last.get(slot, -1):
            raise ExecutionError(
                f"slot {slot}: positions must increase within a batch ({pos} after {last[slot]})"
            )
        last[slot] = pos


def _run_pieces(
    pieces: Sequence[_Piece], batch: Activation, cfg: ModelConfig, serving: Serving
) -> Activation:
    _check_batch(batch, cfg, serving)
    act = batch.copy()
    for piece in pieces:
        if act.cursor != piece.spec.cursor:
            raise ExecutionError(
                f"activation is at op/chunk {act.cursor}, but the next piece "
                f"is {piece.spec.name} chunk {piece.spec.chunk_first} "
                f"{piece.spec.cursor}: stages out of order?"
            )
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
    manifest: Manifest
    stage: int
    tp_rank: int
    tp_size: int
    serving: Serving
    pieces: list[_Piece] = field(repr=False)
    text: TextSpec | None = field(default=None, repr=False)  # stage 0: tokenizer, EOS ids

    @property
    def specs(self) -> list[PieceSpec]:
        return [p.spec for p in self.pieces]

    def step(self, batch: StageInput) -> StageOutput:
        """Run this stage's pieces on `batch`; the input is not modified."""
        if self.tp_size != 1:
            raise ExecutionError(
                f"stage {self.stage} is tensor-parallel ({self.tp_size} ranks): "
                "step it through TensorParallelGroup"
            )
        return _run_pieces(self.pieces, batch, self.cfg, self.serving)


class TensorParallelGroup:
    """The TP ranks of one stage stepping together; partial sums are reduced in rank order."""

    def __init__(self, programs: Sequence[StageProgram]) -> None:
        ranks = sorted(programs, key=lambda p: p.tp_rank)
        size = len(ranks)
        if [p.tp_rank for p in ranks] != list(range(size)) or any(p.tp_size != size for p in ranks):
            raise ExecutionError(
                f"a TP group needs ranks 0..{size - 1} of a {size}-wide stage, "
                f"got {[(p.tp_rank, p.tp_size) for p in ranks]}"
            )
        if any(p.specs != ranks[0].specs or p.stage != ranks[0].stage for p in ranks):
            raise ExecutionError("TP ranks disagree on the stage or its pieces")
        self.cfg, self.serving = ranks[0].cfg, ranks[0].serving
        self.pieces = [
            _Piece(spec, [p.pieces[i].parts[0] for p in ranks])
            for i, spec in enumerate(ranks[0].specs)
        ]

    def step(self, batch: StageInput) -> StageOutput:
        return _run_pieces(self.pieces, batch, self.cfg, self.serving)


def run_pipeline(
    stages: Sequence[Stepper], batch: Activation, *, via_bytes: bool = False
) -> Activation:
    """Step `batch` through the stages in order (in-process); `via_bytes` round-trips every
    hand-off through `Activation.to_bytes`, as a network hop would."""
    for stage in stages:
        batch = stage.step(batch)
        if via_bytes:
            batch = Activation.from_bytes(batch.to_bytes())
    return batch


def load_stage_program(manifest: Manifest, tensors: Mapping[str, np.ndarray]) -> StageProgram:
    """Build a chip's program from its (parsed, checked) manifest and tensors (views into the
    shard).

    F32 tensors are used in place; F16/BF16 ones are widened to float32 once, here; I8 and
    F8_E4M3 matrices are dequantized with their per-row scales (`shardformat.precision`).
    """
    if manifest.virtual:
        raise ExecutionError(
            "a virtual shard has no weights: account its declared_bytes of "
            "SRAM, it cannot be executed"
        )
    pin_blas_threads()
    cfg = manifest.config
    serving = Serving(manifest.max_batch, manifest.max_context)
    table = manifest.tensors
    shapes = checkpoint_tensor_shapes(cfg)

    def get(ts: TensorSlice) -> np.ndarray:
        if ts.name not in tensors or ts.name not in table:
            raise ExecutionError(f"shard lacks tensor {ts.name}")
        raw, expected = tensors[ts.name], ts.shape(shapes[ts.source])
        if tuple(raw.shape) != expected:
            raise ExecutionError(
                f"shard tensor {ts.name} has shape {list(raw.shape)}, its op needs {list(expected)}"
            )
        dtype = table[ts.name].dtype
        if dtype not in QUANTIZED_DTYPES:
            return decode_f32(raw, dtype)
        scales = scale_name(ts.name)
        if scales not in tensors or scales not in table or table[scales].dtype != "F32":
            raise ExecutionError(f"shard lacks the F32 row scales {scales} of {ts.name}")
        return dequantize(raw, dtype, np.asarray(tensors[scales]))

    rank, size = manifest.tp_rank, manifest.tp_size
    rope = model_rope_table(cfg, serving.max_context)
    specs = list(manifest.ops)
    try:
        pieces = [_Piece(s, [_build_part(cfg, s, rank, get, serving, rope)]) for s in specs]
    except (KeyError, IndexError, ValueError, ArithmeticError) as exc:
        if isinstance(exc, ExecutionError):
            raise
        raise ExecutionError(f"shard manifest does not fit model {cfg.name}: {exc!r}") from None
    return StageProgram(cfg, manifest, manifest.stage, rank, size, serving, pieces)


def read_shard(
    blob: bytes | bytearray | memoryview | Any,
) -> tuple[Manifest, SafetensorsView]:
    """The manifest and tensor views of a shard blob held in memory (e.g. an SRAM arena)."""
    view = parse_safetensors(blob)
    if MANIFEST_KEY not in view.metadata:
        raise ExecutionError(f"not a Lockstep shard: no {MANIFEST_KEY} in the metadata")
    manifest = Manifest.from_json(view.metadata[MANIFEST_KEY])
    manifest.check_entries(view.entries)
    return manifest, view


def verify_shard_tensors(manifest: Manifest, tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Names of tensors whose sha256 (the audit digest) differs from the manifest's."""
    bad = []
    for name, info in manifest.tensors.items():
        raw = tensors.get(name)
        if raw is None or hashlib.sha256(raw.tobytes()).hexdigest() != info.sha256:
            bad.append(name)
    return bad


def load_shard(blob: bytes | bytearray | memoryview | Any) -> StageProgram:
    """`load_stage_program` of a shard blob, zero-copy for F32 weights, with the tokenizer a
    stage-0 blob carries (`shardformat.text`)."""
    manifest, view = read_shard(blob)
    program = load_stage_program(manifest, view.tensors)
    program.text = TextSpec.from_metadata(view.metadata)
    return program


# --- reference executor ------------------------------------------------------------------


class ReferenceExecutor:
    """The whole model in one process: the oracle stage-by-stage execution is checked against.

    `tensors` maps Hugging Face names to arrays (a checkpoint reader, seeded weights, or a
    dict). With `layout` (e.g. `plan_layout(cfg, plan)`) it runs the plan's pieces and TP
    ranks in the same order as the pipeline and is bit-identical to it; without, it runs whole
    ops, which a plan cut only between whole ops at TP=1 matches bit for bit.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tensors: Mapping[str, np.ndarray],
        *,
        max_batch: int = 1,
        max_context: int | None = None,
        layout: Sequence[PieceSpec] | None = None,
    ) -> None:
        pin_blas_threads()
        self.cfg = cfg
        self.serving = Serving(max_batch, max_context or cfg.max_position_embeddings)
        shapes = checkpoint_tensor_shapes(cfg)
        full: dict[str, np.ndarray] = {}

        def get(ts: TensorSlice) -> np.ndarray:
            if ts.source not in full:
                array = tensors[ts.source]
                if tuple(array.shape) != shapes[ts.source]:
                    raise ExecutionError(
                        f"tensor {ts.source} has shape {list(array.shape)}, "
                        f"the model needs {list(shapes[ts.source])}"
                    )
                full[ts.source] = as_f32(array)
            return np.ascontiguousarray(ts.take(full[ts.source]))

        rope = model_rope_table(cfg, self.serving.max_context)
        specs = list(layout) if layout is not None else whole_layout(cfg)
        self.pieces = [
            _Piece(
                s, [_build_part(cfg, s, r, get, self.serving, rope) for r in range(len(s.ranks))]
            )
            for s in specs
        ]

    def step(self, batch: Activation) -> Activation:
        return _run_pieces(self.pieces, batch, self.cfg, self.serving)

    def prefill(self, tokens: Sequence[int], slot: int = 0, start: int = 0) -> np.ndarray:
        """Logits `[len(tokens), vocab]` of a prompt placed at positions `start…` of `slot`."""
        n = len(tokens)
        return self.step(
            Activation.for_tokens([slot] * n, range(start, start + n), tokens)
        ).require_logits()

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]
    ) -> np.ndarray:
        """Logits of one step for rows `(slot, position, token)`."""
        return self.step(Activation.for_tokens(slots, positions, tokens)).require_logits()

    def generate(
        self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = GREEDY, slot: int = 0
    ) -> Generation:
        return generate(self.step, [Request(tuple(prompt), max_new_tokens, sampling, slot)])[0]
