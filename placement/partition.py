"""Partitioner: cut the op list into contiguous pipeline stages, one TP group each.

The problem, for a fixed tensor-parallel width t: split the sequence of op chunks into the
fewest contiguous stages whose per-chip SRAM fits, and among those splits the one whose slowest
stage is fastest. Both stage costs (bytes, time) are sums over the stage's chunks, so a
sub-range of a feasible stage is feasible, and therefore:

* greedy packing (extend each stage as far as it fits) gives the fewest stages, and
* for a time bound T, greedy packing under both limits gives the fewest stages whose stages all
  take at most T; the smallest T for which that count is still the minimum is the optimal
  bottleneck. Times are integers (picoseconds), so a binary search over T is exact.

Each greedy step is a bisection on prefix sums: O(stages x log chunks) per probe.
`tests/test_partition.py` checks optimality against exhaustive search on small instances.

Ops too large for one chip at width t are cut into chunks along heads, columns or vocabulary
rows (`models.chunk_limits`), small enough (usable SRAM / `max_chunks_per_chip`) that packing
wastes little; a stage boundary may then fall inside an op. A chunk is charged what its busiest
TP rank holds: ceil(units / t) of its units (the layout splits a chunk's units among the ranks,
the first ones taking one more) plus a copy of the norm weights.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from placement.cost import Workload, chip_workspace_bytes, op_sram_bytes, op_time_ps
from placement.errors import Unplaceable
from placement.models import ModelConfig, Op, chunk_limits, split_width
from placement.profiles import ChipProfile

TP_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class ChunkTable:
    """The op list cut into chunks at one TP width, with prefix sums of bytes and time."""

    tp: int
    capacity: int  # per-chip bytes available to op chunks
    op_index: list[int]  # base op of each chunk
    chunk_index: list[int]  # index of the chunk within its op
    chunk_count: list[int]  # chunks of the base op of each chunk
    prefix_bytes: list[int]  # len n + 1
    prefix_time: list[int]  # len n + 1

    @property
    def size(self) -> int:
        return len(self.op_index)

    def segment_bytes(self, start: int, end: int) -> int:
        return self.prefix_bytes[end] - self.prefix_bytes[start]

    def segment_time(self, start: int, end: int) -> int:
        return self.prefix_time[end] - self.prefix_time[start]


def build_chunk_table(
    ops: Sequence[Op], cfg: ModelConfig, profile: ChipProfile, work: Workload, tp: int
) -> ChunkTable:
    """Size every op at width `tp` and cut the large ones into chunks.

    Raises `Unplaceable` when a chunk that cannot be cut further still exceeds a chip.
    """
    capacity = profile.usable_sram_bytes - chip_workspace_bytes(cfg, work)
    if capacity <= 0:
        raise Unplaceable(
            f"the per-chip activation workspace ({chip_workspace_bytes(cfg, work):,} bytes for "
            f"maxBatch {work.max_batch}) exceeds usable SRAM ({profile.usable_sram_bytes:,})"
        )
    limits = chunk_limits(cfg)
    target = max(1, capacity // profile.max_chunks_per_chip)
    split_bytes = np.array(
        [op_sram_bytes(op, 1, cfg, work) - op.replicated_bytes for op in ops], dtype=np.int64
    )
    replicated = np.array([op.replicated_bytes for op in ops], dtype=np.int64)
    op_time = np.array([op_time_ps(op, tp, cfg, profile, work) for op in ops], dtype=np.int64)
    widths = np.array([split_width(cfg, op.kind) for op in ops], dtype=np.int64)
    # At least `tp` units per chunk where the op has them, so every rank holds a share.
    max_chunks = np.minimum(
        np.array([limits[op.kind] for op in ops], dtype=np.int64), np.maximum(1, widths // tp)
    )
    counts = np.clip(-(-split_bytes // (target * tp)), 1, max_chunks)
    owner = np.repeat(np.arange(len(ops)), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    within = np.arange(int(counts.sum())) - np.repeat(starts, counts)
    c, w = counts[owner], widths[owner]
    units = w // c + (within < w % c)
    # A chunk's units are shared among the TP ranks, the first ones taking one more: the
    # busiest rank holds ceil(units / tp) of them, plus a copy of the norm weights.
    rank_units = -(-units // tp)
    chunk_bytes = replicated[owner] + -(-(split_bytes[owner] * rank_units) // w)
    chunk_time = -(-(op_time[owner] * tp * rank_units) // w)
    too_big = np.nonzero(chunk_bytes > capacity)[0]
    if too_big.size:
        first = int(too_big[0])
        op = ops[int(owner[first])]
        raise Unplaceable(
            f"op {op.name} needs {int(chunk_bytes[first]):,} bytes per chip even cut into "
            f"{int(c[first])} pieces at tensorParallel {tp}; a chip has {capacity:,} usable"
        )
    return ChunkTable(
        tp=tp,
        capacity=capacity,
        op_index=owner.tolist(),
        chunk_index=within.tolist(),
        chunk_count=c.tolist(),
        prefix_bytes=np.concatenate(([0], np.cumsum(chunk_bytes))).tolist(),
        prefix_time=np.concatenate(([0], np.cumsum(chunk_time))).tolist(),
    )


def greedy_cuts(
    prefix_bytes: Sequence[int],
    prefix_time: Sequence[int],
    capacity: int,
    time_bound: int | None = None,
    stop_after: int | None = None,
) -> list[int] | None:
    """Stage end positions of greedy packing; None if some single chunk breaks a limit.

    Stops early (returning what it has) once more than `stop_after` stages are needed.
    """
    n = len(prefix_bytes) - 1
    cuts: list[int] = []
    start = 0
    while start < n:
        end = bisect_right(prefix_bytes, prefix_bytes[start] + capacity) - 1
        if time_bound is not None:
            end = min(end, bisect_right(prefix_time, prefix_time[start] + time_bound) - 1)
        if end <= start:
            return None
        cuts.append(end)
        if stop_after is not None and len(cuts) > stop_after:
            return cuts
        start = end
    return cuts


@dataclass(frozen=True)
class Partition:
    """Stage boundaries over a chunk table: stage i covers chunks [bounds[i], bounds[i+1])."""

    table: ChunkTable
    bounds: tuple[int, ...]

    @property
    def stage_count(self) -> int:
        return len(self.bounds) - 1

    def stage_bytes(self, i: int) -> int:
        return self.table.segment_bytes(self.bounds[i], self.bounds[i + 1])

    def stage_time_ps(self, i: int) -> int:
        return self.table.segment_time(self.bounds[i], self.bounds[i + 1])

    @property
    def bottleneck_ps(self) -> int:
        return max(self.stage_time_ps(i) for i in range(self.stage_count))


def min_stage_count(table: ChunkTable) -> int:
    cuts = greedy_cuts(table.prefix_bytes, table.prefix_time, table.capacity)
    assert cuts is not None  # build_chunk_table guarantees every chunk fits a chip
    return len(cuts)


def optimal_partition(table: ChunkTable, stages: int | None = None) -> Partition:
    """Fewest stages that fit (or exactly `stages`, if at least the fewest and at most one
    chunk each), with the smallest bottleneck."""
    k = min_stage_count(table) if stages is None else stages
    bound = optimal_bottleneck(table.prefix_bytes, table.prefix_time, table.capacity, k)
    cuts = greedy_cuts(table.prefix_bytes, table.prefix_time, table.capacity, bound)
    assert cuts is not None and len(cuts) <= k
    return Partition(table, _split_to(table, [0, *cuts], k))


def _split_to(table: ChunkTable, bounds: list[int], stages: int) -> tuple[int, ...]:
    """Split stages until there are `stages` of them; never raises the bottleneck.

    Greedy packing under the optimal bound may use fewer stages than asked for; each split
    halves (by time) the slowest stage that still has two chunks, so every piece fits and is
    no slower than the stage it came from. Deterministic: ties go to the earliest stage.
    """
    bounds = list(bounds)
    while len(bounds) - 1 < stages:
        splittable = [i for i in range(len(bounds) - 1) if bounds[i + 1] - bounds[i] >= 2]
        if not splittable:
            break
        i = max(splittable, key=lambda j: (table.segment_time(bounds[j], bounds[j + 1]), -j))
        start, end = bounds[i], bounds[i + 1]
        middle = (table.prefix_time[start] + table.prefix_time[end]) // 2
        cut = min(max(bisect_right(table.prefix_time, middle, start, end), start + 1), end - 1)
        bounds.insert(i + 1, cut)
    return tuple(bounds)


def optimal_bottleneck(
    prefix_bytes: Sequence[int], prefix_time: Sequence[int], capacity: int, stages: int
) -> int:
    """Smallest T such that the chunks split into at most `stages` fitting stages of time <= T."""
    n = len(prefix_time) - 1
    lo = max(prefix_time[i + 1] - prefix_time[i] for i in range(n))
    hi = prefix_time[n]
    while lo < hi:
        mid = (lo + hi) // 2
        cuts = greedy_cuts(prefix_bytes, prefix_time, capacity, mid, stop_after=stages)
        if cuts is not None and len(cuts) <= stages:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class TPChoice:
    tp: int
    table: ChunkTable
    stages: int

    @property
    def chips(self) -> int:
        return self.tp * self.stages


def ranked_partitions(
    ops: Sequence[Op],
    cfg: ModelConfig,
    profile: ChipProfile,
    work: Workload,
    tensor_parallel: int | None,
    pipeline_stages: int | None = None,
) -> Iterator[Partition]:
    """Optimal partitions for each feasible TP width, best first: fewest chips, then the
    smallest bottleneck. The mapper takes the first one the topology can hold.

    `pipeline_stages` asks for exactly that many stages (more stages than the fewest that fit
    shorten the slowest stage); widths that cannot give that many are skipped. Raises
    `Unplaceable` with every width's reason when none is feasible.
    """
    if tensor_parallel and tensor_parallel > profile.chips_per_node:
        raise Unplaceable(
            f"tensorParallel {tensor_parallel} needs {tensor_parallel} chips in one node; "
            f"profile {profile.name} has {profile.chips_per_node} chips per node"
        )
    widths = (
        [tensor_parallel]
        if tensor_parallel
        else [t for t in TP_WIDTHS if t <= profile.chips_per_node]
    )
    choices: list[TPChoice] = []
    reasons: list[str] = []
    for tp in widths:
        try:
            table = build_chunk_table(ops, cfg, profile, work, tp)
        except Unplaceable as exc:
            reasons.append(str(exc))
            continue
        fewest_stages = min_stage_count(table)
        if pipeline_stages is None:
            choices.append(TPChoice(tp, table, fewest_stages))
        elif not fewest_stages <= pipeline_stages <= table.size:
            reasons.append(
                f"pipelineStages {pipeline_stages} at tensorParallel {tp}: needs at least "
                f"{fewest_stages} stages to fit and at most {table.size} (one op chunk each)"
            )
        else:
            choices.append(TPChoice(tp, table, pipeline_stages))
    if not choices:
        raise Unplaceable("; ".join(reasons))
    for chips in sorted({c.chips for c in choices}):
        same = [optimal_partition(c.table, c.stages) for c in choices if c.chips == chips]
        yield from sorted(same, key=lambda p: p.bottleneck_ps)


def lower_bound_chips(total_bytes: int, usable_per_chip: int) -> int:
    return max(1, math.ceil(total_bytes / usable_per_chip))
