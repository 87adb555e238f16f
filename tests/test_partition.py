"""The partitioner is optimal for the contiguous-stage problem: checked against brute force."""

from __future__ import annotations

from itertools import combinations, pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from placement.partition import greedy_cuts, optimal_bottleneck


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
