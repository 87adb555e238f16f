"""Deterministic executor: stage-by-stage runs against the single-process reference.

Guarantees checked here (agents/executor.py documents them):
* whole-op stage boundaries, TP=1: bit-identical tokens and logits to `ReferenceExecutor`;
* chunk cuts inside ops and TP>1: bit-identical to the reference run with the plan's layout,
  and within `CHUNKED_LOGITS_RTOL` of the whole-model reference;
* a row's bits do not depend on the batch it shares, nor on prefill vs token-by-token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agents.activation import ACTIVATION_KEY, Activation
from agents.blas_threads import pin_blas_threads
from agents.executor import (
    CHUNKED_LOGITS_RTOL,
    ReferenceExecutor,
    Stepper,
    TensorParallelGroup,
    load_shard,
    run_pipeline,
)
from agents.kernels import attend, rms_norm, route
from agents.sampling import Request, Sampling, generate, sample_token
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS, ModelConfig, build_ops
from placement.plan import OpCut, Plan, StagePlan
from placement.planner import PlanRequest, make_plan
from placement.topology import preset_topology
from shardformat.codec import encode_safetensors
from shardformat.errors import ExecutionError
from shardformat.layout import checkpoint_tensor_shapes, plan_layout

TINY = MODEL_PRESETS["tiny-llama"]
MOE = ModelConfig(
    "tiny-mixtral",
    512,
    128,
    256,
    2,
    4,
    2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)
SEED = 21
PROMPT = (5, 17, 1024, 3, 4000, 77, 9)
Step = Callable[[Activation], Activation]


def make(cfg: ModelConfig, tp: int | None, racks: int = 2, max_batch: int = 4) -> Plan:
    request = PlanRequest(
        cfg.name,
        cfg,
        "fp16",
        replicas=1,
        max_context=64,
        max_batch=max_batch,
        tensor_parallel=tp,
        spread="none",
        spares_per_rack=0,
    )
    return make_plan(request, preset_topology(racks, "dev"))


def custom_plan(cfg: ModelConfig, starts: Sequence[tuple[int, int, int]], tp: int = 1) -> Plan:
    """A hand-cut plan: besides the first, stages start at `(op, chunk, chunks)`."""
    ops = build_ops(cfg, "fp16")
    begins = [(0, 0, 1), *starts]
    ends = []
    for (op, chunk, chunks), before in zip(starts, begins, strict=False):
        if chunk:
            ends.append((op, chunk - 1, chunks))
        elif before[0] == op - 1:
            ends.append((op - 1, before[2] - 1, before[2]))
        else:
            ends.append((op - 1, 0, 1))
    ends.append((len(ops) - 1, 0, 1))
    stages = tuple(
        StagePlan(
            0,
            i,
            OpCut(b[0], ops[b[0]].name, b[1], b[2]),
            OpCut(e[0], ops[e[0]].name, e[1], e[2]),
            tuple(f"rack-0/node-{i}/chip-{r}" for r in range(tp)),
            64 << 20,  # declared SRAM: compile_plan checks a shard fits what its plan charged
            128 << 20,
            0.0,
            0,
        )
        for i, (b, e) in enumerate(zip(begins, ends, strict=True))
    )
    return replace(
        make(cfg, 1), stages=stages, pipeline_stages=len(stages), replicas=1, tensor_parallel=tp
    )


def pipeline(plan: Plan, refs: Sequence[ShardRef]) -> Step:
    """Load every chip's shard of replica 0 and chain the stages, activations as bytes."""
    stages: list[Stepper] = []
    for stage in plan.replica_stages(0):
        programs = [
            load_shard(r.path.read_bytes())
            for r in refs
            if r.binding.replica == 0 and r.binding.stage == stage.index
        ]
        stages.append(programs[0] if len(programs) == 1 else TensorParallelGroup(programs))
    return lambda batch: run_pipeline(stages, batch, via_bytes=True)


@functools.cache
def weights(cfg: ModelConfig) -> SeededWeights:
    return SeededWeights(cfg, SEED, "F16")  # keeps the tensors it generated (tiny models)


def compiled(plan: Plan, cfg: ModelConfig, tmp_path: Path) -> Step:
    return pipeline(plan, compile_plan(plan, cfg, weights(cfg), tmp_path))


def reference(cfg: ModelConfig, plan: Plan | None = None) -> ReferenceExecutor:
    layout = plan_layout(cfg, plan) if plan is not None else None
    return ReferenceExecutor(cfg, weights(cfg), max_batch=4, max_context=64, layout=layout)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


GREEDY = Request(PROMPT, 5)
SAMPLED = Request(PROMPT, 5, Sampling(temperature=0.9, seed=1234))


def test_whole_op_stages_are_bit_identical_to_the_reference(tmp_path: Path) -> None:
    last = len(build_ops(TINY, "fp16")) - 1
    # After the embedding, between attention and MLP, …, before the LM head.
    plan = custom_plan(TINY, [(c, 0, 1) for c in (1, 4, 9, 12, last)])
    step = compiled(plan, TINY, tmp_path)
    ref = reference(TINY)
    for request in (GREEDY, SAMPLED):
        ours, theirs = generate(step, [request])[0], generate(ref.step, [request])[0]
        assert ours.tokens == theirs.tokens
        assert same_bits(ours.logits, theirs.logits)
        assert same_bits(ours.final_logits, theirs.final_logits)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_chunked_and_tp_plans(tp: int, tmp_path: Path) -> None:
    plan = make(TINY, tp, max_batch=2)  # sizes whose stage boundaries fall inside ops
    assert any(s.first.chunk or s.last.chunk < s.last.chunks - 1 for s in plan.stages)
    step = compiled(plan, TINY, tmp_path)
    # Exact: the reference summing the same pieces in the same order.
    ours = generate(step, [GREEDY, replace(SAMPLED, slot=1)])
    exact = generate(reference(TINY, plan).step, [GREEDY, replace(SAMPLED, slot=1)])
    for a, b in zip(ours, exact, strict=True):
        assert a.tokens == b.tokens and same_bits(a.logits, b.logits)
    # Within tolerance of the whole-model reference, teacher-forced on the same tokens.
    sequence = PROMPT + exact[0].tokens
    rows = Activation.for_tokens([0] * len(sequence), range(len(sequence)), sequence)
    whole = reference(TINY).step(rows).logits
    assert whole is not None
    assert rel_err(step(rows).logits, whole) < CHUNKED_LOGITS_RTOL  # type: ignore[arg-type]
    assert generate(reference(TINY).step, [GREEDY])[0].tokens == ours[0].tokens


def test_batch_composition_does_not_change_bits(tmp_path: Path) -> None:
    step = compiled(make(TINY, 2), TINY, tmp_path)
    requests = [
        Request((1, 2, 3), 4, slot=2),
        Request(PROMPT, 3, slot=0),
        Request((4095, 0, 8, 8, 8), 5, Sampling(1.0, 9), slot=3),
    ]
    together = generate(step, requests)
    for request, got in zip(requests, together, strict=True):
        alone = generate(step, [replace(request, slot=1)])[0]
        assert alone.tokens == got.tokens and same_bits(alone.logits, got.logits)
    ref = reference(TINY)
    for request, got in zip(requests, generate(ref.step, requests), strict=True):
        assert same_bits(generate(ref.step, [replace(request, slot=0)])[0].logits, got.logits)


def test_prefill_equals_token_by_token() -> None:
    ref = reference(TINY)
    at_once = ref.prefill(PROMPT, slot=1)
    singly = [ref.decode([t], [p], [2]) for p, t in enumerate(PROMPT)]
    assert all(same_bits(at_once[p], row[0]) for p, row in enumerate(singly))
    halves = np.concatenate([ref.prefill(PROMPT[:3], slot=3), ref.prefill(PROMPT[3:], 3, 3)])
    assert same_bits(at_once, halves)


@pytest.mark.parametrize("tp", [1, 2])
def test_moe_plans(tp: int, tmp_path: Path) -> None:
    plan = make(MOE, tp, racks=1)
    step = compiled(plan, MOE, tmp_path)
    request = Request((1, 2, 3, 500, 7), 6, Sampling(0.7, 3))
    ours = generate(step, [request])[0]
    exact = generate(reference(MOE, plan).step, [request])[0]
    assert ours.tokens == exact.tokens and same_bits(ours.logits, exact.logits)
    whole = generate(reference(MOE).step, [request])[0]
    assert rel_err(ours.logits, whole.logits) < CHUNKED_LOGITS_RTOL


MOE_STARTS = {
    # ops: 0 embed, 1 attention, 2 router, 3-6 experts, 7 attention, 8 router, 9-12 experts, …
    "whole-ops": ([(3, 0, 1), (5, 0, 1), (8, 0, 1), (13, 0, 1)], 1),
    "inside-experts": ([(3, 0, 1), (5, 0, 1), (6, 1, 2), (10, 2, 3), (14, 0, 1)], 1),
    "inside-experts-tp2": ([(2, 0, 1), (4, 1, 2), (11, 0, 1)], 2),
}


@pytest.mark.parametrize("case", MOE_STARTS)
def test_moe_stage_boundaries_between_and_inside_experts(case: str, tmp_path: Path) -> None:
    starts, tp = MOE_STARTS[case]
    plan = custom_plan(MOE, starts, tp)
    request = Request((1, 2, 3, 500, 7), 6, Sampling(0.7, 3))
    ours = generate(compiled(plan, MOE, tmp_path), [request])[0]
    exact = generate(reference(MOE, plan).step, [request])[0]
    whole = generate(reference(MOE).step, [request])[0]
    assert ours.tokens == exact.tokens and same_bits(ours.logits, exact.logits)
    if case == "whole-ops":
        assert same_bits(ours.logits, whole.logits)
    assert rel_err(ours.logits, whole.logits) < CHUNKED_LOGITS_RTOL


# --- attention cut between the query heads of one KV group ----------------------------------

GQA4 = ModelConfig("tiny-gqa4", 512, 128, 256, 2, 8, 2, max_position_embeddings=512)
"""Two KV heads of four query heads each: room for cuts at every head inside a group."""

QHEAD_STARTS = {
    # tiny-llama: 8 query heads, 4 KV heads (groups of 2). 8 chunks: one per query head; 6
    # chunks: groups 0 and 1 in two, groups 2 and 3 whole (`models.chunk_units`).
    "tiny-inside-group": (TINY, [(1, 3, 8)], 1),
    "tiny-inside-group-tp2": (TINY, [(1, 3, 8), (3, 1, 6)], 2),
    # ops: 0 embed, 1 attention, 2 mlp, 3 attention, … Stage 1 holds heads 1-5 of layer 0.
    "gqa4-inside-groups": (GQA4, [(1, 1, 8), (1, 6, 8), (3, 3, 4)], 1),
    "gqa4-inside-groups-tp2": (GQA4, [(1, 1, 8), (1, 6, 8), (3, 3, 4)], 2),
}


@pytest.mark.parametrize("case", QHEAD_STARTS)
def test_query_head_cuts_inside_kv_groups(case: str, tmp_path: Path) -> None:
    """Stages (and TP ranks) holding part of a KV group each project and cache that KV head:
    bit-identical to the reference with the plan's layout, and within tolerance of the whole
    model."""
    cfg, starts, tp = QHEAD_STARTS[case]
    plan = custom_plan(cfg, starts, tp)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    pieces = [p for p in plan_layout(cfg, plan) if p.kind == "attention"]
    assert any(p.start % group or p.end % group for p in pieces)  # a group is cut
    if tp > 1:  # and a rank holds only part of a group
        assert any(a % group or b % group for p in pieces for a, b in p.ranks)
    request = Request((1, 2, 3, 400, 7, 9), 6, Sampling(0.8, 5))
    step = compiled(plan, cfg, tmp_path)
    ours = generate(step, [request, replace(GREEDY, prompt=(4, 5, 6), slot=1)])
    exact = generate(
        reference(cfg, plan).step, [request, replace(GREEDY, prompt=(4, 5, 6), slot=1)]
    )
    for a, b in zip(ours, exact, strict=True):
        assert a.tokens == b.tokens and same_bits(a.logits, b.logits)
    whole = generate(reference(cfg).step, [request])[0]
    assert rel_err(ours[0].logits, whole.logits) < CHUNKED_LOGITS_RTOL


# --- an independent float64 implementation, to check the semantics themselves --------------


def naive_logits(
    cfg: ModelConfig, weights: Mapping[str, np.ndarray], tokens: Sequence[int]
) -> np.ndarray:
    """Llama/Mixtral forward over a whole sequence in float64 (HF conventions)."""
    w = {k: np.asarray(weights[k], np.float64) for k in checkpoint_tensor_shapes(cfg)}
    lm = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    n, hd, heads, kvh = len(tokens), cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    angles = np.outer(np.arange(n), 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(np.tile(angles, 2))[:, None], np.sin(np.tile(angles, 2))[:, None]

    def rope(t: np.ndarray) -> np.ndarray:
        return t * cos + np.concatenate([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    def norm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps)

    def softmax(s: np.ndarray) -> np.ndarray:
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def swiglu(h: np.ndarray, g: np.ndarray, u: np.ndarray, d: np.ndarray) -> np.ndarray:
        a = h @ g.T
        return (a / (1 + np.exp(-a)) * (h @ u.T)) @ d.T

    x = w["model.embed_tokens.weight"][list(tokens)]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kvh, hd))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kvh, hd)
        k, v = np.repeat(k, heads // kvh, 1), np.repeat(v, heads // kvh, 1)
        probs = softmax(np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal)
        x = (
            x
            + np.einsum("hts,shd->thd", probs, v).reshape(n, -1)
            @ w[p + "self_attn.o_proj.weight"].T
        )
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        if not cfg.is_moe:
            x = x + swiglu(h, *(w[p + f"mlp.{m}_proj.weight"] for m in ("gate", "up", "down")))
            continue
        probs = softmax(h @ w[p + "block_sparse_moe.gate.weight"].T)
        for row in range(n):
            top = np.argsort(-probs[row])[: cfg.num_experts_per_tok]
            for e in top:
                ep = f"{p}block_sparse_moe.experts.{e}."
                y = swiglu(h[row], w[ep + "w1.weight"], w[ep + "w3.weight"], w[ep + "w2.weight"])
                x[row] += probs[row, e] / probs[row, top].sum() * y
    return norm(x, w["model.norm.weight"]) @ lm.T


@pytest.mark.parametrize("cfg", [TINY, MOE], ids=["llama", "mixtral"])
def test_reference_matches_float64_semantics(cfg: ModelConfig) -> None:
    tokens = (3, 1, 4, 1, 5, 9, 2, 6)
    ours = reference(cfg).prefill(tokens)
    assert rel_err(ours, naive_logits(cfg, weights(cfg), tokens)) < 1e-4


# --- activation wire format ---------------------------------------------------------------

WEIRD_FLOATS = hnp.from_dtype(
    np.dtype(np.float32), allow_nan=True, allow_infinity=True, allow_subnormal=True
)


@st.composite
def activations(draw: st.DrawFn) -> Activation:
    rows = draw(st.integers(0, 4))
    ints = hnp.arrays(np.int32, rows, elements=st.integers(-(2**31), 2**31 - 1))

    def maybe(
        shape: tuple[int, ...], elements: st.SearchStrategy[float] = WEIRD_FLOATS
    ) -> np.ndarray | None:
        return draw(st.none() | hnp.arrays(np.float32, shape, elements=elements))

    ids = draw(st.none() | hnp.arrays(np.int32, (rows, 2), elements=st.integers(0, 7)))
    return Activation(
        draw(ints),
        draw(ints),
        draw(ints),
        maybe((rows, 6)),
        maybe((rows, 6)),
        ids,
        maybe((rows, 2)),
        maybe((rows, draw(st.integers(0, 5)))),
        (draw(st.integers(0, 1000)), draw(st.integers(0, 200))),
    )


@settings(max_examples=60, deadline=None)
@given(activations())
def test_activation_round_trips_bit_exactly(act: Activation) -> None:
    data = act.to_bytes()
    back = Activation.from_bytes(data)
    assert back.cursor == act.cursor
    for name in (
        "slots",
        "positions",
        "tokens",
        "hidden",
        "partial",
        "route_ids",
        "route_weights",
        "logits",
    ):
        a, b = getattr(act, name), getattr(back, name)
        assert (a is None and b is None) or same_bits(a, b), name
    assert back.to_bytes() == data


def test_activation_format_errors() -> None:
    act = Activation.for_tokens([0], [0], [1])
    with pytest.raises(ExecutionError, match="version 2"):
        Activation.from_bytes(
            encode_safetensors(
                {"slots": act.slots, "positions": act.positions, "tokens": act.tokens},
                {ACTIVATION_KEY: '{"version": 2, "cursor": [0, 0]}'},
            )
        )
    with pytest.raises(ExecutionError, match="not a safetensors blob"):
        Activation.from_bytes(b"\xff" * 12)
    with pytest.raises(ExecutionError, match="rows"):
        Activation.from_bytes(
            encode_safetensors(
                {"slots": act.slots, "positions": act.positions, "tokens": np.zeros(2, np.int32)},
                {ACTIVATION_KEY: '{"version": 1, "cursor": [0, 0]}'},
            )
        )


# --- misuse is a clear error ------------------------------------------------------------------


def test_stage_and_batch_errors(tmp_path: Path) -> None:
    plan = make(TINY, 2)
    refs = compile_plan(plan, TINY, SEED, tmp_path)
    ranks = [load_shard(r.path.read_bytes()) for r in refs if r.binding.stage == 1]
    group = TensorParallelGroup(ranks)
    tokens = Activation.for_tokens([0], [0], [1])
    with pytest.raises(ExecutionError, match="TensorParallelGroup"):
        ranks[0].step(tokens)
    with pytest.raises(ExecutionError, match="stages out of order"):
        group.step(tokens)
    with pytest.raises(ExecutionError, match=r"ranks 0\.\.1"):
        TensorParallelGroup(ranks[:1] * 2)
    ref = reference(TINY)
    for rows, match in (
        (([4], [0], [1]), "slot 4 is outside"),
        (([0], [64], [1]), "position 64 is outside"),
        (([0], [0], [4096]), "token 4096"),
        (([0, 0], [3, 2], [1, 1]), "positions must increase"),
    ):
        with pytest.raises(ExecutionError, match=match):
            ref.step(Activation.for_tokens(*rows))


# --- kernels and sampling ---------------------------------------------------------------------


def test_kernels() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64).astype(np.float32)
    g = np.full(64, 2.0, np.float32)
    expected = 2 * x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-6)
    assert np.allclose(rms_norm(x, g, 1e-6), expected, rtol=1e-6)
    ids, weights = route(np.array([0.5, 3.0, 3.0, -1.0], np.float32), 2)
    assert ids.tolist() == [1, 2] and weights.tolist() == [0.5, 0.5]
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 8), (5, 8), (5, 8)))
    scores = q.astype(np.float64) @ k.T / np.sqrt(8)
    probs = np.exp(scores - scores.max(1, keepdims=True))
    want = (probs / probs.sum(1, keepdims=True)) @ v
    assert np.allclose(attend(q, k, v, np.float32(1 / np.sqrt(8))), want, atol=1e-6)


def test_sampling_is_seeded() -> None:
    logits = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    assert sample_token(logits, Sampling(), 3) == int(np.argmax(logits))
    draws = [sample_token(logits, Sampling(1.0, 5), i) for i in range(20)]
    assert draws == [sample_token(logits, Sampling(1.0, 5), i) for i in range(20)]
    assert draws != [sample_token(logits, Sampling(1.0, 6), i) for i in range(20)]
    assert len(set(draws)) > 10


def test_blas_is_single_threaded() -> None:
    assert pin_blas_threads() in (1, None)
