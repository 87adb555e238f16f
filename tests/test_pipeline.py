"""The lockstep pipeline in one process: stage runners, local links, journal and sampling.

tiny-llama is compiled for plans of 1, 2, 4 and 8 whole-op stages (TP = 1) and run through
`agents.pipeline` threads (each stage on its own thread, frames as bytes on `LocalLink`s).
The contract (DESIGN.md "Lockstep and determinism"): tokens and logits bit-identical to the
single-process reference; jittered links change nothing, chains included; TP plans are
identical across runs and within `CHUNKED_LOGITS_RTOL` of the whole-model reference (and bit-
identical to the reference run with the plan's layout); a request's tokens do not depend on
the requests sharing the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import wait_for

from agents.activation import Activation
from agents.executor import (
    CHUNKED_LOGITS_RTOL,
    ReferenceExecutor,
    Stepper,
    TensorParallelGroup,
    load_shard,
)
from agents.journal import JournalError, QueueFull
from agents.pipeline import StageRunner, local_ring, running
from agents.sampling import Sampling
from orchestrator.compiler import compile_plan
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS, build_ops
from placement.plan import OpCut, Plan
from placement.planner import PlanRequest, make_plan
from placement.topology import preset_topology
from shardformat.errors import ExecutionError
from shardformat.layout import plan_layout

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 21
MAX_BATCH, MAX_CONTEXT = 4, 64


@dataclass(frozen=True)
class Req:
    rid: str
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)


REQUESTS = (
    Req("greedy", (5, 17, 1024, 3, 4000, 77, 9), 6),
    Req("sampled", (11, 12, 13), 6, Sampling(0.9, 1234)),
    Req("short", (42,), 3),
)


@functools.cache
def weights() -> SeededWeights:
    return SeededWeights(TINY, SEED, "F16")


def tiny_plan(stages: int, tp: int = 1) -> Plan:
    request = PlanRequest(
        "pipe",
        TINY,
        "fp16",
        replicas=1,
        max_context=MAX_CONTEXT,
        max_batch=MAX_BATCH,
        tensor_parallel=tp,
        pipeline_stages=stages,
        spread="none",
        spares_per_rack=0,
    )
    return make_plan(request, preset_topology(1, "dev-whole-ops"))


@functools.cache
def shard_paths(stages: int, tp: int, store: Path) -> tuple[tuple[Path, ...], ...]:
    refs = compile_plan(tiny_plan(stages, tp), TINY, weights(), store)
    return tuple(
        tuple(r.path for r in sorted(refs, key=lambda r: r.binding.tp_rank) if r.binding.stage == s)
        for s in range(stages)
    )


def steppers(paths: Sequence[Sequence[Path]]) -> list[Stepper]:
    """Fresh stage programs (fresh KV caches) for every run."""
    out: list[Stepper] = []
    for ranks in paths:
        programs = [load_shard(p.read_bytes()) for p in ranks]
        out.append(programs[0] if len(programs) == 1 else TensorParallelGroup(programs))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline-store")


@dataclass
class Served:
    tokens: dict[str, tuple[int, ...]]
    logits: dict[str, np.ndarray]
    chains: list[list[tuple[int, bytes]]]


def serve(
    paths: Sequence[Sequence[Path]],
    requests: Sequence[Req],
    *,
    jitter_ms: float = 0.0,
    seed: int = 0,
    submit_before_start: bool = True,
) -> Served:
    """Run `requests` through a fresh in-process replica; wait until it is idle again."""
    runners = local_ring(
        steppers(paths),
        slots=MAX_BATCH,
        max_context=MAX_CONTEXT,
        vocab_size=TINY.vocab_size,
        jitter_ms=jitter_ms,
        seed=seed,
    )
    head = runners[0]
    streams = {}
    if submit_before_start:
        streams = {r.rid: head.submit(r.rid, r.prompt, r.max_tokens, r.sampling) for r in requests}
    with running(runners):
        if not submit_before_start:
            streams = {
                r.rid: head.submit(r.rid, r.prompt, r.max_tokens, r.sampling) for r in requests
            }
        tokens, logits = {}, {}
        for rid, stream in streams.items():
            outs = list(head.tokens(stream, timeout=60))
            assert all(o.error is None and o.event is not None for o in outs), outs[-1].error
            tokens[rid] = tuple(o.event.token for o in outs if o.event is not None)
            logits[rid] = np.stack([o.logits for o in outs if o.logits is not None])
        quiesce(runners)
        return Served(tokens, logits, [r.chain_log() for r in runners])


def quiesce(runners: Sequence[StageRunner]) -> None:
    """Wait until stage 0 stopped for lack of work and every stage drained its last frame:
    stage s then has completed exactly the ticks before stage 0's next tick + s."""

    def settled() -> bool:
        head = runners[0].machine.next_tick
        return all(r.machine.next_tick == head + i for i, r in enumerate(runners))

    wait_for(settled, timeout=30, what="the pipeline to drain")


def reference(plan: Plan | None = None) -> ReferenceExecutor:
    layout = plan_layout(TINY, plan) if plan is not None else None
    return ReferenceExecutor(
        TINY, weights(), max_batch=MAX_BATCH, max_context=MAX_CONTEXT, layout=layout
    )


@functools.cache
def expected(
    tp_stages: tuple[int, int] | None = None,
) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    """Each request run alone through a reference executor (whole model, or a plan's layout)."""
    out = {}
    for r in REQUESTS:
        ref = reference(tiny_plan(tp_stages[1], tp_stages[0]) if tp_stages else None)
        gen = ref.generate(r.prompt, r.max_tokens, r.sampling)
        out[r.rid] = (gen.tokens, gen.logits)
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.astype("<f4").tobytes() == b.astype("<f4").tobytes()


@pytest.mark.parametrize("stages", [1, 2, 4, 8])
def test_stages_are_bit_identical_to_the_reference(stages: int, store: Path) -> None:
    served = serve(shard_paths(stages, 1, store), REQUESTS)
    for rid, (tokens, logits) in expected().items():
        assert served.tokens[rid] == tokens, rid
        assert same_bits(served.logits[rid], logits), rid  # every step's logits, final included


def test_jittered_links_change_no_token_and_no_chain(store: Path) -> None:
    paths = shard_paths(4, 1, store)
    runs = [serve(paths, REQUESTS, jitter_ms=3.0, seed=seed) for seed in range(3)]
    for run in runs[1:]:
        assert run.tokens == runs[0].tokens
        assert run.chains == runs[0].chains  # every chip, every tick
    assert all(len(chain) > 10 for chain in runs[0].chains)
    assert runs[0].tokens == {rid: t for rid, (t, _) in expected().items()}


@pytest.mark.parametrize(("tp", "stages"), [(2, 2), (4, 1)])
def test_tensor_parallel_stages(tp: int, stages: int, store: Path) -> None:
    paths = shard_paths(stages, tp, store)
    first, second = serve(paths, REQUESTS), serve(paths, REQUESTS, jitter_ms=2.0, seed=7)
    assert first.tokens == second.tokens and first.chains == second.chains
    layout_ref = expected((tp, stages))
    whole = expected()
    for rid in first.tokens:
        assert first.tokens[rid] == layout_ref[rid][0]
        assert same_bits(first.logits[rid], layout_ref[rid][1])
        ours, theirs = first.logits[rid][0], whole[rid][1][0]  # first step: same inputs
        assert np.abs(ours - theirs).max() <= CHUNKED_LOGITS_RTOL * np.abs(theirs).max()


def query_head_plan(tp: int) -> Plan:
    """Three stages of tiny-llama (8 query heads, groups of 2) cut inside KV groups: stage 1
    starts at query head 3 of layer 0 (8 chunks, one per head), stage 2 at head 1 of layer 1
    (6 chunks: groups 0 and 1 in two). Each side of a cut holds the cut group's K/V."""
    base = tiny_plan(3, tp)
    ops = build_ops(TINY, "fp16")
    bounds = [
        ((0, 0, 1), (1, 2, 8)),
        ((1, 3, 8), (3, 0, 6)),
        ((3, 1, 6), (len(ops) - 1, 0, 1)),
    ]

    def cut(op: int, chunk: int, chunks: int) -> OpCut:
        return OpCut(op, ops[op].name, chunk, chunks)

    stages = tuple(
        replace(s, first=cut(*a), last=cut(*b), sram_bytes_per_chip=s.sram_capacity_bytes)
        for s, (a, b) in zip(base.stages, bounds, strict=True)
    )
    return replace(base, stages=stages)


@pytest.mark.parametrize("tp", [1, 2])
def test_query_head_cuts_are_bit_identical_to_the_plan_layout(tp: int, store: Path) -> None:
    plan = query_head_plan(tp)
    refs = compile_plan(plan, TINY, weights(), store)
    paths = [
        [r.path for r in sorted(refs, key=lambda r: r.binding.tp_rank) if r.binding.stage == s]
        for s in range(3)
    ]
    served = serve(paths, REQUESTS, jitter_ms=2.0, seed=3)
    for r in REQUESTS:
        want = reference(plan).generate(r.prompt, r.max_tokens, r.sampling)
        assert served.tokens[r.rid] == want.tokens, r.rid
        assert same_bits(served.logits[r.rid], want.logits), r.rid
        ours, theirs = served.logits[r.rid][0], expected()[r.rid][1][0]  # first step
        assert np.abs(ours - theirs).max() <= CHUNKED_LOGITS_RTOL * np.abs(theirs).max()


def test_sixteen_concurrent_requests_equal_their_solo_runs(store: Path) -> None:
    paths = shard_paths(2, 1, store)
    ref = reference()
    requests = [
        Req(
            f"r{i}",
            tuple((7 * i + j) % TINY.vocab_size for j in range(1 + i % 5)),
            2 + i % 4,
            Sampling(0.8, i) if i % 2 else Sampling(),
        )
        for i in range(16)
    ]
    served = serve(paths, requests, submit_before_start=False)
    for r in requests:
        solo = ref.generate(r.prompt, r.max_tokens, r.sampling)
        assert served.tokens[r.rid] == solo.tokens, r.rid
        assert same_bits(served.logits[r.rid], solo.logits), r.rid


def test_bad_requests_and_a_full_queue(store: Path) -> None:
    runners = local_ring(
        steppers(shard_paths(1, 1, store)),
        slots=2,
        max_context=MAX_CONTEXT,
        queue_limit=1,
        vocab_size=TINY.vocab_size,
    )
    head = runners[0]
    for prompt, max_tokens, match in [
        ((), 3, "empty"),
        ((1,) * 60, 10, "maxContext"),
        ((1, 2), 0, "max_tokens"),
        ((TINY.vocab_size,), 1, "vocabulary"),
    ]:
        with pytest.raises(JournalError, match=match):
            head.submit("bad", prompt, max_tokens)
    # two slots + one queued (nothing runs yet: the runners are not started)
    streams = [head.submit(f"ok{i}", (1, 2), 2) for i in range(3)]
    with pytest.raises(QueueFull):
        head.submit("one-too-many", (1, 2), 2)
    with pytest.raises(JournalError, match="already in flight"):
        head.submit("ok0", (1, 2), 2)
    with running(runners):
        for stream in streams:
            outs = list(head.tokens(stream, timeout=30))
            assert len(outs) == 2 and outs[-1].event is not None and outs[-1].event.finished
        quiesce(runners)
    assert head.status().error == ""


class FailingStepper:
    """A stage whose kernel fails at its `after`-th non-bubble step."""

    def __init__(self, inner: Stepper, after: int) -> None:
        self.inner, self.left = inner, after

    def step(self, batch: Activation) -> Activation:
        self.left -= 1
        if self.left < 0:
            raise ExecutionError("injected kernel fault")
        return self.inner.step(batch)


def test_a_stopped_stage_stops_the_ring_and_ends_requests_with_the_reason(store: Path) -> None:
    stages = steppers(shard_paths(4, 1, store))
    stages[2] = FailingStepper(stages[2], after=3)
    runners = local_ring(
        stages, slots=MAX_BATCH, max_context=MAX_CONTEXT, vocab_size=TINY.vocab_size
    )
    head = runners[0]
    stream = head.submit("doomed", (1, 2, 3), 10)
    with running(runners):
        outs = list(head.tokens(stream, timeout=30))
        assert outs[-1].error is not None and "stage 2" in outs[-1].error
        assert "injected kernel fault" in outs[-1].error
        wait_for(
            lambda: all(r.status().phase == "failed" for r in runners),
            timeout=10,
            what="every stage to stop",
        )
        with pytest.raises(JournalError, match="stopped"):
            head.submit("late", (1,), 1)


class RaisingStepper:
    """A stage whose step raises a TypeError (not an ExecutionError): a malformed payload."""

    def step(self, batch: Activation) -> Activation:
        raise TypeError("unsupported operand")


def test_an_exception_of_any_type_stops_the_stage_visibly(store: Path) -> None:
    stages = steppers(shard_paths(2, 1, store))
    stages[1] = RaisingStepper()
    runners = local_ring(
        stages, slots=MAX_BATCH, max_context=MAX_CONTEXT, vocab_size=TINY.vocab_size
    )
    head = runners[0]
    streams = [head.submit(f"r{i}", (1, 2, 3), 4) for i in range(6)]  # 4 slots, 2 queued
    with running(runners):
        for stream in streams:
            outs = list(head.tokens(stream, timeout=30))
            assert outs[-1].error is not None and "TypeError" in outs[-1].error
        status = runners[1].status()
        assert status.phase == "failed" and "TypeError: unsupported operand" in status.error
        assert runners[1]._thread.is_alive(), "the stage thread survives to report and close"
