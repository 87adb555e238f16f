"""SRAM arena: hard capacity, nothing changes on a refused reservation, spans are reused."""

from __future__ import annotations

import pytest

from agents.arena import PAGE, ArenaExhausted, SramArena

MiB = 1 << 20


def test_reserve_accounts_and_refuses_over_capacity() -> None:
    arena = SramArena(3, 2 * MiB)
    block = arena.reserve("shard a", MiB + 10, MiB)
    assert (arena.accounted, arena.free) == (MiB + 10, MiB - 10)
    with pytest.raises(ArenaExhausted) as info:
        arena.reserve("shard b", MiB, MiB)
    message = str(info.value)
    assert "chip 3" in message and f"needs {MiB} bytes" in message
    assert f"only {MiB - 10} bytes free" in message
    assert (arena.accounted, arena.free) == (MiB + 10, MiB - 10)  # unchanged
    arena.free_block(block)
    arena.free_block(block)  # idempotent
    assert (arena.accounted, arena.free) == (0, 2 * MiB)


def test_block_memory_is_writable_and_spans_coalesce() -> None:
    arena = SramArena(0, 4 * MiB)
    blocks = [arena.reserve(f"s{i}", MiB, MiB) for i in range(4)]
    for i, block in enumerate(blocks):
        block.view[:] = bytes([i]) * MiB
    assert [bytes(b.view[:1]) for b in blocks] == [b"\x00", b"\x01", b"\x02", b"\x03"]
    assert len({b.offset for b in blocks}) == 4 and all(b.offset % PAGE == 0 for b in blocks)
    arena.free_block(blocks[1])
    arena.free_block(blocks[2])
    assert arena.largest_free_span() == 2 * MiB  # neighbours merged
    again = arena.reserve("big", 2 * MiB, 2 * MiB)
    assert again.offset == blocks[1].offset and again.own_map is None  # warm span reused


def test_virtual_block_accounts_more_than_it_stores() -> None:
    arena = SramArena(0, 8 * MiB)
    block = arena.reserve("virtual", 6 * MiB, 100)
    assert len(block.view) == 100 and arena.free == 2 * MiB
    with pytest.raises(ValueError, match="accounts at least"):
        arena.reserve("bad", 10, 100)


def test_fragmentation_falls_back_to_a_private_map() -> None:
    arena = SramArena(0, 3 * MiB)
    a = arena.reserve("a", MiB, MiB)
    arena.reserve("b", MiB // 2, PAGE)
    c = arena.reserve("c", MiB, MiB)
    arena.free_block(a)
    arena.free_block(c)
    # 2.5 MiB accounted free, but no 2 MiB contiguous span: memory comes from its own map.
    block = arena.reserve("d", 2 * MiB, 2 * MiB)
    assert block.own_map is not None and block.offset == -1
    block.view[-1:] = b"x"
    arena.free_block(block)
    assert arena.free == 3 * MiB - MiB // 2
