"""The partitioner is optimal for the contiguous-stage problem: checked against brute force."""

from __future__ import annotations

from itertools import combinations, pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.cost import Workload
from placement.models import build_ops, chunk_limits, model_preset
from placement.partition import (
    ChunkTable,
    Partition,
    build_chunk_table,
    greedy_cuts,
    optimal_bottleneck,
    optimal_partition,
    ranked_partitions,
    table_bottleneck,
)
from placement.profiles import GROQ_RACK


def prefix(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def brute_force(sizes: list[int], times: list[int], capacity: int) -> tuple[int, int] | None:
    """(fewest stages, smallest bottleneck among those) by trying every composition."""
    n = len(sizes)
    best: tuple[int, int] | None = None
    for k in range(1, n + 1):
        for inner in combinations(range(1, n), k - 1):
            bounds = (0, *inner, n)
            segments = list(pairwise(bounds))
            if any(sum(sizes[a:b]) > capacity for a, b in segments):
                continue
            bottleneck = max(sum(times[a:b]) for a, b in segments)
            if best is None or (k, bottleneck) < best:
                best = (k, bottleneck)
        if best is not None:
            return best
    return None


instances = st.integers(min_value=1, max_value=9).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(1, 50), min_size=n, max_size=n),
        st.lists(st.integers(0, 100), min_size=n, max_size=n),
        st.integers(1, 150),
    )
)


@settings(max_examples=400, deadline=None)
@given(instances)
def test_partition_matches_exhaustive_search(instance: tuple[list[int], list[int], int]) -> None:
    sizes, times, capacity = instance
    expected = brute_force(sizes, times, capacity)
    pb, pt = prefix(sizes), prefix(times)
    cuts = greedy_cuts(pb, pt, capacity)
    if expected is None:
        assert cuts is None
        return
    assert cuts is not None
    stages = len(cuts)
    bound = optimal_bottleneck(pb, pt, capacity, stages)
    final = greedy_cuts(pb, pt, capacity, bound)
    assert final is not None
    bounds = [0, *final]
    achieved = max(pt[b] - pt[a] for a, b in pairwise(bounds))
    assert (stages, achieved) == expected
    assert len(final) <= stages
    assert all(pb[b] - pb[a] <= capacity for a, b in pairwise(bounds))


def test_greedy_reports_a_chunk_that_never_fits() -> None:
    assert greedy_cuts(prefix([5, 200, 5]), prefix([1, 1, 1]), 100) is None


def test_bottleneck_balances_when_stage_count_is_fixed() -> None:
    sizes, times = [10] * 6, [1, 1, 1, 1, 1, 5]
    pb, pt = prefix(sizes), prefix(times)
    # capacity allows all six on one chip, but with three stages the best split isolates the
    # slow op: [1,1,1,1] [1] [5] -> bottleneck 5
    assert optimal_bottleneck(pb, pt, 60, 3) == 5
    assert optimal_bottleneck(pb, pt, 60, 1) == 10


# --- stages that start inside a KV group hold its K/V again --------------------------------


def brute_force_with_starts(
    sizes: list[int], times: list[int], extra: list[tuple[int, int]], capacity: int
) -> tuple[int, int] | None:
    """`brute_force` where a stage starting at chunk i also costs `extra[i]` (bytes, time)."""
    n = len(sizes)
    for k in range(1, n + 1):
        best = None
        for inner in combinations(range(1, n), k - 1):
            segments = list(pairwise((0, *inner, n)))
            if any(sum(sizes[a:b]) + extra[a][0] > capacity for a, b in segments):
                continue
            bottleneck = max(sum(times[a:b]) + extra[a][1] for a, b in segments)
            best = bottleneck if best is None else min(best, bottleneck)
        if best is not None:
            return k, best
    return None


grouped = st.lists(
    st.tuples(
        st.integers(1, 30),  # query-head bytes of the chunk
        st.integers(0, 60),  # its time
        st.booleans(),  # does it open a new KV group?
        st.integers(0, 25),  # that group's K/V bytes
        st.integers(0, 40),  # and time
    ),
    min_size=1,
    max_size=8,
)


def chunk_table(
    sizes: list[int], times: list[int], extra: list[tuple[int, int]], cap: int
) -> ChunkTable:
    return ChunkTable.of_chunks(
        1,
        cap,
        np.array(sizes),
        np.array(times),
        np.array([e[0] for e in extra]),
        np.array([e[1] for e in extra]),
    )


@settings(max_examples=400, deadline=None)
@given(grouped, st.integers(1, 150))
def test_partition_with_kv_group_starts_matches_exhaustive_search(
    chunks: list[tuple[int, int, bool, int, int]], capacity: int
) -> None:
    """The group's K/V is charged to its first chunk and again to a stage starting at a later
    one (as `build_chunk_table` charges attention cut inside a KV group): greedy packing and
    the bottleneck search, plain and on a `ChunkTable`, still find the optimum."""
    sizes, times, extra = [], [], []
    group = (0, 0)
    for i, (size, time, opens, kv_bytes, kv_time) in enumerate(chunks):
        if opens or i == 0:
            group = (kv_bytes, kv_time)
            sizes.append(size + kv_bytes)
            times.append(time + kv_time)
            extra.append((0, 0))
        else:
            sizes.append(size)
            times.append(time)
            extra.append(group)
    expected = brute_force_with_starts(sizes, times, extra, capacity)
    pb, pt = prefix(sizes), prefix(times)
    xb, xt = [e[0] for e in extra], [e[1] for e in extra]
    cuts = greedy_cuts(pb, pt, capacity, None, None, xb, xt)
    table = chunk_table(sizes, times, extra, capacity)
    if expected is None:
        assert cuts is None and table.greedy() is None
        return
    assert cuts is not None and table.greedy() == cuts
    stages = len(cuts)
    bound = optimal_bottleneck(pb, pt, capacity, stages, xb, xt)
    assert (stages, bound) == expected
    assert table_bottleneck(table, stages) == bound
    partition = optimal_partition(table)
    assert partition.stage_count == stages and partition.bottleneck_ps == bound
    assert all(partition.stage_bytes(i) <= capacity for i in range(stages))
    # Asked for more stages than the fewest, splits never break a limit either.
    if stages < len(sizes):
        wider = optimal_partition(table, stages + 1)
        assert wider.stage_count == stages + 1 and wider.bottleneck_ps <= bound
        assert all(wider.stage_bytes(i) <= capacity for i in range(stages + 1))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_finest_table_cuts_every_op_into_the_most_pieces_the_layout_supports(tp: int) -> None:
    """`finest=True`: an op is cut into `chunk_limits` pieces, attention at TP 1 into one
    query head per piece (at TP > 1 into whole KV groups, as by default); the same bytes as
    the default pieces but for per-piece rounding."""
    cfg = model_preset("llama-3.2-3b")
    work = Workload(4096, 4, "int8")
    ops = build_ops(cfg, "int8")
    default = build_chunk_table(ops, cfg, GROQ_RACK, work, tp)
    finest = build_chunk_table(ops, cfg, GROQ_RACK, work, tp, finest=True)
    limits = chunk_limits(cfg, GROQ_RACK.mlp_cut_columns)
    pairs = zip(finest.op_index, finest.chunk_count, strict=True)
    counts = {ops[int(o)].kind: int(c) for o, c in pairs}
    assert counts["mlp"] == limits["mlp"] == 256 and counts["lm_head"] == limits["lm_head"]
    kv = cfg.num_key_value_heads
    assert counts["attention"] == (cfg.num_attention_heads if tp == 1 else kv // tp)
    assert finest.size > default.size
    # Per-rank rounding goes either way (a piece of an odd number of units at TP 2 charges
    # half a unit more); at TP 1 the K/V a group cut into query heads holds again only adds.
    assert abs(int(finest.prefix_bytes[-1]) / int(default.prefix_bytes[-1]) - 1) < 0.01
    if tp == 1:
        assert int(finest.prefix_bytes[-1]) >= int(default.prefix_bytes[-1])


def test_second_look_only_over_the_target() -> None:
    """`ranked_partitions` cuts at the finest pieces only when the default pieces leave the
    best width over `chips_target`; the partitions then carry `finest_chips`."""

    def first(name: str, batch: int) -> Partition:
        cfg = model_preset(name)
        work = Workload(4096, batch, "int8")
        return next(ranked_partitions(build_ops(cfg, "int8"), cfg, GROQ_RACK, work, None))

    within = first("llama-3.2-3b", 8)  # 26 chips for a bound of 26
    assert within.finest_chips is None
    over = first("llama-3.2-3b", 4)  # 22 for 21 at the default pieces, and at the finest
    assert over.finest_chips == 22 == over.stage_count * over.table.tp
