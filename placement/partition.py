"""Partitioner: cut the op list into contiguous pipeline stages, one TP group each.

The problem, for a fixed tensor-parallel width t: split the sequence of op chunks into the
fewest contiguous stages whose per-chip SRAM fits, and among those splits the one whose slowest
stage is fastest. Both stage costs (bytes, time) are sums over the stage's chunks — plus, for a
stage that starts inside a KV group, that group's K/V again, charged to the group's first chunk
too — so a sub-range of a feasible stage is feasible, and therefore:

* greedy packing (extend each stage as far as it fits) gives the fewest stages, and
* for a time bound T, greedy packing under both limits gives the fewest stages whose stages all
  take at most T; the smallest T for which that count is still the minimum is the optimal
  bottleneck. Times are integers (picoseconds), so a binary search over T is exact.

Each greedy step is a bisection on prefix sums: O(stages x log chunks) per probe.
`tests/test_partition.py` checks optimality against exhaustive search on small instances.

Ops too large for one chip at width t are cut into chunks along query heads, columns or
vocabulary rows (`models.chunk_limits`), small enough (usable SRAM / `max_chunks_per_chip`)
that packing wastes little; a stage boundary may then fall inside an op. A chunk is charged
what its busiest TP rank holds: ceil(units / t) of its units (the layout splits a chunk's units
among the ranks, the first ones taking one more); the op's norm weights and row scales every
rank holds whole are charged once per stage (to the op's first chunk, or to a stage starting
inside the op).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from placement.cost import (
    Workload,
    chip_workspace_bytes,
    kv_group_bytes,
    op_sram_bytes,
    op_time_ps,
)
from placement.errors import Unplaceable
from placement.models import ModelConfig, Op, chunk_limits, split_width
from placement.profiles import ChipProfile

TP_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class ChunkTable:
    """The op list cut into chunks at one TP width, with prefix sums of bytes and time.

    `start_bytes[i]` / `start_time[i]` are what a stage starting at chunk i holds and spends
    beyond its chunks' sums: the norms and scales of an op it starts inside, and the K/V of a
    KV group whose first query heads the previous stage holds (`build_chunk_table`).

    For the greedy passes, which run in Python, two lists are precomputed: `byte_end[i]`, the
    end of the longest stage from chunk i that fits a chip, and `time_base[i]`, the time before
    chunk i less the start charge (a stage from i ends before the first chunk j with
    `prefix_time[j] > time_base[i] + T`). The rest stays in numpy.
    """

    tp: int
    capacity: int  # per-chip bytes available to op chunks
    op_index: np.ndarray  # base op of each chunk
    chunk_index: np.ndarray  # index of the chunk within its op
    chunk_count: np.ndarray  # chunks of the base op of each chunk
    prefix_bytes: np.ndarray  # len n + 1
    prefix_time: list[int]  # len n + 1
    start_bytes: np.ndarray  # len n
    start_time: np.ndarray  # len n
    byte_end: list[int]  # len n
    time_base: list[int]  # len n
    largest: int  # the chunk with the most bytes (start charge included)
    slowest_ps: int  # the longest time of a stage of one chunk

    @classmethod
    def of_chunks(
        cls,
        tp: int,
        capacity: int,
        chunk_bytes: np.ndarray,
        chunk_time: np.ndarray,
        start_bytes: np.ndarray,
        start_time: np.ndarray,
        op_index: np.ndarray | None = None,
        chunk_index: np.ndarray | None = None,
        chunk_count: np.ndarray | None = None,
    ) -> ChunkTable:
        """The table of chunks with these bytes, times and start charges (by default all
        chunks of one op)."""
        n = len(chunk_bytes)
        prefix_bytes = np.concatenate(([0], np.cumsum(chunk_bytes, dtype=np.int64)))
        prefix_time = np.concatenate(([0], np.cumsum(chunk_time, dtype=np.int64)))
        reach = prefix_bytes[:-1] + capacity - start_bytes
        return cls(
            tp=tp,
            capacity=capacity,
            op_index=np.zeros(n, dtype=np.int64) if op_index is None else op_index,
            chunk_index=np.arange(n) if chunk_index is None else chunk_index,
            chunk_count=np.full(n, n) if chunk_count is None else chunk_count,
            prefix_bytes=prefix_bytes,
            prefix_time=prefix_time.tolist(),
            start_bytes=start_bytes,
            start_time=start_time,
            byte_end=(np.searchsorted(prefix_bytes, reach, side="right") - 1).tolist(),
            time_base=(prefix_time[:-1] - start_time).tolist(),
            largest=int(np.argmax(chunk_bytes + start_bytes)) if n else 0,
            slowest_ps=int(np.max(chunk_time + start_time)) if n else 0,
        )

    @property
    def size(self) -> int:
        return len(self.op_index)

    def segment_bytes(self, start: int, end: int) -> int:
        return int(self.prefix_bytes[end] - self.prefix_bytes[start] + self.start_bytes[start])

    def segment_time(self, start: int, end: int) -> int:
        return self.prefix_time[end] - self.prefix_time[start] + int(self.start_time[start])

    def greedy(
        self, time_bound: int | None = None, stop_after: int | None = None
    ) -> list[int] | None:
        """`greedy_cuts` on this table, with the byte limit precomputed."""
        n = self.size
        byte_end, time_base, prefix_time = self.byte_end, self.time_base, self.prefix_time
        cuts: list[int] = []
        start = 0
        while start < n:
            end = byte_end[start]
            if time_bound is not None:
                end = bisect_right(prefix_time, time_base[start] + time_bound, start, end + 1) - 1
            if end <= start:
                return None
            cuts.append(end)
            if stop_after is not None and len(cuts) > stop_after:
                return cuts
            start = end
        return cuts


@dataclass(frozen=True)
class OpColumns:
    """Per-op figures that do not depend on the TP width, computed once for all widths.

    Ops of the same shape (every layer's attention, every expert, ...) are sized once: `kinds`
    holds one op per distinct shape and `shape_of` maps every op to it.
    """

    split_bytes: np.ndarray  # what the op's units hold at width 1 (all but `replicated`)
    replicated: np.ndarray  # what every chunk and rank holds whole
    widths: np.ndarray  # units along the cut dimension
    attention: np.ndarray  # is it attention
    kv_bytes: np.ndarray  # of `split_bytes`, the KV heads' (attention only)
    limits: np.ndarray  # the most chunks
    kinds: tuple[Op, ...]  # one op of each distinct shape
    shape_of: np.ndarray  # index into `kinds` of every op

    @classmethod
    def of(
        cls, ops: Sequence[Op], cfg: ModelConfig, profile: ChipProfile, work: Workload
    ) -> OpColumns:
        limits = chunk_limits(cfg, profile.mlp_cut_columns)
        index: dict[tuple[object, ...], int] = {}
        kinds: list[Op] = []
        shape_of = []
        for op in ops:
            key = (
                op.kind,
                op.param_bytes,
                op.kv_bytes_per_token,
                op.flops_per_token,
                op.context_flops_per_position,
                op.replicated_bytes,
                op.kv_window,
                op.kv_param_bytes,
            )
            if key not in index:
                index[key] = len(kinds)
                kinds.append(op)
            shape_of.append(index[key])
        at = np.array(shape_of, dtype=np.int64)

        def column(values: list[int] | list[bool], dtype: type = np.int64) -> np.ndarray:
            return np.array(values, dtype=dtype)[at]

        replicated = column([op.replicated_bytes for op in kinds])
        return cls(
            split_bytes=column([op_sram_bytes(op, 1, cfg, work) for op in kinds]) - replicated,
            replicated=replicated,
            widths=column([split_width(cfg, op.kind) for op in kinds]),
            attention=column([op.kind == "attention" for op in kinds], bool),
            kv_bytes=column([kv_group_bytes(op, cfg, work) for op in kinds]),
            limits=column([limits[op.kind] for op in kinds]),
            kinds=tuple(kinds),
            shape_of=at,
        )

    def op_time(
        self, tp: int, cfg: ModelConfig, profile: ChipProfile, work: Workload
    ) -> np.ndarray:
        """`op_time_ps` of every op at width `tp`."""
        times = [op_time_ps(op, tp, cfg, profile, work) for op in self.kinds]
        out: np.ndarray = np.array(times, dtype=np.int64)[self.shape_of]
        return out


def build_chunk_table(
    ops: Sequence[Op],
    cfg: ModelConfig,
    profile: ChipProfile,
    work: Workload,
    tp: int,
    columns: OpColumns | None = None,
    finest: bool = False,
) -> ChunkTable:
    """Size every op at width `tp` and cut the large ones into chunks.

    By default an op is cut into pieces of about usable SRAM / `max_chunks_per_chip`;
    `finest` cuts every op into the most pieces the layout supports (`models.chunk_limits`:
    one query head, `mlp_cut_columns` columns, 128 vocabulary rows), for `ranked_partitions`'
    second look at plans the default pieces leave over the target.

    An attention op cut into more chunks than it has KV heads is cut inside the KV groups
    (`models.chunk_units`): every group into the same number of query-head sub-chunks. Each
    chip holding a query head of a group holds the group's K/V projections and KV cache
    (`cost.kv_group_bytes`), so the group's first sub-chunk is charged them, and a stage that
    starts at a later sub-chunk is charged them again (`ChunkTable.start_bytes`). A stage's
    cost is then its chunks' sum plus that start charge, and still no smaller than the cost of
    any contiguous part of it — which keeps greedy packing optimal. Only at TP 1: with TP the
    ranks of a stage cut inside groups share its query heads out evenly and each would hold
    every group it touches whole (the layout and executor support it; the charge here would
    have to count each group once per rank), so at TP > 1 attention stays cut between whole
    KV groups, which the ranks share out.

    Raises `Unplaceable` when a chunk that cannot be cut further still exceeds a chip.
    """
    capacity = profile.usable_sram_bytes - chip_workspace_bytes(cfg, work)
    if capacity <= 0:
        raise Unplaceable(
            f"the per-chip activation workspace ({chip_workspace_bytes(cfg, work):,} bytes for "
            f"maxBatch {work.max_batch}) exceeds usable SRAM ({profile.usable_sram_bytes:,})"
        )
    target = 1 if finest else max(1, capacity // profile.max_chunks_per_chip)
    kv_heads = cfg.num_key_value_heads
    group = cfg.num_attention_heads // kv_heads
    col = columns or OpColumns.of(ops, cfg, profile, work)
    split_bytes, replicated, widths = col.split_bytes, col.replicated, col.widths
    attention, kv_bytes = col.attention, col.kv_bytes
    op_time = col.op_time(tp, cfg, profile, work)
    # At least `tp` units per chunk where the op has them, so every rank holds a share.
    max_chunks = np.minimum(col.limits, np.maximum(1, widths // tp))
    counts = np.clip(-(-split_bytes // (target * tp)), 1, max_chunks)
    # Attention cut inside the KV groups (at TP 1 only: with TP every rank would hold the
    # group's K/V whole), the same number of sub-chunks in every group.
    inside = attention & (counts > kv_heads) & (tp == 1)
    counts = np.where(attention & (tp > 1), np.minimum(counts, max(1, kv_heads // tp)), counts)
    counts = np.where(
        inside, np.minimum(-(-counts // kv_heads), max_chunks // kv_heads) * kv_heads, counts
    )
    owner = np.repeat(np.arange(len(ops)), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    within = np.arange(int(counts.sum())) - np.repeat(starts, counts)
    c, w = counts[owner], widths[owner]
    # Attention cut between whole KV groups is sized in KV heads (the ranks share those out).
    w = np.where(attention[owner] & ~inside[owner], kv_heads, w)
    units = w // c + (within < w % c)
    # A chunk's units are shared among the TP ranks, the first ones taking one more: the
    # busiest rank holds ceil(units / tp) of them, plus a copy of the norm weights.
    rank_units = -(-units // tp)
    # A stage holds one copy of an op's replicated bytes however many of its chunks it runs:
    # the op's first chunk is charged them, and so is a stage that starts at a later one.
    later = within > 0
    chunk_bytes = np.where(later, 0, replicated[owner]) + -(-(split_bytes[owner] * rank_units) // w)
    chunk_time = -(-(op_time[owner] * tp * rank_units) // w)
    start_bytes = np.where(later, replicated[owner], 0)
    start_time = np.zeros(len(owner), dtype=np.int64)
    cut = np.nonzero(inside[owner])[0]
    if cut.size:
        o = owner[cut]
        parts = c[cut] // kv_heads
        sub = within[cut] % parts
        heads = group // parts + (sub < group % parts)
        rank_heads = -(-heads // tp)
        first = sub == 0
        kv_share = -(-kv_bytes[o] // kv_heads)  # one KV group, held whole by every rank
        query_bytes = split_bytes[o] - kv_bytes[o]
        chunk_bytes[cut] = (
            np.where(later[cut], 0, replicated[o])
            + -(-(query_bytes * rank_heads) // cfg.num_attention_heads)
            + np.where(first, kv_share, 0)
        )
        start_bytes[cut] += np.where(first, 0, kv_share)
        # Time in the same proportions as bytes (weights and cache are what attention reads).
        single = op_time[o].astype(np.float64) * tp / np.maximum(1, split_bytes[o])
        kv_time = np.ceil(single * kv_bytes[o] / kv_heads).astype(np.int64)
        query_time = np.ceil(single * query_bytes * rank_heads / cfg.num_attention_heads)
        chunk_time[cut] = query_time.astype(np.int64) + np.where(first, kv_time, 0)
        start_time[cut] = np.where(first, 0, kv_time)
    too_big = np.nonzero(chunk_bytes + start_bytes > capacity)[0]
    if too_big.size:
        first_big = int(too_big[0])
        op = ops[int(owner[first_big])]
        raise Unplaceable(
            f"op {op.name} needs {int(chunk_bytes[first_big] + start_bytes[first_big]):,} bytes "
            f"per chip even cut into {int(c[first_big])} pieces at tensorParallel {tp}; a chip "
            f"has {capacity:,} usable"
        )
    return ChunkTable.of_chunks(
        tp, capacity, chunk_bytes, chunk_time, start_bytes, start_time, owner, within, c
    )


def greedy_cuts(
    prefix_bytes: Sequence[int],
    prefix_time: Sequence[int],
    capacity: int,
    time_bound: int | None = None,
    stop_after: int | None = None,
    start_bytes: Sequence[int] | None = None,
    start_time: Sequence[int] | None = None,
) -> list[int] | None:
    """Stage end positions of greedy packing; None if some single chunk breaks a limit.

    A stage starting at chunk i also holds `start_bytes[i]` and spends `start_time[i]`
    (`ChunkTable`). Stops early (returning what it has) once more than `stop_after` stages
    are needed. (`ChunkTable.greedy` on the table of these prefix sums.)
    """
    table = _table_of_prefixes(prefix_bytes, prefix_time, capacity, start_bytes, start_time)
    return table.greedy(time_bound, stop_after)


def _table_of_prefixes(
    prefix_bytes: Sequence[int],
    prefix_time: Sequence[int],
    capacity: int,
    start_bytes: Sequence[int] | None,
    start_time: Sequence[int] | None,
) -> ChunkTable:
    n = len(prefix_bytes) - 1
    return ChunkTable.of_chunks(
        1,
        capacity,
        np.diff(np.asarray(prefix_bytes, dtype=np.int64)),
        np.diff(np.asarray(prefix_time, dtype=np.int64)),
        np.asarray(start_bytes if start_bytes else [0] * n, dtype=np.int64),
        np.asarray(start_time if start_time else [0] * n, dtype=np.int64),
    )


@dataclass(frozen=True)
class Partition:
    """Stage boundaries over a chunk table: stage i covers chunks [bounds[i], bounds[i+1])."""

    table: ChunkTable
    bounds: tuple[int, ...]
    # The fewest chips any contiguous split of the finest pieces needs (over every TP width),
    # when `ranked_partitions` looked (only for plans over `chips_target`); else None.
    finest_chips: int | None = None

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
    cuts = table.greedy()
    assert cuts is not None  # build_chunk_table guarantees every chunk fits a chip
    return len(cuts)


def optimal_partition(table: ChunkTable, stages: int | None = None) -> Partition:
    """Fewest stages that fit (or exactly `stages`, if at least the fewest and at most one
    chunk each), with the smallest bottleneck."""
    k = min_stage_count(table) if stages is None else stages
    bound = table_bottleneck(table, k)
    cuts = table.greedy(bound)
    assert cuts is not None and len(cuts) <= k
    return Partition(table, _split_to(table, [0, *cuts], k))


def table_bottleneck(table: ChunkTable, stages: int) -> int:
    """`optimal_bottleneck` on a chunk table (start charges included).

    Bisection between two bounds that bracket it: no split into `stages` stages is faster
    than its total time shared evenly, nor than its slowest chunk; greedy packing under the
    byte limit alone gives one as slow as its slowest stage (at most `stages` stages when that
    many fit). The bracket is narrow, so few greedy passes are needed.
    """
    total = table.prefix_time[-1]
    hi = total  # one stage of everything: no stage of a split takes longer
    packed = table.greedy()
    if packed is not None and len(packed) <= stages:
        hi = max(table.segment_time(a, b) for a, b in zip([0, *packed[:-1]], packed, strict=True))
    lo = min(max(-(-total // stages), table.slowest_ps), hi)
    while lo < hi:
        mid = (lo + hi) // 2
        cuts = table.greedy(mid, stop_after=stages)
        if cuts is not None and len(cuts) <= stages:
            hi = mid
        else:
            lo = mid + 1
    return lo


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
    prefix_bytes: Sequence[int],
    prefix_time: Sequence[int],
    capacity: int,
    stages: int,
    start_bytes: Sequence[int] | None = None,
    start_time: Sequence[int] | None = None,
) -> int:
    """Smallest T such that the chunks split into at most `stages` fitting stages of time <= T.

    The plain form of `table_bottleneck`."""
    table = _table_of_prefixes(prefix_bytes, prefix_time, capacity, start_bytes, start_time)
    return table_bottleneck(table, stages)


@dataclass(frozen=True)
class TPChoice:
    tp: int
    table: ChunkTable
    stages: int

    @property
    def chips(self) -> int:
        return self.tp * self.stages


# Chips against the SRAM lower bound a plan aims for, in percent (issue 12: x1.03). Plans the
# default pieces leave above it get a second look at the finest pieces (`ranked_partitions`).
CHIPS_TARGET_PERCENT = 103


def chips_target(lower_bound: int, finest_chips: int | None = None) -> int:
    """The most chips a plan of automatic stage count should use: 3 % over the lower bound
    (rounded down: chips are whole), or the fewest chips any contiguous split of the finest
    pieces needs, whichever is more.

    The second term decides only for models of a few dozen chips, where one chip is more
    than 3 % and a stage boundary can cost more than the bound's slack: a boundary inside
    attention holds a KV group's K/V projections and cache on both sides.
    """
    return max(lower_bound * CHIPS_TARGET_PERCENT // 100, finest_chips or 0)


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

    Chunks of about 1/`max_chunks_per_chip` of a chip keep the tables small (405B: ~250k
    chunks per width) and waste at most one chunk per stage — a few tenths of a percent, which
    matters only for models of a few dozen chips, where one chip is more than 3 %. So when the
    fewest chips of any width exceed `chips_target` of the lower bound (one replica's),
    every width is cut again at the finest pieces (`build_chunk_table(finest=True)`); if that
    saves chips, a width keeps the finer table where it needs fewer stages. Plans within the
    target never pay for this second look, and no plan changes unless it saves chips; the ones
    over the target carry `finest_chips`, the fewest any split of the finest pieces needs,
    which the plan's notes quote.
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
    columns = OpColumns.of(ops, cfg, profile, work)
    for tp in widths:
        try:
            table = build_chunk_table(ops, cfg, profile, work, tp, columns)
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
    finest_chips = None
    bound = lower_bound_chips(
        int((columns.split_bytes + columns.replicated).sum()), profile.usable_sram_bytes
    )
    if pipeline_stages is None and min(c.chips for c in choices) > chips_target(bound):
        finest = [_finest(c.tp, ops, cfg, profile, work, columns) for c in choices]
        finest_chips = min(f.chips for f in finest)
        # Only a saving changes the plan; then a width keeps the finer table where it needs
        # fewer stages (finer pieces can also need more: every piece's share is rounded up).
        if finest_chips < min(c.chips for c in choices):
            choices = [
                f if f.stages < c.stages else c for c, f in zip(choices, finest, strict=True)
            ]
    for chips in sorted({c.chips for c in choices}):
        same = [
            replace(optimal_partition(c.table, c.stages), finest_chips=finest_chips)
            for c in choices
            if c.chips == chips
        ]
        yield from sorted(same, key=lambda p: p.bottleneck_ps)


def _finest(
    tp: int,
    ops: Sequence[Op],
    cfg: ModelConfig,
    profile: ChipProfile,
    work: Workload,
    columns: OpColumns,
) -> TPChoice:
    """The fewest stages at width `tp` of the finest pieces the layout supports."""
    table = build_chunk_table(ops, cfg, profile, work, tp, columns, finest=True)
    return TPChoice(tp, table, min_stage_count(table))


def lower_bound_chips(total_bytes: int, usable_per_chip: int) -> int:
    """Chips the bytes need at the least: every chip filled to its usable SRAM."""
    return max(1, -(-total_bytes // usable_per_chip))
