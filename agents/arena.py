"""A chip's SRAM arena: hard-capacity accounting plus the memory shards are received into.

Accounting and memory are separate on purpose. Every block *accounts* bytes against the chip's
hard capacity (for a real shard its size or more — the declared SRAM need, e.g. KV cache — for
a virtual shard its declared size) and *holds* only the bytes that are actually stored (a
virtual shard's small manifest blob). A reservation that does not fit raises `ArenaExhausted`,
naming the chip, the bytes needed and the bytes free, and changes nothing.

Memory: each chip owns one anonymous `mmap` region of its capacity, carved by a first-fit
allocator with coalescing, page-aligned. Why one region instead of a buffer per shard:

* First touch is the expensive part of a large copy on this machine (0.4-0.5 GB/s into fresh
  4 KiB pages against 11 GB/s into touched memory, `shared/reference/machine-facts.md`). Pages
  of a region stay mapped after a shard is unloaded, so a reload, a failover onto the chip, or
  the next deployment writes into warm memory — like real SRAM, which is always there.
* The region asks for transparent huge pages (`MADV_HUGEPAGE`): a cold first touch then costs
  one fault per 2 MiB instead of per 4 KiB (measured up to 7.7 GB/s instead of 1.1 GB/s; in
  this VM memory the host has not backed yet stays slow either way, about 1.2 GB/s, which
  is why bench/shard_load.py reports the first, cold load separately).
* Address space is only reserved; resident memory grows to the chip's high-water mark of
  stored bytes, never beyond its capacity.

If fragmentation leaves no contiguous span although the accounting fits, the block gets its
own mmap (the accounting, which is what the hard capacity is about, is unchanged).
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import threading
from dataclasses import dataclass, field

PAGE = mmap.PAGESIZE


class ArenaExhausted(Exception):
    """A reservation does not fit the chip's free SRAM; nothing was reserved."""

    def __init__(self, chip: int, label: str, need: int, free: int, capacity: int) -> None:
        self.chip, self.need, self.free, self.capacity = chip, need, free, capacity
        super().__init__(
            f"chip {chip}: {label} needs {need} bytes of SRAM ({_mib(need)}), "
            f"only {free} bytes free ({_mib(free)}) of {capacity} ({_mib(capacity)})"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@dataclass(eq=False)
class Block:
    """Bytes accounted to one shard and the writable memory its blob lives in."""

    label: str
    accounted: int
    size: int
    offset: int
    view: memoryview = field(repr=False)
    own_map: mmap.mmap | None = field(default=None, repr=False)
    freed: bool = False


class SramArena:
    """One chip's SRAM: capacity accounting and a region that blocks are carved from.

    Thread-safe: every method takes the arena's lock. Blocks are freed explicitly (`free`);
    a caller must not keep `block.view` (or numpy views of it) after freeing it, because the
    span is handed out again.
    """

    def __init__(self, chip: int, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"chip {chip}: SRAM capacity must be positive, got {capacity}")
        self.chip = chip
        self.capacity = capacity
        self._lock = threading.Lock()
        self._accounted = 0
        self._region_size = _round_up(capacity, PAGE)
        self._region = mmap.mmap(-1, self._region_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _advise_huge_pages(self._region)
        self._region_view = memoryview(self._region)
        # Free spans as sorted parallel lists of offsets and lengths.
        self._free_offsets: list[int] = [0]
        self._free_lengths: list[int] = [self._region_size]

    @property
    def accounted(self) -> int:
        return self._accounted

    @property
    def free(self) -> int:
        return self.capacity - self._accounted

    def reserve(self, label: str, accounted: int, size: int) -> Block:
        """Account `accounted` bytes and allocate `size` writable bytes (≤ accounted)."""
        if size < 0 or accounted < size:
            raise ValueError(
                f"a block accounts at least the bytes it stores ({accounted} < {size})"
            )
        with self._lock:
            if accounted > self.capacity - self._accounted:
                raise ArenaExhausted(self.chip, label, accounted, self.free, self.capacity)
            offset = self._take_span(_round_up(max(size, 1), PAGE))
            self._accounted += accounted
        if offset is None:
            own = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            _advise_huge_pages(own)
            return Block(label, accounted, size, -1, memoryview(own)[:size], own)
        return Block(label, accounted, size, offset, self._region_view[offset : offset + size])

    def free_block(self, block: Block) -> None:
        """Give a block's accounting and memory back (idempotent)."""
        with self._lock:
            if block.freed:
                return
            block.freed = True
            self._accounted -= block.accounted
            if block.offset >= 0:
                self._give_span(block.offset, _round_up(max(block.size, 1), PAGE))
        with contextlib.suppress(BufferError):  # a view still exported elsewhere: GC frees it
            block.view.release()

    def _take_span(self, length: int) -> int | None:
        for i, span in enumerate(self._free_lengths):
            if span >= length:
                offset = self._free_offsets[i]
                if span == length:
                    del self._free_offsets[i], self._free_lengths[i]
                else:
                    self._free_offsets[i] += length
                    self._free_lengths[i] -= length
                return offset
        return None

    def _give_span(self, offset: int, length: int) -> None:
        i = bisect.bisect_left(self._free_offsets, offset)
        self._free_offsets.insert(i, offset)
        self._free_lengths.insert(i, length)
        if i + 1 < len(self._free_offsets) and offset + length == self._free_offsets[i + 1]:
            self._free_lengths[i] += self._free_lengths.pop(i + 1)
            self._free_offsets.pop(i + 1)
        if i > 0 and self._free_offsets[i - 1] + self._free_lengths[i - 1] == offset:
            self._free_lengths[i - 1] += self._free_lengths.pop(i)
            self._free_offsets.pop(i)

    def largest_free_span(self) -> int:
        """Longest contiguous free span of the region, in bytes (for diagnostics and tests)."""
        with self._lock:
            return max(self._free_lengths, default=0)


def _advise_huge_pages(region: mmap.mmap) -> None:
    """Ask for transparent huge pages where the platform has them (cheaper first touch)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and len(region) >= 2 << 20:
        # THP disabled ("never"): 4 KiB pages still work, only slower to touch.
        with contextlib.suppress(OSError):
            region.madvise(advice)
